//! What every kind has, from its declaration ([`strato_actors::kinds`]): its query (`GET
//! /v1/<kind>?q=...`), its read by UUID (`GET /v1/<kind>/{uuid}`) and, for the kinds deleted
//! with cascade, its deletion (`DELETE /v1/<kind>/{uuid}?deleteMode=...`); and the one
//! attachment handler (storage to a zone or cluster, an L2 network to a cluster).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, RawPathParams, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{MethodRouter, get};
use serde::Deserialize;
use serde_json::json;
use strato_actors::cascade::{CascadeError, DeleteMode, Resource};
use strato_actors::kinds::{Deletion, KINDS, Kind};
use strato_storage::Record;
use uuid::Uuid;

use super::api::{Answer, Api, Body, KindApi, Method, leak};
use super::{Id, Shared, accepted, get_record, job_header};
use crate::auth;
use crate::error::ApiError;
use crate::mn::Mn;
use crate::query::{self, StoreSource, TenantSource};
use crate::types::{inventory, uuid_param};

/// Each kind's query, read, and (when it is deleted with cascade) deletion.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = Vec::new();
    for kind in KINDS {
        let derived = |what, name: String, method, path: String, answer, summary: &'static str| {
            let handler: super::api::Handler = Arc::new(move || match what {
                KindApi::Query => list(kind),
                KindApi::Get => one(kind),
                KindApi::Delete => delete(kind),
            });
            Api {
                name: leak(name),
                method,
                path: leak(path),
                body: Body::None,
                answer,
                summary,
                of_kind: Some((what, kind)),
                handler,
            }
        };
        apis.push(derived(
            KindApi::Query,
            format!("Query{}", kind.api),
            Method::Get,
            format!("/v1/{}", kind.url()),
            Answer::Query,
            "Queries with conditions (q=field<op>value), sort, start, limit, count, replyWithCount and fields",
        ));
        apis.push(derived(
            KindApi::Get,
            format!("Get{}", kind.api),
            Method::Get,
            format!("/v1/{}/{{uuid}}", kind.url()),
            Answer::Immediate,
            leak(format!("One {} by its UUID", kind.api)),
        ));
        if let Deletion::Cascade(_) = kind.deletion {
            apis.push(derived(
                KindApi::Delete,
                format!("Delete{}", kind.api),
                Method::Delete,
                format!("/v1/{}/{{uuid}}", kind.url()),
                Answer::Job,
                leak(format!(
                    "Deletes a {} (deleteMode=Permissive refuses while anything depends on it; Enforcing deletes that first)",
                    kind.api
                )),
            ));
        }
    }
    apis
}

/// `GET /v1/<kind>`: every inventory of the kind, or those a query selects. A normal
/// account's query reads through its view of the store and may not name the internals it is
/// not shown.
fn list(kind: &'static Kind) -> MethodRouter<Arc<Mn>> {
    get(move |State(mn): Shared, Query(pairs): Query<Vec<(String, String)>>| async move {
        let schema = &kind.shape;
        let query = query::Query::parse(schema, &pairs)?;
        if auth::tenant().is_some() {
            for (option, path) in query.named_paths() {
                auth::exposure::refuse_hidden(option, &path)?;
            }
        }
        let store = StoreSource::new(&mn.db);
        let tenant_view;
        let source: &dyn query::Source = match auth::tenant() {
            Some(tenant) => {
                tenant_view = TenantSource { inner: store, db: &mn.db, tenant };
                &tenant_view
            }
            None => &store,
        };
        let mut catalog = query::Catalog::new(source);
        Ok::<_, ApiError>(Json(query.run(schema, &mut catalog)?))
    })
}

/// `GET /v1/<kind>/{uuid}`: one resource of `kind`.
fn one(kind: &'static Kind) -> MethodRouter<Arc<Mn>> {
    get(move |State(mn): Shared, Id(uuid): Id| async move {
        let inventory = kind
            .table
            .inventory(&mn.db, uuid)?
            .ok_or_else(|| ApiError::not_found(kind.api, uuid))?;
        Ok::<_, ApiError>(Json(json!({ "inventories": [inventory] })))
    })
}

/// `?deleteMode=`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    delete_mode: Option<String>,
}

fn delete_mode(query: &DeleteQuery) -> Result<DeleteMode, ApiError> {
    match query.delete_mode.as_deref() {
        None | Some("Permissive") => Ok(DeleteMode::Permissive),
        Some("Enforcing") => Ok(DeleteMode::Enforcing),
        Some(other) => Err(ApiError::invalid(
            "deleteMode",
            format!("`{other}` is not Permissive or Enforcing"),
        )),
    }
}

/// `DELETE /v1/<kind>/{uuid}` with cascade: checked now (a 409 names what depends on the
/// resource), run as a job that answers with what was deleted.
fn delete(kind: &'static Kind) -> MethodRouter<Arc<Mn>> {
    axum::routing::delete(
        move |State(mn): Shared, Id(uuid): Id, Query(q): Query<DeleteQuery>, headers: HeaderMap| async move {
            if !kind.table.exists(&mn.db, uuid)? {
                return Err(ApiError::not_found(kind.api, uuid));
            }
            let mode = delete_mode(&q)?;
            let resource = Resource { kind, uuid };
            let deleter = mn.deleter();
            let dependents = deleter.dependents(resource).map_err(ApiError::from)?;
            if mode == DeleteMode::Permissive && !dependents.is_empty() {
                return Err(CascadeError::HasDependents { resource, dependents }.into());
            }
            let body = json!({ "uuid": uuid, "deleteMode": format!("{mode:?}") });
            let api = format!("Delete{}", kind.api);
            let job = mn
                .jobs
                .submit(job_header(&headers)?, &api, &body, move |_| async move {
                    let deleted = deleter.delete(resource, mode).await?;
                    Ok(json!({ "deleted": deleted }))
                })
                .await?;
            Ok::<Response, ApiError>(accepted(&mn, job))
        },
    )
}

/// An attachment route (`POST` on a path with two UUIDs): record `T` gets the other record's
/// UUID (of `P`) in the list `list` picks.
pub(super) struct Attachment<T, P> {
    /// The API's name.
    pub api: &'static str,
    /// The path's two parameters, in order, with the field each names in errors.
    pub params: [(&'static str, &'static str); 2],
    /// Whether the path's first parameter is `T`'s (else `P`'s).
    pub target_first: bool,
    /// The list in `T` that holds the attached UUIDs.
    pub list: fn(&mut T) -> &mut Vec<Uuid>,
    /// The kind attached to.
    pub parent: std::marker::PhantomData<fn() -> P>,
    /// Whether it detaches (`DELETE`) rather than attaches (`POST`).
    pub detach: bool,
    /// What follows the change, with the record as written and the parent (the hosts'
    /// networks refreshed, for an L2 network).
    pub then: fn(&Mn, &T, Uuid),
}

/// An [`Attachment`] with nothing to do after the change.
pub(super) fn nothing_then<T>(_: &Mn, _: &T, _: Uuid) {}

impl<T, P> Clone for Attachment<T, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, P> Copy for Attachment<T, P> {}

impl<T: Record, P: Record> Attachment<T, P> {
    /// The handler: both exist, then a job adds (or takes out) the UUID, with a
    /// compare-and-swap retried, so two attachments at once both land and an attachment
    /// never brings back a record deleted meanwhile.
    pub(super) fn handler(self) -> MethodRouter<Arc<Mn>> {
        let route = if self.detach { axum::routing::delete } else { axum::routing::post };
        route(move |State(mn): Shared, raw: RawPathParams, headers: HeaderMap| async move {
            let mut ids = [Uuid::nil(); 2];
            for (i, (name, field)) in self.params.iter().enumerate() {
                let value = raw.iter().find(|(k, _)| k == name).map(|(_, v)| v).unwrap_or_default();
                ids[i] = uuid_param(value, field)?;
            }
            let (target, parent) =
                if self.target_first { (ids[0], ids[1]) } else { (ids[1], ids[0]) };
            // Checked in the path's order, so the first unknown one is the one named.
            if self.target_first {
                get_record::<T>(&mn, target)?;
                get_record::<P>(&mn, parent)?;
            } else {
                get_record::<P>(&mn, parent)?;
                get_record::<T>(&mn, target)?;
            }
            let m = mn.clone();
            let body = json!({ "target": target, "parent": parent });
            let (list, detach, then) = (self.list, self.detach, self.then);
            let job = mn
                .jobs
                .submit(job_header(&headers)?, self.api, &body, move |_| async move {
                    let record =
                        m.db.update::<T>(target, |record| {
                            let attached = list(record);
                            if detach {
                                attached.retain(|id| *id != parent);
                            } else if !attached.contains(&parent) {
                                attached.push(parent);
                            }
                        })
                        .await?
                        .ok_or_else(|| ApiError::no::<T>(target))?;
                    then(&m, &record, parent);
                    inventory(&record)
                })
                .await?;
            Ok::<Response, ApiError>(accepted(&mn, job))
        })
    }
}
