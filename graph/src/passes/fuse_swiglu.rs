use super::{Pass, PassContext};
use crate::error::Result;
use crate::graph::Graph;
use crate::ir::{NodeId, Op};

/// For CPU backends: `mul(silu(slice(x, 0..n)), slice(x, n..2n))` over the last axis,
/// the gated MLP of a fused gate/up matmul, becomes one `swiglu(x)`. The host version
/// gates each row in place and hands back the up half, so a prefill holds one
/// `[seq, 2n]` buffer at this point instead of that, a copy of the gate and the
/// product.
///
/// The fused node keeps the `mul`'s name; the slices and the `silu` go (each must have
/// no other reader).
pub struct FuseSwiGlu;

impl Pass for FuseSwiGlu {
    fn name(&self) -> &'static str {
        "fuse-swiglu"
    }

    fn run(&self, graph: &mut Graph, _ctx: &PassContext) -> Result<usize> {
        let users = graph.users();
        let only_for = |node: NodeId, user: NodeId| {
            users[node.0] == [user] && !graph.outputs().contains(&node)
        };
        let mut fused = Vec::new();
        for (i, node) in graph.nodes().iter().enumerate() {
            let m = NodeId(i);
            if node.op != Op::Mul {
                continue;
            }
            // silu(gate) * up, in either order.
            let [a, b] = [node.inputs[0], node.inputs[1]];
            let (silu, up) = match (&graph.node(a).op, &graph.node(b).op) {
                (Op::Silu, _) => (a, b),
                (_, Op::Silu) => (b, a),
                _ => continue,
            };
            let gate = graph.node(silu).inputs[0];
            let (
                Op::Slice {
                    axis: ga,
                    start: 0,
                    len: n,
                },
                Op::Slice {
                    axis: ua,
                    start: us,
                    len: un,
                },
            ) = (&graph.node(gate).op, &graph.node(up).op)
            else {
                continue;
            };
            let x = graph.node(gate).inputs[0];
            let shape = &graph.node(x).shape;
            let last = shape.rank().saturating_sub(1);
            if graph.node(up).inputs[0] != x
                || (*ga, *ua, *us, *un) != (last, last, *n, *n)
                || shape.fixed_dim(last) != Some(2 * n)
                || !only_for(silu, m)
                || !only_for(gate, silu)
                || !only_for(up, m)
            {
                continue;
            }
            fused.push((m, x, [silu, gate, up]));
        }
        let mut keep = vec![true; graph.nodes().len()];
        for (m, x, parts) in &fused {
            let name = graph.node(*m).name.clone();
            graph.rename(*m, &format!("{name}.unfused"))?;
            let y = graph.add(&name, Op::SwiGlu, &[*x])?;
            graph.replace_uses(*m, y);
            keep.push(true);
            for dead in parts.iter().chain([m]) {
                keep[dead.0] = false;
            }
        }
        graph.retain(&keep);
        Ok(fused.len())
    }
}
