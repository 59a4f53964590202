//! Causal grouped-query attention over host rows of keys and values ([`KvRows`]: f32,
//! or the f16 of a half-size KV cache).
//!
//! On CPUs with AVX2 + FMA + F16C every query row runs one hand-written kernel with its
//! own `exp` (`avx2`), reading f16 keys and values in place; elsewhere the plain loops
//! run. Either way a query row's output is computed by the same code whatever else is
//! in the call: a prompt's last position gives bitwise the same result whether the
//! prompt ran in one step, in chunks, or after a prefix copied from another sequence,
//! and a decode row the same whichever sequences share its step (what a server needs
//! for `seed` to mean the same text under any load).
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::features::features;
use crate::norm::dot;

/// Shape of an attention call.
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// Positions before this step.
    pub past: usize,
    /// Whether a query sees only keys not after it (decoders); `false`: every key
    /// (an encoder's bidirectional attention, all of one sequence in one step).
    pub causal: bool,
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
            let hi = if s.causal {
                (qp + 1 - first_key).min(rows)
            } else {
                rows
            };
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

/// Keys or values as attention reads them: f32, or the f16 of a KV cache kept at half
/// the size.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl KvRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(x) => x.len(),
            KvRows::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` values.
    pub fn first(&self, n: usize) -> KvRows<'_> {
        match self {
            KvRows::F32(x) => KvRows::F32(&x[..n]),
            KvRows::F16(x) => KvRows::F16(&x[..n]),
        }
    }

    /// The values as f32 (borrowed when they are).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        use half::slice::HalfFloatSliceExt;
        match self {
            KvRows::F32(x) => std::borrow::Cow::Borrowed(x),
            KvRows::F16(x) => {
                let mut out = vec![0f32; x.len()];
                x.convert_to_f32_slice(&mut out);
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Causal grouped-query attention of `q [seq, n_heads * hd]` over `k`, `v`
/// `[rows, n_kv_heads * hd]` (the last `rows` positions, oldest first); query head `h`
/// reads KV head `h / (n_heads / n_kv_heads)`. Returns `[seq, n_heads * hd]`.
///
/// Keys and values of an f16 cache are read in place (converted as they are loaded).
pub fn attention(q: &[f32], k: KvRows, v: KvRows, s: &AttentionShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma_f16c {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked by `features`.
        match (k, v) {
            (KvRows::F32(k), KvRows::F32(v)) => return unsafe { avx2::attention(q, k, v, s) },
            (KvRows::F16(k), KvRows::F16(v)) => return unsafe { avx2::attention(q, k, v, s) },
            _ => {}
        }
    }
    let (k, v) = (k.to_f32(), v.to_f32());
    let (k, v): (&[f32], &[f32]) = (&k, &v);
    attention_body!(q, k, v, s)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Attention written out in AVX2 + FMA, one (query row, head) pair at a time: the
    //! compiler's version of the loops above keeps each dot product in one chain of
    //! dependent adds and re-reads the output row from memory per key. Here dot
    //! products run four keys at a time in independent FMA chains and each head's
    //! output stays in registers over 64-value slices of the head.
    use std::arch::x86_64::*;

    use half::f16;
    use rayon::prelude::*;

    use super::AttentionShape;
    use crate::quant::kernels::avx2::hsum;

    /// A key or value element: eight of them into a register, one into an f32.
    pub trait Elem: Copy + Sync {
        /// # Safety
        /// Eight elements must be readable at `p`; the CPU must have AVX, and F16C for
        /// f16.
        unsafe fn load8(p: *const Self) -> __m256;
        fn get(self) -> f32;
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        fn get(self) -> f32 {
            self
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    impl Elem for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            load8_f16(p)
        }
        #[inline(always)]
        fn get(self) -> f32 {
            self.to_f32()
        }
    }

    /// `e^x` per lane, within about one ulp of `f32::exp` for `x` in [-87.3, 88.3]
    /// (clamped outside: softmax arguments are at most 0, and below -87.3 their share
    /// is under 1e-38). Range reduction `x = n ln 2 + r` with `ln 2` in two parts, a
    /// degree-6 polynomial for `e^r` on |r| <= ln 2 / 2, and `2^n` built in the
    /// exponent bits.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let bits = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// [`exp8`] on eight values (for tests).
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8_lanes(x: [f32; 8]) -> [f32; 8] {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr())));
        out
    }

    /// The lane sums of four registers, as the four lanes of one.
    #[inline(always)]
    unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
        // Pairwise adds leave [a0+a1, a2+a3, b0+b1, b2+b3 | ...] per 128-bit half, twice
        // over; the two halves then add up to the four totals.
        let ab = _mm256_hadd_ps(v[0], v[1]);
        let cd = _mm256_hadd_ps(v[2], v[3]);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }

    /// `a · b` over `n` values.
    #[inline(always)]
    unsafe fn dot<T: Elem>(a: *const f32, b: *const T, n: usize) -> f32 {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c + 16 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c)), T::load8(b.add(c)), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c + 8)), T::load8(b.add(c + 8)), a1);
            c += 16;
        }
        if c + 8 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c)), T::load8(b.add(c)), a0);
            c += 8;
        }
        let mut sum = hsum(_mm256_add_ps(a0, a1));
        while c < n {
            sum += *a.add(c) * (*b.add(c)).get();
            c += 1;
        }
        sum
    }

    /// One query head `qh` over keys and values `lo..hi` of KV head column `col`,
    /// into `o`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn head<T: Elem>(
        qh: &[f32],
        k: &[T],
        v: &[T],
        kw: usize,
        col: usize,
        (lo, hi): (usize, usize),
        scale: f32,
        o: &mut [f32],
    ) {
        let hd = qh.len();
        let mut scores = vec![0f32; hi - lo];
        let (q, k) = (qh.as_ptr(), k.as_ptr().add(col));
        // Four keys at a time: four independent FMA chains, and their four sums
        // reduced together.
        let mut j = lo;
        while j + 4 <= hi {
            let rows = [0, 1, 2, 3].map(|u| k.add((j + u) * kw));
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 8 <= hd {
                let qv = _mm256_loadu_ps(q.add(c));
                for (a, row) in acc.iter_mut().zip(rows) {
                    *a = _mm256_fmadd_ps(qv, T::load8(row.add(c)), *a);
                }
                c += 8;
            }
            let mut sums = [0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), hsum4(acc));
            for (u, (sc, sum)) in scores[j - lo..j - lo + 4].iter_mut().zip(sums).enumerate() {
                let tail: f32 = (c..hd).map(|c| *q.add(c) * (*rows[u].add(c)).get()).sum();
                *sc = (sum + tail) * scale;
            }
            j += 4;
        }
        for (sc, j) in scores[j - lo..].iter_mut().zip(j..hi) {
            *sc = dot(q, k.add(j * kw), hd) * scale;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut chunks = scores.chunks_exact_mut(8);
        let mut sum8 = _mm256_setzero_ps();
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(
                _mm256_loadu_ps(c.as_ptr()),
                _mm256_set1_ps(max),
            ));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        let mut sum = hsum(sum8);
        for sc in chunks.into_remainder() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let inv = 1.0 / sum;
        // 64 output values (eight registers) at a time over every key, then 8.
        let mut c = 0;
        while c + 64 <= hd {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &p) in (lo..hi).zip(&scores) {
                let row = v.as_ptr().add(j * kw + col + c);
                let p = _mm256_set1_ps(p);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(p, T::load8(row.add(8 * i)), *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let at = o.as_mut_ptr().add(c + 8 * i);
                _mm256_storeu_ps(at, _mm256_mul_ps(*a, _mm256_set1_ps(inv)));
            }
            c += 64;
        }
        while c + 8 <= hd {
            let mut acc = _mm256_setzero_ps();
            for (j, &p) in (lo..hi).zip(&scores) {
                let row = v.as_ptr().add(j * kw + col + c);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(p), T::load8(row), acc);
            }
            let at = o.as_mut_ptr().add(c);
            _mm256_storeu_ps(at, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
            c += 8;
        }
        for (c, o) in o.iter_mut().enumerate().skip(c) {
            let acc: f32 = (lo..hi)
                .zip(&scores)
                .map(|(j, p)| p * v[j * kw + col + c].get())
                .sum();
            *o = acc * inv;
        }
    }

    /// [`super::attention`]; the caller checks that the CPU has AVX2, FMA and F16C.
    /// Every (query row, head) pair is one task of the same kernel.
    pub unsafe fn attention<T: Elem>(q: &[f32], k: &[T], v: &[T], s: &AttentionShape) -> Vec<f32> {
        let hd = s.head_dim;
        let (qw, kw) = (s.n_heads * hd, s.n_kv_heads * hd);
        let seq = q.len() / qw;
        let rows = k.len() / kw;
        let group = s.n_heads / s.n_kv_heads;
        // Key row `j` holds position `first_key + j`; the last row is the last query's.
        let first_key = (s.past + seq).saturating_sub(rows);
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(hd).enumerate().for_each(|(at, o)| {
            let (i, h) = (at / s.n_heads, at % s.n_heads);
            let qp = s.past + i;
            // Keys not after the query, and inside the window.
            let hi = if s.causal {
                (qp + 1).saturating_sub(first_key).min(rows)
            } else {
                rows
            };
            let lo = s
                .window
                .map_or(0, |w| (qp + 1).saturating_sub(w).saturating_sub(first_key))
                .min(hi);
            let col = h / group * hd;
            // SAFETY: the caller's CPU has AVX2, FMA and F16C; rows are `kw` wide.
            unsafe {
                head(
                    &q[i * qw + h * hd..i * qw + (h + 1) * hd],
                    k,
                    v,
                    kw,
                    col,
                    (lo, hi),
                    s.scale,
                    o,
                )
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention in f64 from its definition: query `i` (position `past + i`) sees the
    /// keys at positions not after it and, with a window `w`, within `w` of it.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape) -> Vec<f32> {
        let hd = s.head_dim;
        let (qw, kw) = (s.n_heads * hd, s.n_kv_heads * hd);
        let (seq, rows) = (q.len() / qw, k.len() / kw);
        let first = s.past + seq - rows;
        let mut out = vec![0f32; q.len()];
        for i in 0..seq {
            let qp = s.past + i;
            for h in 0..s.n_heads {
                let g = h / (s.n_heads / s.n_kv_heads);
                let keys: Vec<usize> = (0..rows)
                    .filter(|&j| {
                        !s.causal
                            || (first + j <= qp && s.window.is_none_or(|w| qp - (first + j) < w))
                    })
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|c| q[i * qw + h * hd + c] as f64 * k[j * kw + g * hd + c] as f64)
                            .sum::<f64>()
                            * s.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for c in 0..hd {
                    let o: f64 = keys
                        .iter()
                        .zip(&e)
                        .map(|(&j, p)| p * v[j * kw + g * hd + c] as f64)
                        .sum();
                    out[i * qw + h * hd + c] = (o / total) as f32;
                }
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exp_is_within_two_ulps_of_exp() {
        assert!(
            features().avx2_fma_f16c,
            "this test checks the AVX2 + FMA exp, and this CPU has neither"
        );
        let mut x = -90.0f32;
        while x <= 89.0 {
            let got = unsafe { avx2::exp8_lanes([x; 8]) }[0];
            let want = (x as f64).exp();
            if (-87.3..=88.3).contains(&x) {
                let ulp = (want as f32).abs() * f32::EPSILON;
                assert!(
                    ((got as f64) - want).abs() <= 2.0 * ulp as f64,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(got.is_finite() && got >= 0.0, "exp({x}) = {got}");
            }
            x += 0.0123;
        }
    }

    #[test]
    fn host_attention_matches_its_definition() {
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        // Decode (one query) and prefill; grouped and plain heads; head sizes with and
        // without a tail past the SIMD width; with and without a window.
        // Bidirectional (an encoder's whole input in one step) too.
        for (seq, rows, n_heads, n_kv_heads, head_dim, window, causal) in [
            (1, 1, 3, 1, 64, None, true),
            (1, 130, 9, 3, 64, None, true),
            (1, 77, 4, 4, 36, Some(5), true),
            (1, 9, 2, 1, 136, Some(20), true),
            (5, 12, 6, 2, 40, None, true),
            (4, 4, 2, 2, 16, Some(2), true),
            (7, 7, 12, 12, 32, None, false),
            (1, 1, 2, 2, 8, None, false),
        ] {
            let s = AttentionShape {
                n_heads,
                n_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                window,
                past: rows - seq,
                causal,
            };
            let q: Vec<f32> = (0..seq * n_heads * head_dim)
                .map(|_| 3.0 * rand())
                .collect();
            let k: Vec<f32> = (0..rows * n_kv_heads * head_dim).map(|_| rand()).collect();
            let v: Vec<f32> = (0..rows * n_kv_heads * head_dim).map(|_| rand()).collect();
            // f32 keys and values, and the f16 of a half-size cache (against the
            // definition on the same rounded values).
            let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
                k.iter().map(|&x| half::f16::from_f32(x)).collect(),
                v.iter().map(|&x| half::f16::from_f32(x)).collect(),
            );
            let (kr, vr): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            for (what, got, want) in [
                (
                    "f32",
                    attention(&q, KvRows::F32(&k), KvRows::F32(&v), &s),
                    reference(&q, &k, &v, &s),
                ),
                (
                    "f16",
                    attention(&q, KvRows::F16(&k16), KvRows::F16(&v16), &s),
                    reference(&q, &kr, &vr, &s),
                ),
            ] {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5,
                        "{what} seq {seq} rows {rows} heads {n_heads}/{n_kv_heads} hd {head_dim} window {window:?} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
