//! `/console`: the actor-inspection debug console, one page served by the `strato` binary
//! itself (HTML, CSS and plain JavaScript embedded at build time; nothing is fetched from
//! anywhere else).
//!
//! The page reads `/debug/...` ([`crate::debug`]) and follows `/debug/events` (server-sent
//! events) for live updates. It logs in through `/console/login`, which takes an admin's name
//! and password and keeps the session in an HTTP-only cookie, since a browser's
//! `EventSource` cannot send an `Authorization` header. Operator actions are confirmed in the
//! page and audited by the server.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{self, SESSION_COOKIE};
use crate::error::ApiError;
use crate::mn::Mn;

const PAGE: &str = include_str!("console.html");

/// `GET /console`.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConsoleLogIn {
    account_name: String,
    password: String,
}

/// `POST /console/login`: an admin session in a cookie.
pub async fn log_in(State(mn): State<Arc<Mn>>, body: Bytes) -> Result<Response, ApiError> {
    let form: ConsoleLogIn = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid("accountName", format!("expected {{\"accountName\", \"password\"}}: {e}"))
    })?;
    let session = auth::new_session(&mn, &form.account_name, form.password).await?;
    if session.account_uuid != strato_actors::owners::ADMIN {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ID.PERMISSION_DENIED",
            "the debug console is for the admin account",
            serde_json::Value::Null,
        ));
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        session.uuid,
        mn.session_timeout.as_secs()
    );
    Ok(([(header::SET_COOKIE, cookie)], Json(json!({ "session": session.uuid }))).into_response())
}
