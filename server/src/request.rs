//! Request bodies, read leniently as OpenAI's own server does: unknown fields are
//! ignored, a field of the wrong type is named in the error, and an option this
//! server cannot honour is refused by name rather than ignored.
use std::collections::BTreeMap;

use llama_runtime::{random_seed, Function, Grammar, SamplerConfig, ToolChoice, ToolSpec};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// Reads `T` out of the body's JSON object; a field of the wrong type is named.
pub fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::new(axum::http::StatusCode::BAD_REQUEST, inner.to_string())
        } else {
            ApiError::field(&path, format!("{path}: {inner}"))
        }
    })
}

/// The body as a JSON object.
pub fn json_object(bytes: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    Ok(value)
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both generating routes share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// llama.cpp's extension: generate through end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// The most choices one request may ask for.
pub const MAX_N: i64 = 16;
/// The most stop strings.
pub const MAX_STOP: usize = 16;
/// The most alternatives per token.
pub const MAX_TOP_LOGPROBS: i64 = 20;

impl Common {
    /// Choices per prompt.
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_N).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::field(
                "n",
                format!("n is {n}; it must be from 1 to {MAX_N}"),
            )),
        }
    }

    /// The token limit asked for (`max_completion_tokens` wins), if any.
    pub fn max_tokens(&self) -> Result<Option<usize>, ApiError> {
        let (name, v) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", v),
            (None, Some(v)) => ("max_tokens", v),
            (None, None) => return Ok(None),
        };
        if v < 1 {
            return Err(ApiError::field(
                name,
                format!("{name} is {v}; it must be at least 1"),
            ));
        }
        Ok(Some(v as usize))
    }

    pub fn stop(&mut self) -> Result<Vec<String>, ApiError> {
        let stop = self.stop.take().map(Stop::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP {
            return Err(ApiError::field(
                "stop",
                format!("{} stop strings; at most {MAX_STOP}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::field("stop", "a stop string is empty"));
        }
        Ok(stop)
    }

    /// The sampler: fields the request sets over llama.cpp's defaults (temperature
    /// 0.8, top-k 40, top-p 0.95, min-p 0.05), seeded by `seed` or at random.
    pub fn sampler(&self, vocab: usize) -> Result<SamplerConfig, ApiError> {
        let base = SamplerConfig::chat();
        let finite = |name: &str, v: Option<f32>| -> Result<Option<f32>, ApiError> {
            match v {
                Some(x) if !x.is_finite() => Err(ApiError::field(
                    name,
                    format!("{name} must be a finite number"),
                )),
                other => Ok(other),
            }
        };
        let temperature = finite("temperature", self.temperature)?.unwrap_or(base.temperature);
        if temperature < 0.0 {
            return Err(ApiError::field(
                "temperature",
                format!("temperature is {temperature}; it must be 0 or more"),
            ));
        }
        let top_p = match finite("top_p", self.top_p)? {
            Some(p) if !(p > 0.0 && p <= 1.0) => {
                return Err(ApiError::field(
                    "top_p",
                    format!("top_p is {p}; it must be in (0, 1]"),
                ))
            }
            Some(p) => Some(p),
            None => base.top_p,
        };
        let min_p = match finite("min_p", self.min_p)? {
            Some(p) if !(0.0..=1.0).contains(&p) => {
                return Err(ApiError::field(
                    "min_p",
                    format!("min_p is {p}; it must be in [0, 1]"),
                ))
            }
            Some(p) => Some(p),
            None => base.min_p,
        };
        // As llama.cpp: top_k 0 (or less) turns it off.
        let top_k = match self.top_k {
            Some(k) if k <= 0 => None,
            Some(k) => Some(k as usize),
            None => base.top_k,
        };
        let repeat_penalty = match finite("repeat_penalty", self.repeat_penalty)? {
            Some(p) if p <= 0.0 => {
                return Err(ApiError::field(
                    "repeat_penalty",
                    format!("repeat_penalty is {p}; it must be more than 0"),
                ))
            }
            Some(p) => p,
            None => base.repeat_penalty,
        };
        let repeat_last_n = match self.repeat_last_n {
            Some(n) if n < 0 => {
                return Err(ApiError::field(
                    "repeat_last_n",
                    "repeat_last_n must be 0 or more",
                ))
            }
            Some(n) => n as usize,
            None => base.repeat_last_n,
        };
        let mut logit_bias = Vec::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let param = format!("logit_bias.{key}");
            let id: u32 = key
                .trim()
                .parse()
                .map_err(|_| ApiError::field(&param, format!("`{key}` is not a token id")))?;
            if id as usize >= vocab {
                return Err(ApiError::field(
                    &param,
                    format!("token id {id} is outside the vocabulary of {vocab}"),
                ));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::field(
                    &param,
                    format!("bias {bias} must be from -100 to 100"),
                ));
            }
            // OpenAI: -100 bans the token, 100 forces it.
            let bias = if bias <= -100.0 {
                f32::NEG_INFINITY
            } else {
                bias
            };
            logit_bias.push((id, bias));
        }
        Ok(SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n,
            presence_penalty: finite("presence_penalty", self.presence_penalty)?.unwrap_or(0.0),
            frequency_penalty: finite("frequency_penalty", self.frequency_penalty)?.unwrap_or(0.0),
            logit_bias,
            // A negative seed (OpenAI's are int64) keeps its bits.
            seed: self.seed.map_or_else(random_seed, |s| s as u64),
        })
    }

    /// Refuses `stream_options` without `stream`, as OpenAI does.
    pub fn check_stream_options(&self) -> Result<(), ApiError> {
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::field(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        Ok(())
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// Fields whose features come with other work: refused by name while they would
/// change the answer, accepted where they ask for what happens anyway. Tools belong
/// to chat; `/v1/completions` refuses them.
pub fn refuse_unsupported(body: &Value, chat: bool) -> Result<(), ApiError> {
    let set = |k: &str| body.get(k).is_some_and(|v| !v.is_null());
    if !chat {
        for k in ["tools", "tool_choice", "parallel_tool_calls"] {
            if set(k) {
                return Err(ApiError::unsupported(
                    k,
                    &format!("`{k}` in completions (use chat completions)"),
                ));
            }
        }
    }
    for k in [
        "functions",
        "function_call",
        "suffix",
        "audio",
        "prediction",
    ] {
        if set(k) {
            return Err(ApiError::unsupported(k, &format!("`{k}`")));
        }
    }
    if let Some(m) = body.get("modalities").and_then(Value::as_array) {
        if m.iter().any(|x| x.as_str() != Some("text")) {
            return Err(ApiError::unsupported(
                "modalities",
                "output other than text",
            ));
        }
    }
    if let Some(b) = body.get("best_of").and_then(Value::as_i64) {
        if b > 1 {
            return Err(ApiError::unsupported("best_of", "best_of over 1"));
        }
    }
    Ok(())
}

/// A chat message's content: text, or a list of parts of which only text parts are
/// understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// An assistant message's `tool_calls`, checked: each a function call with a name
/// and arguments (JSON text, as OpenAI sends them, or an object).
fn tool_calls(calls: &Value, i: usize) -> Result<Value, ApiError> {
    let Some(list) = calls.as_array() else {
        return Err(ApiError::field(
            &format!("messages[{i}].tool_calls"),
            "tool_calls must be a list",
        ));
    };
    for (j, c) in list.iter().enumerate() {
        let param = format!("messages[{i}].tool_calls[{j}]");
        let f = c.get("function");
        let name_ok = f.and_then(|f| f.get("name")).is_some_and(Value::is_string);
        let args = f.and_then(|f| f.get("arguments"));
        let args_ok = match args {
            Some(Value::String(t)) => serde_json::from_str::<Value>(t).is_ok(),
            Some(Value::Object(_)) => true,
            _ => false,
        };
        if !name_ok || !args_ok {
            return Err(ApiError::field(
                &param,
                format!(
                    "{param} needs function.name and function.arguments (a JSON object, as text)"
                ),
            ));
        }
    }
    Ok(calls.clone())
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of a chat request; `None` when
/// there are no tools.
pub fn tool_spec(body: &Value) -> Result<Option<ToolSpec>, ApiError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(ApiError::field("tools", "tools must be a list")),
    };
    let mut functions = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            other => {
                return Err(ApiError::unsupported(
                    &format!("tools[{i}].type"),
                    &format!(
                        "tools of type {}",
                        other.map_or("(none)".into(), |k| format!("`{k}`"))
                    ),
                ))
            }
        }
        let f: Function = t
            .get("function")
            .cloned()
            .ok_or_else(|| {
                ApiError::field(
                    &format!("tools[{i}].function"),
                    format!("tools[{i}] has no function"),
                )
            })
            .and_then(|f| {
                serde_json::from_value(f).map_err(|e| {
                    ApiError::field(
                        &format!("tools[{i}].function"),
                        format!("tools[{i}].function: {e}"),
                    )
                })
            })?;
        functions.push(f);
    }
    let choice = match body.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::field(
                    "tool_choice",
                    format!("tool_choice is `{other}`; it must be none, auto, required or a function"),
                ))
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                ToolChoice::Function(name.to_string())
            }
            _ => {
                return Err(ApiError::field(
                    "tool_choice",
                    "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
    };
    let parallel = parallel_tool_calls(body)?;
    checked_tools(functions, choice, parallel, "a call")
}

/// `parallel_tool_calls`: true unless it says false.
pub fn parallel_tool_calls(body: &Value) -> Result<bool, ApiError> {
    match body.get("parallel_tool_calls") {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::field(
            "parallel_tool_calls",
            "parallel_tool_calls must be true or false",
        )),
    }
}

/// The tools of a request, once each dialect has read its functions and choice: none
/// without functions (an error when the choice asks for `call`), else the checked spec.
pub fn checked_tools(
    functions: Vec<Function>,
    choice: ToolChoice,
    parallel: bool,
    call: &str,
) -> Result<Option<ToolSpec>, ApiError> {
    if functions.is_empty() {
        if matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) {
            return Err(ApiError::field(
                "tool_choice",
                format!("tool_choice asks for {call} but there are no tools"),
            ));
        }
        return Ok(None);
    }
    let spec = ToolSpec {
        functions,
        choice,
        parallel,
    };
    spec.check()
        .map_err(|e| ApiError::from_runtime(e, "tools"))?;
    Ok(Some(spec))
}

#[derive(Debug, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<ChatMessage>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

impl ChatFields {
    /// The conversation in OpenAI's shape, checked: roles known (`developer` read as
    /// `system`), content as text, assistant tool calls and tool results kept for the
    /// template.
    pub fn messages(&self) -> Result<Vec<Value>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::field("messages", "messages is empty"));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::field(
                        &format!("messages[{i}].role"),
                        format!(
                            "messages[{i}].role is `{other}`; it must be system, developer, user, assistant or tool"
                        ),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            ("text", None) => {
                                return Err(ApiError::field(
                                    &format!("messages[{i}].content[{j}].text"),
                                    "a text part has no text",
                                ))
                            }
                            (kind, _) => {
                                return Err(ApiError::unsupported(
                                    &format!("messages[{i}].content[{j}].type"),
                                    &format!("content of type `{kind}`"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let mut msg = json!({ "role": role, "content": content });
            if let Some(calls) = m.tool_calls.as_ref().filter(|t| !t.is_null()) {
                if role != "assistant" {
                    return Err(ApiError::field(
                        &format!("messages[{i}].tool_calls"),
                        format!("messages[{i}] is a {role} message; only assistant messages carry tool_calls"),
                    ));
                }
                msg["tool_calls"] = tool_calls(calls, i)?;
            }
            if role == "tool" {
                let Some(id) = &m.tool_call_id else {
                    return Err(ApiError::field(
                        &format!("messages[{i}].tool_call_id"),
                        format!("messages[{i}] is a tool message without tool_call_id"),
                    ));
                };
                msg["tool_call_id"] = json!(id);
            }
            if let Some(name) = &m.name {
                msg["name"] = json!(name);
            }
            out.push(msg);
        }
        Ok(out)
    }

    /// Alternatives per token, when log-probabilities are asked for.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
            return Err(ApiError::field(
                "top_logprobs",
                format!("top_logprobs is {top}; it must be from 0 to {MAX_TOP_LOGPROBS}"),
            ));
        }
        match self.logprobs {
            Some(true) => Ok(Some(top as usize)),
            _ if self.top_logprobs.is_some() => Err(ApiError::field(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            )),
            _ => Ok(None),
        }
    }
}

/// `response_format`: the grammar it asks for (`None` for plain text). A schema is
/// checked when it is compiled (see `routes`).
pub fn response_format(body: &Value) -> Result<Option<Grammar>, ApiError> {
    let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = rf.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let Some(js) = rf.get("json_schema").filter(|v| v.is_object()) else {
                return Err(ApiError::field(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a `json_schema` object",
                ));
            };
            match js.get("schema") {
                Some(schema) if schema.is_object() || schema.is_boolean() => {
                    Ok(Some(Grammar::JsonSchema(schema.clone())))
                }
                // OpenAI's own default: a json_schema without a schema is any JSON.
                None | Some(Value::Null) => Ok(Some(Grammar::JsonSchema(Value::Bool(true)))),
                Some(_) => Err(ApiError::field(
                    "response_format.json_schema.schema",
                    "response_format.json_schema.schema must be a JSON schema object",
                )),
            }
        }
        other => Err(ApiError::unsupported(
            "response_format.type",
            &format!(
                "response_format of type {}",
                other.map_or("(none)".to_string(), |k| format!("`{k}`"))
            ),
        )),
    }
}

/// `prompt` of `/v1/completions`: text, token ids, or a list of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionFields {
    pub prompt: Prompt,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

impl CompletionFields {
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
            Some(k) => Err(ApiError::field(
                "logprobs",
                format!("logprobs is {k}; it must be from 0 to {MAX_TOP_LOGPROBS}"),
            )),
        }
    }
}
