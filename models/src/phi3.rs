//! Phi-3: the Llama architecture with Q/K/V stored as one `qkv_proj` matrix and
//! gate/up as one `gate_up_proj` matrix. They are split at load (the graph's fusion
//! pass fuses them again where that pays). Long-context `longrope` scaling is refused
//! by the shared RoPE helper.
use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::BlockLayout;
use crate::llama::Llama;
use crate::weights::WeightLoader;

/// Phi-3's weights: fused, no biases (transformers' `Phi3Attention`, `Phi3MLP`).
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Llama> {
    let layout = BlockLayout {
        fused: true,
        ..BlockLayout::default()
    };
    Llama::load(c, w, layout)
}
