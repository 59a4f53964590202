//! The block matmul as a burn backend extension: recorded by burn-fusion as one custom
//! op (its input resolved, its output lazy like any other tensor), run by our kernels
//! on the cubecl backend.
use std::sync::Arc;

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::CubeBackend;
use cubecl::prelude::*;

use super::{attention, kernels, Chunks};

/// Steps of at most this many rows multiply with [`kernels::block_gemv`]; longer ones
/// widen the weights a part at a time and run burn's tiled matmul.
const GEMV_ROWS: usize = 8;
/// Units per weight row in the GEMV, each taking groups of 32 weights (a power of two:
/// the tree sum halves it), and weight rows per cube.
const GEMV_UNITS: u32 = 8;
const GEMV_ROWS_PER_CUBE: u32 = 8;
/// Units per cube of the dequantizing kernel.
const DEQUANT_UNITS: u32 = 256;
/// Weight rows widened at a time for a long step (4096 rows of 896 weights: 14 MiB).
const PART_ROWS: usize = 4096;
/// Cubes per grid row: within every API's limit of 65,535 per dimension.
const GRID_X: u32 = 32_768;

#[backend_extension(Cube, Fusion)]
pub trait BlockOps: Backend {
    /// `x · Wᵀ` for `x: [m, k]` and the block matrix `W: [n, k]`.
    #[fusion(dtype = x, shape = out_shape(x, blocks))]
    fn block_matmul(x: FloatTensor<Self>, blocks: Arc<Chunks>) -> FloatTensor<Self>;

    /// Causal attention of `q: [seq, heads·hd]` over `k`, `v: [rows, kv_heads·hd]`
    /// (f32 or f16, both the same).
    #[fusion(dtype = q, shape = q)]
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        params: AttentionParams,
    ) -> FloatTensor<Self>;
}

/// The shape of one attention call: heads, scale, sliding window (0: none), and the
/// positions cached before the step.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: usize,
    pub past: usize,
}

/// Units per cube of the fused attention: their partial outputs (`units x head_dim`
/// f32) take 8 KiB of shared memory, within every API's 16 KiB.
pub fn attention_units(head_dim: usize) -> usize {
    (2048 / head_dim.max(1)).clamp(1, 32)
}

fn out_shape(x: &Shape, blocks: &Arc<Chunks>) -> Shape {
    Shape::new([x[0], blocks.rows])
}

/// A grid of `cubes` cubes within the per-dimension limit.
fn grid(cubes: usize) -> CubeCount {
    let cubes = cubes.max(1) as u32;
    let x = cubes.min(GRID_X);
    CubeCount::Static(x, cubes.div_ceil(x), 1)
}

impl BlockOps for CubeBackend {
    fn block_matmul(x: FloatTensor<Self>, blocks: Arc<Chunks>) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let (m, k) = (x.meta.shape()[0], x.meta.shape()[1]);
        let client = x.client.clone();
        let device = x.device.clone();
        let n = blocks.rows;
        if m <= GEMV_ROWS {
            let out = empty_device_contiguous_dtype(
                client.clone(),
                device,
                Shape::new([m, n]),
                DType::F32,
            );
            for ch in &blocks.chunks {
                let w = ch.buffer_arg();
                kernels::block_gemv::launch(
                    &client,
                    grid(ch.rows.div_ceil(GEMV_ROWS_PER_CUBE as usize)),
                    CubeDim::new_2d(GEMV_UNITS, GEMV_ROWS_PER_CUBE),
                    w,
                    x.clone().into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    k as u32,
                    m as u32,
                    ch.row_words as u32,
                    ch.first_row as u32,
                    n as u32,
                    ch.rows as u32,
                    ch.ty,
                    (GEMV_UNITS * GEMV_ROWS_PER_CUBE) as usize,
                );
            }
            return out;
        }
        // Many rows: widen a part of the weights at a time, multiply with burn's matmul.
        let mut parts = Vec::new();
        for ch in &blocks.chunks {
            let mut first = 0;
            while first < ch.rows {
                let rows = PART_ROWS.min(ch.rows - first);
                let wide = empty_device_contiguous_dtype(
                    client.clone(),
                    device.clone(),
                    Shape::new([rows, k]),
                    DType::F32,
                );
                let w = ch.buffer_arg();
                kernels::block_dequantize::launch(
                    &client,
                    grid((rows * k).div_ceil(DEQUANT_UNITS as usize)),
                    CubeDim::new_1d(DEQUANT_UNITS),
                    w,
                    wide.clone().into_tensor_arg(),
                    k as u32,
                    ch.row_words as u32,
                    first as u32,
                    rows as u32,
                    ch.ty,
                );
                let wt = CubeBackend::float_transpose(wide);
                parts.push(CubeBackend::float_matmul(x.clone(), wt));
                first += rows;
            }
        }
        if parts.len() == 1 {
            return parts.remove(0);
        }
        CubeBackend::float_cat(parts, 1)
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        p: AttentionParams,
    ) -> FloatTensor<Self> {
        let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
        let seq = q.meta.shape()[0];
        let rows = k.meta.shape()[0];
        let client = q.client.clone();
        let out = empty_device_contiguous_dtype(
            client.clone(),
            q.device.clone(),
            q.meta.shape().clone(),
            DType::F32,
        );
        let units = attention_units(p.head_dim);
        let kv_type = dtype_to_storage_type(k.dtype);
        attention::decode_attention::launch(
            &client,
            CubeCount::Static(p.n_heads as u32, seq as u32, 1),
            CubeDim::new_1d(units as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows as u32,
            p.past as u32,
            seq as u32,
            p.n_heads as u32,
            p.n_kv_heads as u32,
            p.scale,
            p.window as u32,
            p.head_dim,
            units,
            kv_type,
        );
        out
    }
}

/// Fused attention on the device that holds `q`.
pub fn attention(q: Tensor<2>, k: Tensor<2>, v: Tensor<2>, params: AttentionParams) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as BlockOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        params,
    ))
}

/// `x · Wᵀ` on the device that holds `blocks`.
pub fn matmul(x: Tensor<2>, blocks: &Arc<Chunks>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as BlockOps>::block_matmul(
        x.into_dispatch(),
        blocks.clone(),
    ))
}
