//! llama-kernels: the host CPU kernels of llama.rs.
//!
//! Everything that runs as hand-written loops over host memory rather than as burn
//! tensor ops, used by llama-graph's executor when the graph runs on a CPU backend:
//!
//! - [`quant`]: GGML block formats and their dequantization, [`quant::QMatrix`] (block
//!   weights read in place), the block matmul kernels ([`quant::matmul`]) and the
//!   eight-row packed layout of 4-bit weights ([`quant::packed`]);
//! - [`attention`] over host keys and values ([`KvRows`], f32 or f16);
//! - [`rms_norm`], [`rope`], [`silu`] and [`swiglu`], in place.
//!
//! On a CPU each of the small ops is a few microseconds of arithmetic, but expressed as
//! burn tensor ops it becomes a dozen allocations and dispatches (a RoPE is ten ops, an
//! attention twenty): with 30 layers that was a quarter of a decode step. Here each is
//! one pass over host memory. The burn versions in llama-graph's executor stay the path
//! of every other backend (burn-ndarray included, the reference); the tiny-model and
//! parity tests check both against transformers and each other.
//!
//! SIMD builds (AVX2 + FMA + F16C, AVX-VNNI, AVX-512 VNNI) are picked at run time from
//! [`features()`], the one place the CPU is asked; every other target gets the portable
//! loops. This crate is the workspace's only `unsafe` code: each `unsafe` block says
//! why it holds (`SAFETY:`), and each `unsafe fn` what its caller must guarantee.
mod attention;
mod elementwise;
mod features;
mod norm;
pub mod quant;
mod rope;

pub use attention::{
    attention, quantize_blocks, rotate_heads, rotation_len, AttentionShape, BlockQ4_0, BlockQ8_0,
    KvBlock, KvRows, Page, Pages, KEY_BLOCK, KV_BLOCK,
};
pub use elementwise::{gelu, gelu_tanh, silu, swiglu};
pub use features::{features, Features};
pub use norm::rms_norm;
pub use rope::rope;
