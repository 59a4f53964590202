//! `llama rag`: ingest files into a store, search it, answer questions from it with
//! cited sources.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Args, Subcommand};
use llama_rag::pipeline::{
    self, AnswerOptions, AnswerStyle, ChunkOptions, IngestProgress, SearchMode,
};
use llama_runtime::{Embedder, Engine, SessionOptions};

use crate::args::ModelArgs;

#[derive(Args)]
pub struct RagArgs {
    #[command(subcommand)]
    command: RagCommand,
}

#[derive(Subcommand)]
enum RagCommand {
    /// Chunk, embed and store text and Markdown files (unchanged files are skipped).
    Ingest(IngestArgs),
    /// Show the chunks that best match a query.
    Search(SearchArgs),
    /// Answer a question from the store, citing its sources as [N].
    Query(QueryArgs),
}

/// The store and the embedding model every subcommand needs.
#[derive(Args)]
pub(crate) struct StoreArgs {
    /// A SQLite file (created if missing) or a `postgres://` URL.
    #[arg(long, short = 's')]
    pub(crate) store: String,
    /// The embedding model (an HF directory such as all-MiniLM-L6-v2, or a decoder).
    #[arg(long)]
    pub(crate) embed_model: PathBuf,
    /// How the embedding model pools token rows: `mean`, `last` or `cls`.
    #[arg(long, value_parser = crate::embed::pooling)]
    pub(crate) pooling: Option<llama_runtime::Pooling>,
}

/// Worker threads of the CPU backend.
#[derive(Args)]
struct Threads {
    /// Worker threads of the CPU backend (default: the physical cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..1025))]
    threads: Option<u32>,
}

impl StoreArgs {
    /// The embedding model on the CPU with `threads` workers (the pool is
    /// process-wide: the first engine sets it).
    pub(crate) fn embedder(&self, threads: Option<u32>) -> Result<(Engine, Embedder)> {
        let options = SessionOptions {
            threads: threads.map(|t| t as usize),
            ..SessionOptions::default()
        };
        let engine = Engine::load(&self.embed_model, &options)?;
        let embedder = Embedder::new(&engine, self.pooling)?;
        Ok((engine, embedder))
    }
}

#[derive(Args)]
struct IngestArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    threads: Threads,
    /// Files, or directories whose .md, .markdown and .txt files are read.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Tokens of the embedding model per chunk, at most.
    #[arg(long, default_value_t = 200)]
    chunk_tokens: usize,
    /// Tokens that consecutive chunks share.
    #[arg(long, default_value_t = 40)]
    overlap: usize,
}

#[derive(Args)]
struct SearchArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    threads: Threads,
    query: String,
    /// Chunks to show.
    #[arg(long, short = 'k', default_value_t = 5)]
    k: usize,
    /// `hybrid` (vector and BM25 keyword ranks fused), `vector` or `keyword`.
    #[arg(long, default_value = "hybrid", value_parser = mode)]
    mode: SearchMode,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct QueryArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The chat model that writes the answer.
    #[command(flatten)]
    model: ModelArgs,
    question: String,
    /// Chunks retrieved.
    #[arg(long, short = 'k', default_value_t = 5)]
    k: usize,
    /// Tokens of the chat model that the sources may take in the prompt.
    #[arg(long, default_value_t = 1500)]
    source_budget: usize,
    /// Most tokens of the answer.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Do not ask the model which source it used when its answer cites none.
    #[arg(long)]
    no_cite: bool,
    /// `quote` (the default): a sentence, then citations of sources that exist
    /// (enforced by a grammar), then the best-matching sentence of the sources,
    /// quoted; `short`: the sentence and citations alone; `free`: the model's text as
    /// it comes. Where the model gives no text, a quote of the cited source stands in.
    /// On small models the quote is what carries the fact (scripts/bench/eval-rag.sh: 25/40
    /// answers hold it with SmolLM2-135M under `quote`, 2/40 under `short`).
    #[arg(long, default_value = "quote", value_parser = answer_style)]
    answer_style: AnswerStyle,
    /// Context size of the chat model (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// Print JSON for scripts: the answer, the sources, the cited numbers.
    #[arg(long)]
    json: bool,
}

fn answer_style(s: &str) -> Result<AnswerStyle, String> {
    s.parse().map_err(|e: llama_rag::RagError| e.to_string())
}

fn mode(s: &str) -> Result<SearchMode, String> {
    s.parse().map_err(|e: llama_rag::RagError| e.to_string())
}

pub fn run_rag(args: RagArgs) -> Result<()> {
    match args.command {
        RagCommand::Ingest(a) => ingest(a),
        RagCommand::Search(a) => search(a),
        RagCommand::Query(a) => query(a),
    }
}

fn ingest(a: IngestArgs) -> Result<()> {
    // Files are found and checked before any model loads or anything is written.
    let files = pipeline::collect_files(&a.paths)?;
    let (_engine, embedder) = a.store.embedder(a.threads.threads)?;
    let info = pipeline::store_info(&a.store.embed_model, &embedder);
    let mut store = llama_rag::open(&a.store.store)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("embedding {bar:30} {pos}/{len} chunks, {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let started = Instant::now();
    let progress = |at: IngestProgress| {
        if let Some(bar) = &bar {
            bar.set_length(at.chunks_total as u64);
            bar.set_position(at.chunks_done as u64);
            bar.set_message(format!(
                "{}/{} files written, {}",
                at.files_done,
                at.files_total,
                rates(at.files_done, at.chunks_done, started.elapsed())
            ));
        }
    };
    let chunking = ChunkOptions {
        max_tokens: a.chunk_tokens,
        overlap: a.overlap,
    };
    let report = pipeline::ingest(
        store.as_mut(),
        &embedder,
        &info,
        &files,
        chunking,
        &progress,
    )?;
    let elapsed = started.elapsed();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let chunks: usize = report.written.iter().map(|(_, n)| n).sum();
    println!(
        "ingested {} files ({chunks} chunks); {} unchanged; {:.1} s, {}",
        report.written.len(),
        report.unchanged.len(),
        elapsed.as_secs_f64(),
        rates(report.written.len(), chunks, elapsed)
    );
    Ok(())
}

/// Files and chunks per second over `elapsed`.
fn rates(files: usize, chunks: usize, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    format!(
        "{:.2} files/s, {:.1} chunks/s",
        files as f64 / secs,
        chunks as f64 / secs
    )
}

fn search(a: SearchArgs) -> Result<()> {
    let (_engine, embedder) = a.store.embedder(a.threads.threads)?;
    let store = llama_rag::open(&a.store.store)?;
    check_store(store.as_ref(), &a.store, &embedder)?;
    let hits = pipeline::search(store.as_ref(), &embedder, &a.query, a.k, a.mode)?;
    if a.json {
        let hits: Vec<serde_json::Value> = hits
            .iter()
            .enumerate()
            .map(|(i, h)| {
                serde_json::json!({"rank": i + 1, "source": h.source, "start": h.start,
                    "end": h.end, "score": h.score, "text": h.text})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&hits)?);
    } else {
        for (i, h) in hits.iter().enumerate() {
            println!(
                "{}. {} [{}..{}] score {:.4}",
                i + 1,
                h.source,
                h.start,
                h.end,
                h.score
            );
            println!("   {}", one_line(&h.text, 160));
        }
    }
    Ok(())
}

fn query(a: QueryArgs) -> Result<()> {
    let (_embed_engine, embedder) = a.store.embedder(a.model.threads)?;
    let store = llama_rag::open(&a.store.store)?;
    check_store(store.as_ref(), &a.store, &embedder)?;
    let engine = crate::load(&a.model, crate::ctx_size(a.ctx_size), crate::ctx_size_error)?;
    let opts = AnswerOptions {
        k: a.k,
        source_budget: a.source_budget,
        max_tokens: a.max_tokens,
        cite: !a.no_cite,
        style: a.answer_style,
        ..AnswerOptions::default()
    };
    let answer = pipeline::answer(store.as_ref(), &embedder, &engine, &a.question, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    println!("{}\n", answer.answer);
    println!("Sources:");
    for s in &answer.sources {
        let mark = if answer.cited.contains(&s.n) {
            "*"
        } else {
            " "
        };
        println!(
            "{mark}[{}] {} (bytes {}..{})",
            s.n, s.source, s.start, s.end
        );
    }
    Ok(())
}

/// A store made with another embedding model is refused before any search.
pub(crate) fn check_store(
    store: &dyn llama_rag::Store,
    a: &StoreArgs,
    embedder: &Embedder,
) -> Result<()> {
    let want = pipeline::store_info(&a.embed_model, embedder);
    match store.info()? {
        None => anyhow::bail!(
            "the store {} is empty: run `llama rag ingest` first",
            a.store
        ),
        Some(have) if have.model != want.model || have.dim != want.dim => anyhow::bail!(
            "the store {} was made with {} ({} dims), not {} ({} dims)",
            a.store,
            have.model,
            have.dim,
            want.model,
            want.dim
        ),
        Some(_) => Ok(()),
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        flat.chars().take(max).collect::<String>() + "…"
    }
}
