//! Many models in one `llama serve`: a models directory and repeated `--model`,
//! loading on first use, least-recently-used unloading past `--max-models`, routing
//! by the `model` field on every route, the load and unload routes, a damaged file
//! beside good ones, the directory rescanned, and chat with Gemma 3 270M (whose file
//! has no chat template) through the built-in template.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::serve_cli::{runtime, Served};
use crate::serve_dialects::post as call;

async fn models(base: &str) -> Vec<Value> {
    let v: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .expect("GET /v1/models")
        .json()
        .await
        .expect("json");
    v["data"].as_array().cloned().unwrap_or_default()
}

/// `status.value` of one model in `/v1/models`.
async fn state_of(base: &str, name: &str) -> String {
    models(base)
        .await
        .iter()
        .find(|m| m["id"] == name)
        .and_then(|m| m["status"]["value"].as_str())
        .unwrap_or("absent")
        .to_string()
}

fn chat_body(model: &str, prompt: &str) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": prompt }],
        "max_tokens": 16,
        "temperature": 0,
    })
}

/// A greedy chat answer's text; panics on any other status.
async fn chat(base: &str, model: &str, prompt: &str) -> String {
    let (status, v) = call(base, "/v1/chat/completions", &chat_body(model, prompt)).await;
    assert_eq!(status, 200, "{model}: {v}");
    assert_eq!(v["model"], model, "the answer names the model that gave it");
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// A directory of links to the cached models, as a user lays one out.
fn models_dir(links: &[(&str, &Path)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, target) in links {
        std::os::unix::fs::symlink(target, dir.path().join(name)).expect("symlink");
    }
    dir
}

fn smollm2() -> PathBuf {
    real_model_path()
}

/// The process's resident set and open descriptors.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count();
    (rss, fds)
}

const PROMPTS: [&str; 3] = [
    "Name a primary colour.",
    "What is 2 + 3?",
    "Say hello in French.",
];

/// SmolLM2, Qwen2.5 0.5B and MiniLM from one directory with `--max-models 2`: four
/// clients alternate between the two chat models while a fifth asks for
/// embeddings, so models are unloaded and loaded again under load. Every greedy
/// answer equals that model's own single-model server's, every embedding equals
/// MiniLM's own server's, and the resident set stays within the memory budget plus a
/// slack for what the estimate leaves out (the runtime, compiled graphs, allocator).
#[test]
fn one_server_answers_for_three_models_as_each_alone() {
    let qwen = qwen25_path();
    let minilm = minilm_path();
    let rt = runtime();
    let common = ["--parallel", "2", "--ctx-size", "256"];
    // Each model's own server, one at a time: the oracle.
    let mut alone: Vec<(String, String, String)> = Vec::new();
    for (name, path) in [("smollm2", smollm2()), ("qwen", qwen.clone())] {
        let mut args = vec!["--model", path.to_str().expect("path"), "--alias", name];
        args.extend(common);
        let served = Served::start_args(&args);
        for p in PROMPTS {
            let text = rt.block_on(chat(&served.base, name, p));
            alone.push((name.to_string(), p.to_string(), text));
        }
    }
    let embed_input = json!(["a model directory", "routing by name"]);
    let want_vectors = {
        let served = Served::start_args(&["--model", minilm.to_str().expect("path")]);
        let (s, v) = rt.block_on(call(
            &served.base,
            "/v1/embeddings",
            &json!({ "model": "x", "input": embed_input }),
        ));
        assert_eq!(s, 200, "{v}");
        v["data"].clone()
    };

    let dir = models_dir(&[
        ("smollm2.gguf", &smollm2()),
        ("qwen.gguf", &qwen),
        ("minilm", &minilm),
    ]);
    let budget: u64 = 1536 << 20;
    let slack: u64 = 512 << 20;
    let budget_arg = budget.to_string();
    let mut args = vec![
        "--models-dir",
        dir.path().to_str().expect("path"),
        "--max-models",
        "2",
        "--memory-budget",
        &budget_arg,
    ];
    args.extend(common);
    let served = Served::start_args(&args);
    let base = served.base.clone();
    let listed: Vec<String> = rt
        .block_on(models(&base))
        .iter()
        .map(|m| {
            format!(
                "{}={}",
                m["id"].as_str().unwrap_or_default(),
                m["status"]["value"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        listed,
        ["minilm=unloaded", "qwen=unloaded", "smollm2=unloaded"],
        "every model is listed, none loaded before its first request"
    );

    let pid = served.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let (rss, _) = rss_and_fds(pid);
                peak.fetch_max(rss * 1024, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let answers = rt.block_on(async {
        let mut tasks = Vec::new();
        for client in 0..4usize {
            let base = base.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for round in 0..3usize {
                    let name = ["smollm2", "qwen"][(client + round) % 2];
                    let p = PROMPTS[(client + round) % PROMPTS.len()];
                    got.push((name.to_string(), p.to_string(), chat(&base, name, p).await));
                }
                got
            }));
        }
        let embeddings = {
            let base = base.clone();
            let input = embed_input.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..3 {
                    let (s, v) = call(
                        &base,
                        "/v1/embeddings",
                        &json!({ "model": "minilm", "input": input }),
                    )
                    .await;
                    assert_eq!(s, 200, "{v}");
                    assert_eq!(v["model"], "minilm");
                    got.push(v["data"].clone());
                }
                got
            })
        };
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client"));
        }
        (all, embeddings.await.expect("embeddings client"))
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().expect("sampler");
    let (answers, vectors) = answers;
    assert_eq!(answers.len(), 12);
    for (name, prompt, text) in &answers {
        let want = alone
            .iter()
            .find(|(n, p, _)| n == name && p == prompt)
            .map(|(_, _, t)| t)
            .expect("an answer alone");
        assert_eq!(
            text, want,
            "{name} on {prompt:?} differs from its own server"
        );
    }
    for v in &vectors {
        let (a, b) = (
            v.as_array().expect("data"),
            want_vectors.as_array().expect("data"),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (
                x["embedding"].as_array().expect("vector"),
                y["embedding"].as_array().expect("vector"),
            );
            let cos: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| p.as_f64().unwrap_or(0.0) * q.as_f64().unwrap_or(0.0))
                .sum();
            assert!(
                cos > 0.9999,
                "an embedding differs from MiniLM's own: cos {cos}"
            );
        }
    }
    assert!(
        !served.logged("unloading the model").is_empty(),
        "three models under --max-models 2 must unload one"
    );
    let metrics = rt.block_on(async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    for name in ["smollm2", "qwen"] {
        let line = format!("llama_generated_tokens_total{{model=\"{name}\"}}");
        assert!(metrics.contains(&line), "no {line} in /metrics");
    }
    let loaded = rt
        .block_on(models(&base))
        .iter()
        .filter(|m| m["status"]["value"] == "loaded")
        .count();
    assert!(loaded <= 2, "{loaded} models loaded past --max-models 2");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("peak RSS {} MiB (budget {} MiB)", peak >> 20, budget >> 20);
    assert!(
        peak <= budget + slack,
        "peak RSS {} MiB past the budget {} MiB plus the slack {} MiB",
        peak >> 20,
        budget >> 20,
        slack >> 20
    );
}

/// A request for a model that is loading waits for it; two arriving together load it
/// once. Unloaded and loaded again, it answers identically. Unknown names get 404 in
/// each route's own error shape, and the load and unload routes act by name.
#[test]
fn models_load_on_demand_and_reload_identically() {
    let dir = models_dir(&[("smol.gguf", &smollm2())]);
    let served = Served::start_args(&["--models-dir", dir.path().to_str().expect("path")]);
    let base = served.base.clone();
    let rt = runtime();
    rt.block_on(async {
        assert_eq!(state_of(&base, "smol").await, "unloaded");
        let (a, b) = tokio::join!(
            chat(&base, "smol", PROMPTS[0]),
            chat(&base, "smol", PROMPTS[0])
        );
        assert_eq!(a, b);
        assert_eq!(served.logged("loading the model `smol`").len(), 1, "loaded once");
        assert_eq!(state_of(&base, "smol").await, "loaded");

        let (s, v) = call(&base, "/models/unload", &json!({ "model": "smol" })).await;
        assert_eq!((s, &v["unloaded"]), (200, &json!(true)), "{v}");
        assert_eq!(state_of(&base, "smol").await, "unloaded");
        let (s, v) = call(&base, "/models/load", &json!({ "model": "smol" })).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["model"]["status"]["value"], "loaded");
        assert_eq!(chat(&base, "smol", PROMPTS[0]).await, a, "reloaded, the same answer");

        // Unknown names, in each dialect's shape.
        let (s, v) = call(&base, "/v1/chat/completions", &chat_body("nope", "hi")).await;
        assert_eq!(s, 404);
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("`smol`")));
        let (s, v) = call(
            &base,
            "/v1/messages",
            &json!({ "model": "nope", "max_tokens": 4, "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await;
        assert_eq!(s, 404);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        let (s, v) = call(
            &base,
            "/v1/responses",
            &json!({ "model": "nope", "input": "hi" }),
        )
        .await;
        assert_eq!((s, &v["error"]["code"]), (404, &json!("model_not_found")));
        let (s, _) = call(&base, "/v1/embeddings", &json!({ "model": "nope", "input": "x" })).await;
        assert_eq!(s, 404);
        let (s, _) = call(&base, "/models/load", &json!({ "model": "nope" })).await;
        assert_eq!(s, 404);
        let (s, v) = call(&base, "/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": "hi" }] })).await;
        assert_eq!((s, &v["error"]["param"]), (400, &json!("model")), "{v}");
    });
}

/// A damaged file in the directory: its requests fail with an error naming it, the
/// other model keeps serving, and a file added while the server runs is picked up.
#[test]
fn a_damaged_model_fails_alone_and_new_files_are_found() {
    let dir = models_dir(&[("smol.gguf", &smollm2())]);
    let mut bad = b"GGUF".to_vec();
    bad.extend_from_slice(&[0xff; 64]);
    std::fs::write(dir.path().join("broken.gguf"), &bad).expect("write");
    let served = Served::start_args(&["--models-dir", dir.path().to_str().expect("path")]);
    let base = served.base.clone();
    let rt = runtime();
    rt.block_on(async {
        let (s, v) = call(&base, "/v1/chat/completions", &chat_body("broken", "hi")).await;
        assert_eq!(s, 500, "{v}");
        assert_eq!(v["error"]["code"], "model_load_failed");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("`broken` failed to load"), "{message}");
        assert_eq!(state_of(&base, "broken").await, "failed");
        let text = chat(&base, "smol", PROMPTS[1]).await;
        assert!(!text.is_empty());

        std::os::unix::fs::symlink(smollm2(), dir.path().join("later.gguf")).expect("symlink");
        let start = Instant::now();
        while state_of(&base, "later").await == "absent" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "a new file was not found"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            chat(&base, "later", PROMPTS[1]).await,
            text,
            "the same file, the same answer"
        );
    });
}

/// Loaded and unloaded a hundred times, a model leaves no memory or descriptors
/// behind: the resident set and the open files after the last cycle are those after
/// the tenth, within an allocator's slack.
#[test]
fn loading_and_unloading_a_hundred_times_leaks_nothing() {
    let dir = models_dir(&[("smol.gguf", &smollm2())]);
    let served = Served::start_args(&[
        "--models-dir",
        dir.path().to_str().expect("path"),
        "--parallel",
        "1",
        "--ctx-size",
        "64",
    ]);
    let base = served.base.clone();
    let pid = served.pid();
    let rt = runtime();
    let mut after_ten = (0, 0);
    rt.block_on(async {
        for i in 1..=100 {
            let (s, v) = call(&base, "/models/load", &json!({ "model": "smol" })).await;
            assert_eq!(s, 200, "{v}");
            let (s, v) = call(&base, "/models/unload", &json!({ "model": "smol" })).await;
            assert_eq!(s, 200, "{v}");
            // The engine thread is joined off the request's path: let it finish.
            tokio::time::sleep(Duration::from_millis(30)).await;
            if i == 10 {
                after_ten = rss_and_fds(pid);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let end = rss_and_fds(pid);
    assert!(
        end.0 <= after_ten.0 + 48 * 1024,
        "RSS grew from {} KiB to {} KiB over 90 load/unload cycles",
        after_ten.0,
        end.0
    );
    assert!(
        end.1 <= after_ten.1 + 2,
        "open descriptors grew from {} to {}",
        after_ten.1,
        end.1
    );
}

/// The Gemma 3 prompt format as Google publishes it: a system message opens the first
/// user turn, the assistant is `model`, and the text ends where the model's turn
/// begins.
const GEMMA_TURNS: &str =
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n";

/// Gemma 3 270M's file has no chat template: `llama generate --chat`, `llama chat`
/// and the server chat through the built-in Gemma template, say so in one line, and
/// feed the model exactly the published turn format (the same greedy text as that
/// format given as a plain prompt).
#[test]
fn gemma3_chats_through_the_built_in_template() {
    let gemma = gemma3_path();
    let gemma = gemma.to_str().expect("path");
    let plain = llama(&[
        "generate",
        "--model",
        gemma,
        "--prompt",
        GEMMA_TURNS,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let chat_out = llama(&[
        "generate",
        "--model",
        gemma,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    let stderr = String::from_utf8_lossy(&chat_out.stderr);
    assert!(chat_out.status.success(), "{stderr}");
    assert!(
        stderr.contains("using the built-in `gemma` template"),
        "no line saying so: {stderr}"
    );
    let want = String::from_utf8_lossy(&plain.stdout).trim().to_string();
    let got = String::from_utf8_lossy(&chat_out.stdout).trim().to_string();
    assert!(!want.is_empty());
    assert_eq!(
        got, want,
        "--chat does not give the model the published format"
    );

    // The interactive chat takes a line and answers it the same way.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llama"))
        .args([
            "chat",
            "--model",
            gemma,
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("llama chat");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"What is the capital of France?\n")
            .expect("write");
    }
    let out = child.wait_with_output().expect("chat ends at EOF");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("built-in `gemma` template"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(want.as_str()),
        "llama chat answered otherwise: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let served = Served::start_args(&["--model", gemma, "--alias", "gemma"]);
    assert_eq!(served.logged("built-in `gemma` template").len(), 1);
    let text = runtime().block_on(async {
        let (s, v) = call(
            &served.base,
            "/v1/chat/completions",
            &json!({
                "model": "gemma",
                "messages": [{ "role": "user", "content": "What is the capital of France?" }],
                "max_tokens": 12,
                "temperature": 0,
            }),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    assert_eq!(
        text.trim(),
        want,
        "the server's chat differs from the published format"
    );
}

/// The built-in ChatML template renders a conversation with a system message exactly
/// as SmolLM2's and Qwen2.5's own templates (ChatML, read from their files) do, and
/// the built-in Gemma template writes Gemma's published format: the system message
/// opens the first user turn, the assistant speaks as `model`.
#[test]
fn built_in_templates_render_as_the_families_own() {
    use llama::models::ModelSource;
    use llama::runtime::{ChatTemplate, Message};
    let conversation = [
        Message::new("system", "You are terse."),
        Message::new("user", "Hi there"),
        Message::new("assistant", "Hello."),
        Message::new("user", "Name a river."),
    ];
    for path in [smollm2(), qwen25_path()] {
        let source = ModelSource::open(&path).expect("opens");
        let own = ChatTemplate::for_source(&source)
            .expect("reads")
            .expect("the file has a template");
        let builtin = ChatTemplate::given("chatml", &source).expect("built in");
        assert_eq!(
            builtin.render(&conversation, true).expect("renders"),
            own.render(&conversation, true).expect("renders"),
            "{}",
            path.display()
        );
    }
    let source = ModelSource::open(&gemma3_path()).expect("opens");
    let gemma = ChatTemplate::given("gemma", &source).expect("built in");
    assert_eq!(
        gemma.render(&conversation, true).expect("renders"),
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n\
         <start_of_turn>model\nHello.<end_of_turn>\n\
         <start_of_turn>user\nName a river.<end_of_turn>\n<start_of_turn>model\n"
    );
    assert!(ChatTemplate::given("no-such-template", &source)
        .is_err_and(|e| e.to_string().contains("not a built-in template")));
}
