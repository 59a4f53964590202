//! `llama agent`: a task solved by the model with tools (calculator, the RAG store's
//! search, files of one directory), in-process, under a round limit and a token
//! budget; `--trace` prints every step.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use llama_agent::{Agent, Calculator, EngineModel, FileReader, Graph, Limits, Search, Toolbox};
use llama_runtime::SamplerConfig;

use crate::args::{ModelArgs, SamplingArgs};
use crate::rag::StoreArgs;

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to do.
    task: String,
    /// Tools the model may call, comma-separated: `calc`, `search` (needs --store and
    /// --embed-model), `files` (needs --files).
    #[arg(long, value_delimiter = ',', default_value = "calc")]
    tools: Vec<String>,
    /// The RAG store the `search` tool reads (a SQLite file or a `postgres://` URL).
    #[arg(long, short = 's')]
    store: Option<String>,
    /// The embedding model the store was built with.
    #[arg(long)]
    embed_model: Option<PathBuf>,
    /// How the embedding model pools token rows: `mean`, `last` or `cls`.
    #[arg(long, value_parser = crate::embed::pooling)]
    pooling: Option<llama_runtime::Pooling>,
    /// Passages a search shows.
    #[arg(long, short = 'k', default_value_t = 3)]
    k: usize,
    /// The directory the `files` tool reads (nothing outside it).
    #[arg(long)]
    files: Option<PathBuf>,
    /// Model turns that may call tools; the run ends with a message after them.
    #[arg(long, default_value_t = 5)]
    max_rounds: usize,
    /// Tokens all turns together may generate.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Tokens one turn may generate.
    #[arg(long, default_value_t = 256)]
    turn_tokens: usize,
    /// Seconds a tool call may take before it is abandoned.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    tool_timeout: f64,
    /// Let the first turn answer without calling a tool (by default it must call one,
    /// unless a search runs first).
    #[arg(long)]
    auto_first: bool,
    /// A system message before the task.
    #[arg(long)]
    system: Option<String>,
    /// Context size (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// Print each step to stderr: tool, arguments, result, tokens, time.
    #[arg(long)]
    trace: bool,
    /// Print JSON for scripts: answer, stop reason, steps, sources.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

pub fn run_agent(a: AgentArgs) -> Result<()> {
    if a.max_rounds == 0 {
        bail!("--max-rounds must be at least 1");
    }
    // Every tool is set up (and every flag checked) before the model loads.
    let mut tools = Toolbox::new();
    let mut search: Option<Arc<Search>> = None;
    let mut _embed_engine = None;
    for name in &a.tools {
        match name.trim() {
            "calc" => tools.add(Arc::new(Calculator))?,
            "files" => {
                let dir = a
                    .files
                    .as_ref()
                    .context("--tools files needs --files DIR, the directory it may read")?;
                tools.add(Arc::new(FileReader::new(dir)?))?;
            }
            "search" => {
                let (Some(store), Some(embed_model)) = (&a.store, &a.embed_model) else {
                    bail!("--tools search needs --store S and --embed-model E (the store's embedding model)");
                };
                let args = StoreArgs {
                    store: store.clone(),
                    embed_model: embed_model.clone(),
                    pooling: a.pooling,
                };
                let (engine, embedder) = args.embedder(a.model.threads)?;
                let opened = llama_rag::open(store)?;
                crate::rag::check_store(opened.as_ref(), &args, &embedder)?;
                let tool = Arc::new(Search::new(opened, embedder, a.k));
                tools.add(tool.clone())?;
                search = Some(tool);
                _embed_engine = Some(engine);
            }
            "" => {}
            other => bail!("--tools: unknown tool `{other}` (the tools are calc, search, files)"),
        }
    }
    if a.store.is_some() && search.is_none() {
        bail!("--store is given but `search` is not among --tools");
    }
    let engine = crate::load(&a.model, crate::ctx_size(a.ctx_size), crate::ctx_size_error)?;
    let mut model = EngineModel::new(&engine)?;
    model.sampler = a.sampling.config(SamplerConfig::default());
    let mut agent = Agent::new(model, tools);
    // Questions over a store start from what the store holds; other tasks start with
    // a call unless --auto-first.
    let retrieve = search.is_some().then_some(("search", "query"));
    agent.graph = Graph::tool_loop(retrieve, !a.auto_first);
    agent.system = a.system.clone();
    agent.limits = Limits {
        max_rounds: a.max_rounds,
        max_tokens: a.max_tokens,
        turn_tokens: a.turn_tokens,
        tool_timeout: Duration::from_secs_f64(a.tool_timeout),
        ..Limits::default()
    };
    let trace = a.trace;
    let run = agent.run(&a.task, |step| {
        if trace {
            eprintln!("[{}] {step}", step.node);
        }
    })?;
    let sources = search.map(|s| s.sources()).unwrap_or_default();
    let cited = run
        .answer
        .as_deref()
        .map(|t| llama_rag::pipeline::citations(t, sources.len()))
        .unwrap_or_default();
    if a.json {
        let steps: Vec<serde_json::Value> = run.trace.iter().map(step_json).collect();
        let out = serde_json::json!({
            "answer": run.answer,
            "stop": run.stop.to_string(),
            "rounds": run.state.rounds,
            "tokens": run.state.tokens,
            "steps": steps,
            "sources": sources,
            "cited": cited,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if let Some(answer) = &run.answer {
        println!("{answer}");
        if !sources.is_empty() {
            println!("\nSources:");
            for s in &sources {
                let mark = if cited.contains(&s.n) { "*" } else { " " };
                println!(
                    "{mark}[{}] {} (bytes {}..{})",
                    s.n, s.source, s.start, s.end
                );
            }
        }
    }
    match run.answer {
        Some(_) => Ok(()),
        None => bail!("no answer: {}", run.stop),
    }
}

fn step_json(step: &llama_agent::Step) -> serde_json::Value {
    use llama_agent::StepKind;
    let ms = step.elapsed.as_secs_f64() * 1e3;
    match &step.kind {
        StepKind::Turn {
            choice,
            text,
            calls,
            prompt_tokens,
            cached_tokens,
            tokens,
        } => serde_json::json!({
            "node": step.node, "kind": "turn", "choice": format!("{choice:?}"),
            "text": text,
            "calls": calls.iter().map(|c| serde_json::json!({"name": c.name, "arguments": c.arguments})).collect::<Vec<_>>(),
            "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
            "tokens": tokens, "ms": ms,
        }),
        StepKind::Tool {
            name,
            arguments,
            result,
        } => serde_json::json!({
            "node": step.node, "kind": "tool", "name": name, "arguments": arguments,
            "result": result.as_ref().ok(), "error": result.as_ref().err().map(|e| e.to_string()),
            "ms": ms,
        }),
        StepKind::Branch { condition, taken } => serde_json::json!({
            "node": step.node, "kind": "branch", "condition": condition, "taken": taken,
        }),
    }
}
