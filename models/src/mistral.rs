//! Mistral: the Llama architecture with sliding-window attention (`sliding_window` in
//! config.json). The window is config, honoured by the shared attention helper and the
//! KV cache (a ring of `window` rows per layer), so the weights and graph are Llama's.
use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::BlockLayout;
use crate::llama::Llama;
use crate::registry::Architecture;
use crate::weights::WeightLoader;

/// Registry entry.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Box<dyn Architecture>> {
    Ok(Box::new(Llama::load(c, w, BlockLayout::default())?))
}
