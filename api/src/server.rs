//! Serving the API: binds the listener and serves each connection with hyper, under time
//! limits a slow client cannot stretch.
//!
//! `axum::serve` waits for a request's headers for as long as the client likes, so a few
//! hundred connections sending a byte a minute hold the server's sockets and tasks forever.
//! Here each connection is served by hyper's HTTP/1 server with a header read time-out
//! ([`HEADER_READ_TIMEOUT`], which also ends a kept-alive connection that sends nothing), a
//! request body must arrive whole within [`BODY_READ_TIMEOUT`] (the [`read_body_within`]
//! layer; every body here is a small JSON document), and the peer's address is given to the
//! handlers as `ConnectInfo` (the login throttle counts failures per source).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower_service::Service;

use crate::error::ApiError;
use crate::mn::Mn;
use crate::routes;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest request body taken (axum's default limit, said once here).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// Serves the API for `mn` on `listener`.
pub async fn serve(mn: Arc<Mn>, listener: TcpListener) -> std::io::Result<()> {
    let app = routes::router(mn).layer(axum::middleware::from_fn(read_body_within));
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

/// Reads the request's body whole within [`BODY_READ_TIMEOUT`] (408 otherwise) and at most
/// [`MAX_BODY_BYTES`] (413), before any handler sees it.
async fn read_body_within(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "SYS.BODY_TOO_LARGE",
                format!("the request body is cut off or larger than {MAX_BODY_BYTES} bytes"),
                serde_json::json!({ "field": "body" }),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "SYS.REQUEST_TIMEOUT",
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
