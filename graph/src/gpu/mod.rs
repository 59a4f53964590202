//! Block weights on GPU devices: GGUF's blocks copied to the device as stored and
//! multiplied by our cubecl kernels, which widen each weight as they read it. A
//! Q4_K_M file's weights then take about their file size of device memory instead of
//! six to eight times as much as f32.
use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor};
use llama_kernels::quant::QMatrix;

use crate::error::{GraphError, Result};

pub use launches::{count_launches, Launches};

#[cfg(feature = "wgpu")]
mod attention;
#[cfg(feature = "wgpu")]
mod fused;
#[cfg(feature = "wgpu")]
mod kernels;
mod launches;
#[cfg(feature = "wgpu")]
mod ops;

/// A `[rows, cols]` weight matrix of GGML blocks on a GPU device, with the host matrix
/// it came from (an embedding table is looked up on the host).
pub struct DeviceBlocks {
    host: Arc<QMatrix>,
    #[cfg(feature = "wgpu")]
    chunks: Arc<Chunks>,
}

impl std::fmt::Debug for DeviceBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBlocks[{}x{}, {}, {} bytes]",
            self.rows(),
            self.cols(),
            self.host.type_names(),
            self.device_bytes()
        )
    }
}

impl DeviceBlocks {
    /// Whether `device` runs the block kernels (a cubecl device: wgpu).
    pub fn supported(device: &Device) -> bool {
        #[cfg(feature = "wgpu")]
        {
            matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
        }
        #[cfg(not(feature = "wgpu"))]
        {
            let _ = device;
            false
        }
    }

    /// Copies `host`'s blocks to `device`.
    pub fn upload(host: Arc<QMatrix>, device: &Device) -> Result<DeviceBlocks> {
        #[cfg(feature = "wgpu")]
        {
            let chunks = Arc::new(Chunks::upload(&host, device)?);
            Ok(DeviceBlocks { host, chunks })
        }
        #[cfg(not(feature = "wgpu"))]
        {
            let _ = (host, device);
            Err(GraphError::Input(
                "block weights on a GPU need the `wgpu` feature".into(),
            ))
        }
    }

    /// The matrix in host memory.
    pub fn host(&self) -> &Arc<QMatrix> {
        &self.host
    }

    pub fn rows(&self) -> usize {
        self.host.rows()
    }

    pub fn cols(&self) -> usize {
        self.host.cols()
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> usize {
        #[cfg(feature = "wgpu")]
        {
            self.chunks.chunks.iter().map(|c| c.words * 4).sum()
        }
        #[cfg(not(feature = "wgpu"))]
        {
            0
        }
    }

    /// `x · Wᵀ` for `x: [m, cols]`, on the device.
    pub fn matmul(&self, node: &str, x: Tensor<2>) -> Result<Tensor<2>> {
        let [_, k] = x.dims();
        if k != self.cols() {
            return Err(GraphError::Invalid {
                node: node.into(),
                message: format!(
                    "input of {k} features for a {}x{} block matrix",
                    self.rows(),
                    self.cols()
                ),
            });
        }
        #[cfg(feature = "wgpu")]
        {
            Ok(ops::matmul(x, &self.chunks))
        }
        #[cfg(not(feature = "wgpu"))]
        {
            Err(GraphError::Input(
                "block weights on a GPU need the `wgpu` feature".into(),
            ))
        }
    }
}

/// Steps of at most this many query rows per sequence take the fused attention kernel
/// on GPU devices (each of its cubes walks every key: right for decode, not for a long
/// prompt, where the matmul form shares each key between the queries).
pub const FUSED_ATTENTION_ROWS: usize = 16;

/// Causal attention of `q: [seq, heads·hd]` (at positions `past..`) over `k`, `v:
/// [rows, kv_heads·hd]` (the last `rows` positions, ending with the step's own), by the
/// fused kernel: `None` where it does not apply (not a GPU device, a long step, heads
/// that do not divide).
#[allow(clippy::too_many_arguments)]
pub fn fused_attention(
    q: &Tensor<2>,
    k: &Tensor<2>,
    v: &Tensor<2>,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    scale: f32,
    window: Option<usize>,
    past: usize,
    device: &Device,
) -> Option<Tensor<2>> {
    let seq = q.dims()[0];
    let fits = seq <= FUSED_ATTENTION_ROWS
        && n_kv_heads > 0
        && n_heads.is_multiple_of(n_kv_heads)
        && head_dim > 0
        && head_dim <= 256
        && window != Some(0)
        && DeviceBlocks::supported(device);
    if !fits {
        return None;
    }
    #[cfg(feature = "wgpu")]
    {
        Some(ops::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            ops::AttentionParams {
                n_heads,
                n_kv_heads,
                head_dim,
                scale,
                window: window.unwrap_or(0),
                past,
            },
        ))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = (k, v, scale, past);
        None
    }
}

/// RMSNorm of `x: [rows, d]` in groups of `w`'s length by one kernel on GPU devices
/// (f32 tensors): `None` elsewhere, or where the groups do not divide the rows.
pub fn rms_norm(x: &Tensor<2>, w: &Tensor<1>, eps: f32, device: &Device) -> Option<Tensor<2>> {
    let [_, d] = x.dims();
    let g = w.dims()[0];
    let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if g == 0 || !d.is_multiple_of(g) || !f32s || !DeviceBlocks::supported(device) {
        return None;
    }
    #[cfg(feature = "wgpu")]
    {
        Some(ops::rms_norm(x.clone(), w.clone(), eps))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = eps;
        None
    }
}

/// Rotate-half RoPE of `x: [seq, heads·head_dim]` by one kernel on GPU devices, row
/// `r` turned by row `first + r` of `cos`, `sin: [positions, head_dim / 2]`: `None`
/// elsewhere, or where the shapes do not fit.
pub fn rope(
    x: &Tensor<2>,
    (cos, sin): (&Tensor<2>, &Tensor<2>),
    head_dim: usize,
    first: usize,
    device: &Device,
) -> Option<Tensor<2>> {
    let [seq, width] = x.dims();
    let [positions, half] = cos.dims();
    let fits = half > 0
        && head_dim == 2 * half
        && width.is_multiple_of(head_dim)
        && sin.dims() == [positions, half]
        && first + seq <= positions
        && [x, cos, sin].iter().all(|t| t.dtype() == DType::F32)
        && DeviceBlocks::supported(device);
    if !fits {
        return None;
    }
    #[cfg(feature = "wgpu")]
    {
        Some(ops::rope(x.clone(), cos.clone(), sin.clone(), first))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        None
    }
}

/// `cache` with rows `at..at + rows` replaced by `new: [rows, width]` (f32), stored
/// in the cache's element type (rounded, with f16) and written in place where the
/// cache is not shared: by one kernel on GPU devices, elsewhere by burn's cast and
/// slice assignment. The rows must lie within the cache.
pub fn write_rows(cache: Tensor<2>, new: Tensor<2>, at: usize) -> Tensor<2> {
    let [rows, width] = cache.dims();
    let n = new.dims()[0];
    let fits = new.dims()[1] == width
        && at + n <= rows
        && matches!(cache.dtype(), DType::F16 | DType::F32)
        && new.dtype() == DType::F32
        && DeviceBlocks::supported(&cache.device());
    #[cfg(feature = "wgpu")]
    if fits {
        return ops::write_rows(cache, new, at);
    }
    let _ = fits;
    let dtype = cache.dtype();
    cache.slice_assign([at..at + n, 0..width], new.cast(dtype))
}

/// The device copy: runs of rows of one block type, each in one buffer of `u32` words
/// (each row padded to whole words), no buffer over [`CHUNK_BYTES`].
#[cfg(feature = "wgpu")]
pub struct Chunks {
    /// Rows of the whole matrix.
    rows: usize,
    chunks: Vec<Chunk>,
}

#[cfg(feature = "wgpu")]
impl std::fmt::Debug for Chunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Chunks[{} rows, {} buffers]",
            self.rows,
            self.chunks.len()
        )
    }
}

#[cfg(feature = "wgpu")]
struct Chunk {
    /// The block type, as the kernels number them ([`kernels::Q4_0`]...).
    ty: u32,
    first_row: usize,
    rows: usize,
    row_words: usize,
    words: usize,
    handle: cubecl::server::Handle,
}

#[cfg(feature = "wgpu")]
impl Chunk {
    /// The run's words as a kernel's `&[u32]` argument.
    fn buffer_arg(&self) -> cubecl::prelude::BufferArg {
        // SAFETY: the handle was created from exactly `words` u32 words (`upload`), the
        // length bound here; the kernels index it only below row `rows` x `row_words`.
        unsafe { cubecl::prelude::BufferArg::from_raw_parts(self.handle.clone(), self.words) }
    }
}

/// The largest buffer of one run: within every wgpu backend's binding limit (128 MiB
/// by default).
#[cfg(feature = "wgpu")]
const CHUNK_BYTES: usize = 64 << 20;

#[cfg(feature = "wgpu")]
impl Chunks {
    fn upload(host: &QMatrix, device: &Device) -> Result<Chunks> {
        use llama_kernels::quant::GgmlType;
        let burn::backend::DispatchDevice::Cube(cube) = device.as_dispatch() else {
            return Err(GraphError::Input(
                "block weights go to GPU devices only".into(),
            ));
        };
        let client = cube.client();
        let code = |ty: GgmlType| -> Result<u32> {
            Ok(match ty {
                GgmlType::Q4_0 => kernels::Q4_0,
                GgmlType::Q4_1 => kernels::Q4_1,
                GgmlType::Q5_0 => kernels::Q5_0,
                GgmlType::Q5_1 => kernels::Q5_1,
                GgmlType::Q8_0 => kernels::Q8_0,
                GgmlType::Q4K => kernels::Q4_K,
                GgmlType::Q5K => kernels::Q5_K,
                GgmlType::Q6K => kernels::Q6_K,
                other => {
                    return Err(GraphError::Input(format!(
                        "{} rows have no GPU block kernel",
                        other.name()
                    )))
                }
            })
        };
        let mut chunks = Vec::new();
        // The run being gathered: (type, first row, row words, words).
        let mut run: Option<(u32, usize, usize, Vec<u32>)> = None;
        let flush = |run: (u32, usize, usize, Vec<u32>), chunks: &mut Vec<Chunk>| {
            let (ty, first_row, row_words, words) = run;
            let n = words.len();
            // Weights live as long as the model: the exact-fit persistent pool.
            let handle = client.memory_persistent_allocation(words, |words| {
                client.create(cubecl::bytes::Bytes::from_elems(words))
            });
            chunks.push(Chunk {
                ty,
                first_row,
                rows: n / row_words.max(1),
                row_words,
                words: n,
                handle,
            });
        };
        for r in 0..host.rows() {
            let (ty, bytes) = host.row(r);
            let ty = code(ty)?;
            let row_words = bytes.len().div_ceil(4);
            let fits = |run: &(u32, usize, usize, Vec<u32>)| {
                run.0 == ty && (run.3.len() + row_words) * 4 <= CHUNK_BYTES
            };
            if run.as_ref().is_some_and(|r| !fits(r)) {
                if let Some(done) = run.take() {
                    flush(done, &mut chunks);
                }
            }
            let cur = run.get_or_insert_with(|| (ty, r, row_words, Vec::new()));
            cur.3.extend(bytes.chunks(4).map(|b| {
                let mut w = [0u8; 4];
                w[..b.len()].copy_from_slice(b);
                u32::from_le_bytes(w)
            }));
        }
        if let Some(done) = run.take() {
            flush(done, &mut chunks);
        }
        Ok(Chunks {
            rows: host.rows(),
            chunks,
        })
    }
}
