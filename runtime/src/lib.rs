//! llama-runtime: sessions, the KV cache, tokenization and the generation loop.
pub mod chat;
pub mod error;
pub mod generate;
pub mod perplexity;
pub mod sampler;
pub mod session;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use error::{Result, RuntimeError};
pub use generate::{
    generate, generate_greedy, generate_ids, FinishReason, GenerateOptions, Generation, StopFilter,
};
pub use llama_graph::KvCache;
pub use perplexity::{perplexity, Perplexity};
pub use sampler::{Sampler, SamplerConfig};
pub use session::{argmax, Logits, Session, SessionState};
pub use tokenizer::Tokenizer;
