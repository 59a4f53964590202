//! What goes wrong in an agent run: [`AgentError`] ends a run before it can finish;
//! [`ToolError`] is one tool call's failure, which the runner hands back to the model
//! (or stops on, when asked to).
use std::time::Duration;

/// A run that cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The engine failed (loading, tokenizing, a step).
    #[error(transparent)]
    Runtime(#[from] llama_runtime::RuntimeError),
    /// The retrieval store failed.
    #[error(transparent)]
    Rag(#[from] llama_rag::RagError),
    /// The tools cannot be offered: a bad name, a name used twice, a parameter schema
    /// that is not an object or that the decoder cannot enforce.
    #[error("tools: {0}")]
    Tools(String),
    /// The graph of nodes is malformed (a node that does not exist, a node missing
    /// from the toolbox, a loop that never reaches a model turn).
    #[error("agent graph: {0}")]
    Graph(String),
    /// The conversation no longer fits the model's context.
    #[error("the conversation ({tokens} tokens) no longer fits the context of {context}")]
    Context { tokens: usize, context: usize },
}

/// One tool call's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// The arguments are not what the tool takes.
    #[error("bad arguments: {0}")]
    Arguments(String),
    /// The tool ran and failed.
    #[error("{0}")]
    Failed(String),
    /// No tool of that name is in the toolbox.
    #[error("there is no tool named `{name}` (the tools are: {known})")]
    Unknown { name: String, known: String },
    /// The tool did not return within its deadline; its thread is left behind.
    #[error("no result after {0:?}: the call was abandoned")]
    Timeout(Duration),
    /// The tool panicked.
    #[error("the tool crashed")]
    Panicked,
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
