//! The JSONL datasets of the post-training stages: SFT conversations, preference pairs and
//! prompts, plus the built-in chat template.
//!
//! Every error names the file, the 1-based line and the offending field, so that a bad
//! record in a large dataset can be found and fixed without guessing.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use super::chat_template::ChatTemplate;
use super::columns::Columns;
use super::parquet_rows::{is_parquet, read_rows};
use super::splits::{data_files, Part};
use super::tokenizer::Tokenizer;

mod replies;

/// One training conversation as text segments; `train` marks the segments whose tokens carry
/// loss (responses / assistant turns). The tokenising code appends one trained EOS after
/// every trained segment, which is how the model learns where a turn ends.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub text: String,
    pub train: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub segments: Vec<Segment>,
    /// Whether the text is plain rather than rendered by a Jinja chat template: plain text
    /// opens with the tokenizer's opening special tokens (BOS) and gets an EOS after each
    /// trained segment. A template writes its own end-of-turn marker, and its own BOS where it
    /// wants one (transformers tokenises a rendered chat without special tokens).
    pub append_eos: bool,
    /// `path:line` of the record it came from; none for the built-in task.
    pub origin: Option<String>,
    /// Every token carries loss, the untrained segments' too (TRL's `completion_only_loss`
    /// or `assistant_only_loss` off); the trained segments still decide where EOS goes.
    pub train_all: bool,
}

/// Which tokens of an SFT record carry loss, as TRL's SFTTrainer chooses them: a
/// prompt-completion record's completion only (`completion_only`, TRL's
/// `completion_only_loss`, its default for such records), and a conversation's assistant
/// turns only (`assistant_only`, TRL's `assistant_only_loss`). Off, every token does. A
/// `{"text"}` record trains whole either way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScope {
    pub completion_only: bool,
    pub assistant_only: bool,
}

/// Which of [`LossScope`]'s two settings the records of a data set read: a prompt-completion
/// record reads `completion_only`, a conversation `assistant_only`, a conversational
/// prompt-completion record both, a `{"text"}` record neither.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScopeRead {
    pub completion_only: bool,
    pub assistant_only: bool,
}

impl ScopeRead {
    /// What `lines`, SFT records, read.
    pub fn of(lines: &Lines) -> Self {
        let mut read = Self::default();
        for (_, obj) in lines {
            match (obj.get("prompt"), obj.contains_key("messages")) {
                (Some(Value::Array(_)), _) => {
                    read.completion_only = true;
                    read.assistant_only = true;
                }
                (Some(_), _) => read.completion_only = true,
                (None, true) => read.assistant_only = true,
                (None, false) => {}
            }
        }
        read
    }

    pub fn merge(self, other: Self) -> Self {
        Self {
            completion_only: self.completion_only || other.completion_only,
            assistant_only: self.assistant_only || other.assistant_only,
        }
    }

    /// Refuses a setting of `scope` off its default that no record reads: it would change
    /// nothing.
    pub fn check(self, scope: LossScope) -> Result<()> {
        for (off, read, key, shape) in [
            (
                !scope.completion_only,
                self.completion_only,
                "completion_only_loss",
                "prompt-completion record",
            ),
            (
                !scope.assistant_only,
                self.assistant_only,
                "assistant_only_loss",
                "conversation (\"messages\")",
            ),
        ] {
            if off && !read {
                bail!(
                    "[sft] {key} = false (--{}) changes nothing: no training record is a {shape}",
                    key.replace('_', "-")
                );
            }
        }
        Ok(())
    }
}

impl Default for LossScope {
    fn default() -> Self {
        Self {
            completion_only: true,
            assistant_only: true,
        }
    }
}

impl SftExample {
    /// A prompt (no loss) followed by its response (loss) and, where `append_eos`, EOS.
    pub fn prompt_response(
        prompt: &str,
        response: &str,
        append_eos: bool,
        origin: Option<String>,
    ) -> Self {
        Self {
            segments: vec![
                Segment {
                    text: prompt.to_string(),
                    train: false,
                },
                Segment {
                    text: response.to_string(),
                    train: true,
                },
            ],
            append_eos,
            origin,
            train_all: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Whether an EOS follows each response: not when a Jinja chat template wrote its own
    /// end-of-turn marker into it.
    pub append_eos: bool,
    /// `path:line` of the record it came from; none for the built-in task.
    pub origin: Option<String>,
    /// The record's own `margin` (TRL's reward-modelling column): how far the chosen
    /// response's reward should clear the rejected one's. None where the record has none.
    pub margin: Option<f64>,
}

impl PreferencePair {
    /// The chosen and the rejected response, each after the prompt, as SFT encodes them.
    pub fn examples(&self) -> [SftExample; 2] {
        [&self.chosen, &self.rejected].map(|response| {
            SftExample::prompt_response(
                &self.prompt,
                response,
                self.append_eos,
                self.origin.clone(),
            )
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PromptRecord {
    pub prompt: String,
    pub answer: Option<String>,
    /// The whole record, "prompt" and "answer" included, for programmatic rewards that need
    /// more than the answer.
    pub fields: Map<String, Value>,
    /// `path:line` of the record it came from; none for the built-in task.
    pub origin: Option<String>,
    /// Whether a Jinja chat template rendered the prompt (it writes its own BOS where it
    /// wants one); plain text opens with the tokenizer's opening special tokens.
    pub templated: bool,
}

impl PromptRecord {
    /// The prompt's token ids, opened as transformers opens it: a plain text with the
    /// tokenizer's opening special tokens (`tokenizer(text)`), a rendered chat as the template
    /// wrote it (`apply_chat_template(tokenize=True)`).
    pub fn ids(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        match self.templated {
            true => tok.encode(&self.prompt),
            false => tok.encode_start(&self.prompt),
        }
    }
}

/// Where a record came from, for errors: its `path:line`, else `fallback` and its 1-based
/// position (built-in records have no file).
pub fn place(origin: &Option<String>, fallback: &str, index: usize) -> String {
    origin
        .clone()
        .unwrap_or_else(|| format!("{fallback} {}", index + 1))
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Set once a conversation renders with the built-in template (no chat template given, and
/// none found beside the model): a training run says so ([`crate::stages::setup`]), since its
/// checkpoints then carry no template that transformers or vLLM would render alike.
pub static BUILTIN_TEMPLATE_RENDERED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Header that opens a message of `role` in the built-in chat template.
fn role_header(role: &str) -> String {
    BUILTIN_TEMPLATE_RENDERED.store(true, std::sync::atomic::Ordering::Relaxed);
    format!("<|{role}|>\n")
}

/// Renders a conversation with the built-in template and opens an assistant turn, ready for
/// generation. A single-turn prompt matches training exactly; earlier assistant turns end
/// with "\n" here because a string cannot hold the EOS token they end with in training.
pub fn render_chat_prompt(messages: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (role, content) in messages {
        out.push_str(&role_header(role));
        out.push_str(content);
        out.push('\n');
    }
    out.push_str(&role_header("assistant"));
    out
}

/// Reads an SFT dataset: one record per line, either `{"prompt": P, "response": R}` (the
/// prompt used verbatim, no template; `"completion"` for `"response"`, TRL's prompt-completion
/// format, as `temper generate` writes it; a `prompt` that is a list of messages is TRL's
/// conversational prompt-completion, rendered with the chat template; an empty completion
/// trains the EOS after it, where temper adds one), `{"messages":
/// [{"role", "content"}, ...]}` rendered with the built-in chat template, or TRL's language
/// modelling `{"text": T}`, every token of it trained, EOS after.
pub fn load_sft(path: &Path) -> Result<Vec<SftExample>> {
    load_sft_templated(path, None, LossScope::default())
}

/// [`load_sft`] with `messages` rendered by a Hugging Face chat template when one is given,
/// and loss on the tokens `scope` names.
pub fn load_sft_templated(
    path: &Path,
    template: Option<&ChatTemplate>,
    scope: LossScope,
) -> Result<Vec<SftExample>> {
    sft_from(path, read_records(path)?, template, scope)
}

/// [`load_sft_templated`] of records already read ([`read_records_with`]).
pub fn sft_from(
    path: &Path,
    lines: Lines,
    template: Option<&ChatTemplate>,
    scope: LossScope,
) -> Result<Vec<SftExample>> {
    // A KTO file given to SFT trains its undesirable completions as readily as the rest.
    let undesirable = lines
        .iter()
        .filter(|(_, obj)| obj.get("label") == Some(&Value::Bool(false)))
        .count();
    if undesirable > 0 {
        crate::warnln!(
            "warning: {}: {undesirable} records have \"label\": false (KTO's undesirable \
             completions), which SFT trains on as it does every other (it reads no label)",
            path.display()
        );
    }
    lines
        .iter()
        .map(|(at, obj)| {
            let at = Loc { path, at: *at };
            sft_example(&at, obj, template, scope)
        })
        .collect()
}

/// The field a record's reply is in: TRL's `"completion"`, or `"response"`, its other name;
/// none where the record has neither, and refused where it has both.
pub(crate) fn reply_field(at: &Loc, obj: &Map<String, Value>) -> Result<Option<&'static str>> {
    match (obj.contains_key("response"), obj.contains_key("completion")) {
        (true, true) => Err(at.field(
            "completion",
            "give either \"response\" or \"completion\", not both",
        )),
        (false, true) => Ok(Some("completion")),
        (true, false) => Ok(Some("response")),
        (false, false) => Ok(None),
    }
}

fn sft_example(
    at: &Loc,
    obj: &Map<String, Value>,
    template: Option<&ChatTemplate>,
    scope: LossScope,
) -> Result<SftExample> {
    let reply = match reply_field(at, obj)? {
        Some(field) => field,
        // Named by TRL's name: a record that gives neither is most likely TRL's.
        None if obj.contains_key("prompt") && !obj.contains_key("messages") => {
            return Err(at.field("completion", "missing (or \"response\", its other name)"))
        }
        None => "response",
    };
    let plain = obj.contains_key("prompt") || obj.contains_key(reply);
    // TRL's order: a prompt, else messages, else text (a rendered `text` column beside
    // `messages` is left alone).
    if obj.contains_key("text") && !obj.contains_key("prompt") && !obj.contains_key("messages") {
        let text = at.non_empty_str(obj, "text")?;
        return Ok(SftExample {
            segments: vec![Segment {
                text: text.to_string(),
                train: true,
            }],
            append_eos: true,
            origin: Some(at.to_string()),
            train_all: false,
        });
    }
    match (obj.get("messages"), plain) {
        (Some(_), true) => Err(at.field(
            "messages",
            &format!("give either \"messages\" or \"prompt\" and \"{reply}\", not both"),
        )),
        (Some(msgs), false) => {
            let whole = !scope.assistant_only;
            match bind(at, obj, template)? {
                None => chat_example(at, "messages", msgs, whole, false),
                Some(chat) => templated_example(at, "messages", msgs, &chat, whole),
            }
        }
        (None, false) => Err(at.field(
            "prompt",
            "missing (a record needs \"prompt\" and \"completion\" (or \"response\"), \"messages\", or \"text\")",
        )),
        (None, true) => {
            let mut ex = match obj.get("prompt").filter(|v| v.is_array()) {
                Some(msgs) if !scope.completion_only => {
                    // TRL trains the prompt and the completion as one conversation, under
                    // its assistant mask where assistant_only_loss is on.
                    let chat = bind(at, obj, template)?;
                    let mut all = msgs.as_array().cloned().unwrap_or_default();
                    let jinja = chat.is_some();
                    all.extend(reply_messages(at, reply, obj.get(reply), jinja)?);
                    let (all, whole) = (Value::Array(all), !scope.assistant_only);
                    return match chat {
                        None => chat_example(at, "prompt", &all, whole, true),
                        Some(chat) => templated_example(at, "prompt", &all, &chat, whole),
                    };
                }
                Some(msgs) => {
                    let chat = bind(at, obj, template)?;
                    let assistant_only = scope.assistant_only;
                    conversational_example(at, obj, reply, msgs, chat.as_ref(), assistant_only)?
                }
                None => {
                    let prompt = at.non_empty_str(obj, "prompt")?;
                    refuse_messages_after_text(at, obj, reply)?;
                    // Followed by a trained EOS: may be empty ([`empty_reply`]).
                    let response = at.string(obj, reply)?;
                    SftExample::prompt_response(prompt, response, true, Some(at.to_string()))
                }
            };
            ex.train_all = !scope.completion_only;
            Ok(ex)
        }
    }
}

/// TRL's conversational prompt-completion record: `prompt` a list of messages rendered ready
/// for the assistant's reply, and the reply (`field`) a list of messages opening with the
/// assistant's ([`replies`]; the assistant's alone where `assistant_only` and it holds
/// others), or the assistant's text alone, as `temper generate` writes a chat prompt's
/// completion.
fn conversational_example(
    at: &Loc,
    obj: &Map<String, Value>,
    field: &str,
    msgs: &Value,
    chat: Option<&Chat>,
    assistant_only: bool,
) -> Result<SftExample> {
    let prompt = render_prompt(at, msgs, chat)?;
    let wrapped;
    let reply = match obj.get(field) {
        Some(Value::String(text)) => {
            wrapped = serde_json::json!([{"role": "assistant", "content": text}]);
            Some(&wrapped)
        }
        Some(Value::Array(_)) | None => obj.get(field),
        Some(other) => {
            let got = format!(
                "expected the assistant's text or a list of messages, got {}",
                kind(other)
            );
            return Err(at.field(field, &got));
        }
    };
    // A reply of one message goes by its template's generation marks too, where they decide
    // what trains: text the template writes after the block (Qwen's `\n` after `<|im_end|>`)
    // is not the assistant's, as TRL's assistant mask says and as `messages` trains it.
    let marked = assistant_only && chat.is_some_and(|c| c.template.marks_generation(&c.vars));
    let least = if marked { 1 } else { 2 };
    if let Some(several) = reply.filter(|r| r.as_array().is_some_and(|l| l.len() >= least)) {
        let (list, fields) = message_fields(at, field, several, chat.is_some())?;
        replies::check(at, field, list, &fields, chat.is_some())?;
        let (prompt, reply) = ((msgs, prompt.as_str()), (list, fields.as_slice()));
        return replies::several_example(at, field, prompt, reply, chat, assistant_only);
    }
    let reply = reply_text(at, field, reply, (msgs, &prompt), chat, true)?;
    Ok(SftExample::prompt_response(
        &prompt,
        &reply,
        chat.is_none(),
        Some(at.to_string()),
    ))
}

/// An SFT record's reply may be empty where temper ends it with a trained EOS: a plain
/// prompt's completion, a reply in the built-in chat template (`eos_after`). Trained, that
/// EOS teaches the model to stop at once, as a `temper generate` sample that stopped there
/// (`"finish_reason": "stop"`, `""`) says it did; TRL takes such a record too. A Jinja chat
/// template ends the turn itself and temper adds no EOS: refused there, as before.
fn empty_reply(at: &Loc, field: &str, eos_after: bool) -> Result<()> {
    match eos_after {
        true => Ok(()),
        false => Err(at.field(
            field,
            "empty (an empty reply is taken where temper ends it with EOS, which a Jinja chat \
             template's turn does not get)",
        )),
    }
}

/// A conversational SFT record's reply (its `field`) as messages: the assistant's text as its
/// message, a list holding one non-empty assistant message, empty where [`empty_reply`] takes
/// it (where the built-in template, not a `jinja` one, ends it with EOS), or a list of several
/// that [`replies::check`] takes.
fn reply_messages(at: &Loc, field: &str, reply: Option<&Value>, jinja: bool) -> Result<Vec<Value>> {
    let message = match reply {
        Some(Value::String(text)) => serde_json::json!({"role": "assistant", "content": text}),
        Some(Value::Array(list)) if list.len() == 1 => list[0].clone(),
        Some(several @ Value::Array(list)) if list.len() > 1 => {
            let (list, fields) = message_fields(at, field, several, jinja)?;
            replies::check(at, field, list, &fields, jinja)?;
            return Ok(list.to_vec());
        }
        None => return Err(at.field(field, "missing")),
        Some(Value::Array(_)) => return Err(at.field(field, "an empty list of messages")),
        Some(other) => {
            let got = format!(
                "expected the assistant's text or a list of messages, got {}",
                kind(other)
            );
            return Err(at.field(field, &got));
        }
    };
    let is_assistant = message.get("role").and_then(Value::as_str) == Some("assistant");
    if !is_assistant {
        return Err(at.field(field, "expected one non-empty assistant message"));
    }
    if !says_something(&message) {
        match message.get("content") {
            Some(Value::String(_)) => empty_reply(at, field, !jinja)?,
            _ => return Err(at.field(field, "expected one non-empty assistant message")),
        }
    }
    Ok(vec![message])
}

/// A Jinja chat template bound to one record's own variables, TRL's per-record columns: its
/// `tools` (a list of JSON schemas, or that list as JSON text, as datasets often store it)
/// and its `chat_template_kwargs` (over the run's).
pub(crate) struct Chat<'t> {
    template: &'t ChatTemplate,
    vars: Map<String, Value>,
}

impl Chat<'_> {
    fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        self.template
            .render_with(messages, &self.vars, add_generation_prompt)
    }
}

/// `template` with record `obj`'s variables; a record that brings tools or keywords with no
/// Jinja template to read them is refused.
pub(crate) fn bind<'t>(
    at: &Loc,
    obj: &Map<String, Value>,
    template: Option<&'t ChatTemplate>,
) -> Result<Option<Chat<'t>>> {
    let mut vars = Map::new();
    match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => {}
        Some(Value::Object(kwargs)) => {
            for key in ["messages", "add_generation_prompt"] {
                if kwargs.contains_key(key) {
                    let msg = format!("`{key}` is set by temper, not by a keyword");
                    return Err(at.field("chat_template_kwargs", &msg));
                }
            }
            vars.extend(kwargs.clone());
        }
        Some(v) => {
            let got = format!("expected an object, got {}", kind(v));
            return Err(at.field("chat_template_kwargs", &got));
        }
    }
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(
            serde_json::from_str(text)
                .map_err(|e| at.field("tools", &format!("a string that is not JSON ({e})")))?,
        ),
        Some(v) => Some(v.clone()),
    };
    if let Some(tools) = tools {
        let Value::Array(_) = tools else {
            let got = format!("expected a list of tool schemas, got {}", kind(&tools));
            return Err(at.field("tools", &got));
        };
        vars.insert("tools".into(), tools);
    }
    match template {
        Some(template) => Ok(Some(Chat { template, vars })),
        None if vars.is_empty() => Ok(None),
        None => {
            let field = if vars.contains_key("tools") {
                "tools"
            } else {
                "chat_template_kwargs"
            };
            Err(at.field(
                field,
                "the built-in chat template reads no tools or keywords: give a Jinja chat \
                 template (--chat-template, or a model that has one)",
            ))
        }
    }
}

/// A `messages` array and, per message, its `(role, content)`.
type Messages<'v> = (&'v [Value], Vec<(&'v str, &'v str)>);

/// Checks that `messages` is an array of objects with string `role` and `content`; errors
/// name the offending message. For a Jinja template (`jinja`) the content may also be a list
/// of parts, null or absent (an assistant's tool calls, say): the template reads what it
/// reads, and the content given here is then empty.
fn message_fields<'v>(at: &Loc, field: &str, msgs: &'v Value, jinja: bool) -> Result<Messages<'v>> {
    let Value::Array(list) = msgs else {
        return Err(at.field(field, &format!("expected an array, got {}", kind(msgs))));
    };
    let mut fields = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let name = format!("{field}[{i}]");
        let Value::Object(m) = m else {
            return Err(at.field(&name, &format!("expected an object, got {}", kind(m))));
        };
        let role = at.str_field(m, "role", &format!("{name}.role"))?;
        // The built-in template renders these three; a Jinja template judges roles itself.
        if !jinja && !ROLES.contains(&role) {
            return Err(at.field(
                &format!("{name}.role"),
                &format!(
                    "unknown role \"{role}\" (the built-in template renders {}; a Jinja chat \
                     template, --chat-template, takes the roles it renders)",
                    ROLES.map(|r| format!("\"{r}\"")).join(", ")
                ),
            ));
        }
        let content = match m.get("content") {
            None | Some(Value::Null) | Some(Value::Array(_)) if jinja => "",
            _ => at.str_field(m, "content", &format!("{name}.content"))?,
        };
        fields.push((role, content));
    }
    Ok((list, fields))
}

/// Whether an assistant message says anything: text, content parts or tool calls.
fn says_something(m: &Value) -> bool {
    let non_empty = |key: &str| match m.get(key) {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        _ => false,
    };
    non_empty("content") || non_empty("tool_calls")
}

/// A conversation in the built-in format (the record's `field`); `whole`: every token
/// trained, not only the assistant's, and a conversation with no assistant message taken;
/// `reply_last`: the last message is a prompt-completion record's reply, which may be empty
/// ([`empty_reply`]: the built-in template ends it with EOS).
fn chat_example(
    at: &Loc,
    field: &str,
    msgs: &Value,
    whole: bool,
    reply_last: bool,
) -> Result<SftExample> {
    let (_, fields) = message_fields(at, field, msgs, false)?;
    if fields.is_empty() {
        return Err(at.field(field, "empty"));
    }
    let mut segments: Vec<Segment> = Vec::new();
    let mut assistant_turns = 0;
    let last = fields.len() - 1;
    for (i, (role, content)) in fields.into_iter().enumerate() {
        let name = format!("{field}[{i}]");
        match role {
            "assistant" => {
                if content.is_empty() && !(reply_last && i == last) {
                    return Err(at.field(&format!("{name}.content"), "empty"));
                }
                assistant_turns += 1;
                push_segment(&mut segments, &role_header(role), false);
                push_segment(&mut segments, content, true);
            }
            "system" | "user" => {
                push_segment(
                    &mut segments,
                    &format!("{}{content}\n", role_header(role)),
                    false,
                );
            }
            other => unreachable!("message_fields refuses role {other}"),
        }
    }
    if assistant_turns == 0 && !whole {
        return Err(at.field(field, "no assistant message"));
    }
    Ok(SftExample {
        segments,
        append_eos: true,
        origin: Some(at.to_string()),
        train_all: whole,
    })
}

/// A conversation rendered by a Jinja chat template. Roles are the template's business (it
/// may accept "tool" or refuse "system"); each message still needs a string role. `whole`:
/// rendered once and trained whole, as TRL trains without `assistant_only_loss`, so a
/// template that rewrites earlier turns needs no `{% generation %}` marks.
fn templated_example(
    at: &Loc,
    field: &str,
    msgs: &Value,
    chat: &Chat,
    whole: bool,
) -> Result<SftExample> {
    let (list, fields) = message_fields(at, field, msgs, true)?;
    if !whole && !fields.iter().any(|(role, _)| *role == "assistant") {
        return Err(at.field(field, "no assistant message"));
    }
    let spans = match whole {
        true => chat.render(list, false).map(|text| vec![(text, true)]),
        false => chat.template.spans_with(list, &chat.vars),
    }
    .map_err(|e| at.field(field, &format!("{e:#}")))?;
    let mut segments = Vec::new();
    for (text, train) in spans {
        push_segment(&mut segments, &text, train);
    }
    Ok(SftExample {
        segments,
        append_eos: false,
        origin: Some(at.to_string()),
        train_all: false,
    })
}

/// Appends a segment, merging untrained text into a preceding untrained segment. Trained
/// segments are never merged: each one is followed by its own EOS.
fn push_segment(segments: &mut Vec<Segment>, text: &str, train: bool) {
    match segments.last_mut() {
        Some(last) if !train && !last.train => last.text.push_str(text),
        _ => segments.push(Segment {
            text: text.to_string(),
            train,
        }),
    }
}

/// Reads preference pairs `{"prompt", "chosen", "rejected"}`, all non-empty strings (chosen
/// and rejected may be equal), or in TRL's conversational form: `prompt` a list of messages,
/// `chosen` and `rejected` each a list of messages opening with the assistant's.
pub fn load_preferences(path: &Path) -> Result<Vec<PreferencePair>> {
    load_preferences_templated(path, None)
}

/// [`load_preferences`] with conversations rendered by a Hugging Face chat template when
/// one is given (else the built-in template).
pub fn load_preferences_templated(
    path: &Path,
    template: Option<&ChatTemplate>,
) -> Result<Vec<PreferencePair>> {
    preferences_from(path, read_records(path)?, template)
}

/// [`load_preferences_templated`] of records already read ([`read_records_with`]).
pub fn preferences_from(
    path: &Path,
    lines: Lines,
    template: Option<&ChatTemplate>,
) -> Result<Vec<PreferencePair>> {
    lines
        .iter()
        .map(|(at, obj)| preference_record(&Loc { path, at: *at }, obj, template))
        .collect()
}

/// One record of a preference file, plain or conversational.
pub(crate) fn preference_record(
    at: &Loc,
    obj: &Map<String, Value>,
    template: Option<&ChatTemplate>,
) -> Result<PreferencePair> {
    let split;
    let obj = match implicit_prompt(at, obj)? {
        Some(with_prompt) => {
            split = with_prompt;
            &split
        }
        None => obj,
    };
    if obj.get("prompt").is_some_and(Value::is_array) {
        return conversational_pair(at, obj, bind(at, obj, template)?.as_ref());
    }
    let prompt = at.non_empty_str(obj, "prompt")?.to_string();
    for field in ["chosen", "rejected"] {
        refuse_messages_after_text(at, obj, field)?;
    }
    Ok(PreferencePair {
        prompt,
        chosen: at.non_empty_str(obj, "chosen")?.to_string(),
        rejected: at.non_empty_str(obj, "rejected")?.to_string(),
        append_eos: true,
        origin: Some(at.to_string()),
        margin: margin_of(at, obj)?,
    })
}

/// Refuses a reply (`field`) that is a list of messages after a `prompt` that is text, by what
/// is wrong rather than as a string that is not one.
pub(crate) fn refuse_messages_after_text(
    at: &Loc,
    obj: &Map<String, Value>,
    field: &str,
) -> Result<()> {
    match obj.get(field).is_some_and(Value::is_array) {
        true => Err(at.field(
            field,
            "a list of messages, after a \"prompt\" that is text: a conversation's reply follows \
             a prompt that is a list of messages too",
        )),
        false => Ok(()),
    }
}

/// A preference record's optional `margin`: a finite number, or absent or null.
fn margin_of(at: &Loc, obj: &Map<String, Value>) -> Result<Option<f64>> {
    match obj.get("margin") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64().filter(|x| x.is_finite()) {
            Some(x) => Ok(Some(x)),
            None => Err(at.field("margin", "expected a finite number")),
        },
        Some(v) => Err(at.field("margin", &format!("expected a number, got {}", kind(v)))),
    }
}

/// A record without a `prompt` whose `chosen` and `rejected` hold it (TRL's implicit prompt,
/// as in trl-lib/ultrafeedback_binarized and Anthropic's HH), split as TRL's `extract_prompt`
/// splits it: the prompt is their longest common opening, messages for conversations,
/// characters for text, a space before the replies going with them. None where the record
/// names its prompt, unless that prompt is text and both replies are conversations: then, as
/// TRL's `maybe_extract_prompt` does for HuggingFaceH4/ultrafeedback_binarized, whose `prompt`
/// is the user's text and whose replies hold the whole conversation, the prompt is taken from
/// the conversations (None where they share no opening, and the record is refused as a reply
/// of messages after a prompt of text).
fn implicit_prompt(at: &Loc, obj: &Map<String, Value>) -> Result<Option<Map<String, Value>>> {
    let (Some(chosen), Some(rejected)) = (obj.get("chosen"), obj.get("rejected")) else {
        return Ok(None);
    };
    let named = obj.get("prompt");
    let text_beside_conversations =
        matches!(named, Some(Value::String(_))) && chosen.is_array() && rejected.is_array();
    if named.is_some() && !text_beside_conversations {
        return Ok(None);
    }
    let split = match (chosen, rejected) {
        (Value::String(c), Value::String(r)) => {
            let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            shared_opening(&c, &r, |x| *x == ' ').map(|at| {
                let text = |s: &[char]| Value::String(s.iter().collect());
                (text(&c[..at]), text(&c[at..]), text(&r[at..]))
            })
        }
        (Value::Array(c), Value::Array(r)) => shared_opening(c, r, |_| false).map(|at| {
            let list = |s: &[Value]| Value::Array(s.to_vec());
            (list(&c[..at]), list(&c[at..]), list(&r[at..]))
        }),
        _ => None,
    };
    let Some((prompt, chosen, rejected)) = split else {
        // A text prompt beside replies that share no opening is refused as it stands.
        if named.is_some() {
            return Ok(None);
        }
        return Err(at.field(
            "prompt",
            "missing, and \"chosen\" and \"rejected\" share no opening to take it from",
        ));
    };
    let mut out = obj.clone();
    out.insert("prompt".into(), prompt);
    out.insert("chosen".into(), chosen);
    out.insert("rejected".into(), rejected);
    Ok(Some(out))
}

/// Where TRL's `extract_prompt` ends the prompt `a` and `b` share: at their first difference,
/// one earlier where `a` has a space (`is_space`) just before it, or at the last item of the
/// shorter where one opens the other. None where that leaves no prompt.
fn shared_opening<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> Option<usize> {
    let n = a.len().min(b.len());
    let at = match (0..n).find(|&i| a[i] != b[i]) {
        Some(i) if i > 0 && is_space(&a[i - 1]) => i - 1,
        Some(i) => i,
        None => n.saturating_sub(1),
    };
    (at > 0).then_some(at)
}

/// A conversational prompt rendered ready for the assistant's reply. A prompt whose last
/// message is the assistant's is continued rather than closed: the reply goes on from that
/// message's text (a prefilled answer, "Let me think"), as TRL renders such prompts
/// (transformers' `continue_final_message`), where opening a new turn after it would train
/// and sample a different conversation than the one written.
pub(crate) fn render_prompt(at: &Loc, msgs: &Value, chat: Option<&Chat>) -> Result<String> {
    let (list, fields) = message_fields(at, "prompt", msgs, chat.is_some())?;
    let Some((&(last_role, _), earlier)) = fields.split_last() else {
        return Err(at.field("prompt", "empty"));
    };
    let render = |t: &Chat, open: bool| {
        t.render(list, open)
            .map_err(|e| at.field("prompt", &format!("{e:#}")))
    };
    if last_role != "assistant" {
        return match chat {
            Some(t) => render(t, true),
            None => Ok(render_chat_prompt(&fields)),
        };
    }
    let field = format!("prompt[{}].content", earlier.len());
    let text = final_text(&list[earlier.len()]).ok_or_else(|| {
        at.field(
            &field,
            "a prompt that ends with an assistant message is continued from its text, and this one has none",
        )
    })?;
    match chat {
        Some(t) => continued(&render(t, false)?, text).ok_or_else(|| {
            at.field(
                &field,
                "the chat template's rendering of the prompt does not hold this text, so it cannot be continued",
            )
        }),
        // render_chat_prompt opens an assistant turn after the earlier messages: the final
        // message's own header, which its text goes on from.
        None => Ok(render_chat_prompt(earlier) + text),
    }
}

/// The text a continued final message ends with: its string content, or the last text part
/// of a list of parts.
fn final_text(m: &Value) -> Option<&str> {
    let text = match m.get("content")? {
        Value::String(s) => s.as_str(),
        Value::Array(parts) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Value::as_str))?,
        _ => return None,
    };
    (!text.trim().is_empty()).then_some(text)
}

/// `rendered` (a conversation closed after its final message) cut just after that message's
/// `text`, so that generation continues it. Templates may trim a message's surrounding
/// whitespace: the cut is after the text's last occurrence, keeping its trailing whitespace
/// only where the rendering kept it.
fn continued(rendered: &str, text: &str) -> Option<String> {
    let core = text.trim();
    let at = rendered.rfind(core)?;
    let kept = text.trim_start();
    let end = match rendered[at..].starts_with(kept) {
        true => at + kept.len(),
        false => at + core.len(),
    };
    Some(rendered[..end].to_string())
}

/// The text an assistant reply (`reply`, the record's `field`: a list of messages opening with
/// the assistant's, see [`replies`]) adds after the rendered prompt.
pub(crate) fn render_reply(
    at: &Loc,
    field: &str,
    reply: Option<&Value>,
    prompt: (&Value, &str),
    chat: Option<&Chat>,
) -> Result<String> {
    reply_text(at, field, reply, prompt, chat, false)
}

/// [`render_reply`], for an SFT record (`sft`) an empty reply taken where [`empty_reply`]
/// takes it: preference and KTO responses stay non-empty.
fn reply_text(
    at: &Loc,
    field: &str,
    reply: Option<&Value>,
    prompt: (&Value, &str),
    chat: Option<&Chat>,
    sft: bool,
) -> Result<String> {
    let reply = reply.ok_or_else(|| at.field(field, "missing"))?;
    if !reply.is_array() {
        let got = format!(
            "expected a list of messages opening with the assistant's, got {}",
            kind(reply)
        );
        return Err(at.field(field, &got));
    }
    let (rlist, rfields) = message_fields(at, field, reply, chat.is_some())?;
    if rfields.len() > 1 {
        replies::check(at, field, rlist, &rfields, chat.is_some())?;
        return match chat {
            None => Ok(replies::builtin_text(&rfields)),
            Some(t) => after_prompt(at, field, rlist, prompt, t),
        };
    }
    let [(role, content)] = rfields.as_slice() else {
        return Err(at.field(field, "an empty list of messages"));
    };
    let non_empty = || at.field(field, "expected one non-empty assistant message");
    if *role != "assistant" {
        return Err(non_empty());
    }
    if !says_something(&rlist[0]) {
        match (sft, rlist[0].get("content")) {
            (true, Some(Value::String(_))) => empty_reply(at, field, chat.is_none())?,
            _ => return Err(non_empty()),
        }
    }
    match chat {
        None => Ok(content.to_string()),
        Some(t) => after_prompt(at, field, rlist, prompt, t),
    }
}

/// What the chat template writes after the rendered `prompt` (its messages and text) once
/// `reply`, the record's `field`, follows it.
fn after_prompt(
    at: &Loc,
    field: &str,
    reply: &[Value],
    prompt: (&Value, &str),
    t: &Chat,
) -> Result<String> {
    let mut all: Vec<Value> = prompt.0.as_array().cloned().unwrap_or_default();
    all.extend(reply.iter().cloned());
    let full = t
        .render(&all, false)
        .map_err(|e| at.field(field, &format!("{e:#}")))?;
    full.strip_prefix(prompt.1)
        .map(str::to_string)
        .ok_or_else(|| {
            at.field(
                field,
                "the chat template renders the prompt differently once a reply follows (it rewrites earlier turns)",
            )
        })
}

fn conversational_pair(
    at: &Loc,
    obj: &Map<String, Value>,
    chat: Option<&Chat>,
) -> Result<PreferencePair> {
    let msgs = &obj["prompt"];
    let prompt = render_prompt(at, msgs, chat)?;
    let side = |field| render_reply(at, field, obj.get(field), (msgs, &prompt), chat);
    let (chosen, rejected) = (side("chosen")?, side("rejected")?);
    Ok(PreferencePair {
        prompt,
        chosen,
        rejected,
        append_eos: chat.is_none(),
        origin: Some(at.to_string()),
        margin: margin_of(at, obj)?,
    })
}

/// Reads prompts `{"prompt"}` with an optional "answer" (a string, or a number read as its
/// text); every field is kept.
pub fn load_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    load_prompts_templated(path, None)
}

/// [`load_prompts`], where a `prompt` may also be a list of messages, rendered by a Hugging
/// Face chat template when one is given (else the built-in template) and opened for the
/// assistant's reply.
pub fn load_prompts_templated(
    path: &Path,
    template: Option<&ChatTemplate>,
) -> Result<Vec<PromptRecord>> {
    prompts_from(path, read_records(path)?, template)
}

/// [`load_prompts_templated`] with the template asked for only if some prompt is a list of
/// messages: a checkpoint whose own template cannot be loaded still serves plain prompts. The
/// fields are read from the columns `columns` names.
pub fn load_prompts_lazily(
    (path, part): (&Path, Part),
    columns: &Columns,
    template: impl FnOnce() -> Result<Option<ChatTemplate>>,
) -> Result<Vec<PromptRecord>> {
    let names = record_files(path, part)?;
    let reader = ColumnReader::new(columns);
    let (files, empty) = load_shards(&names, |f| Ok(vec![(f.to_path_buf(), reader.read(f)?)]))?;
    if let Some(w) = skipped_shards(&names, &empty, path) {
        crate::errln!("warning: {w}");
    }
    reader.check(path)?;
    let chat = files.iter().any(|(_, lines)| {
        lines
            .iter()
            .any(|(_, obj)| matches!(obj.get("prompt"), Some(Value::Array(_))))
    });
    let template = if chat { template()? } else { None };
    let mut prompts = Vec::new();
    for (f, lines) in files {
        prompts.extend(prompts_from(&f, lines, template.as_ref())?);
    }
    Ok(prompts)
}

/// [`load_prompts_templated`] of records already read ([`read_records_with`]).
pub fn prompts_from(
    path: &Path,
    lines: Lines,
    template: Option<&ChatTemplate>,
) -> Result<Vec<PromptRecord>> {
    lines
        .into_iter()
        .map(|(at, obj)| {
            let at = Loc { path, at };
            let (prompt, templated) = match obj.get("prompt") {
                Some(msgs @ Value::Array(_)) => {
                    let chat = bind(&at, &obj, template)?;
                    (render_prompt(&at, msgs, chat.as_ref())?, chat.is_some())
                }
                _ => (at.non_empty_str(&obj, "prompt")?.to_string(), false),
            };
            let answer = match obj.get("answer") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // As written (`12`, `0.5`): what an exact match compares a response with. A
                // reward process reads the record's own number. JSON reads `4.0` and `1e2` as
                // floats, which print as "4.0" and "100.0" and matched no response "4" or
                // "100": an integral one is written as the integer.
                Some(Value::Number(n)) => Some(match n.as_f64() {
                    Some(x) if n.is_f64() && x.is_finite() && x.fract() == 0.0 => {
                        // `{:.0}` writes every digit (1e16 as 10000000000000000); -0 as 0.
                        format!("{:.0}", x + 0.0)
                    }
                    _ => n.to_string(),
                }),
                Some(v) => {
                    return Err(at.field(
                        "answer",
                        &format!("expected a string or a number, got {}", kind(v)),
                    ))
                }
            };
            Ok(PromptRecord {
                prompt,
                answer,
                fields: obj,
                origin: Some(at.to_string()),
                templated,
            })
        })
        .collect()
}

/// Where a record sits in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A JSONL line, 1-based.
    Line(usize),
    /// A Parquet row, 0-based, as `datasets` indexes it.
    Row(usize),
    /// An element of a file that is one JSON array, 0-based, and the line it starts on where
    /// the array spans lines (`json.dump(..., indent=2)`; a plain `json.dump` writes one).
    Element { index: usize, line: Option<usize> },
}

/// A record's place in its file, printed as `path:line`, `path[row]` or `path[index]`
/// (with its line where that says more).
pub(crate) struct Loc<'a> {
    pub path: &'a Path,
    pub at: Place,
}

impl fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match self.at {
            Place::Line(line) => write!(f, "{path}:{line}"),
            Place::Row(row) => write!(f, "{path}[{row}]"),
            Place::Element { index, line: None } => write!(f, "{path}[{index}]"),
            Place::Element {
                index,
                line: Some(line),
            } => write!(f, "{path}[{index}] (line {line})"),
        }
    }
}

impl Loc<'_> {
    pub(crate) fn field(&self, field: &str, msg: &str) -> anyhow::Error {
        anyhow!("{self}: field \"{field}\": {msg}")
    }

    /// The string at `key` of `obj`, reported as `name` in errors (nested fields have longer
    /// names than their key).
    fn str_field<'o>(&self, obj: &'o Map<String, Value>, key: &str, name: &str) -> Result<&'o str> {
        match obj.get(key) {
            None => Err(self.field(name, "missing")),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.field(name, &format!("expected a string, got {}", kind(v)))),
        }
    }

    pub(crate) fn string<'o>(&self, obj: &'o Map<String, Value>, key: &str) -> Result<&'o str> {
        self.str_field(obj, key, key)
    }

    pub(crate) fn non_empty_str<'o>(
        &self,
        obj: &'o Map<String, Value>,
        key: &str,
    ) -> Result<&'o str> {
        let s = self.string(obj, key)?;
        if s.is_empty() {
            return Err(self.field(key, "empty"));
        }
        Ok(s)
    }
}

/// How a JSON value is described in errors ("got a number").
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a whole UTF-8 text file, gzip-compressed or not; errors name the file, and for
/// invalid UTF-8 the line too.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    if path.is_dir() {
        bail!("{}: a directory, where one file is read", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    // `datasets` reads `train.jsonl.gz` as it reads `train.jsonl`: gzip is known by its magic
    // bytes, whatever the file's name.
    let bytes = match bytes.starts_with(&[0x1f, 0x8b]) {
        true => {
            let mut text = Vec::new();
            flate2::read::MultiGzDecoder::new(bytes.as_slice())
                .read_to_end(&mut text)
                .with_context(|| format!("{}: gzip-compressed, and damaged", path.display()))?;
            text
        }
        false => bytes,
    };
    let mut s = crate::io::utf8_text(path, bytes)?;
    // Editors on Windows like to start files with a byte-order mark; it is not text.
    if s.starts_with('\u{feff}') {
        s.drain(..'\u{feff}'.len_utf8());
    }
    Ok(s)
}

/// Parses JSONL text into `(line, object)` pairs, skipping blank lines; or text that is one
/// JSON array of objects (as `json.dump(records, f)` writes it, which `datasets` reads too)
/// into its elements.
pub(crate) fn parse_jsonl(path: &Path, text: &str) -> Result<Lines> {
    // Named as what it is rather than by its first line's parse error (or, where that line
    // happens to parse, its type).
    let extension = path.extension().and_then(|x| x.to_str()).unwrap_or("");
    if ["csv", "tsv"].contains(&extension.to_ascii_lowercase().as_str()) {
        bail!(
            "{}: CSV and TSV are not read: give JSONL (one JSON object per line) or Parquet",
            path.display()
        );
    }
    if is_json_array(text) {
        return parse_json_array(path, text);
    }
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let at = Loc {
            path,
            at: Place::Line(i + 1),
        };
        if raw.trim().is_empty() {
            continue;
        }
        let value = super::strict_json::from_str(raw).map_err(|e| json_error(&at, raw, &e))?;
        match value {
            Value::Object(obj) => out.push((at.at, obj)),
            other => bail!("{at}: expected a JSON object, got {}", kind(&other)),
        }
    }
    Ok(out)
}

/// Whether `text` is one JSON array rather than JSON Lines: it opens with `[`, and its first
/// line is not a whole JSON value by itself (a JSONL file whose first record is an array
/// is refused by that line), or is the whole text.
fn is_json_array(text: &str) -> bool {
    let text = text.trim();
    let first = text.lines().next().unwrap_or("");
    text.starts_with('[')
        && (first.len() == text.len() || serde_json::from_str::<Value>(first).is_err())
}

/// The objects of `text`, one JSON array, each at its [`Place::Element`].
fn parse_json_array(path: &Path, text: &str) -> Result<Lines> {
    let value = super::strict_json::from_str(text).map_err(|e| {
        let line = e.line().max(1);
        let at = Loc {
            path,
            at: Place::Line(line),
        };
        json_error(&at, text.lines().nth(line - 1).unwrap_or(""), &e)
    })?;
    let Value::Array(all) = value else {
        bail!("{}: expected a JSON array", path.display());
    };
    let lines = element_lines(text);
    let spans_lines = text.trim().contains('\n');
    all.into_iter()
        .enumerate()
        .map(|(index, value)| {
            let at = Loc {
                path,
                at: Place::Element {
                    index,
                    line: lines.get(index).copied().filter(|_| spans_lines),
                },
            };
            match value {
                Value::Object(obj) => Ok((at.at, obj)),
                other => bail!("{at}: expected a JSON object, got {}", kind(&other)),
            }
        })
        .collect()
}

/// The 1-based line each element of the top-level array `text` (valid JSON) starts on.
fn element_lines(text: &str) -> Vec<usize> {
    let (mut lines, mut line) = (Vec::new(), 1);
    let (mut depth, mut in_string, mut escaped, mut expecting) = (0usize, false, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if b == b'\n' {
            line += 1;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if expecting && b != b']' {
            lines.push(line);
            expecting = false;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                expecting = depth == 1;
            }
            b']' | b'}' => depth -= 1,
            b',' => expecting = depth == 1,
            _ => {}
        }
    }
    lines
}

/// The error of a JSON text that does not parse, `raw` the line `e` is on.
fn json_error(at: &Loc, raw: &str, e: &serde_json::Error) -> anyhow::Error {
    if let Some(escape) = lone_surrogate(raw) {
        return anyhow!(
            "{at}: not valid JSON text: `{escape}` is half of a UTF-16 surrogate pair \
             without its other half, which is no character (Python's json reads it, \
             but no UTF-8 text holds it)"
        );
    }
    // Python's json.dumps writes a float NaN or infinity so, which no JSON parser takes.
    // (The parser may stop on the word's first character or its second.)
    let col = e.column();
    let word = [col.saturating_sub(2), col.saturating_sub(1)]
        .into_iter()
        .find_map(|start| {
            let rest = raw.get(start..)?;
            ["NaN", "-Infinity", "Infinity"]
                .into_iter()
                .find(|w| rest.starts_with(w))
                .map(|w| (w, start + 1))
        });
    if let Some((word, col)) = word {
        return anyhow!(
            "{at}: not valid JSON: {word} at column {col} is no JSON value (Python's \
             json writes a float so; write null, or json.dumps(..., allow_nan=False) \
             finds them)"
        );
    }
    let msg = crate::json_error::without_position(e);
    anyhow!("{at}: not valid JSON: {msg} at column {}", e.column())
}

/// The first `\uD800`-`\uDFFF` escape of `line` that is not one half of a pair (a high
/// surrogate followed at once by a low one), as written.
fn lone_surrogate(line: &str) -> Option<&str> {
    let unit = |i: usize| {
        let hex = line.get(i + 2..i + 6)?;
        (line.get(i..i + 2)? == "\\u")
            .then(|| u16::from_str_radix(hex, 16).ok())
            .flatten()
    };
    let mut i = 0;
    while let Some(off) = line.get(i..)?.find("\\u") {
        let at = i + off;
        // An escaped backslash before the `u` (`\\u`) starts no escape.
        let slashes = line[..at].bytes().rev().take_while(|&b| b == b'\\').count();
        match unit(at) {
            Some(0xD800..=0xDBFF) if slashes % 2 == 0 => match unit(at + 6) {
                Some(0xDC00..=0xDFFF) => i = at + 12,
                _ => return Some(&line[at..at + 6]),
            },
            Some(0xDC00..=0xDFFF) if slashes % 2 == 0 => return Some(&line[at..at + 6]),
            _ => i = at + 2,
        }
    }
    None
}

/// The record files of `path`: the file itself, or a directory's JSONL and Parquet files
/// (recursively, in sorted path order; of its `part` where its files name their splits, as a
/// Hugging Face dataset's `data/train-00000-of-00002.parquet` do), or its `.json` files read
/// as JSON Lines where it has neither.
pub fn record_files(path: &Path, part: Part) -> Result<Vec<PathBuf>> {
    let files = data_files(path, part, &[".jsonl", ".jsonl.gz", ".parquet"])?;
    if files.is_empty() {
        bail!(
            "{}: no .jsonl or .parquet file under it (nor, alone, a .json one)",
            path.display()
        );
    }
    Ok(files)
}

/// A data file's records, each with its place in the file.
pub type Lines = Vec<(Place, Map<String, Value>)>;

/// The error of a data file that holds no record: alone it is the whole dataset, and fatal;
/// among a split's several shards it is skipped ([`load_shards`]).
#[derive(Debug)]
pub struct NoRecords(pub PathBuf);

impl std::fmt::Display for NoRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: empty file: no records", self.0.display())
    }
}

impl std::error::Error for NoRecords {}

/// A directory's files, of the split asked for, loaded one after another, and those that hold
/// no record: a dataset's shard may be empty (a split cut into more shards than it has rows),
/// and the others still hold the split. Where every file is empty, the first one's error.
pub fn load_shards<T>(
    files: &[PathBuf],
    load: impl Fn(&Path) -> Result<Vec<T>>,
) -> Result<(Vec<T>, Vec<&Path>)> {
    let (mut all, mut empty) = (Vec::new(), Vec::new());
    for f in files {
        match load(f) {
            Ok(records) => all.extend(records),
            Err(e) if files.len() > 1 && e.downcast_ref::<NoRecords>().is_some() => {
                empty.push(f.as_path())
            }
            Err(e) => return Err(e),
        }
    }
    match empty.first() {
        Some(first) if all.is_empty() => Err(NoRecords(first.to_path_buf()).into()),
        _ => Ok((all, empty)),
    }
}

/// The warning for the `empty` shards [`load_shards`] skipped among `files`, from `dir`.
pub fn skipped_shards(files: &[PathBuf], empty: &[&Path], dir: &Path) -> Option<String> {
    let first = empty.first()?;
    let (verbs, more) = match empty.len() {
        1 => ("holds no records and is", String::new()),
        n => ("hold no records and are", format!(" and {} more", n - 1)),
    };
    Some(format!(
        "{} of the {} files of {} {verbs} skipped: {}{more}",
        empty.len(),
        files.len(),
        dir.display(),
        first.display(),
    ))
}

/// The records of a stage dataset, JSONL or Parquet; a file with none is an error.
pub(crate) fn read_records(path: &Path) -> Result<Lines> {
    read_records_with(path, &Columns::default())
}

/// Reads a dataset's files ([`read_records_with`]), noting which optional columns `columns`
/// names any of them has, for [`ColumnReader::check`] once all are read: a dataset whose
/// shards (or whose held-out file) lack a column some other file has is fine.
pub struct ColumnReader<'a> {
    columns: &'a Columns,
    found: std::cell::RefCell<(Vec<String>, Option<Vec<String>>)>,
}

impl<'a> ColumnReader<'a> {
    pub fn new(columns: &'a Columns) -> Self {
        Self {
            columns,
            found: Default::default(),
        }
    }

    pub fn read(&self, path: &Path) -> Result<Lines> {
        let lines = read_records_with(path, self.columns)?;
        let mut found = self.found.borrow_mut();
        for field in self.columns.found_in(&lines) {
            if !found.0.contains(&field) {
                found.0.push(field);
            }
        }
        if found.1.is_none() {
            found.1 = lines.first().map(|(_, r)| r.keys().cloned().collect());
        }
        Ok(lines)
    }

    /// Refuses a column named for an optional field that no file read had
    /// ([`Columns::check_found`]), naming the dataset `path`.
    pub fn check(&self, path: &Path) -> Result<()> {
        let found = self.found.borrow();
        let first = found.1.clone().unwrap_or_default();
        self.columns.check_found(path, &found.0, &first)
    }
}

/// [`read_records`], each record's fields read from the columns `columns` names.
pub fn read_records_with(path: &Path, columns: &Columns) -> Result<Lines> {
    let mut records: Lines = match is_parquet(path) {
        true => (0..).map(Place::Row).zip(read_rows(path, None)?).collect(),
        false => parse_jsonl(path, &read_text(path)?)?,
    };
    for (at, obj) in &mut records {
        columns.apply(&Loc { path, at: *at }, obj)?;
    }
    if records.is_empty() {
        return Err(NoRecords(path.to_path_buf()).into());
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty shard among a split's files is skipped and named; alone, or with every other
    /// file empty too, it is the error it always was; any other error stops the load.
    #[test]
    fn empty_shards_are_skipped_among_others() {
        let d = tempfile::tempdir().unwrap();
        let file = |name: &str, body: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let a = file("a.jsonl", "{\"x\": 1}\n{\"x\": 2}\n");
        let e1 = file("e1.jsonl", "");
        let e2 = file("e2.jsonl", "\n");
        let bad = file("bad.jsonl", "{\"x\": \n");
        let load = |f: &Path| -> Result<Vec<i64>> {
            Ok(crate::data::records::read_records(f)?
                .into_iter()
                .map(|(_, r)| r["x"].as_i64().unwrap())
                .collect())
        };
        let files = [e1.clone(), a.clone(), e2.clone()];
        let (all, empty) = load_shards(&files, load).unwrap();
        assert_eq!(all, [1, 2]);
        assert_eq!(empty, [e1.as_path(), e2.as_path()]);
        for files in [vec![e1.clone()], vec![e2.clone(), e1.clone()]] {
            let e = load_shards(&files, load).unwrap_err().to_string();
            assert!(
                e.ends_with("e2.jsonl: empty file: no records") || files.len() == 1,
                "{e}"
            );
            assert!(e.contains("empty file: no records"), "{e}");
        }
        let e = load_shards(&[a, e1, bad], load).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl"), "{e}");
    }

    fn file(dir: &tempfile::TempDir, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    /// A conversational prompt-completion record under a template with generation marks trains
    /// what they mark of its one reply, not the text the template writes after the block, as
    /// the same conversation in `messages` does (and TRL's assistant mask).
    #[test]
    fn a_single_reply_trains_what_the_generation_marks_say() {
        let d = tempfile::tempdir().unwrap();
        let marked = ChatTemplate::from_source(
            "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<end>{% endgeneration %}{% else %}{{ m.content }}<end>{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into(),
            String::new(),
            String::new(),
            Path::new("g.jinja"),
        )
        .unwrap();
        let body = concat!(
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"completion\": \"yo\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
        );
        let p = file(&d, "c.jsonl", body);
        let xs = load_sft_templated(&p, Some(&marked), LossScope::default()).unwrap();
        let trained = |x: &SftExample| -> Vec<(String, bool)> {
            x.segments
                .iter()
                .map(|s| (s.text.clone(), s.train))
                .collect()
        };
        let want = vec![
            ("<user>hi<end>\n<assistant>".to_string(), false),
            ("yo<end>".to_string(), true),
            ("\n".to_string(), false),
        ];
        for x in &xs {
            assert_eq!(trained(x), want, "{:?}", x.origin);
        }
    }

    /// A template that writes each message as `[role]content<end>`.
    fn bracketed() -> ChatTemplate {
        ChatTemplate::from_source(
            "{% for m in messages %}[{{ m.role }}]{{ m.content }}<end>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}".into(),
            String::new(),
            String::new(),
            Path::new("t.jinja"),
        )
        .unwrap()
    }

    fn seg(text: &str, train: bool) -> Segment {
        Segment {
            text: text.into(),
            train,
        }
    }

    /// The `{:#}` form of a loader's error, checked to be a single line.
    fn err<T: fmt::Debug>(r: Result<T>) -> String {
        let e = format!("{:#}", r.unwrap_err());
        assert!(!e.contains('\n'), "multi-line error: {e}");
        e
    }

    /// A lone surrogate escape, which Python's json reads and no UTF-8 text holds, is named as
    /// such; a pair, or an escaped backslash before a `u`, is none.
    #[test]
    fn a_lone_surrogate_escape_is_named() {
        assert_eq!(lone_surrogate(r#"{"a": "d\ud800"}"#), Some(r"\ud800"));
        assert_eq!(lone_surrogate(r#"{"a": "\udc00x"}"#), Some(r"\udc00"));
        assert_eq!(lone_surrogate(r#"{"a": "\ud83d\ude00 \\ud800"}"#), None);
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "s.jsonl",
            "{\"prompt\": \"a\", \"response\": \"d\\ud800\"}\n",
        );
        let e = err(load_sft(&p));
        assert!(
            e.contains("s.jsonl:1: not valid JSON text: `\\ud800` is half of a UTF-16 surrogate"),
            "{e}"
        );
    }

    /// Python's `NaN` and `Infinity`, which json.dumps writes for floats, are named.
    #[test]
    fn pythons_nan_is_named() {
        let d = tempfile::tempdir().unwrap();
        for (word, col) in [("NaN", 39), ("-Infinity", 39), ("Infinity", 39)] {
            let line = format!("{{\"prompt\": \"a\", \"response\": \"b\", \"x\": {word}}}\n");
            let p = file(&d, "n.jsonl", &line);
            let e = err(load_sft(&p));
            assert!(
                e.contains(&format!(
                    "n.jsonl:1: not valid JSON: {word} at column {col} is no JSON value"
                )),
                "{e}"
            );
        }
    }

    /// A gzip-compressed JSONL file reads as the text it compresses, alone and among a
    /// directory's files; a damaged one is said to be, by its name.
    #[test]
    fn gzip_compressed_records_read_as_their_text() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let body = "{\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body.as_bytes()).unwrap();
        let p = d.path().join("train.jsonl.gz");
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        assert_eq!(load_preferences(&p).unwrap()[0].chosen, "a");
        assert_eq!(
            record_files(d.path(), Part::train()).unwrap(),
            [p.as_path()]
        );
        std::fs::write(&p, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
        let e = err(load_preferences(&p));
        assert!(
            e.starts_with(&format!("{}: gzip-compressed, and damaged", p.display())),
            "{e}"
        );
        // The file beside its own gzip (gzip -k) would be read twice.
        std::fs::write(d.path().join("train.jsonl"), body).unwrap();
        let e = format!("{:#}", record_files(d.path(), Part::train()).unwrap_err());
        assert!(e.contains("train.jsonl.gz are both read"), "{e}");
    }

    /// A file that is one JSON array (as `json.dump` writes it, over several lines or one) is
    /// read as its elements, each named by its index (and its line where the array spans
    /// lines) and a parse error by its line; a JSONL line that is an array is refused by its
    /// line; a CSV file is told it is not read.
    #[test]
    fn a_json_array_file_is_read_as_its_elements() {
        let d = tempfile::tempdir().unwrap();
        let indented = "[\n  {\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"},\n  {\n    \"prompt\": \"d [,\\\" {\"\n  },\n  {\"prompt\": \"e\"}\n]\n";
        let compact = "[{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}, {\"prompt\": \"d [,\\\" {\"}, {\"prompt\": \"e\"}]";
        for (body, places) in [
            (indented, ["[0] (line 2)", "[1] (line 3)", "[2] (line 6)"]),
            (compact, ["[0]", "[1]", "[2]"]),
        ] {
            let p = file(&d, "pairs.json", body);
            let records = read_records(&p).unwrap();
            let prompts: Vec<&str> = records
                .iter()
                .map(|(_, r)| r["prompt"].as_str().unwrap())
                .collect();
            assert_eq!(prompts, ["a", "d [,\" {", "e"]);
            for ((at, _), want) in records.iter().zip(places) {
                let at = Loc { path: &p, at: *at }.to_string();
                assert_eq!(at, format!("{}{want}", p.display()));
            }
            let e = err(load_preferences(&p));
            assert!(
                e.contains("pairs.json[1]") && e.contains("\"chosen\": missing"),
                "{e}"
            );
        }
        let p = file(
            &d,
            "bad.json",
            "[\n  {\"prompt\": \"a\"},\n  {\"prompt\": NaN}\n]\n",
        );
        let e = err(read_records(&p));
        assert!(
            e.contains("bad.json:3: not valid JSON: NaN at column 14"),
            "{e}"
        );
        let p = file(&d, "nums.json", "[{\"prompt\": \"a\"}, 7]");
        let e = err(read_records(&p));
        assert!(
            e.contains("nums.json[1]: expected a JSON object, got a number"),
            "{e}"
        );
        let p = file(&d, "mixed.jsonl", "{\"prompt\": \"a\"}\n[1, 2]\n");
        let e = err(read_records(&p));
        assert!(e.contains("mixed.jsonl:2: expected a JSON object"), "{e}");
        let p = file(&d, "arrays.jsonl", "[1, 2]\n{\"prompt\": \"a\"}\n");
        let e = err(read_records(&p));
        assert!(e.contains("arrays.jsonl:1: expected a JSON object"), "{e}");
        let p = file(&d, "pairs.CSV", "prompt,chosen,rejected\na,b,c\n");
        let e = err(read_records(&p));
        assert!(e.contains("pairs.CSV: CSV and TSV are not read"), "{e}");
    }

    /// TRL's `completion_only_loss` and `assistant_only_loss`: off, a record's every token
    /// trains; the segments (and so where EOS goes) stay as they were, and a Jinja-rendered
    /// conversation is one trained render.
    #[test]
    fn loss_scopes_choose_what_trains_as_trl_does() {
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "sft.jsonl",
            concat!(
                "{\"prompt\": \"Q: 2+3\\nA: \", \"completion\": \"5\"}\n",
                "{\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"},",
                " {\"role\": \"assistant\", \"content\": \"Hello\"},",
                " {\"role\": \"user\", \"content\": \"Bye\"}], \"completion\": \"Yo\"}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"},",
                " {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n",
                "{\"text\": \"2+2=4\"}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
            ),
        );
        let scope = |completion_only, assistant_only| LossScope {
            completion_only,
            assistant_only,
        };
        // The text each example trains, in order, and whether it trains every token.
        let taught = |x: &SftExample| {
            let texts: Vec<&str> = x
                .segments
                .iter()
                .filter(|s| s.train)
                .map(|s| s.text.as_str())
                .collect();
            (texts.join("|"), x.train_all)
        };
        let t = bracketed();
        for template in [None, Some(&t)] {
            let load = |scope| load_sft_templated(&p, template, scope);
            // A conversation with no assistant message trains only where every token does.
            let e = err(load(LossScope::default()));
            assert!(
                e.contains("sft.jsonl:5") && e.contains("no assistant message"),
                "{e}"
            );
            let all = load(scope(false, false)).unwrap();
            assert_eq!(all.len(), 5);

            let p2 = file(
                &d,
                "four.jsonl",
                &std::fs::read_to_string(&p)
                    .unwrap()
                    .lines()
                    .take(4)
                    .map(|l| format!("{l}\n"))
                    .collect::<String>(),
            );
            let load4 = |scope| load_sft_templated(&p2, template, scope).unwrap();
            let (base, prompts, convs, whole) = (
                load4(scope(true, true)),
                load4(scope(false, true)),
                load4(scope(true, false)),
                load4(scope(false, false)),
            );
            let of = |xs: &[SftExample]| xs.iter().map(taught).collect::<Vec<_>>();
            let (reply, earlier) = match template {
                None => ("Yo", "Hello"),
                Some(_) => ("Yo<end>", "Hello<end>"),
            };
            assert_eq!(of(&base)[1], (reply.to_string(), false));
            assert_eq!(of(&base)[3], ("2+2=4".to_string(), false));
            // completion_only off: the plain prompt trains, and a conversational prompt's
            // earlier assistant turns train beside the completion (TRL's assistant mask).
            assert!(of(&prompts)[0].1);
            assert_eq!(of(&prompts)[1], (format!("{earlier}|{reply}"), false));
            assert_eq!(of(&prompts)[2], of(&base)[2]);
            // assistant_only off: conversations train whole; prompt-completion records do not.
            assert_eq!(of(&convs)[0], of(&base)[0]);
            assert_eq!(of(&convs)[1], of(&base)[1]);
            match template {
                None => assert!(of(&convs)[2].1),
                Some(_) => assert_eq!(
                    convs[2].segments,
                    vec![seg("[user]Hi<end>[assistant]Hello!<end>", true)]
                ),
            }
            // Both off: the conversational prompt-completion record trains whole too.
            match template {
                None => assert!(of(&whole)[1].1),
                Some(_) => assert_eq!(
                    whole[1].segments,
                    vec![seg(
                        "[user]Hi<end>[assistant]Hello<end>[user]Bye<end>[assistant]Yo<end>",
                        true
                    )]
                ),
            }
        }
    }

    /// An empty completion, as `temper generate` writes a sample that stopped at once, trains
    /// `temper sft` as it is where temper ends it with EOS (a plain prompt, the built-in chat
    /// template, in every loss scope): the prompt untrained, then the trained EOS alone. Under
    /// a Jinja chat template (no EOS added), and for a record with nothing else to train on
    /// (an empty prompt, an empty `text`), it is refused; preference and KTO responses stay
    /// non-empty.
    #[test]
    fn an_empty_completion_trains_the_eos_after_it() {
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "bo.jsonl",
            concat!(
                "{\"prompt\": \"Q: 2+3\\nA: \", \"completion\": \"\", \"finish_reason\": \"stop\"}\n",
                "{\"prompt\": \"Q: 2+3\\nA: \", \"response\": \"\"}\n",
                "{\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"completion\": \"\"}\n",
                "{\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}],",
                " \"completion\": [{\"role\": \"assistant\", \"content\": \"\"}]}\n",
            ),
        );
        let tok = Tokenizer::Bytes;
        let scopes = [(true, true), (false, true), (true, false), (false, false)];
        for (completion_only, assistant_only) in scopes {
            let scope = LossScope {
                completion_only,
                assistant_only,
            };
            let xs = load_sft_templated(&p, None, scope).unwrap();
            assert_eq!(xs.len(), 4);
            for x in &xs {
                assert!(x.append_eos, "{x:?}");
                let last = x.segments.last().unwrap();
                assert_eq!(last, &seg("", true), "{x:?}");
                let (ids, train) = crate::stages::batch::encode_example(&tok, x).unwrap();
                assert_eq!(ids.last(), Some(&tok.eos_id()), "{x:?}");
                assert_eq!(train.last(), Some(&true), "{x:?}");
                if completion_only && assistant_only {
                    // Only the EOS trains.
                    assert_eq!(train.iter().filter(|t| **t).count(), 1, "{x:?}");
                }
            }
            // The prompt and what trains of it are as a non-empty completion's record has them.
            let full = file(
                &d,
                "5.jsonl",
                "{\"prompt\": \"Q: 2+3\\nA: \", \"completion\": \"5\"}\n",
            );
            let five = &load_sft_templated(&full, None, scope).unwrap()[0];
            assert_eq!(xs[0].segments[0], five.segments[0]);
            assert_eq!(xs[0].train_all, five.train_all);

            // A Jinja template ends the turn itself: nothing of temper's marks the stop.
            let t = bracketed();
            for line in [3, 4] {
                let body = std::fs::read_to_string(&p).unwrap();
                let one = file(&d, "j.jsonl", body.lines().nth(line - 1).unwrap());
                let e = err(load_sft_templated(&one, Some(&t), scope));
                assert!(
                    e.contains("j.jsonl:1: field \"completion\": empty") && e.contains("Jinja"),
                    "{e}"
                );
            }
        }
        // Nothing else to train on: refused.
        for (body, want) in [
            (
                r#"{"prompt": "", "completion": ""}"#,
                "field \"prompt\": empty",
            ),
            (r#"{"text": ""}"#, "field \"text\": empty"),
        ] {
            let e = err(load_sft(&file(&d, "n.jsonl", body)));
            assert!(e.contains(want), "{body}: {e}");
        }
        // A `messages` conversation's own assistant turns stay non-empty.
        let m = file(
            &d,
            "m.jsonl",
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}"#,
        );
        assert!(err(load_sft(&m)).contains("field \"messages[1].content\": empty"));
        // Preference pairs (which SFT does not read) keep their non-empty responses.
        let pr = file(
            &d,
            "pr.jsonl",
            r#"{"prompt": "x", "chosen": "", "rejected": "y"}"#,
        );
        assert!(err(load_preferences(&pr)).contains("field \"chosen\": empty"));
        let pr = file(
            &d,
            "pr.jsonl",
            r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": ""}], "rejected": [{"role": "assistant", "content": "y"}]}"#,
        );
        assert!(err(load_preferences(&pr)).contains("non-empty assistant message"));
    }

    #[test]
    fn sft_plain_and_chat() {
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "sft.jsonl",
            concat!(
                "{\"prompt\": \"Q: 2+3\\nA: \", \"response\": \"5\"}\n",
                "\n",
                "   \n",
                "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},",
                " {\"role\": \"user\", \"content\": \"Hi\"},",
                " {\"role\": \"assistant\", \"content\": \"Hello!\"},",
                " {\"role\": \"user\", \"content\": \"Bye\"},",
                " {\"role\": \"assistant\", \"content\": \"Bye!\", \"name\": \"x\"}]}\n",
                "{\"prompt\": \"Q: 1+1\\nA: \", \"completion\": \"2\", \"reward\": 1.0}\n",
                "{\"text\": \"2+2=4\", \"source\": \"x\"}\n",
                "{\"text\": \"rendered\", \"prompt\": \"Q: 2+3\\nA: \", \"response\": \"5\"}\n",
            ),
        );
        let xs = load_sft(&p).unwrap();
        assert_eq!(xs.len(), 5);
        assert_eq!(xs[3].segments, vec![seg("2+2=4", true)]);
        assert!(xs[3].append_eos);
        assert_eq!(
            xs[4].segments, xs[0].segments,
            "a prompt wins over text, as in TRL"
        );
        assert_eq!(
            xs[2].segments,
            vec![seg("Q: 1+1\nA: ", false), seg("2", true)]
        );
        assert_eq!(
            xs[0].segments,
            vec![seg("Q: 2+3\nA: ", false), seg("5", true)]
        );
        assert_eq!(
            xs[1].segments,
            vec![
                seg(
                    "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n",
                    false
                ),
                seg("Hello!", true),
                seg("<|user|>\nBye\n<|assistant|>\n", false),
                seg("Bye!", true),
            ]
        );
    }

    #[test]
    fn consecutive_assistant_turns_stay_separate() {
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "a.jsonl",
            r#"{"messages": [{"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}]}"#,
        );
        assert_eq!(
            load_sft(&p).unwrap()[0].segments,
            vec![
                seg("<|assistant|>\n", false),
                seg("A", true),
                seg("<|assistant|>\n", false),
                seg("B", true)
            ]
        );
    }

    #[test]
    fn chat_prompt_matches_training_render() {
        let prompt = render_chat_prompt(&[("system", "Be brief."), ("user", "Hi")]);
        assert_eq!(
            prompt,
            "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
        );
        // The generation prompt is exactly the untrained prefix SFT trains after.
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "c.jsonl",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#,
        );
        assert_eq!(load_sft(&p).unwrap()[0].segments[0].text, prompt);
        assert_eq!(render_chat_prompt(&[]), "<|assistant|>\n");
    }

    #[test]
    fn sft_errors() {
        let d = tempfile::tempdir().unwrap();
        let cases: &[(&str, &str)] = &[
            (
                r#"{"prompt": "x"}"#,
                "f.jsonl:1: field \"completion\": missing (or \"response\"",
            ),
            (
                r#"{"response": "x"}"#,
                "f.jsonl:1: field \"prompt\": missing",
            ),
            (
                r#"{"prompt": "", "response": "y"}"#,
                "f.jsonl:1: field \"prompt\": empty",
            ),
            (
                r#"{"prompt": "x", "response": 3}"#,
                "f.jsonl:1: field \"response\": expected a string, got a number",
            ),
            (r#"{"text": ""}"#, "f.jsonl:1: field \"text\": empty"),
            (r#"{"text": 3}"#, "f.jsonl:1: field \"text\": expected a string"),
            (r#"{"tex": "x"}"#, "f.jsonl:1: field \"prompt\": missing"),
            (
                r#"{"prompt": "", "completion": ""}"#,
                "f.jsonl:1: field \"prompt\": empty",
            ),
            (
                r#"{"prompt": "x", "completion": null}"#,
                "f.jsonl:1: field \"completion\": expected a string, got null",
            ),
            (
                r#"{"messages": [{"role": "assistant", "content": "a"}], "completion": "z"}"#,
                "f.jsonl:1: field \"messages\": give either \"messages\" or \"prompt\" and \"completion\"",
            ),
            (
                r#"{"prompt": "x", "response": "y", "completion": "z"}"#,
                "f.jsonl:1: field \"completion\": give either \"response\" or \"completion\"",
            ),
            (
                r#"{"prompt": "x", "messages": []}"#,
                "f.jsonl:1: field \"messages\": give either",
            ),
            (
                r#"{"messages": {}}"#,
                "f.jsonl:1: field \"messages\": expected an array, got an object",
            ),
            (
                r#"{"messages": []}"#,
                "f.jsonl:1: field \"messages\": empty",
            ),
            (
                r#"{"messages": ["hi"]}"#,
                "f.jsonl:1: field \"messages[0]\": expected an object, got a string",
            ),
            (
                r#"{"messages": [{"content": "hi"}]}"#,
                "f.jsonl:1: field \"messages[0].role\": missing",
            ),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                "f.jsonl:1: field \"messages[0].content\": missing",
            ),
            (
                r#"{"messages": [{"role": "user", "content": null}]}"#,
                "f.jsonl:1: field \"messages[0].content\": expected a string, got null",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "bot", "content": "c"}]}"#,
                "f.jsonl:1: field \"messages[2].role\": unknown role \"bot\"",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}"#,
                "f.jsonl:1: field \"messages[1].content\": empty",
            ),
            // Prompt and completion positions too, under the built-in template.
            (
                r#"{"prompt": [{"role": "wizard", "content": "a"}], "completion": "b"}"#,
                "f.jsonl:1: field \"prompt[0].role\": unknown role \"wizard\"",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "bot", "content": "b"}]}"#,
                "f.jsonl:1: field \"completion[0].role\": unknown role \"bot\"",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}]}"#,
                "f.jsonl:1: field \"messages\": no assistant message",
            ),
        ];
        for (body, want) in cases {
            let p = file(&d, "f.jsonl", body);
            let e = err(load_sft(&p));
            assert!(e.contains(want), "{body}: got {e}, want {want}");
        }
    }

    #[test]
    fn line_numbers_and_json_errors() {
        let d = tempfile::tempdir().unwrap();
        let ok = r#"{"prompt": "a", "response": "b"}"#;
        let p = file(&d, "x.jsonl", &format!("{ok}\n\n{ok}\n\n\n\nnot json\n"));
        assert!(
            err(load_sft(&p)).ends_with("x.jsonl:7: not valid JSON: expected ident at column 2")
        );
        let p = file(
            &d,
            "x.jsonl",
            &format!("{ok}\r\n\r\n{{\"prompt\": \"a\"}}\r\n"),
        );
        assert!(err(load_sft(&p)).ends_with(
            "x.jsonl:3: field \"completion\": missing (or \"response\", its other name)"
        ));
        let p = file(&d, "x.jsonl", &format!("{ok}\n[1, 2]\n"));
        assert!(err(load_sft(&p)).ends_with("x.jsonl:2: expected a JSON object, got an array"));
        // Python's json keeps the last of a repeated key, and so would serde_json: refused.
        let twice = r#"{"prompt": "a", "prompt": "b", "response": "c"}"#;
        let p = file(&d, "x.jsonl", &format!("{ok}\n{twice}\n"));
        let e = err(load_sft(&p));
        assert!(
            e.ends_with("x.jsonl:2: not valid JSON: key \"prompt\" appears twice in one object at column 24"),
            "{e}"
        );
        let p = file(&d, "x.jsonl", &format!("{ok} trailing\n"));
        assert!(err(load_sft(&p)).contains("x.jsonl:1: not valid JSON: trailing characters"));
        let p = file(&d, "x.jsonl", "");
        assert!(err(load_sft(&p)).ends_with("x.jsonl: empty file: no records"));
        let p = file(&d, "x.jsonl", "\n  \n");
        assert!(err(load_prompts(&p)).ends_with("x.jsonl: empty file: no records"));
        let p = d.path().join("x.jsonl");
        std::fs::write(
            &p,
            b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\xff\"}\n",
        )
        .unwrap();
        assert!(err(load_sft(&p)).ends_with("x.jsonl:2: not valid UTF-8 text"));
        // A byte-order mark does not break the first record.
        let p = file(&d, "x.jsonl", &format!("\u{feff}{ok}\n"));
        assert_eq!(load_sft(&p).unwrap().len(), 1);
    }

    #[test]
    fn missing_files_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope.jsonl");
        let shown = p.display().to_string();
        assert!(err(load_sft(&p)).starts_with(&format!("{shown}: cannot read")));
        assert!(err(load_preferences(&p)).starts_with(&shown));
        assert!(err(load_prompts(&p)).starts_with(&shown));
    }

    /// Records whose prompt is implicit in `chosen` and `rejected` (Anthropic's HH as text,
    /// trl-lib/ultrafeedback_binarized as conversations) split as TRL's `extract_prompt`
    /// splits them (the text cases checked against it), for DPO and every reader of pairs.
    #[test]
    fn implicit_prompts_split_as_trl_splits_them() {
        let d = tempfile::tempdir().unwrap();
        let text = |c: &str, r: &str| serde_json::json!({"chosen": c, "rejected": r}).to_string();
        let body = [
            text(
                "\n\nHuman: 2+2?\n\nAssistant: It is 4.",
                "\n\nHuman: 2+2?\n\nAssistant: It is 5.",
            ),
            text(
                "\n\nHuman: hi\n\nAssistant: Hello there",
                "\n\nHuman: hi\n\nAssistant: Go away",
            ),
            text("Q: x A: yes", "Q: x A: yes!"),
        ]
        .join("\n");
        let xs = load_preferences(&file(&d, "hh.jsonl", &body)).unwrap();
        let got: Vec<[&str; 3]> = xs
            .iter()
            .map(|x| [x.prompt.as_str(), &x.chosen, &x.rejected])
            .collect();
        assert_eq!(
            got,
            [
                ["\n\nHuman: 2+2?\n\nAssistant: It is", " 4.", " 5."],
                ["\n\nHuman: hi\n\nAssistant:", " Hello there", " Go away"],
                ["Q: x A: ye", "s", "s!"],
            ]
        );
        let turn = |role: &str, c: &str| serde_json::json!({"role": role, "content": c});
        let convo = serde_json::json!({
            "chosen": [turn("user", "2+2?"), turn("assistant", "4")],
            "rejected": [turn("user", "2+2?"), turn("assistant", "5")],
            "score_chosen": 8.0,
        });
        let t = bracketed();
        let p = file(&d, "uf.jsonl", &format!("{convo}\n"));
        let x = &load_preferences_templated(&p, Some(&t)).unwrap()[0];
        assert_eq!(
            [x.prompt.as_str(), &x.chosen, &x.rejected],
            ["[user]2+2?<end>[assistant]", "4<end>", "5<end>"]
        );
        let x = &load_preferences(&p).unwrap()[0];
        assert_eq!(
            [x.prompt.as_str(), &x.chosen, &x.rejected],
            ["<|user|>\n2+2?\n<|assistant|>\n", "4", "5"]
        );
        // HuggingFaceH4/ultrafeedback_binarized: the user's text as `prompt` beside replies
        // that hold the whole conversation. The prompt comes from the conversations, as TRL's
        // `maybe_extract_prompt` takes it, for DPO, the reward model and KTO alike.
        let mut h4 = convo.clone();
        h4["prompt"] = "2+2?".into();
        h4["prompt_id"] = "abc1".into();
        let p = file(&d, "h4.jsonl", &format!("{h4}\n"));
        let x = &load_preferences(&p).unwrap()[0];
        assert_eq!(
            [x.prompt.as_str(), &x.chosen, &x.rejected],
            ["<|user|>\n2+2?\n<|assistant|>\n", "4", "5"]
        );
        let kto = crate::data::labelled::load_labelled_records(&p, None).unwrap();
        assert_eq!(kto[0].len(), 2, "one pair, two labelled completions");
    }

    #[test]
    fn preferences() {
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "p.jsonl",
            "{\"prompt\": \"Q\", \"chosen\": \"good\", \"rejected\": \"bad\"}\n{\"prompt\": \"Q\", \"chosen\": \"same\", \"rejected\": \"same\"}\n",
        );
        let xs = load_preferences(&p).unwrap();
        assert_eq!(
            xs[0],
            PreferencePair {
                prompt: "Q".into(),
                chosen: "good".into(),
                rejected: "bad".into(),
                append_eos: true,
                origin: Some(format!("{}:1", p.display())),
                margin: None,
            }
        );
        assert_eq!(xs.len(), 2);
        // TRL's per-record margin, read where given and refused by field where not a number.
        let m = file(
            &d,
            "m.jsonl",
            "{\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\", \"margin\": 0.5}\n\
             {\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\", \"margin\": null}\n",
        );
        let ms: Vec<_> = load_preferences(&m)
            .unwrap()
            .iter()
            .map(|x| x.margin)
            .collect();
        assert_eq!(ms, [Some(0.5), None]);
        let bad = file(
            &d,
            "bad.jsonl",
            "{\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\", \"margin\": \"big\"}\n",
        );
        let e = load_preferences(&bad).unwrap_err().to_string();
        assert!(
            e.contains("bad.jsonl:1: field \"margin\": expected a number"),
            "{e}"
        );

        let cases: &[(&str, &str)] = &[
            (
                r#"{"chosen": "a", "rejected": "b"}"#,
                "field \"prompt\": missing, and \"chosen\" and \"rejected\" share no opening to take it from",
            ),
            (
                r#"{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "field \"prompt\": missing, and \"chosen\" and \"rejected\" share no opening to take it from",
            ),
            (
                r#"{"prompt": "", "chosen": "a", "rejected": "b"}"#,
                "field \"prompt\": empty",
            ),
            (
                r#"{"prompt": "q", "rejected": "b"}"#,
                "field \"chosen\": missing",
            ),
            (
                r#"{"prompt": "q", "chosen": "", "rejected": "b"}"#,
                "field \"chosen\": empty",
            ),
            (
                r#"{"prompt": "q", "chosen": "a"}"#,
                "field \"rejected\": missing",
            ),
            (
                r#"{"prompt": "q", "chosen": "a", "rejected": ""}"#,
                "field \"rejected\": empty",
            ),
            (
                r#"{"prompt": "q", "chosen": "a", "rejected": ["b"]}"#,
                "field \"rejected\": a list of messages, after a \"prompt\" that is text: a conversation's reply follows a prompt that is a list of messages too",
            ),
        ];
        for (body, want) in cases {
            let p = file(&d, "p.jsonl", &format!("\n{body}\n"));
            let e = err(load_preferences(&p));
            assert!(
                e.ends_with(&format!("p.jsonl:2: {want}")),
                "{body}: got {e}"
            );
        }
    }

    #[test]
    fn prompts() {
        let d = tempfile::tempdir().unwrap();
        let p = file(
            &d,
            "q.jsonl",
            "{\"prompt\": \"Q: 2+3\\nA: \", \"answer\": \"5\", \"level\": 2}\n{\"prompt\": \"hi\"}\n{\"prompt\": \"x\", \"answer\": null}\n",
        );
        let xs = load_prompts(&p).unwrap();
        assert_eq!(xs.len(), 3);
        assert_eq!(xs[0].prompt, "Q: 2+3\nA: ");
        assert_eq!(xs[0].answer.as_deref(), Some("5"));
        assert_eq!(xs[0].fields.get("level"), Some(&Value::from(2)));
        assert_eq!(
            xs[0].fields.get("prompt"),
            Some(&Value::from("Q: 2+3\nA: "))
        );
        assert_eq!(xs[1].answer, None);
        assert_eq!(xs[2].answer, None);
        // Numbers as an exact match would read them: integral floats as integers.
        let n = file(
            &d,
            "n.jsonl",
            "{\"prompt\": \"a\", \"answer\": 4.0}\n{\"prompt\": \"b\", \"answer\": 1e2}\n\
             {\"prompt\": \"c\", \"answer\": 0.5}\n{\"prompt\": \"d\", \"answer\": -12}\n\
             {\"prompt\": \"e\", \"answer\": 1e16}\n{\"prompt\": \"f\", \"answer\": -0.0}\n",
        );
        let answers: Vec<_> = load_prompts(&n)
            .unwrap()
            .into_iter()
            .map(|x| x.answer)
            .collect();
        let want =
            ["4", "100", "0.5", "-12", "10000000000000000", "0"].map(|a| Some(a.to_string()));
        assert_eq!(answers, want);

        let cases: &[(&str, &str)] = &[
            (r#"{"answer": "5"}"#, "field \"prompt\": missing"),
            (r#"{"prompt": ""}"#, "field \"prompt\": empty"),
            (
                r#"{"prompt": 1}"#,
                "field \"prompt\": expected a string, got a number",
            ),
            (
                r#"{"prompt": "q", "answer": [5]}"#,
                "field \"answer\": expected a string or a number, got an array",
            ),
        ];
        for (body, want) in cases {
            let p = file(&d, "q.jsonl", body);
            let e = err(load_prompts(&p));
            assert!(
                e.ends_with(&format!("q.jsonl:1: {want}")),
                "{body}: got {e}"
            );
        }
    }

    /// TRL's per-record `tools` column (a list, or that list as JSON text) and
    /// `chat_template_kwargs` reach the template, as transformers' `apply_chat_template(messages,
    /// tools=...)`; an assistant message may hold tool calls and no content, and a tool's
    /// reply has its own role. Rendered and split as transformers 5.24 renders this template
    /// (its text and the trained spans checked there, `tojson` included); without a Jinja
    /// template a record's tools are refused naming the field.
    #[test]
    fn tools_and_tool_calls_reach_the_template() {
        let d = tempfile::tempdir().unwrap();
        let template = ChatTemplate::from_source(
            TOOLS_TEMPLATE.into(),
            String::new(),
            String::new(),
            Path::new("tools.jinja"),
        )
        .unwrap();
        let record: Value = serde_json::from_str(TOOLS_RECORD).unwrap();
        let mut as_text = record.clone();
        as_text["tools"] = record["tools"].to_string().into();
        let body = format!("{record}\n{as_text}\n");
        let sft = load_sft_templated(
            &file(&d, "tools.jsonl", &body),
            Some(&template),
            LossScope::default(),
        )
        .unwrap();
        let system = "<|im_start|>system\nYou may call these tools:\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"The user's city & its weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"days\": {\"type\": \"integer\"}}, \"required\": [\"city\"]}}}\n<|im_end|>\n";
        let want = vec![
            seg(&format!("{system}<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"), false),
            seg("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 1}}</tool_call><|im_end|>\n", true),
            seg("<|im_start|>tool\n{\"temp\": 21}<|im_end|>\n<|im_start|>assistant\n", false),
            seg("It is 21 °C.<|im_end|>\n", true),
        ];
        for x in &sft {
            assert_eq!(x.segments, want);
        }
        // A prompt with tools opens the assistant's turn after them.
        let prompt =
            serde_json::json!({"prompt": [record["messages"][0]], "tools": record["tools"]});
        let prompts = load_prompts_templated(
            &file(&d, "p.jsonl", &format!("{prompt}\n")),
            Some(&template),
        )
        .unwrap();
        assert_eq!(
            prompts[0].prompt,
            format!(
                "{system}<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
            )
        );
        // A record's keywords reach the template over the run's.
        let keyed = ChatTemplate::from_source(
            "{{ mode }}:{% for m in messages %}{{ m.content }}{% endfor %}".into(),
            String::new(),
            String::new(),
            Path::new("k.jinja"),
        )
        .unwrap()
        .with_kwargs(&serde_json::from_str(r#"{"mode": "run"}"#).unwrap())
        .unwrap();
        let lines = "{\"prompt\": [{\"role\": \"user\", \"content\": \"a\"}]}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"b\"}], \"chat_template_kwargs\": {\"mode\": \"record\"}}\n";
        let got: Vec<String> = load_prompts_templated(&file(&d, "k.jsonl", lines), Some(&keyed))
            .unwrap()
            .into_iter()
            .map(|p| p.prompt)
            .collect();
        assert_eq!(got, ["run:a", "record:b"]);

        let e = err(load_sft(&file(&d, "bare.jsonl", &format!("{record}\n"))));
        assert!(e.contains("bare.jsonl:1") && e.contains("\"tools\""), "{e}");
        for (bad, says) in [
            (
                r#""tools": {"name": "x"}"#,
                "expected a list of tool schemas, got an object",
            ),
            (r#""tools": "[oops""#, "a string that is not JSON"),
            (r#""chat_template_kwargs": [1]"#, "expected an object"),
            (
                r#""chat_template_kwargs": {"messages": 1}"#,
                "`messages` is set by temper",
            ),
        ] {
            let line = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}, {{\"role\": \"assistant\", \"content\": \"yo\"}}], {bad}}}\n");
            let e = err(load_sft_templated(
                &file(&d, "bad.jsonl", &line),
                Some(&template),
                LossScope::default(),
            ));
            assert!(e.contains("bad.jsonl:1") && e.contains(says), "{bad}: {e}");
        }
    }

    /// A prompt ending with the assistant's message is continued from its text, as TRL
    /// renders it (transformers' continue_final_message), by either template; one whose last
    /// message has no text, or whose template drops it, is refused by field.
    #[test]
    fn a_prompt_ending_with_the_assistants_message_is_continued() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(
            &dir,
            "p.jsonl",
            concat!(
                r#"{"prompt": [{"role": "user", "content": "2+4?"}, {"role": "assistant", "content": "Let me see:"}]}"#,
                "\n",
                r#"{"prompt": [{"role": "assistant", "content": "I"}]}"#,
                "\n"
            ),
        );
        let prompts = |t: Option<&ChatTemplate>| -> Vec<String> {
            load_prompts_templated(&p, t)
                .unwrap()
                .into_iter()
                .map(|r| r.prompt)
                .collect()
        };
        assert_eq!(
            prompts(None),
            [
                "<|user|>\n2+4?\n<|assistant|>\nLet me see:",
                "<|assistant|>\nI"
            ]
        );
        assert_eq!(
            prompts(Some(&bracketed())),
            ["[user]2+4?<end>[assistant]Let me see:", "[assistant]I"]
        );
        // Trailing whitespace stays where the template kept it, and goes where it trimmed.
        assert_eq!(continued("[a]so <end>", "so ").as_deref(), Some("[a]so "));
        assert_eq!(continued("[a]so<end>", "so ").as_deref(), Some("[a]so"));
        assert_eq!(continued("[a]x<end>", "so"), None);
        // A preference pair after a continued prompt: each reply is what follows it.
        let pairs = file(
            &dir,
            "pairs.jsonl",
            concat!(
                r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A:"}], "#,
                r#""chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}"#,
                "\n"
            ),
        );
        let x = &load_preferences_templated(&pairs, Some(&bracketed())).unwrap()[0];
        assert_eq!(
            (x.prompt.as_str(), x.chosen.as_str()),
            ("[user]q<end>[assistant]A:", "<end>[assistant]4<end>")
        );
        let refused = |body: &str, t: Option<&ChatTemplate>| {
            let bad = file(&dir, "bad.jsonl", body);
            load_prompts_templated(&bad, t).unwrap_err().to_string()
        };
        let e = refused(
            r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}"#,
            None,
        );
        assert!(
            e.contains("bad.jsonl:1") && e.contains("prompt[1].content"),
            "{e}"
        );
        let silent = ChatTemplate::from_source(
            "{% for m in messages %}[{{ m.role }}]<end>{% endfor %}".into(),
            String::new(),
            String::new(),
            Path::new("t.jinja"),
        )
        .unwrap();
        let e = refused(
            r#"{"prompt": [{"role": "assistant", "content": "so"}]}"#,
            Some(&silent),
        );
        assert!(
            e.contains("prompt[0].content") && e.contains("cannot be continued"),
            "{e}"
        );
    }

    #[test]
    fn conversational_prompts_and_pairs_render_with_the_template() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prefs.jsonl");
        let user = r#"[{"role": "user", "content": "2+2?"}]"#;
        let reply = |c: &str| format!(r#"[{{"role": "assistant", "content": "{c}"}}]"#);
        std::fs::write(
            &p,
            format!(
                "{{\"prompt\": {user}, \"chosen\": {}, \"rejected\": {}}}\n",
                reply("4"),
                reply("5")
            ),
        )
        .unwrap();
        // The built-in template: the prompt opens the assistant's turn, replies are bare.
        let x = &load_preferences(&p).unwrap()[0];
        assert_eq!(
            (x.prompt.as_str(), x.chosen.as_str()),
            ("<|user|>\n2+2?\n<|assistant|>\n", "4")
        );
        assert!(x.append_eos);
        // A Jinja template: each reply is what it adds after the generation prompt.
        let t = bracketed();
        let x = &load_preferences_templated(&p, Some(&t)).unwrap()[0];
        assert_eq!(x.prompt, "[user]2+2?<end>[assistant]");
        assert_eq!(
            (x.chosen.as_str(), x.rejected.as_str()),
            ("4<end>", "5<end>")
        );
        assert!(!x.append_eos);
        // SFT's conversational prompt-completion, the completion a one-message list or, as
        // `temper generate` writes it, the message's text.
        let s = dir.path().join("sft.jsonl");
        std::fs::write(
            &s,
            format!(
                "{{\"prompt\": {user}, \"completion\": {}}}\n{{\"prompt\": {user}, \"completion\": \"4\"}}\n",
                reply("4")
            ),
        )
        .unwrap();
        for x in load_sft(&s).unwrap() {
            assert_eq!(
                x.segments,
                vec![
                    seg("<|user|>\n2+2?\n<|assistant|>\n", false),
                    seg("4", true)
                ]
            );
            assert!(x.append_eos);
        }
        for x in load_sft_templated(&s, Some(&t), LossScope::default()).unwrap() {
            assert_eq!(
                x.segments,
                vec![
                    seg("[user]2+2?<end>[assistant]", false),
                    seg("4<end>", true)
                ]
            );
            assert!(!x.append_eos);
        }
        std::fs::write(
            &s,
            format!("{{\"prompt\": {user}, \"completion\": [{{\"role\": 1}}]}}\n"),
        )
        .unwrap();
        let e = err(load_sft(&s));
        assert!(
            e.contains("sft.jsonl:1: field \"completion[0].role\""),
            "{e}"
        );
        std::fs::write(&s, format!("{{\"prompt\": {user}, \"completion\": 4}}\n")).unwrap();
        let e = err(load_sft(&s));
        assert!(
            e.contains("field \"completion\": expected the assistant's text"),
            "{e}"
        );
        std::fs::write(
            &s,
            format!("{{\"prompt\": {user}, \"completion\": \"\"}}\n"),
        )
        .unwrap();
        // An empty reply: the built-in template ends it with EOS, which trains; a Jinja
        // template's turn gets none (an_empty_completion_trains_the_eos_after_it).
        let x = &load_sft(&s).unwrap()[0];
        assert_eq!(x.segments[1], seg("", true));
        let e = err(load_sft_templated(&s, Some(&t), LossScope::default()));
        assert!(
            e.contains("sft.jsonl:1: field \"completion\": empty (an empty reply is taken"),
            "{e}"
        );
        let q = dir.path().join("prompts.jsonl");
        std::fs::write(&q, format!("{{\"prompt\": {user}, \"answer\": \"4\"}}\n")).unwrap();
        let r = &load_prompts_templated(&q, Some(&t)).unwrap()[0];
        assert_eq!(
            (r.prompt.as_str(), r.answer.as_deref()),
            ("[user]2+2?<end>[assistant]", Some("4"))
        );
    }

    const TOOLS_TEMPLATE: &str = "{% if tools %}<|im_start|>system\nYou may call these tools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}\n{% for m in messages %}\n{% if m.role == 'assistant' %}<|im_start|>assistant\n{% if m.content %}{{ m.content }}{% endif %}\n{% for call in m.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}\n<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}\n";

    const TOOLS_RECORD: &str = r#"{"tools": [{"type": "function", "function": {"name": "get_weather", "description": "The user's city & its weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}], "messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}]}, {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "assistant", "content": "It is 21 °C."}]}"#;
}
