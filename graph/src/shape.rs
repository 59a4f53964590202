//! Shape inference: one rule per op, checked when a node is added.
use crate::error::{GraphError, Result};
use crate::ir::{DType, Dim, Op, RopeScaling, Shape};

fn mismatch(
    node: &str,
    what: impl Into<String>,
    expected: impl Into<String>,
    actual: &Shape,
) -> GraphError {
    GraphError::Shape {
        node: node.to_string(),
        what: what.into(),
        expected: expected.into(),
        actual: actual.clone(),
    }
}

fn invalid(node: &str, message: impl Into<String>) -> GraphError {
    GraphError::Invalid {
        node: node.to_string(),
        message: message.into(),
    }
}

fn arity(node: &str, op: &Op, inputs: &[(Shape, DType)], n: usize) -> Result<()> {
    if inputs.len() != n {
        return Err(invalid(
            node,
            format!("{} takes {n} inputs, got {}", op.mnemonic(), inputs.len()),
        ));
    }
    Ok(())
}

fn float(node: &str, i: usize, input: &(Shape, DType)) -> Result<()> {
    if input.1 != DType::F32 {
        return Err(invalid(
            node,
            format!("input {i} must be f32, is {}", input.1),
        ));
    }
    Ok(())
}

fn rank(node: &str, what: &str, s: &Shape, r: usize) -> Result<()> {
    if s.rank() != r {
        return Err(mismatch(node, what, format!("rank {r}"), s));
    }
    Ok(())
}

/// Infers the output shape and dtype of `op` over `inputs`; errors name `node`.
/// `Param` nodes carry their own shape and are not inferred here.
pub fn infer(node: &str, op: &Op, inputs: &[(Shape, DType)]) -> Result<(Shape, DType)> {
    for (i, inp) in inputs.iter().enumerate() {
        if !matches!(op, Op::Embedding) || i == 0 {
            float(node, i, inp)?;
        }
    }
    let f32 = |s: Shape| Ok((s, DType::F32));
    match op {
        Op::Tokens | Op::Param(_) => Err(invalid(node, "source nodes carry their own shape")),
        Op::Embedding => {
            arity(node, op, inputs, 2)?;
            let (table, ids) = (&inputs[0].0, &inputs[1]);
            rank(node, "embedding table", table, 2)?;
            if ids.1 != DType::I64 || ids.0.rank() != 1 {
                return Err(mismatch(node, "token ids", "[tokens] of i64", &ids.0));
            }
            f32(Shape(vec![ids.0 .0[0], table.0[1]]))
        }
        Op::MatMul => {
            arity(node, op, inputs, 2)?;
            let (x, w) = (&inputs[0].0, &inputs[1].0);
            rank(node, "weight", w, 2)?;
            let last = x.0.last().copied();
            if x.rank() == 0 || last != Some(w.0[1]) {
                return Err(mismatch(
                    node,
                    format!("weight for input {x}"),
                    format!("[_, {}]", last.map(|d| d.to_string()).unwrap_or_default()),
                    w,
                ));
            }
            let mut out = x.0.clone();
            *out.last_mut().expect("rank checked above") = w.0[0];
            f32(Shape(out))
        }
        Op::RmsNorm { .. } => {
            arity(node, op, inputs, 2)?;
            let (x, w) = (&inputs[0].0, &inputs[1].0);
            // The weight spans the whole row, or one group of it (a head, for the
            // per-head Q/K norms), normalized group by group.
            let fits = match (x.0.last(), w.0.first()) {
                (Some(Dim::Fixed(d)), Some(Dim::Fixed(g))) => *g > 0 && d % g == 0,
                _ => false,
            };
            if w.rank() != 1 || !fits {
                return Err(mismatch(
                    node,
                    format!("norm weight for input {x}"),
                    format!(
                        "[{}]",
                        x.0.last().map(|d| d.to_string()).unwrap_or_default()
                    ),
                    w,
                ));
            }
            f32(x.clone())
        }
        Op::LayerNorm { .. } => {
            arity(node, op, inputs, 3)?;
            let x = &inputs[0].0;
            for (what, w) in [("weight", &inputs[1].0), ("bias", &inputs[2].0)] {
                if w.rank() != 1 || x.0.last() != Some(&w.0[0]) {
                    return Err(mismatch(
                        node,
                        format!("layer norm {what} for input {x}"),
                        format!(
                            "[{}]",
                            x.0.last().map(|d| d.to_string()).unwrap_or_default()
                        ),
                        w,
                    ));
                }
            }
            f32(x.clone())
        }
        Op::Add | Op::Mul => {
            arity(node, op, inputs, 2)?;
            let (a, b) = (&inputs[0].0, &inputs[1].0);
            let row = b.rank() == 1 && a.0.last() == b.0.last();
            if a != b && !row {
                return Err(mismatch(
                    node,
                    format!("right operand for {a}"),
                    a.to_string(),
                    b,
                ));
            }
            f32(a.clone())
        }
        Op::Scale { .. }
        | Op::AddScalar { .. }
        | Op::Silu
        | Op::GeluTanh
        | Op::Gelu
        | Op::Cos
        | Op::Sin => {
            arity(node, op, inputs, 1)?;
            f32(inputs[0].0.clone())
        }
        Op::SwiGlu => {
            arity(node, op, inputs, 1)?;
            let x = &inputs[0].0;
            let last = x.rank().checked_sub(1);
            match last.and_then(|a| x.fixed_dim(a)) {
                Some(w) if w % 2 == 0 && w > 0 => {
                    let mut out = x.0.clone();
                    if let Some(d) = out.last_mut() {
                        *d = Dim::Fixed(w / 2);
                    }
                    f32(Shape(out))
                }
                _ => Err(mismatch(
                    node,
                    "input for swiglu (an even last dimension)",
                    "[.., 2n]",
                    x,
                )),
            }
        }
        Op::Slice { axis, start, len } => {
            arity(node, op, inputs, 1)?;
            let x = &inputs[0].0;
            match x.fixed_dim(*axis) {
                Some(n) if start + len <= n => {
                    let mut out = x.0.clone();
                    out[*axis] = Dim::Fixed(*len);
                    f32(Shape(out))
                }
                _ => Err(mismatch(
                    node,
                    format!("input for slice {start}..{} of axis {axis}", start + len),
                    format!("a fixed axis {axis} of at least {}", start + len),
                    x,
                )),
            }
        }
        Op::Concat { axis } => {
            if inputs.is_empty() {
                return Err(invalid(node, "concat of nothing"));
            }
            let first = &inputs[0].0;
            let mut total = 0;
            for (s, _) in inputs {
                let same_elsewhere = s.rank() == first.rank()
                    && s.0
                        .iter()
                        .zip(&first.0)
                        .enumerate()
                        .all(|(i, (a, b))| i == *axis || a == b);
                match s.fixed_dim(*axis) {
                    Some(n) if same_elsewhere => total += n,
                    _ => {
                        return Err(mismatch(
                            node,
                            format!("concat operand on axis {axis}"),
                            format!("shape like {first} with a fixed axis {axis}"),
                            s,
                        ))
                    }
                }
            }
            let mut out = first.0.clone();
            out[*axis] = Dim::Fixed(total);
            f32(Shape(out))
        }
        Op::RopeAngles {
            head_dim,
            max_positions,
            scaling,
            ..
        } => {
            if head_dim % 2 != 0 {
                return Err(invalid(node, format!("head_dim {head_dim} is odd")));
            }
            if *scaling == RopeScaling::Factors {
                arity(node, op, inputs, 1)?;
                let f = &inputs[0].0;
                if *f != Shape::fixed(&[head_dim / 2]) {
                    return Err(mismatch(
                        node,
                        "rope factors",
                        format!("[{}]", head_dim / 2),
                        f,
                    ));
                }
            } else {
                arity(node, op, inputs, 0)?;
            }
            f32(Shape::fixed(&[*max_positions, head_dim / 2]))
        }
        Op::Rope { head_dim } => {
            arity(node, op, inputs, 3)?;
            let (x, cos, sin) = (&inputs[0].0, &inputs[1].0, &inputs[2].0);
            rank(node, "rope input", x, 2)?;
            let width = x.fixed_dim(1).unwrap_or(0);
            if x.0[0] != Dim::Seq || width == 0 || width % head_dim != 0 {
                return Err(mismatch(
                    node,
                    "rope input",
                    format!("[tokens, heads * {head_dim}]"),
                    x,
                ));
            }
            for t in [cos, sin] {
                if t.rank() != 2 || t.0[1] != Dim::Fixed(head_dim / 2) {
                    return Err(mismatch(
                        node,
                        "rope table",
                        format!("[positions, {}]", head_dim / 2),
                        t,
                    ));
                }
            }
            f32(x.clone())
        }
        Op::PositionEmbedding => {
            arity(node, op, inputs, 1)?;
            let table = &inputs[0].0;
            match (table.rank(), table.fixed_dim(0), table.fixed_dim(1)) {
                (2, Some(_), Some(d)) => f32(Shape(vec![Dim::Seq, Dim::Fixed(d)])),
                _ => Err(mismatch(
                    node,
                    "position table",
                    "[positions, width]",
                    table,
                )),
            }
        }
        Op::KvAppend { window, .. } => {
            arity(node, op, inputs, 1)?;
            let x = &inputs[0].0;
            rank(node, "kv rows", x, 2)?;
            if x.0[0] != Dim::Seq || x.fixed_dim(1).is_none() {
                return Err(mismatch(node, "kv rows", "[tokens, width]", x));
            }
            if *window == Some(0) {
                return Err(invalid(node, "a sliding window of 0 positions"));
            }
            let rows = window.map_or(Dim::Total, Dim::Window);
            f32(Shape(vec![rows, x.0[1]]))
        }
        Op::Attention {
            n_heads,
            n_kv_heads,
            head_dim,
            window,
            ..
        } => {
            arity(node, op, inputs, 3)?;
            if *n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
                return Err(invalid(
                    node,
                    format!("{n_heads} query heads do not group over {n_kv_heads} kv heads"),
                ));
            }
            let q_shape = Shape(vec![Dim::Seq, Dim::Fixed(n_heads * head_dim)]);
            let rows = window.map_or(Dim::Total, Dim::Window);
            let kv_shape = Shape(vec![rows, Dim::Fixed(n_kv_heads * head_dim)]);
            if inputs[0].0 != q_shape {
                return Err(mismatch(node, "query", q_shape.to_string(), &inputs[0].0));
            }
            for (what, s) in [("keys", &inputs[1].0), ("values", &inputs[2].0)] {
                if *s != kv_shape {
                    return Err(mismatch(node, what, kv_shape.to_string(), s));
                }
            }
            f32(q_shape)
        }
        Op::EncoderAttention {
            n_heads, head_dim, ..
        } => {
            arity(node, op, inputs, 3)?;
            let shape = Shape(vec![Dim::Seq, Dim::Fixed(n_heads * head_dim)]);
            for (what, s) in [
                ("query", &inputs[0].0),
                ("keys", &inputs[1].0),
                ("values", &inputs[2].0),
            ] {
                if *s != shape {
                    return Err(mismatch(node, what, shape.to_string(), s));
                }
            }
            f32(shape)
        }
    }
}
