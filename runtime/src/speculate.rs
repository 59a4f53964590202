//! Speculative decoding: guess the next few tokens cheaply, run them through the model
//! in one step after the sequence's last token, and keep the longest prefix of the
//! guess that the model's own choices agree with.
//!
//! Decode on a CPU is bound by reading the weights, and our block GEMV decodes each
//! weight once for all the rows of a step (up to eight), so a step of 1 + k rows costs
//! little more than a step of one: every accepted draft token is a token for (almost)
//! nothing. Drafts come from the context itself ([`lookup`]: n-gram matches, for
//! edits, quotes, repeated keys) or from a small draft model with the same vocabulary.
//!
//! Exactness: the verification step yields the logits after the last token and after
//! each draft token; the sequence's own [`Decoder`] chooses a token from each row in
//! turn (its sampler, penalties, grammar and log-probabilities exactly as without a
//! draft) and stops at the first choice that differs from the draft. Every chosen token
//! is therefore the one plain decoding would choose from the same logits and the same
//! random stream. Our drafts are deterministic (a lookup, or the draft model's argmax),
//! that is a proposal distribution `q` that puts all its mass on the draft token `d`;
//! the standard speculative sampling rule (accept `d` with probability `min(1, p(d) /
//! q(d)) = p(d)`, on rejection sample the residual `max(0, p - q)` renormalised, which
//! is `p` without `d`) is then exactly "sample `x ~ p`; accept if `x == d`, else emit
//! `x`", which is what choosing from each row does. So greedy output is token for token
//! the plain greedy output, and under sampling the target's distribution is unchanged
//! (with a fixed seed, even the sampled tokens are the same).
//!
//! Adaptive: each sequence keeps its own draft length, longer while drafts are
//! accepted whole and shorter after a miss, and stops drafting for a while (a backoff
//! that doubles) when its drafts stop being accepted, so free text that the context
//! does not predict costs (almost) nothing.
use serde::Serialize;

use crate::error::Result;
use crate::session::{argmax, Session};

/// The longest draft a step verifies. Our GEMV decodes a weight once for up to eight
/// rows (the last token and seven draft tokens); longer drafts cost a second pass but
/// still pay when nearly all of them are accepted.
pub const MAX_DRAFT: usize = 16;

/// How a sequence speculates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Speculation {
    /// The most tokens drafted for one step.
    pub draft_max: usize,
    /// The longest and shortest context suffix that [`lookup`] matches.
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl Default for Speculation {
    fn default() -> Self {
        Speculation {
            draft_max: 8,
            ngram_max: 4,
            ngram_min: 2,
        }
    }
}

impl Speculation {
    /// Checks the numbers: a draft of 1 to [`MAX_DRAFT`] tokens, n-grams of at least
    /// one token.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.draft_max == 0 || self.draft_max > MAX_DRAFT {
            return Err(format!(
                "the draft length must be between 1 and {MAX_DRAFT}, not {}",
                self.draft_max
            ));
        }
        if self.ngram_min == 0 || self.ngram_min > self.ngram_max {
            return Err(format!(
                "lookup n-grams must satisfy 1 <= min <= max, not {}..{}",
                self.ngram_min, self.ngram_max
            ));
        }
        Ok(())
    }
}

/// Drafted and accepted tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DraftStats {
    /// Draft tokens run through the model to be verified.
    pub drafted: usize,
    /// Draft tokens the model's own choices agreed with.
    pub accepted: usize,
    /// Verification steps run (steps with a draft).
    pub steps: usize,
}

impl DraftStats {
    pub fn add(&mut self, other: DraftStats) {
        self.drafted += other.drafted;
        self.accepted += other.accepted;
        self.steps += other.steps;
    }

    /// Accepted over drafted (0 with nothing drafted).
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// A draft continuing `context`: the tokens that followed the most recent earlier
/// occurrence of its longest suffix of `ngram_max` down to `ngram_min` tokens, at most
/// `max` of them. Empty when nothing matches.
pub fn lookup(context: &[u32], ngram_min: usize, ngram_max: usize, max: usize) -> Vec<u32> {
    let len = context.len();
    if max == 0 || ngram_min == 0 {
        return Vec::new();
    }
    for n in (ngram_min..=ngram_max.min(len.saturating_sub(1))).rev() {
        let suffix = &context[len - n..];
        // The most recent occurrence that has at least one token after it and is not
        // the suffix itself: recent text predicts best (the line being edited, the
        // last quote).
        let found = (0..len - n).rev().find(|&j| &context[j..j + n] == suffix);
        if let Some(j) = found {
            let from = j + n;
            return context[from..(from + max).min(len)].to_vec();
        }
    }
    Vec::new()
}

/// Where a sequence's drafts come from.
pub trait Drafter {
    /// Up to `n` tokens that may follow `context` (every token of the sequence, the
    /// one just chosen last). Fewer, or none, when it has no good guess.
    fn draft(&mut self, context: &[u32], n: usize) -> Result<Vec<u32>>;
}

/// Prompt lookup ([`lookup`]) as a [`Drafter`].
#[derive(Debug, Clone, Copy)]
pub struct Lookup {
    pub ngram_min: usize,
    pub ngram_max: usize,
}

impl From<Speculation> for Lookup {
    fn from(s: Speculation) -> Self {
        Lookup {
            ngram_min: s.ngram_min,
            ngram_max: s.ngram_max,
        }
    }
}

impl Drafter for Lookup {
    fn draft(&mut self, context: &[u32], n: usize) -> Result<Vec<u32>> {
        Ok(lookup(context, self.ngram_min, self.ngram_max, n))
    }
}

/// A draft model's session as a [`Drafter`]: it keeps what it has cached of the
/// context, runs the rest, then its greedy choices one at a time.
pub struct ModelDrafter<'a> {
    session: &'a mut Session,
}

impl<'a> ModelDrafter<'a> {
    pub fn new(session: &'a mut Session) -> Self {
        ModelDrafter { session }
    }
}

impl Drafter for ModelDrafter<'_> {
    fn draft(&mut self, context: &[u32], n: usize) -> Result<Vec<u32>> {
        let s = &mut *self.session;
        if context.is_empty() || context.len() + n > s.context() {
            return Ok(Vec::new());
        }
        let mut run = s.sync_prefix(context)?;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let id = if s.picks_on_device() {
                s.prefill_argmax(&run)?
            } else {
                argmax(&s.prefill_last(&run)?)
            };
            out.push(id);
            run = vec![id];
        }
        Ok(out)
    }
}

/// A sequence's draft length, adapted to how its drafts fare.
///
/// Each draft token is accepted with some probability `α` given that the ones before
/// it were (estimated from recent drafts: tokens accepted over tokens accepted plus
/// misses), so the `i`-th token of a draft pays off with probability `α^i`, while
/// every drafted row costs a share [`ROW_COST`] of a one-row step. The draft is as long
/// as its last token still pays (`α^k >= ROW_COST`); where not even one does, drafting
/// pauses for a while (a pause that doubles each time it ends in the same verdict)
/// and then tries again with a single token.
#[derive(Debug, Clone)]
pub struct Adaptive {
    max: usize,
    /// Recent accepted tokens and misses (first rejected tokens), decayed.
    accepted: f32,
    misses: f32,
    /// Steps left without drafting, and the next such pause.
    pause: usize,
    backoff: usize,
    pub stats: DraftStats,
}

/// What one more row of a step costs, as a share of a one-row decode step: small
/// while decode reads weights once for several rows, more where the step is bound by
/// compute. Kept on the careful side: a draft token must be likelier than this to be
/// accepted to be drafted at all.
pub const ROW_COST: f32 = 0.35;
const DECAY: f32 = 0.8;
const FIRST_BACKOFF: usize = 4;
const MAX_BACKOFF: usize = 256;

impl Adaptive {
    pub fn new(max: usize) -> Self {
        Adaptive {
            max: max.clamp(1, MAX_DRAFT),
            // A hopeful start: the first drafts are long, and their fate decides.
            accepted: 4.0,
            misses: 0.5,
            pause: 0,
            backoff: FIRST_BACKOFF,
            stats: DraftStats::default(),
        }
    }

    /// The estimated chance that a draft token is accepted after its predecessors.
    pub fn acceptance(&self) -> f32 {
        self.accepted / (self.accepted + self.misses).max(1e-6)
    }

    /// The longest draft whose last token still pays at acceptance `alpha`.
    fn length_for(&self, alpha: f32) -> usize {
        if alpha >= 0.999 {
            return self.max;
        }
        if alpha <= ROW_COST {
            return 0;
        }
        ((ROW_COST.ln() / alpha.ln()).floor() as usize).min(self.max)
    }

    /// The draft length to ask for this step (0: do not draft now). A step without
    /// a draft counts down a pause.
    pub fn want(&mut self) -> usize {
        if self.pause > 0 {
            self.pause -= 1;
            // The last step of a pause probes with one token.
            return if self.pause == 0 { 1 } else { 0 };
        }
        self.length_for(self.acceptance()).max(1)
    }

    /// What became of a draft of `drafted` tokens: `accepted` of them were taken.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.stats.drafted += drafted;
        self.stats.accepted += accepted;
        self.stats.steps += 1;
        self.accepted = DECAY * self.accepted + accepted as f32;
        self.misses = DECAY * self.misses + f32::from(u8::from(accepted < drafted));
        if self.length_for(self.acceptance()) == 0 {
            // Not paying: stop for a while, longer each time it happens again.
            self.pause = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        } else if accepted > 0 {
            self.backoff = FIRST_BACKOFF;
        }
    }
}

/// Chooses the tokens of a verification step: `row(i)` gives the logits after the
/// context and `draft[..i]`; `choose(logits, i)` is the sequence's own choice from them
/// (`None` when the sequence ends). Stops at the first choice that differs from the
/// draft. Returns how many draft tokens were accepted and the choice that follows
/// them (`None` if the sequence ended).
pub fn verify<'r>(
    draft: &[u32],
    row: impl Fn(usize) -> &'r [f32],
    mut choose: impl FnMut(&[f32], usize) -> Option<u32>,
) -> (usize, Option<u32>) {
    let mut i = 0;
    loop {
        match choose(row(i), i) {
            Some(t) if i < draft.len() && t == draft[i] => i += 1,
            next => return (i, next),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_most_recent_match_of_the_longest_suffix() {
        // "a b c d | x a b c e | a b c" : the 3-gram "a b c" last occurred before "e".
        let ctx = [1, 2, 3, 4, 9, 1, 2, 3, 5, 1, 2, 3];
        assert_eq!(lookup(&ctx, 2, 4, 8), vec![5, 1, 2, 3]);
        assert_eq!(lookup(&ctx, 2, 4, 2), vec![5, 1]);
        // Nothing repeats.
        assert!(lookup(&[1, 2, 3, 4], 1, 3, 8).is_empty());
        // Only a 1-gram repeats: found with min 1, not with min 2.
        assert_eq!(lookup(&[7, 8, 9, 7], 1, 3, 8), vec![8, 9, 7]);
        assert!(lookup(&[7, 8, 9, 7], 2, 3, 8).is_empty());
        assert!(lookup(&[], 1, 3, 8).is_empty());
        assert!(lookup(&[1, 1], 1, 3, 0).is_empty());
    }

    #[test]
    fn verify_stops_at_the_first_disagreement() {
        let rows = [[0.0f32], [1.0], [2.0], [3.0]];
        // The model "chooses" 10 + row value: 10, 11, 12, 13.
        let choose = |l: &[f32], _: usize| Some(10 + l[0] as u32);
        assert_eq!(verify(&[10, 11, 99], |i| &rows[i], choose), (2, Some(12)));
        assert_eq!(verify(&[10, 11, 12], |i| &rows[i], choose), (3, Some(13)));
        assert_eq!(verify(&[], |i| &rows[i], choose), (0, Some(10)));
        // The sequence ends at the second row.
        let ends = |l: &[f32], _: usize| (l[0] < 1.0).then_some(10);
        assert_eq!(verify(&[10, 11], |i| &rows[i], ends), (1, None));
    }

    #[test]
    fn draft_length_follows_acceptance_and_pauses_when_it_does_not_pay() {
        let mut a = Adaptive::new(8);
        // Drafts accepted whole: the longest draft.
        for _ in 0..10 {
            let k = a.want();
            a.record(k, k);
        }
        assert_eq!(a.want(), 8);
        // Half of each draft accepted: short drafts (alpha near 0.5: 1 token).
        for _ in 0..20 {
            let k = a.want();
            a.record(k, k / 2);
        }
        let k = a.want();
        assert!((1..=2).contains(&k), "{k}");
        // Nothing accepted: a pause of FIRST_BACKOFF steps, the last one a probe.
        let mut misses = 0;
        while a.pause == 0 {
            let k = a.want();
            a.record(k, 0);
            misses += 1;
            assert!(misses < 10, "never paused");
        }
        for _ in 0..FIRST_BACKOFF - 1 {
            assert_eq!(a.want(), 0);
        }
        assert_eq!(a.want(), 1);
        // The probe fails: the next pause is twice as long.
        a.record(1, 0);
        assert_eq!(a.pause, 2 * FIRST_BACKOFF);
        assert!(a.stats.accepted <= a.stats.drafted);
    }
}
