//! The burn lowering: every op as burn tensor ops, on any device. The reference that
//! the host lowering is checked against, and the whole path on ndarray and wgpu.
use burn::tensor::activation;
use burn::tensor::{Bool, DType, Device, Tensor, TensorData};

use super::{bad, f2, rows_of, Step};
use crate::error::Result;
use crate::ir::{Op, RopeScaling};
use crate::value::Value;

/// Evaluates one op with burn's tensor ops on `device`: the lowering of every op on
/// every backend (the host lowering replaces some on devices with host kernels). `step`
/// is `None` during constant folding, where only pure ops run.
pub fn eval(
    node: &str,
    op: &Op,
    inputs: Vec<Value>,
    device: &Device,
    step: Option<&mut Step<'_>>,
) -> Result<Value> {
    let mut it = inputs.into_iter();
    let mut next = || it.next().ok_or_else(|| bad(node, "missing input"));
    Ok(match op {
        Op::Tokens | Op::Param(_) => return Err(bad(node, "source nodes are not evaluated")),
        Op::Embedding => {
            let table = next()?;
            let Value::I1(ids) = next()? else {
                return Err(bad(node, "token ids must be integers"));
            };
            let table = match table {
                Value::Blocks(b) => Value::Quant(b.host().clone()),
                t => t,
            };
            match table {
                // A block-quantized table: only the looked-up rows are widened.
                Value::Quant(table) => {
                    let ids = Value::I1(ids).to_i64_vec()?;
                    let mut rows = Vec::with_capacity(ids.len() * table.cols());
                    for &id in &ids {
                        let r = usize::try_from(id)
                            .ok()
                            .filter(|&r| r < table.rows())
                            .ok_or_else(|| {
                                bad(node, format!("token id {id} is outside the table"))
                            })?;
                        table.dequantize_row(r, &mut rows);
                    }
                    Value::F2(Tensor::from_data(
                        TensorData::new(rows, [ids.len(), table.cols()]),
                        device,
                    ))
                }
                table => Value::F2(f2(node, table)?.select(0, ids)),
            }
        }
        Op::MatMul => {
            let x = f2(node, next()?)?;
            match next()? {
                Value::F2(w) => Value::F2(x.matmul(w.transpose())),
                Value::Blocks(w) => Value::F2(w.matmul(node, x)?),
                other => {
                    return Err(bad(
                        node,
                        format!("matmul weight of shape {:?} is not a matrix", other.dims()),
                    ))
                }
            }
        }
        Op::RmsNorm { eps } => {
            let x = f2(node, next()?)?;
            let Value::F1(w) = next()? else {
                return Err(bad(node, "norm weight must be rank 1"));
            };
            let [rows, d] = x.dims();
            let g = w.dims()[0];
            if let Some(out) = crate::gpu::rms_norm(&x, &w, eps.get(), device) {
                Value::F2(out)
            } else if g == d {
                let inv = inv_rms(x.clone(), eps.get());
                Value::F2(x.mul(inv).mul(w.unsqueeze_dim(0)))
            } else {
                // One norm per group (head): rows of `g` features, then back.
                let x = x.reshape([rows * d / g, g]);
                let inv = inv_rms(x.clone(), eps.get());
                Value::F2(x.mul(inv).mul(w.unsqueeze_dim(0)).reshape([rows, d]))
            }
        }
        Op::LayerNorm { eps } => {
            let x = f2(node, next()?)?;
            let (Value::F1(w), Value::F1(b)) = (next()?, next()?) else {
                return Err(bad(node, "layer norm weight and bias must be rank 1"));
            };
            let mean = x.clone().mean_dim(1);
            let centered = x.sub(mean);
            let inv = inv_rms(centered.clone(), eps.get());
            Value::F2(
                centered
                    .mul(inv)
                    .mul(w.unsqueeze_dim(0))
                    .add(b.unsqueeze_dim(0)),
            )
        }
        Op::Add => binary(node, next()?, next()?, |a, b| a.add(b), |a, b| a.add(b))?,
        Op::Mul => binary(node, next()?, next()?, |a, b| a.mul(b), |a, b| a.mul(b))?,
        Op::Scale { factor } => match next()? {
            Value::F1(t) => Value::F1(t.mul_scalar(factor.get())),
            Value::F2(t) => Value::F2(t.mul_scalar(factor.get())),
            _ => return Err(bad(node, "scale needs a float tensor")),
        },
        Op::AddScalar { value } => match next()? {
            Value::F1(t) => Value::F1(t.add_scalar(value.get())),
            Value::F2(t) => Value::F2(t.add_scalar(value.get())),
            _ => return Err(bad(node, "add_scalar needs a float tensor")),
        },
        Op::Silu => Value::F2(activation::silu(f2(node, next()?)?)),
        Op::SwiGlu => {
            let x = f2(node, next()?)?;
            let n = x.dims()[1] / 2;
            let (gate, up) = (x.clone().narrow(1, 0, n), x.narrow(1, n, n));
            Value::F2(activation::silu(gate).mul(up))
        }
        Op::GeluTanh => Value::F2(activation::gelu_approximate(f2(node, next()?)?)),
        Op::Gelu => Value::F2(activation::gelu(f2(node, next()?)?)),
        Op::Cos => Value::F2(f2(node, next()?)?.cos()),
        Op::Sin => Value::F2(f2(node, next()?)?.sin()),
        Op::Slice { axis, start, len } => match next()? {
            Value::F1(t) => Value::F1(t.narrow(*axis, *start, *len)),
            Value::F2(t) => Value::F2(t.narrow(*axis, *start, *len)),
            Value::I1(t) => Value::I1(t.narrow(*axis, *start, *len)),
            Value::Quant(m) if *axis == 0 => Value::Quant(std::sync::Arc::new(
                m.slice_rows(*start, *len)
                    .ok_or_else(|| bad(node, "row slice past the end of the matrix"))?,
            )),
            Value::Quant(_) => return Err(bad(node, "a block matrix is sliced by rows only")),
            Value::Blocks(_) => {
                return Err(bad(
                    node,
                    "a device block matrix is not sliced while running",
                ))
            }
            Value::Cached(_) | Value::PerSequence(_) => {
                return Err(bad(node, "cannot slice cached rows"))
            }
        },
        Op::Concat { axis } => {
            let mut all = Vec::new();
            let mut ones = Vec::new();
            let mut blocks = Vec::new();
            while let Ok(v) = next() {
                match v {
                    Value::F2(t) => all.push(t),
                    Value::F1(t) => ones.push(t),
                    Value::Quant(m) => blocks.push(m),
                    _ => return Err(bad(node, "concat needs float tensors")),
                }
            }
            match (all.is_empty(), ones.is_empty(), blocks.is_empty()) {
                (false, true, true) => Value::F2(Tensor::cat(all, *axis)),
                (true, false, true) => Value::F1(Tensor::cat(ones, *axis)),
                (true, true, false) if *axis == 0 => {
                    // Rows of block matrices: joined by reference, no bytes copied.
                    let parts: Vec<&llama_kernels::quant::QMatrix> =
                        blocks.iter().map(|m| &**m).collect();
                    Value::Quant(std::sync::Arc::new(
                        llama_kernels::quant::QMatrix::concat(&parts)
                            .ok_or_else(|| bad(node, "block matrices of different widths"))?,
                    ))
                }
                _ => return Err(bad(node, "concat operands must share a rank and a storage")),
            }
        }
        Op::RopeAngles {
            head_dim,
            theta,
            scaling,
            max_positions,
        } => {
            let factors = match scaling {
                RopeScaling::Factors => Some(
                    Value::F1(match next()? {
                        Value::F1(t) => t,
                        _ => return Err(bad(node, "rope factors must be rank 1")),
                    })
                    .to_f32_vec()?,
                ),
                _ => None,
            };
            let angles = rope_angles(
                *head_dim,
                theta.get(),
                *scaling,
                factors.as_deref(),
                *max_positions,
            );
            Value::F2(Tensor::from_data(
                TensorData::new(angles, [*max_positions, head_dim / 2]),
                device,
            ))
        }
        Op::Rope { head_dim } => {
            let step = step.ok_or_else(|| bad(node, "rope needs a step"))?;
            let x = f2(node, next()?)?;
            let cos = f2(node, next()?)?;
            let sin = f2(node, next()?)?;
            if let [p] = &step.parts[..] {
                // One sequence: the kernel reads the tables at its positions.
                let tables = (&cos, &sin);
                if let Some(out) = crate::gpu::rope(&x, tables, *head_dim, p.past, device) {
                    return Ok(Value::F2(out));
                }
            }
            let (cos, sin) = step_angles(cos, sin, step, node)?;
            match crate::gpu::rope(&x, (&cos, &sin), *head_dim, 0, device) {
                Some(out) => Value::F2(out),
                None => Value::F2(rope(x, cos, sin, *head_dim)),
            }
        }
        Op::PositionEmbedding => {
            let step = step.ok_or_else(|| bad(node, "position_embedding needs a step"))?;
            Value::F2(step_rows(f2(node, next()?)?, step, node, "position")?)
        }
        Op::KvAppend { layer, kind, .. } => {
            let step = step.ok_or_else(|| bad(node, "kv_append needs a step"))?;
            let rows = f2(node, next()?)?;
            if let [p] = &mut step.parts[..] {
                p.cache.append(*layer, *kind, p.past, rows)?
            } else {
                let mut values = Vec::with_capacity(step.parts.len());
                for p in &mut step.parts {
                    let own = rows.clone().narrow(0, p.offset, p.seq);
                    values.push(p.cache.append(*layer, *kind, p.past, own)?);
                }
                Value::PerSequence(values)
            }
        }
        Op::Attention {
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            window,
        } => {
            let step = step.ok_or_else(|| bad(node, "attention needs a step"))?;
            let q = f2(node, next()?)?;
            let heads = Heads {
                n_heads: *n_heads,
                n_kv_heads: *n_kv_heads,
                head_dim: *head_dim,
            };
            let mut outs = Vec::with_capacity(step.parts.len());
            for (p, (k, v)) in step.parts.iter().zip(per_sequence(node, next()?, next()?)?) {
                let (k, v) = (f2(node, k)?, f2(node, v)?);
                let q = rows_of(&q, p.offset, p.seq);
                let shape = (*n_heads, *n_kv_heads, *head_dim);
                let fused = crate::gpu::fused_attention(
                    &q,
                    &k,
                    &v,
                    shape,
                    scale.get(),
                    *window,
                    p.past,
                    device,
                );
                let at = (p.past, p.seq);
                outs.push(match fused {
                    Some(out) => out,
                    None => {
                        // A cache in f16 is widened for the general path's matmuls.
                        let (k, v) = (k.cast(DType::F32), v.cast(DType::F32));
                        attention(q, k, v, &heads, scale.get(), *window, at, device)
                    }
                });
            }
            Value::F2(if outs.len() == 1 {
                outs.remove(0)
            } else {
                Tensor::cat(outs, 0)
            })
        }
        Op::EncoderAttention {
            n_heads,
            head_dim,
            scale,
        } => {
            let step = step.ok_or_else(|| bad(node, "encoder attention needs a step"))?;
            let qkv = (f2(node, next()?)?, f2(node, next()?)?, f2(node, next()?)?);
            Value::F2(encoder_attention(
                node,
                qkv,
                (*n_heads, *head_dim, scale.get()),
                step,
            )?)
        }
    })
}

/// `1 / sqrt(mean(x^2) + eps)` of each row, `[rows, 1]`: RMSNorm's scale, and
/// LayerNorm's of centered rows.
fn inv_rms(x: Tensor<2>, eps: f32) -> Tensor<2> {
    x.powi_scalar(2).mean_dim(1).add_scalar(eps).sqrt().recip()
}

/// Bidirectional attention of each sequence of a step over its own rows: the
/// [`Op::EncoderAttention`] lowering.
fn encoder_attention(
    node: &str,
    (q, k, v): (Tensor<2>, Tensor<2>, Tensor<2>),
    (n_heads, head_dim, scale): (usize, usize, f32),
    step: &Step<'_>,
) -> Result<Tensor<2>> {
    check_whole_sequences(step, node)?;
    let one = |q: Tensor<2>, k: Tensor<2>, v: Tensor<2>| {
        let seq = q.dims()[0];
        // [seq, heads*hd] -> [heads, seq, hd]
        let split = |t: Tensor<2>| t.reshape([seq, n_heads, head_dim]).swap_dims(0, 1);
        let scores = split(q).matmul(split(k).swap_dims(1, 2)).mul_scalar(scale);
        activation::softmax(scores, 2)
            .matmul(split(v)) // [heads, seq, hd]
            .swap_dims(0, 1)
            .reshape([seq, n_heads * head_dim])
    };
    if let [_] = &step.parts[..] {
        return Ok(one(q, k, v));
    }
    let outs = step
        .parts
        .iter()
        .map(|p| {
            let rows = |t: &Tensor<2>| t.clone().narrow(0, p.offset, p.seq);
            one(rows(&q), rows(&k), rows(&v))
        })
        .collect();
    Ok(Tensor::cat(outs, 0))
}

/// Rotary angles `[max_positions, head_dim / 2]`, computed in f32 as HF transformers does
/// (`inv_freq = 1 / theta^(2i/d)`, then `position * inv_freq`), with its scaling rules;
/// `factors` (one per frequency) with [`RopeScaling::Factors`].
pub fn rope_angles(
    head_dim: usize,
    theta: f32,
    scaling: RopeScaling,
    factors: Option<&[f32]>,
    max_positions: usize,
) -> Vec<f32> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let base = 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32);
            match (scaling, factors) {
                (RopeScaling::Linear { factor }, _) => base / factor.get(),
                (RopeScaling::Factors, Some(f)) => base / f.get(i).copied().unwrap_or(1.0),
                (RopeScaling::None | RopeScaling::Factors, _) => base,
            }
        })
        .collect();
    let mut out = Vec::with_capacity(max_positions * half);
    for p in 0..max_positions {
        out.extend(inv_freq.iter().map(|f| p as f32 * f));
    }
    out
}

/// Keys and values split per sequence: the values of a batched step's `kv_append`
/// nodes, or one sequence's as they are.
pub(super) fn per_sequence(node: &str, k: Value, v: Value) -> Result<Vec<(Value, Value)>> {
    match (k, v) {
        (Value::PerSequence(k), Value::PerSequence(v)) if k.len() == v.len() => {
            Ok(k.into_iter().zip(v).collect())
        }
        (Value::PerSequence(_), _) | (_, Value::PerSequence(_)) => Err(bad(
            node,
            "keys and values hold different numbers of sequences",
        )),
        (k, v) => Ok(vec![(k, v)]),
    }
}

/// The rows of the cos and sin tables at each row's position in a step: each
/// sequence's positions `past..past + seq`, in row order.
pub(super) fn step_angles(
    cos: Tensor<2>,
    sin: Tensor<2>,
    step: &Step<'_>,
    node: &str,
) -> Result<(Tensor<2>, Tensor<2>)> {
    Ok((
        step_rows(cos, step, node, "rope")?,
        step_rows(sin, step, node, "rope")?,
    ))
}

/// The rows of a per-position `table` at each row's position in a step: each
/// sequence's positions `past..past + seq`, in row order. `what` names the table in
/// the error for a position past its end.
fn step_rows(table: Tensor<2>, step: &Step<'_>, node: &str, what: &str) -> Result<Tensor<2>> {
    let positions = table.dims()[0];
    if let Some(p) = step.parts.iter().find(|p| p.past + p.seq > positions) {
        return Err(bad(
            node,
            format!(
                "position {} is past the {what} table of {positions} positions",
                p.past + p.seq - 1
            ),
        ));
    }
    if let [p] = &step.parts[..] {
        return Ok(table.narrow(0, p.past, p.seq));
    }
    let rows = step
        .parts
        .iter()
        .map(|p| table.clone().narrow(0, p.past, p.seq))
        .collect();
    Ok(Tensor::cat(rows, 0))
}

/// An encoder's step: every sequence whole, none with cached positions.
pub(super) fn check_whole_sequences(step: &Step<'_>, node: &str) -> Result<()> {
    if step.parts.iter().any(|p| p.past != 0) {
        return Err(bad(
            node,
            "an encoder sees each sequence whole, in one step",
        ));
    }
    Ok(())
}

/// Rotate-half RoPE on `x [rows, heads * head_dim]`, row `i` turned by the angles of
/// row `i` of `cos` and `sin` (`[rows, head_dim / 2]`).
fn rope(x: Tensor<2>, cos: Tensor<2>, sin: Tensor<2>, head_dim: usize) -> Tensor<2> {
    let [seq, width] = x.dims();
    let (heads, half) = (width / head_dim, head_dim / 2);
    let c = cos.unsqueeze_dim::<3>(1); // [seq, 1, half]
    let s = sin.unsqueeze_dim::<3>(1);
    let x = x.reshape([seq, heads, head_dim]);
    let x1 = x.clone().narrow(2, 0, half);
    let x2 = x.narrow(2, half, half);
    let o1 = x1.clone().mul(c.clone()).sub(x2.clone().mul(s.clone()));
    let o2 = x2.mul(c).add(x1.mul(s));
    Tensor::cat(vec![o1, o2], 2).reshape([seq, width])
}

/// Head layout of an attention op.
struct Heads {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// Causal attention of one sequence's `seq` queries (at positions `past..`) over the
/// last `rows` positions' keys, with query heads grouped over KV heads (GQA: head `h`
/// reads KV head `h / (n_heads / n_kv_heads)`) and, with a window, each query seeing
/// only the last `window` positions.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    heads: &Heads,
    scale: f32,
    window: Option<usize>,
    (past, seq): (usize, usize),
    device: &Device,
) -> Tensor<2> {
    let &Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    } = heads;
    let rows = k.dims()[0];
    let group = n_heads / n_kv_heads;
    // Fold each KV group's query heads into the row axis so K and V are never repeated:
    // [seq, heads*hd] -> [kv_heads, group*seq, hd], rows ordered (g, i).
    let q = q
        .reshape([seq, n_kv_heads, group, head_dim])
        .permute([1, 2, 0, 3])
        .reshape([n_kv_heads, group * seq, head_dim]);
    let k = k.reshape([rows, n_kv_heads, head_dim]).swap_dims(0, 1); // [kv, rows, hd]
    let v = v.reshape([rows, n_kv_heads, head_dim]).swap_dims(0, 1);
    let mut scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale); // [kv, group*seq, rows]
                                                                    // Query i sits at position past + i; key j at past + seq - rows + j.
    let first_key = past + seq - rows;
    let visible = |i: usize, j: usize| {
        let (qp, kp) = (past + i, first_key + j);
        kp <= qp && window.is_none_or(|w| qp - kp < w)
    };
    let all_visible = (0..seq).all(|i| (0..rows).all(|j| visible(i, j)));
    if !all_visible {
        let mask: Vec<bool> = (0..group * seq)
            .flat_map(|r| (0..rows).map(move |j| (r % seq, j)))
            .map(|(i, j)| !visible(i, j))
            .collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask, [group * seq, rows]), device)
            .unsqueeze_dim::<3>(0)
            .expand([n_kv_heads, group * seq, rows]);
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    let probs = activation::softmax(scores, 2);
    probs
        .matmul(v) // [kv, group*seq, hd]
        .reshape([n_kv_heads, group, seq, head_dim])
        .permute([2, 0, 1, 3])
        .reshape([seq, n_heads * head_dim])
}

fn binary(
    node: &str,
    a: Value,
    b: Value,
    f: impl Fn(Tensor<2>, Tensor<2>) -> Tensor<2>,
    g: impl Fn(Tensor<1>, Tensor<1>) -> Tensor<1>,
) -> Result<Value> {
    Ok(match (a, b) {
        (Value::F2(a), Value::F2(b)) => Value::F2(f(a, b)),
        (Value::F2(a), Value::F1(b)) => Value::F2(f(a, b.unsqueeze_dim(0))),
        (Value::F1(a), Value::F1(b)) => Value::F1(g(a, b)),
        _ => return Err(bad(node, "unsupported operand ranks")),
    })
}
