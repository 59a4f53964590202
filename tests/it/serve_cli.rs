//! `llama serve` as a user runs it: the binary, its signals, the official Python
//! client, and two replicas behind nginx.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A `llama serve` process on a port of its own choosing.
pub(crate) struct Served {
    child: Child,
    pub(crate) base: String,
    /// Every line the server wrote to stderr so far.
    pub(crate) log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    pub(crate) fn start(extra: &[&str]) -> Served {
        Served::start_with(&real_model_path(), extra)
    }

    pub(crate) fn start_with(model: &std::path::Path, extra: &[&str]) -> Served {
        let model = model.to_str().expect("a UTF-8 model path");
        let mut args = vec!["--model", model];
        args.extend_from_slice(extra);
        Served::start_args(&args)
    }

    /// `llama serve ARGS --port 0`, once `/health` answers 200.
    pub(crate) fn start_args(args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llama"))
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("llama serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                if let Ok(mut l) = lines.lock() {
                    l.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        let start = Instant::now();
        let base = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("llama serve says where it listens");
            if let Some(rest) = line.strip_prefix("listening on ") {
                break rest
                    .split_whitespace()
                    .next()
                    .expect("an address")
                    .to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(60));
        };
        let served = Served { child, base, log };
        served.wait_ready();
        served
    }

    /// The lines of stderr so far that contain `needle`.
    pub(crate) fn logged(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .map(|l| l.iter().filter(|x| x.contains(needle)).cloned().collect())
            .unwrap_or_default()
    }

    /// The server process's id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if http_status(&self.base, "/health") == Some(200) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "llama serve did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill");
    }

    /// Waits for the process to exit; its exit code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET's status over a plain TCP connection (no client library in the way).
fn http_status(base: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn post(base: &str, path: &str, body: &Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("json")
}

#[test]
fn greedy_text_from_the_server_equals_llama_generate() {
    let model = real_model_path();
    let model = model.to_str().expect("a UTF-8 path");
    let served = Served::start(&[]);
    let rt = runtime();
    for (chat, prompt) in [
        (false, "The capital of France is"),
        (true, "Write a haiku about rain."),
    ] {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            prompt,
            "--max-tokens",
            "24",
            "--json",
        ];
        if chat {
            args.push("--chat");
        }
        let out = llama(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let generated: Value = serde_json::from_slice(&out.stdout).expect("generate --json");
        let served_text = rt.block_on(async {
            if chat {
                let r = post(
                    &served.base,
                    "/v1/chat/completions",
                    &json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}),
                )
                .await;
                r["choices"][0]["message"]["content"].clone()
            } else {
                let r = post(
                    &served.base,
                    "/v1/completions",
                    &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0}),
                )
                .await;
                r["choices"][0]["text"].clone()
            }
        });
        assert_eq!(served_text, generated["text"], "chat: {chat}");
    }
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let mut served = Served::start(&["--shutdown-timeout", "60"]);
    let rt = runtime();
    let base = served.base.clone();
    let (events, finish) = rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(&json!({
                "prompt": "Count from one to fifty:", "max_tokens": 40, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true},
            }))
            .send()
            .await
            .expect("request");
        let mut body = r.bytes_stream();
        let first = body.next().await.expect("a first chunk").expect("bytes");
        served.signal(libc::SIGTERM);
        let mut text = String::from_utf8_lossy(&first).into_owned();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
        }
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("a JSON event"))
            .collect();
        let finish = events
            .iter()
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
            .next_back()
            .map(str::to_string);
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        (events, finish)
    });
    let usage = events
        .iter()
        .find(|e| e["usage"].is_object())
        .expect("a usage event");
    assert_eq!(
        usage["usage"]["completion_tokens"], 40,
        "the request ran to its end"
    );
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(served.wait_exit(Duration::from_secs(30)), Some(0));
    assert_eq!(
        http_status(&served.base, "/health"),
        None,
        "nothing listens after exit"
    );
}

/// The venv that scripts/setup/setup-python-client.sh makes, with the `openai` package.
pub(crate) fn python() -> PathBuf {
    if let Ok(p) = std::env::var("LLAMA_RS_PYTHON") {
        return PathBuf::from(p);
    }
    let python = cache_dir().join("venv/bin/python");
    let has_openai = Command::new(&python)
        .args(["-c", "import openai, jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_openai,
        "no Python with the openai and jsonschema packages at {}: run scripts/setup/setup-python-client.sh",
        python.display()
    );
    python
}

#[test]
fn the_official_python_client_works_unmodified() {
    let python = python();
    let served = Served::start(&["--alias", "smollm2", "--ctx-size", "2048"]);
    run_script(
        &python,
        "tests/openai_client.py",
        &[&format!("{}/v1", served.base), "smollm2"],
    );
}

/// Tool calling through the official client with Qwen2.5 (whose template has a tools
/// section): the call, its arguments valid under the schema, the result sent back and
/// the answer that uses it, streaming and not.
#[test]
fn the_official_python_client_calls_tools() {
    let python = python();
    let served = Served::start_with(&qwen25_path(), &["--alias", "qwen", "--ctx-size", "2048"]);
    run_script(
        &python,
        "tests/openai_tools.py",
        &[&format!("{}/v1", served.base), "qwen"],
    );
}

/// Runs one of the Python test scripts; it must end with `all ok`.
pub(crate) fn run_script(python: &std::path::Path, script: &str, args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all ok"), "{stdout}");
}

pub(crate) fn nginx() -> PathBuf {
    let found = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    found.expect("nginx is not installed: apt-get install nginx-light (.ci/run does)")
}

#[test]
fn two_replicas_behind_nginx_share_the_requests() {
    let nginx = nginx();
    let a = Served::start(&["--parallel", "2"]);
    let b = Served::start(&["--parallel", "2"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let d = dir.path().display();
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;"
    } else {
        ""
    };
    let conf = format!(
        "{user}
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream llama {{ server 127.0.0.1:{}; server 127.0.0.1:{}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
",
        a.port(),
        b.port()
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut proxy = Command::new(nginx)
        .args(["-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while http_status(&base, "/health") != Some(200) {
        if let Ok(Some(status)) = proxy.try_wait() {
            panic!("nginx exited: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nginx did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = runtime();
    let texts: Vec<String> = rt.block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let base = base.clone();
                tokio::spawn(async move {
                    let r = post(
                        &base,
                        "/v1/completions",
                        &json!({"prompt": format!("Item {}: the color", i % 4), "max_tokens": 8, "temperature": 0}),
                    )
                    .await;
                    r["choices"][0]["text"].as_str().unwrap_or_default().to_string()
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!(texts.len(), 16);
    for (i, t) in texts.iter().enumerate() {
        assert!(!t.is_empty(), "request {i} came back empty");
        assert_eq!(
            t,
            &texts[i % 4],
            "the same prompt, the same text, whichever replica"
        );
    }
    let served_by = |s: &Served| -> f64 {
        let text = rt.block_on(async {
            reqwest::get(format!("{}/metrics", s.base))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        });
        text.lines()
            .filter(|l| l.starts_with("llama_requests_total{") && l.contains("/v1/completions"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (na, nb) = (served_by(&a), served_by(&b));
    assert_eq!(na + nb, 16.0);
    assert!(na >= 1.0 && nb >= 1.0, "replica a served {na}, b {nb}");
}

#[test]
fn a_model_that_cannot_load_or_a_taken_port_is_one_line_and_exit_1() {
    let out = llama(&["serve", "--model", "/nonexistent/model.gguf", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error:") && last.contains("/nonexistent/model.gguf"),
        "{err}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let model = real_model_path();
    let out = llama(&[
        "serve",
        "--model",
        model.to_str().expect("utf-8"),
        "--port",
        &port,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot listen") && err.contains(&port),
        "{err}"
    );
}

/// The chat page in headless Chromium (Debian's chromium and chromium-driver, driven
/// by Selenium from the venv of scripts/setup/setup-python-client.sh): the key is asked for,
/// the streamed answer equals the server's greedy answer, stop ends generation on the
/// server, the conversation survives a reload, and HTML in an answer stays text. The
/// screenshot is left in the target folder.
#[test]
fn the_chat_page_works_in_a_real_browser() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: apt-get install chromium chromium-driver (.ci/run does)"
        );
    }
    let python = python();
    let has_selenium = Command::new(&python)
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_selenium,
        "no selenium in {}: run scripts/setup/setup-python-client.sh",
        python.display()
    );
    let served = Served::start(&["--api-key", "sesame", "--parallel", "2"]);
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("webui.png");
    let shot_arg = shot.to_str().expect("a UTF-8 path");
    run_script(
        &python,
        "tests/webui_test.py",
        &[&served.base, "sesame", shot_arg],
    );
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn no_webui_turns_the_page_off() {
    let on = Served::start(&[]);
    assert_eq!(http_status(&on.base, "/"), Some(200));
    let off = Served::start(&["--no-webui"]);
    assert_eq!(http_status(&off.base, "/"), Some(404));
}
