//! Shared helpers of the integration tests.
#![allow(dead_code)]
pub mod gguf_writer;
pub mod server;
pub mod smollm2;

use std::path::PathBuf;

use burn::tensor::Device;
use llama::graph::{Graph, PassContext, Pipeline, Program};
use llama::models::Model;
use llama::runtime::Session;
use serde::Deserialize;

/// Tiny models of every decoder family: three Llamas, then one of each other family.
pub const TINY: &[&str] = &[
    "llama3",
    "llama-tied",
    "llama2-mha",
    "mistral",
    "qwen2",
    "phi3",
    "gemma",
    "gemma3",
];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

/// What transformers computed for a tiny model (see tests/fixtures/README.md).
#[derive(Deserialize)]
pub struct Reference {
    pub input_ids: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub argmax: Vec<u32>,
    pub greedy_prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_margins: Vec<f32>,
}

pub fn reference(name: &str) -> Reference {
    let path = fixture(name).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference.json parses")
}

pub fn flex() -> Device {
    Device::flex()
}

#[allow(deprecated)]
pub fn ndarray() -> Device {
    Device::ndarray()
}

pub fn load(name: &str, device: &Device) -> Model {
    Model::load(&fixture(name), device).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// The model's graph after `pipeline`.
pub fn graph(name: &str, device: &Device, pipeline: &Pipeline) -> Graph {
    let mut g = load(name, device).build_graph().expect("graph builds");
    pipeline
        .run(
            &mut g,
            &PassContext {
                device: device.clone(),
            },
        )
        .expect("passes run");
    g
}

pub fn session_of(graph: Graph, device: &Device, context: usize) -> Session {
    Session::new(
        Program::new(graph, device.clone()).expect("program"),
        context,
    )
    .expect("session")
}

pub fn session(name: &str, device: &Device, pipeline: &Pipeline) -> Session {
    session_of(graph(name, device, pipeline), device, 64)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Full-sequence logits of `ids` in a fresh session.
pub fn full_forward(session: &mut Session, ids: &[u32]) -> Vec<Vec<f32>> {
    session.reset();
    let logits = session.prefill(ids).expect("prefill");
    (0..logits.rows).map(|r| logits.row(r).to_vec()).collect()
}

/// Where the scripts keep models and tools: `$LLAMA_RS_CACHE`, else
/// `~/.cache/llama-rs`.
pub fn cache_dir() -> PathBuf {
    std::env::var("LLAMA_RS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/llama-rs")
        })
}

/// Reads this process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    status_kib("VmRSS").unwrap_or(0)
}

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`: the peak).
pub fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The real model's GGUF: `$LLAMA_RS_MODEL`, else the cache that
/// `scripts/fetch/fetch-model.sh` fills. Missing, it fails the test and says how to fetch it.
pub fn real_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("LLAMA_RS_MODEL") {
        return PathBuf::from(p);
    }
    let path = cache_dir().join("models/smollm2-135m-instruct-q4_1.gguf");
    assert!(
        path.exists(),
        "the real model is missing at {}: run scripts/fetch/fetch-model.sh",
        path.display()
    );
    path
}

pub fn smollm2_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2")
        .join(name)
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A session on a model file or directory with the standard passes.
pub fn session_for(path: &std::path::Path, device: &Device, context: usize) -> Session {
    let model = Model::load(path, device).unwrap_or_else(|e| panic!("{e}"));
    let mut g = model.build_graph().expect("graph");
    Pipeline::standard()
        .run(
            &mut g,
            &PassContext {
                device: device.clone(),
            },
        )
        .expect("passes");
    session_of(g, device, context)
}

/// The default wgpu adapter (lavapipe on machines without a GPU). A machine with no
/// adapter at all fails the wgpu tests: install `mesa-vulkan-drivers`.
pub fn wgpu() -> Device {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("llama-rs-test-runtime");
        let _ = std::fs::create_dir_all(&dir);
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
    let devices = Device::enumerate(burn::tensor::DeviceType::Wgpu).into_vec();
    assert!(
        !devices.is_empty(),
        "no wgpu adapter: install a Vulkan driver (Debian: apt-get install mesa-vulkan-drivers)"
    );
    Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

/// The gap between a row's two largest logits.
pub fn margin(row: &[f32]) -> f32 {
    let mut v = row.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

/// Normalized mean squared error of `got` against `want`, as llama.cpp's
/// test-backend-ops measures backends.
pub fn nmse(want: &[f32], got: &[f32]) -> f64 {
    assert_eq!(want.len(), got.len(), "lengths differ");
    let err: f64 = want
        .iter()
        .zip(got)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum();
    if norm == 0.0 {
        err
    } else {
        err / norm
    }
}

/// Runs the `llama` binary as a user would.
pub fn llama(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the binary runs")
}

/// Token ids for a tiny model (vocabularies of 256), varied by `seed`.
pub fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 101 + 11) % 251 + 2)
        .collect()
}

/// Greedy generation of up to `max_tokens`.
pub fn greedy(max_tokens: usize) -> llama::runtime::GenerateOptions {
    llama::runtime::GenerateOptions {
        max_tokens,
        ..Default::default()
    }
}

/// all-MiniLM-L6-v2's directory: `$LLAMA_RS_MINILM`, else the cache that
/// `scripts/fetch/fetch-minilm.sh` fills. Missing, it fails the test and says how to fetch it.
pub fn minilm_path() -> PathBuf {
    if let Ok(p) = std::env::var("LLAMA_RS_MINILM") {
        return PathBuf::from(p);
    }
    let path = cache_dir().join("models/all-minilm-l6-v2");
    assert!(
        path.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 is missing at {}: run scripts/fetch/fetch-minilm.sh",
        path.display()
    );
    path
}

/// A cached model file that a fetch script fills; missing, it fails the test and names
/// the script.
fn cached_model(file: &str, script: &str) -> PathBuf {
    let path = cache_dir().join("models").join(file);
    assert!(
        path.exists(),
        "{file} is missing at {}: run {script}",
        path.display()
    );
    path
}

/// Gemma 3 270M, Q4_K_M GGUF (`scripts/fetch/fetch-gemma3.sh`).
pub fn gemma3_path() -> PathBuf {
    cached_model("gemma-3-270m-q4_k_m.gguf", "scripts/fetch/fetch-gemma3.sh")
}

/// Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF (`scripts/fetch/fetch-qwen2.5.sh`).
pub fn qwen25_path() -> PathBuf {
    cached_model(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "scripts/fetch/fetch-qwen2.5.sh",
    )
}

/// `tiny/<name>` copied into `out` with `edit` applied to the values of one tensor (by
/// its HF name): a fault planted in a model that is otherwise the reference's.
pub fn copy_with_edit(name: &str, out: &std::path::Path, tensor: &str, edit: impl Fn(&mut [f32])) {
    use safetensors::tensor::TensorView;
    let dir = fixture(name);
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        if dir.join(f).exists() {
            std::fs::copy(dir.join(f), out.join(f)).unwrap();
        }
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if n == tensor {
            let mut values: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            edit(&mut values);
            data = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
        tensors.push((n, view.shape().to_vec(), data));
    }
    assert!(tensors.iter().any(|t| t.0 == tensor), "no tensor {tensor}");
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}
