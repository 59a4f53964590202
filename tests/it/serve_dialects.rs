//! The Responses and Anthropic Messages APIs and the token routes of `llama serve`:
//! the official `openai`, `anthropic` and `openai-agents` Python packages against the
//! binary, stored responses across a restart and across API keys, and each API's
//! refusals in its own error shape.
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::common::*;
use crate::serve_cli::{python, run_script, runtime, Served};

/// The venv's Python, with the `anthropic` and `openai-agents` packages too.
fn python_with_sdks() -> PathBuf {
    let python = python();
    let has = Command::new(&python)
        .args(["-c", "import anthropic, agents"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "no anthropic or openai-agents package in {}: run scripts/setup/setup-python-client.sh",
        python.display()
    );
    python
}

/// One request's status and JSON body.
async fn send(
    method: reqwest::Method,
    url: String,
    key: Option<(&str, &str)>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some((header, value)) = key {
        r = r.header(header, value);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    let r = r.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, v)
}

pub(crate) async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    send(
        reqwest::Method::POST,
        format!("{base}{path}"),
        None,
        Some(body),
    )
    .await
}

/// The official SDKs, one Qwen2.5 server for the three scripts: Responses (plain and
/// streamed, a stored chain with cached tokens, a required tool call and its output,
/// a JSON schema), Anthropic Messages (plain, streamed, tool_use and tool_result,
/// count_tokens) and an openai-agents Agent with a function tool.
#[test]
fn the_official_sdks_speak_responses_and_messages() {
    let python = python_with_sdks();
    let state = tempfile::tempdir().expect("tempdir");
    let state_dir = state.path().to_str().expect("a UTF-8 path");
    let served = Served::start_with(
        &qwen25_path(),
        &[
            "--alias",
            "qwen",
            "--ctx-size",
            "2048",
            "--state-dir",
            state_dir,
        ],
    );
    let v1 = format!("{}/v1", served.base);
    run_script(&python, "tests/responses_client.py", &[&v1, "qwen"]);
    run_script(
        &python,
        "tests/anthropic_client.py",
        &[&served.base, "qwen"],
    );
    run_script(&python, "tests/agents_sdk.py", &[&v1, "qwen"]);
}

/// An error body of OpenAI's shape naming `param`.
fn openai_error(status: u16, body: &Value, want_status: u16, param: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["param"], param, "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

/// An error body of Anthropic's shape whose message holds `needle`.
fn anthropic_error(status: u16, body: &Value, want_status: u16, kind: &str, needle: &str) {
    assert_eq!(status, want_status, "{needle}: {body}");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "`{needle}` not in {body}");
}

fn tool(name: &str) -> Value {
    json!({"name": name, "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}})
}

#[test]
fn each_api_refuses_bad_requests_in_its_own_shape() {
    let served = Served::start(&["--alias", "smollm2", "--api-key", "sesame"]);
    let base = served.base.clone();
    runtime().block_on(async move {
        let bearer = Some(("authorization", "Bearer sesame"));
        let x_key = Some(("x-api-key", "sesame"));
        let responses = |body: Value| {
            let url = format!("{base}/v1/responses");
            async move { send(reqwest::Method::POST, url, bearer, Some(&body)).await }
        };
        let messages = |path: &'static str, body: Value, key: Option<(&'static str, &'static str)>| {
            let url = format!("{base}{path}");
            async move { send(reqwest::Method::POST, url, key, Some(&body)).await }
        };

        // Responses: wrong item types, a call output without its call, built-in tools,
        // reasoning, images, unknown fields and tools, a bad previous_response_id.
        let f = json!([{"type": "function", "name": "f", "parameters": {"type": "object"}}]);
        for (body, status, param) in [
            (json!({"input": [{"type": "reasoning", "summary": []}]}), 400, "input[0].type"),
            (json!({"input": [{"type": "banana"}]}), 400, "input[0].type"),
            (json!({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}), 400, "input[0].call_id"),
            (json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}), 400, "input[0].content[0].type"),
            (json!({"input": "hi", "tools": [{"type": "web_search"}]}), 400, "tools[0].type"),
            (json!({"input": "hi", "reasoning": {"effort": "low"}}), 400, "reasoning"),
            (json!({"input": "hi", "frobnicate": true}), 400, "frobnicate"),
            (json!({"input": "hi", "include": ["reasoning.encrypted_content"]}), 400, "include"),
            (json!({"input": "hi", "text": {"format": {"type": "xml"}}}), 400, "text.format.type"),
            (json!({"input": "hi", "tools": f, "tool_choice": {"type": "function", "name": "nope"}}), 400, "tool_choice.name"),
            (json!({"input": "hi", "previous_response_id": "resp_nothing"}), 404, "previous_response_id"),
            (json!({"input": "hi", "max_output_tokens": 0}), 400, "max_output_tokens"),
            (json!({"input": 5}), 400, "input"),
        ] {
            let (s, b) = responses(body.clone()).await;
            openai_error(s, &b, status, param, &body.to_string());
        }
        let (s, b) = send(
            reqwest::Method::GET,
            format!("{base}/v1/responses/resp_nothing"),
            bearer,
            None,
        )
        .await;
        assert_eq!(s, 404, "{b}");
        assert!(b["error"]["message"].as_str().is_some_and(|m| m.contains("resp_nothing")), "{b}");

        // Messages: max_tokens missing, a tool_result without its tool_use, unknown
        // tool names, blocks and fields we do not serve.
        let user = json!([{"role": "user", "content": "Hi"}]);
        let (s, b) = messages("/v1/messages", json!({"messages": user}), x_key).await;
        anthropic_error(s, &b, 400, "invalid_request_error", "max_tokens");
        let orphan = json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]);
        let (s, b) = messages("/v1/messages", json!({"max_tokens": 4, "messages": orphan, "tools": [tool("f")]}), x_key).await;
        anthropic_error(s, &b, 400, "invalid_request_error", "toolu_1");
        let unanswered = json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_2", "name": "f", "input": {}}]},
            {"role": "user", "content": "and?"},
        ]);
        let (s, b) = messages("/v1/messages", json!({"max_tokens": 4, "messages": unanswered, "tools": [tool("f")]}), x_key).await;
        anthropic_error(s, &b, 400, "invalid_request_error", "toolu_2");
        let unknown_use = json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_3", "name": "g", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3", "content": "x"}]},
        ]);
        let (s, b) = messages("/v1/messages", json!({"max_tokens": 4, "messages": unknown_use, "tools": [tool("f")]}), x_key).await;
        anthropic_error(s, &b, 400, "invalid_request_error", "`g`");
        for (body, needle) in [
            (json!({"max_tokens": 4, "messages": user, "tools": [tool("f")], "tool_choice": {"type": "tool", "name": "nope"}}), "nope"),
            (json!({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}), "messages.0.content.0.type"),
            (json!({"max_tokens": 4, "messages": user, "thinking": {"type": "enabled", "budget_tokens": 1024}}), "thinking"),
            (json!({"max_tokens": 4, "messages": user, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}), "tools.0.type"),
            (json!({"max_tokens": 4, "messages": user, "frobnicate": 1}), "frobnicate"),
            (json!({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}), "messages.0.role"),
            (json!({"max_tokens": "4", "messages": user}), "max_tokens"),
        ] {
            let (s, b) = messages("/v1/messages", body, x_key).await;
            anthropic_error(s, &b, 400, "invalid_request_error", needle);
        }
        let (s, b) = messages("/v1/messages/count_tokens", json!({"messages": orphan, "tools": [tool("f")]}), x_key).await;
        anthropic_error(s, &b, 400, "invalid_request_error", "toolu_1");

        // Keys: either header; none or a wrong one is 401, in Anthropic's shape on its
        // routes.
        let count = json!({"messages": user});
        let (s, b) = messages("/v1/messages/count_tokens", count.clone(), None).await;
        anthropic_error(s, &b, 401, "authentication_error", "API key");
        let (s, b) = messages("/v1/messages/count_tokens", count.clone(), Some(("x-api-key", "wrong"))).await;
        anthropic_error(s, &b, 401, "authentication_error", "not valid");
        let (s, by_x_key) = messages("/v1/messages/count_tokens", count.clone(), x_key).await;
        assert_eq!(s, 200, "{by_x_key}");
        let (s, by_bearer) = messages("/v1/messages/count_tokens", count, bearer).await;
        assert_eq!(s, 200, "{by_bearer}");
        assert_eq!(by_x_key, by_bearer);
        let (s, b) = send(reqwest::Method::POST, format!("{base}/v1/responses"), None, Some(&json!({"input": "hi"}))).await;
        assert_eq!(s, 401, "{b}");
        assert_eq!(b["error"]["code"], "invalid_api_key", "{b}");

        // A generation works, and Anthropic's usage counts what count_tokens counts.
        let (s, m) = messages("/v1/messages", json!({"max_tokens": 3, "messages": user, "temperature": 0}), bearer).await;
        assert_eq!(s, 200, "{m}");
        let prompt = m["usage"]["input_tokens"].as_u64().unwrap_or(0)
            + m["usage"]["cache_read_input_tokens"].as_u64().unwrap_or(0);
        assert_eq!(json!(prompt), by_bearer["input_tokens"], "{m}");
        assert_eq!(m["stop_reason"], "max_tokens", "{m}");
        assert_eq!(m["usage"]["output_tokens"], 3, "{m}");
    });
}

/// The token routes agree with `llama tokenize` and with each other.
#[test]
fn tokenize_and_detokenize_as_llama_cpp_shapes_them() {
    let served = Served::start(&[]);
    let text = "Hello, world! Tokens: 42 ünïcödé";
    let model = real_model_path();
    let out = llama(&[
        "tokenize",
        "--model",
        model.to_str().expect("utf-8"),
        "--text",
        text,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).expect("ids");
    runtime().block_on(async {
        let base = &served.base;
        let (s, with) = post(
            base,
            "/tokenize",
            &json!({"content": text, "add_special": true}),
        )
        .await;
        assert_eq!(s, 200, "{with}");
        assert_eq!(with["tokens"], cli, "the same ids as `llama tokenize`");
        let (s, plain) = post(base, "/tokenize", &json!({"content": text})).await;
        assert_eq!(s, 200, "{plain}");
        let (s, back) = post(base, "/detokenize", &json!({"tokens": plain["tokens"]})).await;
        assert_eq!(s, 200, "{back}");
        assert_eq!(back["content"], text, "detokenize undoes tokenize");
        let (s, pieces) = post(
            base,
            "/tokenize",
            &json!({"content": "Hello world", "with_pieces": true}),
        )
        .await;
        assert_eq!(s, 200, "{pieces}");
        let list = pieces["tokens"].as_array().expect("a list");
        let joined: String = list
            .iter()
            .map(|t| t["piece"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(joined, "Hello world", "{pieces}");
        let ids: Vec<Value> = list.iter().map(|t| t["id"].clone()).collect();
        let (_, again) = post(base, "/tokenize", &json!({"content": "Hello world"})).await;
        assert_eq!(json!(ids), again["tokens"]);
        for (path, body, param) in [
            (
                "/detokenize",
                json!({"tokens": [1, 4_000_000_000u64]}),
                "tokens[1]",
            ),
            ("/detokenize", json!({"tokens": "abc"}), "tokens"),
            ("/tokenize", json!({"text": "abc"}), "text"),
            ("/tokenize", json!({"content": 5}), "content"),
        ] {
            let (s, b) = post(base, path, &body).await;
            assert_eq!(s, 400, "{path} {body}: {b}");
            assert!(
                b["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(param)),
                "{path} {body}: {b}"
            );
        }
    });
}

/// Stored responses: read back by the key that made them and by no other, kept
/// across a restart on the same state directory, deleted, and not kept at all with
/// `store: false`.
#[test]
fn stored_responses_survive_a_restart_and_stay_with_their_key() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = state.path().to_str().expect("a UTF-8 path");
    let a = Some(("authorization", "Bearer key-a"));
    let a_x = Some(("x-api-key", "key-a"));
    let b = Some(("authorization", "Bearer key-b"));
    let rt = runtime();
    let (id, first, unstored) = {
        let served = Served::start(&["--state-dir", dir]);
        let base = served.base.clone();
        rt.block_on(async move {
            let url = format!("{base}/v1/responses");
            let body = json!({"input": "Say hello.", "max_output_tokens": 4, "temperature": 0, "metadata": {"k": "v"}});
            let (s, r) = send(reqwest::Method::POST, url.clone(), a, Some(&body)).await;
            assert_eq!(s, 200, "{r}");
            assert_eq!(r["metadata"], json!({"k": "v"}));
            let id = r["id"].as_str().expect("an id").to_string();
            let get = |key| send(reqwest::Method::GET, format!("{url}/{id}"), key, None);
            let (s, got) = get(a).await;
            assert_eq!((s, &got), (200, &r));
            let (s, got) = get(a_x).await;
            assert_eq!((s, &got), (200, &r), "the same key in Anthropic's header");
            let (s, got) = get(b).await;
            assert_eq!(s, 404, "another key: {got}");
            let (s, got) = get(None).await;
            assert_eq!(s, 404, "no key: {got}");
            let chained = json!({"input": "Again.", "previous_response_id": id, "max_output_tokens": 2});
            let (s, got) = send(reqwest::Method::POST, url.clone(), b, Some(&chained)).await;
            assert_eq!(s, 404, "another key cannot continue it: {got}");
            let unstored = json!({"input": "Say hello.", "max_output_tokens": 2, "store": false});
            let (s, u) = send(reqwest::Method::POST, url.clone(), a, Some(&unstored)).await;
            assert_eq!(s, 200, "{u}");
            (id, r, u["id"].as_str().unwrap_or_default().to_string())
        })
    };
    let served = Served::start(&["--state-dir", dir]);
    let base = served.base.clone();
    rt.block_on(async move {
        let url = format!("{base}/v1/responses");
        let (s, got) = send(reqwest::Method::GET, format!("{url}/{id}"), a, None).await;
        assert_eq!((s, &got), (200, &first), "kept across the restart");
        let (s, got) = send(reqwest::Method::GET, format!("{url}/{unstored}"), a, None).await;
        assert_eq!(s, 404, "store false: {got}");
        let chained = json!({"input": "Again.", "previous_response_id": id, "max_output_tokens": 2, "temperature": 0});
        let (s, next) = send(reqwest::Method::POST, url.clone(), a, Some(&chained)).await;
        assert_eq!(s, 200, "the stored conversation goes on: {next}");
        assert_eq!(next["previous_response_id"], json!(id));
        let first_turn = first["usage"]["input_tokens"].as_u64().unwrap_or(0);
        assert!(
            next["usage"]["input_tokens"].as_u64().unwrap_or(0) > first_turn,
            "the second turn's prompt holds the first: {next}"
        );
        let (s, got) = send(reqwest::Method::DELETE, format!("{url}/{id}"), b, None).await;
        assert_eq!(s, 404, "another key cannot delete it: {got}");
        let (s, got) = send(reqwest::Method::DELETE, format!("{url}/{id}"), a, None).await;
        assert_eq!(s, 200, "{got}");
        assert_eq!(got["deleted"], true);
        let (s, _) = send(reqwest::Method::GET, format!("{url}/{id}"), a, None).await;
        assert_eq!(s, 404, "deleted");
    });
}

/// A state directory that cannot be made is one line on stderr and exit 1.
#[test]
fn a_state_dir_that_cannot_be_made_is_one_line_and_exit_1() {
    let file = tempfile::NamedTempFile::new().expect("a file");
    let under = file.path().join("state");
    let model = real_model_path();
    let out = llama(&[
        "serve",
        "--model",
        model.to_str().expect("utf-8"),
        "--port",
        "0",
        "--state-dir",
        under.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error:") && last.contains("state"),
        "{err}"
    );
}

/// Past `--responses-max-count`, the oldest stored responses go first.
#[test]
fn stored_responses_past_the_count_expire_oldest_first() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = state.path().to_str().expect("a UTF-8 path");
    let served = Served::start(&["--state-dir", dir, "--responses-max-count", "2"]);
    let base = served.base.clone();
    runtime().block_on(async move {
        let url = format!("{base}/v1/responses");
        let key = Some(("authorization", "Bearer k"));
        let mut ids = Vec::new();
        for i in 0..3 {
            let body = json!({"input": format!("Count to {i}."), "max_output_tokens": 1});
            let (s, r) = send(reqwest::Method::POST, url.clone(), key, Some(&body)).await;
            assert_eq!(s, 200, "{r}");
            ids.push(r["id"].as_str().expect("an id").to_string());
        }
        for (id, kept) in ids.iter().zip([false, true, true]) {
            let (s, r) = send(reqwest::Method::GET, format!("{url}/{id}"), key, None).await;
            assert_eq!(s == 200, kept, "{id}: {s} {r}");
        }
    });
}
