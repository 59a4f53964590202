//! HF checkpoints as people have them: sharded, in f16/bf16, with buffers transformers
//! ignores, with biases config.json asks for; and what we refuse: tensors no weight
//! consumes, biases config.json asks for that are not there.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use llama::graph::Pipeline;
use llama::models::Model;
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

/// A checkpoint's tensors as f32 by HF name: `(shape, data)`.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The tiny model `name`'s tensors and config.json.
fn tiny(name: &str) -> (Tensors, serde_json::Value) {
    let src = fixture(name);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{n}");
            (n, (t.shape().to_vec(), f32s(t.data()).collect()))
        })
        .collect();
    (tensors, read_json(&src.join("config.json")))
}

/// Writes `config` and `tensors` as an f32 model directory `out`.
fn write_model(out: &Path, config: &serde_json::Value, tensors: &Tensors) {
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (shape, data))| {
            let b = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.clone(), shape.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, shape, b)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

/// `config` and `tensors` written to a fresh directory and loaded; the directory lives
/// as long as the model is needed.
fn load_model(
    config: &serde_json::Value,
    tensors: &Tensors,
) -> (tempfile::TempDir, Result<Model, String>) {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), config, tensors);
    let model = Model::load(dir.path(), &flex()).map_err(|e| e.to_string());
    (dir, model)
}

/// Logits at every position of a prompt (`tiny/llama3`'s reference ids), through
/// `pipeline`.
fn logits(model: &Model, pipeline: &Pipeline) -> Vec<Vec<f32>> {
    let mut g = model.build_graph().expect("graph");
    let ctx = llama::graph::PassContext { device: flex() };
    pipeline.run(&mut g, &ctx).expect("passes");
    let mut s = session_of(g, &flex(), 64);
    full_forward(&mut s, &reference("llama3").input_ids)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

#[test]
fn a_tensor_that_no_weight_consumes_is_refused_by_name() {
    let (mut tensors, config) = tiny("llama3");
    let extra = "model.layers.0.self_attn.extra.weight";
    tensors.insert(extra.into(), (vec![4, 4], vec![0.5; 16]));
    let (_dir, model) = load_model(&config, &tensors);
    let err = model.expect_err("an extra tensor is refused");
    assert!(
        err.contains(&format!(
            "model.safetensors: tensor {extra} is not used by LlamaForCausalLM (expected: "
        )),
        "{err}"
    );
    // What was expected is listed: the whole-model tensors and layer 0's, and the count.
    for name in [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "every other layer: 21 in all)",
    ] {
        assert!(err.contains(name), "{name} in: {err}");
    }
    assert!(!err.contains("model.layers.1."), "{err}");

    // Two extra tensors: the first is named, the other counted.
    tensors.insert("zzz.weight".into(), (vec![2], vec![0.0; 2]));
    let err = load_model(&config, &tensors).1.expect_err("refused");
    assert!(
        err.contains(&format!(
            "tensor {extra} is not used by LlamaForCausalLM (nor is 1 other)"
        )),
        "{err}"
    );
}

#[test]
fn a_sharded_checkpoint_names_the_shard_that_holds_the_unused_tensor() {
    let dir = tempfile::tempdir().unwrap();
    reshard(dir.path(), 3, Dtype::F32, |b| b.to_vec());
    // Add a tensor to the last shard.
    let index: serde_json::Value = read_json(&dir.path().join("model.safetensors.index.json"));
    let last = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .max()
        .unwrap();
    let path = dir.path().join(&last);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let extra = vec![0u8; 8];
    let mut views: Vec<(String, TensorView<'_>)> = st.tensors();
    views.push((
        "model.layers.1.mlp.extra.weight".into(),
        TensorView::new(Dtype::F32, vec![2], &extra).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &path.with_extension("tmp")).unwrap();
    std::fs::rename(path.with_extension("tmp"), &path).unwrap();
    let err = Model::load(dir.path(), &flex()).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "{last}: tensor model.layers.1.mlp.extra.weight is not used by LlamaForCausalLM"
        )),
        "{err}"
    );
}

#[test]
fn two_tensors_for_one_weight_are_refused_by_name() {
    // Phi-3 reads `gate_up_proj`, Llama `up_proj`: both are our `ffn_up`, and the
    // one the family does not read is named, whichever it is.
    let (mut tensors, config) = tiny("phi3");
    let (shape, data) = tensors["model.layers.0.mlp.gate_up_proj.weight"].clone();
    let half = data[..data.len() / 2].to_vec();
    let unfused = (vec![shape[0] / 2, shape[1]], half);
    tensors.insert("model.layers.0.mlp.up_proj.weight".into(), unfused.clone());
    let err = load_model(&config, &tensors).1.expect_err("refused");
    assert!(
        err.contains("tensor model.layers.0.mlp.up_proj.weight is not used by Phi3ForCausalLM"),
        "{err}"
    );
    let (mut tensors, config) = tiny("llama3");
    let fused = (
        vec![2 * unfused.0[0], unfused.0[1]],
        [unfused.1.clone(), unfused.1].concat(),
    );
    tensors.insert("model.layers.1.mlp.gate_up_proj.weight".into(), fused);
    let err = load_model(&config, &tensors).1.expect_err("refused");
    assert!(
        err.contains(
            "tensor model.layers.1.mlp.gate_up_proj.weight is not used by LlamaForCausalLM"
        ),
        "{err}"
    );
}

#[test]
fn tensors_transformers_ignores_still_load() {
    // A tied model whose checkpoint still carries the head, and RoPE frequencies saved
    // with every layer as transformers before 4.31 did: both ignored, as transformers
    // does, and the logits are the fixture's own.
    let (mut tensors, config) = tiny("llama-tied");
    let embed = tensors["model.embed_tokens.weight"].clone();
    tensors.insert("lm_head.weight".into(), (embed.0, vec![9.0; embed.1.len()]));
    for l in 0..2 {
        let name = format!("model.layers.{l}.self_attn.rotary_emb.inv_freq");
        tensors.insert(name, (vec![8], vec![1.0; 8]));
    }
    let (_dir, model) = load_model(&config, &tensors);
    let model = model.expect("loads");
    let reference = reference("llama-tied");
    let mut g = model.build_graph().unwrap();
    let ctx = llama::graph::PassContext { device: flex() };
    Pipeline::standard().run(&mut g, &ctx).unwrap();
    let got = full_forward(&mut session_of(g, &flex(), 64), &reference.input_ids);
    let mut fixture = session("llama-tied", &flex(), &Pipeline::standard());
    assert_eq!(got, full_forward(&mut fixture, &reference.input_ids));
}

/// `tiny/llama3` with `attention_bias` and `mlp_bias` set and every bias tensor present,
/// each filled by `fill(hf name, length)`.
fn llama3_with_biases(fill: impl Fn(&str, usize) -> Vec<f32>) -> (Tensors, serde_json::Value) {
    let (mut tensors, mut config) = tiny("llama3");
    config["attention_bias"] = true.into();
    config["mlp_bias"] = true.into();
    let weights: Vec<(String, usize)> = tensors
        .iter()
        .filter(|(n, _)| n.ends_with("_proj.weight"))
        .map(|(n, (shape, _))| (n.replace(".weight", ".bias"), shape[0]))
        .collect();
    assert_eq!(
        weights.len(),
        2 * 7,
        "q, k, v, o, gate, up, down in each layer"
    );
    for (name, n) in weights {
        let data = fill(&name, n);
        tensors.insert(name, (vec![n], data));
    }
    (tensors, config)
}

#[test]
fn zero_biases_change_nothing() {
    let plain = load("llama3", &flex());
    let (tensors, config) = llama3_with_biases(|_, n| vec![0.0; n]);
    let (_dir, biased) = load_model(&config, &tensors);
    let biased = biased.expect("loads");
    // The raw graph only adds the zeros: the same numbers exactly.
    let raw = Pipeline::none();
    assert_eq!(logits(&biased, &raw), logits(&plain, &raw));
    let standard = Pipeline::standard();
    let diff = max_diff(&logits(&biased, &standard), &logits(&plain, &standard));
    assert!(diff <= 1e-5, "{diff}");
}

/// Sum over the columns of a row-major `[rows, cols]` matrix times `v`.
fn mat_vec(m: &[f32], cols: usize, v: &[f32]) -> Vec<f32> {
    m.chunks_exact(cols)
        .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
        .collect()
}

#[test]
fn attention_biases_act_where_transformers_puts_them() {
    // Attention weights of a row sum to 1, so a V bias `b` adds `b` to every head's
    // output (the bias of the KV head the query head reads), and the output projection
    // turns that into `o_proj @ b`: a model with V bias `b` computes what a model with
    // output bias `o_proj @ b` does.
    let (heads, kv_heads, hd) = (4, 2, 16);
    let v_bias = |n: usize| (0..n).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect();
    let (with_v, config) = llama3_with_biases(|name, n| {
        if name.ends_with("v_proj.bias") {
            v_bias(n)
        } else {
            vec![0.0; n]
        }
    });
    let mut with_o = with_v.clone();
    for l in 0..2 {
        let v = format!("model.layers.{l}.self_attn.v_proj.bias");
        let b = with_o[&v].1.clone();
        with_o.get_mut(&v).unwrap().1.fill(0.0);
        // Query head h reads KV head h / (heads / kv_heads).
        let per_head: Vec<f32> = (0..heads)
            .flat_map(|h| b[h / (heads / kv_heads) * hd..][..hd].to_vec())
            .collect();
        let o_weight = &with_v[&format!("model.layers.{l}.self_attn.o_proj.weight")].1;
        let o = format!("model.layers.{l}.self_attn.o_proj.bias");
        with_o.get_mut(&o).unwrap().1 = mat_vec(o_weight, heads * hd, &per_head);
    }
    let (_a, v_model) = load_model(&config, &with_v);
    let (_b, o_model) = load_model(&config, &with_o);
    let pipeline = Pipeline::standard();
    let (v_logits, o_logits) = (
        logits(&v_model.expect("loads"), &pipeline),
        logits(&o_model.expect("loads"), &pipeline),
    );
    let plain = logits(&load("llama3", &flex()), &pipeline);
    assert!(max_diff(&v_logits, &plain) > 1e-2, "the biases act");
    let diff = max_diff(&v_logits, &o_logits);
    assert!(
        diff <= 1e-4,
        "V bias and its output-bias image differ by {diff}"
    );
}

#[test]
fn feed_forward_biases_act_where_transformers_puts_them() {
    // With the gate's weights zero and its bias `g`, the feed-forward is
    // `down(silu(g) * (up(x) + u)) + d`: an up bias `u` computes what a down bias
    // `down @ (silu(g) * u)` does. Neither gate, up nor down bias can be dropped or
    // misplaced without the two models differing.
    let silu = |x: f32| x / (1.0 + (-x).exp());
    let fill = |name: &str, n: usize| -> Vec<f32> {
        let ramp = |k: usize| (0..n).map(|i| ((i * k) % 13) as f32 / 6.0 - 1.0).collect();
        if name.ends_with("gate_proj.bias") {
            ramp(5)
        } else if name.ends_with("up_proj.bias") {
            ramp(3)
        } else {
            vec![0.0; n]
        }
    };
    let (mut with_up, config) = llama3_with_biases(fill);
    for l in 0..2 {
        let gate = format!("model.layers.{l}.mlp.gate_proj.weight");
        with_up.get_mut(&gate).unwrap().1.fill(0.0);
    }
    let mut with_down = with_up.clone();
    for l in 0..2 {
        let bias = |what: &str| format!("model.layers.{l}.mlp.{what}_proj.bias");
        let g = &with_up[&bias("gate")].1;
        let u = &with_up[&bias("up")].1;
        let hidden: Vec<f32> = g.iter().zip(u).map(|(g, u)| silu(*g) * u).collect();
        let down = &with_up[&format!("model.layers.{l}.mlp.down_proj.weight")].1;
        let d = mat_vec(down, hidden.len(), &hidden);
        with_down.get_mut(&bias("down")).unwrap().1 = d;
        with_down.get_mut(&bias("up")).unwrap().1.fill(0.0);
    }
    let (_a, up_model) = load_model(&config, &with_up);
    let (_b, down_model) = load_model(&config, &with_down);
    let pipeline = Pipeline::standard();
    let (up_logits, down_logits) = (
        logits(&up_model.expect("loads"), &pipeline),
        logits(&down_model.expect("loads"), &pipeline),
    );
    // Without its biases the zeroed gate silences the feed-forward entirely.
    let mut silent = with_up.clone();
    for (name, (_, data)) in silent.iter_mut() {
        if name.ends_with(".bias") {
            data.fill(0.0);
        }
    }
    let (_c, silent) = load_model(&config, &silent);
    let silent = logits(&silent.expect("loads"), &pipeline);
    assert!(max_diff(&up_logits, &silent) > 1e-2, "the biases act");
    let diff = max_diff(&up_logits, &down_logits);
    assert!(
        diff <= 1e-4,
        "up bias and its down-bias image differ by {diff}"
    );
}

#[test]
fn a_bias_config_json_asks_for_must_be_there() {
    let (tensors, mut config) = tiny("llama3");
    config["attention_bias"] = true.into();
    let err = load_model(&config, &tensors).1.expect_err("refused");
    assert!(
        err.contains("tensor `model.layers.0.self_attn.q_proj.bias` not found in"),
        "{err}"
    );
    // Q, K and V biases alone are not enough: `attention_bias` covers o_proj too.
    let mut qkv = tensors.clone();
    for l in 0..2 {
        for (p, n) in [("q", 64), ("k", 32), ("v", 32)] {
            let name = format!("model.layers.{l}.self_attn.{p}_proj.bias");
            qkv.insert(name, (vec![n], vec![0.0; n]));
        }
    }
    let err = load_model(&config, &qkv).1.expect_err("refused");
    assert!(
        err.contains("tensor `model.layers.0.self_attn.o_proj.bias` not found in"),
        "{err}"
    );
    // Without the flag, the same biases are tensors nothing reads.
    let (_, plain) = tiny("llama3");
    let err = load_model(&plain, &qkv).1.expect_err("refused");
    assert!(
        err.contains("tensor model.layers.0.self_attn.k_proj.bias is not used by LlamaForCausalLM"),
        "{err}"
    );
    let (tensors, mut config) = tiny("llama3");
    config["mlp_bias"] = true.into();
    let err = load_model(&config, &tensors).1.expect_err("refused");
    assert!(
        err.contains("tensor `model.layers.0.mlp.gate_proj.bias` not found in"),
        "{err}"
    );
}

#[test]
fn mistral_has_no_biases_whatever_config_json_says() {
    // transformers' MistralAttention and MistralMLP are built with `bias=False`.
    let (mut tensors, mut config) = tiny("mistral");
    config["attention_bias"] = true.into();
    config["mlp_bias"] = true.into();
    let (_dir, model) = load_model(&config, &tensors);
    let pipeline = Pipeline::none();
    let plain = load("mistral", &flex());
    assert_eq!(
        logits(&model.expect("loads"), &pipeline),
        logits(&plain, &pipeline)
    );
    tensors.insert(
        "model.layers.0.self_attn.o_proj.bias".into(),
        (vec![64], vec![0.0; 64]),
    );
    let err = load_model(&config, &tensors).1.expect_err("refused");
    assert!(
        err.contains(
            "tensor model.layers.0.self_attn.o_proj.bias is not used by MistralForCausalLM"
        ),
        "{err}"
    );
}
