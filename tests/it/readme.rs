//! Every code block of README.md is exercised, so the guide cannot rot. A block's info
//! string says how (```` ```sh test=MODE ````); a block without one fails this test.
//!
//! - `run`: the block runs in bash (`set -euo pipefail`) in a scratch directory that
//!   holds the repository's `docs/`, with the `llama` under test first on `PATH`;
//!   variables that earlier `run` blocks assign are assigned again before it.
//! - `serve`: one command that runs until stopped; it starts in the background and the
//!   `client` block right after it runs once `/health` answers 200.
//! - `ci`: commands that CI itself runs (`./scripts/test.sh`, `cargo build`), checked
//!   rather than run: a script exists, is executable and parses (`bash -n`); a `cargo`
//!   line's flags are among `cargo <subcommand> --help`'s and its features among
//!   Cargo.toml's.
//!
//! Substitutions keep it to seconds: every model the fetch scripts name becomes the
//! tiny Llama of tests/fixtures (a copy with a chat template and a longer context), so
//! the commands parse and run end to end; what they answer on real models is tested
//! beside them (tests/it/agent.rs runs the README's agent task on Qwen2.5 0.5B, for
//! one). Port 8080 becomes a free one.
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::fixture;

/// A fenced code block of the README: its info string, first line (1-based) and body.
struct Block {
    info: String,
    line: usize,
    body: String,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        match open.take() {
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    open = Some(Block {
                        info: info.trim().to_string(),
                        line: i + 1,
                        body: String::new(),
                    });
                }
            }
            Some(mut block) => {
                if line.trim_end() == "```" {
                    out.push(block);
                } else {
                    block.body.push_str(line);
                    block.body.push('\n');
                    open = Some(block);
                }
            }
        }
    }
    assert!(open.is_none(), "README.md: a code block is never closed");
    out
}

/// The block's `test=` mode.
fn mode(block: &Block) -> &str {
    block
        .info
        .split_whitespace()
        .find_map(|w| w.strip_prefix("test="))
        .unwrap_or_else(|| {
            panic!(
                "README.md:{}: a code block without `test=run|serve|client|ci` in its info \
                 string ({:?}); every block is run or checked by tests/it/readme.rs",
                block.line, block.info
            )
        })
}

/// A copy of the tiny Llama with a chat template and 4096 positions: what the README's
/// chat, RAG and server examples need of a model.
fn tiny_chat_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-chat");
    std::fs::create_dir_all(&out).expect("mkdir");
    let src = fixture("llama3");
    for name in [
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(name), out.join(name)).expect("copy the tiny model");
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config"))
            .expect("config.json parses");
    config["max_position_embeddings"] = 4096.into();
    std::fs::write(out.join("config.json"), config.to_string()).expect("write config");
    std::fs::write(
        out.join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}",
    )
    .expect("write the template");
    out
}

/// The server of a `serve` block, stopped however the test ends.
struct Server {
    child: std::process::Child,
    line: usize,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("addr").port()
}

/// The block with the README's models and port replaced; fails on a fetch script this
/// test has no substitute for.
fn substitute(body: &str, models: &[(&str, String)], port: u16) -> String {
    let mut text = body.replace("8080", &port.to_string());
    for (script, path) in models {
        text = text.replace(&format!("$(./scripts/fetch/{script})"), path);
    }
    if let Some(at) = text.find("$(./scripts/") {
        panic!(
            "README.md: no substitute for {}: add one to tests/it/readme.rs",
            text[at..].lines().next().unwrap_or_default()
        );
    }
    text
}

/// The variable assignments of a block (`name=...` lines), to run again before the
/// blocks after it.
fn assignments(body: &str) -> String {
    body.lines()
        .filter(|l| {
            l.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn bash(script: &str, dir: &Path) -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_llama"));
    let path = format!(
        "{}:{}",
        bin.parent().expect("the binary's folder").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    cmd
}

fn run(block: &Block, script: &str, dir: &Path) {
    let out = bash(script, dir).output().expect("bash runs");
    assert!(
        out.status.success(),
        "README.md:{}: the block failed ({}):\n{script}\nstdout:\n{}\nstderr:\n{}",
        block.line,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn health(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(
        s,
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// A `ci` block: every line is a script of the repository, a `cargo` command whose
/// flags and features exist, or an `export`.
fn check_ci(block: &Block) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    for line in block.body.lines() {
        let line = line.split(" #").next().unwrap_or_default().trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("export ") {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(script) = words[0].strip_prefix("./") {
            let path = repo().join(script);
            let meta = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("README.md:{}: {script}: {e}", block.line));
            assert!(
                meta.permissions().mode() & 0o111 != 0,
                "README.md:{}: {script} is not executable",
                block.line
            );
            let syntax = Command::new("bash").arg("-n").arg(&path).status();
            assert!(
                syntax.is_ok_and(|s| s.success()),
                "README.md:{}: bash -n {script} fails",
                block.line
            );
        } else if words[0] == "cargo" {
            let sub = words.get(1).expect("a cargo subcommand");
            let help = Command::new(&cargo)
                .arg(sub)
                .arg("--help")
                .output()
                .expect("cargo runs");
            let help = String::from_utf8_lossy(&help.stdout);
            for (i, word) in words.iter().enumerate().skip(2) {
                let flag = word.split('=').next().unwrap_or_default();
                if flag.starts_with("--") {
                    assert!(
                        help.contains(flag),
                        "README.md:{}: `cargo {sub}` has no {flag}",
                        block.line
                    );
                }
                if flag == "--features" {
                    let features = words.get(i + 1).expect("--features takes a list");
                    for feature in features.split(',') {
                        assert!(
                            manifest.contains(&format!("\n{feature} = [")),
                            "README.md:{}: no feature {feature} in Cargo.toml",
                            block.line
                        );
                    }
                }
            }
        } else {
            panic!(
                "README.md:{}: a `test=ci` line that is neither a script, cargo nor an \
                 export: {line}",
                block.line
            );
        }
    }
}

#[test]
fn every_block_of_the_readme_runs() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(repo().join("docs"), dir.path().join("docs")).expect("symlink");
    let tiny = tiny_chat_model(dir.path());
    let tiny = tiny.display().to_string();
    let models = [
        ("fetch-model.sh", tiny.clone()),
        ("fetch-minilm.sh", tiny.clone()),
        ("fetch-qwen2.5.sh", tiny),
    ];
    let port = free_port();
    let mut prelude = String::new();
    let mut server: Option<Server> = None;
    let all = blocks(&readme);
    assert!(all.len() >= 8, "README.md has {} code blocks", all.len());
    for block in &all {
        let text = substitute(&block.body, &models, port);
        let began = Instant::now();
        match mode(block) {
            "ci" => check_ci(block),
            "run" => {
                run(block, &format!("{prelude}{text}"), dir.path());
                prelude.push_str(&assignments(&text));
            }
            "serve" => {
                let command = text.trim();
                assert!(
                    !command.contains('\n'),
                    "README.md:{}: a `test=serve` block is one command",
                    block.line
                );
                let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
                let child = bash(&format!("{prelude}exec {command}"), dir.path())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("the server starts");
                server = Some(Server {
                    child,
                    line: block.line,
                });
            }
            "client" => {
                let mut served = server.take().unwrap_or_else(|| {
                    panic!(
                        "README.md:{}: a `test=client` block with no `test=serve` before it",
                        block.line
                    )
                });
                let line = served.line;
                let log =
                    || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
                let start = Instant::now();
                while !health(port) {
                    if let Ok(Some(status)) = served.child.try_wait() {
                        panic!("README.md:{line}: the server exited ({status}):\n{}", log());
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(120),
                        "README.md:{line}: the server never answered /health:\n{}",
                        log()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                let out = bash(&format!("{prelude}{text}"), dir.path())
                    .output()
                    .expect("bash runs");
                drop(served);
                assert!(
                    out.status.success(),
                    "README.md:{}: the client block failed ({}):\n{text}\nstderr:\n{}\nserver:\n{}",
                    block.line,
                    out.status,
                    String::from_utf8_lossy(&out.stderr),
                    log()
                );
            }
            other => panic!("README.md:{}: unknown test mode {other:?}", block.line),
        }
        eprintln!(
            "README.md:{}: {} in {:.1} s",
            block.line,
            mode(block),
            began.elapsed().as_secs_f64()
        );
    }
    assert!(
        server.is_none(),
        "README.md: a `test=serve` block without a `test=client` block after it"
    );
}
