use crate::ir::Shape;

/// Everything that can go wrong while building, transforming or running a graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A node's inputs do not fit its op. Names the node and both shapes.
    #[error("node `{node}`: {what}: expected {expected}, got {actual}")]
    Shape {
        node: String,
        what: String,
        expected: String,
        actual: Shape,
    },
    #[error("node `{node}`: {message}")]
    Invalid { node: String, message: String },
    #[error("duplicate node name `{0}`")]
    DuplicateName(String),
    #[error("no node named `{0}`")]
    UnknownNode(String),
    #[error("parameter `{0}` has no value in the graph")]
    MissingParam(String),
    #[error("input: {0}")]
    Input(String),
    /// A KV cache type this model or device cannot hold (`--cache-type`).
    #[error("--cache-type {ty}: {message}")]
    CacheType { ty: &'static str, message: String },
    #[error("context full: {past} cached + {seq} new tokens exceed the context of {max}")]
    ContextFull { past: usize, seq: usize, max: usize },
}

pub type Result<T, E = GraphError> = std::result::Result<T, E>;
