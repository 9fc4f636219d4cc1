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
        ]
    }
}
