//! Deleting resources with what depends on them, by declared relations.
//!
//! [`RELATIONS`] says which kinds depend on which, and through which index: a zone's
//! clusters and L2 networks, a cluster's hosts, a host's VMs, an L2 network's L3 networks,
//! an L3 network's VMs (through their NICs). A deletion first finds the dependents. In `Permissive` mode (the default, ZStack's
//! check-then-delete) any dependent refuses the deletion and nothing changes. In `Enforcing`
//! mode the dependents are deleted first, deepest first, then the resource. Adding a kind
//! means adding a relation and a way to delete it, not touching the walk.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use strato_runtime::{Kind, RuntimeError};
use strato_storage::{Batch, Db, Expect, IndexValue};
use uuid::Uuid;

use crate::host::{self, Hosts};
use crate::l3::{self, L3s};
use crate::records::{
    ClusterRecord, HostRecord, InstanceOfferingRecord, L2NetworkRecord, L3NetworkRecord, VmRecord,
    ZoneRecord,
};
use crate::vm::ops::{self, Lifecycle};
use crate::vm::state::VmState;
use crate::vm::{VmError, Vms};

/// The kinds of resources deletion knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResourceKind {
    /// A zone.
    Zone,
    /// A cluster.
    Cluster,
    /// A host.
    Host,
    /// An L2 network.
    L2Network,
    /// An L3 network.
    L3Network,
    /// An instance offering.
    InstanceOffering,
    /// A VM.
    Vm,
}

/// A resource: its kind and UUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resource {
    /// Its kind.
    pub kind: ResourceKind,
    /// Its UUID.
    pub uuid: Uuid,
}

/// `child` depends on `parent`, found through `child`'s index `index`.
#[derive(Clone, Copy, Debug)]
pub struct Relation {
    /// The kind depended on.
    pub parent: ResourceKind,
    /// The dependent kind.
    pub child: ResourceKind,
    /// The child table's index holding the parent's UUID.
    pub index: &'static str,
}

/// Every dependency between kinds.
pub const RELATIONS: &[Relation] = &[
    Relation { parent: ResourceKind::Zone, child: ResourceKind::Cluster, index: "zone" },
    Relation { parent: ResourceKind::Cluster, child: ResourceKind::Host, index: "cluster" },
    Relation { parent: ResourceKind::Host, child: ResourceKind::Vm, index: "host" },
    Relation { parent: ResourceKind::L3Network, child: ResourceKind::Vm, index: "l3" },
    Relation { parent: ResourceKind::Zone, child: ResourceKind::L2Network, index: "zone" },
    Relation { parent: ResourceKind::L2Network, child: ResourceKind::L3Network, index: "l2" },
];

/// How a deletion treats dependents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeleteMode {
    /// Refuse while anything depends on the resource.
    #[default]
    Permissive,
    /// Delete the dependents first.
    Enforcing,
}

/// Why a deletion failed.
#[derive(Debug, thiserror::Error)]
pub enum CascadeError {
    /// Something depends on the resource (Permissive mode).
    #[error("{resource:?} is used by {} resource(s), such as {:?}; delete them first or use deleteMode=Enforcing", .dependents.len(), .dependents.first())]
    HasDependents {
        /// What was to be deleted.
        resource: Resource,
        /// What depends on it.
        dependents: Vec<Resource>,
    },
    /// No such resource.
    #[error("{0:?} does not exist")]
    NotFound(Resource),
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] strato_storage::StoreError),
    /// Deleting a VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Removing a host failed.
    #[error(transparent)]
    Host(#[from] host::HostError),
    /// Deleting an L3 network failed.
    #[error(transparent)]
    L3(#[from] l3::L3Error),
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// VMs kept booking the host's capacity (creations in flight) for too long.
    #[error("{0:?} still has VMs being placed on it after {1:?}; try again")]
    Busy(Resource, std::time::Duration),
}

/// What deletion needs.
#[derive(Clone, Debug)]
pub struct Deleter {
    /// The store.
    pub db: Db,
    /// Host actors.
    pub hosts: Kind<Hosts>,
    /// VM actors.
    pub vms: Kind<Vms>,
    /// L3 actors.
    pub l3s: Kind<L3s>,
}

const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// How long deleting a host waits for creations that booked it before its fence (and a
/// deletion waits for a VM being created).
const HOST_DRAIN_LIMIT: Duration = Duration::from_secs(60);

impl Deleter {
    fn exists(&self, r: Resource) -> Result<bool, CascadeError> {
        Ok(match r.kind {
            ResourceKind::Zone => self.db.get::<ZoneRecord>(r.uuid)?.is_some(),
            ResourceKind::Cluster => self.db.get::<ClusterRecord>(r.uuid)?.is_some(),
            ResourceKind::Host => self.db.get::<HostRecord>(r.uuid)?.is_some(),
            ResourceKind::L2Network => self.db.get::<L2NetworkRecord>(r.uuid)?.is_some(),
            ResourceKind::L3Network => self.db.get::<L3NetworkRecord>(r.uuid)?.is_some(),
            ResourceKind::InstanceOffering => {
                self.db.get::<InstanceOfferingRecord>(r.uuid)?.is_some()
            }
            ResourceKind::Vm => self.db.get::<VmRecord>(r.uuid)?.is_some(),
        })
    }

    /// The direct dependents of `r`, by the declared relations.
    pub fn dependents(&self, r: Resource) -> Result<Vec<Resource>, CascadeError> {
        let mut found = Vec::new();
        for relation in RELATIONS.iter().filter(|rel| rel.parent == r.kind) {
            let key = IndexValue::Uuid(r.uuid);
            let ids = match relation.child {
                ResourceKind::Cluster => self.db.find::<ClusterRecord>(relation.index, &key)?,
                ResourceKind::Host => self.db.find::<HostRecord>(relation.index, &key)?,
                ResourceKind::Vm => self.db.find::<VmRecord>(relation.index, &key)?,
                ResourceKind::L2Network => self.db.find::<L2NetworkRecord>(relation.index, &key)?,
                ResourceKind::L3Network => self.db.find::<L3NetworkRecord>(relation.index, &key)?,
                ResourceKind::Zone | ResourceKind::InstanceOffering => Vec::new(),
            };
            found.extend(ids.into_iter().map(|uuid| Resource { kind: relation.child, uuid }));
        }
        found.dedup();
        Ok(found)
    }

    /// Deletes `r` per `mode`. Returns everything deleted, dependents first.
    pub async fn delete(
        &self,
        r: Resource,
        mode: DeleteMode,
    ) -> Result<Vec<Resource>, CascadeError> {
        if !self.exists(r)? {
            return Err(CascadeError::NotFound(r));
        }
        if r.kind != ResourceKind::Host {
            return self.delete_unfenced(r, mode).await;
        }
        // A host is fenced first, so no creation places a VM on it while its VMs are
        // deleted; the fence is lifted if the deletion does not happen.
        host::fence(&self.hosts, r.uuid, true).await?;
        let deleted = self.delete_unfenced(r, mode).await;
        if deleted.is_err() {
            let _ = host::fence(&self.hosts, r.uuid, false).await;
        }
        deleted
    }

    async fn delete_unfenced(
        &self,
        r: Resource,
        mode: DeleteMode,
    ) -> Result<Vec<Resource>, CascadeError> {
        let dependents = self.dependents(r)?;
        if !dependents.is_empty() && mode == DeleteMode::Permissive {
            return Err(CascadeError::HasDependents { resource: r, dependents });
        }
        let mut deleted = Vec::new();
        for dependent in dependents {
            if self.exists(dependent)? {
                deleted.extend(Box::pin(self.delete(dependent, mode)).await?);
            }
        }
        if r.kind == ResourceKind::Host {
            // Creations that booked the host before the fence end one way or the other:
            // their VM appears as a dependent (and goes), or they give the booking back.
            let waited = std::time::Instant::now();
            while host::fence(&self.hosts, r.uuid, true).await? > 0 {
                let late = self.dependents(r)?;
                if !late.is_empty() && mode == DeleteMode::Permissive {
                    return Err(CascadeError::HasDependents { resource: r, dependents: late });
                }
                for dependent in late {
                    if self.exists(dependent)? {
                        deleted.extend(Box::pin(self.delete(dependent, mode)).await?);
                    }
                }
                if waited.elapsed() > HOST_DRAIN_LIMIT {
                    return Err(CascadeError::Busy(r, HOST_DRAIN_LIMIT));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        self.delete_one(r).await?;
        tracing::info!(?r, ?mode, "deleted");
        deleted.push(r);
        Ok(deleted)
    }

    async fn delete_record<R: strato_storage::Record>(
        &self,
        uuid: Uuid,
    ) -> Result<(), CascadeError> {
        let mut batch = Batch::new();
        batch.delete::<R>(uuid, Expect::Any);
        crate::records::delete_refs(&self.db, &mut batch, uuid)?;
        self.db.commit(batch).await?;
        Ok(())
    }

    async fn delete_one(&self, r: Resource) -> Result<(), CascadeError> {
        match r.kind {
            ResourceKind::Vm => {
                // A VM being created cannot be destroyed beside its creation flow: wait for
                // the flow to end (it rolls back when the host goes away under it).
                let waited = std::time::Instant::now();
                while self.db.get::<VmRecord>(r.uuid)?.map(|s| s.record.state)
                    == Some(VmState::Created)
                {
                    if waited.elapsed() > HOST_DRAIN_LIMIT {
                        return Err(CascadeError::Busy(r, HOST_DRAIN_LIMIT));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                if self.db.get::<VmRecord>(r.uuid)?.is_none() {
                    return Ok(());
                }
                let state = self.db.get::<VmRecord>(r.uuid)?.map(|s| s.record.state);
                if state != Some(VmState::Destroyed) {
                    ops::operate(&self.vms, r.uuid, Lifecycle::Destroy, VM_TIMEOUT, None).await?;
                }
                if self.db.get::<VmRecord>(r.uuid)?.is_some() {
                    ops::operate(&self.vms, r.uuid, Lifecycle::Expunge, VM_TIMEOUT, None).await?;
                }
            }
            ResourceKind::Host => host::remove(&self.hosts, r.uuid).await?,
            ResourceKind::L3Network => l3::delete(&self.l3s, r.uuid).await?,
            ResourceKind::Zone => self.delete_record::<ZoneRecord>(r.uuid).await?,
            ResourceKind::L2Network => self.delete_record::<L2NetworkRecord>(r.uuid).await?,
            ResourceKind::Cluster => self.delete_record::<ClusterRecord>(r.uuid).await?,
            ResourceKind::InstanceOffering => {
                self.delete_record::<InstanceOfferingRecord>(r.uuid).await?;
            }
        }
        Ok(())
    }
}
