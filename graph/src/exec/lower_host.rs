//! The host lowering: ops run by our kernels (`llama-kernels`) over host memory, on
//! devices whose [`crate::Capabilities`] allow it, and block matmuls wherever a weight
//! is stored as GGML blocks.
use llama_kernels::{AttentionShape, KvRows};

use super::kv::KvCache;
use super::lower_burn::{check_whole_sequences, per_sequence, step_angles};
use super::{bad, f2, host2, tensor2, Step};
use crate::error::Result;
use crate::ir::Op;
use crate::value::Value;
use burn::tensor::{Device, Tensor, TensorData};

/// Whether `op` has a host lowering on devices with host kernels. Block matmuls are
/// chosen by their weight's storage instead (see [`super::Program::new`]).
pub(super) fn lowers(op: &Op) -> bool {
    matches!(
        op,
        Op::RmsNorm { .. }
            | Op::Silu
            | Op::Gelu
            | Op::GeluTanh
            | Op::SwiGlu
            | Op::Rope { .. }
            | Op::Attention { .. }
            | Op::EncoderAttention { .. }
    )
}

/// Evaluates one op with the host kernels.
pub(super) fn eval(
    node: &str,
    op: &Op,
    inputs: Vec<Value>,
    device: &Device,
    step: &mut Step<'_>,
) -> Result<Value> {
    let mut it = inputs.into_iter();
    let mut next = || it.next().ok_or_else(|| bad(node, "missing input"));
    Ok(match op {
        Op::MatMul => {
            let x = f2(node, next()?)?;
            let Value::Quant(w) = next()? else {
                return Err(bad(node, "a host matmul needs a block weight"));
            };
            // The block kernels run on the host: bring the activations over and back.
            let [n, _] = x.dims();
            let host = Value::F2(x).into_f32_vec()?;
            let out =
                llama_kernels::quant::matmul(&host, n, &w, llama_kernels::quant::Kernel::Auto);
            Value::F2(Tensor::from_data(
                TensorData::new(out, [n, w.rows()]),
                device,
            ))
        }
        Op::RmsNorm { eps } => {
            let (mut x, dims) = host2(node, f2(node, next()?)?)?;
            let Value::F1(w) = next()? else {
                return Err(bad(node, "norm weight must be rank 1"));
            };
            let w = Value::F1(w).to_f32_vec()?;
            llama_kernels::rms_norm(&mut x, &w, eps.get());
            tensor2(x, dims, device)
        }
        Op::Silu => {
            let (mut x, dims) = host2(node, f2(node, next()?)?)?;
            llama_kernels::silu(&mut x);
            tensor2(x, dims, device)
        }
        Op::Gelu => {
            let (mut x, dims) = host2(node, f2(node, next()?)?)?;
            llama_kernels::gelu(&mut x);
            tensor2(x, dims, device)
        }
        Op::GeluTanh => {
            let (mut x, dims) = host2(node, f2(node, next()?)?)?;
            llama_kernels::gelu_tanh(&mut x);
            tensor2(x, dims, device)
        }
        Op::SwiGlu => {
            let (mut x, [rows, width]) = host2(node, f2(node, next()?)?)?;
            llama_kernels::swiglu(&mut x, width / 2);
            tensor2(x, [rows, width / 2], device)
        }
        Op::Rope { head_dim } => {
            let x = f2(node, next()?)?;
            let (cos, sin) = step_angles(f2(node, next()?)?, f2(node, next()?)?, step, node)?;
            let (mut x, dims) = host2(node, x)?;
            let (cos, _) = host2(node, cos)?;
            let (sin, _) = host2(node, sin)?;
            llama_kernels::rope(&mut x, &cos, &sin, *head_dim);
            tensor2(x, dims, device)
        }
        Op::Attention {
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            window,
        } => {
            let (q, [rows, width]) = host2(node, f2(node, next()?)?)?;
            let kv = per_sequence(node, next()?, next()?)?;
            let mut calls = Vec::with_capacity(step.parts.len());
            for (p, (k, v)) in step.parts.iter().zip(kv) {
                let cache = &*p.cache;
                let k = AttentionInput::new(node, k, cache)?;
                let v = AttentionInput::new(node, v, cache)?;
                let shape = AttentionShape {
                    n_heads: *n_heads,
                    n_kv_heads: *n_kv_heads,
                    head_dim: *head_dim,
                    scale: scale.get(),
                    window: *window,
                    past: p.past,
                    causal: true,
                };
                let q = &q[p.offset * width..(p.offset + p.seq) * width];
                calls.push((q, k, v, shape));
            }
            let attend =
                |(q, k, v, shape): &(&[f32], AttentionInput, AttentionInput, AttentionShape)| {
                    llama_kernels::attention(q, k.rows(), v.rows(), shape)
                };
            // The sequences of a batched step side by side across threads (each call
            // splits its own heads too): one at a time, a step of many decoding
            // sequences is many small calls that leave threads idle.
            let out = if let [one] = calls.as_slice() {
                attend(one)
            } else {
                use rayon::prelude::*;
                let parts: Vec<Vec<f32>> = calls.par_iter().map(attend).collect();
                parts.concat()
            };
            tensor2(out, [rows, width], device)
        }
        Op::EncoderAttention {
            n_heads,
            head_dim,
            scale,
        } => {
            let (q, [rows, width]) = host2(node, f2(node, next()?)?)?;
            let (k, _) = host2(node, f2(node, next()?)?)?;
            let (v, _) = host2(node, f2(node, next()?)?)?;
            check_whole_sequences(step, node)?;
            let shape = AttentionShape {
                n_heads: *n_heads,
                n_kv_heads: *n_heads,
                head_dim: *head_dim,
                scale: scale.get(),
                window: None,
                past: 0,
                causal: false,
            };
            let mut out = Vec::with_capacity(q.len());
            for p in &step.parts {
                let at = p.offset * width..(p.offset + p.seq) * width;
                out.extend(llama_kernels::attention(
                    &q[at.clone()],
                    KvRows::F32(&k[at.clone()]),
                    KvRows::F32(&v[at]),
                    &shape,
                ));
            }
            tensor2(out, [rows, width], device)
        }
        other => {
            return Err(bad(
                node,
                format!("{} has no host lowering", other.mnemonic()),
            ))
        }
    })
}

/// Keys or values for the host attention.
enum AttentionInput<'a> {
    /// Cached rows, read in place.
    Cached(KvRows<'a>),
    /// The rows of a layer kept as tensors (a sliding window), brought over.
    Host(Vec<f32>),
}

impl<'a> AttentionInput<'a> {
    fn new(node: &str, x: Value, cache: &'a KvCache) -> Result<AttentionInput<'a>> {
        Ok(match x {
            Value::Cached(r) => AttentionInput::Cached(cache.host_rows(&r)?),
            x => AttentionInput::Host(host2(node, f2(node, x)?)?.0),
        })
    }

    fn rows(&self) -> KvRows<'_> {
        match self {
            AttentionInput::Cached(r) => *r,
            AttentionInput::Host(x) => KvRows::F32(x),
        }
    }
}
