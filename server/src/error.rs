//! Errors as OpenAI's clients expect them: `{"error": {"message", "type", "param",
//! "code"}}` with the status that says whose fault it was.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llama_runtime::RuntimeError;
use serde_json::json;

/// A request that cannot be answered, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400, naming the field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// 400 for an option this server does not offer (yet): never silently ignored.
    pub fn unsupported(param: &str, what: &str) -> Self {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::field(param, format!("{what} is not supported by this server"))
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body, also sent as an SSE event when a stream fails mid-way.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// What the engine refused, in the request's terms: `param` names the field
    /// that holds the prompt.
    pub fn from_runtime(e: RuntimeError, param: &str) -> Self {
        match e {
            RuntimeError::Busy(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the server is busy: {m}; retry later"),
            ),
            e @ (RuntimeError::ContextExceeded { .. } | RuntimeError::KvBudget { .. }) => {
                ApiError::field(param, e.to_string()).with_code("context_length_exceeded")
            }
            e @ (RuntimeError::TokenOutOfRange { .. } | RuntimeError::EmptyPrompt) => {
                ApiError::field(param, e.to_string())
            }
            RuntimeError::Sampling(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            e @ RuntimeError::Template { .. } => ApiError::field("messages", e.to_string()),
            e @ RuntimeError::Options(_) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            e @ RuntimeError::Tools(_) => ApiError::field(param, e.to_string()),
            e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// An [`ApiError`] in Anthropic's shape (`/v1/messages`):
/// `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl AnthropicError {
    fn kind(&self) -> &'static str {
        match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body, also sent as an `error` event when a stream fails mid-way.
    /// Anthropic's errors have no `param`: the field is named in the message.
    pub fn body(&self) -> serde_json::Value {
        let message = match &self.0.param {
            Some(p) if !self.0.message.contains(p.as_str()) => format!("{p}: {}", self.0.message),
            _ => self.0.message.clone(),
        };
        json!({
            "type": "error",
            "error": { "type": self.kind(), "message": message },
        })
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let retry = self.0.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.0.status, axum::Json(self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Why the server stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Load(#[from] RuntimeError),
    #[error("{0}")]
    Internal(String),
}
