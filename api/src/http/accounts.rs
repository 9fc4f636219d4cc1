//! Accounts: logging in and out, accounts (the admin makes them; each changes its own
//! password), quotas, and API keys.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{MethodRouter, delete, post, put};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use strato_actors::owners::{self, ADMIN, OwnerRecord};
use strato_storage::{Batch, Expect, IndexValue};
use uuid::Uuid;

use super::api::{Answer, Api, Body, Method, actions, schema};
use super::{Id, Shared, accepted, action, job_header, json_body, params};
use crate::auth::accounts::{
    check_login, check_password, hash_password, new_session, session_key, verify_password,
};
use crate::auth::{
    AccountRecord, AccountType, CredentialRecord, Peer, Quota, SessionRecord, caller, forbidden,
    now, tenant, unauthenticated,
};
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::actions::AccountAction;
use crate::types::{AccountParams, ApiKeyParams, LogIn, LogInByAccount, inventory, validate};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = vec![
        Api::new(
            "LogInByAccount",
            Method::Put,
            "/v1/accounts/login",
            Body::Action("logInByAccount", schema::<LogInByAccount>()),
            Answer::Immediate,
            "Logs in; answers the session",
            || put(log_in),
        ),
        Api::new(
            "LogOut",
            Method::Delete,
            "/v1/accounts/sessions/{uuid}",
            Body::None,
            Answer::Immediate,
            "Ends a session",
            || delete(log_out),
        ),
        Api::create(
            "CreateAccount",
            "/v1/accounts",
            schema::<AccountParams>(),
            "Creates a normal account (admin)",
            || post(create_account),
        ),
        Api::new(
            "DeleteAccount",
            Method::Delete,
            "/v1/accounts/{uuid}",
            Body::None,
            Answer::Job,
            "Deletes an account that owns nothing (admin)",
            || delete(delete_account),
        ),
        Api::new(
            "CreateApiKey",
            Method::Post,
            "/v1/accounts/api-keys",
            Body::Create(schema::<ApiKeyParams>()),
            Answer::Immediate,
            "Creates an API key; its secret is shown once",
            || post(create_api_key),
        ),
        Api::new(
            "DeleteApiKey",
            Method::Delete,
            "/v1/accounts/api-keys/{uuid}",
            Body::None,
            Answer::Immediate,
            "Deletes an API key",
            || delete(delete_api_key),
        ),
    ];
    apis.extend(actions::<AccountAction>("/v1/accounts/{uuid}/actions", account_actions));
    apis
}

fn account_actions() -> MethodRouter<Arc<Mn>> {
    put(account_action)
}

fn session_inventory(token: Uuid, session: &SessionRecord) -> Value {
    json!({ "inventory": {
        "uuid": token,
        "accountUuid": session.account_uuid,
        "expiredDate": session.expired_date,
    }})
}

/// `PUT /v1/accounts/login`: a new session for an account's name and password.
async fn log_in(State(mn): Shared, peer: Peer, body: Bytes) -> Result<Json<Value>, ApiError> {
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
    let account = check_login(&mn.auth, &account_name, password, source).await?;
    let (token, session) = new_session(&mn.auth, account.uuid).await?;
    Ok(Json(session_inventory(token, &session)))
}

/// `DELETE /v1/accounts/sessions/{uuid}`: logs a session out (one's own; the admin's any),
/// named by its token.
async fn log_out(State(mn): Shared, Id(token): Id) -> Result<Json<Value>, ApiError> {
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

/// `POST /v1/accounts` (admin): a normal account.
async fn create_account(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, _): (AccountParams, _) = params(json_body(&body)?)?;
    if p.name.trim().is_empty() || p.name.contains(char::is_whitespace) {
        return Err(ApiError::invalid("name", "an account name is one word, not blank"));
    }
    check_password(&p.password)?;
    if !mn.db.find::<AccountRecord>("name", &p.name.as_str().into())?.is_empty() {
        return Err(ApiError::of(
            crate::codes::ACCOUNT_EXISTS,
            format!("an account named `{}` exists", p.name),
        ));
    }
    // The job's body leaves the password out.
    let raw = json!({ "name": p.name, "quota": p.quota });
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "CreateAccount", &raw, {
            move |_| async move {
                let password = p.password;
                let hash = tokio::task::spawn_blocking(move || hash_password(&password))
                    .await
                    .map_err(|e| ApiError::internal(&e))??;
                // Checked again, one creation at a time: two creations of one name at once
                // both passed the check at the door.
                let _one_at_a_time = m.account_creation.lock().await;
                if !m.db.find::<AccountRecord>("name", &p.name.as_str().into())?.is_empty() {
                    return Err(ApiError::of(
                        crate::codes::ACCOUNT_EXISTS,
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
                inventory(&account)
            }
        })
        .await?;
    Ok(accepted(&mn, job))
}

/// `PUT /v1/accounts/{uuid}/actions` (admin): `{"updateQuota": {...}}` or
/// `{"updateAccount": {"password": ...}}` (an account may change its own password).
async fn account_action(
    State(mn): Shared,
    headers: HeaderMap,
    Id(uuid): Id,
    body: Bytes,
) -> Result<Response, ApiError> {
    let account =
        mn.db.get::<AccountRecord>(uuid)?.ok_or_else(|| ApiError::no::<AccountRecord>(uuid))?;
    let (action, keyed): (AccountAction, _) = action(&body, uuid)?;
    let m = mn.clone();
    let record = account.record;
    match action {
        AccountAction::UpdateQuota(quota) => {
            if tenant().is_some() {
                return Err(forbidden("only the admin account changes quotas".into()));
            }
            let quota = Quota::from(quota);
            let job = mn
                .jobs
                .submit(job_header(&headers)?, "UpdateQuota", &keyed, move |_| async move {
                    // Applied to the account as it is now: quotas set at once both succeed,
                    // the last one staying, as a replacement does.
                    let record =
                        m.db.update::<AccountRecord>(uuid, |r| r.quota = quota)
                            .await?
                            .ok_or_else(|| ApiError::no::<AccountRecord>(uuid))?;
                    inventory(&record)
                })
                .await?;
            Ok(accepted(&mn, job))
        }
        AccountAction::UpdateAccount(change) => {
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
                let matches = verify_password(&mn.auth, Some(uuid), old).await?;
                if !matches {
                    tracing::warn!(account = %uuid, "password change with a wrong oldPassword");
                    return Err(ApiError::new(
                        crate::codes::WRONG_PASSWORD,
                        "oldPassword is not the account's current password",
                        json!({ "field": "updateAccount.oldPassword" }),
                    ));
                }
            }
            // The job's body leaves the password out (not even its hash is kept).
            let raw = json!({ "updateAccount": { "uuid": uuid } });
            let password = change.password;
            let job = mn.jobs.submit(job_header(&headers)?,
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
                    inventory(&record)
                },
            )
            .await?;
            Ok(accepted(&mn, job))
        }
    }
}

/// `DELETE /v1/accounts/{uuid}` (admin): an account that owns nothing, with its sessions.
async fn delete_account(
    State(mn): Shared,
    headers: HeaderMap,
    Id(uuid): Id,
) -> Result<Response, ApiError> {
    if uuid == ADMIN {
        return Err(forbidden("the admin account cannot be deleted".into()));
    }
    mn.db.get::<AccountRecord>(uuid)?.ok_or_else(|| ApiError::no::<AccountRecord>(uuid))?;
    let owned: Vec<OwnerRecord> = owners::owned_by(&mn.db, uuid)?;
    if let Some(first) = owned.first() {
        return Err(ApiError::of(
            crate::codes::ACCOUNT_IN_USE,
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
        .submit(job_header(&headers)?, "DeleteAccount", &raw, move |_| async move {
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
    Ok(accepted(&mn, job))
}

/// `POST /v1/accounts/api-keys`: an API key for the caller's account, answered at once with
/// its secret (shown this one time).
async fn create_api_key(State(mn): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let caller = caller().ok_or_else(|| unauthenticated("log in first"))?;
    let params: ApiKeyParams =
        if body.is_empty() { ApiKeyParams::default() } else { params(json_body(&body)?)?.0 };
    validate::text("description", &params.description, validate::MAX_DESCRIPTION_CHARS)?;
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
async fn delete_api_key(State(mn): Shared, Id(uuid): Id) -> Result<Json<Value>, ApiError> {
    end_credential(&mn, uuid, "API key", uuid).await
}
