//! One line for a JSON file that does not read: the file and line, the field where a value is
//! at fault, and serde's message in words rather than Rust's type names.

use std::path::Path;

use serde_json::error::Category;

/// `e`, from parsing `text` (the whole of `path`), as `path:LINE: FIELD: message`; the field
/// is the key its line sets, where a value is of the wrong type or range (a syntax error has
/// no field to name, only its column).
pub fn json_error(path: &Path, text: &str, e: &serde_json::Error) -> anyhow::Error {
    let msg = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    let msg = msg.strip_suffix(&at).unwrap_or(&msg);
    let msg = plain_types(msg);
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

/// The last `"key":` on line `line` (1-based) of `text` before `column` (1-based; serde puts
/// it just past the value it refused).
fn key_on_line(text: &str, line: usize, column: usize) -> Option<String> {
    let l = text.lines().nth(line - 1)?;
    let head = l.get(..column.min(l.len()))?;
    let colon = head.rfind("\":")?;
    let open = head[..colon].rfind('"')?;
    Some(head[open + 1..colon].to_string())
}

/// serde's message with Rust's type names in words: "expected usize" means a whole number.
pub fn plain_types(msg: &str) -> String {
    const WORDS: [(&str, &str); 11] = [
        ("usize", "a whole number, 0 or more"),
        ("u64", "a whole number, 0 or more"),
        ("u32", "a whole number, 0 or more"),
        ("u16", "a whole number, 0 or more"),
        ("u8", "a whole number, 0 or more"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
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
    }
}
