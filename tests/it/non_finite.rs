//! Weights that are not finite never turn into tokens: `--check-tensors` names them at
//! load, and without it a step whose logits are NaN or infinite ends its sequence with
//! an error naming the position, and only that sequence. The model: the tiny Llama 2
//! with one token's embedding row set to NaN, so exactly the sequences that contain
//! that token go wrong.

use crate::common::*;
use llama::graph::{KvType, Pipeline, Program};
use llama::runtime::{BatchOptions, Event, RuntimeError, Scheduler, Tokenizer};

/// The poisoned token, and the model directory.
fn poisoned(dir: &std::path::Path) -> u32 {
    let tokenizer = Tokenizer::from_file(&fixture("llama2-mha").join("tokenizer.json")).unwrap();
    let bad = tokenizer.encode_plain("Z").unwrap()[0];
    let width = 64;
    copy_with_edit("llama2-mha", dir, "model.embed_tokens.weight", |w| {
        w[bad as usize * width..(bad as usize + 1) * width].fill(f32::NAN)
    });
    bad
}

#[test]
fn a_step_with_non_finite_logits_is_an_error_and_the_other_sequences_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let bad = poisoned(dir.path());
    let device = flex();
    let model = llama::models::Model::load(dir.path(), &device).unwrap();
    let mut g = model.build_graph().unwrap();
    Pipeline::standard()
        .run(
            &mut g,
            &llama::graph::PassContext {
                device: device.clone(),
            },
        )
        .unwrap();
    let program = Program::new(g, device.clone()).unwrap();

    // One session: the prompt fails at the token's position, the first gone wrong.
    let mut s = llama::runtime::Session::new(program.clone(), 64).unwrap();
    let err = s.prefill(&[5, 9, bad, 11]).unwrap_err();
    assert!(
        matches!(err, RuntimeError::NonFiniteLogits { position: 2 }),
        "{err}"
    );
    assert!(err.to_string().contains("not finite"), "{err}");

    // A batch: the sequence that meets the token fails, the other runs as alone.
    let clean = vec![5u32, 9, 11, 12];
    let mut alone = llama::runtime::Session::new(program.clone(), 64).unwrap();
    let want = llama::runtime::generate_greedy(&mut alone, &clean, 6, &[], |_| {})
        .unwrap()
        .ids;
    let mut sched =
        Scheduler::for_program(&program, 64, KvType::F32, BatchOptions::default()).unwrap();
    let poisoned_seq = sched.submit(vec![5, 9, bad, 11], greedy(6)).unwrap();
    let clean_seq = sched.submit(clean, greedy(6)).unwrap();
    let (mut failed, mut got) = (None, Vec::new());
    sched.run(|e| match e {
        Event::Failed { seq, error } => failed = Some((seq, error)),
        Event::Token { seq, id, .. } if seq == clean_seq => got.push(id),
        _ => {}
    });
    let (seq, error) = failed.expect("the poisoned sequence fails");
    assert_eq!(seq, poisoned_seq);
    assert!(
        matches!(error, RuntimeError::NonFiniteLogits { .. }),
        "{error}"
    );
    assert_eq!(got, want, "the clean sequence, beside it, as alone");
    assert_eq!(sched.kv_used(), sched.prefix_positions());
}

/// `llama generate` of `prompt` on `model` with `extra` flags: Ok(stdout) on success,
/// Err(stderr) on failure.
fn generate(model: &std::path::Path, prompt: &str, extra: &[&str]) -> Result<String, String> {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        "2",
    ];
    args.extend(extra);
    let out = llama(&args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// A failure as a user sees it: one line, saying `what`.
fn one_line(result: Result<String, String>, what: &str) {
    let err = result.expect_err(what);
    assert!(err.contains(what), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn generate_on_a_poisoned_prompt_says_so_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    poisoned(dir.path());
    one_line(generate(dir.path(), "abZcd", &[]), "not finite");
    generate(dir.path(), "abcd", &[]).expect("a prompt without the token runs");
}

/// `--check-tensors` refuses the poisoned model at load, naming the tensor and the
/// first bad value; a sound model (SmolLM2, its block weights read row by row) loads.
#[test]
fn check_tensors_names_the_tensor_that_is_not_finite() {
    let dir = tempfile::tempdir().unwrap();
    let bad = poisoned(dir.path());
    let want = format!("tensor `token_embd.weight` holds NaN at index {}", bad * 64);
    one_line(generate(dir.path(), "abcd", &["--check-tensors"]), &want);
    generate(&real_model_path(), "Hi", &["--check-tensors"]).expect("SmolLM2 is sound");
}

/// Greedy decoding on a GPU picks the token on the device and reads back its id and
/// the row's sum: the same tokens as the argmax of the logits read back, and a row
/// that is not finite is the same error.
#[test]
fn tokens_picked_on_the_device_are_the_argmax_and_nan_is_still_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = poisoned(dir.path());
    let device = wgpu();
    let model = llama::models::Model::load(dir.path(), &device).unwrap();
    let g = model.build_graph().unwrap();
    let program = Program::new(g, device).unwrap();
    let mut on_device = llama::runtime::Session::new(program.clone(), 64).unwrap();
    let mut read_back = llama::runtime::Session::new(program, 64).unwrap();
    assert!(on_device.picks_on_device());
    let (mut a, mut b) = (
        on_device.prefill_argmax(&[5, 9, 11]).unwrap(),
        llama::runtime::argmax(&read_back.prefill_last(&[5, 9, 11]).unwrap()),
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        assert_eq!(a, b);
        seen.insert(a);
        a = on_device.prefill_argmax(&[a]).unwrap();
        b = llama::runtime::argmax(&read_back.prefill_last(&[b]).unwrap());
    }
    assert!(seen.len() > 1, "a constant argmax tests little: {seen:?}");
    let err = on_device.prefill_argmax(&[bad]).unwrap_err();
    assert!(matches!(err, RuntimeError::NonFiniteLogits { .. }), "{err}");
}
