//! The first-divergence finder, `llama graph --compare`: the tiny Gemma 3 against
//! transformers' activations (`compare.json`, by `scripts/fixtures/make_compare_ref.py`), as
//! it is and with a fault planted in one weight, which must be named.

use std::path::Path;

use crate::common::*;

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
        copy_with_edit("gemma3", dir.path(), tensor, |w| {
            w.iter_mut().for_each(|x| *x *= 1.5)
        });
        let (ok, last) = compare(dir.path());
        assert!(!ok, "{tensor}: {last}");
        assert!(
            last.starts_with(&format!("first divergence: {node} ")),
            "{tensor}: {last}"
        );
    }
}
