//! Hugging Face chat templates: a model directory's `chat_template.jinja` (where
//! transformers 4.5x and later save it) or the `chat_template` of its `tokenizer_config.json`
//! (older saves), or a bare `.jinja` file, rendered the way transformers renders it
//! (trim_blocks, lstrip_blocks, loop controls, Python string methods and key order,
//! `raise_exception`, `bos_token`/`eos_token`, and transformers' `tojson` and `strftime_now`:
//! see [`super::jinja_python`]).
//!
//! A template renders whole conversations. Where it marks what the assistant says with
//! transformers' `{% generation %}` blocks (as templates written for TRL's
//! `assistant_only_loss` do), the marked text is what carries loss, the conversation rendered
//! once. Elsewhere, as TRL does for templates without markers, we render each prefix of the
//! conversation: the text an assistant message adds after its generation prompt is what
//! carries loss, end-of-turn marker included.
//!
//! Variables besides the conversation (transformers' `template_kwargs`, TRL's
//! `chat_template_kwargs`: Qwen3's `enable_thinking`, say) come from `[data]
//! chat_template_kwargs` or `--chat-template-kwargs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, ErrorKind};
use serde_json::{Map, Value};

use super::records::{kind, read_text};
use super::{jinja_python, jinja_text};

const NAME: &str = "chat_template";
/// The named template transformers renders a conversation given tools with.
const TOOL_USE: &str = "tool_use";
/// The named template transformers renders other conversations with.
pub const DEFAULT: &str = "default";

/// Where transformers saves a model's chat template; it wins over `tokenizer_config.json`'s.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// Where transformers saves a model's other, named chat templates (`tool_use`, say).
pub const NAMED_TEMPLATES_DIR: &str = "additional_chat_templates";

/// What a `{% generation %}` block's text is wrapped in while rendering: Unicode
/// noncharacters, which no text should hold (a conversation that does is refused).
const MARK_OPEN: char = '\u{FDD0}';
const MARK_CLOSE: char = '\u{FDD1}';
/// The filter a `{% generation %}` block becomes: a block tag still, so trim_blocks and
/// lstrip_blocks treat it as Jinja treats the extension's tag.
const MARK_FILTER: &str = "__temper_generation";

pub struct ChatTemplate {
    env: Environment<'static>,
    /// The Jinja text, kept so that a run records the template it trained with; none for a
    /// directory with named templates only, which renders a conversation only where its
    /// `tool_use` template serves (`no_default` says why not otherwise).
    source: Option<String>,
    no_default: Option<String>,
    /// Whether the template marks the assistant's text with `{% generation %}` blocks.
    marked: bool,
    /// The model's `tool_use` template, where it has one (and whether it is marked): what
    /// transformers renders a conversation given tools with.
    tool_use: Option<bool>,
    tool_use_source: Option<String>,
    bos: String,
    eos: String,
    /// Read from a bare Jinja file, which names no `bos_token` or `eos_token`: the model's
    /// tokenizer supplies them ([`ChatTemplate::with_model_tokens`]).
    bare: bool,
    origin: PathBuf,
    kwargs: Map<String, Value>,
    /// Whether it has rendered anything: a template (or keywords) a run asked for that no
    /// record reads is said to be unused.
    used: AtomicBool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({})", self.origin.display())
    }
}

impl ChatTemplate {
    /// Reads a template from a model directory (as [`ChatTemplate::in_dir`] finds it), a
    /// `tokenizer_config.json` (its `chat_template`, `bos_token` and `eos_token`) or, for any
    /// other file name, from the file's text as Jinja source.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let found = Self::in_dir(path)?.with_context(|| {
                format!(
                    "{}: holds no chat template (neither {TEMPLATE_FILE} nor a \"chat_template\" \
                     in tokenizer_config.json)",
                    path.display()
                )
            })?;
            // A template given to a run must render something; named templates that are
            // neither the default nor tool_use render nothing unnamed.
            if let (None, None, Some(why)) =
                (&found.source, &found.tool_use_source, &found.no_default)
            {
                bail!("{why}");
            }
            return Ok(found);
        }
        let text = read_text(path)?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        if !is_json {
            let mut template = Self::from_source(text, String::new(), String::new(), path)?;
            template.bare = true;
            return Ok(template);
        }
        Self::from_config(path, &parse_config(path, &text)?)
    }

    /// The template of the tokenizer config `cfg` read from `path` (see
    /// [`from_tokenizer_config`]), with its `tool_use` template where it has one.
    fn from_config(path: &Path, cfg: &Map<String, Value>) -> Result<Self> {
        let ConfigTemplates {
            default,
            tool_use,
            bos,
            eos,
        } = from_tokenizer_config(path, cfg)?;
        let template = match default {
            Ok(source) => Self::from_source(source, bos, eos, path)?,
            Err(why) => Self::without_default(why, bos, eos, path),
        };
        match tool_use {
            Some(t) => template.with_tool_use(t, path),
            None => Ok(template),
        }
    }

    /// The chat template of the model directory `dir`, where transformers 5 looks for it: a
    /// named template `default` (`additional_chat_templates/default.jinja`, read after and so
    /// over `chat_template.jinja`), else its `chat_template.jinja`, else the `chat_template` of
    /// its `tokenizer_config.json` (absent or null: none), with the BOS and EOS tokens the
    /// config names either way.
    pub fn in_dir(dir: &Path) -> Result<Option<Self>> {
        let tc = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&tc) {
            Ok(text) => Some(parse_config(&tc, &text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => bail!("{}: cannot read: {e}", tc.display()),
        };
        let mut named = named_templates(dir)?;
        let default = match named.iter().position(|n| n == DEFAULT) {
            Some(i) => {
                named.remove(i);
                Some(
                    dir.join(NAMED_TEMPLATES_DIR)
                        .join(format!("{DEFAULT}.jinja")),
                )
            }
            None => Some(dir.join(TEMPLATE_FILE)).filter(|j| j.is_file()),
        };
        let specials = || match &config {
            Some(cfg) => special_tokens(&tc, cfg),
            None => Ok(Default::default()),
        };
        // The directory's `tool_use` template beside `template`, where it has one.
        let with_tools = |template: Self| -> Result<Option<Self>> {
            if !named.iter().any(|n| n == TOOL_USE) {
                return Ok(Some(template));
            }
            let tools = dir
                .join(NAMED_TEMPLATES_DIR)
                .join(format!("{TOOL_USE}.jinja"));
            template.with_tool_use(read_text(&tools)?, &tools).map(Some)
        };
        if let Some(jinja) = default {
            let (bos, eos) = specials()?;
            return with_tools(Self::from_source(read_text(&jinja)?, bos, eos, &jinja)?);
        }
        // transformers takes named templates over the config's, and then has no default:
        // it renders a conversation given tools with `tool_use`, and refuses any other when
        // it is rendered, not when it is loaded (records that render none still train).
        if !named.is_empty() {
            let (bos, eos) = specials()?;
            let why = format!(
                "{}: holds named chat templates ({}) but no default one ({TEMPLATE_FILE}), and \
                 transformers renders none of them unnamed: pass --chat-template {}/NAME.jinja",
                dir.display(),
                named.join(", "),
                dir.join(NAMED_TEMPLATES_DIR).display()
            );
            return with_tools(Self::without_default(why, bos, eos, dir));
        }
        match config {
            Some(cfg) if cfg.get("chat_template").is_some_and(|t| !t.is_null()) => {
                Self::from_config(&tc, &cfg).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The Jinja text this template renders with; none where it has only named ones.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The Jinja text of its `tool_use` template, where it has one.
    pub fn tool_use_source(&self) -> Option<&str> {
        self.tool_use_source.as_deref()
    }

    /// The `bos_token` and `eos_token` it renders (empty where its config names none).
    pub fn special_tokens(&self) -> (&str, &str) {
        (&self.bos, &self.eos)
    }

    /// Whether `other` renders every conversation as this one does: the same default and
    /// `tool_use` templates.
    pub fn same_as(&self, other: &ChatTemplate) -> bool {
        self.source == other.source && self.tool_use_source == other.tool_use_source
    }

    pub fn from_source(source: String, bos: String, eos: String, origin: &Path) -> Result<Self> {
        let (rewritten, marked) = generation_as_filter(&source)
            .map_err(|e| anyhow!("{}: chat template: {e}", origin.display()))?;
        let mut template = Self::without_default(String::new(), bos, eos, origin);
        template
            .env
            .add_template_owned(NAME, rewritten)
            .map_err(|e| anyhow!("{}: chat template does not parse: {e}", origin.display()))?;
        template.source = Some(source);
        template.no_default = None;
        template.marked = marked;
        Ok(template)
    }

    /// A template with no default one, which refuses to render a conversation with `why`
    /// until [`ChatTemplate::with_tool_use`] gives it one for conversations with tools.
    fn without_default(why: String, bos: String, eos: String, origin: &Path) -> Self {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(jinja_text::unknown_method);
        env.add_function("raise_exception", |msg: String| -> Result<String, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", jinja_python::strftime_now);
        env.add_test("iterable", jinja_python::is_iterable);
        env.add_test("sequence", jinja_python::is_sequence);
        env.set_formatter(jinja_python::format_value);
        env.add_filter("tojson", jinja_python::tojson);
        env.add_filter("round", jinja_python::round);
        env.add_filter("truncate", jinja_text::truncate);
        env.add_filter("wordcount", jinja_text::wordcount);
        env.add_filter("center", jinja_text::center);
        env.add_filter("striptags", jinja_text::striptags);
        env.add_filter(MARK_FILTER, |text: String| {
            format!("{MARK_OPEN}{text}{MARK_CLOSE}")
        });
        Self {
            env,
            source: None,
            no_default: Some(why),
            marked: false,
            tool_use: None,
            tool_use_source: None,
            bos,
            eos,
            bare: false,
            origin: origin.to_path_buf(),
            kwargs: Map::new(),
            used: AtomicBool::new(false),
        }
    }

    /// A template read from a bare Jinja file renders the `bos_token` and `eos_token` of the
    /// model's tokenizer (`tokens`, see [`special_tokens_in`]), as transformers renders the
    /// template it is handed with the tokenizer's own; where it came with a tokenizer config,
    /// that config's stand.
    pub fn with_model_tokens(mut self, tokens: (String, String)) -> Self {
        if self.bare {
            (self.bos, self.eos) = tokens;
        }
        self
    }

    /// This template with `source` as its `tool_use` template (from `origin`).
    fn with_tool_use(mut self, source: String, origin: &Path) -> Result<Self> {
        let (rewritten, marked) = generation_as_filter(&source)
            .map_err(|e| anyhow!("{}: chat template: {e}", origin.display()))?;
        self.env
            .add_template_owned(TOOL_USE, rewritten)
            .map_err(|e| anyhow!("{}: chat template does not parse: {e}", origin.display()))?;
        self.tool_use = Some(marked);
        self.tool_use_source = Some(source);
        Ok(self)
    }

    /// Whether the template a conversation with `vars` renders with marks the assistant's
    /// text with `{% generation %}` blocks.
    pub fn marks_generation(&self, vars: &Map<String, Value>) -> bool {
        self.chosen(vars).1
    }

    /// The template a conversation renders with, and whether it is marked: the `tool_use` one
    /// where tools are given and the model has one (as transformers picks it), else the
    /// default.
    fn chosen(&self, vars: &Map<String, Value>) -> (&'static str, bool) {
        let tools = |m: &Map<String, Value>| m.get("tools").is_some_and(|t| !t.is_null());
        match self.tool_use {
            Some(marked) if tools(vars) || tools(&self.kwargs) => (TOOL_USE, marked),
            _ => (NAME, self.marked),
        }
    }

    /// The template with `kwargs` among its variables, as transformers passes its
    /// `template_kwargs`: they may replace `bos_token` and `eos_token`, not the conversation.
    pub fn with_kwargs(mut self, kwargs: &Map<String, Value>) -> Result<Self> {
        check_kwargs(kwargs)?;
        self.kwargs = kwargs.clone();
        Ok(self)
    }

    /// Whether it has rendered a conversation.
    pub fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Renders `messages` (the JSON objects as given, so a template may read any field).
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, &Map::new(), add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with a record's own variables `vars` (its `tools`, say) over
    /// the template's keywords.
    pub fn render_with(
        &self,
        messages: &[Value],
        vars: &Map<String, Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if !self.chosen(vars).1 {
            return self.render_marked(messages, vars, add_generation_prompt);
        }
        refuse_marks(messages)?;
        let text = self.render_marked(messages, vars, add_generation_prompt)?;
        Ok(text.replace([MARK_OPEN, MARK_CLOSE], ""))
    }

    /// [`ChatTemplate::render_with`] with each `{% generation %}` block's text between
    /// [`MARK_OPEN`] and [`MARK_CLOSE`].
    fn render_marked(
        &self,
        messages: &[Value],
        record: &Map<String, Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.used.store(true, Ordering::Relaxed);
        let name = self.chosen(record).0;
        if let (NAME, Some(why)) = (name, &self.no_default) {
            bail!("{why}");
        }
        let tmpl = self.env.get_template(name)?;
        use minijinja::Value as V;
        // transformers always passes `tools` and `documents`, none where a call gives none.
        let mut vars = BTreeMap::from([
            ("bos_token", V::from(self.bos.as_str())),
            ("eos_token", V::from(self.eos.as_str())),
            ("tools", V::from(())),
            ("documents", V::from(())),
        ]);
        vars.extend(
            self.kwargs
                .iter()
                .chain(record)
                .map(|(k, v)| (k.as_str(), V::from_serialize(v))),
        );
        let messages: Vec<Value> = messages.iter().map(as_transformers_sees).collect();
        vars.insert("messages", V::from_serialize(&messages));
        vars.insert("add_generation_prompt", V::from(add_generation_prompt));
        tmpl.render(vars)
            .map_err(|e| anyhow!("chat template {}: {}", self.origin.display(), describe(&e)))
    }

    /// Splits a rendered conversation into `(text, trained)` spans: the text of the
    /// template's `{% generation %}` blocks where it has them, else the text each assistant
    /// message adds after the generation prompt, is trained; everything else is context.
    pub fn spans(&self, messages: &[Value]) -> Result<Vec<(String, bool)>> {
        self.spans_with(messages, &Map::new())
    }

    /// [`ChatTemplate::spans`] with a record's own variables (see
    /// [`ChatTemplate::render_with`]).
    pub fn spans_with(
        &self,
        messages: &[Value],
        vars: &Map<String, Value>,
    ) -> Result<Vec<(String, bool)>> {
        self.spans_from(messages, vars, 0)
    }

    /// [`ChatTemplate::spans_with`], where a template without `{% generation %}` blocks trains
    /// only the assistant messages from `messages[from]` on (a prompt-completion record's
    /// completion): the earlier ones are the prompt, which need not render as the start of
    /// their continuation. A template with the blocks marks every block, the caller cutting
    /// away what falls in the prompt.
    pub fn spans_from(
        &self,
        messages: &[Value],
        vars: &Map<String, Value>,
        from: usize,
    ) -> Result<Vec<(String, bool)>> {
        if self.chosen(vars).1 {
            return self.marked_spans(messages, vars);
        }
        let render = |m: &[Value], prompt: bool| self.render_with(m, vars, prompt);
        let full = render(messages, false)?;
        let mut spans = Vec::new();
        let mut pos = 0;
        for (i, m) in messages.iter().enumerate() {
            if i < from || m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let prompt = render(&messages[..i], true)?;
            let upto = render(&messages[..=i], false)?;
            if prompt.len() < pos || !upto.starts_with(&prompt) || !full.starts_with(&upto) {
                bail!(
                    "chat template {} does not render a conversation as the start of its \
                     continuation (at messages[{i}]), so the assistant's tokens cannot be \
                     told apart: mark the assistant's text with {{% generation %}} ... \
                     {{% endgeneration %}}, as templates for TRL's assistant_only_loss do, \
                     or train on every token ([sft] assistant_only_loss = false)",
                    self.origin.display()
                );
            }
            if upto.len() == prompt.len() {
                bail!(
                    "chat template {} renders messages[{i}] (assistant) as nothing",
                    self.origin.display()
                );
            }
            if prompt.len() > pos {
                spans.push((full[pos..prompt.len()].to_string(), false));
            }
            spans.push((full[prompt.len()..upto.len()].to_string(), true));
            pos = upto.len();
        }
        if pos < full.len() {
            spans.push((full[pos..].to_string(), false));
        }
        Ok(spans)
    }
}

impl ChatTemplate {
    /// The spans of a template with `{% generation %}` blocks: the conversation rendered once,
    /// each block's text trained (transformers' `return_assistant_tokens_mask`).
    fn marked_spans(
        &self,
        messages: &[Value],
        vars: &Map<String, Value>,
    ) -> Result<Vec<(String, bool)>> {
        refuse_marks(messages)?;
        let full = self.render_marked(messages, vars, false)?;
        let mut spans: Vec<(String, bool)> = Vec::new();
        let (mut text, mut inside) = (String::new(), false);
        for c in full.chars() {
            let opens = match c {
                MARK_OPEN => true,
                MARK_CLOSE => false,
                _ => {
                    text.push(c);
                    continue;
                }
            };
            if opens == inside {
                bail!(
                    "chat template {}: a {{% generation %}} block inside another",
                    self.origin.display()
                );
            }
            if !text.is_empty() {
                spans.push((std::mem::take(&mut text), inside));
            }
            inside = opens;
        }
        if !text.is_empty() {
            spans.push((text, false));
        }
        let speaks = messages
            .iter()
            .any(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
        if speaks && !spans.iter().any(|(_, trained)| *trained) {
            bail!(
                "chat template {} marks none of this conversation's assistant messages with \
                 {{% generation %}}, so none of it would be trained",
                self.origin.display()
            );
        }
        Ok(spans)
    }
}

/// Refuses messages holding the characters that mark a `{% generation %}` block's text.
fn refuse_marks(messages: &[Value]) -> Result<()> {
    let has_marks = |v: &Value| v.to_string().contains([MARK_OPEN, MARK_CLOSE]);
    if let Some(i) = messages.iter().position(has_marks) {
        bail!(
            "messages[{i}] holds U+FDD0 or U+FDD1, which a template with {{% generation %}} \
             blocks cannot render"
        );
    }
    Ok(())
}

/// A message as transformers' `apply_chat_template` hands it to the template: keys whose
/// value is null dropped (OpenAI-style `"content": null` beside tool calls renders as no
/// content, not "None"), and its reasoning, under any of the names transformers knows, also
/// as `reasoning_content` (what Qwen3's template reads) and `thinking` (gpt-oss's).
fn as_transformers_sees(message: &Value) -> Value {
    let Value::Object(m) = message else {
        return message.clone();
    };
    let mut m: Map<String, Value> = m
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| m.get(*k).cloned());
    if let Some(r) = reasoning {
        // Python's `{"thinking": r, **m, "reasoning_content": r}`: `thinking` first unless the
        // message has its own, `reasoning_content` where the message had it, else last.
        let mut out = Map::new();
        out.insert("thinking".into(), r.clone());
        out.extend(m);
        out.insert("reasoning_content".into(), r);
        m = out;
    }
    Value::Object(m)
}

/// `source` with transformers' `{% generation %}` ... `{% endgeneration %}` blocks (whitespace
/// control kept) as scoped blocks of [`MARK_FILTER`], and whether it had any. Comments, raw
/// blocks and string literals are left as they are. A `{% break %}` or `{% continue %}` inside
/// a block is refused, as transformers refuses it (minijinja would drop the block's text).
fn generation_as_filter(source: &str) -> std::result::Result<(String, bool), String> {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let (mut marked, mut inside) = (false, false);
    // Loops opened inside the current block: a `break` in one of them is the loop's.
    let mut loops = 0usize;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let n = if rest.starts_with("{#") {
            rest.find("#}").map_or(rest.len(), |e| e + 2)
        } else if rest.starts_with("{{") {
            closing(rest, "}}")
        } else if rest.starts_with("{%") {
            let n = closing(rest, "%}");
            let tag = &rest[..n];
            let (o, name, c, alone) = block_tag(tag);
            // The filter marks the block's text; the `with` inside it keeps the block's `set`s
            // to itself, as the body of transformers' call block is.
            let replacement = match name {
                "generation" if alone => {
                    Some(format!("{{%{o} filter {MARK_FILTER} %}}{{% with {c}%}}"))
                }
                "endgeneration" if alone => Some(format!("{{%{o} endwith %}}{{% endfilter {c}%}}")),
                "for" if inside => {
                    loops += 1;
                    None
                }
                "endfor" if inside => {
                    loops = loops.saturating_sub(1);
                    None
                }
                "break" | "continue" if inside && loops == 0 => {
                    return Err(format!(
                        "a {{% {name} %}} inside a {{% generation %}} block of a loop outside it \
                         (transformers refuses it)"
                    ))
                }
                _ => None,
            };
            if let Some(r) = replacement {
                marked = true;
                inside = name == "generation";
                loops = 0;
                out.push_str(&r);
                rest = &rest[n..];
                continue;
            }
            if name == "raw" {
                rest.find("endraw")
                    .map_or(rest.len(), |e| e + closing(&rest[e..], "%}"))
            } else {
                n
            }
        } else {
            1
        };
        out.push_str(&rest[..n]);
        rest = &rest[n..];
    }
    out.push_str(rest);
    Ok((out, marked))
}

/// The length of the tag that opens `text`, through its first `end` outside a string literal
/// (the whole text where it has none).
fn closing(text: &str, end: &str) -> usize {
    let mut quote: Option<char> = None;
    let mut chars = text.char_indices().skip(2);
    while let Some((i, c)) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) if c == '\\' => {
                chars.next();
            }
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if text[i..].starts_with(end) => return i + end.len(),
            None => {}
        }
    }
    text.len()
}

/// A block tag's whitespace control after `{%`, its first word, its control before `%}` (`-`,
/// `+` or nothing), and whether the word is all the tag holds.
fn block_tag(tag: &str) -> (&str, &str, &str, bool) {
    let inner = tag.strip_prefix("{%").unwrap_or(tag);
    let inner = inner.strip_suffix("%}").unwrap_or(inner);
    let control = |s: &str| s.starts_with(['-', '+']) as usize;
    let open = &inner[..control(inner)];
    let body = &inner[open.len()..];
    let close_at = body.len() - body.ends_with(['-', '+']) as usize;
    let close = &body[close_at..];
    let words: Vec<&str> = body[..close_at].split_whitespace().collect();
    match words.as_slice() {
        [word] => (open, word, close, true),
        [word, ..] => (open, word, close, false),
        [] => (open, "", close, false),
    }
}

/// Refuses template variables that would replace the conversation, or that a run's TOML
/// configuration could not write back (a null anywhere, an integer past i64).
pub fn check_kwargs(kwargs: &Map<String, Value>) -> Result<()> {
    for (k, v) in kwargs {
        if matches!(k.as_str(), "messages" | "add_generation_prompt") {
            bail!("chat_template_kwargs: `{k}` is set by temper, not by a keyword");
        }
        if let Err(e) = toml::Value::try_from(v) {
            bail!("chat_template_kwargs: `{k}` cannot be written to a TOML config ({e}; a null or an integer past 2^63 - 1)");
        }
    }
    Ok(())
}

/// Parses `--chat-template-kwargs`: a JSON object.
pub fn parse_kwargs(text: &str) -> Result<Map<String, Value>> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| anyhow!("--chat-template-kwargs: not JSON ({e})"))?;
    let Value::Object(m) = v else {
        bail!("--chat-template-kwargs: a JSON object is needed, as {{\"enable_thinking\": false}}");
    };
    check_kwargs(&m)?;
    Ok(m)
}

/// minijinja's message with the template line it points at.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    if let Some(src) = std::error::Error::source(e) {
        msg.push_str(&format!(": {src}"));
    }
    msg
}

/// The template, its `tool_use` template if it has one, and the special tokens of a tokenizer
/// config. `chat_template` is a string or, in configs with several, a list of `{"name",
/// "template"}` of which "default" is used (and "tool_use" where tools are given).
/// What a tokenizer config's `chat_template` holds.
struct ConfigTemplates {
    /// The default template, or why there is none: a list of named templates without
    /// `default`, which transformers renders only by name (or, given tools, as `tool_use`).
    default: std::result::Result<String, String>,
    tool_use: Option<String>,
    /// The BOS and EOS tokens the config names.
    bos: String,
    eos: String,
}

fn from_tokenizer_config(path: &Path, cfg: &Map<String, Value>) -> Result<ConfigTemplates> {
    let at = |field: &str, msg: &str| anyhow!("{}: field \"{field}\": {msg}", path.display());
    let mut tool_use = None;
    let source = match cfg.get("chat_template") {
        None | Some(Value::Null) => {
            return Err(at(
                "chat_template",
                "missing (this tokenizer config has no chat template)",
            ))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for t in list {
                let name = t.get("name").and_then(Value::as_str);
                let body = t.get("template").and_then(Value::as_str);
                let (Some(name), Some(_)) = (name, body) else {
                    return Err(at(
                        "chat_template",
                        "a list entry without a \"name\" and a \"template\" string",
                    ));
                };
                names.push(name);
            }
            let named = |want: &str| {
                list.iter().find_map(|t| {
                    let body = t.get("template").and_then(Value::as_str)?;
                    (t.get("name").and_then(Value::as_str) == Some(want)).then(|| body.to_string())
                })
            };
            tool_use = named(TOOL_USE);
            named(DEFAULT).ok_or_else(|| {
                format!(
                    "{}: field \"chat_template\": named templates ({}) but no `default`, and \
                     transformers renders none of them unnamed: pass --chat-template FILE.jinja holding the one to use",
                    path.display(),
                    names.join(", ")
                )
            })
        }
        Some(v) => {
            return Err(at(
                "chat_template",
                &format!("expected a string or a list, got {}", kind(v)),
            ))
        }
    };
    let (bos, eos) = special_tokens(path, cfg)?;
    Ok(ConfigTemplates {
        default: source,
        tool_use,
        bos,
        eos,
    })
}

fn parse_config(path: &Path, text: &str) -> Result<Map<String, Value>> {
    serde_json::from_str(text).map_err(|e| {
        anyhow!(
            "{}:{}: not valid JSON: {e}",
            path.display(),
            e.line().max(1)
        )
    })
}

/// The `bos_token` and `eos_token` of the tokenizer config in `dir` (empty where it names
/// none, or `dir` holds none).
pub fn special_tokens_in(dir: &Path) -> Result<(String, String)> {
    let tc = dir.join("tokenizer_config.json");
    match std::fs::read_to_string(&tc) {
        Ok(text) => special_tokens(&tc, &parse_config(&tc, &text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => bail!("{}: cannot read: {e}", tc.display()),
    }
}

/// The `bos_token` and `eos_token` a tokenizer config names (empty where it names none).
fn special_tokens(path: &Path, cfg: &Map<String, Value>) -> Result<(String, String)> {
    let at = |field: &str, msg: &str| anyhow!("{}: field \"{field}\": {msg}", path.display());
    let token = |field: &str| -> Result<String> {
        match cfg.get(field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Object(o)) => match o.get("content") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(at(field, "an object without a string \"content\"")),
            },
            Some(v) => Err(at(
                field,
                &format!("expected a string or an object, got {}", kind(v)),
            )),
        }
    };
    Ok((token("bos_token")?, token("eos_token")?))
}

/// The names of the templates in `dir`'s `additional_chat_templates/` (file names without
/// `.jinja`), sorted; none where there is no such directory.
pub fn named_templates(dir: &Path) -> Result<Vec<String>> {
    let named = dir.join(NAMED_TEMPLATES_DIR);
    if !named.is_dir() {
        return Ok(vec![]);
    }
    let entries =
        std::fs::read_dir(&named).with_context(|| format!("{}: cannot read", named.display()))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("{}: cannot read", named.display()))?;
        let file = e.file_name();
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".jinja")) else {
            continue;
        };
        if e.path().is_file() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn chatml() -> ChatTemplate {
        ChatTemplate::from_source(CHATML.into(), "".into(), "".into(), Path::new("t.jinja"))
            .unwrap()
    }

    fn msgs(v: Value) -> Vec<Value> {
        v.as_array().unwrap().clone()
    }

    #[test]
    fn chatml_renders_with_a_generation_prompt() {
        let m = msgs(json!([{"role": "user", "content": "hi"}]));
        assert_eq!(
            chatml().render(&m, true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn assistant_turns_and_their_end_markers_are_the_trained_spans() {
        let m = msgs(json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2"},
            {"role": "assistant", "content": "4"},
        ]));
        let spans = chatml().spans(&m).unwrap();
        let expect = [
            ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", false),
            ("hello<|im_end|>\n", true),
            ("<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n", false),
            ("4<|im_end|>\n", true),
        ];
        let got: Vec<(&str, bool)> = spans.iter().map(|(s, t)| (s.as_str(), *t)).collect();
        assert_eq!(got, expect);
    }

    /// A template that marks the assistant's text with `{% generation %}` (as templates for
    /// TRL's assistant_only_loss do) trains the marked text, the conversation rendered once, so
    /// a template that rewrites earlier turns (this one drops their thoughts, as Qwen3's does)
    /// trains; without the markers it is refused. Rendering and spans are transformers 5.24's
    /// (`render_jinja_template` with `return_assistant_tokens_mask`), whitespace control on
    /// the tags included.
    #[test]
    fn generation_blocks_mark_what_is_trained() {
        let template = "{%- for m in messages -%}\n{%- if m['role'] == 'assistant' -%}\n<|im_start|>assistant\n{% generation %}{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'].split('</think>')[-1].strip() }}{% endif %}<|im_end|>\n{% endgeneration %}\n{%- else -%}\n<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif -%}\n{%- endfor -%}\n{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}\n";
        let load = |src: &str| {
            ChatTemplate::from_source(src.into(), "".into(), "".into(), Path::new("g.jinja"))
                .unwrap()
        };
        let m = msgs(json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>x</think> hello"},
            {"role": "user", "content": "2+2"},
            {"role": "assistant", "content": "<think>sum</think> 4"},
        ]));
        let t = load(template);
        let expect = [
            ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", false),
            ("hello<|im_end|>\n", true),
            ("<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n", false),
            ("<think>sum</think> 4<|im_end|>\n", true),
        ];
        let spans = t.spans(&m).unwrap();
        let got: Vec<(&str, bool)> = spans.iter().map(|(s, t)| (s.as_str(), *t)).collect();
        assert_eq!(got, expect);
        assert_eq!(
            t.render(&m, false).unwrap(),
            expect.map(|(s, _)| s).concat()
        );
        assert_eq!(
            t.render(&m[..2], true).unwrap(),
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let bare = template
            .replace("{% generation %}", "")
            .replace("{% endgeneration %}", "");
        let e = load(&bare).spans(&m).unwrap_err().to_string();
        assert!(e.contains("cannot be told apart"), "{e}");

        let dashed = template
            .replace("{% generation %}", "{%- generation -%}\n  ")
            .replace("{% endgeneration %}", "{%- endgeneration %}");
        let short = msgs(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]));
        let spans = load(&dashed).spans(&short).unwrap();
        let got: Vec<(&str, bool)> = spans.iter().map(|(s, t)| (s.as_str(), *t)).collect();
        assert_eq!(
            got,
            [
                (
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant",
                    false
                ),
                ("hello<|im_end|>", true)
            ]
        );

        let nested = "{% generation %}{% generation %}{{ messages[0]['content'] }}{% endgeneration %}{% endgeneration %}";
        let e = load(nested).spans(&short).unwrap_err().to_string();
        assert!(e.contains("inside another"), "{e}");
        let unmarked = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if false %}{% generation %}x{% endgeneration %}{% endif %}";
        let e = load(unmarked).spans(&short).unwrap_err().to_string();
        assert!(e.contains("marks none"), "{e}");
        let sneaky = msgs(json!([{"role": "user", "content": "a\u{FDD0}b"}]));
        let e = t.spans(&sneaky).unwrap_err().to_string();
        assert!(e.contains("messages[0]"), "{e}");
        // Tags in comments, raw blocks and strings are text, not markers.
        let text = "{# {% generation %} #}{% raw %}{% generation %}{% endraw %}{{ '{#' }}{% set x = \"%}{% generation %}\" %}";
        assert_eq!(
            generation_as_filter(text).unwrap(),
            (text.to_string(), false)
        );
        let (_, marked) =
            generation_as_filter("{{ '{#' }}{% generation %}x{% endgeneration %}").unwrap();
        assert!(marked, "a {{# in a string opens no comment");
        // A block's `set`s stay in it, as in transformers (which renders this "hi1" too).
        let scoped = load("{% set x = 1 %}{% for m in messages %}{% generation %}{% set x = 2 %}{{ m['content'] }}{% endgeneration %}{% endfor %}{{ x }}");
        assert_eq!(scoped.render(&short[..1], false).unwrap(), "hi1");
        // A loop inside the block may break (transformers renders this "hia").
        let inner = load("{% for m in messages %}{% generation %}{{ m['content'] }}{% for c in ['a', 'b'] %}{% if c == 'b' %}{% break %}{% endif %}{{ c }}{% endfor %}{% endgeneration %}{% endfor %}");
        assert_eq!(inner.render(&short[..1], false).unwrap(), "hia");
        let e = ChatTemplate::from_source(
            "{% for m in messages %}{% generation %}{% continue %}{% endgeneration %}{% endfor %}"
                .into(),
            "".into(),
            "".into(),
            Path::new("c.jinja"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.jinja") && e.contains("continue"), "{e}");
    }

    /// Messages reach the template as transformers' `apply_chat_template` hands them over
    /// (checked there): null fields dropped, reasoning under any of its names also as
    /// `reasoning_content` and `thinking`.
    #[test]
    fn messages_reach_the_template_as_transformers_hands_them_over() {
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{{ m | list | join(',') }}|{{ m.content }}|{{ m.reasoning_content | default('-') }}|{{ m.thinking | default('-') }};{% endfor %}".into(),
            "".into(),
            "".into(),
            Path::new("n.jinja"),
        )
        .unwrap();
        let m = msgs(json!([
            {"role": "assistant", "content": null, "tool_calls": [{"name": "f"}]},
            {"role": "assistant", "content": "a", "reasoning": "r"},
            {"role": "assistant", "content": "b", "thinking": "t", "reasoning_content": "rc"},
        ]));
        assert_eq!(
            t.render(&m, false).unwrap(),
            "role,tool_calls||-|-;thinking,role,content,reasoning,reasoning_content|a|r|r;thinking,role,content,reasoning_content|b|rc|t;"
        );
    }

    /// As transformers reads a model directory: its `chat_template.jinja` wins over the
    /// template in its `tokenizer_config.json` (whose BOS and EOS it renders with); named
    /// templates without a default one render a conversation given tools with `tool_use` and
    /// refuse any other, naming them, when it renders; `load` takes the directory.
    #[test]
    fn a_directorys_chat_template_jinja_wins_over_its_config() {
        let d = tempfile::tempdir().unwrap();
        let m = msgs(json!([{"role": "user", "content": "hi"}]));
        let render = |dir: &Path| {
            let t = ChatTemplate::in_dir(dir).unwrap().expect("a template");
            t.render(&m, true).unwrap()
        };
        assert!(ChatTemplate::in_dir(d.path()).unwrap().is_none());
        let config = json!({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                            "chat_template": "config {{ messages[0]['content'] }}"});
        std::fs::write(d.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        assert_eq!(render(d.path()), "config hi");
        // Named templates take the config's place in transformers, which then has no default.
        let named = d.path().join(NAMED_TEMPLATES_DIR);
        std::fs::create_dir(&named).unwrap();
        std::fs::write(named.join("tool_use.jinja"), "tools {{ tools | length }}").unwrap();
        std::fs::write(named.join("rag.jinja"), "rag").unwrap();
        let t = ChatTemplate::in_dir(d.path())
            .unwrap()
            .expect("named templates");
        assert_eq!(t.source(), None);
        let e = t.render(&m, true).unwrap_err().to_string();
        assert!(
            e.contains("rag, tool_use") && e.contains(TEMPLATE_FILE),
            "{e}"
        );
        let tools = Map::from_iter([("tools".to_string(), json!([{"name": "f"}]))]);
        assert_eq!(t.render_with(&m, &tools, true).unwrap(), "tools 1");
        std::fs::remove_file(named.join("tool_use.jinja")).unwrap();
        // The model's own renders nothing, and says so when asked to; given to a run as its
        // template, it is refused at once.
        let t = ChatTemplate::in_dir(d.path())
            .unwrap()
            .expect("named templates");
        let e = t.render_with(&m, &tools, true).unwrap_err().to_string();
        assert!(e.contains("(rag)"), "{e}");
        let e = ChatTemplate::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("(rag)") && e.contains("--chat-template"), "{e}");
        std::fs::write(named.join("tool_use.jinja"), "tools {{ tools | length }}").unwrap();
        std::fs::write(
            d.path().join(TEMPLATE_FILE),
            "{{ bos_token }}jinja {{ messages[0]['content'] }}{{ eos_token }}",
        )
        .unwrap();
        assert_eq!(render(d.path()), "<s>jinja hi</s>");
        let t = ChatTemplate::load(d.path()).unwrap();
        assert_eq!(t.render(&m, true).unwrap(), "<s>jinja hi</s>");
        assert!(t.source().unwrap().starts_with("{{ bos_token }}jinja"));
        // Given tools, even none, the `tool_use` template renders, as transformers picks it.
        for (tools, want) in [(json!([{"name": "f"}]), "tools 1"), (json!([]), "tools 0")] {
            let vars = Map::from_iter([("tools".to_string(), tools)]);
            assert_eq!(t.render_with(&m, &vars, true).unwrap(), want);
        }
        // A named `default` is transformers 5's default, over chat_template.jinja too.
        std::fs::write(
            named.join("default.jinja"),
            "default {{ messages[0]['content'] }}",
        )
        .unwrap();
        assert_eq!(render(d.path()), "default hi");
        std::fs::remove_file(d.path().join(TEMPLATE_FILE)).unwrap();
        assert_eq!(render(d.path()), "default hi");
        std::fs::remove_file(named.join("default.jinja")).unwrap();
        std::fs::write(
            d.path().join(TEMPLATE_FILE),
            "{{ bos_token }}jinja {{ messages[0]['content'] }}{{ eos_token }}",
        )
        .unwrap();
        std::fs::remove_file(d.path().join("tokenizer_config.json")).unwrap();
        assert_eq!(render(d.path()), "jinja hi");
        let empty = tempfile::tempdir().unwrap();
        let e = ChatTemplate::load(empty.path()).unwrap_err().to_string();
        assert!(e.contains("holds no chat template"), "{e}");
    }

    /// What Python's Jinja prints: a dict or list not passed through `tojson` as Python's
    /// `str` writes it (a tool call's arguments, a content list), and `round` half to even.
    #[test]
    fn values_print_as_python_prints_them() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t.jinja");
        let src =
            "{{ messages[0]['content'] }}|{{ messages[0]['args'] }}|{{ messages[0]['parts'] }}|\
                   {{ 2.5 | round }} {{ 3.5 | round }} {{ 2.675 | round(2) }} {{ 7 | round }} \
                   {{ 2.1 | round(0, 'ceil') }} {{ 2.9 | round(method='floor') }}";
        std::fs::write(&f, src).unwrap();
        let t = ChatTemplate::load(&f).unwrap();
        let m = msgs(json!([{"role": "user", "content": "it's",
            "args": {"city": "Paris", "n": 1.5e-5, "big": 1e16, "ok": true, "x": null,
                     "q": "say \"hi\"\n", "both": "it's \"x\"", "nbsp": "a\u{a0}b"},
            "parts": [{"type": "text", "text": "é"}, 3]}]));
        assert_eq!(
            t.render(&m, false).unwrap(),
            "it's|{'city': 'Paris', 'n': 1.5e-05, 'big': 1e+16, 'ok': True, 'x': None, \
             'q': 'say \"hi\"\\n', 'both': 'it\\'s \"x\"', 'nbsp': 'a\\xa0b'}|\
             [{'type': 'text', 'text': 'é'}, 3]|2.0 4.0 2.67 7 3.0 2.0"
        );
    }

    /// A bare Jinja file renders the model's `bos_token` and `eos_token` (a Mistral template's
    /// `content + eos_token` lost the EOS its replies train on), a tokenizer config its own.
    #[test]
    fn a_bare_template_renders_the_models_special_tokens() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let cfg = json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>"});
        std::fs::write(model.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let tokens = special_tokens_in(&model).unwrap();
        assert_eq!(tokens, ("<s>".to_string(), "</s>".to_string()));
        assert_eq!(special_tokens_in(d.path()).unwrap(), Default::default());
        let src =
            "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}";
        let bare = d.path().join("t.jinja");
        std::fs::write(&bare, src).unwrap();
        let m = msgs(json!([{"role": "user", "content": "hi"}]));
        let t = ChatTemplate::load(&bare).unwrap();
        assert_eq!(t.render(&m, false).unwrap(), "hi");
        let t = t.with_model_tokens(tokens.clone());
        assert_eq!(t.render(&m, false).unwrap(), "<s>hi</s>");
        let own = d.path().join("tokenizer_config.json");
        let cfg = json!({"bos_token": "[B]", "eos_token": "[E]", "chat_template": src});
        std::fs::write(&own, cfg.to_string()).unwrap();
        let t = ChatTemplate::load(&own).unwrap().with_model_tokens(tokens);
        assert_eq!(t.render(&m, false).unwrap(), "[B]hi[E]");
    }

    #[test]
    fn tokenizer_config_gives_template_and_special_tokens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokenizer_config.json");
        let tpl = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% else %}{{ raise_exception('only user and assistant roles') }}{% endif %}{% endfor %}";
        let cfg = json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": tpl}],
        });
        std::fs::write(&p, cfg.to_string()).unwrap();
        let t = ChatTemplate::load(&p).unwrap();
        let m = msgs(json!([
            {"role": "user", "content": "  hi "},
            {"role": "assistant", "content": "yo"},
        ]));
        let spans = t.spans(&m).unwrap();
        assert_eq!(spans[0], ("<s>[INST] hi [/INST]".to_string(), false));
        assert_eq!(spans[1], (" yo</s>".to_string(), true));
        let bad = msgs(json!([{"role": "system", "content": "x"}]));
        let e = t.render(&bad, false).unwrap_err().to_string();
        assert!(e.contains("only user and assistant roles"), "{e}");
        let tools = Map::from_iter([("tools".to_string(), json!([]))]);
        assert_eq!(
            t.render_with(&m, &tools, false).unwrap(),
            "x",
            "the list's tool_use"
        );
        // Without a `default`, transformers renders none unnamed: not the list's first, which
        // is what a conversation without tools used to get.
        let cfg = json!({
            "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "rag", "template": tpl}],
        });
        std::fs::write(&p, cfg.to_string()).unwrap();
        let t = ChatTemplate::load(&p).unwrap();
        let e = t.render(&m, false).unwrap_err().to_string();
        assert!(
            e.contains("named templates (tool_use, rag) but no `default`"),
            "{e}"
        );
        assert_eq!(
            t.render_with(&m, &tools, false).unwrap(),
            "x",
            "tools still render"
        );
    }

    #[test]
    fn config_without_a_template_names_the_field() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokenizer_config.json");
        std::fs::write(&p, r#"{"eos_token": "</s>"}"#).unwrap();
        let e = ChatTemplate::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("chat_template"),
            "{e}"
        );
    }

    #[test]
    fn a_template_that_rewrites_history_is_refused() {
        // Drops every assistant turn but the last, as some reasoning templates do.
        let src = "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::from_source(src.into(), "".into(), "".into(), Path::new("r.jinja"))
            .unwrap();
        let m = msgs(json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]));
        let e = t.spans(&m).unwrap_err().to_string();
        assert!(
            e.contains("r.jinja") && e.contains("cannot be told apart"),
            "{e}"
        );
    }

    #[test]
    fn a_template_that_does_not_parse_names_the_file() {
        let e = ChatTemplate::from_source(
            "{% for %}".into(),
            "".into(),
            "".into(),
            Path::new("x.jinja"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.jinja") && e.contains("does not parse"), "{e}");
    }

    /// Keyword variables reach the template (a reasoning model's switch, here as Qwen3
    /// spells it), may replace the special tokens, and cannot replace the conversation.
    #[test]
    fn keyword_variables_reach_the_template() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<assistant><think></think>{{ m['content'] }}{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}";
        let t = || {
            ChatTemplate::from_source(src.into(), "<s>".into(), "".into(), Path::new("t.jinja"))
                .unwrap()
        };
        let m = msgs(json!([{"role": "user", "content": "hi"}]));
        assert_eq!(t().render(&m, true).unwrap(), "<s><user>hi<assistant>");
        let off = parse_kwargs(r#"{"enable_thinking": false, "bos_token": "[B]"}"#).unwrap();
        let quiet = t().with_kwargs(&off).unwrap();
        assert_eq!(
            quiet.render(&m, true).unwrap(),
            "[B]<user>hi<assistant><think></think>"
        );
        // The empty thought is the generation prompt's with thinking off, so it carries no loss;
        // with thinking on the model writes it, so it does.
        let chat = msgs(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ]));
        let span = |t: &ChatTemplate| t.spans(&chat).unwrap();
        let trained = |s: &str| (s.to_string(), true);
        assert_eq!(span(&quiet)[1], trained("yo"));
        assert_eq!(span(&t())[1], trained("<think></think>yo"));
        for (bad, why) in [
            (r#"{"messages": []}"#, "set by temper"),
            (r#"{"x": null}"#, "null"),
            (r#"{"x": {"y": [1, null]}}"#, "TOML"),
            (r#"{"x": 18446744073709551615}"#, "TOML"),
            (r#"[1]"#, "JSON object"),
            (r#"{"x": "#, "not JSON"),
        ] {
            let e = parse_kwargs(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // What TOML holds passes: nested tables, arrays of mixed types.
        parse_kwargs(r#"{"tools": [{"name": "add", "args": [1, "a", true]}], "n": -3}"#).unwrap();
    }
}
