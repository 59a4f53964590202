//! The prompt cache on disk: what one scheduler spills, another (a restarted server)
//! loads a page at a time and continues exactly as if it had run the prompt; entries
//! that are damaged, foreign or over the budget are never used; a directory that
//! cannot be written, or fills up, leaves the server answering from RAM. Then chat
//! sessions saved and resumed, and conversations routed by nginx to the replica that
//! holds their cache.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::StreamExt;
use llama::graph::{KvType, Pipeline, Program};
use llama::runtime::prompt_cache::{load_session, model_digest, save_session};
use llama::runtime::{
    BatchOptions, CacheKey, CacheStats, DiskCache, DiskOptions, Event, PromptCacheError, Scheduler,
};
use serde_json::{json, Value};

fn tiny_program() -> Program {
    let device = flex();
    Program::new(graph("llama3", &device, &Pipeline::standard()), device).expect("program")
}

fn tiny_key(program: &Program) -> CacheKey {
    let digest = model_digest(&fixture("llama3"), None).expect("hash the tiny model");
    CacheKey::new(digest, KvType::F16, "flex", program)
}

/// Opens a disk tier in `dir` (budget `budget`) for the tiny model.
fn disk(dir: &Path, budget: u64, key: CacheKey, stats: Arc<CacheStats>) -> Option<DiskCache> {
    DiskCache::open(
        &DiskOptions {
            dir: dir.to_path_buf(),
            budget,
            model: fixture("llama3"),
        },
        key,
        stats,
    )
}

/// What a scheduler (with `disk`, if any) generates greedily after `prompt`: the ids,
/// and the prompt tokens it reused.
fn run(
    program: &Program,
    disk: Option<DiskCache>,
    stats: Arc<CacheStats>,
    prompt: &[u32],
) -> (Vec<u32>, u64) {
    let opts = BatchOptions {
        kv_budget: 1024,
        ..BatchOptions::default()
    };
    let s = Scheduler::for_program(program, 256, KvType::F16, opts).expect("scheduler");
    let mut s = s.with_cache_stats(stats);
    if let Some(d) = disk {
        s = s.with_disk(d);
    }
    s.submit(prompt.to_vec(), greedy(8)).expect("submit");
    let mut out = None;
    s.run(|e| match e {
        Event::Done { generation, .. } => out = Some(generation.ids),
        Event::Failed { error, .. } => panic!("{error}"),
        _ => {}
    });
    let reused = s.stats().prompt_tokens_reused;
    // Dropping the scheduler drops its tier, which finishes the writes queued.
    drop(s);
    (out.expect("a generation"), reused)
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "kv"))
        .collect();
    v.sort();
    v
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn a_new_scheduler_continues_from_what_an_earlier_one_spilled() {
    let p = tiny_program();
    let key = tiny_key(&p);
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt = ids(200, 3);
    let none = || Arc::new(CacheStats::default());
    let (want, reused) = run(&p, None, none(), &prompt);
    assert_eq!(reused, 0);
    let stats = none();
    let d = disk(dir.path(), 1 << 30, key.clone(), stats.clone()).expect("a writable dir");
    let (first, _) = run(&p, Some(d), stats.clone(), &prompt);
    assert_eq!(first, want);
    assert_eq!(
        entries(dir.path()).len(),
        1,
        "one finished sequence, one entry"
    );
    assert!(count(&stats.disk_written) > 0);

    // A fresh scheduler (an empty RAM cache): the whole prompt but its last token
    // comes from disk, and the answer is the same.
    let stats = none();
    let d = disk(dir.path(), 1 << 30, key.clone(), stats.clone()).expect("reopen");
    assert_eq!(d.len(), 1);
    let (again, reused) = run(&p, Some(d), stats.clone(), &prompt);
    assert_eq!(again, want);
    assert_eq!(reused, prompt.len() as u64 - 1);
    assert_eq!(count(&stats.disk_hits), 1);
    assert_eq!(count(&stats.ram_misses), 1);
    // The entry holds the prompt and the generated tokens but the last (never run):
    // all of it is read, being in the pages that hold the prompt.
    let entry_len = (prompt.len() + want.len() - 1) as u64;
    let per_position = count(&stats.disk_read) / entry_len;
    assert_eq!(count(&stats.disk_read), per_position * entry_len);

    // A prompt that shares only its first 130 tokens loads the three pages holding
    // them and runs the rest; it generates what it generates alone.
    let mut other = prompt[..130].to_vec();
    other.extend(ids(40, 9));
    assert_ne!(other[130], prompt[130]);
    let (alone, _) = run(&p, None, none(), &other);
    let stats = none();
    let d = disk(dir.path(), 1 << 30, key, stats.clone()).expect("reopen");
    let (shared, reused) = run(&p, Some(d), stats.clone(), &other);
    assert_eq!(shared, alone);
    assert_eq!(reused, 130);
    assert_eq!(
        count(&stats.disk_read),
        192 * per_position,
        "it read three pages (192 positions) of rows"
    );
}

/// Flips one byte at `at` (from the end when negative).
fn flip(path: &Path, at: i64) {
    let mut bytes = std::fs::read(path).expect("read entry");
    let i = if at < 0 {
        bytes.len() - (-at) as usize
    } else {
        at as usize
    };
    bytes[i] ^= 0x55;
    std::fs::write(path, bytes).expect("write entry");
}

#[test]
fn damaged_or_foreign_entries_are_skipped_and_never_used() {
    let p = tiny_program();
    let key = tiny_key(&p);
    let prompt = ids(150, 5);
    let none = || Arc::new(CacheStats::default());
    let (want, _) = run(&p, None, none(), &prompt);
    let good = tempfile::tempdir().expect("tempdir");
    let d = disk(good.path(), 1 << 30, key.clone(), none()).expect("dir");
    run(&p, Some(d), none(), &prompt);
    let original = entries(good.path()).pop().expect("an entry");
    let name = original.file_name().expect("name").to_owned();
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 4] = [
        ("a flipped byte in the last page", |f| flip(f, -3)),
        ("a flipped byte in the header", |f| flip(f, 40)),
        ("a truncated file", |f| {
            let len = std::fs::metadata(f).expect("meta").len();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .expect("open");
            file.set_len(len / 2).expect("truncate");
        }),
        ("an empty file", |f| {
            std::fs::write(f, b"").expect("empty");
        }),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(&name);
        std::fs::copy(&original, &path).expect("copy");
        damage(&path);
        let stats = none();
        let d = disk(dir.path(), 1 << 30, key.clone(), stats.clone()).expect("dir");
        let (got, reused) = run(&p, Some(d), stats.clone(), &prompt);
        assert_eq!(got, want, "{what}: the answer");
        assert_eq!(reused, 0, "{what}: nothing of it is used");
        assert_eq!(count(&stats.disk_skipped), 1, "{what}: skipped once");
        assert_eq!(count(&stats.disk_hits), 0, "{what}");
        // Ours and damaged: removed, and the run wrote a good one in its place.
        let left = entries(dir.path());
        assert_eq!(left.len(), 1, "{what}");
        let reopened = disk(dir.path(), 1 << 30, key.clone(), none()).expect("dir");
        assert_eq!(reopened.len(), 1, "{what}: the rewritten entry reads back");
    }

    // Made under another key (another model): skipped, left alone, never used.
    let foreign = CacheKey {
        model: "0".repeat(64),
        ..key.clone()
    };
    let stats = none();
    let d = disk(good.path(), 1 << 30, foreign, stats.clone()).expect("dir");
    assert_eq!(d.len(), 0);
    assert_eq!(count(&stats.disk_skipped), 1);
    let (got, reused) = run(&p, Some(d), stats.clone(), &prompt);
    assert_eq!(got, want);
    assert_eq!(reused, 0);
    assert!(
        original.exists(),
        "another model's entry is not ours to delete"
    );
}

#[test]
fn the_directory_stays_within_its_budget_least_recently_used_first() {
    let p = tiny_program();
    let key = tiny_key(&p);
    let none = || Arc::new(CacheStats::default());
    let probe = tempfile::tempdir().expect("tempdir");
    let (a, b) = (ids(150, 1), ids(150, 2));
    let d = disk(probe.path(), 1 << 30, key.clone(), none()).expect("dir");
    run(&p, Some(d), none(), &a);
    let size = std::fs::metadata(&entries(probe.path())[0])
        .expect("meta")
        .len();
    // Room for one entry of this size, not two.
    let budget = size * 3 / 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = none();
    let d = disk(dir.path(), budget, key.clone(), stats.clone()).expect("dir");
    run(&p, Some(d), stats.clone(), &a);
    let d = disk(dir.path(), budget, key.clone(), stats.clone()).expect("dir");
    run(&p, Some(d), stats.clone(), &b);
    assert_eq!(entries(dir.path()).len(), 1, "the older entry made room");
    assert!(count(&stats.disk_bytes) <= budget);
    let stats = none();
    let d = disk(dir.path(), budget, key.clone(), stats.clone()).expect("dir");
    let (_, reused_b) = run(&p, Some(d), stats.clone(), &b);
    assert_eq!(reused_b, 149, "the newer entry is there");
    let d = disk(dir.path(), budget, key, stats.clone()).expect("dir");
    let (_, reused_a) = run(&p, Some(d), stats, &a);
    assert_eq!(reused_a, 0, "the older entry is gone");
}

#[test]
fn a_directory_that_cannot_be_written_is_refused_with_none() {
    let p = tiny_program();
    let file = tempfile::NamedTempFile::new().expect("a file");
    // A directory under a regular file can never be made, whoever runs the test.
    let under = file.path().join("cache");
    assert!(disk(&under, 1 << 30, tiny_key(&p), Arc::default()).is_none());
}

#[test]
fn a_session_state_reads_back_exactly_and_only_under_its_key() {
    let p = tiny_program();
    let key = tiny_key(&p);
    let mut session = session("llama3", &flex(), &Pipeline::standard());
    session.prefill(&ids(40, 4)).expect("prefill");
    let state = session.state().expect("state");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chat.session");
    let meta = json!([["user", "hi"], ["assistant", "hello"]]);
    save_session(&path, &key, &state, meta.clone()).expect("save");
    let (back, back_meta) = load_session(&path, &key).expect("load");
    assert_eq!(back, state);
    assert_eq!(back_meta, meta);
    let other = CacheKey {
        cache_type: "f32".into(),
        ..key.clone()
    };
    assert!(matches!(
        load_session(&path, &other),
        Err(PromptCacheError::Foreign { .. })
    ));
    flip(&path, -1);
    assert!(matches!(
        load_session(&path, &key),
        Err(PromptCacheError::Corrupt { .. })
    ));
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn the_model_digest_is_the_sha256_of_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"abc").expect("write");
    // FIPS 180-2's example of "abc".
    let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(model_digest(&path, None).expect("hash"), want);
    let memo = tempfile::tempdir().expect("memo");
    assert_eq!(model_digest(&path, Some(memo.path())).expect("hash"), want);
    assert!(memo.path().join("models.json").exists());
    assert_eq!(model_digest(&path, Some(memo.path())).expect("memo"), want);
    // A changed file is hashed again (its size differs from the memo's).
    std::fs::write(&path, b"abcd").expect("write");
    assert_eq!(
        model_digest(&path, Some(memo.path())).expect("hash"),
        "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
    );
}

// ---- the binary ----

/// A `llama serve` process whose stderr lines are kept.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llama"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("llama serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                lines.lock().expect("log").push(line);
            }
        });
        let start = Instant::now();
        let base = loop {
            let found = log.lock().expect("log").iter().find_map(|l| {
                l.strip_prefix("listening on ")
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_string)
            });
            if let Some(b) = found {
                break b;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("llama serve exited while starting: {status}");
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no address");
            std::thread::sleep(Duration::from_millis(20));
        };
        let server = Server { child, base, log };
        let start = Instant::now();
        let rt = rt();
        while rt.block_on(async {
            reqwest::get(format!("{}/health", server.base))
                .await
                .map(|r| r.status() != 200)
                .unwrap_or(true)
        }) {
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "llama serve did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port")
    }

    fn logged(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().expect("log");
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// SIGTERM, then waits for exit 0.
    fn stop(mut self) -> Vec<String> {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert_eq!(status.code(), Some(0), "exit after SIGTERM");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().expect("log").clone();
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A streamed greedy completion: its text, the time to its first token, and its
/// usage.
fn complete(
    base: &str,
    prompt: &str,
    max_tokens: usize,
    headers: &[(&str, &str)],
) -> (String, Duration, Value) {
    rt().block_on(async {
        let mut req = reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(&json!({
                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true},
            }));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let start = Instant::now();
        let r = req.send().await.expect("request");
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let (mut text, mut first, mut usage, mut pending) =
            (String::new(), None, Value::Null, String::new());
        while let Some(chunk) = body.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).expect("a JSON event");
                if let Some(c) = v["choices"].get(0) {
                    first.get_or_insert_with(|| start.elapsed());
                    text.push_str(c["text"].as_str().unwrap_or_default());
                }
                if !v["usage"].is_null() {
                    usage = v["usage"].clone();
                }
            }
        }
        (text, first.expect("a token came"), usage)
    })
}

/// What `llama generate` answers greedily (the oracle for the server's text).
fn generated(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let max = max_tokens.to_string();
    let model = model.to_str().expect("a UTF-8 path");
    let out = llama(&[
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-tokens",
        &max,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("generate --json");
    v["text"].as_str().expect("text").to_string()
}

/// About `words` words of varied prose, the same every time.
fn long_prompt(words: usize) -> String {
    let subjects = [
        "The river",
        "A merchant",
        "The old clock",
        "Every lantern",
        "The council",
    ];
    let verbs = ["remembers", "carries", "counts", "hides", "answers"];
    let objects = [
        "the salt roads",
        "a quiet harbor",
        "forty winters",
        "the northern bell",
        "each promise",
    ];
    let mut out = String::new();
    let mut n = 0;
    let mut i = 0usize;
    while n < words {
        let s = format!(
            "{} {} {} in year {}. ",
            subjects[i % 5],
            verbs[(i / 5) % 5],
            objects[(i / 25) % 5],
            1000 + i * 7
        );
        n += s.split_whitespace().count();
        out.push_str(&s);
        i += 1;
    }
    out.push_str("In summary, the story tells us that");
    out
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    entries(dir)
}

#[test]
fn a_restarted_server_answers_a_long_prompt_from_its_cache_dir() {
    let model = real_model_path();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8").to_string();
    let args = ["--ctx-size", "4096", "--parallel", "1", "--cache-dir", &d];
    let prompt = long_prompt(2000);

    let server = Server::start(&model, &args);
    let (cold_text, cold_ttft, cold_usage) = complete(&server.base, &prompt, 16, &[]);
    let prompt_tokens = cold_usage["prompt_tokens"].as_u64().expect("usage");
    assert!(
        (2500..=3800).contains(&prompt_tokens),
        "a ~3,000-token prompt, got {prompt_tokens}"
    );
    assert_eq!(cold_usage["prompt_tokens_details"]["cached_tokens"], 0);
    server.stop();
    assert_eq!(
        cache_files(dir.path()).len(),
        1,
        "the finished sequence was written"
    );

    let server = Server::start(&model, &args);
    let (warm_text, warm_ttft, warm_usage) = complete(&server.base, &prompt, 16, &[]);
    assert_eq!(
        warm_text, cold_text,
        "the same greedy answer after a restart"
    );
    let cached = warm_usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached tokens");
    assert!(
        cached * 10 >= prompt_tokens * 9,
        "{cached} of {prompt_tokens} prompt tokens cached"
    );
    eprintln!(
        "time to first token: cold {cold_ttft:?}, warm {warm_ttft:?} ({:.1}x)",
        cold_ttft.as_secs_f64() / warm_ttft.as_secs_f64()
    );
    assert!(
        warm_ttft * 4 <= cold_ttft,
        "warm {warm_ttft:?} is not a quarter of cold {cold_ttft:?}"
    );
    let metrics = rt().block_on(async {
        reqwest::get(format!("{}/metrics", server.base))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("llama_prompt_cache_hits_total{model=")
                && l.ends_with(",tier=\"disk\"} 1")),
        "{metrics}"
    );
    server.stop();

    // Every file damaged: the same answer, computed again, and each skip logged.
    let files = cache_files(dir.path());
    assert!(!files.is_empty());
    for f in &files {
        let len = std::fs::metadata(f).expect("meta").len() as i64;
        flip(f, len / 2);
    }
    let server = Server::start(&model, &args);
    let (text, _, usage) = complete(&server.base, &prompt, 16, &[]);
    assert_eq!(text, cold_text, "the same answer from damaged files");
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    let skipped = server.logged("warning: prompt cache: skipping");
    assert_eq!(skipped.len(), files.len(), "one warning per damaged file");
    server.stop();
}

#[test]
fn an_unwritable_full_or_foreign_cache_dir_leaves_correct_answers_from_ram() {
    let model = real_model_path();
    let prompt = "The three primary colors are";
    let want = generated(&model, prompt, 12);

    // Not writable: a directory under a regular file.
    let file = tempfile::NamedTempFile::new().expect("a file");
    let under = file.path().join("cache");
    let server = Server::start(&model, &["--cache-dir", under.to_str().expect("utf-8")]);
    for _ in 0..2 {
        assert_eq!(complete(&server.base, prompt, 12, &[]).0, want);
    }
    assert_eq!(server.logged("cannot be written").len(), 1);
    drop(server);

    // A full disk: a 1 MiB tmpfs, where an entry of this prompt (tens of pages of
    // every layer) does not fit.
    let mnt = tempfile::tempdir().expect("tempdir");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .expect("mount runs");
    assert!(
        ok.success(),
        "mounting a small tmpfs needs root (CAP_SYS_ADMIN): run this test as root"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let full_dir = mnt.path().to_str().expect("utf-8").to_string();
    let server = Server::start(&model, &["--cache-dir", &full_dir]);
    let long = long_prompt(150);
    let want_long = generated(&model, &long, 8);
    for _ in 0..3 {
        assert_eq!(complete(&server.base, &long, 8, &[]).0, want_long);
        assert_eq!(complete(&server.base, prompt, 12, &[]).0, want);
    }
    let warned = server.logged("is full; serving from RAM only");
    assert_eq!(warned.len(), 1, "one warning, then RAM only");
    let leftovers: Vec<_> = std::fs::read_dir(mnt.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary file is left behind");
    drop(server);

    // Another model's entries: skipped with a warning each, never used.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8").to_string();
    let server = Server::start(&model, &["--cache-dir", &d]);
    complete(&server.base, &long, 8, &[]);
    server.stop();
    let made = cache_files(dir.path()).len();
    assert!(made >= 1);
    let gemma = gemma3_path();
    let want_gemma = generated(&gemma, &long, 8);
    let server = Server::start(&gemma, &["--cache-dir", &d]);
    let (text, _, usage) = complete(&server.base, &long, 8, &[]);
    assert_eq!(text, want_gemma);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(server.logged("made by another model").len(), made);
    drop(server);
    assert_eq!(
        cache_files(dir.path()).len(),
        made,
        "another model's files stay"
    );
}

/// Runs `llama chat` with `input` on stdin; its stdout and stderr.
fn chat(model: &Path, session: Option<&Path>, input: &str) -> (String, String) {
    chat_with(model, session, &[], input)
}

fn chat_with(
    model: &Path,
    session: Option<&Path>,
    extra: &[&str],
    input: &str,
) -> (String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama"));
    cmd.arg("chat")
        .arg("--model")
        .arg(model)
        .args(["--temperature", "0", "--max-tokens", "24"]);
    if let Some(s) = session {
        cmd.arg("--session").arg(s);
    }
    cmd.args(extra);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("llama chat runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("chat ends");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

/// The prompt tokens each turn ran, from the stats lines.
fn prompt_runs(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("prompt ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_chat_session_resumes_without_running_the_conversation_again() {
    let model = real_model_path();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("chat.session");
    let (one, two) = ("Name a fruit.\n", "What color is it?\n");
    // The oracle: both turns in one process.
    let (both, both_err) = chat(&model, None, &format!("{one}{two}"));
    let full_second = prompt_runs(&both_err)[1];

    let (first, _) = chat(&model, Some(&file), one);
    assert!(both.starts_with(&first), "{first:?} / {both:?}");
    assert!(file.exists(), "saved on exit");
    let (second, err) = chat(&model, Some(&file), two);
    assert!(err.contains("(resumed 2 messages"), "{err}");
    assert_eq!(format!("{first}{second}"), both, "the same answers");
    let ran = prompt_runs(&err);
    assert_eq!(
        ran,
        vec![full_second],
        "the second turn runs only what it adds, as in one process"
    );

    // A damaged file: a warning, and a new conversation.
    flip(&file, -2);
    let (_, err) = chat(&model, Some(&file), two);
    assert!(err.contains("warning: session"), "{err}");
    assert!(!err.contains("resumed"), "{err}");
}

#[test]
fn a_chat_with_a_cache_dir_starts_from_an_earlier_chats_prompt() {
    let model = real_model_path();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    let system = long_prompt(200);
    let args = ["--system", system.as_str(), "--cache-dir", d];
    let (first, err) = chat_with(&model, None, &args, "Name a fruit.\n");
    let ran = prompt_runs(&err);
    assert!(
        ran[0] > 200,
        "the first chat runs its whole prompt: {ran:?}"
    );
    assert_eq!(cache_files(dir.path()).len(), 1, "its turn was written");
    let (second, err) = chat_with(&model, None, &args, "Name a fruit.\n");
    assert_eq!(second, first, "the same answer");
    assert_eq!(
        prompt_runs(&err),
        vec![1],
        "all of the prompt but its last token came from the cache"
    );
}

#[test]
fn a_conversation_behind_nginx_stays_on_the_replica_that_holds_its_cache() {
    let model = real_model_path();
    let nginx = crate::serve_cli::nginx();
    let a = Server::start(&model, &["--parallel", "2"]);
    let b = Server::start(&model, &["--parallel", "2"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    // The shipped configuration, with this test's ports and a writable prefix.
    let shipped = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx-affinity.conf"),
    )
    .expect("deploy/nginx-affinity.conf");
    let d = dir.path().display();
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;\n"
    } else {
        ""
    };
    let conf = format!(
        "{user}pid {d}/nginx.pid;\nerror_log {d}/error.log;\n{}",
        shipped
            .replace("127.0.0.1:8081", &format!("127.0.0.1:{}", a.port()))
            .replace("127.0.0.1:8082", &format!("127.0.0.1:{}", b.port()))
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replace(
                "http {",
                &format!(
                    "http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;"
                )
            )
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut proxy = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off; master_process off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nginx starts");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while rt().block_on(async {
        reqwest::get(format!("{base}/health"))
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
    }) {
        if let Ok(Some(status)) = proxy.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = proxy.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("nginx exited: {status}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nginx did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _proxy = Kill(proxy);
    let served = |s: &Server| -> f64 {
        let text = rt().block_on(async {
            reqwest::get(format!("{}/metrics", s.base))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        });
        text.lines()
            .filter(|l| {
                l.starts_with("llama_requests_total{") && l.contains("/v1/chat/completions")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Two conversations, ten turns each, each with its own session header.
    for (conversation, session) in ["conversation-7", "conversation-42"].iter().enumerate() {
        let before = (served(&a), served(&b));
        let mut messages = vec![
            json!({"role": "system", "content": "You are a helpful assistant. Answer briefly."}),
        ];
        for turn in 0..10 {
            messages.push(json!({"role": "user", "content": format!("Tell me one fact about the number {}.", turn + 1)}));
            let r = rt().block_on(async {
                let r = reqwest::Client::new()
                    .post(format!("{base}/v1/chat/completions"))
                    .header("X-Session-Id", *session)
                    .json(&json!({"messages": messages, "max_tokens": 12, "temperature": 0}))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.expect("json")
            });
            let answer = r["choices"][0]["message"]["content"]
                .as_str()
                .expect("an answer")
                .to_string();
            let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("cached tokens");
            if turn > 0 {
                assert!(
                    cached > 0,
                    "conversation {conversation}, turn {turn}: nothing cached"
                );
            }
            messages.push(json!({"role": "assistant", "content": answer}));
        }
        let (da, db) = (served(&a) - before.0, served(&b) - before.1);
        assert!(
            (da, db) == (10.0, 0.0) || (da, db) == (0.0, 10.0),
            "one replica serves the whole conversation: a {da}, b {db}"
        );
    }
}
