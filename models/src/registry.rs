//! The architecture registry: one line per family.
use llama_graph::Graph;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::WeightLoader;

/// A family's weights, able to build the family's forward graph.
pub trait Architecture: Send + Sync + std::fmt::Debug {
    /// The forward pass as a graph whose RoPE tables cover `max_positions`.
    fn build(&self, config: &ModelConfig, max_positions: usize) -> Result<Graph>;
}

/// Loads a family's weights.
pub type LoadFn = fn(&ModelConfig, &WeightLoader) -> Result<Box<dyn Architecture>>;

/// One family: its HF `architectures` name, its GGUF `general.architecture` name, and
/// its loader.
pub struct Entry {
    pub hf: &'static str,
    pub gguf: &'static str,
    pub load: LoadFn,
}

/// Every supported family. A new family is one file and one line here.
#[rustfmt::skip]
pub const REGISTRY: &[Entry] = &[
    Entry { hf: "LlamaForCausalLM", gguf: "llama", load: crate::llama::load },
];

/// The HF names this build supports.
pub fn supported() -> Vec<&'static str> {
    REGISTRY.iter().map(|e| e.hf).collect()
}

/// The entry for a config's architecture.
pub fn lookup(config: &ModelConfig) -> Result<&'static Entry> {
    let found = config
        .architectures
        .first()
        .cloned()
        .or_else(|| config.model_type.clone())
        .unwrap_or_else(|| "<none>".to_string());
    REGISTRY
        .iter()
        .find(|e| e.hf == found)
        .ok_or_else(|| ModelError::UnknownArch {
            found,
            supported: supported(),
        })
}

/// The entry for a GGUF `general.architecture`.
pub fn lookup_gguf(arch: &str) -> Result<&'static Entry> {
    REGISTRY
        .iter()
        .find(|e| e.gguf == arch)
        .ok_or_else(|| ModelError::UnknownArch {
            found: arch.to_string(),
            supported: REGISTRY.iter().map(|e| e.gguf).collect(),
        })
}
