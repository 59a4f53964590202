//! `POST /tokenize` and `POST /detokenize`, in the shapes of llama.cpp's server.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::request;
use crate::routes::{body, AppResult};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tokenize {
    content: String,
    /// Whether the special tokens the tokenizer adds (BOS) are added.
    #[serde(default)]
    add_special: bool,
    /// Whether each id comes with the text of its token.
    #[serde(default)]
    with_pieces: bool,
    /// Which model's tokenizer (any, for a single model).
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Detokenize {
    tokens: Vec<u32>,
    /// Which model's vocabulary (any, for a single model).
    #[serde(default)]
    model: Option<String>,
}

/// `{content, add_special?, with_pieces?}` to `{tokens}`: ids, or `{id, piece}`
/// objects with `with_pieces`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> AppResult {
    let value = body(bytes, state.config.body_limit)?;
    let t: Tokenize = request::parse(&value)?;
    let model = state.model_named(t.model.as_deref()).await?;
    let ids = if t.add_special {
        model.tokenizer.encode(&t.content)
    } else {
        model.tokenizer.encode_plain(&t.content)
    }
    .map_err(|e| ApiError::from_runtime(e, "content"))?;
    let tokens: Vec<Value> = if t.with_pieces {
        ids.iter()
            .map(|&id| {
                let piece = model
                    .tokenizer
                    .decode_with_special(&[id])
                    .unwrap_or_default();
                json!({ "id": id, "piece": piece })
            })
            .collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

/// `{tokens}` to `{content}`; an id outside the vocabulary is refused.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> AppResult {
    let value = body(bytes, state.config.body_limit)?;
    let d: Detokenize = request::parse(&value)?;
    let model = state.model_named(d.model.as_deref()).await?;
    if let Some((i, id)) = d
        .tokens
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= model.vocab)
    {
        return Err(ApiError::field(
            &format!("tokens[{i}]"),
            format!(
                "tokens[{i}]: token id {id} is outside the vocabulary of {}",
                model.vocab
            ),
        ));
    }
    let content = model
        .tokenizer
        .decode_with_special(&d.tokens)
        .map_err(|e| ApiError::from_runtime(e, "tokens"))?;
    Ok(Json(json!({ "content": content })).into_response())
}
