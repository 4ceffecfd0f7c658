//! Tokenizers, corpora, the record formats of each stage, and the built-in synthetic task.

pub mod chat_template;
pub mod corpus;
pub mod records;
pub mod synthetic;
pub mod tokenizer;
