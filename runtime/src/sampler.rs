//! Choosing the next token from logits.
//!
//! The stages run in this order (the order llama.cpp's default chain uses, with the
//! logit bias first):
//!
//! 1. logit bias: `logit[id] += bias`;
//! 2. penalties over the last `repeat_last_n` tokens: repetition (llama.cpp / CTRL:
//!    a positive logit is divided by the penalty, a negative one multiplied), then
//!    frequency and presence (OpenAI: `logit -= count * frequency + (count > 0) * presence`);
//! 3. temperature 0 stops here and takes the argmax;
//! 4. top-k: the k highest logits (ties to the lower id);
//! 5. top-p: the smallest set, by descending probability, whose mass reaches p;
//! 6. min-p: drop tokens whose probability is under `min_p` times the highest;
//! 7. temperature: logits divided by T, softmax, and a draw from the seeded generator.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings; the defaults are greedy with no penalties.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// The settings a conversation starts from, as llama.cpp's: temperature 0.8, top-k
    /// 40, top-p 0.95, min-p 0.05. Greedy decoding makes small models loop in a chat
    /// (SmolLM2-135M repeats one phrase until the context ends), so chat front-ends
    /// sample by default; `generate` stays greedy.
    pub fn chat() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            min_p: Some(0.05),
            ..SamplerConfig::default()
        }
    }

    /// Checks every value; the error says which setting is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature {} must be 0 or more",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return Err("top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top-p {p} must be in (0, 1]"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("min-p {p} must be in [0, 1]"));
            }
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "repeat penalty {} must be positive",
                self.repeat_penalty
            ));
        }
        for (name, v) in [
            ("presence", self.presence_penalty),
            ("frequency", self.frequency_penalty),
        ] {
            if !v.is_finite() {
                return Err(format!("{name} penalty {v} must be a finite number"));
            }
        }
        // A bias of minus infinity bans a token; anything else must be a number.
        if let Some(&(id, b)) = self
            .logit_bias
            .iter()
            .find(|&&(_, b)| b.is_nan() || b == f32::INFINITY)
        {
            return Err(format!("the logit bias {b} of token {id} is not a number"));
        }
        Ok(())
    }
}

/// A seed for callers that were given none: different at every call.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
}

/// A candidate token: id and logit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The distribution the next token is drawn from, after every stage, by descending
    /// probability. Temperature 0 puts all the mass on the argmax.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        let mut logits = logits.to_vec();
        apply_logit_bias(&mut logits, &self.config.logit_bias);
        let recent = &history[history.len().saturating_sub(self.config.repeat_last_n)..];
        apply_penalties(&mut logits, recent, &self.config);
        if self.config.temperature == 0.0 {
            return vec![(crate::session::argmax(&logits), 1.0)];
        }
        let mut c = candidates(&logits);
        if let Some(k) = self.config.top_k {
            c = top_k(c, k);
        }
        if let Some(p) = self.config.top_p {
            c = top_p(c, p);
        }
        if let Some(p) = self.config.min_p {
            c = min_p(c, p);
        }
        let probs = softmax(&c, self.config.temperature);
        c.iter().map(|c| c.id).zip(probs).collect()
    }

    /// The next token after `history` (the tokens so far, for penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let dist = self.distribution(logits, history);
        if dist.len() == 1 {
            return dist[0].0;
        }
        let u: f64 = self.rng.random::<f64>();
        let mut acc = 0.0;
        for &(id, p) in &dist {
            acc += p;
            if u < acc {
                return id;
            }
        }
        dist.last().map_or(0, |d| d.0)
    }
}

pub fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(id, b) in bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if b == f32::NEG_INFINITY {
                b
            } else {
                saturate(*l, *l + b)
            };
        }
    }
}

/// `new`, computed from the logit `old`, kept finite when `old` was: a sum or a
/// quotient that overflows f32 becomes the largest finite value of its sign rather
/// than an infinity (which would turn the softmax into NaN). A logit that is not
/// finite (a token banned by a bias of minus infinity) stays as it is: a penalty that
/// overflows to minus infinity would otherwise turn the ban into NaN.
fn saturate(old: f32, new: f32) -> f32 {
    if !old.is_finite() {
        old
    } else if new.is_nan() {
        // Only from an overflow minus an overflow: the logit stays as it was.
        old
    } else {
        new.clamp(f32::MIN, f32::MAX)
    }
}

/// Repetition, frequency and presence penalties over `recent` tokens.
pub fn apply_penalties(logits: &mut [f32], recent: &[u32], c: &SamplerConfig) {
    if recent.is_empty()
        || (c.repeat_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0)
    {
        return;
    }
    let mut counts: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for &id in recent {
        *counts.entry(id).or_default() += 1;
    }
    for (&id, &count) in &counts {
        let Some(l) = logits.get_mut(id as usize) else {
            continue;
        };
        let old = *l;
        let penalized = if old > 0.0 {
            old / c.repeat_penalty
        } else {
            old * c.repeat_penalty
        };
        *l = saturate(
            old,
            penalized - (count as f32 * c.frequency_penalty + c.presence_penalty),
        );
    }
}

/// All tokens, by descending logit, ties to the lower id.
pub fn candidates(logits: &[f32]) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = logits
        .iter()
        .enumerate()
        .map(|(i, &logit)| Candidate {
            id: i as u32,
            logit,
        })
        .collect();
    c.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
    c
}

/// The first `k` of sorted candidates.
pub fn top_k(mut c: Vec<Candidate>, k: usize) -> Vec<Candidate> {
    c.truncate(k.max(1));
    c
}

/// Probabilities of sorted candidates at temperature `t`.
pub fn softmax(c: &[Candidate], t: f32) -> Vec<f64> {
    let max = c.first().map_or(0.0, |c| c.logit) as f64;
    if max == f64::NEG_INFINITY {
        // Every candidate is banned: the first (the lowest id) gets the mass.
        return (0..c.len()).map(|i| f64::from(u8::from(i == 0))).collect();
    }
    let t = t as f64;
    let e: Vec<f64> = c
        .iter()
        .map(|c| ((c.logit as f64 - max) / t).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// The smallest prefix of sorted candidates whose probability mass reaches `p`.
pub fn top_p(c: Vec<Candidate>, p: f32) -> Vec<Candidate> {
    let probs = softmax(&c, 1.0);
    let mut acc = 0.0;
    let mut keep = c.len();
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if acc >= p as f64 {
            keep = i + 1;
            break;
        }
    }
    let mut c = c;
    c.truncate(keep.max(1));
    c
}

/// Sorted candidates whose probability is at least `p` times the highest.
pub fn min_p(c: Vec<Candidate>, p: f32) -> Vec<Candidate> {
    let Some(best) = c.first().map(|c| c.logit) else {
        return c;
    };
    // prob_i / prob_max = exp(logit_i - logit_max).
    let floor = best as f64 + (p as f64).ln();
    let kept: Vec<Candidate> = c
        .iter()
        .copied()
        .filter(|x| x.logit as f64 >= floor)
        .collect();
    if kept.is_empty() {
        c.into_iter().take(1).collect()
    } else {
        kept
    }
}
