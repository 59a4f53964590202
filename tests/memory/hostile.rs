//! Ten thousand malformed or hostile requests against a running `llama serve`, over raw
//! TCP on loopback (a client library would refuse to send most of them): bad JSON,
//! wrong types, huge numbers, deep nesting, invalid UTF-8, bodies and headers past
//! their limits, unknown routes and methods, slow senders, dropped connections, and
//! more connections than the server takes. Every one must be answered with the right
//! 4xx (an OpenAI-shaped body where our code answers) or cut off by the limit that
//! applies; well-formed requests in between must keep their exact output; and the
//! server's memory must come back to where it was.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama::serve::ServerConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::rss_kib;
use crate::common::server::{chat_ids, greedy_alone, TestServer};

const TIMEOUT: Duration = Duration::from_secs(4);
const MAX_CONNECTIONS: usize = 40;
const BODY_LIMIT: usize = 32 << 10;
const HOSTILE: usize = 10_000;
/// Requests in flight at once.
const WORKERS: usize = 16;

/// A deterministic generator, so a failure names a case that can be run again.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One raw request and the statuses that are right for it.
struct Case {
    what: String,
    request: Vec<u8>,
    expect: &'static [u16],
    /// Whether our code (not hyper's HTTP parser) answers, so the body must be an
    /// OpenAI error.
    openai_body: bool,
}

fn http(method: &str, path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-type: application/json\r\n{extra}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    http("POST", path, "", body)
}

const ROUTES: [&str; 8] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
];

fn base_chat() -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
}

/// Fields of a chat request and values of a type or range they refuse.
fn wrong_values() -> Vec<(&'static str, Value)> {
    let huge: Value = serde_json::from_str("18446744073709551616").expect("a number");
    vec![
        ("messages", json!("hello")),
        ("messages", json!(5)),
        ("messages", json!([5])),
        ("messages", json!([{"role": 5, "content": "x"}])),
        ("messages", json!([{"role": "user", "content": 5}])),
        ("messages", json!([{"role": "wizard", "content": "x"}])),
        ("messages", json!([])),
        ("max_tokens", json!("8")),
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(1.5)),
        ("max_tokens", json!(1e30)),
        ("max_tokens", huge.clone()),
        ("max_tokens", json!(0)),
        ("temperature", json!("hot")),
        ("temperature", json!(-1)),
        ("temperature", json!(1e308)),
        ("temperature", json!([1])),
        ("top_p", json!(2)),
        ("top_p", json!("x")),
        ("n", json!(0)),
        ("n", json!(1_000_000_000)),
        ("n", huge.clone()),
        ("stop", json!(5)),
        ("stop", json!([1, 2])),
        ("stop", json!(vec!["s"; 100])),
        ("stop", json!([""])),
        ("seed", json!("s")),
        ("seed", json!(1.5)),
        ("seed", huge),
        ("logit_bias", json!([1])),
        ("logit_bias", json!({"x": 1})),
        ("logit_bias", json!({"1": "a"})),
        ("logit_bias", json!({"1": 1000})),
        ("logit_bias", json!({"99999999999": 1})),
        ("logprobs", json!("yes")),
        ("top_logprobs", json!(-1)),
        ("top_logprobs", json!(1000)),
        ("stream", json!("yes")),
        ("stream_options", json!({"include_usage": "yes"})),
        ("presence_penalty", json!("x")),
        ("presence_penalty", json!(1e300)),
        ("frequency_penalty", json!(-1e39)),
        ("response_format", json!({"type": "xml"})),
        ("tool_choice", json!({"type": "function"})),
        ("functions", json!([{"name": "f"}])),
        ("min_p", json!(7)),
        ("repeat_penalty", json!(0)),
    ]
}

/// Fields of Responses and Anthropic Messages requests, over a valid request of each,
/// with values they refuse (400, or 404 for a stored response that is not there).
fn wrong_dialect_values() -> Vec<(&'static str, &'static str, Value)> {
    let r = "/v1/responses";
    let m = "/v1/messages";
    vec![
        (r, "input", json!(5)),
        (r, "input", json!([{"type": "reasoning", "summary": []}])),
        (
            r,
            "input",
            json!([{"type": "function_call_output", "call_id": "c", "output": "x"}]),
        ),
        (
            r,
            "input",
            json!([{"role": "user", "content": [{"type": "input_image"}]}]),
        ),
        (r, "tools", json!([{"type": "web_search"}])),
        (r, "reasoning", json!({"effort": "low"})),
        (r, "previous_response_id", json!("resp_nothing")),
        (r, "text", json!({"format": {"type": "xml"}})),
        (r, "max_output_tokens", json!(-1)),
        (r, "temperature", json!("hot")),
        (r, "store", json!("yes")),
        (m, "max_tokens", Value::Null),
        (m, "max_tokens", json!(0)),
        (m, "messages", json!("x")),
        (
            m,
            "messages",
            json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]),
        ),
        (
            m,
            "messages",
            json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]),
        ),
        (
            m,
            "tools",
            json!([{"type": "bash_20250124", "name": "bash"}]),
        ),
        (m, "tool_choice", json!({"type": "tool", "name": "x"})),
        (m, "stop_sequences", json!("x")),
        (m, "top_k", json!("x")),
        (
            m,
            "thinking",
            json!({"type": "enabled", "budget_tokens": 1024}),
        ),
        (m, "system", json!(5)),
    ]
}

fn base_dialect(route: &str) -> Value {
    match route {
        "/v1/responses" => json!({"model": "smollm2", "input": "Hi", "max_output_tokens": 1}),
        _ => {
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        }
    }
}

/// The ten thousand cases, cycling through the kinds.
fn hostile_cases(rng: &mut Lcg) -> Vec<Case> {
    let wrong = wrong_values();
    let wrong_dialect = wrong_dialect_values();
    let valid = serde_json::to_vec(&base_chat()).expect("json");
    let mut cases = Vec::with_capacity(HOSTILE);
    while cases.len() < HOSTILE {
        let route = ROUTES[rng.below(ROUTES.len())];
        let case = match cases.len() % 12 {
            // Random bytes.
            0 => {
                let n = rng.below(512);
                Case {
                    what: format!("{n} random bytes to {route}"),
                    request: post(route, &rng.bytes(n)),
                    expect: &[400],
                    openai_body: true,
                }
            }
            // A well-formed request cut short.
            1 => {
                let cut = rng.below(valid.len() - 1);
                Case {
                    what: format!("a chat request cut at byte {cut}"),
                    request: post(ROUTES[0], &valid[..cut]),
                    expect: &[400],
                    openai_body: true,
                }
            }
            // A field of Responses or Anthropic Messages of the wrong type, or a value
            // they refuse.
            3 if rng.below(2) == 0 => {
                let (route, field, v) = &wrong_dialect[rng.below(wrong_dialect.len())];
                let mut body = base_dialect(route);
                body[*field] = v.clone();
                Case {
                    what: format!("{route} {field}: {}", truncate(&v.to_string())),
                    request: post(route, body.to_string().as_bytes()),
                    expect: &[400, 404],
                    openai_body: true,
                }
            }
            // A field of the wrong type or out of range.
            2 | 3 => {
                let (field, v) = &wrong[rng.below(wrong.len())];
                let mut body = base_chat();
                body[*field] = v.clone();
                Case {
                    what: format!("{field}: {}", truncate(&v.to_string())),
                    request: post(ROUTES[0], body.to_string().as_bytes()),
                    expect: &[400],
                    openai_body: true,
                }
            }
            // Deep nesting, inside and outside the body limit.
            4 => {
                let depth = 100 + rng.below(BODY_LIMIT / 2);
                let field = ["messages", "max_tokens", "input", "prompt"][rng.below(4)];
                let body = format!(
                    "{{\"{field}\": {}{}}}",
                    "[".repeat(depth),
                    "]".repeat(depth)
                );
                Case {
                    what: format!("{field} nested {depth} deep to {route}"),
                    request: post(route, body.as_bytes()),
                    expect: if body.len() > BODY_LIMIT {
                        &[413]
                    } else {
                        &[400]
                    },
                    openai_body: true,
                }
            }
            // Invalid UTF-8 inside a string.
            5 => {
                let mut body = br#"{"messages": [{"role": "user", "content": "ab"#.to_vec();
                // A continuation byte with no lead byte before it is never UTF-8.
                body.push(0x80 | (rng.next() as u8 & 0x3f));
                body.extend(rng.bytes(3).iter().map(|b| b | 0x80));
                body.extend_from_slice(br#""}], "prompt": "x", "input": "y", "max_tokens": 1}"#);
                Case {
                    what: format!("invalid UTF-8 to {route}"),
                    request: post(route, &body),
                    expect: &[400],
                    openai_body: true,
                }
            }
            // Past the body limit.
            6 => {
                let n = BODY_LIMIT + 1 + rng.below(BODY_LIMIT);
                let mut body = b"{\"prompt\": \"".to_vec();
                body.resize(n, b'a');
                Case {
                    what: format!("a body of {n} bytes to {route}"),
                    request: post(route, &body),
                    expect: &[413],
                    openai_body: true,
                }
            }
            // Past the context: 2,000+ words in a body under the limit.
            // The token routes take it: they do not generate.
            7 => {
                let words = "lorem ipsum dolor sit amet ".repeat(600 + rng.below(400));
                let (body, expect, openai_body): (Value, &'static [u16], bool) = match route {
                    "/v1/chat/completions" => (
                        json!({"messages": [{"role": "user", "content": words}]}),
                        &[400],
                        true,
                    ),
                    "/v1/completions" => (json!({"prompt": words, "max_tokens": 1}), &[400], true),
                    "/v1/messages" => (
                        json!({"messages": [{"role": "user", "content": words}], "max_tokens": 1}),
                        &[400],
                        true,
                    ),
                    "/v1/messages/count_tokens" => (
                        json!({"messages": [{"role": "user", "content": words}]}),
                        &[200],
                        false,
                    ),
                    "/tokenize" => (json!({"content": words}), &[200], false),
                    "/detokenize" => (json!({"tokens": vec![1; 3000]}), &[200], false),
                    _ => (json!({"input": words}), &[400], true),
                };
                Case {
                    what: format!("a prompt past the context to {route}"),
                    request: post(route, body.to_string().as_bytes()),
                    expect,
                    openai_body,
                }
            }
            // Unknown routes, wrong methods.
            8 => {
                let (method, path, expect): (&str, &str, &'static [u16]) = match rng.below(8) {
                    0 => ("GET", "/v1/chat/completions", &[405]),
                    1 => ("DELETE", "/v1/models", &[405]),
                    2 => ("POST", "/v1/nothing/../../etc/passwd", &[404]),
                    3 => ("GET", "/v1/messages", &[405]),
                    4 => ("PUT", "/v1/responses/resp_1", &[405]),
                    5 => ("GET", "/v1/responses/resp_nothing", &[404]),
                    6 => ("DELETE", "/v1/responses/%00%ff", &[404]),
                    // An id that is not UTF-8 names no model.
                    _ => ("GET", "/v1/models/%00%ff", &[404]),
                };
                Case {
                    what: format!("{method} {path}"),
                    request: http(method, path, "", b"{}"),
                    expect,
                    openai_body: true,
                }
            }
            // Headers past what the HTTP parser takes: hyper answers, without a body.
            9 => {
                let n = 200 + rng.below(100);
                let extra: String = (0..n).map(|i| format!("x-h{i}: v\r\n")).collect();
                Case {
                    what: format!("{n} headers"),
                    request: http("POST", route, &extra, b"{}"),
                    expect: &[431],
                    openai_body: false,
                }
            }
            // A content length that lies: more claimed than sent is a slow sender
            // (below); a malformed or conflicting one is refused by the parser.
            10 => {
                let lie = [
                    "content-length: -1\r\n",
                    "content-length: 99999999999999999999\r\n",
                ][rng.below(2)];
                let mut r = format!(
                    "POST {route} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{lie}\r\n"
                )
                .into_bytes();
                r.extend_from_slice(b"{}");
                Case {
                    what: format!("{} to {route}", lie.trim()),
                    request: r,
                    expect: &[400],
                    openai_body: false,
                }
            }
            // Not HTTP at all.
            _ => {
                let mut r = rng.bytes(64);
                r.extend_from_slice(b"\r\n\r\n");
                Case {
                    what: "64 random bytes for a request line".into(),
                    request: r,
                    expect: &[400],
                    openai_body: false,
                }
            }
        };
        cases.push(case);
    }
    cases
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Sends `request`, reads until the server closes, and returns the status and body.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    // The server may answer (413, 431) and close before the request is all sent.
    let sent = s.write_all(request).await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
        .or_else(|e| {
            if out.is_empty() {
                Err(e.to_string())
            } else {
                Ok(0)
            }
        })?;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "no status line in {:?} after {:?} (sending: {sent:?})",
                truncate(&text),
                start.elapsed()
            )
        })?;
    let body = match out.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => out[at + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((status, body))
}

fn check(case: &Case, got: Result<(u16, Vec<u8>), String>) -> Result<(), String> {
    let (status, body) = got.map_err(|e| format!("{}: {e}", case.what))?;
    if !case.expect.contains(&status) {
        return Err(format!(
            "{}: {status} (wanted {:?}): {}",
            case.what,
            case.expect,
            truncate(&String::from_utf8_lossy(&body))
        ));
    }
    if case.openai_body {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| format!("{}: {status} with a body that is not JSON: {e}", case.what))?;
        if v["error"]["message"].as_str().is_none_or(str::is_empty)
            || v["error"]["type"].as_str().is_none()
        {
            return Err(format!(
                "{}: {status} without an OpenAI error: {v}",
                case.what
            ));
        }
    }
    Ok(())
}

/// A well-formed greedy chat request, and the text the engine gives alone.
async fn well_formed(addr: SocketAddr, expected: &str) -> Result<(), String> {
    let body = json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0});
    let (status, bytes) = exchange(addr, &post(ROUTES[0], body.to_string().as_bytes())).await?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("well-formed: {e}"))?;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    if status != 200 || text != expected {
        return Err(format!(
            "well-formed: {status} {text:?}, wanted {expected:?}: {v}"
        ));
    }
    Ok(())
}

/// A peer that sends part of a request and then stalls: the server must close the
/// connection once the timeout has passed (and not much later).
async fn slow_sender(addr: SocketAddr, partial: Vec<u8>, trickle: bool) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let start = Instant::now();
    s.write_all(&partial).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4096];
    loop {
        if trickle {
            // One byte a second: never idle, but the request never completes (an
            // `a` lengthens the method, the header or the body it lands in).
            let _ = s.write_all(b"a").await;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
        if start.elapsed() > TIMEOUT * 3 {
            return Err(format!(
                "a slow sender was still connected after {:?}",
                start.elapsed()
            ));
        }
    }
    let took = start.elapsed();
    if took + Duration::from_millis(100) < TIMEOUT {
        return Err(format!("a slow sender was cut after only {took:?}"));
    }
    Ok(())
}

/// Sends every case from `WORKERS` clients at once (with a well-formed request after
/// every 250th), while `slow` slow senders stall and 200 clients drop their requests
/// and streams half-way; the failures, and how many connections were dropped.
async fn round(
    addr: SocketAddr,
    cases: Vec<Case>,
    expected: &str,
    slow: usize,
) -> (Vec<String>, usize) {
    let cases = Arc::new(cases);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (cases, next, expected) = (cases.clone(), next.clone(), expected.to_string());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                if let Err(e) = check(case, exchange(addr, &case.request).await) {
                    failures.push(format!("#{i} {e}"));
                }
                if w == 0 && i % 250 == 0 {
                    if let Err(e) = well_formed(addr, &expected).await {
                        failures.push(format!("after #{i}: {e}"));
                    }
                }
            }
            failures
        }));
    }

    // Meanwhile: slow senders (headers and bodies that stall or trickle), connections
    // dropped mid-request and mid-stream.
    let mut peers = Vec::new();
    for i in 0..slow {
        let partial = match i % 4 {
            0 => b"POST /v1/chat/completions HTTP/1.1\r\nhost: l".to_vec(),
            1 => {
                b"POST /v1/completions HTTP/1.1\r\ncontent-length: 500\r\n\r\n{\"prompt\"".to_vec()
            }
            2 => Vec::new(),
            _ => b"GET /health HTTP/1.1\r\n".to_vec(),
        };
        peers.push(tokio::spawn(slow_sender(addr, partial, i % 3 == 0)));
    }
    let mut dropped = 0;
    for i in 0..200 {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            continue;
        };
        let body = json!({"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 64, "stream": true});
        let request = post(ROUTES[0], body.to_string().as_bytes());
        let cut = if i % 2 == 0 {
            request.len() / 2
        } else {
            request.len()
        };
        let _ = s.write_all(&request[..cut]).await;
        if i % 2 == 1 {
            // Read the first chunk of the stream, then go away.
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        }
        drop(s);
        dropped += 1;
    }

    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.expect("a worker"));
    }
    for p in peers {
        if let Err(e) = p.await.expect("a peer") {
            failures.push(e);
        }
    }
    (failures, dropped)
}

#[test]
fn ten_thousand_hostile_requests() {
    let _alone = crate::ALONE.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(hostile());
}

async fn hostile() {
    let server = TestServer::start(ServerConfig {
        alias: "smollm2".into(),
        parallel: 2,
        body_limit: BODY_LIMIT,
        timeout: TIMEOUT,
        max_connections: MAX_CONNECTIONS,
        ..ServerConfig::default()
    })
    .await;
    let addr: SocketAddr = server
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    let expected = greedy_alone(&chat_ids(&[("user", "Name a colour.")]), 8);
    // Before anything hostile, the server answers as the engine does alone.
    for _ in 0..3 {
        well_formed(addr, &expected).await.expect("well-formed");
    }
    // A first round of the same kinds of requests warms up what the server keeps
    // once it has seen them (allocator arenas of its threads, buffers of the largest
    // batch, tokenizer caches); the memory after it is the baseline that ten
    // thousand more must come back to.
    let mut rng = Lcg(0x5eed);
    let mut warm_up = hostile_cases(&mut rng);
    warm_up.truncate(HOSTILE / 5);
    let (failures, _) = round(addr, warm_up, &expected, 0).await;
    assert!(failures.is_empty(), "warming up: {}", failures.join("\n"));
    let baseline = rss_kib();

    let start = Instant::now();
    let (mut failures, dropped) = round(addr, hostile_cases(&mut rng), &expected, 12).await;
    let took = start.elapsed();

    // More connections than the server takes: the extra ones are told 503 at once.
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        match exchange(addr, &http("GET", "/health", "", b"")).await {
            Ok((503, body)) if body.starts_with(b"{\"error\"") => {}
            other => failures.push(format!(
                "connection {} of {MAX_CONNECTIONS}: {other:?}",
                MAX_CONNECTIONS + 1
            )),
        }
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert!(
        failures.is_empty(),
        "{} of {HOSTILE} hostile requests went wrong:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every sequence of the dropped streams was cancelled; the server still serves
    // exactly what it served before.
    for _ in 0..3 {
        well_formed(addr, &expected)
            .await
            .expect("well-formed after");
    }
    let after = rss_kib();
    eprintln!(
        "{HOSTILE} hostile requests, {dropped} dropped connections, 12 slow senders in {took:?}; \
         RSS {baseline} KiB before, {after} KiB after"
    );
    assert!(
        after < baseline + 16 * 1024,
        "resident memory grew from {baseline} KiB to {after} KiB"
    );
}
