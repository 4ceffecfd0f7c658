//! KTO's dataset: completions each labelled desirable or undesirable, in TRL's unpaired
//! preference format `{"prompt", "completion", "label": true | false}` (plain strings, or a
//! conversational prompt with a completion of one message or several). A file of preference pairs
//! `{"prompt", "chosen", "rejected"}` is read too, each pair as a desirable and an
//! undesirable completion, as TRL unpairs one.
//!
//! Errors name the file, the 1-based line and the field, as every record format does
//! ([`super::records`]).

use std::path::Path;

use anyhow::Result;
use serde_json::{Map, Value};

use super::chat_template::ChatTemplate;
use super::records::{
    bind, kind, preference_record, read_records, refuse_messages_after_text, render_prompt,
    render_reply, reply_field, Lines, Loc, PreferencePair, SftExample,
};

#[derive(Clone, Debug, PartialEq)]
pub struct LabelledCompletion {
    pub prompt: String,
    pub completion: String,
    pub desirable: bool,
    /// Whether an EOS follows the completion: not when a Jinja chat template wrote its own
    /// end-of-turn marker into it.
    pub append_eos: bool,
    /// `path:line` of the record it came from; none for the built-in task.
    pub origin: Option<String>,
}

impl LabelledCompletion {
    /// A preference pair as its chosen (desirable) and rejected (undesirable) completions.
    pub fn unpair(p: &PreferencePair) -> [Self; 2] {
        let side = |completion: &str, desirable| Self {
            prompt: p.prompt.clone(),
            completion: completion.to_string(),
            desirable,
            append_eos: p.append_eos,
            origin: p.origin.clone(),
        };
        [side(&p.chosen, true), side(&p.rejected, false)]
    }

    /// The prompt (no loss) and the completion (loss), as SFT encodes them.
    pub fn example(&self) -> SftExample {
        SftExample::prompt_response(
            &self.prompt,
            &self.completion,
            self.append_eos,
            self.origin.clone(),
        )
    }
}

/// Reads labelled completions, and preference pairs unpaired, record by record: a pair's two
/// completions stay together, so that a held-out split cannot part them. Conversational
/// records are rendered by a Hugging Face chat template when one is given (else the built-in
/// template).
pub fn load_labelled_records(
    path: &Path,
    template: Option<&ChatTemplate>,
) -> Result<Vec<Vec<LabelledCompletion>>> {
    labelled_from(path, read_records(path)?, template)
}

/// [`load_labelled_records`] of records already read ([`super::records::read_records_with`]).
pub fn labelled_from(
    path: &Path,
    lines: Lines,
    template: Option<&ChatTemplate>,
) -> Result<Vec<Vec<LabelledCompletion>>> {
    lines
        .into_iter()
        .map(|(at, obj)| labelled_record(&Loc { path, at }, &obj, template))
        .collect()
}

const SHAPES: &str =
    "a record holds a \"completion\" with its \"label\", or a \"chosen\" and a \"rejected\" completion";

fn labelled_record(
    at: &Loc,
    obj: &Map<String, Value>,
    template: Option<&ChatTemplate>,
) -> Result<Vec<LabelledCompletion>> {
    // "response" too, as SFT reads it: a prompt/response file labelled for KTO (a pair's
    // record keeps any field of that name to itself).
    let paired = obj.contains_key("chosen") || obj.contains_key("rejected");
    let reply = match paired {
        true => "completion",
        false => reply_field(at, obj)?.unwrap_or("completion"),
    };
    let single = obj.contains_key(reply);
    if single && paired {
        return Err(at.field(reply, &format!("{SHAPES}, not both")));
    }
    if paired {
        if obj.contains_key("label") {
            return Err(at.field("label", "a pair's \"chosen\" is desirable and its \"rejected\" undesirable: it takes no label"));
        }
        return Ok(LabelledCompletion::unpair(&preference_record(at, obj, template)?).to_vec());
    }
    if !single {
        return Err(at.field("completion", &format!("missing ({SHAPES})")));
    }
    // 1 and 0 as well: datasets converted from other formats store the label as an integer.
    let desirable = match obj.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) if matches!(n.as_u64(), Some(0 | 1)) => n.as_u64() == Some(1),
        None => return Err(at.field("label", "missing (true: desirable, false: undesirable)")),
        Some(v) => {
            // A scalar is shown; null, a list or an object only named.
            let got = match v {
                Value::Bool(_) | Value::Number(_) | Value::String(_) => format!("{} {v}", kind(v)),
                _ => kind(v).to_string(),
            };
            return Err(at.field(
                "label",
                &format!("expected true or false (or 1 or 0), got {got}"),
            ));
        }
    };
    let (prompt, completion, append_eos) = match obj.get("prompt") {
        Some(msgs @ Value::Array(_)) => {
            let chat = bind(at, obj, template)?;
            let prompt = render_prompt(at, msgs, chat.as_ref())?;
            let completion =
                render_reply(at, reply, obj.get(reply), (msgs, &prompt), chat.as_ref())?;
            (prompt, completion, chat.is_none())
        }
        _ => {
            let prompt = at.non_empty_str(obj, "prompt")?.to_string();
            refuse_messages_after_text(at, obj, reply)?;
            (prompt, at.non_empty_str(obj, reply)?.to_string(), true)
        }
    };
    Ok(vec![LabelledCompletion {
        prompt,
        completion,
        desirable,
        append_eos,
        origin: Some(at.to_string()),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(body: &str) -> Result<Vec<LabelledCompletion>> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kto.jsonl");
        std::fs::write(&p, body).unwrap();
        Ok(load_labelled_records(&p, None)?
            .into_iter()
            .flatten()
            .collect())
    }

    fn err(body: &str) -> String {
        format!("{:#}", load(body).unwrap_err())
    }

    #[test]
    fn labelled_pairs_and_conversations() {
        let xs = load(concat!(
            r#"{"prompt": "2+2=", "completion": "4", "label": true}"#,
            "\n\n",
            r#"{"prompt": "2+2=", "completion": "5", "label": false}"#,
            "\n",
            r#"{"prompt": "say hi", "chosen": "hi", "rejected": "HI"}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "hello"}], "completion": [{"role": "assistant", "content": "hi"}], "label": true}"#,
            "\n",
        ))
        .unwrap();
        let got: Vec<(&str, &str, bool)> = xs
            .iter()
            .map(|x| (x.prompt.as_str(), x.completion.as_str(), x.desirable))
            .collect();
        assert_eq!(
            got,
            [
                ("2+2=", "4", true),
                ("2+2=", "5", false),
                ("say hi", "hi", true),
                ("say hi", "HI", false),
                ("<|user|>\nhello\n<|assistant|>\n", "hi", true),
            ]
        );
        // The unpaired halves of a pair both come from its line; blank lines still count.
        assert!(xs[2].origin.as_deref().unwrap().ends_with("kto.jsonl:4"));
        assert_eq!(xs[3].origin, xs[2].origin);
        assert!(xs.iter().all(|x| x.append_eos));
        let ex = xs[0].example();
        assert_eq!(ex.segments.len(), 2);
        assert!(!ex.segments[0].train && ex.segments[1].train);
        // Labels stored as integers 1 and 0 read as true and false.
        let ints = load(concat!(
            r#"{"prompt": "a", "completion": "b", "label": 1}"#,
            "\n",
            r#"{"prompt": "a", "completion": "c", "label": 0}"#,
            "\n",
        ))
        .unwrap();
        let labels: Vec<bool> = ints.iter().map(|x| x.desirable).collect();
        assert_eq!(labels, [true, false]);
        // A pair's record may carry a field named "response" of its own.
        let pair = load(r#"{"prompt": "a", "chosen": "b", "rejected": "c", "response": "x"}"#);
        assert_eq!(pair.unwrap().len(), 2);
        // SFT's other name for the completion, "response", reads the same.
        let resp = load(r#"{"prompt": "a", "response": "b", "label": true}"#).unwrap();
        assert_eq!(
            (resp[0].completion.as_str(), resp[0].desirable),
            ("b", true)
        );
    }

    #[test]
    fn bad_records_name_the_line_and_field() {
        let cases = [
            (
                r#"{"prompt": "p", "completion": "c"}"#,
                "kto.jsonl:1: field \"label\": missing",
            ),
            (
                r#"{"prompt": "p", "completion": "c", "label": 2}"#,
                "kto.jsonl:1: field \"label\": expected true or false (or 1 or 0), got a number 2",
            ),
            (
                r#"{"prompt": "p", "label": true}"#,
                "kto.jsonl:1: field \"completion\": missing",
            ),
            (
                r#"{"prompt": "p", "completion": "c", "label": null}"#,
                "kto.jsonl:1: field \"label\": expected true or false (or 1 or 0), got null",
            ),
            (
                r#"{"prompt": "p", "completion": "c", "response": "c", "label": true}"#,
                "kto.jsonl:1: field \"completion\": give either \"response\" or \"completion\"",
            ),
            (
                r#"{"prompt": "p", "completion": "c", "chosen": "c", "rejected": "d", "label": true}"#,
                "not both",
            ),
            (
                r#"{"prompt": "p", "chosen": "c", "rejected": "d", "label": false}"#,
                "kto.jsonl:1: field \"label\": a pair's",
            ),
            (
                r#"{"prompt": "p", "chosen": "c"}"#,
                "kto.jsonl:1: field \"rejected\": missing",
            ),
            (
                r#"{"prompt": "", "completion": "c", "label": false}"#,
                "kto.jsonl:1: field \"prompt\": empty",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "q"}], "completion": "c", "label": true}"#,
                "kto.jsonl:1: field \"completion\": expected a list of messages opening with the assistant's, got a string",
            ),
        ];
        for (body, want) in cases {
            let e = err(body);
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = err("{\"prompt\": \"p\", \"completion\": \"c\", \"label\": true}\n[1]\n");
        assert!(e.contains("kto.jsonl:2"), "{e}");
        let e = err(r#"{"prompt": "p", "completion": "c", "label": null}"#);
        assert!(e.ends_with("got null"), "null said once: {e}");
    }
}
