//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE
//! /v1/responses/{id}`.
//!
//! A request's `instructions`, stored history (`previous_response_id`) and `input`
//! items become the conversation every chat dialect shares, planned by the chat
//! route's planner; the answer's steps become output items, or the typed events of
//! a stream. With `store` (the default) the response and its conversation are kept
//! in the server's SQLite state, scoped to the hash of the API key that made it.
use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use llama_runtime::{FinishReason, Function, Grammar, SamplerConfig, ToolChoice, ToolSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::models::Lease;
use crate::presented_key;
use crate::request::{self, Common};
use crate::routes::{body, format_constraint, plan_conversation, AppResult, Conversation, Plan};
use crate::state::AppState;
use crate::store::{scope, Store, Stored};
use crate::turn::{Block, Finished, Step, Turn};

/// Fields of a request; any other is refused by name.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
    "seed",
    "metadata",
    "store",
    "previous_response_id",
    "stream",
    "stream_options",
    "user",
    "truncation",
    "include",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "reasoning",
    "background",
    "top_logprobs",
    "max_tool_calls",
    "conversation",
    "prompt",
];

/// Refuses fields this server does not know, and those it knows but cannot honour.
fn check_fields(body: &Value) -> Result<(), ApiError> {
    let Some(map) = body.as_object() else {
        return Ok(());
    };
    for (k, v) in map {
        if !FIELDS.contains(&k.as_str()) {
            return Err(ApiError::unsupported(k, &format!("the field `{k}`")));
        }
        let refused = match k.as_str() {
            "reasoning" | "top_logprobs" | "max_tool_calls" | "conversation" | "prompt" => {
                !v.is_null()
            }
            "background" => v == &json!(true),
            "include" => !(v.is_null() || v.as_array().is_some_and(Vec::is_empty)),
            "truncation" => !(v.is_null() || v == "disabled"),
            "service_tier" => !(v.is_null() || v == "auto" || v == "default"),
            _ => false,
        };
        if refused {
            return Err(ApiError::unsupported(k, &format!("`{k}`: {v}")));
        }
    }
    if let Some(m) = body.get("metadata").filter(|m| !m.is_null()) {
        let ok = m
            .as_object()
            .is_some_and(|o| o.len() <= 16 && o.values().all(Value::is_string));
        if !ok {
            return Err(ApiError::field(
                "metadata",
                "metadata must be an object of at most 16 string values",
            ));
        }
    }
    Ok(())
}

/// `tools`, `tool_choice` and `parallel_tool_calls`; `None` without tools.
fn tool_spec(body: &Value) -> Result<Option<ToolSpec>, ApiError> {
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
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(ApiError::field(
                &format!("tools[{i}].name"),
                format!("tools[{i}] has no name"),
            ));
        };
        let parameters = match t.get("parameters") {
            None | Some(Value::Null) => json!({ "type": "object", "properties": {} }),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(ApiError::field(
                    &format!("tools[{i}].parameters"),
                    format!("tools[{i}].parameters must be a JSON schema object"),
                ))
            }
        };
        let description = t
            .get("description")
            .and_then(Value::as_str)
            .map(String::from);
        functions.push(Function {
            name: name.to_string(),
            description,
            parameters,
        });
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
        Some(v) => match (v.get("type").and_then(Value::as_str), v.get("name")) {
            (Some("function"), Some(Value::String(name))) => {
                if !functions.iter().any(|f| &f.name == name) {
                    return Err(ApiError::field(
                        "tool_choice.name",
                        format!("tool_choice names `{name}`, which is not among the tools"),
                    ));
                }
                ToolChoice::Function(name.clone())
            }
            (Some(kind), _) if kind != "function" => {
                return Err(ApiError::unsupported(
                    "tool_choice.type",
                    &format!("tool_choice of type `{kind}`"),
                ))
            }
            _ => {
                return Err(ApiError::field(
                    "tool_choice",
                    "tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                ))
            }
        },
    };
    let parallel = crate::request::parallel_tool_calls(body)?;
    crate::request::checked_tools(functions, choice, parallel, "a call")
}

/// `text.format`: the grammar it asks for (`None` for plain text).
fn text_format(body: &Value) -> Result<Option<Grammar>, ApiError> {
    let Some(text) = body.get("text").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(obj) = text.as_object() else {
        return Err(ApiError::field("text", "text must be an object"));
    };
    for (k, v) in obj {
        match k.as_str() {
            "format" => {}
            "verbosity" if v.is_null() || v == "medium" => {}
            other => {
                return Err(ApiError::unsupported(
                    &format!("text.{other}"),
                    &format!("`text.{other}`: {v}"),
                ))
            }
        }
    }
    let Some(f) = text.get("format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => match f.get("schema") {
            Some(s) if s.is_object() || s.is_boolean() => Ok(Some(Grammar::JsonSchema(s.clone()))),
            _ => Err(ApiError::field(
                "text.format.schema",
                "text.format of type json_schema needs a `schema` object",
            )),
        },
        other => Err(ApiError::unsupported(
            "text.format.type",
            &format!(
                "text.format of type {}",
                other.map_or("(none)".into(), |k| format!("`{k}`"))
            ),
        )),
    }
}

/// The text of a message item's content: a string or text parts.
fn content_text(content: &Value, param: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                let at = format!("{param}[{j}]");
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        match p.get("text").and_then(Value::as_str) {
                            Some(t) => text.push_str(t),
                            None => {
                                return Err(ApiError::field(
                                    &format!("{at}.text"),
                                    format!("{at} has no text"),
                                ))
                            }
                        }
                    }
                    Some(kind) => {
                        return Err(ApiError::unsupported(
                            &format!("{at}.type"),
                            &format!("content of type `{kind}`"),
                        ))
                    }
                    None => {
                        return Err(ApiError::field(
                            &format!("{at}.type"),
                            format!("{at} has no type"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::field(
            param,
            format!("{param} must be a string or a list of content parts"),
        )),
    }
}

/// The call ids of a conversation's assistant tool calls.
fn call_ids(messages: &[Value]) -> HashSet<String> {
    messages
        .iter()
        .filter_map(|m| m.get("tool_calls").and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("id").and_then(Value::as_str).map(String::from))
        .collect()
}

/// `input` as chat messages appended to `history` (which the call ids of
/// `function_call_output` items may refer to).
fn input_messages(body: &Value, history: &[Value]) -> Result<Vec<Value>, ApiError> {
    let items = match body.get("input") {
        Some(Value::String(s)) => return Ok(vec![json!({ "role": "user", "content": s })]),
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => return Err(ApiError::field("input", "`input` is required")),
        Some(_) => {
            return Err(ApiError::field(
                "input",
                "input must be a string or a list of items",
            ))
        }
    };
    let mut known = call_ids(history);
    let mut out: Vec<Value> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = match item.get("type").and_then(Value::as_str) {
            Some(k) => k,
            None if item.get("role").is_some() => "message",
            None => {
                return Err(ApiError::field(
                    &format!("{at}.type"),
                    format!("{at} has no type"),
                ))
            }
        };
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer") => "system",
                    Some(r @ ("system" | "user" | "assistant")) => r,
                    other => {
                        return Err(ApiError::field(
                            &format!("{at}.role"),
                            format!(
                                "{at}.role is {}; it must be user, assistant, system or developer",
                                other.map_or("missing".into(), |r| format!("`{r}`"))
                            ),
                        ))
                    }
                };
                let content = content_text(
                    item.get("content").unwrap_or(&Value::Null),
                    &format!("{at}.content"),
                )?;
                out.push(json!({ "role": role, "content": content }));
            }
            "function_call" => {
                let call_id = item.get("call_id").and_then(Value::as_str);
                let name = item.get("name").and_then(Value::as_str);
                let args = item.get("arguments").and_then(Value::as_str);
                let (Some(call_id), Some(name), Some(args)) = (call_id, name, args) else {
                    return Err(ApiError::field(
                        &at,
                        format!("{at} (function_call) needs call_id, name and arguments"),
                    ));
                };
                if serde_json::from_str::<Value>(args).is_err() {
                    return Err(ApiError::field(
                        &format!("{at}.arguments"),
                        format!("{at}.arguments is not JSON text"),
                    ));
                }
                known.insert(call_id.to_string());
                let call = json!({
                    "id": call_id, "type": "function",
                    "function": { "name": name, "arguments": args },
                });
                // Calls right after an assistant message (or after other calls)
                // belong to it.
                match out.last_mut() {
                    Some(m) if m["role"] == "assistant" => match m.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.push(call),
                        _ => m["tool_calls"] = json!([call]),
                    },
                    _ => out
                        .push(json!({ "role": "assistant", "content": "", "tool_calls": [call] })),
                }
            }
            "function_call_output" => {
                let Some(call_id) = item.get("call_id").and_then(Value::as_str) else {
                    return Err(ApiError::field(
                        &format!("{at}.call_id"),
                        format!("{at} (function_call_output) has no call_id"),
                    ));
                };
                if !known.contains(call_id) {
                    return Err(ApiError::field(
                        &format!("{at}.call_id"),
                        format!(
                            "No tool call found for function call output with call_id {call_id}."
                        ),
                    ));
                }
                let output = content_text(
                    item.get("output").unwrap_or(&Value::Null),
                    &format!("{at}.output"),
                )?;
                out.push(json!({ "role": "tool", "tool_call_id": call_id, "content": output }));
            }
            other => {
                return Err(ApiError::unsupported(
                    &format!("{at}.type"),
                    &format!("input items of type `{other}`"),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(ApiError::field("input", "input is an empty list"));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Options {
    #[serde(default)]
    stream: bool,
    max_output_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    store: Option<bool>,
}

/// What a response echoes of its request.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    instructions: Value,
    max_output_tokens: Value,
    temperature: Value,
    top_p: Value,
    tools: Value,
    tool_choice: Value,
    parallel_tool_calls: bool,
    previous_response_id: Value,
    text: Value,
    metadata: Value,
    store: bool,
    user: Value,
}

impl Echo {
    fn object(&self, status: &str, output: &[Value], usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "reasoning": { "effort": null, "summary": null },
            "store": self.store,
            "temperature": self.temperature,
            "text": self.text,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": self.user,
            "metadata": self.metadata,
        })
    }

    /// The finished response object: `completed`, or `incomplete` at the token limit.
    fn finished(&self, output: &[Value], f: &Finished) -> Value {
        let incomplete = f.finish == FinishReason::Length;
        let mut o = self.object(
            if incomplete {
                "incomplete"
            } else {
                "completed"
            },
            output,
            usage(f),
        );
        if incomplete {
            o["incomplete_details"] = json!({ "reason": "max_output_tokens" });
        }
        o
    }
}

fn usage(f: &Finished) -> Value {
    json!({
        "input_tokens": f.prompt_tokens,
        "input_tokens_details": { "cached_tokens": f.cached_tokens },
        "output_tokens": f.output_tokens,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": f.drafts.accepted,
            "rejected_prediction_tokens": f.drafts.details()["rejected_prediction_tokens"],
        },
        "total_tokens": f.prompt_tokens + f.output_tokens,
    })
}

/// A fresh item id: `prefix_` and hex.
fn item_id(prefix: &str) -> String {
    let a = llama_runtime::random_seed();
    let b = llama_runtime::random_seed();
    format!("{prefix}_{a:016x}{b:016x}")
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{ "type": "output_text", "text": text, "annotations": [], "logprobs": [] }])
    } else {
        json!([])
    };
    json!({ "type": "message", "id": id, "status": status, "role": "assistant", "content": content })
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status,
    })
}

/// The assistant message of an output, for the stored conversation.
fn history_message(output: &[Value]) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for item in output {
        match item["type"].as_str() {
            Some("message") => {
                for part in item["content"].as_array().into_iter().flatten() {
                    text.push_str(part["text"].as_str().unwrap_or_default());
                }
            }
            Some("function_call") => calls.push(json!({
                "id": item["call_id"], "type": "function",
                "function": { "name": item["name"], "arguments": item["arguments"] },
            })),
            _ => {}
        }
    }
    let mut m = json!({ "role": "assistant", "content": text });
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    m
}

/// What a request runs and keeps.
struct Request {
    plan: Plan,
    echo: Echo,
    /// The conversation before the answer, without instructions.
    history: Vec<Value>,
    scope: String,
    model: Lease,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn load(store: Arc<Store>, scope: String, id: String) -> Result<Option<Stored>, ApiError> {
    blocking(move || store.get(&scope, &id).map_err(store_error)).await
}

async fn plan(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    value: &Value,
) -> Result<Request, ApiError> {
    // An embedding model says so before any field is read.
    let model = state.model(value).await?;
    model.service()?;
    check_fields(value)?;
    let o: Options = request::parse(value)?;
    let scope = scope(presented_key(headers));
    let mut history = Vec::new();
    if let Some(prev) = &o.previous_response_id {
        let found = load(state.store()?, scope.clone(), prev.clone()).await?;
        let Some(found) = found else {
            return Err(ApiError::field(
                "previous_response_id",
                format!("Previous response with id '{prev}' not found."),
            )
            .with_status(StatusCode::NOT_FOUND));
        };
        history = found.history;
    }
    let tools = tool_spec(value)?;
    let grammar = text_format(value)?;
    let input = input_messages(value, &history)?;
    history.extend(input);
    let mut messages = Vec::with_capacity(history.len() + 1);
    if let Some(i) = o.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(json!({ "role": "system", "content": i }));
    }
    messages.extend(history.iter().cloned());
    let format = match grammar {
        Some(g) => Some((
            format_constraint(&model, g, "text.format", "text.format.schema")?,
            "text.format",
        )),
        None => None,
    };
    let defaults = SamplerConfig::chat();
    let echo = Echo {
        id: item_id("resp"),
        created_at: crate::state::now(),
        model: model.name.clone(),
        instructions: json!(o.instructions),
        max_output_tokens: json!(o.max_output_tokens),
        // Unset, the server's defaults (llama.cpp's), as they are applied.
        temperature: json!(o.temperature.unwrap_or(defaults.temperature)),
        top_p: json!(o.top_p.or(defaults.top_p).unwrap_or(1.0)),
        tools: value.get("tools").cloned().unwrap_or(json!([])),
        tool_choice: value.get("tool_choice").cloned().unwrap_or(json!("auto")),
        parallel_tool_calls: tools.as_ref().is_none_or(|t| t.parallel),
        previous_response_id: json!(o.previous_response_id),
        text: match value.pointer("/text/format") {
            Some(f) if !f.is_null() => json!({ "format": f }),
            _ => json!({ "format": { "type": "text" } }),
        },
        metadata: value
            .get("metadata")
            .filter(|m| !m.is_null())
            .cloned()
            .unwrap_or(json!({})),
        store: o.store.unwrap_or(true),
        user: value.get("user").cloned().unwrap_or(Value::Null),
    };
    let mut common = Common {
        stream: o.stream,
        max_tokens: o.max_output_tokens,
        temperature: o.temperature,
        top_p: o.top_p,
        seed: o.seed,
        ..Common::default()
    };
    if common.max_tokens.is_some_and(|m| m < 1) {
        return Err(ApiError::field(
            "max_output_tokens",
            "max_output_tokens must be at least 1",
        ));
    }
    if value.get("stream_options").is_some_and(|v| !v.is_null()) && !o.stream {
        return Err(ApiError::field(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    let conv = Conversation {
        messages,
        tools,
        format,
        prefill: String::new(),
        param: "input",
    };
    let plan = plan_conversation(&model, conv, &mut common, 1, None)?;
    Ok(Request {
        plan,
        echo,
        history,
        scope,
        model,
    })
}

/// Keeps a finished response when the request asked for it.
async fn keep(
    state: &AppState,
    echo: &Echo,
    scope: &str,
    history: Vec<Value>,
    response: &Value,
) -> Result<(), ApiError> {
    if !echo.store {
        return Ok(());
    }
    let stored = Stored {
        id: echo.id.clone(),
        scope: scope.to_string(),
        created: echo.created_at,
        response: response.clone(),
        history,
    };
    let store = state.store()?;
    blocking(move || store.put(&stored).map_err(store_error)).await
}

fn output_of(blocks: &[Block]) -> Vec<Value> {
    blocks
        .iter()
        .map(|b| match b {
            Block::Text(t) => message_item(&item_id("msg"), t, "completed"),
            Block::Call(c) => call_item(&item_id("fc"), &c.id, &c.name, &c.arguments, "completed"),
        })
        .collect()
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> AppResult {
    let arrived = Instant::now();
    let value = body(bytes, state.config.body_limit)?;
    let Request {
        plan,
        echo,
        history,
        scope,
        model,
    } = plan(&state, &headers, &value).await?;
    let stream = plan.stream;
    let turn = Turn::start(state.clone(), model, plan, arrived, "input").await?;
    if stream {
        let s = Streaming {
            turn,
            state,
            echo,
            history,
            scope,
            pending: VecDeque::new(),
            sequence: 0,
            started: false,
            open: None,
            output: Vec::new(),
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
    let output = output_of(&outcome.blocks);
    let response = echo.finished(&output, &outcome.finished);
    let mut history = history;
    history.push(history_message(&output));
    keep(&state, &echo, &scope, history, &response).await?;
    Ok(Json(response).into_response())
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("Response with id '{id}' not found."),
    )
}

fn path_id(id: Result<Path<String>, PathRejection>) -> String {
    id.map_or_else(|e| format!("<{}>", e.body_text()), |Path(id)| id)
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = path_id(id);
    let scope = scope(presented_key(&headers));
    match load(state.store()?, scope, id.clone()).await? {
        Some(s) => Ok(Json(s.response).into_response()),
        None => Err(not_found(&id)),
    }
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = path_id(id);
    let scope = scope(presented_key(&headers));
    let store = state.store()?;
    let key = id.clone();
    let deleted = blocking(move || store.delete(&scope, &key).map_err(store_error)).await?;
    if !deleted {
        return Err(not_found(&id));
    }
    Ok(Json(json!({ "id": id, "object": "response", "deleted": true })).into_response())
}

/// The output item being streamed.
enum Open {
    Text {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

struct Streaming {
    turn: Turn,
    state: Arc<AppState>,
    echo: Echo,
    history: Vec<Value>,
    scope: String,
    pending: VecDeque<SseEvent>,
    sequence: u64,
    started: bool,
    open: Option<Open>,
    output: Vec<Value>,
    ended: bool,
}

impl Streaming {
    fn push(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        self.pending
            .push_back(SseEvent::default().event(kind).data(data.to_string()));
    }

    fn close(&mut self) {
        let index = self.output.len();
        match self.open.take() {
            None => {}
            Some(Open::Text { id, text }) => {
                self.push(
                    "response.output_text.done",
                    json!({ "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": [] }),
                );
                self.push(
                    "response.content_part.done",
                    json!({
                        "item_id": id, "output_index": index, "content_index": 0,
                        "part": { "type": "output_text", "text": text, "annotations": [] },
                    }),
                );
                let item = message_item(&id, &text, "completed");
                self.push(
                    "response.output_item.done",
                    json!({ "output_index": index, "item": item }),
                );
                self.output.push(item);
            }
            Some(Open::Call {
                id,
                call_id,
                name,
                arguments,
            }) => {
                self.push(
                    "response.function_call_arguments.done",
                    json!({ "item_id": id, "output_index": index, "name": name, "arguments": arguments }),
                );
                let item = call_item(&id, &call_id, &name, &arguments, "completed");
                self.push(
                    "response.output_item.done",
                    json!({ "output_index": index, "item": item }),
                );
                self.output.push(item);
            }
        }
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
                let r = self.echo.object("in_progress", &[], Value::Null);
                self.push("response.created", json!({ "response": r }));
                self.push("response.in_progress", json!({ "response": r }));
                continue;
            }
            let Some(step) = self.turn.next().await else {
                self.ended = true;
                continue;
            };
            let index = self.output.len();
            match step {
                Step::Text(t) => {
                    if !matches!(self.open, Some(Open::Text { .. })) {
                        self.close();
                        let index = self.output.len();
                        let id = item_id("msg");
                        self.push(
                            "response.output_item.added",
                            json!({ "output_index": index, "item": message_item(&id, "", "in_progress") }),
                        );
                        self.push(
                            "response.content_part.added",
                            json!({
                                "item_id": id, "output_index": index, "content_index": 0,
                                "part": { "type": "output_text", "text": "", "annotations": [] },
                            }),
                        );
                        self.open = Some(Open::Text {
                            id,
                            text: String::new(),
                        });
                    }
                    if let Some(Open::Text { id, text }) = self.open.as_mut() {
                        text.push_str(&t);
                        let id = id.clone();
                        self.push(
                            "response.output_text.delta",
                            json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": [] }),
                        );
                    }
                }
                Step::CallStart { id: call_id, name } => {
                    self.close();
                    let index = self.output.len();
                    let id = item_id("fc");
                    self.push(
                        "response.output_item.added",
                        json!({ "output_index": index, "item": call_item(&id, &call_id, &name, "", "in_progress") }),
                    );
                    self.open = Some(Open::Call {
                        id,
                        call_id,
                        name,
                        arguments: String::new(),
                    });
                }
                Step::CallArguments(text) => {
                    if let Some(Open::Call { id, arguments, .. }) = self.open.as_mut() {
                        arguments.push_str(&text);
                        let id = id.clone();
                        if !text.is_empty() {
                            self.push(
                                "response.function_call_arguments.delta",
                                json!({ "item_id": id, "output_index": index, "delta": text }),
                            );
                        }
                    }
                }
                Step::Done(f) => {
                    self.close();
                    let response = self.echo.finished(&self.output, &f);
                    let mut history = std::mem::take(&mut self.history);
                    history.push(history_message(&self.output));
                    match keep(&self.state, &self.echo, &self.scope, history, &response).await {
                        Ok(()) => {
                            let kind = if response["status"] == "incomplete" {
                                "response.incomplete"
                            } else {
                                "response.completed"
                            };
                            self.push(kind, json!({ "response": response }));
                        }
                        Err(e) => self.fail(e),
                    }
                    self.ended = true;
                }
                Step::Failed(e) => {
                    self.fail(e);
                    self.ended = true;
                }
            }
        }
    }

    fn fail(&mut self, e: ApiError) {
        self.push(
            "error",
            json!({ "code": e.code.unwrap_or("server_error"), "message": e.message, "param": e.param }),
        );
        let mut r = self.echo.object("failed", &self.output, Value::Null);
        r["error"] = json!({ "code": "server_error", "message": e.message });
        self.push("response.failed", json!({ "response": r }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_chat_messages() {
        let body = json!({ "input": [
            { "role": "developer", "content": "Be brief." },
            { "type": "message", "role": "user", "content": [{ "type": "input_text", "text": "Price?" }] },
            { "type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}" },
            { "type": "function_call", "call_id": "call_2", "name": "f", "arguments": "{\"a\":1}" },
            { "type": "function_call_output", "call_id": "call_1", "output": "1" },
            { "type": "function_call_output", "call_id": "call_2", "output": [{ "type": "input_text", "text": "2" }] },
        ] });
        let m = input_messages(&body, &[]).expect("messages");
        assert_eq!(m.len(), 5);
        assert_eq!(m[0], json!({ "role": "system", "content": "Be brief." }));
        assert_eq!(m[2]["role"], "assistant");
        assert_eq!(m[2]["tool_calls"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            m[4],
            json!({ "role": "tool", "tool_call_id": "call_2", "content": "2" })
        );
    }

    #[test]
    fn a_call_output_needs_its_call_here_or_in_the_history() {
        let body = json!({ "input": [{ "type": "function_call_output", "call_id": "call_7", "output": "1" }] });
        let e = input_messages(&body, &[]).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("input[0].call_id"));
        let history = vec![json!({ "role": "assistant", "content": "", "tool_calls": [
            { "id": "call_7", "type": "function", "function": { "name": "f", "arguments": "{}" } },
        ] })];
        assert!(input_messages(&body, &history).is_ok());
    }

    #[test]
    fn unsupported_items_fields_and_tools_are_named() {
        for (body, param) in [
            (
                json!({ "input": [{ "type": "reasoning" }] }),
                "input[0].type",
            ),
            (
                json!({ "input": [{ "role": "user", "content": [{ "type": "input_image" }] }] }),
                "input[0].content[0].type",
            ),
        ] {
            let e = input_messages(&body, &[]).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        for (body, param) in [
            (json!({ "reasoning": { "effort": "low" } }), "reasoning"),
            (
                json!({ "include": ["file_search_call.results"] }),
                "include",
            ),
            (json!({ "background": true }), "background"),
            (json!({ "nonsense": 1 }), "nonsense"),
        ] {
            let e = check_fields(&body).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        assert!(
            check_fields(&json!({ "include": [], "truncation": "disabled", "store": false }))
                .is_ok()
        );
        let e = tool_spec(&json!({ "tools": [{ "type": "file_search" }] })).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("tools[0].type"));
    }

    #[test]
    fn the_output_is_the_history_of_the_next_turn() {
        let output = vec![
            message_item("msg_1", "Let me look.", "completed"),
            call_item("fc_1", "call_1", "f", "{}", "completed"),
        ];
        assert_eq!(
            history_message(&output),
            json!({ "role": "assistant", "content": "Let me look.", "tool_calls": [
                { "id": "call_1", "type": "function", "function": { "name": "f", "arguments": "{}" } },
            ] })
        );
    }
}
