//! The generation loop: sampling, end ids, stop strings, the end of the context,
//! cancellation, and streaming text.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::sampler::{Sampler, SamplerConfig};
use crate::session::Session;
use crate::tokenizer::Tokenizer;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token was produced (it is not part of the output).
    Eos,
    /// `max_tokens` were produced.
    Length,
    /// A stop string was produced (it is not part of the text).
    Stop,
    /// The cancellation flag was raised.
    Cancelled,
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Ids that end generation (not emitted).
    pub eos: Vec<u32>,
    /// Strings that end generation (not emitted, not even in part).
    pub stop: Vec<String>,
    /// When the context fills: keep this many tokens at the start, drop the oldest half
    /// of the rest, and go on. `None`: a request that does not fit is an error.
    pub context_shift: Option<usize>,
    /// Raised by another thread to stop after the current step.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampler: SamplerConfig::default(),
            eos: Vec::new(),
            stop: Vec::new(),
            context_shift: None,
            cancel: None,
        }
    }
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub ids: Vec<u32>,
    /// The text shown (empty when generated without a tokenizer).
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Time to first token: prefill and the first choice.
    #[serde(serialize_with = "as_ms")]
    pub ttft: Duration,
    /// Time of the decode steps after the first token.
    #[serde(serialize_with = "as_ms")]
    pub decode_time: Duration,
    /// Decode steps run (a token generated at the last step needs none).
    pub decode_steps: usize,
    /// Times the context was shifted.
    pub context_shifts: usize,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.ttft.as_secs_f64().max(1e-9)
    }

    pub fn decode_tok_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generates after `prompt`, which is prefilled at the session's current position.
/// `on_token` sees each new id and returns whether to go on.
pub fn generate_ids(
    session: &mut Session,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(RuntimeError::EmptyPrompt);
    }
    opts.sampler.validate().map_err(RuntimeError::Sampling)?;
    let context = session.context();
    let needed = session.position() + prompt.len() + opts.max_tokens.saturating_sub(1);
    match opts.context_shift {
        None if needed > context => {
            return Err(RuntimeError::ContextExceeded {
                prompt: session.position() + prompt.len(),
                requested: opts.max_tokens,
                context,
            })
        }
        Some(keep) if keep + 2 > context => {
            return Err(RuntimeError::Sampling(format!(
                "context shift keeps {keep} tokens of a {context}-token context; nothing would be left to drop"
            )))
        }
        Some(_) if session.position() + prompt.len() > context => {
            return Err(RuntimeError::ContextExceeded {
                prompt: session.position() + prompt.len(),
                requested: opts.max_tokens,
                context,
            })
        }
        _ => {}
    }
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    let mut sampler = Sampler::new(opts.sampler.clone());
    let start = Instant::now();
    let mut logits = session.prefill_last(prompt)?;
    let mut ids = Vec::new();
    let mut finish = FinishReason::Length;
    let mut first: Option<Instant> = None;
    let (mut decode_steps, mut context_shifts) = (0, 0);
    while ids.len() < opts.max_tokens {
        if cancelled() {
            finish = FinishReason::Cancelled;
            break;
        }
        let next = sampler.sample(&logits, session.tokens());
        first.get_or_insert_with(Instant::now);
        if opts.eos.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        ids.push(next);
        if !on_token(next) {
            finish = FinishReason::Stop;
            break;
        }
        if ids.len() == opts.max_tokens {
            break;
        }
        if session.position() + 1 > context {
            if let Some(keep) = opts.context_shift {
                session.shift_context(keep)?;
                context_shifts += 1;
            }
        }
        logits = session.decode(next)?;
        decode_steps += 1;
    }
    let end = Instant::now();
    let first = first.unwrap_or(end);
    Ok(Generation {
        ids,
        text: String::new(),
        finish,
        prompt_tokens: prompt.len(),
        ttft: first - start,
        decode_time: end - first,
        decode_steps,
        context_shifts,
    })
}

/// Greedy generation of up to `max_tokens`, stopping at any of `eos`.
pub fn generate_greedy(
    session: &mut Session,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let opts = GenerateOptions {
        max_tokens,
        eos: eos.to_vec(),
        ..GenerateOptions::default()
    };
    generate_ids(session, prompt, &opts, |id| {
        on_token(id);
        true
    })
}

/// Holds back streamed text that could be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds `text`; returns what can be shown now, and whether a stop string was hit
    /// (in which case the text before it is returned and the rest dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let shown = self.pending[..at].to_string();
            self.pending.clear();
            return (shown, true);
        }
        // The longest tail of the pending text that begins some stop string stays back.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    hold = hold.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let shown = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (shown, false)
    }

    /// The held-back text, once generation ended without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Generates text after `prompt`: `on_text` receives each piece as it becomes final
/// (never half a character, never any part of a stop string).
pub fn generate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let mut stream = tokenizer.stream();
    let mut filter = StopFilter::new(&opts.stop);
    let mut text = String::new();
    let mut failure = None;
    let mut stopped = false;
    let mut generation = generate_ids(session, prompt, opts, |id| {
        let piece = match stream.push(id) {
            Ok(p) => p,
            Err(e) => {
                failure = Some(e);
                return false;
            }
        };
        let (shown, hit) = filter.push(&piece);
        if !shown.is_empty() {
            on_text(&shown);
            text.push_str(&shown);
        }
        stopped = hit;
        !hit
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if !stopped {
        let (shown, hit) = filter.push(&stream.finish()?);
        let rest = if hit { shown } else { shown + &filter.finish() };
        if !rest.is_empty() {
            on_text(&rest);
            text.push_str(&rest);
        }
        if hit {
            generation.finish = FinishReason::Stop;
        }
    }
    generation.text = text;
    Ok(generation)
}
