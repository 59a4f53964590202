//! The routes that do not generate: the model list, health, metrics, and the answers
//! for unknown routes and methods.
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::routes::AppResult;
use crate::state::AppState;

fn model_object(state: &AppState) -> Value {
    let mut o = json!({
        "id": state.config.alias,
        "object": "model",
        "created": state.started,
        "owned_by": "llama.rs",
    });
    if let Some(m) = state.loaded() {
        o["meta"] =
            json!({ "n_ctx": m.context, "n_vocab": m.vocab, "parallel": state.config.parallel });
    }
    o
}

pub async fn models(State(state): State<Arc<AppState>>) -> AppResult {
    state.model()?;
    Ok(Json(json!({ "object": "list", "data": [model_object(&state)] })).into_response())
}

pub async fn model(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult {
    state.model()?;
    // An id that does not decode (percent-escaped bytes that are not UTF-8) names no
    // model either.
    let id = id.map_or_else(|e| format!("<{}>", e.body_text()), |Path(id)| id);
    if id != state.config.alias {
        return Err(ApiError {
            code: Some("model_not_found"),
            ..ApiError::field(
                "model",
                format!(
                    "the model `{id}` does not exist; this server has `{}`",
                    state.config.alias
                ),
            )
        }
        .with_status(StatusCode::NOT_FOUND));
    }
    Ok(Json(model_object(&state)).into_response())
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.model() {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": if state.loaded().is_some() { "stopping" } else { "loading" }, "error": e.body()["error"] })),
        )
            .into_response(),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let load = state
        .loaded()
        .and_then(|m| m.service.as_ref())
        .map(|s| s.load())
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(
            load.waiting,
            load.running,
            state
                .loaded()
                .and_then(|m| m.service.as_ref())
                .map(|s| s.cache_stats()),
        ),
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
