//! The fuzzing regression corpus, replayed on stable Rust without the fuzzer: every
//! file of `tests/fixtures/fuzz/<target>/` (the seeds `scripts/make_fuzz_seeds.py`
//! writes, and every input a campaign found a crash or a hang with) goes through the
//! same entry point its fuzz target calls. An input that panics, or takes longer than
//! the fuzzer's own timeout, fails the test with its file's name; so does a seed that
//! does not go all the way through (a seed that stops early would leave the fuzzer
//! exploring the error paths only).
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `scripts/fuzz.sh` runs libFuzzer with `-timeout=` this many seconds.
const TIMEOUT: Duration = Duration::from_secs(10);

fn is_seed(file: &std::path::Path) -> bool {
    file.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
}

fn replay(target: &str) {
    let (_, run) = llama_harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no harness entry point `{target}`"));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(
        files.iter().any(|f| is_seed(f)),
        "{}: no seeds (python3 scripts/make_fuzz_seeds.py writes them)",
        dir.display()
    );
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("a corpus file");
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(|| run(&data));
        let took = start.elapsed();
        match outcome {
            Err(e) => {
                let message = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: panicked: {message}", file.display()));
            }
            Ok(_) if took > TIMEOUT => {
                failures.push(format!("{}: took {took:?}", file.display()));
            }
            Ok(false) if is_seed(file) => {
                failures.push(format!("{}: the seed stopped short", file.display()));
            }
            Ok(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gguf_corpus() {
    replay("gguf");
}

#[test]
fn safetensors_corpus() {
    replay("safetensors");
}

#[test]
fn tokenizer_corpus() {
    replay("tokenizer");
}

#[test]
fn chat_template_corpus() {
    replay("chat_template");
}

#[test]
fn sampler_corpus() {
    replay("sampler");
}

#[test]
fn server_corpus() {
    replay("server");
}

/// Every harness entry point has its corpus directory, so none goes unreplayed.
#[test]
fn every_target_has_a_corpus() {
    for (name, _) in llama_harness::TARGETS {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fuzz")
            .join(name);
        assert!(dir.is_dir(), "{} is missing", dir.display());
    }
}

#[test]
fn parts_and_join_are_inverse() {
    let joined = llama_harness::join(&[&b"a"[..], b"", b"bc"]);
    assert_eq!(llama_harness::parts(&joined), vec![&b"a"[..], b"", b"bc"]);
    assert_eq!(llama_harness::parts(b"plain"), vec![&b"plain"[..]]);
}
