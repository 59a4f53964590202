//! Embeddings: one vector per text, pooled from a model's last hidden state.
//!
//! An encoder (BERT) yields hidden states as its graph's output; a decoder's graph is
//! compiled a second time with the final norm as its output (the output head cut off),
//! under the engine's own passes. Texts run together as one batched step (each its
//! own sequence: RoPE positions, attention and pooling stay per text), and each
//! text's rows are pooled as the model asks: sentence-transformers' `1_Pooling` config
//! and `Normalize` module for its models, `mean` and L2 normalization by default for
//! decoders, or what the caller picks.
use std::path::Path;
use std::str::FromStr;

use llama_graph::{KvType, PassContext, Program, Rows, Sequence, Taps};
use llama_models::ModelSource;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::Tokenizer;

/// How a text's token rows become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The average of every row.
    Mean,
    /// The last row (decoders: the only row that has seen the whole text).
    Last,
    /// The first row (BERT's `[CLS]`).
    Cls,
}

impl Pooling {
    pub const NAMES: [&'static str; 3] = ["mean", "last", "cls"];

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Last => "last",
            Pooling::Cls => "cls",
        }
    }
}

impl FromStr for Pooling {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Pooling> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "last" => Ok(Pooling::Last),
            "cls" => Ok(Pooling::Cls),
            other => Err(RuntimeError::Options(format!(
                "unknown pooling `{other}` (mean, last, cls)"
            ))),
        }
    }
}

/// Rows of one batched step: texts are packed into steps of at most this many tokens.
const STEP_TOKENS: usize = 8192;

/// What a sentence-transformers model directory says about pooling.
#[derive(Debug, Default)]
struct SentenceConfig {
    pooling: Option<Pooling>,
    normalize: bool,
    max_seq_length: Option<usize>,
}

impl SentenceConfig {
    /// Reads `1_Pooling/config.json` (or the folder `modules.json` names),
    /// `modules.json` and `sentence_bert_config.json`, where present.
    fn read(dir: &Path) -> Result<SentenceConfig> {
        let json = |name: &Path| -> Result<Option<serde_json::Value>> {
            let path = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                return Ok(None);
            };
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| RuntimeError::Options(format!("{}: {e}", path.display())))
        };
        let modules = json(Path::new("modules.json"))?;
        let modules = modules.as_ref().and_then(|m| m.as_array());
        let module = |kind: &str| {
            modules.and_then(|m| {
                m.iter().find(|x| {
                    x.get("type")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| t.ends_with(kind))
                })
            })
        };
        let pooling_dir = module(".Pooling")
            .and_then(|m| m.get("path"))
            .and_then(|p| p.as_str())
            .unwrap_or("1_Pooling");
        let pooling = json(&Path::new(pooling_dir).join("config.json"))?.and_then(|c| {
            let on = |key: &str| c.get(key).and_then(|v| v.as_bool()) == Some(true);
            if on("pooling_mode_cls_token") {
                Some(Pooling::Cls)
            } else if on("pooling_mode_lasttoken") {
                Some(Pooling::Last)
            } else if on("pooling_mode_mean_tokens") {
                Some(Pooling::Mean)
            } else {
                None
            }
        });
        let max_seq_length = json(Path::new("sentence_bert_config.json"))?
            .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
            .map(|n| n as usize);
        Ok(SentenceConfig {
            pooling,
            normalize: module(".Normalize").is_some(),
            max_seq_length,
        })
    }
}

/// Embeds texts with one engine's model.
pub struct Embedder {
    program: Program,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
    dim: usize,
}

impl Embedder {
    /// An embedder over `engine`'s model: its own graph for an encoder, the hidden-state
    /// graph for a decoder. `pooling` overrides the model's (sentence-transformers
    /// config) or the default (`mean`).
    pub fn new(engine: &Engine, pooling: Option<Pooling>) -> Result<Embedder> {
        let model = engine.model();
        let sentence = match &model.source {
            ModelSource::HfDir(dir) => SentenceConfig::read(dir)?,
            ModelSource::Gguf(_) => SentenceConfig::default(),
        };
        let program = if engine.is_encoder() {
            engine.program().clone()
        } else {
            let mut graph = model.build_graph_for(engine.context())?;
            let hidden = graph.find("output_norm").ok_or_else(|| {
                RuntimeError::Options(format!(
                    "{}: the graph has no `output_norm` node to pool",
                    model.path.display()
                ))
            })?;
            graph.set_outputs(vec![hidden]);
            engine.pipeline().run(
                &mut graph,
                &PassContext {
                    device: engine.device().clone(),
                },
            )?;
            Program::new(graph, engine.device().clone())?
        };
        let max_tokens = if engine.is_encoder() {
            sentence
                .max_seq_length
                .unwrap_or(usize::MAX)
                .min(model.config.max_position_embeddings)
        } else {
            engine.context()
        };
        Ok(Embedder {
            program,
            tokenizer: engine.tokenizer()?,
            pooling: pooling.or(sentence.pooling).unwrap_or(Pooling::Mean),
            // Decoders have no sentence-transformers config: unit vectors, as
            // llama.cpp's embeddings and the OpenAI API give them.
            normalize: if engine.is_encoder() {
                sentence.normalize
            } else {
                true
            },
            max_tokens,
            dim: model.config.hidden_size,
        })
    }

    /// The width of each vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The most tokens of a text that are embedded; longer texts are cut.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether vectors are scaled to unit length.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The compiled graph the embedder runs (for profiling).
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// A text's ids as the model embeds them: its special tokens, cut at
    /// [`Embedder::max_tokens`].
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode_limited(text, self.max_tokens)?.0)
    }

    /// One vector per text, in order.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        self.embed_ids(&ids)
    }

    /// One vector per id sequence, in order. Sequences run together, as many per step
    /// as fit [`STEP_TOKENS`] rows; an empty one, or one longer than
    /// [`Embedder::max_tokens`], is refused before anything runs.
    pub fn embed_ids(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        for (index, ids) in inputs.iter().enumerate() {
            if ids.is_empty() {
                return Err(RuntimeError::EmptyInput { index });
            }
            if ids.len() > self.max_tokens {
                return Err(RuntimeError::InputTooLong {
                    index,
                    tokens: ids.len(),
                    max: self.max_tokens,
                });
            }
        }
        let mut out = Vec::with_capacity(inputs.len());
        let mut start = 0;
        while start < inputs.len() {
            let mut end = start;
            let mut rows = 0;
            while end < inputs.len() && (end == start || rows + inputs[end].len() <= STEP_TOKENS) {
                rows += inputs[end].len();
                end += 1;
            }
            out.extend(self.step(&inputs[start..end])?);
            start = end;
        }
        Ok(out)
    }

    /// One batched step over `inputs`, pooled.
    fn step(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let mut caches = inputs
            .iter()
            .map(|ids| self.program.new_cache_of(ids.len(), KvType::F32))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seqs: Vec<Sequence<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(ids, cache)| Sequence { tokens: ids, cache })
            .collect();
        let rows = if self.pooling == Pooling::Last {
            Rows::Last
        } else {
            Rows::All
        };
        let out = self.program.run_batch(&mut seqs, &Taps::None, rows)?;
        let hidden = out
            .outputs
            .into_iter()
            .next()
            .ok_or_else(|| RuntimeError::Options("the graph has no output".into()))?
            .into_f32_vec()?;
        let d = self.dim;
        let mut vectors = Vec::with_capacity(inputs.len());
        let mut row = 0;
        for ids in inputs {
            let take = if rows == Rows::Last { 1 } else { ids.len() };
            let own = hidden
                .get(row * d..(row + take) * d)
                .ok_or_else(|| RuntimeError::Options("the step returned too few rows".into()))?;
            row += take;
            let mut v = match self.pooling {
                Pooling::Cls | Pooling::Last => own[..d].to_vec(),
                Pooling::Mean => {
                    let mut sum = vec![0f64; d];
                    for r in own.chunks_exact(d) {
                        for (s, x) in sum.iter_mut().zip(r) {
                            *s += *x as f64;
                        }
                    }
                    sum.iter().map(|s| (s / take as f64) as f32).collect()
                }
            };
            if self.normalize {
                normalize(&mut v);
            }
            vectors.push(v);
        }
        Ok(vectors)
    }
}

/// Scales `v` to unit length (a zero vector stays zero), as sentence-transformers'
/// `Normalize` (`torch.nn.functional.normalize`, eps 1e-12) does.
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    let norm = norm.max(1e-12);
    for x in v.iter_mut() {
        *x = (*x as f64 / norm) as f32;
    }
}

/// Cosine similarity of two vectors of one width.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    (ab / (aa.sqrt() * bb.sqrt()).max(1e-30)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_names_round_trip_and_unknown_ones_are_named() {
        for name in Pooling::NAMES {
            assert_eq!(name.parse::<Pooling>().map(Pooling::name).ok(), Some(name));
        }
        let err = "max".parse::<Pooling>().unwrap_err().to_string();
        assert!(err.contains("unknown pooling `max`"), "{err}");
    }

    #[test]
    fn normalize_gives_unit_vectors_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        let mut z = vec![0.0; 3];
        normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-7);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
    }
}
