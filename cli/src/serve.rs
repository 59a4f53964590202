//! `llama serve`: the OpenAI-compatible server.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use llama_runtime::Engine;
use llama_serve::{Limits, ModelEntry, Models, Retention, ServerConfig};

use crate::args::{EngineArgs, SpeculationArgs};
use crate::ctx_size;

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: an HF model directory or a .gguf file, optionally named
    /// (`NAME=PATH`; default: the file's name without extension). Repeat it to serve
    /// several; each loads on first use.
    #[arg(
        long = "model",
        short = 'm',
        value_name = "[NAME=]PATH",
        required_unless_present = "models_dir"
    )]
    models: Vec<String>,
    /// A directory of models: every .gguf file (named by its stem) and every HF model
    /// directory in it (named by the directory). Models load on first use and the
    /// directory is rescanned as it changes. A `NAME.jinja` file beside a model is
    /// its chat template.
    #[arg(long, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// Models loaded at once; past it, the least recently used idle model is
    /// unloaded.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_models: Option<u64>,
    /// Bytes the loaded models may hold together (weights and KV budgets; a number
    /// with an optional K, M, G or T suffix, powers of 1024); past it, the least
    /// recently used idle models are unloaded.
    #[arg(long, value_name = "BYTES", value_parser = bytes)]
    memory_budget: Option<u64>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences generated at once (each with a whole context); more requests wait.
    #[arg(long, short = 'P', default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    parallel: u32,
    /// Context size of each sequence in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// Requests that may wait for a place; past it, requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Every route but /health wants `Authorization: Bearer KEY` (or $LLAMA_API_KEY).
    #[arg(long, env = "LLAMA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model's name in the API, with one --model (default: the file's name
    /// without extension).
    #[arg(long)]
    alias: Option<String>,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    body_limit: usize,
    /// Seconds from a request's first byte to its answer's first byte, and that a
    /// connection may sit with nothing sent either way, before it is closed.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Open connections past this many are answered 503 and closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Seconds that requests in flight may run on after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Do not serve the chat page at `/`.
    #[arg(long)]
    no_webui: bool,
    /// How /v1/embeddings pools token rows: `mean`, `last` or `cls` (default: the
    /// model's sentence-transformers config, else `mean`).
    #[arg(long, value_parser = crate::embed::pooling)]
    pooling: Option<llama_runtime::Pooling>,
    #[command(flatten)]
    speculation: SpeculationArgs,
    /// Where the server keeps its state (stored responses of /v1/responses, in a
    /// SQLite file) across restarts (default: ~/.cache/llama-rs/state, or under
    /// $LLAMA_RS_CACHE).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Days a stored response is kept.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    responses_max_age_days: u64,
    /// Stored responses kept at most; the oldest go first.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    responses_max_count: u64,
    #[command(flatten)]
    prompt_cache: PromptCacheArgs,
}

/// The prompt cache on disk.
#[derive(Args)]
pub struct PromptCacheArgs {
    /// Keep finished sequences' KV pages in this directory too (across restarts);
    /// a later prompt that starts with the same tokens loads them instead of running
    /// them. Entries are keyed by the model file's SHA-256, the cache type, the device
    /// and the compiled graph.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bytes the cache directory may hold (suffixes K, M, G, T: powers of 1024); the
    /// least recently used entries go first.
    #[arg(
        long,
        value_name = "BYTES",
        default_value = "8G",
        value_parser = bytes,
        requires = "cache_dir"
    )]
    pub cache_disk_budget: u64,
}

impl PromptCacheArgs {
    /// The disk tier's options for the model at `model`.
    pub fn options(&self, model: &std::path::Path) -> Option<llama_runtime::DiskOptions> {
        self.cache_dir
            .clone()
            .map(|dir| llama_runtime::DiskOptions {
                dir,
                budget: self.cache_disk_budget,
                model: model.to_path_buf(),
            })
    }
}

/// A byte count: digits, then optionally K, M, G or T (powers of 1024, with or
/// without a trailing `B` or `iB`).
pub fn bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 500M, 8G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?} is not a byte count (e.g. 500M, 8G)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The default state directory: `state` in the cache directory.
fn default_state_dir() -> PathBuf {
    let cache = match (std::env::var_os("LLAMA_RS_CACHE"), std::env::var_os("HOME")) {
        (Some(c), _) if !c.is_empty() => PathBuf::from(c),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".cache/llama-rs"),
        _ => std::env::temp_dir().join("llama-rs"),
    };
    cache.join("state")
}

/// The models `--model` names: `NAME=PATH` or `PATH` (named by its stem).
fn entries(args: &ServeArgs) -> Result<Vec<ModelEntry>> {
    let mut out: Vec<ModelEntry> = Vec::new();
    for m in &args.models {
        let (name, path) = match m.split_once('=') {
            Some((n, p)) if !n.is_empty() && !n.contains(['/', '\\']) => {
                (Some(n.to_string()), PathBuf::from(p))
            }
            _ => (None, PathBuf::from(m)),
        };
        let name = match name {
            Some(n) => n,
            None if args.models.len() == 1 && args.alias.is_some() => {
                args.alias.clone().unwrap_or_default()
            }
            None => path
                .file_stem()
                .or(path.file_name())
                .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        };
        if out.iter().any(|e| e.name == name) {
            anyhow::bail!("--model: two models are named `{name}`; name them with NAME=PATH");
        }
        out.push(ModelEntry {
            name,
            path,
            chat_template: args.engine.chat_template.clone(),
        });
    }
    Ok(out)
}

pub fn run_serve(args: ServeArgs) -> Result<()> {
    let entries = entries(&args)?;
    if let Some(dir) = &args.models_dir {
        if !dir.is_dir() {
            anyhow::bail!("--models-dir {}: not a directory", dir.display());
        }
    }
    if args.alias.is_some() && (entries.len() != 1 || args.models_dir.is_some()) {
        anyhow::bail!("--alias names the one --model; with several, use --model NAME=PATH");
    }
    let alias = entries.first().map_or("model".into(), |e| e.name.clone());
    let config = ServerConfig {
        alias,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        parallel: args.parallel as usize,
        max_queue: args.max_queue,
        body_limit: args.body_limit,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        timeout: Duration::from_secs(args.timeout),
        max_connections: args.max_connections as usize,
        webui: !args.no_webui,
        pooling: args.pooling,
        speculation: args.speculation.speculation(),
        draft_model: args
            .speculation
            .draft_model
            .clone()
            .map(|p| (p, args.engine.options(ctx_size(args.ctx_size)))),
        state_dir: Some(args.state_dir.clone().unwrap_or_else(default_state_dir)),
        retention: Retention {
            max_age: Duration::from_secs(args.responses_max_age_days.saturating_mul(24 * 3600)),
            max_count: args.responses_max_count as usize,
        },
        prompt_cache: args
            .prompt_cache
            .options(entries.first().map_or(Path::new(""), |e| e.path.as_path())),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let what = match (&args.models_dir, entries.as_slice()) {
        (None, [one]) => format!("loading {}", one.path.display()),
        (Some(dir), _) => format!("models from {} load on first use", dir.display()),
        _ => format!("{} models load on first use", entries.len()),
    };
    eprintln!("listening on http://{bound} ({what})");
    let options = args.engine.options(ctx_size(args.ctx_size));
    let parallel = args.parallel;
    let load = move |entry: &ModelEntry| -> llama_runtime::Result<Engine> {
        let mut engine = Engine::load(&entry.path, &options)?;
        if let Some(note) = engine.cache_note() {
            eprintln!("{note}");
        }
        if let Some(choice) = &entry.chat_template {
            engine.set_chat_template(choice)?;
        } else if let Some(note) = engine.chat_template_note() {
            eprintln!("{note}");
        }
        eprintln!(
            "model loaded: {} ({} positions per sequence, {} at once); serving",
            entry.path.display(),
            engine.context(),
            parallel
        );
        Ok(engine)
    };
    let models = Models {
        entries,
        dir: args.models_dir.clone(),
        limits: Limits {
            max_models: args.max_models.map(|m| m as usize),
            memory_budget: args.memory_budget,
        },
    };
    runtime.block_on(llama_serve::serve_models(
        listener,
        config,
        models,
        std::sync::Arc::new(load),
        llama_serve::shutdown_signal(),
    ))?;
    eprintln!("stopped");
    Ok(())
}
