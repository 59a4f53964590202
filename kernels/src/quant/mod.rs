//! Block-quantized weights as GGUF stores them, and the CPU matmul that multiplies with
//! them directly.
//!
//! [`format`](mod@format) knows the GGML block layouts and dequantizes them;
//! [`QMatrix`] is a weight matrix whose rows are such blocks, read in place from
//! wherever they live (a memory-mapped GGUF file, or memory of our own); [`kernels`]
//! multiplies activations with it without ever widening the weights.
pub mod format;
pub mod kernels;
mod matrix;
pub mod packed;

pub use format::{dequantize, GgmlType};
pub use kernels::{matmul, Kernel};
pub use matrix::{Bytes, QMatrix};
