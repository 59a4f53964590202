//! Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K weights repacked eight rows at a time, for a
//! kernel that computes eight output rows in one SIMD register.
//!
//! Row by row, a 4-bit block's dot product ends in a horizontal sum of eight lanes, and
//! its two f16 scales are converted and applied one block at a time: about twenty
//! instructions per 20-byte block, which keeps the row kernel just under memory speed.
//! Interleaving eight rows puts row `r`'s partial sums in lane `r`: every product is
//! `u8 x i8` of eight rows' nibbles with four activation bytes broadcast to all lanes,
//! no horizontal sums, and the eight rows' scales are converted and applied with one
//! instruction each. That is about six instructions per row block.
//!
//! Layout, per group of eight rows and per block column (160 bytes, the same 20 bytes a
//! row block as Q4_1): the eight rows' scales `d` (f16), their offsets `m` (f16; Q4_0
//! stores `-8 d`, its values being `d (q - 8)`), then four chunks of 32 bytes; in chunk
//! `c`, bytes `4r..4r + 4` are row `r`'s quant bytes `4c..4c + 4`, whose low nibbles are
//! values `4c..4c + 4` and high nibbles values `16 + 4c..16 + 4c + 4` of the block.
//!
//! Q5_0 / Q5_1 (192 bytes; 176 or 192 as rows): as Q4_0 / Q4_1 (Q5_0's offset is
//! `-16 d`), then eight 32-bit masks of fifth bits, one per chunk half: mask `4h + c`
//! has bit `4r + b` set when value `16h + 4c + b` of row `r` has its fifth bit, so the
//! mask lines up with the bytes of chunk `c`'s low (`h` 0) or high (`h` 1) nibbles.
//! These are the types llama.cpp's K-quant mixes fall back to on rows that are no
//! whole number of 256-value super-blocks (Qwen2 0.5B's 896, SmolLM2's 576).
//!
//! Q8_0 (272 bytes, as rows): the eight rows' `d` (f16), then eight chunks of 32 bytes;
//! in chunk `k`, bytes `4r..4r + 4` are row `r`'s values `4k..4k + 4` plus 128, as
//! unsigned bytes (the form `u8 x i8` products take); the kernel takes `128 d sx` off.
//!
//! Q4_K, per group and 256-value super-block column (1184 bytes; 1152 as rows): the
//! eight rows' `d` and `dmin` (f16), their eight sub-block scales and minimums decoded
//! from 6 bits to one byte each (`[sub-block][row]`), then for each pair of sub-blocks
//! eight chunks of 32 bytes; in chunk `k`, bytes `4r..4r + 4` are row `r`'s bytes
//! `4k..4k + 4` of the pair's 32, whose low nibbles are values `4k..4k + 4` of the first
//! sub-block and high nibbles those of the second.
use super::format::{k4_scale_min, GgmlType};
use super::matrix::QMatrix;

/// Rows per group.
pub const GROUP: usize = 8;
/// Bytes per group and Q4_0 / Q4_1 block column.
const BLOCK: usize = 2 * 2 * GROUP + 16 * GROUP;
/// Bytes per group and Q5_0 / Q5_1 block column.
const BLOCK5: usize = BLOCK + 4 * GROUP;
/// Bytes per group and Q8_0 block column.
const BLOCK8: usize = 2 * GROUP + 32 * GROUP;
/// Bytes per group and Q4_K super-block column.
const SUPER: usize = 2 * 2 * GROUP + 2 * 8 * GROUP + 128 * GROUP;

/// Which packed layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Q4_0 or Q4_1 rows: blocks of 32 with a scale and an offset.
    Q4,
    /// Q5_0 or Q5_1 rows: as Q4, values of five bits.
    Q5,
    /// Q8_0 rows.
    Q8,
    /// Q4_K rows.
    Q4K,
}

impl Kind {
    /// Bytes per group and block (Q4) or super-block (Q4_K) column.
    fn unit(self) -> usize {
        match self {
            Kind::Q4 => BLOCK,
            Kind::Q5 => BLOCK5,
            Kind::Q8 => BLOCK8,
            Kind::Q4K => SUPER,
        }
    }
}

/// The packed copy of a [`QMatrix`] whose rows are Q4_0 / Q4_1, Q5_0 / Q5_1, Q8_0 or
/// Q4_K.
pub struct Packed {
    kind: Kind,
    /// Block (Q4) or super-block (Q4_K) columns.
    units: usize,
    bytes: Vec<u8>,
}

impl Packed {
    /// Packs `m`; `None` unless the rows are a whole number of groups and all Q4_0 /
    /// Q4_1, all Q5_0 / Q5_1, all Q8_0 or all Q4_K.
    pub fn new(m: &QMatrix) -> Option<Packed> {
        let (rows, cols) = (m.rows(), m.cols());
        if rows == 0 || !rows.is_multiple_of(GROUP) {
            return None;
        }
        let kind = match m.row(0).0 {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Kind::Q4,
            GgmlType::Q5_0 | GgmlType::Q5_1 => Kind::Q5,
            GgmlType::Q8_0 => Kind::Q8,
            GgmlType::Q4K => Kind::Q4K,
            _ => return None,
        };
        let units = match kind {
            Kind::Q4 | Kind::Q5 | Kind::Q8 => cols / 32,
            Kind::Q4K => cols / 256,
        };
        let unit = kind.unit();
        let mut bytes = vec![0u8; rows / GROUP * units * unit];
        for (g, group) in bytes.chunks_exact_mut(units * unit).enumerate() {
            for r in 0..GROUP {
                let (ty, row) = m.row(g * GROUP + r);
                let dst = group.chunks_exact_mut(unit);
                match (kind, ty) {
                    (Kind::Q4, GgmlType::Q4_0 | GgmlType::Q4_1) => pack_q4(ty, row, r, dst),
                    (Kind::Q5, GgmlType::Q5_0 | GgmlType::Q5_1) => pack_q5(ty, row, r, dst),
                    (Kind::Q8, GgmlType::Q8_0) => pack_q8(row, r, dst),
                    (Kind::Q4K, GgmlType::Q4K) => pack_q4k(row, r, dst),
                    _ => return None,
                }
            }
        }
        Some(Packed { kind, units, bytes })
    }

    /// Bytes of group `g`.
    fn group(&self, g: usize) -> &[u8] {
        let len = self.units * self.kind.unit();
        &self.bytes[g * len..(g + 1) * len]
    }
}

/// Row `r` of a group, Q4_0 or Q4_1 blocks, into the group's block columns.
fn pack_q4<'a>(ty: GgmlType, row: &[u8], r: usize, units: impl Iterator<Item = &'a mut [u8]>) {
    let (bb, qs_at) = if ty == GgmlType::Q4_1 {
        (20, 4)
    } else {
        (18, 2)
    };
    for (blk, dst) in row.chunks_exact(bb).zip(units) {
        dst[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
        let m = if ty == GgmlType::Q4_1 {
            [blk[2], blk[3]]
        } else {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]);
            (d * half::f16::from_f32(-8.0)).to_le_bytes()
        };
        dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&m);
        for c in 0..4 {
            let at = 32 + 32 * c + 4 * r;
            dst[at..at + 4].copy_from_slice(&blk[qs_at + 4 * c..qs_at + 4 * c + 4]);
        }
    }
}

/// Row `r` of a group, Q5_0 or Q5_1 blocks, into the group's block columns.
fn pack_q5<'a>(ty: GgmlType, row: &[u8], r: usize, units: impl Iterator<Item = &'a mut [u8]>) {
    let (bb, qh_at) = if ty == GgmlType::Q5_1 {
        (24, 4)
    } else {
        (22, 2)
    };
    for (blk, dst) in row.chunks_exact(bb).zip(units) {
        dst[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
        let m = if ty == GgmlType::Q5_1 {
            [blk[2], blk[3]]
        } else {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]);
            (d * half::f16::from_f32(-16.0)).to_le_bytes()
        };
        dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&m);
        let qh = u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]);
        let qs = &blk[qh_at + 4..bb];
        for c in 0..4 {
            let at = 32 + 32 * c + 4 * r;
            dst[at..at + 4].copy_from_slice(&qs[4 * c..4 * c + 4]);
            for h in 0..2 {
                // Bits 4r..4r + 4 of mask 4h + c: byte r / 2, from bit 4 (r % 2).
                let bits = (qh >> (16 * h + 4 * c)) & 0x0F;
                dst[160 + 4 * (4 * h + c) + r / 2] |= (bits << (4 * (r % 2))) as u8;
            }
        }
    }
}

/// Row `r` of a group, Q8_0 blocks, into the group's block columns.
fn pack_q8<'a>(row: &[u8], r: usize, units: impl Iterator<Item = &'a mut [u8]>) {
    for (blk, dst) in row.chunks_exact(34).zip(units) {
        dst[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
        for k in 0..8 {
            let at = 16 + 32 * k + 4 * r;
            for (d, q) in dst[at..at + 4].iter_mut().zip(&blk[2 + 4 * k..6 + 4 * k]) {
                *d = q ^ 0x80; // i8 + 128 as u8
            }
        }
    }
}

/// Row `r` of a group, Q4_K super-blocks, into the group's super-block columns.
fn pack_q4k<'a>(row: &[u8], r: usize, units: impl Iterator<Item = &'a mut [u8]>) {
    for (blk, dst) in row.chunks_exact(144).zip(units) {
        dst[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
        dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&blk[2..4]);
        for j in 0..8 {
            let (sc, mn) = k4_scale_min(j, &blk[4..16]);
            dst[32 + 8 * j + r] = sc;
            dst[96 + 8 * j + r] = mn;
        }
        for pair in 0..4 {
            for k in 0..8 {
                let at = 160 + 256 * pair + 32 * k + 4 * r;
                let from = 16 + 32 * pair + 4 * k;
                dst[at..at + 4].copy_from_slice(&blk[from..from + 4]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{Kind, Packed, BLOCK, BLOCK5, BLOCK8, GROUP, SUPER};
    use crate::features::features;
    use crate::quant::kernels::QActs;

    /// Activation bytes `at..at + 4` of block `i`, in every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast(a: &QActs, i: usize, at: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(
            a.qs.as_ptr().add(i * 32 + at) as *const i32
        ))
    }

    /// The i32 sums of one 32-value block, one row per lane: eight chunks of the eight
    /// rows' values in 0..16 (chunk `k`: four values of each row) times the activation
    /// block `i`'s bytes `4k..4k + 4`.
    pub trait BlockSum {
        unsafe fn sum(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i;

        /// As `sum`, the values in 0..32.
        #[inline(always)]
        unsafe fn sum5(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i {
            Self::sum(q, a, i)
        }

        /// As `sum`, the values in 0..256.
        #[inline(always)]
        unsafe fn sum8(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i {
            Self::sum(q, a, i)
        }
    }

    /// AVX2: `u8 x i8` pair sums in i16 (`maddubs`), widened once per block.
    pub struct Maddubs;

    impl BlockSum for Maddubs {
        #[inline(always)]
        unsafe fn sum(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i {
            // Eight pair sums per lane, each at most 2 * 15 * 127: their total fits i16.
            let mut s = _mm256_maddubs_epi16(q[0], bcast(a, i, 0));
            for (k, q) in q.iter().enumerate().skip(1) {
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*q, bcast(a, i, 4 * k)));
            }
            _mm256_madd_epi16(s, _mm256_set1_epi16(1))
        }

        #[inline(always)]
        unsafe fn sum5(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i {
            // A pair sum reaches 2 * 31 * 127: four of them fit i16, eight do not, so
            // each half of the block is widened on its own.
            let half = |h: usize| {
                let mut s = _mm256_maddubs_epi16(q[4 * h], bcast(a, i, 16 * h));
                for k in 1..4 {
                    let x = bcast(a, i, 16 * h + 4 * k);
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q[4 * h + k], x));
                }
                _mm256_madd_epi16(s, _mm256_set1_epi16(1))
            };
            _mm256_add_epi32(half(0), half(1))
        }

        #[inline(always)]
        unsafe fn sum8(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i {
            // `maddubs` would saturate on 255 x 127 pairs: multiply the signed values
            // (`u - 128`) by sign-adjusted activations, widening each chunk, and add
            // back 128 times the activations' sum.
            let flip = _mm256_set1_epi8(-128);
            let mut s = _mm256_setzero_si256();
            for (k, u) in q.iter().enumerate() {
                let v = _mm256_xor_si256(*u, flip);
                let x = _mm256_sign_epi8(bcast(a, i, 4 * k), v);
                let p = _mm256_maddubs_epi16(_mm256_abs_epi8(v), x);
                s = _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
            }
            let sum_x = *a.h.as_ptr().add(2 * i) + *a.h.as_ptr().add(2 * i + 1);
            _mm256_add_epi32(s, _mm256_set1_epi32(128 * sum_x))
        }
    }

    /// AVX-VNNI (`vpdpbusd`, VEX): four `u8 x i8` products added to an i32 lane in one
    /// instruction, in two chains.
    pub struct AvxVnni;

    impl BlockSum for AvxVnni {
        #[inline(always)]
        unsafe fn sum(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k in 0..4 {
                s0 = _mm256_dpbusd_avx_epi32(s0, q[k], bcast(a, i, 4 * k));
                s1 = _mm256_dpbusd_avx_epi32(s1, q[4 + k], bcast(a, i, 16 + 4 * k));
            }
            _mm256_add_epi32(s0, s1)
        }
    }

    /// AVX-512 VNNI on 256-bit registers (CPUs with AVX-512 but not AVX-VNNI).
    pub struct Avx512Vnni;

    impl BlockSum for Avx512Vnni {
        #[inline(always)]
        unsafe fn sum(q: &[__m256i; 8], a: &QActs, i: usize) -> __m256i {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k in 0..4 {
                s0 = _mm256_dpbusd_epi32(s0, q[k], bcast(a, i, 4 * k));
                s1 = _mm256_dpbusd_epi32(s1, q[4 + k], bcast(a, i, 16 + 4 * k));
            }
            _mm256_add_epi32(s0, s1)
        }
    }

    /// Eight f16 values at `p` as f32.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// Eight bytes at `p` as f32.
    #[inline(always)]
    unsafe fn u8x8(p: *const u8) -> __m256 {
        let v = _mm_loadl_epi64(p as *const __m128i);
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// Low and high nibbles of the 32-byte chunk at `p`.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        let v = _mm256_loadu_si256(p as *const __m256i);
        (
            _mm256_and_si256(v, m4),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
        )
    }

    /// Eight Q4_0 / Q4_1 rows (one group) times activation rows `t..t + R`.
    #[inline(always)]
    unsafe fn group_q4<S: BlockSum, const R: usize>(
        g: &[u8],
        nb: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        for b in 0..nb {
            let p = g.as_ptr().add(b * BLOCK);
            let (d, m) = (f16x8(p), f16x8(p.add(16)));
            // Low nibbles are values 0..16 of the block, high ones 16..32.
            let mut q = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                (q[c], q[4 + c]) = nibbles(p.add(32 + 32 * c));
            }
            for j in 0..R {
                let i = (t + j) * an + b;
                let s = _mm256_cvtepi32_ps(S::sum(&q, a, i));
                let dx = _mm256_set1_ps(*a.d.as_ptr().add(i));
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), s, acc[j]);
                off[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.s.as_ptr().add(i)), off[j]);
            }
        }
        let mut out = [_mm256_setzero_ps(); R];
        for j in 0..R {
            out[j] = _mm256_add_ps(acc[j], off[j]);
        }
        out
    }

    /// Eight Q5_0 / Q5_1 rows (one group) times activation rows `t..t + R`: as
    /// `group_q4`, each chunk's fifth bits or-ed in from its mask.
    #[inline(always)]
    unsafe fn group_q5<S: BlockSum, const R: usize>(
        g: &[u8],
        nb: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        use crate::quant::kernels::avx2::high_bits;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        for b in 0..nb {
            let p = g.as_ptr().add(b * BLOCK5);
            let (d, m) = (f16x8(p), f16x8(p.add(16)));
            let mut q = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let (lo, hi) = nibbles(p.add(32 + 32 * c));
                q[c] = _mm256_or_si256(lo, high_bits(p.add(160 + 4 * c)));
                q[4 + c] = _mm256_or_si256(hi, high_bits(p.add(176 + 4 * c)));
            }
            for j in 0..R {
                let i = (t + j) * an + b;
                let s = _mm256_cvtepi32_ps(S::sum5(&q, a, i));
                let dx = _mm256_set1_ps(*a.d.as_ptr().add(i));
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), s, acc[j]);
                off[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.s.as_ptr().add(i)), off[j]);
            }
        }
        let mut out = [_mm256_setzero_ps(); R];
        for j in 0..R {
            out[j] = _mm256_add_ps(acc[j], off[j]);
        }
        out
    }

    /// Eight Q8_0 rows (one group) times activation rows `t..t + R`: as `group_q4`
    /// with eight chunks of values offset by 128 and the offset `-128 d`.
    #[inline(always)]
    unsafe fn group_q8<S: BlockSum, const R: usize>(
        g: &[u8],
        nb: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        for b in 0..nb {
            let p = g.as_ptr().add(b * BLOCK8);
            let d = f16x8(p);
            let m = _mm256_mul_ps(d, _mm256_set1_ps(-128.0));
            let mut q = [_mm256_setzero_si256(); 8];
            for (k, q) in q.iter_mut().enumerate() {
                *q = _mm256_loadu_si256(p.add(16 + 32 * k) as *const __m256i);
            }
            for j in 0..R {
                let i = (t + j) * an + b;
                let s = _mm256_cvtepi32_ps(S::sum8(&q, a, i));
                let dx = _mm256_set1_ps(*a.d.as_ptr().add(i));
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), s, acc[j]);
                off[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.s.as_ptr().add(i)), off[j]);
            }
        }
        let mut out = [_mm256_setzero_ps(); R];
        for j in 0..R {
            out[j] = _mm256_add_ps(acc[j], off[j]);
        }
        out
    }

    /// Eight Q4_K rows (one group) times activation rows `t..t + R`: per 32-value
    /// sub-block `d sc dx sum(q qx) - dmin mn sx`.
    #[inline(always)]
    unsafe fn group_q4k<S: BlockSum, const R: usize>(
        g: &[u8],
        units: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        for sb in 0..units {
            let p = g.as_ptr().add(sb * SUPER);
            let (d, dmin) = (f16x8(p), f16x8(p.add(16)));
            for pair in 0..4 {
                let mut lo = [_mm256_setzero_si256(); 8];
                let mut hi = [_mm256_setzero_si256(); 8];
                for k in 0..8 {
                    (lo[k], hi[k]) = nibbles(p.add(160 + 256 * pair + 32 * k));
                }
                for (half, q) in [lo, hi].iter().enumerate() {
                    let sub = 2 * pair + half;
                    let scale = _mm256_mul_ps(d, u8x8(p.add(32 + 8 * sub)));
                    let min = _mm256_mul_ps(dmin, u8x8(p.add(96 + 8 * sub)));
                    for j in 0..R {
                        let i = (t + j) * an + 8 * sb + sub;
                        let s = _mm256_cvtepi32_ps(S::sum(q, a, i));
                        let dx = _mm256_set1_ps(*a.d.as_ptr().add(i));
                        acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(scale, dx), s, acc[j]);
                        let sx = _mm256_set1_ps(*a.s.as_ptr().add(i));
                        mins[j] = _mm256_fmadd_ps(min, sx, mins[j]);
                    }
                }
            }
        }
        let mut out = [_mm256_setzero_ps(); R];
        for j in 0..R {
            out[j] = _mm256_sub_ps(acc[j], mins[j]);
        }
        out
    }

    /// One group times activation rows `t..t + R`: `out[j][r]`.
    #[inline(always)]
    unsafe fn group<S: BlockSum, const R: usize>(
        p: &Packed,
        w: &[u8],
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        match p.kind {
            Kind::Q4 => group_q4::<S, R>(w, p.units, a, t),
            Kind::Q5 => group_q5::<S, R>(w, p.units, a, t),
            Kind::Q8 => group_q8::<S, R>(w, p.units, a, t),
            Kind::Q4K => group_q4k::<S, R>(w, p.units, a, t),
        }
    }

    /// Groups `groups` of `p` times every activation row, into `out [rows, n]` (the
    /// groups' rows only, transposed as the row kernels write them).
    #[inline(always)]
    unsafe fn rows_with<S: BlockSum>(
        p: &Packed,
        groups: std::ops::Range<usize>,
        a: &QActs,
        out: &mut [f32],
    ) {
        let n = a.n;
        for (g, o) in groups.zip(out.chunks_exact_mut(GROUP * n)) {
            let w = p.group(g);
            let mut t = 0;
            let mut lanes = [0f32; GROUP];
            while t + 4 <= n {
                for (j, v) in group::<S, 4>(p, w, a, t).into_iter().enumerate() {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    for (r, l) in lanes.iter().enumerate() {
                        o[r * n + t + j] = *l;
                    }
                }
                t += 4;
            }
            while t < n {
                let [v] = group::<S, 1>(p, w, a, t);
                if n == 1 {
                    _mm256_storeu_ps(o.as_mut_ptr(), v);
                } else {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    for (r, l) in lanes.iter().enumerate() {
                        o[r * n + t] = *l;
                    }
                }
                t += 1;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows(p: &Packed, groups: std::ops::Range<usize>, a: &QActs, out: &mut [f32]) {
        rows_with::<Maddubs>(p, groups, a, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn rows_avxvnni(
        p: &Packed,
        groups: std::ops::Range<usize>,
        a: &QActs,
        out: &mut [f32],
    ) {
        rows_with::<AvxVnni>(p, groups, a, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn rows_avx512vnni(
        p: &Packed,
        groups: std::ops::Range<usize>,
        a: &QActs,
        out: &mut [f32],
    ) {
        rows_with::<Avx512Vnni>(p, groups, a, out)
    }

    /// The fastest of the three that this CPU runs (AVX2, FMA and F16C assumed).
    pub fn pick() -> unsafe fn(&Packed, std::ops::Range<usize>, &QActs, &mut [f32]) {
        let cpu = features();
        if cpu.avxvnni {
            rows_avxvnni
        } else if cpu.avx512vnni {
            rows_avx512vnni
        } else {
            rows
        }
    }
}
