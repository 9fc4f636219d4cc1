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
}

impl Record for HostRecord {
    const KIND: &'static str = "host";
    const VERSION: u16 = 1;

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
    /// The domain this VM is on its host.
    pub fn domain_spec(&self) -> strato_proto::DomainSpec {
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
            Index {
                name: "ip",
                values: |v| v.vm_nics.iter().map(|n| n.ip.as_str().into()).collect(),
            },
        ]
    }
}
