/// Errors of sessions, tokenization and generation.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Graph(#[from] llama_graph::GraphError),
    #[error(transparent)]
    Model(#[from] llama_models::ModelError),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0} tokens are too few to score (at least 2, and windows of at least 4)")]
    TooShort(usize),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens plus {requested} new tokens exceeds the context of {context} tokens")]
    ContextExceeded {
        prompt: usize,
        requested: usize,
        context: usize,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("{0}")]
    NoTokenizer(String),
    #[error("chat template from {source_name}: {message}")]
    Template {
        source_name: String,
        message: String,
    },
    #[error("{0}")]
    Sampling(String),
    #[error("session state {path}: {message}")]
    State { path: String, message: String },
    #[error("{0} has no chat template")]
    NoChatTemplate(String),
    #[error("{0}")]
    Device(String),
    #[error("{0}")]
    Options(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("the request needs {needed} KV positions but the KV budget holds {budget}")]
    KvBudget { needed: usize, budget: usize },
    #[error(
        "{model} is an encoder ({arch}): it embeds text, it does not generate (try `llama embed`)"
    )]
    NotGenerative { model: String, arch: String },
    #[error(
        "the logits at position {position} are not finite (NaN or infinity): the model's \
         weights or activations overflowed there"
    )]
    NonFiniteLogits { position: usize },
    #[error("reference {path}: {message}")]
    Reference { path: String, message: String },
    #[error("node {node} yields {ours:?}, the reference holds {reference:?}")]
    ReferenceShape {
        node: String,
        ours: Vec<usize>,
        reference: Vec<usize>,
    },
    #[error("input {index} of the batch is empty")]
    EmptyInput { index: usize },
    #[error("input {index} has {tokens} tokens; the model embeds at most {max}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    #[error("grammar: {0}")]
    Grammar(String),
    #[error("tools: {0}")]
    Tools(String),
    #[error("prompt cache: {0}")]
    PromptCache(#[from] crate::prompt_cache::PromptCacheError),
    #[error("{}", context_size_message(*requested, *max))]
    ContextSize { requested: usize, max: usize },
}

fn context_size_message(requested: usize, max: usize) -> String {
    if requested == 0 {
        "the context size must be positive".into()
    } else {
        format!("a context of {requested} positions exceeds the model's {max}")
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
