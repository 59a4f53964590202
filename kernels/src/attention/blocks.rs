//! Keys and values of a KV cache in blocks: each row (one position's keys or values,
//! `n_kv_heads * head_dim` wide) quantized in blocks of [`KV_BLOCK`] values with an
//! f16 scale, GGML's Q8_0 and Q4_0 layouts (the `-ctk q8_0` / `-ctk q4_0` caches of
//! llama.cpp). A row is quantized once, when its position is written, and never again,
//! so what attention reads for a position does not depend on how the prompt was split.
//!
//! Rows are rotated before they are quantized ([`rotate_heads`]: a Walsh-Hadamard
//! transform over each 64 values of a head, orthonormal, so its own inverse), as
//! llama.cpp does for quantized caches since 2026: the transform spreads a few large
//! channels (Qwen2's key biases reach hundreds) over the whole block, so they no
//! longer set a scale that rounds every other value of the block away. Dot products
//! are unchanged by a rotation, so attention rotates the query the same way, and
//! its output (a sum of rotated values) back.
//!
//! Quantizing a block's dequantized values gives the same block back (the scale is
//! rounded to f16 before the values are divided by it) for every block whose scale is
//! a normal f16 (a largest value of at least 127 * 2^-14, about 0.008, for Q8_0); a
//! block of smaller values may come back a subnormal step of its scale apart. A cache
//! copied out as f32 is rotated back first, and rotated again when written back: the
//! two rotations' rounding (about 1e-7 of a value) can tip a value that sat on a
//! rounding edge to the next level, so a restored cache is the same up to such rare
//! one-step differences.
use half::f16;

/// Values per block.
pub const KV_BLOCK: usize = 32;

/// 32 values as `d * q`, `q` in -127..=127 (GGML's Q8_0).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; KV_BLOCK],
}

/// 32 values as `d * (q - 8)`, `q` in 0..=15, two to a byte: value `j` in the low
/// nibble of byte `j`, value `j + 16` in its high nibble (GGML's Q4_0).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; KV_BLOCK / 2],
}

/// A block type of a quantized KV cache.
pub trait KvBlock: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The block of 32 values (`x.len()` is [`KV_BLOCK`]).
    fn quantize(x: &[f32]) -> Self;
    /// The block's 32 values, appended to `out`.
    fn dequantize(&self, out: &mut Vec<f32>);
}

/// The scale as stored, and the factor values are multiplied by to quantize them
/// (0 for an all-zero block).
fn scale(d: f32) -> (f16, f32) {
    let d = f16::from_f32(d);
    let inv = if d.to_f32() == 0.0 {
        0.0
    } else {
        1.0 / d.to_f32()
    };
    (d, inv)
}

impl KvBlock for BlockQ8_0 {
    fn quantize(x: &[f32]) -> Self {
        debug_assert_eq!(x.len(), KV_BLOCK);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, inv) = scale(amax / 127.0);
        let mut qs = [0i8; KV_BLOCK];
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        BlockQ8_0 { d, qs }
    }

    fn dequantize(&self, out: &mut Vec<f32>) {
        let d = self.d.to_f32();
        out.extend(self.qs.iter().map(|&q| q as f32 * d));
    }
}

impl KvBlock for BlockQ4_0 {
    fn quantize(x: &[f32]) -> Self {
        debug_assert_eq!(x.len(), KV_BLOCK);
        // The value of largest magnitude, with its sign, maps to -8: the one level the
        // other side lacks goes to the value that needs it.
        let max = x
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let (d, inv) = scale(max / -8.0);
        let q = |v: f32| ((v * inv + 8.5).floor().clamp(0.0, 15.0)) as u8;
        let mut qs = [0u8; KV_BLOCK / 2];
        for (j, b) in qs.iter_mut().enumerate() {
            *b = q(x[j]) | (q(x[j + KV_BLOCK / 2]) << 4);
        }
        BlockQ4_0 { d, qs }
    }

    fn dequantize(&self, out: &mut Vec<f32>) {
        let d = self.d.to_f32();
        out.extend(self.qs.iter().map(|&b| ((b & 15) as f32 - 8.0) * d));
        out.extend(self.qs.iter().map(|&b| ((b >> 4) as f32 - 8.0) * d));
    }
}

/// Values per rotation of a head of `head_dim` values (a multiple of [`KV_BLOCK`]):
/// 64 where heads are whole runs of 64, else 32.
pub fn rotation_len(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(64) {
        64
    } else {
        KV_BLOCK
    }
}

/// Rotates each run of [`rotation_len`]`(head_dim)` values of `x` (rows of whole
/// heads) by the orthonormal Walsh-Hadamard transform `H / sqrt(n)`, in place. The
/// transform is symmetric and orthogonal, so applying it twice gives `x` back (up to
/// rounding), and `(H q) . (H k) = q . k`.
pub fn rotate_heads(x: &mut [f32], head_dim: usize) {
    let n = rotation_len(head_dim);
    let norm = 1.0 / (n as f32).sqrt();
    for run in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (run[j], run[j + h]);
                    run[j] = a + b;
                    run[j + h] = a - b;
                }
            }
            h *= 2;
        }
        run.iter_mut().for_each(|v| *v *= norm);
    }
}

/// `x` (a whole number of blocks) quantized block by block.
pub fn quantize_blocks<B: KvBlock>(x: &[f32]) -> impl ExactSizeIterator<Item = B> + '_ {
    x.chunks_exact(KV_BLOCK).map(B::quantize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::stream;

    /// Blocks of several shapes: uniform at many scales, one outlier, all zeros,
    /// a constant, and values of one sign.
    fn blocks() -> Vec<Vec<f32>> {
        let mut rand = stream(0x5851F42D4C957F2D);
        let mut out = Vec::new();
        for scale in [1e-4f32, 0.01, 1.0, 37.0, 3000.0] {
            for _ in 0..40 {
                out.push((0..32).map(|_| scale * rand()).collect());
            }
            let mut spike: Vec<f32> = (0..32).map(|_| 0.01 * scale * rand()).collect();
            spike[7] = -scale;
            out.push(spike);
            out.push(vec![scale; 32]);
            out.push((0..32).map(|_| scale * rand().abs()).collect());
        }
        out.push(vec![0.0; 32]);
        out
    }

    fn round_trip<B: KvBlock>(x: &[f32]) -> (B, Vec<f32>) {
        let b = B::quantize(x);
        let mut out = Vec::new();
        b.dequantize(&mut out);
        (b, out)
    }

    /// Each value comes back within half a step of the block's scale (the rounding),
    /// plus what rounding the scale to f16 moves the largest value by (2^-11 of it
    /// for a normal f16; up to half a subnormal step, 2^-25, for scales under 2^-14).
    #[test]
    fn q8_0_values_come_back_within_half_a_step() {
        for x in blocks() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (b, y) = round_trip::<BlockQ8_0>(&x);
            let d = b.d.to_f32();
            let rounding = (d - amax / 127.0).abs();
            assert!(
                rounding <= (d / 2048.0).max(2f32.powi(-25)),
                "scale {d} for {amax}"
            );
            let bound = 0.5 * d + 127.0 * rounding + amax * 1e-6;
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() <= bound, "[{i}] {a} -> {b}, step {d}");
            }
        }
    }

    /// Within half a step (and the scale's rounding, as for Q8_0), except values on
    /// the other side of the largest beyond 7.5 steps (15 is the top level, 7 steps
    /// up): within one step there.
    #[test]
    fn q4_0_values_come_back_within_a_step() {
        for x in blocks() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (b, y) = round_trip::<BlockQ4_0>(&x);
            let d = b.d.to_f32().abs();
            let rounding = (d - amax / 8.0).abs();
            assert!(
                rounding <= (d / 2048.0).max(2f32.powi(-25)),
                "scale {d} for {amax}"
            );
            let half = 0.5 * d + 8.0 * rounding + amax * 1e-6;
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                let bound = if a.abs() <= 7.4 * d {
                    half
                } else {
                    half + 0.5 * d
                };
                assert!((a - b).abs() <= bound, "[{i}] {a} -> {b}, step {d}");
            }
        }
    }

    /// Blocks whose scale is a normal f16 (for Q8_0, a largest value of at least
    /// 127 * 2^-14, about 0.0078).
    fn normal_blocks(levels: f32) -> impl Iterator<Item = Vec<f32>> {
        blocks()
            .into_iter()
            .filter(move |x| x.iter().fold(0f32, |m, v| m.max(v.abs())) >= levels * 2f32.powi(-14))
    }

    /// The largest value keeps its sign and lands on the block's extreme level.
    #[test]
    fn the_largest_value_is_kept_at_the_extreme_level() {
        for x in normal_blocks(127.0) {
            let (i, _) = x.iter().enumerate().fold((0, 0f32), |(j, m), (i, &v)| {
                if v.abs() > m {
                    (i, v.abs())
                } else {
                    (j, m)
                }
            });
            let q8 = BlockQ8_0::quantize(&x);
            assert_eq!(q8.qs[i].unsigned_abs(), 127, "{x:?}");
            assert_eq!(q8.qs[i] > 0, x[i] > 0.0);
            let q4 = BlockQ4_0::quantize(&x);
            let nibble = if i < 16 {
                q4.qs[i] & 15
            } else {
                q4.qs[i - 16] >> 4
            };
            assert_eq!(nibble, 0, "{x:?}");
        }
    }

    /// Dequantized values quantize to the same block (when the scale is a normal
    /// f16): a cache written back from its f32 copy holds the same bits.
    #[test]
    fn quantizing_dequantized_values_gives_the_same_block() {
        for x in normal_blocks(127.0) {
            let (b8, y8) = round_trip::<BlockQ8_0>(&x);
            assert_eq!(BlockQ8_0::quantize(&y8), b8);
        }
        for x in normal_blocks(8.0) {
            let (b4, y4) = round_trip::<BlockQ4_0>(&x);
            assert_eq!(BlockQ4_0::quantize(&y4), b4);
        }
    }

    /// The rotation is the Hadamard matrix's: orthonormal (dot products and norms
    /// kept), its own inverse, and the same as multiplying by the matrix built from
    /// its definition (entry (i, j) is (-1)^popcount(i & j) / sqrt(n)).
    #[test]
    fn the_rotation_is_the_orthonormal_hadamard_transform() {
        let mut rand = stream(0x2F3A9C1B5D7E8F01);
        for head_dim in [32, 64, 96, 128, 256] {
            let n = rotation_len(head_dim);
            assert!(head_dim.is_multiple_of(n));
            let x: Vec<f32> = (0..2 * head_dim).map(|_| 3.0 * rand()).collect();
            let y: Vec<f32> = (0..2 * head_dim).map(|_| rand()).collect();
            let (mut rx, mut ry) = (x.clone(), y.clone());
            rotate_heads(&mut rx, head_dim);
            rotate_heads(&mut ry, head_dim);
            for (c, (run, rot)) in x.chunks(n).zip(rx.chunks(n)).enumerate() {
                for (i, r) in rot.iter().enumerate() {
                    let want: f64 = run
                        .iter()
                        .enumerate()
                        .map(|(j, &v)| {
                            let sign = if (i & j).count_ones() % 2 == 0 {
                                1.0
                            } else {
                                -1.0
                            };
                            sign * v as f64
                        })
                        .sum::<f64>()
                        / (n as f64).sqrt();
                    assert!(
                        (*r as f64 - want).abs() <= 1e-5,
                        "hd {head_dim} run {c} [{i}]"
                    );
                }
            }
            let dot =
                |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a * b) as f64).sum::<f64>();
            assert!(
                (dot(&x, &y) - dot(&rx, &ry)).abs() <= 1e-4,
                "hd {head_dim}: dot"
            );
            rotate_heads(&mut rx, head_dim);
            for (a, b) in x.iter().zip(&rx) {
                assert!((a - b).abs() <= 1e-5, "hd {head_dim}: twice");
            }
        }
    }

    /// The layouts are GGML's: a Q8_0 block is 34 bytes, a Q4_0 block 18.
    #[test]
    fn blocks_have_ggml_sizes() {
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
    }

    /// Our blocks dequantize as the weight loader's GGML dequantizer reads the same
    /// bytes (an independent reading of the format).
    #[test]
    fn blocks_dequantize_as_ggml_does() {
        use crate::quant::format::{dequantize, GgmlType};
        for x in blocks() {
            let b8 = BlockQ8_0::quantize(&x);
            let mut bytes = b8.d.to_le_bytes().to_vec();
            bytes.extend(b8.qs.iter().map(|&q| q as u8));
            let (mut want, mut got) = (Vec::new(), Vec::new());
            dequantize(GgmlType::Q8_0, &bytes, &mut want);
            b8.dequantize(&mut got);
            assert_eq!(got, want);
            let b4 = BlockQ4_0::quantize(&x);
            let mut bytes = b4.d.to_le_bytes().to_vec();
            bytes.extend(b4.qs);
            let (mut want, mut got) = (Vec::new(), Vec::new());
            dequantize(GgmlType::Q4_0, &bytes, &mut want);
            b4.dequantize(&mut got);
            assert_eq!(got, want);
        }
    }
}
