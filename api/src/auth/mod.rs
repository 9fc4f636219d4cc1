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
//! valid one the answer is 401.
//!
//! Who sees what, for a normal account (each kind's declared [`Access`]): the infrastructure (zones, clusters,
//! hosts, storage, L2 networks, GC jobs, other accounts) is the admin's alone (403);
//! instance offerings, images and L3 networks the admin made are shared, readable by every
//! account and changed only by the admin (403); VMs and jobs belong to whoever made them, and
//! another account's answer as not found (404). A tag is seen and changed with its resource.
//! Ownership lives in `strato_actors::owners`. Quotas (VMs, CPUs, memory) are checked when a
//! VM is accepted, under a per-account lock, against what the account's resources count
//! (the new VM's charge is written with its job, so two creations cannot both pass).
//!
//! The caller of the request being served is kept in a task-local ([`caller`]), set by the
//! middleware ([`authenticate`]), so handlers and the job machinery reach it without each
//! route passing it along.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use strato_actors::kinds::Access;
use strato_actors::owners::{self, ADMIN, Charge, OwnerRecord};
use strato_storage::{Batch, Db, Expect, IndexValue};
use uuid::Uuid;

use crate::error::ApiError;
use crate::mn::Mn;

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

/// What a normal account may use at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = Quota)]
pub struct QuotaParams {
    /// VMs.
    pub vm_num: u64,
    /// Virtual CPUs over all VMs.
    pub cpu_num: u64,
    /// Memory over all VMs, in bytes.
    pub memory_size: u64,
}

impl From<QuotaParams> for Quota {
    fn from(q: QuotaParams) -> Quota {
        Quota { vm_num: q.vm_num, cpu_num: q.cpu_num, memory_size: q.memory_size }
    }
}

/// The id a session's record is kept under: the first 128 bits of SHA-256 over a domain
/// label and the token, so the id does not give the token back.
pub fn session_key(token: Uuid) -> Uuid {
    let digest =
        Sha256::new().chain_update(b"strato-session\0").chain_update(token.as_bytes()).finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(
        |e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "SYS.INTERNAL",
                e.to_string(),
                Value::Null,
            )
        },
    )
}

/// A hash no password matches, checked against when the account does not exist so that an
/// unknown name costs the same argon2 work as a wrong password (no timing oracle).
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    hash_password(&Uuid::new_v4().simple().to_string()).unwrap_or_default()
});

fn password_matches(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

fn check_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 8 {
        return Err(ApiError::invalid("password", "a password has at least 8 characters"));
    }
    Ok(())
}

/// Makes the admin account at the first start. Returns the password when it was generated
/// (the caller prints it, once).
pub fn bootstrap(db: &Db) -> Result<Option<String>, ApiError> {
    std::sync::LazyLock::force(&DUMMY_HASH);
    if db.get::<AccountRecord>(ADMIN)?.is_some() {
        return Ok(None);
    }
    let (password, generated) = match std::env::var("STRATO_ADMIN_PASSWORD") {
        Ok(password) if !password.is_empty() => (password, false),
        _ => (format!("{}", Uuid::new_v4().simple()), true),
    };
    let account = AccountRecord {
        uuid: ADMIN,
        name: "admin".into(),
        account_type: AccountType::SystemAdmin,
        quota: Quota::default(),
        create_date: now(),
    };
    let credential =
        CredentialRecord { account_uuid: ADMIN, password_hash: hash_password(&password)? };
    let mut batch = Batch::new();
    batch.put(&account, Expect::Absent)?;
    batch.put(&credential, Expect::Absent)?;
    db.commit_blocking(batch)?;
    tracing::info!("admin account created");
    Ok(generated.then_some(password))
}

fn unauthenticated(description: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "ID.NOT_AUTHENTICATED", description, Value::Null)
}

fn forbidden(description: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "ID.PERMISSION_DENIED", description, Value::Null)
}

/// The cookie the console keeps its session in.
pub const SESSION_COOKIE: &str = "strato_session";

/// Checks `account_name` and `password` for a login from `source`: the account, or why not.
/// The API's login and the console's both use it; neither makes a session before the caller
/// is known to be allowed one.
///
/// A guess is throttled ([`crate::login`]) before any work is done; an unknown account is
/// checked against [`DUMMY_HASH`] so that it answers as slowly as a wrong password; a failure
/// is logged with the name (escaped) and the source, never the password.
pub async fn check_login(
    mn: &Mn,
    account_name: &str,
    password: String,
    source: Option<std::net::IpAddr>,
) -> Result<AccountRecord, ApiError> {
    if let Err(refusal) = mn.logins.check(account_name, source) {
        tracing::warn!(account = ?account_name, source = ?source, ?refusal, "login refused by the throttle");
        return Err(throttled(refusal));
    }
    let wrong = || unauthenticated("wrong account name or password");
    let id = mn.db.find::<AccountRecord>("name", &account_name.into())?.first().copied();
    let account = match id {
        Some(id) => mn.db.get::<AccountRecord>(id)?.map(|a| a.record),
        None => None,
    };
    let matches = verify_password(mn, account.as_ref().map(|a| a.uuid), password).await?;
    match account {
        Some(account) if matches => {
            mn.logins.succeeded(account_name);
            Ok(account)
        }
        _ => {
            mn.logins.failed(account_name, source);
            tracing::warn!(account = ?account_name, source = ?source, "failed login");
            Err(wrong())
        }
    }
}

/// Whether `password` is `account`'s, at the cost of one argon2 verification whether or not
/// the account (or its credential) exists.
async fn verify_password(
    mn: &Mn,
    account: Option<Uuid>,
    password: String,
) -> Result<bool, ApiError> {
    let hash = match account {
        Some(account) => mn.db.get::<CredentialRecord>(account)?.map(|c| c.record.password_hash),
        None => None,
    };
    let known = hash.is_some();
    let hash = hash.unwrap_or_else(|| DUMMY_HASH.clone());
    let matches = tokio::task::spawn_blocking(move || password_matches(&hash, &password))
        .await
        .unwrap_or(false);
    Ok(known && matches)
}

fn throttled(refusal: crate::login::Refusal) -> ApiError {
    let (code, wait, what) = match refusal {
        crate::login::Refusal::Throttled(wait) => {
            ("ID.LOGIN_THROTTLED", wait, "too soon after a failed login")
        }
        crate::login::Refusal::Locked(wait) => {
            ("ID.LOGIN_LOCKED", wait, "locked after too many failed logins")
        }
    };
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        code,
        format!("{what}; try again in {} s", ms.div_ceil(1000)),
        json!({ "retryAfterMs": ms }),
    )
}

/// A new session for `account`: its token (handed to the client once) and its record.
pub async fn new_session(mn: &Mn, account: Uuid) -> Result<(Uuid, SessionRecord), ApiError> {
    let token = Uuid::new_v4();
    let session = SessionRecord {
        uuid: session_key(token),
        account_uuid: account,
        expired_date: Some(now().saturating_add(mn.session_timeout.as_secs())),
        secret_sha256: None,
        description: String::new(),
    };
    let mut batch = Batch::new();
    batch.put(&session, Expect::Absent)?;
    mn.db.commit(batch).await?;
    tracing::info!(account = %account, "logged in");
    Ok((token, session))
}

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
fn identify(mn: &Mn, method: &Method, path: &str, headers: &HeaderMap) -> Result<Caller, ApiError> {
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
    let id = Uuid::parse_str(id).map_err(|_| unauthenticated("the session UUID is not a UUID"))?;
    // A session is found by the hash of its token; an API key by its (public) id, then its
    // secret's hash is compared.
    let key = if secret.is_some() { id } else { session_key(id) };
    let session = mn
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
            StatusCode::UNAUTHORIZED,
            "ID.SESSION_EXPIRED",
            "the session or API key has expired; log in again or make a new key",
            Value::Null,
        ));
    }
    let admin = session.account_uuid == ADMIN;
    Ok(Caller { account: session.account_uuid, admin, credential: session.uuid })
}

/// The middleware: every request but logging in must name a live session or API key; a
/// normal account's request is checked against its kind's [`Access`] before it reaches its
/// handler.
///
/// It runs after routing, on the route's template and its decoded path parameters: every
/// `/v1` parameter is parsed by [`crate::routes::uuid_param`], the one function the handlers'
/// [`crate::routes::Id`] extractor uses, so the UUID access is decided on is the UUID the
/// handler acts on, and a spelling that is not canonical is a 400 before anything is read.
pub async fn authenticate(State(mn): State<Arc<Mn>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    // `/debug` and `/metrics` describe the whole cloud: the admin's alone.
    let debug = path.starts_with("/debug/") || path == "/metrics";
    if !(path.starts_with("/v1/") || debug)
        || (request.method() == Method::PUT && path == "/v1/accounts/login")
    {
        return next.run(request).await;
    }
    let caller = match identify(&mn, request.method(), &path, request.headers()) {
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
            if caller.admin { Ok(()) } else { Route::check(&mn, &caller, &parts.method, &ids) }
        });
        if let Err(error) = checked {
            return error.into_response();
        }
        let request = Request::from_parts(parts, body);
        return CALLER.scope(caller, next.run(request)).await;
    }
    CALLER.scope(caller, next.run(request)).await
}

/// A `/v1` route's template split into segments, with its UUID parameters parsed.
#[derive(Debug)]
struct PathIds {
    /// The template's segments after `/v1/` (`["vm-instances", "{uuid}", "actions"]`).
    segments: Vec<String>,
    /// The parsed value of each `{parameter}` segment, by position.
    ids: Vec<Option<Uuid>>,
}

impl PathIds {
    /// `template` is the route's, `raw` the request's path as sent, `params` the decoded
    /// parameters. A UUID is never percent-encoded: a parameter sent encoded is refused even
    /// when it decodes to a canonical UUID, so one resource has one spelling on the wire too.
    fn parse(template: &str, raw: &str, params: &[(String, String)]) -> Result<PathIds, ApiError> {
        let segments: Vec<String> =
            template.trim_start_matches("/v1/").split('/').map(str::to_owned).collect();
        let raw: Vec<&str> = raw.trim_start_matches("/v1/").split('/').collect();
        let mut ids = Vec::with_capacity(segments.len());
        for (position, segment) in segments.iter().enumerate() {
            let id = match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    let value = params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                    let sent = raw.get(position).copied().unwrap_or_default();
                    if sent.contains('%') {
                        return Err(ApiError::invalid(
                            name,
                            format!(
                                "`{}` is percent-encoded; send the UUID in its canonical form",
                                crate::validate::printable(sent)
                            ),
                        ));
                    }
                    Some(crate::routes::uuid_param(value.unwrap_or_default(), name)?)
                }
                None => None,
            };
            ids.push(id);
        }
        Ok(PathIds { segments, ids })
    }

    fn kind(&self) -> &str {
        &self.segments[0]
    }

    /// The resource the path names: the parameter right after the kind.
    fn resource(&self) -> Option<Uuid> {
        self.ids.get(1).copied().flatten()
    }

    fn shape(&self) -> Vec<&str> {
        self.segments.iter().map(|s| if s.starts_with('{') { "{}" } else { s.as_str() }).collect()
    }
}

/// How a normal account may reach what the URL segment `segment` names: a kind's declared
/// access ([`strato_actors::kinds`]), or for the routes that are not a kind's: a tag by its
/// resource, a job its submitter's (looked up under the caller's account), the garbage
/// collector the admin's.
pub fn access_of(segment: &str) -> Access {
    match strato_actors::kinds::by_url(segment) {
        Some(kind) => kind.access,
        None => match segment {
            "tags" => Access::With("resourceUuid"),
            "api-jobs" => Access::Owned,
            _ => Access::AdminOnly,
        },
    }
}

/// The checks of a normal account's request against its route.
struct Route;

impl Route {
    /// Checks a normal account's request by its method and route, on the parsed UUIDs.
    fn check(mn: &Mn, caller: &Caller, method: &Method, path: &PathIds) -> Result<(), ApiError> {
        let segment = path.kind();
        let read = method == Method::GET;
        let access = access_of(segment);
        match access {
            Access::Itself => return Self::check_account_path(caller.account, method, path),
            Access::AdminOnly => {
                return Err(forbidden(format!("{segment} are managed by the admin account")));
            }
            Access::Shared if !read && path.segments.len() == 1 => {
                return Err(forbidden(format!("{segment} are created by the admin account")));
            }
            _ => {}
        }
        // A job is looked up under the caller's own account: another's is not found.
        if segment == "api-jobs" {
            return Ok(());
        }
        let Some(uuid) = path.resource() else {
            return Ok(());
        };
        // Nested admin routes under an owned kind do not exist; a resource's own paths
        // (`/{uuid}`, `/{uuid}/actions`, `/{uuid}/ip-ranges`) are judged by its owner.
        let owner = match access {
            Access::With(field) => match owning_resource(&mn.db, segment, field, uuid)? {
                Some(resource) => owners::owner_of(&mn.db, resource)?,
                None => ADMIN,
            },
            _ => owners::owner_of(&mn.db, uuid)?,
        };
        if owner == caller.account {
            return Ok(());
        }
        if access == Access::Shared && owner == ADMIN {
            return if read {
                Ok(())
            } else {
                Err(forbidden(format!("{uuid} is shared by the admin account; only it changes it")))
            };
        }
        Err(not_found_at(segment, uuid))
    }

    fn check_account_path(account: Uuid, method: &Method, path: &PathIds) -> Result<(), ApiError> {
        let mine = path.resource() == Some(account);
        match (method.clone(), path.shape().as_slice()) {
            (Method::GET, ["accounts"]) => Ok(()),
            // Sessions and API keys: the handlers act only on the caller's own.
            (_, ["accounts", "sessions", "{}"] | ["accounts", "api-keys", ..]) => Ok(()),
            (_, ["accounts"]) => Err(forbidden("only the admin account creates accounts".into())),
            (_, ["accounts", "{}", ..]) if !mine => {
                Err(ApiError::no::<AccountRecord>(path.resource().unwrap_or_default()))
            }
            (Method::GET, ["accounts", "{}"]) => Ok(()),
            // Its own actions: the handler lets a tenant change its password, not its quota.
            (Method::PUT, ["accounts", "{}", "actions"]) => Ok(()),
            _ => Err(forbidden("only the admin account manages accounts".into())),
        }
    }
}

/// The resource that `uuid` (at URL segment `segment`) is seen with: the UUID its `field`
/// holds. `tags` (a route for both tag kinds) looks in both.
fn owning_resource(
    db: &Db,
    segment: &str,
    field: &'static str,
    uuid: Uuid,
) -> Result<Option<Uuid>, ApiError> {
    let kinds: Vec<&strato_actors::kinds::Kind> = match strato_actors::kinds::by_url(segment) {
        Some(kind) => vec![kind],
        None => {
            strato_actors::kinds::KINDS.iter().filter(|k| k.access == Access::With(field)).collect()
        }
    };
    for kind in kinds {
        if let Some(inventory) = kind.table.inventory(db, uuid)? {
            return Ok(inventory[field].as_str().and_then(|u| Uuid::parse_str(u).ok()));
        }
    }
    Ok(None)
}

/// "Not found", naming what the URL segment `segment` holds.
fn not_found_at(segment: &str, uuid: Uuid) -> ApiError {
    match strato_actors::kinds::by_url(segment) {
        Some(kind) => ApiError::not_found(kind.api, uuid),
        None => ApiError::not_found(segment, uuid),
    }
}

/// Whether `tenant` may see `item` of `kind` (a query's inventory).
pub fn visible(db: &Db, tenant: Uuid, kind: &str, item: &Value) -> Result<bool, ApiError> {
    let access = access_of(kind);
    let field = match access {
        Access::With(field) => field,
        _ => "uuid",
    };
    let Some(uuid) = item[field].as_str().and_then(|u| Uuid::parse_str(u).ok()) else {
        return Ok(false);
    };
    if access == Access::Itself {
        return Ok(uuid == tenant);
    }
    let owner = owners::owner_of(db, uuid)?;
    Ok(match access {
        Access::AdminOnly | Access::Itself => false,
        Access::Shared => owner == tenant || owner == ADMIN,
        Access::Owned | Access::With(_) => owner == tenant,
    })
}

/// Checks that the caller may use resource `uuid` of `kind` in a request (an offering, an
/// image or a network a new VM names): a normal account must own it or, for a shared kind,
/// the admin must. Answers as not found otherwise.
pub fn may_use(db: &Db, kind: &str, uuid: Uuid) -> Result<(), ApiError> {
    let Some(tenant) = tenant() else { return Ok(()) };
    let owner = owners::owner_of(db, uuid)?;
    let ok = owner == tenant || (access_of(kind) == Access::Shared && owner == ADMIN);
    if ok { Ok(()) } else { Err(not_found_at(kind, uuid)) }
}

/// Checks that the caller may change resource `uuid` of `kind` (tag it): a normal account
/// must own it.
pub fn may_change(db: &Db, kind: &str, uuid: Uuid) -> Result<(), ApiError> {
    let Some(tenant) = tenant() else { return Ok(()) };
    let owner = owners::owner_of(db, uuid)?;
    if owner == tenant {
        Ok(())
    } else if access_of(kind) == Access::Shared && owner == ADMIN {
        Err(forbidden(format!("{uuid} is shared by the admin account; only it changes it")))
    } else {
        Err(not_found_at(kind, uuid))
    }
}

/// Refuses, for a normal account, a request naming a resource only the admin manages (a
/// host to place or move a VM on).
pub fn admin_only(what: &str) -> Result<(), ApiError> {
    match tenant() {
        Some(_) => Err(forbidden(format!("{what} is for the admin account"))),
        None => Ok(()),
    }
}

/// Per-account locks: a quota check and the write of what it admits happen under the lock.
#[derive(Debug, Default)]
pub struct QuotaLocks(std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl QuotaLocks {
    /// The lock of `account`.
    pub fn of(&self, account: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().expect("quota locks").entry(account).or_default().clone()
    }
}

/// Checks that `charge` more fits `account`'s quota.
pub fn check_quota(db: &Db, account: Uuid, charge: Charge) -> Result<(), ApiError> {
    let quota = db
        .get::<AccountRecord>(account)?
        .map(|a| a.record.quota)
        .ok_or_else(|| unauthenticated("the account no longer exists"))?;
    let used = owners::usage(db, account)?;
    let over = [
        ("vmNum", used.vm_num, charge.vm_num, quota.vm_num),
        ("cpuNum", used.cpu_num, charge.cpu_num, quota.cpu_num),
        ("memorySize", used.memory_size, charge.memory_size, quota.memory_size),
    ]
    .into_iter()
    .find(|(_, used, more, limit)| !strato_actors::host::fits_within(*used, *more, *limit));
    match over {
        Some((name, used, more, limit)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "ID.QUOTA_EXCEEDED",
            format!(
                "quota {name} exceeded: the account uses {used}, this asks {more} more, the quota is {limit}; delete resources or ask the admin for more"
            ),
            json!({ "quota": name, "used": used, "requested": more, "limit": limit }),
        )),
        None => Ok(()),
    }
}

/// An ownership record for a new resource of the caller's, if the caller is a normal
/// account.
pub fn owner_for(resource: Uuid, resource_type: &str, charge: Charge) -> Option<OwnerRecord> {
    tenant().map(|account| OwnerRecord {
        resource_uuid: resource,
        resource_type: resource_type.to_owned(),
        account_uuid: account,
        charge,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LogIn {
    log_in_by_account: LogInByAccount,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct LogInByAccount {
    account_name: String,
    password: String,
}

fn session_inventory(token: Uuid, session: &SessionRecord) -> Value {
    json!({ "inventory": {
        "uuid": token,
        "accountUuid": session.account_uuid,
        "expiredDate": session.expired_date,
    }})
}

/// The address a request came from, when the server knows it.
pub(crate) type Peer = Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>;

/// `PUT /v1/accounts/login`: a new session for an account's name and password.
pub async fn log_in(
    State(mn): State<Arc<Mn>>,
    peer: Peer,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: LogIn = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "logInByAccount",
            format!(
                "expected {{\"logInByAccount\": {{\"accountName\": ..., \"password\": ...}}}}: {e}"
            ),
        )
    })?;
    let LogInByAccount { account_name, password } = body.log_in_by_account;
    let source = peer.map(|p| p.0.0.ip());
    let account = check_login(&mn, &account_name, password, source).await?;
    let (token, session) = new_session(&mn, account.uuid).await?;
    Ok(Json(session_inventory(token, &session)))
}

/// `DELETE /v1/accounts/sessions/{uuid}`: logs a session out (one's own; the admin's any),
/// named by its token.
pub async fn log_out(
    State(mn): State<Arc<Mn>>,
    crate::routes::Id(token): crate::routes::Id,
) -> Result<Json<Value>, ApiError> {
    end_credential(&mn, session_key(token), "session", token).await
}

async fn end_credential(
    mn: &Mn,
    id: Uuid,
    kind: &str,
    named: Uuid,
) -> Result<Json<Value>, ApiError> {
    let caller = caller().ok_or_else(|| unauthenticated("log in first"))?;
    let session = mn.db.get::<SessionRecord>(id)?.map(|s| s.record);
    match session {
        Some(s)
            if (s.account_uuid == caller.account || caller.admin)
                && (s.secret_sha256.is_some() == (kind == "API key")) =>
        {
            let mut batch = Batch::new();
            batch.delete::<SessionRecord>(id, Expect::Any);
            mn.db.commit(batch).await?;
            tracing::info!(account = %s.account_uuid, "{kind} ended");
            Ok(Json(json!({})))
        }
        _ => Err(ApiError::not_found(kind, named)),
    }
}

/// `updateAccount`'s parameters.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PasswordChange {
    password: String,
    /// Required when an account changes its own password.
    #[serde(default)]
    old_password: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AccountParams {
    name: String,
    password: String,
    #[serde(default)]
    quota: Option<QuotaParams>,
}

/// `POST /v1/accounts` (admin): a normal account.
pub async fn create_account(
    State(mn): State<Arc<Mn>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, _): (AccountParams, _) = crate::routes::params(crate::routes::json_body(&body)?)?;
    if p.name.trim().is_empty() || p.name.contains(char::is_whitespace) {
        return Err(ApiError::invalid("name", "an account name is one word, not blank"));
    }
    check_password(&p.password)?;
    if !mn.db.find::<AccountRecord>("name", &p.name.as_str().into())?.is_empty() {
        return Err(ApiError::conflict(
            "ID.ACCOUNT_EXISTS",
            format!("an account named `{}` exists", p.name),
        ));
    }
    // The job's body leaves the password out.
    let raw = json!({ "name": p.name, "quota": p.quota });
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(crate::routes::job_header(&headers)?, "CreateAccount", &raw, {
            move |_| async move {
                let password = p.password;
                let hash = tokio::task::spawn_blocking(move || hash_password(&password))
                    .await
                    .map_err(|e| ApiError::internal(&e))??;
                // Checked again, one creation at a time: two creations of one name at once
                // both passed the check at the door.
                let _one_at_a_time = m.account_creation.lock().await;
                if !m.db.find::<AccountRecord>("name", &p.name.as_str().into())?.is_empty() {
                    return Err(ApiError::conflict(
                        "ID.ACCOUNT_EXISTS",
                        format!("an account named `{}` exists", p.name),
                    ));
                }
                let account = AccountRecord {
                    uuid: Uuid::new_v4(),
                    name: p.name,
                    account_type: AccountType::Normal,
                    quota: p.quota.map(Quota::from).unwrap_or_default(),
                    create_date: now(),
                };
                let mut batch = Batch::new();
                batch.put(&account, Expect::Absent)?;
                batch.put(
                    &CredentialRecord { account_uuid: account.uuid, password_hash: hash },
                    Expect::Absent,
                )?;
                m.db.commit(batch).await?;
                crate::store_source::inventory(&account)
            }
        })
        .await?;
    Ok(crate::routes::accepted(&mn, job))
}

/// `PUT /v1/accounts/{uuid}/actions` (admin): `{"updateQuota": {...}}` or
/// `{"updateAccount": {"password": ...}}` (an account may change its own password).
pub async fn account_action(
    State(mn): State<Arc<Mn>>,
    headers: HeaderMap,
    crate::routes::Id(uuid): crate::routes::Id,
    body: Bytes,
) -> Result<Response, ApiError> {
    let account =
        mn.db.get::<AccountRecord>(uuid)?.ok_or_else(|| ApiError::no::<AccountRecord>(uuid))?;
    let body = crate::routes::json_body(&body)?;
    let (action, params) = crate::routes::single_action(&body)?;
    let m = mn.clone();
    let record = account.record;
    match action.as_str() {
        "updateQuota" => {
            if tenant().is_some() {
                return Err(forbidden("only the admin account changes quotas".into()));
            }
            let quota: Quota =
                crate::routes::parse::<QuotaParams>(params.clone(), "updateQuota")?.into();
            let job = mn
                .jobs
                .submit(
                    crate::routes::job_header(&headers)?,
                    "UpdateQuota",
                    &body,
                    move |_| async move {
                        // Applied to the account as it is now: quotas set at once both succeed,
                        // the last one staying, as a replacement does.
                        let record =
                            m.db.update::<AccountRecord>(uuid, |r| r.quota = quota)
                                .await?
                                .ok_or_else(|| ApiError::no::<AccountRecord>(uuid))?;
                        crate::store_source::inventory(&record)
                    },
                )
                .await?;
            Ok(crate::routes::accepted(&mn, job))
        }
        "updateAccount" => {
            let change: PasswordChange = crate::routes::parse(params, "updateAccount")?;
            check_password(&change.password)?;
            let caller = caller().ok_or_else(|| unauthenticated("log in first"))?;
            // A tenant proves it knows the password it replaces: a stolen session alone must
            // not be enough to take the account over.
            if !caller.admin {
                let old = change.old_password.clone().ok_or_else(|| {
                    ApiError::invalid(
                        "updateAccount.oldPassword",
                        "give the current password as oldPassword",
                    )
                })?;
                let matches = verify_password(&mn, Some(uuid), old).await?;
                if !matches {
                    tracing::warn!(account = %uuid, "password change with a wrong oldPassword");
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "ID.WRONG_PASSWORD",
                        "oldPassword is not the account's current password",
                        json!({ "field": "updateAccount.oldPassword" }),
                    ));
                }
            }
            let raw = json!({ "updateAccount": { "uuid": uuid } });
            let password = change.password;
            let job = mn.jobs.submit(crate::routes::job_header(&headers)?,
                "UpdateAccount",
                &raw,
                move |_| async move {
                    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
                        .await
                        .map_err(|e| ApiError::internal(&e))??;
                    // Every session and API key of the account ends with its old password,
                    // but the one making the change, so the caller can follow its job.
                    let mut batch = Batch::new();
                    batch.put(
                        &CredentialRecord { account_uuid: uuid, password_hash: hash },
                        Expect::Any,
                    )?;
                    let mut revoked = 0usize;
                    for id in m.db.find::<SessionRecord>("account", &IndexValue::Uuid(uuid))? {
                        if id != caller.credential {
                            batch.delete::<SessionRecord>(id, Expect::Any);
                            revoked += 1;
                        }
                    }
                    m.db.commit(batch).await?;
                    tracing::info!(account = %uuid, revoked, "password changed; other sessions and API keys ended");
                    crate::store_source::inventory(&record)
                },
            )
            .await?;
            Ok(crate::routes::accepted(&mn, job))
        }
        other => Err(ApiError::invalid(
            other,
            format!("`{other}` is not an account action; use updateQuota or updateAccount"),
        )),
    }
}

/// `DELETE /v1/accounts/{uuid}` (admin): an account that owns nothing, with its sessions.
pub async fn delete_account(
    State(mn): State<Arc<Mn>>,
    headers: HeaderMap,
    crate::routes::Id(uuid): crate::routes::Id,
) -> Result<Response, ApiError> {
    if uuid == ADMIN {
        return Err(forbidden("the admin account cannot be deleted".into()));
    }
    mn.db.get::<AccountRecord>(uuid)?.ok_or_else(|| ApiError::no::<AccountRecord>(uuid))?;
    let owned: Vec<OwnerRecord> = owners::owned_by(&mn.db, uuid)?;
    if let Some(first) = owned.first() {
        return Err(ApiError::conflict(
            "ID.ACCOUNT_IN_USE",
            format!(
                "the account owns {} resources ({} {} first); delete them first",
                owned.len(),
                first.resource_type,
                first.resource_uuid
            ),
        ));
    }
    let m = mn.clone();
    let raw = json!({ "uuid": uuid });
    let job = mn
        .jobs
        .submit(crate::routes::job_header(&headers)?, "DeleteAccount", &raw, move |_| async move {
            let mut batch = Batch::new();
            batch.delete::<AccountRecord>(uuid, Expect::Any);
            batch.delete::<CredentialRecord>(uuid, Expect::Any);
            for session in m.db.find::<SessionRecord>("account", &IndexValue::Uuid(uuid))? {
                batch.delete::<SessionRecord>(session, Expect::Any);
            }
            for owned in owners::owned_by(&m.db, uuid)? {
                batch.delete::<OwnerRecord>(owned.resource_uuid, Expect::Any);
            }
            m.db.commit(batch).await?;
            Ok(json!({}))
        })
        .await?;
    Ok(crate::routes::accepted(&mn, job))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ApiKeyParams {
    #[serde(default)]
    description: String,
    /// How long the key works, in seconds (it works until deleted when absent).
    #[serde(default)]
    expires_in_seconds: Option<u64>,
}

/// `POST /v1/accounts/api-keys`: an API key for the caller's account, answered at once with
/// its secret (shown this one time).
pub async fn create_api_key(
    State(mn): State<Arc<Mn>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = caller().ok_or_else(|| unauthenticated("log in first"))?;
    let params: ApiKeyParams = if body.is_empty() {
        ApiKeyParams::default()
    } else {
        crate::routes::params(crate::routes::json_body(&body)?)?.0
    };
    crate::validate::text(
        "description",
        &params.description,
        crate::validate::MAX_DESCRIPTION_CHARS,
    )?;
    let expired_date = match params.expires_in_seconds {
        None => None,
        Some(0) => {
            return Err(ApiError::invalid(
                "expiresInSeconds",
                "an API key's lifetime is at least 1 second",
            ));
        }
        Some(secs) => Some(now().checked_add(secs).ok_or_else(|| {
            ApiError::invalid(
                "expiresInSeconds",
                "the lifetime is too long; leave it out for a key that does not expire",
            )
        })?),
    };
    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let key = SessionRecord {
        uuid: Uuid::new_v4(),
        account_uuid: caller.account,
        expired_date,
        secret_sha256: Some(Sha256::digest(secret.as_bytes()).into()),
        description: params.description,
    };
    let mut batch = Batch::new();
    batch.put(&key, Expect::Absent)?;
    mn.db.commit(batch).await?;
    tracing::info!(key = %key.uuid, account = %caller.account, "API key created");
    Ok(Json(json!({ "inventory": {
        "uuid": key.uuid,
        "accountUuid": key.account_uuid,
        "secret": secret,
        "description": key.description,
        "expiredDate": key.expired_date,
        "authorization": format!("OAuth {}:{secret}", key.uuid),
    }})))
}

/// `DELETE /v1/accounts/api-keys/{uuid}`.
pub async fn delete_api_key(
    State(mn): State<Arc<Mn>>,
    crate::routes::Id(uuid): crate::routes::Id,
) -> Result<Json<Value>, ApiError> {
    end_credential(&mn, uuid, "API key", uuid).await
}

/// How long a session lives unless configured (ZStack's default).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(7200);

/// The store as a normal account's queries read it: only what [`visible`] lets it see, so
/// lists, counts and joins never reveal another account's resources.
pub struct TenantSource<'a> {
    /// The store's own view.
    pub inner: crate::store_source::StoreSource<'a>,
    /// The store, for ownership.
    pub db: &'a Db,
    /// The account asking.
    pub tenant: Uuid,
}

impl std::fmt::Debug for TenantSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSource").field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

impl TenantSource<'_> {
    fn only_visible<'s>(
        &'s self,
        kind: &str,
        items: crate::query::Inventories<'s>,
    ) -> crate::query::Inventories<'s> {
        let kind = kind.to_owned();
        Box::new(items.filter_map(move |item| match item {
            Ok(item) => match visible(self.db, self.tenant, &kind, &item) {
                Ok(true) => Some(Ok(item)),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            },
            Err(e) => Some(Err(e)),
        }))
    }
}

impl crate::query::Source for TenantSource<'_> {
    fn scan(&self, kind: &str) -> crate::query::Inventories<'_> {
        self.only_visible(kind, self.inner.scan(kind))
    }

    fn find(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: crate::query::FieldType,
    ) -> Result<Vec<Value>, ApiError> {
        let mut found = Vec::new();
        for item in self.inner.find(kind, index, value, ty)? {
            if visible(self.db, self.tenant, kind, &item)? {
                found.push(item);
            }
        }
        Ok(found)
    }

    fn ordered(
        &self,
        kind: &str,
        index: &str,
        descending: bool,
        skip: usize,
    ) -> crate::query::Inventories<'_> {
        // What is skipped must be counted among the visible ones.
        Box::new(self.only_visible(kind, self.inner.ordered(kind, index, descending, 0)).skip(skip))
    }

    fn count(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: crate::query::FieldType,
        at_most: usize,
    ) -> Result<usize, ApiError> {
        // The store's counters count every account's; a tenant's count reads what it sees.
        Ok(self.find(kind, index, value, ty)?.len().min(at_most))
    }
}
