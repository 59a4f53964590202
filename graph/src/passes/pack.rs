use std::sync::Arc;

use llama_kernels::quant::kernels::packed_kernel_available;
use llama_kernels::quant::QMatrix;

use super::quantize::matmul_weights;
use super::{Pass, PassContext};
use crate::error::Result;
use crate::graph::Graph;
use crate::value::Value;

/// For CPU backends: stores each Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K matmul weight with its rows interleaved
/// eight at a time ([`QMatrix::pack`]), the layout the grouped kernel
/// reads. The rows' own bytes are then released: a memory-mapped GGUF drops those pages,
/// so the packed copy takes their place in memory instead of adding to it. Does nothing
/// on a CPU without the grouped kernel, or to weights that are not whole groups of
/// such rows (groups may differ in type: a fused Q/K/V of Q5_0 Q/K and Q8_0 V rows is
/// packed; one with Q6_K V rows stays as rows).
pub struct PackBlocks;

impl Pass for PackBlocks {
    fn name(&self) -> &'static str {
        "pack-blocks"
    }

    fn run(&self, graph: &mut Graph, _ctx: &PassContext) -> Result<usize> {
        if !packed_kernel_available() {
            return Ok(0);
        }
        let weights = matmul_weights(graph, |_, _| false);
        let mut done = 0;
        let mut packed_from = Vec::new();
        for w in weights {
            let name = graph.node(w).name.clone();
            let Some(Value::Quant(m)) = graph.param(&name).cloned() else {
                continue;
            };
            if m.is_packed() {
                continue;
            }
            // One matrix at a time: its rows are read once here and released at once,
            // so loading never holds both layouts of more than one matrix.
            let Some(packed) = m.pack() else { continue };
            m.release_rows();
            graph.set_param(&name, Value::Quant(Arc::new(packed)))?;
            packed_from.push(m);
            done += 1;
        }
        // Reading rows also maps the pages around them (the kernel faults in whole
        // neighbourhoods): release the files once more, whole. Blocks still read in
        // place (an embedding table) come back as they are used.
        QMatrix::release_stores(packed_from.iter().map(|m| &**m));
        Ok(done)
    }
}
