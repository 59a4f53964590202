use std::sync::Arc;

use llama_kernels::quant::QMatrix;

use super::{Pass, PassContext};
use crate::error::{GraphError, Result};
use crate::graph::Graph;
use crate::ir::{NodeId, Op, ParamKind};
use crate::value::Value;

/// For CPU backends: stores every f32 matmul weight as Q8_0 blocks ([`QMatrix`]) so
/// the matmul reads about a quarter of the bytes through our block kernels. A weight
/// that other ops also read (a tied embedding table) gets a Q8_0 copy for its matmuls
/// and keeps its f32 form for the rest. Weights already in blocks are left as they are.
pub struct QuantizeWeights;

impl Pass for QuantizeWeights {
    fn name(&self) -> &'static str {
        "quantize-weights"
    }

    fn run(&self, graph: &mut Graph, _ctx: &PassContext) -> Result<usize> {
        let users = graph.users();
        let mut done = 0;
        let weights: Vec<NodeId> = (0..graph.nodes().len())
            .map(NodeId)
            .filter(|&w| matches!(graph.node(w).op, Op::Param(_)))
            .filter(|&w| users[w.0].iter().any(|u| is_matmul_weight(graph, *u, w)))
            .collect();
        for w in weights {
            let name = graph.node(w).name.clone();
            let Some(Value::F2(t)) = graph.param(&name).cloned() else {
                continue;
            };
            let [rows, cols] = t.dims();
            let data = Value::F2(t).to_f32_vec()?;
            let Some(q) = QMatrix::quantize_q8_0(&data, rows, cols) else {
                continue; // not a whole number of blocks: stays f32
            };
            let q = Value::Quant(Arc::new(q));
            let matmuls: Vec<NodeId> = users[w.0]
                .iter()
                .copied()
                .filter(|u| is_matmul_weight(graph, *u, w))
                .collect();
            if matmuls.len() == users[w.0].len() {
                graph.set_param(&name, q)?;
            } else {
                let copy = graph.add_param(&format!("{name}.q8_0"), ParamKind::Folded, q)?;
                for u in matmuls {
                    graph.set_input(u, 1, copy);
                }
            }
            done += 1;
        }
        graph.sort();
        Ok(done)
    }
}

/// The parameters some matmul reads as its weight and every other reader accepts by
/// `also(reader, parameter)`.
pub(super) fn matmul_weights(graph: &Graph, also: impl Fn(NodeId, NodeId) -> bool) -> Vec<NodeId> {
    let users = graph.users();
    (0..graph.nodes().len())
        .map(NodeId)
        .filter(|&w| matches!(graph.node(w).op, Op::Param(_)))
        .filter(|&w| {
            users[w.0].iter().any(|&u| is_matmul_weight(graph, u, w))
                && users[w.0]
                    .iter()
                    .all(|&u| is_matmul_weight(graph, u, w) || also(u, w))
        })
        .collect()
}

pub(super) fn is_matmul_weight(graph: &Graph, user: NodeId, w: NodeId) -> bool {
    let n = graph.node(user);
    n.op == Op::MatMul && n.inputs.get(1) == Some(&w) && n.inputs.first() != Some(&w)
}

impl Graph {
    /// Replaces a parameter's stored value by one of the same shape.
    pub fn set_param(&mut self, name: &str, value: Value) -> Result<()> {
        self.find(name)
            .ok_or_else(|| GraphError::UnknownNode(name.to_string()))?;
        let old = self
            .param(name)
            .ok_or_else(|| GraphError::MissingParam(name.to_string()))?;
        if old.dims() != value.dims() {
            return Err(GraphError::Invalid {
                node: name.to_string(),
                message: format!(
                    "new value {:?} does not have the shape {:?}",
                    value.dims(),
                    old.dims()
                ),
            });
        }
        self.replace_param_value(name, value);
        Ok(())
    }
}
