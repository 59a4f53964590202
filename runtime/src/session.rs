//! A session: a compiled graph, its KV cache and the tokens seen so far.
use std::path::Path;

use llama_graph::{KvCache, KvSnapshot, KvType, Program, Rows, RunOutput, Taps, Value};

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

/// The width of a program's logits: its vocabulary.
pub(crate) fn logits_width(program: &Program) -> Result<usize> {
    Ok(program
        .graph()
        .outputs()
        .first()
        .and_then(|o| program.graph().node(*o).shape.fixed_dim(1))
        .ok_or_else(|| llama_graph::GraphError::Input("the graph has no logits output".into()))?)
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
///
/// Cloning a session ([`Session::fork`]) shares the weights and the cache: host layers
/// share their pages of positions until one of the two sessions writes into a page
/// (then that page alone is copied); device layers are copied lazily (burn copies a
/// cache tensor when one of the two sessions first writes it).
#[derive(Debug, Clone)]
pub struct Session {
    program: Program,
    cache: KvCache,
    vocab: usize,
    tokens: Vec<u32>,
}

impl Session {
    /// A session holding up to `context` positions; its KV cache is allocated now.
    /// [`crate::Engine::session`] opens one with the device's policy; this is the
    /// low-level constructor for a program compiled by hand.
    pub fn new(program: Program, context: usize) -> Result<Self> {
        Self::with_cache_type(program, context, KvType::F32)
    }

    /// The same with the KV cache's host layers (CPU devices) stored as `ty`.
    pub fn with_cache_type(program: Program, context: usize, ty: KvType) -> Result<Self> {
        let vocab = logits_width(&program)?;
        let cache = program.new_cache_of(context, ty)?;
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

    /// Pages of the host cache this session holds, and how many of them it does not
    /// share with a fork or a prefix it started from.
    pub fn cache_pages(&self) -> llama_graph::PageCount {
        self.cache.pages()
    }

    /// How the KV cache's host layers store keys and values.
    pub fn cache_type(&self) -> KvType {
        self.cache.cache_type()
    }

    /// Bytes the KV cache holds: its host pages (each counted once, shared or not)
    /// and its device tensors.
    pub fn cache_bytes(&self) -> usize {
        let mut pages = self.cache.page_sizes();
        pages.sort_unstable();
        pages.dedup_by_key(|p| p.0);
        pages.iter().map(|p| p.1).sum::<usize>() + self.cache.device_bytes()
    }

    /// Bytes of the cache's device tensors (layers not kept in host pages).
    pub fn cache_device_bytes(&self) -> usize {
        self.cache.device_bytes()
    }

    pub fn cache_rows_per_layer(&self) -> Vec<usize> {
        self.cache.rows_per_layer()
    }

    /// The tokens in the context so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many draft tokens (up to `max`) a step may run after the next token and
    /// then take back: the room left in the context, and what the cache can rewind.
    pub fn draft_room(&self, max: usize) -> usize {
        self.cache.draft_room(max)
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
        let out = self.step(ids, &Taps::None, Rows::All)?;
        self.logits(out)
    }

    /// Runs `ids` at the next positions and returns the logits of the last one only
    /// (the output head runs on one row): what generation needs.
    pub fn prefill_last(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let out = self.step(ids, &Taps::None, Rows::Last)?;
        let logits = self.logits(out)?;
        Ok(logits.last().to_vec())
    }

    /// Runs `ids` like [`Session::prefill_last`] and returns the argmax of the last
    /// position's logits (the first on ties), computed on the device: what greedy
    /// decoding on a GPU reads back instead of the vocabulary's logits. Logits that are
    /// not finite are an error, as they are for [`Session::prefill`].
    pub fn prefill_argmax(&mut self, ids: &[u32]) -> Result<u32> {
        let out = self.step(ids, &Taps::None, Rows::Last)?;
        let value =
            out.outputs.into_iter().next().ok_or_else(|| {
                llama_graph::GraphError::Input("the graph produced no output".into())
            })?;
        let (id, sum) = value.last_row_argmax()?;
        if !sum.is_finite() {
            return Err(RuntimeError::NonFiniteLogits {
                position: self.tokens.len().saturating_sub(1),
            });
        }
        Ok(id)
    }

    /// Whether greedy decoding picks tokens on the device ([`Session::prefill_argmax`]):
    /// on GPU devices, where reading the logits back costs a transfer per token.
    pub fn picks_on_device(&self) -> bool {
        self.program.capabilities().device_blocks
    }

    /// Runs one token and returns the logits for the next.
    pub fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        Ok(self.prefill(&[id])?.data)
    }

    /// Generates text after `prompt` (see [`crate::generate()`]): `on_text` receives
    /// each piece as it becomes final; `opts.cancel` stops it from another thread.
    pub fn generate(
        &mut self,
        tokenizer: &crate::Tokenizer,
        prompt: &[u32],
        opts: &crate::GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<crate::Generation> {
        crate::generate(self, tokenizer, prompt, opts, on_text)
    }

    /// An independent session at the same position, sharing the weights and, until
    /// either writes over them, the cached positions: a fork costs a reference count
    /// per page, not a copy of the cache.
    pub fn fork(&self) -> Session {
        self.clone()
    }

    /// Makes the context hold `ids` with as little work as possible: keeps the longest
    /// common prefix of what is cached and `ids`, and returns the ids still to be run
    /// (at least one, so the caller gets logits).
    pub fn sync_prefix(&mut self, ids: &[u32]) -> Result<Vec<u32>> {
        let common = self
            .tokens
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(ids.len().saturating_sub(1));
        if self.truncate(keep).is_err() {
            // A sliding-window cache that cannot rewind starts over.
            self.reset();
            return Ok(ids.to_vec());
        }
        Ok(ids[keep..].to_vec())
    }

    /// Frees room at the end of a full context: keeps the first `keep` tokens, drops the
    /// older half of the rest, and runs the kept tokens again at their new positions.
    pub fn shift_context(&mut self, keep: usize) -> Result<()> {
        let tokens = self.tokens.clone();
        let keep = keep.min(tokens.len());
        let discard = (tokens.len() - keep) / 2;
        let kept: Vec<u32> = tokens[..keep]
            .iter()
            .chain(&tokens[keep + discard..])
            .copied()
            .collect();
        self.reset();
        if !kept.is_empty() {
            self.prefill_last(&kept)?;
        }
        Ok(())
    }

    /// The KV cache (its host pages are shared by clones: a clone copies nothing).
    pub fn kv_cache(&self) -> &KvCache {
        &self.cache
    }

    /// The session's state (tokens and KV cache) on the host.
    pub fn state(&self) -> Result<SessionState> {
        Ok(SessionState {
            tokens: self.tokens.clone(),
            cache: self.cache.snapshot()?,
        })
    }

    /// Puts a saved state back; the state must come from a session of the same graph
    /// and context.
    pub fn restore(&mut self, state: &SessionState) -> Result<()> {
        if state.tokens.len() != state.cache.len {
            return Err(RuntimeError::State {
                path: String::new(),
                message: format!(
                    "{} tokens for {} cached positions",
                    state.tokens.len(),
                    state.cache.len
                ),
            });
        }
        self.cache.restore(&state.cache)?;
        self.tokens = state.tokens.clone();
        Ok(())
    }

    /// Like [`Session::prefill`], also capturing the outputs of the tapped nodes.
    pub fn prefill_with_taps(
        &mut self,
        ids: &[u32],
        taps: &Taps,
    ) -> Result<(Logits, Vec<(String, Value)>)> {
        let mut out = self.step(ids, taps, Rows::All)?;
        let taps = std::mem::take(&mut out.taps);
        Ok((self.logits(out)?, taps))
    }

    fn step(&mut self, ids: &[u32], taps: &Taps, rows: Rows) -> Result<RunOutput> {
        if ids.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(RuntimeError::TokenOutOfRange {
                id,
                vocab: self.vocab,
            });
        }
        let out = self.program.run_rows(ids, &mut self.cache, taps, rows)?;
        self.tokens.extend_from_slice(ids);
        Ok(out)
    }

    fn logits(&self, out: RunOutput) -> Result<Logits> {
        let value =
            out.outputs.into_iter().next().ok_or_else(|| {
                llama_graph::GraphError::Input("the graph produced no output".into())
            })?;
        let rows = value.dims()[0];
        let data = value.to_f32_vec()?;
        // Garbage in, never garbage out: a step whose logits are not finite is an error,
        // not a token sampled from NaNs.
        if let Some(bad) = data.iter().position(|x| !x.is_finite()) {
            let row = bad / self.vocab.max(1);
            return Err(RuntimeError::NonFiniteLogits {
                position: self.tokens.len().saturating_sub(rows) + row,
            });
        }
        Ok(Logits {
            rows,
            vocab: self.vocab,
            data,
        })
    }
}

/// A session's tokens and KV cache, on the host: what `save` writes and `load` reads.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub tokens: Vec<u32>,
    pub cache: KvSnapshot,
}

const STATE_MAGIC: &[u8; 8] = b"LLRSSES1";

impl SessionState {
    /// Writes the state: a magic, a JSON header (tokens, layer shapes), then the
    /// cached rows as little-endian f32.
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |message: String| RuntimeError::State {
            path: path.display().to_string(),
            message,
        };
        let header = serde_json::json!({
            "tokens": self.tokens,
            "len": self.cache.len,
            "layers": self.cache.layers.iter().map(|l| [l.rows, l.width]).collect::<Vec<_>>(),
        })
        .to_string();
        let mut out = STATE_MAGIC.to_vec();
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for l in &self.cache.layers {
            for half in [&l.keys, &l.values] {
                out.extend(half.iter().flat_map(|x| x.to_le_bytes()));
            }
        }
        std::fs::write(path, out).map_err(|e| err(e.to_string()))
    }

    /// Reads a state written by [`SessionState::save`], checking that it is whole.
    pub fn load(path: &Path) -> Result<SessionState> {
        let err = |message: String| RuntimeError::State {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if bytes.len() < 16 || &bytes[..8] != STATE_MAGIC {
            return Err(err("not a session state file".into()));
        }
        let n = u64::from_le_bytes(
            bytes[8..16]
                .try_into()
                .map_err(|_| err("truncated".into()))?,
        ) as usize;
        let header = bytes
            .get(16..16usize.saturating_add(n))
            .ok_or_else(|| err("truncated header".into()))?;
        #[derive(serde::Deserialize)]
        struct Header {
            tokens: Vec<u32>,
            len: usize,
            layers: Vec<[usize; 2]>,
        }
        let h: Header = serde_json::from_slice(header).map_err(|e| err(e.to_string()))?;
        let mut at = 16 + n;
        let mut layers = Vec::new();
        for [rows, width] in h.layers {
            let mut read = || -> Result<Vec<f32>> {
                let len = rows
                    .checked_mul(width)
                    .and_then(|x| x.checked_mul(4))
                    .ok_or_else(|| err("bad layer shape".into()))?;
                let data = bytes
                    .get(at..at + len)
                    .ok_or_else(|| err("truncated data".into()))?;
                at += len;
                Ok(data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            let keys = read()?;
            let values = read()?;
            layers.push(llama_graph::exec::LayerSnapshot {
                rows,
                width,
                keys,
                values,
            });
        }
        if at != bytes.len() {
            return Err(err(format!("{} bytes left over", bytes.len() - at)));
        }
        Ok(SessionState {
            tokens: h.tokens,
            cache: KvSnapshot { len: h.len, layers },
        })
    }
}
