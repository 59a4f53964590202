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

fn dot_q4_k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (sb, blk) in w.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let scales = &blk[4..16];
        for (c, q) in blk[16..144].chunks_exact(32).enumerate() {
            for (half, shift) in [(0, 0), (1, 4)] {
                let j = 2 * c + half;
                let (sc, mn) = k4_scale_min(j, scales);
                let ab = sb * 8 + j;
                let x = &a.qs[ab * QK..(ab + 1) * QK];
                let isum: i32 = q
                    .iter()
                    .zip(x)
                    .map(|(&q, &x)| ((q >> shift) & 0x0F) as i32 * x as i32)
                    .sum();
                acc += d * sc as f32 * a.d[ab] * isum as f32 - dmin * mn as f32 * a.s[ab];
            }
        }
    }
    acc
}

fn dot_q5_k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (sb, blk) in w.chunks_exact(176).enumerate() {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let scales = &blk[4..16];
        let qh = &blk[16..48];
        for (c, q) in blk[48..176].chunks_exact(32).enumerate() {
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
pub(crate) mod avx2 {
    //! The same dot products with AVX2: 32 `u8 x i8` products per instruction
    //! (`maddubs`), summed to i32 lanes, scaled in f32 once per block. Q4_0, Q4_1 and
    //! Q8_0 rows meet four activation rows at a time, so each weight block is loaded
    //! and unpacked once per four (prefill); K-quant rows meet one at a time.
    use std::arch::x86_64::*;

    use super::{QActs, QK};

    /// The sum of the eight lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Two f16 values at `p` (little-endian, back to back) as f32.
    #[inline(always)]
    unsafe fn f16x2(p: *const u8) -> (f32, f32) {
        let bits = std::ptr::read_unaligned(p as *const i32);
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
    }

    /// The f16 at `p`, read as the first of two (at least four bytes must be readable
    /// there): a four-byte load goes straight into a vector register, which made the
    /// Q5_0 row kernel 1.9x faster than widening a two-byte load through a general
    /// register.
    #[inline(always)]
    unsafe fn f16_first(p: *const u8) -> f32 {
        f16x2(p).0
    }

    /// The f16 at `p`, reading only those two bytes.
    #[inline(always)]
    unsafe fn f16x1(p: *const u8) -> f32 {
        let bits = std::ptr::read_unaligned(p as *const u16) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// 16 bytes of nibbles as 32 bytes: low nibbles first (values 0..16), then high.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, m);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    /// Sums of `u * s` in 8 i32 lanes (each lane: four neighbouring products).
    #[inline(always)]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// Activation block `i` (row-major over rows and blocks).
    #[inline(always)]
    unsafe fn act(a: &QActs, i: usize) -> __m256i {
        _mm256_loadu_si256(a.qs.as_ptr().add(i * QK) as *const __m256i)
    }

    /// 32 bits at `p` as 32 bytes: `0x10` where bit `i` is set, for byte `i`.
    #[inline(always)]
    pub(crate) unsafe fn high_bits(p: *const u8) -> __m256i {
        let bits = std::ptr::read_unaligned(p as *const i32);
        // Byte i takes byte i / 8 of the bits (each 128-bit lane holds all four)...
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        // ...and keeps bit i % 8: with every other bit set, it is all ones iff that
        // bit is.
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Adds weight block `b` of a row of unsigned blocks times activation rows
    /// `t..t + R` to `acc` and `off`: Q4_0 (`BYTES` 18), Q4_1 (20), Q5_0 (22) or Q5_1
    /// (24). They differ in the offset, `m` stored (Q4_1, Q5_1) or `-8 d` / `-16 d`,
    /// and in Q5's fifth bit.
    #[inline(always)]
    unsafe fn q4_block<const BYTES: usize, const R: usize>(
        row: &[u8],
        a: &QActs,
        t: usize,
        b: usize,
        acc: &mut [__m256; R],
        off: &mut [f32; R],
    ) {
        let nb = a.cols / QK;
        let blk = row.as_ptr().add(b * BYTES);
        let (wd, wm) = match BYTES {
            20 | 24 => f16x2(blk),
            22 => {
                let d = f16_first(blk);
                (d, -16.0 * d)
            }
            _ => {
                let d = f16_first(blk);
                (d, -8.0 * d)
            }
        };
        let q = nibbles(blk.add(BYTES - 16));
        let q = if BYTES >= 22 {
            _mm256_or_si256(q, high_bits(blk.add(BYTES - 20)))
        } else {
            q
        };
        for j in 0..R {
            let i = (t + j) * nb + b;
            let p = _mm256_cvtepi32_ps(dot_u8_i8(q, act(a, i)));
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(wd * *a.d.as_ptr().add(i)), p, acc[j]);
            off[j] += wm * *a.s.as_ptr().add(i);
        }
    }

    /// One Q4_1 / Q5_0 / Q5_1 row with activation rows `t..t + R`. Even and odd blocks
    /// go to separate accumulators, so consecutive blocks do not wait on each other's
    /// multiply-add (its latency, not the arithmetic, bounds a single chain).
    #[inline(always)]
    unsafe fn q4<const BYTES: usize, const R: usize>(
        row: &[u8],
        a: &QActs,
        t: usize,
        out: &mut [f32],
    ) {
        let nb = a.cols / QK;
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        let (mut off0, mut off1) = ([0f32; R], [0f32; R]);
        let mut b = 0;
        while b + 2 <= nb {
            q4_block::<BYTES, R>(row, a, t, b, &mut acc0, &mut off0);
            q4_block::<BYTES, R>(row, a, t, b + 1, &mut acc1, &mut off1);
            b += 2;
        }
        if b < nb {
            q4_block::<BYTES, R>(row, a, t, b, &mut acc0, &mut off0);
        }
        for j in 0..R {
            out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j])) + (off0[j] + off1[j]);
        }
    }

    /// Adds weight block `b` of a row of signed blocks times activation rows `t..t + R`
    /// to `acc`: Q8_0 (`BYTES` 34, int8 values) or Q4_0 (18, nibbles taken as `q - 8`,
    /// so it needs no offset term).
    #[inline(always)]
    unsafe fn signed_block<const BYTES: usize, const R: usize>(
        row: &[u8],
        a: &QActs,
        t: usize,
        b: usize,
        acc: &mut [__m256; R],
    ) {
        let nb = a.cols / QK;
        let blk = row.as_ptr().add(b * BYTES);
        let wd = f16_first(blk);
        let q = if BYTES == 34 {
            _mm256_loadu_si256(blk.add(2) as *const __m256i)
        } else {
            _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8))
        };
        // i8 x i8 through the u8 x i8 instruction: |q| times x with q's sign.
        let aq = _mm256_abs_epi8(q);
        for (j, acc) in acc.iter_mut().enumerate() {
            let i = (t + j) * nb + b;
            let p = dot_u8_i8(aq, _mm256_sign_epi8(act(a, i), q));
            let scale = _mm256_set1_ps(wd * *a.d.as_ptr().add(i));
            *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), *acc);
        }
    }

    /// One Q8_0 or Q4_0 row with activation rows `t..t + R`, even and odd blocks in
    /// separate accumulators as in `q4`.
    #[inline(always)]
    unsafe fn signed<const BYTES: usize, const R: usize>(
        row: &[u8],
        a: &QActs,
        t: usize,
        out: &mut [f32],
    ) {
        let nb = a.cols / QK;
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        let mut b = 0;
        while b + 2 <= nb {
            signed_block::<BYTES, R>(row, a, t, b, &mut acc0);
            signed_block::<BYTES, R>(row, a, t, b + 1, &mut acc1);
            b += 2;
        }
        if b < nb {
            signed_block::<BYTES, R>(row, a, t, b, &mut acc0);
        }
        for j in 0..R {
            out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j]));
        }
    }

    #[inline(always)]
    unsafe fn q4_k(row: &[u8], a: &QActs, t: usize) -> f32 {
        // One accumulator per nibble half, so neighbouring sub-blocks do not wait on
        // each other's multiply-add.
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut mins = 0f32;
        let m4 = _mm256_set1_epi8(0x0F);
        let base = t * a.cols / QK;
        for sb in 0..row.len() / 144 {
            let blk = row.as_ptr().add(sb * 144);
            let (d, dmin) = f16x2(blk);
            let scales = std::slice::from_raw_parts(blk.add(4), 12);
            for c in 0..4 {
                let v = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                let halves = [
                    _mm256_and_si256(v, m4),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                ];
                for (half, q) in halves.into_iter().enumerate() {
                    let j = 2 * c + half;
                    let (sc, mn) = super::k4_scale_min(j, scales);
                    let i = base + sb * 8 + j;
                    let p16 = _mm256_maddubs_epi16(q, act(a, i));
                    let p = _mm256_madd_epi16(p16, _mm256_set1_epi16(sc as i16));
                    let dd = _mm256_set1_ps(d * *a.d.get_unchecked(i));
                    acc[half] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc[half]);
                    mins += dmin * mn as f32 * *a.s.get_unchecked(i);
                }
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) - mins
    }

    /// As `q4_k`, each value's fifth bit taken from the 32 bytes before the nibbles:
    /// bit `j` of byte `l` for value `l` of sub-block `j`.
    #[inline(always)]
    unsafe fn q5_k(row: &[u8], a: &QActs, t: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut mins = 0f32;
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let base = t * a.cols / QK;
        for sb in 0..row.len() / 176 {
            let blk = row.as_ptr().add(sb * 176);
            let (d, dmin) = f16x2(blk);
            let scales = std::slice::from_raw_parts(blk.add(4), 12);
            let mut qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
            for c in 0..4 {
                let v = _mm256_loadu_si256(blk.add(48 + 32 * c) as *const __m256i);
                // Bits 0 and 1 of each byte are this chunk's two sub-blocks; the
                // shift after each chunk brings the next two down.
                let fifth = [
                    _mm256_slli_epi16(_mm256_and_si256(qh, one), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4),
                ];
                qh = _mm256_srli_epi16(qh, 2);
                let halves = [
                    _mm256_or_si256(_mm256_and_si256(v, m4), fifth[0]),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), fifth[1]),
                ];
                for (half, q) in halves.into_iter().enumerate() {
                    let j = 2 * c + half;
                    let (sc, mn) = super::k4_scale_min(j, scales);
                    let i = base + sb * 8 + j;
                    let p16 = _mm256_maddubs_epi16(q, act(a, i));
                    let p = _mm256_madd_epi16(p16, _mm256_set1_epi16(sc as i16));
                    let dd = _mm256_set1_ps(d * *a.d.get_unchecked(i));
                    acc[half] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc[half]);
                    mins += dmin * mn as f32 * *a.s.get_unchecked(i);
                }
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) - mins
    }

    #[inline(always)]
    unsafe fn q6_k(row: &[u8], a: &QActs, t: usize) -> f32 {
        // Two accumulators (even and odd quarters), as in `q4_k`.
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut offsets = 0f32;
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let base = t * a.cols / QK;
        for sb in 0..row.len() / 210 {
            let blk = row.as_ptr().add(sb * 210);
            let d = f16x1(blk.add(208));
            for h in 0..2 {
                let ql = [
                    _mm256_loadu_si256(blk.add(64 * h) as *const __m256i),
                    _mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i),
                ];
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
                let sc = blk.add(192 + 8 * h) as *const i8;
                for k in 0..4 {
                    let low = if k < 2 {
                        _mm256_and_si256(ql[k], m4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(ql[k - 2], 4), m4)
                    };
                    let high = match k {
                        0 => _mm256_and_si256(qh, m2),
                        1 => _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                        2 => _mm256_and_si256(_mm256_srli_epi16(qh, 4), m2),
                        _ => _mm256_and_si256(_mm256_srli_epi16(qh, 6), m2),
                    };
                    let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4)); // 0..64
                    let i = base + sb * 8 + 4 * h + k;
                    let (s0, s1) = (*sc.add(2 * k) as i16, *sc.add(2 * k + 1) as i16);
                    // Products of the first 16 values land in the low 8 i16 lanes.
                    let scale = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, act(a, i)), scale);
                    let dd = d * *a.d.get_unchecked(i);
                    acc[k & 1] =
                        _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(p), acc[k & 1]);
                    let h = a.h.get_unchecked(2 * i..2 * i + 2);
                    offsets += dd * (32 * (s0 as i32 * h[0] + s1 as i32 * h[1])) as f32;
                }
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) - offsets
    }

    /// Every weight row of `w` with every activation row: four activation rows at a
    /// time through `$four`, the rest one by one through `$one`.
    macro_rules! rows {
        ($name:ident, $four:expr, $one:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(w: &[u8], row_bytes: usize, a: &QActs, out: &mut [f32]) {
                let n = a.n;
                for (row, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
                    let mut t = 0;
                    while t + 4 <= n {
                        $four(row, a, t, &mut o[t..t + 4]);
                        t += 4;
                    }
                    while t < n {
                        $one(row, a, t, &mut o[t..t + 1]);
                        t += 1;
                    }
                }
            }
        };
    }

    rows!(rows_q4_0, signed::<18, 4>, signed::<18, 1>);
    rows!(rows_q4_1, q4::<20, 4>, q4::<20, 1>);
    rows!(rows_q5_0, q4::<22, 4>, q4::<22, 1>);
    rows!(rows_q5_1, q4::<24, 4>, q4::<24, 1>);
    rows!(rows_q8_0, signed::<34, 4>, signed::<34, 1>);
    rows!(
        rows_q4_k,
        |r, a, t, o: &mut [f32]| q4_k_n(r, a, t, o),
        |r, a, t, o: &mut [f32]| q4_k_n(r, a, t, o)
    );
    rows!(
        rows_q5_k,
        |r, a, t, o: &mut [f32]| q5_k_n(r, a, t, o),
        |r, a, t, o: &mut [f32]| q5_k_n(r, a, t, o)
    );
    rows!(
        rows_q6_k,
        |r, a, t, o: &mut [f32]| q6_k_n(r, a, t, o),
        |r, a, t, o: &mut [f32]| q6_k_n(r, a, t, o)
    );

    #[inline(always)]
    unsafe fn q4_k_n(row: &[u8], a: &QActs, t: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = q4_k(row, a, t + j);
        }
    }

    #[inline(always)]
    unsafe fn q5_k_n(row: &[u8], a: &QActs, t: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = q5_k(row, a, t + j);
        }
    }

    #[inline(always)]
    unsafe fn q6_k_n(row: &[u8], a: &QActs, t: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = q6_k(row, a, t + j);
        }
    }
}

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
        GgmlType::Q4K => |w, rb, a, o| rows_portable(dot_q4_k, w, rb, a, o),
        GgmlType::Q5K => |w, rb, a, o| rows_portable(dot_q5_k, w, rb, a, o),
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
