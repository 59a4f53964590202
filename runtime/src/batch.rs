//! Many sequences at once: a [`Scheduler`] runs the next tokens of every active
//! sequence in one batched step ([`Program::run_batch`]), so each weight is read once
//! per step for all of them.
//!
//! - Continuous batching: sequences join and leave at any step. Each has its own KV
//!   cache, sampler (and seed), end ids, stop strings, token limit and cancellation.
//! - Chunked prefill: a step runs at most [`BatchOptions::step_tokens`] tokens; the
//!   decode tokens of running sequences go first and prompts fill the rest in chunks,
//!   so a long prompt never stalls the sequences that are decoding.
//! - A KV budget: a sequence reserves the positions it can reach (prompt plus
//!   `max_tokens`) when it is admitted, and waits while the budget is taken; one that
//!   could never fit is refused with the numbers.
//! - A prefix cache: once a prompt is prefilled its keys and values are kept; a later
//!   sequence whose prompt starts with the same tokens (a system prompt, a chat
//!   history, a document, several samples of one prompt) starts from those positions
//!   instead of running them again, sharing their memory: host caches hold pages of
//!   64 positions, reference-counted and copied only when written (`KvCache`), so a
//!   sequence shares every whole page of the prefix and copies at most one. A
//!   sequence whose prompt shares a prefix with one still prefilling waits for it.
//!   Entries count against the KV budget and the least recently used go first when
//!   room is needed; a sequence sharing an entry's pages is charged only for the rest
//!   of its reservation, and the entry stays (pinned) until such sequences end, so
//!   the budget still bounds the memory held.
//! - Isolation: a failing step is retried one sequence at a time, so an error (or a
//!   cancellation) ends only the sequence it belongs to.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use llama_graph::{KvCache, KvType, Program, Rows, Sequence, Taps};

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::generate::{
    log_softmax, top_logprobs, Decoder, FinishReason, GenerateOptions, Generation, TextOutput,
    TokenLogprob,
};
use crate::session::argmax;
use crate::speculate::{lookup, verify, Adaptive, Drafter};
use crate::tokenizer::Tokenizer;

mod prefix;
use prefix::{common_prefix, PrefixEntry};

/// A sequence's handle in a [`Scheduler`].
pub type SeqId = u64;

/// How a [`Scheduler`] shares the device among sequences.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Positions that all sequences together (and the prefix cache) may hold.
    pub kv_budget: usize,
    /// The most tokens one step runs: every running sequence's decode token, then
    /// chunks of prompts.
    pub step_tokens: usize,
    /// The most sequences running at once.
    pub max_sequences: usize,
    /// Keep prefilled prompts for later sequences that start with them.
    pub prefix_cache: bool,
    /// The shortest shared prefix worth reusing (or waiting for).
    pub min_prefix: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            kv_budget: 65_536,
            step_tokens: 512,
            max_sequences: 64,
            prefix_cache: true,
            min_prefix: 16,
        }
    }
}

/// What a step did for one sequence.
#[derive(Debug)]
pub enum Event {
    /// A new token, and the text that became final with it (empty without a
    /// tokenizer, or while a character or a possible stop string is incomplete);
    /// with `logprob` when the options asked for log-probabilities.
    Token {
        seq: SeqId,
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Text held back until the sequence ended (it comes just before `Done`).
    Text { seq: SeqId, text: String },
    /// The sequence ended; what it generated (`text` holds the whole text).
    Done { seq: SeqId, generation: Generation },
    /// The sequence failed; the others go on.
    Failed { seq: SeqId, error: RuntimeError },
}

impl Event {
    pub fn seq(&self) -> SeqId {
        match self {
            Event::Token { seq, .. }
            | Event::Text { seq, .. }
            | Event::Done { seq, .. }
            | Event::Failed { seq, .. } => *seq,
        }
    }
}

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqState {
    /// Submitted, waiting for room in the KV budget (or for a shared prefix).
    Waiting,
    /// Admitted: prefilling or decoding.
    Running,
}

/// Counters since the scheduler started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Steps run.
    pub steps: u64,
    /// Prompt tokens run through the model.
    pub prompt_tokens_run: u64,
    /// Prompt tokens copied from the prefix cache instead.
    pub prompt_tokens_reused: u64,
    /// Decode tokens run (draft tokens being verified included).
    pub decode_tokens_run: u64,
    /// Draft tokens verified, and those accepted.
    pub drafted: u64,
    pub accepted: u64,
    /// The most sequences one step carried.
    pub widest_step: usize,
}

struct Waiting {
    id: SeqId,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    reserve: usize,
    /// Whether the disk tier was asked for its prefix.
    disk_checked: bool,
}

struct Slot<'t> {
    id: SeqId,
    cache: KvCache,
    /// Every token of the context: `tokens[..cache.len()]` are cached, the rest are
    /// still to run (what is left of the prompt, or the token just chosen).
    tokens: Vec<u32>,
    prompt_len: usize,
    decoder: Decoder,
    text: Option<TextOutput<'t>>,
    /// Positions charged to the KV budget: the reservation less the whole pages
    /// shared with `pinned`.
    reserve: usize,
    /// The prefix entry whose pages it shares.
    pinned: Option<u64>,
    /// Tokens this step runs for it (the draft included).
    planned: usize,
    /// Speculation, when its options ask for it: the draft length it adapts, this
    /// step's draft (run after the last token), and with a draft model, that model's
    /// cache of the context and the tokens in it.
    spec: Option<Adaptive>,
    draft: Vec<u32>,
    draft_cache: Option<(KvCache, Vec<u32>)>,
}

impl Slot<'_> {
    fn prefilling(&self) -> bool {
        self.cache.len() < self.prompt_len
    }
}

/// The most rows a decode step carries with drafts: one per decoding sequence plus
/// their draft tokens. Verifying drafts is nearly free while a step is bound by
/// reading the weights (the packed kernels read each weight once for up to eight rows,
/// and a second group of eight costs little more); past that, every draft row is
/// compute the step pays whether the draft is accepted or not. So drafts share what is
/// left of this budget after the sequences' own rows: eight each up to one sequence,
/// three each at four, none from sixteen sequences on (where `serve --lookup`
/// measured 0.87x of plain decode without this budget).
const DRAFT_ROWS: usize = 16;

/// Runs many sequences through one program, a batched step at a time.
pub struct Scheduler<'t> {
    program: &'t Program,
    /// A draft model's program and the positions it holds, for sequences that
    /// speculate.
    draft: Option<(&'t Program, usize)>,
    /// How sequences whose options do not say speculate.
    speculation: Option<crate::speculate::Speculation>,
    /// Drafts from elsewhere (instead of a lookup or the draft model).
    drafter: Option<Box<dyn Drafter + 't>>,
    tokenizer: Option<&'t Tokenizer>,
    vocab: usize,
    context: usize,
    cache_type: KvType,
    opts: BatchOptions,
    next_id: SeqId,
    waiting: VecDeque<Waiting>,
    active: Vec<Slot<'t>>,
    prefixes: Vec<PrefixEntry>,
    next_entry: u64,
    /// Positions reserved by running sequences and held by prefix entries.
    used: usize,
    events: Vec<Event>,
    clock: u64,
    stats: BatchStats,
    /// The prefix cache's disk tier, if it has one.
    disk: Option<crate::prompt_cache::DiskCache>,
    cache_stats: std::sync::Arc<crate::prompt_cache::CacheStats>,
    /// When the RAM tier's bytes were last counted (entries made, entries held).
    ram_counted: Option<(u64, usize)>,
}

impl<'t> Scheduler<'t> {
    /// A scheduler over an engine's program, context and cache type; with a
    /// tokenizer ([`Scheduler::with_tokenizer`]) its events carry text and stop
    /// strings apply.
    pub fn new(engine: &'t Engine, opts: BatchOptions) -> Result<Self> {
        engine.check_generates()?;
        Self::for_program(
            engine.program(),
            engine.context(),
            engine.cache_type(),
            opts,
        )
    }

    /// The same over a program compiled by hand: sequences of at most `context`
    /// positions, host KV layers stored as `cache_type`.
    pub fn for_program(
        program: &'t Program,
        context: usize,
        cache_type: KvType,
        opts: BatchOptions,
    ) -> Result<Self> {
        let vocab = crate::session::logits_width(program)?;
        if opts.kv_budget == 0 || opts.step_tokens == 0 || opts.max_sequences == 0 {
            return Err(RuntimeError::Options(
                "the KV budget, step tokens and sequence limit must be positive".into(),
            ));
        }
        Ok(Scheduler {
            program,
            draft: None,
            speculation: None,
            drafter: None,
            tokenizer: None,
            vocab,
            context,
            cache_type,
            opts,
            next_id: 0,
            waiting: VecDeque::new(),
            active: Vec::new(),
            prefixes: Vec::new(),
            next_entry: 0,
            used: 0,
            events: Vec::new(),
            clock: 0,
            stats: BatchStats::default(),
            disk: None,
            cache_stats: Default::default(),
            ram_counted: None,
        })
    }

    /// Events carry text, and stop strings end sequences.
    pub fn with_tokenizer(mut self, tokenizer: &'t Tokenizer) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// Sequences that speculate draft with this model (a smaller one with the same
    /// vocabulary, compiled for the same device) instead of looking drafts up in their
    /// context. Its caches are not charged to the KV budget.
    pub fn with_draft(mut self, draft: &'t Program, context: usize) -> Self {
        self.draft = Some((draft, context));
        self
    }

    /// Speculating sequences take their drafts from `drafter` (called with each
    /// sequence's context in turn): a source of drafts of the caller's own.
    pub fn with_drafter(mut self, drafter: Box<dyn Drafter + 't>) -> Self {
        self.drafter = Some(drafter);
        self
    }

    /// Sequences submitted without speculation options speculate with these (a
    /// server's `--lookup`).
    pub fn with_speculation(mut self, spec: Option<crate::speculate::Speculation>) -> Self {
        self.speculation = spec;
        self
    }

    /// Finished sequences spill to `disk` too, and a prompt that shares more with an
    /// entry there than with any kept in RAM loads that entry's pages.
    pub fn with_disk(mut self, disk: crate::prompt_cache::DiskCache) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Counts of the prefix cache's tiers, updated as the scheduler steps.
    pub fn with_cache_stats(
        mut self,
        stats: std::sync::Arc<crate::prompt_cache::CacheStats>,
    ) -> Self {
        self.cache_stats = stats;
        self
    }

    /// The disk tier, if there is one.
    pub fn disk(&self) -> Option<&crate::prompt_cache::DiskCache> {
        self.disk.as_ref()
    }

    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    /// Adds a sequence: `prompt` is run, then up to `opts.max_tokens` are generated.
    /// Checked now: an empty prompt, an id outside the vocabulary, bad sampling
    /// settings, a context shift, a request longer than the context, or one that
    /// needs more positions than the whole KV budget is refused. Otherwise it starts
    /// at once if there is room, or waits for it.
    pub fn submit(&mut self, prompt: Vec<u32>, mut opts: GenerateOptions) -> Result<SeqId> {
        if opts.speculation.is_none() {
            opts.speculation = self.speculation;
        }
        if prompt.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(RuntimeError::TokenOutOfRange {
                id,
                vocab: self.vocab,
            });
        }
        opts.sampler.validate().map_err(RuntimeError::Sampling)?;
        if let Some(spec) = &opts.speculation {
            spec.validate().map_err(RuntimeError::Options)?;
        }
        if opts.context_shift.is_some() {
            return Err(RuntimeError::Options(
                "context shift is not available to batched sequences: a request must fit its reservation".into(),
            ));
        }
        let reserve = prompt.len() + opts.max_tokens.saturating_sub(1);
        if reserve > self.context {
            return Err(RuntimeError::ContextExceeded {
                prompt: prompt.len(),
                requested: opts.max_tokens,
                context: self.context,
            });
        }
        if reserve > self.opts.kv_budget {
            return Err(RuntimeError::KvBudget {
                needed: reserve,
                budget: self.opts.kv_budget,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Waiting {
            id,
            prompt,
            opts,
            reserve,
            disk_checked: false,
        });
        // Admitted now if there is room, so that `waiting()` counts only those
        // that really wait.
        self.admit();
        Ok(id)
    }

    /// Ends a sequence: it reports [`FinishReason::Cancelled`] at the next step (with
    /// what it generated so far). Returns whether the sequence was known.
    pub fn cancel(&mut self, seq: SeqId) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.id == seq) {
            if let Some(w) = self.waiting.remove(i) {
                match Decoder::new(w.prompt.len(), &w.opts) {
                    Ok(mut d) => {
                        d.stop(FinishReason::Cancelled);
                        let generation = d.finish();
                        self.events.push(Event::Done { seq, generation });
                    }
                    Err(error) => self.events.push(Event::Failed { seq, error }),
                }
            }
            return true;
        }
        if let Some(s) = self.active.iter_mut().find(|s| s.id == seq) {
            s.decoder.stop(FinishReason::Cancelled);
            return true;
        }
        false
    }

    /// Where `seq` is, or `None` once it has ended (or was never submitted).
    pub fn state(&self, seq: SeqId) -> Option<SeqState> {
        if self.waiting.iter().any(|w| w.id == seq) {
            Some(SeqState::Waiting)
        } else if self.active.iter().any(|s| s.id == seq) {
            Some(SeqState::Running)
        } else {
            None
        }
    }

    /// Whether nothing is waiting, running or left to report.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty() && self.events.is_empty()
    }

    /// Sequences running.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// Sequences waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Positions reserved by running sequences and held by the prefix cache.
    pub fn kv_used(&self) -> usize {
        self.used
    }

    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Steps until every sequence has ended, handing each event to `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(Event)) {
        while !self.is_idle() {
            for e in self.step() {
                on_event(e);
            }
        }
    }

    /// Admits what fits, runs one batched step, and reports what happened.
    pub fn step(&mut self) -> Vec<Event> {
        self.retire_cancelled();
        self.admit();
        if self.active.is_empty() {
            return std::mem::take(&mut self.events);
        }
        self.draft_all();
        self.plan();
        let rows_kind = self.rows_kind();
        let mut rows = self.run_planned(rows_kind).into_iter();
        self.stats.steps += 1;
        let mut done = Vec::new();
        let mut ran = 0;
        for (i, s) in self.active.iter_mut().enumerate() {
            if s.planned == 0 {
                continue;
            }
            ran += 1;
            let logits = match rows.next() {
                // Only this sequence ends: the others' rows are their own.
                Some(Ok(l)) if !l.iter().all(|x| x.is_finite()) => {
                    let error = RuntimeError::NonFiniteLogits {
                        position: s.cache.len().saturating_sub(1),
                    };
                    self.events.push(Event::Failed { seq: s.id, error });
                    done.push(i);
                    continue;
                }
                Some(Ok(l)) => l,
                Some(Err(error)) => {
                    self.events.push(Event::Failed { seq: s.id, error });
                    done.push(i);
                    continue;
                }
                None => {
                    self.events.push(Event::Failed {
                        seq: s.id,
                        error: RuntimeError::Options("the step produced too few rows".into()),
                    });
                    done.push(i);
                    continue;
                }
            };
            if s.cache.len() - s.planned < s.prompt_len {
                self.stats.prompt_tokens_run += s.planned as u64;
            } else {
                self.stats.decode_tokens_run += s.planned as u64;
            }
            s.planned = 0;
            if s.cache.len() < s.tokens.len() {
                // A prompt chunk; the rest runs in later steps.
                continue;
            }
            if s.cache.len() == s.prompt_len && self.opts.prefix_cache {
                // Just prefilled: keep the prompt for sequences that share it.
                let covered = self.prefixes.iter().any(|p| {
                    p.tokens.len() >= s.prompt_len
                        && common_prefix(&p.tokens, &s.tokens) >= s.prompt_len
                });
                if !covered && s.prompt_len >= self.opts.min_prefix {
                    self.next_entry += 1;
                    let entry = PrefixEntry {
                        id: self.next_entry,
                        tokens: s.tokens[..s.prompt_len].to_vec(),
                        cache: s.cache.clone(),
                        last_used: self.clock,
                        users: 0,
                        from_disk: false,
                    };
                    // Made room for only where the budget has it free.
                    if self.used + entry.tokens.len() <= self.opts.kv_budget {
                        self.used += entry.tokens.len();
                        self.prefixes.push(entry);
                    }
                }
            }
            // The rows the step computed for it: its last row, or with a draft the
            // rows after its last token and after each draft token.
            let draft = std::mem::take(&mut s.draft);
            let n_rows = logits.len() / self.vocab;
            let first = n_rows - 1 - draft.len();
            // The context the first row follows (the draft is taken back out of it;
            // each choice is put back as it is made).
            let at = s.cache.len() - draft.len();
            s.tokens.truncate(at);
            let events = &mut self.events;
            let id = s.id;
            let text = &mut s.text;
            let tokens = &mut s.tokens;
            let decoder = &mut s.decoder;
            let vocab = self.vocab;
            let mut failure = None;
            let (accepted, next) = verify(
                &draft,
                |i| &logits[(first + i) * vocab..(first + i + 1) * vocab],
                |row, _| {
                    let lsm = decoder.options().logprobs.map(|k| {
                        let lsm = log_softmax(row);
                        let top = top_logprobs(&lsm, k);
                        (lsm, top)
                    });
                    let next = decoder.next(row, tokens, |tok| {
                        let (piece, hit) = match text.as_mut().map(|t| t.push(tok)) {
                            None => (String::new(), false),
                            Some(Ok(x)) => x,
                            Some(Err(e)) => {
                                failure = Some(e);
                                return false;
                            }
                        };
                        let logprob = lsm.as_ref().map(|(lsm, top)| TokenLogprob {
                            logprob: lsm.get(tok as usize).copied().unwrap_or(f32::NEG_INFINITY),
                            top: top.clone(),
                        });
                        events.push(Event::Token {
                            seq: id,
                            id: tok,
                            text: piece,
                            logprob,
                        });
                        !hit
                    });
                    if let Some(t) = next {
                        tokens.push(t);
                    }
                    next
                },
            );
            if !draft.is_empty() {
                s.decoder.drafted(draft.len(), accepted);
                if let Some(a) = s.spec.as_mut() {
                    a.record(draft.len(), accepted);
                }
                self.stats.drafted += draft.len() as u64;
                self.stats.accepted += accepted as u64;
                // Positions of rejected draft tokens are forgotten; the draft's room
                // was checked to allow it.
                if let Err(error) = s.cache.truncate(at + accepted) {
                    self.events.push(Event::Failed {
                        seq: id,
                        error: error.into(),
                    });
                    done.push(i);
                    continue;
                }
            }
            if let Some(error) = failure {
                self.events.push(Event::Failed { seq: id, error });
                done.push(i);
                continue;
            }
            if next.is_none() {
                done.push(i);
            }
        }
        self.stats.widest_step = self.stats.widest_step.max(ran);
        for &i in done.iter().rev() {
            let s = self.active.remove(i);
            self.release(&s);
            if self
                .events
                .iter()
                .any(|e| matches!(e, Event::Failed { seq, .. } if *seq == s.id))
            {
                continue;
            }
            let Slot {
                id,
                cache,
                tokens,
                decoder,
                text,
                ..
            } = s;
            finish(id, decoder, text, &mut self.events);
            self.keep_finished(tokens, cache);
        }
        self.count_ram_bytes();
        std::mem::take(&mut self.events)
    }

    /// Ends sequences whose cancellation flag is up (a prompt still prefilling
    /// never reaches the decoder's own check).
    fn retire_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let s = &mut self.active[i];
            let flag = s
                .decoder
                .options()
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed));
            if flag {
                s.decoder.stop(FinishReason::Cancelled);
            }
            if s.decoder.is_done() {
                let s = self.active.remove(i);
                self.release(&s);
                finish(s.id, s.decoder, s.text, &mut self.events);
            } else {
                i += 1;
            }
        }
    }

    /// Starts waiting sequences, first come first served, while the budget allows.
    fn admit(&mut self) {
        while let Some(w) = self.waiting.front() {
            if self.active.len() >= self.opts.max_sequences {
                return;
            }
            if !w.disk_checked {
                self.load_from_disk();
            }
            let Some(w) = self.waiting.front() else {
                return;
            };
            let (mut entry, reuse) = self.best_prefix(&w.prompt);
            // A prompt that shares more with one still prefilling than with any kept
            // prefix waits for it to finish, then copies instead of running it twice.
            if self.opts.prefix_cache {
                let pending = self
                    .active
                    .iter()
                    .filter(|s| s.prefilling())
                    .map(|s| common_prefix(&s.tokens[..s.prompt_len], &w.prompt))
                    .max()
                    .unwrap_or(0)
                    .min(w.prompt.len() - 1);
                if pending >= self.opts.min_prefix && pending > reuse {
                    return;
                }
            }
            // What it costs: its reservation less the whole pages it will share.
            let need = w.reserve - entry.map_or(0, |e| self.shared(e, reuse));
            // Room: the least recently used prefixes go first (not the one about to
            // be shared, nor those running sequences share).
            while self.used + need > self.opts.kv_budget {
                let victim = self
                    .prefixes
                    .iter()
                    .enumerate()
                    .filter(|(i, p)| Some(*i) != entry && p.users == 0)
                    .min_by_key(|(_, p)| p.last_used)
                    .map(|(i, _)| i);
                let Some(v) = victim else { break };
                let p = self.prefixes.remove(v);
                self.used -= p.tokens.len();
                // Indices after the evicted one move down.
                entry = entry.map(|e| if e > v { e - 1 } else { e });
            }
            if self.used + need > self.opts.kv_budget {
                // Reusing the entry is not worth blocking on: drop it too if it is
                // all that stands in the way.
                if let Some(e) = entry.filter(|&e| self.prefixes[e].users == 0) {
                    if self.used - self.prefixes[e].tokens.len() + w.reserve <= self.opts.kv_budget
                    {
                        let p = self.prefixes.remove(e);
                        self.used -= p.tokens.len();
                        continue;
                    }
                }
                return;
            }
            let Some(w) = self.waiting.pop_front() else {
                return;
            };
            let seq = w.id;
            match self.start(w, entry.filter(|_| reuse > 0), reuse) {
                Ok(slot) => {
                    self.used += slot.reserve;
                    self.active.push(slot);
                }
                Err(error) => self.events.push(Event::Failed { seq, error }),
            }
        }
    }

    fn start(&mut self, w: Waiting, entry: Option<usize>, reuse: usize) -> Result<Slot<'t>> {
        let mut cache = self.program.new_cache_of(w.reserve, self.cache_type)?;
        let (mut reserve, mut pinned) = (w.reserve, None);
        let mut hit = None;
        if let Some(e) = entry {
            self.clock += 1;
            let shared = self.shared(e, reuse);
            let p = &mut self.prefixes[e];
            p.last_used = self.clock;
            if cache.copy_prefix(&p.cache, reuse).is_ok() {
                hit = Some(std::mem::take(&mut p.from_disk));
                self.stats.prompt_tokens_reused += reuse as u64;
                if shared > 0 {
                    reserve -= shared;
                    pinned = Some(p.id);
                    p.users += 1;
                }
            } else {
                // A sliding-window layer that moved past the prefix: run it instead.
                cache = self.program.new_cache_of(w.reserve, self.cache_type)?;
            }
        }
        self.count_hit(hit);
        let mut decoder = Decoder::new(w.prompt.len(), &w.opts)?;
        decoder.reused(cache.len());
        let text = self.tokenizer.map(|t| TextOutput::new(t, &w.opts.stop));
        Ok(Slot {
            id: w.id,
            cache,
            prompt_len: w.prompt.len(),
            tokens: w.prompt,
            decoder,
            text,
            reserve,
            pinned,
            planned: 0,
            spec: w.opts.speculation.map(|sp| Adaptive::new(sp.draft_max)),
            draft: Vec::new(),
            draft_cache: None,
        })
    }

    /// Decides what each running sequence runs this step: one token for those
    /// decoding, then prompt chunks in arrival order while the step has room (at
    /// least one chunk, so prompts always advance).
    fn plan(&mut self) {
        let mut room = self.opts.step_tokens;
        for s in self.active.iter_mut().filter(|s| !s.prefilling()) {
            // The token just chosen, then its draft (taken back out of the context
            // once the step has verified it).
            s.planned = 1 + s.draft.len();
            s.tokens.extend_from_slice(&s.draft);
            room = room.saturating_sub(s.planned);
        }
        let mut any = self.active.iter().any(|s| s.planned > 0);
        for s in self.active.iter_mut().filter(|s| s.prefilling()) {
            let left = s.tokens.len() - s.cache.len();
            let n = if any {
                left.min(room)
            } else {
                left.min(self.opts.step_tokens)
            };
            s.planned = n;
            room = room.saturating_sub(n);
            any |= n > 0;
        }
    }

    /// Drafts for the sequences that speculate and are decoding: how many tokens each
    /// wants (its adaptive length, what its cache can take back, what is left of its
    /// token limit, its share of [`DRAFT_ROWS`]), looked up in its context or proposed
    /// by the draft model.
    fn draft_all(&mut self) {
        let decoding = self
            .active
            .iter()
            .filter(|s| !s.prefilling() && !s.decoder.is_done())
            .count();
        let share = DRAFT_ROWS.saturating_sub(decoding) / decoding.max(1);
        let mut wanted = Vec::new();
        for (i, s) in self.active.iter_mut().enumerate() {
            s.draft.clear();
            if s.prefilling() || s.decoder.is_done() {
                continue;
            }
            let (Some(a), Some(spec)) = (s.spec.as_mut(), s.decoder.options().speculation) else {
                continue;
            };
            let left = s
                .decoder
                .options()
                .max_tokens
                .saturating_sub(s.decoder.ids().len() + 1);
            let want = a
                .want()
                .min(s.cache.draft_room(spec.draft_max))
                .min(left)
                .min(share);
            if want == 0 {
                continue;
            }
            if let Some(d) = self.drafter.as_mut() {
                // A drafter that fails only costs its draft.
                let mut draft = d.draft(&s.tokens, want).unwrap_or_default();
                draft.truncate(want);
                if let Some(p) = draft.iter().position(|&t| t as usize >= self.vocab) {
                    draft.truncate(p);
                }
                s.draft = draft;
            } else if self.draft.is_none() {
                s.draft = lookup(&s.tokens, spec.ngram_min, spec.ngram_max, want);
            } else {
                wanted.push((i, want));
            }
        }
        if let Some((program, context)) = self.draft {
            if !wanted.is_empty() {
                draft_with_model(program, context, &mut self.active, &wanted);
                // A draft model's vocabulary may run past ours: such a token is
                // never a guess of ours.
                for &(i, _) in &wanted {
                    let d = &mut self.active[i].draft;
                    if let Some(p) = d.iter().position(|&t| t as usize >= self.vocab) {
                        d.truncate(p);
                    }
                }
            }
        }
    }

    /// The rows the step's output head computes: each sequence's last, or its last
    /// few where a draft is verified.
    fn rows_kind(&self) -> Rows {
        match self.active.iter().map(|s| s.draft.len()).max() {
            Some(k) if k > 0 => Rows::LastN(k + 1),
            _ => Rows::Last,
        }
    }

    /// Runs the planned tokens as one step; each planned sequence gets the logits of
    /// its output rows (`rows`), or the error that stopped it. If the batched step
    /// fails, each sequence runs alone so the error stays with the one it belongs to
    /// (a failed step leaves every cache as it was).
    fn run_planned(&mut self, rows: Rows) -> Vec<Result<Vec<f32>>> {
        let program = self.program;
        let vocab = self.vocab;
        let run = |slots: &mut [&mut Slot<'t>]| -> Result<Vec<Vec<f32>>> {
            let mut seqs: Vec<Sequence<'_>> = slots
                .iter_mut()
                .map(|s| {
                    let start = s.cache.len();
                    let s = &mut **s;
                    Sequence {
                        tokens: &s.tokens[start..start + s.planned],
                        cache: &mut s.cache,
                    }
                })
                .collect();
            let out = program.run_batch(&mut seqs, &Taps::None, rows)?;
            let value = out.outputs.into_iter().next().ok_or_else(|| {
                llama_graph::GraphError::Input("the graph produced no output".into())
            })?;
            let data = value.to_f32_vec()?;
            let counts: Vec<usize> = slots.iter().map(|s| rows.of(s.planned)).collect();
            let total: usize = counts.iter().sum();
            if data.len() != vocab * total {
                return Err(RuntimeError::Options(format!(
                    "a step of {} sequences produced {} logits",
                    slots.len(),
                    data.len()
                )));
            }
            let mut at = 0;
            Ok(counts
                .iter()
                .map(|&n| {
                    let part = data[at * vocab..(at + n) * vocab].to_vec();
                    at += n;
                    part
                })
                .collect())
        };
        let mut planned: Vec<&mut Slot<'t>> =
            self.active.iter_mut().filter(|s| s.planned > 0).collect();
        match run(&mut planned) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(e) if planned.len() == 1 => vec![Err(e)],
            Err(_) => planned
                .iter_mut()
                .map(|s| {
                    run(std::slice::from_mut(s)).and_then(|mut r| {
                        r.pop()
                            .ok_or_else(|| RuntimeError::Options("no logits".into()))
                    })
                })
                .collect(),
        }
    }
}

/// Proposes drafts with a draft model for the slots in `wanted` (`(index, length)`):
/// each slot's draft cache first catches up with its context (what it holds that still
/// agrees is kept), then all of them run one token a round, batched, each taking the
/// draft model's argmax. A draft model that fails only costs the drafts: the slots
/// decode without them this step, and drop the draft cache.
fn draft_with_model(
    program: &Program,
    context: usize,
    active: &mut [Slot<'_>],
    wanted: &[(usize, usize)],
) {
    let vocab = match crate::session::logits_width(program) {
        Ok(v) => v,
        Err(_) => return,
    };
    // Catch up: keep the longest prefix of the draft cache that agrees with the
    // context, leaving at least the last token to run.
    let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
    for &(i, _) in wanted {
        let s = &mut active[i];
        // Past the draft model's context it has no guesses.
        let capacity = s.cache.capacity().min(context);
        if s.tokens.len() + wanted.iter().find(|w| w.0 == i).map_or(0, |w| w.1) > capacity {
            continue;
        }
        if s.draft_cache.is_none() {
            match program.new_cache(capacity) {
                Ok(c) => s.draft_cache = Some((c, Vec::new())),
                Err(_) => continue,
            }
        }
        let Some((cache, held)) = s.draft_cache.as_mut() else {
            continue;
        };
        let common = common_prefix(held, &s.tokens).min(s.tokens.len() - 1);
        if cache.truncate(common).is_err() && cache.truncate(0).is_err() {
            s.draft_cache = None;
            continue;
        }
        held.truncate(cache.len());
        inputs.push((i, s.tokens[cache.len()..].to_vec()));
    }
    let longest = wanted.iter().map(|&(_, n)| n).max().unwrap_or(0);
    for round in 0..longest {
        let mut order = Vec::new();
        let mut seqs = Vec::new();
        for (i, ids) in &inputs {
            let want = wanted.iter().find(|w| w.0 == *i).map_or(0, |w| w.1);
            if round >= want || ids.is_empty() {
                continue;
            }
            order.push(*i);
            seqs.push(ids.clone());
        }
        if order.is_empty() {
            break;
        }
        // Run the round: every participating slot's tokens at once.
        let result = {
            let mut caches: Vec<&mut KvCache> = Vec::new();
            let mut picked: Vec<&mut Slot<'_>> = active
                .iter_mut()
                .enumerate()
                .filter(|(j, _)| order.contains(j))
                .map(|(_, s)| s)
                .collect();
            for s in picked.iter_mut() {
                if let Some((c, _)) = s.draft_cache.as_mut() {
                    caches.push(c);
                }
            }
            if caches.len() != seqs.len() {
                break;
            }
            let mut batch: Vec<Sequence<'_>> = caches
                .into_iter()
                .zip(&seqs)
                .map(|(cache, tokens)| Sequence { tokens, cache })
                .collect();
            program
                .run_batch(&mut batch, &Taps::None, Rows::Last)
                .and_then(|out| match out.outputs.into_iter().next() {
                    Some(v) => v.to_f32_vec(),
                    None => Err(llama_graph::GraphError::Input("no draft logits".into())),
                })
        };
        let Ok(data) = result else {
            // The draft model failed: no drafts this step, fresh caches next time.
            for &(i, _) in wanted {
                active[i].draft.clear();
                active[i].draft_cache = None;
            }
            return;
        };
        if data.len() != vocab * order.len() {
            return;
        }
        for (k, &i) in order.iter().enumerate() {
            let id = argmax(&data[k * vocab..(k + 1) * vocab]);
            let s = &mut active[i];
            if let Some((_, held)) = s.draft_cache.as_mut() {
                held.extend_from_slice(&seqs[k]);
            }
            s.draft.push(id);
            if let Some(entry) = inputs.iter_mut().find(|(j, _)| *j == i) {
                entry.1 = vec![id];
            }
        }
    }
}

/// Reports a sequence that has ended: the text it held back (a partial character,
/// the start of a stop string that never completed), then `Done`.
fn finish(
    seq: SeqId,
    mut decoder: Decoder,
    mut output: Option<TextOutput<'_>>,
    events: &mut Vec<Event>,
) {
    if let Some(error) = decoder.take_error() {
        events.push(Event::Failed { seq, error });
        return;
    }
    let mut tail_stop = false;
    let mut text = String::new();
    if let Some(t) = output.as_mut() {
        match t.finish() {
            Ok((rest, hit)) => {
                tail_stop = hit;
                if !rest.is_empty() {
                    events.push(Event::Text { seq, text: rest });
                }
            }
            Err(error) => {
                events.push(Event::Failed { seq, error });
                return;
            }
        }
        text = t.text().to_string();
    }
    let mut generation = decoder.finish();
    if tail_stop {
        generation.finish = FinishReason::Stop;
    }
    generation.text = text;
    events.push(Event::Done { seq, generation });
}
