//! Tokenizers, corpora (text, or token shards tokenized once), the record formats of each
//! stage, the built-in synthetic task, and the sampler that orders training data.

pub mod chat_template;
pub mod columns;
pub mod corpus;
pub mod document_ids;
pub mod encode;
pub mod jinja_python;
pub mod jinja_text;
pub mod labelled;
pub(crate) mod parquet_rows;
pub mod records;
pub mod sampler;
pub mod shards;
pub mod splits;
pub mod strict_json;
pub mod synthetic;
pub mod tokenizer;
