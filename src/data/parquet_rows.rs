//! Apache Parquet files, as the Hugging Face Hub stores datasets (`hf download ORG/NAME
//! --repo-type dataset` fetches `data/train-00000-of-00001.parquet`): each row read as the
//! JSON object `datasets` gives for it (a struct column an object, a list an array), so that
//! every record format reads from a Parquet file as from JSONL.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use serde_json::{Map, Number, Value};

/// Whether `path` names a Parquet file: by its ending, as `datasets` picks a loader.
pub(crate) fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The rows of a Parquet file, each as a JSON object; with `columns`, only those (a corpus
/// reads `text` alone, and a web crawl's other columns are most of its bytes). A column the
/// file lacks is named with the ones it has.
pub(crate) fn read_rows(path: &Path, columns: Option<&[&str]>) -> Result<Vec<Map<String, Value>>> {
    if path.is_dir() {
        bail!("{}: a directory, where one file is read", path.display());
    }
    let mut file = File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !ends_with_magic(&mut file) {
        bail!(
            "{}: not a Parquet file (it does not end with Parquet's PAR1 marker); JSONL is read \
             from a file ending .jsonl",
            path.display()
        );
    }
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{}: not a Parquet file we can read: {e}", path.display()))?;
    check_codecs(path, &reader)?;
    let schema = reader.metadata().file_metadata().schema();
    let projection = match columns {
        None => None,
        Some(names) => Some(project(path, schema, names)?),
    };
    let rows = reader
        .get_row_iter(projection)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut out = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow!("{}[{i}]: cannot read the row: {e}", path.display()))?;
        out.push(object(&row));
    }
    Ok(out)
}

/// The file's schema cut to the top-level `names`.
fn project(path: &Path, schema: &Type, names: &[&str]) -> Result<Type> {
    let fields = schema.get_fields();
    let mut kept = Vec::with_capacity(names.len());
    for name in names {
        match fields.iter().find(|f| f.name() == *name) {
            Some(f) => kept.push(Arc::clone(f)),
            None => {
                let has: Vec<&str> = fields.iter().map(|f| f.name()).collect();
                bail!(
                    "{}: no column \"{name}\" (its columns: {})",
                    path.display(),
                    has.join(", ")
                );
            }
        }
    }
    Type::group_type_builder(schema.name())
        .with_fields(kept)
        .build()
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Whether the file ends with Parquet's magic bytes (its footer's marker).
fn ends_with_magic(file: &mut File) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut tail = [0u8; 4];
    file.seek(SeekFrom::End(-4)).is_ok() && file.read_exact(&mut tail).is_ok() && &tail == b"PAR1"
}

/// Refuses, before any row is read, a file whose columns use a codec this build leaves out
/// (Brotli, LZO), naming it and the ones it reads.
fn check_codecs(path: &Path, reader: &SerializedFileReader<File>) -> Result<()> {
    use parquet::basic::Compression as C;
    for group in reader.metadata().row_groups() {
        for column in group.columns() {
            let name = match column.compression() {
                C::BROTLI(_) => "Brotli",
                C::LZO => "LZO",
                _ => continue,
            };
            bail!(
                "{}: column {} is compressed with {name}, which temper does not read (it \
                 reads Snappy, zstd, LZ4, gzip or none): rewrite the file with one of those, as \
                 pyarrow's `compression=\"snappy\"` does",
                path.display(),
                column.column_path()
            );
        }
    }
    Ok(())
}

fn object(row: &Row) -> Map<String, Value> {
    row.get_column_iter()
        .map(|(name, field)| (name.clone(), value(field)))
        .collect()
}

/// A field as JSON, as `datasets` hands it to Python: a float32 as the shortest decimal that
/// rounds to it (0.1, not 0.10000000149011612), a non-finite float as null (JSON has none);
/// bytes as the text they hold where they are UTF-8 (some writers store strings so), else as
/// `{"base64": ...}`, which no field that wants text takes (an image's bytes); a map as its
/// list of key-value pairs; dates and decimals as the parquet crate writes them.
fn value(field: &Field) -> Value {
    let float = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float(x) => float(x.to_string().parse().unwrap_or(f64::NAN)),
        Field::Double(x) => float(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(text) => Value::String(text.to_string()),
            Err(_) => serde_json::json!({ "base64": field.to_json_value() }),
        },
        Field::Group(row) => Value::Object(object(row)),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(value).collect()),
        // A list of `{"key", "value"}` pairs, as Arrow stores a map (a list of structs; pyarrow
        // gives `(key, value)` tuples): keys that are not strings survive, and order too.
        Field::MapInternal(map) => Value::Array(
            map.entries()
                .iter()
                .map(|(k, v)| serde_json::json!({"key": value(k), "value": value(v)}))
                .collect(),
        ),
        other => other.to_json_value(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;
    use crate::data::chat_template::ChatTemplate;
    use crate::data::corpus::{load_documents, load_documents_from, Part};
    use crate::data::labelled::load_labelled_records;
    use crate::data::records::{
        load_preferences, load_prompts_templated, load_sft_templated, LossScope,
    };

    /// Files pyarrow wrote (tests/fixtures/parquet/make.py).
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parquet")
            .join(name)
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        let e = format!("{:#}", r.unwrap_err());
        assert!(!e.contains('\n'), "multi-line error: {e}");
        e
    }

    /// `[role]content<end>` per message.
    fn bracketed() -> ChatTemplate {
        let source = "{% for m in messages %}[{{ m.role }}]{{ m.content }}<end>{% endfor %}\
                      {% if add_generation_prompt %}[assistant]{% endif %}";
        ChatTemplate::from_source(source.into(), String::new(), String::new(), Path::new("t"))
            .unwrap()
    }

    /// Each row is the object `datasets` gives: lists of structs as lists of objects, a null
    /// as null, a float32 as the decimal written (0.1), every row group read in order.
    #[test]
    fn rows_read_as_the_objects_datasets_gives() {
        let rows = read_rows(&fixture("records.parquet"), None).unwrap();
        assert_eq!(rows.len(), 3);
        let want = json!({
            "prompt": [{"role": "user", "content": "2+2?"}],
            "completion": [{"role": "assistant", "content": "4"}],
            "label": true,
            "answer": 4,
            "weight": 0.1,
            "note": "first",
        });
        assert_eq!(Value::Object(rows[0].clone()), want);
        assert_eq!(rows[1]["note"], Value::Null);
        assert_eq!(
            rows[2]["completion"][1],
            json!({"role": "tool", "content": "21"})
        );
        // zstd, in two row groups.
        let rows = read_rows(&fixture("prefs.parquet"), None).unwrap();
        let last: Vec<&Value> = rows.iter().map(|r| &r["chosen"][1]["content"]).collect();
        assert_eq!(last, ["Blue", "Red", "Green"]);
    }

    /// Every stage's loader reads a Parquet file as it reads JSONL, and names a bad record by
    /// its row as `datasets` indexes it.
    #[test]
    fn every_record_format_reads_from_parquet() {
        let records = fixture("records.parquet");
        let t = bracketed();
        let kto = load_labelled_records(&records, Some(&t)).unwrap();
        let labels: Vec<bool> = kto.iter().map(|r| r[0].desirable).collect();
        assert_eq!(labels, [true, false, true]);
        assert_eq!(
            kto[2][0].completion,
            "call<end>[tool]21<end>[assistant]Hello<end>"
        );
        // The built-in template has no tool role: refused at the row and field.
        let e = err(load_labelled_records(&records, None));
        assert!(
            e.contains("records.parquet[2]: field \"completion[1].role\": unknown role \"tool\""),
            "{e}"
        );
        let sft = load_sft_templated(&records, Some(&t), LossScope::default()).unwrap();
        assert_eq!(sft.len(), 3);
        assert_eq!(
            sft[1]
                .origin
                .as_deref()
                .map(|o| o.ends_with("records.parquet[1]")),
            Some(true)
        );
        let prompts = load_prompts_templated(&records, Some(&t)).unwrap();
        assert_eq!(prompts[0].prompt, "[user]2+2?<end>[assistant]");
        assert_eq!(prompts[1].answer.as_deref(), Some("6"));
        assert_eq!(prompts[0].fields["weight"], json!(0.1));
        // HH's shape: the prompt implicit in the two conversations.
        let pairs = load_preferences(&fixture("prefs.parquet")).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[2].prompt, "<|user|>\nName a colour\n<|assistant|>\n");
        assert_eq!(
            (pairs[2].chosen.as_str(), pairs[2].rejected.as_str()),
            ("Green", "No")
        );
    }

    /// A corpus reads its `text` column alone (gzip here), an empty document dropped as from
    /// any corpus; a file without the column, a codec this build leaves out and a file that
    /// is not Parquet are each said in one line naming the file.
    #[test]
    fn a_corpus_reads_its_text_column_and_bad_files_say_why() {
        let docs = load_documents(&fixture("corpus.parquet")).unwrap();
        assert_eq!(
            docs,
            ["The first document.", "The third, after an empty one."]
        );
        let e = err(load_documents(&fixture("records.parquet")));
        assert!(
            e.contains("records.parquet: no column \"text\" (its columns: prompt, completion, label, answer, weight, note)"),
            "{e}"
        );
        let e = err(load_documents(&fixture("brotli.parquet")));
        assert!(
            e.contains("brotli.parquet: column \"text\" is compressed with Brotli")
                && e.contains("Snappy, zstd"),
            "{e}"
        );
        // Bytes that are UTF-8 are the text they hold; others are no text.
        let docs = load_documents(&fixture("binary.parquet")).unwrap();
        assert_eq!(docs, ["Bytes that are text."]);
        let row = &read_rows(&fixture("binary.parquet"), None).unwrap()[0];
        assert_eq!(row["image"], json!({"base64": "iVBOR/8="}));
        let pairs = json!([{"key": "a", "value": 1}, {"key": "b", "value": 2}]);
        assert_eq!(row["scores"], pairs);
        let e = err(load_documents_from(
            &fixture("binary.parquet"),
            "image",
            Part::train(),
        ));
        assert!(
            e.contains("binary.parquet[0]: field \"image\": expected a string, got an object"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("train.parquet");
        std::fs::write(&fake, "{\"text\": \"json, not parquet\"}\n").unwrap();
        let e = err(load_preferences(&fake));
        assert!(e.contains("train.parquet: not a Parquet file"), "{e}");
    }
}
