//! Fused attention for steps of a few query rows (decode, small batches): one kernel
//! instead of the dozen tensor ops of the general path (reshapes, two matmuls, mask,
//! softmax), and no score matrix in device memory.
use cubecl::prelude::*;

/// Attention of query row `CUBE_POS_Y` (at position `past + row`), head `CUBE_POS_X`,
/// over the `rows` cached keys (key `j` at position `past + seq - rows + j`), causal
/// and, when `window > 0`, within `window` positions. `q: [seq, heads·hd]`, `k` and `v`:
/// `[rows, kv_heads·hd]` of the cache's element type `K` (f16 or f32; widened to f32
/// as they are read), `out: [seq, heads·hd]`.
///
/// Each unit walks keys `u, u + units, ...` with an online softmax (running maximum,
/// sum and weighted values in registers); the units' partial results are then merged
/// in shared memory, each rescaled to the common maximum.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn decode_attention<K: Float>(
    q: &Tensor<f32>,
    k: &Tensor<K>,
    v: &Tensor<K>,
    out: &mut Tensor<f32>,
    rows: u32,
    past: u32,
    seq: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
    window: u32,
    #[comptime] hd: usize,
    #[comptime] units: usize,
    #[define(K)] _kv: ElemType,
) {
    let row = CUBE_POS_Y;
    let head = CUBE_POS_X;
    let unit = UNIT_POS_X as usize;
    let kv_head = head / (n_heads / n_kv_heads);
    let q_pos = past + row;
    let first_key = past + seq - rows;
    let q_at = (row * n_heads + head) as usize * hd;
    let kv_width = n_kv_heads as usize * hd;

    let mut m = f32::new(-3.0e38f32);
    let mut l = 0.0f32;
    let mut acc = Array::<f32>::new(hd);
    #[unroll]
    for d in 0..hd {
        acc[d] = 0.0f32;
    }
    let mut j = unit;
    while j < rows as usize {
        let k_pos = first_key + j as u32;
        let visible = k_pos <= q_pos && (window == 0u32 || q_pos - k_pos < window);
        if visible {
            let k_at = j * kv_width + kv_head as usize * hd;
            let mut s = 0.0f32;
            #[unroll]
            for d in 0..hd {
                s += q[q_at + d] * f32::cast_from(k[k_at + d]);
            }
            s *= scale;
            let m_new = f32::max(m, s);
            let c = (m - m_new).exp();
            let p = (s - m_new).exp();
            l = l * c + p;
            #[unroll]
            for d in 0..hd {
                acc[d] = acc[d] * c + p * f32::cast_from(v[k_at + d]);
            }
            m = m_new;
        }
        j += units;
    }

    // Merge the units' partial softmaxes. (The running maximum starts at -3e38, not
    // -inf: masked keys are skipped, so it only seeds the maximum.)
    let mut maxes = Shared::<[f32]>::new_slice(units);
    let mut sums = Shared::<[f32]>::new_slice(units);
    let mut parts = Shared::<[f32]>::new_slice(units * hd);
    maxes[unit] = m;
    #[unroll]
    for d in 0..hd {
        parts[unit * hd + d] = acc[d];
    }
    sync_cube();
    let mut top = f32::new(-3.0e38f32);
    for u in 0..units {
        top = f32::max(top, maxes[u]);
    }
    // A unit that saw no visible key has l = 0: its factor is irrelevant.
    sums[unit] = l * (m - top).exp();
    sync_cube();
    let mut total = 0.0f32;
    for u in 0..units {
        total += sums[u];
    }
    let mut d = unit;
    while d < hd {
        let mut o = 0.0f32;
        for u in 0..units {
            o += parts[u * hd + d] * (maxes[u] - top).exp();
        }
        out[q_at + d] = o / total;
        d += units;
    }
}
