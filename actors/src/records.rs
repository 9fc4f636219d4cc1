//! The records of the resources the actors own, as stored, with their indexes.
//!
//! Field names follow ZStack's inventories (serialized in camelCase), so the API can hand a
//! record out as its inventory.

use serde::{Deserialize, Serialize};
use strato_proto::HostFacts;
use strato_storage::{Index, IndexValue, Record};
use uuid::Uuid;

use crate::vm::state::VmState;

/// A host's administrative state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    /// Takes new VMs.
    Enabled,
    /// Keeps its VMs, takes no new ones.
    Disabled,
    /// Moving its VMs away.
    PreMaintenance,
    /// Empty, for maintenance.
    Maintenance,
}

/// Whether the MN can talk to a host's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostStatus {
    /// Dialing or handshaking.
    Connecting,
    /// The link is up.
    Connected,
    /// The link is down; reconnecting with backoff.
    Disconnected,
}

impl HostStatus {
    /// The status's name, as indexed.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Connecting => "Connecting",
            HostStatus::Connected => "Connected",
            HostStatus::Disconnected => "Disconnected",
        }
    }
}

/// A KVM host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Its cluster.
    pub cluster_uuid: Uuid,
    /// Where its agent listens.
    pub management_ip: String,
    /// The agent's port.
    pub agent_port: u16,
    /// Administrative state.
    pub state: HostState,
    /// Link status.
    pub status: HostStatus,
    /// What the agent reported at the last handshake.
    pub facts: Option<HostFacts>,
    /// Why the last connection attempt failed, if it did.
    pub last_error: Option<String>,
    /// Domains the hypervisor runs that no VM record claims (reported, never adopted).
    pub strangers: Vec<Uuid>,
    /// CPU, memory and local storage booked for each VM placed on it, by VM (and local
    /// storage for each data volume on it, by volume): booking and releasing are keyed, so
    /// both are safe to repeat.
    pub reservations: std::collections::BTreeMap<Uuid, Reservation>,
    /// Its local primary storage's size, as the agent measured it at the last connect.
    pub local_storage: Option<LocalStorageCapacity>,
}

/// What one VM (or data volume) booked on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// CPUs.
    pub cpu: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Local primary storage in bytes (a volume's virtual size: ZStack's thick accounting).
    pub disk: u64,
}

/// A host's local primary storage, as measured on its filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalStorageCapacity {
    /// The primary storage.
    pub primary_storage_uuid: Uuid,
    /// The filesystem's size in bytes.
    pub total: u64,
    /// Its free bytes when measured.
    pub available_physical: u64,
}

/// A booking as versions 1 and 2 of [`HostRecord`] wrote it (no disk).
#[derive(Clone, Copy, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ReservationV2 {
    cpu: u32,
    memory: u64,
}

fn without_disk(
    old: std::collections::BTreeMap<Uuid, ReservationV2>,
) -> std::collections::BTreeMap<Uuid, Reservation> {
    old.into_iter()
        .map(|(k, r)| (k, Reservation { cpu: r.cpu, memory: r.memory, disk: 0 }))
        .collect()
}

/// Version 2 of [`HostRecord`]: bookings without disk, no local storage measured.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct HostRecordV2 {
    uuid: Uuid,
    name: String,
    cluster_uuid: Uuid,
    management_ip: String,
    agent_port: u16,
    state: HostState,
    status: HostStatus,
    facts: Option<HostFacts>,
    last_error: Option<String>,
    strangers: Vec<Uuid>,
    reservations: std::collections::BTreeMap<Uuid, ReservationV2>,
}

impl HostRecord {
    /// A host just added: enabled, its agent not reached yet, nothing booked.
    pub fn added(name: String, cluster_uuid: Uuid, management_ip: String, agent_port: u16) -> Self {
        HostRecord {
            uuid: Uuid::new_v4(),
            name,
            cluster_uuid,
            management_ip,
            agent_port,
            state: HostState::Enabled,
            status: HostStatus::Connecting,
            facts: None,
            last_error: None,
            strangers: vec![],
            reservations: Default::default(),
            local_storage: None,
        }
    }

    /// CPUs booked in all.
    pub fn reserved_cpu(&self) -> u64 {
        // Saturating: a sum past u64::MAX books everything, so nothing more fits.
        self.reservations.values().fold(0u64, |sum, r| sum.saturating_add(u64::from(r.cpu)))
    }

    /// Memory booked in all.
    pub fn reserved_memory(&self) -> u64 {
        self.reservations.values().fold(0u64, |sum, r| sum.saturating_add(r.memory))
    }

    /// Local storage booked in all.
    pub fn reserved_disk(&self) -> u64 {
        self.reservations.values().fold(0u64, |sum, r| sum.saturating_add(r.disk))
    }
}

/// Version 1 of [`HostRecord`], whose facts held no addresses.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct HostRecordV1 {
    uuid: Uuid,
    name: String,
    cluster_uuid: Uuid,
    management_ip: String,
    agent_port: u16,
    state: HostState,
    status: HostStatus,
    facts: Option<HostFactsV1>,
    last_error: Option<String>,
    strangers: Vec<Uuid>,
    reservations: std::collections::BTreeMap<Uuid, ReservationV2>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct HostFactsV1 {
    hostname: String,
    hypervisor: String,
    cpus: u32,
    memory_mib: u64,
    agent_version: String,
}

impl Record for HostRecord {
    const KIND: &'static str = "host";
    const VERSION: u16 = 3;

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: HostRecordV1 = strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(HostRecord {
                    uuid: v1.uuid,
                    name: v1.name,
                    cluster_uuid: v1.cluster_uuid,
                    management_ip: v1.management_ip,
                    agent_port: v1.agent_port,
                    state: v1.state,
                    status: v1.status,
                    facts: v1.facts.map(|f| HostFacts {
                        hostname: f.hostname,
                        hypervisor: f.hypervisor,
                        cpus: f.cpus,
                        memory_mib: f.memory_mib,
                        agent_version: f.agent_version,
                        addresses: Vec::new(),
                    }),
                    last_error: v1.last_error,
                    strangers: v1.strangers,
                    reservations: without_disk(v1.reservations),
                    local_storage: None,
                })
            }
            2 => {
                let v2: HostRecordV2 = strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(HostRecord {
                    uuid: v2.uuid,
                    name: v2.name,
                    cluster_uuid: v2.cluster_uuid,
                    management_ip: v2.management_ip,
                    agent_port: v2.agent_port,
                    state: v2.state,
                    status: v2.status,
                    facts: v2.facts,
                    last_error: v2.last_error,
                    strangers: v2.strangers,
                    reservations: without_disk(v2.reservations),
                    local_storage: None,
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "cluster", values: |h| vec![IndexValue::Uuid(h.cluster_uuid)] },
            Index { name: "status", values: |h| vec![h.status.as_str().into()] },
        ]
    }
}

/// The certificate the MN pinned for a host's agent: the one it issued when the agent
/// enrolled, or the one this MN's CA issued that the agent presented when the host (added
/// again) had no pin yet. A link to an agent presenting another certificate is refused. It is
/// kept beside the host's record, keyed by the host's UUID, so the host's inventory is
/// unchanged, and deleted with the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCertRecord {
    /// The host (the record's key).
    pub host_uuid: Uuid,
    /// The SHA-256 of the agent's certificate.
    pub fingerprint: strato_proto::Fingerprint,
}

impl Record for AgentCertRecord {
    const KIND: &'static str = "agent-cert";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.host_uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[]
    }
}

/// A VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// Its UUID (also its domain's).
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// The host it is on (or last ran on).
    pub host_uuid: Option<Uuid>,
    /// The host before the last migration or stop.
    pub last_host_uuid: Option<Uuid>,
    /// Virtual CPUs.
    pub cpu_num: u32,
    /// Memory in bytes.
    pub memory_size: u64,
    /// The root volume's path on its host, once created.
    pub root_volume_path: Option<String>,
    /// Network interfaces.
    pub vm_nics: Vec<VmNic>,
}

/// A VM's network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmNic {
    /// Its UUID.
    pub uuid: Uuid,
    /// The L3 network it is on.
    pub l3_network_uuid: Uuid,
    /// Its address.
    pub ip: String,
    /// Its MAC address.
    pub mac: String,
    /// The host bridge it plugs into.
    pub bridge: Option<String>,
}

impl VmRecord {
    /// The domain this VM is on its host, with `disks` (its data volumes').
    pub fn domain_spec(&self, disks: Vec<strato_proto::DiskSpec>) -> strato_proto::DomainSpec {
        strato_proto::DomainSpec {
            uuid: self.uuid,
            name: format!("{}-{}", self.name, &self.uuid.simple().to_string()[..8]),
            vcpus: self.cpu_num,
            memory_mib: self.memory_size >> 20,
            root_volume: self.root_volume_path.clone(),
            nics: self
                .vm_nics
                .iter()
                .map(|n| strato_proto::NicSpec { mac: n.mac.clone(), bridge: n.bridge.clone() })
                .collect(),
            disks,
        }
    }
}

impl Record for VmRecord {
    const KIND: &'static str = "vm";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index {
                name: "host",
                values: |v| v.host_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
            Index { name: "name", values: |v| vec![v.name.as_str().into()] },
            Index { name: "state", values: |v| vec![v.state.as_str().into()] },
            Index {
                name: "ip",
                values: |v| v.vm_nics.iter().map(|n| n.ip.as_str().into()).collect(),
            },
            Index {
                name: "l3",
                values: |v| v.vm_nics.iter().map(|n| IndexValue::Uuid(n.l3_network_uuid)).collect(),
            },
            Index {
                name: "nic",
                values: |v| v.vm_nics.iter().map(|n| IndexValue::Uuid(n.uuid)).collect(),
            },
        ]
    }

    fn counted_indexes() -> &'static [&'static str] {
        &["state"]
    }
}

/// An L3 network: its IP ranges and the addresses handed out from them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L3NetworkRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// The L2 network it runs on (none: not tied to one).
    pub l2_network_uuid: Option<Uuid>,
    /// Its IP ranges.
    pub ip_ranges: Vec<crate::ipam::IpRange>,
    /// DNS servers handed to guests.
    pub dns: Vec<String>,
    /// The host bridge its NICs plug into when it names no L2 network (none: user-mode
    /// networking); on an L2 network, the L2's bridge.
    pub bridge: Option<String>,
    /// The MTU handed to guests (none: the L2's).
    pub mtu: Option<u32>,
    /// Routes handed to guests by DHCP (option 121).
    pub host_routes: Vec<HostRoute>,
    /// The flat DHCP server's address, the same on every host: taken from the L3's ranges
    /// when the Flat provider's DHCP is attached, given back when it is detached.
    pub dhcp_server_ip: Option<String>,
}

/// A route handed to an L3's guests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRoute {
    /// The destination, as CIDR (`172.16.0.0/12`).
    pub prefix: String,
    /// The next hop.
    pub nexthop: String,
}

/// Version 1 of [`L3NetworkRecord`], before L3 networks named their L2 network.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct L3NetworkRecordV1 {
    uuid: Uuid,
    name: String,
    ip_ranges: Vec<crate::ipam::IpRange>,
    dns: Vec<String>,
    bridge: Option<String>,
}

/// Version 2 of [`L3NetworkRecord`], before MTU, host routes and flat DHCP.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct L3NetworkRecordV2 {
    uuid: Uuid,
    name: String,
    l2_network_uuid: Option<Uuid>,
    ip_ranges: Vec<crate::ipam::IpRange>,
    dns: Vec<String>,
    bridge: Option<String>,
}

impl Record for L3NetworkRecord {
    const KIND: &'static str = "l3";
    const VERSION: u16 = 3;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |l| vec![l.name.as_str().into()] },
            Index {
                name: "l2",
                values: |l| l.l2_network_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
        ]
    }

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        let v2 = match from_version {
            1 => {
                let v1: L3NetworkRecordV1 =
                    strato_storage::codec::decode_payload(Self::KIND, payload)?;
                L3NetworkRecordV2 {
                    uuid: v1.uuid,
                    name: v1.name,
                    l2_network_uuid: None,
                    ip_ranges: v1.ip_ranges,
                    dns: v1.dns,
                    bridge: v1.bridge,
                }
            }
            2 => strato_storage::codec::decode_payload(Self::KIND, payload)?,
            found => {
                return Err(strato_storage::CodecError::UnknownVersion {
                    kind: Self::KIND,
                    found,
                    supported: Self::VERSION,
                });
            }
        };
        Ok(L3NetworkRecord {
            uuid: v2.uuid,
            name: v2.name,
            l2_network_uuid: v2.l2_network_uuid,
            ip_ranges: v2.ip_ranges,
            dns: v2.dns,
            bridge: v2.bridge,
            mtu: None,
            host_routes: Vec::new(),
            dhcp_server_ip: None,
        })
    }
}

/// An L2 network: NoVlan (the hosts' interface), Vlan (an 802.1Q device over it), a VXLAN
/// pool (the VTEPs and VNIs of the clusters it is attached to) or a VXLAN network of a
/// pool. It reaches the hosts of the clusters it is attached to (a VXLAN network: its
/// pool's) as a bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L2NetworkRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Its zone.
    pub zone_uuid: Uuid,
    /// The hosts' interface (`eth0`; a VXLAN network: none).
    pub physical_interface: String,
    /// `L2NoVlanNetwork`, `L2VlanNetwork`, `L2VxlanNetworkPool` or `L2VxlanNetwork`.
    pub r#type: String,
    /// The clusters whose hosts have it.
    pub attached_cluster_uuids: Vec<Uuid>,
    /// A Vlan network's VLAN id.
    pub vlan: Option<u16>,
    /// A VXLAN network's VNI.
    pub vni: Option<u32>,
    /// A VXLAN network's pool.
    pub pool_uuid: Option<Uuid>,
    /// A pool's VTEP network: each host's tunnel ends at its address in it.
    pub vtep_cidr: Option<String>,
    /// A pool's VNIs (inclusive).
    pub vni_range: Option<(u32, u32)>,
}

/// The L2 network types.
pub mod l2_type {
    /// The hosts' interface as it is.
    pub const NO_VLAN: &str = "L2NoVlanNetwork";
    /// An 802.1Q VLAN over the hosts' interface.
    pub const VLAN: &str = "L2VlanNetwork";
    /// The VTEPs and VNIs VXLAN networks are made from.
    pub const VXLAN_POOL: &str = "L2VxlanNetworkPool";
    /// A VXLAN network of a pool.
    pub const VXLAN: &str = "L2VxlanNetwork";
}

/// Version 1 of [`L2NetworkRecord`]: NoVlan networks only.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct L2NetworkRecordV1 {
    uuid: Uuid,
    name: String,
    zone_uuid: Uuid,
    physical_interface: String,
    r#type: String,
    attached_cluster_uuids: Vec<Uuid>,
}

impl Record for L2NetworkRecord {
    const KIND: &'static str = "l2";
    const VERSION: u16 = 2;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "zone", values: |l| vec![IndexValue::Uuid(l.zone_uuid)] },
            Index {
                name: "pool",
                values: |l| l.pool_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
        ]
    }

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: L2NetworkRecordV1 =
                    strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(L2NetworkRecord {
                    uuid: v1.uuid,
                    name: v1.name,
                    zone_uuid: v1.zone_uuid,
                    physical_interface: v1.physical_interface,
                    r#type: v1.r#type,
                    attached_cluster_uuids: v1.attached_cluster_uuids,
                    vlan: None,
                    vni: None,
                    pool_uuid: None,
                    vtep_cidr: None,
                    vni_range: None,
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }
}

/// A network service provider (ZStack's): which service types it offers and the L2
/// networks it is attached to. The providers are fixed; the MN writes them at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkServiceProviderRecord {
    /// Its UUID (derived from its type, the same on every MN).
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// `Flat`, `VirtualRouter` or `SecurityGroup`.
    pub r#type: String,
    /// What it says it is.
    pub description: String,
    /// The service types it offers.
    pub network_service_types: Vec<String>,
    /// The L2 networks it is attached to.
    pub attached_l2_network_uuids: Vec<Uuid>,
}

impl Record for NetworkServiceProviderRecord {
    const KIND: &'static str = "network-service-provider";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "type", values: |p| vec![p.r#type.as_str().into()] }]
    }
}

/// One service of a provider on an L3 network (ZStack's `NetworkServiceL3NetworkRefVO`):
/// its UUID derives from (L3, service type), so an L3 has each service from one provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkServiceL3RefRecord {
    /// `v5(l3, type)`.
    pub uuid: Uuid,
    /// The L3 network.
    pub l3_network_uuid: Uuid,
    /// The provider.
    pub network_service_provider_uuid: Uuid,
    /// The service type (`DHCP`, `DNS`, `Userdata`...).
    pub network_service_type: String,
}

impl NetworkServiceL3RefRecord {
    /// The record UUID of service `service` on `l3`.
    pub fn id_of(l3: Uuid, service: &str) -> Uuid {
        Uuid::new_v5(&l3, format!("network-service:{service}").as_bytes())
    }
}

impl Record for NetworkServiceL3RefRecord {
    const KIND: &'static str = "network-service-l3-ref";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "l3", values: |r| vec![IndexValue::Uuid(r.l3_network_uuid)] },
            Index {
                name: "provider",
                values: |r| vec![IndexValue::Uuid(r.network_service_provider_uuid)],
            },
        ]
    }
}

/// A security group: its rules, the L3 networks it is attached to and its member NICs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Always `Enabled`.
    pub state: String,
    /// The L3 networks whose NICs may join it.
    pub attached_l3_network_uuids: Vec<Uuid>,
    /// Its rules.
    pub rules: Vec<SecurityGroupRule>,
    /// Its members.
    pub vm_nics: Vec<SecurityGroupMember>,
}

/// A rule of a security group: what it allows, in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupRule {
    /// Its UUID.
    pub uuid: Uuid,
    /// `Ingress` or `Egress`.
    pub r#type: String,
    /// `TCP`, `UDP`, `ICMP` or `ALL`.
    pub protocol: String,
    /// The first port (TCP and UDP; -1 for all).
    pub start_port: i32,
    /// The last port.
    pub end_port: i32,
    /// The other end's network (`0.0.0.0/0` for any), unless a group is named.
    pub allowed_cidr: String,
    /// The other end: the members of this group.
    pub remote_security_group_uuid: Option<Uuid>,
}

/// A NIC in a security group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupMember {
    /// The NIC.
    pub vm_nic_uuid: Uuid,
    /// Its VM.
    pub vm_instance_uuid: Uuid,
}

impl Record for SecurityGroupRecord {
    const KIND: &'static str = "security-group";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |g| vec![g.name.as_str().into()] },
            Index {
                name: "vm",
                values: |g| {
                    g.vm_nics.iter().map(|m| IndexValue::Uuid(m.vm_instance_uuid)).collect()
                },
            },
            Index {
                name: "l3",
                values: |g| {
                    g.attached_l3_network_uuids.iter().map(|l| IndexValue::Uuid(*l)).collect()
                },
            },
            Index {
                name: "nic",
                values: |g| g.vm_nics.iter().map(|m| IndexValue::Uuid(m.vm_nic_uuid)).collect(),
            },
        ]
    }
}

/// What a VIP is used for: one use at a time, as in ZStack.
pub mod vip_use {
    /// An elastic IP.
    pub const EIP: &str = "Eip";
    /// Port forwarding rules.
    pub const PORT_FORWARDING: &str = "PortForwarding";
    /// A private network's source NAT (made by the Flat SNAT service, not by users).
    pub const SNAT: &str = "SNAT";
}

/// A virtual IP: an address of a public L3 network that an EIP or port forwarding rules
/// carry to VM NICs of one private L3 network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VipRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// The public L3 network its address is on.
    pub l3_network_uuid: Uuid,
    /// Its address.
    pub ip: String,
    /// The public network's mask.
    pub netmask: String,
    /// The public network's gateway.
    pub gateway: String,
    /// `Eip`, `PortForwarding` or `SNAT` once something uses it.
    pub use_for: Option<String>,
    /// The private L3 network of the NICs it reaches, while any is attached.
    pub peer_l3_network_uuid: Option<Uuid>,
    /// Port forwarding's own address on the private network (its translations come from
    /// it), held while a rule is attached.
    pub private_ip: Option<String>,
    /// Always `Enabled`.
    pub state: String,
}

impl Record for VipRecord {
    const KIND: &'static str = "vip";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |v| vec![v.name.as_str().into()] },
            Index { name: "l3", values: |v| vec![IndexValue::Uuid(v.l3_network_uuid)] },
            Index {
                name: "peer-l3",
                values: |v| v.peer_l3_network_uuid.into_iter().map(IndexValue::Uuid).collect(),
            },
        ]
    }
}

/// An elastic IP: its VIP, and the VM NIC it carries everything to while attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EipRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its VIP.
    pub vip_uuid: Uuid,
    /// The VIP's address.
    pub vip_ip: String,
    /// The NIC it is attached to.
    pub vm_nic_uuid: Option<Uuid>,
    /// That NIC's address.
    pub guest_ip: Option<String>,
    /// Always `Enabled`.
    pub state: String,
}

impl Record for EipRecord {
    const KIND: &'static str = "eip";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |e| vec![e.name.as_str().into()] },
            Index { name: "vip", values: |e| vec![IndexValue::Uuid(e.vip_uuid)] },
            Index {
                name: "nic",
                values: |e| e.vm_nic_uuid.into_iter().map(IndexValue::Uuid).collect(),
            },
        ]
    }
}

/// A port forwarding rule: a VIP's port range carried to a VM NIC's, while attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardingRuleRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its VIP.
    pub vip_uuid: Uuid,
    /// The VIP's address.
    pub vip_ip: String,
    /// The VIP's first port.
    pub vip_port_start: u16,
    /// The VIP's last port.
    pub vip_port_end: u16,
    /// The NIC's first port.
    pub private_port_start: u16,
    /// The NIC's last port.
    pub private_port_end: u16,
    /// `TCP` or `UDP`.
    pub protocol_type: String,
    /// Only sources in this network (none: any).
    pub allowed_cidr: Option<String>,
    /// The NIC it is attached to.
    pub vm_nic_uuid: Option<Uuid>,
    /// That NIC's address.
    pub guest_ip: Option<String>,
    /// Always `Enabled`.
    pub state: String,
}

impl Record for PortForwardingRuleRecord {
    const KIND: &'static str = "port-forwarding-rule";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |r| vec![r.name.as_str().into()] },
            Index { name: "vip", values: |r| vec![IndexValue::Uuid(r.vip_uuid)] },
            Index {
                name: "nic",
                values: |r| r.vm_nic_uuid.into_iter().map(IndexValue::Uuid).collect(),
            },
        ]
    }
}

/// An address handed out: its UUID derives from (L3, IP), so writing it with
/// `Expect::Absent` can succeed only once per address, whatever else goes wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsedIpRecord {
    /// `v5(l3, ip)`.
    pub uuid: Uuid,
    /// The network.
    pub l3_network_uuid: Uuid,
    /// The address.
    pub ip: String,
    /// Who holds it (a VM NIC).
    pub owner: Uuid,
}

impl UsedIpRecord {
    /// The record UUID of `ip` on `l3`.
    pub fn id_of(l3: Uuid, ip: std::net::Ipv4Addr) -> Uuid {
        Uuid::new_v5(&l3, ip.to_string().as_bytes())
    }
}

impl Record for UsedIpRecord {
    const KIND: &'static str = "used-ip";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "l3", values: |u| vec![IndexValue::Uuid(u.l3_network_uuid)] },
            Index { name: "ip", values: |u| vec![u.ip.as_str().into()] },
        ]
    }
}

/// A zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZoneRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// A description.
    pub description: Option<String>,
}

impl Record for ZoneRecord {
    const KIND: &'static str = "zone";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "name", values: |z| vec![z.name.as_str().into()] }]
    }
}

/// A cluster of KVM hosts in a zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Its zone.
    pub zone_uuid: Uuid,
    /// Always `KVM` for now.
    pub hypervisor_type: String,
}

impl Record for ClusterRecord {
    const KIND: &'static str = "cluster";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "zone", values: |c| vec![IndexValue::Uuid(c.zone_uuid)] }]
    }
}

/// An instance offering: the CPU and memory of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceOfferingRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// CPUs.
    pub cpu_num: u32,
    /// Memory in bytes.
    pub memory_size: u64,
}

impl Record for InstanceOfferingRecord {
    const KIND: &'static str = "instance-offering";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }
}

/// A disk offering: the size of the data volumes made from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskOfferingRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// The volumes' size in bytes.
    pub disk_size: u64,
}

impl Record for DiskOfferingRecord {
    const KIND: &'static str = "disk-offering";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "name", values: |d| vec![d.name.as_str().into()] }]
    }
}

/// A data volume's status (ZStack's): made as a record only until it is first attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeStatus {
    /// A record only: its file is made on the host of the VM it is first attached to.
    NotInstantiated,
    /// Its file is being made.
    Creating,
    /// Its file exists.
    Ready,
    /// Deleted (Delay policy): recoverable until expunged.
    Deleted,
    /// Its files are being copied to another host's local storage.
    Migrating,
}

impl VolumeStatus {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeStatus::NotInstantiated => "NotInstantiated",
            VolumeStatus::Creating => "Creating",
            VolumeStatus::Ready => "Ready",
            VolumeStatus::Deleted => "Deleted",
            VolumeStatus::Migrating => "Migrating",
        }
    }
}

/// A data volume: a qcow2 file on a host's primary storage, attached to at most one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    /// Its UUID (its file's name).
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// [`ROOT_VOLUME`] or [`DATA_VOLUME`].
    pub r#type: String,
    /// Where it is in its life.
    pub status: VolumeStatus,
    /// Its virtual size in bytes.
    pub size: u64,
    /// `qcow2`.
    pub format: String,
    /// The disk offering it was made from.
    pub disk_offering_uuid: Option<Uuid>,
    /// The data volume template it is (or is to be) a copy of.
    pub root_image_uuid: Option<Uuid>,
    /// The primary storage it is (or is to be) on.
    pub primary_storage_uuid: Option<Uuid>,
    /// The host whose local storage holds its file.
    pub host_uuid: Option<Uuid>,
    /// Its file on that host (an administrator's detail).
    pub install_path: Option<String>,
    /// The VM it is attached to.
    pub vm_instance_uuid: Option<Uuid>,
    /// Its device number on that VM (1 is `vdb`).
    pub device_id: Option<u32>,
    /// When it was deleted (milliseconds since the epoch), while Deleted.
    pub deleted_at_ms: Option<u64>,
}

/// A VM's root volume (ZStack's volume type): the record mirrors its VM's `rootVolumePath`
/// and host, and goes with the VM; data volume operations refuse it.
pub const ROOT_VOLUME: &str = "Root";

/// A data volume (ZStack's volume type).
pub const DATA_VOLUME: &str = "Data";

/// The UUID of VM `vm`'s root volume (derived, as its NICs' are).
pub fn root_volume_id(vm: Uuid) -> Uuid {
    Uuid::new_v5(&vm, b"root-volume")
}

impl VolumeRecord {
    /// VM `vm`'s root volume, just made at `path` on `host`'s primary storage `ps`: Ready and
    /// attached as device 0 (`vda`).
    pub fn root(vm: &VmRecord, ps: Uuid, host: Uuid, path: String, size: u64) -> VolumeRecord {
        VolumeRecord {
            uuid: root_volume_id(vm.uuid),
            name: format!("ROOT-for-{}", vm.name),
            description: format!("Root volume for VM {}", vm.uuid),
            r#type: ROOT_VOLUME.into(),
            status: VolumeStatus::Ready,
            size,
            format: "qcow2".into(),
            disk_offering_uuid: None,
            root_image_uuid: None,
            primary_storage_uuid: Some(ps),
            host_uuid: Some(host),
            install_path: Some(path),
            vm_instance_uuid: Some(vm.uuid),
            device_id: Some(0),
            deleted_at_ms: None,
        }
    }

    /// Whether it is a VM's root volume.
    pub fn is_root(&self) -> bool {
        self.r#type == ROOT_VOLUME
    }

    /// A new data volume of `size` bytes: a record only (NotInstantiated), on no host.
    pub fn data(name: String, description: String, size: u64) -> VolumeRecord {
        VolumeRecord {
            uuid: Uuid::new_v4(),
            name,
            description,
            r#type: DATA_VOLUME.into(),
            status: VolumeStatus::NotInstantiated,
            size,
            format: "qcow2".into(),
            disk_offering_uuid: None,
            root_image_uuid: None,
            primary_storage_uuid: None,
            host_uuid: None,
            install_path: None,
            vm_instance_uuid: None,
            device_id: None,
            deleted_at_ms: None,
        }
    }

    /// The disk its VM's domain has for it, once it has a file and a device.
    pub fn disk(&self) -> Option<strato_proto::DiskSpec> {
        Some(strato_proto::DiskSpec {
            volume: self.uuid,
            path: self.install_path.clone()?,
            device_id: self.device_id?,
        })
    }
}

/// Version 1 of [`VolumeRecord`], made from no template.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct VolumeRecordV1 {
    uuid: Uuid,
    name: String,
    description: String,
    r#type: String,
    status: VolumeStatus,
    size: u64,
    format: String,
    disk_offering_uuid: Option<Uuid>,
    primary_storage_uuid: Option<Uuid>,
    host_uuid: Option<Uuid>,
    install_path: Option<String>,
    vm_instance_uuid: Option<Uuid>,
    device_id: Option<u32>,
    deleted_at_ms: Option<u64>,
}

impl Record for VolumeRecord {
    const KIND: &'static str = "volume";
    const VERSION: u16 = 2;

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: VolumeRecordV1 =
                    strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(VolumeRecord {
                    uuid: v1.uuid,
                    name: v1.name,
                    description: v1.description,
                    r#type: v1.r#type,
                    status: v1.status,
                    size: v1.size,
                    format: v1.format,
                    disk_offering_uuid: v1.disk_offering_uuid,
                    root_image_uuid: None,
                    primary_storage_uuid: v1.primary_storage_uuid,
                    host_uuid: v1.host_uuid,
                    install_path: v1.install_path,
                    vm_instance_uuid: v1.vm_instance_uuid,
                    device_id: v1.device_id,
                    deleted_at_ms: v1.deleted_at_ms,
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |v| vec![v.name.as_str().into()] },
            Index { name: "status", values: |v| vec![v.status.as_str().into()] },
            Index {
                name: "vm",
                values: |v| v.vm_instance_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
            Index {
                name: "host",
                values: |v| v.host_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
            Index {
                name: "primary-storage",
                values: |v| v.primary_storage_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
            Index {
                name: "disk-offering",
                values: |v| v.disk_offering_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
        ]
    }
}

/// A volume snapshot: a frozen layer of its volume's qcow2 chain. Its file is what its
/// volume's top was when it was taken; the layers taken after it, and the volume's top, are
/// backed by it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its volume.
    pub volume_uuid: Uuid,
    /// `Data`: its volume's type.
    pub volume_type: String,
    /// Its tree.
    pub tree_uuid: Uuid,
    /// The snapshot its file is backed by (none: the tree's root).
    pub parent_uuid: Option<Uuid>,
    /// How many snapshots are between it and its tree's root (the root's is 0).
    pub distance: u32,
    /// Whether its volume's top is backed by it (the volume is "at" this snapshot).
    pub latest: bool,
    /// `Ready`.
    pub status: String,
    /// Its volume's size when it was taken.
    pub size: u64,
    /// Its file (an administrator's detail).
    pub primary_storage_install_path: String,
    /// The primary storage holding it.
    pub primary_storage_uuid: Option<Uuid>,
    /// The host whose local storage holds it.
    pub host_uuid: Option<Uuid>,
}

impl Record for VolumeSnapshotRecord {
    const KIND: &'static str = "volume-snapshot";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |v| vec![v.name.as_str().into()] },
            Index { name: "volume", values: |v| vec![IndexValue::Uuid(v.volume_uuid)] },
            Index { name: "tree", values: |v| vec![IndexValue::Uuid(v.tree_uuid)] },
            Index {
                name: "parent",
                values: |v| v.parent_uuid.map(IndexValue::Uuid).into_iter().collect(),
            },
        ]
    }
}

/// A tree of a volume's snapshots: a root snapshot and what was taken on top of it. A
/// volume has one `current` tree, the one its top descends from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotTreeRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its volume.
    pub volume_uuid: Uuid,
    /// Whether the volume's top descends from it.
    pub current: bool,
}

impl Record for VolumeSnapshotTreeRecord {
    const KIND: &'static str = "volume-snapshot-tree";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "volume", values: |t| vec![IndexValue::Uuid(t.volume_uuid)] }]
    }
}

/// A backup storage of type ImageStore, attached to zones: a directory on its own host,
/// whose agent the MN reaches over the same authenticated link as a KVM host's, or (with no
/// `hostname`) a directory on the MN that the hosts read at the same path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupStorageRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// The directory (on its host, or on the MN and the hosts).
    pub url: String,
    /// Always `ImageStoreBackupStorage`.
    pub r#type: String,
    /// The zones it serves.
    pub attached_zone_uuids: Vec<Uuid>,
    /// The host whose agent serves it (none: the directory is on the MN).
    pub hostname: Option<String>,
    /// Its agent's port.
    pub agent_port: u16,
    /// ZStack's SSH login, kept for display: Strato's agent enrolls with a bootstrap secret,
    /// so neither it nor the password (never stored) is used.
    pub username: Option<String>,
    /// ZStack's SSH port, kept for display as `username`.
    pub ssh_port: Option<u16>,
    /// Whether the MN reaches its agent (always Connected for a directory on the MN).
    pub status: HostStatus,
    /// Why it is Disconnected.
    pub last_error: Option<String>,
    /// The size of the file system holding its directory, in bytes (0: not measured yet).
    pub total_capacity: u64,
    /// What is free there, in bytes.
    pub available_capacity: u64,
}

impl BackupStorageRecord {
    /// Whether its directory is on its own host, reached through that host's agent.
    pub fn is_remote(&self) -> bool {
        self.hostname.is_some()
    }
}

/// A backup storage record as version 1 wrote it (a directory on the MN).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct BackupStorageRecordV1 {
    uuid: Uuid,
    name: String,
    url: String,
    r#type: String,
    attached_zone_uuids: Vec<Uuid>,
}

impl Record for BackupStorageRecord {
    const KIND: &'static str = "backup-storage";
    const VERSION: u16 = 2;

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: BackupStorageRecordV1 =
                    strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(BackupStorageRecord {
                    uuid: v1.uuid,
                    name: v1.name,
                    url: v1.url,
                    r#type: v1.r#type,
                    attached_zone_uuids: v1.attached_zone_uuids,
                    hostname: None,
                    agent_port: 7070,
                    username: None,
                    ssh_port: None,
                    status: HostStatus::Connected,
                    last_error: None,
                    total_capacity: 0,
                    available_capacity: 0,
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }

    fn id(&self) -> Uuid {
        self.uuid
    }
}

/// A primary storage of type LocalStorage: a directory on each host of the clusters it is
/// attached to, holding the image cache and the VMs' volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrimaryStorageRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// The directory on each host.
    pub url: String,
    /// Its zone.
    pub zone_uuid: Uuid,
    /// [`LOCAL_STORAGE`], [`SHARED_MOUNT_POINT`] or [`NFS`].
    pub r#type: String,
    /// The clusters whose hosts use it.
    pub attached_cluster_uuids: Vec<Uuid>,
    /// Where each host mounts it (NFS; the others are used at `url`).
    pub mount_path: Option<String>,
}

/// A primary storage record as version 1 wrote it (no mount path).
#[derive(Deserialize)]
struct PrimaryStorageRecordV1 {
    uuid: Uuid,
    name: String,
    url: String,
    zone_uuid: Uuid,
    r#type: String,
    attached_cluster_uuids: Vec<Uuid>,
}

/// Primary storage on each host's own disk: a volume lives on one host.
pub const LOCAL_STORAGE: &str = "LocalStorage";

/// Primary storage in one directory every host of its clusters mounts (ZStack's
/// SharedMountPoint): a volume is reachable from any of them.
pub const SHARED_MOUNT_POINT: &str = "SharedMountPoint";

/// Primary storage on an NFS export every host of its clusters mounts at `mount_path`.
pub const NFS: &str = "NFS";

impl PrimaryStorageRecord {
    /// Whether each host has its own (local storage), so a volume lives on one host.
    pub fn is_local(&self) -> bool {
        self.r#type == LOCAL_STORAGE
    }

    /// The directory its files are under on each host.
    pub fn base_dir(&self) -> &str {
        self.mount_path.as_deref().unwrap_or(&self.url).trim_end_matches('/')
    }

    fn dir(&self, name: &str) -> String {
        format!("{}/{name}", self.base_dir())
    }

    /// Where the images its root volumes are backed by are cached (on each host, for local
    /// storage).
    pub fn image_cache_dir(&self) -> String {
        self.dir("imagecache")
    }

    /// Where each host keeps root volumes.
    pub fn root_volumes_dir(&self) -> String {
        self.dir("rootvolumes")
    }

    /// Where each host keeps data volumes and their snapshots.
    pub fn data_volumes_dir(&self) -> String {
        self.dir("datavolumes")
    }
}

impl Record for PrimaryStorageRecord {
    const KIND: &'static str = "primary-storage";
    const VERSION: u16 = 2;

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: PrimaryStorageRecordV1 =
                    strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(PrimaryStorageRecord {
                    uuid: v1.uuid,
                    name: v1.name,
                    url: v1.url,
                    zone_uuid: v1.zone_uuid,
                    r#type: v1.r#type,
                    attached_cluster_uuids: v1.attached_cluster_uuids,
                    mount_path: None,
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }

    fn id(&self) -> Uuid {
        self.uuid
    }
}

/// An image, downloaded into a backup storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Where it came from (`file://...` or `http://...`).
    pub url: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// What it is for: [`ROOT_VOLUME_TEMPLATE`] (a VM boots from it) or
    /// [`DATA_VOLUME_TEMPLATE`] (data volumes are made from it).
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of its bytes.
    pub checksum: String,
    /// Where it is: backup storage UUID and path there.
    pub backup_storage_refs: Vec<(Uuid, String)>,
    /// `Ready` once downloaded.
    pub status: String,
}

/// An image a VM boots from (ZStack's media type).
pub const ROOT_VOLUME_TEMPLATE: &str = "RootVolumeTemplate";

/// An image data volumes are made from (ZStack's media type).
pub const DATA_VOLUME_TEMPLATE: &str = "DataVolumeTemplate";

/// Version 1 of [`ImageRecord`], when every image was a root volume template.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ImageRecordV1 {
    uuid: Uuid,
    name: String,
    url: String,
    format: String,
    size: u64,
    checksum: String,
    backup_storage_refs: Vec<(Uuid, String)>,
    status: String,
}

impl Record for ImageRecord {
    const KIND: &'static str = "image";
    const VERSION: u16 = 2;

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: ImageRecordV1 = strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(ImageRecord {
                    uuid: v1.uuid,
                    name: v1.name,
                    url: v1.url,
                    format: v1.format,
                    media_type: ROOT_VOLUME_TEMPLATE.into(),
                    size: v1.size,
                    checksum: v1.checksum,
                    backup_storage_refs: v1.backup_storage_refs,
                    status: v1.status,
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }

    fn id(&self) -> Uuid {
        self.uuid
    }
}

/// Adds to `batch` the deletion of everything that hangs on `resource`: its user and system
/// tags, its ownership record and, for a host, its agent's pinned certificate. Every deletion of a resource calls it, so they go in the
/// same atomic write as the resource.
pub fn delete_refs(
    db: &strato_storage::Db,
    batch: &mut strato_storage::Batch,
    resource: Uuid,
) -> Result<(), strato_storage::StoreError> {
    use crate::tags::{SystemTag, UserTag};
    use strato_storage::Expect;
    for id in db.find::<UserTag>("resource", &IndexValue::Uuid(resource))? {
        batch.delete::<UserTag>(id, Expect::Any);
    }
    for id in db.find::<SystemTag>("resource", &IndexValue::Uuid(resource))? {
        batch.delete::<SystemTag>(id, Expect::Any);
    }
    batch.delete::<crate::owners::OwnerRecord>(resource, Expect::Any);
    // A host's pin goes with it, whichever path deletes it (an addition that failed, too).
    batch.delete::<AgentCertRecord>(resource, Expect::Any);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_l3_networks_upgrade_without_an_l2() {
        let v1 = L3NetworkRecordV1 {
            uuid: Uuid::new_v4(),
            name: "old".into(),
            ip_ranges: vec![],
            dns: vec!["8.8.8.8".into()],
            bridge: None,
        };
        let payload = strato_storage::codec::encode_payload(L3NetworkRecord::KIND, &v1).unwrap();
        let upgraded = L3NetworkRecord::upgrade(1, &payload).unwrap();
        assert_eq!(
            (upgraded.uuid, upgraded.name.as_str(), upgraded.l2_network_uuid),
            (v1.uuid, "old", None)
        );
        assert!(L3NetworkRecord::upgrade(7, &payload).is_err());
    }

    #[test]
    fn version_1_backup_storage_is_a_directory_on_the_mn() {
        let v1 = BackupStorageRecordV1 {
            uuid: Uuid::new_v4(),
            name: "old".into(),
            url: "/bs".into(),
            r#type: "ImageStoreBackupStorage".into(),
            attached_zone_uuids: vec![Uuid::new_v4()],
        };
        let payload =
            strato_storage::codec::encode_payload(BackupStorageRecord::KIND, &v1).unwrap();
        let upgraded = BackupStorageRecord::upgrade(1, &payload).unwrap();
        assert_eq!((upgraded.uuid, upgraded.url.as_str()), (v1.uuid, "/bs"));
        assert_eq!(upgraded.attached_zone_uuids, v1.attached_zone_uuids);
        assert!(!upgraded.is_remote());
        assert_eq!(upgraded.status, HostStatus::Connected);
    }

    #[test]
    fn version_1_images_are_root_volume_templates_and_volumes_from_no_template() {
        let image = ImageRecordV1 {
            uuid: Uuid::new_v4(),
            name: "old".into(),
            url: "file:///i.qcow2".into(),
            format: "qcow2".into(),
            size: 7,
            checksum: "sha256:00".into(),
            backup_storage_refs: vec![(Uuid::new_v4(), "/bs/i.qcow2".into())],
            status: "Ready".into(),
        };
        let payload = strato_storage::codec::encode_payload(ImageRecord::KIND, &image).unwrap();
        let upgraded = ImageRecord::upgrade(1, &payload).unwrap();
        assert_eq!((upgraded.uuid, upgraded.size), (image.uuid, 7));
        assert_eq!(upgraded.media_type, ROOT_VOLUME_TEMPLATE);
        assert_eq!(upgraded.backup_storage_refs, image.backup_storage_refs);

        let volume = VolumeRecordV1 {
            uuid: Uuid::new_v4(),
            name: "old".into(),
            description: String::new(),
            r#type: "Data".into(),
            status: VolumeStatus::Ready,
            size: 1 << 20,
            format: "qcow2".into(),
            disk_offering_uuid: None,
            primary_storage_uuid: Some(Uuid::new_v4()),
            host_uuid: Some(Uuid::new_v4()),
            install_path: Some("/ps/v.qcow2".into()),
            vm_instance_uuid: Some(Uuid::new_v4()),
            device_id: Some(1),
            deleted_at_ms: None,
        };
        let payload = strato_storage::codec::encode_payload(VolumeRecord::KIND, &volume).unwrap();
        let upgraded = VolumeRecord::upgrade(1, &payload).unwrap();
        assert_eq!(upgraded.root_image_uuid, None);
        assert_eq!(
            (upgraded.install_path, upgraded.vm_instance_uuid, upgraded.device_id),
            (volume.install_path, volume.vm_instance_uuid, Some(1))
        );
        assert!(VolumeRecord::upgrade(9, &payload).is_err());
    }

    #[test]
    fn hosts_written_before_disk_bookings_keep_their_bookings_with_no_disk() {
        let vm = Uuid::new_v4();
        let host = HostRecordV2 {
            uuid: Uuid::new_v4(),
            name: "h".into(),
            cluster_uuid: Uuid::new_v4(),
            management_ip: "127.0.0.1".into(),
            agent_port: 7070,
            state: HostState::Enabled,
            status: HostStatus::Connected,
            facts: None,
            last_error: None,
            strangers: vec![],
            reservations: [(vm, ReservationV2 { cpu: 2, memory: 1 << 30 })].into(),
        };
        let payload = strato_storage::codec::encode_payload(HostRecord::KIND, &host).unwrap();
        let upgraded = HostRecord::upgrade(2, &payload).unwrap();
        assert_eq!(upgraded.reservations[&vm], Reservation { cpu: 2, memory: 1 << 30, disk: 0 });
        assert_eq!((upgraded.reserved_disk(), upgraded.local_storage), (0, None));
        assert!(HostRecord::upgrade(4, &payload).is_err());
    }

    #[test]
    fn records_written_before_the_host_network_upgrade() {
        let host = HostRecordV1 {
            uuid: Uuid::new_v4(),
            name: "h".into(),
            cluster_uuid: Uuid::new_v4(),
            management_ip: "127.0.0.1".into(),
            agent_port: 7070,
            state: HostState::Enabled,
            status: HostStatus::Connected,
            facts: Some(HostFactsV1 {
                hostname: "h".into(),
                hypervisor: "sim".into(),
                cpus: 4,
                memory_mib: 1024,
                agent_version: "0".into(),
            }),
            last_error: None,
            strangers: vec![],
            reservations: Default::default(),
        };
        let payload = strato_storage::codec::encode_payload(HostRecord::KIND, &host).unwrap();
        let upgraded = HostRecord::upgrade(1, &payload).unwrap();
        assert_eq!(upgraded.facts.unwrap().cpus, 4);

        let l2 = L2NetworkRecordV1 {
            uuid: Uuid::new_v4(),
            name: "l2".into(),
            zone_uuid: Uuid::new_v4(),
            physical_interface: "eth0".into(),
            r#type: l2_type::NO_VLAN.into(),
            attached_cluster_uuids: vec![],
        };
        let payload = strato_storage::codec::encode_payload(L2NetworkRecord::KIND, &l2).unwrap();
        let upgraded = L2NetworkRecord::upgrade(1, &payload).unwrap();
        assert_eq!((upgraded.physical_interface.as_str(), upgraded.vni), ("eth0", None));

        let l3 = L3NetworkRecordV2 {
            uuid: Uuid::new_v4(),
            name: "l3".into(),
            l2_network_uuid: Some(l2.uuid),
            ip_ranges: vec![],
            dns: vec![],
            bridge: None,
        };
        let payload = strato_storage::codec::encode_payload(L3NetworkRecord::KIND, &l3).unwrap();
        let upgraded = L3NetworkRecord::upgrade(2, &payload).unwrap();
        assert_eq!((upgraded.l2_network_uuid, upgraded.mtu), (Some(l2.uuid), None));
    }
}
