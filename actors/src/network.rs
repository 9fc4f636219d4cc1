//! The network as the hosts see it: the network service providers, and each host's desired
//! network ([`render`]) derived from the store.
//!
//! The MN keeps no per-host network state of its own: a host's network is a function of
//! the records (the L2 networks attached to its cluster, the L3s on them with the Flat
//! provider's services, the NICs of the VMs placed on it and their security groups), rendered whenever it may have
//! changed and sent whole to the agent, which converges to it. So nothing is lost when a
//! message, an agent or the MN is: the next render says everything again. The host actor
//! skips a send when the render equals what the agent last acknowledged.
//!
//! Providers are ZStack's three, with fixed UUIDs: Flat (DHCP, DNS, host routes and
//! Userdata made on every host; Eip and PortForwarding in a namespace per VIP on the host
//! of the VM they reach; SNAT in a namespace on one host the private and the public
//! network both reach), VirtualRouter (listed, not made: Strato runs no router appliance)
//! and SecurityGroup. Attaching a service a provider does
//! not make is refused, rather than recorded and silently not done.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use strato_proto::net::{
    AddressGroup, BridgeSpec, DhcpHost, DhcpSpec, Firewall, FirewallRule, GuestMetadata, HostRoute,
    METADATA_ADDRESS, Nat, NetworkConfig, NicIdentity, PortRules, Protocol, Remote, Uplink,
    VipSpec, bridge_name, nic_device,
};
use strato_storage::{Batch, Db, Expect, StoreError};
use uuid::Uuid;

use crate::records::{
    EipRecord, HostRecord, L2NetworkRecord, L3NetworkRecord, NetworkServiceL3RefRecord,
    NetworkServiceProviderRecord, PortForwardingRuleRecord, SecurityGroupRecord, SecurityGroupRule,
    VipRecord, VmNic, VmRecord, l2_type,
};
use crate::vm::state::VmState;

/// The Flat provider: services made on every host.
pub const FLAT: &str = "Flat";
/// The virtual router provider: listed, not made.
pub const VIRTUAL_ROUTER: &str = "VirtualRouter";
/// The security group provider.
pub const SECURITY_GROUP: &str = "SecurityGroup";

/// The service types.
pub mod service {
    /// Addresses by DHCP.
    pub const DHCP: &str = "DHCP";
    /// DNS servers handed out by DHCP.
    pub const DNS: &str = "DNS";
    /// Routes handed out by DHCP.
    pub const HOST_ROUTE: &str = "HostRoute";
    /// Userdata and metadata.
    pub const USERDATA: &str = "Userdata";
    /// Elastic IPs.
    pub const EIP: &str = "Eip";
    /// Port forwarding.
    pub const PORT_FORWARDING: &str = "PortForwarding";
    /// Source NAT of a private network through a public one.
    pub const SNAT: &str = "SNAT";
}

/// Each provider: its type, what it offers, and which of those Strato makes.
const PROVIDERS: &[(&str, &str, &[&str], &[&str])] = &[
    (
        FLAT,
        "Flat network services, made on every host",
        &["DHCP", "Userdata", "Eip", "PortForwarding", "SNAT", "DNS", "HostRoute"],
        &["DHCP", "DNS", "HostRoute", "Userdata", "Eip", "PortForwarding", "SNAT"],
    ),
    (
        VIRTUAL_ROUTER,
        "Services of a virtual router appliance (not made by Strato)",
        &["DHCP", "DNS", "SNAT", "PortForwarding", "Eip", "LoadBalancer", "IPsec"],
        &[],
    ),
    (SECURITY_GROUP, "Security groups, made on every host", &["SecurityGroup"], &[]),
];

/// The UUID of the provider of `provider_type`, the same on every MN.
pub fn provider_uuid(provider_type: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("strato:network-service-provider:{provider_type}").as_bytes(),
    )
}

/// Whether Strato makes `service` for provider `provider_type`.
pub fn implemented(provider_type: &str, service: &str) -> bool {
    PROVIDERS.iter().any(|(t, _, _, made)| *t == provider_type && made.contains(&service))
}

/// Writes the providers a store does not have yet, and brings those it has up to what this
/// version offers (a store written by an older one lists fewer services), at every MN start.
pub async fn ensure_providers(db: &Db) -> Result<(), StoreError> {
    let mut batch = Batch::new();
    for (provider_type, description, offered, _) in PROVIDERS {
        let uuid = provider_uuid(provider_type);
        let offered: Vec<String> = offered.iter().map(ToString::to_string).collect();
        match db.get::<NetworkServiceProviderRecord>(uuid)? {
            None => {
                batch.put(
                    &NetworkServiceProviderRecord {
                        uuid,
                        name: provider_type.to_string(),
                        r#type: provider_type.to_string(),
                        description: description.to_string(),
                        network_service_types: offered,
                        attached_l2_network_uuids: Vec::new(),
                    },
                    Expect::Absent,
                )?;
            }
            Some(stored)
                if stored.record.network_service_types != offered
                    || stored.record.description != *description =>
            {
                let mut record = stored.record;
                record.network_service_types = offered;
                record.description = description.to_string();
                batch.put(&record, Expect::Generation(stored.generation))?;
            }
            Some(_) => {}
        }
    }
    if !batch.is_empty() {
        db.commit(batch).await?;
    }
    Ok(())
}

/// Why a host's network cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] StoreError),
    /// A VXLAN pool's VTEP network holds none of the host's addresses.
    #[error(
        "host {host} has no address in {cidr}, the VTEP network of VXLAN pool {pool}: give the host an address there or change the pool's vtepCidr"
    )]
    NoVtep {
        /// The host.
        host: Uuid,
        /// The pool.
        pool: Uuid,
        /// Its VTEP network.
        cidr: String,
    },
}

/// The clusters an L2 network reaches: its own attachments, or (a VXLAN network) its
/// pool's.
pub fn clusters_of(db: &Db, l2: &L2NetworkRecord) -> Result<Vec<Uuid>, StoreError> {
    match l2.pool_uuid {
        Some(pool) => Ok(db
            .get::<L2NetworkRecord>(pool)?
            .map(|p| p.record.attached_cluster_uuids)
            .unwrap_or_default()),
        None => Ok(l2.attached_cluster_uuids.clone()),
    }
}

/// The address of `host` in `cidr`, where its VXLAN tunnels end.
fn vtep_of(host: &HostRecord, cidr: &Ipv4Net) -> Option<Ipv4Addr> {
    host.facts.as_ref()?.addresses.iter().map(|a| a.address).find(|a| cidr.contains(a))
}

/// The uplink of L2 `l2` on `host` (none: a pool, which has no bridge of its own).
fn uplink(
    db: &Db,
    l2: &L2NetworkRecord,
    host: &HostRecord,
) -> Result<Option<Uplink>, NetworkError> {
    Ok(Some(match l2.r#type.as_str() {
        l2_type::VLAN => Uplink::Vlan {
            interface: l2.physical_interface.clone(),
            vlan: l2.vlan.unwrap_or_default(),
        },
        l2_type::VXLAN => {
            let Some(pool) =
                l2.pool_uuid.map(|p| db.get::<L2NetworkRecord>(p)).transpose()?.flatten()
            else {
                return Ok(None);
            };
            let pool = pool.record;
            let cidr: Ipv4Net =
                pool.vtep_cidr.as_deref().and_then(|c| c.parse().ok()).ok_or_else(|| {
                    NetworkError::NoVtep { host: host.uuid, pool: pool.uuid, cidr: "(none)".into() }
                })?;
            let local = vtep_of(host, &cidr).ok_or_else(|| NetworkError::NoVtep {
                host: host.uuid,
                pool: pool.uuid,
                cidr: cidr.to_string(),
            })?;
            let mut peers = Vec::new();
            for cluster in &pool.attached_cluster_uuids {
                for id in db.find::<HostRecord>("cluster", &(*cluster).into())? {
                    if id == host.uuid {
                        continue;
                    }
                    if let Some(peer) = db.get::<HostRecord>(id)?
                        && let Some(address) = vtep_of(&peer.record, &cidr)
                    {
                        peers.push(address);
                    }
                }
            }
            peers.sort();
            peers.dedup();
            Uplink::Vxlan { vni: l2.vni.unwrap_or_default(), local, peers }
        }
        l2_type::VXLAN_POOL => return Ok(None),
        _ => Uplink::Interface { name: l2.physical_interface.clone() },
    }))
}

/// The bridge an L2 network's NICs plug into (the same name on every host), if it has one.
pub fn bridge_of(l2: &L2NetworkRecord) -> Option<String> {
    let uplink = match l2.r#type.as_str() {
        l2_type::VLAN => Uplink::Vlan {
            interface: l2.physical_interface.clone(),
            vlan: l2.vlan.unwrap_or_default(),
        },
        l2_type::VXLAN => Uplink::Vxlan {
            vni: l2.vni.unwrap_or_default(),
            local: Ipv4Addr::UNSPECIFIED,
            peers: vec![],
        },
        l2_type::VXLAN_POOL => return None,
        _ => Uplink::Interface { name: l2.physical_interface.clone() },
    };
    Some(bridge_name(l2.uuid, &uplink))
}

/// The bridge NICs on L3 `l3` plug into: its L2's, or (an L3 on no L2) the one it names.
pub fn nic_bridge(db: &Db, l3: &L3NetworkRecord) -> Result<Option<String>, StoreError> {
    match l3.l2_network_uuid {
        Some(l2) => Ok(db.get::<L2NetworkRecord>(l2)?.and_then(|l2| bridge_of(&l2.record))),
        None => Ok(l3.bridge.clone()),
    }
}

/// The services L3 `l3` has, each with its provider's type.
pub fn services_of(db: &Db, l3: Uuid) -> Result<Vec<(String, String)>, StoreError> {
    let mut services = Vec::new();
    for id in db.find::<NetworkServiceL3RefRecord>("l3", &l3.into())? {
        if let Some(r) = db.get::<NetworkServiceL3RefRecord>(id)? {
            let provider = db
                .get::<NetworkServiceProviderRecord>(r.record.network_service_provider_uuid)?
                .map(|p| p.record.r#type)
                .unwrap_or_default();
            services.push((provider, r.record.network_service_type));
        }
    }
    Ok(services)
}

/// The host name a VM's guest gets: its `hostname` tag's first label, or its name made
/// into one.
fn guest_hostname(db: &Db, vm: &VmRecord) -> Result<String, StoreError> {
    if let Some(tokens) = crate::tags::system_tokens(db, vm.uuid, "hostname")?.into_iter().next()
        && let Some(name) = tokens.first()
    {
        return Ok(name.split('.').next().unwrap_or_default().to_owned());
    }
    let label: String = vm
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(63)
        .collect();
    Ok(label.trim_matches('-').to_owned())
}

/// The network host `host` should have now.
pub fn render(db: &Db, host: &HostRecord) -> Result<NetworkConfig, NetworkError> {
    let mut config = NetworkConfig::default();
    // The L3 networks on the host's bridges (their SNATs are looked up by UUID).
    let mut l3s = Vec::new();
    let vms: Vec<VmRecord> = db
        .find::<VmRecord>("host", &host.uuid.into())?
        .into_iter()
        .filter_map(|id| db.get::<VmRecord>(id).transpose())
        .map(|r| r.map(|s| s.record))
        .collect::<Result<_, _>>()?;
    for stored in db.scan::<L2NetworkRecord>() {
        let l2 = stored?.record;
        if !clusters_of(db, &l2)?.contains(&host.cluster_uuid) {
            continue;
        }
        let Some(uplink) = uplink(db, &l2, host)? else { continue };
        let bridge = bridge_name(l2.uuid, &uplink);
        config.bridges.push(BridgeSpec { l2: l2.uuid, name: bridge.clone(), uplink, mtu: None });
        for id in db.find::<L3NetworkRecord>("l2", &l2.uuid.into())? {
            let Some(l3) = db.get::<L3NetworkRecord>(id)?.map(|s| s.record) else { continue };
            if let Some(dhcp) = dhcp_of(db, &l3, &bridge, &vms)? {
                config.dhcp.push(dhcp);
            }
            l3s.push(l3);
        }
    }
    config.bridges.sort_by(|a, b| a.name.cmp(&b.name));
    config.dhcp.sort_by_key(|d| d.l3);
    config.firewall = firewall(db, &vms)?;
    config.vips = vips(db, &config.bridges, &vms)?;
    config.vips.extend(snat(db, host, &config.bridges, &l3s)?);
    config.vips.sort_by_key(|v| v.vip);
    Ok(config)
}

/// The SNAT namespaces host `host` holds: of each of the L3 networks on its bridges
/// (`l3s`) with the Flat SNAT and its VIP, on the first host (by UUID) both that network and
/// the VIP's public one reach.
fn snat(
    db: &Db,
    host: &HostRecord,
    bridges: &[BridgeSpec],
    l3s: &[L3NetworkRecord],
) -> Result<Vec<VipSpec>, StoreError> {
    let mut out = Vec::new();
    for private in l3s {
        let Some(vip) = db.get::<VipRecord>(crate::vip::snat_vip(private.uuid))?.map(|s| s.record)
        else {
            continue;
        };
        let Some(public) = db.get::<L3NetworkRecord>(vip.l3_network_uuid)?.map(|s| s.record) else {
            continue;
        };
        let flat_snat =
            services_of(db, private.uuid)?.iter().any(|(p, s)| p == FLAT && s == service::SNAT);
        let reaching_public = hosts_of_l3(db, &public)?;
        let home =
            hosts_of_l3(db, private)?.into_iter().filter(|h| reaching_public.contains(h)).min();
        if !flat_snat || home != Some(host.uuid) {
            continue;
        }
        let (Some(bridge), Some(range)) = (nic_bridge(db, private)?, private.ip_ranges.first())
        else {
            continue;
        };
        let prefix_len = ipnet::ipv4_mask_to_prefix(range.netmask).unwrap_or(24);
        let Some(mut spec) = vip_spec(db, &vip, bridges, (bridge, range.gateway, prefix_len))?
        else {
            continue;
        };
        let network =
            Ipv4Net::new(range.gateway, prefix_len).map(|n| n.network()).unwrap_or(range.gateway);
        spec.nat.push(Nat::Snat { network, prefix_len });
        out.push(spec);
    }
    Ok(out)
}

/// The VIP namespaces of the host whose `bridges` and `vms` these are: the EIPs of its VMs'
/// NICs, and the port forwarding of each VIP whose first attached rule (by UUID) reaches
/// one of its VMs. A VIP whose public network does not reach the host is left out.
fn vips(db: &Db, bridges: &[BridgeSpec], vms: &[VmRecord]) -> Result<Vec<VipSpec>, StoreError> {
    let mut out = Vec::new();
    let mut forwarding = std::collections::BTreeSet::new();
    let here: Vec<&VmRecord> = vms.iter().filter(|vm| vm.state != VmState::Destroyed).collect();
    for vm in &here {
        for nic in &vm.vm_nics {
            for id in db.find::<EipRecord>("nic", &nic.uuid.into())? {
                let Some(eip) = db.get::<EipRecord>(id)?.map(|s| s.record) else { continue };
                let Some(vip) = db.get::<VipRecord>(eip.vip_uuid)?.map(|s| s.record) else {
                    continue;
                };
                let Ok(guest) = nic.ip.parse() else { continue };
                let Some(private) = private_side(db, nic)? else { continue };
                let Some(mut spec) = vip_spec(db, &vip, bridges, private)? else { continue };
                spec.steered = Some(nic_device(&nic.mac));
                spec.nat.push(Nat::Eip { guest });
                out.push(spec);
            }
        }
    }
    // Port forwarding's home does not move with its VM's state (a destroyed VM keeps its
    // host), so a destroy or a recovery changes no other host's network.
    for vm in vms {
        for nic in &vm.vm_nics {
            for id in db.find::<PortForwardingRuleRecord>("nic", &nic.uuid.into())? {
                if let Some(rule) = db.get::<PortForwardingRuleRecord>(id)? {
                    forwarding.insert(rule.record.vip_uuid);
                }
            }
        }
    }
    for vip in forwarding {
        let Some(vip) = db.get::<VipRecord>(vip)?.map(|s| s.record) else { continue };
        let Some(address) = vip.private_ip.as_deref().and_then(|a| a.parse().ok()) else {
            continue;
        };
        // The rules that reach a placed VM, each with its NIC; the first one's VM is home.
        let mut rules = Vec::new();
        for rule in crate::vip::rules_of(db, vip.uuid)? {
            let Some(nic) = rule.vm_nic_uuid else { continue };
            let Ok(target) = crate::vip::nic_target(db, nic) else { continue };
            if target.vm.host_uuid.is_some() {
                rules.push((rule, target));
            }
        }
        rules.sort_by_key(|(rule, _)| rule.uuid);
        let Some((_, home)) = rules.first() else { continue };
        if !vms.iter().any(|vm| vm.uuid == home.vm.uuid) {
            continue;
        }
        let Some((bridge, _, prefix_len)) = private_side(db, &home.nic)? else { continue };
        let Some(mut spec) = vip_spec(db, &vip, bridges, (bridge, address, prefix_len))? else {
            continue;
        };
        for (rule, target) in &rules {
            let (Ok(guest), Some(protocol)) = (target.nic.ip.parse(), nat_protocol(rule)) else {
                continue;
            };
            let allowed = rule
                .allowed_cidr
                .as_deref()
                .and_then(|c| c.parse::<Ipv4Net>().ok())
                .map(|n| (n.network(), n.prefix_len()));
            spec.nat.push(Nat::Forward {
                protocol,
                vip_ports: (rule.vip_port_start, rule.vip_port_end),
                guest,
                guest_ports: (rule.private_port_start, rule.private_port_end),
                allowed,
            });
        }
        out.push(spec);
    }
    Ok(out)
}

fn nat_protocol(rule: &PortForwardingRuleRecord) -> Option<Protocol> {
    match rule.protocol_type.as_str() {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The private side of a VIP reaching `nic`: the NIC's bridge, its network's gateway and
/// prefix length.
fn private_side(db: &Db, nic: &VmNic) -> Result<Option<(String, Ipv4Addr, u8)>, StoreError> {
    let Some(l3) = db.get::<L3NetworkRecord>(nic.l3_network_uuid)?.map(|s| s.record) else {
        return Ok(None);
    };
    let (Some(bridge), Some(range)) = (nic_bridge(db, &l3)?, l3.ip_ranges.first()) else {
        return Ok(None);
    };
    Ok(Some((bridge, range.gateway, ipnet::ipv4_mask_to_prefix(range.netmask).unwrap_or(24))))
}

/// VIP `vip`'s namespace with its private side `(bridge, address, prefix length)` and no
/// translation yet, if both its networks' bridges are among the host's `bridges`.
fn vip_spec(
    db: &Db,
    vip: &VipRecord,
    bridges: &[BridgeSpec],
    (private_bridge, private_address, private_prefix_len): (String, Ipv4Addr, u8),
) -> Result<Option<VipSpec>, StoreError> {
    let Some(l3) = db.get::<L3NetworkRecord>(vip.l3_network_uuid)?.map(|s| s.record) else {
        return Ok(None);
    };
    let Some(public_bridge) = nic_bridge(db, &l3)? else { return Ok(None) };
    let on_host = |bridge: &str| bridges.iter().any(|b| b.name == bridge);
    if !on_host(&public_bridge) || !on_host(&private_bridge) {
        return Ok(None);
    }
    let (Ok(address), Ok(netmask)) = (vip.ip.parse(), vip.netmask.parse()) else {
        return Ok(None);
    };
    Ok(Some(VipSpec {
        vip: vip.uuid,
        address,
        prefix_len: ipnet::ipv4_mask_to_prefix(netmask).unwrap_or(24),
        public_bridge,
        public_gateway: vip.gateway.parse().ok(),
        private_bridge,
        private_address,
        private_prefix_len,
        steered: None,
        nat: Vec::new(),
    }))
}

/// Every bridged NIC of `vms` (held to its MAC and address), the security groups' rules
/// on them, and the members of the groups those rules name.
fn firewall(db: &Db, vms: &[VmRecord]) -> Result<Firewall, StoreError> {
    let mut out = Firewall::default();
    let mut remotes = std::collections::BTreeSet::new();
    for vm in vms.iter().filter(|vm| vm.state != VmState::Destroyed) {
        let groups: Vec<SecurityGroupRecord> = db
            .find::<SecurityGroupRecord>("vm", &vm.uuid.into())?
            .into_iter()
            .filter_map(|id| db.get::<SecurityGroupRecord>(id).transpose())
            .map(|r| r.map(|s| s.record))
            .collect::<Result<_, _>>()?;
        for nic in &vm.vm_nics {
            // Every NIC on a bridge is held to its MAC and address.
            if nic.bridge.is_some() {
                out.nics.push(NicIdentity {
                    device: nic_device(&nic.mac),
                    mac: nic.mac.clone(),
                    addresses: nic.ip.parse().into_iter().collect(),
                });
            }
            let mine: Vec<&SecurityGroupRecord> = groups
                .iter()
                .filter(|g| g.vm_nics.iter().any(|m| m.vm_nic_uuid == nic.uuid))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut port =
                PortRules { device: nic_device(&nic.mac), ingress: Vec::new(), egress: Vec::new() };
            for rule in mine.iter().flat_map(|g| &g.rules) {
                let Some(converted) = firewall_rule(rule) else { continue };
                remotes.extend(rule.remote_security_group_uuid);
                let list =
                    if rule.r#type == "Egress" { &mut port.egress } else { &mut port.ingress };
                if !list.contains(&converted) {
                    list.push(converted);
                }
            }
            out.ports.push(port);
        }
    }
    for group in remotes {
        let mut members = Vec::new();
        if let Some(sg) = db.get::<SecurityGroupRecord>(group)? {
            for member in &sg.record.vm_nics {
                let Some(vm) = db.get::<VmRecord>(member.vm_instance_uuid)? else { continue };
                if vm.record.state == VmState::Destroyed {
                    continue;
                }
                members.extend(
                    vm.record
                        .vm_nics
                        .iter()
                        .filter(|n| n.uuid == member.vm_nic_uuid)
                        .filter_map(|n| n.ip.parse::<Ipv4Addr>().ok()),
                );
            }
        }
        members.sort();
        members.dedup();
        out.groups.push(AddressGroup { name: group.simple().to_string(), members });
    }
    out.ports.sort_by(|a, b| a.device.cmp(&b.device));
    out.nics.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(out)
}

/// A stored rule as the host applies it (none: a rule the store holds wrongly, skipped).
fn firewall_rule(rule: &SecurityGroupRule) -> Option<FirewallRule> {
    let ports = u16::try_from(rule.start_port).ok().zip(u16::try_from(rule.end_port).ok());
    let protocol = match rule.protocol.as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "ICMP" => Protocol::Icmp,
        _ => Protocol::All,
    };
    let remote = match rule.remote_security_group_uuid {
        Some(group) => Remote::Group(group.simple().to_string()),
        None => {
            let net: Ipv4Net = rule.allowed_cidr.parse().ok()?;
            Remote::Cidr { address: net.network(), prefix_len: net.prefix_len() }
        }
    };
    let ports = if matches!(protocol, Protocol::Tcp | Protocol::Udp) { ports } else { None };
    Some(FirewallRule { protocol, ports, remote })
}

/// The hosts whose rules security group `group` is in: its members' and those of the
/// groups that name it as their rules' remote end.
pub fn hosts_of_security_group(db: &Db, group: Uuid) -> Result<Vec<Uuid>, StoreError> {
    let mut vms = Vec::new();
    for stored in db.scan::<SecurityGroupRecord>() {
        let sg = stored?.record;
        if sg.uuid == group || sg.rules.iter().any(|r| r.remote_security_group_uuid == Some(group))
        {
            vms.extend(sg.vm_nics.iter().map(|m| m.vm_instance_uuid));
        }
    }
    let mut hosts = Vec::new();
    for vm in vms {
        if let Some(vm) = db.get::<VmRecord>(vm)? {
            hosts.extend(vm.record.host_uuid);
        }
    }
    hosts.sort();
    hosts.dedup();
    Ok(hosts)
}

/// The flat DHCP of `l3` on `bridge`, if the L3 has the Flat provider's DHCP.
fn dhcp_of(
    db: &Db,
    l3: &L3NetworkRecord,
    bridge: &str,
    vms: &[VmRecord],
) -> Result<Option<DhcpSpec>, StoreError> {
    let services = services_of(db, l3.uuid)?;
    let flat = |service: &str| services.iter().any(|(p, s)| p == FLAT && s == service);
    let (Some(address), Some(range)) =
        (l3.dhcp_server_ip.as_deref().and_then(|a| a.parse().ok()), l3.ip_ranges.first())
    else {
        return Ok(None);
    };
    if !flat(service::DHCP) {
        return Ok(None);
    }
    let mut hosts = Vec::new();
    for vm in vms.iter().filter(|vm| vm.state != VmState::Destroyed) {
        for nic in vm.vm_nics.iter().filter(|n| n.l3_network_uuid == l3.uuid) {
            if let Ok(ip) = nic.ip.parse() {
                hosts.push(DhcpHost {
                    mac: nic.mac.clone(),
                    ip,
                    hostname: guest_hostname(db, vm)?,
                });
            }
        }
    }
    hosts.sort_by(|a, b| a.mac.cmp(&b.mac));
    let dns = if flat(service::DNS) {
        l3.dns.iter().filter_map(|d| d.parse().ok()).collect()
    } else {
        Vec::new()
    };
    let mut routes: Vec<HostRoute> = if flat(service::HOST_ROUTE) {
        l3.host_routes
            .iter()
            .filter_map(|r| {
                let net: Ipv4Net = r.prefix.parse().ok()?;
                Some(HostRoute {
                    destination: net.network(),
                    prefix_len: net.prefix_len(),
                    nexthop: r.nexthop.parse().ok()?,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let metadata = if flat(service::USERDATA) {
        // Guests reach the metadata service through the DHCP namespace (option 121).
        routes.push(HostRoute { destination: METADATA_ADDRESS, prefix_len: 32, nexthop: address });
        Some(guest_metadata(db, l3.uuid, vms)?)
    } else {
        None
    };
    Ok(Some(DhcpSpec {
        l3: l3.uuid,
        bridge: bridge.to_owned(),
        address,
        prefix_len: ipnet::ipv4_mask_to_prefix(range.netmask).unwrap_or(24),
        gateway: range.gateway,
        dns,
        routes,
        mtu: l3.mtu,
        domain: None,
        hosts,
        metadata,
    }))
}

/// What the metadata service tells each of `vms`' guests on L3 `l3`.
fn guest_metadata(db: &Db, l3: Uuid, vms: &[VmRecord]) -> Result<Vec<GuestMetadata>, StoreError> {
    let mut guests = Vec::new();
    for vm in vms.iter().filter(|vm| vm.state != VmState::Destroyed) {
        let user_data = crate::tags::system_tokens(db, vm.uuid, "userdata")?
            .into_iter()
            .next()
            .and_then(|t| crate::tags::user_data(t.first()?).ok());
        let ssh_keys: Vec<String> = crate::tags::system_tokens(db, vm.uuid, "sshkey")?
            .into_iter()
            .filter_map(|t| t.into_iter().next())
            .collect();
        for nic in vm.vm_nics.iter().filter(|n| n.l3_network_uuid == l3) {
            if let Ok(ip) = nic.ip.parse() {
                guests.push(GuestMetadata {
                    ip,
                    instance_id: vm.uuid,
                    hostname: guest_hostname(db, vm)?,
                    user_data: user_data.clone(),
                    ssh_keys: ssh_keys.clone(),
                });
            }
        }
    }
    guests.sort_by_key(|g| g.ip);
    Ok(guests)
}

/// The hosts whose network L2 network `l2` is part of.
pub fn hosts_of_l2(db: &Db, l2: &L2NetworkRecord) -> Result<Vec<Uuid>, StoreError> {
    let mut hosts = Vec::new();
    for cluster in clusters_of(db, l2)? {
        hosts.extend(db.find::<HostRecord>("cluster", &cluster.into())?);
    }
    Ok(hosts)
}

/// The hosts whose network L3 network `l3` is part of.
pub fn hosts_of_l3(db: &Db, l3: &L3NetworkRecord) -> Result<Vec<Uuid>, StoreError> {
    match l3.l2_network_uuid.map(|l2| db.get::<L2NetworkRecord>(l2)).transpose()?.flatten() {
        Some(l2) => hosts_of_l2(db, &l2.record),
        None => Ok(Vec::new()),
    }
}

/// The hosts whose SNAT namespaces may move when `host` comes or goes: those of every
/// network with a SNAT that `host` reaches (its home is the first such host by UUID).
pub fn snat_neighbours(db: &Db, host: &HostRecord) -> Result<Vec<Uuid>, StoreError> {
    let mut out = Vec::new();
    for stored in db.scan::<VipRecord>() {
        let vip = stored?.record;
        if vip.use_for.as_deref() != Some(crate::records::vip_use::SNAT) {
            continue;
        }
        let Some(private) = vip.peer_l3_network_uuid else { continue };
        let Some(l3) = db.get::<L3NetworkRecord>(private)?.map(|s| s.record) else { continue };
        let hosts = hosts_of_l3(db, &l3)?;
        if hosts.contains(&host.uuid) {
            out.extend(hosts.into_iter().filter(|h| *h != host.uuid));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The other hosts with a VXLAN tunnel to `host`: those of the clusters of every pool
/// attached to its cluster.
pub fn tunnel_peers(db: &Db, host: &HostRecord) -> Result<Vec<Uuid>, StoreError> {
    let mut peers = Vec::new();
    for stored in db.scan::<L2NetworkRecord>() {
        let l2 = stored?.record;
        if l2.r#type == l2_type::VXLAN_POOL
            && l2.attached_cluster_uuids.contains(&host.cluster_uuid)
        {
            peers.extend(hosts_of_l2(db, &l2)?.into_iter().filter(|h| *h != host.uuid));
        }
    }
    peers.sort();
    peers.dedup();
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written when Flat offered fewer services gets this version's list at start,
    /// its attachments kept.
    #[tokio::test]
    async fn a_providers_older_service_list_is_brought_up_to_date() {
        let db = Db::in_memory();
        let flat = provider_uuid(FLAT);
        let l2 = Uuid::new_v4();
        let mut batch = Batch::new();
        let old = NetworkServiceProviderRecord {
            uuid: flat,
            name: FLAT.into(),
            r#type: FLAT.into(),
            description: "older".into(),
            network_service_types: vec!["DHCP".into(), "Eip".into()],
            attached_l2_network_uuids: vec![l2],
        };
        batch.put(&old, Expect::Absent).unwrap();
        db.commit(batch).await.unwrap();
        ensure_providers(&db).await.unwrap();
        let now = db.get::<NetworkServiceProviderRecord>(flat).unwrap().unwrap().record;
        assert!(now.network_service_types.iter().any(|t| t == service::SNAT), "{now:?}");
        assert!(now.network_service_types.iter().any(|t| t == service::PORT_FORWARDING));
        assert_eq!(now.attached_l2_network_uuids, vec![l2]);
        let generation = db.get::<NetworkServiceProviderRecord>(flat).unwrap().unwrap().generation;
        ensure_providers(&db).await.unwrap();
        let again = db.get::<NetworkServiceProviderRecord>(flat).unwrap().unwrap().generation;
        assert_eq!(generation, again, "an up-to-date store is not written again");
    }
}
