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
    /// Run the reference's input ids and compare every node's output, in graph order,
    /// with the reference's node of the same name (`scripts/fixtures/make_compare_ref.py` writes
    /// one from transformers); report the first that departs beyond --tolerance. Exits
    /// with status 1 when one does. Use `--passes none --precision f32` for the names
    /// and values of the model as declared.
    #[arg(long, value_name = "REF.json", conflicts_with = "taps")]
    compare: Option<PathBuf>,
    /// With --compare: the largest `max |ours - ref| / max |ref|` that still agrees.
    #[arg(long, default_value_t = 1e-3, requires = "compare")]
    tolerance: f32,
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
    if let Some(path) = &args.compare {
        return run_compare(&args, path);
    }
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

/// `graph --compare`: one line per compared node, then the verdict.
fn run_compare(args: &GraphArgs, path: &std::path::Path) -> Result<()> {
    use llama_runtime::compare::{compare, Reference};
    let reference = Reference::from_file(path)?;
    let n = reference.input_ids.len();
    let engine = load(&args.model, Context::Positions(n), ctx_size_error)?;
    let mut session = engine.session_with_context(n)?;
    let result = compare(&mut session, &reference, args.tolerance)?;
    for d in &result.nodes {
        let verdict = if d.agrees(result.tolerance) {
            "ok"
        } else {
            "DIVERGES"
        };
        println!(
            "{:<28} {verdict:<8} max|diff| {:.3e} ({:.2e} of max|ref|) at token {}",
            d.name, d.max_abs, d.relative, d.worst_token
        );
    }
    if !result.missing.is_empty() {
        println!(
            "not in this graph ({}): {}",
            result.missing.len(),
            result.missing.join(", ")
        );
    }
    match result.first_divergence() {
        Some(d) => {
            println!(
                "first divergence: {} (max|diff| {:.3e}, {:.2e} of max|ref|, at token {}; \
                 ours: {}; reference: {})",
                d.name, d.max_abs, d.relative, d.worst_token, d.ours, d.reference
            );
            std::process::exit(1);
        }
        None => println!(
            "no divergence: {} nodes within {:e} of the reference",
            result.nodes.len(),
            result.tolerance
        ),
    }
    Ok(())
}

pub fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let engine = load(&args.model, ctx_size(args.ctx_size), ctx_size_error)?;
    // With BOS where the model adds one, also at the start of every window, as
    // llama-perplexity scores: the numbers compare.
    let tokenizer = engine.tokenizer()?;
    let ids = tokenizer.encode(&text)?;
    let bos = tokenizer.leading_special()?;
    let window = engine.context().min(ids.len().max(1));
    let mut session = engine.session_with_context(window)?;
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let result = llama_runtime::perplexity(&mut session, &ids, window, bos, |done, total| {
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
