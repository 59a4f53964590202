//! Counting the kernels a piece of work launches on GPU devices: every launch cubecl
//! issues (burn's fused kernels, its matmuls and copies, ours), by kernel name. What
//! `llama bench` reports as dispatches per decode token.
use std::collections::BTreeMap;
#[cfg(feature = "wgpu")]
use std::sync::{Arc, Mutex};

/// Kernel launches by kernel name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launches {
    pub by_kernel: BTreeMap<String, usize>,
}

impl Launches {
    /// All launches.
    pub fn total(&self) -> usize {
        self.by_kernel.values().sum()
    }

    /// Launches of kernels whose name contains `part`.
    pub fn matching(&self, part: &str) -> usize {
        self.by_kernel
            .iter()
            .filter(|(k, _)| k.contains(part))
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(feature = "wgpu")]
use cubecl::config::TypeNameFormatLevel;

#[cfg(feature = "wgpu")]
#[derive(Default)]
struct Counter(Mutex<BTreeMap<&'static str, usize>>);

#[cfg(feature = "wgpu")]
impl cubecl::logging::LaunchObserver for Counter {
    fn launched(&self, kernel: &'static str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(kernel).or_default() += 1;
        }
    }
}

/// Runs `f`, counting the kernels it launches on GPU devices (none elsewhere). The
/// count is process-wide: launches of other threads meanwhile count too.
pub fn count_launches<R>(f: impl FnOnce() -> R) -> (R, Launches) {
    #[cfg(feature = "wgpu")]
    {
        let counter = Arc::new(Counter::default());
        let watching = cubecl::logging::LaunchObservation::new(counter.clone());
        let out = f();
        drop(watching);
        let by_kernel = counter
            .0
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| {
                        (
                            cubecl::config::type_name_format(k, TypeNameFormatLevel::Short),
                            *n,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        (out, Launches { by_kernel })
    }
    #[cfg(not(feature = "wgpu"))]
    {
        (f(), Launches::default())
    }
}
