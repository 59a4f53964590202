//! Graph passes: each one rewrite, in its own file, composed in one pipeline.
//!
//! Every pass keeps the graph computing the same outputs; the tests execute a graph,
//! run a pass, execute again and compare.
mod constant_fold;
mod dead_nodes;
mod fuse_matmul;
mod fuse_swiglu;
mod pack;
mod quantize;
mod upload;

use burn::tensor::Device;

pub use constant_fold::ConstantFold;
pub use dead_nodes::DeadNodes;
pub use fuse_matmul::FuseSiblingMatMuls;
pub use fuse_swiglu::FuseSwiGlu;
pub use pack::PackBlocks;
pub use quantize::QuantizeWeights;
pub use upload::UploadBlocks;

use crate::error::Result;
use crate::graph::Graph;

/// What a pass may use besides the graph.
pub struct PassContext {
    /// Where folded constants are computed and stored (the weights' device).
    pub device: Device,
}

/// One graph rewrite.
pub trait Pass {
    /// A short stable name, used by `--passes` and in reports.
    fn name(&self) -> &'static str;
    /// Rewrites `graph` in place; returns how many rewrites it made.
    fn run(&self, graph: &mut Graph, ctx: &PassContext) -> Result<usize>;
}

/// An ordered list of passes.
pub struct Pipeline {
    passes: Vec<Box<dyn Pass>>,
}

impl Pipeline {
    /// No passes: the graph as the model built it.
    pub fn none() -> Self {
        Pipeline { passes: Vec::new() }
    }

    /// The default optimization pipeline.
    ///
    /// Fusion first (Q/K/V and gate/up matmuls that share an input become one matmul
    /// over concatenated weights), then constant folding (which evaluates those weight
    /// concatenations and the RoPE tables once), then dead-node removal (which drops the
    /// unfused weights and the folded intermediates).
    pub fn standard() -> Self {
        Pipeline {
            passes: vec![
                Box::new(FuseSiblingMatMuls),
                Box::new(ConstantFold),
                Box::new(DeadNodes),
            ],
        }
    }

    /// The default on CPU backends: the standard pipeline, then the gated MLP as one
    /// op, then (with `quantize`) Q8_0 blocks for f32 matmul weights, then 4-bit block
    /// weights packed for the grouped kernel.
    pub fn standard_cpu(quantize: bool) -> Self {
        let mut p = Self::standard();
        p.passes.push(Box::new(FuseSwiGlu));
        if quantize {
            p.passes.push(Box::new(QuantizeWeights));
        }
        p.passes.push(Box::new(PackBlocks));
        p
    }

    /// The default on GPU backends: the standard pipeline, then block weights copied
    /// to the device as stored (the matmul kernels widen them as they read).
    pub fn standard_gpu() -> Self {
        let mut p = Self::standard();
        p.passes.push(Box::new(UploadBlocks));
        p
    }

    /// A single named pass from the standard set.
    pub fn by_name(name: &str) -> Option<Box<dyn Pass>> {
        match name {
            "fuse-matmul" => Some(Box::new(FuseSiblingMatMuls)),
            "fuse-swiglu" => Some(Box::new(FuseSwiGlu)),
            "constant-fold" => Some(Box::new(ConstantFold)),
            "dead-nodes" => Some(Box::new(DeadNodes)),
            "quantize-weights" => Some(Box::new(QuantizeWeights)),
            "pack-blocks" => Some(Box::new(PackBlocks)),
            "upload-blocks" => Some(Box::new(UploadBlocks)),
            _ => None,
        }
    }

    /// Names accepted by [`Pipeline::by_name`].
    pub const NAMES: &'static [&'static str] = &[
        "fuse-matmul",
        "fuse-swiglu",
        "constant-fold",
        "dead-nodes",
        "quantize-weights",
        "pack-blocks",
        "upload-blocks",
    ];

    pub fn from_passes(passes: Vec<Box<dyn Pass>>) -> Self {
        Pipeline { passes }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs every pass in order; returns each pass's name and rewrite count.
    pub fn run(&self, graph: &mut Graph, ctx: &PassContext) -> Result<Vec<(&'static str, usize)>> {
        let mut report = Vec::new();
        for pass in &self.passes {
            let n = pass.run(graph, ctx)?;
            graph.validate()?;
            report.push((pass.name(), n));
        }
        Ok(report)
    }
}
