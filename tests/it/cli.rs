//! The `llama` binary as a user runs it: output contract and bad input.

use std::path::Path;
use std::process::Output;

use crate::common::*;
use llama::graph::Pipeline;
use llama::runtime::{generate_greedy, Tokenizer};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit code not 0, one line on stderr naming `needle`, no panic.
pub(crate) fn assert_one_line_error(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "exit code 0 for bad input; stderr: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{err:?} does not name {needle:?}");
    assert!(
        !err.contains("panicked") && !err.contains("internal"),
        "a panic: {err}"
    );
}

#[test]
fn generate_streams_only_the_generated_text() {
    let dir = fixture("llama3");
    let out = llama(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--backend",
        "flex",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The same generation through the library, decoded at once.
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let prompt = tokenizer.encode("Hello").unwrap();
    let mut s = session("llama3", &flex(), &Pipeline::standard());
    let g = generate_greedy(&mut s, &prompt, 12, &[2], |_| {}).unwrap();
    let expected = tokenizer.decode(&g.ids).unwrap();
    assert_eq!(text(&out.stdout), format!("{expected}\n"));
    assert!(text(&out.stderr).contains("tok/s"), "timings go to stderr");
}

/// Ten greedy tokens after "abc" on the tiny Llama 2, on `backend`.
fn generate_abc(backend: &str) -> Output {
    let dir = fixture("llama2-mha");
    let m = dir.to_str().unwrap();
    llama(&[
        "generate",
        "-m",
        m,
        "-p",
        "abc",
        "-n",
        "10",
        "--backend",
        backend,
    ])
}

#[test]
fn generate_on_ndarray_gives_the_same_text() {
    let (a, b) = (generate_abc("flex"), generate_abc("ndarray"));
    assert!(
        a.status.success() && b.status.success(),
        "{} {}",
        text(&a.stderr),
        text(&b.stderr)
    );
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn graph_dumps_raw_and_optimized() {
    let dir = fixture("llama-tied");
    let optimized = text(&llama(&["graph", "--model", dir.to_str().unwrap()]).stdout);
    let raw = text(
        &llama(&[
            "graph",
            "--model",
            dir.to_str().unwrap(),
            "--passes",
            "none",
        ])
        .stdout,
    );
    assert!(optimized.contains("blk.1.attn_qkv = matmul"), "{optimized}");
    assert!(!optimized.contains("blk.1.attn_q.weight"));
    assert!(
        raw.contains("blk.1.attn_q = matmul(blk.1.attn_norm, blk.1.attn_q.weight)"),
        "{raw}"
    );
    // Tied: the head reads the embedding table.
    assert!(
        raw.contains("logits = matmul(output_norm, token_embd.weight)"),
        "{raw}"
    );
}

#[test]
fn ndarray_compiles_the_pure_burn_graph() {
    // flex gets the CPU-only passes (the gated MLP as one `swiglu` op); ndarray, the
    // reference, gets only the standard ones.
    let dir = fixture("llama3");
    let dump = |backend: &str| {
        let out = llama(&["graph", "-m", dir.to_str().unwrap(), "--backend", backend]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let (flex, reference) = (dump("flex"), dump("ndarray"));
    assert!(flex.contains("= swiglu("), "{flex}");
    assert!(!reference.contains("swiglu"), "{reference}");
    assert!(reference.contains("blk.1.attn_qkv = matmul"), "{reference}");
}

#[test]
fn graph_taps_summarize_every_node() {
    let dir = fixture("llama3");
    let out = llama(&[
        "graph",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--taps",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for node in ["inp_embd", "blk.0.attn_norm", "blk.1.ffn_down", "logits"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{node} "))),
            "{node} missing:\n{stdout}"
        );
    }
}

/// A copy of a tiny model in a temporary directory, to be broken by the test.
fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama3").join(f), dir.path().join(f)).unwrap();
    }
    edit(dir.path());
    dir
}

fn generate_on(dir: &Path) -> Output {
    llama(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "x",
        "-n",
        "2",
    ])
}

#[test]
fn missing_model_directory() {
    assert_one_line_error(
        &generate_on(Path::new("/nonexistent/model")),
        "/nonexistent/model",
    );
}

#[test]
fn missing_weights_file() {
    let dir = broken_copy(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    assert_one_line_error(&generate_on(dir.path()), "no model here");
}

#[test]
fn missing_config() {
    let dir = broken_copy(|d| std::fs::remove_file(d.join("config.json")).unwrap());
    assert_one_line_error(&generate_on(dir.path()), "config.json");
}

fn edit_config(d: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn unknown_architecture() {
    let dir = broken_copy(|d| {
        edit_config(d, |v| {
            v["architectures"] = serde_json::json!(["FancyNetForCausalLM"])
        })
    });
    let out = generate_on(dir.path());
    assert_one_line_error(&out, "FancyNetForCausalLM");
    assert!(
        text(&out.stderr).contains("LlamaForCausalLM"),
        "lists the supported ones"
    );
}

#[test]
fn config_sizes_that_disagree_with_the_weights() {
    let dir = broken_copy(|d| edit_config(d, |v| v["intermediate_size"] = serde_json::json!(128)));
    let out = generate_on(dir.path());
    assert_one_line_error(&out, "blk.0.ffn_gate.weight");
    let err = text(&out.stderr);
    assert!(
        err.contains("[160, 64]") && err.contains("[128, 64]"),
        "both shapes: {err}"
    );
}

#[test]
fn truncated_safetensors() {
    let dir = broken_copy(|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert_one_line_error(&generate_on(dir.path()), "model.safetensors");
}

#[test]
fn random_bytes_as_safetensors() {
    let dir = broken_copy(|d| {
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(d.join("model.safetensors"), noise).unwrap();
    });
    assert_one_line_error(&generate_on(dir.path()), "not a valid safetensors file");
}

#[test]
fn header_that_claims_more_than_the_file_holds() {
    let dir = broken_copy(|d| {
        let p = d.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let claimed = (bytes.len() as u64 + 1000).to_le_bytes();
        bytes[..8].copy_from_slice(&claimed);
        std::fs::write(&p, bytes).unwrap();
    });
    assert_one_line_error(&generate_on(dir.path()), "model.safetensors");
    let dir = broken_copy(|d| {
        // A well-formed header whose tensor extends past the data.
        let header =
            br#"{"token_embd":{"dtype":"F32","shape":[1000,64],"data_offsets":[0,256000]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 64]);
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    });
    assert_one_line_error(&generate_on(dir.path()), "not a valid safetensors file");
}

#[test]
fn unknown_backend() {
    let dir = fixture("llama3");
    assert_one_line_error(
        &llama(&[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            "x",
            "--backend",
            "cuda9",
        ]),
        "cuda9",
    );
}

#[test]
fn negative_token_count() {
    let dir = fixture("llama3");
    assert_one_line_error(
        &llama(&[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            "x",
            "--max-tokens",
            "-3",
        ]),
        "-3",
    );
}

#[test]
fn prompt_past_the_context() {
    let dir = fixture("llama3");
    let long = "a".repeat(300);
    let out = llama(&[
        "generate",
        "-m",
        dir.to_str().unwrap(),
        "-p",
        &long,
        "-n",
        "4",
    ]);
    assert_one_line_error(&out, "context");
}

#[test]
fn unknown_pass() {
    let dir = fixture("llama3");
    assert_one_line_error(
        &llama(&[
            "graph",
            "-m",
            dir.to_str().unwrap(),
            "--passes",
            "fold-everything",
        ]),
        "fold-everything",
    );
}

#[test]
fn wgpu_generates_the_same_text_as_flex_without_driver_noise() {
    let (cpu, gpu) = (generate_abc("flex"), generate_abc("wgpu"));
    assert!(gpu.status.success(), "{}", text(&gpu.stderr));
    assert_eq!(gpu.stdout, cpu.stdout);
    let err = text(&gpu.stderr);
    assert_eq!(
        err.lines().count(),
        1,
        "only the stats line on stderr: {err}"
    );
    assert!(err.starts_with("prompt "), "{err}");
}

#[test]
fn devices_lists_the_adapters() {
    let out = llama(&["devices"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("0: ") && stdout.contains("type "),
        "{stdout}"
    );
}

#[test]
fn an_adapter_that_does_not_exist_is_a_one_line_error() {
    let dir = fixture("llama3");
    let out = llama(&[
        "generate",
        "-m",
        dir.to_str().unwrap(),
        "-p",
        "x",
        "--backend",
        "wgpu",
        "--device",
        "99",
    ]);
    assert_one_line_error(&out, "backend wgpu");
    assert!(
        text(&out.stderr).contains("--backend flex"),
        "suggests the CPU backend"
    );
    let out = llama(&[
        "graph",
        "-m",
        dir.to_str().unwrap(),
        "--backend",
        "flex",
        "--device",
        "3",
    ]);
    assert_one_line_error(&out, "--device 3");
}

#[test]
fn bench_reports_speeds_memory_and_a_profile_as_json() {
    let dir = fixture("llama3");
    let out = llama(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "-p",
        "6",
        "-n",
        "3",
        "-r",
        "2",
        "--threads",
        "1",
        "--json",
        "--profile",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for field in ["prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_bytes"] {
        let x = v[field].as_f64().unwrap_or_else(|| panic!("{field}: {v}"));
        assert!(x > 0.0, "{field} = {x}");
    }
    for field in ["prefill_tok_s", "decode_tok_s"] {
        let (lo, mid, hi) = (
            v[format!("{field}_min")].as_f64().unwrap(),
            v[field].as_f64().unwrap(),
            v[format!("{field}_max")].as_f64().unwrap(),
        );
        assert!(lo <= mid && mid <= hi, "{field}: {lo} {mid} {hi}");
    }
    // The profile counts each op once per layer per token: attention once per layer,
    // the output head once, for decode one token at a time.
    let layers = load("llama3", &flex()).config.num_hidden_layers as f64;
    let decode = v["profile"]["decode"].as_array().expect("decode profile");
    let calls = |op: &str| {
        decode
            .iter()
            .find(|r| r["op"] == op)
            .and_then(|r| r["calls_per_token"].as_f64())
            .unwrap_or_else(|| panic!("no {op} in {decode:?}"))
    };
    assert_eq!(calls("attention"), layers);
    assert_eq!(calls("output head"), 1.0);
    let total: f64 = decode
        .iter()
        .map(|r| r["ms_per_token"].as_f64().unwrap())
        .sum();
    assert!(total > 0.0);
}

#[test]
fn precision_flags_pick_the_weight_storage() {
    // On the tiny f32 checkpoint, native and f32 run the same exact math; q8_0 stores
    // the matrices in Q8_0 blocks, and still generates.
    let dir = fixture("llama2-mha");
    let run = |precision: &str| {
        let out = llama(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "abc",
            "-n",
            "6",
            "--precision",
            precision,
        ]);
        assert!(out.status.success(), "{precision}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(run("native"), run("f32"));
    assert!(!run("q8_0").trim().is_empty());
    let out = llama(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "abc",
        "--precision",
        "int4",
    ]);
    assert_one_line_error(&out, "int4");
}

pub(crate) fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Sampled generation of the tiny Llama 3 with `extra` flags, as JSON.
fn sampled_generate(extra: &[&str]) -> Vec<serde_json::Value> {
    let dir = fixture("llama3");
    let mut args = vec![
        "generate",
        "-m",
        dir.to_str().unwrap(),
        "-p",
        "Once upon a time there was",
        "-n",
        "8",
        "--temperature",
        "0.9",
        "--precision",
        "f32",
        "--json",
    ];
    args.extend_from_slice(extra);
    json_lines(&llama(&args))
}

#[test]
fn samples_of_one_prompt_run_as_a_batch_and_match_single_runs() {
    let batch = sampled_generate(&["--samples", "3", "--seed", "40"]);
    let object = &batch[0];
    let choices = object["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    let prompt = object["prompt_tokens"].as_u64().unwrap();
    // The prompt ran once; the other two copied all of it but its last token.
    assert_eq!(
        object["prompt_tokens_reused"].as_u64().unwrap(),
        2 * (prompt - 1)
    );
    // Each sample says how much of its prompt it took from the cache.
    let cached: u64 = choices
        .iter()
        .map(|c| c["cached_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(cached, 2 * (prompt - 1));
    for (i, c) in choices.iter().enumerate() {
        let seed = (40 + i).to_string();
        let alone = sampled_generate(&["--seed", &seed]);
        assert_eq!(
            c["ids"], alone[0]["ids"],
            "sample {i} is what seed {seed} gives alone"
        );
        assert_eq!(c["text"], alone[0]["text"]);
    }
}

#[test]
fn bench_parallel_reports_each_count() {
    let dir = fixture("llama3");
    let rows = json_lines(&llama(&[
        "bench",
        "-m",
        dir.to_str().unwrap(),
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "1",
        "--parallel",
        "1,3",
        "--json",
    ]));
    assert_eq!(rows.len(), 2);
    for (row, n) in rows.iter().zip([1, 3]) {
        assert_eq!(row["parallel"], n);
        assert!(row["prefill_tok_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["decode_tok_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    let shared = json_lines(&llama(&[
        "bench",
        "-m",
        dir.to_str().unwrap(),
        "-p",
        "4",
        "-r",
        "1",
        "--parallel",
        "4",
        "--shared-prefix",
        "32",
        "--json",
    ]));
    let run = |cache: bool| {
        shared
            .iter()
            .find(|r| r["prefix_cache"] == cache)
            .and_then(|r| r["prompt_tokens_run"].as_u64())
            .expect("a row per setting")
    };
    // With the cache the shared prefix runs once; without it, four times.
    assert_eq!(run(true), 32 + 4 * 4);
    assert_eq!(run(false), 4 * (32 + 4));
}

#[test]
fn bench_sweeps_prompt_lengths_on_top_of_a_depth() {
    let dir = fixture("llama3");
    let m = dir.to_str().unwrap();
    let rows = json_lines(&llama(&[
        "bench", "-m", m, "-p", "4,8", "-n", "2", "-d", "16", "-r", "1", "--json",
    ]));
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, p) in rows.iter().zip([4, 8]) {
        assert_eq!(
            (row["n_prompt"].as_u64(), row["n_depth"].as_u64()),
            (Some(p), Some(16))
        );
        assert!(row["prefill_tok_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["decode_tok_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Prefill only: no decode speed.
    let rows = json_lines(&llama(&[
        "bench", "-m", m, "-p", "8", "-n", "0", "-r", "1", "--json",
    ]));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0]["prefill_tok_s"].as_f64().unwrap() > 0.0, "{rows:?}");
    assert_eq!(rows[0]["decode_tok_s"].as_f64(), Some(0.0), "{rows:?}");
    // A depth past the model's positions, or beside --parallel, is refused by name.
    assert_one_line_error(
        &llama(&["bench", "-m", m, "-d", "100000000"]),
        "-d 100000000",
    );
    assert_one_line_error(
        &llama(&["bench", "-m", m, "-d", "8", "--parallel", "2"]),
        "-d",
    );
}

#[test]
fn parallel_zero_is_a_one_line_error() {
    let dir = fixture("llama3");
    let out = llama(&["bench", "-m", dir.to_str().unwrap(), "--parallel", "0"]);
    assert_one_line_error(&out, "parallel");
}
