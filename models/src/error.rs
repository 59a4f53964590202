use std::path::PathBuf;

/// Errors while reading configs and weights or building a model's graph.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported architecture `{found}`; supported: {}", supported.join(", "))]
    UnknownArch {
        found: String,
        supported: Vec<&'static str>,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: invalid GGUF: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("tensor `{name}` not found in {path}")]
    MissingTensor { name: String, path: PathBuf },
    #[error(
        "{path}: tensor {name} is not used by {family}{} (expected: {expected})",
        others(*more)
    )]
    UnusedTensor {
        path: PathBuf,
        /// The first unused tensor, by checkpoint name.
        name: String,
        /// How many more are unused.
        more: usize,
        family: &'static str,
        /// What the family read.
        expected: String,
    },
    #[error("tensor `{name}` holds {value} at index {index}: its values must be finite")]
    NonFiniteTensor {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("tensor `{name}` has shape {actual:?}, but the config implies {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    TensorDtype { name: String, dtype: String },
    #[error("{0}: no model here (expected a directory with config.json and *.safetensors, or a .gguf file)")]
    NotAModel(PathBuf),
    #[error(transparent)]
    Graph(#[from] llama_graph::GraphError),
}

fn others(more: usize) -> String {
    match more {
        0 => String::new(),
        1 => " (nor is 1 other)".into(),
        n => format!(" (nor are {n} others)"),
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
