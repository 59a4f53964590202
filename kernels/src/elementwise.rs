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
/// same value without the cancellation for negative `x`: on the block path, whose
/// activations are rounded to int8 before every matmul, that rounding-level change
/// moved Gemma 3's perplexity on the test passage from 0.2% below transformers' to 1.2%
/// above it (llama.cpp's is 1.4% above), so the reference's own form is kept. So is a
/// tanh rounded as libm's: with AVX2 it is `1 - 2 / (e^2|u| + 1)` with its sign,
/// computed in f64 four at a time and rounded to f32 (libm's `tanhf` is a scalar call,
/// and was a quarter of Gemma 3's prefill). An f32 version of the same formula, one or
/// two ulps off, moved that perplexity by 0.8%.
pub fn gelu_tanh(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma_f16c {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked by `features`.
        return in_chunks(x, |c| unsafe { gelu_tanh_avx2(c) });
    }
    in_chunks(x, gelu_tanh_portable)
}

/// √(2/π).
const SQRT_2_PI: f32 = 0.797_884_6;

fn gelu_tanh_portable(c: &mut [f32]) {
    for v in c.iter_mut() {
        let x = *v;
        let u = SQRT_2_PI * (x + 0.044_715 * x * x * x);
        *v = 0.5 * x * (1.0 + u.tanh());
    }
}

/// `f` over `x` in chunks across threads when there is enough of it.
fn in_chunks(x: &mut [f32], f: impl Fn(&mut [f32]) + Sync + Send) {
    let chunk = 4096;
    if x.len() >= 4 * chunk {
        x.par_chunks_mut(chunk).for_each(f);
    } else {
        f(x);
    }
}

/// `eight` on each group of eight values of `c` (given a pointer to the group), a last
/// partial group through a padded copy, so every value takes the same steps.
///
/// # Safety
/// `eight` may read and write exactly the eight values at its pointer.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn by_eights(c: &mut [f32], mut eight: impl FnMut(*mut f32)) {
    let mut groups = c.chunks_exact_mut(8);
    for g in &mut groups {
        eight(g.as_mut_ptr());
    }
    let rest = groups.into_remainder();
    if !rest.is_empty() {
        let mut pad = [0f32; 8];
        pad[..rest.len()].copy_from_slice(rest);
        eight(pad.as_mut_ptr());
        let n = rest.len();
        rest.copy_from_slice(&pad[..n]);
    }
}

/// [`gelu_tanh`] eight values at a time (a last partial group through a padded copy,
/// so every value takes the same steps).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gelu_tanh_avx2(c: &mut [f32]) {
    use std::arch::x86_64::*;

    /// e^x on four f64 lanes for x in [0, 40]: `x = n ln 2 + r`, |r| <= ln 2 / 2, a
    /// degree-11 Taylor polynomial for e^r (relative error under 1e-14), 2^n in the
    /// exponent bits.
    #[inline(always)]
    unsafe fn exp4(x: __m256d) -> __m256d {
        let n = _mm256_round_pd(
            _mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(0.693_147_180_369_123_8), x);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.908_214_929_270_587_7e-10), r);
        // 1 / k! for k = 11 down to 0.
        const C: [f64; 12] = [
            2.505_210_838_544_172e-8,
            2.755_731_922_398_589_3e-7,
            2.755_731_922_398_589e-6,
            2.480_158_730_158_73e-5,
            1.984_126_984_126_984e-4,
            1.388_888_888_888_889e-3,
            8.333_333_333_333_333e-3,
            4.166_666_666_666_666_4e-2,
            0.166_666_666_666_666_66,
            0.5,
            1.0,
            1.0,
        ];
        let mut p = _mm256_set1_pd(C[0]);
        for c in &C[1..] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(*c));
        }
        let bits = _mm256_slli_epi64(
            _mm256_add_epi64(
                _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)),
                _mm256_set1_epi64x(1023),
            ),
            52,
        );
        _mm256_mul_pd(p, _mm256_castsi256_pd(bits))
    }
    /// tanh of four f32 values in f64, rounded to f32.
    #[inline(always)]
    unsafe fn tanh4(u: __m128) -> __m128 {
        let u = _mm256_cvtps_pd(u);
        let sign = _mm256_set1_pd(-0.0);
        let a = _mm256_min_pd(_mm256_andnot_pd(sign, u), _mm256_set1_pd(20.0));
        let one = _mm256_set1_pd(1.0);
        let e = exp4(_mm256_add_pd(a, a));
        let t = _mm256_sub_pd(
            one,
            _mm256_div_pd(_mm256_set1_pd(2.0), _mm256_add_pd(e, one)),
        );
        _mm256_cvtpd_ps(_mm256_or_pd(t, _mm256_and_pd(sign, u)))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn eight(p: *mut f32) {
        let x = _mm256_loadu_ps(p);
        // u = √(2/π) (x + 0.044715 x x x), multiplied in the scalar form's order.
        let cube = _mm256_mul_ps(
            _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.044_715), x), x),
            x,
        );
        let u = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_PI), _mm256_add_ps(x, cube));
        let tanh = _mm256_set_m128(
            tanh4(_mm256_extractf128_ps(u, 1)),
            tanh4(_mm256_castps256_ps128(u)),
        );
        let half_x = _mm256_mul_ps(_mm256_set1_ps(0.5), x);
        let one = _mm256_set1_ps(1.0);
        _mm256_storeu_ps(p, _mm256_mul_ps(half_x, _mm256_add_ps(one, tanh)));
    }
    // SAFETY: `eight` reads and writes the eight values at its pointer.
    by_eights(c, |p| eight(p));
}

/// Exact GELU, `x * Φ(x) = x/2 * (1 + erf(x / √2))`, in place (BERT's `gelu`).
///
/// erf is Abramowitz and Stegun's 7.1.26 (absolute error at most 1.5e-7): one `exp`
/// and one division per value, where a libm `erf` is a branchy scalar call (a 6-layer
/// encoder spent a quarter of its step in it). On x86-64 with AVX2 and FMA, eight
/// values at a time with a vector `exp` (libm's `expf` is a scalar call the compiler
/// cannot vectorize: it was most of the time left in GELU).
pub fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma_f16c {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked by `features`.
        return in_chunks(x, |c| unsafe { gelu_avx2(c) });
    }
    in_chunks(x, gelu_scalar);
}

/// Abramowitz and Stegun's 7.1.26 for erf: `1 - t (a1 + t (a2 + ...)) e^(-z^2)` with
/// `t = 1 / (1 + p z)`, for `z >= 0`.
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152_1,
    1.061_405_4,
];

fn gelu_scalar(c: &mut [f32]) {
    for v in c.iter_mut() {
        let z = (*v * std::f32::consts::FRAC_1_SQRT_2).abs();
        let t = 1.0 / (1.0 + ERF_P * z);
        let poly = t * (ERF_A[0] + t * (ERF_A[1] + t * (ERF_A[2] + t * (ERF_A[3] + t * ERF_A[4]))));
        let erf = 1.0 - poly * (-z * z).exp();
        let erf = if *v < 0.0 { -erf } else { erf };
        *v *= 0.5 * (1.0 + erf);
    }
}

/// [`gelu_scalar`] eight values at a time (a last partial group through a padded
/// copy, so every value takes the same steps).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gelu_avx2(c: &mut [f32]) {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn eight(p: *mut f32) {
        let x = _mm256_loadu_ps(p);
        let sign = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        let z = _mm256_andnot_ps(
            sign,
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2)),
        );
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(ERF_P), z, one));
        let mut poly = _mm256_set1_ps(ERF_A[4]);
        for a in ERF_A[..4].iter().rev() {
            poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(*a));
        }
        poly = _mm256_mul_ps(poly, t);
        let e = crate::attention::avx2::exp8(_mm256_mul_ps(_mm256_xor_ps(z, sign), z));
        // erf(|x| / √2) >= 0, given the sign of x.
        let erf = _mm256_fnmadd_ps(poly, e, one);
        let erf = _mm256_or_ps(erf, _mm256_and_ps(sign, x));
        let half_x = _mm256_mul_ps(_mm256_set1_ps(0.5), x);
        _mm256_storeu_ps(p, _mm256_mul_ps(half_x, _mm256_add_ps(one, erf)));
    }
    // SAFETY: `eight` reads and writes the eight values at its pointer.
    by_eights(c, |p| eight(p));
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

    /// The vector GELU is the scalar one to 1e-6 (the bound both keep to GELU's
    /// definition; for negative inputs the result is a difference of nearly equal
    /// terms, so a unit in the last place of `erf` is far more than one of the
    /// result) or a few units in the last place of large results, on a sweep over the
    /// range activations take (and far past it) whose length leaves a partial group of
    /// eight.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_gelu_is_the_scalar_one() {
        assert!(
            crate::features().avx2_fma_f16c,
            "this test checks the AVX2 form"
        );
        let xs: Vec<f32> = (0..200_003)
            .map(|i| (i as f32 - 100_000.0) * 4e-4)
            .collect();
        let mut simd = xs.clone();
        super::gelu(&mut simd);
        let mut scalar = xs.clone();
        super::gelu_scalar(&mut scalar);
        for ((x, v), s) in xs.iter().zip(&simd).zip(&scalar) {
            assert!(
                (v - s).abs() <= 1e-6f32.max(4.0 * f32::EPSILON * s.abs()),
                "gelu({x}): vector {v}, scalar {s}"
            );
        }
    }

    /// The AVX2 tanh is correctly rounded (f64's tanh rounded to f32) but for rare
    /// ties: on a sweep of a million inputs over the range activations take, the
    /// vector form equals that reference, bit for bit, on all but a few.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_gelu_tanh_rounds_its_tanh_correctly() {
        assert!(
            crate::features().avx2_fma_f16c,
            "this test checks the AVX2 form"
        );
        let xs: Vec<f32> = (0..1_000_000)
            .map(|i| (i as f32 - 500_000.0) * 2e-5)
            .collect();
        let mut simd = xs.clone();
        super::gelu_tanh(&mut simd);
        let differ = xs
            .iter()
            .zip(&simd)
            .filter(|&(&x, g)| {
                let u = super::SQRT_2_PI * (x + 0.044_715 * x * x * x);
                let want = 0.5 * x * (1.0 + (u as f64).tanh() as f32);
                want.to_bits() != g.to_bits()
            })
            .count();
        assert!(differ <= 10, "{differ} of a million differ");
    }

    #[test]
    fn gelu_tanh_matches_its_definition() {
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.025).collect();
        let mut got = xs.clone();
        super::gelu_tanh(&mut got);
        let mut portable = xs.clone();
        super::gelu_tanh_portable(&mut portable);
        for (&x, &g) in xs.iter().zip(&got).chain(xs.iter().zip(&portable)) {
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
