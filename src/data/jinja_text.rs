//! Jinja2's text filters and Python's string methods that minijinja lacks or gives otherwise,
//! as a chat template written for transformers (Jinja2 under Python) expects them:
//! - the filters `truncate` (positional arguments too, and Jinja2's leeway of 5), `wordcount`,
//!   `center` and `striptags` (markupsafe's: comments and tags out, whitespace collapsed,
//!   entities unescaped);
//! - the methods `str.rsplit`, `str.index`, `str.rindex`, and `str.find` and `str.rfind`
//!   counting characters, as Python does, not bytes (minijinja's pycompat counts bytes, so a
//!   slice at the index a non-ASCII text gives would land elsewhere).
//!
//! Other methods go on to minijinja's pycompat.

use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// Jinja2's `truncate(s, length=255, killwords=False, end='...', leeway=5)`: `s` unchanged
/// within `length + leeway` characters, else its first `length - len(end)` characters (back to
/// the last space unless `killwords`) and `end`.
pub fn truncate(s: String, args: Rest<Value>) -> Result<String, Error> {
    type Args = (
        Option<usize>,
        Option<bool>,
        Option<String>,
        Option<usize>,
        Kwargs,
    );
    let (length, killwords, end, leeway, kwargs): Args = from_args(&args)?;
    let length = kwargs
        .get::<Option<usize>>("length")?
        .or(length)
        .unwrap_or(255);
    let killwords = kwargs
        .get::<Option<bool>>("killwords")?
        .or(killwords)
        .unwrap_or(false);
    let end = kwargs
        .get::<Option<String>>("end")?
        .or(end)
        .unwrap_or_else(|| "...".into());
    let leeway = kwargs
        .get::<Option<usize>>("leeway")?
        .or(leeway)
        .unwrap_or(5);
    kwargs.assert_all_used()?;
    let end_len = end.chars().count();
    if length < end_len {
        return Err(invalid(format!(
            "expected length >= {end_len}, got {length}"
        )));
    }
    if s.chars().count() <= length + leeway {
        return Ok(s);
    }
    let kept: String = s.chars().take(length - end_len).collect();
    let kept = match killwords {
        true => kept.as_str(),
        false => kept
            .rsplit_once(' ')
            .map_or(kept.as_str(), |(head, _)| head),
    };
    Ok(format!("{kept}{end}"))
}

/// Jinja2's `wordcount`: the runs of word characters (Python's `\w`: letters, digits, `_`).
pub fn wordcount(s: String) -> usize {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut count = 0;
    let mut inside = false;
    for c in s.chars() {
        count += usize::from(word(c) && !inside);
        inside = word(c);
    }
    count
}

/// Jinja2's `center(s, width=80)`: Python's `str.center`, which puts the odd space on the
/// left when both the margin and the width are odd.
pub fn center(s: String, width: Option<usize>) -> String {
    let width = width.unwrap_or(80);
    let len = s.chars().count();
    if width <= len {
        return s;
    }
    let margin = width - len;
    let left = margin / 2 + (margin & width & 1);
    format!("{}{s}{}", " ".repeat(left), " ".repeat(margin - left))
}

/// Jinja2's `striptags` (markupsafe's `Markup.striptags`): comments, then tags, taken out;
/// runs of whitespace made one space and the ends trimmed; HTML entities unescaped.
pub fn striptags(s: String) -> String {
    let mut text = s;
    for (open, close) in [("<!--", "-->"), ("<", ">")] {
        while let Some(start) = text.find(open) {
            let Some(len) = text[start..].find(close) else {
                break;
            };
            text.replace_range(start..start + len + close.len(), "");
        }
    }
    unescape(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The HTML entities text in templates meets: the five markupsafe escapes, `&nbsp;`, and
/// numeric references. Others stay as written (Python's `html.unescape` knows them all).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let entity = rest.find(';').map(|semi| (&rest[1..semi], semi + 1));
        let decoded = entity.and_then(|(name, len)| {
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            };
            c.map(|c| (c, len))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Python's string methods that minijinja's pycompat lacks or counts in bytes; any other
/// method (and any other value's) goes on to pycompat.
pub fn unknown_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let fallback = minijinja_contrib::pycompat::unknown_method_callback;
    let Some(s) = value.as_str().filter(|_| value.kind() == ValueKind::String) else {
        return fallback(state, value, method, args);
    };
    match method {
        "rsplit" => {
            let (sep, maxsplit, kwargs): (Option<Value>, Option<i64>, Kwargs) = from_args(args)?;
            let sep = kwargs.get::<Option<Value>>("sep")?.or(sep);
            let maxsplit = kwargs.get::<Option<i64>>("maxsplit")?.or(maxsplit);
            kwargs.assert_all_used()?;
            let sep = match &sep {
                Some(v) if v.is_none() => None,
                Some(v) => Some(v.as_str().ok_or_else(|| invalid("sep must be a string"))?),
                None => None,
            };
            let parts = rsplit(s, sep, maxsplit.filter(|&n| n >= 0).map(|n| n as usize))?;
            Ok(Value::from(parts))
        }
        "find" | "rfind" | "index" | "rindex" => {
            let (sub, start, end): (&str, Option<i64>, Option<i64>) = from_args(args)?;
            let from_right = method.starts_with('r');
            match (find_chars(s, sub, start, end, from_right), method) {
                (Some(i), _) => Ok(Value::from(i as i64)),
                (None, "find" | "rfind") => Ok(Value::from(-1)),
                (None, _) => Err(invalid("substring not found")),
            }
        }
        _ => fallback(state, value, method, args),
    }
}

/// Python's `str.rsplit(sep, maxsplit)`: on `sep`, or on runs of whitespace (ends trimmed)
/// where it is none, at most `maxsplit` times from the right.
fn rsplit(s: &str, sep: Option<&str>, maxsplit: Option<usize>) -> Result<Vec<String>, Error> {
    let limit = maxsplit.unwrap_or(usize::MAX);
    let mut parts: Vec<String> = match sep {
        Some("") => return Err(invalid("empty separator")),
        Some(sep) => s
            .rsplitn(limit.saturating_add(1), sep)
            .map(String::from)
            .collect(),
        None => {
            let mut parts = Vec::new();
            let mut rest = s.trim_end();
            while !rest.is_empty() && parts.len() < limit {
                match rest.rfind(char::is_whitespace) {
                    Some(i) => {
                        let ws = rest[i..].chars().next().map_or(1, char::len_utf8);
                        parts.push(rest[i + ws..].to_string());
                        rest = rest[..i].trim_end();
                    }
                    None => {
                        parts.push(rest.to_string());
                        rest = "";
                    }
                }
            }
            if !rest.is_empty() {
                parts.push(rest.to_string());
            }
            parts
        }
    };
    parts.reverse();
    Ok(parts)
}

/// The character index of `sub` in `s[start:end]` (Python's slice bounds), its first or last
/// occurrence.
fn find_chars(
    s: &str,
    sub: &str,
    start: Option<i64>,
    end: Option<i64>,
    from_right: bool,
) -> Option<usize> {
    let hay: Vec<char> = s.chars().collect();
    let needle: Vec<char> = sub.chars().collect();
    let len = hay.len() as i64;
    let bound = |i: i64| (if i < 0 { i + len } else { i }).clamp(0, len) as usize;
    let (lo, hi) = (bound(start.unwrap_or(0)), bound(end.unwrap_or(len)));
    if lo > hi || hi - lo < needle.len() {
        return None;
    }
    let mut at = (lo..=hi - needle.len()).filter(|&i| hay[i..i + needle.len()] == needle[..]);
    match from_right {
        true => at.next_back(),
        false => at.next(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders `source` in an environment with these filters and methods.
    fn render(source: &str) -> Result<String, Error> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(unknown_method);
        env.add_filter("truncate", truncate);
        env.add_filter("wordcount", wordcount);
        env.add_filter("center", center);
        env.add_filter("striptags", striptags);
        env.render_str(source, ())
    }

    /// Each case's expected text is what Jinja2 3.1.6 (with markupsafe) rendered for the
    /// same template under Python 3.
    #[test]
    fn filters_and_methods_render_as_jinja2_under_python() {
        let cases = [
            ("{{ 'Hello World, how are you'|truncate(12) }}", "Hello..."),
            ("{{ 'Hello World, how are you'|truncate(12, True) }}", "Hello Wor..."),
            ("{{ 'Hello World, how are you'|truncate(length=12, end='!') }}", "Hello!"),
            ("{{ 'Hello World'|truncate(9) }}", "Hello World"),
            ("{{ 'Hello World'|truncate(9, leeway=0) }}", "Hello..."),
            ("{{ 'Hélloworld éh'|truncate(8, leeway=0) }}", "Héllo..."),
            ("{{ 'Hélloworld éh'|truncate(8, False, '…', 0) }}", "Héllowo…"),
            ("{{ 'one two_3, four-five é'|wordcount }}", "5"),
            ("[{{ 'ab'|center(7) }}]", "[   ab  ]"),
            ("[{{ 'abc'|center(6) }}]", "[ abc  ]"),
            ("[{{ 'ab'|center(5) }}]", "[  ab ]"),
            ("[{{ 'abc'|center(2) }}]", "[abc]"),
            ("{{ '<p>a  <b>b</b><!-- <x> -->\n c &amp; &lt;d&gt; &#233;&#x41; &quot;q&quot; &unknown;</p>'|striptags }}", "a b c & <d> éA \"q\" &unknown;"),
            ("{{ 'a < b'|striptags }}", "a < b"),
            ("{{ 'a,b,c'.rsplit(',', 1)|join('|') }}", "a,b|c"),
            ("{{ '  a b  c  '.rsplit(None, 1)|join('|') }}", "  a b|c"),
            ("{{ '  a b  c  '.rsplit()|join('|') }}", "a|b|c"),
            ("{{ 'a--b--c'.rsplit('--')|join('|') }}", "a|b|c"),
            ("{{ 'x</t>y</t>z'.rsplit('</t>', maxsplit=1)[-1] }}", "z"),
            ("{{ 'a b c'.rsplit(maxsplit=1)|join('|') }}", "a b|c"),
            ("{{ 'héllo wörld'.find('w') }}", "6"),
            ("{{ 'héllo wörld'.rfind('l') }}", "9"),
            ("{{ 'héllo'.find('l', 3) }} {{ 'héllo'.find('l', -1) }} {{ 'héllo'.find('z') }} {{ 'héllo'.find('') }} {{ 'héllo'.rfind('') }}", "3 -1 -1 0 5"),
            ("{{ 'héllo'.index('l') }} {{ 'héllo'.rindex('l', 0, 4) }}", "2 3"),
            ("{% set s = 'é<t>x' %}{{ s[s.find('<t>') + 3:] }}", "x"),
            ("{{ 'abc'.upper() }}", "ABC"),
        ];
        for (source, want) in cases {
            assert_eq!(render(source).unwrap(), want, "{source}");
        }
        let e = render("{{ 'abc'.index('z') }}").unwrap_err().to_string();
        assert!(e.contains("substring not found"), "{e}");
        let e = render("{{ 'abc'.rsplit('') }}").unwrap_err().to_string();
        assert!(e.contains("empty separator"), "{e}");
    }
}
