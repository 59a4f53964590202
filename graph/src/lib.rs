//! llama-graph: the typed op graph at the heart of llama.rs.
//!
//! A model builds its forward pass as a [`Graph`] of named ops ([`ir::Op`]) with
//! symbolic shapes; [`passes`] rewrite it; [`dump()`] prints it; a [`Program`] runs it
//! on any burn device, writing a [`KvCache`], with optional [`Taps`] on named nodes.
pub mod capabilities;
pub mod dump;
pub mod error;
pub mod exec;
pub mod gpu;
pub mod graph;
pub mod ir;
pub mod passes;
pub mod shape;
pub mod summary;
pub mod value;

/// Block-quantized weights ([`quant::QMatrix`], held by [`Value::Quant`]), from llama-kernels.
pub use llama_kernels::quant;
/// Positions per page of a host KV cache (pages are shared between caches until
/// written, see [`KvCache`]).
pub use llama_kernels::KEY_BLOCK as KV_PAGE;

pub use capabilities::Capabilities;
pub use dump::dump;
pub use error::{GraphError, Result};
pub use exec::{
    KvCache, KvSnapshot, KvType, Lowering, OpProfile, PageCount, Program, Rows, RunOutput,
    Sequence, Taps,
};
pub use graph::Graph;
pub use ir::{DType, Dim, F32Bits, KvKind, Node, NodeId, Op, ParamKind, RopeScaling, Shape};
pub use passes::{Pass, PassContext, Pipeline};
pub use value::Value;
