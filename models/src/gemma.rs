//! Gemma: GeGLU feed-forward, `(1 + w)` RMSNorm, embeddings scaled by `sqrt(d_model)`,
//! an explicit `head_dim`, and the output head tied to the embeddings. Gemma 3 builds
//! through here too (see `gemma3.rs`).
use burn::module::{Module, Param};
use burn::tensor::Tensor;
use llama_graph::{F32Bits, Graph, Op};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::{Activation, BlockLayout, BlockOptions, BlockWeights, GraphBuilder};
use crate::weights::{Matrix, WeightLoader};

/// The whole model's weights; norm weights as in HF checkpoints (without the 1).
#[derive(Module, Debug)]
pub struct Gemma {
    /// `[vocab, d_model]`, also the output head.
    pub token_embd: Matrix,
    pub blocks: Vec<BlockWeights>,
    /// `[d_model]`
    pub output_norm: Param<Tensor<1>>,
}

impl Gemma {
    /// The forward pass, top to bottom, with RoPE tables for `max_positions`.
    pub fn build(&self, c: &ModelConfig, max_positions: usize) -> Result<Graph> {
        let mut b = GraphBuilder::new();
        let opts = BlockOptions {
            activation: Activation::from_config(c)?,
            norm_offset: Some(1.0), // (1 + w) RMSNorm, folded into the weights at compile time
        };
        let tokens = b.tokens()?; // [seq]
        let table = b.weight2("token_embd.weight", &self.token_embd)?; // [vocab, d_model]
        let x = b.embedding(table, tokens)?; // [seq, d_model]
        let scale = F32Bits::new((c.hidden_size as f32).sqrt());
        let mut x = b.op("inp_scaled", Op::Scale { factor: scale }, &[x])?;
        // cos, sin: [positions, hd/2], per layer (Gemma 3's local layers have their own).
        let rope = b.rope_tables_per_layer(c, max_positions)?;
        for (l, (w, rope)) in self.blocks.iter().zip(rope).enumerate() {
            x = b.block(l, x, w, c, rope, opts)?; // [seq, d_model]
        }
        let norm = b.norm_weight("output_norm", &self.output_norm, opts.norm_offset)?;
        let x = b.rms_norm("output_norm", x, norm, c.rms_norm_eps)?;
        let logits = b.matmul("logits", x, table)?; // [seq, vocab], tied head
        Ok(b.finish(vec![logits]))
    }
}

/// Gemma's weights: `attention_bias` puts a bias on all four attention projections
/// (transformers' `GemmaAttention` is `LlamaAttention`); the feed-forward has none.
/// The head is always the embedding table (`tie_word_embeddings` defaults to true in
/// `GemmaConfig`), so a stored `lm_head.weight` is left unread, as transformers does.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Gemma> {
    let d = c.hidden_size;
    let layout = BlockLayout {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        ..BlockLayout::default()
    };
    w.ignore("output.weight");
    Ok(Gemma {
        token_embd: w.table("token_embd.weight", c.vocab_size, d)?,
        blocks: (0..c.num_hidden_layers)
            .map(|l| BlockWeights::load(w, l, c, layout))
            .collect::<Result<_>>()?,
        output_norm: w.vector("output_norm.weight", d)?,
    })
}
