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

/// How a family's GGUF files differ from its HF checkpoints (llama.cpp's converter).
#[derive(Debug, Clone, Copy)]
pub struct GgufConventions {
    /// `general.architecture`.
    pub name: &'static str,
    /// Q/K rows reordered for adjacent-pair RoPE (Llama).
    pub permuted_qk: bool,
    /// Norm weights stored as `1 + w` (Gemma).
    pub norm_plus_one: bool,
    /// The activation, which GGUF metadata does not name.
    pub activation: &'static str,
}

const fn gguf(
    name: &'static str,
    permuted_qk: bool,
    norm_plus_one: bool,
    activation: &'static str,
) -> Option<GgufConventions> {
    Some(GgufConventions {
        name,
        permuted_qk,
        norm_plus_one,
        activation,
    })
}

/// One family: its HF `architectures` name, its GGUF conventions, and its loader.
pub struct Entry {
    pub hf: &'static str,
    pub gguf: Option<GgufConventions>,
    pub load: LoadFn,
}

/// Every supported family. A new family is one file and one line here.
/// (Mistral GGUF files say `llama`: llama.cpp converts them as Llama.)
#[rustfmt::skip]
pub const REGISTRY: &[Entry] = &[
    Entry { hf: "LlamaForCausalLM", gguf: gguf("llama", true, false, "silu"), load: crate::llama::load },
    Entry { hf: "MistralForCausalLM", gguf: None, load: crate::mistral::load },
    Entry { hf: "Qwen2ForCausalLM", gguf: gguf("qwen2", false, false, "silu"), load: crate::qwen2::load },
    Entry { hf: "Phi3ForCausalLM", gguf: gguf("phi3", false, false, "silu"), load: crate::phi3::load },
    Entry { hf: "GemmaForCausalLM", gguf: gguf("gemma", false, true, "gelu_pytorch_tanh"), load: crate::gemma::load },
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
        .find(|e| e.gguf.is_some_and(|g| g.name == arch))
        .ok_or_else(|| ModelError::UnknownArch {
            found: arch.to_string(),
            supported: REGISTRY
                .iter()
                .filter_map(|e| e.gguf.map(|g| g.name))
                .collect(),
        })
}
