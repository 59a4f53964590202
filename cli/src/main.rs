//! The `llama` command line: parses arguments, calls the engine, prints.
//!
//! Every command that runs a model goes through [`llama_runtime::Engine`]: the choices
//! of passes, weight storage and KV cache per device are made there, not here.
mod agent;
mod args;
mod bench;
mod embed;
mod generate;
mod graph;
mod info;
mod rag;
mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use llama_runtime::{Context, Engine, RuntimeError};

use args::ModelArgs;

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
    Generate(generate::GenerateArgs),
    /// Talk with the model, turn by turn, in its chat template (reads stdin).
    Chat(generate::ChatArgs),
    /// Print the ids of a text as one JSON array (special tokens in the text are parsed).
    Tokenize(info::TokenizeArgs),
    /// Print the model's compiled graph, or with --taps a summary of every node's output.
    Graph(graph::GraphArgs),
    /// Embed texts: one vector per text, printed as JSON lines
    /// (`{"index", "tokens", "embedding"}`).
    Embed(embed::EmbedArgs),
    /// Retrieval-augmented answers: ingest files into a store (SQLite or PostgreSQL),
    /// search it, and answer questions citing the sources.
    Rag(rag::RagArgs),
    /// Solve a task with tools (calculator, a RAG store's search, files of a
    /// directory): the model calls them in-process until it answers.
    Agent(agent::AgentArgs),
    /// Perplexity of a text file; the last stdout line is `perplexity: <number>`.
    Perplexity(graph::PerplexityArgs),
    /// Describe a model file without loading its weights.
    Inspect(info::InspectArgs),
    /// Write an HF model directory (safetensors, config, tokenizer) from a GGUF file.
    Convert(info::ConvertArgs),
    /// Prefill and decode speed, in the manner of llama-bench.
    Bench(bench::BenchArgs),
    /// Serve the model over HTTP with OpenAI's API (chat completions, completions,
    /// models), plus /health and /metrics.
    Serve(serve::ServeArgs),
    /// List the GPU adapters --backend wgpu can use.
    Devices,
}

/// Loads and compiles the model `args` name for sessions of `context` positions, with
/// a progress bar on a terminal. `too_long(asked,
/// max)` words the error when the model holds fewer positions (or none was asked),
/// in terms of the command's own flags.
fn load(
    args: &ModelArgs,
    context: Context,
    too_long: impl Fn(usize, usize) -> String,
) -> Result<Engine> {
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
    let engine = Engine::load_with_progress(&args.model, &args.options(context), Some(&progress));
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if let Some(note) = engine.as_ref().ok().and_then(|e| e.cache_note()) {
        eprintln!("{note}");
    }
    let mut engine = match engine {
        Err(RuntimeError::ContextSize { requested, max }) => {
            anyhow::bail!("{}", too_long(requested, max))
        }
        other => other?,
    };
    if let Some(choice) = &args.chat_template {
        engine.set_chat_template(choice)?;
    }
    Ok(engine)
}

/// The context `--ctx-size` asks for.
fn ctx_size(flag: Option<usize>) -> Context {
    flag.map_or(Context::Default, Context::Positions)
}

/// The wording of a `--ctx-size` the model cannot hold.
fn ctx_size_error(requested: usize, max: usize) -> String {
    if requested == 0 {
        "--ctx-size must be positive".into()
    } else {
        format!("--ctx-size {requested} exceeds the model's {max} positions")
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run_generate(a),
        Command::Chat(a) => generate::run_chat(a),
        Command::Graph(a) => graph::run_graph(a),
        Command::Tokenize(a) => info::run_tokenize(a),
        Command::Embed(a) => embed::run_embed(a),
        Command::Rag(a) => rag::run_rag(a),
        Command::Agent(a) => agent::run_agent(a),
        Command::Perplexity(a) => graph::run_perplexity(a),
        Command::Inspect(a) => info::run_inspect(a),
        Command::Convert(a) => info::run_convert(a),
        Command::Bench(a) => bench::run_bench(a),
        Command::Serve(a) => serve::run_serve(a),
        Command::Devices => info::run_devices(),
    }
}

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

fn main() -> ExitCode {
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
