//! The generation loop.
use std::time::{Duration, Instant};

use crate::error::{Result, RuntimeError};
use crate::session::{argmax, Session};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token was produced (it is not part of the output).
    Eos,
    /// `max_tokens` were produced.
    Length,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Greedy generation of up to `max_tokens` after `prompt`, stopping at any of `eos`.
/// `on_token` sees each new id as it is chosen.
pub fn generate_greedy(
    session: &mut Session,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(RuntimeError::EmptyPrompt);
    }
    let needed = session.position() + prompt.len() + max_tokens.saturating_sub(1);
    if needed > session.context() {
        return Err(RuntimeError::ContextExceeded {
            prompt: session.position() + prompt.len(),
            requested: max_tokens,
            context: session.context(),
        });
    }
    let start = Instant::now();
    let mut next = argmax(session.prefill(prompt)?.last());
    let prefill_time = start.elapsed();
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut finish = FinishReason::Length;
    while ids.len() < max_tokens {
        if eos.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        ids.push(next);
        on_token(next);
        if ids.len() == max_tokens {
            break;
        }
        next = argmax(&session.decode(next)?);
    }
    Ok(Generation {
        ids,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: start.elapsed(),
    })
}
