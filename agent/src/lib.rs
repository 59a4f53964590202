//! llama-agent: an agent runtime on the engine, in-process.
//!
//! An agent is a [`Graph`] of typed [`Node`]s (a model turn, the tool calls it made,
//! a retrieval, a branch on the [`State`]) that a runner walks under [`Limits`]: a
//! round limit on turns that may call tools, a token budget, a timeout per tool call.
//! Every step lands in the trace with its tool, arguments, result, tokens and time.
//!
//! The model is anything that implements [`Model`]; [`EngineModel`] is the engine's,
//! whose prompts and call parsing are the server's (`llama_runtime::tools`): the
//! model's own chat template and tool-call format, calls constrained to the tools'
//! names and argument schemas. Tools implement [`Tool`]; three come with the crate:
//! [`Calculator`], [`Search`] over a RAG store, and [`FileReader`] over one directory.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use llama_agent::{Agent, Calculator, EngineModel, Toolbox};
//! let engine = llama_runtime::Engine::load(
//!     std::path::Path::new("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
//!     &Default::default(),
//! )?;
//! let tools = Toolbox::new().with(Calculator)?;
//! let mut agent = Agent::new(EngineModel::new(&engine)?, tools);
//! let run = agent.run("What is 1234 * 5678?", |step| eprintln!("{step}"))?;
//! println!("{}", run.answer.unwrap_or_else(|| run.stop.to_string()));
//! # Ok(()) }
//! ```
pub mod calc;
pub mod error;
pub mod files;
pub mod graph;
pub mod model;
pub mod runner;
pub mod search;
pub mod tool;

pub use calc::{evaluate, CalcError, Calculator};
pub use error::{AgentError, Result, ToolError};
pub use files::FileReader;
pub use graph::{
    Condition, Graph, Node, NodeId, ANSWER_INSTRUCTION, CITED_ANSWER_INSTRUCTION,
    RETRIEVED_INSTRUCTION,
};
pub use model::{EngineModel, Model, Reply};
pub use runner::{Agent, Limits, Run, State, Step, StepKind, Stop};
pub use search::{Search, Source};
pub use tool::{Tool, Toolbox};
