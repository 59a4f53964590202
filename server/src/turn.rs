//! One answer of one conversation as the Responses and Anthropic dialects see it: the
//! planned request runs on the engine (the same jobs as chat completions), and its
//! tokens come back as steps of text and tool calls, which each dialect formats as
//! its own events or collects into its own response object.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use llama_runtime::{FinishReason, Generation, ToolCall, ToolDelta, ToolParser};

use crate::error::ApiError;
use crate::jobs::{Running, Update};
use crate::models::Lease;
use crate::routes::{InFlight, Plan};
use crate::state::{AppState, Loaded};

/// A step of an answer.
#[derive(Debug, Clone)]
pub enum Step {
    Text(String),
    /// A call begins: its id and name.
    CallStart {
        id: String,
        name: String,
    },
    /// More of the arguments of the call that began last.
    CallArguments(String),
    Done(Finished),
    Failed(ApiError),
}

/// How an answer ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub output_tokens: usize,
    /// Whether the answer holds calls.
    pub called: bool,
    /// The ids generated (to tell which stop string ended it).
    pub ids: Vec<u32>,
    /// Speculative draft tokens verified and accepted.
    pub drafts: crate::routes::Drafts,
}

/// A piece of a whole answer, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text(String),
    Call(ToolCall),
}

/// A whole answer.
pub struct Outcome {
    pub blocks: Vec<Block>,
    pub finished: Finished,
    /// The model that answered.
    pub model: Lease,
}

/// The running answer.
pub struct Turn {
    running: Running,
    parser: Option<ToolParser>,
    pending: VecDeque<Step>,
    /// Whitespace held while no text run is open: shown if text follows, dropped
    /// before a call or at the end (the newline between calls is call syntax).
    held: String,
    text_open: bool,
    called: bool,
    prompt_tokens: usize,
    ended: bool,
    _guard: InFlight,
}

impl Turn {
    /// Submits the plan's one job.
    /// Submits the plan's one job; `param` is the field of the prompt, named when the
    /// engine refuses it.
    pub async fn start(
        state: Arc<AppState>,
        model: Lease,
        plan: Plan,
        arrived: Instant,
        param: &'static str,
    ) -> Result<Turn, ApiError> {
        let guard = InFlight::new(&state);
        let running = Running::start(state, model, plan.jobs, arrived, param).await?;
        Ok(Turn {
            running,
            parser: plan.tools.map(ToolParser::new),
            pending: VecDeque::new(),
            held: String::new(),
            text_open: false,
            called: false,
            prompt_tokens: plan.prompt_tokens,
            ended: false,
            _guard: guard,
        })
    }

    /// The model the turn runs on.
    pub fn model(&self) -> &Lease {
        self.running.model()
    }

    /// Tokens of the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    fn text(&mut self, t: String) {
        if t.is_empty() {
            return;
        }
        if !self.text_open && t.trim().is_empty() {
            self.held.push_str(&t);
            return;
        }
        self.text_open = true;
        let t = std::mem::take(&mut self.held) + &t;
        self.pending.push_back(Step::Text(t));
    }

    fn deltas(&mut self, deltas: Vec<ToolDelta>) {
        for d in deltas {
            match d {
                ToolDelta::Content(t) => self.text(t),
                ToolDelta::Start { id, name, .. } => {
                    self.held.clear();
                    self.text_open = false;
                    self.called = true;
                    self.pending.push_back(Step::CallStart { id, name });
                }
                ToolDelta::Arguments { text, .. } => {
                    self.pending.push_back(Step::CallArguments(text))
                }
            }
        }
    }

    fn done(&mut self, g: Generation) {
        if let Some(p) = self.parser.as_mut() {
            let d = p.finish();
            self.deltas(d);
        }
        self.held.clear();
        self.pending.push_back(Step::Done(Finished {
            finish: g.finish,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: g.cached_tokens,
            output_tokens: g.ids.len(),
            called: self.called,
            drafts: crate::routes::Drafts {
                drafted: g.drafted,
                accepted: g.accepted,
            },
            ids: g.ids,
        }));
    }

    /// The next step; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<Step> {
        loop {
            if let Some(s) = self.pending.pop_front() {
                if matches!(s, Step::Done(_) | Step::Failed(_)) {
                    self.ended = true;
                }
                return Some(s);
            }
            if self.ended {
                return None;
            }
            let Some((_, update)) = self.running.next().await else {
                self.pending.push_back(Step::Failed(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the sequence ended without a result",
                )));
                continue;
            };
            match update {
                Update::Piece { text, .. } => match self.parser.as_mut() {
                    Some(p) => {
                        let d = p.push(&text);
                        self.deltas(d);
                    }
                    None => self.text(text),
                },
                Update::Done(g) => self.done(g),
                Update::Failed(e) => self.pending.push_back(Step::Failed(e)),
            }
        }
    }

    /// The whole answer.
    pub async fn collect(mut self) -> Result<Outcome, ApiError> {
        let mut blocks: Vec<Block> = Vec::new();
        while let Some(step) = self.next().await {
            match step {
                Step::Text(t) => match blocks.last_mut() {
                    Some(Block::Text(s)) => s.push_str(&t),
                    _ => blocks.push(Block::Text(t)),
                },
                Step::CallStart { id, name } => blocks.push(Block::Call(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                })),
                Step::CallArguments(text) => {
                    if let Some(Block::Call(c)) = blocks.last_mut() {
                        c.arguments.push_str(&text);
                    }
                }
                Step::Done(finished) => {
                    return Ok(Outcome {
                        blocks,
                        finished,
                        model: self.model().clone(),
                    })
                }
                Step::Failed(e) => return Err(e),
            }
        }
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the sequence ended without a result",
        ))
    }
}

/// Which of `stops` ended an answer whose ids are `ids` (the stop string is not in
/// the answer's text, but its tokens were generated): the one that occurs first.
pub fn which_stop(model: &Loaded, ids: &[u32], stops: &[String]) -> Option<String> {
    let text = model.tokenizer.decode(ids).ok()?;
    stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
        .min_by_key(|(at, _)| *at)
        .map(|(_, s)| s.clone())
}
