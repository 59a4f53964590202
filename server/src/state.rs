//! What every handler shares: the configuration, the loaded model and its service,
//! and the metrics.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use llama_runtime::{
    BatchOptions, ChatTemplate, Engine, Result as RtResult, RuntimeError, Service, ServiceOptions,
    Tokenizer,
};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model's name in requests and answers.
    pub alias: String,
    /// With a key, every route but `/health` wants `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Sequences that run at once; each may use the whole context.
    pub parallel: usize,
    /// Requests that may wait for a place before new ones get 503.
    pub max_queue: usize,
    /// The largest request body, in bytes.
    pub body_limit: usize,
    /// How long requests in flight may run on after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Serve the chat page at `/`.
    pub webui: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            alias: "model".into(),
            api_key: None,
            parallel: 4,
            max_queue: 256,
            body_limit: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
            webui: true,
        }
    }
}

/// The model, once loaded.
pub struct Loaded {
    pub service: Service,
    pub tokenizer: Tokenizer,
    /// The chat template, or why there is none.
    pub template: std::result::Result<ChatTemplate, String>,
    pub eos: Vec<u32>,
    /// Positions one sequence may use.
    pub context: usize,
    pub vocab: usize,
}

impl Loaded {
    /// Starts the engine's service for `config`.
    pub fn start(engine: Engine, config: &ServerConfig) -> RtResult<Loaded> {
        let tokenizer = engine.tokenizer()?;
        let template = engine.chat_template().map_err(|e| e.to_string());
        let eos = engine.eos_token_ids();
        let context = engine.context();
        let vocab = engine.model().config.vocab_size;
        if config.parallel == 0 {
            return Err(RuntimeError::Options(
                "--parallel must be at least 1".into(),
            ));
        }
        let opts = ServiceOptions {
            batch: BatchOptions {
                kv_budget: context * config.parallel,
                max_sequences: config.parallel,
                ..BatchOptions::default()
            },
            max_queue: config.max_queue,
        };
        let service = Service::start(Arc::new(engine), opts)?;
        Ok(Loaded {
            service,
            tokenizer,
            template,
            eos,
            context,
            vocab,
        })
    }
}

pub struct AppState {
    pub config: ServerConfig,
    loaded: OnceLock<Loaded>,
    pub metrics: Metrics,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Seconds since the epoch when the server started, for `created` fields.
    pub started: u64,
}

impl AppState {
    pub fn new(config: ServerConfig) -> Self {
        AppState {
            config,
            loaded: OnceLock::new(),
            metrics: Metrics::new(),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            started: now(),
        }
    }

    pub fn set_loaded(&self, loaded: Loaded) {
        let _ = self.loaded.set(loaded);
    }

    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    /// The model, or 503 while it loads or once the server stops.
    pub fn model(&self) -> Result<&Loaded, ApiError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        self.loaded.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading",
            )
        })
    }

    pub fn service(&self) -> Result<&Service, ApiError> {
        Ok(&self.model()?.service)
    }

    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// A fresh id for a response (`chatcmpl-…`, `cmpl-…`).
    pub fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06}", self.started)
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
