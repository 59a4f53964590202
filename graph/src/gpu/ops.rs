//! Our GPU ops as a burn backend extension: the block matmul, the fused attention, and
//! the one-kernel RMSNorm, RoPE and KV cache write, run by our kernels on the cubecl
//! backend.
//!
//! Under burn-fusion they are not recorded as custom ops: fusion's stream search gives
//! a custom op no fuser, and a segment holding one between elementwise ops (norm →
//! matmul → SiLU → matmul → residual) falls back to running every op of the segment
//! unfused -- the norms, activations and residuals of a decode step then took ~450
//! single-op kernels. Instead each call drains the stream up to its input (what is
//! queued is fused as usual), runs our kernel, and hands the output back as a new lazy
//! tensor: the ops on either side fuse among themselves.
use std::sync::Arc;

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::{OperationIr, OperationOutput, StreamId};
use burn::backend::fusion::{Client, Fusion, FusionBackend, NoOp};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_ir::{BackendIr, InitOperationIr};
use cubecl::prelude::*;

use super::{attention, fused, kernels, Chunks};

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
/// Units per cube of the norm (a power of two: the tree sum halves it).
const NORM_UNITS: u32 = 256;
/// Units per cube of the one-unit-per-element kernels.
const ELEMENT_UNITS: u32 = 256;
/// Cubes per grid row: within every API's limit of 65,535 per dimension.
const GRID_X: u32 = 32_768;

#[backend_extension(Cube)]
pub trait BlockOps: Backend {
    /// `x · Wᵀ` for `x: [m, k]` and the block matrix `W: [n, k]`.
    fn block_matmul(x: FloatTensor<Self>, blocks: Arc<Chunks>) -> FloatTensor<Self>;

    /// Causal attention of `q: [seq, heads·hd]` over `k`, `v: [rows, kv_heads·hd]`
    /// (f32 or f16, both the same).
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        params: AttentionParams,
    ) -> FloatTensor<Self>;

    /// RMSNorm of `x: [rows, d]` in groups of `w`'s length (which divides `d`).
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;

    /// Rotate-half RoPE of `x: [seq, heads·head_dim]`, row `r` by row `first + r` of
    /// `cos`, `sin: [positions, head_dim / 2]`.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        first: usize,
    ) -> FloatTensor<Self>;

    /// `cache` with rows `at..` replaced by `new: [rows, width]` (f32, stored in the
    /// cache's element type), written in place where `cache` is not shared.
    fn write_rows(cache: FloatTensor<Self>, new: FloatTensor<Self>, at: usize)
        -> FloatTensor<Self>;
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

/// An f32 tensor of `shape` on `like`'s device.
fn empty_f32(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
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
            if m == 0 {
                return out;
            }
            // One kernel per row count (at most GEMV_ROWS of them): each weight is
            // decoded once for all the rows.
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
                    ch.row_words as u32,
                    ch.first_row as u32,
                    n as u32,
                    ch.rows as u32,
                    ch.ty,
                    (GEMV_UNITS * GEMV_ROWS_PER_CUBE) as usize,
                    m,
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

    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let (x, w) = (into_contiguous(x), into_contiguous(w));
        let g = w.meta.shape().num_elements();
        let groups = x.meta.shape().num_elements() / g.max(1);
        let out = empty_f32(&x, x.meta.shape().clone());
        let units = (g.next_power_of_two() as u32).clamp(32, NORM_UNITS);
        fused::rms_norm::launch(
            &x.client.clone(),
            grid(groups),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            groups as u32,
            g as u32,
            eps,
            units as usize,
        );
        out
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        first: usize,
    ) -> FloatTensor<Self> {
        let (x, cos, sin) = (
            into_contiguous(x),
            into_contiguous(cos),
            into_contiguous(sin),
        );
        let half = cos.meta.shape()[1];
        let [seq, width] = [x.meta.shape()[0], x.meta.shape()[1]];
        let heads = width / (2 * half).max(1);
        let total = seq * heads * half;
        let out = empty_f32(&x, x.meta.shape().clone());
        fused::rope::launch(
            &x.client.clone(),
            grid(total.div_ceil(ELEMENT_UNITS as usize)),
            CubeDim::new_1d(ELEMENT_UNITS),
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            total as u32,
            heads as u32,
            half as u32,
            first as u32,
        );
        out
    }

    fn write_rows(
        cache: FloatTensor<Self>,
        new: FloatTensor<Self>,
        at: usize,
    ) -> FloatTensor<Self> {
        let new = into_contiguous(new);
        let cache = into_contiguous(cache);
        // Shared (a clone still alive elsewhere): written to a copy, as slice_assign would.
        let cache = if cache.can_mut() { cache } else { cache.copy() };
        let width = cache.meta.shape()[1];
        let total = new.meta.shape().num_elements();
        let ty = dtype_to_storage_type(cache.dtype);
        fused::write_rows::launch(
            &cache.client.clone(),
            grid(total.div_ceil(ELEMENT_UNITS as usize)),
            CubeDim::new_1d(ELEMENT_UNITS),
            new.into_tensor_arg(),
            cache.clone().into_tensor_arg(),
            total as u32,
            (at * width) as u32,
            ty,
        );
        cache
    }
}

impl BlockOps for Fusion<CubeBackend> {
    fn block_matmul(x: FloatTensor<Self>, blocks: Arc<Chunks>) -> FloatTensor<Self> {
        outside_fusion([x], |[x]| CubeBackend::block_matmul(x, blocks))
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        params: AttentionParams,
    ) -> FloatTensor<Self> {
        outside_fusion([q, k, v], |[q, k, v]| {
            CubeBackend::fused_attention(q, k, v, params)
        })
    }

    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        outside_fusion([x, w], |[x, w]| CubeBackend::rms_norm(x, w, eps))
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        first: usize,
    ) -> FloatTensor<Self> {
        outside_fusion([x, cos, sin], |[x, cos, sin]| {
            CubeBackend::rope(x, cos, sin, first)
        })
    }

    fn write_rows(
        cache: FloatTensor<Self>,
        new: FloatTensor<Self>,
        at: usize,
    ) -> FloatTensor<Self> {
        outside_fusion([new, cache], |[new, cache]| {
            CubeBackend::write_rows(cache, new, at)
        })
    }
}

/// Runs `f` on the cubecl tensors behind `inputs` (the stream drained up to them) and
/// hands its output back to the stream as a new lazy tensor.
fn outside_fusion<const N: usize>(
    inputs: [FloatTensor<Fusion<CubeBackend>>; N],
    f: impl FnOnce([CubeTensor; N]) -> CubeTensor,
) -> FloatTensor<Fusion<CubeBackend>> {
    let client = inputs[0].client.clone();
    let resolved = inputs.map(|t| client.resolve_tensor_float::<CubeBackend>(t));
    lazy(&client, f(resolved))
}

/// `out` (computed, or queued on the device) as a tensor of the fusion stream, the way
/// burn-fusion takes in data: an init op that registers its handle.
fn lazy(
    client: &Client<<CubeBackend as FusionBackend>::FusionRuntime>,
    out: FloatTensor<CubeBackend>,
) -> FloatTensor<Fusion<CubeBackend>> {
    let shape = out.meta.shape().clone();
    let dtype = out.dtype;
    let handle = <CubeBackend as BackendIr>::float_tensor_handle(out);
    let init = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client
        .register(
            StreamId::current(),
            OperationIr::Init(init),
            NoOp::<CubeBackend>::new(),
        )
        .output()
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

/// RMSNorm of `x` in groups of `w`'s length, on the device that holds `x`.
pub fn rms_norm(x: Tensor<2>, w: Tensor<1>, eps: f32) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as BlockOps>::rms_norm(
        x.into_dispatch(),
        w.into_dispatch(),
        eps,
    ))
}

/// RoPE of `x`, row `r` by row `first + r` of the angle tables.
pub fn rope(x: Tensor<2>, cos: Tensor<2>, sin: Tensor<2>, first: usize) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as BlockOps>::rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        first,
    ))
}

/// `cache` with rows `at..` replaced by `new`.
pub fn write_rows(cache: Tensor<2>, new: Tensor<2>, at: usize) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as BlockOps>::write_rows(
        cache.into_dispatch(),
        new.into_dispatch(),
        at,
    ))
}
