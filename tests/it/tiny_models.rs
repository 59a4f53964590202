//! Tiny random-weight Llamas made by transformers: our logits, greedy ids and KV cache
//! against theirs, on every CPU backend.

use crate::common::*;
use llama::graph::{Pipeline, Program, Taps};
use llama::runtime::{argmax, generate_greedy};

fn check_logits(name: &str, pipeline: &Pipeline) {
    let reference = reference(name);
    let mut s = session(name, &flex(), pipeline);
    let logits = s.prefill(&reference.input_ids).expect("prefill");
    assert_eq!(logits.rows, reference.logits.len());
    for (pos, want) in reference.logits.iter().enumerate() {
        let got = logits.row(pos);
        let diff = max_abs_diff(got, want);
        assert!(
            diff <= 1e-4,
            "{name} position {pos}: max |diff| {diff} > 1e-4"
        );
        assert_eq!(
            argmax(got),
            reference.argmax[pos],
            "{name} position {pos}: argmax"
        );
    }
}

#[test]
fn logits_match_transformers_raw_graph() {
    for name in TINY {
        check_logits(name, &Pipeline::none());
    }
}

#[test]
fn logits_match_transformers_optimized_graph() {
    for name in TINY {
        check_logits(name, &Pipeline::standard());
    }
}

#[test]
fn greedy_ids_match_transformers() {
    for name in TINY {
        let reference = reference(name);
        let mut s = session(name, &flex(), &Pipeline::standard());
        let n = reference.greedy_ids.len();
        let got = generate_greedy(&mut s, &reference.greedy_prompt_ids, n, &[], |_| {})
            .expect("generate");
        // Past a near-tie a correct runtime may take the other branch; compare up to it.
        let trusted = reference
            .greedy_margins
            .iter()
            .position(|&m| m < 0.02)
            .unwrap_or(n);
        assert_eq!(
            got.ids[..trusted],
            reference.greedy_ids[..trusted],
            "{name}: greedy ids"
        );
        insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!(format!("greedy_ids__{name}"), format!("{:?}", got.ids));
        });
    }
}

#[test]
fn kv_cache_prefill_then_decode_equals_full_forward() {
    for name in TINY {
        let ids = reference(name).input_ids;
        let mut s = session(name, &flex(), &Pipeline::standard());
        let full = full_forward(&mut s, &ids);
        for n in [1, 4, 11, ids.len() - 1] {
            s.reset();
            let first = s.prefill(&ids[..n]).expect("prefill");
            let diff = max_abs_diff(first.last(), &full[n - 1]);
            assert!(diff <= 1e-5, "{name} N={n}: prefill row differs by {diff}");
            for (pos, &id) in ids.iter().enumerate().skip(n) {
                let row = s.decode(id).expect("decode");
                let diff = max_abs_diff(&row, &full[pos]);
                assert!(
                    diff <= 1e-5,
                    "{name} N={n}: decode at {pos} differs by {diff}"
                );
            }
            assert_eq!(s.position(), ids.len());
        }
    }
}

#[test]
fn an_f16_kv_cache_holds_f16_values_and_stays_near_the_f32_cache() {
    for name in TINY {
        let ids = reference(name).input_ids;
        let g = graph(name, &flex(), &Pipeline::standard());
        let program = || Program::new(g.clone(), flex()).expect("program");
        let mut exact = session_of(g.clone(), &flex(), 64);
        let mut half =
            llama::runtime::Session::with_cache_type(program(), 64, llama::graph::KvType::F16)
                .expect("session");
        let n = ids.len() / 2;
        let (a, b) = (
            exact.prefill(&ids[..n]).unwrap(),
            half.prefill(&ids[..n]).unwrap(),
        );
        // Attention reads every position as stored, a prompt's own ones included: the
        // prompt split in two steps gives bitwise the same last row. Checked with the
        // weights in Q8_0 blocks, whose kernels compute a row the same however many
        // rows share the step; burn's f32 matmul blocks by the rows in a step, and its
        // last-bit differences can tip a key's f16 rounding (1e-5 of a logit here).
        let q8 = graph(name, &flex(), &Pipeline::standard_cpu(true));
        let q8_session = || {
            let p = Program::new(q8.clone(), flex()).expect("program");
            llama::runtime::Session::with_cache_type(p, 64, llama::graph::KvType::F16)
                .expect("session")
        };
        let whole = q8_session().prefill(&ids[..n]).unwrap();
        let mut split = q8_session();
        split.prefill(&ids[..n - 1]).unwrap();
        let one_by_one = split.prefill(&ids[n - 1..n]).unwrap();
        assert!(
            one_by_one
                .last()
                .iter()
                .zip(whole.last())
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: a prompt in one step and in two differ by {}",
            max_abs_diff(one_by_one.last(), whole.last())
        );
        let mut worst = max_abs_diff(a.last(), b.last());
        let mut spread = a.last().iter().fold(0f32, |m, x| m.max(x.abs()));
        // Later steps read them rounded too: decode steps, and a second prompt.
        let (rest, more) = ids[n..].split_at((ids.len() - n) / 2);
        for &id in rest {
            let (a, b) = (exact.decode(id).unwrap(), half.decode(id).unwrap());
            worst = worst.max(max_abs_diff(&a, &b));
            spread = spread.max(a.iter().fold(0f32, |m, x| m.max(x.abs())));
        }
        let (a, b) = (exact.prefill(more).unwrap(), half.prefill(more).unwrap());
        worst = worst.max(max_abs_diff(a.last(), b.last()));
        // Host layers (no sliding window: their rows are the positions so far, not a
        // ring) keep keys and values as f16: every cached value is one.
        let state = half.state().expect("state");
        let mut host_layers = 0;
        for l in state
            .cache
            .layers
            .iter()
            .filter(|l| l.rows == state.cache.len)
        {
            for &x in l.keys.iter().chain(&l.values) {
                assert_eq!(
                    half::f16::from_f32(x).to_f32(),
                    x,
                    "{name}: {x} is not an f16"
                );
            }
            host_layers += 1;
        }
        if host_layers == 0 {
            // Mistral's layers all have a window (kept as f32 tensors): nothing rounds.
            assert_eq!(*name, "mistral", "{name}: no host KV layers");
            assert_eq!(worst, 0.0, "{name}");
            continue;
        }
        let exact_state = exact.state().expect("state");
        assert_ne!(
            exact_state.cache, state.cache,
            "{name}: the f32 cache is rounded too"
        );
        // Rounding keys and values by 2^-11 moves the logits a little, not a lot.
        assert!(
            worst > 0.0 && worst <= 1e-2 * spread.max(1.0),
            "{name}: f16 cache logits differ by {worst} (largest logit {spread})"
        );
    }
}

#[test]
fn kv_check_fails_for_an_off_by_one_position() {
    // The equivalence check above must be able to fail: decoding one position early
    // (the cache forgets the last prefilled token) must give different logits.
    let ids = reference("llama3").input_ids;
    let mut s = session("llama3", &flex(), &Pipeline::standard());
    let full = full_forward(&mut s, &ids);
    let n = 8;
    s.reset();
    s.prefill(&ids[..n]).expect("prefill");
    s.truncate(n - 1).expect("a full cache rewinds");
    let row = s.decode(ids[n]).expect("decode");
    let diff = max_abs_diff(&row, &full[n]);
    assert!(
        diff > 1e-3,
        "an off-by-one position went unnoticed (diff {diff})"
    );
}

#[test]
fn ndarray_and_flex_agree() {
    for name in TINY {
        let ids = reference(name).input_ids;
        let mut a = session(name, &flex(), &Pipeline::standard());
        let mut b = session(name, &ndarray(), &Pipeline::standard());
        let (fa, fb) = (full_forward(&mut a, &ids), full_forward(&mut b, &ids));
        for (pos, (x, y)) in fa.iter().zip(&fb).enumerate() {
            let diff = max_abs_diff(x, y);
            assert!(
                diff <= 1e-5,
                "{name} position {pos}: ndarray vs flex {diff}"
            );
        }
    }
}

#[test]
fn a_failed_step_leaves_the_session_unchanged() {
    let ids = reference("llama3").input_ids;
    let mut s = session("llama3", &flex(), &Pipeline::standard());
    let full = full_forward(&mut s, &ids);
    s.reset();
    s.prefill(&ids[..5]).expect("prefill");
    assert!(
        s.decode(100_000).is_err(),
        "an id past the vocabulary is refused"
    );
    assert!(s.prefill(&[]).is_err(), "an empty step is refused");
    let too_long = vec![1u32; s.context()];
    assert!(
        s.prefill(&too_long).is_err(),
        "a step past the context is refused"
    );
    assert_eq!(s.position(), 5);
    let row = s.decode(ids[5]).expect("decode");
    assert!(max_abs_diff(&row, &full[5]) <= 1e-5);
}

#[test]
fn graph_dumps() {
    for name in TINY {
        let raw = graph(name, &flex(), &Pipeline::none());
        let optimized = graph(name, &flex(), &Pipeline::standard());
        insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!(format!("graph_raw__{name}"), llama::graph::dump(&raw));
            insta::assert_snapshot!(format!("graph_optimized__{name}"), llama::graph::dump(&optimized));
        });
    }
}

#[test]
fn node_output_summaries() {
    // Every named node's output on the reference input, rounded so that float noise
    // cannot change the text: a change in any layer shows as a diff naming the node.
    for name in TINY {
        let ids = reference(name).input_ids;
        let mut s = session(name, &flex(), &Pipeline::none());
        let (_, taps) = s.prefill_with_taps(&ids, &Taps::All).expect("prefill");
        let text: Vec<String> = taps
            .iter()
            .map(|(n, v)| llama::graph::summary::summarize(n, v, 3).expect("summary"))
            .collect();
        insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!(format!("taps__{name}"), text.join("\n"));
        });
    }
}

#[test]
fn last_row_logits_equal_the_last_row_of_all_logits() {
    // Generation computes the output head for the last position only; that row must be
    // the one a full step computes, and the cache must advance the same way.
    for name in TINY {
        let reference = reference(name);
        let ids = &reference.input_ids;
        let mut full = session(name, &flex(), &Pipeline::standard());
        let mut last = session(name, &flex(), &Pipeline::standard());
        let all = full.prefill(ids).expect("prefill");
        let one = last.prefill_last(ids).expect("prefill_last");
        assert!(max_abs_diff(&one, all.last()) <= 1e-5, "{name}");
        assert_eq!(last.position(), full.position());
        let (a, b) = (full.decode(1).unwrap(), last.decode(1).unwrap());
        assert!(max_abs_diff(&a, &b) <= 1e-5, "{name}: the next step");
    }
}

#[test]
fn a_session_built_for_a_context_has_rope_tables_of_that_length_and_matches_transformers() {
    for name in TINY {
        let r = reference(name);
        let ids = &r.input_ids;
        let model = load(name, &flex());
        let context = ids.len();
        assert!(context < model.config.max_position_embeddings);
        let graph = model.build_graph_for(context).expect("graph builds");
        let tables: Vec<usize> = graph
            .nodes()
            .iter()
            .filter_map(|n| match n.op {
                llama::graph::Op::RopeAngles { max_positions, .. } => Some(max_positions),
                _ => None,
            })
            .collect();
        assert!(!tables.is_empty(), "{name}: no RoPE table");
        assert!(tables.iter().all(|&n| n == context), "{name}: {tables:?}");
        // The whole context still computes transformers' logits, and a step past it is
        // refused.
        let options = llama::runtime::SessionOptions {
            passes: llama::runtime::Passes::List(
                Pipeline::standard()
                    .names()
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
            ),
            context: llama::runtime::Context::Positions(context),
            // Exact keys and values: this compares with transformers to 1e-4.
            cache_type: Some(llama::graph::KvType::F32),
            ..Default::default()
        };
        let engine = llama::runtime::Engine::load(&fixture(name), &options).expect("engine");
        assert_eq!(engine.context(), context);
        let mut s = engine.session().expect("session");
        let logits = s.prefill(ids).expect("prefill");
        let diff = max_abs_diff(logits.last(), r.logits.last().expect("logits"));
        assert!(diff <= 1e-4, "{name}: last row differs by {diff}");
        assert!(s.decode(0).is_err(), "{name}: a step past the context");
    }
}
