//! GGML tensor types and their dequantization to f32.
//!
//! Block layouts follow the GGUF specification: each quantized type packs a fixed
//! number of weights into a block with its own scale(s); K-quants use 256-weight
//! super-blocks with 6-bit (Q4_K) or 8-bit (Q6_K) sub-block scales.
use half::f16;

/// The GGML element types this runtime reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// From the type id stored in a GGUF tensor info.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4K => 2 + 2 + 12 + 128,
            GgmlType::Q5K => 2 + 2 + 12 + 32 + 128,
            GgmlType::Q6K => 128 + 64 + 16 + 2,
        }
    }

    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K: blocks our matmul kernels multiply
    /// directly.
    pub fn is_block_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes taken by `n` weights, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_len())
            .then(|| n / self.block_len())
            .and_then(|blocks| blocks.checked_mul(self.block_bytes()))
    }
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `bytes` (a whole number of blocks of `ty`) into `out`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::Q4_0 => {
            // d: f16, then 16 bytes: low nibbles are weights 0..16, high nibbles 16..32.
            for blk in bytes.chunks_exact(bb) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            // d, m: f16, then nibbles as in Q4_0; weight = q * d + m.
            for blk in bytes.chunks_exact(bb) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // d (and m for Q5_1): f16; 32 high bits, bit i for weight i; nibbles as in
            // Q4_0. q = nibble | high bit << 4; weight = d (q - 16), or d q + m.
            for blk in bytes.chunks_exact(bb) {
                let (d, m, at) = if ty == GgmlType::Q5_1 {
                    (f16_at(blk, 0), f16_at(blk, 2), 4)
                } else {
                    let d = f16_at(blk, 0);
                    (d, -16.0 * d, 2)
                };
                let high = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
                out.extend((0..32).map(|i| d * q5(&blk[at + 4..], high, i) as f32 + m));
            }
        }
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(bb) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4K => {
            // d, dmin: f16; 12 bytes of eight 6-bit (scale, min) pairs; 128 bytes of
            // nibbles. Each 64 weights use two pairs: low nibbles with the first, high
            // nibbles with the second; weight = d * scale * q - dmin * min.
            for blk in bytes.chunks_exact(bb) {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                for (j, chunk) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = k4_scale_min(2 * j, scales);
                    let (s2, m2) = k4_scale_min(2 * j + 1, scales);
                    let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                    out.extend(chunk.iter().map(|q| d1 * (q & 0x0F) as f32 - m1));
                    out.extend(chunk.iter().map(|q| d2 * (q >> 4) as f32 - m2));
                }
            }
        }
        GgmlType::Q5K => {
            // As Q4_K, with 32 bytes of fifth bits between the scales and the nibbles:
            // bit j of byte l is the high bit of weight l of the j-th 32 weights.
            for blk in bytes.chunks_exact(bb) {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let qh = &blk[16..48];
                for (c, chunk) in blk[48..176].chunks_exact(32).enumerate() {
                    for (half, shift) in [(0, 0), (1, 4)] {
                        let j = 2 * c + half;
                        let (sc, mn) = k4_scale_min(j, scales);
                        let (dj, mj) = (d * sc as f32, dmin * mn as f32);
                        out.extend(chunk.iter().zip(qh).map(|(q, h)| {
                            let q = ((q >> shift) & 0x0F) | (((h >> j) & 1) << 4);
                            dj * q as f32 - mj
                        }));
                    }
                }
            }
        }
        GgmlType::Q6K => {
            // ql: 128 bytes of low 4 bits, qh: 64 bytes of high 2 bits, 16 i8 scales,
            // d: f16. Two halves of 128 weights; weight = d * scale * (q - 32).
            for blk in bytes.chunks_exact(bb) {
                let d = f16_at(blk, 208);
                let mut y = [0f32; 256];
                for half in 0..2 {
                    let ql = &blk[half * 64..half * 64 + 64];
                    let qh = &blk[128 + half * 32..128 + half * 32 + 32];
                    let sc = &blk[192 + half * 8..192 + half * 8 + 8];
                    let y = &mut y[half * 128..half * 128 + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
                out.extend_from_slice(&y);
            }
        }
    }
}

/// Weight `i` (0..32) of a Q5_0 / Q5_1 block as its unsigned 5-bit value: the low or
/// high nibble of `qs[i % 16]` and bit `i` of `high`.
#[inline(always)]
pub(crate) fn q5(qs: &[u8], high: u32, i: usize) -> u8 {
    let nibble = if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    };
    nibble | (((high >> i) & 1) as u8) << 4
}

/// The `j`-th 6-bit (scale, min) pair of a Q4_K super-block: pairs 0..4 sit in the low
/// six bits of bytes 0..4 and 4..8; pairs 4..8 are split between bytes 8..12 (low and
/// high nibble) and the top two bits of bytes 0..8.
pub(crate) fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
