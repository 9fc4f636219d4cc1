//! Deleting resources with what depends on them, by declared relations.
//!
//! Which kinds depend on which is declared with the kinds ([`crate::kinds`]): a zone's
//! clusters and L2 networks, a cluster's hosts, a host's VMs, an L2 network's L3 networks,
//! an L3 network's VMs (through their NICs), each found through an index of the dependent.
//! A deletion first finds the dependents. In `Permissive` mode (the default, ZStack's
//! check-then-delete) any dependent refuses the deletion and nothing changes. In
//! `Enforcing` mode the dependents are deleted first, deepest first, then the resource.
//! Adding a kind means declaring its dependents and how one is removed (its
//! [`Deletion`]), not touching the walk. A host is the one kind with a rule of its own: it
//! is fenced before its VMs go, so no creation places a VM on it meanwhile.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use strato_runtime::{Kind as ActorKind, RuntimeError};
use strato_storage::{Batch, Db, Expect, IndexValue, Record, StoreError};
use uuid::Uuid;

use crate::host::{self, Hosts};
use crate::kinds::{Deletion, Kind, RemoveFuture};
use crate::l3::{self, L3s};
use crate::records::{HostRecord, VmRecord};
use crate::vm::ops::{self, Lifecycle};
use crate::vm::state::VmState;
use crate::vm::{VmError, Vms};

/// A resource: its kind and UUID.
#[derive(Clone, Copy)]
pub struct Resource {
    /// Its kind.
    pub kind: &'static Kind,
    /// Its UUID.
    pub uuid: Uuid,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.api, self.uuid)
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.api, self.uuid)
    }
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.kind, other.kind) && self.uuid == other.uuid
    }
}

impl Eq for Resource {}

/// As the API shows it: `{"kind": "VmInstance", "uuid": "..."}`.
impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Resource", 2)?;
        s.serialize_field("kind", self.kind.api)?;
        s.serialize_field("uuid", &self.uuid)?;
        s.end()
    }
}

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
    #[error("{resource} is used by {} resource(s), such as {}; delete them first or use deleteMode=Enforcing", .dependents.len(), .dependents.first().map(ToString::to_string).unwrap_or_default())]
    HasDependents {
        /// What was to be deleted.
        resource: Resource,
        /// What depends on it.
        dependents: Vec<Resource>,
    },
    /// No such resource.
    #[error("{0} does not exist")]
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
    /// Deleting a VIP, an EIP or a port forwarding rule failed.
    #[error(transparent)]
    Vip(#[from] crate::vip::VipError),
    /// Deleting a volume failed.
    #[error(transparent)]
    Volume(#[from] Box<crate::volume::VolumeError>),
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A creation's resource exists already.
    #[error("{0} exists already")]
    Exists(Resource),
    /// The kind is not deleted this way.
    #[error("{} resources are not deleted with cascade", .0.kind.api)]
    NotDeletable(Resource),
    /// VMs kept booking the host's capacity (creations in flight) for too long.
    #[error("{0} still has VMs being placed on it after {1:?}; try again")]
    Busy(Resource, std::time::Duration),
}

/// What deletion needs.
#[derive(Clone, Debug)]
pub struct Deleter {
    /// The store.
    pub db: Db,
    /// Host actors.
    pub hosts: ActorKind<Hosts>,
    /// VM actors.
    pub vms: ActorKind<Vms>,
    /// L3 actors.
    pub l3s: ActorKind<L3s>,
}

const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// How long deleting a host waits for creations that booked it before its fence (and a
/// deletion waits for a VM being created).
const HOST_DRAIN_LIMIT: Duration = Duration::from_secs(60);

fn is_host(kind: &Kind) -> bool {
    kind.table.name() == HostRecord::KIND
}

impl Deleter {
    fn exists(&self, r: Resource) -> Result<bool, CascadeError> {
        Ok(r.kind.table.exists(&self.db, r.uuid)?)
    }

    /// The direct dependents of `r`, by the declared relations.
    pub fn dependents(&self, r: Resource) -> Result<Vec<Resource>, CascadeError> {
        let mut found = Vec::new();
        for (child, index) in r.kind.dependents() {
            let ids = child.table.find(&self.db, index, &IndexValue::Uuid(r.uuid))?;
            found.extend(ids.into_iter().map(|uuid| Resource { kind: child, uuid }));
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
        if !is_host(r.kind) {
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
        if is_host(r.kind) {
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

    async fn delete_one(&self, r: Resource) -> Result<(), CascadeError> {
        match r.kind.deletion {
            Deletion::Cascade(remove) | Deletion::Own(Some(remove)) => remove(self, r.uuid).await,
            Deletion::Own(None) | Deletion::Never => Err(CascadeError::NotDeletable(r)),
        }
    }

    /// Destroys and expunges a VM, once a creation in progress has ended.
    async fn remove_vm(&self, uuid: Uuid) -> Result<(), CascadeError> {
        // A VM being created cannot be destroyed beside its creation flow: wait for the
        // flow to end (it rolls back when the host goes away under it).
        let waited = std::time::Instant::now();
        let state =
            || Ok::<_, CascadeError>(self.db.get::<VmRecord>(uuid)?.map(|s| s.record.state));
        while state()? == Some(VmState::Created) {
            if waited.elapsed() > HOST_DRAIN_LIMIT {
                let vm = Resource { kind: crate::kinds::of::<VmRecord>(), uuid };
                return Err(CascadeError::Busy(vm, HOST_DRAIN_LIMIT));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        match state()? {
            None => return Ok(()),
            Some(VmState::Destroyed) => {}
            Some(_) => {
                ops::operate(&self.vms, uuid, Lifecycle::Destroy, VM_TIMEOUT, None).await?;
            }
        }
        if self.db.get::<VmRecord>(uuid)?.is_some() {
            ops::operate(&self.vms, uuid, Lifecycle::Expunge, VM_TIMEOUT, None).await?;
        }
        Ok(())
    }
}

/// Removes a record with nothing to do beyond the store (zones, clusters, L2 networks,
/// offerings), if nothing depends on it: checked again just before, and the deletion expects
/// the generation the check saw. A creation of a dependent writes this record back in its
/// own batch ([`insert`]), so one made after the check makes the deletion fail its
/// compare-and-swap and look again; one made after the deletion finds its parent gone.
pub(crate) fn remove_record<R: Record>(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move {
        let resource = Resource { kind: crate::kinds::of::<R>(), uuid: id };
        loop {
            let Some(stored) = deleter.db.get::<R>(id)? else { return Ok(()) };
            let dependents = deleter.dependents(resource)?;
            if !dependents.is_empty() {
                // Made while the deletion ran (its dependents were gone when it started).
                return Err(CascadeError::HasDependents { resource, dependents });
            }
            let mut batch = Batch::new();
            batch.delete::<R>(id, Expect::Generation(stored.generation));
            crate::records::delete_refs(&deleter.db, &mut batch, id)?;
            match deleter.db.commit(batch).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    })
}

/// Writes new record `record`, with `extra` (its tags, say) in the same atomic write, guarded
/// against the deletion of what it depends on: each record-only kind it depends on
/// ([`crate::kinds::Kind::record_parents`]) is written back as it is, expected at its
/// generation, in the same batch. A parent deleted first makes the creation fail as not
/// found; a parent another creation wrote back meanwhile is read again and the write tried
/// again.
pub async fn insert<R: Record + serde::Serialize>(
    db: &Db,
    record: &R,
    extra: impl Fn(&mut Batch) -> Result<(), StoreError>,
) -> Result<(), CascadeError> {
    let kind = crate::kinds::of::<R>();
    let inventory = crate::kinds::inventory(record)?;
    let parents: Vec<Resource> = kind
        .record_parents()
        .filter_map(|(parent, field)| {
            let uuid = inventory[field].as_str().and_then(crate::canonical_uuid)?;
            Some(Resource { kind: parent, uuid })
        })
        .collect();
    loop {
        let mut batch = Batch::new();
        batch.put(record, Expect::Absent)?;
        extra(&mut batch)?;
        for parent in &parents {
            if !parent.kind.table.touch(db, &mut batch, parent.uuid)? {
                return Err(CascadeError::NotFound(*parent));
            }
        }
        match db.commit(batch).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { id, found, .. }) => {
                if id == record.id() {
                    return Err(CascadeError::Exists(Resource { kind, uuid: id }));
                }
                if let Some(parent) = parents.iter().find(|p| p.uuid == id)
                    && found.is_none()
                {
                    return Err(CascadeError::NotFound(*parent));
                }
                // Another dependent wrote a parent back first: read it again.
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Removes a host through its actor (its link closed, its record and pin deleted).
pub(crate) fn remove_host(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move {
        // A SNAT this host held moves to the next host: those sharing one apply again.
        let neighbours = match deleter.db.get::<HostRecord>(id)? {
            Some(host) => crate::network::snat_neighbours(&deleter.db, &host.record)?,
            None => Vec::new(),
        };
        host::remove(&deleter.hosts, id).await?;
        for host in neighbours {
            host::refresh_network(&deleter.hosts, host);
        }
        Ok(())
    })
}

/// Removes an L3 network through its actor, once no address of it is held: a creation in
/// flight that holds one ends first, its VM then a dependent (which refuses the deletion) or
/// its address given back.
/// Removes an L2 network, then has the hosts it reached take its bridge (and a pool's
/// tunnels) away.
pub(crate) fn remove_l2(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move {
        let hosts = match deleter.db.get::<crate::records::L2NetworkRecord>(id)? {
            Some(l2) => crate::network::hosts_of_l2(&deleter.db, &l2.record)?,
            None => Vec::new(),
        };
        remove_record::<crate::records::L2NetworkRecord>(deleter, id).await?;
        for host in hosts {
            crate::host::refresh_network(&deleter.hosts, host);
        }
        Ok(())
    })
}

/// Removes a security group, then has its members' hosts drop its rules.
pub(crate) fn remove_security_group(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move {
        let hosts = crate::network::hosts_of_security_group(&deleter.db, id)?;
        remove_record::<crate::records::SecurityGroupRecord>(deleter, id).await?;
        for host in hosts {
            crate::host::refresh_network(&deleter.hosts, host);
        }
        Ok(())
    })
}

pub(crate) fn remove_l3(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move {
        let hosts = match deleter.db.get::<crate::records::L3NetworkRecord>(id)? {
            Some(l3) => crate::network::hosts_of_l3(&deleter.db, &l3.record)?,
            None => Vec::new(),
        };
        // Its SNAT's VIP, an address of another network, goes first.
        crate::vip::drop_vip(&deleter.db, &deleter.l3s, crate::vip::snat_vip(id)).await?;
        remove_l3_record(deleter, id).await?;
        // Its DHCP goes from the hosts it was on.
        for host in hosts {
            crate::host::refresh_network(&deleter.hosts, host);
        }
        Ok(())
    })
}

async fn remove_l3_record(deleter: &Deleter, id: Uuid) -> Result<(), CascadeError> {
    let resource =
        Resource { kind: crate::kinds::of::<crate::records::L3NetworkRecord>(), uuid: id };
    let waited = std::time::Instant::now();
    loop {
        match l3::delete(&deleter.l3s, id).await {
            Err(l3::L3Error::InUse(_)) => {
                let dependents = deleter.dependents(resource)?;
                if !dependents.is_empty() {
                    return Err(CascadeError::HasDependents { resource, dependents });
                }
                if waited.elapsed() > HOST_DRAIN_LIMIT {
                    return Err(CascadeError::Busy(resource, HOST_DRAIN_LIMIT));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            done => return Ok(done?),
        }
    }
}

/// Removes a VM as a dependent: destroyed, then expunged.
pub(crate) fn remove_vm(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(deleter.remove_vm(id))
}
