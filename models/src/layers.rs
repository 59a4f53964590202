//! Shared layers: the weight modules and graph-building helpers every family is
//! written in. Each helper adds named nodes (`blk.{layer}.{what}`) so dumps and debug
//! taps can point at any step of any layer.
use burn::module::{Module, Param};
use burn::tensor::Tensor;
use llama_graph::{F32Bits, Graph, KvKind, NodeId, Op, ParamKind, RopeScaling, Value};

use crate::config::{ModelConfig, RopeParameters, SLIDING_ATTENTION};
use crate::error::{ModelError, Result};
use crate::weights::{Matrix, WeightLoader};

/// The node names of one layer: `blk.{layer}.{what}`.
pub fn blk(layer: usize, what: &str) -> String {
    format!("blk.{layer}.{what}")
}

/// Attention projections of one block, `[out, in]`, with optional biases.
#[derive(Module, Debug)]
pub struct AttentionWeights {
    /// `[n_heads * head_dim, d_model]`
    pub q: Matrix,
    /// `[n_kv_heads * head_dim, d_model]`
    pub k: Matrix,
    /// `[n_kv_heads * head_dim, d_model]`
    pub v: Matrix,
    /// `[d_model, n_heads * head_dim]`
    pub o: Matrix,
    /// `[n_heads * head_dim]`, `[n_kv_heads * head_dim]` x2 (Qwen2; Llama and Gemma
    /// with `attention_bias`).
    pub q_bias: Option<Param<Tensor<1>>>,
    pub k_bias: Option<Param<Tensor<1>>>,
    pub v_bias: Option<Param<Tensor<1>>>,
    /// `[d_model]` (Llama and Gemma with `attention_bias`).
    pub o_bias: Option<Param<Tensor<1>>>,
    /// `[head_dim]` x2: RMSNorm of each query and key head before RoPE (Gemma 3).
    pub q_norm: Option<Param<Tensor<1>>>,
    pub k_norm: Option<Param<Tensor<1>>>,
}

/// Gated feed-forward of one block, `[out, in]`, with optional biases.
#[derive(Module, Debug)]
pub struct MlpWeights {
    /// `[ffn, d_model]`
    pub gate: Matrix,
    /// `[ffn, d_model]`
    pub up: Matrix,
    /// `[d_model, ffn]`
    pub down: Matrix,
    /// `[ffn]`, `[ffn]`, `[d_model]` (Llama with `mlp_bias`).
    pub gate_bias: Option<Param<Tensor<1>>>,
    pub up_bias: Option<Param<Tensor<1>>>,
    pub down_bias: Option<Param<Tensor<1>>>,
}

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct BlockWeights {
    /// `[d_model]`
    pub attn_norm: Param<Tensor<1>>,
    pub attn: AttentionWeights,
    /// `[d_model]`: RMSNorm of the attention's output before the residual (Gemma 3).
    pub post_attn_norm: Option<Param<Tensor<1>>>,
    /// `[d_model]`
    pub ffn_norm: Param<Tensor<1>>,
    pub mlp: MlpWeights,
    /// `[d_model]`: RMSNorm of the feed-forward's output before the residual (Gemma 3).
    pub post_ffn_norm: Option<Param<Tensor<1>>>,
}

/// How a family stores its block weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockLayout {
    /// Q, K and V carry biases.
    pub qkv_bias: bool,
    /// The attention output projection carries a bias.
    pub o_bias: bool,
    /// Gate, up and down carry biases.
    pub mlp_bias: bool,
    /// Q, K, V in one `attn_qkv` matrix and gate, up in one `ffn_up` matrix of twice
    /// the width (Phi-3): split here, at load, so the graph sees the usual weights.
    /// (Biases are read unfused: no fused family has any.)
    pub fused: bool,
    /// Per-head RMSNorm of Q and K (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// Norms on the outputs of attention and feed-forward too (`post_attention_norm`,
    /// `post_ffw_norm`): "sandwich" blocks.
    pub post_norms: bool,
}

impl BlockLayout {
    /// transformers' `LlamaAttention` and `LlamaMLP`: `attention_bias` puts a bias on
    /// all four attention projections (`o_proj` included), `mlp_bias` on all three of
    /// the feed-forward.
    pub fn llama(c: &ModelConfig) -> Self {
        BlockLayout {
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            mlp_bias: c.mlp_bias,
            ..BlockLayout::default()
        }
    }
}

impl BlockWeights {
    pub fn load(w: &WeightLoader, l: usize, c: &ModelConfig, layout: BlockLayout) -> Result<Self> {
        let (d, hd, ffn) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.n_kv_heads() * hd);
        // A vector the layout may or may not have (a bias, an extra norm).
        let optional = |on: bool, name: &str, n: usize| -> Result<Option<Param<Tensor<1>>>> {
            on.then(|| w.vector(&blk(l, name), n)).transpose()
        };
        let (q, k, v) = if layout.fused {
            let qkv = w.linear(&blk(l, "attn_qkv.weight"), d, q_out + 2 * kv_out)?;
            let rows = |start, n| qkv.rows(start, n);
            (
                rows(0, q_out)?,
                rows(q_out, kv_out)?,
                rows(q_out + kv_out, kv_out)?,
            )
        } else {
            (
                w.linear(&blk(l, "attn_q.weight"), d, q_out)?,
                w.linear(&blk(l, "attn_k.weight"), d, kv_out)?,
                w.linear(&blk(l, "attn_v.weight"), d, kv_out)?,
            )
        };
        let (gate, up) = if layout.fused {
            let gate_up = w.linear(&blk(l, "ffn_up.weight"), d, 2 * ffn)?;
            (gate_up.rows(0, ffn)?, gate_up.rows(ffn, ffn)?)
        } else {
            (
                w.linear(&blk(l, "ffn_gate.weight"), d, ffn)?,
                w.linear(&blk(l, "ffn_up.weight"), d, ffn)?,
            )
        };
        Ok(BlockWeights {
            attn_norm: w.vector(&blk(l, "attn_norm.weight"), d)?,
            attn: AttentionWeights {
                q,
                k,
                v,
                o: w.linear(&blk(l, "attn_output.weight"), q_out, d)?,
                q_bias: optional(layout.qkv_bias, "attn_q.bias", q_out)?,
                k_bias: optional(layout.qkv_bias, "attn_k.bias", kv_out)?,
                v_bias: optional(layout.qkv_bias, "attn_v.bias", kv_out)?,
                o_bias: optional(layout.o_bias, "attn_output.bias", d)?,
                q_norm: optional(layout.qk_norm, "attn_q_norm.weight", hd)?,
                k_norm: optional(layout.qk_norm, "attn_k_norm.weight", hd)?,
            },
            post_attn_norm: optional(layout.post_norms, "post_attention_norm.weight", d)?,
            ffn_norm: w.vector(&blk(l, "ffn_norm.weight"), d)?,
            mlp: MlpWeights {
                gate,
                up,
                down: w.linear(&blk(l, "ffn_down.weight"), ffn, d)?,
                gate_bias: optional(layout.mlp_bias, "ffn_gate.bias", ffn)?,
                up_bias: optional(layout.mlp_bias, "ffn_up.bias", ffn)?,
                down_bias: optional(layout.mlp_bias, "ffn_down.bias", d)?,
            },
            post_ffn_norm: optional(layout.post_norms, "post_ffw_norm.weight", d)?,
        })
    }
}

/// The activation of a gated feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Mistral, Qwen2, Phi-3).
    Silu,
    /// GeGLU with tanh-approximated GELU (Gemma).
    GeluTanh,
}

impl Activation {
    /// From HF `hidden_act` / `hidden_activation`.
    pub fn from_config(c: &ModelConfig) -> Result<Self> {
        match c.hidden_activation.as_deref().or(c.hidden_act.as_deref()) {
            None | Some("silu") | Some("swish") => Ok(Activation::Silu),
            Some("gelu_pytorch_tanh") | Some("gelu_new") => Ok(Activation::GeluTanh),
            Some(other) => Err(ModelError::Config {
                path: "config.json".into(),
                message: format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)"),
            }),
        }
    }
}

/// What varies between the blocks of different families.
#[derive(Debug, Clone, Copy)]
pub struct BlockOptions {
    pub activation: Activation,
    /// Added to every norm weight (Gemma's `(1 + w)` RMSNorm); folded at compile time.
    pub norm_offset: Option<f32>,
}

/// Weight nodes of one block.
struct BlockNodes {
    attn_norm: NodeId,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    o: NodeId,
    /// Q, K, V, output.
    attn_biases: [Option<NodeId>; 4],
    /// Per-head Q and K norms.
    qk_norms: Option<(NodeId, NodeId)>,
    post_attn_norm: Option<NodeId>,
    ffn_norm: NodeId,
    gate: NodeId,
    up: NodeId,
    down: NodeId,
    /// Gate, up, down.
    ffn_biases: [Option<NodeId>; 3],
    post_ffn_norm: Option<NodeId>,
}

/// A graph under construction.
pub struct GraphBuilder {
    pub graph: Graph,
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

    pub fn weight2(&mut self, name: &str, m: &Matrix) -> Result<NodeId> {
        Ok(self.graph.add_param(name, ParamKind::Weight, m.value())?)
    }

    pub fn op(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        Ok(self.graph.add(name, op, inputs)?)
    }

    /// `[seq]` ids to `[seq, d_model]` rows of the table.
    pub fn embedding(&mut self, table: NodeId, tokens: NodeId) -> Result<NodeId> {
        self.op("inp_embd", Op::Embedding, &[table, tokens])
    }

    /// A norm weight node, shifted by `offset` when the family's norm is `(offset + w)`.
    pub fn norm_weight(
        &mut self,
        name: &str,
        p: &Param<Tensor<1>>,
        offset: Option<f32>,
    ) -> Result<NodeId> {
        let w = self.weight1(&format!("{name}.weight"), p)?;
        match offset {
            None => Ok(w),
            Some(value) => self.op(
                &format!("{name}.weight_shifted"),
                Op::AddScalar {
                    value: F32Bits::new(value),
                },
                &[w],
            ),
        }
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

    /// `x @ w^T (+ bias)`.
    pub fn linear(
        &mut self,
        name: &str,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        let y = self.matmul(name, x, w)?;
        match bias {
            None => Ok(y),
            Some(b) => self.add(&format!("{name}.biased"), y, b),
        }
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
        self.rope_tables_of("rope", &config.rope(), config, max_positions, None)
    }

    /// RoPE tables of one set of parameters, as nodes `{name}.angles`, `.cos`, `.sin`;
    /// `freqs` divides each frequency by its own factor (`rope_freqs`).
    pub fn rope_tables_of(
        &mut self,
        name: &str,
        rope: &RopeParameters,
        config: &ModelConfig,
        max_positions: usize,
        freqs: Option<&Param<Tensor<1>>>,
    ) -> Result<(NodeId, NodeId)> {
        let mut scaling = rope_scaling(rope)?;
        let inputs = match (scaling, freqs) {
            (RopeScaling::None | RopeScaling::Factors, Some(f)) => {
                scaling = RopeScaling::Factors;
                vec![self.weight1("rope_freqs.weight", f)?]
            }
            (RopeScaling::Factors, None) => {
                return Err(ModelError::Config {
                    path: "config.json".into(),
                    message: "llama3 rope scaling needs its per-frequency factors".into(),
                })
            }
            (_, Some(_)) => {
                return Err(ModelError::Config {
                    path: "config.json".into(),
                    message: "rope_freqs and a rope scaling type at once".into(),
                })
            }
            (_, None) => vec![],
        };
        let op = Op::RopeAngles {
            head_dim: config.head_dim(),
            theta: F32Bits::new(rope.rope_theta.unwrap_or(10_000.0)),
            scaling,
            max_positions,
        };
        let angles = self.op(&format!("{name}.angles"), op, &inputs)?;
        let cos = self.op(&format!("{name}.cos"), Op::Cos, &[angles])?;
        let sin = self.op(&format!("{name}.sin"), Op::Sin, &[angles])?;
        Ok((cos, sin))
    }

    /// RoPE tables for each layer: the model's, and where its sliding-window layers
    /// rotate differently (Gemma 3), theirs (`rope_local.*`) for those layers.
    pub fn rope_tables_per_layer(
        &mut self,
        config: &ModelConfig,
        max_positions: usize,
    ) -> Result<Vec<(NodeId, NodeId)>> {
        let global = self.rope_tables(config, max_positions)?;
        let local_params = config.rope_of(SLIDING_ATTENTION);
        let local_differs = local_params != config.rope();
        let mut local = None;
        (0..config.num_hidden_layers)
            .map(|l| {
                if config.layer_type(l) != SLIDING_ATTENTION || !local_differs {
                    return Ok(global);
                }
                match local {
                    Some(tables) => Ok(tables),
                    None => {
                        let tables = self.rope_tables_of(
                            "rope_local",
                            &local_params,
                            config,
                            max_positions,
                            None,
                        )?;
                        local = Some(tables);
                        Ok(tables)
                    }
                }
            })
            .collect()
    }

    fn block_nodes(
        &mut self,
        l: usize,
        w: &BlockWeights,
        offset: Option<f32>,
    ) -> Result<BlockNodes> {
        let (a, m) = (&w.attn, &w.mlp);
        let mut bias = |name: &str, p: &Option<Param<Tensor<1>>>| {
            p.as_ref()
                .map(|p| self.weight1(&blk(l, name), p))
                .transpose()
        };
        let attn_biases = [
            bias("attn_q.bias", &a.q_bias)?,
            bias("attn_k.bias", &a.k_bias)?,
            bias("attn_v.bias", &a.v_bias)?,
            bias("attn_output.bias", &a.o_bias)?,
        ];
        let ffn_biases = [
            bias("ffn_gate.bias", &m.gate_bias)?,
            bias("ffn_up.bias", &m.up_bias)?,
            bias("ffn_down.bias", &m.down_bias)?,
        ];
        let mut norm = |name: &str, p: &Option<Param<Tensor<1>>>| {
            p.as_ref()
                .map(|p| self.norm_weight(&blk(l, name), p, offset))
                .transpose()
        };
        let qk_norms = match (
            norm("attn_q_norm", &a.q_norm)?,
            norm("attn_k_norm", &a.k_norm)?,
        ) {
            (Some(q), Some(k)) => Some((q, k)),
            _ => None,
        };
        let post_attn_norm = norm("post_attention_norm", &w.post_attn_norm)?;
        let post_ffn_norm = norm("post_ffw_norm", &w.post_ffn_norm)?;
        Ok(BlockNodes {
            attn_norm: self.norm_weight(&blk(l, "attn_norm"), &w.attn_norm, offset)?,
            q: self.weight2(&blk(l, "attn_q.weight"), &a.q)?,
            k: self.weight2(&blk(l, "attn_k.weight"), &a.k)?,
            v: self.weight2(&blk(l, "attn_v.weight"), &a.v)?,
            o: self.weight2(&blk(l, "attn_output.weight"), &a.o)?,
            attn_biases,
            qk_norms,
            post_attn_norm,
            ffn_norm: self.norm_weight(&blk(l, "ffn_norm"), &w.ffn_norm, offset)?,
            gate: self.weight2(&blk(l, "ffn_gate.weight"), &m.gate)?,
            up: self.weight2(&blk(l, "ffn_up.weight"), &m.up)?,
            down: self.weight2(&blk(l, "ffn_down.weight"), &m.down)?,
            ffn_biases,
            post_ffn_norm,
        })
    }

    /// One pre-norm block over the residual stream `x [seq, d_model]`:
    /// `x + attn(norm(x))`, then `+ ffn(norm(.))`; with post norms (Gemma 3),
    /// `x + norm(attn(norm(x)))`, then `+ norm(ffn(norm(.)))`. `rope` holds the tables
    /// of this layer's kind (local layers may rotate with their own base).
    pub fn block(
        &mut self,
        l: usize,
        x: NodeId,
        w: &BlockWeights,
        c: &ModelConfig,
        rope: (NodeId, NodeId),
        opts: BlockOptions,
    ) -> Result<NodeId> {
        let n = self.block_nodes(l, w, opts.norm_offset)?;
        let h = self.rms_norm(&blk(l, "attn_norm"), x, n.attn_norm, c.rms_norm_eps)?;
        let mut h = self.attention(l, h, &n, c, rope)?;
        if let Some(w) = n.post_attn_norm {
            h = self.rms_norm(&blk(l, "post_attention_norm"), h, w, c.rms_norm_eps)?;
        }
        let x = self.add(&blk(l, "ffn_inp"), x, h)?; // residual
        let h = self.rms_norm(&blk(l, "ffn_norm"), x, n.ffn_norm, c.rms_norm_eps)?;
        let mut h = self.gated_ffn(l, h, &n, opts.activation)?;
        if let Some(w) = n.post_ffn_norm {
            h = self.rms_norm(&blk(l, "post_ffw_norm"), h, w, c.rms_norm_eps)?;
        }
        self.add(&blk(l, "l_out"), x, h) // residual
    }

    /// Self-attention: projections, RoPE on Q and K, KV cache (windowed where the
    /// layer has a sliding window), grouped causal attention, output projection.
    fn attention(
        &mut self,
        l: usize,
        x: NodeId,
        n: &BlockNodes,
        c: &ModelConfig,
        rope: (NodeId, NodeId),
    ) -> Result<NodeId> {
        let head_dim = c.head_dim();
        let window = c.sliding_window_of(l);
        let [q_bias, k_bias, v_bias, o_bias] = n.attn_biases;
        let q = self.linear(&blk(l, "attn_q"), x, n.q, q_bias)?; // [seq, heads * hd]
        let k = self.linear(&blk(l, "attn_k"), x, n.k, k_bias)?; // [seq, kv_heads * hd]
        let v = self.linear(&blk(l, "attn_v"), x, n.v, v_bias)?;
        let (q, k) = match n.qk_norms {
            // One norm per head: the weights are `[head_dim]`.
            Some((qw, kw)) => (
                self.rms_norm(&blk(l, "attn_q_norm"), q, qw, c.rms_norm_eps)?,
                self.rms_norm(&blk(l, "attn_k_norm"), k, kw, c.rms_norm_eps)?,
            ),
            None => (q, k),
        };
        let q = self.op(
            &blk(l, "attn_q_rope"),
            Op::Rope { head_dim },
            &[q, rope.0, rope.1],
        )?;
        let k = self.op(
            &blk(l, "attn_k_rope"),
            Op::Rope { head_dim },
            &[k, rope.0, rope.1],
        )?;
        let kv = |kind| Op::KvAppend {
            layer: l,
            kind,
            window,
        };
        let k = self.op(&blk(l, "cache_k"), kv(KvKind::Key), &[k])?; // [past+seq, ..]
        let v = self.op(&blk(l, "cache_v"), kv(KvKind::Value), &[v])?;
        let attn = Op::Attention {
            n_heads: c.num_attention_heads,
            n_kv_heads: c.n_kv_heads(),
            head_dim,
            scale: F32Bits::new(c.attention_scale()),
            window,
        };
        let out = self.op(&blk(l, "attn_out"), attn, &[q, k, v])?; // [seq, heads * hd]
        self.linear(&blk(l, "attn_output"), out, n.o, o_bias) // [seq, d_model]
    }

    /// Gated feed-forward: `down(act(gate(x)) * up(x))`, each projection with its bias
    /// where it has one.
    fn gated_ffn(
        &mut self,
        l: usize,
        x: NodeId,
        n: &BlockNodes,
        act: Activation,
    ) -> Result<NodeId> {
        let [gate_bias, up_bias, down_bias] = n.ffn_biases;
        let g = self.linear(&blk(l, "ffn_gate"), x, n.gate, gate_bias)?; // [seq, ffn]
        let g = match act {
            Activation::Silu => self.op(&blk(l, "ffn_silu"), Op::Silu, &[g])?,
            Activation::GeluTanh => self.op(&blk(l, "ffn_gelu"), Op::GeluTanh, &[g])?,
        };
        let u = self.linear(&blk(l, "ffn_up"), x, n.up, up_bias)?;
        let h = self.op(&blk(l, "ffn_gate_par"), Op::Mul, &[g, u])?;
        self.linear(&blk(l, "ffn_down"), h, n.down, down_bias) // [seq, d_model]
    }
}

impl Default for GraphBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Llama 3.1's RoPE scaling as one divisor per frequency (what llama.cpp's converter
/// stores as `rope_freqs`): long wavelengths slowed by `factor`, short ones kept, the
/// band between interpolated (HF `_compute_llama3_parameters`). Computed in f64; the
/// graph divides each frequency by its factor, whether the factors came from a GGUF
/// file or from config.json.
pub fn llama3_rope_factors(p: &RopeParameters, head_dim: usize) -> Result<Vec<f32>> {
    let err = |what: &str| ModelError::Config {
        path: "config.json".into(),
        message: format!("llama3 rope scaling needs `{what}`"),
    };
    let factor = p.factor.ok_or_else(|| err("factor"))? as f64;
    let low = p.low_freq_factor.ok_or_else(|| err("low_freq_factor"))? as f64;
    let high = p.high_freq_factor.ok_or_else(|| err("high_freq_factor"))? as f64;
    let old = p
        .original_max_position_embeddings
        .ok_or_else(|| err("original_max_position_embeddings"))? as f64;
    let theta = p.rope_theta.unwrap_or(10_000.0) as f64;
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect())
}

/// The graph's RoPE scaling from HF parameters.
pub fn rope_scaling(p: &RopeParameters) -> Result<RopeScaling> {
    let err = |message: String| ModelError::Config {
        path: "config.json".into(),
        message,
    };
    let need = |v: Option<f32>, what: &str| {
        v.map(F32Bits::new)
            .ok_or_else(|| err(format!("rope scaling needs `{what}`")))
    };
    if let Some(f) = p.partial_rotary_factor {
        if f != 1.0 {
            return Err(err(format!(
                "partial rotary embeddings (factor {f}) are not supported"
            )));
        }
    }
    match p.rope_type.as_deref() {
        None | Some("default") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear {
            factor: need(p.factor, "factor")?,
        }),
        // Per-frequency factors: the model's `rope_freqs` ([`llama3_rope_factors`]).
        Some("llama3") => Ok(RopeScaling::Factors),
        Some(other) => Err(err(format!(
            "rope type `{other}` is not supported (default, linear, llama3)"
        ))),
    }
}
