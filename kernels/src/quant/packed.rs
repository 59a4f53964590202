//! Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K weights repacked eight rows at a
//! time, for a kernel that computes eight output rows in one SIMD register.
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
//! sub-block and high nibbles those of the second. Q5_K (1440 bytes; 1408 as rows) adds
//! masks of fifth bits after them, as Q5_0 does (see `SUPER5`).
//!
//! Q6_K (1680 bytes, as rows): the eight rows' `d` (f16), their sixteen i8 scales
//! (`[scale][row]`), then per pair of 32-value blocks the Q4_K chunks of low nibbles
//! followed by four 32-byte planes of high bits: byte `4r + b` of plane `2e + k / 4`
//! holds, in bits `2 (k % 4)`, the two high bits of value `4k + b` of the pair's block
//! `e` in row `r`. Each 16-value half is summed on its own, `32 hx` taken off and its
//! row's scale applied in i32.
//!
//! Each group of eight rows has one of these layouts; groups of one matrix may differ.
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
/// Bytes per group and Q5_K super-block column: as Q4_K, then per pair of sub-blocks
/// sixteen 32-bit masks of fifth bits (mask `8e + k`: chunk `k` of the pair's sub-block
/// `e`, bit `4r + b` for value `4k + b` of row `r`).
const SUPER5: usize = SUPER + 4 * 64;
/// Bytes per group and Q6_K super-block column.
const SUPER6: usize = 2 * GROUP + 16 * GROUP + 4 * PAIR6;
/// Bytes per pair of 32-value blocks of a Q6_K super-block column: low nibbles, then
/// high bits.
const PAIR6: usize = 256 + 128;

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
    /// Q5_K rows.
    Q5K,
    /// Q6_K rows.
    Q6K,
}

impl Kind {
    /// The layout of rows of `ty`, if it has one.
    fn of(ty: GgmlType) -> Option<Kind> {
        Some(match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Kind::Q4,
            GgmlType::Q5_0 | GgmlType::Q5_1 => Kind::Q5,
            GgmlType::Q8_0 => Kind::Q8,
            GgmlType::Q4K => Kind::Q4K,
            GgmlType::Q5K => Kind::Q5K,
            GgmlType::Q6K => Kind::Q6K,
            _ => return None,
        })
    }

    /// Bytes per group and block (super-block for Q4_K) column.
    fn unit(self) -> usize {
        match self {
            Kind::Q4 => BLOCK,
            Kind::Q5 => BLOCK5,
            Kind::Q8 => BLOCK8,
            Kind::Q4K => SUPER,
            Kind::Q5K => SUPER5,
            Kind::Q6K => SUPER6,
        }
    }

    /// Block (super-block for Q4_K) columns of rows `cols` wide.
    fn units(self, cols: usize) -> usize {
        match self {
            Kind::Q4 | Kind::Q5 | Kind::Q8 => cols / 32,
            Kind::Q4K | Kind::Q5K | Kind::Q6K => cols / 256,
        }
    }
}

/// The packed copy of a [`QMatrix`] whose rows are Q4_0 / Q4_1, Q5_0 / Q5_1, Q8_0 or
/// Q4_K. Each group of eight rows has one layout, but groups may differ: a fused Q/K/V
/// of a K-quant mix whose V rows are Q8_0 and Q/K rows Q5_0 is packed whole.
pub struct Packed {
    cols: usize,
    /// Per group: its layout and where its bytes start in `bytes`.
    groups: Vec<(Kind, usize)>,
    bytes: Vec<u8>,
}

impl Packed {
    /// Packs `m`; `None` unless the rows are a whole number of groups, each group's
    /// eight rows of one layout (Q4_0 / Q4_1, Q5_0 / Q5_1, Q8_0, Q4_K, Q5_K or Q6_K).
    pub fn new(m: &QMatrix) -> Option<Packed> {
        let (rows, cols) = (m.rows(), m.cols());
        if rows == 0 || !rows.is_multiple_of(GROUP) {
            return None;
        }
        let mut groups = Vec::with_capacity(rows / GROUP);
        let mut len = 0;
        for g in 0..rows / GROUP {
            let kind = Kind::of(m.row(g * GROUP).0)?;
            if (1..GROUP).any(|r| Kind::of(m.row(g * GROUP + r).0) != Some(kind)) {
                return None;
            }
            groups.push((kind, len));
            len += kind.units(cols) * kind.unit();
        }
        let mut bytes = vec![0u8; len];
        for (g, &(kind, at)) in groups.iter().enumerate() {
            let group = &mut bytes[at..at + kind.units(cols) * kind.unit()];
            for r in 0..GROUP {
                let (ty, row) = m.row(g * GROUP + r);
                let dst = group.chunks_exact_mut(kind.unit());
                match kind {
                    Kind::Q4 => pack_q4(ty, row, r, dst),
                    Kind::Q5 => pack_q5(ty, row, r, dst),
                    Kind::Q8 => pack_q8(row, r, dst),
                    Kind::Q4K => pack_q4k::<false>(row, r, dst),
                    Kind::Q5K => pack_q4k::<true>(row, r, dst),
                    Kind::Q6K => pack_q6k(row, r, dst),
                }
            }
        }
        Some(Packed {
            cols,
            groups,
            bytes,
        })
    }

    /// Group `g`'s layout, block columns and bytes.
    fn group(&self, g: usize) -> (Kind, usize, &[u8]) {
        let (kind, at) = self.groups[g];
        let units = kind.units(self.cols);
        (kind, units, &self.bytes[at..at + units * kind.unit()])
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

/// Row `r` of a group, Q6_K super-blocks, into the group's super-block columns.
fn pack_q6k<'a>(row: &[u8], r: usize, units: impl Iterator<Item = &'a mut [u8]>) {
    for (blk, dst) in row.chunks_exact(210).zip(units) {
        dst[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
        for (s, &sc) in blk[192..208].iter().enumerate() {
            dst[16 + 8 * s + r] = sc;
        }
        // The 256 values as 6-bit numbers, in order (see `dequantize`).
        let mut q = [0u8; 256];
        for h in 0..2 {
            let (ql, qh) = (&blk[64 * h..64 * h + 64], &blk[128 + 32 * h..160 + 32 * h]);
            for l in 0..32 {
                let v = &mut q[128 * h..128 * h + 128];
                v[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                v[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        for pair in 0..4 {
            let base = 144 + PAIR6 * pair;
            for k in 0..8 {
                for b in 0..4 {
                    let (first, second) = (q[64 * pair + 4 * k + b], q[64 * pair + 32 + 4 * k + b]);
                    dst[base + 32 * k + 4 * r + b] = (first & 0x0F) | (second << 4);
                    for (e, v) in [first, second].into_iter().enumerate() {
                        let at = base + 256 + 32 * (2 * e + k / 4) + 4 * r + b;
                        dst[at] |= (v >> 4) << (2 * (k % 4));
                    }
                }
            }
        }
    }
}

/// Row `r` of a group, Q4_K super-blocks, into the group's super-block columns.
/// With `FIVE`, Q5_K super-blocks: their fifth bits into the masks after the nibbles.
fn pack_q4k<'a, const FIVE: bool>(row: &[u8], r: usize, units: impl Iterator<Item = &'a mut [u8]>) {
    let (bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    for (blk, dst) in row.chunks_exact(bytes).zip(units) {
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
                let from = qs_at + 32 * pair + 4 * k;
                dst[at..at + 4].copy_from_slice(&blk[from..from + 4]);
                if !FIVE {
                    continue;
                }
                for e in 0..2 {
                    for b in 0..4 {
                        // Value 4k + b of sub-block 2 pair + e: its bit of byte 4k + b.
                        let bit = (blk[16 + 4 * k + b] >> (2 * pair + e)) & 1;
                        let mask = SUPER + 64 * pair + 4 * (8 * e + k);
                        dst[mask + r / 2] |= bit << (4 * (r % 2) + b);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{Kind, Packed, BLOCK, BLOCK5, BLOCK8, GROUP, PAIR6, SUPER, SUPER5, SUPER6};
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

        /// The sums of the block's two 16-value halves (chunks 0..4 and 4..8), the
        /// values in 0..64.
        unsafe fn halves6(q: &[__m256i; 8], a: &QActs, i: usize) -> [__m256i; 2];
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

        #[inline(always)]
        unsafe fn halves6(q: &[__m256i; 8], a: &QActs, i: usize) -> [__m256i; 2] {
            // A pair sum reaches 2 * 63 * 127: two fit i16.
            let ones = _mm256_set1_epi16(1);
            let pair = |k: usize| {
                let s0 = _mm256_maddubs_epi16(q[k], bcast(a, i, 4 * k));
                let s1 = _mm256_maddubs_epi16(q[k + 1], bcast(a, i, 4 * k + 4));
                _mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones)
            };
            [
                _mm256_add_epi32(pair(0), pair(2)),
                _mm256_add_epi32(pair(4), pair(6)),
            ]
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

        #[inline(always)]
        unsafe fn halves6(q: &[__m256i; 8], a: &QActs, i: usize) -> [__m256i; 2] {
            let half = |h: usize| {
                let mut s = _mm256_setzero_si256();
                for (k, q) in q.iter().enumerate().skip(4 * h).take(4) {
                    s = _mm256_dpbusd_avx_epi32(s, *q, bcast(a, i, 4 * k));
                }
                s
            };
            [half(0), half(1)]
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

        #[inline(always)]
        unsafe fn halves6(q: &[__m256i; 8], a: &QActs, i: usize) -> [__m256i; 2] {
            let half = |h: usize| {
                let mut s = _mm256_setzero_si256();
                for (k, q) in q.iter().enumerate().skip(4 * h).take(4) {
                    s = _mm256_dpbusd_epi32(s, *q, bcast(a, i, 4 * k));
                }
                s
            };
            [half(0), half(1)]
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

    /// The layouts of 32-value blocks with a scale and an offset, as const parameters of
    /// `group_blocks` (so each is compiled on its own, with no branch per block).
    const Q4: u8 = 0;
    const Q5: u8 = 1;
    const Q8: u8 = 2;

    /// Block column `b` of a group in layout `K`: the eight rows' scales, offsets and
    /// eight chunks of values (see the layouts at the top of this file).
    #[inline(always)]
    unsafe fn block<const K: u8>(g: &[u8], b: usize) -> (__m256, __m256, [__m256i; 8]) {
        use crate::quant::kernels::avx2::high_bits;
        let mut q = [_mm256_setzero_si256(); 8];
        match K {
            Q8 => {
                let p = g.as_ptr().add(b * BLOCK8);
                let d = f16x8(p);
                for (k, q) in q.iter_mut().enumerate() {
                    *q = _mm256_loadu_si256(p.add(16 + 32 * k) as *const __m256i);
                }
                (d, _mm256_mul_ps(d, _mm256_set1_ps(-128.0)), q)
            }
            _ => {
                let p = g.as_ptr().add(b * if K == Q5 { BLOCK5 } else { BLOCK });
                // Low nibbles are values 0..16 of the block, high ones 16..32; Q5's
                // fifth bits are or-ed in from their masks.
                for c in 0..4 {
                    let (lo, hi) = nibbles(p.add(32 + 32 * c));
                    (q[c], q[4 + c]) = if K == Q5 {
                        (
                            _mm256_or_si256(lo, high_bits(p.add(160 + 4 * c))),
                            _mm256_or_si256(hi, high_bits(p.add(176 + 4 * c))),
                        )
                    } else {
                        (lo, hi)
                    };
                }
                (f16x8(p), f16x8(p.add(16)), q)
            }
        }
    }

    /// Eight Q4_0 / Q4_1 (`K` = Q4), Q5_0 / Q5_1 (Q5) or Q8_0 (Q8) rows, one group,
    /// times activation rows `t..t + R`: per block `d dx sum(q qx) + m sx`.
    #[inline(always)]
    unsafe fn group_blocks<S: BlockSum, const R: usize, const K: u8>(
        g: &[u8],
        nb: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        for b in 0..nb {
            let (d, m, q) = block::<K>(g, b);
            for j in 0..R {
                let i = (t + j) * an + b;
                let s = match K {
                    Q4 => S::sum(&q, a, i),
                    Q5 => S::sum5(&q, a, i),
                    _ => S::sum8(&q, a, i),
                };
                let s = _mm256_cvtepi32_ps(s);
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
    unsafe fn group_q4k<S: BlockSum, const R: usize, const FIVE: bool>(
        g: &[u8],
        units: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        use crate::quant::kernels::avx2::high_bits;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        let unit = if FIVE { SUPER5 } else { SUPER };
        for sb in 0..units {
            let p = g.as_ptr().add(sb * unit);
            let (d, dmin) = (f16x8(p), f16x8(p.add(16)));
            for pair in 0..4 {
                let mut lo = [_mm256_setzero_si256(); 8];
                let mut hi = [_mm256_setzero_si256(); 8];
                for k in 0..8 {
                    (lo[k], hi[k]) = nibbles(p.add(160 + 256 * pair + 32 * k));
                    if FIVE {
                        let masks = p.add(SUPER + 64 * pair + 4 * k);
                        lo[k] = _mm256_or_si256(lo[k], high_bits(masks));
                        hi[k] = _mm256_or_si256(hi[k], high_bits(masks.add(32)));
                    }
                }
                for (half, q) in [lo, hi].iter().enumerate() {
                    let sub = 2 * pair + half;
                    let scale = _mm256_mul_ps(d, u8x8(p.add(32 + 8 * sub)));
                    let min = _mm256_mul_ps(dmin, u8x8(p.add(96 + 8 * sub)));
                    for j in 0..R {
                        let i = (t + j) * an + 8 * sb + sub;
                        let s = if FIVE {
                            S::sum5(q, a, i)
                        } else {
                            S::sum(q, a, i)
                        };
                        let s = _mm256_cvtepi32_ps(s);
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

    /// Eight Q6_K rows (one group) times activation rows `t..t + R`: per 32-value
    /// block, `d dx (sc0 (sum0 - 32 hx0) + sc1 (sum1 - 32 hx1))` over its 16-value halves.
    #[inline(always)]
    unsafe fn group_q6k<S: BlockSum, const R: usize>(
        g: &[u8],
        units: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        let m3 = _mm256_set1_epi8(3);
        for sb in 0..units {
            let p = g.as_ptr().add(sb * SUPER6);
            let d = f16x8(p);
            for pair in 0..4 {
                let base = p.add(144 + PAIR6 * pair);
                let mut lo = [_mm256_setzero_si256(); 8];
                let mut hi = [_mm256_setzero_si256(); 8];
                for k in 0..8 {
                    (lo[k], hi[k]) = nibbles(base.add(32 * k));
                }
                for (e, low) in [lo, hi].iter().enumerate() {
                    // Chunk k's high bits: bits 2 (k % 4) of vector 2e + k / 4.
                    let hv = [
                        _mm256_loadu_si256(base.add(256 + 64 * e) as *const __m256i),
                        _mm256_loadu_si256(base.add(288 + 64 * e) as *const __m256i),
                    ];
                    let mut q = [_mm256_setzero_si256(); 8];
                    for k in 0..8 {
                        let bits = match k % 4 {
                            0 => _mm256_and_si256(hv[k / 4], m3),
                            1 => _mm256_and_si256(_mm256_srli_epi16(hv[k / 4], 2), m3),
                            2 => _mm256_and_si256(_mm256_srli_epi16(hv[k / 4], 4), m3),
                            _ => _mm256_and_si256(_mm256_srli_epi16(hv[k / 4], 6), m3),
                        };
                        q[k] = _mm256_or_si256(low[k], _mm256_slli_epi16(bits, 4));
                    }
                    let blk = 2 * pair + e;
                    let sc = |s: usize| {
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(16 + 8 * s) as *const __m128i))
                    };
                    let (sc0, sc1) = (sc(2 * blk), sc(2 * blk + 1));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let i = (t + j) * an + 8 * sb + blk;
                        let [s0, s1] = S::halves6(&q, a, i);
                        let h = a.h.as_ptr().add(2 * i);
                        let s0 = _mm256_sub_epi32(s0, _mm256_set1_epi32(32 * *h));
                        let s1 = _mm256_sub_epi32(s1, _mm256_set1_epi32(32 * *h.add(1)));
                        let s = _mm256_add_epi32(
                            _mm256_mullo_epi32(s0, sc0),
                            _mm256_mullo_epi32(s1, sc1),
                        );
                        let dx = _mm256_set1_ps(*a.d.as_ptr().add(i));
                        *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(s), *acc);
                    }
                }
            }
        }
        acc
    }

    /// One group times activation rows `t..t + R`: `out[j][r]`.
    #[inline(always)]
    unsafe fn group<S: BlockSum, const R: usize>(
        (kind, units, w): (Kind, usize, &[u8]),
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        match kind {
            Kind::Q4 => group_blocks::<S, R, Q4>(w, units, a, t),
            Kind::Q5 => group_blocks::<S, R, Q5>(w, units, a, t),
            Kind::Q8 => group_blocks::<S, R, Q8>(w, units, a, t),
            Kind::Q4K => group_q4k::<S, R, false>(w, units, a, t),
            Kind::Q5K => group_q4k::<S, R, true>(w, units, a, t),
            Kind::Q6K => group_q6k::<S, R>(w, units, a, t),
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
                for (j, v) in group::<S, 4>(w, a, t).into_iter().enumerate() {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    for (r, l) in lanes.iter().enumerate() {
                        o[r * n + t + j] = *l;
                    }
                }
                t += 4;
            }
            while t < n {
                let [v] = group::<S, 1>(w, a, t);
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
