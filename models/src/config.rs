//! Model configuration, read from HF `config.json` with HF field names.
use std::path::Path;

use serde::Deserialize;

use crate::error::{io_err, ModelError, Result};

/// `eos_token_id` is a number or a list of numbers in HF configs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(x) => vec![*x],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// HF `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct RopeParameters {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f32>,
    pub factor: Option<f32>,
    pub low_freq_factor: Option<f32>,
    pub high_freq_factor: Option<f32>,
    pub original_max_position_embeddings: Option<usize>,
    /// Phi-3 and others: the share of each head that rotates.
    pub partial_rotary_factor: Option<f32>,
}

/// `rope_parameters`: one set for every layer, or one per layer type (transformers 5
/// for models whose local and global layers rotate differently: Gemma 3).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RopeConfig {
    PerLayerType(std::collections::BTreeMap<String, RopeParameters>),
    All(RopeParameters),
}

/// The fields of `config.json` that a decoder-only model of this family uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the residual stream (`d_model`).
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (multi-head attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default)]
    pub rope_theta: Option<f32>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeConfig>,
    /// Gemma 3 (transformers 4): the RoPE base of the sliding-window layers.
    #[serde(default)]
    pub rope_local_base_freq: Option<f32>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Gemma names its activation here.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Positions each query sees (Mistral); `None` for full attention.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` applies at all.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Per layer `full_attention` or `sliding_attention` (transformers 5).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 (transformers 4): every this-many-th layer is global, the others slide.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 2 and 3: attention scores scale by `1 / sqrt(query_pre_attn_scalar)`
    /// instead of `1 / sqrt(head_dim)`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f32>,
    /// Gemma 2: `tanh` caps on attention scores and on the logits; no supported family
    /// has them, so a config that sets one is refused rather than run wrong.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f32>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f32>,
    /// Gemma 3 embedding variants attend both ways; refused, as the softcaps are.
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// LayerNorm epsilon of encoder families (BERT).
    #[serde(default)]
    pub layer_norm_eps: Option<f32>,
    /// Token types (segments) an encoder embeds (BERT: 2).
    #[serde(default)]
    pub type_vocab_size: Option<usize>,
    /// BERT: `absolute` learned positions (the only kind supported).
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

/// `layer_types` values.
pub const FULL_ATTENTION: &str = "full_attention";
pub const SLIDING_ATTENTION: &str = "sliding_attention";

fn default_eps() -> f32 {
    1e-6
}

fn default_max_positions() -> usize {
    2048
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let config: ModelConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Refuses shapes no family can build (zero sizes, heads that do not divide).
    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(ModelError::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return bad(
                "hidden_size, num_attention_heads and num_hidden_layers must be positive".into(),
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.n_kv_heads()
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() == 0 {
            return bad("head_dim must be positive".into());
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        for (name, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(cap) = cap {
                return bad(format!("{name} ({cap}) is not supported"));
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return bad("use_bidirectional_attention is not supported by decoder families".into());
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return bad(format!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                ));
            }
        }
        Ok(())
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads
            .unwrap_or(self.num_attention_heads)
            .max(1)
    }

    pub fn head_dim(&self) -> usize {
        // Checked: a config is validated (no zero heads) before anything builds on it,
        // and this must not panic on one that is not.
        self.head_dim.unwrap_or_else(|| {
            self.hidden_size
                .checked_div(self.num_attention_heads)
                .unwrap_or(0)
        })
    }

    /// The RoPE parameters of the global (full-attention) layers, wherever this config
    /// keeps them.
    pub fn rope(&self) -> RopeParameters {
        self.rope_of(FULL_ATTENTION)
    }

    /// The RoPE parameters of layers of `layer_type` (`full_attention`,
    /// `sliding_attention`): their own where the config gives them per type (Gemma 3),
    /// else the model's.
    pub fn rope_of(&self, layer_type: &str) -> RopeParameters {
        let mut p = match &self.rope_parameters {
            Some(RopeConfig::PerLayerType(types)) => types
                .get(layer_type)
                .or_else(|| types.get(FULL_ATTENTION))
                .cloned()
                .unwrap_or_default(),
            Some(RopeConfig::All(p)) => p.clone(),
            None => match self.rope_local_base_freq {
                Some(base) if layer_type == SLIDING_ATTENTION => RopeParameters {
                    rope_theta: Some(base),
                    ..RopeParameters::default()
                },
                _ => self.rope_scaling.clone().unwrap_or_default(),
            },
        };
        if p.rope_theta.is_none() {
            p.rope_theta = Some(self.rope_theta.unwrap_or(10_000.0));
        }
        p
    }

    /// Whether layer `l` attends through a sliding window (`sliding_attention`) or to
    /// every position (`full_attention`), as `layer_types` or `sliding_window_pattern`
    /// say; without either, every layer is of one type, sliding where the model has a
    /// window (Mistral).
    pub fn layer_type(&self, l: usize) -> &str {
        let has_window = self.sliding_window.is_some() && self.use_sliding_window != Some(false);
        match (&self.layer_types, self.sliding_window_pattern) {
            (Some(types), _) => types.get(l).map_or(FULL_ATTENTION, String::as_str),
            (None, Some(p)) if has_window && p > 0 && !(l + 1).is_multiple_of(p) => {
                SLIDING_ATTENTION
            }
            (None, Some(_)) => FULL_ATTENTION,
            (None, None) if has_window => SLIDING_ATTENTION,
            (None, None) => FULL_ATTENTION,
        }
    }

    /// The sliding window of layer `l`, if it has one.
    pub fn sliding_window_of(&self, l: usize) -> Option<usize> {
        let window = self
            .sliding_window
            .filter(|_| self.use_sliding_window != Some(false))?;
        (self.layer_type(l) == SLIDING_ATTENTION).then_some(window)
    }

    /// The factor attention scores are scaled by before the softmax.
    pub fn attention_scale(&self) -> f32 {
        let d = self.query_pre_attn_scalar.unwrap_or(self.head_dim() as f32);
        1.0 / d.sqrt()
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default()
    }
}
