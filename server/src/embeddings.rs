//! `POST /v1/embeddings`: OpenAI's embeddings API over the engine's [`Embedder`].
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::routes::body;
use crate::state::AppState;

/// The most inputs one request may carry (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

/// The texts or token ids of `input`, in order.
enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// `input`: a string, a list of strings, a list of token ids, or a list of such lists.
fn inputs(body: &Value) -> Result<Vec<Input>, ApiError> {
    let input = body
        .get("input")
        .ok_or_else(|| ApiError::field("input", "`input` is required"))?;
    let ids = |v: &Value, at: &str| -> Result<Vec<u32>, ApiError> {
        let list = v.as_array().ok_or_else(|| {
            ApiError::field(
                at,
                format!("`{at}` must be a string or a list of token ids"),
            )
        })?;
        list.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| ApiError::field(at, format!("`{at}` holds {x}, not a token id")))
            })
            .collect()
    };
    let all: Vec<Input> = match input {
        Value::String(s) => vec![Input::Text(s.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::field("input", "`input` is an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![Input::Ids(ids(input, "input")?)]
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(Input::Text(s.clone())),
                other => ids(other, &format!("input[{i}]")).map(Input::Ids),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::field(
                "input",
                "`input` must be a string, a list of strings, or token ids",
            ))
        }
    };
    if all.len() > MAX_INPUTS {
        return Err(ApiError::field(
            "input",
            format!("`input` holds {} items; at most {MAX_INPUTS}", all.len()),
        ));
    }
    Ok(all)
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = body(bytes, state.config.body_limit)?;
    if value.get("dimensions").is_some_and(|d| !d.is_null()) {
        return Err(ApiError::unsupported(
            "dimensions",
            "`dimensions` (shortened vectors)",
        ));
    }
    let base64 = match value.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(other) => {
            return Err(ApiError::field(
                "encoding_format",
                format!("`encoding_format` must be \"float\" or \"base64\", not {other}"),
            ))
        }
    };
    let inputs = inputs(&value)?;
    let model = state.model(&value).await?;
    let embedder = crate::state::embedder(&model, state.config.pooling).await?;
    let vocab = model.vocab;
    let max = embedder.max_tokens();
    let single = inputs.len() == 1;
    let mut ids = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let at = |what: &str| {
            if single {
                what.to_string()
            } else {
                format!("{what}[{i}]")
            }
        };
        let these = match input {
            Input::Text(t) if t.is_empty() => {
                return Err(ApiError::field(&at("input"), "an input is an empty string"))
            }
            Input::Text(t) => embedder
                .tokenizer()
                .encode(&t)
                .map_err(|e| ApiError::field(&at("input"), e.to_string()))?,
            Input::Ids(v) => {
                if let Some(bad) = v.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ApiError::field(
                        &at("input"),
                        format!("token id {bad} is outside the vocabulary of {vocab}"),
                    ));
                }
                v
            }
        };
        if these.is_empty() {
            return Err(ApiError::field(&at("input"), "an input has no tokens"));
        }
        if these.len() > max {
            return Err(ApiError::field(
                &at("input"),
                format!(
                    "an input of {} tokens is over the model's limit of {max} tokens",
                    these.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        ids.push(these);
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let e = embedder.clone();
    let vectors = tokio::task::spawn_blocking(move || e.embed_ids(&ids))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::from_runtime(e, "input"))?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
    .into_response())
}
