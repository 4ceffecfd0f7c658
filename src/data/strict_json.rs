//! JSON parsed as serde_json parses it into a [`Value`], except that an object naming one
//! key twice is refused. serde_json (and Python's `json`) keep the last of the two silently,
//! so a record written `{"prompt": ..., "prompt": ...}` by a buggy script would train on
//! half of what its author meant without a word.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// `text` as a [`Value`]; an object with a repeated key is an error at that key.
pub fn from_str(text: &str) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Strict.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(Strict)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // As serde_json's own Value: a float it cannot hold (never one it parsed) is null.
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut list = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict)? {
            list.push(v);
        }
        Ok(Value::Array(list))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "key \"{key}\" appears twice in one object"
                )));
            }
            let value = map.next_value_seed(Strict)?;
            obj.insert(key, value);
        }
        Ok(Value::Object(obj))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever serde_json reads without a repeated key, this reads the same, to the bit of
    /// every float and the order of every object's keys.
    #[test]
    fn reads_what_serde_json_reads() {
        for text in [
            r#"{"b": 1, "a": [true, false, null, -3, 18446744073709551615, -9223372036854775808]}"#,
            r#"{"x": 0.1, "y": 1e308, "z": -2.5e-320, "s": "\u00e9\ud83d\ude00\n\"q\""}"#,
            r#"[{"k": {"k": {"k": []}}}, {}, "", 3.0]"#,
            "  7  ",
        ] {
            let ours = from_str(text).unwrap();
            let theirs: Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours, theirs, "{text}");
            assert_eq!(ours.to_string(), theirs.to_string(), "{text}");
        }
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        for (text, key) in [
            (r#"{"prompt": "a", "prompt": "b"}"#, "prompt"),
            (
                r#"{"messages": [{"role": "user", "role": "assistant"}]}"#,
                "role",
            ),
        ] {
            let e = from_str(text).unwrap_err().to_string();
            assert!(e.contains(&format!("key \"{key}\" appears twice")), "{e}");
        }
        // One key in two objects is no repeat.
        from_str(r#"[{"a": 1}, {"a": 2}]"#).unwrap();
    }

    #[test]
    fn trailing_text_is_refused_as_serde_json_refuses_it() {
        assert!(from_str(r#"{"a": 1} x"#).is_err());
    }
}
