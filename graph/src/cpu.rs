//! Host implementations of the small per-token ops, used when the graph runs on
//! burn-flex.
//!
//! On a CPU each of these is a few microseconds of arithmetic, but expressed as burn
//! tensor ops it becomes a dozen allocations and dispatches (a RoPE is ten ops, an
//! attention twenty): with 30 layers that was a quarter of a decode step. Here each is
//! one pass over host memory. The burn versions in `exec` stay the path of every other
//! backend (burn-ndarray included, the reference); the tiny-model and parity tests check
//! both against transformers and each other.
use rayon::prelude::*;

/// True where the AVX2 + FMA builds of these loops may run. They are plain Rust that
/// the compiler vectorizes; the baseline x86-64 target allows only SSE2, so each entry
/// point below has a copy compiled with `#[target_feature]` (closures inside inherit it).
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x / (1 + e^-x)` in place.
pub fn silu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(x: &mut [f32]) {
            silu_body(x)
        }
        // SAFETY: the CPU has AVX2 and FMA, checked by `simd`.
        return unsafe { wide(x) };
    }
    silu_body(x)
}

#[inline(always)]
fn silu_body(x: &mut [f32]) {
    let chunk = 4096;
    let run = |c: &mut [f32]| {
        for v in c.iter_mut() {
            *v /= 1.0 + (-*v).exp();
        }
    };
    if x.len() >= 4 * chunk {
        x.par_chunks_mut(chunk).for_each(run);
    } else {
        run(x);
    }
}

/// RMSNorm of each row of `x [rows, width]` in place, times `w [width]`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        let ms = dot(row, row) / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v = *v * inv * w;
        }
    }
}

/// Rotate-half RoPE in place on `x [seq, heads * head_dim]`; `cos`, `sin` are the rows
/// `[seq, head_dim / 2]` of this step's positions.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize) {
    let half = head_dim / 2;
    let width = x.len() / (cos.len() / half);
    for (i, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (
            &cos[i * half..(i + 1) * half],
            &sin[i * half..(i + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * c[j] - b * s[j];
                x2[j] = b * c[j] + a * s[j];
            }
        }
    }
}

/// `a · b` in eight independent partial sums, so the compiler keeps them in one SIMD
/// register instead of one long chain of dependent adds.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Shape of an attention call.
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// Positions before this step.
    pub past: usize,
}

/// The body of [`attention`], pasted into its baseline and its AVX2 + FMA build (a
/// macro rather than a function so that the closures inside inherit the features).
macro_rules! attention_body {
    ($q:expr, $k:expr, $v:expr, $s:expr) => {{
        let (q, k, v, s): (&[f32], &[f32], &[f32], &AttentionShape) = ($q, $k, $v, $s);
        let hd = s.head_dim;
        let (qw, kw) = (s.n_heads * hd, s.n_kv_heads * hd);
        let seq = q.len() / qw;
        let rows = k.len() / kw;
        let group = s.n_heads / s.n_kv_heads;
        let first_key = s.past + seq - rows;
        let mut out = vec![0f32; q.len()];
        // Query position `i`, head `h`, into `o [hd]`.
        let head = |i: usize, h: usize, o: &mut [f32]| {
            let qp = s.past + i;
            // Keys j in lo..hi are visible: not after the query, and inside the window.
            let hi = (qp + 1 - first_key).min(rows);
            let lo = s
                .window
                .map_or(0, |w| (qp + 1).saturating_sub(w).saturating_sub(first_key));
            let g = h / group;
            let qh = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
            let mut scores = vec![0f32; hi.saturating_sub(lo)];
            let mut max = f32::NEG_INFINITY;
            for (j, sc) in (lo..hi).zip(scores.iter_mut()) {
                *sc = dot(qh, &k[j * kw + g * hd..j * kw + (g + 1) * hd]) * s.scale;
                max = max.max(*sc);
            }
            let mut sum = 0.0;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            for (j, &p) in (lo..hi).zip(scores.iter()) {
                let vh = &v[j * kw + g * hd..j * kw + (g + 1) * hd];
                for (o, v) in o.iter_mut().zip(vh) {
                    *o += p * v;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        };
        // Positions across threads in prefill; heads across threads in decode.
        if seq > 1 {
            out.par_chunks_mut(qw).enumerate().for_each(|(i, row)| {
                for (h, o) in row.chunks_mut(hd).enumerate() {
                    head(i, h, o);
                }
            });
        } else {
            out.par_chunks_mut(hd)
                .enumerate()
                .for_each(|(h, o)| head(0, h, o));
        }
        out
    }};
}

/// Causal grouped-query attention of `q [seq, n_heads * hd]` over `k`, `v`
/// `[rows, n_kv_heads * hd]` (the last `rows` positions, oldest first); query head `h`
/// reads KV head `h / (n_heads / n_kv_heads)`. Returns `[seq, n_heads * hd]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape) -> Vec<f32> {
            attention_body!(q, k, v, s)
        }
        // SAFETY: the CPU has AVX2 and FMA, checked by `simd`.
        return unsafe { wide(q, k, v, s) };
    }
    attention_body!(q, k, v, s)
}
