//! Perplexity of a token sequence under the model.
use crate::error::{Result, RuntimeError};
use crate::session::{Logits, Session};

/// The result of a perplexity run.
#[derive(Debug, Clone)]
pub struct Perplexity {
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood of the scored tokens, in nats.
    pub mean_nll: f64,
    /// Tokens scored.
    pub scored: usize,
    /// Forward windows run.
    pub windows: usize,
}

/// `-log p(target)` from one row of logits, computed in f64.
pub fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

fn score(logits: &Logits, ids: &[u32], from: usize) -> (f64, usize) {
    let mut total = 0.0;
    let mut n = 0;
    for pos in from..ids.len() - 1 {
        total += nll(logits.row(pos), ids[pos + 1]);
        n += 1;
    }
    (total, n)
}

/// Perplexity of `ids` in windows of at most `window` tokens.
///
/// When the text fits one window, every token after the first is scored from one
/// forward pass. Longer texts are cut into consecutive windows of `window` tokens, as
/// llama.cpp's `llama-perplexity` does, and each window scores only its second half,
/// so every scored token sees at least `window / 2` tokens of context.
/// With `bos`, each window after the first starts with it in place of its first token,
/// as `llama-perplexity` does for models that add BOS (Gemma's outputs are meaningless
/// without it); `ids` should then start with it too.
/// `progress` is called after each window with (done, total).
pub fn perplexity(
    session: &mut Session,
    ids: &[u32],
    window: usize,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(RuntimeError::TooShort(ids.len()));
    }
    let window = window.min(session.context());
    let (mut total, mut scored, mut windows) = (0.0, 0usize, 0usize);
    if ids.len() <= window {
        session.reset();
        let logits = session.prefill(ids)?;
        (total, scored) = score(&logits, ids, 0);
        windows = 1;
        progress(1, 1);
    } else {
        if window < 4 {
            return Err(RuntimeError::TooShort(window));
        }
        let chunks = ids.len() / window;
        for c in 0..chunks {
            let mut chunk = ids[c * window..(c + 1) * window].to_vec();
            if let Some(bos) = bos {
                chunk[0] = bos;
            }
            session.reset();
            let logits = session.prefill(&chunk)?;
            // Position p predicts chunk[p + 1]; score positions window/2 .. window-1.
            let (t, n) = score(&logits, &chunk, window / 2);
            total += t;
            scored += n;
            windows += 1;
            progress(c + 1, chunks);
        }
    }
    session.reset();
    let mean_nll = total / scored as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        mean_nll,
        scored,
        windows,
    })
}
