//! `graph` and `perplexity`: the compiled graph, node by node, and a text's score.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Args;
use llama_graph::Taps;
use llama_runtime::Context;

use crate::args::ModelArgs;
use crate::{ctx_size, ctx_size_error, load};

#[derive(Args)]
pub struct GraphArgs {
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
pub struct PerplexityArgs {
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

pub fn run_graph(args: GraphArgs) -> Result<()> {
    // The graph as the model declares it: RoPE tables for its whole context.
    let engine = load(&args.model, Context::Model, ctx_size_error)?;
    match args.prompt {
        Some(prompt) if args.taps => {
            let ids = engine.tokenizer()?.encode(&prompt)?;
            let mut session = engine.session_with_context(ids.len().max(1))?;
            let (_, taps) = session.prefill_with_taps(&ids, &Taps::All)?;
            for (name, value) in &taps {
                println!("{}", llama_graph::summary::summarize(name, value, 4)?);
            }
        }
        _ => print!("{}", llama_graph::dump(engine.program().graph())),
    }
    Ok(())
}

pub fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let engine = load(&args.model, ctx_size(args.ctx_size), ctx_size_error)?;
    // No BOS: the text is scored as it is.
    let ids = engine.tokenizer()?.encode_plain(&text)?;
    let window = engine.context().min(ids.len().max(1));
    let mut session = engine.session_with_context(window)?;
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
