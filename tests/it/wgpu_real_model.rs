//! SmolLM2 on wgpu (lavapipe on machines without a GPU) against transformers. Lavapipe
//! runs the model at about one token per second, so these tests use few tokens: every
//! prompt's logits, the first greedy tokens, and one prefill for perplexity.

use crate::common::smollm2;
use crate::common::*;
use llama::runtime::{argmax, generate_greedy};

#[test]
fn logits_greedy_and_perplexity_on_wgpu_match_transformers() {
    let device = wgpu();
    let path = real_model_path();
    let mut s = session_for(&path, &device, 640);

    // Logits: the last position's top 20 within 1e-2; argmax equal wherever the
    // reference's top-2 margin (as our f32 CPU path reproduces it to 1e-3) exceeds 0.05.
    let refs = smollm2::logits();
    let mut cpu = session_for(&path, &flex(), 64);
    for p in &refs.prompts {
        s.reset();
        let logits = s.prefill(&p.ids).unwrap();
        for t in &p.last_top20 {
            let d = (logits.last()[t.id as usize] - t.logit).abs();
            assert!(d <= 1e-2, "{}: logit of {} off by {d}", p.name, t.id);
        }
        let margins: Vec<f32> = full_forward(&mut cpu, &p.ids)
            .iter()
            .map(|r| margin(r))
            .collect();
        for (pos, want) in p.per_position_argmax.iter().enumerate() {
            if margins[pos] > 0.05 {
                assert_eq!(argmax(logits.row(pos)), *want, "{} position {pos}", p.name);
            }
        }
    }

    // Greedy: the first tokens of each continuation, up to the first near-tie.
    let greedy = smollm2::greedy();
    const TOKENS: usize = 8;
    for p in &greedy.prompts {
        s.reset();
        let got = generate_greedy(&mut s, &p.input_ids, TOKENS, &[], |_| {}).unwrap();
        let trusted = p.trusted(TOKENS);
        assert_eq!(got.ids[..trusted], p.output_ids[..trusted], "{}", p.name);
    }

    // Perplexity of the passage, one prefill, within 0.5%.
    let r = smollm2::perplexity();
    r.check(&mut s, 5e-3, "wgpu");
}

#[test]
fn kv_equivalence_on_wgpu_with_the_real_model() {
    let ids = smollm2::perplexity().ids;
    let mut s = session_for(&real_model_path(), &wgpu(), 64);
    let n = 17;
    let full = full_forward(&mut s, &ids[..n + 4]);
    s.reset();
    let mut worst = max_abs_diff(s.prefill(&ids[..n]).unwrap().last(), &full[n - 1]);
    for pos in n..n + 4 {
        worst = worst.max(max_abs_diff(&s.decode(ids[pos]).unwrap(), &full[pos]));
    }
    assert!(
        worst <= 1e-3,
        "prefill + decode vs full forward on wgpu: {worst}"
    );
}
