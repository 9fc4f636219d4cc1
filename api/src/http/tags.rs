//! Tags through the API: `POST /v1/user-tags`, `POST /v1/system-tags`, `DELETE
//! /v1/tags/{uuid}`, and the `systemTags` / `userTags` of every creation's envelope.
//!
//! Everything is checked before a job is accepted: the resource exists and is of the type
//! named; a system tag matches a pattern of `strato_actors::tags` with valid tokens, is not
//! a second one where only one makes sense, and (for `staticIp`) names a network the VM is
//! on and an address in one of its ranges. A tag is written in the same atomic write as a
//! new resource, and goes with it when it is deleted.

use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{delete, post};
use serde::Deserialize;
use serde_json::Value;
use strato_actors::kinds;
use strato_actors::records::{L3NetworkRecord, VmRecord};
use strato_actors::tags::{self, SystemTag, TagKind, TagRecord, UserTag};
use strato_storage::{Batch, Expect};
use uuid::Uuid;

use super::api::{Answer, Api, Body, Method, schema};
use crate::error::ApiError;
use crate::mn::Mn;
use crate::query::{FieldType, Source, StoreSource};
use crate::types::{TagParams, inventory};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    vec![
        Api::create(
            "CreateUserTag",
            "/v1/user-tags",
            schema::<TagParams>(),
            "Tags a resource",
            || post(create_user_tag),
        ),
        Api::create(
            "CreateSystemTag",
            "/v1/system-tags",
            schema::<TagParams>(),
            "Adds a system tag (hostname, staticIp, reservedMemory)",
            || post(create_system_tag),
        ),
        Api::new(
            "DeleteTag",
            Method::Delete,
            "/v1/tags/{uuid}",
            Body::None,
            Answer::Job,
            "Deletes a user or system tag",
            || delete(delete_tag),
        ),
    ]
}

/// The resource type (`VmInstanceVO`) of the records in table `table`, when they can be
/// tagged.
pub fn resource_type_of_table(table: &str) -> Option<&'static str> {
    kinds::by_table(table).filter(|k| k.taggable).map(|k| k.vo)
}

/// The tags of a creation's envelope.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreationTags {
    /// System tags.
    #[serde(default)]
    pub system_tags: Vec<String>,
    /// User tags.
    #[serde(default)]
    pub user_tags: Vec<String>,
}

impl CreationTags {
    /// The tags of `body` (a creation's envelope), checked for a new resource of
    /// `resource_type` (the system tags against their patterns, duplicates refused).
    pub fn of(body: &Value, resource_type: &str) -> Result<Self, ApiError> {
        let tags: CreationTags = serde_json::from_value(body.clone()).map_err(|e| {
            ApiError::invalid(
                "systemTags",
                format!("systemTags and userTags are lists of text: {e}"),
            )
        })?;
        check_user_tags(&tags.user_tags, "userTags")?;
        for (at, tag) in tags.user_tags.iter().enumerate() {
            if tags.user_tags[..at].contains(tag) {
                return Err(ApiError::invalid("userTags", format!("`{tag}` is given twice")));
            }
        }
        let mut seen: Vec<(&str, Option<&str>)> = Vec::new();
        for tag in &tags.system_tags {
            let parsed = tags::parse_system_tag(tag, resource_type)
                .map_err(|e| ApiError::invalid("systemTags", e))?;
            let key = tags::slot(&parsed);
            if seen.contains(&key) {
                return Err(ApiError::invalid(
                    "systemTags",
                    format!("`{tag}`: a {resource_type} takes one {}", describe(&parsed)),
                ));
            }
            seen.push(key);
        }
        Ok(tags)
    }

    /// Adds the tags of new resource `resource` (of `resource_type`) to `batch`.
    pub fn write(
        &self,
        batch: &mut Batch,
        resource: Uuid,
        resource_type: &str,
    ) -> Result<(), strato_storage::StoreError> {
        for tag in &self.system_tags {
            batch.put(&SystemTag::new(resource, resource_type, tag), Expect::Absent)?;
        }
        for tag in &self.user_tags {
            batch.put(&UserTag::new(resource, resource_type, tag), Expect::Absent)?;
        }
        Ok(())
    }

    /// The memory a `reservedMemory` tag among these keeps for a host.
    pub fn reserved_memory(&self) -> Option<u64> {
        self.system_tags.iter().find_map(|t| {
            t.strip_prefix("reservedMemory::").and_then(|size| tags::parse_size(size).ok())
        })
    }
}

fn describe(parsed: &tags::Parsed<'_>) -> String {
    match tags::slot(parsed) {
        (name, Some(first)) => format!("{name} tag for {first}"),
        (name, None) => format!("{name} tag"),
    }
}

fn check_user_tags(tags: &[String], field: &str) -> Result<(), ApiError> {
    for tag in tags {
        if tag.trim().is_empty() || tag.len() > 1024 {
            return Err(ApiError::invalid(field, "a tag is 1 to 1024 characters, not blank"));
        }
    }
    Ok(())
}

/// Checks the `staticIp` tags of a new VM on `l3_networks`: each names one of them and an
/// address in one of its ranges that is not the gateway.
pub fn check_static_ips(
    mn: &Mn,
    system_tags: &[String],
    l3_networks: &[Uuid],
) -> Result<Vec<(Uuid, Ipv4Addr)>, ApiError> {
    let wanted = tags::static_ips(system_tags);
    for (l3, ip) in &wanted {
        if !l3_networks.contains(l3) {
            return Err(ApiError::invalid(
                "systemTags",
                format!(
                    "staticIp names L3 network {l3}, which is not among the VM's l3NetworkUuids"
                ),
            ));
        }
        check_address(mn, *l3, *ip)?;
    }
    Ok(wanted)
}

fn check_address(mn: &Mn, l3: Uuid, ip: Ipv4Addr) -> Result<(), ApiError> {
    let network = mn
        .db
        .get::<L3NetworkRecord>(l3)?
        .ok_or_else(|| ApiError::invalid("systemTags", format!("staticIp: no L3 network {l3}")))?
        .record;
    match network.ip_ranges.iter().find(|r| r.contains(ip)) {
        Some(range) if range.gateway == ip => Err(ApiError::invalid(
            "systemTags",
            format!("staticIp: {ip} is the gateway of L3 network {l3}"),
        )),
        Some(_) => Ok(()),
        None => Err(ApiError::invalid(
            "systemTags",
            format!("staticIp: {ip} is in no IP range of L3 network {l3}"),
        )),
    }
}

/// `POST /v1/user-tags`.
async fn create_user_tag(
    State(mn): State<Arc<Mn>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    create_tag::<tags::User>(mn, headers, body, "CreateUserTag").await
}

/// `POST /v1/system-tags`.
async fn create_system_tag(
    State(mn): State<Arc<Mn>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    create_tag::<tags::System>(mn, headers, body, "CreateSystemTag").await
}

async fn create_tag<K: TagKind>(
    mn: Arc<Mn>,
    headers: HeaderMap,
    body: Bytes,
    api: &str,
) -> Result<Response, ApiError> {
    let (p, raw): (TagParams, _) = super::params(super::json_body(&body)?)?;
    let Some(tagged) = kinds::by_vo(&p.resource_type).filter(|k| k.taggable) else {
        let known: Vec<&str> = kinds::KINDS.iter().filter(|k| k.taggable).map(|k| k.vo).collect();
        return Err(ApiError::invalid(
            "resourceType",
            format!(
                "`{}` is not a resource type; use one of {}",
                p.resource_type,
                known.join(", ")
            ),
        ));
    };
    let (resource_type, kind) = (tagged.vo, tagged.url());
    crate::auth::may_change(&mn.db, kind, p.resource_uuid)?;
    let source = StoreSource::new(&mn.db);
    let resource = source
        .find(kind, "#uuid", &p.resource_uuid.to_string(), FieldType::Uuid)?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(tagged.api, p.resource_uuid))?;
    let existing = tags::of::<K>(&mn.db, p.resource_uuid)?;
    if existing.iter().any(|t| t.tag == p.tag) {
        return Err(ApiError::of(
            crate::codes::TAG_DUPLICATE,
            format!("{} {} already has the tag `{}`", resource_type, p.resource_uuid, p.tag),
        ));
    }
    let mut reserved_memory = None;
    if K::NAME == "System" {
        let parsed = tags::parse_system_tag(&p.tag, resource_type)
            .map_err(|e| ApiError::invalid("tag", e))?;
        for other in &existing {
            if let Ok(theirs) = tags::parse_system_tag(&other.tag, resource_type)
                && tags::slot(&theirs) == tags::slot(&parsed)
            {
                return Err(ApiError::of(
                    crate::codes::TAG_DUPLICATE,
                    format!(
                        "{resource_type} {} already has `{}` ({}); delete it first",
                        p.resource_uuid, other.tag, other.uuid
                    ),
                ));
            }
        }
        if parsed.pattern.name() == "staticIp" {
            let (l3, ip) = tags::static_ips(std::slice::from_ref(&p.tag))[0];
            check_address(&mn, l3, ip)?;
            let vm: VmRecord =
                serde_json::from_value(resource.clone()).map_err(|e| ApiError::internal(&e))?;
            if let Some(nic) = vm.vm_nics.iter().find(|n| n.l3_network_uuid == l3)
                && nic.ip != ip.to_string()
            {
                return Err(ApiError::of(
                    crate::codes::STATIC_IP_TOO_LATE,
                    format!(
                        "VM {} already has {} on L3 network {l3}; a staticIp tag applies when the NIC is made (at creation)",
                        vm.uuid, nic.ip
                    ),
                ));
            }
        }
        if parsed.pattern.name() == "reservedMemory" {
            reserved_memory = tags::parse_size(parsed.tokens[0]).ok();
        }
    } else {
        check_user_tags(std::slice::from_ref(&p.tag), "tag")?;
    }
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(super::job_header(&headers)?, api, &raw, {
            move |_| async move {
                let record = TagRecord::<K>::new(p.resource_uuid, resource_type, &p.tag);
                let mut batch = Batch::new();
                batch.put(&record, Expect::Absent)?;
                match m.db.commit(batch).await {
                    Ok(_) => {}
                    // A concurrent request took the slot after the check above.
                    Err(strato_storage::StoreError::Conflict { .. }) => {
                        return Err(ApiError::of(crate::codes::TAG_DUPLICATE,
                            format!(
                                "{resource_type} {} already has a tag in the slot of `{}`; delete it first",
                                p.resource_uuid, p.tag
                            ),
                        ));
                    }
                    Err(error) => return Err(error.into()),
                }
                if let Some(memory) = reserved_memory {
                    m.hosts.entity().keep_for_host(p.resource_uuid, memory);
                }
                inventory(&record)
            }
        })
        .await?;
    Ok(super::accepted(&mn, job))
}

/// `DELETE /v1/tags/{uuid}`: a user or a system tag.
async fn delete_tag(
    State(mn): State<Arc<Mn>>,
    headers: HeaderMap,
    super::Id(uuid): super::Id,
) -> Result<Response, ApiError> {
    let user = mn.db.get::<UserTag>(uuid)?.is_some();
    let system = mn.db.get::<SystemTag>(uuid)?.map(|s| s.record);
    if !user && system.is_none() {
        return Err(ApiError::not_found("tag", uuid));
    }
    let m = mn.clone();
    let raw = serde_json::json!({ "uuid": uuid });
    let job = mn
        .jobs
        .submit(super::job_header(&headers)?, "DeleteTag", &raw, {
            move |_| async move {
                let mut batch = Batch::new();
                batch.delete::<UserTag>(uuid, Expect::Any);
                batch.delete::<SystemTag>(uuid, Expect::Any);
                m.db.commit(batch).await?;
                if let Some(tag) = system
                    && tag.tag.starts_with("reservedMemory::")
                {
                    m.hosts.entity().keep_for_host(tag.resource_uuid, 0);
                }
                Ok(serde_json::json!({}))
            }
        })
        .await?;
    Ok(super::accepted(&mn, job))
}
