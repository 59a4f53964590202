//! The families as GGUF files: each tiny transformers model written as the GGUF that
//! llama.cpp's converter would make (its names, metadata and conventions), read back
//! through the GGUF loader, against transformers' logits.

use std::path::Path;

use crate::common::gguf_writer::Writer;
use crate::common::*;
use llama::models::weights::hf_to_ours_in;
use llama::models::Family;
use safetensors::SafeTensors;

/// Writes `tiny/<name>` as a GGUF of architecture `arch` into `out`.
fn write_gguf(name: &str, arch: &str, out: &Path) {
    gguf_of(name, arch).write(out);
}

/// `tiny/<name>` as a GGUF of architecture `arch`.
fn gguf_of(name: &str, arch: &str) -> Writer {
    let dir = fixture(name);
    let config: serde_json::Value = read_json(&dir.join("config.json"));
    let get = |k: &str| config[k].as_u64().unwrap_or_else(|| panic!("{k}")) as u32;
    let (heads, kv_heads) = (get("num_attention_heads"), get("num_key_value_heads"));
    let head_dim = config["head_dim"]
        .as_u64()
        .map_or(get("hidden_size") / heads, |h| h as u32);
    let mut w = Writer::default();
    w.string("general.architecture", arch)
        .u32(&format!("{arch}.block_count"), get("num_hidden_layers"))
        .u32(&format!("{arch}.embedding_length"), get("hidden_size"))
        .u32(
            &format!("{arch}.feed_forward_length"),
            get("intermediate_size"),
        )
        .u32(&format!("{arch}.attention.head_count"), heads)
        .u32(&format!("{arch}.attention.head_count_kv"), kv_heads)
        .u32(&format!("{arch}.attention.key_length"), head_dim)
        .u32(&format!("{arch}.rope.dimension_count"), head_dim)
        .u32(
            &format!("{arch}.context_length"),
            get("max_position_embeddings"),
        )
        .u32(&format!("{arch}.vocab_size"), get("vocab_size"))
        .f32(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            config["rms_norm_eps"].as_f64().unwrap() as f32,
        )
        .f32(
            &format!("{arch}.rope.freq_base"),
            rope_theta(&config["rope_parameters"]),
        );
    if arch == "gemma3" {
        // llama.cpp fixes Gemma 3's pattern (every 6th layer global); the tiny model's is
        // shorter, so the file states it.
        let types = config["layer_types"].as_array().expect("layer_types");
        let every = 1 + types
            .iter()
            .position(|t| t == "full_attention")
            .expect("a global layer");
        w.u32("gemma3.attention.sliding_window", get("sliding_window"))
            .u32("gemma3.attention.sliding_window_pattern", every as u32);
        // Its `query_pre_attn_scalar` is not its head_dim, as no real Gemma 3's but the
        // 27B is: the file states the scale under llama.cpp's `attention.scale` key.
        let scalar = config["query_pre_attn_scalar"].as_f64().expect("scalar") as f32;
        w.f32("gemma3.attention.scale", 1.0 / scalar.sqrt());
    }
    let rope = &config["rope_parameters"];
    if rope["rope_type"] == "llama3" {
        // llama.cpp's converter turns Llama 3.1 scaling into one divisor per frequency,
        // the `rope_freqs` tensor, and leaves the scaling out of the metadata.
        let get = |k: &str| rope[k].as_f64().unwrap_or_else(|| panic!("{k}"));
        let (factor, low, high) = (
            get("factor"),
            get("low_freq_factor"),
            get("high_freq_factor"),
        );
        let (old, theta) = (get("original_max_position_embeddings"), get("rope_theta"));
        let freqs: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor as f32
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        w.f32_tensor("rope_freqs.weight", &[head_dim as usize / 2], &freqs);
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for hf in names {
        let t = st.tensor(&hf).unwrap();
        let shape = t.shape().to_vec();
        let mut data: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let family = if arch == "gemma3" {
            Family::Gemma3
        } else {
            Family::Llama
        };
        let ours = hf_to_ours_in(family, &hf).unwrap_or_else(|| panic!("{hf} has a GGUF name"));
        if ours == "output.weight" && config["tie_word_embeddings"] == true {
            continue;
        }
        // llama.cpp's Llama converter interleaves each head's two RoPE halves.
        let heads_of = match ours.rsplit('.').nth(1) {
            Some("attn_q") if arch == "llama" && ours.ends_with("weight") => Some(heads),
            Some("attn_k") if arch == "llama" && ours.ends_with("weight") => Some(kv_heads),
            _ => None,
        };
        if let Some(h) = heads_of {
            let (d, cols) = (shape[0] / h as usize, shape[1]);
            let src = data.clone();
            for head in 0..h as usize {
                for i in 0..d / 2 {
                    for j in 0..2 {
                        let (to, from) = (head * d + 2 * i + j, head * d + j * d / 2 + i);
                        data[to * cols..(to + 1) * cols]
                            .copy_from_slice(&src[from * cols..(from + 1) * cols]);
                    }
                }
            }
        }
        // Gemma's converters store norm weights as 1 + w.
        if arch.starts_with("gemma") && ours.ends_with("norm.weight") {
            data.iter_mut().for_each(|x| *x += 1.0);
        }
        w.f32_tensor(&ours, &shape, &data);
    }
    w
}

/// The global layers' RoPE base: `rope_parameters` holds one set, or one per layer type.
fn rope_theta(p: &serde_json::Value) -> f32 {
    p["rope_theta"]
        .as_f64()
        .or_else(|| p["full_attention"]["rope_theta"].as_f64())
        .expect("rope_theta") as f32
}

#[test]
fn every_family_as_gguf_matches_transformers() {
    for (name, arch) in [
        ("llama3", "llama"),
        ("llama-tied", "llama"),
        ("llama2-mha", "llama"),
        ("qwen2", "qwen2"),
        ("phi3", "phi3"),
        ("gemma", "gemma"),
        ("gemma3", "gemma3"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("{name}.gguf"));
        write_gguf(name, arch, &file);
        let reference = reference(name);
        let mut s = session_for(&file, &flex(), 64);
        let got = full_forward(&mut s, &reference.input_ids);
        for (pos, (g, want)) in got.iter().zip(&reference.logits).enumerate() {
            let diff = max_abs_diff(g, want);
            assert!(
                diff <= 1e-4,
                "{name} as {arch} GGUF, position {pos}: {diff}"
            );
        }
    }
}

#[test]
fn an_unsupported_gguf_architecture_names_itself_and_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.gguf");
    write_gguf("llama-tied", "falcon", &file);
    let err = llama::models::Model::load(&file, &flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("falcon") && err.contains("llama") && err.contains("gemma"),
        "{err}"
    );
}

#[test]
fn a_gguf_tensor_that_no_weight_consumes_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("extra.gguf");
    let mut w = gguf_of("llama-tied", "llama");
    w.f32_tensor("blk.1.attn_extra.weight", &[4], &[0.5; 4]);
    w.write(&file);
    for keep_blocks in [false, true] {
        let options = llama::models::LoadOptions {
            keep_blocks,
            ..Default::default()
        };
        let err = llama::models::Model::load_with(&file, &flex(), &options)
            .unwrap_err()
            .to_string();
        let want = format!(
            "{}: tensor blk.1.attn_extra.weight is not used by LlamaForCausalLM (expected: ",
            file.display()
        );
        assert!(err.contains(&want), "{err}");
        assert!(
            err.contains("token_embd.weight") && err.contains("blk.0.attn_q.weight"),
            "{err}"
        );
    }
}

#[test]
fn sliding_window_cache_memory_is_bounded_by_the_window() {
    let mut s = session("mistral", &flex(), &llama::graph::Pipeline::standard());
    let ids = reference("mistral").input_ids;
    s.prefill(&ids).unwrap();
    // The session holds 64 positions; each layer's ring holds the window (8).
    let rows = s.cache_rows_per_layer();
    assert_eq!(rows, vec![8, 8]);
    let mut full = session("llama3", &flex(), &llama::graph::Pipeline::standard());
    assert_eq!(full.cache_rows_per_layer(), vec![64, 64]);
    // A ring cannot rewind past what it still holds; a full cache can.
    assert!(s.truncate(5).is_err());
    full.prefill(&ids).unwrap();
    assert!(full.truncate(5).is_ok());
}

#[test]
fn every_family_directory_works_through_the_commands() {
    for name in TINY {
        let dir = fixture(name);
        let m = dir.to_str().unwrap();
        let inspect = llama(&["inspect", "-m", m]);
        assert!(
            inspect.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        let config: serde_json::Value = read_json(&dir.join("config.json"));
        let arch = config["architectures"][0].as_str().unwrap();
        assert!(String::from_utf8_lossy(&inspect.stdout).contains(&format!("architecture: {arch}")));
        let generate = llama(&["generate", "-m", m, "-p", "abc", "-n", "4"]);
        assert!(
            generate.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&generate.stderr)
        );
        let graph = llama(&["graph", "-m", m]);
        assert!(
            String::from_utf8_lossy(&graph.stdout).contains("logits = matmul"),
            "{name}"
        );
        let text = dir.join("reference.json");
        let ppl = llama(&[
            "perplexity",
            "-m",
            m,
            "-f",
            text.to_str().unwrap(),
            "-c",
            "64",
        ]);
        assert!(
            String::from_utf8_lossy(&ppl.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .starts_with("perplexity: "),
            "{name}"
        );
    }
}
