//! Accounts' secrets: passwords hashed with argon2, the admin made at the first start,
//! logins checked (throttled, and as slow for an unknown name as for a wrong password), and
//! sessions whose records are kept under a digest of their token.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use strato_actors::owners::ADMIN;
use strato_storage::{Batch, Db, Expect};
use uuid::Uuid;

use super::{
    AccountRecord, AccountType, Auth, CredentialRecord, Quota, SessionRecord, now, unauthenticated,
};
use crate::error::ApiError;

/// The id a session's record is kept under: the first 128 bits of SHA-256 over a domain
/// label and the token, so the id does not give the token back.
pub fn session_key(token: Uuid) -> Uuid {
    let digest =
        Sha256::new().chain_update(b"strato-session\0").chain_update(token.as_bytes()).finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

pub(crate) fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::new(crate::codes::INTERNAL, e.to_string(), Value::Null))
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

pub(crate) fn check_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 8 {
        return Err(ApiError::invalid("password", "a password has at least 8 characters"));
    }
    Ok(())
}

/// Makes the admin account at the first start. Returns the password when it was generated
/// (the caller prints it, once).
pub async fn bootstrap(db: &Db) -> Result<Option<String>, ApiError> {
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
    db.commit(batch).await?;
    tracing::info!("admin account created");
    Ok(generated.then_some(password))
}

/// Checks `account_name` and `password` for a login from `source`: the account, or why not.
/// The API's login and the console's both use it; neither makes a session before the caller
/// is known to be allowed one.
///
/// A guess is throttled ([`super::login`]) before any work is done; an unknown account is
/// checked against `DUMMY_HASH` so that it answers as slowly as a wrong password; a failure
/// is logged with the name (escaped) and the source, never the password.
pub async fn check_login(
    auth: &Auth,
    account_name: &str,
    password: String,
    source: Option<std::net::IpAddr>,
) -> Result<AccountRecord, ApiError> {
    if let Err(refusal) = auth.logins.check(account_name, source) {
        tracing::warn!(account = ?account_name, source = ?source, ?refusal, "login refused by the throttle");
        return Err(throttled(refusal));
    }
    let wrong = || unauthenticated("wrong account name or password");
    let id = auth.db.find::<AccountRecord>("name", &account_name.into())?.first().copied();
    let account = match id {
        Some(id) => auth.db.get::<AccountRecord>(id)?.map(|a| a.record),
        None => None,
    };
    let matches = verify_password(auth, account.as_ref().map(|a| a.uuid), password).await?;
    match account {
        Some(account) if matches => {
            auth.logins.succeeded(account_name);
            Ok(account)
        }
        _ => {
            auth.logins.failed(account_name, source);
            tracing::warn!(account = ?account_name, source = ?source, "failed login");
            Err(wrong())
        }
    }
}

/// Whether `password` is `account`'s, at the cost of one argon2 verification whether or not
/// the account (or its credential) exists.
pub(crate) async fn verify_password(
    auth: &Auth,
    account: Option<Uuid>,
    password: String,
) -> Result<bool, ApiError> {
    let hash = match account {
        Some(account) => auth.db.get::<CredentialRecord>(account)?.map(|c| c.record.password_hash),
        None => None,
    };
    let known = hash.is_some();
    let hash = hash.unwrap_or_else(|| DUMMY_HASH.clone());
    let matches = tokio::task::spawn_blocking(move || password_matches(&hash, &password))
        .await
        .unwrap_or(false);
    Ok(known && matches)
}

fn throttled(refusal: super::login::Refusal) -> ApiError {
    let (code, wait, what) = match refusal {
        super::login::Refusal::Throttled(wait) => {
            (crate::codes::LOGIN_THROTTLED, wait, "too soon after a failed login")
        }
        super::login::Refusal::Locked(wait) => {
            (crate::codes::LOGIN_LOCKED, wait, "locked after too many failed logins")
        }
    };
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    ApiError::new(
        code,
        format!("{what}; try again in {} s", ms.div_ceil(1000)),
        json!({ "retryAfterMs": ms }),
    )
}

/// A new session for `account`: its token (handed to the client once) and its record.
pub async fn new_session(auth: &Auth, account: Uuid) -> Result<(Uuid, SessionRecord), ApiError> {
    let token = Uuid::new_v4();
    let session = SessionRecord {
        uuid: session_key(token),
        account_uuid: account,
        expired_date: Some(now().saturating_add(auth.session_timeout.as_secs())),
        secret_sha256: None,
        description: String::new(),
    };
    let mut batch = Batch::new();
    batch.put(&session, Expect::Absent)?;
    auth.db.commit(batch).await?;
    tracing::info!(account = %account, "logged in");
    Ok((token, session))
}
