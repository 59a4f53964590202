use std::sync::Arc;

use super::quantize::matmul_weights;
use super::{Pass, PassContext};
use crate::error::Result;
use crate::gpu::DeviceBlocks;
use crate::graph::Graph;
use crate::ir::Op;
use crate::value::Value;

/// For GPU backends: copies each matmul weight stored as GGML blocks to the device as
/// it is stored, blocks and all ([`DeviceBlocks`]); the matmul kernels widen the
/// weights as they read them. A table that is also (or only) looked up by token keeps
/// its host copy for the lookup. Weights read by anything else stay on the host.
pub struct UploadBlocks;

impl Pass for UploadBlocks {
    fn name(&self) -> &'static str {
        "upload-blocks"
    }

    fn run(&self, graph: &mut Graph, ctx: &PassContext) -> Result<usize> {
        if !DeviceBlocks::supported(&ctx.device) {
            return Ok(0);
        }
        // A table also looked up by token keeps its host copy for the lookup.
        let weights = matmul_weights(graph, |u, w| {
            graph.node(u).op == Op::Embedding && graph.node(u).inputs.first() == Some(&w)
        });
        let mut done = 0;
        for w in weights {
            let name = graph.node(w).name.clone();
            let Some(Value::Quant(m)) = graph.param(&name).cloned() else {
                continue;
            };
            let blocks = DeviceBlocks::upload(m, &ctx.device)?;
            graph.set_param(&name, Value::Blocks(Arc::new(blocks)))?;
            done += 1;
        }
        Ok(done)
    }
}
