//! Text to ids and back, through the HF `tokenizers` crate.
use std::path::Path;

use llama_models::gguf::{GgufFile, MetaValue};
use llama_models::{Model, ModelSource};
use serde_json::{json, Value};

use crate::error::{Result, RuntimeError};

/// A model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| RuntimeError::Tokenizer {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Tokenizer {
            inner,
            path: path.display().to_string(),
        })
    }

    /// The model's tokenizer: its tokenizer.json, or the vocabulary embedded in its GGUF.
    pub fn for_model(model: &Model) -> Result<Self> {
        match &model.source {
            ModelSource::HfDir(dir) => {
                let path = dir.join("tokenizer.json");
                if !path.exists() {
                    return Err(RuntimeError::NoTokenizer(format!(
                        "{}: no tokenizer.json",
                        dir.display()
                    )));
                }
                Self::from_file(&path)
            }
            ModelSource::Gguf(file) => Self::from_gguf(file),
        }
    }

    /// Builds the tokenizer that the GGUF's `tokenizer.ggml.*` metadata describes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path.display().to_string();
        let json = gguf_tokenizer_json(file).map_err(|message| RuntimeError::Tokenizer {
            path: path.clone(),
            message,
        })?;
        let inner: tokenizers::Tokenizer =
            json.to_string()
                .parse()
                .map_err(|e: tokenizers::Error| RuntimeError::Tokenizer {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
        Ok(Tokenizer { inner, path })
    }

    /// The tokenizer as HF `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| self.err(e))
    }

    /// Ids of `text` without the special tokens a post-processor would add (no BOS).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    fn err(&self, e: impl ToString) -> RuntimeError {
        RuntimeError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Ids of `text`, with the special tokens the tokenizer's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// A decoder that yields text as ids arrive, never half a character.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            printed: 0,
        }
    }
}

/// Incremental detokenization: each push returns the text that is now final.
///
/// Decodes all ids so far and emits what follows the already printed prefix, holding
/// back text that ends in an incomplete UTF-8 sequence (shown by the decoder as U+FFFD).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || !text.is_char_boundary(self.printed.min(text.len()))
            || text.len() < self.printed
        {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }

    /// Whatever is still held back at the end.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = text.get(self.printed..).unwrap_or("").to_string();
        self.printed = text.len();
        Ok(rest)
    }
}

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name, as tokenizers JSON.
///
/// The names are llama.cpp's; each maps to what the model's own tokenizer.json does.
fn pre_tokenizer(pre: &str) -> std::result::Result<Value, String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    // Llama 3's pattern: contractions, letters, numbers in groups of up to three, symbols.
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // Qwen2's: the same with single digits.
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt2" => byte_level(true),
        // SmolLM: every digit on its own, then GPT-2 byte-level splitting.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (supported: default, gpt2, smollm, llama-bpe, qwen2)"
            ))
        }
    })
}

/// tokenizers JSON equivalent to a GGUF's embedded `gpt2`-style BPE vocabulary.
fn gguf_tokenizer_json(file: &GgufFile) -> std::result::Result<Value, String> {
    let get = |k: &str| file.get(k);
    let model = get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer model `{model}` is not supported yet (gpt2)"
        ));
    }
    let tokens: Vec<&str> = get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .ok_or("no tokenizer.ggml.tokens")?
        .iter()
        .map(|t| t.as_str().ok_or("a token is not a string"))
        .collect::<std::result::Result<_, _>>()?;
    let types: Vec<u64> = get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let merges: Vec<&str> = get("tokenizer.ggml.merges")
        .and_then(MetaValue::as_array)
        .ok_or("no tokenizer.ggml.merges")?
        .iter()
        .map(|t| t.as_str().ok_or("a merge is not a string"))
        .collect::<std::result::Result<_, _>>()?;
    let pre = get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");

    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched whole in the text.
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == 3})
        })
        .collect();
    let bos = get("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64);
    let add_bos = get("tokenizer.ggml.add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    let post = match (add_bos, bos) {
        (true, Some(bos)) => {
            let name = tokens
                .get(bos as usize)
                .ok_or("bos token id outside the vocabulary")?;
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {*name: {"id": name, "ids": [bos], "tokens": [name]}}})
        }
        _ => Value::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre == "llama-bpe" || pre == "llama3",
            "vocab": vocab, "merges": merges,
        }
    }))
}
