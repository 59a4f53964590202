//! Generation: the sampler's stages, stop strings, context limits, chat KV reuse, fork,
//! save and restore, cancellation, and the CLI flags.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use crate::common::*;
use llama::graph::Pipeline;
use llama::runtime::sampler::{apply_penalties, candidates, min_p, top_k, top_p};
use llama::runtime::{
    argmax, generate, generate_ids, ChatTemplate, FinishReason, GenerateOptions, Message, Sampler,
    SamplerConfig, SessionState, StopFilter, Tokenizer,
};
use proptest::prelude::*;

fn sampler(config: SamplerConfig) -> Sampler {
    Sampler::new(config)
}

#[test]
fn top_k_keeps_exactly_k_with_ties_to_the_lower_id() {
    let logits = [1.0, 3.0, 3.0, 2.0, 3.0, 0.5];
    let kept: Vec<u32> = top_k(candidates(&logits), 2).iter().map(|c| c.id).collect();
    assert_eq!(kept, vec![1, 2]);
    let kept: Vec<u32> = top_k(candidates(&logits), 4).iter().map(|c| c.id).collect();
    assert_eq!(kept, vec![1, 2, 4, 3]);
    let s = sampler(SamplerConfig {
        temperature: 1.0,
        top_k: Some(3),
        ..Default::default()
    });
    assert_eq!(s.distribution(&logits, &[]).len(), 3);
}

#[test]
fn penalties_follow_their_definitions() {
    let config = SamplerConfig {
        repeat_penalty: 2.0,
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..Default::default()
    };
    let mut logits = vec![4.0, -4.0, 4.0, 1.0];
    apply_penalties(&mut logits, &[0, 1, 1, 1], &config);
    // llama.cpp repeat penalty: positive / p, negative * p; then OpenAI's
    // `- count * frequency - presence` for every token seen.
    assert_eq!(
        logits,
        vec![4.0 / 2.0 - 0.25 - 0.5, -4.0 * 2.0 - 0.75 - 0.5, 4.0, 1.0]
    );
}

#[test]
fn logit_bias_comes_before_temperature() {
    let s = sampler(SamplerConfig {
        temperature: 2.0,
        logit_bias: vec![(1, 1.0)],
        ..Default::default()
    });
    let d = s.distribution(&[0.0, 0.0], &[]);
    let p = |id| d.iter().find(|(i, _)| *i == id).unwrap().1;
    // (0 + 1) / 2 against 0 / 2: the bias is scaled by the temperature with the logit.
    assert!((p(1) / p(0) - 0.5f64.exp()).abs() < 1e-9);
    let banned = sampler(SamplerConfig {
        temperature: 1.0,
        logit_bias: vec![(0, f32::NEG_INFINITY)],
        ..Default::default()
    });
    assert!(banned
        .distribution(&[5.0, 0.0], &[])
        .iter()
        .all(|(id, p)| *id != 0 || *p == 0.0));
}

#[test]
fn a_banned_token_stays_banned_under_penalties_that_overflow() {
    // Presence and frequency penalties of -2.8e38 sum past f32's range: minus
    // infinity, which taken from a banned token's minus infinity would be NaN.
    let config = SamplerConfig {
        temperature: 1.0,
        presence_penalty: -2.8e38,
        frequency_penalty: -2.8e38,
        logit_bias: vec![(0, f32::NEG_INFINITY)],
        ..Default::default()
    };
    assert!(config.validate().is_ok());
    for logits in [vec![0.0], vec![0.0, 1.0, -3.0]] {
        let d = sampler(config.clone()).distribution(&logits, &[0, 1]);
        let mass: f64 = d.iter().map(|&(_, p)| p).sum();
        assert!((mass - 1.0).abs() < 1e-9, "{logits:?}: {d:?}");
        if logits.len() > 1 {
            assert!(d.iter().all(|(id, p)| *id != 0 || *p == 0.0), "{d:?}");
        }
    }
}

#[test]
fn seeded_runs_repeat_and_seeds_matter() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let draw = |seed| {
        let mut s = sampler(SamplerConfig {
            temperature: 1.0,
            seed,
            ..Default::default()
        });
        (0..64).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

proptest! {
    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p(logits in prop::collection::vec(-10.0f32..10.0, 2..40), p in 0.01f32..1.0) {
        let all = candidates(&logits);
        let kept = top_p(all.clone(), p);
        let probs = llama::runtime::sampler::softmax(&all, 1.0);
        let mass: f64 = probs[..kept.len()].iter().sum();
        let without_last: f64 = probs[..kept.len() - 1].iter().sum();
        prop_assert!(mass >= p as f64 - 1e-9);
        prop_assert!(without_last < p as f64);
    }

    #[test]
    fn min_p_drops_exactly_the_tokens_under_the_floor(logits in prop::collection::vec(-10.0f32..10.0, 2..40), p in 0.0f32..1.0) {
        let all = candidates(&logits);
        let probs = llama::runtime::sampler::softmax(&all, 1.0);
        let kept: Vec<u32> = min_p(all.clone(), p).iter().map(|c| c.id).collect();
        for (c, q) in all.iter().zip(&probs) {
            let expected = *q >= p as f64 * probs[0] - 1e-12;
            prop_assert_eq!(kept.contains(&c.id), expected || c.id == all[0].id);
        }
    }

    #[test]
    fn temperature_zero_is_argmax(logits in prop::collection::vec(-10.0f32..10.0, 1..60), seed in any::<u64>()) {
        let mut s = sampler(SamplerConfig { seed, top_k: Some(5), ..Default::default() });
        prop_assert_eq!(s.sample(&logits, &[]), argmax(&logits));
    }
}

#[test]
fn stop_strings_split_across_pieces_are_caught_and_never_shown() {
    let mut f = StopFilter::new(&["</s>".to_string(), "END".to_string()]);
    let mut shown = String::new();
    for piece in ["Hello <", "/", "x> and E", "N"] {
        let (s, hit) = f.push(piece);
        assert!(!hit);
        shown += &s;
        assert!(
            !shown.ends_with('<') && !shown.ends_with("EN") && !shown.ends_with('E'),
            "{shown:?} shows a stop prefix"
        );
    }
    let (s, hit) = f.push("D tail");
    shown += &s;
    assert!(hit);
    assert_eq!(shown, "Hello </x> and ");
}

fn real_session(context: usize) -> (llama::runtime::Session, Tokenizer, llama::models::Model) {
    let path = real_model_path();
    let model = llama::models::Model::load(&path, &flex()).unwrap();
    let tokenizer = Tokenizer::for_model(&model).unwrap();
    (session_for(&path, &flex(), context), tokenizer, model)
}

#[test]
fn a_stop_string_on_the_real_model() {
    // Greedy from "The capital of France is" gives " Paris.\n\nThe answer is: ..."; the
    // stop string spans the tokens " answer" and " is".
    let (mut s, t, _) = real_session(128);
    let prompt = t.encode("The capital of France is").unwrap();
    let opts = GenerateOptions {
        max_tokens: 20,
        stop: vec!["answer is".into()],
        ..Default::default()
    };
    let mut pieces = Vec::new();
    let g = generate(&mut s, &t, &prompt, &opts, |p| pieces.push(p.to_string())).unwrap();
    assert_eq!(g.finish, FinishReason::Stop);
    assert_eq!(g.text, " Paris.\n\nThe ");
    assert_eq!(pieces.concat(), g.text);
}

#[test]
fn chat_turn_two_with_the_reused_cache_equals_prefilling_from_scratch() {
    let (mut s, t, model) = real_session(512);
    let template = ChatTemplate::for_model(&model).unwrap().unwrap();
    let mut messages = vec![Message::new("user", "Name a river in Europe.")];
    let turn1 = t
        .encode_plain(&template.render(&messages, true).unwrap())
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 24,
        eos: model.eos_token_ids(),
        ..Default::default()
    };
    let g = generate(&mut s, &t, &turn1, &opts, |_| {}).unwrap();
    messages.push(Message::new("assistant", &g.text));
    messages.push(Message::new("user", "How long is it?"));
    let all = t
        .encode_plain(&template.render(&messages, true).unwrap())
        .unwrap();
    let new = s.sync_prefix(&all).unwrap();
    assert!(
        new.len() < all.len() / 2,
        "only the new turn is prefilled ({} of {})",
        new.len(),
        all.len()
    );
    let reused = s.prefill(&new).unwrap();
    let mut fresh = s.fork();
    fresh.reset();
    let scratch = fresh.prefill(&all).unwrap();
    let diff = max_abs_diff(reused.last(), scratch.last());
    assert!(diff <= 1e-4, "turn 2 logits differ by {diff}");
}

#[test]
fn fork_and_save_restore_continue_like_the_original() {
    let (mut s, t, _) = real_session(128);
    let prompt = t.encode("Once upon a time").unwrap();
    s.prefill(&prompt).unwrap();
    let sampled = GenerateOptions {
        max_tokens: 12,
        sampler: SamplerConfig {
            temperature: 0.9,
            top_p: Some(0.95),
            seed: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let next = [t.encode(" there").unwrap()[0]];
    let mut fork = s.fork();
    // The fork holds the same pages and owns none of them, until it writes.
    let pages = s.cache_pages();
    assert!(pages.held > 0);
    assert_eq!(fork.cache_pages().held, pages.held);
    assert_eq!(fork.cache_pages().own, 0, "a fork shares every page");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.bin");
    s.state().unwrap().save(&file).unwrap();
    let original = generate_ids(&mut s, &next, &sampled, |_| true).unwrap().ids;
    let forked = generate_ids(&mut fork, &next, &sampled, |_| true)
        .unwrap()
        .ids;
    assert_eq!(forked, original);
    let mut restored = s.fork();
    restored.reset();
    restored
        .restore(&SessionState::load(&file).unwrap())
        .unwrap();
    assert_eq!(restored.position(), prompt.len());
    let again = generate_ids(&mut restored, &next, &sampled, |_| true)
        .unwrap()
        .ids;
    assert_eq!(again, original);
    // A damaged state file is refused, and the session is untouched.
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 7]).unwrap();
    assert!(SessionState::load(&file).is_err());
}

#[test]
fn cancellation_from_another_thread_stops_within_one_step() {
    let mut s = session("llama3", &flex(), &Pipeline::standard());
    let ids = reference("llama3").input_ids;
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let flag = cancel.clone();
    let canceller = std::thread::spawn(move || {
        rx.recv().unwrap();
        flag.store(true, Ordering::SeqCst);
        done_tx.send(()).unwrap();
    });
    let opts = GenerateOptions {
        max_tokens: 50,
        cancel: Some(cancel),
        ..Default::default()
    };
    let mut seen_at_cancel = None;
    let g = generate_ids(&mut s, &ids[..4], &opts, |_| {
        if seen_at_cancel.is_none() {
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
            seen_at_cancel = Some(());
        }
        true
    })
    .unwrap();
    canceller.join().unwrap();
    assert_eq!(g.finish, FinishReason::Cancelled);
    assert!(
        g.ids.len() <= 2,
        "stopped within one step ({} tokens)",
        g.ids.len()
    );
    // The session is consistent: it holds the prompt and the decoded tokens, and goes on
    // exactly as a fresh run over the same tokens.
    let held = s.tokens().to_vec();
    assert_eq!(held.len(), s.position());
    let row = s.decode(7).unwrap();
    let mut fresh = s.fork();
    let mut all = held.clone();
    all.push(7);
    let full = full_forward(&mut fresh, &all);
    assert!(max_abs_diff(&row, full.last().unwrap()) <= 1e-5);
}

#[test]
fn the_end_of_the_context_is_an_error_or_a_shift() {
    let ids = reference("llama3").input_ids;
    let mut s = session_of(graph("llama3", &flex(), &Pipeline::standard()), &flex(), 24);
    let opts = GenerateOptions {
        max_tokens: 30,
        ..Default::default()
    };
    let err = generate_ids(&mut s, &ids, &opts, |_| true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("20 tokens") && err.contains("30 new tokens") && err.contains("24"),
        "{err}"
    );
    let shifting = GenerateOptions {
        max_tokens: 30,
        context_shift: Some(4),
        ..Default::default()
    };
    let g = generate_ids(&mut s, &ids, &shifting, |_| true).unwrap();
    assert_eq!(g.ids.len(), 30);
    assert!(g.context_shifts >= 1);
    assert!(s.position() <= 24);
    assert_eq!(s.tokens()[..4], ids[..4], "the kept prefix stays");
}

#[test]
fn bad_sampling_flags_are_one_line_errors() {
    let dir = fixture("llama3");
    let m = dir.to_str().unwrap();
    for (flag, value) in [
        ("--top-k", "-2"),
        ("--top-k", "many"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--min-p", "2"),
        ("--temperature", "-1"),
        ("--repeat-penalty", "0"),
        ("--logit-bias", "12"),
        ("--logit-bias", "x=1"),
        ("--logit-bias", "3=abc"),
        ("--seed", "-5"),
    ] {
        let out = llama(&["generate", "-m", m, "-p", "hi", flag, value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert_eq!(err.trim_end().lines().count(), 1, "{flag} {value}: {err}");
    }
}

#[test]
fn json_output_and_seeded_cli_runs() {
    let dir = fixture("llama2-mha");
    let m = dir.to_str().unwrap();
    let run = |top_k: &str| {
        llama(&[
            "generate",
            "-m",
            m,
            "-p",
            "abc",
            "-n",
            "12",
            "--temperature",
            "0.8",
            "--top-k",
            top_k,
            "--seed",
            "11",
            "--json",
        ])
    };
    let (a, b) = (run("20"), run("20"));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    for field in ["text", "ids", "finish_reason", "timings"] {
        assert!(v.get(field).is_some(), "{field} missing: {v}");
    }
    assert_eq!(v["ids"].as_array().unwrap().len(), 12);
    assert_eq!(v["finish_reason"], "length");
    let w: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(v["ids"], w["ids"], "same seed, same tokens");
    // `--top-k 0` keeps every token (llama.cpp's "off"): the vocabulary's size does the
    // same.
    let ids = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["ids"].clone()
    };
    assert_eq!(ids(run("0")), ids(run("1000000")), "--top-k 0 is off");
}

#[test]
fn chat_from_a_pipe_reuses_the_conversation_and_resets() {
    let (stdout, stderr) = chat_once(
        &["-n", "24", "--temperature", "0"],
        "What is the capital of France? Answer in one sentence.\nAnd of Italy?\n/reset\nWhat is the capital of France? Answer in one sentence.\n/exit\nnever read\n",
    );
    let answers: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(answers.len(), 3, "{stdout}");
    assert_eq!(answers[0], "The capital of France is Paris.");
    assert_eq!(
        answers[2], answers[0],
        "after /reset the same question gets the same answer"
    );
    let prompts: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("prompt ")?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(prompts.len(), 3, "{stderr}");
    assert!(
        prompts[1] < prompts[0],
        "turn 2 prefills only the new turn: {prompts:?}"
    );
    assert_eq!(
        prompts[2], prompts[0],
        "after /reset the whole prompt is prefilled again"
    );
}

/// `llama chat` on a pipe: stdout and stderr of one conversation.
fn chat_once(args: &[&str], input: &str) -> (String, String) {
    use std::io::Write;
    let model = real_model_path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(["chat", "-m", model.to_str().unwrap()])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

#[test]
fn chat_samples_by_default_and_generate_stays_greedy() {
    // The stats line names the seed only when the sampler draws (temperature > 0).
    let question = "Write a short poem about the sea.\n";
    let (first, stderr) = chat_once(&["-n", "16", "--seed", "5"], question);
    assert!(
        stderr.contains("| seed 5"),
        "chat samples by default: {stderr}"
    );
    let (again, _) = chat_once(&["-n", "16", "--seed", "5"], question);
    assert_eq!(first, again, "the same seed gives the same answer");
    let (_, greedy) = chat_once(&["-n", "4", "--temperature", "0"], question);
    assert!(
        !greedy.contains("seed"),
        "--temperature 0 is greedy: {greedy}"
    );
    let model = real_model_path();
    let out = llama(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "The sea",
        "-n",
        "4",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("seed"),
        "generate is greedy by default: {stderr}"
    );
}

#[test]
fn inspect_describes_the_model_without_loading_it() {
    let model = real_model_path();
    let out = llama(&["inspect", "-m", model.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "architecture: LlamaForCausalLM",
        "layers: 30",
        "heads: 9 (kv 3)",
        "context length: 8192",
        "Q4_1: 210",
        "Q8_0: 1",
        "F32: 61",
        "tensors: 272",
        "bos 1 \"<|im_start|>\"",
        "eos 2 \"<|im_end|>\"",
        "tokenizer.chat_template",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
}
