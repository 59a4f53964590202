//! Attention tiles written out in AVX2 + FMA (+ F16C for an f16 cache). The compiler's
//! version of the plain loops keeps each dot product in one chain of dependent adds and
//! re-reads the output row from memory per key; here dot products run four keys at a
//! time in independent FMA chains, exponentials eight at a time, and each row's block
//! of weighted values stays in registers over 64-value slices of the head.
use std::arch::x86_64::*;

use half::f16;

use super::{key_blocks, normalize, BlockQ4_0, BlockQ8_0, Geometry, Row, Source, KEY_BLOCK};
use super::{KvBlock, KV_BLOCK};
use crate::quant::kernels::avx2::hsum;

/// What a tile reads keys and values as: f32 or f16 elements, or blocks of a
/// quantized cache. A row of keys or values is a run of `Self` from a pointer.
pub(super) trait Kv: Copy + Sync {
    /// The first element of the values from value `col` on of the row at `row`.
    ///
    /// # Safety
    /// `col` is inside the row (for blocks, a multiple of [`KV_BLOCK`]).
    unsafe fn at(row: *const Self, col: usize) -> *const Self;

    /// [`scores`] for these elements.
    ///
    /// # Safety
    /// As [`tile`]'s: the CPU has AVX2, FMA and F16C, and every key of `a..e` is
    /// readable through `key` for the `hd` values of a head.
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores<const R: usize>(
        q: [*const f32; R],
        hd: usize,
        scale: f32,
        ae: (usize, usize),
        base: usize,
        key: &impl Fn(usize) -> *const Self,
        p: [&mut [f32; KEY_BLOCK]; R],
    ) -> [f32; R];

    /// [`weighted`] for these elements.
    ///
    /// # Safety
    /// As [`Kv::scores`], for values and outputs of `hd` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted<const R: usize>(
        hd: usize,
        ae: (usize, usize),
        base: usize,
        value: &impl Fn(usize) -> *const Self,
        p: [&[f32; KEY_BLOCK]; R],
        alpha: [f32; R],
        o: [*mut f32; R],
    );
}

/// [`Kv`] for f32 and f16 elements: [`scores`] and [`weighted`].
macro_rules! kv_elements {
    ($t:ty) => {
        impl Kv for $t {
            #[inline(always)]
            unsafe fn at(row: *const Self, col: usize) -> *const Self {
                row.add(col)
            }

            #[inline(always)]
            unsafe fn scores<const R: usize>(
                q: [*const f32; R],
                hd: usize,
                scale: f32,
                ae: (usize, usize),
                base: usize,
                key: &impl Fn(usize) -> *const Self,
                p: [&mut [f32; KEY_BLOCK]; R],
            ) -> [f32; R] {
                scores::<Self, R>(q, hd, scale, ae, base, key, p)
            }

            #[inline(always)]
            unsafe fn weighted<const R: usize>(
                hd: usize,
                ae: (usize, usize),
                base: usize,
                value: &impl Fn(usize) -> *const Self,
                p: [&[f32; KEY_BLOCK]; R],
                alpha: [f32; R],
                o: [*mut f32; R],
            ) {
                // Eight registers of sums in all: four per row for two rows.
                if R == 2 {
                    weighted::<Self, R, 4>(hd, ae, base, value, p, alpha, o)
                } else {
                    weighted::<Self, R, 8>(hd, ae, base, value, p, alpha, o)
                }
            }
        }
    };
}

kv_elements!(f32);
kv_elements!(f16);

/// A block of a quantized cache, as four registers of its 32 values before scaling,
/// and its scale.
pub(super) trait Block: KvBlock {
    /// # Safety
    /// A whole block is readable at `p`; the CPU has AVX2 and F16C.
    unsafe fn load32(p: *const Self) -> ([__m256; 4], f32);
}

/// An f16 scale as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_f32(d: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d.to_bits() as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32_q8_0(p: *const BlockQ8_0) -> ([__m256; 4], f32) {
    let qs = (*p).qs.as_ptr();
    let mut x = [_mm256_setzero_ps(); 4];
    for (i, x) in x.iter_mut().enumerate() {
        let q = _mm_loadl_epi64(qs.add(8 * i).cast());
        *x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
    (x, scale_f32((*p).d))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32_q4_0(p: *const BlockQ4_0) -> ([__m256; 4], f32) {
    let bytes = _mm_loadu_si128((*p).qs.as_ptr().cast());
    let (nibble, eight) = (_mm_set1_epi8(15), _mm_set1_epi8(8));
    // Values 0..16 in the low nibbles, 16..32 in the high ones; each less 8.
    let lo = _mm_sub_epi8(_mm_and_si128(bytes, nibble), eight);
    let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), eight);
    let x = [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
    ];
    (x, scale_f32((*p).d))
}

impl Block for BlockQ8_0 {
    #[inline(always)]
    unsafe fn load32(p: *const Self) -> ([__m256; 4], f32) {
        load32_q8_0(p)
    }
}

impl Block for BlockQ4_0 {
    #[inline(always)]
    unsafe fn load32(p: *const Self) -> ([__m256; 4], f32) {
        load32_q4_0(p)
    }
}

/// [`Kv`] for blocks: [`scores_blocks`] and [`weighted_blocks`].
macro_rules! kv_blocks {
    ($t:ty) => {
        impl Kv for $t {
            #[inline(always)]
            unsafe fn at(row: *const Self, col: usize) -> *const Self {
                row.add(col / KV_BLOCK)
            }

            #[inline(always)]
            unsafe fn scores<const R: usize>(
                q: [*const f32; R],
                hd: usize,
                scale: f32,
                ae: (usize, usize),
                base: usize,
                key: &impl Fn(usize) -> *const Self,
                p: [&mut [f32; KEY_BLOCK]; R],
            ) -> [f32; R] {
                scores_blocks::<Self, R>(q, hd, scale, ae, base, key, p)
            }

            #[inline(always)]
            unsafe fn weighted<const R: usize>(
                hd: usize,
                ae: (usize, usize),
                base: usize,
                value: &impl Fn(usize) -> *const Self,
                p: [&[f32; KEY_BLOCK]; R],
                alpha: [f32; R],
                o: [*mut f32; R],
            ) {
                weighted_blocks::<Self, R>(hd, ae, base, value, p, alpha, o)
            }
        }
    };
}

kv_blocks!(BlockQ8_0);
kv_blocks!(BlockQ4_0);

/// A key or value element: eight of them into a register, one into an f32.
pub(super) trait Elem: Copy + Sync {
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
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
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
pub(super) unsafe fn exp8_lanes(x: [f32; 8]) -> [f32; 8] {
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr())));
    out
}

/// The lane sums of four registers, as the four lanes of one. Each lane's sum is
/// taken in the same order, so a key's score does not depend on its place in a group.
#[inline(always)]
unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
    // Pairwise adds leave [a0+a1, a2+a3, b0+b1, b2+b3 | ...] per 128-bit half, twice
    // over; the two halves then add up to the four totals.
    let ab = _mm256_hadd_ps(v[0], v[1]);
    let cd = _mm256_hadd_ps(v[2], v[3]);
    let abcd = _mm256_hadd_ps(ab, cd);
    _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
}

/// One tile (see the module of [`super::attention`]): for each key block, each row's
/// scores, running maximum and sum, and output; then each output divided by its sum.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C. `k` and `v` hold whole key rows of `g.kw`
/// values for every position of every row's `lo..hi`; `q` holds the rows' queries and
/// `out` is `rows.len() * g.hd` long.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<T: Kv, S: Source<T>>(
    q: &[f32],
    k: &S,
    v: &S,
    g: &Geometry,
    rows: &[Row],
    out: &mut [f32],
) {
    let hd = g.hd;
    debug_assert_eq!(out.len(), rows.len() * hd);
    debug_assert!(rows
        .iter()
        .all(|r| r.lo >= g.first_key && r.hi <= k.end().min(v.end())));
    let mut max = vec![f32::NEG_INFINITY; rows.len()];
    let mut sum = vec![0f32; rows.len()];
    let mut p = [[0f32; KEY_BLOCK]; 2];
    for b in key_blocks(rows) {
        let base = b * KEY_BLOCK;
        let mut r = 0;
        while r < rows.len() {
            let row = rows[r];
            let col = g.col(row.h);
            // Two rows that see the same keys (query heads of one KV head at one
            // position) go together: each key and value loaded serves both.
            let n = match rows.get(r + 1) {
                Some(x) if (x.lo, x.hi) == (row.lo, row.hi) && g.col(x.h) == col => 2,
                _ => 1,
            };
            let (a, e) = (row.lo.max(base), row.hi.min(base + KEY_BLOCK));
            if a < e {
                // SAFETY (of both): positions `a..e` are inside the row's keys.
                let key = |pos: usize| T::at(k.row(pos), col);
                let value = |pos: usize| T::at(v.row(pos), col);
                let query = |x: &Row| q.as_ptr().add(x.i * g.qw + x.h * hd);
                let [p0, p1] = &mut p;
                let maxes = if n == 2 {
                    let q = [query(&row), query(&rows[r + 1])];
                    T::scores::<2>(q, hd, g.scale, (a, e), base, &key, [p0, p1])
                } else {
                    let [m] = T::scores::<1>([query(&row)], hd, g.scale, (a, e), base, &key, [p0]);
                    [m, f32::NEG_INFINITY]
                };
                let mut alpha = [1f32; 2];
                for u in 0..n {
                    let m = max[r + u].max(maxes[u]);
                    alpha[u] = (max[r + u] - m).exp();
                    max[r + u] = m;
                    sum[r + u] = sum[r + u] * alpha[u] + exps(&mut p[u], m, (a - base, e - base));
                }
                let o = out.as_mut_ptr().add(r * hd);
                let [p0, p1] = &p;
                if n == 2 {
                    T::weighted::<2>(hd, (a, e), base, &value, [p0, p1], alpha, [o, o.add(hd)]);
                } else {
                    T::weighted::<1>(hd, (a, e), base, &value, [p0], [alpha[0]], [o]);
                }
            }
            r += n;
        }
    }
    normalize(out, &sum, hd);
}

/// The scores of `R` query rows for keys `a..e` (positions) into `p[row][pos - base]`,
/// four keys at a time in groups aligned to the block (a group's keys outside `a..e`
/// read key `a` and are dropped); returns each row's maximum. A row's scores are the
/// same bits for any `R`: each (row, key) pair has its own chain of FMAs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores<T: Elem, const R: usize>(
    q: [*const f32; R],
    hd: usize,
    scale: f32,
    (a, e): (usize, usize),
    base: usize,
    key: &impl Fn(usize) -> *const T,
    p: [&mut [f32; KEY_BLOCK]; R],
) -> [f32; R] {
    let mut at = base + (a - base) / 4 * 4;
    while at < e {
        let keys = [0, 1, 2, 3].map(|u| {
            let pos = at + u;
            key(if (a..e).contains(&pos) { pos } else { a })
        });
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut c = 0;
        while c + 8 <= hd {
            // (Loops, not `map`: a closure would not inline into this feature set.)
            let mut kv = [_mm256_setzero_ps(); 4];
            for (kv, kp) in kv.iter_mut().zip(keys) {
                *kv = T::load8(kp.add(c));
            }
            for (acc, q) in acc.iter_mut().zip(q) {
                let qv = _mm256_loadu_ps(q.add(c));
                for (acc, kv) in acc.iter_mut().zip(kv) {
                    *acc = _mm256_fmadd_ps(qv, kv, *acc);
                }
            }
            c += 8;
        }
        for (r, acc) in acc.into_iter().enumerate() {
            let sums = hsum4(acc);
            if c == hd {
                // No tail: the four scores go in as they are (a group's lanes outside
                // `a..e` too; the maximum and the exponentials skip them).
                let x = _mm_mul_ps(sums, _mm_set1_ps(scale));
                _mm_storeu_ps(p[r].as_mut_ptr().add(at - base), x);
                continue;
            }
            let mut lanes = [0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), sums);
            for (u, (sum, kp)) in lanes.into_iter().zip(keys).enumerate() {
                let pos = at + u;
                if (a..e).contains(&pos) {
                    let tail: f32 = (c..hd).map(|c| *q[r].add(c) * (*kp.add(c)).get()).sum();
                    p[r][pos - base] = (sum + tail) * scale;
                }
            }
        }
        at += 4;
    }
    p.map(|p| {
        p[a - base..e - base]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    })
}

/// `p[i] = e^(p[i] - m)` for `i` in `a..e` (offsets in the block), eight at a time in
/// groups aligned to the block with the lanes outside `a..e` set to 0; returns their
/// sum (the groups' registers added in order, then across lanes).
#[inline(always)]
unsafe fn exps(p: &mut [f32; KEY_BLOCK], m: f32, (a, e): (usize, usize)) -> f32 {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let (lo, hi) = (_mm256_set1_epi32(a as i32 - 1), _mm256_set1_epi32(e as i32));
    let mut total = _mm256_setzero_ps();
    let mut at = a / 8 * 8;
    while at < e {
        let idx = _mm256_add_epi32(lanes, _mm256_set1_epi32(at as i32));
        let inside = _mm256_and_si256(_mm256_cmpgt_epi32(idx, lo), _mm256_cmpgt_epi32(hi, idx));
        let x = exp8(_mm256_sub_ps(
            _mm256_loadu_ps(p.as_ptr().add(at)),
            _mm256_set1_ps(m),
        ));
        let x = _mm256_and_ps(x, _mm256_castsi256_ps(inside));
        _mm256_storeu_ps(p.as_mut_ptr().add(at), x);
        total = _mm256_add_ps(total, x);
        at += 8;
    }
    hsum(total)
}

/// `o[r] = o[r] * alpha[r] + sum of p[r][pos - base] * v[pos]` over positions `a..e`
/// for `R` rows: each block's sum in registers first (`W` registers of a row at a time,
/// `R * W` = 8; then 8 values, then one), then added to the rescaled output. A row's
/// output is the same bits for any `R`: each value's sum runs over the keys in order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted<T: Elem, const R: usize, const W: usize>(
    hd: usize,
    (a, e): (usize, usize),
    base: usize,
    value: &impl Fn(usize) -> *const T,
    p: [&[f32; KEY_BLOCK]; R],
    alpha: [f32; R],
    o: [*mut f32; R],
) {
    let step = 8 * W;
    let mut c = 0;
    while c + step <= hd {
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        for pos in a..e {
            let row = value(pos).add(c);
            let mut vs = [_mm256_setzero_ps(); W];
            for (i, v) in vs.iter_mut().enumerate() {
                *v = T::load8(row.add(8 * i));
            }
            for (acc, p) in acc.iter_mut().zip(p) {
                let w = _mm256_set1_ps(p[pos - base]);
                for (acc, v) in acc.iter_mut().zip(vs) {
                    *acc = _mm256_fmadd_ps(w, v, *acc);
                }
            }
        }
        for r in 0..R {
            let al = _mm256_set1_ps(alpha[r]);
            for (i, acc) in acc[r].iter().enumerate() {
                let at = o[r].add(c + 8 * i);
                _mm256_storeu_ps(at, _mm256_fmadd_ps(_mm256_loadu_ps(at), al, *acc));
            }
        }
        c += step;
    }
    for r in 0..R {
        let al = _mm256_set1_ps(alpha[r]);
        let mut c = c;
        while c + 8 <= hd {
            let mut acc = _mm256_setzero_ps();
            for pos in a..e {
                let w = _mm256_set1_ps(p[r][pos - base]);
                acc = _mm256_fmadd_ps(w, T::load8(value(pos).add(c)), acc);
            }
            let at = o[r].add(c);
            _mm256_storeu_ps(at, _mm256_fmadd_ps(_mm256_loadu_ps(at), al, acc));
            c += 8;
        }
        while c < hd {
            let acc: f32 = (a..e)
                .map(|pos| p[r][pos - base] * (*value(pos).add(c)).get())
                .sum();
            *o[r].add(c) = (*o[r].add(c)).mul_add(alpha[r], acc);
            c += 1;
        }
    }
}

/// [`scores`] over blocks: per key and block, the block's 32 values (as loaded, before
/// scaling) against the query's in one chain of FMAs, then times the block's scale
/// into the key's sum. Queries stay f32 (no rounding of the query, unlike a Q8_0 x
/// Q8_0 dot product). A row's scores are the same bits for any `R`.
///
/// Heads are whole blocks (`hd` a multiple of [`KV_BLOCK`]; `attention` checks).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_blocks<B: Block, const R: usize>(
    q: [*const f32; R],
    hd: usize,
    scale: f32,
    (a, e): (usize, usize),
    base: usize,
    key: &impl Fn(usize) -> *const B,
    p: [&mut [f32; KEY_BLOCK]; R],
) -> [f32; R] {
    let mut at = base + (a - base) / 4 * 4;
    while at < e {
        let keys = [0, 1, 2, 3].map(|u| {
            let pos = at + u;
            key(if (a..e).contains(&pos) { pos } else { a })
        });
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for blk in 0..hd / KV_BLOCK {
            for (u, kp) in keys.iter().enumerate() {
                let (x, d) = B::load32(kp.add(blk));
                let d = _mm256_set1_ps(d);
                for r in 0..R {
                    let qp = q[r].add(blk * KV_BLOCK);
                    let mut dot = _mm256_mul_ps(_mm256_loadu_ps(qp), x[0]);
                    for (i, x) in x.iter().enumerate().skip(1) {
                        dot = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8 * i)), *x, dot);
                    }
                    acc[r][u] = _mm256_fmadd_ps(dot, d, acc[r][u]);
                }
            }
        }
        for (r, acc) in acc.into_iter().enumerate() {
            let x = _mm_mul_ps(hsum4(acc), _mm_set1_ps(scale));
            _mm_storeu_ps(p[r].as_mut_ptr().add(at - base), x);
        }
        at += 4;
    }
    p.map(|p| {
        p[a - base..e - base]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    })
}

/// [`weighted`] over blocks: per block of the head, each key's 32 values (as loaded)
/// times its weight and the block's scale, summed over the keys in registers, then
/// added to the rescaled output. A row's output is the same bits for any `R`.
#[inline(always)]
unsafe fn weighted_blocks<B: Block, const R: usize>(
    hd: usize,
    (a, e): (usize, usize),
    base: usize,
    value: &impl Fn(usize) -> *const B,
    p: [&[f32; KEY_BLOCK]; R],
    alpha: [f32; R],
    o: [*mut f32; R],
) {
    for blk in 0..hd / KV_BLOCK {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for pos in a..e {
            let (x, d) = B::load32(value(pos).add(blk));
            for (acc, p) in acc.iter_mut().zip(p) {
                let w = _mm256_set1_ps(p[pos - base] * d);
                for (acc, x) in acc.iter_mut().zip(x) {
                    *acc = _mm256_fmadd_ps(w, x, *acc);
                }
            }
        }
        for r in 0..R {
            let al = _mm256_set1_ps(alpha[r]);
            for (i, acc) in acc[r].iter().enumerate() {
                let at = o[r].add(blk * KV_BLOCK + 8 * i);
                _mm256_storeu_ps(at, _mm256_fmadd_ps(_mm256_loadu_ps(at), al, *acc));
            }
        }
    }
}
