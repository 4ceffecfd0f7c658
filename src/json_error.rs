//! One line for a JSON file that does not read: the file and line, the field where a value is
//! at fault, and serde's message in words rather than Rust's type names.

use std::path::Path;

use serde_json::error::Category;

/// `e`, from parsing `text` (the whole of `path`), as `path:LINE: FIELD: message`; the field
/// is the key its line sets, where a value is of the wrong type or range (a syntax error has
/// no field to name, only its column).
pub fn json_error(path: &Path, text: &str, e: &serde_json::Error) -> anyhow::Error {
    let msg = plain_types(&without_position(e));
    let line = e.line().max(1);
    let key = (e.classify() == Category::Data)
        .then(|| key_on_line(text, line, e.column()))
        .flatten();
    match (key, e.classify()) {
        (Some(key), _) => anyhow::anyhow!("{}:{line}: field \"{key}\": {msg}", path.display()),
        (None, Category::Syntax | Category::Eof) => {
            anyhow::anyhow!("{}:{line}: {msg} (column {})", path.display(), e.column())
        }
        (None, _) => anyhow::anyhow!("{}:{line}: {msg}", path.display()),
    }
}

/// serde's message without its " at line L column C", which a caller says its own way (a
/// JSONL record is one line of the file, so serde's line 1 is not the file's).
pub fn without_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    msg.strip_suffix(&at).unwrap_or(&msg).to_string()
}

/// The last key (a string then `:`, outside any string) on line `line` (1-based) of `text`
/// before byte `column` (1-based; serde puts it just past the value it refused). None where
/// the line sets no key before it (a value on the line after its key, say).
fn key_on_line(text: &str, line: usize, column: usize) -> Option<String> {
    let l = text.lines().nth(line - 1)?;
    let head = l.get(..column.min(l.len()))?;
    let (mut key, mut last, mut chars) = (None, None::<String>, head.chars());
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => s.extend(chars.next()),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                last = Some(s);
            }
            ':' => key = last.take().or(key),
            c if c.is_whitespace() => {}
            _ => last = None,
        }
    }
    key
}

/// serde's message with Rust's type names in words: "expected usize" means a whole number.
pub fn plain_types(msg: &str) -> String {
    const WORDS: [(&str, &str); 11] = [
        ("usize", "a whole number, 0 or more"),
        ("u64", "a whole number, 0 or more"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u16", "a whole number from 0 to 65535"),
        ("u8", "a whole number from 0 to 255"),
        ("i64", "a whole number"),
        ("i32", "a whole number from -2147483648 to 2147483647"),
        ("f64", "a number"),
        ("f32", "a number"),
        ("a boolean", "true or false"),
        ("bool", "true or false"),
    ];
    let Some((head, expected)) = msg.split_once(", expected ") else {
        return msg.to_string();
    };
    let words = WORDS
        .iter()
        .find(|(rust, _)| expected == *rust)
        .map_or(expected, |(_, w)| w);
    format!("{head}, expected {words}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        let e = serde_json::from_str::<std::collections::BTreeMap<String, usize>>(text)
            .expect_err(text);
        json_error(Path::new("config.json"), text, &e).to_string()
    }

    /// A value of the wrong type is named by its key, in words; a syntax error by its column.
    #[test]
    fn a_json_value_at_fault_is_named_by_its_field() {
        let text = "{\n  \"layers\": 2,\n  \"hidden_size\": \"big\"\n}\n";
        assert_eq!(
            err(text),
            "config.json:3: field \"hidden_size\": invalid type: string \"big\", expected a \
             whole number, 0 or more"
        );
        assert_eq!(
            err("{\n  \"layers\": -2\n}"),
            "config.json:2: field \"layers\": invalid value: integer `-2`, expected a whole \
             number, 0 or more"
        );
        let e = err("{\n  \"layers\": 2,\n}\n");
        assert!(
            e.starts_with("config.json:3: trailing comma (column "),
            "{e}"
        );
        // A value that itself holds a quote and a colon; keys on one line.
        let e = err("{\"vocab\": 2, \"hidden_size\": \"a\\\": b\"}");
        assert!(
            e.starts_with("config.json:1: field \"hidden_size\": invalid type"),
            "{e}"
        );
        assert_eq!(key_on_line("\"a\": 1, \"b\": [", 1, 14), Some("b".into()));
        assert_eq!(key_on_line("  \"x\"", 1, 5), None);
    }
}
