//! `llama embed`: one vector per text, as JSON lines.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use llama_runtime::{Embedder, Pooling};

use crate::args::ModelArgs;

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// How token rows become one vector: `mean`, `last` or `cls` (default: the
    /// model's sentence-transformers config, else `mean`).
    #[arg(long, value_parser = pooling)]
    pub pooling: Option<Pooling>,
    /// A text to embed (repeat for several; they run as one batch).
    #[arg(long, short = 't', conflicts_with = "file")]
    pub text: Vec<String>,
    /// A file of texts, one per line (empty lines are skipped), or `-` for stdin.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Texts per batched step (default: as many as fit 8192 tokens).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: Option<u32>,
    /// Print the time each op kind took, to stderr.
    #[arg(long)]
    pub profile: bool,
    /// Positions a decoder model's sequences hold (default: the model's context, at
    /// most 4096).
    #[arg(long)]
    pub ctx_size: Option<usize>,
}

pub fn pooling(s: &str) -> Result<Pooling, String> {
    s.parse()
        .map_err(|e: llama_runtime::RuntimeError| e.to_string())
}

pub fn run_embed(args: EmbedArgs) -> Result<()> {
    let texts: Vec<String> = match &args.file {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
            };
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        }
        None => args.text.clone(),
    };
    if texts.is_empty() {
        bail!("nothing to embed: give --text or a --file with at least one non-empty line");
    }
    let engine = crate::load(
        &args.model,
        crate::ctx_size(args.ctx_size),
        crate::ctx_size_error,
    )?;
    let embedder = Embedder::new(&engine, args.pooling)?;
    // Timed from the texts, as sentence-transformers and ONNX Runtime pipelines are.
    let start = std::time::Instant::now();
    let ids = texts
        .iter()
        .map(|t| embedder.tokenize(t))
        .collect::<llama_runtime::Result<Vec<_>>>()?;
    if args.profile {
        embedder.program().start_profile();
    }
    let vectors = match args.batch_size {
        Some(n) => {
            let mut all = Vec::with_capacity(ids.len());
            for batch in ids.chunks(n as usize) {
                all.extend(embedder.embed_ids(batch)?);
            }
            all
        }
        None => embedder.embed_ids(&ids)?,
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "embedded {} texts ({} tokens) in {secs:.3} s: {:.1} texts/s",
        ids.len(),
        ids.iter().map(Vec::len).sum::<usize>(),
        ids.len() as f64 / secs.max(1e-9)
    );
    if args.profile {
        let p = embedder.program().take_profile();
        let mut ops: Vec<_> = p.ops.into_iter().collect();
        ops.sort_by_key(|(_, (time, _))| std::cmp::Reverse(*time));
        for (kind, (time, count)) in ops {
            eprintln!(
                "{kind:>20} {:>9.1} ms {count:>7} calls",
                time.as_secs_f64() * 1e3
            );
        }
    }
    let mut out = std::io::stdout().lock();
    for (index, (v, ids)) in vectors.iter().zip(&ids).enumerate() {
        let line = serde_json::json!({"index": index, "tokens": ids.len(), "embedding": v});
        writeln!(out, "{line}")?;
    }
    Ok(())
}
