//! The fuzzing regression corpus, replayed on stable Rust without the fuzzer: every
//! file of `tests/fixtures/fuzz/<target>/` (the seeds `scripts/fixtures/make_fuzz_seeds.py`
//! writes, and every input a campaign found a crash or a hang with) goes through the
//! same entry point its fuzz target calls. An input that panics, or takes longer than
//! the fuzzer's own timeout, fails the test with its file's name; so does a seed that
//! does not go all the way through (a seed that stops early would leave the fuzzer
//! exploring the error paths only).
//!
//! Then a short mutation smoke per target, also on stable: random bit flips, byte
//! edits, inserted and deleted runs, huge counts written over the bytes and splices
//! of the seeds, for `LLAMA_FUZZ_SMOKE_SECS` seconds (10 by default; CI sets 30). It
//! is blind where libFuzzer is guided by coverage, but it runs on every CI run
//! without the fuzzer's long sanitizer build, so a new crash near a seed shows up at
//! once; an input that fails is written out to be kept in the corpus.
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
        "{}: no seeds (python3 scripts/fixtures/make_fuzz_seeds.py writes them)",
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

/// splitmix64: a fixed sequence of mutations, so a failure can be run again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that lengths and counts read from an input are most likely to mishandle.
const INTERESTING: [u64; 8] = [
    0,
    1,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 60,
    1 << 62,
    u64::MAX,
];

/// One to four random edits of one of `inputs`.
fn mutate(rng: &mut Rng, inputs: &[Vec<u8>]) -> Vec<u8> {
    let mut d = inputs[rng.below(inputs.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(d.len() + 1);
        match rng.below(7) {
            0 if at < d.len() => d[at] ^= 1 << rng.below(8),
            1 if at < d.len() => d[at] = rng.next() as u8,
            2 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(at..at, bytes);
            }
            3 if at < d.len() => {
                let end = (at + 1 + rng.below(64)).min(d.len());
                d.drain(at..end);
            }
            4 if at + 8 <= d.len() => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.below(4)];
                d[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            5 => {
                let other = &inputs[rng.below(inputs.len())];
                let from = rng.below(other.len() + 1);
                d.truncate(at);
                d.extend_from_slice(&other[from..]);
            }
            _ if at < d.len() => {
                let end = (at + 1 + rng.below(256)).min(d.len());
                let copy = d[at..end].to_vec();
                d.splice(at..at, copy);
            }
            _ => {}
        }
    }
    d
}

fn smoke(target: &str) {
    let (_, run) = llama_harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no harness entry point `{target}`"));
    let seconds: u64 = match std::env::var("LLAMA_FUZZ_SMOKE_SECS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("LLAMA_FUZZ_SMOKE_SECS={v} is not a number of seconds")),
        Err(_) => 10,
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target);
    let mut inputs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        inputs
            .push(std::fs::read(entry.expect("a directory entry").path()).expect("a corpus file"));
    }
    let mut rng = Rng(target.bytes().fold(0x5eed, |h: u64, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b))
    }));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &inputs);
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(|| run(&input));
        let took = start.elapsed();
        if outcome.is_err() || took > TIMEOUT {
            let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("fuzz-smoke-{target}-{runs}"));
            std::fs::write(&keep, &input).expect("writing the failing input");
            panic!(
                "{target}: mutation {runs} {} (took {took:?}); the input is in {} \
                 (copy it into {} to keep it)",
                if outcome.is_err() { "panicked" } else { "hung" },
                keep.display(),
                dir.display()
            );
        }
        runs += 1;
    }
    assert!(runs > 0, "{target}: no mutation ran in {seconds} s");
    eprintln!("{target}: {runs} mutations in {seconds} s, none failed");
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

#[test]
fn gguf_mutations() {
    smoke("gguf");
}

#[test]
fn safetensors_mutations() {
    smoke("safetensors");
}

#[test]
fn tokenizer_mutations() {
    smoke("tokenizer");
}

#[test]
fn chat_template_mutations() {
    smoke("chat_template");
}

#[test]
fn sampler_mutations() {
    smoke("sampler");
}

#[test]
fn server_mutations() {
    smoke("server");
}
