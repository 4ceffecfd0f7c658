//! clap's usage errors as one line, naming the flag a negative number was meant for.

use super::Cli;

/// A usage error of the command line `args` as one line, as temper's other errors are:
/// clap's message with the details it sets on lines of their own (a missing argument, the
/// possible values, a tip) and, for its usage block, a pointer to the help of the command
/// given. A negative number given to a count or a seed is said as such (clap says "invalid
/// digit found in string").
pub fn usage_error_line(e: &clap::Error, args: &[std::ffi::OsString]) -> String {
    let line = negative_count(e)
        .or_else(|| negative_value(e, args))
        .or_else(|| detached_switch_value(e, args))
        .unwrap_or_else(|| {
            let text = e.render().to_string();
            let mut lines = text.lines();
            let first = lines.next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first).trim_end();
            let details: Vec<&str> = lines
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim().trim_start_matches('[').trim_end_matches(']'))
                .filter(|l| !l.is_empty())
                .collect();
            match (details.is_empty(), first.ends_with(':')) {
                (true, _) => first.to_string(),
                (false, true) => format!("{first} {}", details.join(", ")),
                (false, false) => format!("{first}; {}", details.join("; ")),
            }
        });
    format!("{line} (see `{} --help`)", command_path(args))
}

/// clap takes a value such as `-1e-3`, `-.5` or a prompt "-1e5 is small" after a flag for a
/// flag of its own, and says only that `-1` is unexpected: the flag and the `=` spelling that
/// passes the value are named instead.
fn negative_value(e: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    // What clap could not place ("-1" of "-1e-3"): the value after a flag that starts so.
    unplaced_after_flag(e, args, |unexpected, flag, value| {
        let numeric = value
            .strip_prefix('-')
            .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit() || c == '.'));
        let placed = value.starts_with(unexpected);
        (numeric && placed && flag.starts_with("--") && !flag.contains('=')).then(|| {
            let quoted = match value.contains(' ') {
                true => format!("'{value}'"),
                false => value.to_string(),
            };
            format!(
                "{flag} {quoted}: a value that starts with '-' and a digit or '.' is read as a \
                 flag here; write it {flag}={quoted}"
            )
        })
    })
}

/// An on/off flag takes its value after `=` only (`--packing=false`), so that `--packing`
/// before a positional argument stays a switch: `--packing false` leaves `false` unplaced,
/// and clap would say only that.
fn detached_switch_value(e: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    unplaced_after_flag(e, args, |unexpected, flag, value| {
        let on_off = flag
            .strip_prefix("--")
            .is_some_and(|f| super::ON_OFF_FLAGS.contains(&f));
        let word = matches!(unexpected, "true" | "false");
        (word && value == unexpected && on_off).then(|| {
            format!("{flag} {value}: an on/off flag takes a value after '=' only; write it {flag}={value}")
        })
    })
}

/// For an argument clap could not place (`unexpected`), the first line `says` gives of an
/// argument `flag` followed by `value` on the command line.
fn unplaced_after_flag(
    e: &clap::Error,
    args: &[std::ffi::OsString],
    says: impl Fn(&str, &str, &str) -> Option<String>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(unexpected)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    args.windows(2).find_map(|w| says(unexpected, w[0], w[1]))
}

fn negative_count(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::ValueValidation {
        return None;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    let negative = value.trim().parse::<f64>().is_ok_and(|v| v < 0.0);
    let unsigned = std::error::Error::source(e).is_some_and(|s| s.is::<std::num::ParseIntError>());
    (negative && unsigned)
        .then(|| format!("invalid value '{value}' for '{arg}': a whole number, 0 or more"))
}

/// The (sub)command `args` name, as far as they name one: `temper tokenizer train`.
fn command_path(args: &[std::ffi::OsString]) -> String {
    let mut cmd = Cli::command_line();
    let mut path = vec![cmd.get_name().to_string()];
    for a in args.iter().skip(1) {
        let Some(sub) = cmd.find_subcommand(a).cloned() else {
            break;
        };
        path.push(sub.get_name().to_string());
        cmd = sub;
    }
    path.join(" ")
}
