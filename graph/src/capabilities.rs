//! What a device can run besides burn's own tensor ops: asked once per device, and
//! read by the executor (which lowering each node gets), the KV cache (where its rows
//! live) and the runtime's compile policy (which passes, which weight storage).
use burn::tensor::Device;

/// The one answer to "what may run on this device".
///
/// | device | host kernels | host KV cache | device blocks |
/// |---|---|---|---|
/// | burn-flex (CPU) | yes | yes | no |
/// | burn-ndarray (CPU) | no: pure burn, the reference the others are checked against | no | no |
/// | burn-wgpu (GPU) | no | no | yes |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Our host kernels (`llama-kernels`: block matmuls over GGML blocks, RMSNorm, RoPE,
    /// SiLU/SwiGLU, attention over the host cache) run on this device's tensors, which
    /// live in host memory; a whole step runs on a worker of rayon's pool.
    pub host_kernels: bool,
    /// Keys and values of full-attention layers live in host memory (f16 or f32), grown
    /// as positions arrive and read in place by the host attention. Otherwise the cache
    /// is a pair of preallocated tensors per layer on the device.
    pub host_kv: bool,
    /// GGML block weights stay in their blocks in device memory and our GPU kernels
    /// multiply them ([`crate::gpu::DeviceBlocks`]).
    pub device_blocks: bool,
}

impl Capabilities {
    /// The capabilities of `device`.
    pub fn of(device: &Device) -> Capabilities {
        let host = *device == Device::flex();
        Capabilities {
            host_kernels: host,
            host_kv: host,
            device_blocks: crate::gpu::DeviceBlocks::supported(device),
        }
    }
}
