//! Backends and devices: the one place a burn backend is named.
use burn::tensor::Device;
#[cfg(feature = "wgpu")]
use burn::tensor::{DeviceKind, DeviceType, Tensor};

use crate::error::{Result, RuntimeError};

/// Where the graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// burn-ndarray: CPU, pure burn ops throughout; the portable reference.
    Ndarray,
    /// burn-flex: CPU, with our host kernels (the fast path).
    #[default]
    Flex,
    /// burn-wgpu: Vulkan, Metal or DX12 through wgpu (a GPU, or lavapipe on the CPU).
    Wgpu,
}

impl Backend {
    /// The lower-case name users type (`--backend flex`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Ndarray => "ndarray",
            Backend::Flex => "flex",
            Backend::Wgpu => "wgpu",
        }
    }

    /// The backend's device `index` (default: the best one), checked to be usable.
    #[allow(deprecated)] // `Device::ndarray` is marked deprecated in favour of flex.
    pub fn device(self, index: Option<usize>) -> Result<Device> {
        let cpu_only = |name: &str| match index {
            None | Some(0) => Ok(()),
            Some(i) => Err(RuntimeError::Device(format!(
                "--device {i}: backend {name} has one device, 0"
            ))),
        };
        match self {
            Backend::Ndarray => {
                cpu_only("ndarray")?;
                Ok(Device::ndarray())
            }
            Backend::Flex => {
                cpu_only("flex")?;
                Ok(Device::flex())
            }
            Backend::Wgpu => gpu_device(index),
        }
    }
}

const NO_ADAPTER: &str =
    "backend wgpu: no GPU adapter found (no Vulkan, Metal or DX12 driver); use --backend flex";

/// GPU drivers print warnings of their own (Mesa: "XDG_RUNTIME_DIR is invalid or not
/// set") when this is unset; give them a private directory so users see none.
#[cfg(feature = "wgpu")]
fn quiet_drivers() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join(format!("llama-rs-runtime-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            }
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

/// Runs `f`, turning a panic inside the GPU stack into `None` without printing it.
#[cfg(feature = "wgpu")]
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(f).ok();
    std::panic::set_hook(hook);
    out
}

/// Every wgpu adapter, in a stable order.
#[cfg(feature = "wgpu")]
pub fn gpu_adapters() -> Vec<Device> {
    quiet_drivers();
    quietly(|| Device::enumerate(DeviceType::Wgpu).into_vec()).unwrap_or_default()
}

/// A build without the `wgpu` feature has no adapters.
#[cfg(not(feature = "wgpu"))]
pub fn gpu_adapters() -> Vec<Device> {
    Vec::new()
}

/// Every wgpu adapter, each with a line describing it; an error when there is none.
pub fn list_gpus() -> Result<Vec<String>> {
    let adapters = gpu_adapters();
    if adapters.is_empty() {
        return Err(RuntimeError::Device(NO_ADAPTER.into()));
    }
    Ok(adapters.iter().map(describe_gpu).collect())
}

/// A line describing an adapter: name, type, graphics API, shader target.
pub fn describe_gpu(device: &Device) -> String {
    // The device's Debug form is the only place burn names the adapter type and API.
    let debug = format!("{device:?}");
    let field = |key: &str| {
        debug
            .split(&format!("{key}: "))
            .nth(1)
            .and_then(|rest| rest.split([',', ' ', '}']).next())
            .unwrap_or("?")
            .to_string()
    };
    let (kind, mut api) = (field("kind"), field("backend"));
    match adapter_identity(device) {
        Some((name, fingerprint)) => {
            if api == "Auto" {
                // The shader target says which API the runtime settled on.
                api = match fingerprint.split('_').next() {
                    Some("spirv") => "Vulkan".into(),
                    Some("msl") => "Metal".into(),
                    Some("hlsl") => "DX12".into(),
                    _ => api,
                };
            }
            format!("{name} | type {kind} | api {api} | shaders {fingerprint} | memory unknown")
        }
        None => format!("type {kind} | api {api}"),
    }
}

/// The adapter's name and shader target, when the device reports them.
#[cfg(feature = "wgpu")]
fn adapter_identity(device: &Device) -> Option<(String, String)> {
    quietly(|| device.identity())
        .flatten()
        .map(|id| (id.name, id.fingerprint))
}

#[cfg(not(feature = "wgpu"))]
fn adapter_identity(_device: &Device) -> Option<(String, String)> {
    None
}

/// A build without the `wgpu` feature refuses the backend.
#[cfg(not(feature = "wgpu"))]
fn gpu_device(_index: Option<usize>) -> Result<Device> {
    Err(RuntimeError::Device(
        "backend wgpu: this build has no GPU support (built without the `wgpu` feature); use --backend flex".into(),
    ))
}

/// The default adapter, or adapter `index` of [`gpu_adapters`], once it has run an op.
#[cfg(feature = "wgpu")]
fn gpu_device(index: Option<usize>) -> Result<Device> {
    let adapters = gpu_adapters();
    if adapters.is_empty() {
        return Err(RuntimeError::Device(NO_ADAPTER.into()));
    }
    let device = match index {
        None => Device::wgpu(DeviceKind::DefaultDevice),
        Some(i) => match adapters.get(i) {
            Some(d) => d.clone(),
            None => {
                return Err(RuntimeError::Device(format!(
                    "backend wgpu: there is no adapter {i} ({} found, see `llama devices`); use --backend flex",
                    adapters.len()
                )))
            }
        },
    };
    let probe = device.clone();
    let works = quietly(move || Tensor::<1>::ones([4], &probe).sum().into_scalar::<f32>() == 4.0);
    if works != Some(true) {
        return Err(RuntimeError::Device(
            "backend wgpu: the adapter failed to run a kernel; use --backend flex".into(),
        ));
    }
    Ok(device)
}
