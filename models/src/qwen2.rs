//! Qwen2: the Llama architecture with biases on the Q, K and V projections, and sliding
//! windows only on the layers `layer_types` marks (`use_sliding_window`).
use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::BlockLayout;
use crate::llama::Llama;
use crate::registry::Architecture;
use crate::weights::WeightLoader;

/// Registry entry.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Box<dyn Architecture>> {
    let layout = BlockLayout {
        qkv_bias: true,
        fused: false,
    };
    Ok(Box::new(Llama::load(c, w, layout)?))
}
