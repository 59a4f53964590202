//! `generate` and `chat`: text after a prompt, and a conversation turn by turn.
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use llama_runtime::{
    generate_drafted, BatchOptions, Drafter, Engine, Event, GenerateOptions, Generation, Message,
    ModelDrafter, SamplerConfig, Scheduler,
};

use crate::args::{GrammarArgs, ModelArgs, RunArgs, SAMPLING_HELP};
use crate::{ctx_size, ctx_size_error, load};

#[derive(Args)]
#[command(after_help = SAMPLING_HELP)]
pub struct GenerateArgs {
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
    /// Generate this many completions of the prompt at once (one batch; the prompt is
    /// prefilled once and shared). Sample `i` uses seed `--seed + i`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    samples: u32,
    #[command(flatten)]
    grammar: GrammarArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
#[command(after_help = SAMPLING_HELP)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Keep the conversation, with its KV cache, in FILE: resumed from it at start
    /// (without running it again) and saved to it on exit. A file that is damaged or
    /// made by another model or configuration is ignored with a warning.
    #[arg(long, value_name = "FILE")]
    session: Option<std::path::PathBuf>,
    #[command(flatten)]
    prompt_cache: crate::serve::PromptCacheArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Generation options from the flags, over the command's sampling defaults.
fn options(engine: &Engine, run: &RunArgs, defaults: SamplerConfig) -> GenerateOptions {
    GenerateOptions {
        max_tokens: run.max_tokens,
        sampler: run.sampling.config(defaults),
        eos: engine.eos_token_ids(),
        stop: run.stop.clone(),
        context_shift: run.context_shift.then_some(run.keep),
        cancel: None,
        logprobs: None,
        constraint: None,
        speculation: run.speculation.speculation(),
    }
}

fn stats_line(g: &Generation, seed: u64, sampled: bool) -> String {
    let seed = if sampled {
        format!(" | seed {seed}")
    } else {
        String::new()
    };
    let grammar = if g.mask_steps > 0 {
        format!(
            " | grammar {:.2} ms/token",
            g.mask_time.as_secs_f64() * 1e3 / g.mask_steps as f64
        )
    } else {
        String::new()
    };
    let drafts = if g.drafted > 0 {
        format!(
            " | drafts {}/{} accepted ({:.0}%)",
            g.accepted,
            g.drafted,
            100.0 * g.accepted as f64 / g.drafted as f64
        )
    } else {
        String::new()
    };
    format!(
        "prompt {} tokens | ttft {:.0} ms | prefill {:.1} tok/s | generated {} tokens, decode {:.1} tok/s{grammar}{drafts} | stop: {:?}{seed}",
        g.prompt_tokens,
        g.ttft.as_secs_f64() * 1e3,
        g.prefill_tok_s(),
        g.ids.len(),
        g.decode_tok_s(),
        g.finish
    )
}

/// Timings of a generation as the JSON report gives them. `mask_ms_per_token` is the
/// grammar's share of each token (mask and matcher step), beside the whole step's
/// `step_ms_per_token` (model, sampling and mask).
fn timings(g: &Generation) -> serde_json::Value {
    serde_json::json!({
        "ttft_ms": g.ttft.as_secs_f64() * 1e3,
        "prefill_tok_s": g.prefill_tok_s(),
        "decode_tok_s": g.decode_tok_s(),
        "step_ms_per_token": g.decode_time.as_secs_f64() * 1e3 / g.decode_steps.max(1) as f64,
        "mask_ms_per_token": g.mask_time.as_secs_f64() * 1e3 / g.mask_steps.max(1) as f64,
        "mask_steps": g.mask_steps,
        "drafted": g.drafted,
        "accepted": g.accepted,
    })
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    let engine = load(&args.model, ctx_size(args.run.ctx_size), ctx_size_error)?;
    let tokenizer = engine.tokenizer()?;
    // `generate` stays greedy unless asked: the same prompt gives the same text.
    let mut opts = options(&engine, &args.run, SamplerConfig::default());
    if let Some(grammar) = args.grammar.grammar()? {
        opts.constraint = Some(engine.grammars(&tokenizer)?.compile(&grammar)?);
    }
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        if let Some(note) = engine.chat_template_note() {
            eprintln!("{note}");
        }
        // As transformers' apply_chat_template: the template writes the special tokens.
        tokenizer.encode_plain(&engine.chat_template()?.render(&messages, true)?)?
    } else {
        tokenizer.encode(&args.prompt)?
    };
    let draft = args.run.speculation.load_draft(&args.model, &engine)?;
    if args.samples > 1 {
        return run_samples(&engine, draft.as_ref(), &tokenizer, &prompt, &opts, &args);
    }
    let mut session = engine.session()?;
    let mut draft_session = draft.as_ref().map(Engine::session).transpose()?;
    let mut drafter = draft_session.as_mut().map(ModelDrafter::new);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let json = args.json;
    let g = generate_drafted(
        &mut session,
        drafter.as_mut().map(|d| d as &mut dyn Drafter),
        &tokenizer,
        &prompt,
        &opts,
        |piece| {
            if !json {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        },
    )?;
    if json {
        let object = serde_json::json!({
            "text": g.text,
            "ids": g.ids,
            "finish_reason": g.finish,
            "prompt_tokens": g.prompt_tokens,
            "timings": timings(&g),
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

/// `generate --samples N`: N completions of one prompt as one batch, each with its own
/// seed; the prompt is prefilled once and the others copy it.
fn run_samples(
    engine: &Engine,
    draft: Option<&Engine>,
    tokenizer: &llama_runtime::Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    args: &GenerateArgs,
) -> Result<()> {
    let n = args.samples as usize;
    let per_sequence = prompt.len() + opts.max_tokens;
    let batch = BatchOptions {
        kv_budget: n * per_sequence + prompt.len(),
        max_sequences: n,
        min_prefix: 1,
        ..BatchOptions::default()
    };
    let mut scheduler = Scheduler::new(engine, batch)?.with_tokenizer(tokenizer);
    if let Some(d) = draft {
        scheduler = scheduler.with_draft(d.program(), d.context());
    }
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let mut o = opts.clone();
        o.sampler.seed = opts.sampler.seed.wrapping_add(i as u64);
        ids.push(scheduler.submit(prompt.to_vec(), o)?);
    }
    let mut results: Vec<Option<Generation>> = vec![None; n];
    let mut failure = None;
    scheduler.run(|event| match event {
        Event::Done { seq, generation } => {
            if let Some(i) = ids.iter().position(|&x| x == seq) {
                results[i] = Some(generation);
            }
        }
        Event::Failed { error, .. } => {
            failure.get_or_insert(error);
        }
        _ => {}
    });
    if let Some(e) = failure {
        return Err(e.into());
    }
    let results: Vec<Generation> = results.into_iter().flatten().collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        let choices: Vec<_> = results
            .iter()
            .enumerate()
            .map(|(i, g)| {
                serde_json::json!({
                    "index": i,
                    "text": g.text,
                    "ids": g.ids,
                    "finish_reason": g.finish,
                    "cached_tokens": g.cached_tokens,
                    "seed": opts.sampler.seed.wrapping_add(i as u64),
                    "timings": timings(g),
                })
            })
            .collect();
        let stats = scheduler.stats();
        let object = serde_json::json!({
            "choices": choices,
            "prompt_tokens": prompt.len(),
            "prompt_tokens_run": stats.prompt_tokens_run,
            "prompt_tokens_reused": stats.prompt_tokens_reused,
        });
        writeln!(out, "{object}")?;
    } else {
        for (i, g) in results.iter().enumerate() {
            writeln!(out, "--- sample {i} ---")?;
            writeln!(out, "{}", g.text)?;
            eprintln!(
                "{}",
                stats_line(
                    g,
                    opts.sampler.seed.wrapping_add(i as u64),
                    opts.sampler.temperature > 0.0
                )
            );
        }
    }
    Ok(())
}

/// The interactive loop: one user line a turn; the cache keeps the conversation, so only
/// the new turn is prefilled.
pub fn run_chat(args: ChatArgs) -> Result<()> {
    let engine = load(&args.model, ctx_size(args.run.ctx_size), ctx_size_error)?;
    let tokenizer = engine.tokenizer()?;
    let template = engine.chat_template()?;
    if let Some(note) = engine.chat_template_note() {
        eprintln!("{note}");
    }
    // A conversation samples as llama.cpp's does: greedy decoding makes small models loop.
    let mut opts = options(&engine, &args.run, SamplerConfig::chat());
    let draft = args.run.speculation.load_draft(&args.model, &engine)?;
    let mut draft_session = draft.as_ref().map(Engine::session).transpose()?;
    let mut drafter = draft_session.as_mut().map(ModelDrafter::new);
    let mut session = engine.session()?;
    let interactive = std::io::stdin().is_terminal();
    let cancel = Arc::new(AtomicBool::new(false));
    opts.cancel = Some(cancel.clone());
    let start_messages: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut messages = start_messages.clone();
    let key = match &args.session {
        Some(_) => Some(
            llama_runtime::CacheKey::for_engine(&engine, &args.model.model, None)
                .with_context(|| "hashing the model for --session")?,
        ),
        None => None,
    };
    // The prompt cache on disk, as a server's: each turn's context is written to it,
    // and a turn whose prompt shares more with an entry than the session holds
    // (another chat's system prompt and first turns) starts from that entry.
    let disk = args
        .prompt_cache
        .options(&args.model.model)
        .and_then(|o| llama_runtime::DiskCache::for_engine(&engine, &o, Arc::default()));
    if let (Some(path), Some(key)) = (&args.session, &key) {
        if let Some(resumed) = resume(path, key, &mut session) {
            eprintln!(
                "(resumed {} messages, {} cached tokens from {})",
                resumed.len(),
                session.tokens().len(),
                path.display()
            );
            messages = resumed;
        }
    }
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
        if let Some(disk) = &disk {
            load_prefix(disk, &mut session, &ids, engine.cache_type());
        }
        let new = session.sync_prefix(&ids)?;
        cancel.store(false, Ordering::Relaxed);
        let mut out = std::io::stdout().lock();
        let g = generate_drafted(
            &mut session,
            drafter.as_mut().map(|d| d as &mut dyn Drafter),
            &tokenizer,
            &new,
            &opts,
            |piece| {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            },
        )?;
        writeln!(out)?;
        out.flush()?;
        eprintln!(
            "{}",
            stats_line(&g, opts.sampler.seed, opts.sampler.temperature > 0.0)
        );
        messages.push(Message::new("assistant", &g.text));
        if let Some(disk) = &disk {
            let cache = session.kv_cache();
            let tokens = session.tokens();
            if cache.len() == tokens.len() {
                disk.spill(tokens.to_vec(), cache.clone());
            }
        }
    }
    // Dropping the tier finishes its writes.
    drop(disk);
    if let (Some(path), Some(key)) = (&args.session, &key) {
        let meta: Vec<[&str; 2]> = messages
            .iter()
            .map(|m| [m.role.as_str(), m.content.as_str()])
            .collect();
        let state = session.state()?;
        llama_runtime::prompt_cache::save_session(path, key, &state, serde_json::json!(meta))
            .with_context(|| "saving the session")?;
        eprintln!(
            "(saved {} messages, {} tokens to {})",
            messages.len(),
            state.tokens.len(),
            path.display()
        );
    }
    Ok(())
}

/// Puts the pages of the disk entry that shares the most of `ids` into `session`,
/// when that is more than the session holds already.
fn load_prefix(
    disk: &llama_runtime::DiskCache,
    session: &mut llama_runtime::Session,
    ids: &[u32],
    cache_type: llama_runtime::KvType,
) {
    let held = session
        .tokens()
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count();
    // Fewer shared tokens than a server's shortest reused prefix are not worth a read.
    let Some((tokens, cache)) = disk.load(
        ids,
        held.max(15),
        ids.len().saturating_sub(1),
        session.program(),
        cache_type,
    ) else {
        return;
    };
    let state = cache
        .snapshot()
        .map(|cache| llama_runtime::SessionState { tokens, cache });
    if let Err(e) = state
        .map_err(llama_runtime::RuntimeError::from)
        .and_then(|s| session.restore(&s))
    {
        eprintln!("warning: prompt cache: {e}; running the prompt instead");
        session.reset();
    }
}

/// The messages of the conversation saved in `path`, its KV cache restored into
/// `session`; `None` for a new file, or (after a warning) one that cannot be used.
fn resume(
    path: &std::path::Path,
    key: &llama_runtime::CacheKey,
    session: &mut llama_runtime::Session,
) -> Option<Vec<Message>> {
    if !path.exists() {
        return None;
    }
    let warn = |e: &dyn std::fmt::Display| {
        eprintln!("warning: session {e}; starting a new conversation");
    };
    let (state, meta) = match llama_runtime::prompt_cache::load_session(path, key) {
        Ok(x) => x,
        Err(e) => {
            warn(&e);
            return None;
        }
    };
    let messages: Option<Vec<[String; 2]>> = serde_json::from_value(meta).ok();
    let Some(messages) = messages else {
        warn(&format!("{}: no conversation in it", path.display()));
        return None;
    };
    if let Err(e) = session.restore(&state) {
        session.reset();
        warn(&format!("{}: {e}", path.display()));
        return None;
    }
    Some(
        messages
            .iter()
            .map(|[role, content]| Message::new(role, content))
            .collect(),
    )
}
