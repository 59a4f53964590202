//! SiLU and SwiGLU over host rows, in place.
//!
//! Plain Rust that the compiler vectorizes; on x86-64 SiLU also has a copy compiled
//! for AVX2 + FMA, picked at run time ([`crate::features`]).
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::features::features;

/// Rows of `[gate | up]` (each `n` wide) to rows of `silu(gate) * up`, in place: each
/// row gated into its own first half (rows across threads), then the halves moved
/// together (row `r` from `2rn` to `rn`, so nothing is overwritten before it is read)
/// and the buffer's second half given back.
pub fn swiglu(x: &mut Vec<f32>, n: usize) {
    if n == 0 {
        return;
    }
    let rows = x.len() / (2 * n);
    let gate = |row: &mut [f32]| {
        let (gate, up) = row.split_at_mut(n);
        silu(gate);
        for (g, u) in gate.iter_mut().zip(up.iter()) {
            *g *= *u;
        }
    };
    if rows > 1 {
        x.par_chunks_mut(2 * n).for_each(gate);
    } else {
        x.chunks_mut(2 * n).for_each(gate);
    }
    for r in 1..rows {
        x.copy_within(2 * r * n..(2 * r + 1) * n, r * n);
    }
    x.truncate(rows * n);
    x.shrink_to_fit();
}

/// `x / (1 + e^-x)` in place.
pub fn silu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma_f16c {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(x: &mut [f32]) {
            silu_body(x)
        }
        // SAFETY: the CPU has AVX2 and FMA, checked by `features`.
        return unsafe { wide(x) };
    }
    silu_body(x)
}

#[inline(always)]
fn silu_body(x: &mut [f32]) {
    let chunk = 4096;
    let run = |c: &mut [f32]| {
        for v in c.iter_mut() {
            *v /= 1.0 + (-*v).exp();
        }
    };
    if x.len() >= 4 * chunk {
        x.par_chunks_mut(chunk).for_each(run);
    } else {
        run(x);
    }
}
