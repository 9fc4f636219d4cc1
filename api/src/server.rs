//! Serving the API: binds the listener and serves each connection with hyper, under time
//! limits a slow client cannot stretch.
//!
//! `axum::serve` waits for a request's headers for as long as the client likes, so a few
//! hundred connections sending a byte a minute hold the server's sockets and tasks forever.
//! Here each connection is served by hyper's HTTP/1 server with a header read time-out
//! ([`HEADER_READ_TIMEOUT`], which also ends a kept-alive connection that sends nothing), a
//! request body must arrive whole within [`BODY_READ_TIMEOUT`] (the `read_body_within`
//! layer; every body here is a small JSON document), and the peer's address is given to the
//! handlers as `ConnectInfo` (the login throttle counts failures per source).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower_service::Service;

use crate::error::ApiError;
use crate::mn::Mn;
use crate::ops::{console, debug, metrics};

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest request body taken (axum's default limit, said once here).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// Serves the API for `mn` on `listener`.
pub async fn serve(mn: Arc<Mn>, listener: TcpListener) -> std::io::Result<()> {
    let app = app(mn).layer(axum::middleware::from_fn(read_body_within));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors, or a connection reset before it was taken: the
            // listener itself is fine.
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                app.clone().call(request)
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

/// The whole application: the API's routes ([`crate::http`]), the debug console's and the
/// metrics' ([`crate::ops`]), the OpenAPI document, under authentication, redaction for
/// tenants and request metrics.
pub fn app(mn: Arc<Mn>) -> axum::Router {
    use axum::Json;
    use axum::extract::State;
    use axum::routing::{get, post};
    crate::http::router()
        .route("/debug/tree", get(debug::tree))
        .route("/debug/actors", get(debug::actors))
        .route("/debug/actors/{kind}/{uuid}", get(debug::actor))
        .route("/debug/flows", get(debug::flows))
        .route("/debug/gc", get(debug::gc))
        .route("/debug/hosts", get(debug::hosts))
        .route(
            "/debug/summary",
            get(|State(mn): State<Arc<Mn>>| async move { debug::summary(&mn).await.map(Json) }),
        )
        .route("/debug/events", get(debug::events))
        .route("/debug/actions/{action}", post(debug::action))
        .route("/metrics", get(metrics::scrape))
        // Route layers run after routing, so all see the route's template; the last added
        // runs first: metrics count what authentication refuses too, and a tenant's answers
        // are redacted inside authentication's scope, where the caller is known.
        .route_layer(axum::middleware::from_fn(crate::auth::exposure::redact_for_tenants))
        .route_layer(axum::middleware::from_fn_with_state(
            mn.auth.clone(),
            crate::auth::middleware::authenticate,
        ))
        .route_layer(axum::middleware::from_fn(metrics::track))
        .route("/v1/openapi.json", get(|| async { Json(crate::catalog::openapi::document()) }))
        .route("/console", get(console::page))
        .route("/console/console.js", get(console::script))
        .route("/console/console.css", get(console::style))
        .route("/console/login", post(console::log_in))
        .with_state(mn)
}

/// Reads the request's body whole within [`BODY_READ_TIMEOUT`] (408 otherwise) and at most
/// [`MAX_BODY_BYTES`] (413), before any handler sees it.
async fn read_body_within(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                crate::codes::BODY_TOO_LARGE,
                format!("the request body is cut off or larger than {MAX_BODY_BYTES} bytes"),
                serde_json::json!({ "field": "body" }),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                crate::codes::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()),
                serde_json::json!({ "field": "body" }),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
