//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.
//!
//! A request is read into the conversation every chat dialect shares (system text,
//! user and assistant messages, `tool_use` blocks as assistant tool calls and
//! `tool_result` blocks as tool messages) and planned by the chat route's planner;
//! the answer's steps become Anthropic's content blocks or its stream of events.
//! Errors are Anthropic's: `{"type": "error", "error": {"type", "message"}}`.
use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use llama_runtime::{FinishReason, Function, ToolChoice, ToolSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{AnthropicError, ApiError};
use crate::request::{self, Common, Stop};
use crate::routes::{body, plan_conversation, prompt_ids, Conversation};
use crate::state::{AppState, Loaded};
use crate::turn::{which_stop, Block, Finished, Step, Turn};

type Answer = Result<Response, AnthropicError>;

/// Fields of `/v1/messages`; any other is refused by name.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    // An extension: Anthropic's API has no seed.
    "seed",
];

/// Fields of `/v1/messages/count_tokens`.
const COUNT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
];

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::unsupported(param, what)
}

/// Refuses fields this server does not know or cannot honour.
fn check_fields(body: &Value, known: &[&str]) -> Result<(), ApiError> {
    let Some(map) = body.as_object() else {
        return Ok(());
    };
    for (k, v) in map {
        if !known.contains(&k.as_str()) {
            return Err(unsupported(k, &format!("the field `{k}`")));
        }
        match k.as_str() {
            "thinking" if !(v.is_null() || v.get("type") == Some(&json!("disabled"))) => {
                return Err(unsupported("thinking", "extended thinking (`thinking`)"))
            }
            "service_tier" if !(v.is_null() || v == "auto" || v == "standard_only") => {
                return Err(unsupported("service_tier", &format!("service_tier {v}")))
            }
            "metadata" if !(v.is_null() || v.is_object()) => {
                return Err(ApiError::field("metadata", "metadata must be an object"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Text of a `system` value or of a `tool_result`'s content: a string or text blocks.
fn text_of(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, b) in blocks.iter().enumerate() {
                let p = format!("{param}.{j}");
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => match b.get("text").and_then(Value::as_str) {
                        Some(t) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(t)
                        }
                        None => {
                            return Err(ApiError::field(
                                &format!("{p}.text"),
                                format!("{p}.text: Field required"),
                            ))
                        }
                    },
                    Some(kind) => {
                        return Err(unsupported(
                            &format!("{p}.type"),
                            &format!("content of type `{kind}`"),
                        ))
                    }
                    None => {
                        return Err(ApiError::field(
                            &format!("{p}.type"),
                            format!("{p}.type: Field required"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::field(
            param,
            format!("{param}: must be a string or a list of text blocks"),
        )),
    }
}

/// `tools` and `tool_choice`; `None` without tools.
fn tool_spec(body: &Value) -> Result<Option<ToolSpec>, ApiError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(ApiError::field("tools", "tools: must be a list")),
    };
    let mut functions = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t.get("type") {
            None | Some(Value::Null) => {}
            Some(v) if v == "custom" => {}
            Some(v) => {
                return Err(unsupported(
                    &format!("tools.{i}.type"),
                    &format!("the built-in tool type {v}"),
                ))
            }
        }
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(ApiError::field(
                &format!("tools.{i}.name"),
                format!("tools.{i}.name: Field required"),
            ));
        };
        let parameters = match t.get("input_schema") {
            Some(s) if s.is_object() => s.clone(),
            _ => {
                return Err(ApiError::field(
                    &format!("tools.{i}.input_schema"),
                    format!("tools.{i}.input_schema: a JSON schema object is required"),
                ))
            }
        };
        let description = match t.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => {
                return Err(ApiError::field(
                    &format!("tools.{i}.description"),
                    format!("tools.{i}.description: must be a string"),
                ))
            }
        };
        functions.push(Function {
            name: name.to_string(),
            description,
            parameters,
        });
    }
    let (choice, parallel) = match body.get("tool_choice") {
        None | Some(Value::Null) => (ToolChoice::Auto, true),
        Some(c) => {
            let parallel = match c.get("disable_parallel_tool_use") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => !b,
                Some(_) => {
                    return Err(ApiError::field(
                        "tool_choice.disable_parallel_tool_use",
                        "tool_choice.disable_parallel_tool_use: must be true or false",
                    ))
                }
            };
            let choice = match c.get("type").and_then(Value::as_str) {
                Some("auto") => ToolChoice::Auto,
                Some("any") => ToolChoice::Required,
                Some("none") => ToolChoice::None,
                Some("tool") => {
                    let Some(name) = c.get("name").and_then(Value::as_str) else {
                        return Err(ApiError::field(
                            "tool_choice.name",
                            "tool_choice.name: Field required",
                        ));
                    };
                    if !functions.iter().any(|f| f.name == name) {
                        return Err(ApiError::field(
                            "tool_choice.name",
                            format!("tool_choice.name: tool `{name}` is not among the tools"),
                        ));
                    }
                    ToolChoice::Function(name.to_string())
                }
                _ => {
                    return Err(ApiError::field(
                        "tool_choice.type",
                        "tool_choice.type: must be one of auto, any, tool, none",
                    ))
                }
            };
            (choice, parallel)
        }
    };
    crate::request::checked_tools(functions, choice, parallel, "a tool")
}

/// Anthropic's tool ids beside ours: `toolu_` where we write `call_`.
fn tool_id(call_id: &str) -> String {
    format!("toolu_{}", call_id.strip_prefix("call_").unwrap_or(call_id))
}

/// `system` and `messages` as chat messages; a last assistant message becomes the
/// prefill the answer continues.
fn conversation(body: &Value, tools: Option<ToolSpec>) -> Result<Conversation, ApiError> {
    let mut out = Vec::new();
    match body.get("system") {
        None | Some(Value::Null) => {}
        Some(s) => {
            let text = text_of(s, "system")?;
            out.push(json!({ "role": "system", "content": text }));
        }
    }
    let list = match body.get("messages") {
        Some(Value::Array(l)) if !l.is_empty() => l,
        Some(Value::Array(_)) => {
            return Err(ApiError::field(
                "messages",
                "messages: at least one message is required",
            ))
        }
        Some(_) => return Err(ApiError::field("messages", "messages: must be a list")),
        None => return Err(ApiError::field("messages", "messages: Field required")),
    };
    let names: Option<HashSet<&str>> = tools
        .as_ref()
        .map(|t| t.functions.iter().map(|f| f.name.as_str()).collect());
    // Tool-use ids of the previous assistant message still waiting for results.
    let mut waiting: Vec<String> = Vec::new();
    let mut prefill = String::new();
    for (i, m) in list.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            Some(other) => {
                return Err(ApiError::field(
                    &format!("messages.{i}.role"),
                    format!("messages.{i}.role: `{other}` is not one of user, assistant"),
                ))
            }
            None => {
                return Err(ApiError::field(
                    &format!("messages.{i}.role"),
                    format!("messages.{i}.role: Field required"),
                ))
            }
        };
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) => vec![json!({ "type": "text", "text": s })],
            Some(Value::Array(b)) => b.clone(),
            _ => {
                return Err(ApiError::field(
                    &format!("messages.{i}.content"),
                    format!("messages.{i}.content: must be a string or a list of blocks"),
                ))
            }
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let p = format!("messages.{i}.content.{j}");
            let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
            match (role, kind) {
                (_, "text") => {
                    let Some(t) = b.get("text").and_then(Value::as_str) else {
                        return Err(ApiError::field(
                            &format!("{p}.text"),
                            format!("{p}.text: Field required"),
                        ));
                    };
                    text.push_str(t);
                }
                ("assistant", "tool_use") => {
                    let id = b.get("id").and_then(Value::as_str);
                    let name = b.get("name").and_then(Value::as_str);
                    let input = b.get("input").filter(|v| v.is_object());
                    let (Some(id), Some(name), Some(input)) = (id, name, input) else {
                        return Err(ApiError::field(
                            &p,
                            format!("{p}: a tool_use block needs id, name and an input object"),
                        ));
                    };
                    match &names {
                        None => {
                            return Err(ApiError::field(
                                &p,
                                format!("{p}: requests which include `tool_use` or `tool_result` blocks must define tools"),
                            ))
                        }
                        Some(n) if !n.contains(name) => {
                            return Err(ApiError::field(
                                &format!("{p}.name"),
                                format!("{p}.name: tool `{name}` is not among the tools"),
                            ))
                        }
                        Some(_) => {}
                    }
                    calls.push(json!({
                        "id": id, "type": "function",
                        "function": { "name": name, "arguments": input.to_string() },
                    }));
                }
                ("user", "tool_result") => {
                    let Some(id) = b.get("tool_use_id").and_then(Value::as_str) else {
                        return Err(ApiError::field(
                            &format!("{p}.tool_use_id"),
                            format!("{p}.tool_use_id: Field required"),
                        ));
                    };
                    let Some(at) = waiting.iter().position(|w| w == id) else {
                        return Err(ApiError::field(
                            &p,
                            format!("{p}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."),
                        ));
                    };
                    waiting.remove(at);
                    let mut content = text_of(
                        b.get("content").unwrap_or(&Value::Null),
                        &format!("{p}.content"),
                    )?;
                    if b.get("is_error") == Some(&Value::Bool(true)) {
                        content = format!("Error: {content}");
                    }
                    results.push(json!({ "role": "tool", "tool_call_id": id, "content": content }));
                }
                (_, "") => {
                    return Err(ApiError::field(
                        &format!("{p}.type"),
                        format!("{p}.type: Field required"),
                    ))
                }
                (_, kind) => {
                    return Err(unsupported(
                        &format!("{p}.type"),
                        &format!("a `{kind}` block in a {role} message"),
                    ))
                }
            }
        }
        if !waiting.is_empty() {
            return Err(ApiError::field(
                &format!("messages.{i}"),
                format!(
                    "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
                    waiting.join(", ")
                ),
            ));
        }
        if role == "assistant" {
            let last = i + 1 == list.len();
            if last && calls.is_empty() {
                prefill = text;
                continue;
            }
            waiting = calls
                .iter()
                .filter_map(|c| c["id"].as_str().map(str::to_string))
                .collect();
            if last {
                return Err(ApiError::field(
                    &format!("messages.{i}"),
                    format!("messages.{i}: the last message holds `tool_use` blocks; send their `tool_result` blocks in a user message after it"),
                ));
            }
            let mut msg = json!({ "role": "assistant", "content": text });
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            out.push(msg);
        } else {
            out.extend(results);
            if !text.is_empty() || blocks.is_empty() {
                out.push(json!({ "role": "user", "content": text }));
            }
        }
    }
    Ok(Conversation {
        messages: out,
        tools,
        format: None,
        prefill,
        param: "messages",
    })
}

/// The sampling fields.
#[derive(Deserialize)]
struct Options {
    max_tokens: Option<i64>,
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
}

/// What one `/v1/messages` request runs.
struct Request {
    plan: crate::routes::Plan,
    stops: Vec<String>,
}

fn plan(model: &Loaded, value: &Value) -> Result<Request, ApiError> {
    check_fields(value, FIELDS)?;
    let o: Options = request::parse(value)?;
    let Some(max_tokens) = o.max_tokens else {
        return Err(ApiError::field("max_tokens", "max_tokens: Field required"));
    };
    let stops = o.stop_sequences.clone().unwrap_or_default();
    let mut common = Common {
        stream: o.stream,
        max_tokens: Some(max_tokens),
        stop: o.stop_sequences.map(Stop::Many),
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k,
        seed: o.seed,
        ..Common::default()
    };
    let tools = tool_spec(value)?;
    let conv = conversation(value, tools)?;
    let plan = plan_conversation(model, conv, &mut common, 1, None)?;
    Ok(Request { plan, stops })
}

fn stop_reason(f: &Finished, stops: &[String], model: &Loaded) -> (&'static str, Value) {
    match f.finish {
        FinishReason::Length => ("max_tokens", Value::Null),
        _ if f.called => ("tool_use", Value::Null),
        FinishReason::Stop => (
            "stop_sequence",
            which_stop(model, &f.ids, stops).map_or(Value::Null, Value::String),
        ),
        FinishReason::Eos | FinishReason::Cancelled => ("end_turn", Value::Null),
    }
}

fn usage(f: &Finished) -> Value {
    json!({
        "input_tokens": f.prompt_tokens.saturating_sub(f.cached_tokens),
        "output_tokens": f.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": f.cached_tokens,
    })
}

/// Arguments as the object `input` of a `tool_use` block.
fn input_of(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer {
    let arrived = Instant::now();
    let value = body(bytes, state.config.body_limit)?;
    let lease = state.model(&value).await?;
    lease.service()?;
    let Request { plan, stops } = plan(&lease, &value)?;
    let stream = plan.stream;
    let turn = Turn::start(state.clone(), lease, plan, arrived, "messages").await?;
    // Anthropic's ids: `msg_` and characters.
    let id = state.id("msg").replacen('-', "_", 1);
    let model = turn.model().name.clone();
    if stream {
        let s = Streaming {
            turn,
            id,
            model,
            stops,
            pending: VecDeque::new(),
            started: false,
            open: None,
            blocks: 0,
            ended: false,
        };
        let events = futures_util::stream::unfold(s, |mut s| async move {
            s.next_event().await.map(|e| (Ok::<_, Infallible>(e), s))
        });
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let outcome = turn.collect().await?;
    let content: Vec<Value> = outcome
        .blocks
        .iter()
        .map(|b| match b {
            Block::Text(t) => json!({ "type": "text", "text": t }),
            Block::Call(c) => json!({
                "type": "tool_use", "id": tool_id(&c.id), "name": c.name,
                "input": input_of(&c.arguments),
            }),
        })
        .collect();
    let (reason, sequence) = stop_reason(&outcome.finished, &stops, &outcome.model);
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(&outcome.finished),
    }))
    .into_response())
}

pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer {
    let value = body(bytes, state.config.body_limit)?;
    let model = state.model(&value).await?;
    model.service()?;
    check_fields(&value, COUNT_FIELDS)?;
    let tools = tool_spec(&value)?;
    let conv = conversation(&value, tools)?;
    let (ids, _) = prompt_ids(&model, &conv)?;
    Ok(Json(json!({ "input_tokens": ids.len() })).into_response())
}

/// Which block is open in a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Tool,
}

struct Streaming {
    turn: Turn,
    id: String,
    model: String,
    stops: Vec<String>,
    pending: VecDeque<SseEvent>,
    started: bool,
    open: Option<Open>,
    /// Blocks begun so far (the next block's index).
    blocks: usize,
    ended: bool,
}

fn event(name: &str, data: Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

impl Streaming {
    fn push(&mut self, name: &str, data: Value) {
        self.pending.push_back(event(name, data));
    }

    fn close(&mut self) {
        if self.open.take().is_some() {
            let index = self.blocks - 1;
            self.push(
                "content_block_stop",
                json!({ "type": "content_block_stop", "index": index }),
            );
        }
    }

    fn begin(&mut self, kind: Open, block: Value) {
        self.close();
        self.open = Some(kind);
        let index = self.blocks;
        self.blocks += 1;
        self.push(
            "content_block_start",
            json!({ "type": "content_block_start", "index": index, "content_block": block }),
        );
    }

    fn delta(&mut self, delta: Value) {
        let index = self.blocks - 1;
        self.push(
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": index, "delta": delta }),
        );
    }

    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.ended {
                return None;
            }
            if !self.started {
                self.started = true;
                let message = json!({
                    "id": self.id, "type": "message", "role": "assistant",
                    "model": self.model, "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    // The prompt's tokens; how many came from the cache is known
                    // at the end (message_delta's usage).
                    "usage": {
                        "input_tokens": self.turn.prompt_tokens(), "output_tokens": 0,
                        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                    },
                });
                self.push(
                    "message_start",
                    json!({ "type": "message_start", "message": message }),
                );
                continue;
            }
            let Some(step) = self.turn.next().await else {
                self.ended = true;
                continue;
            };
            match step {
                Step::Text(t) => {
                    if self.open != Some(Open::Text) {
                        self.begin(Open::Text, json!({ "type": "text", "text": "" }));
                    }
                    self.delta(json!({ "type": "text_delta", "text": t }));
                }
                Step::CallStart { id, name } => {
                    let block = json!({ "type": "tool_use", "id": tool_id(&id), "name": name, "input": {} });
                    self.begin(Open::Tool, block);
                }
                Step::CallArguments(text) => {
                    if self.open == Some(Open::Tool) && !text.is_empty() {
                        self.delta(json!({ "type": "input_json_delta", "partial_json": text }));
                    }
                }
                Step::Done(f) => {
                    self.close();
                    let (reason, sequence) = stop_reason(&f, &self.stops, self.turn.model());
                    self.push(
                        "message_delta",
                        json!({
                            "type": "message_delta",
                            "delta": { "stop_reason": reason, "stop_sequence": sequence },
                            "usage": usage(&f),
                        }),
                    );
                    self.push("message_stop", json!({ "type": "message_stop" }));
                    self.ended = true;
                }
                Step::Failed(e) => {
                    self.pending
                        .push_back(event("error", AnthropicError(e).body()));
                    self.ended = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(body: Value) -> Result<Conversation, ApiError> {
        let tools = tool_spec(&body)?;
        conversation(&body, tools)
    }

    fn tools() -> Value {
        json!([{ "name": "f", "input_schema": { "type": "object" } }])
    }

    #[test]
    fn blocks_become_chat_messages() {
        let c = conv(json!({
            "system": [{ "type": "text", "text": "Be brief." }],
            "tools": tools(),
            "messages": [
                { "role": "user", "content": "Hi" },
                { "role": "assistant", "content": [
                    { "type": "text", "text": "Calling." },
                    { "type": "tool_use", "id": "toolu_1", "name": "f", "input": { "a": 1 } },
                ] },
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "toolu_1", "content": [{ "type": "text", "text": "42" }] },
                    { "type": "text", "text": "Thanks" },
                ] },
                { "role": "assistant", "content": "The answer is" },
            ],
        }))
        .expect("a conversation");
        assert_eq!(
            c.messages,
            vec![
                json!({ "role": "system", "content": "Be brief." }),
                json!({ "role": "user", "content": "Hi" }),
                json!({ "role": "assistant", "content": "Calling.", "tool_calls": [{
                    "id": "toolu_1", "type": "function",
                    "function": { "name": "f", "arguments": "{\"a\":1}" },
                }] }),
                json!({ "role": "tool", "tool_call_id": "toolu_1", "content": "42" }),
                json!({ "role": "user", "content": "Thanks" }),
            ]
        );
        assert_eq!(c.prefill, "The answer is");
    }

    #[test]
    fn tool_results_must_answer_the_message_before() {
        let orphan = conv(json!({ "tools": tools(), "messages": [
            { "role": "user", "content": [{ "type": "tool_result", "tool_use_id": "toolu_9", "content": "x" }] },
        ] }));
        assert!(orphan.is_err_and(|e| e.message.contains("toolu_9")));
        let unanswered = conv(json!({ "tools": tools(), "messages": [
            { "role": "user", "content": "Hi" },
            { "role": "assistant", "content": [{ "type": "tool_use", "id": "toolu_2", "name": "f", "input": {} }] },
            { "role": "user", "content": "Well?" },
        ] }));
        assert!(unanswered.is_err_and(|e| e.message.contains("toolu_2")));
        let no_tools = conv(json!({ "messages": [
            { "role": "user", "content": "Hi" },
            { "role": "assistant", "content": [{ "type": "tool_use", "id": "toolu_3", "name": "f", "input": {} }] },
            { "role": "user", "content": [{ "type": "tool_result", "tool_use_id": "toolu_3", "content": "x" }] },
        ] }));
        assert!(no_tools.is_err_and(|e| e.message.contains("must define tools")));
    }

    #[test]
    fn tool_choice_maps_to_ours() {
        let spec = |choice: Value| tool_spec(&json!({ "tools": tools(), "tool_choice": choice }));
        let any = spec(json!({ "type": "any", "disable_parallel_tool_use": true }))
            .expect("ok")
            .expect("tools");
        assert_eq!(any.choice, ToolChoice::Required);
        assert!(!any.parallel);
        let named = spec(json!({ "type": "tool", "name": "f" }))
            .expect("ok")
            .expect("tools");
        assert_eq!(named.choice, ToolChoice::Function("f".into()));
        let none = spec(json!({ "type": "none" })).expect("ok").expect("tools");
        assert_eq!(none.choice, ToolChoice::None);
        let unknown = spec(json!({ "type": "tool", "name": "g" }));
        assert!(unknown.is_err_and(|e| e.param.as_deref() == Some("tool_choice.name")));
    }

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        for (body, param) in [
            (json!({ "frobnicate": 1 }), "frobnicate"),
            (
                json!({ "thinking": { "type": "enabled", "budget_tokens": 1024 } }),
                "thinking",
            ),
            (json!({ "container": "x" }), "container"),
        ] {
            let e = check_fields(&body, FIELDS).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some(param));
        }
        assert!(check_fields(&json!({ "thinking": { "type": "disabled" } }), FIELDS).is_ok());
    }
}
