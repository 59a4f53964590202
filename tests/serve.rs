//! `llama serve` in process, driven by a real OpenAI client (async-openai) and by
//! raw HTTP for what a client library would not send.
#[path = "it/common/mod.rs"]
mod common;
use crate::common::server;
#[path = "serve/rig.rs"]
mod rig;

use std::time::{Duration, Instant};

use crate::common::rss_kib;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessageArgs, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    ChatCompletionStreamOptions, CreateChatCompletionRequestArgs, FinishReason, Prompt,
    StopConfiguration,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::Client;
use futures_util::StreamExt;
use llama::serve::ServerConfig;
use serde_json::{json, Value};
use server::*;
use tokio::sync::OnceCell;

const ALIAS: &str = "smollm2";

/// One server shared by the tests that do not need one of their own.
async fn shared() -> &'static TestServer {
    static SHARED: OnceCell<TestServer> = OnceCell::const_new();
    SHARED
        .get_or_init(|| async {
            TestServer::start(ServerConfig {
                alias: ALIAS.into(),
                parallel: 4,
                ..ServerConfig::default()
            })
            .await
        })
        .await
}

fn client(server: &TestServer) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(server.url("/v1"))
            .with_api_key("unused"),
    )
}

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .expect("message")
        .into()
}

fn system(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestSystemMessageArgs::default()
        .content(text)
        .build()
        .expect("message")
        .into()
}

fn assistant(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestAssistantMessageArgs::default()
        .content(text)
        .build()
        .expect("message")
        .into()
}

async fn post(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_what_the_engine_answers_alone() {
    let server = shared().await;
    let request = CreateChatCompletionRequestArgs::default()
        .model(ALIAS)
        .messages(vec![
            system("You are a helpful assistant."),
            user("What is the capital of France?"),
        ])
        .max_completion_tokens(24u32)
        .temperature(0.0)
        .build()
        .expect("request");
    let response = client(server).chat().create(request).await.expect("chat");
    let prompt = chat_ids(&[
        ("system", "You are a helpful assistant."),
        ("user", "What is the capital of France?"),
    ]);
    let want = greedy_alone(&prompt, 24);
    assert_eq!(response.object, "chat.completion");
    assert_eq!(response.model, ALIAS);
    assert_eq!(response.choices.len(), 1);
    let choice = &response.choices[0];
    assert_eq!(choice.message.content.as_deref(), Some(want.as_str()));
    let usage = response.usage.expect("usage");
    assert_eq!(usage.prompt_tokens as usize, prompt.len());
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 24);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    let expected_reason = if usage.completion_tokens == 24 {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    assert_eq!(choice.finish_reason, Some(expected_reason));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_carries_the_same_text_then_usage_then_done() {
    let server = shared().await;
    let build = |stream: bool| {
        let mut b = CreateChatCompletionRequestArgs::default();
        b.model(ALIAS)
            .messages(vec![user("Name three colors.")])
            .max_completion_tokens(20u32)
            .temperature(0.0);
        if stream {
            b.stream(true).stream_options(ChatCompletionStreamOptions {
                include_usage: Some(true),
                include_obfuscation: None,
            });
        }
        b.build().expect("request")
    };
    let whole = client(server)
        .chat()
        .create(build(false))
        .await
        .expect("chat");
    let mut stream = client(server)
        .chat()
        .create_stream(build(true))
        .await
        .expect("stream");
    let mut text = String::new();
    let mut role_seen = false;
    let mut finish = None;
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        assert_eq!(chunk.object, "chat.completion.chunk");
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            usage = Some(u);
            continue;
        }
        for c in chunk.choices {
            role_seen |= c.delta.role.is_some();
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
    }
    assert!(role_seen, "the first chunk names the role");
    assert_eq!(
        Some(text.as_str()),
        whole.choices[0].message.content.as_deref()
    );
    assert_eq!(finish, whole.choices[0].finish_reason);
    let usage = usage.expect("a usage chunk before [DONE]");
    let whole_usage = whole.usage.expect("usage");
    assert_eq!(usage.prompt_tokens, whole_usage.prompt_tokens);
    assert_eq!(usage.completion_tokens, whole_usage.completion_tokens);
}

#[allow(deprecated)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_take_text_or_ids_and_echo() {
    let server = shared().await;
    let engine = reference_engine();
    let tokenizer = engine.tokenizer().expect("tokenizer");
    let text = "The capital of France is";
    let ids = tokenizer.encode(text).expect("encode");
    let want = greedy_alone(&ids, 16);
    let request = |prompt: Prompt, echo: bool| {
        CreateCompletionRequestArgs::default()
            .model(ALIAS)
            .prompt(prompt)
            .max_tokens(16u32)
            .temperature(0.0)
            .echo(echo)
            .build()
            .expect("request")
    };
    let c = client(server);
    let from_text = c
        .completions()
        .create(request(Prompt::String(text.into()), false))
        .await
        .expect("text prompt");
    assert_eq!(from_text.object, "text_completion");
    assert_eq!(from_text.choices[0].text, want);
    let from_ids = c
        .completions()
        .create(request(Prompt::IntegerArray(ids.clone()), false))
        .await
        .expect("id prompt");
    assert_eq!(from_ids.choices[0].text, want);
    assert_eq!(
        from_ids.usage.expect("usage").prompt_tokens as usize,
        ids.len()
    );
    let echoed = c
        .completions()
        .create(request(Prompt::String(text.into()), true))
        .await
        .expect("echo");
    assert_eq!(echoed.choices[0].text, format!("{text}{want}"));
    // Two prompts in one request: one choice each, in order.
    let two = c
        .completions()
        .create(request(
            Prompt::StringArray(vec![text.into(), "Once upon a time".into()]),
            false,
        ))
        .await
        .expect("two prompts");
    assert_eq!(two.choices.len(), 2);
    assert_eq!(two.choices[0].index, 0);
    assert_eq!(two.choices[0].text, want);
    let other = greedy_alone(&tokenizer.encode("Once upon a time").expect("encode"), 16);
    assert_eq!(two.choices[1].text, other);
}

#[allow(deprecated)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_text_whatever_else_runs() {
    let server = shared().await;
    let sampled = |seed: i64| {
        CreateChatCompletionRequestArgs::default()
            .model(ALIAS)
            .messages(vec![user("Write one sentence about the sea.")])
            .max_completion_tokens(24u32)
            .temperature(1.0)
            .seed(seed)
            .build()
            .expect("request")
    };
    let c = client(server);
    let alone = c.chat().create(sampled(42)).await.expect("alone");
    // Again, while three other requests share the steps.
    let others: Vec<_> = (0..3)
        .map(|i| {
            let c = c.clone();
            let r = sampled(100 + i);
            tokio::spawn(async move { c.chat().create(r).await })
        })
        .collect();
    let busy = c.chat().create(sampled(42)).await.expect("busy");
    let mut other_texts = Vec::new();
    for o in others {
        let r = o.await.expect("task").expect("other");
        other_texts.push(r.choices[0].message.content.clone());
    }
    assert_eq!(
        alone.choices[0].message.content, busy.choices[0].message.content,
        "seed 42 alone and under load"
    );
    assert!(
        other_texts
            .iter()
            .any(|t| *t != alone.choices[0].message.content),
        "other seeds sample other text"
    );
}

#[allow(deprecated)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_logprobs_and_n() {
    let server = shared().await;
    let c = client(server);
    let text = "The capital of France is";
    let ids = reference_engine()
        .tokenizer()
        .expect("tokenizer")
        .encode(text)
        .expect("encode");
    let full = greedy_alone(&ids, 24);
    // A stop string taken from the greedy text ends it just before.
    let cut = full
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i > 4 && full[..i].ends_with(' '))
        .expect("a space in the greedy text");
    let stop = full[cut..]
        .split_whitespace()
        .next()
        .expect("a word")
        .to_string();
    let stopped = c
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model(ALIAS)
                .prompt(text)
                .max_tokens(24u32)
                .temperature(0.0)
                .stop(StopConfiguration::StringArray(vec![
                    stop.clone(),
                    "\u{0}never".into(),
                ]))
                .build()
                .expect("request"),
        )
        .await
        .expect("stop");
    let got = &stopped.choices[0].text;
    assert_eq!(
        format!("{got}{stop}"),
        full[..got.len() + stop.len()].to_string()
    );
    assert!(!got.contains(&stop));
    assert_eq!(
        stopped.choices[0].finish_reason,
        Some(async_openai::types::chat::CompletionFinishReason::Stop)
    );

    // Log-probabilities: the greedy token is the most likely one, the alternatives
    // are sorted, and the tokens spell the text.
    let with_lp = c
        .chat()
        .create(
            CreateChatCompletionRequestArgs::default()
                .model(ALIAS)
                .messages(vec![user("Say hello.")])
                .max_completion_tokens(8u32)
                .temperature(0.0)
                .logprobs(true)
                .top_logprobs(3u8)
                .build()
                .expect("request"),
        )
        .await
        .expect("logprobs");
    let choice = &with_lp.choices[0];
    let content = choice
        .logprobs
        .as_ref()
        .and_then(|l| l.content.as_ref())
        .expect("logprobs.content");
    assert_eq!(
        content.len() as u32,
        with_lp.usage.expect("usage").completion_tokens
    );
    let mut spelled = String::new();
    for t in content {
        assert!(t.logprob <= 0.0);
        assert_eq!(t.top_logprobs.len(), 3);
        assert_eq!(
            t.top_logprobs[0].token, t.token,
            "greedy takes the most likely"
        );
        assert!((t.top_logprobs[0].logprob - t.logprob).abs() < 1e-6);
        assert!(t
            .top_logprobs
            .windows(2)
            .all(|w| w[0].logprob >= w[1].logprob));
        let mass: f32 = t.top_logprobs.iter().map(|x| x.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-4);
        spelled.push_str(&t.token);
    }
    let answer = choice.message.content.clone().unwrap_or_default();
    assert!(
        answer.starts_with(spelled.trim_end()) || spelled.starts_with(&answer),
        "tokens {spelled:?} spell {answer:?}"
    );

    // n = 2: two choices, each counted.
    let two = c
        .chat()
        .create(
            CreateChatCompletionRequestArgs::default()
                .model(ALIAS)
                .messages(vec![user("Tell me a fact.")])
                .max_completion_tokens(12u32)
                .temperature(1.0)
                .seed(5)
                .n(2u8)
                .build()
                .expect("request"),
        )
        .await
        .expect("n = 2");
    assert_eq!(two.choices.len(), 2);
    let indices: Vec<u32> = two.choices.iter().map(|c| c.index).collect();
    assert_eq!(indices, vec![0, 1]);
    let usage = two.usage.expect("usage");
    assert_eq!(
        usage.prompt_tokens as usize,
        chat_ids(&[("user", "Tell me a fact.")]).len(),
        "the prompt is counted once"
    );
    assert!(usage.completion_tokens >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_reuses_the_cache_of_its_earlier_turns() {
    let server = shared().await;
    let c = client(server);
    let first_q = "My name is Ada. What is a good name for a cat? Answer briefly, please.";
    let first = c
        .chat()
        .create(
            CreateChatCompletionRequestArgs::default()
                .model(ALIAS)
                .messages(vec![system("You are terse."), user(first_q)])
                .max_completion_tokens(16u32)
                .temperature(0.0)
                .build()
                .expect("request"),
        )
        .await
        .expect("turn 1");
    let first_prompt = first.usage.expect("usage").prompt_tokens;
    let answer = first.choices[0].message.content.clone().unwrap_or_default();
    let second = c
        .chat()
        .create(
            CreateChatCompletionRequestArgs::default()
                .model(ALIAS)
                .messages(vec![
                    system("You are terse."),
                    user(first_q),
                    assistant(&answer),
                    user("And for a dog?"),
                ])
                .max_completion_tokens(8u32)
                .temperature(0.0)
                .build()
                .expect("request"),
        )
        .await
        .expect("turn 2");
    let usage = second.usage.expect("usage");
    let cached = usage
        .prompt_tokens_details
        .and_then(|d| d.cached_tokens)
        .expect("prompt_tokens_details.cached_tokens");
    assert!(
        cached >= first_prompt,
        "turn 2 reused {cached} tokens; turn 1's prompt alone was {first_prompt}"
    );
    assert!(cached < usage.prompt_tokens);
}

/// Every bad request gets OpenAI's error shape with the right status, naming what
/// is wrong, and the server goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let server = shared().await;
    let chat = |extra: Value| {
        let mut body = json!({
            "model": ALIAS,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        body
    };
    let long_prompt = "word ".repeat(CONTEXT + 50);
    let cases: Vec<(&str, Value, u16, Option<&str>, &str)> = vec![
        (
            "/v1/chat/completions",
            chat(json!({"temperature": "hot"})),
            400,
            Some("temperature"),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": []})),
            400,
            Some("messages"),
            "empty",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
            Some("messages[0].role"),
            "wizard",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"n": 0})),
            400,
            Some("n"),
            "n is 0",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
            "at least 1",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"top_p": 1.5})),
            400,
            Some("top_p"),
            "(0, 1]",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"top_logprobs": 3})),
            400,
            Some("top_logprobs"),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logit_bias": {"99999999": 5}})),
            400,
            Some("logit_bias.99999999"),
            "vocabulary",
        ),
        (
            "/v1/chat/completions",
            chat(
                json!({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "strict": true,
                "schema": {"type": "string", "format": "weird-format"}}}}),
            ),
            400,
            Some("response_format.json_schema.schema"),
            "weird-format",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "xml"}})),
            400,
            Some("response_format.type"),
            "xml",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "retrieval"}]})),
            400,
            Some("tools[0].type"),
            "retrieval",
        ),
        (
            "/v1/chat/completions",
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            400,
            Some("tools"),
            "`g`",
        ),
        (
            "/v1/chat/completions",
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"}}),
            ),
            400,
            Some("response_format"),
            "tools",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}),
            400,
            Some("tools"),
            "not supported",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
            "stream",
        ),
        (
            "/v1/chat/completions",
            chat(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            400,
            Some("messages[0].content[0].type"),
            "image_url",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": long_prompt}]})),
            400,
            Some("messages"),
            "context",
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt, "max_tokens": 4}),
            400,
            Some("prompt"),
            "context",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 99999999], "max_tokens": 4}),
            400,
            Some("prompt"),
            "outside the vocabulary",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "suffix": "y"}),
            400,
            Some("suffix"),
            "not supported",
        ),
        (
            "/v1/completions",
            json!({"prompt": "", "max_tokens": 4}),
            400,
            Some("prompt"),
            "empty",
        ),
        (
            "/v1/completions",
            json!({"max_tokens": 4}),
            400,
            None,
            "prompt",
        ),
    ];
    for (path, body, status, param, words) in cases {
        let (got, error) = post(server, path, &body).await;
        let e = &error["error"];
        assert_eq!(got, status, "{path} {body}: {error}");
        assert_eq!(e["type"], "invalid_request_error", "{error}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{error}");
        }
        let message = e["message"].as_str().expect("message");
        assert!(
            message.contains(words),
            "{message:?} should mention {words:?}"
        );
    }
    // Not JSON at all, and a body over the limit.
    let client = reqwest::Client::new();
    let r = client
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("json");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("JSON"));
    let r = client
        .post(server.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(vec![b' '; ServerConfig::default().body_limit + 1])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);
    let e: Value = r.json().await.expect("json");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("limit"));
    // Unknown routes and models.
    let r = client
        .get(server.url("/v1/nothing"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    let r = client
        .get(server.url("/v1/models/other"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    // And the server still answers.
    let (status, ok) = post(server, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(status, 200, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let server = shared().await;
    let models = client(server).models().list().await.expect("models");
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, ALIAS);
    let one = client(server)
        .models()
        .retrieve(ALIAS)
        .await
        .expect("model");
    assert_eq!(one.id, ALIAS);
    let health: Value = reqwest::get(server.url("/health"))
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");
    let before = server.metric("llama_generated_tokens_total").await;
    let (status, body) = post(
        server,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200);
    let generated = body["usage"]["completion_tokens"].as_f64().expect("usage");
    let after = server.metric("llama_generated_tokens_total").await;
    assert!(
        after - before >= generated,
        "{before} -> {after}, {generated} generated"
    );
    let text = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "llama_requests_total",
        "llama_prompt_tokens_total",
        "llama_time_to_first_token_seconds_bucket",
        "llama_inter_token_latency_seconds_bucket",
        "llama_queue_depth",
        "llama_busy_sequences",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_every_route_but_health() {
    let server = TestServer::start(ServerConfig {
        api_key: Some("sesame".into()),
        ..ServerConfig::default()
    })
    .await;
    let http = reqwest::Client::new();
    let health = http
        .get(server.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    for (key, code) in [(None, 401), (Some("wrong"), 401), (Some("sesame"), 200)] {
        let mut r = http.get(server.url("/v1/models"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().await.expect("models");
        assert_eq!(r.status(), code, "key {key:?}");
        if code == 401 {
            let e: Value = r.json().await.expect("json");
            assert_eq!(e["error"]["code"], "invalid_api_key");
        }
    }
    let wrong = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(server.url("/v1"))
            .with_api_key("wrong"),
    );
    let err = wrong.models().list().await.expect_err("refused");
    assert!(err.to_string().contains("API key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let server = TestServer::start(ServerConfig {
        parallel: 1,
        max_queue: 0,
        ..ServerConfig::default()
    })
    .await;
    let http = reqwest::Client::new();
    let long = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "Count to a thousand:", "max_tokens": 400, "temperature": 0, "stream": true}))
        .send()
        .await
        .expect("long request");
    assert_eq!(long.status(), 200);
    let mut long = long.bytes_stream();
    long.next().await.expect("the first chunk").expect("bytes");
    // The one place is taken and nothing may wait.
    let r = http
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "Hi", "max_tokens": 4}))
        .send()
        .await
        .expect("second request");
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "server_error");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("busy"));
    drop(long);
}

/// 64 chat requests from 16 concurrent clients with 4 places: each answer is the
/// engine's greedy answer alone, none is lost, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_requests_from_sixteen_clients() {
    let server = TestServer::start(ServerConfig {
        parallel: 4,
        ..ServerConfig::default()
    })
    .await;
    let questions: Vec<String> = (0..8)
        .map(|i| format!("Give me one word that rhymes with number {i}."))
        .collect();
    let want: Vec<String> = questions
        .iter()
        .map(|q| greedy_alone(&chat_ids(&[("user", q)]), 12))
        .collect();
    let rss_before = rss_kib();
    let c = client(&server);
    let clients: Vec<_> = (0..16)
        .map(|k| {
            let c = c.clone();
            let questions = questions.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for j in 0..4 {
                    let q = (k * 4 + j) % questions.len();
                    let r = c
                        .chat()
                        .create(
                            CreateChatCompletionRequestArgs::default()
                                .model(ALIAS)
                                .messages(vec![user(&questions[q])])
                                .max_completion_tokens(12u32)
                                .temperature(0.0)
                                .build()
                                .expect("request"),
                        )
                        .await
                        .expect("answered");
                    answers.push((q, r.choices[0].message.content.clone().unwrap_or_default()));
                }
                answers
            })
        })
        .collect();
    let mut count = 0;
    for c in clients {
        for (q, text) in c.await.expect("client") {
            assert_eq!(text, want[q], "question {q}");
            count += 1;
        }
    }
    assert_eq!(count, 64);
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 512 * 1024,
        "resident memory grew by {grown} KiB over 64 requests"
    );
    assert_eq!(server.metric("llama_busy_sequences").await, 0.0);
}

/// Clients that leave stop costing anything: 50 streams dropped mid-way free every
/// place within a second, and so does a client that leaves a non-streaming request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_free_their_places() {
    let server = TestServer::start(ServerConfig {
        parallel: 4,
        ..ServerConfig::default()
    })
    .await;
    let http = reqwest::Client::new();
    let mut streams = Vec::new();
    for i in 0..50 {
        let r = http
            .post(server.url("/v1/chat/completions"))
            .json(&json!({
                "messages": [{"role": "user", "content": format!("Tell a long story number {i}.")}],
                "max_tokens": 500, "stream": true, "temperature": 0,
            }))
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status(), 200);
        streams.push(r.bytes_stream());
    }
    // The four admitted ones are generating.
    for s in streams.iter_mut().take(4) {
        s.next().await.expect("a chunk").expect("bytes");
    }
    assert!(server.metric("llama_busy_sequences").await >= 1.0);
    drop(streams);
    let left = Instant::now();
    wait_idle(&server, left).await;
    // The next request starts at once and completes.
    let (status, body) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A non-streaming request whose client gives up.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let r = impatient
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "Count to a thousand:", "max_tokens": 800, "temperature": 0}))
        .send()
        .await;
    assert!(r.is_err(), "the request timed out on the client's side");
    wait_idle(&server, Instant::now()).await;
}

async fn wait_idle(server: &TestServer, since: Instant) {
    loop {
        let busy = server.metric("llama_busy_sequences").await;
        let queued = server.metric("llama_queue_depth").await;
        if busy == 0.0 && queued == 0.0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(1),
            "{busy} busy and {queued} queued a second after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// While the model loads, `/health` and every model route answer 503 in OpenAI's
/// shape; once it is loaded, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_model_is_loaded() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (open_gate, gate) = std::sync::mpsc::channel::<()>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let path = crate::common::real_model_path();
    let server = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        llama::serve::serve(
            listener,
            ServerConfig::default(),
            move || {
                // Loading takes until the test says so.
                let _ = gate.recv();
                llama::runtime::Engine::load(&path, &engine_options())
            },
            async move {
                let _ = stopped.await;
            },
        )
        .await
    });
    let http = reqwest::Client::new();
    let health = http
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 503);
    let body: Value = health.json().await.expect("json");
    assert_eq!(body["status"], "loading");
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.expect("json");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("loading"));
    open_gate.send(()).expect("open the gate");
    let start = Instant::now();
    loop {
        let r = http
            .get(format!("{base}/health"))
            .send()
            .await
            .expect("health");
        if r.status() == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).expect("stop");
    server
        .await
        .expect("task")
        .expect("served and stopped cleanly");
}
