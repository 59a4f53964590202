//! The transformers reference files of SmolLM2 (tests/fixtures/smollm2/).
#![allow(dead_code)]
use serde::Deserialize;

use super::{read_json, smollm2_fixture};

#[derive(Deserialize)]
pub struct Logits {
    pub prompts: Vec<LogitsPrompt>,
}

#[derive(Deserialize)]
pub struct LogitsPrompt {
    pub name: String,
    pub ids: Vec<u32>,
    pub last_top20: Vec<Top>,
    pub per_position_argmax: Vec<u32>,
    #[serde(default)]
    pub last_logits_full: Option<Vec<f32>>,
}

#[derive(Deserialize)]
pub struct Top {
    pub id: u32,
    pub logit: f32,
}

#[derive(Deserialize)]
pub struct Greedy {
    pub prompts: Vec<GreedyPrompt>,
}

#[derive(Deserialize)]
pub struct GreedyPrompt {
    pub name: String,
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub output_text_stop_at_eos: String,
    pub steps: Vec<Step>,
}

impl GreedyPrompt {
    /// Steps before the first whose top-2 margin is under 0.02, of the first `n`: past
    /// a near-tie a correct runtime may take the other branch.
    pub fn trusted(&self, n: usize) -> usize {
        self.steps
            .iter()
            .position(|s| s.margin < 0.02)
            .unwrap_or(n)
            .min(n)
    }
}

#[derive(Deserialize)]
pub struct Step {
    pub margin: f32,
}

#[derive(Deserialize)]
pub struct Perplexity {
    pub ids: Vec<u32>,
    pub perplexity: f64,
}

pub fn logits() -> Logits {
    read_json(&smollm2_fixture("logits.json"))
}

pub fn greedy() -> Greedy {
    read_json(&smollm2_fixture("greedy.json"))
}

pub fn perplexity() -> Perplexity {
    read_json(&smollm2_fixture("perplexity.json"))
}

impl Perplexity {
    /// Scores the passage in one prefill on `s` and checks that its perplexity is within
    /// `bound` (relative) of transformers'.
    #[allow(dead_code)]
    pub fn check(
        &self,
        s: &mut llama::runtime::Session,
        bound: f64,
        what: &str,
    ) -> llama::runtime::Perplexity {
        let got =
            llama::runtime::perplexity(s, &self.ids, self.ids.len(), None, |_, _| {}).unwrap();
        let rel = (got.perplexity - self.perplexity).abs() / self.perplexity;
        assert!(
            rel <= bound,
            "{what} perplexity {} vs {} ({rel:.2e})",
            got.perplexity,
            self.perplexity
        );
        got
    }
}
