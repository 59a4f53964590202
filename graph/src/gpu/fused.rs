//! One-kernel forms of the ops between the matmuls of a GPU step, where burn-fusion
//! would launch several: RMSNorm (its reduction and broadcast take a fused elementwise
//! kernel before and two after the reduce), RoPE (the rotation, then a concatenation
//! of the halves) and a KV cache write (a cast, then a slice assignment).
use cubecl::prelude::*;

use super::kernels::{cube_index, unit_index};

/// RMSNorm of each group of `g` features: `out = x · w / sqrt(mean(x²) + eps)`, one
/// cube per group (of `groups`), its `units` units striding over the features and
/// summing their squares in a tree. The same operations in the same order as the burn
/// lowering (`x · (1 / sqrt(mean + eps)) · w`), up to the order of the sum.
#[cube(launch)]
pub fn rms_norm(
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    out: &mut Tensor<f32>,
    groups: u32,
    g: u32,
    eps: f32,
    #[comptime] units: usize,
) {
    let group = cube_index();
    // Every unit of a cube has the same group: the whole cube leaves, or none of it.
    if group >= groups {
        terminate!();
    }
    let unit = UNIT_POS_X;
    let base = (group as usize) * (g as usize);
    let mut acc = 0.0f32;
    let mut i = unit;
    while i < g {
        let v = x[base + i as usize];
        acc += v * v;
        i += CUBE_DIM_X;
    }
    let mut sums = Shared::<[f32]>::new_slice(units);
    sums[unit as usize] = acc;
    sync_cube();
    let mut half = CUBE_DIM_X / 2;
    while half > 0 {
        if unit < half {
            sums[unit as usize] += sums[(unit + half) as usize];
        }
        sync_cube();
        half /= 2;
    }
    let inv = 1.0f32 / f32::sqrt(sums[0] / f32::cast_from(g) + eps);
    let mut j = unit;
    while j < g {
        let at = base + j as usize;
        out[at] = x[at] * inv * w[j as usize];
        j += CUBE_DIM_X;
    }
}

/// Rotate-half RoPE of `x: [seq, heads · 2·half]`, row `r` turned by row `first + r`
/// of the angle tables `cos`, `sin: [positions, half]`; one unit per pair of features
/// (`total = seq · heads · half`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &Tensor<f32>,
    cos: &Tensor<f32>,
    sin: &Tensor<f32>,
    out: &mut Tensor<f32>,
    total: u32,
    heads: u32,
    half: u32,
    first: u32,
) {
    let pos = unit_index();
    if pos >= total {
        terminate!();
    }
    let i = pos % half;
    let row_head = pos / half;
    let row = row_head / heads;
    let a = (row_head * 2 * half + i) as usize;
    let b = a + half as usize;
    let t = ((first + row) * half + i) as usize;
    let c = cos[t];
    let s = sin[t];
    let x1 = x[a];
    let x2 = x[b];
    out[a] = x1 * c - x2 * s;
    out[b] = x2 * c + x1 * s;
}

/// `cache[at + r, ..] = new[r, ..]` in the cache's element type `K` (rounded as a cast
/// rounds), for the `total` values of `new: [rows, width]`, written in place.
#[cube(launch)]
pub fn write_rows<K: Float>(
    new: &Tensor<f32>,
    cache: &mut Tensor<K>,
    total: u32,
    offset: u32,
    #[define(K)] _k: ElemType,
) {
    let pos = unit_index();
    if pos >= total {
        terminate!();
    }
    cache[(offset + pos) as usize] = K::cast_from(new[pos as usize]);
}
