//! Arguments shared by the commands: the model and engine flags, sampling, generation.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use llama_runtime::{
    random_seed, Backend, Context, Engine, Grammar, KvType, Passes, Precision, SamplerConfig,
    SessionOptions, Speculation,
};

#[derive(Args)]
pub struct ModelArgs {
    /// An HF model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl std::ops::Deref for ModelArgs {
    type Target = EngineArgs;

    fn deref(&self) -> &EngineArgs {
        &self.engine
    }
}

/// How a model runs: every model flag but the model itself.
#[derive(Args, Clone)]
pub struct EngineArgs {
    #[arg(long, value_enum, default_value = "flex")]
    pub backend: BackendArg,
    /// With --backend wgpu: the adapter's index in `llama devices` (default: the best).
    #[arg(long)]
    pub device: Option<usize>,
    /// Worker threads of the CPU backends (default: the physical cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..1025))]
    pub threads: Option<u32>,
    /// Graph passes: `default`, `none`, or a comma-separated list of pass names.
    #[arg(long, default_value = "default", value_parser = passes)]
    pub passes: Passes,
    /// How matmul weights are stored. `native`: GGUF block weights (Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) stay as stored (memory-mapped on CPU backends,
    /// copied as blocks to the GPU with wgpu) and our block kernels multiply them; other
    /// weights run in f32. `q8_0`: as native, and on CPU backends f32 weights are
    /// quantized to Q8_0 too. `f32`: every weight widened to f32 (the exact path, for
    /// fidelity work). The ndarray reference uses f32.
    #[arg(long, value_enum, default_value = "native")]
    pub precision: PrecisionArg,
    /// How the KV cache is kept: `f16` halves its memory and what decode attention
    /// reads (default), `f32` keeps keys and values exactly (the default with
    /// --precision f32). GPUs without f16 and the ndarray reference keep f32.
    /// `q8_0` and `q4_0` (flex only) store each position's keys and values in blocks
    /// of 32 with an f16 scale, as llama.cpp's `-ctk`/`-ctv` do: 53% and 28% of f16;
    /// sliding-window layers keep f32.
    #[arg(long, value_enum)]
    pub cache_type: Option<CacheTypeArg>,
    /// Check every weight for NaN and infinity while loading, and refuse the model
    /// naming the first tensor that holds one.
    #[arg(long)]
    pub check_tensors: bool,
    /// The chat template: a built-in one (`chatml`, `gemma`, `llama3`, `phi3`) or a
    /// Jinja file (default: the model's own, else the built-in one of its
    /// architecture).
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
}

impl EngineArgs {
    /// The engine options these flags ask for, with sessions of `context` positions.
    pub fn options(&self, context: Context) -> SessionOptions {
        SessionOptions {
            backend: match self.backend {
                BackendArg::Ndarray => Backend::Ndarray,
                BackendArg::Flex => Backend::Flex,
                BackendArg::Wgpu => Backend::Wgpu,
            },
            device: self.device,
            threads: self.threads.map(|t| t as usize),
            precision: match self.precision {
                PrecisionArg::Native => Precision::Native,
                PrecisionArg::Q8_0 => Precision::Q8_0,
                PrecisionArg::F32 => Precision::F32,
            },
            cache_type: self.cache_type.map(|c| match c {
                CacheTypeArg::F16 => KvType::F16,
                CacheTypeArg::F32 => KvType::F32,
                CacheTypeArg::Q8_0 => KvType::Q8_0,
                CacheTypeArg::Q4_0 => KvType::Q4_0,
            }),
            passes: self.passes.clone(),
            context,
            check_tensors: self.check_tensors,
        }
    }
}

fn passes(s: &str) -> Result<Passes, String> {
    s.parse()
        .map_err(|e: llama_runtime::RuntimeError| e.to_string())
}

/// Where the graph runs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendArg {
    /// burn-ndarray (CPU, pure burn: the portable reference).
    Ndarray,
    /// burn-flex (CPU, fast: our host kernels).
    Flex,
    /// burn-wgpu: Vulkan, Metal or DX12 through wgpu (a GPU, or lavapipe on the CPU).
    Wgpu,
}

/// How CPU backends store matmul weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Native,
    #[value(name = "q8_0")]
    Q8_0,
    F32,
}

/// How CPU backends store the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheTypeArg {
    F16,
    F32,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

pub const SAMPLING_HELP: &str = "Sampling runs in this order: logit bias; repetition, frequency and presence \
penalties over the last --repeat-last-n tokens; then temperature 0 takes the argmax; otherwise top-k, \
top-p, min-p, temperature, and a draw seeded by --seed.";

/// Sampling flags. Unset ones take the command's defaults: `generate` is greedy,
/// `chat` samples as llama.cpp does ([`SamplerConfig::chat`]).
#[derive(Args)]
#[command(next_help_heading = "Sampling")]
pub struct SamplingArgs {
    /// 0 picks the most likely token at every step (greedy; `generate`'s default);
    /// `chat` defaults to 0.8.
    #[arg(long, value_parser = non_negative)]
    temperature: Option<f32>,
    /// Keep only the k most likely tokens; 0 keeps them all (off, as in llama.cpp).
    /// `chat` defaults to 40.
    #[arg(long, allow_negative_numbers = true, value_parser = token_count)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p, in (0, 1]. `chat`
    /// defaults to 0.95.
    #[arg(long, value_parser = unit_open)]
    top_p: Option<f32>,
    /// Drop tokens less likely than min-p times the most likely one, in [0, 1]. `chat`
    /// defaults to 0.05.
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
    /// The flags over `defaults` (greedy, or [`SamplerConfig::chat`]).
    pub fn config(&self, defaults: SamplerConfig) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            // `--top-k 0` turns top-k off.
            top_k: self.top_k.map_or(defaults.top_k, |k| (k > 0).then_some(k)),
            top_p: self.top_p.or(defaults.top_p),
            min_p: self.min_p.or(defaults.min_p),
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed.unwrap_or_else(random_seed),
        }
    }
}

fn parse_f32(s: &str) -> Result<f32, String> {
    s.parse::<f32>()
        .map_err(|_| format!("`{s}` is not a number"))
}

fn non_negative(s: &str) -> Result<f32, String> {
    let v = parse_f32(s)?;
    (v.is_finite() && v >= 0.0)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be 0 or more"))
}

fn token_count(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| format!("{s} is not a count of tokens (0 turns top-k off)"))
}

fn positive(s: &str) -> Result<f32, String> {
    let v = parse_f32(s)?;
    (v.is_finite() && v > 0.0)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be more than 0"))
}

fn finite(s: &str) -> Result<f32, String> {
    let v = parse_f32(s)?;
    v.is_finite()
        .then_some(v)
        .ok_or_else(|| format!("{s} must be a finite number"))
}

fn unit_open(s: &str) -> Result<f32, String> {
    let v = parse_f32(s)?;
    (v > 0.0 && v <= 1.0)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be in (0, 1]"))
}

fn unit_closed(s: &str) -> Result<f32, String> {
    let v = parse_f32(s)?;
    (0.0..=1.0)
        .contains(&v)
        .then_some(v)
        .ok_or_else(|| format!("{s} must be in [0, 1]"))
}

fn logit_bias(s: &str) -> Result<(u32, f32), String> {
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

/// Flags of the commands that generate.
#[derive(Args)]
pub struct RunArgs {
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: usize,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    pub ctx_size: Option<usize>,
    /// End generation before this string, which is never printed (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// When the context fills, drop the oldest tokens after the first --keep and go on
    /// (instead of refusing a request that does not fit).
    #[arg(long)]
    pub context_shift: bool,
    /// Tokens at the start that a context shift keeps.
    #[arg(long, default_value_t = 0, requires = "context_shift")]
    pub keep: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub speculation: SpeculationArgs,
}

/// Speculative decoding: draft tokens verified several at a step. The output is the
/// same as without (token for token under greedy; the same distribution, and with a
/// fixed seed the same tokens, under sampling).
#[derive(Args, Clone, Default)]
#[command(next_help_heading = "Speculative decoding")]
pub struct SpeculationArgs {
    /// Prompt-lookup decoding: draft the tokens that followed the last earlier match of
    /// the context's last few tokens (for edits, quotes, repeated keys). The draft
    /// length adapts, and drafting pauses while drafts are not accepted.
    #[arg(long)]
    pub lookup: bool,
    /// A small model with the same tokenizer that drafts tokens for this one (loaded
    /// with the same backend and flags).
    #[arg(long, value_name = "FILE")]
    pub draft_model: Option<PathBuf>,
    /// The most tokens drafted for one step.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub draft_max: u32,
}

impl SpeculationArgs {
    /// The speculation these flags ask for (`None`: none).
    pub fn speculation(&self) -> Option<Speculation> {
        (self.lookup || self.draft_model.is_some()).then(|| Speculation {
            draft_max: self.draft_max as usize,
            ..Speculation::default()
        })
    }

    /// The draft model, loaded like the model (`model`'s flags, its own default
    /// context: past it, it drafts nothing) and checked against it.
    pub fn load_draft(&self, model: &ModelArgs, engine: &Engine) -> anyhow::Result<Option<Engine>> {
        let Some(path) = &self.draft_model else {
            return Ok(None);
        };
        let options = model.options(Context::Default);
        let draft = Engine::load(path, &options)
            .with_context(|| format!("--draft-model {}", path.display()))?;
        engine
            .check_draft(&draft)
            .with_context(|| format!("--draft-model {}", path.display()))?;
        Ok(Some(draft))
    }
}

/// A grammar the output must stay inside (at most one of these).
#[derive(Args, Default)]
#[group(multiple = false)]
pub struct GrammarArgs {
    /// Output JSON valid under this JSON schema: a file, or the schema itself when the
    /// value starts with `{`.
    #[arg(long, value_name = "FILE|JSON")]
    pub json_schema: Option<String>,
    /// Output one JSON object (any keys).
    #[arg(long)]
    pub json_object: bool,
    /// Output text of this Lark grammar (a file; llguidance's dialect, which may embed
    /// JSON schemas with `%json { ... }`).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    /// Output text that this regex matches in full.
    #[arg(long, value_name = "REGEX")]
    pub regex: Option<String>,
}

impl GrammarArgs {
    /// The grammar asked for, read from its file.
    pub fn grammar(&self) -> anyhow::Result<Option<Grammar>> {
        if self.json_object {
            return Ok(Some(Grammar::JsonObject));
        }
        if let Some(rx) = &self.regex {
            return Ok(Some(Grammar::Regex(rx.clone())));
        }
        if let Some(path) = &self.grammar {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--grammar {}", path.display()))?;
            return Ok(Some(Grammar::Lark(text)));
        }
        let Some(arg) = &self.json_schema else {
            return Ok(None);
        };
        let (text, from) = if arg.trim_start().starts_with('{') {
            (arg.clone(), "the schema given".to_string())
        } else {
            let text =
                std::fs::read_to_string(arg).with_context(|| format!("--json-schema {arg}"))?;
            (text, arg.clone())
        };
        let schema: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--json-schema: {from} is not JSON"))?;
        Ok(Some(Grammar::JsonSchema(schema)))
    }
}
