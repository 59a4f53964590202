//! Speculative decoding: whatever the drafts (looked up in the context, proposed by a
//! draft model, right, wrong, or random), what is generated is what plain decoding
//! generates, alone and batched; under sampling the verified tokens follow the
//! model's own distribution.

use std::collections::BTreeMap;

use crate::common::*;
use llama::graph::{KvType, Pipeline, Program};
use llama::runtime::{
    generate_ids, generate_ids_drafted, BatchOptions, Drafter, Event, GenerateOptions, Generation,
    ModelDrafter, Result as RtResult, SamplerConfig, Scheduler, Session, Speculation,
};
use proptest::prelude::*;

const VOCAB: u32 = 256;

fn program(name: &str) -> Program {
    let device = flex();
    Program::new(graph(name, &device, &Pipeline::standard()), device).expect("program")
}

/// How a test drafter guesses, given the plain output it is to agree or disagree
/// with.
#[derive(Debug, Clone, Copy)]
enum Policy {
    /// Every draft token is one the model would not choose.
    AlwaysWrong,
    /// The plain output's next tokens: every draft accepted.
    AlwaysRight,
    /// Right for a few tokens, then wrong: every split of a draft.
    RightThenWrong,
    /// Tokens from a seeded generator.
    Random,
}

/// Drafts for sequences whose plain outputs are known: each context starts with one
/// of the prompts, and what follows it is a prefix of that prompt's plain output.
struct TestDrafter {
    policy: Policy,
    plain: Vec<(Vec<u32>, Vec<u32>)>,
    state: u64,
}

impl TestDrafter {
    fn new(policy: Policy, plain: Vec<(Vec<u32>, Vec<u32>)>, seed: u64) -> Self {
        TestDrafter {
            policy,
            plain,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

impl Drafter for TestDrafter {
    fn draft(&mut self, context: &[u32], n: usize) -> RtResult<Vec<u32>> {
        // The longest prompt this context starts with is the sequence's.
        let (prompt, plain) = self
            .plain
            .iter()
            .filter(|(p, _)| context.starts_with(p))
            .max_by_key(|(p, _)| p.len())
            .cloned()
            .expect("a known sequence");
        let generated = &context[prompt.len()..];
        assert!(
            plain.starts_with(generated),
            "the context went where plain decoding did not: {generated:?} vs {plain:?}"
        );
        // The tokens plain decoding chooses after this context (past its end: any).
        let truth = |i: usize| plain.get(generated.len() + i).copied();
        let wrong = |t: Option<u32>| t.map_or(3, |t| (t + 1) % VOCAB);
        let right_for = (self.next_random() % (n as u64 + 1)) as usize;
        Ok((0..n)
            .map(|i| match self.policy {
                Policy::AlwaysWrong => wrong(truth(i)),
                Policy::AlwaysRight => truth(i).unwrap_or(5),
                Policy::RightThenWrong if i < right_for => truth(i).unwrap_or(5),
                Policy::RightThenWrong => wrong(truth(i)),
                Policy::Random => (self.next_random() % VOCAB as u64) as u32,
            })
            .collect())
    }
}

fn sampler(kind: u8, seed: u64) -> SamplerConfig {
    match kind {
        0 => SamplerConfig::default(),
        1 => SamplerConfig {
            temperature: 0.9,
            top_k: Some(20),
            seed,
            ..SamplerConfig::default()
        },
        // Penalties read the history: drafts must not leak into it.
        _ => SamplerConfig {
            temperature: 0.7,
            top_p: Some(0.9),
            repeat_penalty: 1.3,
            frequency_penalty: 0.4,
            seed,
            ..SamplerConfig::default()
        },
    }
}

fn options(max_tokens: usize, sampler: SamplerConfig, draft_max: Option<usize>) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler,
        speculation: draft_max.map(|draft_max| Speculation {
            draft_max,
            ..Speculation::default()
        }),
        ..GenerateOptions::default()
    }
}

fn fresh(p: &Program) -> Session {
    Session::new(p.clone(), 64).expect("session")
}

fn plain_ids(p: &Program, prompt: &[u32], opts: &GenerateOptions) -> Generation {
    let plain = GenerateOptions {
        speculation: None,
        ..opts.clone()
    };
    generate_ids(&mut fresh(p), prompt, &plain, |_| true).expect("plain")
}

const FAMILIES: [&str; 4] = ["llama3", "mistral", "qwen2", "gemma3"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// One sequence: every policy, draft length and sampler leaves the output as
    /// plain decoding makes it, and reports what it drafted.
    #[test]
    fn drafts_never_change_a_sequence(
        family in prop::sample::select(FAMILIES.to_vec()),
        prompt_len in 1usize..20,
        prompt_seed in 0u32..50,
        max_tokens in 1usize..30,
        draft_max in 1usize..=16,
        policy in prop::sample::select(vec![
            Policy::AlwaysWrong, Policy::AlwaysRight, Policy::RightThenWrong, Policy::Random,
        ]),
        kind in 0u8..3,
        seed in 0u64..1000,
    ) {
        let p = program(family);
        let prompt = ids(prompt_len, prompt_seed);
        let opts = options(max_tokens, sampler(kind, seed), Some(draft_max));
        let want = plain_ids(&p, &prompt, &opts);
        let mut drafter = TestDrafter::new(policy, vec![(prompt.clone(), want.ids.clone())], seed);
        let got = generate_ids_drafted(&mut fresh(&p), Some(&mut drafter), &prompt, &opts, |_| true)
            .expect("speculative");
        prop_assert_eq!(&got.ids, &want.ids, "{} {:?} draft_max {}", family, policy, draft_max);
        prop_assert_eq!(got.finish, want.finish);
        prop_assert!(got.accepted <= got.drafted);
        if matches!(policy, Policy::AlwaysWrong) {
            prop_assert_eq!(got.accepted, 0);
        }
        if matches!(policy, Policy::AlwaysRight) && max_tokens > 2 {
            // Right drafts are all taken.
            prop_assert!(got.accepted > 0 && got.accepted == got.drafted, "{:?}", (got.accepted, got.drafted));
        }
    }

    /// Many sequences in batched steps, each with its own drafts (and some without),
    /// joining at different steps: each generates what it generates alone.
    #[test]
    fn batched_drafts_never_change_any_sequence(
        family in prop::sample::select(FAMILIES.to_vec()),
        reqs in prop::collection::vec((1usize..14, 0u32..40, 1usize..20, 0u8..3, any::<bool>()), 1..6),
        step_tokens in 4usize..24,
        draft_max in 1usize..=16,
        policy in prop::sample::select(vec![
            Policy::AlwaysWrong, Policy::AlwaysRight, Policy::RightThenWrong, Policy::Random,
        ]),
        seed in 0u64..1000,
    ) {
        let p = program(family);
        let mut plain = Vec::new();
        let mut jobs = Vec::new();
        for (i, &(len, pseed, max, kind, speculate)) in reqs.iter().enumerate() {
            // Distinct prompts: a leading id per request.
            let prompt = [vec![2 + i as u32], ids(len, pseed)].concat();
            let opts = options(max, sampler(kind, seed + i as u64), speculate.then_some(draft_max));
            let want = plain_ids(&p, &prompt, &opts);
            plain.push((prompt.clone(), want.ids.clone()));
            jobs.push((prompt, opts, want));
        }
        let batch = BatchOptions { step_tokens, kv_budget: 64 * 6, min_prefix: 4, ..BatchOptions::default() };
        let mut s = Scheduler::for_program(&p, 64, KvType::F32, batch)
            .expect("scheduler")
            .with_drafter(Box::new(TestDrafter::new(policy, plain, seed)));
        let mut seqs = BTreeMap::new();
        let mut pending = jobs.iter().enumerate().collect::<Vec<_>>();
        let mut done = BTreeMap::new();
        let mut steps = 0;
        while !pending.is_empty() || !s.is_idle() {
            // One arrival a step.
            if let Some((i, (prompt, opts, _))) = pending.pop() {
                seqs.insert(s.submit(prompt.clone(), opts.clone()).expect("submit"), i);
            }
            for e in s.step() {
                match e {
                    Event::Done { seq, generation } => { done.insert(seqs[&seq], generation); }
                    Event::Failed { error, .. } => panic!("failed: {error}"),
                    _ => {}
                }
            }
            steps += 1;
            prop_assert!(steps < 2000, "the scheduler does not finish");
        }
        for (i, (_, opts, want)) in jobs.iter().enumerate() {
            let got = &done[&i];
            prop_assert_eq!(&got.ids, &want.ids, "request {} ({:?})", i, policy);
            if opts.speculation.is_none() {
                prop_assert_eq!(got.drafted, 0);
            }
            if matches!(policy, Policy::AlwaysWrong) {
                prop_assert_eq!(got.accepted, 0);
            }
        }
        prop_assert_eq!(
            s.stats().drafted,
            done.values().map(|g| g.drafted as u64).sum::<u64>()
        );
    }
}

/// Prompt lookup (the drafter of `speculation` without a draft model) on a prompt
/// whose tokens recur: drafts are looked up and verified, and the output is plain
/// decoding's, greedy and sampled. (Acceptance needs a model that copies: the real
/// model's test below.)
#[test]
fn lookup_drafts_keep_the_output() {
    let mut drafted = 0;
    for family in FAMILIES {
        let p = program(family);
        let prompt = [ids(16, 3), ids(16, 3)].concat();
        for kind in 0..3 {
            let mut opts = options(30, sampler(kind, 5), Some(8));
            if let Some(s) = opts.speculation.as_mut() {
                s.ngram_min = 1;
            }
            let want = plain_ids(&p, &prompt, &opts);
            let got = generate_ids(&mut fresh(&p), &prompt, &opts, |_| true).expect("lookup");
            assert_eq!(got.ids, want.ids, "{family} sampler {kind}");
            drafted += got.drafted;
        }
    }
    assert!(drafted > 0, "nothing was looked up");
}

/// A draft model (another family with the same vocabulary, and the model itself)
/// batched in the scheduler: outputs unchanged; the model drafting for itself is
/// accepted throughout.
#[test]
fn draft_model_in_the_scheduler_keeps_outputs() {
    let target = program("llama3");
    for (draft_name, all_accepted) in [("qwen2", false), ("llama3", true)] {
        let draft = program(draft_name);
        let batch = BatchOptions {
            kv_budget: 64 * 4,
            ..BatchOptions::default()
        };
        let mut s = Scheduler::for_program(&target, 64, KvType::F32, batch)
            .expect("scheduler")
            .with_draft(&draft, 64);
        let mut want = BTreeMap::new();
        for i in 0..3u32 {
            let prompt = ids(5 + 3 * i as usize, 20 + i);
            let greedy = i % 2 == 0;
            let opts = options(20, sampler(u8::from(!greedy), 7 + i as u64), Some(6));
            let plain = plain_ids(&target, &prompt, &opts);
            want.insert(s.submit(prompt, opts).expect("submit"), (plain.ids, greedy));
        }
        let mut drafted = 0;
        s.run(|e| match e {
            Event::Done { seq, generation } => {
                let (ids, greedy) = &want[&seq];
                assert_eq!(&generation.ids, ids, "draft {draft_name}");
                drafted += generation.drafted;
                // The model's own greedy choices are its greedy drafts.
                if all_accepted && *greedy {
                    assert_eq!(generation.accepted, generation.drafted);
                }
            }
            Event::Failed { error, .. } => panic!("{error}"),
            _ => {}
        });
        assert!(drafted > 0, "draft {draft_name}: nothing drafted");
    }
}

/// The same through one session: a [`ModelDrafter`] over the draft model's session.
#[test]
fn draft_model_session_keeps_outputs() {
    let target = program("qwen2");
    let draft = program("llama3");
    for kind in 0..3 {
        let prompt = ids(9, 4);
        let opts = options(30, sampler(kind, 11), Some(5));
        let want = plain_ids(&target, &prompt, &opts);
        let mut draft_session = fresh(&draft);
        let mut drafter = ModelDrafter::new(&mut draft_session);
        let got = generate_ids_drafted(
            &mut fresh(&target),
            Some(&mut drafter),
            &prompt,
            &opts,
            |_| true,
        )
        .expect("drafted");
        assert_eq!(got.ids, want.ids, "sampler {kind}");
        assert!(got.drafted > 0);
    }
}

/// Upper quantile of the chi-square distribution with `df` degrees of freedom at
/// `z` standard deviations (Wilson–Hilferty).
fn chi_square_quantile(df: f64, z: f64) -> f64 {
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + z * a.sqrt()).powi(3)
}

/// Under sampling, the token chosen at a verified position follows the model's
/// distribution there, whatever was drafted: over many seeds, the counts of the
/// second token (the first one verified against a draft) match the probabilities
/// the sampler's definition gives (top-k, then a softmax at the temperature) by a
/// chi-square test, for a draft of the most likely token and for a wrong one.
#[test]
fn sampled_tokens_follow_the_models_distribution() {
    let p = program("llama3");
    let prompt = ids(6, 9);
    let (top_k, temperature) = (6usize, 1.3f32);
    let seeds = 1500u64;
    // The target's distribution after `prompt` and a first token.
    let mut session = fresh(&p);
    let mut dist = |first: u32| -> Vec<(u32, f64)> {
        let logits = full_forward(&mut session, &[prompt.clone(), vec![first]].concat())
            .pop()
            .expect("rows");
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        idx.truncate(top_k);
        let max = logits[idx[0] as usize] as f64;
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / temperature as f64).exp())
            .collect();
        let sum: f64 = w.iter().sum();
        idx.into_iter()
            .zip(w.into_iter().map(|x| x / sum))
            .collect()
    };
    for guess_best in [true, false] {
        let mut observed: BTreeMap<u32, f64> = BTreeMap::new();
        let mut expected: BTreeMap<u32, f64> = BTreeMap::new();
        let mut drafted = 0;
        for seed in 0..seeds {
            // Three tokens: the first from the prompt's logits, the second verified
            // against the draft, the third from the row after it.
            let opts = options(
                3,
                SamplerConfig {
                    temperature,
                    top_k: Some(top_k),
                    seed,
                    ..SamplerConfig::default()
                },
                Some(1),
            );
            // Draft for the second token: the most likely one, or one outside the
            // top-k that can never be chosen.
            struct Fixed<'a> {
                best: bool,
                dist: &'a mut dyn FnMut(u32) -> Vec<(u32, f64)>,
            }
            impl Drafter for Fixed<'_> {
                fn draft(&mut self, context: &[u32], n: usize) -> RtResult<Vec<u32>> {
                    let d = (self.dist)(*context.last().expect("context"));
                    let top = d[0].0;
                    let outside = (0..VOCAB)
                        .find(|t| !d.iter().any(|x| x.0 == *t))
                        .expect("a token");
                    Ok(vec![if self.best { top } else { outside }; n])
                }
            }
            let mut drafter = Fixed {
                best: guess_best,
                dist: &mut dist,
            };
            let g =
                generate_ids_drafted(&mut fresh(&p), Some(&mut drafter), &prompt, &opts, |_| true)
                    .expect("speculative");
            assert_eq!(g.ids.len(), 3);
            drafted += g.drafted;
            *observed.entry(g.ids[1]).or_default() += 1.0;
            for (t, q) in dist(g.ids[0]) {
                *expected.entry(t).or_default() += q;
            }
        }
        assert_eq!(drafted as u64, seeds, "every run verified one draft token");
        // Bins with enough expected mass; the rest pooled.
        let (mut chi, mut bins, mut rest_o, mut rest_e) = (0.0, 0usize, 0.0, 0.0);
        for (t, e) in &expected {
            let o = observed.get(t).copied().unwrap_or(0.0);
            if *e >= 5.0 {
                chi += (o - e).powi(2) / e;
                bins += 1;
            } else {
                rest_o += o;
                rest_e += e;
            }
        }
        let outside: f64 = observed
            .iter()
            .filter(|(t, _)| !expected.contains_key(t))
            .map(|(_, o)| o)
            .sum();
        assert_eq!(outside, 0.0, "tokens outside the top-k were sampled");
        if rest_e > 0.0 {
            chi += (rest_o - rest_e).powi(2) / rest_e.max(1e-9);
            bins += 1;
        }
        let df = (bins - 1) as f64;
        // z = 3.7: a false alarm once in ten thousand runs; the seeds are fixed, so
        // the test is deterministic.
        let limit = chi_square_quantile(df, 3.7);
        assert!(
            bins >= 3 && chi < limit,
            "draft of the {} token: chi-square {chi:.1} over {bins} bins (limit {limit:.1})",
            if guess_best { "best" } else { "impossible" }
        );
    }
}

fn generate_json(model: &std::path::Path, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let m = model.to_str().expect("utf-8 path");
    let mut args = vec!["generate", "-m", m, "-p", prompt, "-n", "48", "--json"];
    args.extend_from_slice(extra);
    let out = llama(&args);
    assert!(
        out.status.success(),
        "llama {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// On a real file, a prompt that asks for a copy of its own text: `--lookup` drafts
/// from it, most drafts are accepted, and the token ids are plain greedy decoding's.
/// A draft model (the file itself) gives the same ids too.
#[test]
fn lookup_and_draft_model_keep_real_greedy_ids() {
    let model = real_model_path();
    let prompt = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts/bench/prompts/code-edit.txt"),
    )
    .expect("the code-edit prompt");
    let plain = generate_json(&model, &prompt, &[]);
    let lookup = generate_json(&model, &prompt, &["--lookup"]);
    assert_eq!(lookup["ids"], plain["ids"], "--lookup changed the output");
    let t = &lookup["timings"];
    let (drafted, accepted) = (
        t["drafted"].as_u64().unwrap(),
        t["accepted"].as_u64().unwrap(),
    );
    // The answer copies the function: most of it is drafted and taken.
    assert!(drafted > 0 && accepted * 2 > drafted, "drafts: {t}");
    assert_eq!(plain["timings"]["drafted"], 0);
    let m = model.to_str().expect("utf-8 path");
    let drafted_by_model =
        generate_json(&model, &prompt, &["--draft-model", m, "--draft-max", "4"]);
    assert_eq!(
        drafted_by_model["ids"], plain["ids"],
        "--draft-model changed the output"
    );
    assert!(drafted_by_model["timings"]["accepted"].as_u64().unwrap() > 0);
}

/// A draft model whose tokenizer differs is refused in one line that says so.
#[test]
fn a_draft_model_with_another_tokenizer_is_refused() {
    let model = real_model_path();
    let other = qwen25_path();
    let out = llama(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "hello",
        "--draft-model",
        other.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--draft-model") && err.contains("tokenizer differs"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Out-of-range draft lengths are refused by the flag parser.
    let out = llama(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "x",
        "--lookup",
        "--draft-max",
        "0",
    ]);
    assert!(!out.status.success());
}

/// `llama serve --lookup`: the same greedy text as without it, the drafts in `usage`
/// (OpenAI's accepted and rejected prediction tokens) adding up to what `/metrics`
/// counts, and some accepted on a prompt that asks for a passage back.
#[test]
fn serve_with_lookup_reports_drafts_in_usage_and_metrics() {
    use crate::serve_cli::{runtime, Served};
    let passage = "The quick brown fox jumps over the lazy dog. The quick brown fox \
                   jumps over the lazy dog again, and the dog sleeps on.";
    let body = serde_json::json!({
        "messages": [{ "role": "user", "content": format!("Repeat this text exactly: {passage}") }],
        "max_tokens": 40,
        "temperature": 0,
    });
    let rt = runtime();
    let ask = |served: &Served| {
        rt.block_on(async {
            let v: serde_json::Value = reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", served.base))
                .json(&body)
                .send()
                .await
                .expect("request")
                .json()
                .await
                .expect("json");
            v
        })
    };
    let plain = ask(&Served::start(&[]));
    let served = Served::start(&["--lookup"]);
    let fast = ask(&served);
    assert_eq!(
        fast["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"],
        "lookup changed the greedy text"
    );
    let details = &fast["usage"]["completion_tokens_details"];
    let accepted = details["accepted_prediction_tokens"]
        .as_u64()
        .expect("accepted");
    let rejected = details["rejected_prediction_tokens"]
        .as_u64()
        .expect("rejected");
    assert!(
        accepted > 0,
        "no draft accepted on a repeated passage: {details}"
    );
    let plain_details = &plain["usage"]["completion_tokens_details"];
    assert_eq!(plain_details["accepted_prediction_tokens"], 0);
    let metrics = rt.block_on(async {
        reqwest::get(format!("{}/metrics", served.base))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    let counted = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    assert_eq!(counted("llama_draft_tokens_total"), accepted + rejected);
    assert_eq!(counted("llama_draft_tokens_accepted_total"), accepted);
}
