//! The first-divergence finder, `llama graph --compare`: the tiny Gemma 3 against
//! transformers' activations (`compare.json`, by `scripts/make_compare_ref.py`), as
//! it is and with a fault planted in one weight, which must be named.

use std::path::Path;

use crate::common::*;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

/// `tiny/gemma3` copied into `out` with `scale` applied to one weight.
fn plant_fault(out: &Path, tensor: &str, scale: f32) {
    let dir = fixture("gemma3");
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == tensor {
            for c in data.chunks_exact_mut(4) {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * scale;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        tensors.push((name, view.shape().to_vec(), data));
    }
    assert!(tensors.iter().any(|t| t.0 == tensor), "{tensor}");
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

/// `llama graph --compare` on `model`: (success, last stdout line).
fn compare(model: &Path) -> (bool, String) {
    let reference = fixture("gemma3").join("compare.json");
    let out = llama(&[
        "graph",
        "--model",
        model.to_str().unwrap(),
        "--passes",
        "none",
        "--precision",
        "f32",
        "--compare",
        reference.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() || out.status.code() == Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default().to_string();
    (out.status.success(), last)
}

#[test]
fn the_tiny_gemma3_agrees_with_transformers_at_every_node() {
    let (ok, last) = compare(&fixture("gemma3"));
    assert!(ok, "{last}");
    // Every node the reference holds (4 layers of 16, and 3 more) was compared.
    assert!(last.starts_with("no divergence: 67 nodes"), "{last}");
}

#[test]
fn a_planted_fault_is_reported_at_its_node() {
    for (tensor, node) in [
        (
            "model.layers.1.self_attn.k_norm.weight",
            "blk.1.attn_k_norm",
        ),
        ("model.layers.2.mlp.down_proj.weight", "blk.2.ffn_down"),
        (
            "model.layers.3.post_feedforward_layernorm.weight",
            "blk.3.post_ffw_norm",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        plant_fault(dir.path(), tensor, 1.5);
        let (ok, last) = compare(dir.path());
        assert!(!ok, "{tensor}: {last}");
        assert!(
            last.starts_with(&format!("first divergence: {node} ")),
            "{tensor}: {last}"
        );
    }
}
