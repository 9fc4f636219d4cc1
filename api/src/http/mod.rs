//! The HTTP API in ZStack's v1 shape: the route table and the handlers, by area.
//!
//! Creations take `{"params": {...}, "systemTags": [], "userTags": []}`; actions take
//! `{"<actionName>": {...}}` (one enum per resource, [`crate::types::actions`]); reads answer
//! `{"inventories": [...]}`. Every mutation answers `202` with `{"location":
//! ".../v1/api-jobs/{uuid}"}` and a `Location` header; the job's URL answers `202` while it
//! runs and `200` with `{"inventory": ...}` or `{"error": ...}`. Input is checked before a
//! job is accepted: a malformed body is a `400` naming the field, an unknown UUID a `404`, an
//! operation the VM's state refuses a `409`; nothing changes.
//!
//! Every API is one row of the table ([`apis`]), declared beside its handler in its area's
//! module: [`infra`] (zones, clusters, hosts, offerings), [`networks`], [`storage`] (storage
//! and images), [`vms`], [`accounts`], [`tags`] and [`jobs`]. Each kind's query, read and
//! cascading deletion come from its declaration ([`strato_actors::kinds`]) and are served by
//! [`resources`]. The router is built from the table ([`router`]); the catalog reads the same
//! rows for the OpenAPI document and the CLI. This module knows nothing of the debug
//! console, metrics or the client: the server module puts them together.

use std::sync::{Arc, LazyLock};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use strato_actors::kinds::Kind;
use strato_storage::Record;
use uuid::Uuid;

use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::{Create, uuid_param};

pub mod accounts;
pub mod api;
pub mod infra;
pub mod jobs;
pub mod networks;
pub mod resources;
pub mod security_groups;
pub mod storage;
pub mod tags;
pub mod vips;
pub mod vms;
pub mod volumes;

pub use api::{Answer, Api, Body, Described, KindApi, Method};

use self::tags::CreationTags;

/// The state every handler gets: the node.
type Shared = State<Arc<Mn>>;

/// Every API: each area's, then each kind's query, read and deletion.
pub fn apis() -> &'static [Api] {
    static APIS: LazyLock<Vec<Api>> = LazyLock::new(|| {
        let mut apis = Vec::new();
        apis.extend(accounts::apis());
        apis.extend(infra::apis());
        apis.extend(networks::apis());
        apis.extend(security_groups::apis());
        apis.extend(vips::apis());
        apis.extend(vms::apis());
        apis.extend(storage::apis());
        apis.extend(volumes::apis());
        apis.extend(tags::apis());
        apis.extend(jobs::apis());
        apis.extend(resources::apis());
        apis
    });
    &APIS
}

/// The `/v1` routes, from the table: each (method, path) once.
pub fn router() -> Router<Arc<Mn>> {
    let mut router = Router::new();
    let mut routed: Vec<(Method, &str)> = Vec::new();
    for api in apis() {
        if routed.contains(&(api.method, api.path)) {
            continue;
        }
        routed.push((api.method, api.path));
        router = router.route(api.path, (api.handler)());
    }
    router
}

/// The request body as JSON, or a 400 that says why not.
pub(crate) fn json_body(bytes: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid JSON: {e}")))
}

/// Parses a JSON value, naming the field at fault by its JSON path inside `value`
/// (`cpuNum`, `l3NetworkUuids[1]`, `quota.vmNum`, `startVmInstance.hostUuid`): where serde
/// stopped, and for a missing key, that key under it.
pub(crate) fn parse<T: DeserializeOwned>(value: Value, what: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        let text = e.inner().to_string();
        // An unknown key is already the path's last step; a missing one is not.
        let key = text.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
        let field = match (at.as_str(), key) {
            (".", Some(key)) => key.to_owned(),
            (".", None) => what.to_owned(),
            (at, Some(key)) => format!("{at}.{key}"),
            (at, None) => at.to_owned(),
        };
        ApiError::invalid(&field, format!("invalid {what}: `{field}`: {text}"))
    })
}

/// A creation's parameters, their JSON (for the job), and its tags checked for a new
/// resource of `kind`.
pub(crate) fn creation<T: DeserializeOwned>(
    body: &Bytes,
    kind: &Kind,
) -> Result<(T, Value, CreationTags), ApiError> {
    let body = json_body(body)?;
    let tags = CreationTags::of(&body, kind.vo)?;
    let (params, raw) = params(body)?;
    Ok((params, raw, tags))
}

/// A creation's parameters (its tags left to the caller) and their JSON.
pub(crate) fn params<T: DeserializeOwned>(body: Value) -> Result<(T, Value), ApiError> {
    let envelope: Create<Value> = parse(body, "request body")?;
    let raw = envelope.params.clone();
    Ok((parse(envelope.params, "params")?, raw))
}

/// An action's body: the action, and its JSON with the resource's UUID (for the job).
pub(crate) fn action<A: DeserializeOwned>(
    body: &Bytes,
    uuid: Uuid,
) -> Result<(A, Value), ApiError> {
    let body = json_body(body)?;
    if body.as_object().is_none_or(|m| m.len() != 1) {
        return Err(ApiError::invalid(
            "action",
            "the body must be one action, such as {\"startVmInstance\": {}}",
        ));
    }
    let name = body.as_object().and_then(|m| m.keys().next()).cloned().unwrap_or_default();
    let mut keyed = body.clone();
    keyed["uuid"] = json!(uuid);
    let action = parse(body, &name).map_err(|mut e| {
        // An action the resource does not have is named by itself.
        if e.details["field"] == name {
            let serde = e.description.rsplit_once("`: ").map_or("", |(_, text)| text).to_owned();
            e.description = format!("`{name}` is not an action here ({serde})");
        }
        e
    })?;
    Ok((action, keyed))
}

/// The job UUID a client fixed (`X-Job-UUID`), which doubles as an idempotency key.
pub(crate) fn job_header(headers: &HeaderMap) -> Result<Option<Uuid>, ApiError> {
    match headers.get("x-job-uuid") {
        None => Ok(None),
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                ApiError::invalid("X-Job-UUID", "the X-Job-UUID header is not a UUID")
            })?;
            uuid_param(text, "X-Job-UUID").map(Some)
        }
    }
}

/// `202` with the job's location: under the configured external URL, or as a path (never
/// built from the request's `Host`, which the client chooses).
pub(crate) fn accepted(mn: &Mn, job: Uuid) -> Response {
    let location = format!("{}/v1/api-jobs/{job}", mn.external_url.as_deref().unwrap_or(""));
    let mut response =
        (StatusCode::ACCEPTED, Json(json!({ "location": location }))).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Record `uuid` of `R`, or a 404 naming its kind.
pub(crate) fn get_record<R: Record>(mn: &Mn, uuid: Uuid) -> Result<R, ApiError> {
    mn.db.get::<R>(uuid)?.map(|s| s.record).ok_or_else(|| ApiError::no::<R>(uuid))
}

/// A route's one path UUID, parsed by [`uuid_param`] and named after the route's parameter.
/// The access check (`crate::auth::middleware`) parses the same decoded parameter with the
/// same function, so both decide on one value.
#[derive(Debug, Clone, Copy)]
pub struct Id(pub Uuid);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid("path", e.body_text()))?;
        let mut params = params.iter();
        match (params.next(), params.next()) {
            (Some((name, value)), None) => uuid_param(value, name).map(Id),
            _ => Err(ApiError::internal(&std::io::Error::other(
                "a route with the Id extractor declares more than one path parameter",
            ))),
        }
    }
}

/// Writes new record `record` with the tags of its creation, in one atomic write, guarded
/// against the deletion of what it depends on (`strato_actors::cascade::insert`).
pub(crate) async fn write<R: Record + serde::Serialize>(
    mn: &Mn,
    record: &R,
    tags: &CreationTags,
) -> Result<(), ApiError> {
    let resource_type = tags::resource_type_of_table(R::KIND);
    strato_actors::cascade::insert(&mn.db, record, |batch| match resource_type {
        Some(resource_type) => tags.write(batch, record.id(), resource_type),
        None => Ok(()),
    })
    .await?;
    Ok(())
}

/// What a creation writes beside its record: its tags, and (a normal account's) its owner.
pub(crate) fn owned(
    tags: &CreationTags,
    kind: &'static Kind,
    owner: Option<Uuid>,
    uuid: Uuid,
) -> impl Fn(&mut strato_storage::Batch) -> Result<(), strato_storage::StoreError> + Send + 'static
{
    owned_charged(tags, kind, owner, uuid, strato_actors::owners::Charge::default())
}

/// [`owned`], counting `charge` against the owner's quota (admitted under the account's
/// lock by `Quotas::admit`).
pub(crate) fn owned_charged(
    tags: &CreationTags,
    kind: &'static Kind,
    owner: Option<Uuid>,
    uuid: Uuid,
    charge: strato_actors::owners::Charge,
) -> impl Fn(&mut strato_storage::Batch) -> Result<(), strato_storage::StoreError> + Send + 'static
{
    let tags = tags.clone();
    move |batch: &mut strato_storage::Batch| {
        tags.write(batch, uuid, kind.vo)?;
        if let Some(account) = owner {
            let record = strato_actors::owners::OwnerRecord {
                resource_uuid: uuid,
                resource_type: kind.vo.into(),
                account_uuid: account,
                charge,
            };
            batch.put(&record, strato_storage::Expect::Absent)?;
        }
        Ok(())
    }
}

/// Accepts a job that writes the new record `make` builds, answering with its inventory.
pub(crate) async fn submit_record<R: Record + serde::Serialize>(
    mn: &Arc<Mn>,
    headers: &HeaderMap,
    api: &str,
    raw: &Value,
    tags: CreationTags,
    make: impl FnOnce() -> Result<R, ApiError> + Send + 'static,
) -> Result<Response, ApiError> {
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(headers)?, api, raw, move |_| async move {
            let record = make()?;
            write(&m, &record, &tags).await?;
            crate::types::inventory(&record)
        })
        .await?;
    Ok(accepted(mn, job))
}
