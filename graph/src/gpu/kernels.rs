//! cubecl kernels over GGML blocks as stored in GGUF: one source for Vulkan, Metal and
//! DX12 (and CUDA/ROCm where burn runs them). A weight matrix's rows live in a buffer
//! of `u32` words, each row padded to whole words; the kernels read bytes out of the
//! words, so no block needs to be aligned.
//!
//! Block layouts (little-endian, `d`/`m` f16):
//!
//! | type | bytes | weights | layout |
//! |---|---|---|---|
//! | Q4_0 | 18 | 32 | d, 16 bytes of nibbles (low: 0..16, high: 16..32), minus 8 |
//! | Q4_1 | 20 | 32 | d, m, nibbles as Q4_0, plus m |
//! | Q5_0 | 22 | 32 | d, 32 high bits, nibbles; (nibble + 16 bit) minus 16 |
//! | Q5_1 | 24 | 32 | d, m, 32 high bits, nibbles; plus m |
//! | Q8_0 | 34 | 32 | d, 32 signed bytes |
//! | Q4_K | 144 | 256 | d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles |
//! | Q5_K | 176 | 256 | as Q4_K with 32 bytes of high bits before the nibbles |
//! | Q6_K | 210 | 256 | 128 bytes of low nibbles, 64 of 2-bit highs, 16 signed scales, d |
use cubecl::prelude::*;

pub const Q4_0: u32 = 0;
pub const Q4_1: u32 = 1;
pub const Q5_0: u32 = 2;
pub const Q5_1: u32 = 3;
pub const Q8_0: u32 = 4;
pub const Q4_K: u32 = 5;
pub const Q5_K: u32 = 6;
pub const Q6_K: u32 = 7;

/// The cube's index in the launches' grids (rows of cubes, within each dimension's
/// limit).
#[cube]
pub fn cube_index() -> u32 {
    CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X
}

/// The unit's index across the grid, for kernels of one unit per element.
#[cube]
pub fn unit_index() -> u32 {
    cube_index() * CUBE_DIM_X + UNIT_POS_X
}

/// Byte `i` of the buffer.
#[cube]
fn byte_at(w: &[u32], i: usize) -> u32 {
    (w[i / 4] >> (((i % 4) * 8) as u32)) & 0xFFu32
}

/// The f16 at byte `i`, widened (exactly) to f32.
#[cube]
fn half_at(w: &[u32], i: usize) -> f32 {
    let h = byte_at(w, i) | (byte_at(w, i + 1) << 8u32);
    let sign = (h & 0x8000u32) << 16u32;
    let exp = (h >> 10u32) & 0x1Fu32;
    let mant = h & 0x3FFu32;
    if exp == 0u32 {
        // Zero or subnormal: mant * 2^-24.
        let out = f32::cast_from(mant) * 5.9604645e-8f32;
        if sign != 0u32 {
            -out
        } else {
            out
        }
    } else if exp == 31u32 {
        f32::reinterpret(sign | 0x7F80_0000u32 | (mant << 13u32))
    } else {
        f32::reinterpret(sign | ((exp + 112u32) << 23u32) | (mant << 13u32))
    }
}

/// Nibble `l` (0..32) of a 32-weight block whose 16 bytes of nibbles start at `qs`.
#[cube]
fn nibble(w: &[u32], qs: usize, l: u32) -> u32 {
    (byte_at(w, qs + (l % 16) as usize) >> ((l / 16) * 4)) & 0xFu32
}

/// Scale `j` (0..8) of a Q4_K/Q5_K super-block whose 12 scale bytes start at `sc`.
#[cube]
fn k_scale(w: &[u32], sc: usize, j: u32) -> u32 {
    if j < 4u32 {
        byte_at(w, sc + j as usize) & 63u32
    } else {
        (byte_at(w, sc + (j + 4) as usize) & 0xFu32)
            | ((byte_at(w, sc + (j - 4) as usize) >> 6u32) << 4u32)
    }
}

/// Min `j` (0..8) of a Q4_K/Q5_K super-block whose 12 scale bytes start at `sc`.
#[cube]
fn k_min(w: &[u32], sc: usize, j: u32) -> u32 {
    if j < 4u32 {
        byte_at(w, sc + (j + 4) as usize) & 63u32
    } else {
        (byte_at(w, sc + (j + 4) as usize) >> 4u32)
            | ((byte_at(w, sc + j as usize) >> 6u32) << 4u32)
    }
}

/// Weight `e` of the row whose blocks start at byte `row`.
#[cube]
pub fn weight(w: &[u32], row: usize, e: u32, #[comptime] ty: u32) -> f32 {
    let mut v = 0.0f32;
    if comptime![ty == Q8_0] {
        let b = row + ((e / 32) * 34) as usize;
        let q = byte_at(w, b + 2 + (e % 32) as usize);
        let q = i32::cast_from(q) - i32::cast_from(q & 0x80u32) * 2;
        v = half_at(w, b) * f32::cast_from(q);
    } else if comptime![ty == Q4_0] {
        let b = row + ((e / 32) * 18) as usize;
        let q = nibble(w, b + 2, e % 32);
        v = half_at(w, b) * (f32::cast_from(q) - 8.0f32);
    } else if comptime![ty == Q4_1] {
        let b = row + ((e / 32) * 20) as usize;
        let q = nibble(w, b + 4, e % 32);
        v = half_at(w, b) * f32::cast_from(q) + half_at(w, b + 2);
    } else if comptime![ty == Q5_0] {
        let b = row + ((e / 32) * 22) as usize;
        let l = e % 32;
        let high = (byte_at(w, b + 2 + (l / 8) as usize) >> (l % 8)) & 1u32;
        let q = nibble(w, b + 6, l) | (high << 4u32);
        v = half_at(w, b) * (f32::cast_from(q) - 16.0f32);
    } else if comptime![ty == Q5_1] {
        let b = row + ((e / 32) * 24) as usize;
        let l = e % 32;
        let high = (byte_at(w, b + 4 + (l / 8) as usize) >> (l % 8)) & 1u32;
        let q = nibble(w, b + 8, l) | (high << 4u32);
        v = half_at(w, b) * f32::cast_from(q) + half_at(w, b + 2);
    } else if comptime![ty == Q4_K] {
        let b = row + ((e / 256) * 144) as usize;
        let j = (e % 256) / 32;
        let l = e % 32;
        let q = (byte_at(w, b + 16 + ((j / 2) * 32 + l) as usize) >> ((j % 2) * 4)) & 0xFu32;
        let d = half_at(w, b) * f32::cast_from(k_scale(w, b + 4, j));
        let m = half_at(w, b + 2) * f32::cast_from(k_min(w, b + 4, j));
        v = d * f32::cast_from(q) - m;
    } else if comptime![ty == Q5_K] {
        let b = row + ((e / 256) * 176) as usize;
        let j = (e % 256) / 32;
        let l = e % 32;
        let low = (byte_at(w, b + 48 + ((j / 2) * 32 + l) as usize) >> ((j % 2) * 4)) & 0xFu32;
        let high = (byte_at(w, b + 16 + l as usize) >> j) & 1u32;
        let q = low | (high << 4u32);
        let d = half_at(w, b) * f32::cast_from(k_scale(w, b + 4, j));
        let m = half_at(w, b + 2) * f32::cast_from(k_min(w, b + 4, j));
        v = d * f32::cast_from(q) - m;
    } else if comptime![ty == Q6_K] {
        let b = row + ((e / 256) * 210) as usize;
        let r = e % 256;
        // Two halves of 128 weights; in each, four quarters of 32 share a byte index.
        let half = r / 128;
        let quarter = (r % 128) / 32;
        let l = r % 32;
        let low = (byte_at(w, b + (half * 64 + (quarter % 2) * 32 + l) as usize)
            >> ((quarter / 2) * 4))
            & 0xFu32;
        let high = (byte_at(w, b + 128 + (half * 32 + l) as usize) >> (quarter * 2)) & 3u32;
        let q = i32::cast_from(low | (high << 4u32)) - 32i32;
        let s = byte_at(w, b + 192 + (half * 8 + l / 16 + quarter * 2) as usize);
        let s = i32::cast_from(s) - i32::cast_from(s & 0x80u32) * 2;
        v = half_at(w, b + 208) * f32::cast_from(s) * f32::cast_from(q);
    }
    v
}

/// `n` zeros: one sum per row of a step.
#[cube]
fn zeros(#[comptime] n: usize) -> Array<f32> {
    let mut a = Array::<f32>::new(n);
    #[unroll]
    for i in 0..n {
        a[i] = 0.0f32;
    }
    a
}

/// Signed value of byte `q` (two's complement).
#[cube]
fn signed(q: u32) -> f32 {
    f32::cast_from(i32::cast_from(q) - i32::cast_from(q & 0x80u32) * 2)
}

/// The dot products of weights `32g .. 32g + 32` of the row whose blocks start at byte
/// `row` with each of the `rows` rows of `x` (`k` features each), added to `acc[r]`:
/// each block's (or sub-block's) scale and minimum decoded once, each weight decoded
/// once for all the rows, sums of quantized values times activations, then scaled.
#[cube]
#[allow(clippy::too_many_arguments)]
fn group_dot(
    w: &[u32],
    row: usize,
    g: u32,
    x: &Tensor<f32>,
    k: usize,
    acc: &mut Array<f32>,
    #[comptime] ty: u32,
    #[comptime] rows: usize,
) {
    let xg = (g * 32) as usize;
    if comptime![ty == Q8_0] {
        let b = row + (g * 34) as usize;
        let mut s = zeros(rows);
        #[unroll]
        for l in 0..32usize {
            let q = signed(byte_at(w, b + 2 + l));
            #[unroll]
            for r in 0..rows {
                s[r] += q * x[r * k + xg + l];
            }
        }
        let d = half_at(w, b);
        #[unroll]
        for r in 0..rows {
            acc[r] += d * s[r];
        }
    } else if comptime![ty == Q4_0 || ty == Q4_1 || ty == Q5_0 || ty == Q5_1] {
        // 32 weights: d (and m), for Q5 a u32 of fifth bits, 16 bytes of nibble pairs.
        let five = comptime![ty == Q5_0 || ty == Q5_1];
        let size = comptime![match ty {
            Q4_0 => 18usize,
            Q4_1 => 20usize,
            Q5_0 => 22usize,
            _ => 24usize,
        }];
        let b = row + (g as usize) * size;
        let qs = b + size - 16;
        let mut qh = 0u32;
        if five {
            let at = b + size - 20;
            qh = byte_at(w, at)
                | (byte_at(w, at + 1) << 8u32)
                | (byte_at(w, at + 2) << 16u32)
                | (byte_at(w, at + 3) << 24u32);
        }
        let mut sq = zeros(rows);
        let mut sx = zeros(rows);
        #[unroll]
        for l in 0..16usize {
            let q = byte_at(w, qs + l);
            let mut lo = q & 0xFu32;
            let mut hi = q >> 4u32;
            if five {
                lo |= ((qh >> l as u32) & 1u32) << 4u32;
                hi |= ((qh >> (l as u32 + 16u32)) & 1u32) << 4u32;
            }
            let lo = f32::cast_from(lo);
            let hi = f32::cast_from(hi);
            #[unroll]
            for r in 0..rows {
                let x0 = x[r * k + xg + l];
                let x1 = x[r * k + xg + l + 16];
                sq[r] += lo * x0 + hi * x1;
                sx[r] += x0 + x1;
            }
        }
        let d = half_at(w, b);
        #[unroll]
        for r in 0..rows {
            if comptime![ty == Q4_0] {
                acc[r] += d * (sq[r] - 8.0f32 * sx[r]);
            } else if comptime![ty == Q5_0] {
                acc[r] += d * (sq[r] - 16.0f32 * sx[r]);
            } else {
                acc[r] += d * sq[r] + half_at(w, b + 2) * sx[r];
            }
        }
    } else if comptime![ty == Q4_K || ty == Q5_K] {
        let size = comptime![if ty == Q4_K { 144usize } else { 176usize }];
        let b = row + ((g / 8) as usize) * size;
        let j = g % 8;
        let qs =
            b + comptime![if ty == Q4_K { 16usize } else { 48usize }] + ((j / 2) * 32) as usize;
        let shift = (j % 2) * 4;
        let mut sq = zeros(rows);
        let mut sx = zeros(rows);
        #[unroll]
        for l in 0..32usize {
            let mut q = (byte_at(w, qs + l) >> shift) & 0xFu32;
            if comptime![ty == Q5_K] {
                q |= ((byte_at(w, b + 16 + l) >> j) & 1u32) << 4u32;
            }
            let qf = f32::cast_from(q);
            #[unroll]
            for r in 0..rows {
                let xv = x[r * k + xg + l];
                sq[r] += qf * xv;
                sx[r] += xv;
            }
        }
        let d = half_at(w, b) * f32::cast_from(k_scale(w, b + 4, j));
        let m = half_at(w, b + 2) * f32::cast_from(k_min(w, b + 4, j));
        #[unroll]
        for r in 0..rows {
            acc[r] += d * sq[r] - m * sx[r];
        }
    } else if comptime![ty == Q6_K] {
        let b = row + ((g / 8) as usize) * 210;
        let j = g % 8;
        let half = j / 4;
        let quarter = j % 4;
        let ql = b + (half * 64 + (quarter % 2) * 32) as usize;
        let qh = b + 128 + (half * 32) as usize;
        let low_shift = (quarter / 2) * 4;
        let high_shift = quarter * 2;
        let mut s0 = zeros(rows);
        let mut s1 = zeros(rows);
        #[unroll]
        for l in 0..16usize {
            let q0 = ((byte_at(w, ql + l) >> low_shift) & 0xFu32)
                | (((byte_at(w, qh + l) >> high_shift) & 3u32) << 4u32);
            let q1 = ((byte_at(w, ql + l + 16) >> low_shift) & 0xFu32)
                | (((byte_at(w, qh + l + 16) >> high_shift) & 3u32) << 4u32);
            let v0 = f32::cast_from(q0) - 32.0f32;
            let v1 = f32::cast_from(q1) - 32.0f32;
            #[unroll]
            for r in 0..rows {
                s0[r] += v0 * x[r * k + xg + l];
                s1[r] += v1 * x[r * k + xg + l + 16];
            }
        }
        let sc = b + 192 + (half * 8 + quarter * 2) as usize;
        let d = half_at(w, b + 208);
        let c0 = signed(byte_at(w, sc));
        let c1 = signed(byte_at(w, sc + 1));
        #[unroll]
        for r in 0..rows {
            acc[r] += d * (c0 * s0[r] + c1 * s1[r]);
        }
    }
}

/// `out[r, col0 + c] = sum_e x[r, e] * W[c, e]` for each of the `rows` rows of `x` (a
/// kernel per row count). A cube takes `CUBE_DIM_Y` weight rows of this chunk (`cols`
/// rows, `row_words` words each), `CUBE_DIM_X` units to a row striding over its groups
/// of 32 weights ([`group_dot`]: scales decoded once a group, each weight once for all
/// the rows), then a tree sum in shared memory per row. For the few rows of a decode
/// step (or of several sequences' decode steps), where the weights' bytes are the
/// cost: each is read from memory once per step.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn block_gemv(
    w: &[u32],
    x: &Tensor<f32>,
    out: &mut Tensor<f32>,
    k: u32,
    row_words: u32,
    col0: u32,
    n_out: u32,
    cols: u32,
    #[comptime] ty: u32,
    #[comptime] units: usize,
    #[comptime] rows: usize,
) {
    let c = cube_index() * CUBE_DIM_Y + UNIT_POS_Y;
    // Rows past the chunk still take part in every barrier.
    let active = c < cols;
    let row = (c as usize) * (row_words as usize) * 4;
    let unit = UNIT_POS_X;
    let slot = (UNIT_POS_Y * CUBE_DIM_X) as usize;
    let groups = k / 32;
    let mut acc = zeros(rows);
    if active {
        let mut g = unit;
        while g < groups {
            group_dot(w, row, g, x, k as usize, &mut acc, ty, rows);
            g += CUBE_DIM_X;
        }
    }
    let mut sums = Shared::<[f32]>::new_slice(units);
    #[unroll]
    for r in 0..rows {
        sums[slot + unit as usize] = acc[r];
        sync_cube();
        let mut half = CUBE_DIM_X / 2;
        while half > 0 {
            if unit < half {
                sums[slot + unit as usize] += sums[slot + (unit + half) as usize];
            }
            sync_cube();
            half /= 2;
        }
        if unit == 0 && active {
            out[r * (n_out as usize) + (col0 + c) as usize] = sums[slot];
        }
        sync_cube();
    }
}

/// Rows `first..first + rows` of this chunk as f32: `out[r, e]` (`out` is `[rows, k]`),
/// one unit per weight. For steps of many rows, which then run burn's tiled matmul.
#[cube(launch)]
pub fn block_dequantize(
    w: &[u32],
    out: &mut Tensor<f32>,
    k: u32,
    row_words: u32,
    first: u32,
    rows: u32,
    #[comptime] ty: u32,
) {
    let pos = unit_index() as usize;
    let total = (rows as usize) * (k as usize);
    if pos >= total {
        terminate!();
    }
    let r = pos / (k as usize);
    let e = (pos % (k as usize)) as u32;
    let row = (first as usize + r) * (row_words as usize) * 4;
    out[pos] = weight(w, row, e, ty);
}
