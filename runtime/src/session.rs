//! A session: a compiled graph, its KV cache and the tokens seen so far.
use llama_graph::{KvCache, Program, RunOutput, Taps, Value};

use crate::error::{Result, RuntimeError};

/// Logits of the positions a step computed, row-major `[rows, vocab]`.
#[derive(Debug, Clone)]
pub struct Logits {
    pub rows: usize,
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }
}

/// Index of the largest value; the first one on ties.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// One conversation with a model: positions advance as tokens are prefilled and decoded.
#[derive(Debug)]
pub struct Session {
    program: Program,
    cache: KvCache,
    vocab: usize,
    tokens: Vec<u32>,
}

impl Session {
    /// A session holding up to `context` positions; its KV cache is allocated now.
    pub fn new(program: Program, context: usize) -> Result<Self> {
        let vocab = program
            .graph()
            .outputs()
            .first()
            .and_then(|o| program.graph().node(*o).shape.fixed_dim(1))
            .ok_or_else(|| {
                llama_graph::GraphError::Input("the graph has no logits output".into())
            })?;
        let cache = program.new_cache(context)?;
        Ok(Session {
            program,
            cache,
            vocab,
            tokens: Vec::new(),
        })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Positions in the context so far.
    pub fn position(&self) -> usize {
        self.cache.len()
    }

    pub fn context(&self) -> usize {
        self.cache.capacity()
    }

    /// Rows of keys (and of values) allocated per layer.
    pub fn cache_rows_per_layer(&self) -> Vec<usize> {
        self.cache.rows_per_layer()
    }

    /// The tokens in the context so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets positions from `len` on.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)?;
        self.tokens.truncate(self.cache.len());
        Ok(())
    }

    /// Clears the context.
    pub fn reset(&mut self) {
        // Rewinding to nothing is always possible.
        let _ = self.cache.truncate(0);
        self.tokens.clear();
    }

    /// Runs `ids` at the next positions and returns the logits of every one of them.
    /// Validated before anything runs; on error the session is as it was.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Logits> {
        let out = self.step(ids, &Taps::None)?;
        self.logits(out)
    }

    /// Runs one token and returns the logits for the next.
    pub fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        Ok(self.prefill(&[id])?.data)
    }

    /// Like [`Session::prefill`], also capturing the outputs of the tapped nodes.
    pub fn prefill_with_taps(
        &mut self,
        ids: &[u32],
        taps: &Taps,
    ) -> Result<(Logits, Vec<(String, Value)>)> {
        let mut out = self.step(ids, taps)?;
        let taps = std::mem::take(&mut out.taps);
        Ok((self.logits(out)?, taps))
    }

    fn step(&mut self, ids: &[u32], taps: &Taps) -> Result<RunOutput> {
        if ids.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(RuntimeError::TokenOutOfRange {
                id,
                vocab: self.vocab,
            });
        }
        let out = self.program.run(ids, &mut self.cache, taps)?;
        self.tokens.extend_from_slice(ids);
        Ok(out)
    }

    fn logits(&self, out: RunOutput) -> Result<Logits> {
        let value =
            out.outputs.into_iter().next().ok_or_else(|| {
                llama_graph::GraphError::Input("the graph produced no output".into())
            })?;
        let rows = value.dims()[0];
        Ok(Logits {
            rows,
            vocab: self.vocab,
            data: value.to_f32_vec()?,
        })
    }
}
