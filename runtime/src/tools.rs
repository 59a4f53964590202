//! Tool calls: functions described to the model, calls constrained to their schemas,
//! and the model's call syntax read back as structured calls.
//!
//! A model whose chat template has a tools section and whose vocabulary has a
//! `<tool_call>` token (Qwen2.5, Hermes-style models) gets the functions through its
//! own template and calls them as it was trained to:
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. Under `auto` the
//! text before that token is free and everything after it is constrained (the name
//! to one of the functions, the arguments to that function's parameter schema); under
//! `required` or a named function the whole answer is calls. Any other model gets
//! the generic format: the functions in a system message and an answer constrained
//! to `{"tool_call": {"name": ..., "arguments": ...}}` or `{"response": "..."}`.
//!
//! Messages are taken in OpenAI's shape (`role`, `content`, `tool_calls` with
//! `function.arguments` as JSON text or an object, `tool_call_id`), so the server and
//! the agent runtime render conversations the same way.
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::chat::ChatTemplate;
use crate::constrain::{Constraint, Grammar, Grammars};
use crate::error::{Result, RuntimeError};
use crate::tokenizer::Tokenizer;

mod parse;
pub use parse::{Parsed, ToolDelta, ToolParser};

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object (no parameters when absent).
    #[serde(default = "no_parameters")]
    pub parameters: Value,
}

fn no_parameters() -> Value {
    json!({ "type": "object", "properties": {} })
}

/// Whether and which functions the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call; the functions are not shown.
    None,
    /// Answer or call, as the model decides.
    Auto,
    /// Call at least one function.
    Required,
    /// Call this function.
    Function(String),
}

/// The functions of a request and how they may be called.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    /// Whether one answer may hold several calls.
    pub parallel: bool,
}

impl ToolSpec {
    /// Checks names (OpenAI's rule: 1 to 64 of `a-z A-Z 0-9 _ -`, no duplicates),
    /// parameter schemas (objects) and the named choice.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(RuntimeError::Tools(m));
        let mut seen = std::collections::HashSet::new();
        for (i, f) in self.functions.iter().enumerate() {
            let ok = (1..=64).contains(&f.name.len())
                && f.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return bad(format!(
                    "tools[{i}]: the name `{}` must be 1 to 64 letters, digits, `_` or `-`",
                    f.name
                ));
            }
            if !seen.insert(f.name.as_str()) {
                return bad(format!("tools[{i}]: the name `{}` is used twice", f.name));
            }
            if !f.parameters.is_object() {
                return bad(format!(
                    "tools[{i}]: the parameters of `{}` must be a JSON schema object",
                    f.name
                ));
            }
        }
        if let ToolChoice::Function(name) = &self.choice {
            if !self.functions.iter().any(|f| &f.name == name) {
                return bad(format!(
                    "tool_choice names `{name}`, which is not among the tools ({})",
                    self.names().join(", ")
                ));
            }
        }
        if self.functions.is_empty() && matches!(self.choice, ToolChoice::Required) {
            return bad("tool_choice is `required` but there are no tools".into());
        }
        Ok(())
    }

    fn names(&self) -> Vec<&str> {
        self.functions.iter().map(|f| f.name.as_str()).collect()
    }

    /// Whether the answer may hold calls.
    pub fn active(&self) -> bool {
        !self.functions.is_empty() && self.choice != ToolChoice::None
    }

    /// The functions the answer may call.
    fn callable(&self) -> Vec<&Function> {
        match &self.choice {
            ToolChoice::Function(name) => {
                self.functions.iter().filter(|f| &f.name == name).collect()
            }
            _ => self.functions.iter().collect(),
        }
    }

    /// The functions as OpenAI lists them (`{"type": "function", "function": ...}`),
    /// which is what tool-aware templates read.
    pub fn openai_tools(&self) -> Vec<Value> {
        self.functions
            .iter()
            .map(|f| json!({ "type": "function", "function": f }))
            .collect()
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// `call_` and random characters, unique within a conversation.
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A fresh call id.
pub fn call_id() -> String {
    let a = crate::sampler::random_seed();
    let b = crate::sampler::random_seed();
    format!("call_{a:016x}{:08x}", b as u32)
}

/// How a model is told about functions and how it calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// The template's own tools section; calls in `<tool_call>` tags, `open` being
    /// that tag's token.
    Hermes { open: u32 },
    /// Functions in a system message; the answer is one JSON object.
    Generic,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// JSON as models write it (and as the template shows the functions).
fn json_options() -> Value {
    json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " })
}

fn with_options(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut() {
        o.entry("x-guidance").or_insert(json_options());
    }
    s
}

/// A Lark string literal of `text`.
fn lark_str(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

impl ToolFormat {
    /// The format `template` and `tokenizer` support: Hermes-style tags when the
    /// template has a tools section that speaks of `<tool_call>` and the tag is one
    /// token that decodes as itself.
    pub fn detect(template: &ChatTemplate, tokenizer: &Tokenizer) -> ToolFormat {
        let speaks_tags = template.template.contains(OPEN) && template.template.contains("tools");
        if speaks_tags {
            if let Ok(ids) = tokenizer.encode_plain(OPEN) {
                if let [id] = ids[..] {
                    if tokenizer.decode(&[id]).is_ok_and(|t| t == OPEN) {
                        return ToolFormat::Hermes { open: id };
                    }
                }
            }
        }
        ToolFormat::Generic
    }

    /// The prompt for `messages` (OpenAI's shape) with `spec`'s functions described,
    /// ending where the assistant's answer begins.
    pub fn prompt(
        &self,
        template: &ChatTemplate,
        messages: &[Value],
        spec: Option<&ToolSpec>,
    ) -> Result<String> {
        let mut messages = normalize(messages)?;
        match self {
            // Under `none` the functions are not described: the template still renders
            // the calls and results of the history, and a small model shown tools
            // it may not call writes a call as text instead of answering (measured
            // with Qwen2.5 0.5B). The constraint keeps the answer free of calls.
            ToolFormat::Hermes { .. } => {
                let tools = spec.filter(|s| s.active()).map(ToolSpec::openai_tools);
                template.render_with(&messages, tools.as_ref(), true)
            }
            ToolFormat::Generic => {
                generic_messages(&mut messages, spec.filter(|s| s.active()));
                template.render_with(&messages, None::<&()>, true)
            }
        }
    }

    /// The grammar an answer must follow, and whether it holds only after the
    /// opening tag (free text before it). `None`: no constraint.
    pub fn grammar(&self, spec: &ToolSpec) -> Result<Option<(Grammar, bool)>> {
        spec.check()?;
        if spec.functions.is_empty() {
            return Ok(None);
        }
        if spec.choice == ToolChoice::None {
            return Ok(match self {
                // Text that does not open a call, tagged, bare or in a code fence.
                ToolFormat::Hermes { .. } => {
                    Some((Grammar::Regex(r"\s*[^{<`\s][\s\S]*".into()), false))
                }
                ToolFormat::Generic => None,
            });
        }
        let callable = spec.callable();
        match self {
            ToolFormat::Hermes { .. } => {
                let mut g = String::new();
                let lazy = spec.choice == ToolChoice::Auto;
                let block = format!(
                    "{} call {}",
                    lark_str("\n"),
                    lark_str(&format!("\n{CLOSE}"))
                );
                let more = if spec.parallel { " more*" } else { "" };
                if lazy {
                    g.push_str(&format!("start: {block}{more}\n"));
                } else {
                    g.push_str(&format!("start: {} {block}{more}\n", lark_str(OPEN)));
                }
                g.push_str(&format!(
                    "more: {} {block}\n",
                    lark_str(&format!("\n{OPEN}"))
                ));
                call_rules(&mut g, &callable);
                Ok(Some((Grammar::Lark(g), lazy)))
            }
            ToolFormat::Generic => {
                let mut g = String::new();
                let call = if spec.parallel {
                    format!(
                        "{} call (\", \" call)* \"]}}\"",
                        lark_str("{\"tool_calls\": [")
                    )
                } else {
                    format!("{} call \"}}\"", lark_str("{\"tool_call\": "))
                };
                if spec.choice == ToolChoice::Auto {
                    let response = json!({ "type": "string", "x-guidance": json_options() });
                    g.push_str(&format!(
                        "start: calls | {} %json {response} \"}}\"\ncalls: {call}\n",
                        lark_str("{\"response\": ")
                    ));
                } else {
                    g.push_str(&format!("start: {call}\n"));
                }
                call_rules(&mut g, &callable);
                Ok(Some((Grammar::Lark(g), false)))
            }
        }
    }

    /// The compiled constraint for an answer under `spec`, if any.
    pub fn constraint(&self, grammars: &Grammars, spec: &ToolSpec) -> Result<Option<Constraint>> {
        let Some((grammar, lazy)) = self.grammar(spec)? else {
            return Ok(None);
        };
        // Each schema on its own first, so that an error names its function.
        if spec.active() {
            for (i, f) in spec.functions.iter().enumerate() {
                grammars
                    .compile(&Grammar::JsonSchema(f.parameters.clone()))
                    .map_err(|e| {
                        RuntimeError::Tools(format!(
                            "tools[{i}] (`{}`): its parameters cannot be enforced: {e}",
                            f.name
                        ))
                    })?;
            }
        }
        let compile = |g: &Grammar| {
            grammars
                .compile(g)
                .map_err(|e| RuntimeError::Tools(format!("the parameter schemas: {e}")))
        };
        let constraint = compile(&grammar)?;
        Ok(Some(match (self, lazy) {
            (ToolFormat::Hermes { open }, true) => {
                // A call written as bare JSON, without its tag, is a call too.
                let mut bare = String::from("start: call\n");
                call_rules(&mut bare, &spec.callable());
                let bare = compile(&Grammar::Lark(bare))?;
                grammars.lazy_or_bare(constraint.after_token(*open), bare)
            }
            _ => constraint,
        }))
    }

    /// Reads a whole answer: its text and its calls.
    pub fn parse(&self, text: &str) -> Parsed {
        let mut p = ToolParser::new(*self);
        let mut deltas = p.push(text);
        deltas.extend(p.finish());
        Parsed::from_deltas(deltas)
    }
}

/// `call: c0 | c1 ...` and one rule per function: the name fixed, the arguments
/// under the function's schema.
fn call_rules(g: &mut String, callable: &[&Function]) {
    let alts: Vec<String> = (0..callable.len()).map(|i| format!("c{i}")).collect();
    g.push_str(&format!("call: {}\n", alts.join(" | ")));
    for (i, f) in callable.iter().enumerate() {
        let head = format!("{{\"name\": {}, \"arguments\": ", lark_str(&f.name));
        g.push_str(&format!(
            "c{i}: {} %json {} \"}}\"\n",
            lark_str(&head),
            with_options(&f.parameters)
        ));
    }
}

/// Messages as templates read them: `tool_calls[].function.arguments` as an object
/// (templates print it with `tojson`), content as text.
fn normalize(messages: &[Value]) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(RuntimeError::Tools(format!(
                "messages[{i}] is not an object"
            )));
        };
        let mut obj = obj.clone();
        if obj.get("content").is_none_or(Value::is_null) {
            obj.insert("content".into(), Value::String(String::new()));
        }
        if let Some(calls) = obj.get_mut("tool_calls").and_then(Value::as_array_mut) {
            for (j, call) in calls.iter_mut().enumerate() {
                let f = call
                    .get_mut("function")
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| {
                        RuntimeError::Tools(format!(
                            "messages[{i}].tool_calls[{j}] has no `function` object"
                        ))
                    })?;
                if let Some(Value::String(text)) = f.get("arguments") {
                    let args: Value = serde_json::from_str(text).map_err(|e| {
                        RuntimeError::Tools(format!(
                            "messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}"
                        ))
                    })?;
                    f.insert("arguments".into(), args);
                }
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

/// The generic format's conversation: the functions in the system message, past
/// calls as the JSON the model writes, tool results as user messages.
fn generic_messages(messages: &mut Vec<Value>, spec: Option<&ToolSpec>) {
    let mut names: Map<String, Value> = Map::new();
    for m in messages.iter_mut() {
        let role = m["role"].as_str().unwrap_or("").to_string();
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array).cloned() {
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    if let (Some(id), Some(name)) = (c["id"].as_str(), c["function"]["name"].as_str()) {
                        names.insert(id.to_string(), json!(name));
                    }
                    json!({ "name": c["function"]["name"], "arguments": c["function"]["arguments"] })
                })
                .collect();
            let content = if calls.len() == 1 {
                json!({ "tool_call": calls[0] })
            } else {
                json!({ "tool_calls": calls })
            };
            *m = json!({ "role": "assistant", "content": content.to_string() });
        } else if role == "tool" {
            let id = m["tool_call_id"].as_str().unwrap_or("");
            let name = m
                .get("name")
                .cloned()
                .or_else(|| names.get(id).cloned())
                .unwrap_or(Value::Null);
            let result = json!({ "tool_response": { "name": name, "content": m["content"] } });
            *m = json!({ "role": "user", "content": result.to_string() });
        }
    }
    let Some(spec) = spec else { return };
    let lines: Vec<String> = spec.openai_tools().iter().map(Value::to_string).collect();
    let shape = if spec.parallel {
        "{\"tool_calls\": [{\"name\": <function-name>, \"arguments\": <args-json-object>}, ...]}"
    } else {
        "{\"tool_call\": {\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    };
    let mut text = format!(
        "You can call these functions:\n{}\n\nTo call a function, answer with JSON only: {shape}",
        lines.join("\n")
    );
    if spec.choice == ToolChoice::Auto {
        text.push_str(". To answer directly, answer {\"response\": <your answer>}.");
    }
    match messages.first_mut() {
        Some(first) if first["role"] == "system" => {
            let old = first["content"].as_str().unwrap_or("").to_string();
            first["content"] = json!(format!("{old}\n\n{text}"));
        }
        _ => messages.insert(0, json!({ "role": "system", "content": text })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hermes() -> ToolFormat {
        ToolFormat::Hermes { open: 1 }
    }

    #[test]
    fn a_streamed_call_reads_as_the_whole_one() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris }\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        let whole = hermes().parse(text);
        assert_eq!(whole.content, "Let me look.");
        assert_eq!(whole.calls.len(), 2);
        assert_eq!(whole.calls[0].name, "get_weather");
        assert_eq!(
            whole.calls[0].arguments,
            "{\"city\": \"Paris }\", \"days\": [1, 2]}"
        );
        assert_eq!(whole.calls[1].arguments, "{}");
        // One character at a time: the same calls, the name announced once.
        let mut p = ToolParser::new(hermes());
        let mut deltas = Vec::new();
        for c in text.chars() {
            deltas.extend(p.push(&c.to_string()));
        }
        deltas.extend(p.finish());
        let starts = deltas
            .iter()
            .filter(|d| matches!(d, ToolDelta::Start { .. }))
            .count();
        assert_eq!(starts, 2);
        let streamed = Parsed::from_deltas(deltas);
        assert_eq!(streamed.content, whole.content);
        let args: Vec<_> = streamed.calls.iter().map(|c| &c.arguments).collect();
        assert_eq!(
            args,
            whole.calls.iter().map(|c| &c.arguments).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_call_without_its_tag_is_a_call() {
        let p = hermes().parse("\n{\"name\": \"f\", \"arguments\": {\"x\": \"}\"}}");
        assert_eq!(p.content, "");
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].arguments, "{\"x\": \"}\"}");
        // Not at the start: text.
        let p = hermes().parse("Answer: {\"name\": \"f\", \"arguments\": {}}");
        assert!(p.calls.is_empty());
    }

    #[test]
    fn text_that_only_looks_like_a_tag_is_text() {
        let p = hermes().parse("a <tool_ b <tool_cal");
        assert_eq!(p.content, "a <tool_ b <tool_cal");
        assert!(p.calls.is_empty());
    }

    #[test]
    fn generic_answers_read_as_calls_or_text() {
        let p = ToolFormat::Generic
            .parse("{\"tool_call\": {\"name\": \"f\", \"arguments\": {\"x\": 1}}}");
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].arguments, "{\"x\":1}");
        let p = ToolFormat::Generic.parse("{\"response\": \"hi\"}");
        assert_eq!((p.content.as_str(), p.calls.len()), ("hi", 0));
    }

    #[test]
    fn bad_specs_are_refused_by_name() {
        let f = |name: &str| Function {
            name: name.into(),
            description: None,
            parameters: no_parameters(),
        };
        let spec = ToolSpec {
            functions: vec![f("a b")],
            choice: ToolChoice::Auto,
            parallel: true,
        };
        assert!(spec.check().unwrap_err().to_string().contains("`a b`"));
        let spec = ToolSpec {
            functions: vec![f("a")],
            choice: ToolChoice::Function("zzz".into()),
            parallel: true,
        };
        assert!(spec.check().unwrap_err().to_string().contains("zzz"));
    }
}
