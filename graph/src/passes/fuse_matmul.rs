use std::collections::BTreeMap;

use super::{Pass, PassContext};
use crate::error::Result;
use crate::graph::Graph;
use crate::ir::{NodeId, Op};

/// Fuses matmuls that read the same input with stored weights into one matmul over the
/// concatenated weights, followed by one slice per original output: Q/K/V projections
/// become `attn_qkv`, gate/up become `ffn_gate_up`. One larger matmul reads the input
/// once and keeps the matmul kernel busier, which matters most in decode (one row).
///
/// The slices keep the original node names, so taps and dumps still find `blk.N.attn_q`.
/// Where each output had its own bias added (Qwen2's Q/K/V), the biases are
/// concatenated and added once before the slices, which then take the bias adds'
/// names (`blk.N.attn_q.biased`).
/// The weight concatenation is left as a `concat` node for [`super::ConstantFold`].
pub struct FuseSiblingMatMuls;

impl Pass for FuseSiblingMatMuls {
    fn name(&self) -> &'static str {
        "fuse-matmul"
    }

    fn run(&self, graph: &mut Graph, _ctx: &PassContext) -> Result<usize> {
        // Group matmuls by their activation input; only weights stored in the graph fuse.
        let mut groups: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        for (i, node) in graph.nodes().iter().enumerate() {
            if node.op == Op::MatMul
                && matches!(graph.node(node.inputs[1]).op, Op::Param(_))
                && !matches!(graph.node(node.inputs[0]).op, Op::Param(_))
                && graph.node(node.inputs[1]).shape.rank() == 2
            {
                groups.entry(node.inputs[0]).or_default().push(NodeId(i));
            }
        }
        // Readers of the members: a group's rewiring leaves other groups' readers as
        // they were.
        let users = graph.users();
        let mut fused = 0;
        let mut unused = Vec::new();
        for (x, members) in groups {
            if members.len() < 2 {
                continue;
            }
            // Dense and block-quantized weights do not concatenate.
            let blocks = members
                .iter()
                .filter(|m| {
                    let w = &graph.node(graph.node(**m).inputs[1]).name;
                    matches!(graph.param(w), Some(crate::Value::Quant(_)))
                })
                .count();
            if blocks != 0 && blocks != members.len() {
                continue;
            }
            let names: Vec<String> = members
                .iter()
                .map(|m| graph.node(*m).name.clone())
                .collect();
            let name = fused_name(&names);
            let weights: Vec<NodeId> = members.iter().map(|m| graph.node(*m).inputs[1]).collect();
            let widths: Vec<usize> = weights
                .iter()
                .map(|w| graph.node(*w).shape.fixed_dim(0).unwrap_or(0))
                .collect();
            let biases = biases_of(graph, &users, &members, &widths);
            let w = graph.add(&format!("{name}.weight"), Op::Concat { axis: 0 }, &weights)?;
            let mut y = graph.add(&name, Op::MatMul, &[x, w])?;
            if let Some(biases) = &biases {
                // Every output had its own bias added (Qwen2's Q/K/V): one add of the
                // concatenated biases instead, before the slices.
                let params: Vec<NodeId> = biases.iter().map(|(_, b)| *b).collect();
                let b = graph.add(&format!("{name}.bias"), Op::Concat { axis: 0 }, &params)?;
                y = graph.add(&format!("{name}.biased"), Op::Add, &[y, b])?;
            }
            let axis = graph.node(y).shape.rank() - 1;
            let mut start = 0;
            for (i, (m, len)) in members.iter().zip(widths).enumerate() {
                // The original matmul (or its bias add) hands its name and its readers
                // to the slice.
                let out = biases.as_ref().map_or(*m, |b| b[i].0);
                let original = graph.node(out).name.clone();
                graph.rename(out, &format!("{original}.unfused"))?;
                let slice = graph.add(&original, Op::Slice { axis, start, len }, &[y])?;
                graph.replace_uses(out, slice);
                start += len;
                unused.push(out);
                if out != *m {
                    unused.push(*m);
                }
            }
            fused += 1;
        }
        // Drop the replaced matmuls; their weights are left for dead-node removal.
        let mut keep = vec![true; graph.nodes().len()];
        for m in unused {
            keep[m.0] = false;
        }
        graph.retain(&keep);
        Ok(fused)
    }
}

/// For each member, its bias add and the bias, where every member's only reader adds a
/// stored rank-1 bias of its width (`add(matmul, bias)`); `None` otherwise.
fn biases_of(
    graph: &Graph,
    users: &[Vec<NodeId>],
    members: &[NodeId],
    widths: &[usize],
) -> Option<Vec<(NodeId, NodeId)>> {
    members
        .iter()
        .zip(widths)
        .map(|(m, &width)| {
            let [add] = users[m.0][..] else {
                return None;
            };
            let node = graph.node(add);
            let bias = *node.inputs.get(1)?;
            let b = graph.node(bias);
            let fits = node.op == Op::Add
                && node.inputs[0] == *m
                && matches!(b.op, Op::Param(_))
                && b.shape.rank() == 1
                && b.shape.fixed_dim(0) == Some(width)
                && !graph.outputs().contains(m);
            fits.then_some((add, bias))
        })
        .collect()
}

/// `blk.0.attn_q`, `blk.0.attn_k`, `blk.0.attn_v` -> `blk.0.attn_qkv`;
/// `blk.0.ffn_gate`, `blk.0.ffn_up` -> `blk.0.ffn_gate_up`.
fn fused_name(names: &[String]) -> String {
    let first = names[0].as_str();
    let mut prefix = first.len();
    for n in &names[1..] {
        prefix = prefix.min(
            first
                .bytes()
                .zip(n.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    // Cut back to a separator so suffixes are whole words.
    let cut = first[..prefix]
        .rfind(['_', '.'])
        .map(|i| i + 1)
        .unwrap_or(prefix);
    let suffixes: Vec<&str> = names.iter().map(|n| &n[cut..]).collect();
    let sep = if suffixes.iter().all(|s| s.len() == 1) {
        ""
    } else {
        "_"
    };
    format!("{}{}", &first[..cut], suffixes.join(sep))
}

#[cfg(test)]
mod tests {
    use super::fused_name;

    #[test]
    fn fused_names_read_like_llama_cpp() {
        let n = |v: &[&str]| fused_name(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            n(&["blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"]),
            "blk.0.attn_qkv"
        );
        assert_eq!(
            n(&["blk.11.ffn_gate", "blk.11.ffn_up"]),
            "blk.11.ffn_gate_up"
        );
    }
}
