//! HF checkpoints as people have them: sharded, and in f16/bf16.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use llama::graph::Pipeline;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// Rewrites the tiny model's weights into `out` as `shards` files plus an index,
/// converting each tensor with `convert`.
fn reshard(out: &Path, shards: usize, dtype: Dtype, convert: impl Fn(&[u8]) -> Vec<u8>) {
    let src = fixture("llama3");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = BTreeMap::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|n| {
                let t = st.tensor(n).unwrap();
                (n.clone(), t.shape().to_vec(), convert(t.data()))
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(n, shape, b)| (n.clone(), TensorView::new(dtype, shape.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &out.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn f32s(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

#[test]
fn sharded_checkpoints_load_like_one_file() {
    let dir = tempfile::tempdir().unwrap();
    reshard(dir.path(), 3, Dtype::F32, |b| b.to_vec());
    let ids = reference("llama3").input_ids;
    let mut one = session("llama3", &flex(), &Pipeline::standard());
    let mut sharded = session_for(dir.path(), &flex(), 64);
    let (a, b) = (
        full_forward(&mut one, &ids),
        full_forward(&mut sharded, &ids),
    );
    assert_eq!(a, b, "same weights, same numbers");
}

#[test]
fn half_precision_checkpoints_load() {
    let reference = reference("llama3");
    for (dtype, tol) in [(Dtype::F16, 2e-2f32), (Dtype::BF16, 1e-1)] {
        let dir = tempfile::tempdir().unwrap();
        reshard(dir.path(), 1, dtype, |b| match dtype {
            Dtype::F16 => f32s(b)
                .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            _ => f32s(b)
                .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        });
        let mut s = session_for(dir.path(), &flex(), 64);
        let got = full_forward(&mut s, &reference.input_ids);
        for (pos, (g, want)) in got.iter().zip(&reference.logits).enumerate() {
            let diff = max_abs_diff(g, want);
            assert!(diff < tol, "{dtype:?} position {pos}: {diff}");
        }
    }
}
