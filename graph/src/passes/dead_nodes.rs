use super::{Pass, PassContext};
use crate::error::Result;
use crate::graph::Graph;

/// Removes every node no output depends on, and the stored values of removed parameters.
pub struct DeadNodes;

impl Pass for DeadNodes {
    fn name(&self) -> &'static str {
        "dead-nodes"
    }

    fn run(&self, graph: &mut Graph, _ctx: &PassContext) -> Result<usize> {
        let mut live = vec![false; graph.nodes().len()];
        let mut stack: Vec<usize> = graph.outputs().iter().map(|o| o.0).collect();
        while let Some(i) = stack.pop() {
            if !live[i] {
                live[i] = true;
                stack.extend(graph.nodes()[i].inputs.iter().map(|x| x.0));
            }
        }
        let dead = live.iter().filter(|l| !**l).count();
        if dead > 0 {
            graph.retain(&live);
        }
        Ok(dead)
    }
}
