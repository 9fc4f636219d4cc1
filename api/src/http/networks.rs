//! Networks: NoVlan L2 networks attached to clusters, and L3 networks with their IP ranges.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{MethodRouter, post};
use strato_actors::ipam::IpRange;
use strato_actors::kinds;
use strato_actors::records::{ClusterRecord, L2NetworkRecord, L3NetworkRecord, ZoneRecord};
use uuid::Uuid;

use super::api::{Answer, Api, Body, Method, schema};
use super::resources::Attachment;
use super::{
    Id, Shared, accepted, creation, get_record, job_header, json_body, params, submit_record,
};
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::{L2Params, L3Params, RangeParams, inventory, validate};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    vec![
        Api::create(
            "CreateL2NoVlanNetwork",
            "/v1/l2-networks/no-vlan",
            schema::<L2Params>(),
            "Creates a NoVlan L2 network",
            || post(create_l2),
        ),
        Api::new(
            "AttachL2NetworkToCluster",
            Method::Post,
            "/v1/l2-networks/{l2}/clusters/{cluster}",
            Body::None,
            Answer::Job,
            "Attaches an L2 network to a cluster",
            attach_l2,
        ),
        Api::create(
            "CreateL3Network",
            "/v1/l3-networks",
            schema::<L3Params>(),
            "Creates an L3 network",
            || post(create_l3),
        ),
        Api::create(
            "AddIpRange",
            "/v1/l3-networks/{uuid}/ip-ranges",
            schema::<RangeParams>(),
            "Adds an IP range to an L3 network",
            || post(add_ip_range),
        ),
    ]
}

async fn create_l3(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (L3Params, _, _) = creation(&body, kinds::of::<L3NetworkRecord>())?;
    validate::name("name", &p.name)?;
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

async fn add_ip_range(
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

async fn create_l2(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (L2Params, _, _) = creation(&body, kinds::of::<L2NetworkRecord>())?;
    validate::name("name", &p.name)?;
    validate::name("physicalInterface", &p.physical_interface)?;
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

fn attach_l2() -> MethodRouter<Arc<Mn>> {
    Attachment::<L2NetworkRecord, ClusterRecord> {
        api: "AttachL2NetworkToCluster",
        params: [("l2", "l2NetworkUuid"), ("cluster", "clusterUuid")],
        target_first: true,
        list: |r| &mut r.attached_cluster_uuids,
        parent: std::marker::PhantomData,
    }
    .handler()
}
