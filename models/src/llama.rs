//! The Llama family: Llama 2, Llama 3 / 3.1 / 3.2 (rope scaling), TinyLlama, SmolLM2;
//! grouped-query attention; tied or untied output head.
use burn::module::{Module, Param};
use burn::tensor::Tensor;
use llama_graph::Graph;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::{blk, AttentionWeights, GraphBuilder};
use crate::registry::Architecture;
use crate::weights::WeightLoader;

/// Attention projections of one block, `[out, in]`.
#[derive(Module, Debug)]
pub struct LlamaAttention {
    /// `[n_heads * head_dim, d_model]`
    pub q: Param<Tensor<2>>,
    /// `[n_kv_heads * head_dim, d_model]`
    pub k: Param<Tensor<2>>,
    /// `[n_kv_heads * head_dim, d_model]`
    pub v: Param<Tensor<2>>,
    /// `[d_model, n_heads * head_dim]`
    pub o: Param<Tensor<2>>,
}

/// SwiGLU feed-forward of one block, `[out, in]`.
#[derive(Module, Debug)]
pub struct LlamaMlp {
    /// `[ffn, d_model]`
    pub gate: Param<Tensor<2>>,
    /// `[ffn, d_model]`
    pub up: Param<Tensor<2>>,
    /// `[d_model, ffn]`
    pub down: Param<Tensor<2>>,
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct LlamaBlock {
    /// `[d_model]`
    pub attn_norm: Param<Tensor<1>>,
    pub attn: LlamaAttention,
    /// `[d_model]`
    pub ffn_norm: Param<Tensor<1>>,
    pub mlp: LlamaMlp,
}

/// The whole model's weights.
#[derive(Module, Debug)]
pub struct Llama {
    /// `[vocab, d_model]`
    pub token_embd: Param<Tensor<2>>,
    pub blocks: Vec<LlamaBlock>,
    /// `[d_model]`
    pub output_norm: Param<Tensor<1>>,
    /// `[vocab, d_model]`; `None` when tied to `token_embd`.
    pub output: Option<Param<Tensor<2>>>,
}

impl Llama {
    /// Loads every weight, checking each shape against `config`.
    pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Self> {
        let (d, hd, ffn) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.n_kv_heads() * hd);
        let blocks = (0..c.num_hidden_layers)
            .map(|l| {
                Ok(LlamaBlock {
                    attn_norm: w.vector(&blk(l, "attn_norm.weight"), d)?,
                    attn: LlamaAttention {
                        q: w.linear(&blk(l, "attn_q.weight"), d, q_out)?,
                        k: w.linear(&blk(l, "attn_k.weight"), d, kv_out)?,
                        v: w.linear(&blk(l, "attn_v.weight"), d, kv_out)?,
                        o: w.linear(&blk(l, "attn_output.weight"), q_out, d)?,
                    },
                    ffn_norm: w.vector(&blk(l, "ffn_norm.weight"), d)?,
                    mlp: LlamaMlp {
                        gate: w.linear(&blk(l, "ffn_gate.weight"), d, ffn)?,
                        up: w.linear(&blk(l, "ffn_up.weight"), d, ffn)?,
                        down: w.linear(&blk(l, "ffn_down.weight"), ffn, d)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = if c.tie_word_embeddings {
            None
        } else {
            Some(w.linear("output.weight", d, c.vocab_size)?)
        };
        Ok(Llama {
            token_embd: w.table("token_embd.weight", c.vocab_size, d)?,
            blocks,
            output_norm: w.vector("output_norm.weight", d)?,
            output,
        })
    }
}

impl Architecture for Llama {
    /// The forward pass, top to bottom.
    fn build(&self, c: &ModelConfig, max_positions: usize) -> Result<Graph> {
        let mut b = GraphBuilder::new();
        let eps = c.rms_norm_eps;
        let tokens = b.tokens()?; // [seq]
        let table = b.weight2("token_embd.weight", &self.token_embd)?;
        let mut x = b.embedding(table, tokens)?; // [seq, d_model]
        let rope = b.rope_tables(c, max_positions)?; // cos, sin: [positions, hd/2]
        for (l, w) in self.blocks.iter().enumerate() {
            let norm_w = b.weight1(&blk(l, "attn_norm.weight"), &w.attn_norm)?;
            let attn_w = AttentionWeights {
                q: b.weight2(&blk(l, "attn_q.weight"), &w.attn.q)?,
                k: b.weight2(&blk(l, "attn_k.weight"), &w.attn.k)?,
                v: b.weight2(&blk(l, "attn_v.weight"), &w.attn.v)?,
                o: b.weight2(&blk(l, "attn_output.weight"), &w.attn.o)?,
            };
            let h = b.rms_norm(&blk(l, "attn_norm"), x, norm_w, eps)?;
            let h = b.attention(l, h, &attn_w, c, rope)?;
            x = b.add(&blk(l, "ffn_inp"), x, h)?; // residual

            let norm_w = b.weight1(&blk(l, "ffn_norm.weight"), &w.ffn_norm)?;
            let gate = b.weight2(&blk(l, "ffn_gate.weight"), &w.mlp.gate)?;
            let up = b.weight2(&blk(l, "ffn_up.weight"), &w.mlp.up)?;
            let down = b.weight2(&blk(l, "ffn_down.weight"), &w.mlp.down)?;
            let h = b.rms_norm(&blk(l, "ffn_norm"), x, norm_w, eps)?;
            let h = b.swiglu(l, h, gate, up, down)?;
            x = b.add(&blk(l, "l_out"), x, h)?; // residual
        }
        let norm_w = b.weight1("output_norm.weight", &self.output_norm)?;
        let x = b.rms_norm("output_norm", x, norm_w, eps)?;
        let head = match &self.output {
            Some(w) => b.weight2("output.weight", w)?,
            None => table, // tied: the embedding table is `[vocab, d_model]`, as a head wants
        };
        let logits = b.matmul("logits", x, head)?; // [seq, vocab]
        Ok(b.finish(vec![logits]))
    }
}

/// Registry entry.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Box<dyn Architecture>> {
    Ok(Box::new(Llama::load(c, w)?))
}
