//! Infrastructure: zones, clusters, hosts and instance offerings (the admin's).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{MethodRouter, post, put};
use strato_actors::host;
use strato_actors::kinds;
use strato_actors::records::{
    ClusterRecord, HostRecord, HostState, InstanceOfferingRecord, ZoneRecord,
};
use strato_storage::{Batch, Expect};
use uuid::Uuid;

use super::api::{Api, actions, schema};
use super::{Id, Shared, accepted, action, creation, get_record, job_header, submit_record, write};
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::actions::{ChangeHostState, HostAction, StateEvent};
use crate::types::{ClusterParams, HostParams, OfferingParams, ZoneParams, inventory, validate};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let create = Api::create;
    let mut apis = vec![
        create("CreateZone", "/v1/zones", schema::<ZoneParams>(), "Creates a zone", || {
            post(create_zone)
        }),
        create(
            "CreateCluster",
            "/v1/clusters",
            schema::<ClusterParams>(),
            "Creates a cluster",
            || post(create_cluster),
        ),
        create(
            "AddKVMHost",
            "/v1/hosts/kvm",
            schema::<HostParams>(),
            "Adds a KVM host (its agent must be reachable)",
            || post(add_host),
        ),
        create(
            "CreateInstanceOffering",
            "/v1/instance-offerings",
            schema::<OfferingParams>(),
            "Creates an instance offering",
            || post(create_offering),
        ),
    ];
    apis.extend(actions::<HostAction>("/v1/hosts/{uuid}/actions", host_actions));
    apis
}

fn host_actions() -> MethodRouter<Arc<Mn>> {
    put(host_action)
}

async fn create_zone(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (ZoneParams, _, _) = creation(&body, kinds::of::<ZoneRecord>())?;
    validate::name("name", &p.name)?;
    if let Some(description) = &p.description {
        validate::text("description", description, validate::MAX_DESCRIPTION_CHARS)?;
    }
    submit_record(&mn, &headers, "CreateZone", &raw, tags, move || {
        Ok(ZoneRecord { uuid: Uuid::new_v4(), name: p.name, description: p.description })
    })
    .await
}

async fn create_cluster(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (ClusterParams, _, _) = creation(&body, kinds::of::<ClusterRecord>())?;
    validate::name("name", &p.name)?;
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

async fn add_host(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (HostParams, _, _) = creation(&body, kinds::of::<HostRecord>())?;
    validate::name("name", &p.name)?;
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
            let record = HostRecord::added(p.name, p.cluster_uuid, p.management_ip, p.agent_port);
            // The memory a reservedMemory tag keeps is kept before the host takes any VM.
            if let Some(memory) = tags.reserved_memory() {
                m.hosts.entity().keep_for_host(record.uuid, memory);
            }
            write(&m, &record, &tags).await?;
            if let Err(error) = host::link::connect(&m.hosts, record.uuid).await {
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

async fn host_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    get_record::<HostRecord>(&mn, uuid)?;
    let (action, keyed): (HostAction, _) = action(&body, uuid)?;
    let m = mn.clone();
    let job = match action {
        HostAction::ReconnectHost(_) => {
            mn.jobs
                .submit(job_header(&headers)?, "ReconnectHost", &keyed, move |_| async move {
                    host::link::reconnect(&m.hosts, uuid).await?;
                    inventory(&host::record(&m.hosts, uuid).await?)
                })
                .await?
        }
        HostAction::ChangeHostState(ChangeHostState { state_event }) => {
            mn.jobs
                .submit(job_header(&headers)?, "ChangeHostState", &keyed, move |_| async move {
                    let state = match state_event {
                        StateEvent::Enable => HostState::Enabled,
                        StateEvent::Disable => HostState::Disabled,
                        StateEvent::Maintain => {
                            let (record, report) =
                                strato_actors::maintenance::maintain(&m.db, &m.hosts, &m.vms, uuid)
                                    .await?;
                            let mut inventory = inventory(&record)?;
                            inventory["maintenance"] = crate::types::inventory(&report)?;
                            return Ok(inventory);
                        }
                    };
                    inventory(&host::set_state(&m.hosts, uuid, state).await?)
                })
                .await?
        }
    };
    Ok(accepted(&mn, job))
}

/// The most virtual CPUs an offering gives (KVM's limit per guest).
const MAX_CPU_NUM: u32 = 4096;

/// The least memory an offering gives.
const MIN_MEMORY_SIZE: u64 = 16 << 20;

/// The most memory an offering gives (64 TiB: more than any host has, far from overflow).
const MAX_MEMORY_SIZE: u64 = 64 << 40;

async fn create_offering(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (OfferingParams, _, _) =
        creation(&body, kinds::of::<InstanceOfferingRecord>())?;
    validate::name("name", &p.name)?;
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
