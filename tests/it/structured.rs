//! Structured output as a script uses it: `llama generate` under `--json-schema`,
//! `--regex` and `--grammar`, many sampled answers at temperature 1.0, each checked by
//! an independent validator (Python's `jsonschema`), and every schema or grammar we
//! cannot enforce refused with a one-line error naming it.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::*;
use serde_json::Value;

/// Sampled answers per schema of SmolLM2: 64 in CI unless `LLAMA_STRUCTURED_SAMPLES`
/// says otherwise; `scripts/bench/structured-campaign.sh` runs 200.
fn samples() -> usize {
    std::env::var("LLAMA_STRUCTURED_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

fn schema(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/schemas")
        .join(name)
}

/// A base seed that differs run to run (printed on failure, so a failure replays).
fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_007)
        .unwrap_or(7)
}

/// `n` sampled answers of `model` to `prompt` under `flags`, as the JSON report gives
/// them.
fn sample(model: &Path, prompt: &str, flags: &[&str], n: usize, seed: u64) -> Value {
    let n = n.to_string();
    let seed = seed.to_string();
    let model = model.to_string_lossy();
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--chat",
        "--prompt",
        prompt,
        "--samples",
        &n,
        "--temperature",
        "1.0",
        "--seed",
        &seed,
        "--max-tokens",
        "256",
        "--json",
    ];
    args.extend_from_slice(flags);
    let out = llama(&args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

/// Every text valid under the schema at `schema`, by Python's `jsonschema`.
fn validate(schema: &Path, texts: &[String], context: &str) {
    let python = crate::serve_cli::python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/validate_json.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(schema)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    let input = serde_json::to_vec(texts).expect("texts as JSON");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("texts written");
    let out = child.wait_with_output().expect("the validator ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{context}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), format!("valid {}", texts.len()), "{context}");
}

/// The texts of a report, each finished by the model (not cut by --max-tokens: under a
/// schema the grammar ends the answer).
fn texts(report: &Value, context: &str) -> Vec<String> {
    let choices = report["choices"].as_array().expect("choices");
    choices
        .iter()
        .map(|c| {
            assert_ne!(c["finish_reason"], "length", "{context}: cut off: {c}");
            c["text"].as_str().expect("text").to_string()
        })
        .collect()
}

fn sampled_answers_match_their_schemas(model: &Path, n: usize) {
    let cases = [
        (
            "nested.json",
            "Describe a person and where they live, as JSON.",
        ),
        ("enums.json", "Place an order for a T-shirt, as JSON."),
        (
            "arrays.json",
            "Give tags, scores and a small grid for a photo, as JSON.",
        ),
    ];
    for (file, prompt) in cases {
        let seed = fresh_seed();
        let path = schema(file);
        let flag = path.to_string_lossy().into_owned();
        let report = sample(model, prompt, &["--json-schema", &flag], n, seed);
        let context = format!("{} {file} seed {seed}", model.display());
        let texts = texts(&report, &context);
        assert_eq!(texts.len(), n, "{context}");
        // Sampling at temperature 1.0 gives different answers, not one answer n times
        // (the enum schema has only 72 possible answers).
        let distinct: std::collections::HashSet<&String> = texts.iter().collect();
        assert!(
            distinct.len() > (n / 4).min(10),
            "{context}: {} distinct",
            distinct.len()
        );
        validate(&path, &texts, &context);
        // The mask's cost is reported beside the step's.
        let timings = &report["choices"][0]["timings"];
        assert!(timings["mask_steps"].as_u64().unwrap_or(0) > 0, "{timings}");
        let mask = timings["mask_ms_per_token"].as_f64().expect("mask time");
        let step = timings["step_ms_per_token"].as_f64().expect("step time");
        assert!(mask > 0.0 && step > 0.0, "{timings}");
    }
}

#[test]
fn smollm2_samples_always_match_their_schemas() {
    sampled_answers_match_their_schemas(&real_model_path(), samples());
}

/// Qwen2.5 0.5B costs about four times SmolLM2 per token: CI samples fewer answers of
/// it (`LLAMA_STRUCTURED_QWEN_SAMPLES`, default 16); `scripts/bench/structured-campaign.sh`
/// runs the full 200.
#[test]
fn qwen25_samples_always_match_their_schemas() {
    let n = std::env::var("LLAMA_STRUCTURED_QWEN_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    sampled_answers_match_their_schemas(&qwen25_path(), n);
}

#[test]
fn regex_and_lark_grammars_hold_for_every_sample() {
    let model = real_model_path();
    let seed = fresh_seed();
    let report = sample(
        &model,
        "Is the sky blue? Answer yes or no and a two-digit confidence.",
        &["--regex", "(yes|no), [0-9]{2}%"],
        16,
        seed,
    );
    for t in texts(&report, "regex") {
        let (word, rest) = t.split_once(", ").unwrap_or_else(|| panic!("{t:?}"));
        assert!(word == "yes" || word == "no", "{t:?} (seed {seed})");
        let digits = rest.strip_suffix('%').unwrap_or_else(|| panic!("{t:?}"));
        assert!(
            digits.len() == 2 && digits.bytes().all(|b| b.is_ascii_digit()),
            "{t:?}"
        );
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let lark = dir.path().join("answer.lark");
    std::fs::write(
        &lark,
        "start: \"Answer: \" choice \" because \" reason\nchoice: \"A\" | \"B\" | \"C\"\nreason: /[a-z ]{1,20}/\n",
    )
    .expect("grammar written");
    let flag = lark.to_string_lossy().into_owned();
    let report = sample(&model, "Pick A, B or C.", &["--grammar", &flag], 16, seed);
    for t in texts(&report, "lark") {
        let rest = t
            .strip_prefix("Answer: ")
            .unwrap_or_else(|| panic!("{t:?}"));
        let (choice, reason) = rest
            .split_once(" because ")
            .unwrap_or_else(|| panic!("{t:?}"));
        assert!(["A", "B", "C"].contains(&choice), "{t:?}");
        assert!(
            (1..=20).contains(&reason.len())
                && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b' '),
            "{t:?}"
        );
    }
}

/// What cannot be enforced is refused before anything runs, in one line naming it.
#[test]
fn unenforceable_schemas_and_grammars_are_refused_by_name() {
    let model = real_model_path();
    let model = model.to_string_lossy();
    let dir = tempfile::tempdir().expect("a temp dir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("written");
        p.to_string_lossy().into_owned()
    };
    let weird = write(
        "weird.json",
        r#"{"type": "object", "properties": {"d": {"type": "string", "format": "weird-format"}}}"#,
    );
    let not_json = write("broken.json", "{\"type\": ");
    let bad_lark = write("bad.lark", "start: undefined_rule\n");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--json-schema", &weird], "weird-format"),
        (vec!["--json-schema", &not_json], "broken.json"),
        (
            vec!["--json-schema", "/no/such/schema.json"],
            "/no/such/schema.json",
        ),
        (
            vec![
                "--json-schema",
                r#"{"type": "object", "minProperties": "x"}"#,
            ],
            "minProperties",
        ),
        (vec!["--grammar", &bad_lark], "undefined_rule"),
        (vec!["--regex", "(unclosed"], "regex"),
    ];
    for (flags, words) in cases {
        let mut args = vec!["generate", "--model", &model, "--prompt", "hi", "-n", "4"];
        args.extend_from_slice(&flags);
        let out = llama(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(words), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{flags:?}: {stderr}");
    }
}
