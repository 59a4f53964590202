use super::{Pass, PassContext};
use crate::error::Result;
use crate::exec::eval;
use crate::graph::Graph;
use crate::ir::{NodeId, Op};

/// Evaluates, once, every pure node whose inputs are all stored values, and stores its
/// result instead: RoPE angle/cos/sin tables, weight concatenations from fusion, scaled
/// weights. Inputs left unused are removed later by [`super::DeadNodes`].
pub struct ConstantFold;

impl Pass for ConstantFold {
    fn name(&self) -> &'static str {
        "constant-fold"
    }

    fn run(&self, graph: &mut Graph, ctx: &PassContext) -> Result<usize> {
        let mut folded = 0;
        // Topological order, so a chain of foldable nodes folds in one sweep.
        for i in 0..graph.nodes().len() {
            let node = &graph.nodes()[i];
            let constant_inputs = node
                .inputs
                .iter()
                .all(|x| matches!(graph.node(*x).op, Op::Param(_)));
            if !node.op.is_pure() || !constant_inputs {
                continue;
            }
            let inputs = node
                .inputs
                .iter()
                .map(|x| {
                    let name = &graph.node(*x).name;
                    graph
                        .param(name)
                        .cloned()
                        .ok_or_else(|| crate::GraphError::MissingParam(name.clone()))
                })
                .collect::<Result<Vec<_>>>()?;
            let value = eval(&node.name, &node.op, inputs, &ctx.device, None)?;
            graph.make_constant(NodeId(i), value);
            folded += 1;
        }
        Ok(folded)
    }
}
