//! The `llama` command line: argument parsing, the one backend `match`, printing.
//!
//! The binary itself is the root package's `src/main.rs`, which calls [`main`].
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llama_graph::{KvType, PassContext, Pipeline, Program, Taps};
use llama_models::{LoadOptions, Model, ModelSource};
use llama_runtime::{
    generate, ChatTemplate, GenerateOptions, Generation, Message, SamplerConfig, Session, Tokenizer,
};

#[derive(Parser)]
#[command(
    name = "llama",
    version,
    about = "Graph-compiled LLM inference on burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text after a prompt; only the generated text goes to stdout.
    Generate(GenerateArgs),
    /// Talk with the model, turn by turn, in its chat template (reads stdin).
    Chat(ChatArgs),
    /// Print the ids of a text as one JSON array (special tokens in the text are parsed).
    Tokenize(TokenizeArgs),
    /// Print the model's compiled graph, or with --taps a summary of every node's output.
    Graph(GraphArgs),
    /// Perplexity of a text file; the last stdout line is `perplexity: <number>`.
    Perplexity(PerplexityArgs),
    /// Describe a model file without loading its weights.
    Inspect(InspectArgs),
    /// Write an HF model directory (safetensors, config, tokenizer) from a GGUF file.
    Convert(ConvertArgs),
    /// Prefill and decode speed, in the manner of llama-bench.
    Bench(BenchArgs),
    /// List the GPU adapters --backend wgpu can use.
    Devices,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to prefill.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 64)]
    n_prompt: usize,
    /// Tokens to decode after the prompt.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Repetitions; the report gives median, min and max.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repetitions: u32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also time every op of one more decode run and print where the time goes.
    #[arg(long)]
    profile: bool,
}

/// Where the graph runs.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// burn-ndarray (CPU, portable reference).
    Ndarray,
    /// burn-flex (CPU, fast).
    Flex,
    /// burn-wgpu: Vulkan, Metal or DX12 through wgpu (a GPU, or lavapipe on the CPU).
    Wgpu,
}

impl Backend {
    /// The one place a backend is named: its device, checked to be usable.
    #[allow(deprecated)] // `Device::ndarray` is marked deprecated in favour of flex.
    fn device(self, index: Option<usize>) -> Result<Device> {
        let cpu_only = |name: &str| match index {
            None | Some(0) => Ok(()),
            Some(i) => Err(anyhow::anyhow!(
                "--device {i}: backend {name} has one device, 0"
            )),
        };
        match self {
            Backend::Ndarray => {
                cpu_only("ndarray")?;
                Ok(Device::ndarray())
            }
            Backend::Flex => {
                cpu_only("flex")?;
                Ok(Device::flex())
            }
            Backend::Wgpu => gpu::device(index),
        }
    }
}

/// wgpu adapters: listing, choosing, and checking that one starts.
mod gpu {
    use anyhow::{bail, Result};
    use burn::tensor::{Device, DeviceKind, DeviceType, Tensor};

    /// GPU drivers print warnings of their own (Mesa: "XDG_RUNTIME_DIR is invalid or not
    /// set") when this is unset; give them a private directory so users see none.
    fn quiet_drivers() {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            let dir = std::env::temp_dir().join(format!("llama-rs-runtime-{}", std::process::id()));
            if std::fs::create_dir_all(&dir).is_ok() {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
                }
                std::env::set_var("XDG_RUNTIME_DIR", &dir);
            }
        }
    }

    /// Runs `f`, turning a panic inside the GPU stack into `None` without printing it.
    fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let out = std::panic::catch_unwind(f).ok();
        std::panic::set_hook(hook);
        out
    }

    /// Every wgpu adapter, in a stable order.
    pub fn adapters() -> Vec<Device> {
        quiet_drivers();
        quietly(|| Device::enumerate(DeviceType::Wgpu).into_vec()).unwrap_or_default()
    }

    /// A line describing an adapter: name, type, graphics API, shader target.
    pub fn describe(device: &Device) -> String {
        // The device's Debug form is the only place burn names the adapter type and API.
        let debug = format!("{device:?}");
        let field = |key: &str| {
            debug
                .split(&format!("{key}: "))
                .nth(1)
                .and_then(|rest| rest.split([',', ' ', '}']).next())
                .unwrap_or("?")
                .to_string()
        };
        let (kind, mut api) = (field("kind"), field("backend"));
        match quietly(|| device.identity()).flatten() {
            Some(id) => {
                if api == "Auto" {
                    // The shader target says which API the runtime settled on.
                    api = match id.fingerprint.split('_').next() {
                        Some("spirv") => "Vulkan".into(),
                        Some("msl") => "Metal".into(),
                        Some("hlsl") => "DX12".into(),
                        _ => api,
                    };
                }
                format!(
                    "{} | type {kind} | api {api} | shaders {} | memory unknown",
                    id.name, id.fingerprint
                )
            }
            None => format!("type {kind} | api {api}"),
        }
    }

    /// The default adapter, or adapter `index` of [`adapters`], once it has run an op.
    pub fn device(index: Option<usize>) -> Result<Device> {
        let adapters = adapters();
        if adapters.is_empty() {
            bail!("backend wgpu: no GPU adapter found (no Vulkan, Metal or DX12 driver); use --backend flex");
        }
        let device = match index {
            None => Device::wgpu(DeviceKind::DefaultDevice),
            Some(i) => match adapters.get(i) {
                Some(d) => d.clone(),
                None => bail!(
                    "backend wgpu: there is no adapter {i} ({} found, see `llama devices`); use --backend flex",
                    adapters.len()
                ),
            },
        };
        let probe = device.clone();
        let works =
            quietly(move || Tensor::<1>::ones([4], &probe).sum().into_scalar::<f32>() == 4.0);
        if works != Some(true) {
            bail!("backend wgpu: the adapter failed to run a kernel; use --backend flex");
        }
        Ok(device)
    }
}

#[derive(Args)]
struct ModelArgs {
    /// An HF model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// With --backend wgpu: the adapter's index in `llama devices` (default: the best).
    #[arg(long)]
    device: Option<usize>,
    /// Worker threads of the CPU backends (default: the physical cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..1025))]
    threads: Option<u32>,
    /// Graph passes: `default`, `none`, or a comma-separated list of pass names.
    #[arg(long, default_value = "default")]
    passes: String,
    /// How CPU backends store matmul weights. `native`: GGUF block weights (Q8_0, Q4_0,
    /// Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) stay as stored, memory-mapped, through our block kernels; other
    /// weights run in f32. `q8_0`: as native, and f32 weights are quantized to Q8_0 too.
    /// `f32`: every weight widened to f32 (the exact path, for fidelity work). GPU
    /// backends use f32.
    #[arg(long, value_enum, default_value = "native")]
    precision: Precision,
    /// How CPU backends keep the KV cache: `f16` halves its memory and what decode
    /// attention reads (default), `f32` keeps keys and values exactly (the default with
    /// --precision f32). GPU backends keep f32.
    #[arg(long, value_enum)]
    cache_type: Option<CacheType>,
}

/// How CPU backends store the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CacheType {
    F16,
    F32,
}

/// A session of `context` positions with the KV cache `args` ask for.
fn open_session(args: &ModelArgs, program: Program, context: usize) -> Result<Session> {
    let ty = match args.cache_type {
        Some(CacheType::F32) => KvType::F32,
        Some(CacheType::F16) => KvType::F16,
        None if args.precision == Precision::F32 => KvType::F32,
        None => KvType::F16,
    };
    Ok(Session::with_cache_type(program, context, ty)?)
}

/// How CPU backends store matmul weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Precision {
    Native,
    #[value(name = "q8_0")]
    Q8_0,
    F32,
}

const SAMPLING_HELP: &str = "Sampling runs in this order: logit bias; repetition, frequency and presence \
penalties over the last --repeat-last-n tokens; then temperature 0 takes the argmax; otherwise top-k, \
top-p, min-p, temperature, and a draw seeded by --seed.";

#[derive(Args)]
#[command(next_help_heading = "Sampling")]
struct SamplingArgs {
    /// 0 picks the most likely token at every step (greedy).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps them all (off, as in llama.cpp).
    #[arg(long, allow_negative_numbers = true, value_parser = token_count)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p, in (0, 1].
    #[arg(long, value_parser = unit_open)]
    top_p: Option<f32>,
    /// Drop tokens less likely than min-p times the most likely one, in [0, 1].
    #[arg(long, value_parser = unit_closed)]
    min_p: Option<f32>,
    /// Repetition penalty (1 = off), llama.cpp's definition.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// OpenAI presence penalty: subtracted once from every token seen.
    #[arg(long, default_value_t = 0.0, value_parser = finite)]
    presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted once per occurrence.
    #[arg(long, default_value_t = 0.0, value_parser = finite)]
    frequency_penalty: f32,
    /// ID=BIAS added to a token's logit before anything else (repeatable).
    #[arg(long, value_parser = logit_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// Seed of the sampler (default: a random one, shown in the stats line).
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k.filter(|&k| k > 0),
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed.unwrap_or_else(rand_seed),
        }
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn parse_f32(s: &str) -> std::result::Result<f32, String> {
    s.parse::<f32>()
        .map_err(|_| format!("`{s}` is not a number"))
}

fn non_negative(s: &str) -> std::result::Result<f32, String> {
    let v = parse_f32(s)?;
    (v.is_finite() && v >= 0.0)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be 0 or more"))
}

fn token_count(s: &str) -> std::result::Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| format!("{s} is not a count of tokens (0 turns top-k off)"))
}

fn positive(s: &str) -> std::result::Result<f32, String> {
    let v = parse_f32(s)?;
    (v.is_finite() && v > 0.0)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be more than 0"))
}

fn finite(s: &str) -> std::result::Result<f32, String> {
    let v = parse_f32(s)?;
    v.is_finite()
        .then_some(v)
        .ok_or_else(|| format!("{s} must be a finite number"))
}

fn unit_open(s: &str) -> std::result::Result<f32, String> {
    let v = parse_f32(s)?;
    (v > 0.0 && v <= 1.0)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be in (0, 1]"))
}

fn unit_closed(s: &str) -> std::result::Result<f32, String> {
    let v = parse_f32(s)?;
    (0.0..=1.0)
        .contains(&v)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be in [0, 1]"))
}

fn logit_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not ID=BIAS"))?;
    let id = id
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("`{id}` in `{s}` is not a token id"))?;
    let bias = bias.trim();
    let bias = match bias {
        "-inf" | "-infinity" => f32::NEG_INFINITY,
        _ => finite(bias)?,
    };
    Ok((id, bias))
}

#[derive(Args)]
struct RunArgs {
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// End generation before this string, which is never printed (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// When the context fills, drop the oldest tokens after the first --keep and go on
    /// (instead of refusing a request that does not fit).
    #[arg(long)]
    context_shift: bool,
    /// Tokens at the start that a context shift keeps.
    #[arg(long, default_value_t = 0, requires = "context_shift")]
    keep: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
#[command(after_help = SAMPLING_HELP)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, short = 'p')]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Print one JSON object (text, ids, finish reason, timings) instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
#[command(after_help = SAMPLING_HELP)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct TokenizeArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    #[arg(long, short = 't')]
    text: String,
    /// Also print the token strings, as a second JSON array.
    #[arg(long)]
    tokens: bool,
}

#[derive(Args)]
struct GraphArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Run this prompt and print a summary of every node's output.
    #[arg(long, requires = "taps")]
    prompt: Option<String>,
    /// With --prompt: summaries of node outputs instead of the graph.
    #[arg(long, requires = "prompt")]
    taps: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score (UTF-8).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Window size in tokens (default: the model's context, at most 4096). A text that
    /// fits is scored in one window; a longer one in windows of this size, each scoring
    /// its second half.
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
}

#[derive(Args)]
struct InspectArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long, short = 'm')]
    model: PathBuf,
}

/// Element type of converted weights.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConvertDtype {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
struct ConvertArgs {
    /// The .gguf file to convert.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Output directory (created; existing files in it are replaced).
    #[arg(long, short = 'o')]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ConvertDtype,
}

fn pipeline(spec: &str, backend: Backend, precision: Precision) -> Result<Pipeline> {
    Ok(match spec {
        "default" if !matches!(backend, Backend::Wgpu) => {
            Pipeline::standard_cpu(precision == Precision::Q8_0)
        }
        "default" => Pipeline::standard(),
        "none" => Pipeline::none(),
        list => Pipeline::from_passes(
            list.split(',')
                .map(|name| {
                    Pipeline::by_name(name.trim()).with_context(|| {
                        format!(
                            "unknown pass `{name}` (passes: default, none, {})",
                            Pipeline::NAMES.join(", ")
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    })
}

/// Loads the model (with a progress bar on a terminal) and compiles its graph for the
/// number of positions `positions` picks for it (the RoPE tables hold that many rows).
fn compile(
    args: &ModelArgs,
    positions: impl FnOnce(&Model) -> Result<usize>,
) -> Result<(Model, Program, usize)> {
    let pipeline = pipeline(&args.passes, args.backend, args.precision)?;
    let threads = args
        .threads
        .map_or_else(num_cpus::get_physical, |t| t as usize);
    // flex's matmuls and reductions run on rayon's global pool.
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    let device = args.backend.device(args.device)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading {msg} {bar:30} {pos}/{len} tensors")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(
            args.model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        bar
    });
    let progress = |done: usize, total: usize| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    let options = LoadOptions {
        keep_blocks: args.precision != Precision::F32 && !matches!(args.backend, Backend::Wgpu),
        progress: Some(&progress),
    };
    let model = Model::load_with(&args.model, &device, &options);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let model = model?;
    let positions = positions(&model)?;
    let mut graph = model.build_graph_for(positions)?;
    pipeline.run(
        &mut graph,
        &PassContext {
            device: device.clone(),
        },
    )?;
    Ok((model, Program::new(graph, device)?, positions))
}

fn tokenizer(model: &Model) -> Result<Tokenizer> {
    Ok(Tokenizer::for_model(model)?)
}

fn context_for(model: &Model, requested: Option<usize>) -> Result<usize> {
    let max = model.config.max_position_embeddings;
    match requested {
        Some(0) => bail!("--ctx-size must be positive"),
        Some(n) if n > max => bail!("--ctx-size {n} exceeds the model's {max} positions"),
        Some(n) => Ok(n),
        None => Ok(max.min(4096)),
    }
}

fn options(model: &Model, run: &RunArgs) -> GenerateOptions {
    GenerateOptions {
        max_tokens: run.max_tokens,
        sampler: run.sampling.config(),
        eos: model.eos_token_ids(),
        stop: run.stop.clone(),
        context_shift: run.context_shift.then_some(run.keep),
        cancel: None,
    }
}

fn stats_line(g: &Generation, seed: u64, sampled: bool) -> String {
    let seed = if sampled {
        format!(" | seed {seed}")
    } else {
        String::new()
    };
    format!(
        "prompt {} tokens | ttft {:.0} ms | prefill {:.1} tok/s | generated {} tokens, decode {:.1} tok/s | stop: {:?}{seed}",
        g.prompt_tokens,
        g.ttft.as_secs_f64() * 1e3,
        g.prefill_tok_s(),
        g.ids.len(),
        g.decode_tok_s(),
        g.finish
    )
}

fn chat_template(model: &Model) -> Result<ChatTemplate> {
    ChatTemplate::for_model(model)?
        .with_context(|| format!("{} has no chat template", model.path.display()))
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let (model, program, context) = compile(&args.model, |m| context_for(m, args.run.ctx_size))?;
    let tokenizer = tokenizer(&model)?;
    let opts = options(&model, &args.run);
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        // As transformers' apply_chat_template: the template writes the special tokens.
        tokenizer.encode_plain(&chat_template(&model)?.render(&messages, true)?)?
    } else {
        tokenizer.encode(&args.prompt)?
    };
    let mut session = open_session(&args.model, program, context)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let json = args.json;
    let g = generate(&mut session, &tokenizer, &prompt, &opts, |piece| {
        if !json {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if json {
        let object = serde_json::json!({
            "text": g.text,
            "ids": g.ids,
            "finish_reason": g.finish,
            "prompt_tokens": g.prompt_tokens,
            "timings": {
                "ttft_ms": g.ttft.as_secs_f64() * 1e3,
                "prefill_tok_s": g.prefill_tok_s(),
                "decode_tok_s": g.decode_tok_s(),
            },
            "seed": opts.sampler.seed,
        });
        writeln!(out, "{object}")?;
    } else {
        writeln!(out)?;
        out.flush()?;
        eprintln!(
            "{}",
            stats_line(&g, opts.sampler.seed, opts.sampler.temperature > 0.0)
        );
    }
    Ok(())
}

/// The interactive loop: one user line a turn; the cache keeps the conversation, so only
/// the new turn is prefilled.
fn run_chat(args: ChatArgs) -> Result<()> {
    let (model, program, context) = compile(&args.model, |m| context_for(m, args.run.ctx_size))?;
    let tokenizer = tokenizer(&model)?;
    let template = chat_template(&model)?;
    let mut opts = options(&model, &args.run);
    let mut session = open_session(&args.model, program, context)?;
    let interactive = std::io::stdin().is_terminal();
    let cancel = Arc::new(AtomicBool::new(false));
    opts.cancel = Some(cancel.clone());
    let start_messages: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut messages = start_messages.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = start_messages.clone();
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", text));
        let ids = tokenizer.encode_plain(&template.render(&messages, true)?)?;
        let new = session.sync_prefix(&ids)?;
        cancel.store(false, Ordering::Relaxed);
        let mut out = std::io::stdout().lock();
        let g = generate(&mut session, &tokenizer, &new, &opts, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        out.flush()?;
        eprintln!(
            "{}",
            stats_line(&g, opts.sampler.seed, opts.sampler.temperature > 0.0)
        );
        messages.push(Message::new("assistant", &g.text));
    }
    Ok(())
}

fn run_graph(args: GraphArgs) -> Result<()> {
    // The graph as the model declares it: RoPE tables for its whole context.
    let (model, program, _) = compile(&args.model, |m| Ok(m.config.max_position_embeddings))?;
    match args.prompt {
        Some(prompt) if args.taps => {
            let tokenizer = tokenizer(&model)?;
            let ids = tokenizer.encode(&prompt)?;
            let mut session = open_session(&args.model, program, ids.len().max(1))?;
            let (_, taps) = session.prefill_with_taps(&ids, &Taps::All)?;
            for (name, value) in &taps {
                println!("{}", llama_graph::summary::summarize(name, value, 4)?);
            }
        }
        _ => print!("{}", llama_graph::dump(program.graph())),
    }
    Ok(())
}

fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let (model, program, context) = compile(&args.model, |m| context_for(m, args.ctx_size))?;
    let tokenizer = tokenizer(&model)?;
    // No BOS: the text is scored as it is.
    let ids = tokenizer.encode_plain(&text)?;
    let window = context.min(ids.len().max(1));
    let mut session = open_session(&args.model, program, window)?;
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let result = llama_runtime::perplexity(&mut session, &ids, window, |done, total| {
        if tty {
            eprint!("\rwindow {done}/{total}");
        }
    })?;
    if tty {
        eprint!("\r");
    }
    eprintln!(
        "{} tokens, {} scored in {} window(s) of {} in {:.1} s",
        ids.len(),
        result.scored,
        result.windows,
        window,
        start.elapsed().as_secs_f64()
    );
    println!("mean nll: {:.6}", result.mean_nll);
    println!("perplexity: {:.6}", result.perplexity);
    Ok(())
}

fn run_tokenize(args: TokenizeArgs) -> Result<()> {
    // Only the vocabulary is needed: no weights are loaded.
    let tokenizer = Tokenizer::for_source(&ModelSource::open(&args.model)?)?;
    let ids = tokenizer.encode(&args.text)?;
    println!("{}", serde_json::to_string(&ids)?);
    if args.tokens {
        let tokens: Vec<String> = ids
            .iter()
            .map(|&id| tokenizer.token(id).unwrap_or_default())
            .collect();
        println!("{}", serde_json::to_string(&tokens)?);
    }
    Ok(())
}

fn human_bytes(n: usize) -> String {
    let n = n as f64;
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.2} GiB", n / (1024.0 * 1024.0 * 1024.0)),
        n if n >= 1024.0 * 1024.0 => format!("{:.1} MiB", n / (1024.0 * 1024.0)),
        n => format!("{:.1} KiB", n / 1024.0),
    }
}

fn run_inspect(args: InspectArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    let inv = source.inventory()?;
    let c = &inv.config;
    let format = match &source {
        ModelSource::Gguf(f) => format!("GGUF v{}", f.version),
        ModelSource::HfDir(_) => "HF directory".to_string(),
    };
    println!("model: {} ({format})", args.model.display());
    println!("architecture: {}", inv.arch);
    println!(
        "layers: {} | d_model: {} | heads: {} (kv {}) | head_dim: {} | ffn: {} | vocab: {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.n_kv_heads(),
        c.head_dim(),
        c.intermediate_size,
        c.vocab_size
    );
    let rope = c.rope();
    println!(
        "context length: {} | rope theta: {} | rope scaling: {} | norm eps: {:e} | tied embeddings: {}",
        c.max_position_embeddings,
        rope.rope_theta.unwrap_or(10_000.0),
        rope.rope_type.as_deref().unwrap_or("none"),
        c.rms_norm_eps,
        c.tie_word_embeddings
    );
    if let Some(w) = c
        .sliding_window
        .filter(|_| (0..c.num_hidden_layers).any(|l| c.sliding_window_of(l).is_some()))
    {
        println!("sliding window: {w}");
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, usize)> =
        std::collections::BTreeMap::new();
    let (mut params, mut bytes) = (0usize, 0usize);
    for t in &inv.tensors {
        let e = by_type.entry(&t.dtype).or_default();
        e.0 += 1;
        e.1 += t.bytes;
        params += t.shape.iter().product::<usize>();
        bytes += t.bytes;
    }
    let types: Vec<String> = by_type
        .iter()
        .map(|(ty, (n, b))| format!("{ty}: {n} ({})", human_bytes(*b)))
        .collect();
    println!("tensors: {} | {}", inv.tensors.len(), types.join(", "));
    println!(
        "parameters: {:.1}M | tensor bytes: {}",
        params as f64 / 1e6,
        human_bytes(bytes)
    );
    let tokenizer = Tokenizer::for_source(&source).ok();
    let name = |id: Option<u32>| match (id, &tokenizer) {
        (Some(id), Some(t)) => format!("{id} {:?}", t.token(id).unwrap_or_default()),
        (Some(id), None) => id.to_string(),
        (None, _) => "none".into(),
    };
    let eos: Vec<String> = match &source {
        ModelSource::Gguf(f) => ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| {
                f.get(&format!("tokenizer.ggml.{k}_token_id"))
                    .and_then(|v| v.as_u64())
            })
            .map(|id| name(Some(id as u32)))
            .collect(),
        ModelSource::HfDir(_) => c
            .eos_token_ids()
            .into_iter()
            .map(|id| name(Some(id)))
            .collect(),
    };
    println!(
        "special tokens: bos {} | eos {}",
        name(c.bos_token_id),
        eos.join(", ")
    );
    match ChatTemplate::for_source(&source)? {
        Some(t) => println!("chat template: {}", t.source),
        None => println!("chat template: none"),
    }
    Ok(())
}

fn run_convert(args: ConvertArgs) -> Result<()> {
    use llama_models::convert::Dtype;
    let ModelSource::Gguf(file) = ModelSource::open(&args.model)? else {
        bail!("{}: not a GGUF file", args.model.display());
    };
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let dtype = match args.dtype {
        ConvertDtype::F32 => Dtype::F32,
        ConvertDtype::Bf16 => Dtype::BF16,
        ConvertDtype::F16 => Dtype::F16,
    };
    let written =
        llama_models::convert::gguf_to_hf(&file, &args.out, dtype, &tokenizer.to_json()?)?;
    eprintln!("wrote {} tensors to {}", written, args.out.display());
    Ok(())
}

fn run_devices() -> Result<()> {
    let adapters = gpu::adapters();
    if adapters.is_empty() {
        bail!("backend wgpu: no GPU adapter found (no Vulkan, Metal or DX12 driver); use --backend flex");
    }
    for (i, d) in adapters.iter().enumerate() {
        println!("{i}: {}", gpu::describe(d));
    }
    Ok(())
}

/// The peak resident set of this process, from /proc (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = if values.len() % 2 == 1 {
        values[values.len() / 2]
    } else {
        (values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0
    };
    (median, values[0], values[values.len() - 1])
}

fn run_bench(args: BenchArgs) -> Result<()> {
    if args.n_prompt == 0 {
        bail!("-p must be at least 1");
    }
    let (model, program, context) = compile(&args.model, |m| {
        let context = args.n_prompt + args.n_gen;
        if context > m.config.max_position_embeddings {
            bail!(
                "-p {} plus -n {} exceed the model's {} positions",
                args.n_prompt,
                args.n_gen,
                m.config.max_position_embeddings
            );
        }
        Ok(context)
    })?;
    let vocab = model.config.vocab_size as u64;
    // A fixed, varied prompt: speed does not depend on which ids.
    let prompt: Vec<u32> = (0..args.n_prompt as u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab) as u32)
        .collect();
    let mut session = open_session(&args.model, program, context)?;
    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    // One untimed warm-up run (kernel compilation on GPUs, page faults on CPUs).
    for rep in 0..=args.repetitions {
        session.reset();
        let start = Instant::now();
        let logits = session.prefill_last(&prompt)?;
        let mut next = llama_runtime::argmax(&logits);
        let first = start.elapsed();
        let start = Instant::now();
        for _ in 0..args.n_gen {
            next = llama_runtime::argmax(&session.decode(next)?);
        }
        let gen = start.elapsed();
        if rep > 0 {
            prefill.push(args.n_prompt as f64 / first.as_secs_f64());
            ttft.push(first.as_secs_f64() * 1e3);
            if args.n_gen > 0 {
                decode.push(args.n_gen as f64 / gen.as_secs_f64());
            }
        }
    }
    let (p, d, t) = (
        stats(&mut prefill),
        stats(&mut decode.clone()),
        stats(&mut ttft),
    );
    let d = if decode.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        d
    };
    let rss = peak_rss_bytes();
    // Where the time goes: one more prefill and decode run with every op timed.
    let profile = if args.profile {
        session.reset();
        session.program().start_profile();
        let start = Instant::now();
        let mut next = llama_runtime::argmax(&session.prefill_last(&prompt)?);
        let prefill = (session.program().take_profile(), start.elapsed());
        session.program().start_profile();
        let start = Instant::now();
        for _ in 0..args.n_gen {
            next = llama_runtime::argmax(&session.decode(next)?);
        }
        let decode = (session.program().take_profile(), start.elapsed());
        Some([
            ("prefill", prefill.0, prefill.1, args.n_prompt),
            ("decode", decode.0, decode.1, args.n_gen),
        ])
    } else {
        None
    };
    let backend = format!("{:?}", args.model.backend).to_lowercase();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model.model.display().to_string(),
                "backend": backend,
                "n_prompt": args.n_prompt,
                "n_gen": args.n_gen,
                "repetitions": args.repetitions,
                "prefill_tok_s": p.0, "prefill_tok_s_min": p.1, "prefill_tok_s_max": p.2,
                "decode_tok_s": d.0, "decode_tok_s_min": d.1, "decode_tok_s_max": d.2,
                "ttft_ms": t.0,
                "peak_rss_bytes": rss,
                "profile": profile.as_ref().map(|phases| {
                    phases
                        .iter()
                        .filter(|(_, _, _, tokens)| *tokens > 0)
                        .map(|(name, p, total, tokens)| (name.to_string(), profile_json(p, *total, *tokens)))
                        .collect::<serde_json::Map<_, _>>()
                }),
            })
        );
    } else {
        println!("| model | backend | test | tok/s (median) | min | max |");
        println!("|---|---|---|---|---|---|");
        let name = args
            .model
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!(
            "| {name} | {backend} | pp{} | {:.1} | {:.1} | {:.1} |",
            args.n_prompt, p.0, p.1, p.2
        );
        if args.n_gen > 0 {
            println!(
                "| {name} | {backend} | tg{} | {:.1} | {:.1} | {:.1} |",
                args.n_gen, d.0, d.1, d.2
            );
        }
        println!(
            "time to first token {:.1} ms (median); peak RSS {}",
            t.0,
            rss.map_or("unknown".into(), |b| human_bytes(b as usize))
        );
        for (name, p, total, tokens) in profile.iter().flatten() {
            if *tokens > 0 {
                print_profile(name, p, *total, *tokens);
            }
        }
    }
    Ok(())
}

/// Op kinds by decode time per token, largest first, and the time between ops.
fn profile_rows(
    p: &llama_graph::OpProfile,
    total: std::time::Duration,
    tokens: usize,
) -> Vec<(String, f64, f64)> {
    let per_token = |d: std::time::Duration| d.as_secs_f64() * 1e3 / tokens as f64;
    let mut rows: Vec<(String, f64, f64)> = p
        .ops
        .iter()
        .map(|(k, (d, n))| (k.to_string(), per_token(*d), *n as f64 / tokens as f64))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let ops: std::time::Duration = p.ops.values().map(|(d, _)| *d).sum();
    rows.push((
        "outside ops (executor, sampling)".into(),
        per_token(total.saturating_sub(ops)),
        0.0,
    ));
    rows
}

fn print_profile(
    phase: &str,
    p: &llama_graph::OpProfile,
    total: std::time::Duration,
    tokens: usize,
) {
    let all = total.as_secs_f64() * 1e3 / tokens as f64;
    println!("{phase} profile ({tokens} tokens, {all:.3} ms per token):");
    println!("| op | ms/token | share | calls/token |");
    println!("|---|---|---|---|");
    for (op, ms, calls) in profile_rows(p, total, tokens) {
        println!("| {op} | {ms:.3} | {:.1}% | {calls:.0} |", 100.0 * ms / all);
    }
}

fn profile_json(
    p: &llama_graph::OpProfile,
    total: std::time::Duration,
    tokens: usize,
) -> serde_json::Value {
    serde_json::Value::Array(
        profile_rows(p, total, tokens)
            .into_iter()
            .map(|(op, ms, calls)| serde_json::json!({"op": op, "ms_per_token": ms, "calls_per_token": calls}))
            .collect(),
    )
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Chat(a) => run_chat(a),
        Command::Graph(a) => run_graph(a),
        Command::Tokenize(a) => run_tokenize(a),
        Command::Perplexity(a) => run_perplexity(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Convert(a) => run_convert(a),
        Command::Bench(a) => run_bench(a),
        Command::Devices => run_devices(),
    }
}

/// Runs the command line; the process exit code.
/// glibc's allocator tuned for a step that allocates and frees the same few large
/// buffers (activations of hundreds of KiB) every op:
/// - by default a buffer over 128 KiB is its own mapping (until a free raises that
///   threshold), and free heap above 128 KiB goes back to the kernel, so the next op
///   faults the same pages in again: one arena-held heap with a 32 MiB mapping
///   threshold and a 64 MiB trim threshold keeps them (prefill of 64 tokens 1.25x at
///   one thread, 1.5x at two, measured against the defaults in one run);
/// - one arena for every thread: by default each worker thread that allocates gets an
///   arena of its own, and what it frees stays there (2.5 MB more peak RSS at two
///   threads, no speed difference measured).
///
/// Peak memory is what the step touches either way; only the churn goes.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any other thread exists; a refused setting changes nothing.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

pub fn main() -> ExitCode {
    tune_allocator();
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("error: internal: {}", msg.lines().next().unwrap_or(""));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(2)
                }
                _ => {
                    let text = e.to_string();
                    eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
                    ExitCode::from(2)
                }
            };
        }
    };
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}
