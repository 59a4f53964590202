//! GGUF to an HF model directory that this runtime and transformers both load.
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::{json, Value};

use crate::error::{io_err, ModelError, Result};
use crate::gguf::{GgufFile, GgufSource, MetaValue};
use crate::registry::Family;
use crate::weights::{ours_to_hf, TensorSource};

/// Element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    BF16,
    F16,
}

impl Dtype {
    fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }

    fn encode(self, data: &[f32]) -> (StDtype, Vec<u8>) {
        match self {
            Dtype::F32 => (
                StDtype::F32,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            Dtype::BF16 => (
                StDtype::BF16,
                data.iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            Dtype::F16 => (
                StDtype::F16,
                data.iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
        }
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

/// Writes `config.json`, `generation_config.json`, `model.safetensors` (HF names and
/// layout, Q/K rows in HF order), `tokenizer.json` (given) and `tokenizer_config.json`
/// (with the GGUF's chat template) into `out`. Returns the number of tensors written.
pub fn gguf_to_hf(
    file: &GgufFile,
    out: &Path,
    dtype: Dtype,
    tokenizer_json: &str,
) -> Result<usize> {
    let family = Family::from_gguf(file.architecture()?)?;
    let conventions = family
        .gguf_conventions()
        .ok_or_else(|| ModelError::NotAModel(file.path.clone()))?;
    match family {
        Family::Llama => {}
        Family::Mistral
        | Family::Qwen2
        | Family::Phi3
        | Family::Gemma
        | Family::Gemma3
        | Family::Bert => {
            return Err(ModelError::Gguf {
                path: file.path.clone(),
                message: format!(
                    "converting {} files is not supported yet (llama)",
                    conventions.name
                ),
            })
        }
    }
    let config = file.config(family.hf_name(), &conventions)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;

    let source = GgufSource::new(file, &config, conventions);
    let mut tensors: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in source.names() {
        let Some(hf) = ours_to_hf(&name) else {
            return Err(ModelError::Gguf {
                path: file.path.clone(),
                message: format!("tensor `{name}` has no HF name"),
            });
        };
        let t = source
            .load(&name)?
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.clone(),
                path: file.path.clone(),
            })?;
        let (st, bytes) = dtype.encode(&t.data);
        tensors.push((hf, st, t.shape, bytes));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, st, shape, bytes)| {
            TensorView::new(*st, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Safetensors {
                    path: out.join("model.safetensors"),
                    message: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let st_path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &st_path).map_err(|e| {
        ModelError::Safetensors {
            path: st_path.clone(),
            message: e.to_string(),
        }
    })?;

    let rope_scaling = match &config.rope_scaling {
        Some(r) => json!({"rope_type": r.rope_type, "factor": r.factor}),
        None => Value::Null,
    };
    write_json(
        &out.join("config.json"),
        &json!({
            "architectures": [family.hf_name()],
            "model_type": conventions.name,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.n_kv_heads(),
            "head_dim": config.head_dim(),
            "vocab_size": config.vocab_size,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_ids().first(),
            "hidden_act": "silu",
            "attention_bias": config.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": config.mlp_bias,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": dtype.torch_name(),
        }),
    )?;
    let token_id = |k: &str| file.get(k).and_then(MetaValue::as_u64);
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
            "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
        }),
    )?;
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_strings);
    let token_text = |k: &str| {
        token_id(k)
            .and_then(|id| tokens.and_then(|t| t.get(id as usize)))
            .map(str::to_string)
    };
    let tok_path = out.join("tokenizer.json");
    std::fs::write(&tok_path, tokenizer_json).map_err(io_err(&tok_path))?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": file.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(false),
            "add_eos_token": false,
            "bos_token": token_text("tokenizer.ggml.bos_token_id"),
            "eos_token": token_text("tokenizer.ggml.eos_token_id"),
            "unk_token": token_text("tokenizer.ggml.unknown_token_id"),
            "pad_token": token_text("tokenizer.ggml.padding_token_id"),
            "chat_template": file.get("tokenizer.chat_template").and_then(MetaValue::as_str),
            "model_max_length": config.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        }),
    )?;
    Ok(tensors.len())
}
