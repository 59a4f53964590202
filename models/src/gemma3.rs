//! Gemma 3: Gemma's blocks (GeGLU, `(1 + w)` RMSNorm, embeddings scaled by
//! `sqrt(d_model)`, tied head, explicit `head_dim`) with a per-head RMSNorm of Q and K,
//! norms on the outputs of attention and feed-forward too, attention scaled by
//! `query_pre_attn_scalar`, and local layers (sliding window, their own RoPE base)
//! between global ones. All of that is config and shared helpers: the graph is
//! [`Gemma::build`]'s.
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gemma::Gemma;
use crate::layers::{BlockLayout, BlockWeights};
use crate::weights::WeightLoader;

/// Gemma 3's weights, in [`Gemma`]'s layout with the extra norms. A stored
/// `lm_head.weight` is left unread: the head is the embedding table.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Gemma> {
    let layout = BlockLayout {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        qk_norm: true,
        post_norms: true,
        ..BlockLayout::default()
    };
    w.ignore("output.weight");
    Ok(Gemma {
        token_embd: w.table("token_embd.weight", c.vocab_size, c.hidden_size)?,
        blocks: (0..c.num_hidden_layers)
            .map(|l| BlockWeights::load(w, l, c, layout))
            .collect::<Result<_>>()?,
        output_norm: w.vector("output_norm.weight", c.hidden_size)?,
    })
}
