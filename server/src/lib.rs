//! `llama serve`: an OpenAI-compatible HTTP server on the batched engine.
//!
//! Every request becomes sequences of one [`llama_runtime::Service`] (continuous
//! batching over a KV budget of `parallel` contexts, with the prefix cache that lets
//! a conversation's next turn reuse the previous one). A request's sequences live as
//! long as its handler or its event stream: a client that goes away cancels them at
//! the next step. The server binds first and loads the model after, answering
//! `/health` with 503 until it is ready.
mod conn;
mod embeddings;
mod error;
mod jobs;
mod messages;
mod meta;
mod metrics;
mod models;
mod request;
mod responses;
mod routes;
mod state;
mod store;
mod tokens;
mod turn;
mod webui;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use llama_runtime::Engine;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::CorsLayer;

pub use error::{AnthropicError, ApiError, ServeError};
pub use models::{Lease, Limits, ModelEntry, Registry};
pub use state::{AppState, Loaded, ServerConfig};
pub use store::{Retention, StoreError};

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.body_limit;
    let mut router = Router::new();
    if state.config.webui {
        router = router
            .route("/", get(webui::page))
            .route("/app.js", get(webui::script));
    }
    router
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/v1/models", get(meta::models))
        .route("/v1/models/{id}", get(meta::model))
        .route("/models/load", post(meta::load))
        .route("/models/unload", post(meta::unload))
        .route("/health", get(meta::health))
        .route("/metrics", get(meta::metrics))
        .fallback(meta::not_found)
        .method_not_allowed_fallback(meta::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .layer(CorsLayer::permissive())
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }))
        .with_state(state)
}

/// With an API key, every route but `/health` and the chat page's files (which hold
/// no data; the page asks for the key) wants `Authorization: Bearer KEY` or
/// Anthropic's `x-api-key: KEY`. Anthropic's routes answer in Anthropic's shape.
async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref() else {
        return next.run(req).await;
    };
    let open = matches!(req.uri().path(), "/health" | "/" | "/app.js");
    if open || req.method() == axum::http::Method::OPTIONS {
        return next.run(req).await;
    }
    let error = match presented_key(req.headers()) {
        Some(g) if same(g.as_bytes(), key.as_bytes()) => return next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "the API key is not valid"),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "an API key is needed: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
        ),
    }
    .with_code("invalid_api_key");
    if req.uri().path().starts_with("/v1/messages") {
        return AnthropicError(error).into_response();
    }
    error.into_response()
}

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key: KEY`.
pub(crate) fn presented_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// Compares in time that does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every answered request by route and status.
async fn count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let response = next.run(req).await;
    state.metrics.request(&route, response.status().as_u16());
    response
}

/// Serves one model on `listener` until `shutdown` completes: the model is loaded by
/// `load` on a blocking thread meanwhile (`/health` answers 503 until then). See
/// [`serve_models`].
pub async fn serve<L, S>(
    listener: TcpListener,
    config: ServerConfig,
    load: L,
    shutdown: S,
) -> Result<(), ServeError>
where
    L: FnOnce() -> llama_runtime::Result<Engine> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let once = std::sync::Mutex::new(Some(load));
    let entry = ModelEntry {
        name: config.alias.clone(),
        path: std::path::PathBuf::new(),
        chat_template: None,
    };
    let load = move |_: &ModelEntry| {
        let load = once
            .lock()
            .map_err(|_| llama_runtime::RuntimeError::Options("the loader failed".into()))?
            .take()
            .ok_or_else(|| {
                llama_runtime::RuntimeError::Options("this model cannot be loaded again".into())
            })?;
        load()
    };
    let models = Models {
        entries: vec![entry],
        dir: None,
        limits: Limits::default(),
    };
    serve_models(listener, config, models, Arc::new(load), shutdown).await
}

/// The models a server offers.
pub struct Models {
    /// Named on the command line (`--model [NAME=]PATH`).
    pub entries: Vec<ModelEntry>,
    /// A directory whose `.gguf` files and model directories are models too,
    /// rescanned as it changes (`--models-dir`).
    pub dir: Option<std::path::PathBuf>,
    pub limits: Limits,
}

/// Loads one model's engine.
pub type EngineLoader = dyn Fn(&ModelEntry) -> llama_runtime::Result<Engine> + Send + Sync;

/// Serves on `listener` until `shutdown` completes.
///
/// With one model named and no directory, that model is loaded at once on a
/// blocking thread (`/health` answers 503 until then), serves every request
/// whatever its `model` field says, and a failure to load ends the server with
/// that error. Otherwise models load on first use in the background and unload
/// least recently used first past the limits (see [`Registry`]).
///
/// After the signal no connection is accepted, requests in flight run on for the
/// configured timeout, then what is left is cancelled. Connections are limited in
/// number and in how long a peer may take (`ServerConfig::{max_connections,
/// timeout}`).
pub async fn serve_models<S>(
    listener: TcpListener,
    config: ServerConfig,
    models: Models,
    load: Arc<EngineLoader>,
    shutdown: S,
) -> Result<(), ServeError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let listener = conn::LimitedListener::new(listener, config.max_connections, config.timeout);
    let start_config = config.clone();
    let many = models.dir.is_some() || models.entries.len() > 1;
    let start = move |entry: &ModelEntry| -> Result<Loaded, String> {
        let engine = load(entry).map_err(|e| e.to_string())?;
        // Each model of several keeps its prompt cache in a directory of its own.
        let mut config = start_config.clone();
        if let Some(disk) = config.prompt_cache.as_mut() {
            if !entry.path.as_os_str().is_empty() {
                disk.model = entry.path.clone();
            }
            if many {
                disk.dir = disk.dir.join(&entry.name);
            }
        }
        Loaded::start(&entry.name, engine, &config).map_err(|e| e.to_string())
    };
    let registry = Registry::new(
        models.entries,
        models.dir,
        models.limits,
        config.timeout,
        Arc::new(start),
    );
    let state = Arc::new(AppState::with_models(config, registry.clone()));
    if let Some(why) = state.store_error() {
        return Err(ServeError::Internal(why.to_string()));
    }
    let single = registry
        .is_single()
        .then(|| registry.names())
        .and_then(|n| n.into_iter().next());
    if let Some(name) = &single {
        registry.preload(name);
    }
    registry.watch(Duration::from_secs(1));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .into_future();
    let mut server = std::pin::pin!(server);
    let loading = {
        let registry = registry.clone();
        let single = single.clone();
        async move {
            match single {
                Some(name) => registry.loaded_or_failed(&name).await,
                None => std::future::pending().await,
            }
        }
    };
    let mut loading = std::pin::pin!(loading);
    let mut loaded = false;
    loop {
        tokio::select! {
            r = &mut server => return r.map_err(ServeError::Io),
            r = &mut loading, if !loaded => {
                loaded = true;
                if let Err(e) = r {
                    return Err(ServeError::Internal(e));
                }
            }
            r = stop_rx.changed() => {
                if r.is_err() || *stop_rx.borrow() {
                    break;
                }
            }
        }
    }
    // Stopping: new requests get 503; those in flight have the timeout to finish.
    state.stop_accepting();
    let deadline = state.config.shutdown_timeout;
    if let Ok(r) = tokio::time::timeout(deadline, &mut server).await {
        return r.map_err(ServeError::Io);
    }
    for (_, m) in registry.loaded() {
        if let Some(s) = m.service.as_ref() {
            s.cancel_all();
        }
    }
    match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
        Ok(r) => r.map_err(ServeError::Io),
        Err(_) => Ok(()),
    }
}

/// A line for the operator, on stderr (the server's only log).
pub(crate) fn log(line: &str) {
    eprintln!("{line}");
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
