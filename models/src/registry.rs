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
    /// BERT encoders: they embed text, they do not generate it.
    Bert,
}

impl Family {
    /// Every supported family, in the order error messages list them.
    pub const ALL: [Family; 6] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Phi3,
        Family::Gemma,
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
            Family::Bert => None,
        }
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
