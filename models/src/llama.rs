//! The Llama family: Llama 2, Llama 3 / 3.1 / 3.2 (rope scaling), TinyLlama, SmolLM2;
//! grouped-query attention; tied or untied output head. Mistral, Qwen2 and Phi-3 load
//! their weights into this same structure (see their files).
use burn::module::{Module, Param};
use burn::tensor::Tensor;
use llama_graph::Graph;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::{
    llama3_rope_factors, Activation, BlockLayout, BlockOptions, BlockWeights, GraphBuilder,
};
use crate::weights::{Matrix, WeightLoader};

/// The whole model's weights.
#[derive(Module, Debug)]
pub struct Llama {
    /// `[vocab, d_model]`
    pub token_embd: Matrix,
    pub blocks: Vec<BlockWeights>,
    /// `[d_model]`
    pub output_norm: Param<Tensor<1>>,
    /// `[vocab, d_model]`; `None` when tied to `token_embd`.
    pub output: Option<Matrix>,
    /// `[head_dim / 2]`: each RoPE frequency's divisor (Llama 3.1 scaling), stored
    /// (GGUF `rope_freqs`) or computed from config.json's `rope_scaling`.
    pub rope_freqs: Option<Param<Tensor<1>>>,
}

impl Llama {
    /// Loads every weight, checking each shape against `config`. A tied model's
    /// checkpoint may still carry `lm_head.weight`; transformers ignores it, as we do.
    pub fn load(c: &ModelConfig, w: &WeightLoader, layout: BlockLayout) -> Result<Self> {
        if Activation::from_config(c)? != Activation::Silu {
            return Err(ModelError::Config {
                path: "config.json".into(),
                message: "this family uses silu".into(),
            });
        }
        let d = c.hidden_size;
        if c.tie_word_embeddings {
            w.ignore("output.weight");
        }
        let half = c.head_dim() / 2;
        let rope_freqs = if w.contains("rope_freqs.weight") {
            Some(w.vector("rope_freqs.weight", half)?)
        } else if c.rope().rope_type.as_deref() == Some("llama3") {
            Some(w.computed(llama3_rope_factors(&c.rope(), c.head_dim())?))
        } else {
            None
        };
        Ok(Llama {
            token_embd: w.table("token_embd.weight", c.vocab_size, d)?,
            blocks: (0..c.num_hidden_layers)
                .map(|l| BlockWeights::load(w, l, c, layout))
                .collect::<Result<_>>()?,
            output_norm: w.vector("output_norm.weight", d)?,
            output: (!c.tie_word_embeddings)
                .then(|| w.linear("output.weight", d, c.vocab_size))
                .transpose()?,
            rope_freqs,
        })
    }
}

impl Llama {
    /// The forward pass, top to bottom, with RoPE tables for `max_positions`.
    pub fn build(&self, c: &ModelConfig, max_positions: usize) -> Result<Graph> {
        let mut b = GraphBuilder::new();
        let opts = BlockOptions {
            activation: Activation::Silu,
            norm_offset: None,
        };
        let tokens = b.tokens()?; // [seq]
        let table = b.weight2("token_embd.weight", &self.token_embd)?; // [vocab, d_model]
        let mut x = b.embedding(table, tokens)?; // [seq, d_model]
                                                 // cos, sin: [positions, hd/2]
        let rope = b.rope_tables_of(
            "rope",
            &c.rope(),
            c,
            max_positions,
            self.rope_freqs.as_ref(),
        )?;
        for (l, w) in self.blocks.iter().enumerate() {
            x = b.block(l, x, w, c, rope, opts)?; // [seq, d_model]
        }
        let norm = b.norm_weight("output_norm", &self.output_norm, None)?;
        let x = b.rms_norm("output_norm", x, norm, c.rms_norm_eps)?;
        let head = match &self.output {
            Some(w) => b.weight2("output.weight", w)?,
            None => table, // tied: the embedding table is `[vocab, d_model]`, as a head wants
        };
        let logits = b.matmul("logits", x, head)?; // [seq, vocab]
        Ok(b.finish(vec![logits]))
    }
}

/// Llama's weights: biases where config.json's `attention_bias` / `mlp_bias` say.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Llama> {
    Llama::load(c, w, BlockLayout::llama(c))
}
