//! The agent as a graph of typed nodes: model turns, tool calls, retrieval and
//! branches over a shared [`State`](crate::State). [`Graph::tool_loop`] is the loop
//! `llama agent` runs.
use std::fmt;
use std::sync::Arc;

use llama_runtime::ToolChoice;

use crate::error::{AgentError, Result};
use crate::runner::State;
use crate::tool::Toolbox;

/// A node's index in its graph.
pub type NodeId = usize;

/// What the final answer turn is told when the model would only repeat a call: the
/// tools stay in the prompt (the history holds calls to them) but the constraint
/// forbids a call, and this turns it to the results it already has.
pub const ANSWER_INSTRUCTION: &str = "Answer my request now in plain text, using the tool \
results above. Do not call any tool.";

/// The instruction of the turn after a retrieval: answer from the passages, citing
/// them, or search again.
pub const RETRIEVED_INSTRUCTION: &str = "Answer my request from the search results above \
in one or two sentences of your own, citing the number of each passage you use in \
brackets, like [1]. Call a tool only if the results do not hold the answer.";

/// The final answer turn's instruction when the tools include a search: sources cited.
pub const CITED_ANSWER_INSTRUCTION: &str = "Answer my request now in plain text, using the \
search results above. Do not call any tool. After each fact, cite the number of the \
passage it comes from in brackets, like [2].";

/// One step of an agent.
#[derive(Clone)]
pub enum Node {
    /// A model turn with the toolbox shown. `choice` says whether it may call
    /// (`Auto`, `Required`, a named function) or must answer in text (`None`);
    /// `instruction`, when set, is added as a user message before the turn. A turn
    /// that may call counts as one round against the round limit.
    Generate {
        choice: ToolChoice,
        instruction: Option<String>,
        next: NodeId,
    },
    /// Runs the calls of the last turn, each under the tool timeout, and adds the
    /// call and its result (or error) to the conversation.
    CallTools { next: NodeId },
    /// Calls the tool `tool` with `{argument: <the task>}` without asking the model
    /// (retrieval before the first turn), and adds call and result to the
    /// conversation as if the model had made it.
    Retrieve {
        tool: String,
        argument: String,
        next: NodeId,
    },
    /// Goes to `then` when `condition` holds on the state, else to `otherwise`.
    Branch {
        condition: Condition,
        then: NodeId,
        otherwise: NodeId,
    },
    /// The run is over; the last text turn is the answer.
    End,
}

/// A test on the state.
#[derive(Clone)]
pub enum Condition {
    /// The last turn made calls.
    Calls,
    /// Every call of the last turn was made before with the same name and arguments
    /// (its result is already in the conversation): a model going round in circles.
    RepeatedCalls,
    /// Every call the last tool node ran returned a result an earlier call had
    /// already returned: the round brought nothing new (a model calling a tool on its
    /// own result).
    StaleResults,
    /// A test of the program's own, with a name for the trace.
    Custom {
        name: String,
        test: Arc<dyn Fn(&State) -> bool + Send + Sync>,
    },
}

impl Condition {
    pub fn holds(&self, state: &State) -> bool {
        match self {
            Condition::Calls => !state.pending.is_empty(),
            Condition::RepeatedCalls => {
                !state.pending.is_empty()
                    && state
                        .pending
                        .iter()
                        .all(|c| state.answered(&c.name, &c.arguments).is_some())
            }
            Condition::StaleResults => {
                let n = state.last_calls.min(state.calls.len());
                let (before, last) = state.calls.split_at(state.calls.len() - n);
                n > 0
                    && last
                        .iter()
                        .all(|(_, _, r)| before.iter().any(|(_, _, b)| b == r))
            }
            Condition::Custom { test, .. } => test(state),
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Calls => f.write_str("the turn made calls"),
            Condition::RepeatedCalls => f.write_str("every call repeats an answered one"),
            Condition::StaleResults => f.write_str("every result repeats an earlier one"),
            Condition::Custom { name, .. } => f.write_str(name),
        }
    }
}

/// Nodes and where to start.
#[derive(Clone)]
pub struct Graph {
    nodes: Vec<Node>,
    start: NodeId,
}

impl Graph {
    /// A graph of `nodes` that starts at `start`; checked before every run.
    pub fn new(nodes: Vec<Node>, start: NodeId) -> Graph {
        Graph { nodes, start }
    }

    /// The tool-calling loop: (retrieve with `retrieve`'s tool first, when given) a
    /// turn that may call; no call ends the run with its text as the answer; calls
    /// that were all made before go to a final turn that must answer in text; other
    /// calls run and the loop goes round again, unless every result repeats an earlier
    /// one (then the final turn), until the round limit. With a retrieval the final
    /// turn is asked to cite its sources.
    ///
    /// `first_call` makes the first turn call a tool (`Required`) when no retrieval
    /// comes first: small models asked a task with tools at hand often write the call
    /// as prose instead of making it; forced, they make it.
    pub fn tool_loop(retrieve: Option<(&str, &str)>, first_call: bool) -> Graph {
        const TURN: NodeId = 1;
        const CALLS: NodeId = 2;
        const REPEAT: NodeId = 3;
        const RUN: NodeId = 4;
        const ANSWER: NodeId = 5;
        const END: NodeId = 6;
        const STALE: NodeId = 7;
        const FIRST_AFTER_RETRIEVAL: NodeId = 8;
        let first = match retrieve {
            Some((tool, argument)) => Node::Retrieve {
                tool: tool.to_string(),
                argument: argument.to_string(),
                next: FIRST_AFTER_RETRIEVAL,
            },
            None if first_call => Node::Generate {
                choice: ToolChoice::Required,
                instruction: None,
                next: CALLS,
            },
            // Never reached (the graph starts at the turn); an `End` keeps `choices()`
            // from preparing a `Required` constraint no turn uses.
            None => Node::End,
        };
        let nodes = vec![
            first,
            Node::Generate {
                choice: ToolChoice::Auto,
                instruction: None,
                next: CALLS,
            },
            Node::Branch {
                condition: Condition::Calls,
                then: REPEAT,
                otherwise: END,
            },
            Node::Branch {
                condition: Condition::RepeatedCalls,
                then: ANSWER,
                otherwise: RUN,
            },
            Node::CallTools { next: STALE },
            Node::Generate {
                choice: ToolChoice::None,
                instruction: Some(
                    if retrieve.is_some() {
                        CITED_ANSWER_INSTRUCTION
                    } else {
                        ANSWER_INSTRUCTION
                    }
                    .into(),
                ),
                next: END,
            },
            Node::End,
            Node::Branch {
                condition: Condition::StaleResults,
                then: ANSWER,
                otherwise: TURN,
            },
            Node::Generate {
                choice: ToolChoice::Auto,
                instruction: Some(RETRIEVED_INSTRUCTION.into()),
                next: CALLS,
            },
        ];
        let start = if retrieve.is_some() || first_call {
            0
        } else {
            TURN
        };
        Graph::new(nodes, start)
    }

    pub fn start(&self) -> NodeId {
        self.start
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// The tool choices of its turns (each is prepared once before a run).
    pub fn choices(&self) -> Vec<ToolChoice> {
        let mut out: Vec<ToolChoice> = Vec::new();
        for n in &self.nodes {
            if let Node::Generate { choice, .. } = n {
                if !out.contains(choice) {
                    out.push(choice.clone());
                }
            }
        }
        out
    }

    /// Every edge leads to a node, and every tool a node names is in `tools`.
    pub fn check(&self, tools: &Toolbox) -> Result<()> {
        let n = self.nodes.len();
        let edge = |from: NodeId, to: NodeId| {
            if to < n {
                Ok(())
            } else {
                Err(AgentError::Graph(format!(
                    "node {from} leads to node {to}, and there are {n}"
                )))
            }
        };
        edge(usize::MAX, self.start).map_err(|_| {
            AgentError::Graph(format!("the start node {} does not exist", self.start))
        })?;
        for (i, node) in self.nodes.iter().enumerate() {
            match node {
                Node::Generate { choice, next, .. } => {
                    edge(i, *next)?;
                    if let ToolChoice::Function(name) = choice {
                        if tools.get(name).is_none() {
                            return Err(AgentError::Graph(format!(
                                "node {i} requires the tool `{name}`, which is not among the tools"
                            )));
                        }
                    }
                }
                Node::CallTools { next } => edge(i, *next)?,
                Node::Retrieve { tool, next, .. } => {
                    edge(i, *next)?;
                    if tools.get(tool).is_none() {
                        return Err(AgentError::Graph(format!(
                            "node {i} retrieves with the tool `{tool}`, which is not among the tools"
                        )));
                    }
                }
                Node::Branch {
                    then, otherwise, ..
                } => {
                    edge(i, *then)?;
                    edge(i, *otherwise)?;
                }
                Node::End => {}
            }
        }
        Ok(())
    }
}
