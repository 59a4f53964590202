//! The model families: one enum, matched exhaustively wherever families differ, and
//! their loaded weights, one enum matched to build the graph.
use burn::module::Module;
use llama_graph::Graph;

use crate::bert::Bert;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gemma::Gemma;
use crate::llama::Llama;
use crate::weights::WeightLoader;

/// How a family's GGUF files differ from its HF checkpoints (llama.cpp's converter).
#[derive(Debug, Clone, Copy)]
pub struct GgufConventions {
    /// `general.architecture`.
    pub name: &'static str,
    /// Q/K rows reordered for adjacent-pair RoPE (Llama).
    pub permuted_qk: bool,
    /// Norm weights stored as `1 + w` (Gemma).
    pub norm_plus_one: bool,
    /// The activation, which GGUF metadata does not name.
    pub activation: &'static str,
    /// Sliding-window and global layers interleaved in a pattern the metadata does not
    /// state (llama.cpp fixes it per architecture).
    pub local_layers: Option<LocalLayers>,
}

/// Interleaved local and global layers: every `global_every`-th layer (counting from
/// one) attends to every position, the others through the sliding window, and they
/// rotate with their own RoPE base.
#[derive(Debug, Clone, Copy)]
pub struct LocalLayers {
    pub global_every: usize,
    pub local_rope_base: f32,
}

const fn gguf(
    name: &'static str,
    permuted_qk: bool,
    norm_plus_one: bool,
    activation: &'static str,
) -> Option<GgufConventions> {
    Some(GgufConventions {
        name,
        permuted_qk,
        norm_plus_one,
        activation,
        local_layers: None,
    })
}

/// A supported model family. A new family is one variant here (its arms in the
/// `match`es below), one file, and what it needs in the shared helpers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Phi3,
    Gemma,
    /// Gemma 3: Gemma with per-head Q/K norms, norms after attention and feed-forward
    /// too, and local (sliding-window) layers between global ones.
    Gemma3,
    /// BERT encoders: they embed text, they do not generate it.
    Bert,
}

impl Family {
    /// Every supported family, in the order error messages list them.
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Phi3,
        Family::Gemma,
        Family::Gemma3,
        Family::Bert,
    ];

    /// The `architectures` name in config.json.
    pub const fn hf_name(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Bert => "BertModel",
        }
    }

    /// Whether the family's graph yields logits over a vocabulary (a decoder that
    /// generates), rather than hidden states to pool (an encoder).
    pub const fn generates(self) -> bool {
        !matches!(self, Family::Bert)
    }

    /// `general.architecture` and how the family's GGUF files differ from its HF
    /// checkpoints; `None` for a family without GGUF files of its own (llama.cpp
    /// converts Mistral as `llama`).
    pub const fn gguf_conventions(self) -> Option<GgufConventions> {
        match self {
            Family::Llama => gguf("llama", true, false, "silu"),
            Family::Mistral => None,
            Family::Qwen2 => gguf("qwen2", false, false, "silu"),
            Family::Phi3 => gguf("phi3", false, false, "silu"),
            Family::Gemma => gguf("gemma", false, true, "gelu_pytorch_tanh"),
            Family::Gemma3 => Some(GgufConventions {
                name: "gemma3",
                permuted_qk: false,
                norm_plus_one: true,
                activation: "gelu_pytorch_tanh",
                local_layers: Some(LocalLayers {
                    global_every: 6,
                    local_rope_base: 10_000.0,
                }),
            }),
            Family::Bert => None,
        }
    }

    /// Checkpoint names whose meaning in this family differs from Llama's, as
    /// (HF name after `model.layers.N.`, ours after `blk.N.`): they take precedence
    /// over the shared table.
    pub const fn layer_renames(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // Gemma 3 normalizes the attention output; its feed-forward's input norm is
            // `pre_feedforward_layernorm`.
            Family::Gemma3 => &[(
                "post_attention_layernorm.weight",
                "post_attention_norm.weight",
            )],
            Family::Llama
            | Family::Mistral
            | Family::Qwen2
            | Family::Phi3
            | Family::Gemma
            | Family::Bert => &[],
        }
    }

    /// What sets a model of this family (with config `c`) apart from a plain Llama:
    /// one line each, for `llama inspect` and for whoever brings up a family.
    pub fn differences_from_llama(self, c: &ModelConfig) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let gemma = matches!(self, Family::Gemma | Family::Gemma3);
        match self {
            Family::Bert => {
                return vec![
                    "an encoder: bidirectional attention, no KV cache, hidden states out".into(),
                    "learned absolute positions and token-type embeddings, no RoPE".into(),
                    "post-norm LayerNorm blocks, exact-GELU feed-forward without a gate".into(),
                ]
            }
            Family::Phi3 => out.push("Q, K, V and gate, up stored as fused matrices".into()),
            Family::Llama | Family::Mistral | Family::Qwen2 | Family::Gemma | Family::Gemma3 => {}
        }
        if c.attention_bias || self == Family::Qwen2 {
            out.push("biases on the attention projections".into());
        }
        if let Ok(crate::layers::Activation::GeluTanh) = crate::layers::Activation::from_config(c) {
            out.push("GeGLU feed-forward (tanh GELU) instead of SwiGLU".into());
        }
        if gemma {
            out.push("RMSNorm weights applied as (1 + w)".into());
            out.push(format!(
                "embeddings scaled by sqrt(d_model) = {:.3}",
                (c.hidden_size as f32).sqrt()
            ));
        }
        if c.head_dim() * c.num_attention_heads != c.hidden_size {
            out.push(format!(
                "head_dim {} instead of d_model / heads = {}",
                c.head_dim(),
                c.hidden_size / c.num_attention_heads
            ));
        }
        if self == Family::Gemma3 {
            out.push("per-head RMSNorm of Q and K before RoPE".into());
            out.push("RMSNorm on the outputs of attention and feed-forward too".into());
        }
        if (c.attention_scale() - 1.0 / (c.head_dim() as f32).sqrt()).abs() > 1e-9 {
            out.push(format!(
                "attention scaled by 1/sqrt({}) instead of 1/sqrt(head_dim)",
                c.query_pre_attn_scalar.unwrap_or(c.head_dim() as f32)
            ));
        }
        let sliding = (0..c.num_hidden_layers)
            .filter(|&l| c.sliding_window_of(l).is_some())
            .count();
        if let (Some(w), true) = (c.sliding_window, sliding > 0) {
            if sliding == c.num_hidden_layers {
                out.push(format!(
                    "every layer attends through a sliding window of {w}"
                ));
            } else {
                out.push(format!(
                    "{sliding} of {} layers attend through a sliding window of {w}, the others to every position",
                    c.num_hidden_layers
                ));
            }
            let (local, global) = (c.rope_of(crate::config::SLIDING_ATTENTION), c.rope());
            if local != global {
                out.push(format!(
                    "sliding-window layers rotate with RoPE base {}, global ones with {}",
                    local.rope_theta.unwrap_or(10_000.0),
                    global.rope_theta.unwrap_or(10_000.0)
                ));
            }
        }
        if c.tie_word_embeddings || gemma {
            out.push("output head tied to the embeddings".into());
        }
        out
    }

    /// The family a config.json names (`architectures`, else `model_type`).
    pub fn from_config(config: &ModelConfig) -> Result<Family> {
        let found = config
            .architectures
            .first()
            .cloned()
            .or_else(|| config.model_type.clone())
            .unwrap_or_else(|| "<none>".to_string());
        Family::ALL
            .into_iter()
            .find(|f| f.hf_name() == found)
            .ok_or_else(|| ModelError::UnknownArch {
                found,
                supported: supported(),
            })
    }

    /// The family of a GGUF `general.architecture`.
    pub fn from_gguf(arch: &str) -> Result<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.gguf_conventions().is_some_and(|g| g.name == arch))
            .ok_or_else(|| ModelError::UnknownArch {
                found: arch.to_string(),
                supported: Family::ALL
                    .into_iter()
                    .filter_map(|f| f.gguf_conventions().map(|g| g.name))
                    .collect(),
            })
    }

    /// Loads the family's weights from `w`, then checks that they consumed every tensor
    /// of the checkpoint.
    pub fn load(self, c: &ModelConfig, w: &WeightLoader) -> Result<FamilyWeights> {
        let weights = match self {
            Family::Llama => FamilyWeights::Llama(crate::llama::load(c, w)?),
            Family::Mistral => FamilyWeights::Llama(crate::mistral::load(c, w)?),
            Family::Qwen2 => FamilyWeights::Llama(crate::qwen2::load(c, w)?),
            Family::Phi3 => FamilyWeights::Llama(crate::phi3::load(c, w)?),
            Family::Gemma => FamilyWeights::Gemma(crate::gemma::load(c, w)?),
            Family::Gemma3 => FamilyWeights::Gemma(crate::gemma3::load(c, w)?),
            Family::Bert => FamilyWeights::Bert(crate::bert::load(c, w)?),
        };
        w.check_all_used(self)?;
        Ok(weights)
    }
}

/// Prints the HF name (`LlamaForCausalLM`).
impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// The HF names this build supports.
pub fn supported() -> Vec<&'static str> {
    Family::ALL.map(Family::hf_name).to_vec()
}

/// A loaded model's weights, one variant per weight layout: Mistral, Qwen2 and Phi-3
/// load into Llama's (see their files).
#[derive(Module, Debug)]
pub enum FamilyWeights {
    Llama(Llama),
    Gemma(Gemma),
    Bert(Bert),
}

impl FamilyWeights {
    /// The forward pass as a graph whose RoPE tables cover `max_positions` (an
    /// encoder's learned position table is the checkpoint's).
    pub fn build(&self, c: &ModelConfig, max_positions: usize) -> Result<Graph> {
        match self {
            FamilyWeights::Llama(w) => w.build(c, max_positions),
            FamilyWeights::Gemma(w) => w.build(c, max_positions),
            FamilyWeights::Bert(w) => w.build(c),
        }
    }
}
