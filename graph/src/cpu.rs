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

/// Causal grouped-query attention of `q [seq, n_heads * hd]` over `k`, `v`
/// `[rows, n_kv_heads * hd]` (the last `rows` positions, oldest first); query head `h`
/// reads KV head `h / (n_heads / n_kv_heads)`. Returns `[seq, n_heads * hd]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY (both closures): the CPU has AVX2 and FMA, checked by `simd`.
        return attention_body(
            q,
            k,
            v,
            s,
            |a, b| unsafe { avx2::dot(a, b) },
            |o, p, x| unsafe { avx2::axpy(o, p, x) },
        );
    }
    attention_body(q, k, v, s, dot, axpy)
}

/// `o += p * x`.
fn axpy(o: &mut [f32], p: f32, x: &[f32]) {
    for (o, x) in o.iter_mut().zip(x) {
        *o += p * x;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        let s = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut total = _mm_cvtss_f32(h);
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(o: &mut [f32], p: f32, x: &[f32]) {
        let n = o.len().min(x.len());
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            let at = o.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                at,
                _mm256_fmadd_ps(pv, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(at)),
            );
            i += 8;
        }
        while i < n {
            o[i] += p * x[i];
            i += 1;
        }
    }
}

#[inline(always)]
fn attention_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
    dot: impl Fn(&[f32], &[f32]) -> f32 + Sync,
    axpy: impl Fn(&mut [f32], f32, &[f32]) + Sync,
) -> Vec<f32> {
    let hd = s.head_dim;
    let (qw, kw) = (s.n_heads * hd, s.n_kv_heads * hd);
    let seq = q.len() / qw;
    let rows = k.len() / kw;
    let group = s.n_heads / s.n_kv_heads;
    let first_key = s.past + seq - rows;
    let mut out = vec![0f32; q.len()];
    // One query position: each KV head's key and value rows are read once for all the
    // query heads of its group.
    let one = |(i, out): (usize, &mut [f32])| {
        let qp = s.past + i;
        // Keys j in lo..hi are visible: not after the query, and inside the window.
        let hi = (qp + 1 - first_key).min(rows);
        let lo = s
            .window
            .map_or(0, |w| (qp + 1).saturating_sub(w).saturating_sub(first_key));
        let n = hi.saturating_sub(lo);
        let mut scores = vec![0f32; group * n];
        for g in 0..s.n_kv_heads {
            let heads = g * group..(g + 1) * group;
            for (jj, j) in (lo..hi).enumerate() {
                let kh = &k[j * kw + g * hd..j * kw + (g + 1) * hd];
                for (x, h) in heads.clone().enumerate() {
                    let qh = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
                    scores[x * n + jj] = dot(qh, kh) * s.scale;
                }
            }
            for x in 0..group {
                let sc = &mut scores[x * n..(x + 1) * n];
                let max = sc.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                let mut sum = 0.0;
                for v in sc.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                sc.iter_mut().for_each(|v| *v *= inv);
            }
            for (jj, j) in (lo..hi).enumerate() {
                let vh = &v[j * kw + g * hd..j * kw + (g + 1) * hd];
                for (x, h) in heads.clone().enumerate() {
                    axpy(&mut out[h * hd..(h + 1) * hd], scores[x * n + jj], vh);
                }
            }
        }
    };
    if seq > 1 {
        out.par_chunks_mut(qw).enumerate().for_each(one);
    } else {
        out.chunks_mut(qw).enumerate().for_each(one);
    }
    out
}
