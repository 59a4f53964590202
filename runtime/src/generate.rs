//! The generation loop: sampling, end ids, stop strings, the end of the context,
//! cancellation, and streaming text.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::constrain::{Active, Constraint};
use crate::error::{Result, RuntimeError};
use crate::sampler::{Sampler, SamplerConfig};
use crate::session::Session;
use crate::speculate::{verify, Adaptive, DraftStats, Drafter, Lookup, Speculation};
use crate::tokenizer::{TextStream, Tokenizer};

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
    /// Report each chosen token's log-probability under the model (the raw logits'
    /// log-softmax, before any sampling stage) and this many most likely
    /// alternatives. `None`: no log-probabilities are computed.
    pub logprobs: Option<usize>,
    /// A grammar the output must stay inside (each sequence runs its own matcher).
    pub constraint: Option<Constraint>,
    /// Speculative decoding: draft tokens (from the context, or the runner's draft
    /// model) verified several at a step. The output is what it would be without.
    pub speculation: Option<Speculation>,
}

/// A chosen token's log-probability, and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// `(id, logprob)` by descending log-probability.
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits`, computed in f64 for the sum.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits
        .iter()
        .map(|&l| (l as f64 - log_sum) as f32)
        .collect()
}

/// The `k` most likely `(id, logprob)` of a log-softmax, ties to the lower id.
pub fn top_logprobs(lsm: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut ids: Vec<u32> = (0..lsm.len() as u32).collect();
    let by = |a: &u32, b: &u32| lsm[*b as usize].total_cmp(&lsm[*a as usize]).then(a.cmp(b));
    if k < ids.len() {
        ids.select_nth_unstable_by(k, by);
        ids.truncate(k);
    }
    ids.sort_by(by);
    ids.into_iter().map(|i| (i, lsm[i as usize])).collect()
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
            logprobs: None,
            constraint: None,
            speculation: None,
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
    /// Prompt tokens that were not run but copied from a cached prefix.
    pub cached_tokens: usize,
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
    /// Time spent on the grammar constraint (token masks and matcher steps), and the
    /// masks computed; zero without one.
    #[serde(serialize_with = "as_ms")]
    pub mask_time: Duration,
    pub mask_steps: usize,
    /// Draft tokens verified, and those accepted (zero without speculation).
    pub drafted: usize,
    pub accepted: usize,
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

/// Checks that `prompt` and `opts.max_tokens` fit a session at `position` of
/// `context` positions (or that a context shift can make room).
pub fn check_fit(
    position: usize,
    context: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<()> {
    if prompt.is_empty() {
        return Err(RuntimeError::EmptyPrompt);
    }
    opts.sampler.validate().map_err(RuntimeError::Sampling)?;
    let needed = position + prompt.len() + opts.max_tokens.saturating_sub(1);
    match opts.context_shift {
        None if needed > context => Err(RuntimeError::ContextExceeded {
            prompt: position + prompt.len(),
            requested: opts.max_tokens,
            context,
        }),
        Some(keep) if keep + 2 > context => Err(RuntimeError::Sampling(format!(
            "context shift keeps {keep} tokens of a {context}-token context; nothing would be left to drop"
        ))),
        Some(_) if position + prompt.len() > context => Err(RuntimeError::ContextExceeded {
            prompt: position + prompt.len(),
            requested: opts.max_tokens,
            context,
        }),
        _ => Ok(()),
    }
}

/// One sequence's choices, token by token: its sampler, end ids, token limit and
/// cancellation. Whoever runs the model (one session, or a batched step of many)
/// hands it the logits of the sequence's last position and feeds back the token it
/// picks, until it says it is done.
pub struct Decoder {
    opts: GenerateOptions,
    sampler: Sampler,
    constraint: Option<Active>,
    /// What ended the sequence when something went wrong (the grammar).
    error: Option<RuntimeError>,
    ids: Vec<u32>,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    start: Instant,
    first: Option<Instant>,
    decode_steps: usize,
    context_shifts: usize,
    cached_tokens: usize,
    drafts: DraftStats,
}

impl Decoder {
    /// A decoder for a prompt of `prompt_tokens`, started now (for the timings).
    pub fn new(prompt_tokens: usize, opts: &GenerateOptions) -> Result<Decoder> {
        opts.sampler.validate().map_err(RuntimeError::Sampling)?;
        Ok(Decoder {
            opts: opts.clone(),
            sampler: Sampler::new(opts.sampler.clone()),
            constraint: opts.constraint.as_ref().map(Constraint::start),
            error: None,
            ids: Vec::new(),
            finish: None,
            prompt_tokens,
            start: Instant::now(),
            first: None,
            decode_steps: 0,
            context_shifts: 0,
            cached_tokens: 0,
            drafts: DraftStats::default(),
        })
    }

    /// Counts prompt tokens taken from a cached prefix instead of run.
    pub fn reused(&mut self, tokens: usize) {
        self.cached_tokens += tokens;
    }

    /// The next token after `logits` (the sequence's last position; `history` is every
    /// token of its context), or `None` once the sequence is done. `on_token` sees each
    /// new id and returns whether to go on. A returned token must be run next.
    pub fn next(
        &mut self,
        logits: &[f32],
        history: &[u32],
        on_token: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        if !self.goes_on() {
            return None;
        }
        let masked = match self.constraint.as_mut().map(|c| c.mask(logits)) {
            Some(Err(e)) => return self.fail(e),
            Some(Ok(m)) => m,
            None => None,
        };
        let next = self
            .sampler
            .sample(masked.as_deref().unwrap_or(logits), history);
        self.accept(next, on_token)
    }

    /// Whether the next token is the argmax of the logits and nothing else reads them:
    /// greedy, with no bias, penalty, grammar or log-probabilities. A device can then
    /// pick it and hand back the id alone ([`Session::prefill_argmax`]).
    ///
    /// [`Session::prefill_argmax`]: crate::Session::prefill_argmax
    pub fn picks_argmax(&self) -> bool {
        let s = &self.opts.sampler;
        s.temperature == 0.0
            && s.logit_bias.is_empty()
            && s.repeat_penalty == 1.0
            && s.presence_penalty == 0.0
            && s.frequency_penalty == 0.0
            && self.constraint.is_none()
            && self.opts.logprobs.is_none()
    }

    /// Like [`Decoder::next`], for a token already picked as the logits' argmax (only
    /// when [`Decoder::picks_argmax`]).
    pub fn next_argmax(&mut self, argmax: u32, on_token: impl FnMut(u32) -> bool) -> Option<u32> {
        if !self.goes_on() {
            return None;
        }
        self.accept(argmax, on_token)
    }

    /// Ends the sequence at its length limit or a cancellation; whether it goes on.
    fn goes_on(&mut self) -> bool {
        if self.finish.is_some() {
            return false;
        }
        if self.ids.len() >= self.opts.max_tokens {
            self.end(FinishReason::Length);
            return false;
        }
        let cancelled = self
            .opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed));
        if cancelled {
            self.end(FinishReason::Cancelled);
            return false;
        }
        true
    }

    /// Takes `next` as the sequence's next token: stops at an end token, the grammar's
    /// end, the caller's word or the length limit.
    fn accept(&mut self, next: u32, mut on_token: impl FnMut(u32) -> bool) -> Option<u32> {
        self.first.get_or_insert_with(Instant::now);
        if self.opts.eos.contains(&next) {
            return self.end(FinishReason::Eos);
        }
        let complete = match self.constraint.as_mut().map(|c| c.advance(next)) {
            Some(Err(e)) => return self.fail(e),
            Some(Ok(done)) => done,
            None => false,
        };
        self.ids.push(next);
        if !on_token(next) {
            return self.end(FinishReason::Stop);
        }
        if complete {
            // The grammar admits nothing more: the output is whole.
            return self.end(FinishReason::Eos);
        }
        if self.ids.len() == self.opts.max_tokens {
            return self.end(FinishReason::Length);
        }
        self.decode_steps += 1;
        Some(next)
    }

    fn end(&mut self, reason: FinishReason) -> Option<u32> {
        self.finish = Some(reason);
        None
    }

    fn fail(&mut self, error: RuntimeError) -> Option<u32> {
        self.error = Some(error);
        self.end(FinishReason::Stop)
    }

    /// What went wrong, if the sequence ended on an error (the grammar could not go
    /// on); its output is then not to be trusted.
    pub fn take_error(&mut self) -> Option<RuntimeError> {
        self.error.take()
    }

    /// Whether the output so far is complete under the sequence's grammar (true
    /// without one).
    pub fn grammar_accepts(&mut self) -> bool {
        self.constraint.as_mut().is_none_or(Active::accepting)
    }

    /// The options it decides by.
    pub fn options(&self) -> &GenerateOptions {
        &self.opts
    }

    /// Whether the sequence is done.
    pub fn is_done(&self) -> bool {
        self.finish.is_some()
    }

    /// Ends the sequence early (the caller's reason: a stop string, a cancellation).
    pub fn stop(&mut self, reason: FinishReason) {
        self.finish.get_or_insert(reason);
    }

    /// Counts the draft tokens of a verification step, and those accepted.
    pub fn drafted(&mut self, drafted: usize, accepted: usize) {
        self.drafts.add(DraftStats {
            drafted,
            accepted,
            steps: usize::from(drafted > 0),
        });
    }

    /// Counts a context shift.
    pub fn shifted(&mut self) {
        self.context_shifts += 1;
    }

    /// The ids generated so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// What was generated, and how long it took.
    pub fn finish(self) -> Generation {
        let end = Instant::now();
        let (mask_time, mask_steps) = self
            .constraint
            .as_ref()
            .map_or((Duration::ZERO, 0), |c| (c.time, c.steps));
        let first = self.first.unwrap_or(end);
        Generation {
            ids: self.ids,
            text: String::new(),
            finish: self.finish.unwrap_or(FinishReason::Length),
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            ttft: first - self.start,
            decode_time: end - first,
            decode_steps: self.decode_steps,
            context_shifts: self.context_shifts,
            mask_time,
            mask_steps,
            drafted: self.drafts.drafted,
            accepted: self.drafts.accepted,
        }
    }
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("opts", &self.opts)
            .field("ids", &self.ids)
            .field("finish", &self.finish)
            .finish_non_exhaustive()
    }
}

/// Generates after `prompt`, which is prefilled at the session's current position.
/// `on_token` sees each new id and returns whether to go on.
pub fn generate_ids(
    session: &mut Session,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    generate_ids_drafted(session, None, prompt, opts, on_token)
}

/// Like [`generate_ids`]; with `opts.speculation`, drafts come from `draft` (a draft
/// model's [`ModelDrafter`](crate::speculate::ModelDrafter), say) when given, from
/// the context ([`Lookup`]) otherwise.
pub fn generate_ids_drafted(
    session: &mut Session,
    draft: Option<&mut dyn Drafter>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    check_fit(session.position(), session.context(), prompt, opts)?;
    let mut decoder = Decoder::new(prompt.len(), opts)?;
    if let Some(spec) = opts.speculation {
        spec.validate().map_err(RuntimeError::Options)?;
        speculative(session, draft, prompt, opts, spec, &mut decoder, on_token)?;
        if let Some(e) = decoder.take_error() {
            return Err(e);
        }
        return Ok(decoder.finish());
    }
    // Greedy on a GPU: the device picks the token and only its id comes back, not the
    // vocabulary's logits.
    let on_device = decoder.picks_argmax() && session.picks_on_device();
    let step = |session: &mut Session, ids: &[u32]| -> Result<Picked> {
        Ok(if on_device {
            Picked::Id(session.prefill_argmax(ids)?)
        } else {
            Picked::Logits(session.prefill_last(ids)?)
        })
    };
    let mut picked = step(session, prompt)?;
    loop {
        let next = match &picked {
            Picked::Id(id) => decoder.next_argmax(*id, &mut on_token),
            Picked::Logits(logits) => decoder.next(logits, session.tokens(), &mut on_token),
        };
        let Some(next) = next else { break };
        if session.position() + 1 > session.context() {
            if let Some(keep) = opts.context_shift {
                session.shift_context(keep)?;
                decoder.shifted();
            }
        }
        picked = step(session, &[next])?;
    }
    if let Some(e) = decoder.take_error() {
        return Err(e);
    }
    Ok(decoder.finish())
}

/// The generation loop with drafts: each step runs the token just chosen and a draft
/// of the tokens after it, and the decoder chooses from the step's rows in turn until
/// a choice differs from the draft; the cache is then rewound to what was accepted.
fn speculative(
    session: &mut Session,
    drafter: Option<&mut dyn Drafter>,
    prompt: &[u32],
    opts: &GenerateOptions,
    spec: Speculation,
    decoder: &mut Decoder,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<()> {
    let mut adaptive = Adaptive::new(spec.draft_max);
    let mut lookup = Lookup::from(spec);
    let drafter: &mut dyn Drafter = match drafter {
        Some(d) => d,
        None => &mut lookup,
    };
    let mut context = Vec::new();
    let last = session.prefill_last(prompt)?;
    let mut rows = crate::Logits {
        rows: 1,
        vocab: last.len(),
        data: last,
    };
    let mut draft: Vec<u32> = Vec::new();
    loop {
        // The context the rows follow: everything up to the first row's position.
        let at = session.position() - draft.len();
        let (accepted, next) = verify(
            &draft,
            |i| rows.row(i),
            |logits, i| decoder.next(logits, &session.tokens()[..at + i], &mut on_token),
        );
        decoder.drafted(draft.len(), accepted);
        adaptive.record(draft.len(), accepted);
        session.truncate(at + accepted)?;
        let Some(next) = next else { break };
        if session.position() + 1 > session.context() {
            if let Some(keep) = opts.context_shift {
                session.shift_context(keep)?;
                decoder.shifted();
            }
        }
        // A step yields at most the draft and one more: no longer than what is left.
        let left = opts.max_tokens.saturating_sub(decoder.ids().len() + 1);
        let want = adaptive
            .want()
            .min(session.draft_room(spec.draft_max))
            .min(left);
        draft = if want == 0 {
            Vec::new()
        } else {
            context.clear();
            context.extend_from_slice(session.tokens());
            context.push(next);
            let mut d = drafter.draft(&context, want)?;
            d.truncate(want);
            // A guess outside the vocabulary is no guess.
            if let Some(p) = d.iter().position(|&t| t as usize >= rows.vocab) {
                d.truncate(p);
            }
            d
        };
        let mut ids = Vec::with_capacity(1 + draft.len());
        ids.push(next);
        ids.extend_from_slice(&draft);
        rows = if draft.is_empty() {
            let last = session.prefill_last(&ids)?;
            crate::Logits {
                rows: 1,
                vocab: last.len(),
                data: last,
            }
        } else {
            session.prefill(&ids)?
        };
    }
    Ok(())
}

/// What a step hands back: the last position's logits, or the token the device picked.
enum Picked {
    Logits(Vec<f32>),
    Id(u32),
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

/// A sequence's text as its tokens arrive: whole characters only, and nothing of a
/// stop string (the text ends before it).
pub struct TextOutput<'t> {
    stream: TextStream<'t>,
    filter: StopFilter,
    text: String,
    stopped: bool,
}

impl<'t> TextOutput<'t> {
    pub fn new(tokenizer: &'t Tokenizer, stops: &[String]) -> Self {
        TextOutput {
            stream: tokenizer.stream(),
            filter: StopFilter::new(stops),
            text: String::new(),
            stopped: false,
        }
    }

    /// Adds a token; returns the text that became final (maybe empty), and whether a
    /// stop string ended the text.
    pub fn push(&mut self, id: u32) -> Result<(String, bool)> {
        let piece = self.stream.push(id)?;
        let (shown, hit) = self.filter.push(&piece);
        self.text.push_str(&shown);
        self.stopped |= hit;
        Ok((shown, hit))
    }

    /// Once generation ended: the text held back (a partial character, the start of a
    /// stop string that never completed), and whether it completed a stop string after all.
    pub fn finish(&mut self) -> Result<(String, bool)> {
        if self.stopped {
            return Ok((String::new(), true));
        }
        let (shown, hit) = self.filter.push(&self.stream.finish()?);
        let rest = if hit {
            shown
        } else {
            shown + &self.filter.finish()
        };
        self.text.push_str(&rest);
        self.stopped |= hit;
        Ok((rest, hit))
    }

    /// All the text shown so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

/// Generates text after `prompt`: `on_text` receives each piece as it becomes final
/// (never half a character, never any part of a stop string).
pub fn generate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    generate_drafted(session, None, tokenizer, prompt, opts, on_text)
}

/// Like [`generate`], with a draft model's session for `opts.speculation` (see
/// [`generate_ids_drafted`]).
pub fn generate_drafted(
    session: &mut Session,
    draft: Option<&mut dyn Drafter>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let mut out = TextOutput::new(tokenizer, &opts.stop);
    let mut failure = None;
    let mut generation =
        generate_ids_drafted(session, draft, prompt, opts, |id| match out.push(id) {
            Ok((shown, hit)) => {
                if !shown.is_empty() {
                    on_text(&shown);
                }
                !hit
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let (rest, hit) = out.finish()?;
    if !rest.is_empty() {
        on_text(&rest);
    }
    if hit {
        generation.finish = FinishReason::Stop;
    }
    generation.text = out.into_text();
    Ok(generation)
}
