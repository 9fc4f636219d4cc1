//! Data volumes: created as records (NotInstantiated), made on the host of the VM they are
//! first attached to, attached and detached through that VM's queue ([`crate::vm::volumes`]),
//! deleted by ZStack's Delay policy (recoverable until the GC expunges them) and expunged
//! with their file.
//!
//! A volume's own changes (deletion, recovery, expunge) are compare-and-swap writes of its
//! record, decided again on a conflict: an attachment running in a VM's queue at the same
//! moment writes the same record, so one of the two sees the other. What a volume's status
//! allows is one table ([`allows`]), as the VM's state table is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strato_proto::{Command, DiskSpec};
use strato_runtime::{Kind, Op, Runtime, RuntimeError, Trigger};
use strato_storage::{Batch, Db, Expect, IndexValue, StoreError, Stored};
use uuid::Uuid;

use crate::host::{self, HostError, Hosts};
use crate::landed;
use crate::records::{VmRecord, VolumeRecord, VolumeStatus};
use crate::vm::ops::DeletionPolicy;
use crate::vm::state::VmState;

/// The most data volumes a VM takes (ZStack's limit: `vdb` to `vdy`).
pub const MAX_DATA_VOLUMES: u32 = 24;

/// How deleting a data volume behaves (ZStack's `volume.deletionPolicy` and
/// `volume.expungePeriod`).
#[derive(Clone, Copy, Debug)]
pub struct VolumePolicy {
    /// What deleting does.
    pub deletion: DeletionPolicy,
    /// With the Delay policy, how long a deleted volume can be recovered before the GC
    /// expunges it (`None`: only by hand).
    pub expunge_after: Option<Duration>,
    /// How many layers a snapshot tree's chain grows to before the next snapshot is a full
    /// one in a new tree (ZStack's `incrementalSnapshot.maxNum`).
    pub max_incremental_snapshots: u32,
}

/// ZStack's default `incrementalSnapshot.maxNum`.
pub const MAX_INCREMENTAL_SNAPSHOTS: u32 = 64;

impl Default for VolumePolicy {
    fn default() -> Self {
        VolumePolicy {
            deletion: DeletionPolicy::Delay,
            expunge_after: Some(Duration::from_secs(3 * 24 * 3600)),
            max_incremental_snapshots: MAX_INCREMENTAL_SNAPSHOTS,
        }
    }
}

/// An operation on a volume, for the status table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeOp {
    /// Attach it to a VM.
    Attach,
    /// Detach it from its VM.
    Detach,
    /// Delete it (Delay: recoverable).
    Delete,
    /// Recover a deleted volume.
    Recover,
    /// Expunge a deleted volume with its file.
    Expunge,
    /// Take a snapshot of it.
    Snapshot,
    /// Revert it to a snapshot.
    Revert,
    /// Grow it.
    Resize,
    /// Copy it into a template.
    Template,
    /// Move it to another host's local storage.
    Migrate,
}

impl VolumeOp {
    fn as_str(self) -> &'static str {
        match self {
            VolumeOp::Attach => "attach",
            VolumeOp::Detach => "detach",
            VolumeOp::Delete => "delete",
            VolumeOp::Recover => "recover",
            VolumeOp::Expunge => "expunge",
            VolumeOp::Snapshot => "snapshot",
            VolumeOp::Revert => "revert",
            VolumeOp::Resize => "resize",
            VolumeOp::Template => "template",
            VolumeOp::Migrate => "migrate",
        }
    }
}

/// Whether a volume in `status` allows `op` (ZStack's rules: a volume is attached when Ready
/// or NotInstantiated, recovered or expunged when Deleted, snapshotted or reverted when Ready
/// (it has a file); a Creating one is being made by an attachment, which finishes it; a
/// Migrating one is being copied, and allows nothing until it is Ready again).
pub fn allows(status: VolumeStatus, op: VolumeOp) -> bool {
    use VolumeOp::*;
    use VolumeStatus::*;
    matches!(
        (status, op),
        (NotInstantiated | Ready | Creating, Attach)
            | (NotInstantiated | Ready, Delete)
            | (Deleted, Recover | Expunge)
            | (Ready, Snapshot | Revert | Template | Migrate)
            | (NotInstantiated | Ready, Resize)
    )
}

/// Why a volume operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The runtime did not run it.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] StoreError),
    /// The host or its agent failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The volume's status does not allow the operation.
    #[error("volume {volume} is {status}: {action} is not allowed{hint}", status = .status.as_str(), action = .op.as_str())]
    InvalidStatus {
        /// The volume.
        volume: Uuid,
        /// Its status.
        status: VolumeStatus,
        /// What was asked.
        op: VolumeOp,
        /// What to do instead (empty, or starting with `: `).
        hint: &'static str,
    },
    /// The VM's state does not allow the operation.
    #[error("VM {vm} is {state}: {rule}")]
    VmState {
        /// The VM.
        vm: Uuid,
        /// Its state.
        state: &'static str,
        /// What the rule is.
        rule: &'static str,
    },
    /// The volume is attached where it cannot be used.
    #[error("{0}")]
    InUse(String),
    /// A request field is wrong (the field is named).
    #[error("{field}: {message}")]
    Invalid {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] Box<crate::vm::VmError>),
    /// The owner's quota does not take it.
    #[error(transparent)]
    Quota(#[from] crate::owners::QuotaError),
    /// The host's local storage has no room for the volume.
    #[error(
        "host {host}'s local primary storage has no room for {size} more bytes: expunge volumes there, or use another host"
    )]
    NoRoom {
        /// The host.
        host: Uuid,
        /// The volume's size.
        size: u64,
    },
    /// The shared storage has no room for the volume.
    #[error(
        "shared primary storage {storage} has no room for {size} more bytes: expunge volumes there, or add storage"
    )]
    NoSharedRoom {
        /// The storage.
        storage: Uuid,
        /// The volume's size.
        size: u64,
    },
    /// A resource named does not exist.
    #[error("{kind} {uuid} not found")]
    NotFound {
        /// Its kind's API name.
        kind: &'static str,
        /// Its UUID.
        uuid: Uuid,
    },
}

impl From<crate::vm::VmError> for VolumeError {
    fn from(error: crate::vm::VmError) -> Self {
        VolumeError::Vm(Box::new(error))
    }
}

/// A creation's failure to write its record: the store's, or what the record names that is
/// gone.
pub(crate) fn not_written(error: crate::cascade::CascadeError) -> VolumeError {
    match error {
        crate::cascade::CascadeError::Store(e) => e.into(),
        crate::cascade::CascadeError::NotFound(resource) => {
            VolumeError::NotFound { kind: resource.kind.api, uuid: resource.uuid }
        }
        other => VolumeError::InUse(other.to_string()),
    }
}

/// The volume's record, or NotFound.
pub fn get(db: &Db, volume: Uuid) -> Result<Stored<VolumeRecord>, VolumeError> {
    db.get::<VolumeRecord>(volume)?.ok_or(VolumeError::NotFound { kind: "Volume", uuid: volume })
}

/// Whether volume `v` lives on one host (local storage; a volume on no storage yet is taken
/// as such: it has no file anywhere), as opposed to shared storage every host of its
/// clusters reaches.
pub(crate) fn is_local(db: &Db, v: &VolumeRecord) -> Result<bool, StoreError> {
    Ok(storage_of(db, v)?.is_none_or(|ps| ps.is_local()))
}

/// The primary storage volume `v` is (or is to be) on, if it names one that exists.
pub(crate) fn storage_of(
    db: &Db,
    v: &VolumeRecord,
) -> Result<Option<crate::records::PrimaryStorageRecord>, StoreError> {
    let Some(ps) = v.primary_storage_uuid else { return Ok(None) };
    Ok(db.get::<crate::records::PrimaryStorageRecord>(ps)?.map(|ps| ps.record))
}

/// Books `size` bytes of host `host`'s local storage for data volume `volume` (its virtual
/// size: ZStack's thick accounting), beside the host's VMs' root volumes; refused, naming the
/// host, when they do not fit. Booking the same again changes nothing.
pub(crate) async fn book_disk(
    hosts: &Kind<Hosts>,
    host: Uuid,
    volume: Uuid,
    size: u64,
) -> Result<(), VolumeError> {
    let overcommit = host::Overcommit::default();
    if host::rebook(hosts, host, volume, move |r| r.disk = size, overcommit).await? {
        return Ok(());
    }
    Err(VolumeError::NoRoom { host, size })
}

/// Books `size` bytes for volume `volume` on storage `ps`, where host `host` makes or holds
/// it: on the host's record for local storage ([`book_disk`]), on the storage's own record
/// for shared storage (`shared_capacity`). Refused, naming where, when it does not fit.
pub(crate) async fn book_storage(
    hosts: &Kind<Hosts>,
    ps: &crate::records::PrimaryStorageRecord,
    host: Uuid,
    volume: Uuid,
    size: u64,
) -> Result<(), VolumeError> {
    if ps.is_local() {
        return book_disk(hosts, host, volume, size).await;
    }
    let db = hosts.runtime().db();
    if crate::shared_capacity::book(db, ps.uuid, volume, size).await? {
        return Ok(());
    }
    Err(VolumeError::NoSharedRoom { storage: ps.uuid, size })
}

/// Gives back what volume `v` booked where it is (its host's local storage, or its shared
/// storage); a failure is logged.
pub(crate) async fn unbook_storage(hosts: &Kind<Hosts>, v: &VolumeRecord) {
    let db = hosts.runtime().db();
    match storage_of(db, v) {
        Ok(Some(ps)) if !ps.is_local() => {
            if let Err(error) = crate::shared_capacity::unbook(db, ps.uuid, v.uuid).await {
                let error = strato_runtime::error_chain(&error);
                tracing::warn!(storage = %ps.uuid, volume = %v.uuid, %error, "a volume's shared storage booking stays");
            }
        }
        _ => {
            if let Some(host) = v.host_uuid {
                unbook_disk(hosts, host, v.uuid).await;
            }
        }
    }
}

/// Gives back what data volume `volume` booked on host `host`'s local storage; a failure is
/// logged (the host's next connect gives back bookings no volume there holds).
pub(crate) async fn unbook_disk(hosts: &Kind<Hosts>, host: Uuid, volume: Uuid) {
    if let Err(error) = host::release(hosts, host, volume).await {
        let error = strato_runtime::error_chain(&error);
        tracing::warn!(%host, %volume, %error, "a volume's local storage booking stays until the host connects again");
    }
}

/// The data volumes attached to VM `vm` (its root volume is not one).
pub fn attached_to(db: &Db, vm: Uuid) -> Result<Vec<Stored<VolumeRecord>>, StoreError> {
    let mut out = Vec::new();
    for id in db.find::<VolumeRecord>("vm", &IndexValue::Uuid(vm))? {
        out.extend(db.get::<VolumeRecord>(id)?.filter(|v| !v.record.is_root()));
    }
    out.sort_by_key(|v| v.record.device_id);
    Ok(out)
}

/// The disks VM `vm`'s domain has: its attached data volumes that are Ready (one claimed
/// by an attachment that has not made its file yet is not).
pub fn disks_of(db: &Db, vm: Uuid) -> Result<Vec<DiskSpec>, StoreError> {
    Ok(attached_to(db, vm)?
        .into_iter()
        .filter(|v| v.record.status == VolumeStatus::Ready)
        .filter_map(|v| v.record.disk())
        .collect())
}

/// Changes volume `volume`'s record with `change` (which may refuse, seeing the record as
/// it is now), decided again on a conflict.
pub(crate) async fn update(
    db: &Db,
    volume: Uuid,
    change: impl Fn(&mut VolumeRecord) -> Result<(), VolumeError>,
) -> Result<VolumeRecord, VolumeError> {
    loop {
        let stored = get(db, volume)?;
        let mut record = stored.record;
        change(&mut record)?;
        let mut batch = Batch::new();
        batch.put(&record, Expect::Generation(stored.generation))?;
        if landed(db, batch).await? {
            return Ok(record);
        }
    }
}

/// Refuses a data volume operation on a root volume (it lives and goes with its VM).
pub(crate) fn data_only(record: &VolumeRecord, op: VolumeOp) -> Result<(), VolumeError> {
    if !record.is_root() {
        return Ok(());
    }
    Err(VolumeError::Invalid {
        field: "volumeUuid",
        message: format!(
            "volume {} is VM {}'s root volume: {} is for data volumes (a root volume goes with its VM)",
            record.uuid,
            record.vm_instance_uuid.unwrap_or_default(),
            op.as_str()
        ),
    })
}

fn refuse(record: &VolumeRecord, op: VolumeOp, hint: &'static str) -> VolumeError {
    VolumeError::InvalidStatus { volume: record.uuid, status: record.status, op, hint }
}

/// How long an operation on an attached volume may wait for its VM's turn and run.
const OP_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the volume's disk is live: attached to a running or paused VM. `Err` for a VM in
/// a state that allows no change of its disks.
pub(crate) fn live(vm: Option<&VmRecord>) -> Result<bool, VolumeError> {
    match vm.map(|r| r.state) {
        None | Some(VmState::Stopped | VmState::Destroyed) => Ok(false),
        Some(VmState::Running | VmState::Paused) => Ok(true),
        Some(state) => Err(VolumeError::VmState {
            vm: vm.map(|r| r.uuid).unwrap_or_default(),
            state: state.as_str(),
            rule: "its volumes' snapshots change when it is Running, Paused, Stopped or Destroyed",
        }),
    }
}

/// Runs `op` on volume `volume`: in its VM's `lifecycle` queue (told the VM's record) when
/// it is attached, in the volume's own [`turn`] (told none) when it is not; a snapshot of it
/// left Creating is settled first, so that `op` sees where the volume's top really is, and
/// so is a move that died (the volume Ready again where its records say).
pub(crate) async fn on_volume<T, F, Fut>(
    vms: &Kind<crate::vm::Vms>,
    volume: Uuid,
    name: &'static str,
    job: Option<Uuid>,
    op: F,
) -> Result<T, VolumeError>
where
    T: Send + 'static,
    F: FnOnce(Option<VmRecord>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, VolumeError>> + Send,
{
    let db = vms.runtime().db().clone();
    let hosts = hosts_kind(vms.runtime())?;
    let Some(vm) = get(&db, volume)?.record.vm_instance_uuid else {
        let _turn = turn(volume).await;
        // Attached meanwhile: its VM's queue is the turn.
        if get(&db, volume)?.record.vm_instance_uuid.is_none() {
            // A move holds the turn while the volume is Migrating: one found so died.
            crate::local_storage::back_to_ready(&db, &hosts, volume).await?;
            crate::snapshot::settle(&db, &hosts, volume, job).await?;
            let runtime = vms.runtime();
            crate::snapshot::finish_deletions(&db, runtime, &hosts, volume, None, job).await?;
            return op(None).await;
        }
        drop(_turn);
        return Box::pin(on_volume(vms, volume, name, job, op)).await;
    };
    vms.call(vm, Op::within("lifecycle", name, OP_TIMEOUT).job(job), move |ctx| async move {
        let (record, _) = crate::vm::begin(&ctx).await?;
        if get(&db, volume)?.record.vm_instance_uuid != Some(vm) {
            return Err(VolumeError::InUse(format!(
                "volume {volume} was detached from VM {vm} meanwhile: try again"
            )));
        }
        crate::snapshot::settle(&db, &hosts, volume, job).await?;
        let runtime = ctx.runtime();
        crate::snapshot::finish_deletions(&db, runtime, &hosts, volume, Some(&record), job).await?;
        op(Some(record)).await
    })
    .await
}

/// The host kind, which volume operations command.
pub(crate) fn hosts_kind(runtime: &Runtime) -> Result<Kind<Hosts>, VolumeError> {
    runtime
        .kind::<Hosts>()
        .ok_or_else(|| VolumeError::Runtime(RuntimeError::UnknownKind { kind: "host".into() }))
}

/// The turns of detached volumes: one operation at a time on each, in this node. A detached
/// volume has no queue of its own (it is no actor); its records are compared and swapped,
/// but its files need more: a sweep of the files an operation made must not run while the
/// operation has made them and not yet named them.
static TURNS: std::sync::LazyLock<std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>> =
    std::sync::LazyLock::new(Default::default);

/// Volume `volume`'s turn, held until the guard drops.
pub(crate) struct Turn {
    volume: Uuid,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut turns = TURNS.lock().expect("volume turns");
        // Nobody else holds or waits for it: forgotten, so the table stays small.
        if turns.get(&self.volume).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(&self.volume);
        }
    }
}

/// Waits for volume `volume`'s turn (used while it is detached, or not yet recorded).
pub(crate) async fn turn(volume: Uuid) -> Turn {
    let lock = TURNS.lock().expect("volume turns").entry(volume).or_default().clone();
    Turn { volume, guard: Some(lock.lock_owned().await) }
}

/// Grows data volume `volume` to `size` bytes: live on a running VM (the guest sees the new
/// size), offline on its file otherwise; a volume without a file yet just records the size.
/// A tenant's volume is charged its new size first (given back if the growth fails).
pub async fn resize(
    vms: &Kind<crate::vm::Vms>,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    size: u64,
    job: Option<Uuid>,
) -> Result<VolumeRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let hosts = hosts.clone();
    let quotas = vms.entity().quotas().clone();
    on_volume(vms, volume, "resize-volume", job, move |vm| async move {
        let live = live(vm.as_ref())?;
        loop {
            let stored = get(&db, volume)?;
            let mut v = stored.record;
            data_only(&v, VolumeOp::Resize)?;
            if !allows(v.status, VolumeOp::Resize) {
                return Err(refuse(&v, VolumeOp::Resize, ""));
            }
            if size < v.size {
                return Err(VolumeError::Invalid {
                    field: "size",
                    message: format!(
                        "volume {volume} has {} bytes: a volume grows, it never shrinks (its guest's file systems would lose their end)",
                        v.size
                    ),
                });
            }
            // A tenant's volume is charged its new size first: the growth must fit the quota.
            let charged =
                quotas.recharge(&db, volume, crate::owners::Charge::data_volume(size)).await?;
            let ps = storage_of(&db, &v)?;
            let grown = grow(&hosts, &v, ps.as_ref(), vm.as_ref(), live, size, job).await;
            if let Err(error) = grown {
                if let Some(previous) = charged {
                    quotas.restore(&db, previous).await?;
                }
                return Err(error);
            }
            v.size = size;
            let mut batch = Batch::new();
            batch.put(&v, Expect::Generation(stored.generation))?;
            if landed(&db, batch).await? {
                return Ok(v);
            }
        }
    })
    .await
}

/// Grows volume `v`'s file to `size` bytes (live on its running VM), if it has one.
/// Its storage `ps` books the new size first, and the old again if growing fails.
async fn grow(
    hosts: &Kind<Hosts>,
    v: &VolumeRecord,
    ps: Option<&crate::records::PrimaryStorageRecord>,
    vm: Option<&VmRecord>,
    live: bool,
    size: u64,
    job: Option<Uuid>,
) -> Result<(), VolumeError> {
    let (Some(host), Some(path)) = (v.host_uuid, v.install_path.clone()) else { return Ok(()) };
    if let Some(ps) = ps {
        book_storage(hosts, ps, host, v.uuid, size).await?;
    }
    let command = match (live, vm, v.disk()) {
        (true, Some(vm), Some(disk)) => Command::ResizeDisk { uuid: vm.uuid, disk, size },
        _ => Command::ResizeVolume { path, size },
    };
    let deadline = std::time::SystemTime::now() + OP_TIMEOUT;
    if let Err(error) = host::command(hosts, host, command, deadline, job).await {
        // The old size booked again; the agent's failure is what the caller hears.
        if let Some(ps) = ps
            && let Err(rebooked) = book_storage(hosts, ps, host, v.uuid, v.size).await
        {
            let rebooked = strato_runtime::error_chain(&rebooked);
            tracing::warn!(volume = %v.uuid, error = %rebooked, "a volume that did not grow keeps its larger booking");
        }
        return Err(error.into());
    }
    Ok(())
}

/// The GC job kind that expunges a deleted volume once its grace period is over.
pub const EXPUNGE_VOLUME_JOB: &str = "volume.expunge";

/// The context of an [`EXPUNGE_VOLUME_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpungeVolumeJob {
    /// The volume.
    pub volume: Uuid,
}

fn expunge_job_name(volume: Uuid) -> String {
    format!("{EXPUNGE_VOLUME_JOB}/{volume}")
}

/// Registers the volume GC handler. Call once at startup, before `gc().start()`.
pub fn register_gc(runtime: &Runtime, hosts: Kind<Hosts>) {
    let (expunging, files) = (runtime.clone(), hosts.clone());
    runtime.gc().register_handler(EXPUNGE_VOLUME_JOB, move |job: ExpungeVolumeJob| {
        let (runtime, hosts) = (expunging.clone(), hosts.clone());
        async move {
            // Recovered (or expunged by hand) since: nothing to do.
            match runtime.db().get::<VolumeRecord>(job.volume)? {
                Some(v) if v.record.status == VolumeStatus::Deleted => {
                    expunge(&runtime, &hosts, job.volume).await?;
                }
                _ => {}
            }
            Ok(())
        }
    });
    let deleting = runtime.clone();
    runtime.gc().register_handler(DELETE_FILE_JOB, move |job: DeleteFileJob| {
        let (runtime, hosts) = (deleting.clone(), files.clone());
        async move {
            // A host deleted since is no longer managed: its files are not Strato's to
            // delete any more.
            if runtime.db().get::<VolumeRecord>(job.volume)?.is_none()
                && !crate::vm::ops::host_was_deleted(&runtime, job.host)?
            {
                delete_file(&hosts, &job).await?;
            }
            Ok(())
        }
    });
}

/// Deletes data volume `volume`, detached first (through its VM's queue). With the Delay
/// policy it turns Deleted and the GC expunges it after the grace period; with Direct it is
/// expunged at once.
pub async fn delete(
    runtime: &Runtime,
    vms: &Kind<crate::vm::Vms>,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    policy: VolumePolicy,
    job: Option<Uuid>,
) -> Result<(), VolumeError> {
    let db = runtime.db();
    let Some(stored) = db.get::<VolumeRecord>(volume)? else { return Ok(()) };
    data_only(&stored.record, VolumeOp::Delete)?;
    if stored.record.status == VolumeStatus::Deleted {
        return Ok(());
    }
    if !allows(stored.record.status, VolumeOp::Delete) {
        return Err(refuse(&stored.record, VolumeOp::Delete, ""));
    }
    if stored.record.vm_instance_uuid.is_some() {
        crate::vm::volumes::detach(vms, volume, Duration::from_secs(300), job).await?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    update(db, volume, |v| {
        if v.vm_instance_uuid.is_some() {
            return Err(VolumeError::InUse(format!(
                "volume {volume} was attached to VM {} while it was being deleted: detach it first",
                v.vm_instance_uuid.unwrap_or_default()
            )));
        }
        if !allows(v.status, VolumeOp::Delete) {
            return Err(refuse(v, VolumeOp::Delete, ""));
        }
        v.status = VolumeStatus::Deleted;
        v.deleted_at_ms = Some(now);
        Ok(())
    })
    .await?;
    if policy.deletion == DeletionPolicy::Direct {
        return expunge(runtime, hosts, volume).await;
    }
    if let Some(after) = policy.expunge_after {
        let name = expunge_job_name(volume);
        runtime
            .gc()
            .submit_after(
                &name,
                EXPUNGE_VOLUME_JOB,
                &ExpungeVolumeJob { volume },
                Trigger::default(),
                after,
            )
            .await?;
    }
    Ok(())
}

/// Recovers deleted volume `volume`: Ready again if it has a file, NotInstantiated if not.
pub async fn recover(runtime: &Runtime, volume: Uuid) -> Result<VolumeRecord, VolumeError> {
    let recovered = update(runtime.db(), volume, |v| {
        data_only(v, VolumeOp::Recover)?;
        if !allows(v.status, VolumeOp::Recover) {
            return Err(refuse(v, VolumeOp::Recover, ": only a Deleted volume is recovered"));
        }
        v.status = if v.install_path.is_some() {
            VolumeStatus::Ready
        } else {
            VolumeStatus::NotInstantiated
        };
        v.deleted_at_ms = None;
        Ok(())
    })
    .await?;
    // Its expunge job finds it recovered and does nothing; cancelling it is tidying.
    if let Err(error) =
        runtime.gc().cancel(strato_runtime::Gc::job_id(&expunge_job_name(volume))).await
    {
        tracing::warn!(%volume, %error, "a recovered volume's expunge job stays; it will find nothing to do");
    }
    Ok(recovered)
}

/// The GC job kind that deletes an expunged volume's file (submitted before the record goes,
/// for an MN that dies in between, and left when the host cannot be reached).
pub const DELETE_FILE_JOB: &str = "volume.delete-file";

/// The context of a [`DELETE_FILE_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteFileJob {
    /// The volume (its file is deleted only once its record is gone).
    pub volume: Uuid,
    /// The host holding the file.
    pub host: Uuid,
    /// The file.
    pub path: String,
}

fn file_job_name(volume: Uuid) -> String {
    format!("{DELETE_FILE_JOB}/{volume}")
}

/// How long after an expunge its file job runs (the expunge deletes the file at once and
/// cancels the job; the job is for an MN that died in between, or a host away).
const DELETE_FILE_DELAY: Duration = Duration::from_secs(30);

async fn delete_file(hosts: &Kind<Hosts>, job: &DeleteFileJob) -> Result<(), VolumeError> {
    let deadline = std::time::SystemTime::now() + Duration::from_secs(60);
    let command = Command::DeleteVolume { path: job.path.clone() };
    host::command(hosts, job.host, command, deadline, None).await?;
    Ok(())
}

/// Expunges deleted volume `volume`: its record goes, then its file. A GC job submitted
/// first deletes the file if the MN dies in between or the host cannot be reached; it deletes
/// nothing while the record exists (a volume recovered meanwhile keeps its file).
pub async fn expunge(
    runtime: &Runtime,
    hosts: &Kind<Hosts>,
    volume: Uuid,
) -> Result<(), VolumeError> {
    let db = runtime.db();
    let name = file_job_name(volume);
    loop {
        let Some(stored) = db.get::<VolumeRecord>(volume)? else { return Ok(()) };
        data_only(&stored.record, VolumeOp::Expunge)?;
        if !allows(stored.record.status, VolumeOp::Expunge) {
            return Err(refuse(&stored.record, VolumeOp::Expunge, ": delete it first"));
        }
        let file = stored.record.host_uuid.zip(stored.record.install_path.clone());
        let job = file.map(|(host, path)| DeleteFileJob { volume, host, path });
        if let Some(job) = &job {
            let trigger = crate::vm::ops::when_host_is_back(job.host);
            runtime
                .gc()
                .submit_after(&name, DELETE_FILE_JOB, job, trigger, DELETE_FILE_DELAY)
                .await?;
        }
        let mut batch = Batch::new();
        batch.delete::<VolumeRecord>(volume, Expect::Generation(stored.generation));
        crate::records::delete_refs(db, &mut batch, volume)?;
        // Its snapshots go with it, and its booking on shared storage.
        let snapshot_files = crate::snapshot::forget_all(db, &mut batch, volume)?;
        let shared = storage_of(db, &stored.record)?.filter(|ps| !ps.is_local());
        if let Some(ps) = &shared {
            crate::shared_capacity::unbook_with(db, &mut batch, ps.uuid, volume)?;
        }
        let sweep = match stored.record.host_uuid.filter(|_| !snapshot_files.is_empty()) {
            Some(host) => {
                let paths = snapshot_files.clone();
                Some(crate::snapshot::Sweep::submit(runtime, volume, host, paths).await?)
            }
            None => None,
        };
        if !landed(db, batch).await? {
            if let Some(sweep) = sweep {
                sweep.done().await;
            }
            continue;
        }
        if let Some(host) = stored.record.host_uuid {
            crate::snapshot::delete_files(hosts, host, snapshot_files).await;
            if shared.is_none() {
                unbook_disk(hosts, host, volume).await;
            }
        }
        if let Some(sweep) = sweep {
            sweep.done().await;
        }
        if let Some(job) = job {
            match delete_file(hosts, &job).await {
                Ok(()) => {
                    if let Err(error) = runtime.gc().cancel(strato_runtime::Gc::job_id(&name)).await
                    {
                        tracing::warn!(%volume, %error, "an expunged volume's file job stays; it will find nothing to do");
                    }
                }
                // The volume is expunged; its file goes when the job runs.
                Err(error) => {
                    tracing::warn!(%volume, error = %strato_runtime::error_chain(&error), "an expunged volume's file stays until its host is back");
                }
            }
        }
        return Ok(());
    }
}

/// Removes a volume that a cascade reached (its host is being deleted): detached first,
/// then expunged with its snapshots, whatever the deletion policy.
pub(crate) fn remove_volume(
    deleter: &crate::cascade::Deleter,
    id: Uuid,
) -> crate::kinds::RemoveFuture<'_> {
    Box::pin(async move {
        let boxed = |e: VolumeError| crate::cascade::CascadeError::Volume(Box::new(e));
        let Some(stored) = deleter.db.get::<VolumeRecord>(id)? else { return Ok(()) };
        // A root volume goes with its VM, which the cascade reaches on its own.
        if stored.record.is_root() {
            return Ok(());
        }
        if stored.record.vm_instance_uuid.is_some() {
            crate::vm::volumes::detach(&deleter.vms, id, OP_TIMEOUT, None).await.map_err(boxed)?;
        }
        update(&deleter.db, id, |v| {
            v.status = VolumeStatus::Deleted;
            Ok(())
        })
        .await
        .map_err(boxed)?;
        expunge(deleter.vms.runtime(), &deleter.hosts, id).await.map_err(boxed)
    })
}
