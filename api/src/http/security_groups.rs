//! Security groups: created by any account (its own), with rules, attached to L3 networks,
//! and VM NICs of those networks as members. Every change asks the hosts of the group's
//! members (and of the groups naming it as a remote end) to apply their network again.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{post, put};
use strato_actors::owners::{Charge, OwnerRecord};
use strato_actors::records::{
    L3NetworkRecord, SecurityGroupMember, SecurityGroupRecord, SecurityGroupRule, VmRecord,
};
use strato_actors::{host, kinds, network};
use strato_storage::Expect;
use uuid::Uuid;

use super::api::{Api, actions, schema};
use super::{Id, Shared, accepted, action, creation, get_record, job_header};
use crate::auth;
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::actions::{
    OnL3Network, RuleParams, RuleUuids, SecurityGroupAction, SecurityGroupRules, VmNics,
};
use crate::types::{SecurityGroupParams, inventory, uuid_param, validate};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = vec![Api::create(
        "CreateSecurityGroup",
        "/v1/security-groups",
        schema::<SecurityGroupParams>(),
        "Creates a security group",
        || post(create),
    )];
    apis.extend(actions::<SecurityGroupAction>("/v1/security-groups/{uuid}/actions", || put(act)));
    apis
}

async fn create(State(mn): Shared, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let kind = kinds::of::<SecurityGroupRecord>();
    let (p, raw, tags): (SecurityGroupParams, _, _) = creation(&body, kind)?;
    validate::name("name", &p.name)?;
    validate::text("description", &p.description, validate::MAX_DESCRIPTION_CHARS)?;
    // Captured here: the job runs outside the request's task.
    let owner = auth::tenant();
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "CreateSecurityGroup", &raw, move |_| async move {
            let record = SecurityGroupRecord {
                uuid: Uuid::new_v4(),
                name: p.name,
                description: p.description,
                state: "Enabled".into(),
                attached_l3_network_uuids: vec![],
                rules: vec![],
                vm_nics: vec![],
            };
            strato_actors::cascade::insert(&m.db, &record, |batch| {
                tags.write(batch, record.uuid, kind.vo)?;
                if let Some(account) = owner {
                    let owned = OwnerRecord {
                        resource_uuid: record.uuid,
                        resource_type: kind.vo.into(),
                        account_uuid: account,
                        charge: Charge::default(),
                    };
                    batch.put(&owned, Expect::Absent)?;
                }
                Ok(())
            })
            .await?;
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}

/// A rule as stored, from its parameters, or a 400 naming the field at fault.
fn rule(mn: &Mn, p: RuleParams) -> Result<SecurityGroupRule, ApiError> {
    if !["Ingress", "Egress"].contains(&p.r#type.as_str()) {
        return Err(ApiError::invalid("rules.type", "Ingress or Egress"));
    }
    let protocol = p.protocol.to_ascii_uppercase();
    let (start, end) = match protocol.as_str() {
        "TCP" | "UDP" => {
            let (start, end) = (p.start_port.unwrap_or(0), p.end_port.unwrap_or(65535));
            if !(0..=65535).contains(&start) || !(0..=65535).contains(&end) || start > end {
                return Err(ApiError::invalid(
                    "rules.startPort",
                    "ports are 0 to 65535, the start first",
                ));
            }
            (start, end)
        }
        "ICMP" | "ALL" => {
            if p.start_port.is_some_and(|x| x != -1) || p.end_port.is_some_and(|x| x != -1) {
                return Err(ApiError::invalid(
                    "rules.startPort",
                    format!("{protocol} has no ports"),
                ));
            }
            (-1, -1)
        }
        _ => return Err(ApiError::invalid("rules.protocol", "TCP, UDP, ICMP or ALL")),
    };
    if let Some(remote) = p.remote_security_group_uuid {
        if p.allowed_cidr.is_some() {
            return Err(ApiError::invalid(
                "rules.allowedCidr",
                "a rule names a network or a remote group, not both",
            ));
        }
        auth::may_use(&mn.db, "security-groups", remote)?;
        get_record::<SecurityGroupRecord>(mn, remote)?;
    }
    let cidr = p.allowed_cidr.unwrap_or_else(|| "0.0.0.0/0".into());
    let net: ipnet::Ipv4Net = cidr.parse().map_err(|_| {
        ApiError::invalid("rules.allowedCidr", "a network in CIDR form, such as 10.0.0.0/8")
    })?;
    if net.trunc() != net {
        return Err(ApiError::invalid(
            "rules.allowedCidr",
            format!("did you mean {}?", net.trunc()),
        ));
    }
    Ok(SecurityGroupRule {
        uuid: Uuid::new_v4(),
        r#type: p.r#type,
        protocol,
        start_port: start,
        end_port: end,
        allowed_cidr: net.to_string(),
        remote_security_group_uuid: p.remote_security_group_uuid,
    })
}

/// The NICs `uuids` names, each with its VM, checked: the caller may use the VM, and the
/// NIC's L3 network is attached to `group`.
fn members(
    mn: &Mn,
    group: &SecurityGroupRecord,
    uuids: &[String],
) -> Result<Vec<SecurityGroupMember>, ApiError> {
    let mut out = Vec::new();
    for text in uuids {
        let nic = uuid_param(text, "vmNicUuids")?;
        let vm = mn
            .db
            .find::<VmRecord>("nic", &nic.into())?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::not_found("VmNic", nic))?;
        auth::may_use(&mn.db, "vm-instances", vm).map_err(|_| ApiError::not_found("VmNic", nic))?;
        let record: VmRecord = get_record(mn, vm)?;
        let on = record.vm_nics.iter().find(|n| n.uuid == nic).map(|n| n.l3_network_uuid);
        if on.is_none_or(|l3| !group.attached_l3_network_uuids.contains(&l3)) {
            return Err(ApiError::invalid(
                "vmNicUuids",
                format!(
                    "NIC {nic} is on an L3 network the group is not attached to: AttachSecurityGroupToL3Network first"
                ),
            ));
        }
        out.push(SecurityGroupMember { vm_nic_uuid: nic, vm_instance_uuid: vm });
    }
    Ok(out)
}

async fn act(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let group: SecurityGroupRecord = get_record(&mn, uuid)?;
    let (action, keyed): (SecurityGroupAction, _) = action(&body, uuid)?;
    // Checked before the job: a wrong request changes nothing and says why at once. The
    // change itself is applied by the job to the record as it then is (a compare-and-swap
    // retried), so two changes at once both land.
    type Change = Box<dyn Fn(&mut SecurityGroupRecord) + Send + Sync>;
    let (name, change): (&'static str, Change) = match action {
        SecurityGroupAction::AddSecurityGroupRule(SecurityGroupRules { rules }) => {
            let rules = rules.into_iter().map(|p| rule(&mn, p)).collect::<Result<Vec<_>, _>>()?;
            ("AddSecurityGroupRule", Box::new(move |g| g.rules.extend(rules.iter().cloned())))
        }
        SecurityGroupAction::DeleteSecurityGroupRule(RuleUuids { rule_uuids }) => {
            let ids = rule_uuids
                .iter()
                .map(|t| uuid_param(t, "ruleUuids"))
                .collect::<Result<Vec<_>, _>>()?;
            (
                "DeleteSecurityGroupRule",
                Box::new(move |g| g.rules.retain(|r| !ids.contains(&r.uuid))),
            )
        }
        SecurityGroupAction::AttachSecurityGroupToL3Network(OnL3Network { l3_network_uuid }) => {
            auth::may_use(&mn.db, "l3-networks", l3_network_uuid)?;
            get_record::<L3NetworkRecord>(&mn, l3_network_uuid)?;
            (
                "AttachSecurityGroupToL3Network",
                Box::new(move |g| {
                    if !g.attached_l3_network_uuids.contains(&l3_network_uuid) {
                        g.attached_l3_network_uuids.push(l3_network_uuid);
                    }
                }),
            )
        }
        SecurityGroupAction::DetachSecurityGroupFromL3Network(OnL3Network { l3_network_uuid }) => {
            // Its NICs on that network leave the group with it.
            let nic_of = strato_actors::vm::create::nic_id;
            let change: Change = Box::new(move |g| {
                g.attached_l3_network_uuids.retain(|l| *l != l3_network_uuid);
                g.vm_nics.retain(|m| m.vm_nic_uuid != nic_of(m.vm_instance_uuid, l3_network_uuid));
            });
            ("DetachSecurityGroupFromL3Network", change)
        }
        SecurityGroupAction::AddVmNicToSecurityGroup(VmNics { vm_nic_uuids }) => {
            let joining = members(&mn, &group, &vm_nic_uuids)?;
            (
                "AddVmNicToSecurityGroup",
                Box::new(move |g| {
                    for m in &joining {
                        if !g.vm_nics.contains(m) {
                            g.vm_nics.push(m.clone());
                        }
                    }
                }),
            )
        }
        SecurityGroupAction::DeleteVmNicFromSecurityGroup(VmNics { vm_nic_uuids }) => {
            let ids = vm_nic_uuids
                .iter()
                .map(|t| uuid_param(t, "vmNicUuids"))
                .collect::<Result<Vec<_>, _>>()?;
            (
                "DeleteVmNicFromSecurityGroup",
                Box::new(move |g| g.vm_nics.retain(|m| !ids.contains(&m.vm_nic_uuid))),
            )
        }
    };
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, name, &keyed, move |_| async move {
            // The hosts of the members before the change (a NIC leaving) and after.
            let mut hosts = network::hosts_of_security_group(&m.db, uuid)?;
            let record =
                m.db.update::<SecurityGroupRecord>(uuid, |g| change(g))
                    .await?
                    .ok_or_else(|| ApiError::no::<SecurityGroupRecord>(uuid))?;
            hosts.extend(network::hosts_of_security_group(&m.db, uuid)?);
            hosts.sort();
            hosts.dedup();
            for host in hosts {
                host::refresh_network(&m.hosts, host);
            }
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}
