//! Replies of several messages: a prompt-completion record whose completion (or whose `chosen`
//! and `rejected`) is a list of messages, as an agent's turn holds its tool calls, the tools'
//! answers and its final text, or as two conversations that TRL's `extract_prompt` splits go
//! on for several turns after they part. TRL takes such a list as it takes one message: the
//! completion is everything the chat template writes after the prompt.

use anyhow::Result;
use serde_json::Value;

use super::{push_segment, role_header, says_something, Chat, Loc, Segment, SftExample};

/// Checks a reply of two or more messages (`fields` of `list`, the record's `field`): it opens
/// with the assistant's message, as the prompt's generation prompt opened the assistant's
/// turn; every assistant message says something; and under the built-in template (not
/// `jinja`), whose reply ends with EOS after the assistant's text, it closes with one.
pub(super) fn check(
    at: &Loc,
    field: &str,
    list: &[Value],
    fields: &[(&str, &str)],
    jinja: bool,
) -> Result<()> {
    let role_of = |i: usize| format!("{field}[{i}].role");
    if fields[0].0 != "assistant" {
        let got = format!(
            "a reply opens with the assistant's message, got \"{}\"",
            fields[0].0
        );
        return Err(at.field(&role_of(0), &got));
    }
    let last = fields.len() - 1;
    if !jinja && fields[last].0 != "assistant" {
        let got = format!(
            "the built-in template ends a reply with EOS after the assistant's text, so a reply \
             of several messages closes with the assistant's, got \"{}\"",
            fields[last].0
        );
        return Err(at.field(&role_of(last), &got));
    }
    for (i, (role, _)) in fields.iter().enumerate() {
        if *role == "assistant" && !says_something(&list[i]) {
            return Err(at.field(&format!("{field}[{i}]"), "an empty assistant message"));
        }
    }
    Ok(())
}

/// The text a checked reply of several messages adds after a prompt in the built-in template:
/// each message after the first under its own header, and each but the last ending with "\n",
/// as [`super::render_chat_prompt`] ends an earlier turn (a string cannot hold the EOS that
/// ends an assistant's turn in SFT's `messages`).
pub(super) fn builtin_text(fields: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (role, content)) in fields.iter().enumerate() {
        if i > 0 {
            out.push('\n');
            out.push_str(&role_header(role));
        }
        out.push_str(content);
    }
    out
}

/// An SFT example of a rendered `prompt` (the record's messages `prompt_msgs`) and a checked
/// reply of several messages (`fields` of `list`). The reply trains as TRL's
/// `completion_only_loss` trains it, and where `assistant_only` also as its assistant mask
/// does: its assistant messages alone, not a tool's answer or a user's turn within it.
pub(super) fn several_example(
    at: &Loc,
    field: &str,
    (prompt_msgs, prompt): (&Value, &str),
    (list, fields): (&[Value], &[(&str, &str)]),
    chat: Option<&Chat>,
    assistant_only: bool,
) -> Result<SftExample> {
    let mut segments = Vec::new();
    push_segment(&mut segments, prompt, false);
    let Some(t) = chat else {
        builtin_segments(&mut segments, fields, assistant_only);
        return Ok(SftExample {
            segments,
            append_eos: true,
            origin: Some(at.to_string()),
            train_all: false,
        });
    };
    let mut all = prompt_msgs.as_array().cloned().unwrap_or_default();
    let from = all.len();
    all.extend_from_slice(list);
    let spans = match assistant_only {
        true => t.template.spans_from(&all, &t.vars, from),
        false => t.render(&all, false).map(|text| vec![(text, true)]),
    }
    .map_err(|e| at.field(field, &format!("{e:#}")))?;
    let full: String = spans.iter().map(|(text, _)| text.as_str()).collect();
    if !full.starts_with(prompt) {
        return Err(at.field(
            field,
            "the chat template renders the prompt differently once a reply follows (it rewrites earlier turns)",
        ));
    }
    // The prompt is context whatever the template marks in it (an earlier assistant turn).
    let mut pos = 0;
    for (text, train) in spans {
        let end = pos + text.len();
        if end > prompt.len() {
            push_segment(&mut segments, &text[prompt.len().max(pos) - pos..], train);
        }
        pos = end;
    }
    Ok(SftExample {
        segments,
        append_eos: false,
        origin: Some(at.to_string()),
        train_all: false,
    })
}

/// A reply's segments in the built-in template, as `messages` renders the same turns: each
/// assistant text trained and followed by EOS. Where not `assistant_only`, the headers and
/// other roles' turns before an assistant's text train with it, one segment up to each EOS.
fn builtin_segments(segments: &mut Vec<Segment>, fields: &[(&str, &str)], assistant_only: bool) {
    let mut run = String::new();
    for (i, &(role, content)) in fields.iter().enumerate() {
        let header = if i == 0 {
            String::new()
        } else {
            role_header(role)
        };
        let text = match role {
            "assistant" => header + content,
            _ => format!("{header}{content}\n"),
        };
        match (role == "assistant", assistant_only) {
            (true, true) => {
                push_segment(segments, &text[..text.len() - content.len()], false);
                push_segment(segments, content, true);
            }
            (true, false) => {
                run.push_str(&text);
                segments.push(Segment {
                    text: std::mem::take(&mut run),
                    train: true,
                });
            }
            (false, true) => push_segment(segments, &text, false),
            (false, false) => run.push_str(&text),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{
        load_preferences_templated, load_sft_templated, ChatTemplate, LossScope, Segment,
    };
    use crate::data::labelled::load_labelled_records;

    fn template(source: &str) -> ChatTemplate {
        let origin = Path::new("t.jinja");
        ChatTemplate::from_source(source.into(), String::new(), String::new(), origin).unwrap()
    }

    /// Writes each message as `[role]content<end>`; `marked` wraps an assistant's in a
    /// `{% generation %}` block, as templates written for TRL's assistant_only_loss do.
    fn bracketed(marked: bool) -> ChatTemplate {
        let assistant = match marked {
            true => "{% generation %}{{ m.content }}<end>{% endgeneration %}",
            false => "{{ m.content }}<end>",
        };
        template(&format!(
            "{{% for m in messages %}}[{{{{ m.role }}}}]{{% if m.role == 'assistant' %}}{assistant}\
             {{% else %}}{{{{ m.content }}}}<end>{{% endif %}}{{% endfor %}}\
             {{% if add_generation_prompt %}}[assistant]{{% endif %}}"
        ))
    }

    fn seg(text: &str, train: bool) -> Segment {
        Segment {
            text: text.into(),
            train,
        }
    }

    fn scope(completion_only: bool, assistant_only: bool) -> LossScope {
        LossScope {
            completion_only,
            assistant_only,
        }
    }

    fn msg(role: &str, content: &str) -> String {
        format!(r#"{{"role": "{role}", "content": "{content}"}}"#)
    }

    fn list(messages: &[(&str, &str)]) -> String {
        let all: Vec<String> = messages.iter().map(|(r, c)| msg(r, c)).collect();
        format!("[{}]", all.join(", "))
    }

    fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    /// An agent's turn: a tool call, the tool's answer, the final text.
    const TURN: [(&str, &str); 3] = [
        ("assistant", "call"),
        ("tool", "21"),
        ("assistant", "It is 21"),
    ];

    /// TRL trains a completion of several messages as it trains one: everything the template
    /// writes after the prompt (`completion_only_loss`), and under the assistant mask the
    /// assistant's messages alone. A template's marks in the prompt (an earlier assistant
    /// turn) train nothing.
    #[test]
    fn a_completion_of_several_messages_trains_as_trl_trains_it() {
        let d = tempfile::tempdir().unwrap();
        let prompt = list(&[("user", "Q"), ("assistant", "P"), ("user", "Q2")]);
        let p = write(
            &d,
            "sft.jsonl",
            &format!(
                "{{\"prompt\": {prompt}, \"completion\": {}}}\n",
                list(&TURN)
            ),
        );
        let opened = "[user]Q<end>[assistant]P<end>[user]Q2<end>[assistant]";
        let assistant_only = vec![
            seg(opened, false),
            seg("call<end>", true),
            seg("[tool]21<end>[assistant]", false),
            seg("It is 21<end>", true),
        ];
        for marked in [false, true] {
            let t = bracketed(marked);
            let x = &load_sft_templated(&p, Some(&t), scope(true, true)).unwrap()[0];
            assert_eq!(x.segments, assistant_only, "marked {marked}");
            assert!(!x.append_eos && !x.train_all);
            let x = &load_sft_templated(&p, Some(&t), scope(true, false)).unwrap()[0];
            let whole = "call<end>[tool]21<end>[assistant]It is 21<end>";
            assert_eq!(x.segments, [seg(opened, false), seg(whole, true)]);
        }

        // The built-in template, as `messages` renders the same turns: EOS after each
        // assistant text, and without the assistant mask the user's turn trains with the
        // reply it leads to.
        let turn = [("assistant", "A1"), ("user", "U"), ("assistant", "A2")];
        let p = write(
            &d,
            "sft.jsonl",
            &format!(
                "{{\"prompt\": {}, \"completion\": {}}}\n",
                list(&[("user", "Q")]),
                list(&turn)
            ),
        );
        let opened = "<|user|>\nQ\n<|assistant|>\n";
        let x = &load_sft_templated(&p, None, scope(true, true)).unwrap()[0];
        let next = "<|user|>\nU\n<|assistant|>\n";
        let want = [
            seg(opened, false),
            seg("A1", true),
            seg(next, false),
            seg("A2", true),
        ];
        assert_eq!(x.segments, want);
        assert!(x.append_eos);
        // Trained as one conversation where the prompt trains too, its assistant turns alone.
        let x = &load_sft_templated(&p, None, scope(false, true)).unwrap()[0];
        assert_eq!(x.segments, want);
        let x = &load_sft_templated(&p, None, scope(true, false)).unwrap()[0];
        let next = "<|user|>\nU\n<|assistant|>\nA2";
        assert_eq!(
            x.segments,
            [seg(opened, false), seg("A1", true), seg(next, true)]
        );
    }

    /// Preference and KTO responses of several messages: the text after the prompt, the
    /// built-in template's earlier turns ending with "\n" as a rendered prompt's do. Two
    /// conversations that part before their last turn split so (TRL's `extract_prompt`).
    #[test]
    fn preference_and_kto_replies_of_several_messages_are_the_text_after_the_prompt() {
        let d = tempfile::tempdir().unwrap();
        let conv = |a: &str, b: &str| {
            list(&[
                ("user", "Q"),
                ("assistant", a),
                ("user", "U"),
                ("assistant", b),
            ])
        };
        let p = write(
            &d,
            "prefs.jsonl",
            &format!(
                "{{\"chosen\": {}, \"rejected\": {}}}\n",
                conv("A", "B"),
                conv("C", "D")
            ),
        );
        let x = &load_preferences_templated(&p, None).unwrap()[0];
        assert_eq!(x.prompt, "<|user|>\nQ\n<|assistant|>\n");
        assert_eq!(x.chosen, "A\n<|user|>\nU\n<|assistant|>\nB");
        assert_eq!(x.rejected, "C\n<|user|>\nU\n<|assistant|>\nD");
        let t = bracketed(false);
        let x = &load_preferences_templated(&p, Some(&t)).unwrap()[0];
        assert_eq!(x.prompt, "[user]Q<end>[assistant]");
        assert_eq!(x.chosen, "A<end>[user]U<end>[assistant]B<end>");

        let k = write(
            &d,
            "kto.jsonl",
            &format!(
                "{{\"prompt\": {}, \"completion\": {}, \"label\": true}}\n",
                list(&[("user", "Q")]),
                list(&TURN)
            ),
        );
        let x = &load_labelled_records(&k, Some(&t)).unwrap()[0][0];
        assert_eq!(
            x.completion,
            "call<end>[tool]21<end>[assistant]It is 21<end>"
        );
    }

    /// A reply opens with the assistant's message and, in the built-in template, closes with
    /// one; no assistant message of it is empty; an empty list is no reply. Each refused by
    /// the field that breaks it, in every stage's loader.
    #[test]
    fn replies_of_several_messages_are_refused_by_the_field_that_breaks_them() {
        let d = tempfile::tempdir().unwrap();
        let q = list(&[("user", "Q")]);
        let cases: &[(&str, bool, &str)] = &[
            (
                r#"[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]"#,
                true,
                "field \"completion[0].role\": a reply opens with the assistant's message, got \"user\"",
            ),
            (
                r#"[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]"#,
                false,
                "field \"completion[1].role\": the built-in template ends a reply with EOS",
            ),
            (
                r#"[{"role": "assistant", "content": ""}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "y"}]"#,
                true,
                "field \"completion[0]\": an empty assistant message",
            ),
            (
                "[]",
                true,
                "field \"completion\": an empty list of messages",
            ),
        ];
        let t = bracketed(false);
        for (completion, jinja, want) in cases {
            let body = format!("{{\"prompt\": {q}, \"completion\": {completion}}}\n");
            let p = write(&d, "f.jsonl", &body);
            let chat = jinja.then_some(&t);
            for s in [scope(true, true), scope(false, true)] {
                let e = format!("{:#}", load_sft_templated(&p, chat, s).unwrap_err());
                assert!(
                    e.contains(&format!("f.jsonl:1: {want}")),
                    "{completion}: {e}"
                );
            }
            let body =
                format!("{{\"prompt\": {q}, \"completion\": {completion}, \"label\": true}}\n");
            let p = write(&d, "k.jsonl", &body);
            let e = format!("{:#}", load_labelled_records(&p, chat).unwrap_err());
            assert!(
                e.contains(&format!("k.jsonl:1: {want}")),
                "{completion}: {e}"
            );
            let chosen = completion.replace("completion", "chosen");
            let body = format!(
                "{{\"prompt\": {q}, \"chosen\": {chosen}, \"rejected\": {}}}\n",
                list(&[("assistant", "r")])
            );
            let p = write(&d, "p.jsonl", &body);
            let e = format!("{:#}", load_preferences_templated(&p, chat).unwrap_err());
            let want = want.replace("completion", "chosen");
            assert!(
                e.contains(&format!("p.jsonl:1: {want}")),
                "{completion}: {e}"
            );
        }
        // A reply of messages after a prompt that is text.
        let body = format!("{{\"prompt\": \"Q\", \"completion\": {}}}\n", list(&TURN));
        let p = write(&d, "f.jsonl", &body);
        let e = format!(
            "{:#}",
            load_sft_templated(&p, None, scope(true, true)).unwrap_err()
        );
        let after_text = "a list of messages, after a \"prompt\" that is text";
        assert!(
            e.contains(&format!("f.jsonl:1: field \"completion\": {after_text}")),
            "{e}"
        );
        let kto = format!(
            "{{\"prompt\": \"Q\", \"completion\": {}, \"label\": true}}\n",
            list(&TURN)
        );
        let k = write(&d, "k.jsonl", &kto);
        let ek = format!("{:#}", load_labelled_records(&k, None).unwrap_err());
        assert!(
            ek.contains(&format!("k.jsonl:1: field \"completion\": {after_text}")),
            "{ek}"
        );
        let pair = format!(
            "{{\"prompt\": \"Q\", \"chosen\": {}, \"rejected\": \"r\"}}\n",
            list(&TURN)
        );
        let pp = write(&d, "p.jsonl", &pair);
        let ep = format!("{:#}", load_preferences_templated(&pp, None).unwrap_err());
        assert!(
            ep.contains(&format!("p.jsonl:1: field \"chosen\": {after_text}")),
            "{ep}"
        );
        // A template's reply may close with a tool's answer, as an agent's trace can.
        let body = format!(
            "{{\"prompt\": {q}, \"completion\": {}}}\n",
            list(&[("assistant", "call"), ("tool", "21")])
        );
        let p = write(&d, "f.jsonl", &body);
        let x = &load_sft_templated(&p, Some(&t), scope(true, true)).unwrap()[0];
        assert_eq!(x.segments[1], seg("call<end>", true));
        assert_eq!(x.segments[2], seg("[tool]21<end>", false));
    }
}
