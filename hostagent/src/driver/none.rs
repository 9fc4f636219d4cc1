//! No hypervisor: the driver of an agent that only serves files, as a backup storage host
//! (ZStack's ImageStore) does. Such an agent answers the file commands (reading, writing,
//! sealing, digesting and deleting files, measuring a directory) like any other; every
//! domain operation is refused, since a VM placed on it would be a bug in the MN.

use strato_proto::{
    AgentError, AgentErrorCode, AgentEvent, DiskSpec, DomainInfo, DomainSpec, HostFacts,
};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::Driver;

/// The driver of a host that runs no VMs.
#[derive(Debug)]
pub struct NoHypervisor {
    hostname: String,
}

impl NoHypervisor {
    /// A host named `hostname`.
    pub fn new(hostname: String) -> Self {
        NoHypervisor { hostname }
    }
}

fn refused() -> AgentError {
    AgentError::new(
        AgentErrorCode::InvalidState,
        "this agent runs no VMs (it was started with --driver none, to serve backup storage)",
    )
}

impl Driver for NoHypervisor {
    fn facts(&self) -> Result<HostFacts, AgentError> {
        Ok(HostFacts {
            hostname: self.hostname.clone(),
            hypervisor: "none".into(),
            cpus: 0,
            memory_mib: 0,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            addresses: Vec::new(),
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>, AgentError> {
        Ok(Vec::new())
    }

    fn define(&self, _: &DomainSpec) -> Result<(), AgentError> {
        Err(refused())
    }

    fn start(&self, _: Uuid) -> Result<(), AgentError> {
        Err(refused())
    }

    fn shutdown(&self, _: Uuid) -> Result<(), AgentError> {
        Err(refused())
    }

    fn destroy(&self, uuid: Uuid) -> Result<(), AgentError> {
        Err(super::not_found(uuid))
    }

    fn reboot(&self, _: Uuid) -> Result<(), AgentError> {
        Err(refused())
    }

    fn suspend(&self, _: Uuid) -> Result<(), AgentError> {
        Err(refused())
    }

    fn resume(&self, _: Uuid) -> Result<(), AgentError> {
        Err(refused())
    }

    fn undefine(&self, _: Uuid) -> Result<(), AgentError> {
        Ok(())
    }

    fn attach_disk(&self, _: Uuid, _: &DiskSpec) -> Result<(), AgentError> {
        Err(refused())
    }

    fn detach_disk(&self, _: Uuid, _: &DiskSpec) -> Result<(), AgentError> {
        Err(refused())
    }

    fn snapshot_disk(&self, _: Uuid, _: &DiskSpec, _: &str) -> Result<(), AgentError> {
        Err(refused())
    }

    fn pull_disk(&self, _: Uuid, _: &DiskSpec, _: Option<&str>) -> Result<(), AgentError> {
        Err(refused())
    }

    fn resize_disk(&self, _: Uuid, _: &DiskSpec, _: u64) -> Result<(), AgentError> {
        Err(refused())
    }

    fn watch(&self, _: broadcast::Sender<AgentEvent>) {}
}
