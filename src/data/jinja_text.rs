//! Jinja2's text filters and Python's string methods that minijinja lacks or gives otherwise,
//! as a chat template written for transformers (Jinja2 under Python) expects them:
//! - the filters `truncate` (positional arguments too, and Jinja2's leeway of 5), `wordcount`,
//!   `center` and `striptags` (markupsafe 3's: comments and tags out, whitespace collapsed,
//!   character references unescaped);
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
pub fn center(s: String, width: Option<usize>, kwargs: Kwargs) -> Result<String, Error> {
    let width = kwargs
        .get::<Option<usize>>("width")?
        .or(width)
        .unwrap_or(80);
    kwargs.assert_all_used()?;
    let len = s.chars().count();
    if width <= len {
        return Ok(s);
    }
    let margin = width - len;
    let left = margin / 2 + (margin & width & 1);
    Ok(format!(
        "{}{s}{}",
        " ".repeat(left),
        " ".repeat(margin - left)
    ))
}

/// Jinja2's `striptags` (markupsafe 3's `Markup.striptags`): comments and tags taken out in
/// one pass from the left, which stops at the first one left open; runs of whitespace made
/// one space and the ends trimmed; character references unescaped.
pub fn striptags(s: String) -> String {
    let mut kept = String::with_capacity(s.len());
    let mut pos = 0;
    while let Some(start) = s[pos..].find('<').map(|i| pos + i) {
        let end = match s[start..].starts_with("<!--") {
            true => s[start + 4..].find("-->").map(|i| start + 4 + i + 3),
            false => s[start..].find('>').map(|i| start + i + 1),
        };
        let Some(end) = end else { break };
        kept.push_str(&s[pos..start]);
        pos = end;
    }
    kept.push_str(&s[pos..]);
    let words: Vec<&str> = kept.split(is_py_space).filter(|w| !w.is_empty()).collect();
    unescape(&words.join(" "))
}

/// Python's `str.isspace`: Rust's whitespace and the four information separators.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `html.unescape` for numeric references (`&#65;`, `&#x41;`, the semicolon
/// optional; the HTML 5 rules for invalid ones) and the named ones text in templates meets
/// (`&amp;`, `&lt;`, `&gt;`, `&quot;` and `&apos;`, the first four also without the semicolon as
/// HTML 5's legacy forms, and `&nbsp;`). Other named references stay as written.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp + 1..];
        match reference(rest) {
            Some((text, used)) => {
                out.push_str(&text);
                rest = &rest[used..];
            }
            None => out.push('&'),
        }
    }
    out.push_str(rest);
    out
}

/// The character reference `rest` opens with (after its `&`): its text and the bytes it takes.
fn reference(rest: &str) -> Option<(String, usize)> {
    let semi = |at: usize| usize::from(rest[at..].starts_with(';'));
    if let Some(num) = rest.strip_prefix('#') {
        let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 2),
            None => (num, 10, 1),
        };
        let len = digits
            .find(|c: char| !c.is_digit(radix))
            .unwrap_or(digits.len());
        if len == 0 {
            return None;
        }
        // Past any code point: saturate, as Python's big integer is past 0x10FFFF too.
        let code = u32::from_str_radix(&digits[..len], radix).unwrap_or(u32::MAX);
        return Some((numeric(code), skip + len + semi(skip + len)));
    }
    for (name, text, legacy) in [
        ("amp", "&", true),
        ("lt", "<", true),
        ("gt", ">", true),
        ("quot", "\"", true),
        ("apos", "'", false),
        ("nbsp", "\u{a0}", false),
    ] {
        if let Some(after) = rest.strip_prefix(name) {
            let closed = after.starts_with(';');
            if closed || legacy {
                return Some((text.to_string(), name.len() + usize::from(closed)));
            }
        }
    }
    None
}

/// What `html.unescape` makes of the numeric reference `code`.
fn numeric(code: u32) -> String {
    const CP1252: [u32; 32] = [
        0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039,
        0x152, 0x8d, 0x17d, 0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014,
        0x2dc, 0x2122, 0x161, 0x203a, 0x153, 0x9d, 0x17e, 0x178,
    ];
    let invalid = matches!(code, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f | 0xfdd0..=0xfdef)
        || (code & 0xfffe == 0xfffe && code <= 0x10ffff);
    let c = match code {
        0 => Some('\u{fffd}'),
        0x0d => Some('\r'),
        0x80..=0x9f => char::from_u32(CP1252[(code - 0x80) as usize]),
        0xd800..=0xdfff | 0x110000.. => Some('\u{fffd}'),
        _ if invalid => None,
        _ => char::from_u32(code),
    };
    c.map(String::from).unwrap_or_default()
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
            let mut rest = s.trim_end_matches(is_py_space);
            while !rest.is_empty() && parts.len() < limit {
                match rest.rfind(is_py_space) {
                    Some(i) => {
                        let ws = rest[i..].chars().next().map_or(1, char::len_utf8);
                        parts.push(rest[i + ws..].to_string());
                        rest = rest[..i].trim_end_matches(is_py_space);
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
    let from_end = |i: i64| if i < 0 { (i + len).max(0) } else { i };
    // Python finds nothing, not even an empty string, from past the end.
    let lo = from_end(start.unwrap_or(0));
    if lo > len {
        return None;
    }
    let (lo, hi) = (lo as usize, from_end(end.unwrap_or(len)).min(len) as usize);
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
            ("{{ 'a <!-- x <b> y'|striptags }}", "a <!-- x <b> y"),
            ("{{ 'x <b> y <!-- unclosed <i>z</i>'|striptags }}", "x y <!-- unclosed <i>z</i>"),
            ("{{ 'x<!-->y-->z'|striptags }}", "xz"),
            ("{{ 'a <!-- <b> --> c <!--> d'|striptags }}", "a c <!--> d"),
            ("{{ '<a <!-- x --> b>c'|striptags }}", "b>c"),
            ("{{ 'a&b &amp c &lt d &#65 e &#0; f &#x80; g &#xD800; h &#x110000; i &#1; j &#xfffe; k &apos; l &nbsp;m'|striptags }}", "a&b & c < d A e � f € g � h � i  j  k ' l  m"),
            ("{{ 'a\u{1c}b\u{1d}c d'.rsplit()|join('|') }}", "a|b|c|d"),
            ("{{ 'abc'.find('', 5) }} {{ 'abc'.rfind('', 5) }} {{ ''.find('', 1) }} {{ 'abc'.find('', 3) }} {{ 'abc'.find('c', -10) }}", "-1 -1 -1 3 2"),
            ("[{{ 'ab'|center(width=6) }}]", "[  ab  ]"),
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
