//! Networks: L2 networks (NoVlan, Vlan, VXLAN pools and their networks) attached to
//! clusters, L3 networks with their IP ranges, DNS, routes and MTU, and the network service
//! providers and their services on L3 networks. Every change a host's network depends on
//! asks the hosts it reaches to apply their network again (`host::refresh_network`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use std::net::Ipv4Addr;

use axum::routing::{MethodRouter, post, put};
use strato_actors::ipam::IpRange;
use strato_actors::l3::{self, L3Error};
use strato_actors::records::{
    ClusterRecord, HostRecord, HostRoute, L2NetworkRecord, L3NetworkRecord,
    NetworkServiceProviderRecord, ZoneRecord, l2_type,
};
use strato_actors::{host, kinds, network};
use uuid::Uuid;

use super::api::{Answer, Api, Body, Method, actions, schema};
use super::resources::Attachment;
use super::{
    Id, Shared, accepted, action, creation, get_record, job_header, json_body, params,
    submit_record,
};
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::actions::{
    DnsParams, HostRouteParams, HostRoutePrefix, L3Action, MtuParams, NetworkServices,
};
use crate::types::{
    L2Params, L2VlanParams, L3Params, RangeParams, VxlanParams, VxlanPoolParams, inventory,
    validate,
};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = vec![
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
        Api::new(
            "DetachL2NetworkFromCluster",
            Method::Delete,
            "/v1/l2-networks/{l2}/clusters/{cluster}",
            Body::None,
            Answer::Job,
            "Detaches an L2 network from a cluster",
            detach_l2,
        ),
        Api::create(
            "CreateL2VlanNetwork",
            "/v1/l2-networks/vlan",
            schema::<L2VlanParams>(),
            "Creates a Vlan L2 network",
            || post(create_l2_vlan),
        ),
        Api::create(
            "CreateL2VxlanNetworkPool",
            "/v1/l2-networks/vxlan-pool",
            schema::<VxlanPoolParams>(),
            "Creates a VXLAN network pool: its VTEP network and VNIs",
            || post(create_vxlan_pool),
        ),
        Api::create(
            "CreateL2VxlanNetwork",
            "/v1/l2-networks/vxlan",
            schema::<VxlanParams>(),
            "Creates a VXLAN network from a pool",
            || post(create_vxlan),
        ),
        Api::new(
            "AttachNetworkServiceProviderToL2Network",
            Method::Post,
            "/v1/network-service-providers/{networkServiceProviderUuid}/l2-networks/{l2NetworkUuid}",
            Body::None,
            Answer::Job,
            "Attaches a network service provider to an L2 network",
            attach_provider,
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
    ];
    apis.extend(actions::<L3Action>("/v1/l3-networks/{uuid}/actions", || put(l3_action)));
    apis
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
            mtu: None,
            host_routes: vec![],
            dhcp_server_ip: None,
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
        .map_err(|e| ApiError::from(L3Error::Ipam(e)))?;
    strato_actors::ipam::check_no_overlap(&l3.ip_ranges, &range)
        .map_err(|e| ApiError::from(L3Error::Ipam(e)))?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "AddIpRange", &raw, move |_| async move {
            let record = l3::add_ip_range(&m.l3s, uuid, range).await?;
            strato_actors::vip::sync_snat(&m.db, &m.l3s, uuid).await?;
            refresh(&m, network::hosts_of_l3(&m.db, &record)?);
            inventory(&record)
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
    check_interface("physicalInterface", &p.physical_interface)?;
    get_record::<ZoneRecord>(&mn, p.zone_uuid)?;
    submit_record(&mn, &headers, "CreateL2NoVlanNetwork", &raw, tags, move || {
        Ok(L2NetworkRecord {
            physical_interface: p.physical_interface,
            ..l2_record(p.name, p.zone_uuid, l2_type::NO_VLAN)
        })
    })
    .await
}

fn attach_l2() -> MethodRouter<Arc<Mn>> {
    l2_cluster("AttachL2NetworkToCluster", false)
}

fn detach_l2() -> MethodRouter<Arc<Mn>> {
    l2_cluster("DetachL2NetworkFromCluster", true)
}

fn l2_cluster(api: &'static str, detach: bool) -> MethodRouter<Arc<Mn>> {
    Attachment::<L2NetworkRecord, ClusterRecord> {
        api,
        params: [("l2", "l2NetworkUuid"), ("cluster", "clusterUuid")],
        target_first: true,
        list: |r| &mut r.attached_cluster_uuids,
        parent: std::marker::PhantomData,
        detach,
        then: |mn, l2, cluster| {
            // The cluster's hosts gain or lose the bridge; with a pool, every host of its
            // clusters learns the tunnels' ends.
            let mut hosts = network::hosts_of_l2(&mn.db, l2).unwrap_or_default();
            hosts.extend(mn.db.find::<HostRecord>("cluster", &cluster.into()).unwrap_or_default());
            refresh(mn, hosts);
        },
    }
    .handler()
}

fn attach_provider() -> MethodRouter<Arc<Mn>> {
    Attachment::<NetworkServiceProviderRecord, L2NetworkRecord> {
        api: "AttachNetworkServiceProviderToL2Network",
        // ZStack's names, so the CLI takes `networkServiceProviderUuid=... l2NetworkUuid=...`.
        params: [
            ("networkServiceProviderUuid", "networkServiceProviderUuid"),
            ("l2NetworkUuid", "l2NetworkUuid"),
        ],
        target_first: true,
        list: |r| &mut r.attached_l2_network_uuids,
        parent: std::marker::PhantomData,
        detach: false,
        then: super::resources::nothing_then,
    }
    .handler()
}

/// Asks each of `hosts` to apply its network again.
fn refresh(mn: &Mn, mut hosts: Vec<Uuid>) {
    hosts.sort();
    hosts.dedup();
    for host in hosts {
        host::refresh_network(&mn.hosts, host);
    }
}

fn check_interface(field: &str, name: &str) -> Result<(), ApiError> {
    validate::name(field, name)?;
    let fits = !name.is_empty()
        && name.len() <= strato_proto::net::IFNAME_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if fits {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "an interface name is 1 to 15 letters, digits, '-', '_' or '.'",
        ))
    }
}

fn l2_record(name: String, zone_uuid: Uuid, l2_type: &str) -> L2NetworkRecord {
    L2NetworkRecord {
        uuid: Uuid::new_v4(),
        name,
        zone_uuid,
        physical_interface: String::new(),
        r#type: l2_type.into(),
        attached_cluster_uuids: vec![],
        vlan: None,
        vni: None,
        pool_uuid: None,
        vtep_cidr: None,
        vni_range: None,
    }
}

async fn create_l2_vlan(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (L2VlanParams, _, _) = creation(&body, kinds::of::<L2NetworkRecord>())?;
    validate::name("name", &p.name)?;
    check_interface("physicalInterface", &p.physical_interface)?;
    if !(1..=4094).contains(&p.vlan) {
        return Err(ApiError::invalid("vlan", "a VLAN id is 1 to 4094"));
    }
    get_record::<ZoneRecord>(&mn, p.zone_uuid)?;
    submit_record(&mn, &headers, "CreateL2VlanNetwork", &raw, tags, move || {
        Ok(L2NetworkRecord {
            physical_interface: p.physical_interface,
            vlan: Some(p.vlan),
            ..l2_record(p.name, p.zone_uuid, l2_type::VLAN)
        })
    })
    .await
}

/// The largest VNI (24 bits; 16777215 is reserved by some switches, as ZStack does).
const MAX_VNI: u32 = 16_777_214;

async fn create_vxlan_pool(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (VxlanPoolParams, _, _) = creation(&body, kinds::of::<L2NetworkRecord>())?;
    validate::name("name", &p.name)?;
    let cidr: ipnet::Ipv4Net = p.vtep_cidr.parse().map_err(|_| {
        ApiError::invalid("vtepCidr", "a network in CIDR form, such as 10.0.0.0/24")
    })?;
    if cidr.trunc() != cidr {
        return Err(ApiError::invalid("vtepCidr", format!("did you mean {}?", cidr.trunc())));
    }
    let (start, end) = (p.start_vni.unwrap_or(1), p.end_vni.unwrap_or(MAX_VNI));
    if start == 0 || end > MAX_VNI || start > end {
        return Err(ApiError::invalid(
            "startVni",
            format!("VNIs run from 1 to {MAX_VNI}, start first"),
        ));
    }
    get_record::<ZoneRecord>(&mn, p.zone_uuid)?;
    submit_record(&mn, &headers, "CreateL2VxlanNetworkPool", &raw, tags, move || {
        Ok(L2NetworkRecord {
            vtep_cidr: Some(cidr.to_string()),
            vni_range: Some((start, end)),
            ..l2_record(p.name, p.zone_uuid, l2_type::VXLAN_POOL)
        })
    })
    .await
}

async fn create_vxlan(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (VxlanParams, _, _) = creation(&body, kinds::of::<L2NetworkRecord>())?;
    validate::name("name", &p.name)?;
    let pool: L2NetworkRecord = get_record(&mn, p.pool_uuid)?;
    if pool.r#type != l2_type::VXLAN_POOL {
        return Err(ApiError::invalid(
            "poolUuid",
            format!("{} is a {}, not a VXLAN pool", pool.uuid, pool.r#type),
        ));
    }
    let (start, end) = pool.vni_range.unwrap_or((1, MAX_VNI));
    let mut taken = std::collections::BTreeSet::new();
    for id in mn.db.find::<L2NetworkRecord>("pool", &pool.uuid.into())? {
        if let Some(l2) = mn.db.get::<L2NetworkRecord>(id)? {
            taken.extend(l2.record.vni);
        }
    }
    let vni = match p.vni {
        Some(vni) if !(start..=end).contains(&vni) => {
            return Err(ApiError::invalid("vni", format!("the pool's VNIs are {start} to {end}")));
        }
        Some(vni) if taken.contains(&vni) => {
            return Err(ApiError::invalid("vni", format!("VNI {vni} is taken in the pool")));
        }
        Some(vni) => vni,
        None => (start..=end)
            .find(|v| !taken.contains(v))
            .ok_or_else(|| ApiError::invalid("vni", "every VNI of the pool is taken"))?,
    };
    submit_record(&mn, &headers, "CreateL2VxlanNetwork", &raw, tags, move || {
        // Its UUID derives from (pool, VNI): two creations of one VNI at once are one record
        // written `Absent` twice, and the second is refused (SYS.RESOURCE_EXISTS).
        Ok(L2NetworkRecord {
            uuid: Uuid::new_v5(&pool.uuid, format!("vni:{vni}").as_bytes()),
            vni: Some(vni),
            pool_uuid: Some(pool.uuid),
            ..l2_record(p.name, pool.zone_uuid, l2_type::VXLAN)
        })
    })
    .await
}

fn ipv4(field: &'static str, text: &str) -> Result<Ipv4Addr, ApiError> {
    text.parse().map_err(|_| ApiError::invalid(field, format!("`{text}` is not an IPv4 address")))
}

fn prefix(text: &str) -> Result<ipnet::Ipv4Net, ApiError> {
    let net: ipnet::Ipv4Net = text.parse().map_err(|_| {
        ApiError::invalid("prefix", "a network in CIDR form, such as 172.16.0.0/12")
    })?;
    if net.trunc() != net {
        return Err(ApiError::invalid("prefix", format!("did you mean {}?", net.trunc())));
    }
    Ok(net)
}

/// The providers and types of a `networkServices` map, each checked: the provider exists,
/// offers the type, and (to attach) Strato makes it and the provider is attached to the
/// L3's L2 network.
/// The public network L3 `l3`'s SNAT goes out through (its `snat::` tag), checked: another
/// L3 network, on an L2 network.
fn snat_public(mn: &Mn, l3: &L3NetworkRecord) -> Result<Uuid, ApiError> {
    let public = strato_actors::vip::snat_public(&mn.db, l3.uuid)?.ok_or_else(|| {
        ApiError::invalid(
            "networkServices",
            format!(
                "SNAT takes the network's traffic out through a public L3 network: tag L3 network {} with snat::{{publicL3NetworkUuid}} first",
                l3.uuid
            ),
        )
    })?;
    let record: L3NetworkRecord = get_record(mn, public)?;
    if public == l3.uuid || record.l2_network_uuid.is_none() {
        return Err(ApiError::invalid(
            "networkServices",
            format!(
                "the snat:: tag's network {public} must be another L3 network, on an L2 network"
            ),
        ));
    }
    Ok(public)
}

fn services(
    mn: &Mn,
    l3: &L3NetworkRecord,
    requested: &std::collections::BTreeMap<String, Vec<String>>,
    attaching: bool,
) -> Result<Vec<(Uuid, Vec<String>)>, ApiError> {
    let mut out = Vec::new();
    for (key, types) in requested {
        let uuid = crate::types::uuid_param(key, "networkServices")?;
        let provider: NetworkServiceProviderRecord = get_record(mn, uuid)?;
        for t in types {
            if !provider.network_service_types.contains(t) {
                return Err(ApiError::invalid(
                    "networkServices",
                    format!(
                        "provider {} offers {}; not {t}",
                        provider.name,
                        provider.network_service_types.join(", ")
                    ),
                ));
            }
            if attaching && !network::implemented(&provider.r#type, t) {
                return Err(ApiError::new(
                    crate::codes::NETWORK_SERVICE_NOT_IMPLEMENTED,
                    format!("Strato does not make {t} of provider {}", provider.name),
                    serde_json::json!({ "provider": provider.uuid, "service": t }),
                ));
            }
        }
        if attaching && types.iter().any(|t| t == network::service::SNAT) {
            snat_public(mn, l3)?;
        }
        if attaching {
            let Some(l2) = l3.l2_network_uuid else {
                return Err(ApiError::invalid(
                    "networkServices",
                    "the L3 network is on no L2 network: its services have no hosts to run on",
                ));
            };
            if !provider.attached_l2_network_uuids.contains(&l2) {
                return Err(ApiError::invalid(
                    "networkServices",
                    format!(
                        "provider {} is not attached to L2 network {l2}: AttachNetworkServiceProviderToL2Network first",
                        provider.name
                    ),
                ));
            }
        }
        out.push((uuid, types.clone()));
    }
    Ok(out)
}

/// A change of an L3 network's record, made in its actor's queue.
type RecordChange = Box<dyn FnOnce(&mut L3NetworkRecord) -> Result<(), L3Error> + Send>;

async fn l3_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let l3: L3NetworkRecord = get_record(&mn, uuid)?;
    let (action, keyed): (L3Action, _) = action(&body, uuid)?;
    let name: &'static str = match &action {
        L3Action::AddDnsToL3Network(_) => "AddDnsToL3Network",
        L3Action::RemoveDnsFromL3Network(_) => "RemoveDnsFromL3Network",
        L3Action::AddHostRouteToL3Network(_) => "AddHostRouteToL3Network",
        L3Action::RemoveHostRouteFromL3Network(_) => "RemoveHostRouteFromL3Network",
        L3Action::SetL3NetworkMtu(_) => "SetL3NetworkMtu",
        L3Action::AttachNetworkServiceToL3Network(_) => "AttachNetworkServiceToL3Network",
        L3Action::DetachNetworkServiceFromL3Network(_) => "DetachNetworkServiceFromL3Network",
    };
    // Checked before the job, so a wrong request changes nothing and says why at once.
    enum Change {
        Record(RecordChange),
        Attach(Vec<(Uuid, Vec<String>)>),
        Detach(Vec<(Uuid, Vec<String>)>),
    }
    let change = match action {
        L3Action::AddDnsToL3Network(DnsParams { dns }) => {
            let dns = ipv4("dns", &dns)?.to_string();
            Change::Record(Box::new(move |r| {
                if !r.dns.contains(&dns) {
                    r.dns.push(dns);
                }
                Ok(())
            }))
        }
        L3Action::RemoveDnsFromL3Network(DnsParams { dns }) => {
            let dns = ipv4("dns", &dns)?.to_string();
            Change::Record(Box::new(move |r| {
                r.dns.retain(|d| *d != dns);
                Ok(())
            }))
        }
        L3Action::AddHostRouteToL3Network(HostRouteParams { prefix: p, nexthop }) => {
            let net = prefix(&p)?.to_string();
            let nexthop = ipv4("nexthop", &nexthop)?.to_string();
            Change::Record(Box::new(move |r| {
                if r.host_routes.iter().any(|h| h.prefix == net) {
                    return Err(L3Error::Invalid {
                        field: "prefix",
                        message: format!("{net} is routed already: remove it first"),
                    });
                }
                r.host_routes.push(HostRoute { prefix: net, nexthop });
                Ok(())
            }))
        }
        L3Action::RemoveHostRouteFromL3Network(HostRoutePrefix { prefix: p }) => {
            let net = prefix(&p)?.to_string();
            Change::Record(Box::new(move |r| {
                r.host_routes.retain(|h| h.prefix != net);
                Ok(())
            }))
        }
        L3Action::SetL3NetworkMtu(MtuParams { mtu }) => {
            if !(68..=9216).contains(&mtu) {
                return Err(ApiError::invalid("mtu", "an MTU is 68 to 9216 bytes"));
            }
            Change::Record(Box::new(move |r| {
                r.mtu = Some(mtu);
                Ok(())
            }))
        }
        L3Action::AttachNetworkServiceToL3Network(NetworkServices { network_services }) => {
            Change::Attach(services(&mn, &l3, &network_services, true)?)
        }
        L3Action::DetachNetworkServiceFromL3Network(NetworkServices { network_services }) => {
            Change::Detach(services(&mn, &l3, &network_services, false)?)
        }
    };
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, name, &keyed, move |_| async move {
            let record = match change {
                Change::Record(change) => l3::update(&m.l3s, uuid, "update", change).await?,
                Change::Attach(services) => {
                    let mut last = None;
                    for (provider, types) in services {
                        last = Some(l3::attach_services(&m.l3s, uuid, provider, types).await?);
                    }
                    strato_actors::vip::sync_snat(&m.db, &m.l3s, uuid).await?;
                    last.ok_or_else(|| ApiError::invalid("networkServices", "names no service"))?
                }
                Change::Detach(services) => {
                    let mut last = None;
                    for (provider, types) in services {
                        last = Some(l3::detach_services(&m.l3s, uuid, provider, types).await?);
                    }
                    strato_actors::vip::sync_snat(&m.db, &m.l3s, uuid).await?;
                    last.ok_or_else(|| ApiError::invalid("networkServices", "names no service"))?
                }
            };
            refresh(&m, network::hosts_of_l3(&m.db, &record)?);
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}
