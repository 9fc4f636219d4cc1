//! Putting a host into maintenance: its VMs move away, or stop when no host can take them.
//!
//! The host turns PreMaintenance first, so the allocator no longer picks it. Each VM on it is
//! then cold-migrated within its cluster (a running VM is stopped, moved and started again on
//! its new host). A VM no host can take is stopped where it is. The host ends in Maintenance.
//! Every step is a VM operation through its own actor, so a VM's operations never overlap
//! and each follows the state table.

use std::time::Duration;

use strato_runtime::Kind;
use strato_storage::Db;
use uuid::Uuid;

use crate::host::{self, HostError, Hosts};
use crate::records::{HostRecord, HostState, VmRecord};
use crate::vm::ops::{self, Lifecycle};
use crate::vm::state::VmState;
use crate::vm::{VmError, Vms};

const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// What maintenance did with each VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceReport {
    /// VMs moved to another host (and running again there if they ran).
    pub migrated: Vec<Uuid>,
    /// VMs stopped in place because no host could take them.
    pub stopped: Vec<Uuid>,
}

/// Why maintenance failed.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// The host failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] strato_storage::StoreError),
}

/// Puts host `id` into maintenance.
pub async fn maintain(
    db: &Db,
    hosts: &Kind<Hosts>,
    vms: &Kind<Vms>,
    id: Uuid,
) -> Result<(HostRecord, MaintenanceReport), MaintenanceError> {
    host::set_state(hosts, id, HostState::PreMaintenance).await?;
    let mut report = MaintenanceReport::default();
    for vm in db.find::<VmRecord>("host", &id.into())? {
        let Some(record) = db.get::<VmRecord>(vm)?.map(|s| s.record) else { continue };
        let was_running = matches!(record.state, VmState::Running | VmState::Paused);
        if matches!(record.state, VmState::Destroyed | VmState::Expunging) {
            continue;
        }
        if record.state != VmState::Stopped {
            ops::operate(vms, vm, Lifecycle::Stop, VM_TIMEOUT, None).await?;
        }
        match ops::migrate(vms, vm, None, ops::MIGRATE_TIMEOUT, None).await {
            Ok(_) => {
                if was_running {
                    ops::operate(vms, vm, Lifecycle::Start, VM_TIMEOUT, None).await?;
                }
                report.migrated.push(vm);
            }
            // Only "no host has room": a booking that failed for another reason is an error.
            Err(VmError::Alloc(crate::allocator::AllocError::NoHost { .. })) => {
                tracing::warn!(%vm, host = %id, "no host can take the VM; it stays stopped");
                report.stopped.push(vm);
            }
            Err(error) => return Err(error.into()),
        }
    }
    let record = host::set_state(hosts, id, HostState::Maintenance).await?;
    tracing::info!(host = %id, migrated = report.migrated.len(), stopped = report.stopped.len(), "host in maintenance");
    Ok((record, report))
}
