//! What every handler shares: the configuration, the loaded model and its service,
//! and the metrics.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::models::{Lease, Limits, ModelEntry, Registry};
use std::time::Duration;

use axum::http::StatusCode;
use llama_runtime::{
    BatchOptions, ChatTemplate, Context, Embedder, Engine, Grammars, Pooling, Result as RtResult,
    RuntimeError, Service, ServiceOptions, SessionOptions, Speculation, Tokenizer,
};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{Retention, Store};

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
    /// How long may pass from a request's first byte to its answer's first byte (a
    /// stream's answer begins at once), and a connection may sit with nothing moving
    /// either way, before it is closed (see `conn`).
    pub timeout: Duration,
    /// Open connections past this are answered 503 and closed.
    pub max_connections: usize,
    /// Serve the chat page at `/`.
    pub webui: bool,
    /// How `/v1/embeddings` pools token rows (default: the model's own, else mean).
    pub pooling: Option<Pooling>,
    /// Speculative decoding for every request (`--lookup`, `--draft-model`).
    pub speculation: Option<Speculation>,
    /// The draft model, loaded beside the model with these options.
    pub draft_model: Option<(std::path::PathBuf, SessionOptions)>,
    /// Where stored responses (`/v1/responses`) live across restarts; in memory
    /// without one.
    pub state_dir: Option<PathBuf>,
    /// How long and how many stored responses are kept.
    pub retention: Retention,
    /// The prompt cache on disk (`--cache-dir`, `--cache-disk-budget`): finished
    /// sequences' KV pages kept across restarts, keyed by the model file named here.
    pub prompt_cache: Option<llama_runtime::DiskOptions>,
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
            timeout: Duration::from_secs(600),
            max_connections: 1024,
            webui: true,
            pooling: None,
            speculation: None,
            draft_model: None,
            state_dir: None,
            retention: Retention::default(),
            prompt_cache: None,
        }
    }
}

/// A model, once loaded.
pub struct Loaded {
    /// Its name in requests and answers.
    pub name: String,
    /// The generation service; `None` for an encoder, which only embeds.
    pub service: Option<Service>,
    pub engine: Arc<Engine>,
    /// The embedder, made on the first `/v1/embeddings` request (a decoder compiles
    /// a second, head-less graph for it), or why it cannot be made.
    pub embedder: OnceLock<std::result::Result<Arc<Embedder>, String>>,
    /// The grammar compiler, made on the first request for structured output, or why
    /// it cannot be made.
    grammars: OnceLock<std::result::Result<Grammars, String>>,
    pub tokenizer: Tokenizer,
    /// The chat template, or why there is none.
    pub template: std::result::Result<ChatTemplate, String>,
    pub eos: Vec<u32>,
    /// Positions one sequence may use.
    pub context: usize,
    /// Sequences generated at once.
    pub parallel: usize,
    pub vocab: usize,
}

impl Loaded {
    /// Starts the engine's service for `config`, as the model `name`.
    pub fn start(name: &str, engine: Engine, config: &ServerConfig) -> RtResult<Loaded> {
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
            speculation: config.speculation,
            draft: None,
            disk: config.prompt_cache.clone(),
        };
        let mut opts = opts;
        if let Some((path, options)) = &config.draft_model {
            let options = SessionOptions {
                context: Context::Default,
                ..options.clone()
            };
            let draft = Engine::load(path, &options).map_err(|e| {
                RuntimeError::Options(format!("draft model {}: {e}", path.display()))
            })?;
            opts.draft = Some(Arc::new(draft));
        }
        let engine = Arc::new(engine);
        let service = if engine.is_encoder() {
            None
        } else {
            Some(Service::start(engine.clone(), opts)?)
        };
        Ok(Loaded {
            name: name.to_string(),
            service,
            engine,
            embedder: OnceLock::new(),
            grammars: OnceLock::new(),
            tokenizer,
            template,
            eos,
            context,
            parallel: config.parallel,
            vocab,
        })
    }
}

impl Loaded {
    /// The grammar compiler for structured output (built once, on first use).
    pub fn grammars(&self) -> std::result::Result<&Grammars, String> {
        self.grammars
            .get_or_init(|| {
                self.engine
                    .grammars(&self.tokenizer)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The generation service; 400 for a model that only embeds.
    pub fn service(&self) -> Result<&Service, ApiError> {
        self.service.as_ref().ok_or_else(|| {
            ApiError::field(
                "model",
                format!(
                    "the model `{}` is an embedding model ({}): it serves /v1/embeddings only",
                    self.name,
                    self.engine.model().arch
                ),
            )
        })
    }

    /// What the model holds at most: its weights and the KV cache of its sequences
    /// (keys and values of every layer, f16, for the whole budget).
    pub fn bytes(&self) -> u64 {
        let c = &self.engine.model().config;
        let kv_width = c.num_key_value_heads.unwrap_or(c.num_attention_heads) * c.head_dim();
        let per_position = (c.num_hidden_layers * 2 * kv_width * 2) as u64;
        let positions = self
            .service
            .as_ref()
            .map_or(0, |_| (self.context * self.parallel) as u64);
        crate::models::model_bytes(&self.engine.model().path) + per_position * positions
    }
}

/// The embedder of a model, made on first use (on a blocking thread: a decoder
/// compiles its hidden-state graph).
pub async fn embedder(model: &Lease, pooling: Option<Pooling>) -> Result<Arc<Embedder>, ApiError> {
    if let Some(e) = model.embedder.get() {
        return e.clone().map_err(internal);
    }
    let model = model.clone();
    tokio::task::spawn_blocking(move || {
        model
            .embedder
            .get_or_init(|| {
                Embedder::new(&model.engine, pooling)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(internal)
    })
    .await
    .map_err(|e| internal(e.to_string()))?
}

pub struct AppState {
    pub config: ServerConfig,
    /// The models, by name.
    pub models: Arc<Registry>,
    pub metrics: Metrics,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Seconds since the epoch when the server started, for `created` fields.
    pub started: u64,
    /// Stored responses, or why the state directory could not be opened.
    store: Result<Arc<Store>, String>,
}

impl AppState {
    /// A server of no model yet: [`AppState::set_loaded`] gives it one.
    pub fn new(config: ServerConfig) -> Self {
        let models = Registry::new(
            Vec::new(),
            None,
            Limits::default(),
            config.timeout,
            Arc::new(|_: &ModelEntry| Err("no loader".to_string())),
        );
        Self::with_models(config, models)
    }

    /// A server of the models of `models`.
    pub fn with_models(config: ServerConfig, models: Arc<Registry>) -> Self {
        let store = Store::open(config.state_dir.as_deref(), config.retention)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        AppState {
            store,
            config,
            models,
            metrics: Metrics::new(),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            started: now(),
        }
    }

    /// Serves `loaded` as the one model (for servers built in process).
    pub fn set_loaded(&self, loaded: Loaded) {
        self.models.insert_ready(loaded);
    }

    /// The model a request names in its `model` field (any name reaches a single
    /// model): loaded first if need be. 503 once the server stops.
    pub async fn model(&self, value: &serde_json::Value) -> Result<Lease, ApiError> {
        self.model_named(value.get("model").and_then(|m| m.as_str()))
            .await
    }

    /// The model called `name`, as [`AppState::model`].
    pub async fn model_named(&self, name: Option<&str>) -> Result<Lease, ApiError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        self.models.get(name).await
    }

    /// The store of responses; 500 when its file could not be opened.
    pub fn store(&self) -> Result<Arc<Store>, ApiError> {
        self.store.clone().map_err(internal)
    }

    /// Why the store could not be opened, if it could not.
    pub fn store_error(&self) -> Option<&str> {
        self.store.as_ref().err().map(String::as_str)
    }

    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// A fresh id for a response (`chatcmpl-…`, `cmpl-…`).
    pub fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06}", self.started)
    }
}

fn internal(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
