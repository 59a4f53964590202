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
unsafe fn q4<const BYTES: usize, const R: usize>(row: &[u8], a: &QActs, t: usize, out: &mut [f32]) {
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

/// One Q4_K row, or with `FIVE` one Q5_K row: each value's fifth bit taken from the
/// 32 bytes before the nibbles (bit `j` of byte `l` for value `l` of sub-block `j`).
#[inline(always)]
unsafe fn q4_k<const FIVE: bool>(row: &[u8], a: &QActs, t: usize) -> f32 {
    let (bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    // One accumulator per nibble half, so neighbouring sub-blocks do not wait on
    // each other's multiply-add.
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut mins = 0f32;
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let base = t * a.cols / QK;
    for sb in 0..row.len() / bytes {
        let blk = row.as_ptr().add(sb * bytes);
        let (d, dmin) = f16x2(blk);
        let scales = std::slice::from_raw_parts(blk.add(4), 12);
        let mut qh = if FIVE {
            _mm256_loadu_si256(blk.add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        for c in 0..4 {
            let v = _mm256_loadu_si256(blk.add(qs_at + 32 * c) as *const __m256i);
            let mut halves = [
                _mm256_and_si256(v, m4),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
            ];
            if FIVE {
                // Bits 0 and 1 of each byte are this chunk's two sub-blocks; the
                // shift after each chunk brings the next two down.
                let fifth = [
                    _mm256_slli_epi16(_mm256_and_si256(qh, one), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4),
                ];
                qh = _mm256_srli_epi16(qh, 2);
                halves = [
                    _mm256_or_si256(halves[0], fifth[0]),
                    _mm256_or_si256(halves[1], fifth[1]),
                ];
            }
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
                acc[k & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(p), acc[k & 1]);
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
    |r, a, t, o: &mut [f32]| q4_k_n::<false>(r, a, t, o),
    |r, a, t, o: &mut [f32]| q4_k_n::<false>(r, a, t, o)
);
rows!(
    rows_q5_k,
    |r, a, t, o: &mut [f32]| q4_k_n::<true>(r, a, t, o),
    |r, a, t, o: &mut [f32]| q4_k_n::<true>(r, a, t, o)
);
rows!(
    rows_q6_k,
    |r, a, t, o: &mut [f32]| q6_k_n(r, a, t, o),
    |r, a, t, o: &mut [f32]| q6_k_n(r, a, t, o)
);

/// `q4_k` (Q5_K with `FIVE`) for activation rows `t..t + out.len()`.
#[inline(always)]
unsafe fn q4_k_n<const FIVE: bool>(row: &[u8], a: &QActs, t: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = q4_k::<FIVE>(row, a, t + j);
    }
}

#[inline(always)]
unsafe fn q6_k_n(row: &[u8], a: &QActs, t: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = q6_k(row, a, t + j);
    }
}
