//! llama.rs: a graph-compiled LLM inference runtime on burn.
//!
//! This crate re-exports the workspace crates; see `docs/architecture.md` for the layout.
pub use llama_graph as graph;
pub use llama_kernels as kernels;
pub use llama_models as models;
pub use llama_rag as rag;
pub use llama_runtime as runtime;
pub use llama_serve as serve;
