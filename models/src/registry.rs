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

/// HF `architectures` names and their loaders. A new family is one file and one line.
pub const REGISTRY: &[(&str, LoadFn)] = &[("LlamaForCausalLM", crate::llama::load)];

/// The names this build supports.
pub fn supported() -> Vec<&'static str> {
    REGISTRY.iter().map(|(n, _)| *n).collect()
}

/// The loader for a config's architecture.
pub fn lookup(config: &ModelConfig) -> Result<(&'static str, LoadFn)> {
    let found = config
        .architectures
        .first()
        .cloned()
        .or_else(|| config.model_type.clone())
        .unwrap_or_else(|| "<none>".to_string());
    REGISTRY
        .iter()
        .find(|(name, _)| *name == found)
        .copied()
        .ok_or_else(|| ModelError::UnknownArch {
            found,
            supported: supported(),
        })
}
