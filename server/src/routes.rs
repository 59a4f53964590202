//! The routes: chat completions, completions, models, health and metrics.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use llama_runtime::{
    Constraint, FinishReason, GenerateOptions, Generation, Grammar, Parsed, TokenLogprob,
    ToolDelta, ToolFormat, ToolParser, ToolSpec,
};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::jobs::{Job, Running, Update};
use crate::models::Lease;
use crate::request::{self, ChatFields, Common, CompletionFields, Prompt};
use crate::state::{AppState, Loaded};

pub(crate) type AppResult = Result<Response, ApiError>;

/// The body as a JSON object; a body over the limit is 413.
pub(crate) fn body(bytes: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let bytes = bytes.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over the limit of {limit} bytes"),
            )
        } else {
            ApiError::new(r.status(), r.body_text())
        }
    })?;
    request::json_object(&bytes)
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// Which route a response answers, and how it is shaped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// One request, read and checked, ready to run.
pub(crate) struct Plan {
    kind: Kind,
    pub jobs: Vec<Job>,
    /// Choices per prompt.
    n: usize,
    pub stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
    /// Prompt text echoed before each completion choice (`echo`).
    echo: Vec<String>,
    /// Prompt tokens, counted once per prompt.
    pub prompt_tokens: usize,
    /// How tool calls are read out of the answers, when the request has tools.
    pub tools: Option<ToolFormat>,
}

/// Generation options of one choice, from the shared fields, with `max_tokens`
/// clamped to what the context leaves after the prompt.
fn job(
    model: &Loaded,
    common: &Common,
    prompt: Vec<u32>,
    base: &GenerateOptions,
    choice: usize,
    param: &str,
) -> Result<Job, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::field(param, "the prompt is empty"));
    }
    if prompt.len() >= model.context {
        return Err(ApiError::field(
            param,
            format!(
                "the prompt is {} tokens; the context holds {} (and at least one new token must fit)",
                prompt.len(),
                model.context
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = model.context - prompt.len();
    let max_tokens = common.max_tokens()?.map_or(room, |m| m.min(room));
    let mut opts = base.clone();
    opts.max_tokens = max_tokens;
    opts.sampler.seed = opts.sampler.seed.wrapping_add(choice as u64);
    Ok(Job { prompt, opts })
}

fn base_options(
    model: &Loaded,
    common: &mut Common,
    logprobs: Option<usize>,
) -> Result<GenerateOptions, ApiError> {
    Ok(GenerateOptions {
        max_tokens: 0,
        sampler: common.sampler(model.vocab)?,
        eos: if common.ignore_eos {
            Vec::new()
        } else {
            model.eos.clone()
        },
        stop: common.stop()?,
        context_shift: None,
        cancel: None,
        logprobs,
        constraint: None,
        speculation: None,
    })
}

/// The constraint a request's output format asks for, compiled for the model: a
/// schema with a keyword that cannot be enforced is refused (400) with the keyword
/// named. `param` is the field that holds the format (`response_format`,
/// `text.format`), `schema_param` the field of its schema.
pub(crate) fn format_constraint(
    model: &Loaded,
    grammar: Grammar,
    param: &str,
    schema_param: &str,
) -> Result<Constraint, ApiError> {
    let grammars = model.grammars().map_err(|why| {
        ApiError::field(
            param,
            format!("structured output is not available for this model: {why}"),
        )
    })?;
    let param = match grammar {
        Grammar::JsonSchema(_) => schema_param,
        _ => param,
    };
    grammars
        .compile(&grammar)
        .map_err(|e| ApiError::field(param, format!("{param}: {e}")))
}

fn response_format(model: &Loaded, value: &Value) -> Result<Option<Constraint>, ApiError> {
    match request::response_format(value)? {
        None => Ok(None),
        Some(g) => format_constraint(
            model,
            g,
            "response_format",
            "response_format.json_schema.schema",
        )
        .map(Some),
    }
}

/// The constraint of a request with tools: calls limited to the functions and their
/// parameter schemas (after the opening tag, under `auto`).
fn tool_constraint(
    model: &Loaded,
    format: ToolFormat,
    spec: &llama_runtime::ToolSpec,
) -> Result<Option<Constraint>, ApiError> {
    let grammars = model.grammars().map_err(|why| {
        ApiError::field(
            "tools",
            format!("tool calls are not available for this model: {why}"),
        )
    })?;
    format
        .constraint(grammars, spec)
        .map_err(|e| ApiError::from_runtime(e, "tools"))
}

/// A conversation as every chat dialect reads it (chat completions, Responses,
/// Anthropic Messages): messages in OpenAI's chat shape, the functions and how they
/// may be called, the output format, and the options of generation.
pub(crate) struct Conversation {
    pub messages: Vec<Value>,
    pub tools: Option<ToolSpec>,
    /// The compiled output format, and the field that asked for it.
    pub format: Option<(Constraint, &'static str)>,
    /// Text the answer continues (an assistant message at the end of the messages).
    pub prefill: String,
    /// The field that holds the messages, named in errors.
    pub param: &'static str,
}

/// The prompt of a conversation, as the model's chat template renders it with the
/// functions described, and how the model calls them.
pub(crate) fn prompt_ids(
    model: &Loaded,
    conv: &Conversation,
) -> Result<(Vec<u32>, ToolFormat), ApiError> {
    let param = conv.param;
    let template = model.template.as_ref().map_err(|why| {
        ApiError::field(
            param,
            format!("{why}: chat completions need one; use /v1/completions"),
        )
    })?;
    let format = ToolFormat::detect(template, &model.tokenizer);
    let mut text = format
        .prompt(template, &conv.messages, conv.tools.as_ref())
        .map_err(|e| ApiError::from_runtime(e, param))?;
    text.push_str(&conv.prefill);
    let prompt = model
        .tokenizer
        .encode_plain(&text)
        .map_err(|e| ApiError::from_runtime(e, param))?;
    Ok((prompt, format))
}

/// The one planner of the chat dialects: a conversation and its options become
/// prompt ids, generation options and a constraint, per choice.
pub(crate) fn plan_conversation(
    model: &Loaded,
    conv: Conversation,
    common: &mut Common,
    n: usize,
    logprobs: Option<usize>,
) -> Result<Plan, ApiError> {
    let param = conv.param;
    let (prompt, format) = prompt_ids(model, &conv)?;
    let spec = conv.tools;
    let mut base = base_options(model, common, logprobs)?;
    let (constraint, format_param) = match conv.format {
        Some((c, p)) => (Some(c), p),
        None => (None, ""),
    };
    base.constraint = constraint;
    if let Some(spec) = spec.as_ref().filter(|s| s.active()) {
        if base.constraint.is_some() {
            return Err(ApiError::field(
                format_param,
                format!("{format_param} and tools cannot both constrain one answer; use tool_choice none or drop one"),
            ));
        }
        base.constraint = tool_constraint(model, format, spec)?;
    } else if let Some(spec) = spec.as_ref().filter(|_| base.constraint.is_none()) {
        // `none`: no call may start.
        base.constraint = tool_constraint(model, format, spec)?;
    }
    let jobs = (0..n)
        .map(|i| job(model, common, prompt.clone(), &base, i, param))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        kind: Kind::Chat,
        jobs,
        n,
        stream: common.stream,
        include_usage: common.include_usage(),
        logprobs,
        echo: Vec::new(),
        prompt_tokens: prompt.len(),
        tools: spec.filter(|s| s.active()).map(|_| format),
    })
}

fn plan_chat(model: &Loaded, value: &Value) -> Result<Plan, ApiError> {
    request::refuse_unsupported(value, true)?;
    let mut common: Common = request::parse(value)?;
    common.check_stream_options()?;
    let fields: ChatFields = request::parse(value)?;
    let messages = fields.messages()?;
    let logprobs = fields.logprobs()?;
    let tools = request::tool_spec(value)?;
    let n = common.n()?;
    let format = response_format(model, value)?.map(|c| (c, "response_format"));
    let conv = Conversation {
        messages,
        tools,
        format,
        prefill: String::new(),
        param: "messages",
    };
    plan_conversation(model, conv, &mut common, n, logprobs)
}

fn plan_completion(model: &Loaded, value: &Value) -> Result<Plan, ApiError> {
    request::refuse_unsupported(value, false)?;
    let mut common: Common = request::parse(value)?;
    common.check_stream_options()?;
    let fields: CompletionFields = request::parse(value)?;
    let logprobs = fields.logprobs()?;
    let encode = |t: &str| {
        model
            .tokenizer
            .encode(t)
            .map_err(|e| ApiError::from_runtime(e, "prompt"))
    };
    let prompts: Vec<Vec<u32>> = match &fields.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(lists) => lists.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::field("prompt", "the prompt list is empty"));
    }
    if prompts.len() > request::MAX_N as usize {
        return Err(ApiError::field(
            "prompt",
            format!(
                "{} prompts in one request; at most {}",
                prompts.len(),
                request::MAX_N
            ),
        ));
    }
    let echo = if fields.echo {
        prompts
            .iter()
            .map(|p| {
                model
                    .tokenizer
                    .decode(p)
                    .map_err(|e| ApiError::from_runtime(e, "prompt"))
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let n = common.n()?;
    let mut base = base_options(model, &mut common, logprobs)?;
    base.constraint = response_format(model, value)?;
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let mut jobs = Vec::with_capacity(prompts.len() * n);
    for p in &prompts {
        for i in 0..n {
            jobs.push(job(model, &common, p.clone(), &base, i, "prompt")?);
        }
    }
    Ok(Plan {
        kind: Kind::Completion,
        jobs,
        n,
        stream: common.stream,
        include_usage: common.include_usage(),
        logprobs,
        echo,
        prompt_tokens,
        tools: None,
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> AppResult {
    let arrived = Instant::now();
    let value = body(bytes, state.config.body_limit)?;
    let model = state.model(&value).await?;
    model.service()?; // an embedding model says so before any field is read
    let plan = plan_chat(&model, &value)?;
    respond(state, model, plan, arrived).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> AppResult {
    let arrived = Instant::now();
    let value = body(bytes, state.config.body_limit)?;
    let model = state.model(&value).await?;
    model.service()?;
    let plan = plan_completion(&model, &value)?;
    respond(state, model, plan, arrived).await
}

/// Counts a request in flight for as long as it lives.
pub(crate) struct InFlight(Arc<AppState>);

impl InFlight {
    pub(crate) fn new(state: &Arc<AppState>) -> Self {
        state.metrics.in_flight(1.0);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight(-1.0);
    }
}

async fn respond(state: Arc<AppState>, model: Lease, plan: Plan, arrived: Instant) -> AppResult {
    let guard = InFlight::new(&state);
    let param = match plan.kind {
        Kind::Chat => "messages",
        Kind::Completion => "prompt",
    };
    let jobs = plan.jobs;
    let choices = jobs.len();
    let running = Running::start(state.clone(), model.clone(), jobs, arrived, param).await?;
    let id = state.id(match plan.kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let shape = Shape {
        kind: plan.kind,
        id,
        model: model.name.clone(),
        created: crate::state::now(),
        n: plan.n,
        echo: plan.echo,
        logprobs: plan.logprobs,
        prompt_tokens: plan.prompt_tokens,
        tools: plan.tools,
        lease: model,
    };
    if plan.stream {
        let stream = SseState {
            running,
            shape,
            pending: VecDeque::new(),
            started: vec![false; choices],
            offsets: vec![0; choices],
            parsers: (0..choices)
                .map(|_| plan.tools.map(ToolParser::new))
                .collect(),
            called: vec![false; choices],
            generated: 0,
            cached: 0,
            drafts: Drafts::default(),
            include_usage: plan.include_usage,
            ended: false,
            _guard: guard,
        };
        let events = futures_util::stream::unfold(stream, |mut s| async move {
            s.next_event().await.map(|e| (Ok::<_, Infallible>(e), s))
        });
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    collect(running, shape, choices).await
}

/// Speculative draft tokens of a request's sequences: verified, and accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drafts {
    pub drafted: usize,
    pub accepted: usize,
}

impl Drafts {
    pub(crate) fn add(&mut self, g: &Generation) {
        self.drafted += g.drafted;
        self.accepted += g.accepted;
    }

    /// OpenAI's names for predicted tokens that were and were not kept (its
    /// Predicted Outputs), which is what drafts are.
    pub(crate) fn details(self) -> Value {
        json!({
            "accepted_prediction_tokens": self.accepted,
            "rejected_prediction_tokens": self.drafted - self.accepted.min(self.drafted),
        })
    }
}

/// What every response of one request shares.
struct Shape {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    n: usize,
    echo: Vec<String>,
    logprobs: Option<usize>,
    prompt_tokens: usize,
    tools: Option<ToolFormat>,
    lease: Lease,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn usage(&self, generated: usize, cached: usize, drafts: Drafts) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": self.prompt_tokens + generated,
            "prompt_tokens_details": { "cached_tokens": cached },
            "completion_tokens_details": drafts.details(),
        })
    }

    fn token_text(&self, id: u32) -> String {
        self.lease.tokenizer.decode(&[id]).unwrap_or_default()
    }

    /// Chat's `logprobs.content` entries for some tokens.
    fn chat_logprobs(&self, tokens: &[(u32, TokenLogprob)]) -> Value {
        let entry = |id: u32, lp: f32| {
            let t = self.token_text(id);
            json!({ "token": t, "logprob": lp, "bytes": t.as_bytes() })
        };
        let content: Vec<Value> = tokens
            .iter()
            .map(|(id, lp)| {
                let mut e = entry(*id, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
                e
            })
            .collect();
        json!({ "content": content })
    }

    /// Completions' `logprobs` object; `offset` is where the first token's text
    /// starts in the choice's text.
    fn completion_logprobs(&self, tokens: &[(u32, TokenLogprob)], mut offset: usize) -> Value {
        let mut texts = Vec::new();
        let mut lps = Vec::new();
        let mut tops = Vec::new();
        let mut offsets = Vec::new();
        for (id, lp) in tokens {
            let t = self.token_text(*id);
            offsets.push(offset);
            offset += t.len();
            texts.push(t);
            lps.push(lp.logprob);
            let top: serde_json::Map<String, Value> = lp
                .top
                .iter()
                .map(|&(i, l)| (self.token_text(i), json!(l)))
                .collect();
            tops.push(Value::Object(top));
        }
        json!({
            "tokens": texts,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        })
    }

    fn logprobs_value(&self, tokens: &[(u32, TokenLogprob)], offset: usize) -> Value {
        match (self.logprobs, self.kind) {
            (None, _) => Value::Null,
            (Some(_), Kind::Chat) => self.chat_logprobs(tokens),
            (Some(_), Kind::Completion) => self.completion_logprobs(tokens, offset),
        }
    }

    fn echo_for(&self, choice: usize) -> &str {
        self.echo.get(choice / self.n).map_or("", String::as_str)
    }
}

async fn collect(mut running: Running, shape: Shape, choices: usize) -> AppResult {
    let mut done: Vec<Option<Generation>> = vec![None; choices];
    let mut lps: Vec<Vec<(u32, TokenLogprob)>> = vec![Vec::new(); choices];
    while let Some((i, update)) = running.next().await {
        match update {
            Update::Piece {
                token: Some((id, Some(lp))),
                ..
            } => lps[i].push((id, lp)),
            Update::Piece { .. } => {}
            Update::Done(g) => done[i] = Some(g),
            Update::Failed(e) => return Err(e),
        }
    }
    let mut generated = 0;
    let mut cached = 0;
    let mut drafts = Drafts::default();
    let mut out = Vec::with_capacity(choices);
    for (i, g) in done.into_iter().enumerate() {
        let g = g.ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "a sequence ended without a result",
            )
        })?;
        generated += g.ids.len();
        drafts.add(&g);
        if i % shape.n == 0 {
            cached += g.cached_tokens;
        }
        let mut reason = finish_reason(g.finish);
        out.push(match shape.kind {
            Kind::Chat => {
                let message = match shape.tools {
                    Some(format) => {
                        let parsed = format.parse(&g.text);
                        if !parsed.calls.is_empty() && reason == "stop" {
                            reason = "tool_calls";
                        }
                        tool_message(parsed)
                    }
                    None => json!({ "role": "assistant", "content": g.text }),
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": shape.logprobs_value(&lps[i], 0),
                    "finish_reason": reason,
                })
            }
            Kind::Completion => {
                let echo = shape.echo_for(i);
                json!({
                    "index": i,
                    "text": format!("{echo}{}", g.text),
                    "logprobs": shape.logprobs_value(&lps[i], echo.len()),
                    "finish_reason": reason,
                })
            }
        });
    }
    Ok(Json(json!({
        "id": shape.id,
        "object": shape.object(false),
        "created": shape.created,
        "model": shape.model,
        "system_fingerprint": fingerprint(),
        "choices": out,
        "usage": shape.usage(generated, cached, drafts),
    }))
    .into_response())
}

/// An answer with tools as OpenAI's assistant message: the text (`null` when there
/// is none beside calls) and the calls.
fn tool_message(parsed: Parsed) -> Value {
    let content = if parsed.content.is_empty() && !parsed.calls.is_empty() {
        Value::Null
    } else {
        json!(parsed.content)
    };
    let mut m = json!({ "role": "assistant", "content": content });
    if !parsed.calls.is_empty() {
        m["tool_calls"] = parsed
            .calls
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "type": "function",
                    "function": { "name": c.name, "arguments": c.arguments },
                })
            })
            .collect();
    }
    m
}

pub(crate) fn fingerprint() -> String {
    format!("llama.rs-{}", env!("CARGO_PKG_VERSION"))
}

/// A streaming response: the request's sequences and what is left to send.
struct SseState {
    running: Running,
    shape: Shape,
    pending: VecDeque<SseEvent>,
    started: Vec<bool>,
    /// Bytes of text sent per choice (completions' `text_offset`).
    offsets: Vec<usize>,
    /// Per choice, the reader of tool calls (requests with tools).
    parsers: Vec<Option<ToolParser>>,
    /// Per choice, whether a call was sent.
    called: Vec<bool>,
    generated: usize,
    cached: usize,
    drafts: Drafts,
    include_usage: bool,
    ended: bool,
    _guard: InFlight,
}

impl SseState {
    fn chunk(&self, choices: Vec<Value>) -> SseEvent {
        let mut c = json!({
            "id": self.shape.id,
            "object": self.shape.object(true),
            "created": self.shape.created,
            "model": self.shape.model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        SseEvent::default().data(c.to_string())
    }

    fn choice(&self, i: usize, text: &str, lp: Value, finish: Option<&str>, role: bool) -> Value {
        match self.shape.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if role || !text.is_empty() {
                    delta["content"] = json!(text);
                }
                json!({ "index": i, "delta": delta, "logprobs": lp, "finish_reason": finish })
            }
            Kind::Completion => {
                json!({ "index": i, "text": text, "logprobs": lp, "finish_reason": finish })
            }
        }
    }

    /// Chunks of tool-call deltas (and text between calls) for choice `i`.
    fn tool_chunks(&mut self, i: usize, deltas: Vec<ToolDelta>, lp: Value) {
        let mut lp = Some(lp);
        for d in deltas {
            let delta = match d {
                ToolDelta::Content(t) => json!({ "content": t }),
                ToolDelta::Start { index, id, name } => {
                    self.called[i] = true;
                    json!({ "tool_calls": [{
                        "index": index, "id": id, "type": "function",
                        "function": { "name": name, "arguments": "" },
                    }] })
                }
                ToolDelta::Arguments { index, text } => json!({ "tool_calls": [{
                    "index": index, "function": { "arguments": text },
                }] }),
            };
            let c = json!({
                "index": i, "delta": delta,
                "logprobs": lp.take().unwrap_or(Value::Null), "finish_reason": null,
            });
            let e = self.chunk(vec![c]);
            self.pending.push_back(e);
        }
        // Log-probabilities of tokens that made no delta yet still go out.
        if let Some(lp) = lp.filter(|v| !v.is_null()) {
            let c = json!({ "index": i, "delta": {}, "logprobs": lp, "finish_reason": null });
            let e = self.chunk(vec![c]);
            self.pending.push_back(e);
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
            let Some((i, update)) = self.running.next().await else {
                self.end();
                continue;
            };
            if !self.started[i] {
                self.started[i] = true;
                let echo = self.shape.echo_for(i).to_string();
                let first = match self.shape.kind {
                    Kind::Chat => Some(self.choice(i, "", Value::Null, None, true)),
                    Kind::Completion if !echo.is_empty() => {
                        self.offsets[i] += echo.len();
                        Some(self.choice(i, &echo, Value::Null, None, false))
                    }
                    Kind::Completion => None,
                };
                if let Some(c) = first {
                    let e = self.chunk(vec![c]);
                    self.pending.push_back(e);
                }
            }
            match update {
                Update::Piece { text, token } => {
                    let lp = match token {
                        Some((id, Some(lp))) if self.shape.logprobs.is_some() => {
                            self.shape.logprobs_value(&[(id, lp)], self.offsets[i])
                        }
                        _ => Value::Null,
                    };
                    if let Some(parser) = self.parsers[i].as_mut() {
                        let deltas = parser.push(&text);
                        self.tool_chunks(i, deltas, lp);
                        continue;
                    }
                    if text.is_empty() && lp.is_null() {
                        continue;
                    }
                    self.offsets[i] += text.len();
                    let c = self.choice(i, &text, lp, None, false);
                    let e = self.chunk(vec![c]);
                    self.pending.push_back(e);
                }
                Update::Done(g) => {
                    self.generated += g.ids.len();
                    self.drafts.add(&g);
                    if i % self.shape.n == 0 {
                        self.cached += g.cached_tokens;
                    }
                    if let Some(parser) = self.parsers[i].as_mut() {
                        let deltas = parser.finish();
                        self.tool_chunks(i, deltas, Value::Null);
                    }
                    let mut reason = finish_reason(g.finish);
                    if self.called[i] && reason == "stop" {
                        reason = "tool_calls";
                    }
                    let c = self.choice(i, "", Value::Null, Some(reason), false);
                    let e = self.chunk(vec![c]);
                    self.pending.push_back(e);
                }
                Update::Failed(err) => {
                    self.pending
                        .push_back(SseEvent::default().data(err.body().to_string()));
                    self.ended = true;
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                }
            }
        }
    }

    fn end(&mut self) {
        self.ended = true;
        if self.include_usage {
            let usage = json!({
                "id": self.shape.id,
                "object": self.shape.object(true),
                "created": self.shape.created,
                "model": self.shape.model,
                "system_fingerprint": fingerprint(),
                "choices": [],
                "usage": self.shape.usage(self.generated, self.cached, self.drafts),
            });
            self.pending
                .push_back(SseEvent::default().data(usage.to_string()));
        }
        self.pending.push_back(SseEvent::default().data("[DONE]"));
    }
}
