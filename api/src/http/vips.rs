//! VIPs, elastic IPs and port forwarding rules: created by any account (its own), with
//! ZStack's names. The checks that need only the request are made here, at once; those that
//! depend on the records' state at the time (is the VIP free, is the NIC taken) are made by
//! `strato_actors::vip` in the job, on the records as it writes them.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{post, put};
use serde_json::Value;
use strato_actors::kinds;
use strato_actors::records::{EipRecord, PortForwardingRuleRecord, VipRecord};
use strato_actors::vip::{self, NicTarget};
use uuid::Uuid;

use super::api::{Api, actions, schema};
use super::{Id, Shared, accepted, action, creation, get_record, job_header, owned};
use crate::auth;
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::actions::{EipAction, OnVmNic, PortForwardingRuleAction};
use crate::types::{EipParams, PortForwardingRuleParams, VipParams, inventory, validate};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = vec![
        Api::create("CreateVip", "/v1/vips", schema::<VipParams>(), "Creates a VIP", || {
            post(create_vip)
        }),
        Api::create("CreateEip", "/v1/eips", schema::<EipParams>(), "Creates an EIP", || {
            post(create_eip)
        }),
        Api::create(
            "CreatePortForwardingRule",
            "/v1/port-forwarding",
            schema::<PortForwardingRuleParams>(),
            "Creates a port forwarding rule",
            || post(create_rule),
        ),
    ];
    apis.extend(actions::<EipAction>("/v1/eips/{uuid}/actions", || put(act_on_eip)));
    apis.extend(actions::<PortForwardingRuleAction>("/v1/port-forwarding/{uuid}/actions", || {
        put(act_on_rule)
    }));
    apis
}

/// The checks an EIP's and a rule's creation share: their name and description, the VIP
/// (the caller's), and the NIC to attach to at once, if named (see [`target`]).
fn checked_use(
    mn: &Mn,
    name: &str,
    description: &str,
    vip: Uuid,
    nic: Option<Uuid>,
) -> Result<Option<NicTarget>, ApiError> {
    validate::name("name", name)?;
    validate::text("description", description, validate::MAX_DESCRIPTION_CHARS)?;
    auth::may_use(&mn.db, "vips", vip)?;
    get_record::<VipRecord>(mn, vip)?;
    nic.map(|nic| target(mn, nic)).transpose()
}

/// The NIC `nic` as a target, if the caller may use its VM (another's is not there).
fn target(mn: &Mn, nic: Uuid) -> Result<NicTarget, ApiError> {
    let target = vip::nic_target(&mn.db, nic)?;
    auth::may_use(&mn.db, "vm-instances", target.vm.uuid)
        .map_err(|_| ApiError::not_found("VmNic", nic))?;
    Ok(target)
}

async fn create_vip(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kinds::of::<VipRecord>();
    let (p, raw, tags): (VipParams, _, _) = creation(&body, kind)?;
    validate::name("name", &p.name)?;
    validate::text("description", &p.description, validate::MAX_DESCRIPTION_CHARS)?;
    auth::may_use(&mn.db, "l3-networks", p.l3_network_uuid)?;
    get_record::<strato_actors::records::L3NetworkRecord>(&mn, p.l3_network_uuid)?;
    let owner = auth::tenant();
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "CreateVip", &raw, move |_| async move {
            let record = VipRecord {
                uuid: Uuid::new_v4(),
                name: p.name,
                description: p.description,
                l3_network_uuid: p.l3_network_uuid,
                ip: String::new(),
                netmask: String::new(),
                gateway: String::new(),
                use_for: None,
                peer_l3_network_uuid: None,
                private_ip: None,
                state: "Enabled".into(),
            };
            let extra = owned(&tags, kind, owner, record.uuid);
            let record = vip::create_vip(&m.db, &m.l3s, record, p.required_ip, extra).await?;
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}

async fn create_eip(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kinds::of::<EipRecord>();
    let (p, raw, tags): (EipParams, _, _) = creation(&body, kind)?;
    let nic = checked_use(&mn, &p.name, &p.description, p.vip_uuid, p.vm_nic_uuid)?;
    let owner = auth::tenant();
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "CreateEip", &raw, move |_| async move {
            let mut record = EipRecord {
                uuid: Uuid::new_v4(),
                name: p.name,
                description: p.description,
                vip_uuid: p.vip_uuid,
                vip_ip: String::new(),
                vm_nic_uuid: None,
                guest_ip: None,
                state: "Enabled".into(),
            };
            let extra = owned(&tags, kind, owner, record.uuid);
            vip::create_eip(&m.db, &mut record, extra).await?;
            if let Some(nic) = nic {
                // A creation that cannot attach leaves nothing: the VIP stays free.
                match vip::attach_eip(&m.db, &m.hosts, record.uuid, nic).await {
                    Ok(attached) => record = attached,
                    Err(error) => {
                        vip::delete_eip(&m.db, &m.hosts, record.uuid).await?;
                        return Err(error.into());
                    }
                }
            }
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}

/// A port range's end given its start and optional end, or a 400 naming `field`.
fn range_end(start: u16, end: Option<u16>, field: &str) -> Result<u16, ApiError> {
    let end = end.unwrap_or(start);
    if end < start {
        return Err(ApiError::invalid(
            field,
            format!("the range ends ({end}) before it starts ({start})"),
        ));
    }
    Ok(end)
}

async fn create_rule(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kinds::of::<PortForwardingRuleRecord>();
    let (p, raw, tags): (PortForwardingRuleParams, _, _) = creation(&body, kind)?;
    let protocol = p.protocol_type.to_ascii_uppercase();
    if !["TCP", "UDP"].contains(&protocol.as_str()) {
        return Err(ApiError::invalid("protocolType", "TCP or UDP"));
    }
    for (field, port) in
        [("vipPortStart", Some(p.vip_port_start)), ("privatePortStart", p.private_port_start)]
    {
        if port == Some(0) {
            return Err(ApiError::invalid(field, "ports are 1 to 65535"));
        }
    }
    let vip_end = range_end(p.vip_port_start, p.vip_port_end, "vipPortEnd")?;
    let width = vip_end - p.vip_port_start;
    let private_start = p.private_port_start.unwrap_or(p.vip_port_start);
    let private_end = match p.private_port_end {
        Some(end) => range_end(private_start, Some(end), "privatePortEnd")?,
        None => private_start.checked_add(width).ok_or_else(|| {
            ApiError::invalid("privatePortStart", "the NIC's range would pass port 65535")
        })?,
    };
    if private_end - private_start != width {
        return Err(ApiError::invalid(
            "privatePortEnd",
            format!(
                "the NIC's range has {} port(s) and the VIP's {}: they map one to one",
                u32::from(private_end - private_start) + 1,
                u32::from(width) + 1
            ),
        ));
    }
    let allowed_cidr = p
        .allowed_cidr
        .map(|cidr| {
            let net: ipnet::Ipv4Net = cidr.parse().map_err(|_| {
                ApiError::invalid("allowedCidr", "a network in CIDR form, such as 203.0.113.0/24")
            })?;
            if net.trunc() != net {
                return Err(ApiError::invalid(
                    "allowedCidr",
                    format!("did you mean {}?", net.trunc()),
                ));
            }
            Ok(net.to_string())
        })
        .transpose()?;
    let nic = checked_use(&mn, &p.name, &p.description, p.vip_uuid, p.vm_nic_uuid)?;
    let owner = auth::tenant();
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "CreatePortForwardingRule", &raw, move |_| async move {
            let mut record = PortForwardingRuleRecord {
                uuid: Uuid::new_v4(),
                name: p.name,
                description: p.description,
                vip_uuid: p.vip_uuid,
                vip_ip: String::new(),
                vip_port_start: p.vip_port_start,
                vip_port_end: vip_end,
                private_port_start: private_start,
                private_port_end: private_end,
                protocol_type: protocol,
                allowed_cidr,
                vm_nic_uuid: None,
                guest_ip: None,
                state: "Enabled".into(),
            };
            let extra = owned(&tags, kind, owner, record.uuid);
            vip::create_port_forwarding_rule(&m.db, &mut record, extra).await?;
            if let Some(nic) = nic {
                // A creation that cannot attach leaves nothing: the VIP's ports stay free.
                let attached =
                    vip::attach_port_forwarding_rule(&m.db, &m.l3s, &m.hosts, record.uuid, nic)
                        .await;
                match attached {
                    Ok(attached) => record = attached,
                    Err(error) => {
                        vip::delete_port_forwarding_rule(&m.db, &m.l3s, &m.hosts, record.uuid)
                            .await?;
                        return Err(error.into());
                    }
                }
            }
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}

async fn act_on_eip(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    get_record::<EipRecord>(&mn, uuid)?;
    let (action, keyed): (EipAction, Value) = action(&body, uuid)?;
    let m = mn.clone();
    let job = match action {
        EipAction::AttachEip(OnVmNic { vm_nic_uuid }) => {
            let nic = target(&mn, vm_nic_uuid)?;
            mn.jobs
                .submit(job_header(&headers)?, "AttachEip", &keyed, move |_| async move {
                    inventory(&vip::attach_eip(&m.db, &m.hosts, uuid, nic).await?)
                })
                .await?
        }
        EipAction::DetachEip(_) => {
            mn.jobs
                .submit(job_header(&headers)?, "DetachEip", &keyed, move |_| async move {
                    inventory(&vip::detach_eip(&m.db, &m.hosts, uuid).await?)
                })
                .await?
        }
    };
    Ok(accepted(&mn, job))
}

async fn act_on_rule(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    get_record::<PortForwardingRuleRecord>(&mn, uuid)?;
    let (action, keyed): (PortForwardingRuleAction, Value) = action(&body, uuid)?;
    let m = mn.clone();
    let job = match action {
        PortForwardingRuleAction::AttachPortForwardingRule(OnVmNic { vm_nic_uuid }) => {
            let nic = target(&mn, vm_nic_uuid)?;
            mn.jobs
                .submit(
                    job_header(&headers)?,
                    "AttachPortForwardingRule",
                    &keyed,
                    move |_| async move {
                        let record =
                            vip::attach_port_forwarding_rule(&m.db, &m.l3s, &m.hosts, uuid, nic)
                                .await?;
                        inventory(&record)
                    },
                )
                .await?
        }
        PortForwardingRuleAction::DetachPortForwardingRule(_) => {
            mn.jobs
                .submit(
                    job_header(&headers)?,
                    "DetachPortForwardingRule",
                    &keyed,
                    move |_| async move {
                        let record =
                            vip::detach_port_forwarding_rule(&m.db, &m.l3s, &m.hosts, uuid).await?;
                        inventory(&record)
                    },
                )
                .await?
        }
    };
    Ok(accepted(&mn, job))
}
