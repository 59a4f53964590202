//! llama-runtime: sessions, the KV cache, tokenization and the generation loop.
pub mod batch;
pub mod chat;
pub mod compare;
pub mod constrain;
pub mod device;
pub mod embed;
pub mod engine;
pub mod error;
pub mod generate;
pub mod perplexity;
pub mod prompt_cache;
pub mod sampler;
pub mod service;
pub mod session;
pub mod speculate;
pub mod tokenizer;
pub mod tools;

pub use batch::{BatchOptions, BatchStats, Event, Scheduler, SeqId, SeqState};
pub use chat::{ChatTemplate, Message};
pub use constrain::{Constraint, Grammar, Grammars};
pub use device::Backend;
pub use embed::{cosine, Embedder, Pooling};
pub use engine::{Context, Engine, Passes, Policy, Precision, SessionOptions, DEFAULT_CONTEXT};
pub use error::{Result, RuntimeError};
pub use generate::{
    check_fit, generate, generate_drafted, generate_greedy, generate_ids, generate_ids_drafted,
    log_softmax, top_logprobs, Decoder, FinishReason, GenerateOptions, Generation, StopFilter,
    TextOutput, TokenLogprob,
};
pub use llama_graph::{Capabilities, KvCache, KvType};
pub use perplexity::{perplexity, Perplexity};
pub use prompt_cache::{CacheKey, CacheStats, DiskCache, DiskOptions, PromptCacheError};
pub use sampler::{random_seed, Sampler, SamplerConfig};
pub use service::{Service, ServiceLoad, ServiceOptions, Sink, Stream, Ticket};
pub use session::{argmax, Logits, Session, SessionState};
pub use speculate::{DraftStats, Drafter, Lookup, ModelDrafter, Speculation};
pub use tokenizer::Tokenizer;
pub use tools::{
    Function, Parsed, ToolCall, ToolChoice, ToolDelta, ToolFormat, ToolParser, ToolSpec,
};
