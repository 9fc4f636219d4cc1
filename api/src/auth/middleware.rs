//! The middleware every `/v1`, `/debug` and `/metrics` request passes: who is calling (a
//! session or API key in `Authorization`, or the console's cookie, honoured only for the
//! console's own requests), and whether a normal account may reach what the route names
//! ([`super::access`]), decided before any handler runs.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};
use strato_actors::owners::ADMIN;
use uuid::Uuid;

use super::access::{PathIds, Route};
use super::accounts::session_key;
use super::{Auth, CALLER, Caller, SessionRecord, forbidden, now, unauthenticated};
use crate::error::ApiError;

/// The cookie the console keeps its session in.
pub const SESSION_COOKIE: &str = "strato_session";

/// The header the console's page sends with every change it makes: a page on another
/// origin cannot send it without a CORS preflight, which this server never grants.
pub const CONSOLE_HEADER: &str = "x-strato-console";

/// Where a request's session comes from, which decides what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carrier {
    /// `Authorization`: a browser never sends it on its own, so it needs no CSRF defence.
    Header,
    /// The console's cookie: a browser sends it on any request to this server, so it is
    /// honoured only where the console needs it (its `/debug` reads and actions), and a
    /// change must come from the console's own origin with [`CONSOLE_HEADER`].
    Cookie,
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(SESSION_COOKIE).and_then(|c| c.strip_prefix('=')))
}

/// Whether a cookie-carried request to `path` with `method` came from the console itself.
fn console_request(method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if !path.starts_with("/debug/") {
        return Err(unauthenticated(
            "the console's cookie is accepted only by /debug; send Authorization: OAuth <session uuid>",
        ));
    }
    if matches!(*method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    let host = headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok());
    let origin = headers.get(axum::http::header::ORIGIN).and_then(|h| h.to_str().ok());
    let same_origin = match (origin, host) {
        (Some(origin), Some(host)) => {
            origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host)
        }
        _ => false,
    };
    if !same_origin || !headers.contains_key(CONSOLE_HEADER) {
        return Err(forbidden(format!(
            "a change made with the console's cookie must come from the console's page (same Origin, with {CONSOLE_HEADER})"
        )));
    }
    Ok(())
}

/// Who the request says is calling, from its `Authorization: OAuth ...` (or, for the
/// console's requests, its cookie).
fn identify(
    auth: &Auth,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let (token, carrier) = match (header, session_cookie(headers)) {
        (Some(header), _) => (
            header
                .strip_prefix("OAuth ")
                .ok_or_else(|| {
                    unauthenticated("the Authorization header must be `OAuth <session uuid>`")
                })?
                .trim(),
            Carrier::Header,
        ),
        (None, Some(cookie)) => (cookie, Carrier::Cookie),
        (None, None) => {
            return Err(unauthenticated(
                "log in first (PUT /v1/accounts/login) and send Authorization: OAuth <session uuid>",
            ));
        }
    };
    if carrier == Carrier::Cookie {
        console_request(method, path, headers)?;
    }
    let (id, secret) = match token.split_once(':') {
        Some((id, secret)) => (id, Some(secret)),
        None => (token, None),
    };
    #[expect(
        clippy::disallowed_methods,
        reason = "a session is found by its token's digest and an API key by its id: any spelling of one names it"
    )]
    let id = Uuid::parse_str(id).map_err(|_| unauthenticated("the session UUID is not a UUID"))?;
    // A session is found by the hash of its token; an API key by its (public) id, then its
    // secret's hash is compared.
    let key = if secret.is_some() { id } else { session_key(id) };
    let session = auth
        .db
        .get::<SessionRecord>(key)?
        .ok_or_else(|| unauthenticated("the session does not exist or has ended; log in again"))?
        .record;
    match (&session.secret_sha256, secret) {
        (Some(stored), Some(secret)) if Sha256::digest(secret.as_bytes()).as_slice() == stored => {}
        (Some(_), _) => return Err(unauthenticated("the API key's secret is wrong")),
        (None, Some(_)) => return Err(unauthenticated("a session carries no secret")),
        (None, None) => {}
    }
    if session.expired_date.is_some_and(|at| at <= now()) {
        return Err(ApiError::new(
            crate::codes::SESSION_EXPIRED,
            "the session or API key has expired; log in again or make a new key",
            Value::Null,
        ));
    }
    let admin = session.account_uuid == ADMIN;
    Ok(Caller { account: session.account_uuid, admin, credential: session.uuid })
}

/// The middleware: every request but logging in must name a live session or API key; a
/// normal account's request is checked against its kind's access before it reaches its
/// handler.
///
/// It runs after routing, on the route's template and its decoded path parameters: every
/// `/v1` parameter is parsed by [`crate::types::uuid_param`], the one function the handlers'
/// `Id` extractor uses, so the UUID access is decided on is the UUID the
/// handler acts on, and a spelling that is not canonical is a 400 before anything is read.
pub async fn authenticate(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    // `/debug` and `/metrics` describe the whole cloud: the admin's alone.
    let debug = path.starts_with("/debug/") || path == "/metrics";
    if !(path.starts_with("/v1/") || debug)
        || (request.method() == Method::PUT && path == "/v1/accounts/login")
    {
        return next.run(request).await;
    }
    let caller = match identify(&auth, request.method(), &path, request.headers()) {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    if debug && !caller.admin {
        return forbidden(
            "the debug console, /debug and /metrics are for the admin account".into(),
        )
        .into_response();
    }
    if !debug {
        let (mut parts, body) = request.into_parts();
        let template = parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_else(|| path.clone());
        let params = match axum::extract::RawPathParams::from_request_parts(&mut parts, &()).await {
            Ok(raw) => raw.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            Err(_) => Vec::new(),
        };
        let checked = PathIds::parse(&template, &path, &params).and_then(|ids| {
            if caller.admin { Ok(()) } else { Route::check(&auth.db, &caller, &parts.method, &ids) }
        });
        if let Err(error) = checked {
            return error.into_response();
        }
        let request = Request::from_parts(parts, body);
        return CALLER.scope(caller, next.run(request)).await;
    }
    CALLER.scope(caller, next.run(request)).await
}
