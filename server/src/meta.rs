//! The routes that do not generate: the model list, health, metrics, and the answers
//! for unknown routes and methods.
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;

use crate::error::ApiError;
use crate::request;
use crate::routes::body;
use crate::routes::AppResult;
use crate::state::AppState;

/// Every model, with its state (`status.value`: loaded, loading, unloaded, failed)
/// as an extension field, as llama.cpp's router lists them.
fn model_objects(state: &AppState) -> Vec<Value> {
    state.models.list(state.started, state.config.parallel)
}

pub async fn models(State(state): State<Arc<AppState>>) -> AppResult {
    ready(&state)?;
    Ok(Json(json!({ "object": "list", "data": model_objects(&state) })).into_response())
}

/// A single model's server answers 503 while its model loads (as before it had a
/// list of models); a server of many lists them at once.
fn ready(state: &AppState) -> Result<(), ApiError> {
    if state.is_stopping() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    if state.models.is_single() && state.models.loaded().is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
        ));
    }
    Ok(())
}

pub async fn model(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult {
    ready(&state)?;
    // An id that does not decode (percent-escaped bytes that are not UTF-8) names no
    // model either.
    let id = id.map_or_else(|e| format!("<{}>", e.body_text()), |Path(id)| id);
    let all = model_objects(&state);
    match all.iter().find(|m| m["id"] == id.as_str()) {
        Some(m) => Ok(Json(m.clone()).into_response()),
        None => {
            let names: Vec<String> = all
                .iter()
                .filter_map(|m| m["id"].as_str())
                .map(|n| format!("`{n}`"))
                .collect();
            Err(ApiError {
                code: Some("model_not_found"),
                ..ApiError::field(
                    "model",
                    format!(
                        "the model `{id}` does not exist; this server has {}",
                        names.join(", ")
                    ),
                )
            }
            .with_status(StatusCode::NOT_FOUND))
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    model: String,
}

/// `POST /models/load {"model": NAME}`: loads it (unloading idle models past the
/// limits) and answers once it is loaded, with its entry of `/v1/models`.
pub async fn load(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> AppResult {
    let value = body(bytes, state.config.body_limit)?;
    let ByName { model } = request::parse(&value)?;
    state.models.load(&model).await?;
    let entry = model_objects(&state)
        .into_iter()
        .find(|m| m["id"] == model.as_str())
        .unwrap_or(Value::Null);
    Ok(Json(json!({ "success": true, "model": entry })).into_response())
}

/// `POST /models/unload {"model": NAME}`: 409 while requests use it.
pub async fn unload(
    State(state): State<Arc<AppState>>,
    bytes: Result<Bytes, BytesRejection>,
) -> AppResult {
    let value = body(bytes, state.config.body_limit)?;
    let ByName { model } = request::parse(&value)?;
    if state.models.is_single() {
        return Err(ApiError::field(
            "model",
            "a server started with one --model keeps it loaded; serve a --models-dir (or several --model) to load and unload",
        )
        .with_status(StatusCode::CONFLICT));
    }
    let was_loaded = state.models.unload(&model)?;
    Ok(Json(json!({ "success": true, "unloaded": was_loaded })).into_response())
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match ready(&state) {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": if state.is_stopping() { "stopping" } else { "loading" }, "error": e.body()["error"] })),
        )
            .into_response(),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let loaded = state.models.loaded();
    let loads: Vec<_> = loaded
        .iter()
        .filter_map(|(name, m)| {
            m.service
                .as_ref()
                .map(|s| (name.clone(), s.load(), s.cache_stats()))
        })
        .collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&loads),
    )
        .into_response()
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}
