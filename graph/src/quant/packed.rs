//! Q4_0 / Q4_1 weights repacked eight rows at a time, for a kernel that computes eight
//! output rows in one SIMD register.
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
use super::format::GgmlType;
use super::matrix::QMatrix;

/// Rows per group.
pub const GROUP: usize = 8;
/// Bytes per group and block column.
const BLOCK: usize = 2 * 2 * GROUP + 16 * GROUP;

/// The packed copy of a [`QMatrix`] whose rows are Q4_0 or Q4_1.
pub struct Packed {
    /// Blocks per row.
    nb: usize,
    bytes: Vec<u8>,
}

impl Packed {
    /// Packs `m`; `None` unless every row is Q4_0 or Q4_1 and the rows are a whole
    /// number of groups.
    pub fn new(m: &QMatrix) -> Option<Packed> {
        let (rows, cols) = (m.rows(), m.cols());
        if rows == 0 || !rows.is_multiple_of(GROUP) || !cols.is_multiple_of(32) {
            return None;
        }
        let nb = cols / 32;
        let mut bytes = vec![0u8; rows / GROUP * nb * BLOCK];
        for (g, group) in bytes.chunks_exact_mut(nb * BLOCK).enumerate() {
            for r in 0..GROUP {
                let (ty, row) = m.row(g * GROUP + r);
                let (bb, qs_at) = match ty {
                    GgmlType::Q4_0 => (18, 2),
                    GgmlType::Q4_1 => (20, 4),
                    _ => return None,
                };
                for (blk, dst) in row.chunks_exact(bb).zip(group.chunks_exact_mut(BLOCK)) {
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
        }
        Some(Packed { nb, bytes })
    }

    /// Bytes of group `g`.
    fn group(&self, g: usize) -> &[u8] {
        &self.bytes[g * self.nb * BLOCK..(g + 1) * self.nb * BLOCK]
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{Packed, BLOCK, GROUP};
    use crate::quant::kernels::QActs;

    /// Activation bytes `at..at + 4` of block `i`, in every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast(a: &QActs, i: usize, at: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(
            a.qs.as_ptr().add(i * 32 + at) as *const i32
        ))
    }

    /// The i32 sums of one block: eight rows' nibbles (`lo`: values 0..16 of the
    /// block, `hi`: 16..32, chunk `c` holding four values of each row) times
    /// activation block `i`, one row per lane.
    pub trait BlockSum {
        unsafe fn sum(lo: &[__m256i; 4], hi: &[__m256i; 4], a: &QActs, i: usize) -> __m256i;
    }

    /// AVX2: `u8 x i8` pair sums in i16 (`maddubs`), widened once per block.
    pub struct Maddubs;

    impl BlockSum for Maddubs {
        #[inline(always)]
        unsafe fn sum(lo: &[__m256i; 4], hi: &[__m256i; 4], a: &QActs, i: usize) -> __m256i {
            // Eight pair sums per lane, each at most 2 * 15 * 127: their total fits i16.
            let mut s = _mm256_maddubs_epi16(lo[0], bcast(a, i, 0));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[0], bcast(a, i, 16)));
            for c in 1..4 {
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[c], bcast(a, i, 4 * c)));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[c], bcast(a, i, 16 + 4 * c)));
            }
            _mm256_madd_epi16(s, _mm256_set1_epi16(1))
        }
    }

    /// AVX-VNNI (`vpdpbusd`, VEX): four `u8 x i8` products added to an i32 lane in one
    /// instruction, in two chains.
    pub struct AvxVnni;

    impl BlockSum for AvxVnni {
        #[inline(always)]
        unsafe fn sum(lo: &[__m256i; 4], hi: &[__m256i; 4], a: &QActs, i: usize) -> __m256i {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for c in 0..4 {
                s0 = _mm256_dpbusd_avx_epi32(s0, lo[c], bcast(a, i, 4 * c));
                s1 = _mm256_dpbusd_avx_epi32(s1, hi[c], bcast(a, i, 16 + 4 * c));
            }
            _mm256_add_epi32(s0, s1)
        }
    }

    /// AVX-512 VNNI on 256-bit registers (CPUs with AVX-512 but not AVX-VNNI).
    pub struct Avx512Vnni;

    impl BlockSum for Avx512Vnni {
        #[inline(always)]
        unsafe fn sum(lo: &[__m256i; 4], hi: &[__m256i; 4], a: &QActs, i: usize) -> __m256i {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for c in 0..4 {
                s0 = _mm256_dpbusd_epi32(s0, lo[c], bcast(a, i, 4 * c));
                s1 = _mm256_dpbusd_epi32(s1, hi[c], bcast(a, i, 16 + 4 * c));
            }
            _mm256_add_epi32(s0, s1)
        }
    }

    /// Eight rows (one group) times activation rows `t..t + R`: `out[j][r]`.
    #[inline(always)]
    unsafe fn group<S: BlockSum, const R: usize>(
        g: &[u8],
        nb: usize,
        a: &QActs,
        t: usize,
    ) -> [__m256; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = [_mm256_setzero_ps(); R];
        let an = a.cols / 32;
        for b in 0..nb {
            let p = g.as_ptr().add(b * BLOCK);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
            let mut lo = [_mm256_setzero_si256(); 4];
            let mut hi = [_mm256_setzero_si256(); 4];
            for c in 0..4 {
                let v = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
                lo[c] = _mm256_and_si256(v, m4);
                hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for j in 0..R {
                let i = (t + j) * an + b;
                let s = _mm256_cvtepi32_ps(S::sum(&lo, &hi, a, i));
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
                for (j, v) in group::<S, 4>(w, p.nb, a, t).into_iter().enumerate() {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    for (r, l) in lanes.iter().enumerate() {
                        o[r * n + t + j] = *l;
                    }
                }
                t += 4;
            }
            while t < n {
                let [v] = group::<S, 1>(w, p.nb, a, t);
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

    pub fn has_avx512vnni() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// The fastest of the three that this CPU runs (AVX2, FMA and F16C assumed).
    pub fn pick() -> unsafe fn(&Packed, std::ops::Range<usize>, &QActs, &mut [f32]) {
        if is_x86_feature_detected!("avxvnni") {
            rows_avxvnni
        } else if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            rows_avx512vnni
        } else {
            rows
        }
    }
}
