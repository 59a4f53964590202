//! The `llama` command line: argument parsing, the one backend `match`, printing.
//!
//! The binary itself is the root package's `src/main.rs`, which calls [`main`].
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llama_graph::{PassContext, Pipeline, Program, Taps};
use llama_models::Model;
use llama_runtime::{generate_greedy, Session, Tokenizer};

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
    /// Model directory (config.json, *.safetensors, tokenizer.json).
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
    let path = model
        .tokenizer_path()
        .with_context(|| format!("{}: no tokenizer.json", model.path.display()))?;
    Ok(Tokenizer::from_file(&path)?)
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
    let prompt = tokenizer.encode(&args.prompt)?;
    let context = args
        .ctx_size
        .unwrap_or(model.config.max_position_embeddings.min(4096));
    if context > model.config.max_position_embeddings {
        bail!(
            "--ctx-size {context} exceeds the model's {} positions",
            model.config.max_position_embeddings
        );
    }
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Graph(a) => graph(a),
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
