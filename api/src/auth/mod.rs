//! Accounts, sessions, API keys, and who may see and change what.
//!
//! There is one admin account (ZStack's UUID for it), made at the first start with the
//! password in `STRATO_ADMIN_PASSWORD`, or a generated one printed once. The admin creates
//! normal accounts. Passwords are stored as argon2 hashes in their own table
//! (`credential`), so an account's record is safe to hand out as its inventory. Logging in
//! (`PUT /v1/accounts/login`) makes a session that expires; every other request carries
//! `Authorization: OAuth <session uuid>`, or `Authorization: OAuth <key uuid>:<secret>` for an
//! API key (the secret is random, 256 bits, and stored as its SHA-256: argon2 on every request
//! would cost tens of milliseconds and buys nothing for a secret nobody chose). Without a
//! valid one the answer is 401 ([`accounts`], [`middleware`]).
//!
//! Who sees what, for a normal account, is each kind's declared [`Access`] ([`access`]): the
//! infrastructure (zones, clusters, hosts, storage, L2 networks, GC jobs, other accounts) is
//! the admin's alone (403); instance offerings, images and L3 networks the admin made are
//! shared, readable by every account and changed only by the admin (403); VMs and jobs belong
//! to whoever made them, and another account's answer as not found (404). A tag is seen and
//! changed with its resource. What a tenant is never shown of the cloud's internals is in
//! [`exposure`]. Quotas are the domain's (`strato_actors::owners`). Guessing passwords is
//! throttled ([`login`]).
//!
//! The caller of the request being served is kept in a task-local ([`caller`]), set by the
//! middleware ([`middleware::authenticate`]), so handlers and the job machinery reach it
//! without each route passing it along. This module knows nothing of the routes' handlers:
//! the middleware decides on the route's template and parsed path parameters alone.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use strato_storage::Db;
use uuid::Uuid;

use crate::error::ApiError;

pub mod access;
pub mod accounts;
pub mod exposure;
pub mod login;
pub mod middleware;

pub use access::{access_of, admin_only, may_change, may_use, visible};
pub use strato_actors::kinds::Access;

/// What authentication needs of the node: the store, how long a session lives, and the
/// login throttle. Cloned into the middleware's state; the clones share the throttle.
#[derive(Clone, Debug)]
pub struct Auth {
    /// The store (accounts, sessions, ownership).
    pub db: Db,
    /// How long a session lives (`STRATO_SESSION_TIMEOUT_SECS`, default two hours).
    pub session_timeout: Duration,
    /// Failed logins, throttled per account name and per source address.
    pub logins: Arc<login::LoginThrottle>,
}

/// Who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The account.
    pub account: Uuid,
    /// Whether it is the admin.
    pub admin: bool,
    /// The session or API key the request carried.
    pub credential: Uuid,
}

tokio::task_local! {
    static CALLER: Caller;
}

/// The caller of the request being served (`None` outside a request: the MN itself).
pub fn caller() -> Option<Caller> {
    CALLER.try_with(|c| *c).ok()
}

/// The caller when it is a normal account (`None` for the admin and the MN itself).
pub fn tenant() -> Option<Uuid> {
    caller().filter(|c| !c.admin).map(|c| c.account)
}

pub use strato_actors::accounts::{
    AccountRecord, AccountType, CredentialRecord, Quota, SessionRecord,
};

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 401 with `description`.
pub(crate) fn unauthenticated(description: &str) -> ApiError {
    ApiError::new(crate::codes::NOT_AUTHENTICATED, description, Value::Null)
}

/// 403 with `description`.
pub(crate) fn forbidden(description: String) -> ApiError {
    ApiError::new(crate::codes::PERMISSION_DENIED, description, Value::Null)
}

/// The address a request came from, when the server knows it (the login throttle counts
/// failures per source).
pub type Peer = Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>;

/// How long a session lives unless configured (ZStack's default).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(7200);
