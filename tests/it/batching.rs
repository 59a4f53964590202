//! Many sequences per step: a batched step computes for each sequence what the same
//! tokens compute alone, and the scheduler's sequences produce what they produce
//! alone, whatever joins, leaves or shares a prefix around them.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::common::*;
use burn::tensor::Device;
use llama::graph::{KvType, PageCount, Pipeline, Program, Rows, Sequence, Taps};
use llama::runtime::{
    generate_ids, BatchOptions, Event, FinishReason, GenerateOptions, RuntimeError, SamplerConfig,
    Scheduler, Session,
};
use proptest::prelude::*;

fn program(name: &str, device: &Device) -> Program {
    Program::new(graph(name, device, &Pipeline::standard()), device.clone()).expect("program")
}

fn logits_of(out: llama::graph::RunOutput) -> Vec<f32> {
    out.outputs[0].to_f32_vec().expect("logits")
}

fn assert_close(what: &str, want: &[f32], got: &[f32]) {
    assert_eq!(want.len(), got.len(), "{what}: lengths differ");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let diff = max_abs_diff(want, got);
    assert!(
        diff <= 1e-4 * scale,
        "{what}: logits differ by {diff} (largest logit {scale})"
    );
}

/// Three sequences at different positions (one decoding, two with prompt chunks of
/// different lengths) run as one step and each alone give the same logits, rows and
/// last rows alike, and leave the same caches behind.
fn batched_step_matches_single_runs(name: &str, device: &Device) {
    let p = program(name, device);
    // (tokens already cached, tokens in this step)
    let plan = [(7usize, 1usize), (0, 5), (3, 4)];
    let fresh = || {
        plan.iter()
            .enumerate()
            .map(|(i, &(past, _))| {
                let mut c = p.new_cache_of(32, KvType::F32).expect("cache");
                if past > 0 {
                    p.run(&ids(past, i as u32), &mut c, &Taps::None)
                        .expect("history");
                }
                c
            })
            .collect::<Vec<_>>()
    };
    let step_ids: Vec<Vec<u32>> = plan
        .iter()
        .enumerate()
        .map(|(i, &(_, n))| ids(n, 10 + i as u32))
        .collect();
    for rows in [Rows::All, Rows::Last] {
        let mut alone = fresh();
        let mut want = Vec::new();
        for (c, t) in alone.iter_mut().zip(&step_ids) {
            want.extend(logits_of(
                p.run_rows(t, c, &Taps::None, rows).expect("alone"),
            ));
        }
        let mut together = fresh();
        let mut seqs: Vec<Sequence<'_>> = together
            .iter_mut()
            .zip(&step_ids)
            .map(|(cache, tokens)| Sequence { tokens, cache })
            .collect();
        let got = logits_of(p.run_batch(&mut seqs, &Taps::None, rows).expect("batch"));
        assert_close(&format!("{name} {rows:?}"), &want, &got);
        // The caches moved on alike: a next decode step agrees too.
        for (i, (a, b)) in alone.iter_mut().zip(together.iter_mut()).enumerate() {
            assert_eq!(a.len(), b.len());
            let t = [ids(1, 50 + i as u32)[0]];
            let x = logits_of(p.run(&t, a, &Taps::None).expect("next"));
            let y = logits_of(p.run(&t, b, &Taps::None).expect("next"));
            assert_close(&format!("{name} {rows:?} after, sequence {i}"), &x, &y);
        }
    }
}

#[test]
fn batched_step_matches_single_runs_on_flex() {
    for name in TINY {
        batched_step_matches_single_runs(name, &flex());
    }
}

#[test]
fn batched_step_matches_single_runs_on_ndarray() {
    for name in TINY {
        batched_step_matches_single_runs(name, &ndarray());
    }
}

#[test]
fn batched_step_matches_single_runs_on_wgpu() {
    // A full-attention family and the sliding-window one.
    for name in ["llama3", "mistral"] {
        batched_step_matches_single_runs(name, &wgpu());
    }
}

#[test]
fn a_failed_batched_step_moves_no_cache() {
    let device = flex();
    let p = program("llama3", &device);
    let mut a = p.new_cache_of(8, KvType::F32).expect("cache");
    let mut b = p.new_cache_of(4, KvType::F32).expect("cache");
    let (ta, tb) = (ids(3, 1), ids(5, 2));
    let mut seqs = vec![
        Sequence {
            tokens: &ta,
            cache: &mut a,
        },
        Sequence {
            tokens: &tb,
            cache: &mut b,
        },
    ];
    let err = p
        .run_batch(&mut seqs, &Taps::None, Rows::Last)
        .expect_err("the second sequence does not fit its cache");
    assert!(err.to_string().contains('4'), "{err}");
    assert_eq!((a.len(), b.len()), (0, 0));
}

/// What a request produces alone, in a session of its own.
fn solo(p: &Program, prompt: &[u32], opts: &GenerateOptions) -> Vec<u32> {
    let mut s = Session::with_cache_type(p.clone(), 64, KvType::F32).expect("session");
    generate_ids(&mut s, prompt, opts, |_| true)
        .expect("solo run")
        .ids
}

fn sampled(max_tokens: usize, seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig {
            seed,
            ..SamplerConfig::chat()
        },
        ..GenerateOptions::default()
    }
}

/// Each sequence's streamed ids, checked against what it reports when done.
#[derive(Default)]
struct Collector {
    streamed: BTreeMap<u64, Vec<u32>>,
    done: BTreeMap<u64, (Vec<u32>, FinishReason)>,
}

impl Collector {
    fn take(&mut self, events: Vec<Event>) {
        for e in events {
            self.event(e);
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Token { seq, id, .. } => self.streamed.entry(seq).or_default().push(id),
            Event::Text { .. } => {}
            Event::Done { seq, generation } => {
                assert_eq!(
                    self.streamed.get(&seq).cloned().unwrap_or_default(),
                    generation.ids,
                    "sequence {seq} streamed what it reports"
                );
                self.done.insert(seq, (generation.ids, generation.finish));
            }
            Event::Failed { seq, error } => panic!("sequence {seq} failed: {error}"),
        }
    }

    /// Runs the scheduler to the end.
    fn drain(mut self, s: &mut Scheduler<'_>) -> BTreeMap<u64, (Vec<u32>, FinishReason)> {
        s.run(|e| self.event(e));
        self.done
    }
}

/// Six requests, three of them arriving while the first decode, two sharing a prefix
/// with a third: each produces what it produces alone.
fn scheduled_sequences_match_solo_runs(name: &str, device: &Device) {
    let p = program(name, device);
    let opts = BatchOptions {
        step_tokens: 6, // prompts run in chunks beside the decoding sequences
        min_prefix: 4,
        ..BatchOptions::default()
    };
    let mut s = Scheduler::for_program(&p, 64, KvType::F32, opts).expect("scheduler");
    let shared = ids(9, 7);
    let requests: Vec<(Vec<u32>, GenerateOptions)> = vec![
        (ids(5, 1), greedy(12)),
        (ids(17, 2), sampled(10, 42)),
        ([shared.clone(), ids(3, 3)].concat(), greedy(8)),
        ([shared.clone(), ids(4, 4)].concat(), sampled(9, 7)),
        (shared.clone(), greedy(6)),
        (ids(1, 5), greedy(5)),
    ];
    let mut seqs = Vec::new();
    for (prompt, o) in &requests[..3] {
        seqs.push(s.submit(prompt.clone(), o.clone()).expect("submit"));
    }
    let mut c = Collector::default();
    c.take(s.step());
    c.take(s.step());
    // Later arrivals join sequences already decoding.
    for (prompt, o) in &requests[3..] {
        seqs.push(s.submit(prompt.clone(), o.clone()).expect("submit"));
    }
    let done = c.drain(&mut s);
    for (seq, (prompt, o)) in seqs.iter().zip(&requests) {
        assert_eq!(done[seq].0, solo(&p, prompt, o), "sequence {seq}");
    }
    let stats = s.stats();
    assert!(stats.widest_step >= 3, "{stats:?}");
    // A sliding-window cache that has moved past a prefix cannot give it: such a
    // family runs the prefix again (and still matches).
    let windowed = p.graph().nodes().iter().any(|n| {
        matches!(
            n.op,
            llama::graph::Op::KvAppend {
                window: Some(_),
                ..
            }
        )
    });
    assert!(
        windowed || stats.prompt_tokens_reused >= 8,
        "the shared prefix was reused: {stats:?}"
    );
    assert_eq!(s.running() + s.waiting(), 0);
    assert_eq!(
        s.kv_used(),
        s.prefix_positions(),
        "only the prefix cache holds positions"
    );
}

#[test]
fn scheduled_sequences_match_solo_runs_on_flex() {
    scheduled_sequences_match_solo_runs("llama3", &flex());
    scheduled_sequences_match_solo_runs("gemma", &flex());
}

#[test]
fn scheduled_sequences_match_solo_runs_on_ndarray() {
    scheduled_sequences_match_solo_runs("llama3", &ndarray());
}

#[test]
fn scheduled_sequences_match_solo_runs_on_wgpu() {
    scheduled_sequences_match_solo_runs("mistral", &wgpu());
}

#[test]
fn the_kv_budget_refuses_with_numbers_and_makes_others_wait() {
    let device = flex();
    let p = program("llama3", &device);
    let opts = BatchOptions {
        kv_budget: 40,
        prefix_cache: false,
        ..BatchOptions::default()
    };
    let mut s = Scheduler::for_program(&p, 64, KvType::F32, opts).expect("scheduler");
    match s.submit(ids(30, 1), greedy(20)) {
        Err(RuntimeError::KvBudget { needed, budget }) => assert_eq!((needed, budget), (49, 40)),
        other => panic!("expected a budget refusal, got {other:?}"),
    }
    let a = s.submit(ids(10, 1), greedy(15)).expect("fits"); // 24 positions
    let b = s.submit(ids(10, 2), greedy(15)).expect("fits alone"); // 24 more
    let mut c = Collector::default();
    c.take(s.step());
    assert_eq!(s.state(a), Some(llama::runtime::SeqState::Running));
    assert_eq!(s.state(b), Some(llama::runtime::SeqState::Waiting));
    assert!(s.kv_used() <= 40);
    let done = c.drain(&mut s);
    assert_eq!(done.len(), 2, "the waiting sequence ran once room was made");
    assert_eq!(done[&b].0, solo(&p, &ids(10, 2), &greedy(15)));
}

/// Sequences that start from a kept prefix share its whole pages and are charged
/// only for the rest of their reservation: three sequences whose reservations add up
/// to twice the budget run at once, the entry they share stays until they end, and
/// each produces what it produces alone.
#[test]
fn sequences_sharing_a_prefix_are_charged_for_what_they_do_not_share() {
    let p = program("llama3", &flex());
    let opts = BatchOptions {
        kv_budget: 300,
        min_prefix: 16,
        step_tokens: 256,
        ..BatchOptions::default()
    };
    let mut s = Scheduler::for_program(&p, 256, KvType::F16, opts).expect("scheduler");
    let prompt = ids(130, 7);
    // 133 positions reserved; once prefilled, its prompt is kept (130 more).
    let a = s.submit(prompt.clone(), greedy(4)).expect("fits");
    let mut c = Collector::default();
    c.take(s.step());
    assert_eq!(s.kv_used(), 133 + 130);
    // Each reserves 134 positions, of which the 128 of two whole pages are shared.
    let tails: Vec<Vec<u32>> = (0..2u32)
        .map(|i| {
            let mut t = prompt.clone();
            t.push(ids(1, 40 + i)[0]);
            t
        })
        .collect();
    let seqs: Vec<u64> = tails
        .iter()
        .map(|t| s.submit(t.clone(), greedy(4)).expect("fits"))
        .collect();
    for &q in &seqs {
        assert_eq!(s.state(q), Some(llama::runtime::SeqState::Running));
    }
    assert_eq!(s.kv_used(), 133 + 130 + 2 * (134 - 128));
    assert_eq!(s.running(), 3);
    // With the prefix cache asked to empty, the entry they share stays.
    s.clear_prefixes();
    assert_eq!(s.prefix_positions(), 130);
    let done = c.drain(&mut s);
    let alone = |t: &[u32]| {
        let mut s = Session::with_cache_type(p.clone(), 256, KvType::F16).expect("session");
        generate_ids(&mut s, t, &greedy(4), |_| true)
            .expect("alone")
            .ids
    };
    assert_eq!(done[&a].0, alone(&prompt));
    for (q, t) in seqs.iter().zip(&tails) {
        assert_eq!(done[q].0, alone(t), "sequence {q}");
    }
    assert!(s.stats().prompt_tokens_reused >= 2 * 130);
    s.clear_prefixes();
    assert_eq!(
        s.kv_used(),
        0,
        "nothing is charged once every sequence ended"
    );
}

#[test]
fn cancelling_one_sequence_leaves_the_others_alone() {
    let device = flex();
    let p = program("qwen2", &device);
    let mut s =
        Scheduler::for_program(&p, 64, KvType::F32, BatchOptions::default()).expect("scheduler");
    let flag = Arc::new(AtomicBool::new(false));
    let flagged = GenerateOptions {
        cancel: Some(flag.clone()),
        ..greedy(20)
    };
    let a = s.submit(ids(6, 1), greedy(20)).expect("a");
    let b = s.submit(ids(6, 2), flagged).expect("b");
    let c = s.submit(ids(6, 3), greedy(20)).expect("c");
    let w = s.submit(ids(6, 4), greedy(20)).expect("w");
    let mut events = Collector::default();
    for _ in 0..3 {
        events.take(s.step());
    }
    flag.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(s.cancel(c));
    assert!(s.cancel(w));
    let done = events.drain(&mut s);
    assert_eq!(done[&a].0, solo(&p, &ids(6, 1), &greedy(20)));
    for seq in [b, c] {
        assert_eq!(done[&seq].1, FinishReason::Cancelled);
        let alone = solo(&p, &ids(6, seq as u32 + 1), &greedy(20));
        assert!(
            alone.starts_with(&done[&seq].0),
            "a cancelled sequence's ids are a prefix"
        );
    }
}

#[test]
fn bad_requests_are_refused_at_submission() {
    let device = flex();
    let p = program("llama3", &device);
    let mut s =
        Scheduler::for_program(&p, 32, KvType::F32, BatchOptions::default()).expect("scheduler");
    assert!(matches!(
        s.submit(Vec::new(), greedy(4)),
        Err(RuntimeError::EmptyPrompt)
    ));
    assert!(matches!(
        s.submit(vec![5, 9999], greedy(4)),
        Err(RuntimeError::TokenOutOfRange { id: 9999, .. })
    ));
    assert!(matches!(
        s.submit(ids(30, 1), greedy(10)),
        Err(RuntimeError::ContextExceeded { context: 32, .. })
    ));
    let shifting = GenerateOptions {
        context_shift: Some(4),
        ..greedy(4)
    };
    assert!(matches!(
        s.submit(ids(3, 1), shifting),
        Err(RuntimeError::Options(m)) if m.contains("context shift")
    ));
    let bad_sampler = GenerateOptions {
        sampler: SamplerConfig {
            temperature: -1.0,
            ..SamplerConfig::default()
        },
        ..greedy(4)
    };
    assert!(matches!(
        s.submit(ids(3, 1), bad_sampler),
        Err(RuntimeError::Sampling(_))
    ));
    assert!(s.is_idle());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Random arrivals, prompt lengths, token limits, samplers, cancellations and
    /// shared prefixes: every sequence that finishes produces what it produces
    /// alone; a cancelled one a prefix of that.
    #[test]
    fn random_traffic_matches_solo_runs(
        reqs in prop::collection::vec(
            (1usize..14, 0u32..4, 1usize..10, any::<bool>(), 0u64..3, 0usize..6, any::<bool>()),
            1..9,
        ),
        step_tokens in 1usize..12,
        // A family with full attention and one with a sliding window.
        family in prop::sample::select(vec!["gemma", "mistral"]),
    ) {
        let device = flex();
        let p = program(family, &device);
        let opts = BatchOptions { step_tokens, min_prefix: 3, kv_budget: 80, ..BatchOptions::default() };
        let mut s = Scheduler::for_program(&p, 64, KvType::F32, opts).expect("scheduler");
        let shared = ids(6, 99);
        let mut live: Vec<(u64, Vec<u32>, GenerateOptions, Option<usize>)> = Vec::new();
        let mut done = BTreeMap::new();
        let mut pending: Vec<_> = reqs.into_iter().enumerate().collect();
        let mut step = 0usize;
        while !pending.is_empty() || !s.is_idle() {
            // Arrivals: whoever's turn has come.
            pending.retain(|(i, (len, seed, max, share, sampler, arrive, cancel))| {
                if *arrive > step { return true; }
                let own = ids(*len, *seed + *i as u32);
                let prompt = if *share { [shared.clone(), own].concat() } else { own };
                let o = if *sampler == 0 { greedy(*max) } else { sampled(*max, *sampler) };
                let id = s.submit(prompt.clone(), o.clone()).expect("submit");
                live.push((id, prompt, o, cancel.then_some(step + 2)));
                false
            });
            for (id, _, _, at) in &live {
                if *at == Some(step) { s.cancel(*id); }
            }
            for e in s.step() {
                match e {
                    Event::Done { seq, generation } => { done.insert(seq, generation); }
                    Event::Failed { seq, error } => panic!("sequence {seq}: {error}"),
                    _ => {}
                }
            }
            step += 1;
            prop_assert!(step < 500, "the scheduler stalls");
        }
        for (id, prompt, o, _) in &live {
            let g = &done[id];
            let want = solo(&p, prompt, o);
            if g.finish == FinishReason::Cancelled {
                prop_assert!(want.starts_with(&g.ids));
            } else {
                prop_assert_eq!(&g.ids, &want, "sequence {}", id);
            }
        }
        prop_assert_eq!(s.kv_used(), s.prefix_positions());
    }
}

/// A cache that starts from another's first positions continues exactly as the
/// original does; a sliding-window cache whose ring has moved past them refuses.
#[test]
fn a_copied_prefix_continues_like_the_original() {
    for (name, device) in [
        ("llama3", flex()),
        ("mistral", flex()),
        ("mistral", ndarray()),
    ] {
        let p = program(name, &device);
        let t = ids(12, 3); // past the tiny Mistral's window of 8
        let next = [ids(1, 9)[0]];
        let fresh = || p.new_cache_of(32, KvType::F32).expect("cache");
        let mut a = fresh();
        let all = logits_of(p.run(&t, &mut a, &Taps::None).expect("prompt"));
        // All of it, the ring as it is.
        let mut b = fresh();
        b.copy_prefix(&a, t.len()).expect("a whole copy");
        let want = logits_of(p.run(&next, &mut a.clone(), &Taps::None).expect("next"));
        let got = logits_of(p.run(&next, &mut b, &Taps::None).expect("next"));
        assert_close(&format!("{name}: after a whole copy"), &want, &got);
        // The first five, then the rest run again.
        let mut c = fresh();
        match c.copy_prefix(&a, 5) {
            Ok(()) => {
                let rest = logits_of(p.run(&t[5..], &mut c, &Taps::None).expect("rest"));
                let vocab = rest.len() / (t.len() - 5);
                assert_close(
                    &format!("{name}: after a partial copy"),
                    &all[5 * vocab..],
                    &rest,
                );
            }
            Err(e) => assert_eq!(name, "mistral", "{name} refused a partial copy: {e}"),
        }
    }
}

/// Caches share pages of 64 positions: a copied prefix and a clone hold the prefix's
/// pages without copying them, a cache that writes after a shared prefix copies only
/// the page it writes into (and makes new ones), and what the other caches compute
/// does not change by a bit.
#[test]
fn a_shared_prefix_shares_pages_and_copies_on_write() {
    let p = program("llama3", &flex());
    let cache = || p.new_cache_of(256, KvType::F16).expect("cache");
    let mut a = cache();
    p.run(&ids(150, 5), &mut a, &Taps::None).expect("prompt");
    // 150 positions: three pages for each layer's keys and each layer's values.
    let held = a.pages().held;
    assert!(held > 0 && held % 3 == 0, "{held} pages");
    let per_page = held / 3;
    assert_eq!(a.pages().own, held);
    let mut b = cache();
    b.copy_prefix(&a, 100).expect("a prefix");
    let shared = PageCount {
        held: 2 * per_page,
        own: 0,
    };
    assert_eq!(b.pages(), shared, "a copied prefix holds shared pages");
    assert_eq!(a.pages().own, per_page, "only a's last page is its own");
    let next = ids(1, 9);
    let mut fork = a.clone();
    assert_eq!(fork.pages().own, 0, "a clone shares every page");
    let want = logits_of(p.run(&next, &mut fork, &Taps::None).expect("next"));
    // Positions 100..160 of other tokens: page 1 copied, page 2 new, page 0 shared.
    p.run(&ids(60, 11), &mut b, &Taps::None)
        .expect("b's own tokens");
    assert_eq!(
        b.pages(),
        PageCount {
            held: 3 * per_page,
            own: 2 * per_page
        }
    );
    let got = logits_of(p.run(&next, &mut a, &Taps::None).expect("next"));
    assert!(
        want.iter()
            .zip(&got)
            .all(|(w, g)| w.to_bits() == g.to_bits()),
        "a's logits changed after caches sharing its pages wrote"
    );
    // And b computes what a cache that ran all of its tokens computes.
    let mut whole = cache();
    let mut all = ids(150, 5)[..100].to_vec();
    all.extend(ids(60, 11));
    p.run(&all, &mut whole, &Taps::None).expect("whole");
    let want = logits_of(p.run(&next, &mut whole, &Taps::None).expect("next"));
    let got = logits_of(p.run(&next, &mut b, &Taps::None).expect("next"));
    assert_close("after a shared prefix", &want, &got);
}

/// A finished sequence leaves its prompt and what it generated in the prefix cache:
/// a next turn that continues it copies all of that and runs only what is new, and
/// still produces what it produces alone.
#[test]
fn a_next_turn_reuses_the_previous_turns_answer() {
    let p = program("llama3", &flex());
    let mut s =
        Scheduler::for_program(&p, 64, KvType::F32, BatchOptions::default()).expect("scheduler");
    let first_prompt = ids(20, 3);
    let first = s.submit(first_prompt.clone(), greedy(6)).expect("submit");
    let mut c = Collector::default();
    s.run(|e| c.event(e));
    let answer = c.done[&first].0.clone();
    assert_eq!(answer.len(), 6);
    // The last generated token was never run, so five of six are cached.
    let next_prompt = [first_prompt.clone(), answer.clone(), ids(4, 9)].concat();
    let mut cached = None;
    let mut got = Vec::new();
    s.submit(next_prompt.clone(), greedy(5)).expect("submit");
    s.run(|e| match e {
        Event::Token { id, .. } => got.push(id),
        Event::Done { generation, .. } => cached = Some(generation.cached_tokens),
        Event::Failed { error, .. } => panic!("{error}"),
        Event::Text { .. } => {}
    });
    assert_eq!(cached, Some(first_prompt.len() + 5));
    assert_eq!(got, solo(&p, &next_prompt, &greedy(5)));
}

/// Log-probabilities come with each token when asked for: the model's own (a
/// log-softmax of the raw logits), the chosen one among the alternatives.
#[test]
fn tokens_carry_log_probabilities_when_asked() {
    let p = program("llama3", &flex());
    let mut s =
        Scheduler::for_program(&p, 64, KvType::F32, BatchOptions::default()).expect("scheduler");
    let prompt = ids(7, 2);
    let opts = GenerateOptions {
        logprobs: Some(3),
        ..greedy(4)
    };
    s.submit(prompt.clone(), opts).expect("submit");
    let mut seen = Vec::new();
    s.run(|e| {
        if let Event::Token { id, logprob, .. } = e {
            seen.push((id, logprob.expect("a logprob")));
        }
    });
    assert_eq!(seen.len(), 4);
    // The first token's distribution, from a session alone.
    let mut session = Session::with_cache_type(p.clone(), 64, KvType::F32).expect("session");
    let logits = session.prefill_last(&prompt).expect("prefill");
    let lsm = llama::runtime::log_softmax(&logits);
    let (id, lp) = &seen[0];
    assert!((lp.logprob - lsm[*id as usize]).abs() < 1e-4);
    assert_eq!(lp.top.len(), 3);
    assert_eq!(lp.top[0].0, *id, "greedy picks the most likely");
    let total: f64 = lsm.iter().map(|&l| (l as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-4);
    for (_, lp) in &seen {
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}
