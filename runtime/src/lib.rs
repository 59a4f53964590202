//! llama-runtime: sessions, the KV cache, tokenization and the generation loop.
pub mod chat;
pub mod error;
pub mod generate;
pub mod perplexity;
pub mod session;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use error::{Result, RuntimeError};
pub use generate::{generate_greedy, FinishReason, Generation};
pub use llama_graph::KvCache;
pub use perplexity::{perplexity, Perplexity};
pub use session::{argmax, Logits, Session};
pub use tokenizer::Tokenizer;
