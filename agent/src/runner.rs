//! The runner: walks a [`Graph`] over a shared [`State`], under a round limit, a
//! token budget and a timeout per tool call, and records every step.
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use llama_runtime::{ToolCall, ToolChoice};
use serde_json::{json, Value};

use crate::error::{AgentError, Result, ToolError};
use crate::graph::{Graph, Node, NodeId};
use crate::model::{timed, Model};
use crate::tool::Toolbox;

/// What a run may spend.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Model turns that may call tools; the next one ends the run.
    pub max_rounds: usize,
    /// Tokens all turns together may generate.
    pub max_tokens: usize,
    /// Tokens one turn may generate.
    pub turn_tokens: usize,
    /// How long one tool call may take.
    pub tool_timeout: Duration,
    /// Nodes visited in one run, at most (a graph that loops without a model turn).
    pub max_steps: usize,
    /// End the run at the first tool error instead of handing it to the model.
    pub stop_on_tool_error: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rounds: 5,
            max_tokens: 2048,
            turn_tokens: 256,
            tool_timeout: Duration::from_secs(10),
            max_steps: 1000,
            stop_on_tool_error: false,
        }
    }
}

/// What the nodes share.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// The conversation, in OpenAI's shape.
    pub messages: Vec<Value>,
    /// The calls of the last turn that have not run yet.
    pub pending: Vec<ToolCall>,
    /// The text of the last turn.
    pub text: String,
    /// Every call run: name, arguments (canonical JSON) and what the model was given.
    pub calls: Vec<(String, String, String)>,
    /// How many of `calls` the last tool node ran (they are the last ones).
    pub last_calls: usize,
    /// Turns that could call tools so far.
    pub rounds: usize,
    /// Tokens generated so far.
    pub tokens: usize,
    /// Values of the program's own nodes and conditions.
    pub vars: BTreeMap<String, Value>,
}

impl State {
    /// What the model was given for the call of `name` with `arguments`, if it was
    /// made before (arguments compared as JSON values, whatever their spacing or
    /// key order).
    pub fn answered(&self, name: &str, arguments: &str) -> Option<&str> {
        let key = canonical(arguments);
        self.calls
            .iter()
            .find(|(n, a, _)| n == name && *a == key)
            .map(|(_, _, r)| r.as_str())
    }
}

/// `text` as JSON with sorted keys and no spacing, or as it is when not JSON.
fn canonical(text: &str) -> String {
    fn sort(v: Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<String, Value> =
                    m.into_iter().map(|(k, v)| (k, sort(v))).collect();
                Value::Object(sorted.into_iter().collect())
            }
            Value::Array(a) => Value::Array(a.into_iter().map(sort).collect()),
            v => v,
        }
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v) => sort(v).to_string(),
        Err(_) => text.trim().to_string(),
    }
}

/// One step of a run, for the trace.
#[derive(Debug, Clone)]
pub struct Step {
    /// The node that ran.
    pub node: NodeId,
    pub elapsed: Duration,
    pub kind: StepKind,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    /// A model turn.
    Turn {
        choice: ToolChoice,
        text: String,
        calls: Vec<ToolCall>,
        prompt_tokens: usize,
        cached_tokens: usize,
        tokens: usize,
    },
    /// A tool call (from the model, or a retrieval node's).
    Tool {
        name: String,
        arguments: String,
        result: Result<String, ToolError>,
    },
    /// A branch and the way it went.
    Branch { condition: String, taken: bool },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        match &self.kind {
            StepKind::Turn {
                choice,
                text,
                calls,
                prompt_tokens,
                cached_tokens,
                tokens,
            } => {
                let choice = match choice {
                    ToolChoice::None => "answer".to_string(),
                    ToolChoice::Auto => "auto".to_string(),
                    ToolChoice::Required => "required".to_string(),
                    ToolChoice::Function(n) => format!("call {n}"),
                };
                write!(
                    f,
                    "turn ({choice}): {prompt_tokens} prompt tokens ({cached_tokens} cached), \
                     {tokens} generated, {secs:.2}s"
                )?;
                if !text.is_empty() {
                    write!(f, "\n  text: {}", one_line(text, 300))?;
                }
                for c in calls {
                    write!(f, "\n  call: {} {}", c.name, c.arguments)?;
                }
                Ok(())
            }
            StepKind::Tool {
                name,
                arguments,
                result,
            } => {
                write!(f, "tool {name} {arguments} ({secs:.2}s)")?;
                match result {
                    Ok(r) => write!(f, "\n  result: {}", one_line(r, 300)),
                    Err(e) => write!(f, "\n  error: {e}"),
                }
            }
            StepKind::Branch { condition, taken } => {
                write!(
                    f,
                    "branch: {condition}: {}",
                    if *taken { "yes" } else { "no" }
                )
            }
        }
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        flat.chars().take(max).collect::<String>() + "…"
    }
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A turn answered in text.
    Answered,
    /// The round limit came before an answer.
    RoundLimit { rounds: usize },
    /// The token budget was spent before an answer.
    TokenBudget { tokens: usize },
    /// A tool failed and the limits say to stop on tool errors.
    ToolFailed { name: String, error: ToolError },
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Answered => f.write_str("answered"),
            Stop::RoundLimit { rounds } => write!(
                f,
                "the round limit ({rounds}) was reached before an answer: the model kept calling tools"
            ),
            Stop::TokenBudget { tokens } => write!(
                f,
                "the token budget ({tokens} tokens) was spent before an answer"
            ),
            Stop::ToolFailed { name, error } => write!(f, "the tool `{name}` failed: {error}"),
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The answer, when a turn gave one.
    pub answer: Option<String>,
    pub stop: Stop,
    pub state: State,
    pub trace: Vec<Step>,
}

/// A model, its tools, a graph and limits.
pub struct Agent<M: Model> {
    pub model: M,
    pub tools: Toolbox,
    pub graph: Graph,
    pub limits: Limits,
    /// A system message before the task.
    pub system: Option<String>,
}

impl<M: Model> Agent<M> {
    /// The tool loop ([`Graph::tool_loop`]) with default limits.
    pub fn new(model: M, tools: Toolbox) -> Agent<M> {
        Agent {
            model,
            tools,
            graph: Graph::tool_loop(None, false),
            limits: Limits::default(),
            system: None,
        }
    }

    /// Checks the graph and the tools (names, schemas, that the model can enforce
    /// them) without running anything.
    pub fn prepare(&mut self) -> Result<()> {
        self.graph.check(&self.tools)?;
        for choice in self.graph.choices() {
            let spec = self.tools.spec(choice)?;
            self.model.prepare(&spec)?;
        }
        Ok(())
    }

    /// Runs `task` to its end; `on_step` sees each step as it finishes.
    pub fn run(&mut self, task: &str, mut on_step: impl FnMut(&Step)) -> Result<Run> {
        self.prepare()?;
        let mut state = State::default();
        if let Some(system) = &self.system {
            state
                .messages
                .push(json!({ "role": "system", "content": system }));
        }
        state
            .messages
            .push(json!({ "role": "user", "content": task }));
        let mut trace = Vec::new();
        let mut record = |step: Step, trace: &mut Vec<Step>| {
            on_step(&step);
            trace.push(step);
        };
        let mut answer = None;
        let mut at = self.graph.start();
        let mut steps = 0;
        // A stop other than `Answered` clears the answer after the loop.
        let stop = 'run: loop {
            steps += 1;
            if steps > self.limits.max_steps {
                return Err(AgentError::Graph(format!(
                    "{} nodes visited without an end",
                    self.limits.max_steps
                )));
            }
            let Some(node) = self.graph.node(at).cloned() else {
                return Err(AgentError::Graph(format!("node {at} does not exist")));
            };
            match node {
                Node::End => {
                    break Stop::Answered;
                }
                Node::Generate {
                    choice,
                    instruction,
                    next,
                } => {
                    let calls_allowed = choice != ToolChoice::None && !self.tools.is_empty();
                    if calls_allowed {
                        if state.rounds >= self.limits.max_rounds {
                            break Stop::RoundLimit {
                                rounds: self.limits.max_rounds,
                            };
                        }
                        state.rounds += 1;
                    }
                    let left = self.limits.max_tokens.saturating_sub(state.tokens);
                    if left == 0 {
                        break Stop::TokenBudget {
                            tokens: self.limits.max_tokens,
                        };
                    }
                    if let Some(text) = instruction {
                        state
                            .messages
                            .push(json!({ "role": "user", "content": text }));
                    }
                    let spec = self.tools.spec(choice.clone())?;
                    let max = self.limits.turn_tokens.min(left);
                    let (reply, elapsed) = timed(|| self.model.turn(&state.messages, &spec, max));
                    let reply = reply?;
                    state.tokens += reply.tokens;
                    state.text = reply.text.clone();
                    state.pending = reply.calls.clone();
                    record(
                        Step {
                            node: at,
                            elapsed,
                            kind: StepKind::Turn {
                                choice,
                                text: reply.text.clone(),
                                calls: reply.calls.clone(),
                                prompt_tokens: reply.prompt_tokens,
                                cached_tokens: reply.cached_tokens,
                                tokens: reply.tokens,
                            },
                        },
                        &mut trace,
                    );
                    if reply.truncated && reply.tokens >= left {
                        break Stop::TokenBudget {
                            tokens: self.limits.max_tokens,
                        };
                    }
                    if reply.calls.is_empty() {
                        state
                            .messages
                            .push(json!({ "role": "assistant", "content": reply.text.clone() }));
                        answer = Some(reply.text);
                    } else {
                        answer = None;
                    }
                    at = next;
                }
                Node::CallTools { next } => {
                    let calls = std::mem::take(&mut state.pending);
                    if !calls.is_empty() {
                        let shown: Vec<Value> = calls
                            .iter()
                            .map(|c| {
                                // A call cut off by the token limit has arguments that
                                // are not JSON: the history shows `{}` (the template
                                // needs JSON) and its result says what went wrong.
                                let arguments = match serde_json::from_str::<Value>(&c.arguments) {
                                    Ok(_) => c.arguments.clone(),
                                    Err(_) => "{}".to_string(),
                                };
                                json!({ "id": c.id, "type": "function",
                                "function": { "name": c.name, "arguments": arguments } })
                            })
                            .collect();
                        let content = if state.text.is_empty() {
                            Value::Null
                        } else {
                            Value::String(state.text.clone())
                        };
                        state.messages.push(
                            json!({ "role": "assistant", "content": content, "tool_calls": shown }),
                        );
                    }
                    state.last_calls = calls.len();
                    for call in calls {
                        if let Some(stop) =
                            self.call(&mut state, &call, at, &mut |s| record(s, &mut trace))
                        {
                            break 'run stop;
                        }
                    }
                    at = next;
                }
                Node::Retrieve {
                    tool,
                    argument,
                    next,
                } => {
                    let mut args = serde_json::Map::new();
                    args.insert(argument, Value::String(task.to_string()));
                    let arguments = Value::Object(args).to_string();
                    let call = ToolCall {
                        id: format!("call_retrieve_{at}"),
                        name: tool,
                        arguments,
                    };
                    state.messages.push(json!({
                        "role": "assistant", "content": null,
                        "tool_calls": [{ "id": call.id, "type": "function",
                            "function": { "name": call.name, "arguments": call.arguments } }]
                    }));
                    if let Some(stop) =
                        self.call(&mut state, &call, at, &mut |s| record(s, &mut trace))
                    {
                        break 'run stop;
                    }
                    at = next;
                }
                Node::Branch {
                    condition,
                    then,
                    otherwise,
                } => {
                    let taken = condition.holds(&state);
                    record(
                        Step {
                            node: at,
                            elapsed: Duration::ZERO,
                            kind: StepKind::Branch {
                                condition: condition.to_string(),
                                taken,
                            },
                        },
                        &mut trace,
                    );
                    at = if taken { then } else { otherwise };
                }
            }
        };
        if stop != Stop::Answered {
            answer = None;
        }
        Ok(Run {
            answer,
            stop,
            state,
            trace,
        })
    }

    /// Runs one call and adds its result to the conversation; `Some` when the run
    /// must stop.
    fn call(
        &self,
        state: &mut State,
        call: &ToolCall,
        node: NodeId,
        record: &mut dyn FnMut(Step),
    ) -> Option<Stop> {
        let (result, elapsed) = timed(|| {
            self.tools
                .call(&call.name, &call.arguments, self.limits.tool_timeout)
        });
        let content = match &result {
            Ok(text) => text.clone(),
            Err(e) => format!("error: {e}"),
        };
        state.calls.push((
            call.name.clone(),
            canonical(&call.arguments),
            content.clone(),
        ));
        state.messages.push(json!({
            "role": "tool", "tool_call_id": call.id, "name": call.name, "content": content
        }));
        let failed = result.as_ref().err().cloned();
        record(Step {
            node,
            elapsed,
            kind: StepKind::Tool {
                name: call.name.clone(),
                arguments: call.arguments.clone(),
                result,
            },
        });
        match failed {
            Some(error) if self.limits.stop_on_tool_error => Some(Stop::ToolFailed {
                name: call.name.clone(),
                error,
            }),
            _ => None,
        }
    }
}
