//! Shared graph-building helpers: the vocabulary every architecture is written in.
//!
//! Each helper adds named nodes (`blk.{layer}.{what}`) so dumps and debug taps can
//! point at any step of any layer.
use burn::module::Param;
use burn::tensor::Tensor;
use llama_graph::{F32Bits, Graph, KvKind, NodeId, Op, ParamKind, RopeScaling, Value};

use crate::config::{ModelConfig, RopeParameters};
use crate::error::{ModelError, Result};

/// A graph under construction.
pub struct GraphBuilder {
    pub graph: Graph,
}

/// The node names of one layer: `blk.{layer}.{what}`.
pub fn blk(layer: usize, what: &str) -> String {
    format!("blk.{layer}.{what}")
}

impl GraphBuilder {
    pub fn new() -> Self {
        GraphBuilder {
            graph: Graph::new(),
        }
    }

    pub fn finish(mut self, outputs: Vec<NodeId>) -> Graph {
        self.graph.set_outputs(outputs);
        self.graph
    }

    pub fn tokens(&mut self) -> Result<NodeId> {
        Ok(self.graph.add_tokens("tokens")?)
    }

    pub fn weight1(&mut self, name: &str, p: &Param<Tensor<1>>) -> Result<NodeId> {
        Ok(self
            .graph
            .add_param(name, ParamKind::Weight, Value::F1(p.val()))?)
    }

    pub fn weight2(&mut self, name: &str, p: &Param<Tensor<2>>) -> Result<NodeId> {
        Ok(self
            .graph
            .add_param(name, ParamKind::Weight, Value::F2(p.val()))?)
    }

    pub fn op(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        Ok(self.graph.add(name, op, inputs)?)
    }

    pub fn embedding(&mut self, table: NodeId, tokens: NodeId) -> Result<NodeId> {
        self.op("inp_embd", Op::Embedding, &[table, tokens])
    }

    pub fn rms_norm(&mut self, name: &str, x: NodeId, w: NodeId, eps: f32) -> Result<NodeId> {
        self.op(
            name,
            Op::RmsNorm {
                eps: F32Bits::new(eps),
            },
            &[x, w],
        )
    }

    pub fn matmul(&mut self, name: &str, x: NodeId, w: NodeId) -> Result<NodeId> {
        self.op(name, Op::MatMul, &[x, w])
    }

    pub fn add(&mut self, name: &str, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.op(name, Op::Add, &[a, b])
    }

    /// RoPE `cos` and `sin` tables `[max_positions, head_dim / 2]`, shared by all layers.
    pub fn rope_tables(
        &mut self,
        config: &ModelConfig,
        max_positions: usize,
    ) -> Result<(NodeId, NodeId)> {
        let rope = config.rope();
        let op = Op::RopeAngles {
            head_dim: config.head_dim(),
            theta: F32Bits::new(rope.rope_theta.unwrap_or(10_000.0)),
            scaling: rope_scaling(&rope)?,
            max_positions,
        };
        let angles = self.op("rope.angles", op, &[])?;
        let cos = self.op("rope.cos", Op::Cos, &[angles])?;
        let sin = self.op("rope.sin", Op::Sin, &[angles])?;
        Ok((cos, sin))
    }

    /// Self-attention of one layer over the normalized input `x [seq, d_model]`:
    /// projections, RoPE on Q and K, KV cache, grouped causal attention, output
    /// projection. Returns `[seq, d_model]`.
    pub fn attention(
        &mut self,
        layer: usize,
        x: NodeId,
        w: &AttentionWeights,
        config: &ModelConfig,
        rope: (NodeId, NodeId),
    ) -> Result<NodeId> {
        let head_dim = config.head_dim();
        let q = self.matmul(&blk(layer, "attn_q"), x, w.q)?; // [seq, heads * hd]
        let k = self.matmul(&blk(layer, "attn_k"), x, w.k)?; // [seq, kv_heads * hd]
        let v = self.matmul(&blk(layer, "attn_v"), x, w.v)?;
        let q = self.op(
            &blk(layer, "attn_q_rope"),
            Op::Rope { head_dim },
            &[q, rope.0, rope.1],
        )?;
        let k = self.op(
            &blk(layer, "attn_k_rope"),
            Op::Rope { head_dim },
            &[k, rope.0, rope.1],
        )?;
        let k = self.op(
            &blk(layer, "cache_k"),
            Op::KvAppend {
                layer,
                kind: KvKind::Key,
            },
            &[k],
        )?; // [past+seq, ..]
        let v = self.op(
            &blk(layer, "cache_v"),
            Op::KvAppend {
                layer,
                kind: KvKind::Value,
            },
            &[v],
        )?;
        let attn = Op::Attention {
            n_heads: config.num_attention_heads,
            n_kv_heads: config.n_kv_heads(),
            head_dim,
            scale: F32Bits::new(1.0 / (head_dim as f32).sqrt()),
        };
        let out = self.op(&blk(layer, "attn_out"), attn, &[q, k, v])?; // [seq, heads * hd]
        self.matmul(&blk(layer, "attn_output"), out, w.o)
    }

    /// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
    pub fn swiglu(
        &mut self,
        layer: usize,
        x: NodeId,
        gate: NodeId,
        up: NodeId,
        down: NodeId,
    ) -> Result<NodeId> {
        let g = self.matmul(&blk(layer, "ffn_gate"), x, gate)?; // [seq, ffn]
        let g = self.op(&blk(layer, "ffn_silu"), Op::Silu, &[g])?;
        let u = self.matmul(&blk(layer, "ffn_up"), x, up)?;
        let h = self.op(&blk(layer, "ffn_gate_par"), Op::Mul, &[g, u])?;
        self.matmul(&blk(layer, "ffn_down"), h, down) // [seq, d_model]
    }
}

impl Default for GraphBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Weight nodes of one attention layer.
pub struct AttentionWeights {
    pub q: NodeId,
    pub k: NodeId,
    pub v: NodeId,
    pub o: NodeId,
}

/// The graph's RoPE scaling from HF parameters.
pub fn rope_scaling(p: &RopeParameters) -> Result<RopeScaling> {
    let need = |v: Option<f32>, what: &str| {
        v.map(F32Bits::new).ok_or_else(|| ModelError::Config {
            path: "config.json".into(),
            message: format!("rope scaling needs `{what}`"),
        })
    };
    match p.rope_type.as_deref() {
        None | Some("default") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear {
            factor: need(p.factor, "factor")?,
        }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: need(p.factor, "factor")?,
            low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
            original_max_positions: p.original_max_position_embeddings.ok_or_else(|| {
                ModelError::Config {
                    path: "config.json".into(),
                    message: "llama3 rope scaling needs `original_max_position_embeddings`".into(),
                }
            })?,
        }),
        Some(other) => Err(ModelError::Config {
            path: "config.json".into(),
            message: format!("rope type `{other}` is not supported (default, linear, llama3)"),
        }),
    }
}
