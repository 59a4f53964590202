//! `bench`: prefill and decode speed in the manner of llama-bench, and where the time
//! goes.
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use llama_runtime::Context;

use crate::args::{ModelArgs, SpeculationArgs};
use crate::info::human_bytes;
use crate::load;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to prefill; a list (`-p 64,512,2048`) measures each length.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "64"
    )]
    n_prompt: Vec<usize>,
    /// Tokens already in the cache before each measured prefill and decode, as
    /// llama-bench's `-d`: the speed at that depth of a conversation.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    depth: usize,
    /// Tokens to decode after the prompt.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Repetitions; the report gives median, min and max.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repetitions: u32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also time every op of the last run (prefill and decode; with --parallel, the
    /// batched decode) and print where the time goes.
    #[arg(long)]
    profile: bool,
    /// Run this many sequences at once, as llama-batched-bench's `-npl`: each
    /// prefills `-p` tokens (all in one batched step), then every step decodes one
    /// token of each. Aggregate tok/s per count; a list measures each.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
    parallel: Vec<u32>,
    /// With --parallel: every sequence's prompt starts with the same this many tokens
    /// (a system prompt) before its own `-p`; measures the time until every sequence
    /// has its first token, with the prefix cache and without it.
    #[arg(long, default_value_t = 0, requires = "parallel")]
    shared_prefix: usize,
    /// With --lookup or --draft-model: the prompt (a text file) whose greedy
    /// continuation of -n tokens is generated plainly and speculatively, each -r times.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    speculation: SpeculationArgs,
}

/// The peak resident set of this process, from /proc (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = if values.len() % 2 == 1 {
        values[values.len() / 2]
    } else {
        (values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0
    };
    (median, values[0], values[values.len() - 1])
}

pub fn run_bench(args: BenchArgs) -> Result<()> {
    if args.n_prompt.contains(&0) {
        bail!("-p must be at least 1");
    }
    let batched = !args.parallel.is_empty();
    if batched && args.n_prompt.len() > 1 {
        bail!("a list of -p lengths is for single-sequence runs, not --parallel");
    }
    if batched && args.depth > 0 {
        bail!("-d is for single-sequence runs, not --parallel");
    }
    if let Some(spec) = args.speculation.speculation() {
        return run_speculative(&args, spec);
    }
    if args.prompt_file.is_some() {
        bail!("--prompt-file is for --lookup or --draft-model runs");
    }
    let longest = args.n_prompt.iter().copied().max().unwrap_or(1);
    let context = Context::Positions(args.depth + args.shared_prefix + longest + args.n_gen);
    let engine = load(&args.model, context, |_, max| {
        format!(
            "-d {} plus -p {longest} plus -n {} exceed the model's {max} positions",
            args.depth, args.n_gen
        )
    })?;
    let vocab = engine.model().config.vocab_size as u64;
    // A fixed, varied prompt: speed does not depend on which ids.
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + 12345 + salt * 40503) % vocab) as u32)
            .collect()
    };
    if args.shared_prefix > 0 {
        return run_shared_prefix(&args, &engine, vocab);
    }
    if batched {
        return run_parallel(&args, &engine, &ids(longest, 0));
    }
    let mut session = engine.session()?;
    // The depth is filled once; every run rewinds to it.
    if args.depth > 0 {
        session.prefill_last(&ids(args.depth, 7))?;
    }
    if !args.json {
        println!("| model | backend | test | tok/s (median) | min | max |");
        println!("|---|---|---|---|---|---|");
    }
    for &n_prompt in &args.n_prompt {
        bench_one(&args, &session, &ids(n_prompt, 0))?;
    }
    Ok(())
}

/// `--lookup` / `--draft-model`: greedy decode of a real prompt, plain and
/// speculative, side by side; the effective decode speed counts every generated token
/// over the decode time, and the two outputs must be the same tokens.
fn run_speculative(args: &BenchArgs, spec: llama_runtime::Speculation) -> Result<()> {
    use llama_runtime::{generate_ids_drafted, Drafter, GenerateOptions, Generation, ModelDrafter};
    let Some(path) = &args.prompt_file else {
        bail!("--lookup and --draft-model are measured on a real prompt: give --prompt-file FILE");
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--prompt-file {}: {e}", path.display()))?;
    let engine = load(&args.model, Context::Default, |requested, max| {
        format!("a context of {requested} exceeds the model's {max} positions")
    })?;
    let tokenizer = engine.tokenizer()?;
    let prompt = tokenizer.encode(&text)?;
    if prompt.len() + args.n_gen > engine.context() {
        bail!(
            "the prompt's {} tokens plus -n {} exceed the context of {}",
            prompt.len(),
            args.n_gen,
            engine.context()
        );
    }
    let draft = args.speculation.load_draft(&args.model, &engine)?;
    let mut draft_session = draft.as_ref().map(|d| d.session()).transpose()?;
    let plain_opts = GenerateOptions {
        max_tokens: args.n_gen,
        eos: Vec::new(),
        ..GenerateOptions::default()
    };
    let spec_opts = GenerateOptions {
        speculation: Some(spec),
        ..plain_opts.clone()
    };
    let mut session = engine.session()?;
    let mut run =
        |opts: &GenerateOptions, session: &mut llama_runtime::Session| -> Result<Generation> {
            session.reset();
            let mut drafter = draft_session.as_mut().map(ModelDrafter::new);
            Ok(generate_ids_drafted(
                session,
                drafter.as_mut().map(|d| d as &mut dyn Drafter),
                &prompt,
                opts,
                |_| true,
            )?)
        };
    let (mut plain, mut fast) = (Vec::new(), Vec::new());
    let (mut drafted, mut accepted, mut same) = (0, 0, true);
    // One untimed warm-up run of each.
    for rep in 0..=args.repetitions {
        let a = run(&plain_opts, &mut session)?;
        let b = run(&spec_opts, &mut session)?;
        same &= a.ids == b.ids;
        if rep > 0 {
            plain.push(a.decode_tok_s());
            fast.push(b.decode_tok_s());
            drafted += b.drafted;
            accepted += b.accepted;
        }
    }
    let (p, f) = (stats(&mut plain), stats(&mut fast));
    let acceptance = accepted as f64 / drafted.max(1) as f64;
    let mode = if args.speculation.draft_model.is_some() {
        "draft-model"
    } else {
        "lookup"
    };
    let backend = format!("{:?}", args.model.backend).to_lowercase();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model.model.display().to_string(),
                "backend": backend,
                "speculation": mode,
                "draft_model": args.speculation.draft_model.as_ref().map(|p| p.display().to_string()),
                "draft_max": spec.draft_max,
                "n_prompt": prompt.len(),
                "n_gen": args.n_gen,
                "repetitions": args.repetitions,
                "plain_decode_tok_s": p.0,
                "decode_tok_s": f.0, "decode_tok_s_min": f.1, "decode_tok_s_max": f.2,
                "speedup": f.0 / p.0.max(1e-9),
                "drafted": drafted,
                "accepted": accepted,
                "acceptance": acceptance,
                "same_output": same,
            })
        );
    } else {
        let name = file_name(&args.model.model);
        println!("| model | backend | test | plain tok/s | {mode} tok/s | speedup | accepted |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {name} | {backend} | tg{} after {} prompt tokens | {:.1} | {:.1} | {:.2}x | {accepted}/{drafted} ({:.0}%) |",
            args.n_gen,
            prompt.len(),
            p.0,
            f.0,
            f.0 / p.0.max(1e-9),
            100.0 * acceptance
        );
    }
    if !same {
        bail!("speculative decoding changed the greedy output");
    }
    Ok(())
}

/// Runs `ids` and picks the greedy next token: on the device where it can
/// (`Session::prefill_argmax`), as `llama generate` does.
fn pick(session: &mut llama_runtime::Session, ids: &[u32]) -> Result<u32> {
    Ok(if session.picks_on_device() {
        session.prefill_argmax(ids)?
    } else {
        llama_runtime::argmax(&session.prefill_last(ids)?)
    })
}

/// Prefill of `prompt` and `-n` decode steps on top of the depth, `-r` times. Every run
/// starts from a fork of `base` (the session holding the depth): a fork shares its
/// pages, and unlike rewinding it also works for sliding-window caches, which keep
/// only their window.
fn bench_one(args: &BenchArgs, base: &llama_runtime::Session, prompt: &[u32]) -> Result<()> {
    let n_prompt = prompt.len();
    let mut session = base.fork();
    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    // One untimed warm-up run (kernel compilation on GPUs, page faults on CPUs).
    for rep in 0..=args.repetitions {
        if rep > 0 {
            session = base.fork();
        }
        let start = Instant::now();
        let mut next = pick(&mut session, prompt)?;
        let first = start.elapsed();
        let start = Instant::now();
        for _ in 0..args.n_gen {
            next = pick(&mut session, &[next])?;
        }
        let gen = start.elapsed();
        if rep > 0 {
            prefill.push(n_prompt as f64 / first.as_secs_f64());
            ttft.push(first.as_secs_f64() * 1e3);
            if args.n_gen > 0 {
                decode.push(args.n_gen as f64 / gen.as_secs_f64());
            }
        }
    }
    let (p, t) = (stats(&mut prefill), stats(&mut ttft));
    // `-n 0` measures prefill only.
    let d = if decode.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        stats(&mut decode)
    };
    let rss = peak_rss_bytes();
    // The cache as the last run left it (the depth, the prompt and the decoded tokens).
    let (cache_type, kv_bytes) = (session.cache_type(), session.cache_bytes());
    // On GPUs, the kernels one decode token launches (after the warm-up above).
    let launches = if session.picks_on_device() && args.n_gen > 0 {
        session = base.fork();
        let next = pick(&mut session, prompt)?;
        let (picked, launches) = llama_graph::gpu::count_launches(|| pick(&mut session, &[next]));
        picked?;
        Some(launches)
    } else {
        None
    };
    // Where the time goes: one more prefill and decode run with every op timed.
    let profile = if args.profile {
        session = base.fork();
        session.program().start_profile();
        let start = Instant::now();
        let mut next = llama_runtime::argmax(&session.prefill_last(prompt)?);
        let prefill = (session.program().take_profile(), start.elapsed());
        session.program().start_profile();
        let start = Instant::now();
        for _ in 0..args.n_gen {
            next = llama_runtime::argmax(&session.decode(next)?);
        }
        let decode = (session.program().take_profile(), start.elapsed());
        Some([
            ("prefill", prefill.0, prefill.1, n_prompt),
            ("decode", decode.0, decode.1, args.n_gen),
        ])
    } else {
        None
    };
    let backend = format!("{:?}", args.model.backend).to_lowercase();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model.model.display().to_string(),
                "backend": backend,
                "n_prompt": n_prompt,
                "n_gen": args.n_gen,
                "n_depth": args.depth,
                "repetitions": args.repetitions,
                "prefill_tok_s": p.0, "prefill_tok_s_min": p.1, "prefill_tok_s_max": p.2,
                "decode_tok_s": d.0, "decode_tok_s_min": d.1, "decode_tok_s_max": d.2,
                "ttft_ms": t.0,
                "peak_rss_bytes": rss,
                // llama-bench's names for the cache types.
                "type_k": cache_type.name(),
                "type_v": cache_type.name(),
                "kv_bytes": kv_bytes,
                "launches_per_token": launches.as_ref().map(|l| l.total()),
                "launches_by_kernel": launches.as_ref().map(|l| &l.by_kernel),
                "profile": profile.as_ref().map(|phases| {
                    phases
                        .iter()
                        .filter(|(_, _, _, tokens)| *tokens > 0)
                        .map(|(name, p, total, tokens)| (name.to_string(), profile_json(p, *total, *tokens)))
                        .collect::<serde_json::Map<_, _>>()
                }),
            })
        );
    } else {
        let name = file_name(&args.model.model);
        // llama-bench's names: `pp512 @ d2048`.
        let at = if args.depth > 0 {
            format!(" @ d{}", args.depth)
        } else {
            String::new()
        };
        println!(
            "| {name} | {backend} | pp{n_prompt}{at} | {:.1} | {:.1} | {:.1} |",
            p.0, p.1, p.2
        );
        if args.n_gen > 0 {
            println!(
                "| {name} | {backend} | tg{}{at} | {:.1} | {:.1} | {:.1} |",
                args.n_gen, d.0, d.1, d.2
            );
        }
        println!(
            "time to first token {:.1} ms (median); peak RSS {}; KV cache {cache_type} {}",
            t.0,
            rss.map_or("unknown".into(), |b| human_bytes(b as usize)),
            human_bytes(kv_bytes)
        );
        if let Some(l) = &launches {
            let mut top: Vec<_> = l.by_kernel.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = top
                .iter()
                .take(6)
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            println!(
                "kernel launches per decode token: {} ({})",
                l.total(),
                top.join(", ")
            );
        }
        for (name, p, total, tokens) in profile.iter().flatten() {
            if *tokens > 0 {
                print_profile(name, p, *total, *tokens);
            }
        }
    }
    Ok(())
}

/// `--parallel`: aggregate prefill and decode speed of `n` sequences at once, for
/// each `n`: the prompts of all of them as one step, then steps of one token each.
fn run_parallel(args: &BenchArgs, engine: &llama_runtime::Engine, prompt: &[u32]) -> Result<()> {
    use llama_graph::{Rows, Sequence, Taps};
    let program = engine.program();
    let backend = format!("{:?}", args.model.backend).to_lowercase();
    if !args.json {
        println!("| model | backend | parallel | pp tok/s | tg tok/s | pp ms | tg ms |");
        println!("|---|---|---|---|---|---|---|");
    }
    let name = file_name(&args.model.model);
    for &n in &args.parallel {
        let n = n as usize;
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        let (mut pp_ms, mut tg_ms) = (Vec::new(), Vec::new());
        for rep in 0..=args.repetitions {
            let mut caches = (0..n)
                .map(|_| program.new_cache_of(prompt.len() + args.n_gen, engine.cache_type()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let start = Instant::now();
            let mut seqs: Vec<Sequence<'_>> = caches
                .iter_mut()
                .map(|cache| Sequence {
                    tokens: prompt,
                    cache,
                })
                .collect();
            let out = program.run_batch(&mut seqs, &Taps::None, Rows::Last)?;
            let mut next = argmax_rows(&out.outputs[0].to_f32_vec()?, n);
            let first = start.elapsed();
            let profiled = args.profile && rep == args.repetitions;
            if profiled {
                program.start_profile();
            }
            let start = Instant::now();
            for _ in 0..args.n_gen {
                let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let mut seqs: Vec<Sequence<'_>> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(cache, t)| Sequence { tokens: t, cache })
                    .collect();
                let out = program.run_batch(&mut seqs, &Taps::None, Rows::Last)?;
                next = argmax_rows(&out.outputs[0].to_f32_vec()?, n);
            }
            let gen = start.elapsed();
            if profiled {
                let p = program.take_profile();
                if !args.json {
                    print_profile(&format!("decode, {n} at once"), &p, gen, n * args.n_gen);
                }
            }
            if rep > 0 {
                prefill.push((n * prompt.len()) as f64 / first.as_secs_f64());
                pp_ms.push(first.as_secs_f64() * 1e3);
                if args.n_gen > 0 {
                    decode.push((n * args.n_gen) as f64 / gen.as_secs_f64());
                    tg_ms.push(gen.as_secs_f64() * 1e3);
                }
            }
        }
        let (p, pms) = (stats(&mut prefill).0, stats(&mut pp_ms).0);
        let (d, dms) = if decode.is_empty() {
            (0.0, 0.0)
        } else {
            (stats(&mut decode).0, stats(&mut tg_ms).0)
        };
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "model": args.model.model.display().to_string(),
                    "backend": backend,
                    "parallel": n,
                    "n_prompt": prompt.len(),
                    "n_gen": args.n_gen,
                    "repetitions": args.repetitions,
                    "prefill_tok_s": p,
                    "decode_tok_s": d,
                    "prefill_ms": pms,
                    "decode_ms": dms,
                })
            );
        } else {
            println!("| {name} | {backend} | {n} | {p:.1} | {d:.1} | {pms:.1} | {dms:.1} |");
        }
    }
    Ok(())
}

/// `--parallel N --shared-prefix P`: N sequences whose prompts share their first P
/// tokens, through the scheduler; time until each has its first token, with the
/// prefix cache (the prefix runs once) and without (it runs N times).
fn run_shared_prefix(args: &BenchArgs, engine: &llama_runtime::Engine, vocab: u64) -> Result<()> {
    use llama_runtime::{BatchOptions, Event, GenerateOptions, Scheduler};
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + 12345 + salt * 40503) % vocab) as u32)
            .collect()
    };
    let shared = ids(args.shared_prefix, 0);
    let n_prompt = args.n_prompt[0];
    if !args.json {
        println!("| parallel | shared prefix | own tokens | prefix cache | first tokens ms | prompt tokens run | peak KV MiB |");
        println!("|---|---|---|---|---|---|---|");
    }
    for &n in &args.parallel {
        let n = n as usize;
        for cache in [true, false] {
            let mut times = Vec::new();
            let mut run_tokens = 0;
            let mut peak_kv = 0;
            for rep in 0..=args.repetitions {
                let opts = BatchOptions {
                    kv_budget: n * (args.shared_prefix + n_prompt + 1) + args.shared_prefix,
                    max_sequences: n,
                    prefix_cache: cache,
                    step_tokens: 512,
                    ..BatchOptions::default()
                };
                let mut s = Scheduler::new(engine, opts)?;
                let start = Instant::now();
                for i in 0..n {
                    let prompt = [shared.clone(), ids(n_prompt, 1 + i as u64)].concat();
                    let g = GenerateOptions {
                        max_tokens: 1,
                        ..GenerateOptions::default()
                    };
                    s.submit(prompt, g)?;
                }
                let mut failed = None;
                while !s.is_idle() {
                    for e in s.step() {
                        if let Event::Failed { error, .. } = e {
                            failed.get_or_insert(error);
                        }
                    }
                    // Host KV memory held, shared pages once.
                    peak_kv = peak_kv.max(s.kv_bytes());
                }
                if let Some(e) = failed {
                    return Err(e.into());
                }
                if rep > 0 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                    run_tokens = s.stats().prompt_tokens_run;
                }
            }
            let ms = stats(&mut times).0;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "parallel": n,
                        "shared_prefix": args.shared_prefix,
                        "n_prompt": n_prompt,
                        "prefix_cache": cache,
                        "first_tokens_ms": ms,
                        "prompt_tokens_run": run_tokens,
                        "peak_kv_bytes": peak_kv,
                    })
                );
            } else {
                println!(
                    "| {n} | {} | {} | {} | {ms:.1} | {run_tokens} | {:.1} |",
                    args.shared_prefix,
                    n_prompt,
                    if cache { "on" } else { "off" },
                    peak_kv as f64 / (1 << 20) as f64
                );
            }
        }
    }
    Ok(())
}

/// The last part of a model path, for the tables.
fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The argmax of each of `n` rows of logits.
fn argmax_rows(logits: &[f32], n: usize) -> Vec<u32> {
    let vocab = logits.len() / n.max(1);
    logits
        .chunks(vocab.max(1))
        .map(llama_runtime::argmax)
        .collect()
}

/// Op kinds by decode time per token, largest first, and the time between ops.
fn profile_rows(
    p: &llama_graph::OpProfile,
    total: std::time::Duration,
    tokens: usize,
) -> Vec<(String, f64, f64)> {
    let per_token = |d: std::time::Duration| d.as_secs_f64() * 1e3 / tokens as f64;
    let mut rows: Vec<(String, f64, f64)> = p
        .ops
        .iter()
        .map(|(k, (d, n))| (k.to_string(), per_token(*d), *n as f64 / tokens as f64))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let ops: std::time::Duration = p.ops.values().map(|(d, _)| *d).sum();
    rows.push((
        "outside ops (executor, sampling)".into(),
        per_token(total.saturating_sub(ops)),
        0.0,
    ));
    rows
}

fn print_profile(
    phase: &str,
    p: &llama_graph::OpProfile,
    total: std::time::Duration,
    tokens: usize,
) {
    let all = total.as_secs_f64() * 1e3 / tokens as f64;
    println!("{phase} profile ({tokens} tokens, {all:.3} ms per token):");
    println!("| op | ms/token | share | calls/token |");
    println!("|---|---|---|---|");
    for (op, ms, calls) in profile_rows(p, total, tokens) {
        println!("| {op} | {ms:.3} | {:.1}% | {calls:.0} |", 100.0 * ms / all);
    }
}

fn profile_json(
    p: &llama_graph::OpProfile,
    total: std::time::Duration,
    tokens: usize,
) -> serde_json::Value {
    serde_json::Value::Array(
        profile_rows(p, total, tokens)
            .into_iter()
            .map(|(op, ms, calls)| serde_json::json!({"op": op, "ms_per_token": ms, "calls_per_token": calls}))
            .collect(),
    )
}
