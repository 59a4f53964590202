//! The typed IR: a closed set of ops over named nodes with symbolic shapes.
//!
//! Tensors in the graph are rank 1 or 2. Activations are `[tokens, features]`: the rows
//! of a step, which may carry several sequences (a batch), each with its own positions
//! and its own KV cache. Ops that mix rows know the sequences: RoPE turns each row by
//! its own position, `kv_append` appends each sequence's rows to its own cache, and
//! attention runs each sequence's queries over its own keys; every other op is
//! row-wise. Shapes are symbolic in `tokens` (rows in this step, all sequences) and,
//! per sequence, `past + new` (its positions once this step's `new` tokens are
//! cached), so one compiled graph serves prefill, decode and any mix of sequences.
use std::fmt;

/// One dimension of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A size known when the graph is built.
    Fixed(usize),
    /// The number of tokens in this step, over all its sequences.
    Seq,
    /// Per sequence: the positions in its KV cache once this step's tokens are
    /// written (`past + new`).
    Total,
    /// Per sequence: the KV rows a sliding window of this many positions needs for a
    /// step, the last `min(past, window - 1)` cached positions plus the step's new ones.
    Window(usize),
}

impl Dim {
    /// The concrete size for a step of one sequence with `past` cached and `seq` new
    /// tokens.
    pub fn bind(self, past: usize, seq: usize) -> usize {
        match self {
            Dim::Fixed(n) => n,
            Dim::Seq => seq,
            Dim::Total => past + seq,
            Dim::Window(w) => past.min(w.saturating_sub(1)) + seq,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Seq => f.write_str("tokens"),
            Dim::Total => f.write_str("past+new"),
            Dim::Window(w) => write!(f, "min(past,{})+new", w.saturating_sub(1)),
        }
    }
}

/// A symbolic shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn fixed(dims: &[usize]) -> Self {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn bind(&self, past: usize, seq: usize) -> Vec<usize> {
        self.0.iter().map(|d| d.bind(past, seq)).collect()
    }
    /// The size of `axis` when it is fixed.
    pub fn fixed_dim(&self, axis: usize) -> Option<usize> {
        match self.0.get(axis) {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Element type of a node's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// Token ids.
    I64,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
        })
    }
}

/// An `f32` attribute stored by its bits, so ops can be `Eq` and `Hash`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct F32Bits(u32);

impl F32Bits {
    pub fn new(v: f32) -> Self {
        F32Bits(v.to_bits())
    }
    pub fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

impl fmt::Debug for F32Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:e}", self.get())
    }
}

impl fmt::Display for F32Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:e}", self.get())
    }
}

/// How rotary frequencies are derived from the base frequencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `linear`).
    Linear {
        factor: F32Bits,
    },
    /// Each frequency divided by its own factor, the op's one input `[head_dim / 2]`:
    /// llama.cpp's `rope_freqs` tensor, and how Llama 3.1's scaling (HF `llama3`) is
    /// applied whichever file it comes from.
    Factors,
}

/// Where a parameter node's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A checkpoint weight.
    Weight,
    /// A value computed at compile time by constant folding.
    Folded,
}

/// Whether a KV cache node holds keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvKind {
    Key,
    Value,
}

/// The closed set of operations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// The token ids of this step: `[seq]`, i64.
    Tokens,
    /// A value stored in the graph (weights, folded constants).
    Param(ParamKind),
    /// `(table [vocab, d], ids [seq]) -> [seq, d]`.
    Embedding,
    /// `(x [.., in], w [out, in]) -> [.., out]`: `x @ w^T`, weights in the checkpoints'
    /// `[out, in]` layout (a tied embedding table serves as the output head as is).
    MatMul,
    /// `(x [.., d], w [g]) -> [.., d]`: `x / rms(x) * w` over each group of `g`
    /// features, `g` dividing `d`: the whole row (`g = d`), or one head of it for the
    /// per-head Q/K norms (`g = head_dim`).
    RmsNorm {
        eps: F32Bits,
    },
    /// Elementwise add; the right side may be a row `[d]` broadcast over `[.., d]`.
    Add,
    /// Elementwise multiply, broadcasting like `Add`.
    Mul,
    /// `x * scalar`.
    Scale {
        factor: F32Bits,
    },
    /// `x + scalar`.
    AddScalar {
        value: F32Bits,
    },
    /// `(x [.., d], w [d], b [d]) -> [.., d]`: `(x - mean(x)) / sqrt(var(x) + eps) * w + b`
    /// over the last axis (BERT's LayerNorm; the variance is the biased one).
    LayerNorm {
        eps: F32Bits,
    },
    Silu,
    /// A gate and an up projection side by side, gated: `x [.., 2n] -> [.., n]`,
    /// `silu(x[.., :n]) * x[.., n:]` (what `mul(silu(gate), up)` of a fused gate/up
    /// matmul becomes on CPU backends, in one pass and one buffer).
    SwiGlu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU, `x * Φ(x)` with the error function (BERT's `gelu`).
    Gelu,
    /// A contiguous range of one axis.
    Slice {
        axis: usize,
        start: usize,
        len: usize,
    },
    /// Inputs joined along one axis.
    Concat {
        axis: usize,
    },
    /// Rotary angles `position * inv_freq`: `[] -> [max_positions, head_dim / 2]`.
    RopeAngles {
        head_dim: usize,
        theta: F32Bits,
        scaling: RopeScaling,
        max_positions: usize,
    },
    Cos,
    Sin,
    /// Rotary embedding in the rotate-half layout (HF), at positions `past..past+seq`:
    /// `(x [seq, heads * head_dim], cos [max_pos, head_dim/2], sin [..]) -> x`.
    Rope {
        head_dim: usize,
    },
    /// Learned absolute position embeddings: `table [max_positions, d] -> [tokens, d]`,
    /// each row of the step the table's row at its own position (`past..past+seq` for
    /// each sequence).
    PositionEmbedding,
    /// Writes this step's rows into the layer's KV cache and yields the rows attention
    /// needs, oldest first: `[seq, kv_heads * head_dim] -> [past+seq, ..]`, or with a
    /// sliding window `[min(past, window-1)+seq, ..]` from a ring of `window` rows.
    KvAppend {
        layer: usize,
        kind: KvKind,
        window: Option<usize>,
    },
    /// Causal scaled-dot-product attention with grouped KV heads, optionally limited to
    /// a sliding window: `(q [seq, heads*hd], k [rows, kv_heads*hd], v [..]) ->
    /// [seq, heads*hd]`, where the keys are those of the last `rows` positions.
    Attention {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        scale: F32Bits,
        window: Option<usize>,
    },
    /// Bidirectional scaled-dot-product attention of an encoder: `(q [tokens, heads*hd],
    /// k [tokens, heads*hd], v [..]) -> [tokens, heads*hd]`, each sequence's queries
    /// over every key of the same sequence in this step (no mask, no cache: an encoder
    /// sees its whole input in one step).
    EncoderAttention {
        n_heads: usize,
        head_dim: usize,
        scale: F32Bits,
    },
}

impl Op {
    /// The op's name in dumps.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Tokens => "tokens",
            Op::Param(ParamKind::Weight) => "weight",
            Op::Param(ParamKind::Folded) => "const",
            Op::Embedding => "embedding",
            Op::MatMul => "matmul",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale { .. } => "scale",
            Op::AddScalar { .. } => "add_scalar",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Silu => "silu",
            Op::SwiGlu => "swiglu",
            Op::GeluTanh => "gelu_tanh",
            Op::Gelu => "gelu",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::RopeAngles { .. } => "rope_angles",
            Op::Cos => "cos",
            Op::Sin => "sin",
            Op::Rope { .. } => "rope",
            Op::PositionEmbedding => "position_embedding",
            Op::KvAppend { .. } => "kv_append",
            Op::Attention { .. } => "attention",
            Op::EncoderAttention { .. } => "encoder_attention",
        }
    }

    /// True for ops whose value depends only on their inputs (no step state), so a
    /// node with only constant inputs can be evaluated once at compile time.
    pub fn is_pure(&self) -> bool {
        !matches!(
            self,
            Op::Tokens
                | Op::Param(_)
                | Op::Rope { .. }
                | Op::PositionEmbedding
                | Op::KvAppend { .. }
                | Op::Attention { .. }
                | Op::EncoderAttention { .. }
        )
    }

    /// The op's attributes as text, for dumps.
    pub fn attrs(&self) -> String {
        match self {
            Op::RmsNorm { eps } | Op::LayerNorm { eps } => format!("eps={eps}"),
            Op::Scale { factor } => format!("factor={factor}"),
            Op::AddScalar { value } => format!("value={value}"),
            Op::Slice { axis, start, len } => format!("axis={axis} start={start} len={len}"),
            Op::Concat { axis } => format!("axis={axis}"),
            Op::RopeAngles {
                head_dim,
                theta,
                scaling,
                max_positions,
            } => {
                let scaling = match scaling {
                    RopeScaling::None => "none".to_string(),
                    RopeScaling::Linear { factor } => format!("linear(factor={factor})"),
                    RopeScaling::Factors => "factors".to_string(),
                };
                format!("head_dim={head_dim} theta={theta} scaling={scaling} max_positions={max_positions}")
            }
            Op::Rope { head_dim } => format!("head_dim={head_dim}"),
            Op::KvAppend {
                layer,
                kind,
                window,
            } => {
                format!("layer={layer} kind={kind:?}{}", window_attr(*window))
            }
            Op::Attention {
                n_heads,
                n_kv_heads,
                head_dim,
                scale,
                window,
            } => format!(
                "heads={n_heads} kv_heads={n_kv_heads} head_dim={head_dim} scale={scale}{}",
                window_attr(*window)
            ),
            Op::EncoderAttention {
                n_heads,
                head_dim,
                scale,
            } => format!("heads={n_heads} head_dim={head_dim} scale={scale}"),
            _ => String::new(),
        }
    }
}

fn window_attr(window: Option<usize>) -> String {
    window.map(|w| format!(" window={w}")).unwrap_or_default()
}

/// Index of a node in its graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// One node: a named op over earlier nodes, with its inferred shape and dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Stable name carrying the layer index, e.g. `blk.12.attn_norm`.
    pub name: String,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub shape: Shape,
    pub dtype: DType,
}
