//! Int8 weights with one f32 scale per block of 32 values, and the CPU matmul that
//! multiplies with them directly.
//!
//! Our own kernel because burn's CPU backends have no fast quantized matmul (their
//! quantized matmuls dequantize the whole weight on every call). Decode reads every
//! weight once per token, so a quarter of the bytes of f32 is most of the speed. The
//! activations stay f32: each block's weights are widened to f32 in registers and
//! multiplied with them (AVX2/FMA where the CPU has it, a portable loop elsewhere),
//! then scaled once per block. Quantizing the activations too (as llama.cpp does) was
//! faster still but moved SmolLM2's perplexity by 1.6%; this keeps it within 0.1%.
use rayon::prelude::*;

/// Values per block; each block has its own scale.
pub const BLOCK: usize = 32;

/// From this many activation rows on, the executor widens the weight to f32 and uses
/// the backend's matmul instead of [`matmul`] (prefill is compute-bound, decode is not).
pub const DENSE_FROM_ROWS: usize = 16;

/// A `[rows, cols]` matrix as int8 blocks: `value ≈ quant * scale[block]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    scales: Vec<f32>,
    quants: Vec<i8>,
}

/// Quantizes one block: the scale maps the largest magnitude to 127.
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let d = amax / 127.0;
    let inv = 1.0 / d;
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

impl Q8Matrix {
    /// `None` when `cols` is not a whole number of blocks.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Option<Q8Matrix> {
        if !cols.is_multiple_of(BLOCK) || data.len() != rows * cols {
            return None;
        }
        let mut quants = vec![0i8; data.len()];
        let scales = data
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .map(|(x, q)| quantize_block(x, q))
            .collect();
        Some(Q8Matrix {
            rows,
            cols,
            scales,
            quants,
        })
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.quants
            .chunks_exact(BLOCK)
            .zip(&self.scales)
            .flat_map(|(q, d)| q.iter().map(move |&v| v as f32 * d))
            .collect()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * 4
    }
}

/// Which dot-product code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest this CPU supports, detected at run time.
    Auto,
    /// The portable loop (for tests of the fallback, and CPUs without SIMD).
    Portable,
}

fn dot_portable(x: &[f32], wq: &[i8], ws: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (b, (xb, wb)) in x
        .chunks_exact(BLOCK)
        .zip(wq.chunks_exact(BLOCK))
        .enumerate()
    {
        let s: f32 = xb.iter().zip(wb).map(|(&a, &b)| a * b as f32).sum();
        acc += s * ws[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], wq: &[i8], ws: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for (b, &scale) in ws.iter().enumerate() {
        let mut block = _mm256_setzero_ps();
        for k in 0..BLOCK / 8 {
            let at = b * BLOCK + k * 8;
            // SAFETY: `x` and `wq` hold `ws.len()` whole blocks; 8 bytes / 8 floats read.
            let w8 = _mm_loadl_epi64(wq.as_ptr().add(at) as *const __m128i);
            let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8));
            block = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(at)), block);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scale), block, acc);
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

type DotFn = fn(&[f32], &[i8], &[f32]) -> f32;

fn pick(kernel: Kernel) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if kernel == Kernel::Auto
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return |a, b, c| unsafe { dot_avx2(a, b, c) };
        }
    }
    let _ = kernel;
    dot_portable
}

/// `x [n, cols] @ w^T -> [n, rows]`, row-major.
pub fn matmul(x: &[f32], n: usize, w: &Q8Matrix, kernel: Kernel) -> Vec<f32> {
    assert_eq!(x.len(), n * w.cols, "x is not [n, cols]");
    let blocks = w.cols / BLOCK;
    let dot = pick(kernel);
    // Output rows in chunks across threads; each weight row is read once and stays in
    // cache while every activation row uses it.
    let mut out_t = vec![0f32; w.rows * n];
    const ROWS_PER_TASK: usize = 16;
    out_t
        .par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, out_row) in chunk.chunks_mut(n).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let wq = &w.quants[r * w.cols..(r + 1) * w.cols];
                let ws = &w.scales[r * blocks..(r + 1) * blocks];
                for (t, o) in out_row.iter_mut().enumerate() {
                    *o = dot(&x[t * w.cols..(t + 1) * w.cols], wq, ws);
                }
            }
        });
    // [rows, n] -> [n, rows]
    let mut out = vec![0f32; n * w.rows];
    for r in 0..w.rows {
        for t in 0..n {
            out[t * w.rows + r] = out_t[r * n + t];
        }
    }
    out
}

/// The largest error [`matmul`] may make against `x @ dequantize(w)^T` for one output:
/// f32 rounding only, as the activations are not quantized.
pub fn error_bound(x_row: &[f32], w_row: &[f32]) -> f32 {
    let exact: f32 = x_row.iter().zip(w_row).map(|(a, b)| (a * b).abs()).sum();
    exact * 1e-5 + 1e-6
}
