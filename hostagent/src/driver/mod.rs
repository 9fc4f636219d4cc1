//! Hypervisor drivers: one trait, the real one (libvirt) and a fake (sim) beside it, and
//! none for a host that only serves files (backup storage).
//!
//! Driver calls are blocking (libvirt's API is); the server runs them on tokio's blocking
//! pool, never on the threads that carry links. A driver reports state changes it sees
//! (including ones made behind the MN's back) on the channel given to [`Driver::watch`].

use strato_proto::{
    AgentError, AgentErrorCode, AgentEvent, DiskSpec, DomainInfo, DomainSpec, HostFacts,
};
use tokio::sync::broadcast;
use uuid::Uuid;

pub mod libvirt;
pub mod none;
pub mod sim;

/// A hypervisor the agent drives.
pub trait Driver: Send + Sync + 'static {
    /// The host's facts.
    fn facts(&self) -> Result<HostFacts, AgentError>;
    /// Every domain with its state.
    fn list(&self) -> Result<Vec<DomainInfo>, AgentError>;
    /// Defines a domain (succeeds if it is already defined the same way).
    fn define(&self, spec: &DomainSpec) -> Result<(), AgentError>;
    /// Starts a domain (succeeds if it is running).
    fn start(&self, uuid: Uuid) -> Result<(), AgentError>;
    /// Asks the guest to power off.
    fn shutdown(&self, uuid: Uuid) -> Result<(), AgentError>;
    /// Powers a domain off (succeeds if it is off).
    fn destroy(&self, uuid: Uuid) -> Result<(), AgentError>;
    /// Reboots a domain.
    fn reboot(&self, uuid: Uuid) -> Result<(), AgentError>;
    /// Pauses a domain (succeeds if it is paused).
    fn suspend(&self, uuid: Uuid) -> Result<(), AgentError>;
    /// Unpauses a domain (succeeds if it is running).
    fn resume(&self, uuid: Uuid) -> Result<(), AgentError>;
    /// Removes a domain's definition (succeeds if there is none).
    fn undefine(&self, uuid: Uuid) -> Result<(), AgentError>;
    /// Plugs a disk into a running or paused domain and into its definition (succeeds if
    /// it is plugged).
    fn attach_disk(&self, uuid: Uuid, disk: &DiskSpec) -> Result<(), AgentError>;
    /// Unplugs a disk from a running or paused domain and from its definition (succeeds if
    /// it is not plugged).
    fn detach_disk(&self, uuid: Uuid, disk: &DiskSpec) -> Result<(), AgentError>;
    /// Freezes a running or paused domain's disk as a snapshot: the domain writes to
    /// `new_top`, backed by the disk's file, from now on (succeeds if it does already).
    fn snapshot_disk(&self, uuid: Uuid, disk: &DiskSpec, new_top: &str) -> Result<(), AgentError>;
    /// Merges into a running or paused domain's disk every layer of its chain above `base`
    /// (none: all of them), and waits until it is done.
    fn pull_disk(&self, uuid: Uuid, disk: &DiskSpec, base: Option<&str>) -> Result<(), AgentError>;
    /// Grows a running or paused domain's disk to `size` bytes.
    fn resize_disk(&self, uuid: Uuid, disk: &DiskSpec, size: u64) -> Result<(), AgentError>;
    /// Starts reporting state changes on `events`.
    fn watch(&self, events: broadcast::Sender<AgentEvent>);
}

pub(crate) fn not_found(uuid: Uuid) -> AgentError {
    AgentError::new(AgentErrorCode::NotFound, format!("no domain {uuid} on this host"))
}
