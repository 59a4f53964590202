//! `x @ w^T` with `w` a [`QMatrix`] of GGML blocks, on the CPU.
//!
//! Our own kernels because burn's CPU backends have no matmul over GGUF's block formats
//! (their quantized schemes differ, and dequantize the whole weight per call). Decode
//! reads every weight once per token, so reading 4.5-bit blocks instead of f32 is most
//! of the speed; the rest is integer arithmetic. As in llama.cpp, each activation row is
//! quantized once per matmul to int8 blocks of 32 ([`QActs`], with the block's scale,
//! the scaled sum of its values, and the sums of its 16-value halves), and every weight
//! block is multiplied with it in integers: `u8 x i8` multiply-adds on AVX2, a portable
//! loop elsewhere. Scales, minimums and offsets are applied once per block in f32:
//!
//! - Q4_0: `sum(d (q - 8) x) = d dx sum(q qx) - 8 d sx`
//! - Q4_1: `sum((d q + m) x) = d dx sum(q qx) + m sx`
//! - Q5_0 and Q5_1: as Q4_0 (with `- 16 d sx`) and Q4_1, `q` five bits
//! - Q8_0: `d dx sum(q qx)`
//! - Q4_K and Q5_K: per 32-value sub-block, `d sc dx sum(q qx) - dmin mn sx`
//! - Q6_K: per 16-value half, `d sc dx (sum(q qx) - 32 hx)`
//!
//! where `dx` is the activation block's scale, `sx = dx sum(qx)`, and `hx` the sum of a
//! half's quantized values. The only approximation is rounding each activation to its
//! block's int8 grid: see [`error_bound`].
use rayon::prelude::*;

use super::format::{f16_at, k4_scale_min, q5, GgmlType};
use super::matrix::QMatrix;
use super::packed::GROUP;
use crate::features::features;

/// Values per activation block (and per Q4_0 / Q4_1 / Q8_0 weight block).
pub const QK: usize = 32;

/// Which dot-product code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest this CPU supports, detected at run time (AVX2 + FMA + F16C on
    /// x86-64, with VNNI dot products for packed rows where the CPU has AVX-VNNI or
    /// AVX-512 VNNI; the portable loop elsewhere).
    Auto,
    /// AVX2 without VNNI where the CPU has AVX2 (for tests of that path); as `Auto`
    /// otherwise.
    Avx2,
    /// Packed rows through AVX-512 VNNI where the CPU has it, even if it also has
    /// AVX-VNNI (for tests of that path); as `Auto` otherwise.
    Avx512Vnni,
    /// The portable loop (for tests of the fallback, and CPUs without SIMD).
    Portable,
}

/// Activation rows quantized to int8 blocks of [`QK`] values.
pub struct QActs {
    pub(super) n: usize,
    pub(super) cols: usize,
    pub(super) qs: Vec<i8>,
    /// Per block: the scale `dx` (`x ≈ qx * dx`).
    pub(super) d: Vec<f32>,
    /// Per block: `dx * sum(qx)`.
    pub(super) s: Vec<f32>,
    /// Per 16 values: `sum(qx)`.
    pub(super) h: Vec<i32>,
}

/// One activation row of a [`QActs`].
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

impl QActs {
    /// Quantizes `n` rows of `cols` values (`cols` a multiple of [`QK`]).
    pub fn quantize(x: &[f32], n: usize, cols: usize) -> QActs {
        assert!(cols.is_multiple_of(QK) && x.len() == n * cols);
        let blocks = x.len() / QK;
        let mut a = QActs {
            n,
            cols,
            qs: vec![0; x.len()],
            d: vec![0.0; blocks],
            s: vec![0.0; blocks],
            h: vec![0; blocks * 2],
        };
        let nb = cols / QK;
        let rows =
            a.qs.chunks_mut(cols)
                .zip(a.d.chunks_mut(nb))
                .zip(a.s.chunks_mut(nb))
                .zip(a.h.chunks_mut(2 * nb))
                .zip(x.chunks(cols));
        if n >= 8 {
            // Prefill: rows across threads (this runs once per matmul, before the kernel).
            rows.par_bridge()
                .for_each(|((((qs, d), s), h), x)| quantize_row(x, qs, d, s, h));
        } else {
            rows.for_each(|((((qs, d), s), h), x)| quantize_row(x, qs, d, s, h));
        }
        a
    }

    /// The values the kernels multiply with: row `t` as `qx * dx`.
    pub fn dequantize_row(&self, t: usize) -> Vec<f32> {
        let r = self.row(t);
        r.qs.chunks_exact(QK)
            .zip(r.d)
            .flat_map(|(q, d)| q.iter().map(move |&q| q as f32 * d))
            .collect()
    }

    /// Row `t`.
    pub fn row(&self, t: usize) -> ActRow<'_> {
        let b = self.cols / QK;
        ActRow {
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            d: &self.d[t * b..(t + 1) * b],
            s: &self.s[t * b..(t + 1) * b],
        }
    }
}

/// Quantizes one row: per block of 32, the scale, int8 values rounded to nearest, their
/// scaled sum and the sums of their halves.
fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], h: &mut [i32]) {
    // Round half away from zero as `f32::round` does, without its libm call per
    // value: add ±0.5 and truncate.
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        for (q, v) in qb.iter_mut().zip(xb) {
            let y = (v * inv).clamp(-127.0, 127.0);
            *q = (y + 0.5f32.copysign(y)) as i8;
        }
        let lo: i32 = qb[..16].iter().map(|&q| q as i32).sum();
        let hi: i32 = qb[16..].iter().map(|&q| q as i32).sum();
        d[b] = scale;
        s[b] = scale * (lo + hi) as f32;
        h[2 * b] = lo;
        h[2 * b + 1] = hi;
    }
}

/// The dot product of one weight row (its bytes) with one activation row.
type DotFn = fn(&[u8], ActRow<'_>) -> f32;

fn dot_q4_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let d = f16_at(blk, 0);
        let x = &a.qs[b * QK..(b + 1) * QK];
        let mut isum = 0i32;
        for (j, &q) in blk[2..18].iter().enumerate() {
            isum += (q & 0x0F) as i32 * x[j] as i32 + (q >> 4) as i32 * x[j + 16] as i32;
        }
        acc += d * a.d[b] * isum as f32 - 8.0 * d * a.s[b];
    }
    acc
}

fn dot_q4_1(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        let x = &a.qs[b * QK..(b + 1) * QK];
        let mut isum = 0i32;
        for (j, &q) in blk[4..20].iter().enumerate() {
            isum += (q & 0x0F) as i32 * x[j] as i32 + (q >> 4) as i32 * x[j + 16] as i32;
        }
        acc += d * a.d[b] * isum as f32 + m * a.s[b];
    }
    acc
}

/// Q5_0 (`BYTES` 22) or Q5_1 (24).
fn dot_q5<const BYTES: usize>(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(BYTES).enumerate() {
        let (d, m, at) = if BYTES == 24 {
            (f16_at(blk, 0), f16_at(blk, 2), 4)
        } else {
            let d = f16_at(blk, 0);
            (d, -16.0 * d, 2)
        };
        let high = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
        let x = &a.qs[b * QK..(b + 1) * QK];
        let isum: i32 = (0..QK)
            .map(|i| q5(&blk[at + 4..], high, i) as i32 * x[i] as i32)
            .sum();
        acc += d * a.d[b] * isum as f32 + m * a.s[b];
    }
    acc
}

fn dot_q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let d = f16_at(blk, 0);
        let x = &a.qs[b * QK..(b + 1) * QK];
        let isum: i32 = blk[2..34]
            .iter()
            .zip(x)
            .map(|(&q, &x)| q as i8 as i32 * x as i32)
            .sum();
        acc += d * a.d[b] * isum as f32;
    }
    acc
}

/// A Q4_K row, or with `FIVE` a Q5_K row (its fifth bits in the 32 bytes before the
/// nibbles: bit `j` of byte `l` for value `l` of sub-block `j`).
fn dot_q4_k<const FIVE: bool>(w: &[u8], a: ActRow<'_>) -> f32 {
    let (bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    let mut acc = 0f32;
    for (sb, blk) in w.chunks_exact(bytes).enumerate() {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let scales = &blk[4..16];
        // Q4_K has no fifth bits: zeros in their place.
        let qh = if FIVE { &blk[16..48] } else { &[0; 32][..] };
        for (c, q) in blk[qs_at..bytes].chunks_exact(32).enumerate() {
            for (half, shift) in [(0, 0), (1, 4)] {
                let j = 2 * c + half;
                let (sc, mn) = k4_scale_min(j, scales);
                let ab = sb * 8 + j;
                let x = &a.qs[ab * QK..(ab + 1) * QK];
                let isum: i32 = q
                    .iter()
                    .zip(qh)
                    .zip(x)
                    .map(|((&q, &h), &x)| {
                        let q = ((q >> shift) & 0x0F) | (((h >> j) & 1) << 4);
                        q as i32 * x as i32
                    })
                    .sum();
                acc += d * sc as f32 * a.d[ab] * isum as f32 - dmin * mn as f32 * a.s[ab];
            }
        }
    }
    acc
}

fn dot_q6_k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (sb, blk) in w.chunks_exact(210).enumerate() {
        let d = f16_at(blk, 208);
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
            let sc = &blk[192 + 8 * h..192 + 8 * h + 8];
            for k in 0..4 {
                let ab = sb * 8 + 4 * h + k;
                let x = &a.qs[ab * QK..(ab + 1) * QK];
                let (from, shift) = [(0, 0), (32, 0), (0, 4), (32, 4)][k];
                let mut halves = [0i32; 2];
                for l in 0..32 {
                    let q = ((ql[from + l] >> shift) & 0x0F) | (((qh[l] >> (2 * k)) & 3) << 4);
                    halves[l / 16] += (q as i32 - 32) * x[l] as i32;
                }
                let isum =
                    sc[2 * k] as i8 as i32 * halves[0] + sc[2 * k + 1] as i8 as i32 * halves[1];
                acc += d * a.d[ab] * isum as f32;
            }
        }
    }
    acc
}

/// Computes `out[r * n + t]`, the dot product of weight row `r` of `w` (consecutive
/// rows of `row_bytes` bytes each) with activation row `t`, for every row and every
/// activation row.
type RowsFn = fn(&[u8], usize, &QActs, &mut [f32]);

fn rows_portable(dot: DotFn, w: &[u8], row_bytes: usize, a: &QActs, out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(a.n)) {
        for (t, o) in o.iter_mut().enumerate() {
            *o = dot(row, a.row(t));
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

/// Whether [`matmul`] reads the packed copy of a [`QMatrix::pack`]ed matrix on this
/// CPU (it reads the rows otherwise, and packing would only cost memory).
pub fn packed_kernel_available() -> bool {
    features().avx2_fma_f16c
}

/// The row kernel for rows of `ty`.
fn pick(ty: GgmlType, simd: bool) -> RowsFn {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY (each closure): `simd` is true only when the CPU has AVX2, FMA and
        // F16C (checked by `features`); `matmul` hands whole rows of `ty` and
        // activations quantized over the same width.
        return match ty {
            GgmlType::Q4_0 => |w, rb, a, o| unsafe { avx2::rows_q4_0(w, rb, a, o) },
            GgmlType::Q4_1 => |w, rb, a, o| unsafe { avx2::rows_q4_1(w, rb, a, o) },
            GgmlType::Q5_0 => |w, rb, a, o| unsafe { avx2::rows_q5_0(w, rb, a, o) },
            GgmlType::Q5_1 => |w, rb, a, o| unsafe { avx2::rows_q5_1(w, rb, a, o) },
            GgmlType::Q8_0 => |w, rb, a, o| unsafe { avx2::rows_q8_0(w, rb, a, o) },
            GgmlType::Q4K => |w, rb, a, o| unsafe { avx2::rows_q4_k(w, rb, a, o) },
            GgmlType::Q5K => |w, rb, a, o| unsafe { avx2::rows_q5_k(w, rb, a, o) },
            _ => |w, rb, a, o| unsafe { avx2::rows_q6_k(w, rb, a, o) },
        };
    }
    let _ = simd;
    match ty {
        GgmlType::Q4_0 => |w, rb, a, o| rows_portable(dot_q4_0, w, rb, a, o),
        GgmlType::Q4_1 => |w, rb, a, o| rows_portable(dot_q4_1, w, rb, a, o),
        GgmlType::Q5_0 => |w, rb, a, o| rows_portable(dot_q5::<22>, w, rb, a, o),
        GgmlType::Q5_1 => |w, rb, a, o| rows_portable(dot_q5::<24>, w, rb, a, o),
        GgmlType::Q8_0 => |w, rb, a, o| rows_portable(dot_q8_0, w, rb, a, o),
        GgmlType::Q4K => |w, rb, a, o| rows_portable(dot_q4_k::<false>, w, rb, a, o),
        GgmlType::Q5K => |w, rb, a, o| rows_portable(dot_q4_k::<true>, w, rb, a, o),
        _ => |w, rb, a, o| rows_portable(dot_q6_k, w, rb, a, o),
    }
}

/// `x [n, cols] @ w^T -> [n, rows]`, row-major.
pub fn matmul(x: &[f32], n: usize, w: &QMatrix, kernel: Kernel) -> Vec<f32> {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "x is not [n, cols]");
    let simd = kernel != Kernel::Portable && features().avx2_fma_f16c;
    let acts = QActs::quantize(x, n, cols);
    // Output rows in chunks across threads, a few chunks per thread so uneven cores
    // balance; each weight row is read once and stays in cache while every activation
    // row uses it. The output is computed transposed, `[rows, n]`.
    let threads = rayon::current_num_threads();
    let packed = w.packed().filter(|_| simd);
    let per_task = if threads == 1 {
        rows
    } else {
        // Whole groups of the packed layout per task.
        rows.div_ceil(threads * 4).max(16).next_multiple_of(GROUP)
    };
    // The packed kernel, picked once per matmul rather than per block of rows.
    #[cfg(target_arch = "x86_64")]
    let packed = packed.map(|p| {
        use super::packed::avx2;
        let rows = match kernel {
            Kernel::Avx2 => avx2::rows,
            Kernel::Avx512Vnni if features().avx512vnni => avx2::rows_avx512vnni,
            _ => avx2::pick(),
        };
        (p, rows)
    });
    let run = |start: usize, chunk: &mut [f32]| {
        let end = start + chunk.len() / n;
        #[cfg(target_arch = "x86_64")]
        if let Some((p, rows)) = packed {
            // SAFETY: `simd` is true only when the CPU has AVX2, FMA and F16C (and
            // `pick` checks VNNI); tasks start at multiples of GROUP and `rows` is one
            // (`Packed::new`).
            unsafe { rows(p, start / GROUP..end / GROUP, &acts, chunk) };
            return;
        }
        let _ = packed;
        w.for_each_run(start..end, |first, ty, bytes| {
            let row_bytes = ty.bytes_for(cols).unwrap_or(1);
            let count = bytes.len() / row_bytes;
            let out = &mut chunk[(first - start) * n..(first - start + count) * n];
            pick(ty, simd)(bytes, row_bytes, &acts, out);
        });
    };
    if n == 1 {
        // One activation row: the transposed output is the output.
        let mut out = vec![0f32; rows];
        if per_task >= rows {
            run(0, &mut out);
        } else {
            out.par_chunks_mut(per_task)
                .enumerate()
                .for_each(|(task, chunk)| run(task * per_task, chunk));
        }
        return out;
    }
    // Each task computes BLOCK rows at a time for every activation row into a buffer of
    // its own and writes them into their columns of the `[n, rows]` output, so no
    // transposed copy of the whole output is ever held (at n = 64, a fused gate/up's
    // output is 786 KB).
    const BLOCK: usize = 8 * GROUP;
    let mut out = vec![0f32; n * rows];
    let dst = Columns(out.as_mut_ptr());
    let task = |t: usize| {
        let (start, end) = (t * per_task, ((t + 1) * per_task).min(rows));
        let mut buf = vec![0f32; BLOCK.min(end - start) * n];
        for first in (start..end).step_by(BLOCK) {
            let len = BLOCK.min(end - first);
            let buf = &mut buf[..len * n];
            run(first, buf);
            // Per activation row, the block's outputs are side by side in `out`.
            for t in 0..n {
                for r in 0..len {
                    // SAFETY: `t < n` and `first + r < rows`, so in bounds of `out`; each
                    // output column belongs to one task.
                    unsafe { dst.write(t * rows + first + r, buf[r * n + t]) };
                }
            }
        }
    };
    let tasks = rows.div_ceil(per_task);
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    out
}

/// The output of [`matmul`] as tasks write their columns of it.
#[derive(Clone, Copy)]
struct Columns(*mut f32);

// SAFETY: tasks write disjoint elements (their own columns) and nothing reads the
// output until every task is done.
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// # Safety
    /// `at` is in bounds and no other thread touches it.
    unsafe fn write(self, at: usize, v: f32) {
        *self.0.add(at) = v;
    }
}

/// The largest error [`matmul`] may make against `x @ dequantize(w)^T` for one output:
/// each activation moves by at most half a step of its block's int8 grid
/// (`amax / 127 / 2`), times the weights it meets, plus f32 rounding.
pub fn error_bound(x_row: &[f32], w_row: &[f32]) -> f32 {
    let grid: f32 = x_row
        .chunks(QK)
        .zip(w_row.chunks(QK))
        .map(|(x, w)| {
            let step = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            step / 2.0 * w.iter().map(|v| v.abs()).sum::<f32>()
        })
        .sum();
    let exact: f32 = x_row.iter().zip(w_row).map(|(a, b)| (a * b).abs()).sum();
    grid * (1.0 + 1e-5) + exact * 1e-5 + 1e-6
}
