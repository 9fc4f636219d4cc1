//! `/console`: the actor-inspection debug console, one page served by the `strato` binary
//! itself (HTML, CSS and plain JavaScript embedded at build time; nothing is fetched from
//! anywhere else).
//!
//! The page reads `/debug/...` ([`super::debug`]) and follows `/debug/events` (server-sent
//! events) for live updates. It logs in through `/console/login`, which takes an admin's name
//! and password and keeps the session in an HTTP-only cookie, since a browser's
//! `EventSource` cannot send an `Authorization` header. Operator actions are confirmed in the
//! page and audited by the server.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::auth::middleware::SESSION_COOKIE;
use crate::auth::{self, Peer};
use crate::error::ApiError;
use crate::mn::Mn;

const PAGE: &str = include_str!("console.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// The page runs only its own script and style (no inline code, nothing from elsewhere),
/// talks only to this server, and may not be framed (no clickjacking of its actions).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

fn hardened(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ];
    (headers, body).into_response()
}

/// `GET /console`.
pub async fn page() -> Response {
    hardened("text/html; charset=utf-8", PAGE)
}

/// `GET /console/console.js`.
pub async fn script() -> Response {
    hardened("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /console/console.css`.
pub async fn style() -> Response {
    hardened("text/css; charset=utf-8", STYLE)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConsoleLogIn {
    account_name: String,
    password: String,
}

/// `POST /console/login`: an admin session in a cookie. Only the admin gets one: a tenant's
/// right password answers 403 and leaves no session behind. The body must be JSON with its
/// content type, which a form on another origin cannot send.
pub async fn log_in(
    State(mn): State<Arc<Mn>>,
    peer: Peer,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter().peekable();
    let json = types.peek().is_some()
        && types.all(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(';').next().is_some_and(|t| t.trim() == "application/json"))
        });
    if !json {
        return Err(ApiError::new(
            crate::codes::UNSUPPORTED_MEDIA_TYPE,
            "the console's login takes Content-Type: application/json",
            json!({ "field": "Content-Type" }),
        ));
    }
    let form: ConsoleLogIn = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid("accountName", format!("expected {{\"accountName\", \"password\"}}: {e}"))
    })?;
    let source = peer.map(|p| p.0.0.ip());
    let account =
        auth::accounts::check_login(&mn.auth, &form.account_name, form.password, source).await?;
    if account.uuid != strato_actors::owners::ADMIN {
        return Err(ApiError::new(
            crate::codes::PERMISSION_DENIED,
            "the debug console is for the admin account",
            serde_json::Value::Null,
        ));
    }
    let (token, _) = auth::accounts::new_session(&mn.auth, account.uuid).await?;
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        mn.auth.session_timeout.as_secs()
    );
    Ok(([(header::SET_COOKIE, cookie)], Json(json!({ "session": token }))).into_response())
}
