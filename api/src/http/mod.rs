//! The HTTP API in ZStack's v1 shape.
//!
//! Creations take `{"params": {...}, "systemTags": [], "userTags": []}`; actions take
//! `{"<actionName>": {...}}`; reads answer `{"inventories": [...]}`. Every mutation answers
//! `202` with `{"location": ".../v1/api-jobs/{uuid}"}` and a `Location` header; the job's
//! URL answers `202` while it runs and `200` with `{"inventory": ...}` or `{"error": ...}`.
//! Input is checked before a job is accepted: a malformed body is a `400` naming the field,
//! an unknown UUID a `404`, an operation the VM's state refuses a `409`; nothing changes.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use strato_actors::cascade::{CascadeError, DeleteMode, Resource};
use strato_actors::host;
use strato_actors::ipam::IpRange;
use strato_actors::kinds::Kind;
use strato_actors::records::{
    BackupStorageRecord, ClusterRecord, HostRecord, HostState, HostStatus, ImageRecord,
    InstanceOfferingRecord, L2NetworkRecord, L3NetworkRecord, PrimaryStorageRecord, VmRecord,
    ZoneRecord,
};
use strato_actors::vm::create::{self, CreateVm};
use strato_actors::vm::ops::{self, Lifecycle};
use strato_actors::vm::state;
use strato_storage::{Batch, Expect, Record};
use uuid::Uuid;

use crate::auth;
use crate::error::ApiError;
use crate::jobs::{self, JobRecord, JobState};
use crate::mn::Mn;
use crate::query;
use crate::store_source::{StoreSource, inventory};
use crate::tagging::{self, CreationTags};

type Shared = State<Arc<Mn>>;

/// How long a VM operation may wait for its turn and run.
const OP_TIMEOUT: Duration = Duration::from_secs(300);

/// The API's routes.
pub fn router(mn: Arc<Mn>) -> Router {
    use crate::debug;
    crate::catalog::router()
        .route("/debug/tree", get(debug::tree))
        .route("/debug/actors", get(debug::actors))
        .route("/debug/actors/{kind}/{uuid}", get(debug::actor))
        .route("/debug/flows", get(debug::flows))
        .route("/debug/gc", get(debug::gc))
        .route("/debug/hosts", get(debug::hosts))
        .route(
            "/debug/summary",
            get(|State(mn): Shared| async move { debug::summary(&mn).await.map(Json) }),
        )
        .route("/debug/events", get(debug::events))
        .route("/debug/actions/{action}", axum::routing::post(debug::action))
        .route("/metrics", get(crate::metrics::scrape))
        // Route layers run after routing, so all see the route's template; the last added
        // runs first: metrics count what authentication refuses too, and a tenant's answers
        // are redacted inside authentication's scope, where the caller is known.
        .route_layer(axum::middleware::from_fn(crate::exposure::redact_for_tenants))
        .route_layer(axum::middleware::from_fn_with_state(mn.clone(), auth::authenticate))
        .route_layer(axum::middleware::from_fn(crate::metrics::track))
        .route("/v1/openapi.json", get(|| async { Json(crate::openapi::document()) }))
        .route("/console", get(crate::console::page))
        .route("/console/console.js", get(crate::console::script))
        .route("/console/console.css", get(crate::console::style))
        .route("/console/login", axum::routing::post(crate::console::log_in))
        .with_state(mn)
}

/// A request's envelope: its parameters, and a creation's tags (read by [`creation`]).
/// Any other key is refused, as a misspelt one would otherwise be ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Create {
    params: Value,
    #[serde(default, rename = "systemTags")]
    _system_tags: Value,
    #[serde(default, rename = "userTags")]
    _user_tags: Value,
}

/// The request body as JSON, or a 400 that says why not.
pub(crate) fn json_body(bytes: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid JSON: {e}")))
}

/// Parses a JSON value, naming the field at fault by its JSON path inside `value`
/// (`cpuNum`, `l3NetworkUuids[1]`, `quota.vmNum`): where serde stopped, and for a missing
/// key, that key under it.
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
/// resource of `resource_type`.
fn creation<T: DeserializeOwned>(
    body: &Bytes,
    resource_type: &str,
) -> Result<(T, Value, CreationTags), ApiError> {
    let body = json_body(body)?;
    let tags = CreationTags::of(&body, resource_type)?;
    let (params, raw) = params(body)?;
    Ok((params, raw, tags))
}

pub(crate) fn params<T: DeserializeOwned>(body: Value) -> Result<(T, Value), ApiError> {
    let envelope: Create = parse(body, "request body")?;
    let params = envelope.params.clone();
    Ok((parse(envelope.params, "params")?, params))
}

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
fn get_record<R: Record>(mn: &Mn, uuid: Uuid) -> Result<R, ApiError> {
    mn.db.get::<R>(uuid)?.map(|s| s.record).ok_or_else(|| ApiError::no::<R>(uuid))
}

/// Parses a UUID the way every route and the access check do: only the canonical spelling
/// (36 lowercase hexadecimal digits and hyphens, as the API writes UUIDs) is accepted, so
/// one resource has one name and access is decided on the value the handler uses. Braces,
/// `urn:uuid:`, upper case, the simple form and anything else are a 400 naming `field`.
pub(crate) fn uuid_param(text: &str, field: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text)
        .ok()
        .filter(|uuid| uuid.hyphenated().encode_lower(&mut Uuid::encode_buffer()) == text)
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!(
                    "`{}` is not a UUID in its canonical form (like 3f1c1e0e-8d5b-4c4a-9f6e-0a2b3c4d5e6f)",
                    crate::validate::printable(text)
                ),
            )
        })
}

/// A route's one path UUID, parsed by [`uuid_param`] and named after the route's parameter.
/// The access check in [`auth::authenticate`] parses the same decoded parameter with the same
/// function, so both decide on one value.
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
            _ => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "SYS.INTERNAL",
                "this route declares more than one path parameter",
                Value::Null,
            )),
        }
    }
}

/// Writes new record `record` with the tags of its creation, in one atomic write.
async fn write<R: Record>(mn: &Mn, record: &R, tags: &CreationTags) -> Result<(), ApiError> {
    let mut batch = Batch::new();
    batch.put(record, Expect::Absent)?;
    if let Some(resource_type) = tagging::resource_type_of_table(R::KIND) {
        tags.write(&mut batch, record.id(), resource_type)?;
    }
    mn.db.commit(batch).await?;
    Ok(())
}

/// Accepts a job that writes the new record `make` builds, answering with its inventory.
async fn submit_record<R: Record>(
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
            inventory(&record)
        })
        .await?;
    Ok(accepted(mn, job))
}

/// Accepts a job that adds `parent` to the list `list` picks in the record `target` (an
/// attachment: storage to a zone or cluster, an L2 network to a cluster).
async fn attach<R: Record>(
    mn: &Arc<Mn>,
    headers: &HeaderMap,
    api: &str,
    target: Uuid,
    parent: Uuid,
    list: fn(&mut R) -> &mut Vec<Uuid>,
) -> Result<Response, ApiError> {
    let m = mn.clone();
    let body = json!({ "target": target, "parent": parent });
    let job = mn
        .jobs
        .submit(job_header(headers)?, api, &body, move |_| async move {
            // A compare-and-swap, retried: two attachments at once both land, and an attachment
            // never brings back a record deleted meanwhile.
            let record =
                m.db.update::<R>(target, |record| {
                    if !list(record).contains(&parent) {
                        list(record).push(parent);
                    }
                })
                .await?
                .ok_or_else(|| ApiError::no::<R>(target))?;
            inventory(&record)
        })
        .await?;
    Ok(accepted(mn, job))
}

/// `GET /v1/<kind>`: every inventory of the kind, or those a query selects.
pub(crate) fn list(kind: &'static str) -> axum::routing::MethodRouter<Arc<Mn>> {
    get(move |State(mn): Shared, Query(pairs): Query<Vec<(String, String)>>| async move {
        let schema = query::schema(kind).expect("every listed kind is declared");
        let query = query::Query::parse(schema, &pairs)?;
        if auth::tenant().is_some() {
            for (option, path) in query.named_paths() {
                crate::exposure::refuse_hidden(option, &path)?;
            }
        }
        let store = StoreSource::new(&mn.db);
        let tenant_view;
        let source: &dyn query::Source = match auth::tenant() {
            Some(tenant) => {
                tenant_view = auth::TenantSource { inner: store, db: &mn.db, tenant };
                &tenant_view
            }
            None => &store,
        };
        let mut catalog = query::Catalog::new(source);
        Ok::<_, ApiError>(Json(query.run(schema, &mut catalog)?))
    })
}

/// `GET /v1/<kind>/{uuid}`: one resource of `kind`.
pub(crate) fn one(kind: &'static Kind) -> axum::routing::MethodRouter<Arc<Mn>> {
    get(move |State(mn): Shared, Id(uuid): Id| async move {
        let inventory = kind
            .table
            .inventory(&mn.db, uuid)?
            .ok_or_else(|| ApiError::not_found(kind.api, uuid))?;
        Ok::<_, ApiError>(Json(json!({ "inventories": [inventory] })))
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ZoneParams {
    name: String,
    description: Option<String>,
}

pub(crate) async fn create_zone(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (ZoneParams, _, _) = creation(&body, "ZoneVO")?;
    crate::validate::name("name", &p.name)?;
    if let Some(description) = &p.description {
        crate::validate::text("description", description, crate::validate::MAX_DESCRIPTION_CHARS)?;
    }
    submit_record(&mn, &headers, "CreateZone", &raw, tags, move || {
        Ok(ZoneRecord { uuid: Uuid::new_v4(), name: p.name, description: p.description })
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ClusterParams {
    name: String,
    zone_uuid: Uuid,
    #[serde(default = "kvm")]
    hypervisor_type: String,
}

fn kvm() -> String {
    "KVM".into()
}

pub(crate) async fn create_cluster(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (ClusterParams, _, _) = creation(&body, "ClusterVO")?;
    crate::validate::name("name", &p.name)?;
    get_record::<ZoneRecord>(&mn, p.zone_uuid)?;
    if p.hypervisor_type != "KVM" {
        return Err(ApiError::invalid("hypervisorType", "only KVM clusters are supported"));
    }
    submit_record(&mn, &headers, "CreateCluster", &raw, tags, move || {
        Ok(ClusterRecord {
            uuid: Uuid::new_v4(),
            name: p.name,
            zone_uuid: p.zone_uuid,
            hypervisor_type: p.hypervisor_type,
        })
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct HostParams {
    name: String,
    management_ip: String,
    #[serde(default = "agent_port")]
    agent_port: u16,
    cluster_uuid: Uuid,
}

fn agent_port() -> u16 {
    7070
}

pub(crate) async fn add_host(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (HostParams, _, _) = creation(&body, "HostVO")?;
    crate::validate::name("name", &p.name)?;
    if p.management_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(ApiError::invalid(
            "managementIp",
            format!("`{}` is not an IP address", p.management_ip),
        ));
    }
    get_record::<ClusterRecord>(&mn, p.cluster_uuid)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "AddKVMHost", &raw, move |_| async move {
            let record = HostRecord {
                uuid: Uuid::new_v4(),
                name: p.name,
                cluster_uuid: p.cluster_uuid,
                management_ip: p.management_ip,
                agent_port: p.agent_port,
                state: HostState::Enabled,
                status: HostStatus::Connecting,
                facts: None,
                last_error: None,
                strangers: vec![],
                reservations: Default::default(),
            };
            // The memory a reservedMemory tag keeps is kept before the host takes any VM.
            if let Some(memory) = tags.reserved_memory() {
                m.hosts.entity().keep_for_host(record.uuid, memory);
            }
            write(&m, &record, &tags).await?;
            if let Err(error) = host::connect(&m.hosts, record.uuid).await {
                // As in ZStack: a host that cannot be reached on adding is not added.
                let _ = m.hosts.restart(record.uuid).await;
                let mut batch = Batch::new();
                batch.delete::<HostRecord>(record.uuid, Expect::Any);
                strato_actors::records::delete_refs(&m.db, &mut batch, record.uuid)?;
                m.db.commit(batch).await?;
                return Err(error.into());
            }
            inventory(&host::record(&m.hosts, record.uuid).await?)
        })
        .await?;
    Ok(accepted(&mn, job))
}

pub(crate) async fn host_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    get_record::<HostRecord>(&mn, uuid)?;
    let body = json_body(&body)?;
    let (name, args) = single_action(&body)?;
    let m = mn.clone();
    let job = match name.as_str() {
        "reconnectHost" => {
            mn.jobs
                .submit(job_header(&headers)?, "ReconnectHost", &body, move |_| async move {
                    host::reconnect(&m.hosts, uuid).await?;
                    inventory(&host::record(&m.hosts, uuid).await?)
                })
                .await?
        }
        "changeHostState" => {
            let event = args.get("stateEvent").and_then(Value::as_str).unwrap_or_default();
            let state = match event {
                "enable" => HostState::Enabled,
                "disable" => HostState::Disabled,
                "maintain" => HostState::Maintenance,
                other => {
                    return Err(ApiError::invalid(
                        "stateEvent",
                        format!("`{other}` is not one of enable, disable, maintain"),
                    ));
                }
            };
            mn.jobs
                .submit(job_header(&headers)?, "ChangeHostState", &body, move |_| async move {
                    if state == HostState::Maintenance {
                        let (record, report) =
                            strato_actors::maintenance::maintain(&m.db, &m.hosts, &m.vms, uuid)
                                .await?;
                        let mut inventory = inventory(&record)?;
                        inventory["maintenance"] =
                            serde_json::to_value(&report).map_err(|e| ApiError::internal(&e))?;
                        return Ok(inventory);
                    }
                    inventory(&host::set_state(&m.hosts, uuid, state).await?)
                })
                .await?
        }
        other => {
            return Err(ApiError::invalid("action", format!("`{other}` is not a host action")));
        }
    };
    Ok(accepted(&mn, job))
}

/// The arguments each action takes; any other key in its object is refused (a misspelt
/// `hostUuid` would otherwise start the VM wherever the allocator likes).
const ACTION_ARGUMENTS: &[(&str, &[&str])] = &[
    ("startVmInstance", &["hostUuid"]),
    ("migrateVm", &["hostUuid"]),
    ("changeInstanceOffering", &["instanceOfferingUuid"]),
    ("changeHostState", &["stateEvent"]),
    ("updateQuota", &["vmNum", "cpuNum", "memorySize"]),
    ("updateAccount", &["password", "oldPassword"]),
    ("cancelApiJob", &[]),
];

pub(crate) fn single_action(body: &Value) -> Result<(String, Value), ApiError> {
    match body.as_object() {
        Some(map) if map.len() == 1 => {
            let (name, args) = map.iter().next().expect("one entry");
            let allowed = ACTION_ARGUMENTS
                .iter()
                .find(|(action, _)| action == name)
                .map_or(&[][..], |(_, allowed)| *allowed);
            match args {
                Value::Null => {}
                Value::Object(args) => {
                    if let Some(key) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
                        return Err(ApiError::invalid(
                            &format!("{name}.{key}"),
                            format!("`{name}` takes no `{key}`; it takes: {}", allowed.join(", ")),
                        ));
                    }
                }
                _ => {
                    return Err(ApiError::invalid(name, format!("`{name}` takes an object")));
                }
            }
            Ok((name.clone(), args.clone()))
        }
        _ => Err(ApiError::invalid(
            "action",
            "the body must be one action, such as {\"startVmInstance\": {}}",
        )),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct OfferingParams {
    name: String,
    cpu_num: u32,
    memory_size: u64,
}

/// The most virtual CPUs an offering gives (KVM's limit per guest).
const MAX_CPU_NUM: u32 = 4096;
/// The least memory an offering gives.
const MIN_MEMORY_SIZE: u64 = 16 << 20;
/// The most memory an offering gives (64 TiB: more than any host has, far from overflow).
const MAX_MEMORY_SIZE: u64 = 64 << 40;

pub(crate) async fn create_offering(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (OfferingParams, _, _) = creation(&body, "InstanceOfferingVO")?;
    crate::validate::name("name", &p.name)?;
    if !(1..=MAX_CPU_NUM).contains(&p.cpu_num) {
        return Err(ApiError::invalid(
            "cpuNum",
            format!("`cpuNum` is from 1 to {MAX_CPU_NUM} (KVM's limit of virtual CPUs)"),
        ));
    }
    if !(MIN_MEMORY_SIZE..=MAX_MEMORY_SIZE).contains(&p.memory_size) {
        return Err(ApiError::invalid(
            "memorySize",
            format!("`memorySize` is in bytes, from 16 MiB to {} TiB", MAX_MEMORY_SIZE >> 40),
        ));
    }
    submit_record(&mn, &headers, "CreateInstanceOffering", &raw, tags, move || {
        Ok(InstanceOfferingRecord {
            uuid: Uuid::new_v4(),
            name: p.name,
            cpu_num: p.cpu_num,
            memory_size: p.memory_size,
        })
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct L3Params {
    name: String,
    l2_network_uuid: Option<Uuid>,
    #[serde(default)]
    dns: Vec<String>,
    bridge: Option<String>,
}

pub(crate) async fn create_l3(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (L3Params, _, _) = creation(&body, "L3NetworkVO")?;
    crate::validate::name("name", &p.name)?;
    if let Some(l2) = p.l2_network_uuid {
        get_record::<L2NetworkRecord>(&mn, l2)?;
    }
    submit_record(&mn, &headers, "CreateL3Network", &raw, tags, move || {
        Ok(L3NetworkRecord {
            uuid: Uuid::new_v4(),
            name: p.name,
            l2_network_uuid: p.l2_network_uuid,
            ip_ranges: vec![],
            dns: p.dns,
            bridge: p.bridge,
        })
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RangeParams {
    #[schema(value_type = String, format = Ipv4)]
    start_ip: Ipv4Addr,
    #[schema(value_type = String, format = Ipv4)]
    end_ip: Ipv4Addr,
    #[schema(value_type = String, format = Ipv4)]
    netmask: Ipv4Addr,
    #[schema(value_type = String, format = Ipv4)]
    gateway: Ipv4Addr,
    #[allow(dead_code)]
    name: Option<String>,
}

pub(crate) async fn add_ip_range(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let l3: L3NetworkRecord = get_record(&mn, uuid)?;
    let (p, raw): (RangeParams, _) = params(json_body(&body)?)?;
    let range = IpRange::new(p.start_ip, p.end_ip, p.netmask, p.gateway)
        .map_err(|e| ApiError::from(strato_actors::l3::L3Error::Ipam(e)))?;
    strato_actors::ipam::check_no_overlap(&l3.ip_ranges, &range)
        .map_err(|e| ApiError::from(strato_actors::l3::L3Error::Ipam(e)))?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "AddIpRange", &raw, move |_| async move {
            inventory(&strato_actors::l3::add_ip_range(&m.l3s, uuid, range).await?)
        })
        .await?;
    Ok(accepted(&mn, job))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct VmParams {
    name: String,
    instance_offering_uuid: Uuid,
    l3_network_uuids: Vec<Uuid>,
    host_uuid: Option<Uuid>,
    cluster_uuid: Option<Uuid>,
    image_uuid: Option<Uuid>,
}

pub(crate) async fn create_vm(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (VmParams, _, _) = creation(&body, "VmInstanceVO")?;
    crate::validate::name("name", &p.name)?;
    let offering: InstanceOfferingRecord = get_record(&mn, p.instance_offering_uuid)?;
    auth::may_use(&mn.db, "instance-offerings", p.instance_offering_uuid)?;
    if p.l3_network_uuids.is_empty() {
        return Err(ApiError::invalid("l3NetworkUuids", "a VM needs at least one L3 network"));
    }
    for l3 in &p.l3_network_uuids {
        get_record::<L3NetworkRecord>(&mn, *l3)?;
        auth::may_use(&mn.db, "l3-networks", *l3)?;
    }
    if let Some(host) = p.host_uuid {
        auth::admin_only("placing a VM on a chosen host")?;
        get_record::<HostRecord>(&mn, host)?;
    }
    if let Some(image) = p.image_uuid {
        auth::may_use(&mn.db, "images", image)?;
        let image: ImageRecord = get_record(&mn, image)?;
        if image.status != "Ready" {
            return Err(ApiError::invalid(
                "imageUuid",
                format!("image {} is {}, not Ready", image.uuid, image.status),
            ));
        }
    }
    if let Some(cluster) = p.cluster_uuid {
        auth::admin_only("placing a VM in a chosen cluster")?;
        get_record::<ClusterRecord>(&mn, cluster)?;
    }
    let static_ips = tagging::check_static_ips(&mn, &tags.system_tags, &p.l3_network_uuids)?;
    let m = mn.clone();
    let vm = Uuid::new_v4();
    let charge = strato_actors::owners::Charge {
        vm_num: 1,
        cpu_num: u64::from(offering.cpu_num),
        memory_size: offering.memory_size,
    };
    // A tenant's quota is checked, and the new VM's charge written with its job, under the
    // account's lock: two creations at once cannot both fit in the last slot.
    let quota_lock = auth::tenant().map(|tenant| (tenant, mn.quota_locks.of(tenant)));
    let _quota_guard = match &quota_lock {
        Some((tenant, lock)) => {
            let guard = lock.lock().await;
            auth::check_quota(&mn.db, *tenant, charge)?;
            Some(guard)
        }
        None => None,
    };
    let owner = auth::owner_for(vm, "VmInstanceVO", charge);
    let job = mn
        .jobs
        .submit_for(
            job_header(&headers)?,
            "CreateVmInstance",
            &raw,
            Some(vm),
            owner,
            move |job| async move {
                let request = CreateVm {
                    vm,
                    name: p.name,
                    cpu_num: offering.cpu_num,
                    memory_size: offering.memory_size,
                    l3_networks: p.l3_network_uuids,
                    clusters: p.cluster_uuid.map(|c| vec![c]),
                    pinned_host: p.host_uuid,
                    host: None,
                    nics: vec![],
                    image: p.image_uuid,
                    static_ips,
                    system_tags: tags.system_tags,
                    user_tags: tags.user_tags,
                    created: None,
                };
                match create::create(&m.runtime, request, Some(job)).await {
                    Ok(created) => inventory(&created),
                    Err(error) => {
                        // A creation that failed before its flow wrote anything leaves the
                        // charge; a rolled-back flow took it with the record.
                        if m.db.get::<VmRecord>(vm)?.is_none() {
                            let mut batch = Batch::new();
                            batch.delete::<strato_actors::owners::OwnerRecord>(vm, Expect::Any);
                            m.db.commit(batch).await?;
                        }
                        Err(error.into())
                    }
                }
            },
        )
        .await?;
    Ok(accepted(&mn, job))
}

fn lifecycle(action: &str) -> Option<(Lifecycle, &'static str)> {
    Some(match action {
        "startVmInstance" => (Lifecycle::Start, "StartVmInstance"),
        "stopVmInstance" => (Lifecycle::Stop, "StopVmInstance"),
        "rebootVmInstance" => (Lifecycle::Reboot, "RebootVmInstance"),
        "pauseVmInstance" => (Lifecycle::Pause, "PauseVmInstance"),
        "resumeVmInstance" => (Lifecycle::Resume, "ResumeVmInstance"),
        "recoverVmInstance" => (Lifecycle::Recover, "RecoverVmInstance"),
        "expungeVmInstance" => (Lifecycle::Expunge, "ExpungeVmInstance"),
        _ => return None,
    })
}

/// Checks now what the VM actor will check again: a refused operation is a 409 at once.
fn precheck(mn: &Mn, uuid: Uuid, op: Lifecycle) -> Result<(), ApiError> {
    precheck_op(mn, uuid, op.op())
}

fn precheck_op(mn: &Mn, uuid: Uuid, op: state::VmOp) -> Result<(), ApiError> {
    let vm: VmRecord = get_record(mn, uuid)?;
    state::plan(vm.state, op)
        .map_err(|e| ApiError::from(strato_actors::vm::VmError::InvalidState(e)))?;
    Ok(())
}

async fn run_lifecycle(
    mn: Arc<Mn>,
    headers: &HeaderMap,
    uuid: Uuid,
    op: Lifecycle,
    api: &str,
    body: &Value,
) -> Result<Response, ApiError> {
    precheck(&mn, uuid, op)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(headers)?, api, body, move |job| async move {
            let record = ops::operate(&m.vms, uuid, op, OP_TIMEOUT, Some(job)).await?;
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}

pub(crate) async fn vm_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let (name, args) = single_action(&body)?;
    let mut keyed = body.clone();
    keyed["uuid"] = json!(uuid);
    match name.as_str() {
        // Starting on a given host other than the VM's own is a cold migration, then a start.
        "startVmInstance" if args.get("hostUuid").is_some_and(|h| !h.is_null()) => {
            auth::admin_only("starting a VM on a chosen host")?;
            let text = args["hostUuid"].as_str().unwrap_or_default();
            let target = uuid_param(text, "hostUuid")?;
            get_record::<HostRecord>(&mn, target)?;
            let vm: VmRecord = get_record(&mn, uuid)?;
            precheck_op(&mn, uuid, state::VmOp::Start)?;
            let m = mn.clone();
            let job = mn
                .jobs
                .submit(job_header(&headers)?, "StartVmInstance", &keyed, move |job| async move {
                    if vm.host_uuid != Some(target) {
                        ops::migrate(&m.vms, uuid, Some(target), OP_TIMEOUT, Some(job)).await?;
                    }
                    inventory(
                        &ops::operate(&m.vms, uuid, Lifecycle::Start, OP_TIMEOUT, Some(job))
                            .await?,
                    )
                })
                .await?;
            return Ok(accepted(&mn, job));
        }
        "migrateVm" => {
            auth::admin_only("migrating a VM")?;
            let target = match args.get("hostUuid").and_then(Value::as_str) {
                Some(text) => Some(uuid_param(text, "hostUuid")?),
                None => None,
            };
            if let Some(host) = target {
                get_record::<HostRecord>(&mn, host)?;
            }
            precheck_op(&mn, uuid, state::VmOp::Migrate)?;
            let m = mn.clone();
            let job = mn
                .jobs
                .submit(job_header(&headers)?, "MigrateVm", &keyed, move |job| async move {
                    inventory(&ops::migrate(&m.vms, uuid, target, OP_TIMEOUT, Some(job)).await?)
                })
                .await?;
            return Ok(accepted(&mn, job));
        }
        "changeInstanceOffering" => {
            let text =
                args.get("instanceOfferingUuid").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid("instanceOfferingUuid", "`instanceOfferingUuid` is required")
                })?;
            let offering_uuid = uuid_param(text, "instanceOfferingUuid")?;
            let offering: InstanceOfferingRecord = get_record(&mn, offering_uuid)?;
            auth::may_use(&mn.db, "instance-offerings", offering_uuid)?;
            precheck_op(&mn, uuid, state::VmOp::ChangeOffering)?;
            // A tenant's VM is charged its new size: the growth must fit the quota, and the
            // charge changes with the offering (under the account's lock, as creations).
            let account = mn
                .db
                .get::<strato_actors::owners::OwnerRecord>(uuid)?
                .map(|s| s.record.account_uuid);
            let quota_lock = account.map(|a| mn.quota_locks.of(a));
            let (_quota_guard, charged) = match &quota_lock {
                Some(lock) => {
                    let guard = lock.lock().await;
                    // Read again under the lock: the charge another change made is the one
                    // this one grows from.
                    let owner = mn
                        .db
                        .get::<strato_actors::owners::OwnerRecord>(uuid)?
                        .ok_or_else(|| ApiError::no::<VmRecord>(uuid))?;
                    let grown = strato_actors::owners::Charge {
                        vm_num: 0,
                        cpu_num: u64::from(offering.cpu_num)
                            .saturating_sub(owner.record.charge.cpu_num),
                        memory_size: offering
                            .memory_size
                            .saturating_sub(owner.record.charge.memory_size),
                    };
                    auth::check_quota(&mn.db, owner.record.account_uuid, grown)?;
                    let mut recharged = owner.record.clone();
                    recharged.charge.cpu_num = u64::from(offering.cpu_num);
                    recharged.charge.memory_size = offering.memory_size;
                    let mut batch = Batch::new();
                    batch.put(&recharged, Expect::Generation(owner.generation))?;
                    // Only a delete of the VM writes its owner record without the lock.
                    let written = mn.db.commit(batch).await.map_err(|e| match e {
                        strato_storage::StoreError::Conflict { .. } => {
                            ApiError::no::<VmRecord>(uuid)
                        }
                        e => e.into(),
                    })?;
                    let generation = written[0].generation.unwrap_or(owner.generation);
                    (Some(guard), Some((owner.record, generation)))
                }
                None => (None, None),
            };
            let m = mn.clone();
            let job = mn
                .jobs
                .submit(
                    job_header(&headers)?,
                    "ChangeInstanceOffering",
                    &keyed,
                    move |job| async move {
                        let (cpu, memory) = (offering.cpu_num, offering.memory_size);
                        match ops::change_offering(&m.vms, uuid, cpu, memory, OP_TIMEOUT, Some(job))
                            .await
                        {
                            Ok(vm) => inventory(&vm),
                            Err(error) => {
                                // The VM kept its size: so does its charge, if it is still the one
                                // this change wrote (a VM deleted meanwhile is charged nothing).
                                if let Some((previous, generation)) = charged {
                                    let lock = m.quota_locks.of(previous.account_uuid);
                                    let _guard = lock.lock().await;
                                    let mut batch = Batch::new();
                                    batch.put(&previous, Expect::Generation(generation))?;
                                    match m.db.commit(batch).await {
                                        Ok(_)
                                        | Err(strato_storage::StoreError::Conflict { .. }) => {}
                                        Err(e) => return Err(e.into()),
                                    }
                                }
                                Err(error.into())
                            }
                        }
                    },
                )
                .await?;
            return Ok(accepted(&mn, job));
        }
        _ => {}
    }
    let Some((op, api)) = lifecycle(&name) else {
        return Err(ApiError::invalid(
            "action",
            format!("`{name}` is not a VM action this node offers"),
        ));
    };
    run_lifecycle(mn, &headers, uuid, op, api, &keyed).await
}

pub(crate) async fn destroy_vm(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run_lifecycle(
        mn,
        &headers,
        uuid,
        Lifecycle::Destroy,
        "DestroyVmInstance",
        &json!({ "uuid": uuid }),
    )
    .await
}

/// `GET /v1/api-jobs/{uuid}`'s query: `waitSeconds` holds the answer until the job ends or
/// that many seconds pass (at most [`jobs::MAX_WAIT`]).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobQuery {
    wait_seconds: Option<String>,
}

fn job_wait(query: &JobQuery) -> Result<Duration, ApiError> {
    let Some(text) = &query.wait_seconds else { return Ok(Duration::ZERO) };
    let max = jobs::MAX_WAIT.as_secs();
    match text.parse::<u64>() {
        Ok(seconds) if seconds <= max => Ok(Duration::from_secs(seconds)),
        _ => Err(ApiError::invalid(
            "waitSeconds",
            format!("`{text}` is not a whole number of seconds from 0 to {max}"),
        )),
    }
}

pub(crate) async fn job(
    State(mn): Shared,
    Id(uuid): Id,
    Query(query): Query<JobQuery>,
) -> Result<Response, ApiError> {
    let wait = job_wait(&query)?;
    let account = auth::caller().map_or(strato_actors::owners::ADMIN, |c| c.account);
    let job: JobRecord = mn
        .jobs
        .wait(account, uuid, wait)
        .await?
        .ok_or_else(|| ApiError::not_found("api-job", uuid))?;
    Ok(match job.state {
        JobState::Running => {
            (StatusCode::ACCEPTED, Json(json!({ "state": "Running" }))).into_response()
        }
        JobState::Succeeded => {
            let inventory: Value = job
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or(Value::Null);
            (StatusCode::OK, Json(json!({ "inventory": inventory }))).into_response()
        }
        JobState::Failed => {
            let error =
                job.error_body().unwrap_or_else(|| json!({ "error": { "code": "SYS.INTERNAL" } }));
            (StatusCode::OK, Json(error)).into_response()
        }
    })
}

/// `cancelApiJob` takes no arguments.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelApiJob {}

/// How long `CancelApiJob` waits for the job it cancels to end.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// `PUT /v1/api-jobs/{uuid}/actions` `{"cancelApiJob": {}}`: cancels one of the caller's
/// running jobs, when it is one that can stop cleanly (an image import). The cancel is a job
/// of its own: it succeeds once the cancelled job has ended `SYS.JOB_CANCELLED`, and fails
/// `SYS.JOB_NOT_CANCELLED` when that job finished first.
pub(crate) async fn job_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let (name, _) = single_action(&body)?;
    if name != "cancelApiJob" {
        return Err(ApiError::invalid(
            &name,
            format!("`{name}` is not a job action; use cancelApiJob"),
        ));
    }
    let account = auth::caller().map_or(strato_actors::owners::ADMIN, |c| c.account);
    let job: JobRecord =
        mn.jobs.find(account, uuid)?.ok_or_else(|| ApiError::not_found("api-job", uuid))?;
    if job.state != JobState::Running {
        return Err(ApiError::conflict(
            "SYS.JOB_NOT_RUNNING",
            format!("job {uuid} ({}) has ended; there is nothing to cancel", job.api),
        ));
    }
    let token = mn.jobs.cancel_token(account, uuid).ok_or_else(|| {
        ApiError::conflict(
            "SYS.JOB_NOT_CANCELLABLE",
            format!(
                "job {uuid} is a {} job, which cannot be cancelled; AddImage jobs can",
                job.api
            ),
        )
    })?;
    let mut keyed = body.clone();
    keyed["uuid"] = json!(uuid);
    let m = mn.clone();
    let cancel = mn
        .jobs
        .submit(job_header(&headers)?, "CancelApiJob", &keyed, move |_| async move {
            token.cancel();
            let now = m
                .jobs
                .wait(account, uuid, CANCEL_WAIT)
                .await?
                .ok_or_else(|| ApiError::not_found("api-job", uuid))?;
            let code =
                now.error_body().and_then(|e| e["error"]["code"].as_str().map(str::to_owned));
            match now.state {
                JobState::Running => Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "SYS.JOB_NOT_CANCELLED",
                    format!(
                        "job {uuid} was told to stop but still runs after {} s",
                        CANCEL_WAIT.as_secs()
                    ),
                    Value::Null,
                )),
                JobState::Failed if code.as_deref() == Some("SYS.JOB_CANCELLED") => {
                    Ok(json!({ "uuid": uuid, "api": now.api, "state": "Cancelled" }))
                }
                JobState::Succeeded | JobState::Failed => Err(ApiError::conflict(
                    "SYS.JOB_NOT_CANCELLED",
                    format!("job {uuid} ended before it could be cancelled; GET it for its result"),
                )),
            }
        })
        .await?;
    Ok(accepted(&mn, cancel))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeleteQuery {
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
pub(crate) fn delete(kind: &'static Kind) -> axum::routing::MethodRouter<Arc<Mn>> {
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
            Ok(accepted(&mn, job))
        },
    )
}

/// The garbage collector's jobs: what is left to clean up, with attempts, next run and
/// last error.
pub(crate) async fn gc_jobs(State(mn): Shared) -> Result<Json<Value>, ApiError> {
    let jobs = mn.runtime.gc().list()?;
    Ok(Json(json!({ "inventories": jobs })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct StorageParams {
    name: String,
    url: String,
    zone_uuid: Option<Uuid>,
}

fn directory_url(url: &str) -> Result<String, ApiError> {
    if !url.starts_with('/') {
        return Err(ApiError::invalid("url", format!("`{url}` is not an absolute directory path")));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

pub(crate) async fn create_backup_storage(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (StorageParams, _, _) = creation(&body, "BackupStorageVO")?;
    crate::validate::name("name", &p.name)?;
    let url = directory_url(&p.url)?;
    submit_record(&mn, &headers, "AddImageStoreBackupStorage", &raw, tags, move || {
        std::fs::create_dir_all(&url)
            .map_err(|e| ApiError::invalid("url", format!("cannot use {url}: {e}")))?;
        Ok(BackupStorageRecord {
            uuid: Uuid::new_v4(),
            name: p.name,
            url,
            r#type: "ImageStoreBackupStorage".into(),
            attached_zone_uuids: vec![],
        })
    })
    .await
}

pub(crate) async fn attach_backup_storage(
    State(mn): Shared,
    Path((zone, bs)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let zone = uuid_param(&zone, "zoneUuid")?;
    let bs = uuid_param(&bs, "backupStorageUuid")?;
    get_record::<ZoneRecord>(&mn, zone)?;
    get_record::<BackupStorageRecord>(&mn, bs)?;
    attach(&mn, &headers, "AttachBackupStorageToZone", bs, zone, |r: &mut BackupStorageRecord| {
        &mut r.attached_zone_uuids
    })
    .await
}

pub(crate) async fn create_primary_storage(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (StorageParams, _, _) = creation(&body, "PrimaryStorageVO")?;
    crate::validate::name("name", &p.name)?;
    let url = directory_url(&p.url)?;
    let zone =
        p.zone_uuid.ok_or_else(|| ApiError::invalid("zoneUuid", "`zoneUuid` is required"))?;
    get_record::<ZoneRecord>(&mn, zone)?;
    submit_record(&mn, &headers, "AddLocalPrimaryStorage", &raw, tags, move || {
        Ok(PrimaryStorageRecord {
            uuid: Uuid::new_v4(),
            name: p.name,
            url,
            zone_uuid: zone,
            r#type: "LocalStorage".into(),
            attached_cluster_uuids: vec![],
        })
    })
    .await
}

pub(crate) async fn attach_primary_storage(
    State(mn): Shared,
    Path((cluster, ps)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cluster = uuid_param(&cluster, "clusterUuid")?;
    let ps = uuid_param(&ps, "primaryStorageUuid")?;
    get_record::<ClusterRecord>(&mn, cluster)?;
    get_record::<PrimaryStorageRecord>(&mn, ps)?;
    attach(
        &mn,
        &headers,
        "AttachPrimaryStorageToCluster",
        ps,
        cluster,
        |r: &mut PrimaryStorageRecord| &mut r.attached_cluster_uuids,
    )
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ImageParams {
    name: String,
    url: String,
    #[serde(default = "qcow2")]
    format: String,
    backup_storage_uuids: Vec<Uuid>,
}

fn qcow2() -> String {
    "qcow2".into()
}

pub(crate) async fn add_image(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (ImageParams, _, _) = creation(&body, "ImageVO")?;
    crate::validate::name("name", &p.name)?;
    strato_actors::images::check(&p.url, &mn.image_policy).await.map_err(|e| match e {
        strato_actors::images::ImageError::BadUrl(reason) => ApiError::invalid("url", reason),
        e => ApiError::invalid("url", e.to_string()),
    })?;
    if p.format != "qcow2" && p.format != "raw" {
        return Err(ApiError::invalid("format", format!("`{}` is not qcow2 or raw", p.format)));
    }
    let bs_uuid = *p
        .backup_storage_uuids
        .first()
        .ok_or_else(|| ApiError::invalid("backupStorageUuids", "name one backup storage"))?;
    let bs: BackupStorageRecord = get_record(&mn, bs_uuid)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit_cancellable(job_header(&headers)?, "AddImage", &raw, move |cancel| async move {
            let uuid = Uuid::new_v4();
            let fetched = strato_actors::images::fetch(
                &p.url,
                std::path::Path::new(&bs.url),
                uuid,
                &p.format,
                &m.image_policy,
                cancel.cancelled(),
            )
            .await
            .map_err(|e| match e {
                // Refused by the policy: the caller's URL is at fault.
                strato_actors::images::ImageError::BadUrl(reason) => {
                    ApiError::invalid("url", reason)
                }
                strato_actors::images::ImageError::Cancelled => jobs::cancelled(),
                e => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "IMAGE.DOWNLOAD_FAILED",
                    "the image could not be imported from its URL",
                    json!({ "cause": e.to_string() }),
                ),
            })?;
            let image = ImageRecord {
                uuid,
                name: p.name,
                url: p.url,
                format: p.format,
                size: fetched.size,
                checksum: fetched.checksum,
                backup_storage_refs: vec![(bs.uuid, fetched.path.display().to_string())],
                status: "Ready".into(),
            };
            write(&m, &image, &tags).await?;
            inventory(&image)
        })
        .await?;
    Ok(accepted(&mn, job))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct L2Params {
    name: String,
    zone_uuid: Uuid,
    physical_interface: String,
}

pub(crate) async fn create_l2(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (L2Params, _, _) = creation(&body, "L2NetworkVO")?;
    crate::validate::name("name", &p.name)?;
    crate::validate::name("physicalInterface", &p.physical_interface)?;
    get_record::<ZoneRecord>(&mn, p.zone_uuid)?;
    submit_record(&mn, &headers, "CreateL2NoVlanNetwork", &raw, tags, move || {
        Ok(L2NetworkRecord {
            uuid: Uuid::new_v4(),
            name: p.name,
            zone_uuid: p.zone_uuid,
            physical_interface: p.physical_interface,
            r#type: "L2NoVlanNetwork".into(),
            attached_cluster_uuids: vec![],
        })
    })
    .await
}

pub(crate) async fn attach_l2(
    State(mn): Shared,
    Path((l2, cluster)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let l2 = uuid_param(&l2, "l2NetworkUuid")?;
    let cluster = uuid_param(&cluster, "clusterUuid")?;
    get_record::<L2NetworkRecord>(&mn, l2)?;
    get_record::<ClusterRecord>(&mn, cluster)?;
    attach(&mn, &headers, "AttachL2NetworkToCluster", l2, cluster, |r: &mut L2NetworkRecord| {
        &mut r.attached_cluster_uuids
    })
    .await
}
