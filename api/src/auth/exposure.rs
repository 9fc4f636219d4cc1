//! What a normal account does not see: the cloud's internals.
//!
//! A tenant's VM runs on some host, from a volume at some path, plugged into some bridge; an
//! image came from some URL and sits at some path of a backup storage; a placement failed
//! after some filters; an operation failed inside some agent with some libvirt message. None
//! of that is the tenant's business, and each of it helps an attacker map the cloud (which
//! VMs share a host, where the storage is, what software runs it). The admin sees it all.
//!
//! The fields are named once, in [`HIDDEN_FIELDS`], and removed in one place: the
//! [`redact_for_tenants`] layer takes them out of every JSON answer a tenant gets, at any
//! depth (inventories, query results, job results, error details), so no route can forget.
//! Queries name them as nothing a tenant may ask about ([`refuse_hidden`]): otherwise a
//! condition on `hostUuid` would tell, by what it selects, what the answer no longer shows.

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::ApiError;

/// Keys a tenant's answers never carry.
pub const HIDDEN_FIELDS: &[&str] = &[
    // Where a VM runs and what it runs from.
    "hostUuid",
    "lastHostUuid",
    "rootVolumePath",
    "installPath",
    "primaryStorageInstallPath",
    "primaryStorageUuid",
    "bridge",
    // Where an image came from and where it is kept.
    "url",
    "backupStorageRefs",
    // How a placement or an operation failed inside.
    "placementTrace",
    "cause",
    "rollbackFailures",
];

/// Removes [`HIDDEN_FIELDS`] from `value`, at any depth.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !HIDDEN_FIELDS.contains(&k.as_str()));
            map.values_mut().for_each(redact);
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A 400 when a tenant's query names a hidden field in `path` (a dotted path, a sort or a
/// projection).
pub fn refuse_hidden(option: &str, path: &str) -> Result<(), ApiError> {
    match path.split('.').find(|step| HIDDEN_FIELDS.contains(step)) {
        Some(step) => Err(ApiError::invalid(
            option,
            format!("`{step}` is not a field a normal account can query"),
        )),
        None => Ok(()),
    }
}

/// The layer: a tenant's JSON answers leave with [`HIDDEN_FIELDS`] removed. It runs inside
/// authentication's scope, where the caller is known.
pub async fn redact_for_tenants(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if crate::auth::tenant().is_none() {
        return response;
    }
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Answers are built in memory; this limit is far above any of them.
    let bytes = match axum::body::to_bytes(body, 256 << 20).await {
        Ok(bytes) => bytes,
        Err(error) => return ApiError::internal(&error).into_response(),
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    redact(&mut value);
    let body = serde_json::to_vec(&value).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hidden_fields_go_at_any_depth_and_the_rest_stays() {
        let mut job = json!({ "inventory": { "uuid": "v", "hostUuid": "h", "vmNics": [
            { "ip": "10.0.0.5", "bridge": "br0" } ] },
            "error": { "details": { "placementTrace": ["a"], "step": "s" } } });
        redact(&mut job);
        assert_eq!(
            job,
            json!({ "inventory": { "uuid": "v", "vmNics": [{ "ip": "10.0.0.5" }] },
                "error": { "details": { "step": "s" } } })
        );
    }

    #[test]
    fn a_query_on_a_hidden_field_is_refused_naming_the_option() {
        assert!(refuse_hidden("q", "vmNics.ip").is_ok());
        let refused = refuse_hidden("q", "vmNics.bridge").unwrap_err();
        assert_eq!(refused.details["field"], "q");
        assert!(refuse_hidden("sort", "hostUuid").is_err());
    }
}
