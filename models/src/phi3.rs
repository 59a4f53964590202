//! Phi-3: the Llama architecture with Q/K/V stored as one `qkv_proj` matrix and
//! gate/up as one `gate_up_proj` matrix. They are split at load (the graph's fusion
//! pass fuses them again where that pays). Long-context `longrope` scaling is refused
//! by the shared RoPE helper.
use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::BlockLayout;
use crate::llama::Llama;
use crate::registry::Architecture;
use crate::weights::WeightLoader;

/// Registry entry.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Box<dyn Architecture>> {
    let layout = BlockLayout {
        qkv_bias: false,
        fused: true,
    };
    Ok(Box::new(Llama::load(c, w, layout)?))
}
