//! Text to ids and back, through the HF `tokenizers` crate.
use std::path::Path;

use llama_models::gguf::{GgufFile, MetaValue};
use llama_models::{Model, ModelSource};
use serde_json::{json, Value};

use crate::error::{Result, RuntimeError};

/// A model's tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |message: String| RuntimeError::Tokenizer {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        // Parsed here first: `tokenizers` panics instead of failing on some malformed
        // files (a syntax error inside the decoder section). It panics on a few
        // well-formed but wrong ones too (a precompiled charsmap it cannot read), so
        // its own parse runs under catch_unwind and a panic becomes this error.
        let value: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut inner = std::panic::catch_unwind(move || {
            serde_json::from_value::<tokenizers::Tokenizer>(value)
        })
        .map_err(|_| bad("the tokenizer's definition is malformed".into()))?
        .map_err(|e| bad(e.to_string()))?;
        // A tokenizer.json may carry the padding and truncation its trainer batched
        // with (all-MiniLM-L6-v2's pads every text to 128 ids): we run each text at
        // its own length, and truncate where the caller says ([`Tokenizer::encode_limited`]).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| RuntimeError::Tokenizer {
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
        Self::for_source(&model.source)
    }

    /// As [`Tokenizer::for_model`], from an opened model source (no weights loaded).
    pub fn for_source(source: &ModelSource) -> Result<Self> {
        match source {
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

    /// The special token the post-processor puts before a text (BOS, BERT's `[CLS]`),
    /// if it puts one.
    pub fn leading_special(&self) -> Result<Option<u32>> {
        let enc = self.inner.encode("a", true).map_err(|e| self.err(e))?;
        Ok(
            match (enc.get_ids().first(), enc.get_special_tokens_mask().first()) {
                (Some(&id), Some(1)) => Some(id),
                _ => None,
            },
        )
    }

    /// Ids of `text` with the post-processor's special tokens, at most `max` of them:
    /// the text's own tokens are cut at the end so that they and the special tokens
    /// fit (as HF tokenizers truncate, `[CLS] ... [SEP]` kept whole). Also says whether
    /// anything was cut.
    pub fn encode_limited(&self, text: &str, max: usize) -> Result<(Vec<u32>, bool)> {
        let mut enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        let room = max.saturating_sub(added);
        let cut = enc.len() > room;
        if cut {
            enc.truncate(room, 0, tokenizers::TruncationDirection::Right);
        }
        let enc = self
            .inner
            .post_process(enc, None, true)
            .map_err(|e| self.err(e))?;
        Ok((enc.get_ids().to_vec(), cut))
    }

    /// The byte spans `(start, end)` of `text`'s tokens, in order, without special
    /// tokens: where a chunker may cut text by token counts.
    pub fn token_spans(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_offsets().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// Text of `ids` with special tokens written out.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.err(e))
    }

    /// The token string of an id.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string, where the vocabulary has it.
    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Why `other` does not map ids to tokens as this one does (`None`: it does): the
    /// vocabulary sizes, or the first id whose token differs.
    pub fn differs_from(&self, other: &Tokenizer) -> Option<String> {
        let (a, b) = (
            self.inner.get_vocab_size(true),
            other.inner.get_vocab_size(true),
        );
        if a != b {
            return Some(format!("{a} tokens against {b}"));
        }
        (0..a as u32).find_map(|id| {
            let (x, y) = (self.token(id), other.token(id));
            (x != y).then(|| format!("token {id} is {x:?} against {y:?}"))
        })
    }

    /// A decoder that yields text as ids arrive, never half a character.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Incremental detokenization: each push returns the text that is now final.
///
/// It decodes a short window of recent ids twice, without and with the ids not yet
/// printed, and emits the difference, holding it back while it ends in an incomplete
/// UTF-8 sequence (which the decoder shows as U+FFFD). The pieces, concatenated, are the
/// decode of all ids; no piece is ever taken back.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// Ids up to here are printed.
    read: usize,
}

impl TextStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let printed = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let text = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if text.len() > printed.len() && text.starts_with(&printed) && !text.ends_with('\u{FFFD}') {
            let new = text[printed.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back at the end.
    pub fn finish(&mut self) -> Result<String> {
        let printed = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let text = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(text.get(printed.len()..).unwrap_or("").to_string())
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

/// The GGUF's vocabulary as tokens, types and (for SentencePiece) scores.
struct GgufVocab<'a> {
    tokens: Vec<&'a str>,
    types: Vec<u64>,
}

impl GgufVocab<'_> {
    /// Token text to id, as tokenizers' BPE `vocab`.
    fn vocab_map(&self) -> serde_json::Map<String, Value> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect()
    }
}

fn strings<'a>(file: &'a GgufFile, key: &str) -> std::result::Result<Vec<&'a str>, String> {
    match file.get(key) {
        Some(v) => Ok(v
            .as_strings()
            .ok_or(format!("{key} is not an array of strings"))?
            .iter()
            .collect()),
        None => Err(format!("no {key}")),
    }
}

/// Control (3) and user-defined (4) tokens are matched whole in the text.
fn added_tokens(v: &GgufVocab) -> Vec<Value> {
    v.tokens
        .iter()
        .zip(&v.types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == 3})
        })
        .collect()
}

/// A post-processor adding BOS and/or EOS as the GGUF says (`None` when neither).
fn post_processor(
    file: &GgufFile,
    v: &GgufVocab,
    default_bos: bool,
) -> std::result::Result<Value, String> {
    let flag = |k: &str, default: bool| file.get(k).and_then(MetaValue::as_bool).unwrap_or(default);
    let special = |k: &str| -> std::result::Result<Option<(u64, String)>, String> {
        match file.get(k).and_then(MetaValue::as_u64) {
            None => Ok(None),
            Some(id) => {
                let name = v
                    .tokens
                    .get(id as usize)
                    .ok_or(format!("{k} {id} is outside the vocabulary"))?;
                Ok(Some((id, name.to_string())))
            }
        }
    };
    let bos = special("tokenizer.ggml.bos_token_id")?
        .filter(|_| flag("tokenizer.ggml.add_bos_token", default_bos));
    let eos = special("tokenizer.ggml.eos_token_id")?
        .filter(|_| flag("tokenizer.ggml.add_eos_token", false));
    if bos.is_none() && eos.is_none() {
        return Ok(Value::Null);
    }
    let mut single = Vec::new();
    let mut specials = serde_json::Map::new();
    if let Some((id, name)) = &bos {
        single.push(json!({"SpecialToken": {"id": name, "type_id": 0}}));
        specials.insert(
            name.clone(),
            json!({"id": name, "ids": [id], "tokens": [name]}),
        );
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some((id, name)) = &eos {
        single.push(json!({"SpecialToken": {"id": name, "type_id": 0}}));
        specials.insert(
            name.clone(),
            json!({"id": name, "ids": [id], "tokens": [name]}),
        );
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|p| {
        let mut p = p.clone();
        if let Some(seq) = p.get_mut("Sequence") {
            seq["id"] = json!("B");
        }
        for kind in ["Sequence", "SpecialToken"] {
            if let Some(x) = p.get_mut(kind) {
                x["type_id"] = json!(1);
            }
        }
        p
    }));
    Ok(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}),
    )
}

/// tokenizers JSON equivalent to a GGUF's embedded vocabulary: `gpt2` byte-level BPE
/// or `llama` SentencePiece BPE.
fn gguf_tokenizer_json(file: &GgufFile) -> std::result::Result<Value, String> {
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let types: Vec<u64> = file
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_numbers)
        .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let vocab = GgufVocab { tokens, types };
    match model {
        "gpt2" => gpt2_json(file, &vocab),
        "llama" => sentencepiece_json(file, &vocab),
        other => Err(format!(
            "tokenizer model `{other}` is not supported (gpt2, llama)"
        )),
    }
}

fn gpt2_json(file: &GgufFile, v: &GgufVocab) -> std::result::Result<Value, String> {
    let merges = strings(file, "tokenizer.ggml.merges")?;
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let vocab = v.vocab_map();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(v),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": post_processor(file, v, false)?,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre == "llama-bpe" || pre == "llama3",
            "vocab": vocab, "merges": merges,
        }
    }))
}

/// SentencePiece BPE (Llama 2, TinyLlama): spaces become `▁`, a `▁` is put before the
/// text (unless `add_space_prefix` is false), pieces merge in order of their score, and
/// characters outside the vocabulary fall back to `<0xXX>` byte tokens.
///
/// tokenizers' BPE applies merges by rank, so the merges are listed by the score of the
/// piece they make, best first: the same order SentencePiece merges in.
fn sentencepiece_json(file: &GgufFile, v: &GgufVocab) -> std::result::Result<Value, String> {
    let scores: Vec<f64> = file
        .get("tokenizer.ggml.scores")
        .and_then(MetaValue::as_numbers)
        .ok_or("no tokenizer.ggml.scores")?
        .iter()
        .map(|s| s.as_f64().ok_or("a score is not a number"))
        .collect::<std::result::Result<_, _>>()?;
    if scores.len() != v.tokens.len() {
        return Err(format!(
            "{} scores for {} tokens",
            scores.len(),
            v.tokens.len()
        ));
    }
    let normal = |i: usize| v.types[i] == 1 || v.types[i] == 4;
    let ids: std::collections::HashMap<&str, usize> = v
        .tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| normal(*i))
        .map(|(i, t)| (*t, i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (i, piece) in v.tokens.iter().enumerate().filter(|(i, _)| normal(*i)) {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (scores[i], i, l, r)));
    }
    // Best score first; ties keep vocabulary order.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([v.tokens[l], v.tokens[r]]))
        .collect();
    let vocab = v.vocab_map();
    let unk = v.types.iter().position(|&t| t == 2).map(|i| v.tokens[i]);
    let prefix = file
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(MetaValue::as_bool)
        .unwrap_or(true);
    let mut normalizers = Vec::new();
    if prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(v),
        // Like llama.cpp (and HF's legacy Llama tokenizer): a `▁` before every stretch of
        // text, including one that follows a special token; spaces become `▁`.
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post_processor(file, v, true)?,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": if prefix { 1 } else { 0 }, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    }))
}
