//! Mistral: the Llama architecture with sliding-window attention (`sliding_window` in
//! config.json). The window is config, honoured by the shared attention helper and the
//! KV cache (a ring of `window` rows per layer), so the weights and graph are Llama's.
use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::BlockLayout;
use crate::llama::Llama;
use crate::weights::WeightLoader;

/// Mistral's weights. No biases, whatever config.json says: transformers'
/// `MistralAttention` and `MistralMLP` build every projection with `bias=False`.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Llama> {
    Llama::load(c, w, BlockLayout::default())
}
