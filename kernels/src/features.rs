//! The SIMD extensions of this CPU, detected once.
//!
//! Every kernel with a `#[target_feature]` build asks [`features`] before calling it;
//! this is the only place that runs `is_x86_feature_detected!`. The baseline x86-64
//! target allows only SSE2, so without this check the wide builds may not run at all.
use std::sync::OnceLock;

/// Which of the instruction sets the kernels use this CPU has. All false off x86-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX2, FMA and F16C together: what every SIMD kernel here needs at least.
    pub avx2_fma_f16c: bool,
    /// AVX-512 F, VL and VNNI: `u8 x i8` dot products for the packed rows, in the
    /// 256-bit EVEX encoding.
    pub avx512vnni: bool,
    /// AVX-VNNI: the same dot products in the VEX encoding (preferred where present).
    pub avxvnni: bool,
}

impl Features {
    /// Asks the CPU (prefer [`features`], which asks once).
    pub fn detect() -> Features {
        #[cfg(target_arch = "x86_64")]
        {
            Features {
                avx2_fma_f16c: is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c"),
                avx512vnni: is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni"),
                avxvnni: is_x86_feature_detected!("avxvnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Features::default()
        }
    }
}

/// This CPU's [`Features`], detected on the first call.
pub fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(Features::detect)
}
