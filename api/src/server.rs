//! Serving the API: binds the listener and runs axum until the process ends.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::mn::Mn;
use crate::routes;

/// Serves the API for `mn` on `listener`.
pub async fn serve(mn: Arc<Mn>, listener: TcpListener) -> std::io::Result<()> {
    let app = routes::router(mn);
    axum::serve(listener, app).await
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
