//! A deterministic text form of a graph, one node a line, for humans and snapshots.
use std::fmt::Write;

use crate::graph::Graph;
use crate::ir::Op;

/// Renders `graph`: `name = op(inputs) attrs : shape dtype`, then the outputs.
pub fn dump(graph: &Graph) -> String {
    let mut out = String::new();
    let weights = graph
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Param(_)))
        .count();
    let _ = writeln!(
        out,
        "graph: {} nodes ({} parameters, {} elements)",
        graph.nodes().len(),
        weights,
        graph.param_elements()
    );
    for node in graph.nodes() {
        let inputs: Vec<&str> = node
            .inputs
            .iter()
            .map(|i| graph.node(*i).name.as_str())
            .collect();
        let attrs = node.op.attrs();
        let _ = write!(out, "{} = {}", node.name, node.op.mnemonic());
        if !inputs.is_empty() {
            let _ = write!(out, "({})", inputs.join(", "));
        }
        if !attrs.is_empty() {
            let _ = write!(out, " {attrs}");
        }
        let _ = writeln!(out, " : {} {}", node.shape, node.dtype);
    }
    let outputs: Vec<&str> = graph
        .outputs()
        .iter()
        .map(|o| graph.node(*o).name.as_str())
        .collect();
    let _ = writeln!(out, "outputs: {}", outputs.join(", "));
    out
}
