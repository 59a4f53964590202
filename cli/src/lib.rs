//! The `llama` command line: argument parsing, the one backend `match`, printing.
//!
//! The binary itself is the root package's `src/main.rs`, which calls [`main`].
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llama_graph::{PassContext, Pipeline, Program, Taps};
use llama_models::Model;
use llama_runtime::{generate_greedy, ChatTemplate, Message, Session, Tokenizer};

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
    /// Print the model's compiled graph, or with --taps a summary of every node's output.
    Graph(GraphArgs),
    /// Print the ids of a text as one JSON array (special tokens in the text are parsed).
    Tokenize(TokenizeArgs),
    /// Perplexity of a text file; the last stdout line is `perplexity: <number>`.
    Perplexity(PerplexityArgs),
    /// Write an HF model directory (safetensors, config, tokenizer) from a GGUF file.
    Convert(ConvertArgs),
}

/// Where the graph runs.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// burn-ndarray (CPU, portable reference).
    Ndarray,
    /// burn-flex (CPU, fast).
    Flex,
}

impl Backend {
    /// The one place a backend is named.
    #[allow(deprecated)] // `Device::ndarray` is marked deprecated in favour of flex.
    fn device(self) -> Device {
        match self {
            Backend::Ndarray => Device::ndarray(),
            Backend::Flex => Device::flex(),
        }
    }
}

#[derive(Args)]
struct ModelArgs {
    /// An HF model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// Graph passes: `default`, `none`, or a comma-separated list of pass names.
    #[arg(long, default_value = "default")]
    passes: String,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, short = 'p')]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// 0 picks the most likely token at every step (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, requires = "chat")]
    system: Option<String>,
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

fn pipeline(spec: &str) -> Result<Pipeline> {
    Ok(match spec {
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

/// Loads the model and compiles its graph; returns the model and the program.
fn compile(args: &ModelArgs) -> Result<(Model, Program)> {
    let pipeline = pipeline(&args.passes)?;
    let device = args.backend.device();
    let model = Model::load(&args.model, &device)?;
    let mut graph = model.build_graph()?;
    pipeline.run(
        &mut graph,
        &PassContext {
            device: device.clone(),
        },
    )?;
    Ok((model, Program::new(graph, device)?))
}

fn tokenizer(model: &Model) -> Result<Tokenizer> {
    Ok(Tokenizer::for_model(model)?)
}

fn generate(args: GenerateArgs) -> Result<()> {
    if args.temperature != 0.0 {
        bail!(
            "--temperature {}: only greedy decoding (--temperature 0) is available",
            args.temperature
        );
    }
    let load_start = Instant::now();
    let (model, program) = compile(&args.model)?;
    let tokenizer = tokenizer(&model)?;
    let prompt = if args.chat {
        let template = ChatTemplate::for_model(&model)?
            .with_context(|| format!("{} has no chat template", model.path.display()))?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        // As transformers' apply_chat_template: the template writes the special tokens.
        tokenizer.encode_plain(&template.render(&messages, true)?)?
    } else {
        tokenizer.encode(&args.prompt)?
    };
    let context = context_for(&model, args.ctx_size)?;
    let mut session = Session::new(program, context)?;
    let load_time = load_start.elapsed();

    let mut stream = tokenizer.stream();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = None;
    let generation = generate_greedy(
        &mut session,
        &prompt,
        args.max_tokens,
        &model.eos_token_ids(),
        |id| {
            if failed.is_some() {
                return;
            }
            match stream.push(id) {
                Ok(text) => {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                }
                Err(e) => failed = Some(e),
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    let rest = stream.finish()?;
    writeln!(out, "{rest}")?;
    out.flush()?;

    let g = &generation;
    let rate = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
    eprintln!(
        "load {:.2} s | prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s | stop: {:?}",
        load_time.as_secs_f64(),
        g.prompt_tokens,
        rate(g.prompt_tokens, g.prefill_time),
        g.ids.len(),
        rate(g.ids.len().saturating_sub(1), g.decode_time),
        g.finish
    );
    Ok(())
}

fn graph(args: GraphArgs) -> Result<()> {
    let (model, program) = compile(&args.model)?;
    match args.prompt {
        Some(prompt) if args.taps => {
            let tokenizer = tokenizer(&model)?;
            let ids = tokenizer.encode(&prompt)?;
            let mut session = Session::new(program, ids.len())?;
            let (_, taps) = session.prefill_with_taps(&ids, &Taps::All)?;
            for (name, value) in &taps {
                println!("{}", llama_graph::summary::summarize(name, value, 4)?);
            }
        }
        _ => print!("{}", llama_graph::dump(program.graph())),
    }
    Ok(())
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

fn perplexity(args: PerplexityArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let (model, program) = compile(&args.model)?;
    let tokenizer = tokenizer(&model)?;
    // No BOS: the text is scored as it is.
    let ids = tokenizer.encode_plain(&text)?;
    let window = context_for(&model, args.ctx_size)?.min(ids.len().max(1));
    let mut session = Session::new(program, window)?;
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

fn tokenize(args: TokenizeArgs) -> Result<()> {
    // Only the vocabulary is needed: no weights are loaded.
    let tokenizer = if args.model.is_file() {
        if !llama_models::GgufFile::sniff(&args.model) {
            bail!("{}: not a GGUF file", args.model.display());
        }
        Tokenizer::from_gguf(&llama_models::GgufFile::open(&args.model)?)?
    } else {
        let path = args.model.join("tokenizer.json");
        if !path.exists() {
            bail!("{}: no tokenizer.json", args.model.display());
        }
        Tokenizer::from_file(&path)?
    };
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

fn convert(args: ConvertArgs) -> Result<()> {
    use llama_models::convert::Dtype;
    if !llama_models::GgufFile::sniff(&args.model) {
        bail!("{}: not a GGUF file", args.model.display());
    }
    let file = llama_models::GgufFile::open(&args.model)?;
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Graph(a) => graph(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Convert(a) => convert(a),
    }
}

/// Runs the command line; the process exit code.
pub fn main() -> ExitCode {
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
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{line}");
            return ExitCode::from(2);
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
