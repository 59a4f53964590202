//! Qwen2: the Llama architecture with biases on the Q, K and V projections, and sliding
//! windows only on the layers `layer_types` marks (`use_sliding_window`).
use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::BlockLayout;
use crate::llama::Llama;
use crate::weights::WeightLoader;

/// Qwen2's weights: Q/K/V biases always, none on the output projection or the
/// feed-forward (transformers' `Qwen2Attention`, `Qwen2MLP`).
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Llama> {
    let layout = BlockLayout {
        qkv_bias: true,
        ..BlockLayout::default()
    };
    Llama::load(c, w, layout)
}
