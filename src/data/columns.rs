//! `[data] columns` (`--columns`): which column of a data file holds each field temper reads,
//! for datasets that name theirs otherwise, as OpenRLHF's `--input_key` and `--output_key`
//! and TRL's `dataset_text_field` name them (GSM8K's `question`, the Stack's `content`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::records::{Loc, Place};

/// The record fields a column can be read as.
pub const FIELDS: [&str; 12] = [
    "prompt",
    "completion",
    "response",
    "messages",
    "text",
    "chosen",
    "rejected",
    "label",
    "margin",
    "answer",
    "tools",
    "chat_template_kwargs",
];

/// The fields a record may leave out: a named column it lacks leaves the field out too.
const OPTIONAL: [&str; 4] = ["answer", "margin", "tools", "chat_template_kwargs"];

/// Field name to the file's column name; a field not named is read from its own column.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Columns(BTreeMap<String, String>);

impl Columns {
    /// `--columns prompt=question,answer=solution`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut map = BTreeMap::new();
        for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
            let Some((field, column)) = pair.split_once('=') else {
                bail!("--columns: \"{pair}\" is not FIELD=COLUMN (e.g. prompt=question)");
            };
            let (field, column) = (field.trim(), column.trim());
            if map.insert(field.to_string(), column.to_string()).is_some() {
                bail!("--columns: \"{field}\" is given twice");
            }
        }
        Ok(Self(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuses a field temper does not read, one the stage does not read (`reads`, for `who`),
    /// an empty column name, and two fields read from one column.
    pub fn check(&self, reads: &[&str], who: &str) -> Result<()> {
        self.check_as(reads, who, "data.columns")
    }

    /// [`Columns::check`], errors naming the setting `setting` (`--columns` where no config
    /// file can give it).
    pub fn check_as(&self, reads: &[&str], who: &str, setting: &str) -> Result<()> {
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (field, column) in &self.0 {
            if !FIELDS.contains(&field.as_str()) {
                bail!(
                    "{setting}: \"{field}\" is no field temper reads (it reads {})",
                    FIELDS.join(", ")
                );
            }
            if !reads.contains(&field.as_str()) {
                bail!(
                    "{setting}: {who} reads no \"{field}\" (it reads {})",
                    reads.join(", ")
                );
            }
            if column.is_empty() {
                bail!("{setting}: \"{field}\" names no column");
            }
            if let Some(other) = seen.insert(column, field) {
                bail!(
                    "{setting}: \"{other}\" and \"{field}\" are both read from column \"{column}\""
                );
            }
        }
        Ok(())
    }

    /// The column holding `field`.
    pub fn column<'a>(&'a self, field: &'a str) -> &'a str {
        self.0.get(field).map_or(field, String::as_str)
    }

    /// Renames a record's columns to the fields they hold. All are taken out before any is put
    /// back, so that a swap (`chosen=rejected,rejected=chosen`) swaps; a field's own column,
    /// where the file has one too, gives way to the column named for it. A named column the
    /// record lacks is an error at the record, naming both, unless its field is one a record
    /// may leave out ([`OPTIONAL`]).
    pub(crate) fn apply(&self, at: &Loc, obj: &mut Map<String, Value>) -> Result<()> {
        let mut taken = Vec::with_capacity(self.0.len());
        for (field, column) in self.0.iter().filter(|(f, c)| f != c) {
            match obj.remove(column) {
                Some(v) => taken.push((field, v)),
                None if OPTIONAL.contains(&field.as_str()) => {
                    obj.remove(field);
                }
                None => {
                    let msg = format!("missing (data.columns reads it as \"{field}\")");
                    return Err(at.field(column, &msg));
                }
            }
        }
        for (field, v) in taken {
            obj.insert(field.clone(), v);
        }
        Ok(())
    }

    /// The optional fields ([`OPTIONAL`]) this names a column for that some record of
    /// `records` (renamed by [`Columns::apply`]) has.
    pub(crate) fn found_in(&self, records: &[(Place, Map<String, Value>)]) -> Vec<String> {
        self.named_optional()
            .filter(|(field, _)| records.iter().any(|(_, r)| r.contains_key(*field)))
            .map(|(field, _)| field.clone())
            .collect()
    }

    /// Refuses a column named for a field a record may leave out ([`OPTIONAL`]) that no record
    /// of the dataset `path` has (`found`: the fields [`Columns::found_in`] found in any of its
    /// files, its held-out ones too; `first`: its first record's columns): a misspelt name
    /// would otherwise drop the field from every record, silently.
    pub(crate) fn check_found(
        &self,
        path: &Path,
        found: &[String],
        first: &[String],
    ) -> Result<()> {
        let mut first = first.to_vec();
        first.sort_unstable();
        for (field, column) in self.named_optional() {
            if !found.contains(field) {
                bail!(
                    "{}: data.columns reads \"{field}\" from column \"{column}\", which no \
                     record has (the first record's columns: {})",
                    path.display(),
                    first.join(", ")
                );
            }
        }
        Ok(())
    }

    fn named_optional(&self) -> impl Iterator<Item = (&String, &String)> {
        (self.0.iter()).filter(|(f, c)| f != c && OPTIONAL.contains(&f.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    /// Columns become the fields they are named for, a swap swaps, a field's own column gives
    /// way, and a missing column is named at its record.
    #[test]
    fn columns_are_read_as_the_fields_they_are_named_for() {
        let at = Loc {
            path: Path::new("gsm8k.jsonl"),
            at: Place::Line(3),
        };
        let c = Columns::parse("prompt=question, answer=solution").unwrap();
        let mut r = obj(json!({"question": "2+2?", "solution": "4", "prompt": "old", "id": 7}));
        c.apply(&at, &mut r).unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"prompt": "2+2?", "answer": "4", "id": 7})
        );
        let swap = Columns::parse("chosen=rejected,rejected=chosen").unwrap();
        let mut r = obj(json!({"prompt": "q", "chosen": "bad", "rejected": "good"}));
        swap.apply(&at, &mut r).unwrap();
        assert_eq!(
            (&r["chosen"], &r["rejected"]),
            (&json!("good"), &json!("bad"))
        );
        let e = c
            .apply(&at, &mut obj(json!({"solution": "4"})))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "gsm8k.jsonl:3: field \"question\": missing (data.columns reads it as \"prompt\")"
        );
        assert_eq!(c.column("prompt"), "question");
        // An optional field's column may be missing from a record.
        let mut r = obj(json!({"solution": "4", "answer": "own"}));
        let tools = Columns::parse("answer=solution,tools=functions").unwrap();
        tools.apply(&at, &mut r).unwrap();
        assert_eq!(Value::Object(r), json!({"answer": "4"}));
        assert_eq!(c.column("text"), "text");
    }

    /// An optional field's column that no record of a dataset has is refused, naming the
    /// columns of its first record; one that some record has passes.
    #[test]
    fn an_optional_column_no_record_has_is_refused() {
        let c = Columns::parse("prompt=question,answer=soluton").unwrap();
        let path = Path::new("gsm8k.jsonl");
        let mut records: Vec<(Place, Map<String, Value>)> = (1..=3)
            .map(|line| {
                (
                    Place::Line(line),
                    obj(json!({"question": "2+2?", "solution": "4"})),
                )
            })
            .collect();
        for (at, r) in &mut records {
            c.apply(&Loc { path, at: *at }, r).unwrap();
        }
        let first: Vec<String> = records[0].1.keys().cloned().collect();
        let e = c
            .check_found(path, &c.found_in(&records), &first)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "gsm8k.jsonl: data.columns reads \"answer\" from column \"soluton\", which no record \
             has (the first record's columns: prompt, solution)"
        );
        records[2].1.insert("answer".into(), json!("4"));
        c.check_found(path, &c.found_in(&records), &first).unwrap();
    }

    #[test]
    fn bad_columns_are_refused() {
        let e = |text: &str, reads: &[&str]| {
            Columns::parse(text)
                .and_then(|c| c.check(reads, "sft"))
                .unwrap_err()
                .to_string()
        };
        assert!(e("prompt", &["prompt"]).contains("\"prompt\" is not FIELD=COLUMN"));
        assert!(e("prompt=a,prompt=b", &["prompt"]).contains("given twice"));
        assert!(e("promt=q", &["prompt"]).contains("\"promt\" is no field temper reads"));
        assert!(e("chosen=q", &["prompt"]).contains("sft reads no \"chosen\" (it reads prompt)"));
        assert!(e("prompt=", &["prompt"]).contains("names no column"));
        let two = e("prompt=q,completion=q", &["prompt", "completion"]);
        assert!(
            two.contains("\"completion\" and \"prompt\" are both read from column \"q\""),
            "{two}"
        );
        Columns::parse("prompt=question,completion=answer")
            .unwrap()
            .check(&["prompt", "completion"], "sft")
            .unwrap();
    }
}
