//! `llama serve`'s routes, driven in process with untrusted requests.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use llama_runtime::{Backend, Context, Engine, SessionOptions};
use llama_serve::{AppState, Loaded, ServerConfig};
use tower::ServiceExt;

use crate::{scratch, write};

/// The routes an input's first byte chooses among (modulo their count).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/"),
];

/// The tiny model the server runs: two layers, a 256-token vocabulary, 48 positions,
/// so that a request that generates to the end of the context costs milliseconds.
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny/llama3");
const TEMPLATE: &str = r#"{"chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}", "bos_token": "", "eos_token": ""}"#;
const CONTEXT: usize = 48;
/// Bodies over this get 413: small, so the limit itself is fuzzed too.
pub const BODY_LIMIT: usize = 64 << 10;
/// A request that takes longer than this has hung.
const DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    rt: tokio::runtime::Runtime,
    router: Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = scratch().join("server-model");
        std::fs::create_dir_all(&dir).expect("the server model's directory");
        for name in ["config.json", "model.safetensors", "tokenizer.json"] {
            let from = std::path::Path::new(MODEL).join(name);
            let bytes = std::fs::read(&from)
                .unwrap_or_else(|e| panic!("{}: {e} (the tiny model fixture)", from.display()));
            write(&dir.join(name), &bytes);
        }
        write(&dir.join("tokenizer_config.json"), TEMPLATE.as_bytes());
        let options = SessionOptions {
            backend: Backend::Flex,
            threads: Some(1),
            context: Context::Positions(CONTEXT),
            ..SessionOptions::default()
        };
        let engine = Engine::load(&dir, &options).expect("the tiny model loads");
        let config = ServerConfig {
            parallel: 2,
            max_queue: 16,
            body_limit: BODY_LIMIT,
            ..ServerConfig::default()
        };
        let loaded = Loaded::start(&config.alias, engine, &config).expect("the service starts");
        let state = Arc::new(AppState::new(config));
        state.set_loaded(loaded);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime");
        Server {
            rt,
            router: llama_serve::router(state),
        }
    })
}

/// One request: the first byte picks the route (and, with its high bit, leaves out
/// the JSON content type); the rest is the body (or, for `/v1/models/`, the id).
///
/// Whatever the request, the answer must be a status that is not a server error
/// (503 aside), an OpenAI-shaped error body with every 4xx, valid JSON with every
/// JSON 200, and a well-formed event stream; and it must come within the deadline.
pub fn server_request(data: &[u8]) -> bool {
    let Some((&first, body)) = data.split_first() else {
        return false;
    };
    let (method, path) = ROUTES[first as usize % ROUTES.len()];
    let mut uri = path.to_string();
    let body = if path.ends_with('/') {
        uri.extend(
            body.iter()
                .take(64)
                .filter(|b| b.is_ascii_alphanumeric() || b"-._~".contains(b))
                .map(|&b| b as char),
        );
        Vec::new()
    } else {
        body.to_vec()
    };
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET))
        .uri(&uri);
    if first & 0x80 == 0 {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let Ok(request) = request.body(Body::from(body)) else {
        return false;
    };
    let s = server();
    let (status, content_type, bytes) = s.rt.block_on(async {
        let answer = async {
            let response = s.router.clone().oneshot(request).await.expect("infallible");
            let status = response.status();
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let bytes = axum::body::to_bytes(response.into_body(), 16 << 20).await;
            (status, content_type, bytes)
        };
        tokio::time::timeout(DEADLINE, answer)
            .await
            .unwrap_or_else(|_| panic!("{method} {uri} got no answer within {DEADLINE:?}"))
    });
    let bytes = bytes.unwrap_or_else(|e| panic!("{method} {uri}: the body failed: {e}"));
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{method} {uri} answered {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if status.is_client_error() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status} with a body that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{status} without an error message: {v}"
        );
    } else if status.is_success() && content_type.starts_with("application/json") {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .unwrap_or_else(|e| panic!("{method} {uri}: 200 with invalid JSON: {e}"));
    } else if content_type.starts_with("text/event-stream") {
        let text = std::str::from_utf8(&bytes).expect("an event stream is UTF-8");
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data != "[DONE]" {
                serde_json::from_str::<serde_json::Value>(data)
                    .unwrap_or_else(|e| panic!("an event that is not JSON ({e}): {data}"));
            }
        }
    }
    status.is_success()
}
