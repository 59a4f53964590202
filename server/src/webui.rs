//! The chat page at `/`: one HTML file and one script, embedded in the binary (no
//! build step, nothing fetched from elsewhere). The script renders everything the
//! model writes as text, and the content security policy lets only this server's own
//! script run, so an answer holding `<script>` can neither be HTML nor run.
use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("webui/index.html");
const SCRIPT: &str = include_str!("webui/app.js");
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                      connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                      frame-ancestors 'none'; form-action 'none'";

fn file(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub async fn page() -> Response {
    file(PAGE, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    file(SCRIPT, "text/javascript; charset=utf-8")
}
