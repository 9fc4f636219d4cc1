//! `/debug/...`: what every actor is doing, as JSON for scripts, the chaos checks and the
//! console ([`super::console`]), and the operator's actions. Admin only.
//!
//! It reads the runtime's inspection snapshot, which never activates an actor. A million
//! resources stay browsable because a kind's resources are paged from the store (in UUID
//! order, filtered by name or UUID) and only the page's actors are asked for their state; a
//! resource whose actor is not live is "Passivated". Counts per status come from the live
//! actors, resource counts from the store (a VM count from its state counters, one read).
//!
//! Operator actions (a queue's level, restarting an actor, running or cancelling a GC job)
//! are POSTs, each logged as an audit line (`target: "audit"`) naming the account, the action
//! and its arguments; the console asks for confirmation before sending one.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Deserialize;
use serde_json::{Value, json};
use strato_runtime::{ActorFilter, ActorSnapshot, ActorStatus};
use uuid::Uuid;

use crate::error::ApiError;
use crate::mn::Mn;
use crate::query::StoreSource;
use crate::query::{FieldType, Source};

type Shared = State<Arc<Mn>>;

/// The URL kind of the resources an actor kind runs (`vm` -> `vm-instances`).
fn resource_kind(actor: &str) -> Option<&'static str> {
    strato_actors::kinds::by_actor(actor).map(|k| k.url())
}

fn status_name(status: Option<ActorStatus>) -> &'static str {
    match status {
        None => "Passivated",
        Some(ActorStatus::Activating) => "Activating",
        Some(ActorStatus::Active) => "Active",
        Some(ActorStatus::Restarting) => "Restarting",
        Some(ActorStatus::Failed) => "Failed",
        Some(ActorStatus::Gone) => "Gone",
    }
}

fn parse_status(text: &str) -> Result<Option<ActorStatus>, ApiError> {
    Ok(Some(match text {
        "Activating" => ActorStatus::Activating,
        "Active" => ActorStatus::Active,
        "Restarting" => ActorStatus::Restarting,
        "Failed" => ActorStatus::Failed,
        "Gone" => ActorStatus::Gone,
        "Passivated" => return Ok(None),
        other => {
            return Err(ApiError::invalid(
                "status",
                format!(
                    "`{other}` is not Activating, Active, Restarting, Failed, Gone or Passivated"
                ),
            ));
        }
    }))
}

fn internal(error: impl std::error::Error + 'static) -> ApiError {
    ApiError::internal(&error)
}

/// How many resources the actor kind `actor` runs, as the store holds them (`None` for
/// kinds without records).
fn resource_count(mn: &Mn, actor: &str) -> Result<Option<usize>, ApiError> {
    match strato_actors::kinds::by_actor(actor) {
        Some(kind) => Ok(Some(kind.table.count(&mn.db)?)),
        None => Ok(None),
    }
}

/// `GET /debug/tree`: the supervision tree's top: each kind, its supervisor, its live
/// actors by status, its resources in the store, and its queues with their depths.
pub async fn tree(State(mn): Shared) -> Result<Json<Value>, ApiError> {
    let mut kinds = Vec::new();
    for kind in mn.runtime.kinds() {
        // Statuses of the live actors (capped: a count over a huge live set is a sample).
        let filter = ActorFilter {
            kind: Some(kind.kind.to_owned()),
            limit: Some(10_000),
            ..Default::default()
        };
        let snapshot = mn.runtime.snapshot(&filter).await.map_err(internal)?;
        let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
        let mut restarts = 0;
        for actor in &snapshot.actors {
            *by_status.entry(status_name(Some(actor.status))).or_default() += 1;
            restarts += actor.restarts;
        }
        let resources = resource_count(&mn, kind.kind)?;
        if let Some(resources) = resources {
            let live = kind.counters.live.min(resources);
            by_status.insert("Passivated", resources - live);
        }
        kinds.push(json!({
            "kind": kind.kind,
            "supervisor": kind.supervisor,
            "live": kind.counters.live,
            "activations": kind.counters.activations,
            "departures": kind.counters.departures,
            "resources": resources,
            "byStatus": by_status,
            "restarts": restarts,
            "queues": kind.queues,
        }));
    }
    Ok(Json(json!({ "kinds": kinds })))
}

/// What `/debug/actors` takes.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActorsQuery {
    /// The actor kind (`vm`, `host`, `l3`, `gc-job`).
    pub kind: String,
    /// Only this status (`Active`, `Failed`, ..., `Passivated`).
    pub status: Option<String>,
    /// Only resources whose name contains it, or whose UUID is it.
    pub filter: Option<String>,
    /// Skip this many.
    #[serde(default)]
    pub start: usize,
    /// At most this many (default 50).
    pub limit: Option<usize>,
}

fn row(kind: &str, uuid: Uuid, name: Option<&str>, snapshot: Option<&ActorSnapshot>) -> Value {
    json!({
        "kind": kind,
        "uuid": uuid,
        "name": name,
        "status": status_name(snapshot.map(|s| s.status)),
        "restarts": snapshot.map_or(0, |s| s.restarts),
        "running": snapshot.map_or(0, |s| s.running.len()),
        "pending": snapshot.map_or(0, |s| s.pending.len()),
        "lastError": snapshot.and_then(|s| s.last_error.clone()),
    })
}

/// `GET /debug/actors?kind=vm[&status=..][&filter=..][&start=..][&limit=..]`: one page of a
/// kind's actors with their status.
pub async fn actors(
    State(mn): Shared,
    Query(q): Query<ActorsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(50).min(1000);
    let status = q.status.as_deref().map(parse_status).transpose()?;
    let live_only = matches!(status, Some(Some(_)));
    let resources = resource_kind(&q.kind);
    if !mn.runtime.kind_names().contains(&q.kind.as_str()) {
        return Err(ApiError::invalid(
            "kind",
            format!(
                "`{}` is not an actor kind; use one of {}",
                q.kind,
                mn.runtime.kind_names().join(", ")
            ),
        ));
    }
    let mut rows = Vec::new();
    let mut total = 0;
    if live_only || resources.is_none() {
        // Live actors, from the runtime.
        let filter = ActorFilter {
            kind: Some(q.kind.clone()),
            status: status.flatten(),
            ..Default::default()
        };
        let snapshot = mn.runtime.snapshot(&filter).await.map_err(internal)?;
        let matching: Vec<&ActorSnapshot> = snapshot
            .actors
            .iter()
            .filter(|a| q.filter.as_deref().is_none_or(|f| a.id.to_string().starts_with(f)))
            .collect();
        total = matching.len();
        for actor in matching.into_iter().skip(q.start).take(limit) {
            rows.push(row(&q.kind, actor.id, None, Some(actor)));
        }
    } else if let Some(resource_kind) = resources {
        // Resources, from the store in UUID order, with the page's actors asked.
        let schema = crate::query::schema(resource_kind).expect("declared");
        let mut pairs = vec![("fields".to_owned(), "uuid,name".to_owned())];
        if let Some(filter) = q.filter.as_deref().filter(|f| !f.is_empty()) {
            match strato_actors::canonical_uuid(filter) {
                Some(uuid) => pairs.push(("q".into(), format!("uuid={uuid}"))),
                None => pairs.push(("q".into(), format!("name~=%{filter}%"))),
            }
        }
        let source = StoreSource::new(&mn.db);
        let passivated_only = status == Some(None);
        let want = if passivated_only { usize::MAX } else { q.start + limit };
        pairs.push(("limit".into(), want.to_string()));
        if q.filter.is_none() && !passivated_only {
            total = resource_count(&mn, &q.kind)?.unwrap_or(0);
        }
        let query = crate::query::Query::parse(schema, &pairs)?;
        let body = query.run(schema, &mut crate::query::Catalog::new(&source))?;
        let mut seen = 0;
        for item in body["inventories"].as_array().into_iter().flatten() {
            let Some(uuid) = item["uuid"].as_str().and_then(strato_actors::canonical_uuid) else {
                continue;
            };
            let snapshot = mn.runtime.inspect(&q.kind, uuid).await.map_err(internal)?;
            if passivated_only && snapshot.is_some() {
                continue;
            }
            seen += 1;
            if seen <= q.start || rows.len() >= limit {
                continue;
            }
            rows.push(row(&q.kind, uuid, item["name"].as_str(), snapshot.as_ref()));
        }
        if q.filter.is_some() || passivated_only {
            total = seen;
        }
    }
    Ok(Json(
        json!({ "kind": q.kind, "start": q.start, "limit": limit, "total": total, "actors": rows }),
    ))
}

/// `GET /debug/actors/{kind}/{uuid}`: one actor: its record, its queues, running and
/// pending operations, recent results, restarts, and what holds its queues.
pub async fn actor(
    State(mn): Shared,
    Path((kind, uuid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let uuid = crate::types::uuid_param(&uuid, "uuid")?;
    let snapshot = mn.runtime.inspect(&kind, uuid).await.map_err(|_| {
        ApiError::invalid(
            "kind",
            format!(
                "`{kind}` is not an actor kind; use one of {}",
                mn.runtime.kind_names().join(", ")
            ),
        )
    })?;
    let record = match resource_kind(&kind) {
        Some(resources) => StoreSource::new(&mn.db)
            .find(resources, "#uuid", &uuid.to_string(), FieldType::Uuid)?
            .into_iter()
            .next(),
        None => None,
    };
    if snapshot.is_none() && record.is_none() {
        return Err(ApiError::not_found(&kind, uuid));
    }
    // What blocks this resource: per queue, what runs (holding its slots) and what waits.
    let blocking: Vec<Value> = snapshot
        .as_ref()
        .map(|s| {
            s.queues
                .iter()
                .filter(|q| q.running > 0 || q.pending > 0)
                .map(|q| {
                    json!({
                        "queue": q.name,
                        "level": q.level,
                        "holding": s.running.iter().filter(|o| o.queue == q.name).collect::<Vec<_>>(),
                        "waiting": s.pending.iter().filter(|o| o.queue == q.name).collect::<Vec<_>>(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(json!({
        "kind": kind,
        "uuid": uuid,
        "status": status_name(snapshot.as_ref().map(|s| s.status)),
        "record": record,
        "actor": snapshot,
        "blocking": blocking,
    })))
}

/// `GET /debug/flows`: flows in progress and recent ones (rolled back ones with the failing
/// step and error).
pub async fn flows(State(mn): Shared) -> Result<Json<Value>, ApiError> {
    let in_progress = mn.runtime.flows().in_progress().map_err(internal)?;
    let recent = mn.runtime.flows().recent();
    Ok(Json(json!({ "inProgress": in_progress, "recent": recent })))
}

/// `GET /debug/gc`: the GC's jobs (trigger, attempts, next run, last error).
pub async fn gc(State(mn): Shared) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "jobs": mn.runtime.gc().list().map_err(internal)? })))
}

/// `GET /debug/hosts`: each host's link (status, round-trip time, last heartbeat, connects).
pub async fn hosts(State(mn): Shared) -> Result<Json<Value>, ApiError> {
    let directory = mn.hosts.entity().directory();
    let links: Vec<Value> = mn
        .hosts
        .entity()
        .link_stats()
        .into_iter()
        .map(|link| {
            let summary = directory.iter().find(|h| h.uuid == link.host);
            json!({
                "host": link.host,
                "status": summary.map(|h| h.status.as_str()),
                "connected": link.connected,
                "rttUs": link.rtt_us,
                "lastHeartbeatUnixMs": link.last_heartbeat_unix_ms,
                "connects": link.connects,
                "reconnects": link.connects.saturating_sub(1),
            })
        })
        .collect();
    Ok(Json(json!({ "hosts": links })))
}

/// `GET /debug/summary`: what the console's live view shows, in one read.
pub async fn summary(mn: &Mn) -> Result<Value, ApiError> {
    let kinds: Vec<Value> = mn
        .runtime
        .kinds()
        .into_iter()
        .map(|k| json!({ "kind": k.kind, "live": k.counters.live, "queues": k.queues }))
        .collect();
    let flows = mn.runtime.flows().in_progress().map_err(internal)?;
    let gc = mn.runtime.gc().list().map_err(internal)?;
    Ok(json!({
        "takenUnixMs": strato_runtime::unix_ms_now(),
        "kinds": kinds,
        "flowsInProgress": flows,
        "recentFlows": mn.runtime.flows().recent(),
        "gcJobs": gc,
        "hosts": mn.hosts.entity().link_stats(),
    }))
}

/// `GET /debug/events`: the summary, pushed every second (server-sent events).
pub async fn events(
    State(mn): Shared,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold(mn, |mn| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let data = match summary(&mn).await {
            Ok(summary) => summary.to_string(),
            Err(error) => error.body().to_string(),
        };
        Some((Ok(Event::default().event("summary").data(data)), mn))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct QueueLevel {
    kind: String,
    queue: String,
    level: usize,
    /// One actor only (none: every actor of the kind).
    uuid: Option<Uuid>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ActorRef {
    kind: String,
    uuid: Uuid,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GcRef {
    id: Uuid,
}

fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid("body", format!("{e}")))
}

fn audit(action: &str, args: &Value) {
    let by = crate::auth::caller().map(|c| c.account);
    tracing::warn!(target: "audit", ?by, action, %args, "operator action");
}

/// A refused level change as a 400 naming the field at fault: `level` for a serial queue,
/// `otherwise` (the kind or the queue named) for the rest.
fn level_refused(error: strato_runtime::RuntimeError, otherwise: &str) -> ApiError {
    let field = match error {
        strato_runtime::RuntimeError::SerialQueue { .. } => "level",
        _ => otherwise,
    };
    ApiError::invalid(field, error.to_string())
}

/// `POST /debug/actions/{action}`: `queue-level`, `restart`, `gc-run`, `gc-cancel`.
pub async fn action(
    State(mn): Shared,
    Path(action): Path<String>,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    let args: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let result = match action.as_str() {
        "queue-level" => {
            let q: QueueLevel = body(&bytes)?;
            if q.level == 0 {
                return Err(ApiError::invalid(
                    "level",
                    "a queue runs at least one operation at a time",
                ));
            }
            match q.uuid {
                Some(uuid) => {
                    let set = mn
                        .runtime
                        .set_actor_queue_level(&q.kind, uuid, &q.queue, Some(q.level))
                        .await
                        .map_err(|e| level_refused(e, "kind"))?;
                    if !set {
                        return Err(ApiError::not_found(
                            &format!("live {} actor with queue {}", q.kind, q.queue),
                            uuid,
                        ));
                    }
                }
                None => mn
                    .runtime
                    .set_queue_level(&q.kind, &q.queue, q.level)
                    .map_err(|e| level_refused(e, "queue"))?,
            }
            json!({ "kind": q.kind, "queue": q.queue, "level": q.level, "uuid": q.uuid })
        }
        "restart" => {
            let a: ActorRef = body(&bytes)?;
            mn.runtime
                .restart(&a.kind, a.uuid)
                .await
                .map_err(|e| ApiError::invalid("uuid", e.to_string()))?;
            json!({ "kind": a.kind, "uuid": a.uuid, "restarted": true })
        }
        "gc-run" => {
            let g: GcRef = body(&bytes)?;
            let result = mn
                .runtime
                .gc()
                .run_now(g.id)
                .await
                .map_err(|e| ApiError::invalid("id", e.to_string()))?;
            json!({ "id": g.id, "result": format!("{result:?}") })
        }
        "gc-cancel" => {
            let g: GcRef = body(&bytes)?;
            let existed = mn.runtime.gc().cancel(g.id).await.map_err(internal)?;
            if !existed {
                return Err(ApiError::not_found("gc-job", g.id));
            }
            json!({ "id": g.id, "cancelled": true })
        }
        other => {
            return Err(ApiError::invalid(
                "action",
                format!("`{other}` is not queue-level, restart, gc-run or gc-cancel"),
            ));
        }
    };
    audit(&action, &args);
    Ok(Json(json!({ "done": result })))
}
