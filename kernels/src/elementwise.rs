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

/// GELU's tanh approximation, `x/2 * (1 + tanh(√(2/π) (x + 0.044715 x³)))`, in place
/// (Gemma's `gelu_pytorch_tanh`), one pass where burn's version builds it from several
/// whole-tensor ops (it took half of Gemma 3's prefill).
///
/// Written as transformers writes it, `1 + tanh`, although `x / (1 + exp(-2u))` is the
/// same value without the cancellation for negative `x` and 2.5x faster: on the block
/// path, whose activations are rounded to int8 before every matmul, that rounding-level
/// change moved Gemma 3's perplexity on the test passage from 0.2% below transformers'
/// to 1.2% above it (llama.cpp's is 1.4% above), so the reference's own form is kept.
pub fn gelu_tanh(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma_f16c {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(x: &mut [f32]) {
            gelu_tanh_body(x)
        }
        // SAFETY: the CPU has AVX2 and FMA, checked by `features`.
        return unsafe { wide(x) };
    }
    gelu_tanh_body(x)
}

#[inline(always)]
fn gelu_tanh_body(x: &mut [f32]) {
    // √(2/π).
    const K: f32 = 0.797_884_6;
    let chunk = 4096;
    let run = |c: &mut [f32]| {
        for v in c.iter_mut() {
            let x = *v;
            let u = K * (x + 0.044_715 * x * x * x);
            *v = 0.5 * x * (1.0 + u.tanh());
        }
    };
    if x.len() >= 4 * chunk {
        x.par_chunks_mut(chunk).for_each(run);
    } else {
        run(x);
    }
}

/// Exact GELU, `x * Φ(x) = x/2 * (1 + erf(x / √2))`, in place (BERT's `gelu`).
///
/// erf is Abramowitz and Stegun's 7.1.26 (absolute error at most 1.5e-7): one `exp`
/// and one division per value, which the compiler vectorizes, where a libm `erf` is
/// a branchy scalar call (a 6-layer encoder spent a quarter of its step in it).
pub fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma_f16c {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(x: &mut [f32]) {
            gelu_body(x)
        }
        // SAFETY: the CPU has AVX2 and FMA, checked by `features`.
        return unsafe { wide(x) };
    }
    gelu_body(x)
}

#[inline(always)]
fn gelu_body(x: &mut [f32]) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let chunk = 4096;
    let run = |c: &mut [f32]| {
        for v in c.iter_mut() {
            let z = (*v * std::f32::consts::FRAC_1_SQRT_2).abs();
            let t = 1.0 / (1.0 + P * z);
            let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
            let erf = 1.0 - poly * (-z * z).exp();
            let erf = if *v < 0.0 { -erf } else { erf };
            *v *= 0.5 * (1.0 + erf);
        }
    };
    if x.len() >= 4 * chunk {
        x.par_chunks_mut(chunk).for_each(run);
    } else {
        run(x);
    }
}

#[cfg(test)]
mod gelu_tests {
    /// Against erf from its series (f64, exact to the last bit at these sizes).
    #[test]
    fn gelu_matches_its_definition() {
        fn erf(x: f64) -> f64 {
            // Maclaurin series; converges fast for |x| < 6 in f64 with enough terms.
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while n < 200.0 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let xs: Vec<f32> = (-600..=600).map(|i| i as f32 / 100.0).collect();
        let mut got = xs.clone();
        super::gelu(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let x64 = *x as f64;
            let want = 0.5 * x64 * (1.0 + erf(x64 / std::f64::consts::SQRT_2));
            assert!(
                (*g as f64 - want).abs() <= 1e-6,
                "gelu({x}) = {g}, want {want}"
            );
        }
    }

    #[test]
    fn gelu_tanh_matches_its_definition() {
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.025).collect();
        let mut got = xs.clone();
        super::gelu_tanh(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let x64 = x as f64;
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            let want = 0.5 * x64 * (1.0 + inner.tanh());
            assert!(
                (g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "gelu_tanh({x}) = {g}, want {want}"
            );
        }
    }
}
