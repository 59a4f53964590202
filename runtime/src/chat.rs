//! Chat templates: the model's own Jinja template (or a built-in one for files that
//! carry none), rendered with minijinja.
use llama_models::gguf::MetaValue;
use llama_models::{Family, Model, ModelSource};

mod builtin;
pub use builtin::END_OF_TURN;
use serde::Serialize;

use crate::error::{Result, RuntimeError};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model's chat template and where it came from.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// Where the template was found, for error messages (`tokenizer_config.json`, ...).
    pub source: String,
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
}

fn special_token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        // `{"content": "<s>", ...}` in older tokenizer configs.
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

/// A tokenizer_config.json, or null where there is none.
fn tokenizer_config(path: &std::path::Path) -> Result<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| RuntimeError::Template {
            source_name: path.display().to_string(),
            message: e.to_string(),
        }),
        Err(_) => Ok(serde_json::Value::Null),
    }
}

/// The text of a model's beginning- and end-of-sequence tokens, as templates read
/// them (`bos_token`, `eos_token`).
fn special_tokens(source: &ModelSource) -> Result<(String, String)> {
    match source {
        ModelSource::HfDir(dir) => {
            let config = tokenizer_config(&dir.join("tokenizer_config.json"))?;
            Ok((
                special_token_text(config.get("bos_token")),
                special_token_text(config.get("eos_token")),
            ))
        }
        ModelSource::Gguf(file) => {
            let token = |k: &str| {
                let id = file.get(k).and_then(MetaValue::as_u64)?;
                let tokens = file
                    .get("tokenizer.ggml.tokens")
                    .and_then(MetaValue::as_strings)?;
                tokens.get(id as usize).map(str::to_string)
            };
            Ok((
                token("tokenizer.ggml.bos_token_id").unwrap_or_default(),
                token("tokenizer.ggml.eos_token_id").unwrap_or_default(),
            ))
        }
    }
}

impl ChatTemplate {
    /// The model's template, looked up as HF does: `chat_template.jinja`, then
    /// `tokenizer_config.json`; in a GGUF file, `tokenizer.chat_template`.
    pub fn for_model(model: &Model) -> Result<Option<ChatTemplate>> {
        Self::for_source(&model.source)
    }

    /// As [`ChatTemplate::for_model`], from an opened model source.
    pub fn for_source(source: &ModelSource) -> Result<Option<ChatTemplate>> {
        let (bos_token, eos_token) = special_tokens(source)?;
        let (source_name, template) = match source {
            ModelSource::HfDir(dir) => {
                let jinja = dir.join("chat_template.jinja");
                if let Ok(template) = std::fs::read_to_string(&jinja) {
                    (jinja.display().to_string(), Some(template))
                } else {
                    let config_path = dir.join("tokenizer_config.json");
                    let template = match tokenizer_config(&config_path)?.get("chat_template") {
                        Some(serde_json::Value::String(t)) => Some(t.clone()),
                        // A list of named templates: take `default`.
                        Some(serde_json::Value::Array(list)) => list
                            .iter()
                            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                            .and_then(|t| t.get("template"))
                            .and_then(|t| t.as_str())
                            .map(str::to_string),
                        _ => None,
                    };
                    (config_path.display().to_string(), template)
                }
            }
            ModelSource::Gguf(file) => (
                format!("{} (tokenizer.chat_template)", file.path.display()),
                file.get("tokenizer.chat_template")
                    .and_then(MetaValue::as_str)
                    .map(str::to_string),
            ),
        };
        Ok(template.map(|template| ChatTemplate {
            source: source_name,
            template,
            bos_token,
            eos_token,
        }))
    }

    /// The template `--chat-template` names: a built-in name (`chatml`, `gemma`,
    /// `llama3`, `phi3`) or a Jinja file, with the special tokens of `source`.
    pub fn given(choice: &str, source: &ModelSource) -> Result<ChatTemplate> {
        let (bos_token, eos_token) = special_tokens(source)?;
        if let Some(template) = builtin::builtin(choice) {
            return Ok(ChatTemplate {
                source: format!("the built-in `{choice}` template"),
                template: template.to_string(),
                bos_token,
                eos_token,
            });
        }
        let template = std::fs::read_to_string(choice).map_err(|e| {
            let names: Vec<&str> = builtin::BUILTIN.iter().map(|(n, _)| *n).collect();
            RuntimeError::Options(format!(
                "--chat-template {choice}: not a built-in template ({}) and not a readable file: {e}",
                names.join(", ")
            ))
        })?;
        Ok(ChatTemplate {
            source: choice.to_string(),
            template,
            bos_token,
            eos_token,
        })
    }

    /// The built-in template for a family whose file has none (`has_token` tells
    /// whether the vocabulary holds a token), and its name.
    pub fn fallback(
        family: Family,
        source: &ModelSource,
        has_token: impl Fn(&str) -> bool,
    ) -> Result<(ChatTemplate, &'static str)> {
        let name = builtin::for_family(family, has_token);
        Ok((Self::given(name, source)?, name))
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, None::<&()>, add_generation_prompt)
    }

    /// Renders messages of any shape the template reads (tool calls, tool results) and,
    /// with `tools`, the function definitions as OpenAI's `tools` lists them, which
    /// templates with a tools section (Qwen2.5) describe to the model. Maps keep their
    /// order, so a template prints them as transformers does.
    pub fn render_with<M: Serialize + ?Sized, T: Serialize + ?Sized>(
        &self,
        messages: &M,
        tools: Option<&T>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let failed = |message: String| RuntimeError::Template {
            source_name: self.source.clone(),
            message,
        };
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.template.hash(&mut h);
            h.finish()
        };
        if RAN_AWAY.lock().is_ok_and(|set| set.contains(&key)) {
            return Err(failed(format!(
                "the template ran past {TEMPLATE_TIME:?} before and is not rendered again"
            )));
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let job = Render {
            stop: stop.clone(),
            template: self.template.clone(),
            messages: minijinja::Value::from_serialize(messages),
            tools: tools.map(minijinja::Value::from_serialize),
            add_generation_prompt,
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
        };
        // On a thread of its own, with a deadline: fuel bounds the template's
        // instructions, but some single instructions of minijinja's walk a lazy
        // sequence for ever without spending any (a `for` over `[] * 10**12`). Such a
        // render ends in an error here, and the template is refused from then on. At
        // the deadline the render is told to stop (its next write or printed value
        // fails) and given a moment to; a spin inside one instruction cannot be
        // stopped and is left to run on, which is why the template is not given
        // another thread.
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(8 << 20)
            .spawn(move || {
                let _ = tx.send(job.run());
            })
            .map_err(|e| failed(format!("cannot start the render: {e}")))?;
        match rx.recv_timeout(TEMPLATE_TIME) {
            Ok(rendered) => {
                // The thread has sent its result and is ending: wait for it, so that
                // what it holds (minijinja's thread-local buffers) is freed before
                // the render returns rather than at some later moment.
                let _ = thread.join();
                rendered.map_err(failed)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(mut set) = RAN_AWAY.lock() {
                    set.insert(key);
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                if rx.recv_timeout(TEMPLATE_GRACE).is_ok() {
                    let _ = thread.join();
                }
                Err(failed(format!("the template ran past {TEMPLATE_TIME:?}")))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                Err(failed("the template engine stopped".into()))
            }
        }
    }
}

/// Templates (by hash) whose render ran past [`TEMPLATE_TIME`].
static RAN_AWAY: std::sync::Mutex<std::collections::BTreeSet<u64>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Time a render may take: a chat template renders in milliseconds.
const TEMPLATE_TIME: std::time::Duration = std::time::Duration::from_secs(5);
/// What a render told to stop at its deadline ends with.
const STOPPED: &str = "stopped at the render's deadline";
/// Time a render told to stop at its deadline is waited for.
const TEMPLATE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Everything one render needs, owned, for its thread.
struct Render {
    /// Set at the deadline: the render's next write or printed value fails.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    template: String,
    messages: minijinja::Value,
    tools: Option<minijinja::Value>,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
}

impl Render {
    fn run(self) -> std::result::Result<String, String> {
        let err = |e: minijinja::Error| match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.to_string(),
        };
        let mut env = minijinja::Environment::new();
        // Templates are written for Python's Jinja: allow `.strip()`, `.items()`, ...
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", python_tojson);
        // Templates come with model files from anywhere: bounded work, depth and output
        // (minijinja has no filesystem or environment access to begin with).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_DEPTH);
        // `[x] * n` is a lazy sequence of n items however large n is, and walking one
        // costs no fuel: printing or listing it would run for hours. Such values are
        // refused before they are walked.
        let stop = self.stop.clone();
        env.set_formatter(move |out, state, value| {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    STOPPED,
                ));
            }
            walkable(value)?;
            minijinja::escape_formatter(out, state, value)
        });
        env.add_filter(
            "list",
            |state: &minijinja::State, value: minijinja::Value| {
                walkable(&value)?;
                minijinja::filters::list(state, value)
            },
        );
        env.add_filter(
            "string",
            |state: &minijinja::State, value: &minijinja::Value| {
                walkable(value)?;
                minijinja::filters::string(state, value)
            },
        );
        env.add_template("chat", &self.template).map_err(err)?;
        let template = env.get_template("chat").map_err(err)?;
        let mut out = CappedOutput {
            bytes: Vec::new(),
            overflowed: false,
            stop: self.stop.clone(),
        };
        let ctx = minijinja::context! {
            messages => self.messages,
            tools => self.tools,
            add_generation_prompt => self.add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        // minijinja's value arithmetic can overflow on hostile numbers (a panic where
        // overflow checks are on): an untrusted template must end in an error, not a crash.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            template.render_captured_to(ctx, &mut out)
        }))
        .map_err(|_| "the template engine failed on this template's arithmetic".to_string())?;
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(STOPPED.into());
        }
        if out.overflowed {
            return Err(format!(
                "the rendered prompt passes {TEMPLATE_OUTPUT} bytes"
            ));
        }
        rendered.map_err(err)?;
        String::from_utf8(out.bytes).map_err(|e| e.to_string())
    }
}

/// Template instructions a render may run: a conversation of thousands of messages
/// with tools takes well under a million (tested); a template that loops for ever
/// stops here, in a fraction of a second.
const TEMPLATE_FUEL: u64 = 2_000_000;
/// Nested macro calls and includes.
const TEMPLATE_DEPTH: usize = 64;
/// Bytes a rendered prompt may have: far past any context window.
const TEMPLATE_OUTPUT: usize = 16 << 20;

/// Items (of sequences and maps, nested ones included) a value may have to be
/// printed or listed: far past any conversation.
const TEMPLATE_ITEMS: usize = 1 << 20;
/// Nesting a value may have to be printed or listed.
const TEMPLATE_NESTING: usize = 256;

/// Refuses a value of more than [`TEMPLATE_ITEMS`] items or nested deeper than
/// [`TEMPLATE_NESTING`] (see `render_with`). The walk itself visits at most that many.
fn walkable(value: &minijinja::Value) -> std::result::Result<(), minijinja::Error> {
    let mut budget = TEMPLATE_ITEMS;
    if fits(value, &mut budget, 0) {
        Ok(())
    } else {
        Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!(
                "a value of more than {TEMPLATE_ITEMS} items or {TEMPLATE_NESTING} levels is too long to print"
            ),
        ))
    }
}

fn fits(value: &minijinja::Value, budget: &mut usize, depth: usize) -> bool {
    use minijinja::value::ValueKind;
    let kind = value.kind();
    if !matches!(kind, ValueKind::Seq | ValueKind::Map | ValueKind::Iterable) {
        return true;
    }
    // Iterables without a length are printed without being walked.
    let Some(n) = value.len() else {
        return true;
    };
    // An empty sequence may still be a lazy one of 10^12 empty repeats: not walked.
    if n == 0 {
        return true;
    }
    if n > *budget || depth >= TEMPLATE_NESTING {
        return false;
    }
    *budget -= n;
    let Ok(items) = value.try_iter() else {
        return true;
    };
    for item in items {
        let item = if kind == ValueKind::Map {
            value.get_item(&item).unwrap_or_default()
        } else {
            item
        };
        if !fits(&item, budget, depth + 1) {
            return false;
        }
    }
    true
}

/// The render's output, refused past [`TEMPLATE_OUTPUT`] bytes or once the render is
/// told to stop.
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other(STOPPED));
        }
        if self.bytes.len() + buf.len() > TEMPLATE_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("output cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps` with
/// `ensure_ascii=False` (`", "` and `": "` separators, maps in their own order, no
/// HTML escaping; `indent`, `separators` and `sort_keys` as keywords). minijinja's
/// own filter writes compact, HTML-safe JSON: the prompt would differ from the one the
/// model was trained on.
fn python_tojson(
    value: &minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    walkable(value)?;
    let indent: Option<minijinja::Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(" ".repeat(usize::try_from(v)?)),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                "tojson separators must be two strings",
            ))
        }
        // Python drops the item separator's space when it indents.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(minijinja::Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(
        &self,
        v: &minijinja::Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        use minijinja::value::ValueKind;
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match (i64::try_from(v.clone()), f64::try_from(v.clone())) {
                (Ok(i), _) if !v.to_string().contains('.') => out.push_str(&i.to_string()),
                (_, Ok(f)) => out.push_str(&python_float(f)),
                _ => out.push_str(&v.to_string()),
            },
            ValueKind::String => json_string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<minijinja::Value> = v.try_iter()?.collect();
                self.container(&items, '[', ']', level, out, |item, level, out| {
                    self.write(item, level, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<minijinja::Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(&keys, '{', '}', level, out, |k, level, out| {
                    json_string(&k.to_string(), out);
                    out.push_str(&self.key);
                    self.write(&v.get_item(k)?, level, out)
                })?;
            }
            _ => json_string(&v.to_string(), out),
        }
        Ok(())
    }

    fn container<T>(
        &self,
        items: &[T],
        open: char,
        close: char,
        level: usize,
        out: &mut String,
        mut each: impl FnMut(&T, usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item);
            }
            self.newline(level + 1, out);
            each(item, level + 1, out)?;
        }
        self.newline(level, out);
        out.push(close);
        Ok(())
    }
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr`: shortest round-trip digits, `.0` on whole numbers,
/// exponent form below 1e-4 and from 1e16.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Rust writes `1e-5`; Python `1e-05`.
        let s = format!("{f:e}");
        return match s.split_once('e') {
            Some((m, e)) => {
                let (sign, digits) = match e.strip_prefix('-') {
                    Some(d) => ("-", d),
                    None => ("+", e),
                };
                format!("{m}e{sign}{digits:0>2}")
            }
            None => s,
        };
    }
    if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, value: serde_json::Value) -> String {
        let t = ChatTemplate {
            source: "test".into(),
            template: template.into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        t.render_with(&[value], None::<&()>, false).unwrap()
    }

    fn render_err(template: &str) -> String {
        let t = ChatTemplate {
            source: "hostile".into(),
            template: template.into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        t.render(&[Message::new("user", "hi")], true)
            .expect_err(template)
            .to_string()
    }

    /// A render told to stop (what its deadline does) ends at its next write or printed
    /// value, however much work the template has left.
    #[test]
    fn a_render_told_to_stop_ends_at_its_next_write() {
        let long = "{% set s = 'x' * 1000000 %}\
                    {% for i in range(10000) %}{% for j in range(10000) %}\
                    {% set t = s ~ s %}.{% endfor %}{% endfor %}";
        for template in [long, "{{ 1 }}"] {
            let job = Render {
                stop: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
                template: template.into(),
                messages: minijinja::Value::from_serialize(Vec::<Message>::new()),
                tools: None,
                add_generation_prompt: false,
                bos_token: String::new(),
                eos_token: String::new(),
            };
            let e = job.run().expect_err(template);
            assert!(
                e.contains("stopped at the render's deadline"),
                "{template}: {e}"
            );
        }
    }

    /// Hostile templates end with an error: loops that run for ever, recursion without
    /// end, output without end.
    #[test]
    fn hostile_templates_end_with_an_error() {
        let forever =
            "{% for i in range(10000) %}{% for j in range(10000) %}{{ j }}{% endfor %}{% endfor %}";
        assert!(
            render_err(forever).contains("fuel"),
            "{}",
            render_err(forever)
        );
        let recursion = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        let e = render_err(recursion);
        assert!(e.contains("recursion"), "{e}");
        let huge = "{{ 'x' * 20000000 }}";
        let e = render_err(huge);
        assert!(e.contains("passes 16777216 bytes"), "{e}");
        // A sequence repeated 6e12 times is refused, not walked (fuzzing finding 6);
        // so are sequences of many within reach, and deep nesting.
        for long in [
            "{{ 6333333333336 * [2] }}",
            "{{ [[2] * 1000000] * 1000000 }}",
            "{{ {'a': [[2] * 1000000] * 3} }}",
            "{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
            "{{ ([2] * 6333333333336) | list }}",
            "{{ ([2] * 6333333333336) | string }}",
            "{{ ([2] * 6333333333336) | tojson }}",
        ] {
            let e = render_err(long);
            assert!(e.contains("too long to print"), "{long}: {e}");
        }
        // A single instruction that walks 10^12 empty repeats spends no fuel: the
        // render's deadline ends it, and the template is not run again.
        let spin = "{% for x in [] * 1000000000000 %}{% endfor %}";
        let start = std::time::Instant::now();
        let e = render_err(spin);
        assert!(e.contains("ran past 5s"), "{e}");
        assert!(start.elapsed() < TEMPLATE_TIME * 2, "{:?}", start.elapsed());
        let e = render_err(spin);
        assert!(e.contains("not rendered again"), "{e}");
        // An ordinary render is untouched by the bounds.
        let fine = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}";
        let t = ChatTemplate {
            source: "fine".into(),
            template: fine.into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        assert_eq!(
            t.render(&[Message::new("user", "hi")], false).unwrap(),
            "user: hi"
        );
        let short = ChatTemplate {
            template: "{{ [1, 'a'] * 2 }} {{ ([1] * 3) | list | length }}".into(),
            ..t
        };
        assert_eq!(short.render(&[], false).unwrap(), "[1, \"a\", 1, \"a\"] 3");
    }

    /// Outputs of Python's `json.dumps(x, ensure_ascii=False, ...)`.
    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let x = serde_json::json!({"b": [1, 2.5, "q\"é<>\n", null, true], "a": {}, "c": 1e-5});
        let cases = [
            (
                // Python dicts keep insertion order, and so does ours.
                "{{ messages[0] | tojson }}",
                r#"{"b": [1, 2.5, "q\"é<>\n", null, true], "a": {}, "c": 1e-05}"#,
            ),
            (
                "{{ messages[0] | tojson(sort_keys=true) }}",
                r#"{"a": {}, "b": [1, 2.5, "q\"é<>\n", null, true], "c": 1e-05}"#,
            ),
            (
                "{{ messages[0].b | tojson(indent=2) }}",
                "[\n  1,\n  2.5,\n  \"q\\\"é<>\\n\",\n  null,\n  true\n]",
            ),
            (
                "{{ messages[0].a | tojson(indent=4) }}|{{ 3.0 | tojson }}|{{ 7 | tojson }}",
                "{}|3.0|7",
            ),
            (
                "{{ messages[0].b[:2] | tojson(separators=[',', ':']) }}",
                "[1,2.5]",
            ),
        ];
        for (template, want) in cases {
            assert_eq!(render(template, x.clone()), want, "{template}");
        }
    }
}
