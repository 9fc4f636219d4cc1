//! Volume snapshots: layers of a volume's qcow2 chain, in trees.
//!
//! A data volume's chain starts at its first file; a root volume's starts at the image
//! cache its first file is backed by, which no operation here touches (a merge of the
//! oldest layer rebases the top onto nothing, so the top then stands alone, image
//! included). A root volume's top is its VM's `root_volume_path` too, written with it.
//!
//! Taking a snapshot freezes the volume's top file (its file becomes the snapshot's) and
//! gives the volume a new top backed by it: offline with `qemu-img create -b`, live on a
//! running VM with libvirt's external, disk-only snapshot. Reverting (volume detached or VM
//! stopped) gives the volume a new top backed by the snapshot and deletes the old top.
//! Deleting a snapshot deletes its descendants too; if the volume's top is backed by one of
//! them, every layer from the snapshot down is first merged into the top (offline with
//! `qemu-img rebase`, live with a block pull), so the volume keeps its data and every other
//! snapshot keeps its own. Nothing is ever committed into a lower layer: a layer with two
//! children, or one another volume uses, would be corrupted for the other.
//!
//! On an attached volume every operation runs in its VM's `lifecycle` queue; a detached
//! volume's operations run in its turn (`volume::turn`, which an attachment takes too) and
//! compare-and-swap its record, and one that loses gives back the file it made and decides
//! again. Records are written before old files are deleted; a file whose
//! deletion fails is left to the GC's delete-volume job (the host may be away).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strato_proto::Command;
use strato_runtime::Kind;
use strato_storage::{Batch, Db, Expect, IndexValue, Stored};
use uuid::Uuid;

use crate::host::{self, Hosts};
use crate::landed;
use crate::records::{VolumeRecord, VolumeSnapshotRecord, VolumeSnapshotTreeRecord, VolumeStatus};
use crate::vm::Vms;
use crate::volume::{self, VolumeError};

/// How long a snapshot operation's agent commands may take.
const TIMEOUT: Duration = Duration::from_secs(600);

/// A volume's snapshots, by UUID.
pub fn snapshots_of(
    db: &Db,
    volume: Uuid,
) -> Result<BTreeMap<Uuid, Stored<VolumeSnapshotRecord>>, VolumeError> {
    let mut out = BTreeMap::new();
    for id in db.find::<VolumeSnapshotRecord>("volume", &IndexValue::Uuid(volume))? {
        if let Some(stored) = db.get::<VolumeSnapshotRecord>(id)? {
            out.insert(id, stored);
        }
    }
    Ok(out)
}

/// A volume's snapshot trees.
fn trees_of(db: &Db, volume: Uuid) -> Result<Vec<Stored<VolumeSnapshotTreeRecord>>, VolumeError> {
    let mut out = Vec::new();
    for id in db.find::<VolumeSnapshotTreeRecord>("volume", &IndexValue::Uuid(volume))? {
        out.extend(db.get::<VolumeSnapshotTreeRecord>(id)?);
    }
    Ok(out)
}

/// The snapshot's record, or NotFound.
pub fn get(db: &Db, snapshot: Uuid) -> Result<Stored<VolumeSnapshotRecord>, VolumeError> {
    db.get::<VolumeSnapshotRecord>(snapshot)?
        .ok_or(VolumeError::NotFound { kind: "VolumeSnapshot", uuid: snapshot })
}

/// The directory of `path`.
fn dir_of(path: &str) -> &str {
    path.rsplit_once('/').map_or(".", |(dir, _)| dir)
}

/// Sends `command` to `host`'s agent.
async fn send(
    hosts: &Kind<Hosts>,
    host: Uuid,
    command: Command,
    job: Option<Uuid>,
) -> Result<strato_proto::Reply, VolumeError> {
    let deadline = std::time::SystemTime::now() + TIMEOUT;
    Ok(host::command(hosts, host, command, deadline, job).await?)
}

/// Deletes `paths` on `host`; a file the agent cannot delete now is left to the GC.
pub(crate) async fn delete_files(hosts: &Kind<Hosts>, host: Uuid, paths: Vec<String>) {
    for path in paths {
        let command = Command::DeleteVolume { path: path.clone() };
        if let Err(error) = send(hosts, host, command, None).await {
            tracing::warn!(%host, %path, error = %strato_runtime::error_chain(&error), "a snapshot file stays until the GC deletes it");
            let runtime = hosts.runtime();
            if let Err(error) = crate::vm::ops::submit_delete_volume(runtime, host, path).await {
                tracing::warn!(%host, %error, "the GC job for a snapshot file could not be submitted");
            }
        }
    }
}

/// Where the volume's file is: its host and top file (it must be Ready).
fn placed(v: &VolumeRecord, op: volume::VolumeOp) -> Result<(Uuid, String), VolumeError> {
    match (v.status, v.host_uuid, v.install_path.clone()) {
        (VolumeStatus::Ready, Some(host), Some(path)) => Ok((host, path)),
        (status, ..) => Err(VolumeError::InvalidStatus {
            volume: v.uuid,
            status,
            op,
            hint: ": only a Ready volume (one attached at least once) has snapshots",
        }),
    }
}

/// What a snapshot's creator gives it; the rest comes from its volume and tree.
#[derive(Clone, Debug)]
pub struct Asked {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
}

/// A snapshot's status from the moment its intent is written until its file is known to
/// exist and its record is finished (see [`settle`]).
pub const CREATING: &str = "Creating";

/// A snapshot's status once it is taken.
pub const READY: &str = "Ready";

/// A snapshot's status from the moment its deletion is decided until its records go: its
/// layer may be merged into the volume's top already. A deletion that died is finished by
/// the volume's next operation (or by deleting it again).
pub const DELETING: &str = "Deleting";

/// What is done to a snapshot, as its status allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOp {
    /// `RevertVolumeFromSnapshot`.
    Revert,
    /// `DeleteVolumeSnapshot` (again, on one Deleting: it finishes).
    Delete,
    /// A template or a data volume made from its layer.
    Copy,
}

/// The snapshot state machine in one table: Creating -> Ready -> Deleting -> gone (and
/// Creating -> gone, an intent that was not taken). Which operations each status allows.
pub fn allows(status: &str, op: SnapshotOp) -> bool {
    matches!((status, op), (READY, _) | (DELETING, SnapshotOp::Delete))
}

/// Refuses `op` on snapshot `s` unless its status allows it, saying why.
fn check(s: &VolumeSnapshotRecord, op: SnapshotOp) -> Result<(), VolumeError> {
    if allows(&s.status, op) {
        return Ok(());
    }
    let why = match s.status.as_str() {
        CREATING => "it is still being taken: try again",
        DELETING => "it is being deleted",
        _ => "its status does not allow it",
    };
    Err(VolumeError::InUse(format!("snapshot {} is {}: {why}", s.uuid, s.status)))
}

/// The GC job kind that settles a snapshot left Creating (its operation died, or its host
/// went away, between the agent's file and the record).
pub const SETTLE_JOB: &str = "snapshot.settle";

/// The context of a [`SETTLE_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SettleJob {
    /// The volume.
    pub volume: Uuid,
}

fn settle_job_name(snapshot: Uuid) -> String {
    format!("{SETTLE_JOB}/{snapshot}")
}

/// How long after an operation's start its settle or sweep job runs, if the operation has
/// not cancelled it by then. The job runs in the volume's turn, so never while the
/// operation does; the delay only spares the work when the operation ends well.
const SETTLE_DELAY: Duration = Duration::from_secs(30);

/// The volume's new top a snapshot of `top` makes: named after the volume and the
/// snapshot, so that a Creating record says which file may exist.
pub fn new_top_of(top: &str, volume: Uuid, snapshot: Uuid) -> String {
    format!("{}/{volume}-{snapshot}.qcow2", dir_of(top))
}

/// The writes that finish snapshot `intent` (Creating, of `volume` at its top) once the
/// agent made `new_top`: the snapshot Ready and the latest, in the current tree (a new one
/// if the volume has no latest snapshot, or if the intent names a tree of its own: a full
/// snapshot, whose layer stands alone), and the volume on its new top.
fn landing(
    db: &Db,
    volume: &Stored<VolumeRecord>,
    intent: &Stored<VolumeSnapshotRecord>,
    new_top: String,
) -> Result<(Batch, VolumeSnapshotRecord), VolumeError> {
    let all = snapshots_of(db, volume.record.uuid)?;
    let latest = all.values().find(|s| s.record.latest);
    let mut batch = Batch::new();
    let mut taken = VolumeSnapshotRecord {
        status: READY.into(),
        latest: true,
        tree_uuid: Uuid::nil(),
        parent_uuid: None,
        distance: 0,
        ..intent.record.clone()
    };
    let full = !intent.record.tree_uuid.is_nil();
    match latest {
        Some(parent) if !full => {
            (taken.tree_uuid, taken.parent_uuid) =
                (parent.record.tree_uuid, Some(parent.record.uuid));
            taken.distance = parent.record.distance.saturating_add(1);
            let was = VolumeSnapshotRecord { latest: false, ..parent.record.clone() };
            batch.put(&was, Expect::Generation(parent.generation))?;
        }
        latest => {
            if let Some(was) = latest {
                let was_record = VolumeSnapshotRecord { latest: false, ..was.record.clone() };
                batch.put(&was_record, Expect::Generation(was.generation))?;
            }
            // A new tree, now the volume's current one.
            let uuid = if full { intent.record.tree_uuid } else { Uuid::new_v4() };
            let tree =
                VolumeSnapshotTreeRecord { uuid, volume_uuid: volume.record.uuid, current: true };
            batch.put(&tree, Expect::Absent)?;
            for other in trees_of(db, volume.record.uuid)? {
                let other_record = VolumeSnapshotTreeRecord { current: false, ..other.record };
                batch.put(&other_record, Expect::Generation(other.generation))?;
            }
            taken.tree_uuid = tree.uuid;
        }
    }
    batch.put(&taken, Expect::Generation(intent.generation))?;
    vm_follows(db, &mut batch, &volume.record, &new_top)?;
    let moved = VolumeRecord { install_path: Some(new_top), ..volume.record.clone() };
    batch.put(&moved, Expect::Generation(volume.generation))?;
    Ok((batch, taken))
}

/// A root volume's top is also its VM's `root_volume_path`, which its domain is defined
/// from: a change of the top writes the VM's record in the same batch (expected as read,
/// so a change of the VM meanwhile makes the caller decide again).
fn vm_follows(
    db: &Db,
    batch: &mut Batch,
    v: &VolumeRecord,
    new_top: &str,
) -> Result<(), VolumeError> {
    let Some(vm) = v.vm_instance_uuid.filter(|_| v.is_root()) else { return Ok(()) };
    let Some(stored) = db.get::<crate::records::VmRecord>(vm)? else { return Ok(()) };
    let followed =
        crate::records::VmRecord { root_volume_path: Some(new_top.to_owned()), ..stored.record };
    batch.put(&followed, Expect::Generation(stored.generation))?;
    Ok(())
}

/// Takes snapshot `snapshot` of volume `volume` (a data volume, or a VM's root volume):
/// live if its VM runs, offline otherwise. `extra` adds the snapshot's tags to the intent's write.
///
/// The intent (the snapshot's record, Creating, naming the volume's top) is written before
/// the agent makes the new top, with a GC job that settles it if the operation does not
/// finish it. Live, a new top the record did not know of would be lost the next time the
/// VM's domain is defined from the records, with everything the guest wrote since.
///
/// Once the latest snapshot is `max_incremental - 1` layers from its tree's root (ZStack's
/// `incrementalSnapshot.maxNum`), the snapshot is a full one, so that no chain grows past
/// `max_incremental` layers: the volume's top first takes in every layer below it (a
/// rebase onto nothing, or a block pull live), and the snapshot freezing it starts a new
/// tree. The intent names that tree, so a settle after a crash lands it there too.
pub async fn create(
    vms: &Kind<Vms>,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    snapshot: Asked,
    max_incremental: u32,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError> + Send + 'static,
    job: Option<Uuid>,
) -> Result<VolumeSnapshotRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let runtime = vms.runtime().clone();
    let hosts = hosts.clone();
    volume::on_volume(vms, volume, "snapshot-volume", job, move |vm| async move {
        let live = volume::live(vm.as_ref())?;
        let settle_job = settle_job_name(snapshot.uuid);
        let mut tagged = false;
        loop {
            let intent = db.get::<VolumeSnapshotRecord>(snapshot.uuid)?;
            if let Some(done) = intent.as_ref().filter(|s| s.record.status != CREATING) {
                return Ok(done.record.clone()); // settled as taken meanwhile
            }
            let stored = volume::get(&db, volume)?;
            let v = &stored.record;
            let (host, top) = placed(v, volume::VolumeOp::Snapshot)?;
            let new_top = new_top_of(&top, volume, snapshot.uuid);
            let latest = snapshots_of(&db, volume)?.into_values().find(|s| s.record.latest);
            let full = latest
                .is_some_and(|s| s.record.distance.saturating_add(1) >= max_incremental.max(1));
            // A full snapshot's tree, named by the intent (kept when the intent is rewritten).
            let full_tree = match intent.as_ref().map(|i| i.record.tree_uuid) {
                Some(tree) if full && !tree.is_nil() => tree,
                _ if full => Uuid::new_v4(),
                _ => Uuid::nil(),
            };
            let wanted = VolumeSnapshotRecord {
                uuid: snapshot.uuid,
                name: snapshot.name.clone(),
                description: snapshot.description.clone(),
                volume_uuid: volume,
                volume_type: v.r#type.clone(),
                tree_uuid: full_tree,
                parent_uuid: None,
                distance: 0,
                latest: false,
                status: CREATING.into(),
                size: v.size,
                primary_storage_install_path: top.clone(),
                primary_storage_uuid: v.primary_storage_uuid,
                host_uuid: Some(host),
            };
            let trigger = crate::vm::ops::when_host_is_back(host);
            let context = SettleJob { volume };
            runtime
                .gc()
                .submit_after(&settle_job, SETTLE_JOB, &context, trigger, SETTLE_DELAY)
                .await?;
            let mut batch = Batch::new();
            let expect =
                intent.as_ref().map_or(Expect::Absent, |was| Expect::Generation(was.generation));
            batch.put(&wanted, expect)?;
            // Written against the volume as read: a deletion or another change meanwhile makes
            // the intent decide again.
            batch.put(v, Expect::Generation(stored.generation))?;
            if !tagged {
                extra(&mut batch)?;
            }
            if !landed(&db, batch).await? {
                continue;
            }
            tagged = true;
            if full {
                // The top takes in every layer below it, so the snapshot's layer stands alone.
                // Repeating it changes nothing.
                let standalone = match (live, vm.as_ref(), v.disk()) {
                    (true, Some(vm), Some(disk)) => {
                        Command::PullDisk { uuid: vm.uuid, disk, base: None }
                    }
                    _ => Command::RebaseVolume { top: top.clone(), base: None },
                };
                send(&hosts, host, standalone, job).await?;
            }
            let command = match (live, vm.as_ref(), v.disk()) {
                (true, Some(vm), Some(disk)) => {
                    Command::SnapshotDisk { uuid: vm.uuid, disk, new_top: new_top.clone() }
                }
                _ => Command::SnapshotVolume { top: top.clone(), new_top: new_top.clone() },
            };
            // The tests and chaos runs stop an operation on either side of the agent's file.
            fail::fail_point!("snapshot-before-file");
            let sent = send(&hosts, host, command, job).await;
            fail::fail_point!("snapshot-after-file");
            if let Err(error) = sent {
                // It may have been made all the same (a lost answer): settled now if the
                // host answers, by the GC job if not.
                return match settle(&db, &hosts, volume, job).await {
                    Ok(()) => match get(&db, snapshot.uuid) {
                        Ok(taken) if taken.record.status != CREATING => Ok(taken.record),
                        _ => Err(error),
                    },
                    Err(_) => Err(error),
                };
            }
            let Some(intent) = db.get::<VolumeSnapshotRecord>(snapshot.uuid)? else { continue };
            if intent.record.status != CREATING {
                return Ok(intent.record); // settled as taken meanwhile
            }
            let stored = volume::get(&db, volume)?;
            let (batch, taken) = landing(&db, &stored, &intent, new_top.clone())?;
            if landed(&db, batch).await? {
                cancel_settle(&runtime, snapshot.uuid).await;
                tracing::info!(%volume, snapshot = %taken.uuid, live, "volume snapshot taken");
                return Ok(taken);
            }
            // Another change of the volume came first. Live, the domain writes to the new
            // top already (in the VM's queue nothing else changes it): decided again on the
            // same file. Offline, the new top is given back and made again on the new state.
            if !live && !named_files(&db, volume, None)?.contains(&new_top) {
                send(&hosts, host, Command::DeleteVolume { path: new_top }, job).await?;
            }
        }
    })
    .await
}

async fn cancel_settle(runtime: &strato_runtime::Runtime, snapshot: Uuid) {
    let id = strato_runtime::Gc::job_id(&settle_job_name(snapshot));
    if let Err(error) = runtime.gc().cancel(id).await {
        tracing::warn!(%snapshot, %error, "a snapshot's settle job stays; it will find nothing to do");
    }
}

/// Settles every snapshot of `volume` left Creating: one whose new top exists was taken and
/// is finished; one whose new top does not exist was not, and its intent goes. Call it in
/// the volume's turn (its VM's queue when attached), or when no operation can be running
/// (at the node's start).
pub async fn settle(
    db: &Db,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    job: Option<Uuid>,
) -> Result<(), VolumeError> {
    loop {
        let Some((id, intent)) =
            snapshots_of(db, volume)?.into_iter().find(|(_, s)| s.record.status == CREATING)
        else {
            return Ok(());
        };
        let top = intent.record.primary_storage_install_path.clone();
        let new_top = new_top_of(&top, volume, id);
        let host = intent
            .record
            .host_uuid
            .ok_or(VolumeError::InUse(format!("snapshot {id} names no host")))?;
        let stored = db.get::<VolumeRecord>(volume)?;
        // Asked behind the commands of the domain that may be making it; a host deleted
        // since is no longer managed, and its intent just goes.
        let domain = stored.as_ref().and_then(|v| v.record.vm_instance_uuid);
        let describe = Command::DescribeVolume { path: new_top.clone(), domain };
        let gone = db.get::<crate::records::HostRecord>(host)?.is_none();
        let made = !gone
            && match send(hosts, host, describe, job).await {
                Ok(_) => true,
                Err(VolumeError::Host(host::HostError::Link(strato_proto::LinkError::Agent {
                    error,
                    ..
                }))) if error.code == strato_proto::AgentErrorCode::NotFound => false,
                Err(error) => return Err(error),
            };
        let on_its_top =
            stored.as_ref().is_some_and(|v| v.record.install_path.as_deref() == Some(top.as_str()));
        let batch = match stored {
            Some(stored) if made && on_its_top => landing(db, &stored, &intent, new_top)?.0,
            stored => {
                // Not taken, or its volume moved on or went: the new top is nobody's.
                let named = stored
                    .is_some_and(|v| v.record.install_path.as_deref() == Some(new_top.as_str()));
                if made && !named && !gone {
                    send(hosts, host, Command::DeleteVolume { path: new_top }, job).await?;
                }
                let mut batch = Batch::new();
                batch.delete::<VolumeSnapshotRecord>(id, Expect::Generation(intent.generation));
                crate::records::delete_refs(db, &mut batch, id)?;
                batch
            }
        };
        // Landed or not, the next round sees the intent settled or decides it again.
        if landed(db, batch).await? {
            tracing::info!(%volume, snapshot = %id, taken = made, "a snapshot left Creating was settled");
        }
    }
}

/// The GC job kind that deletes the files an operation on a volume made or left, those no
/// record names by the time it runs: a revert's new top, the layers a snapshot deletion
/// merged, a copy made from a snapshot, the snapshots of an expunged volume. It is
/// submitted before the operation changes anything and cancelled when the operation has
/// deleted what it had to, so an MN that dies in between leaves no file behind.
pub const SWEEP_JOB: &str = "volume.sweep";

/// The same for the files a move between hosts' local storage copies or leaves: a file is
/// kept only if a record names it on the job's host (the copies on a destination the move
/// never reached, the originals on a source it left). Other sweeps keep a file any record
/// names, whichever host: hosts may see one directory, and a volume moved between such
/// hosts keeps its files where they are.
pub const MOVE_SWEEP_JOB: &str = "volume.sweep-moved";

/// The context of a [`SWEEP_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepJob {
    /// The volume whose records may name the files.
    pub volume: Uuid,
    /// The host holding them.
    pub host: Uuid,
    /// The files.
    pub paths: Vec<String>,
}

/// An operation's sweep: submitted before it, cancelled after it.
pub(crate) struct Sweep {
    name: String,
    runtime: strato_runtime::Runtime,
}

impl Sweep {
    /// Submits the sweep of `paths` on `host`, named by `volume`'s records.
    pub(crate) async fn submit(
        runtime: &strato_runtime::Runtime,
        volume: Uuid,
        host: Uuid,
        paths: Vec<String>,
    ) -> Result<Sweep, VolumeError> {
        Self::submit_kind(runtime, SWEEP_JOB, SweepJob { volume, host, paths }).await
    }

    /// Submits a move's sweep of `paths` on `host` ([`MOVE_SWEEP_JOB`]).
    pub(crate) async fn submit_for_move(
        runtime: &strato_runtime::Runtime,
        volume: Uuid,
        host: Uuid,
        paths: Vec<String>,
    ) -> Result<Sweep, VolumeError> {
        Self::submit_kind(runtime, MOVE_SWEEP_JOB, SweepJob { volume, host, paths }).await
    }

    async fn submit_kind(
        runtime: &strato_runtime::Runtime,
        kind: &str,
        job: SweepJob,
    ) -> Result<Sweep, VolumeError> {
        let name = format!("{kind}/{}", Uuid::new_v4());
        let trigger = crate::vm::ops::when_host_is_back(job.host);
        runtime.gc().submit_after(&name, kind, &job, trigger, SETTLE_DELAY).await?;
        Ok(Sweep { name, runtime: runtime.clone() })
    }

    /// The operation did its own sweeping.
    pub(crate) async fn done(self) {
        let id = strato_runtime::Gc::job_id(&self.name);
        if let Err(error) = self.runtime.gc().cancel(id).await {
            tracing::warn!(job = %self.name, %error, "a sweep job stays; it will find what it names in use or gone");
        }
    }
}

/// Every file `volume`'s records name: its top, its snapshots' layers and the new tops of
/// those being taken; with `on` a host, only those named on that host (on local storage: a
/// volume moved to another host names none of its old files on the old one).
fn named_files(db: &Db, volume: Uuid, on: Option<Uuid>) -> Result<BTreeSet<String>, VolumeError> {
    let stored = db.get::<VolumeRecord>(volume)?;
    // On shared storage every host sees the same files, whichever host a record names.
    let shared = match &stored {
        Some(v) => !volume::is_local(db, &v.record)?,
        None => false,
    };
    let on_host = |h: Option<Uuid>| match on {
        Some(host) if !shared => h.is_none_or(|h| h == host),
        _ => true,
    };
    let mut named = BTreeSet::new();
    if let Some(v) = stored.filter(|v| on_host(v.record.host_uuid)) {
        named.extend(v.record.install_path);
    }
    for s in snapshots_of(db, volume)?.into_values().filter(|s| on_host(s.record.host_uuid)) {
        let path = s.record.primary_storage_install_path;
        if s.record.status == CREATING {
            named.insert(new_top_of(&path, volume, s.record.uuid));
        }
        named.insert(path);
    }
    Ok(named)
}

async fn sweep(
    runtime: &strato_runtime::Runtime,
    hosts: &Kind<Hosts>,
    job: &SweepJob,
    moved: bool,
) -> Result<(), VolumeError> {
    if crate::vm::ops::host_was_deleted(runtime, job.host)? {
        return Ok(());
    }
    let named = named_files(runtime.db(), job.volume, moved.then_some(job.host))?;
    for path in job.paths.iter().filter(|p| !named.contains(*p)) {
        send(hosts, job.host, Command::DeleteVolume { path: path.clone() }, None).await?;
        tracing::info!(volume = %job.volume, %path, "a file no record names was swept");
    }
    Ok(())
}

/// Registers the snapshot GC handlers. Call once at startup, before `gc().start()`.
pub fn register_gc(vms: Kind<Vms>, hosts: Kind<Hosts>) {
    let runtime = vms.runtime().clone();
    for (kind, moved) in [(SWEEP_JOB, false), (MOVE_SWEEP_JOB, true)] {
        let (sweeping, sweeper) = (vms.clone(), hosts.clone());
        runtime.gc().register_handler(kind, move |job: SweepJob| {
            let (vms, hosts) = (sweeping.clone(), sweeper.clone());
            async move {
                let runtime = vms.runtime().clone();
                // In the volume's turn: nothing else makes or names its files then.
                if runtime.db().get::<VolumeRecord>(job.volume)?.is_none() {
                    let _turn = volume::turn(job.volume).await;
                    sweep(&runtime, &hosts, &job, moved).await?;
                } else {
                    volume::on_volume(
                        &vms,
                        job.volume,
                        "sweep-volume-files",
                        None,
                        move |_| async move { sweep(&runtime, &hosts, &job, moved).await },
                    )
                    .await?;
                }
                Ok(())
            }
        });
    }
    runtime.gc().register_handler(SETTLE_JOB, move |job: SettleJob| {
        let vms = vms.clone();
        async move {
            // In the volume's turn; the turn itself settles it (see `volume::on_volume`). A
            // volume gone meanwhile leaves its intents to settle here.
            let db = vms.runtime().db().clone();
            if db.get::<VolumeRecord>(job.volume)?.is_none() {
                let _turn = volume::turn(job.volume).await;
                let hosts = volume::hosts_kind(vms.runtime())?;
                settle(&db, &hosts, job.volume, None).await?;
                return Ok(());
            }
            volume::on_volume(&vms, job.volume, "settle-snapshots", None, |_| async { Ok(()) })
                .await?;
            Ok(())
        }
    });
}

/// Settles every snapshot left Creating and every volume left Migrating: at the node's
/// start, before anything else can touch a volume (a failure is left to the GC jobs and the
/// volume's next operation).
pub async fn settle_all(db: &Db, hosts: &Kind<Hosts>) -> usize {
    // A volume's move that died with the MN: Ready again where its records say.
    for stored in db.scan::<VolumeRecord>().flatten() {
        if stored.record.status == crate::records::VolumeStatus::Migrating {
            let volume = stored.record.uuid;
            if let Err(error) = crate::local_storage::back_to_ready(db, hosts, volume).await {
                let error = strato_runtime::error_chain(&error);
                tracing::warn!(%volume, %error, "a volume left Migrating stays so until its next operation");
            }
        }
    }
    let mut volumes = BTreeSet::new();
    for stored in db.scan::<VolumeSnapshotRecord>().flatten() {
        if stored.record.status == CREATING {
            volumes.insert(stored.record.volume_uuid);
        }
    }
    for volume in &volumes {
        if let Err(error) = settle(db, hosts, *volume, None).await {
            let error = strato_runtime::error_chain(&error);
            tracing::warn!(%volume, %error, "a snapshot left Creating stays until its GC job settles it");
        }
    }
    volumes.len()
}

/// Reverts snapshot `snapshot`'s volume to it: a new top backed by it, the old top deleted.
/// The volume must be detached or its VM stopped.
pub async fn revert(
    vms: &Kind<Vms>,
    hosts: &Kind<Hosts>,
    snapshot: Uuid,
    job: Option<Uuid>,
) -> Result<VolumeSnapshotRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let runtime = vms.runtime().clone();
    let volume = get(&db, snapshot)?.record.volume_uuid;
    let hosts = hosts.clone();
    volume::on_volume(vms, volume, "revert-volume", job, move |vm| async move {
        if let Some(vm) = vm.as_ref().filter(|_| volume::live(vm.as_ref()).unwrap_or(true)) {
            return Err(VolumeError::VmState {
                vm: vm.uuid,
                state: vm.state.as_str(),
                rule: "a volume is reverted when its VM is Stopped (or it is detached)",
            });
        }
        loop {
            let stored = volume::get(&db, volume)?;
            let mut v = stored.record;
            let (host, old_top) = placed(&v, volume::VolumeOp::Revert)?;
            let target = get(&db, snapshot)?;
            check(&target.record, SnapshotOp::Revert)?;
            let new_top = format!("{}/{volume}-{}.qcow2", dir_of(&old_top), Uuid::new_v4());
            let base = target.record.primary_storage_install_path.clone();
            let swept = vec![new_top.clone(), old_top.clone()];
            let sweep = Sweep::submit(&runtime, volume, host, swept).await?;
            send(
                &hosts,
                host,
                Command::SnapshotVolume { top: base, new_top: new_top.clone() },
                job,
            )
            .await?;
            let mut batch = Batch::new();
            for other in snapshots_of(&db, volume)?.into_values() {
                let latest = other.record.uuid == snapshot;
                if other.record.latest != latest {
                    let changed = VolumeSnapshotRecord { latest, ..other.record };
                    batch.put(&changed, Expect::Generation(other.generation))?;
                } else if latest {
                    batch.put(&other.record, Expect::Generation(other.generation))?;
                }
            }
            for tree in trees_of(&db, volume)? {
                let current = tree.record.uuid == target.record.tree_uuid;
                if tree.record.current != current {
                    let changed = VolumeSnapshotTreeRecord { current, ..tree.record };
                    batch.put(&changed, Expect::Generation(tree.generation))?;
                }
            }
            vm_follows(&db, &mut batch, &v, &new_top)?;
            v.install_path = Some(new_top.clone());
            batch.put(&v, Expect::Generation(stored.generation))?;
            if landed(&db, batch).await? {
                // The old top was the volume's alone (no snapshot is backed by it).
                delete_files(&hosts, host, vec![old_top]).await;
                sweep.done().await;
                tracing::info!(%volume, %snapshot, "volume reverted to a snapshot");
                return Ok(VolumeSnapshotRecord { latest: true, ..target.record });
            }
            send(&hosts, host, Command::DeleteVolume { path: new_top }, job).await?;
            sweep.done().await;
        }
    })
    .await
}

/// Deletes snapshot `snapshot` and its descendants. If the volume's top is backed by one of
/// them, the layers from the snapshot down are merged into the top first (live with a
/// block pull if its VM runs), and the snapshot's parent (if any) becomes the latest.
pub async fn delete(
    vms: &Kind<Vms>,
    hosts: &Kind<Hosts>,
    snapshot: Uuid,
    job: Option<Uuid>,
) -> Result<(), VolumeError> {
    let db = vms.runtime().db().clone();
    let Some(volume) = db.get::<VolumeSnapshotRecord>(snapshot)?.map(|s| s.record.volume_uuid)
    else {
        return Ok(());
    };
    let runtime = vms.runtime().clone();
    let hosts = hosts.clone();
    volume::on_volume(vms, volume, "delete-volume-snapshot", job, move |vm| async move {
        delete_in_turn(&db, &runtime, &hosts, volume, snapshot, vm.as_ref(), job).await
    })
    .await
}

/// Finishes every deletion of `volume`'s snapshots that died (snapshots left Deleting), in
/// the volume's turn or its VM's queue (`vm`, as read there).
pub(crate) async fn finish_deletions(
    db: &Db,
    runtime: &strato_runtime::Runtime,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    vm: Option<&crate::records::VmRecord>,
    job: Option<Uuid>,
) -> Result<(), VolumeError> {
    loop {
        let all = snapshots_of(db, volume)?;
        // The top of a doomed subtree: Deleting, its parent not.
        let first = all.values().find(|s| {
            s.record.status == DELETING
                && s.record
                    .parent_uuid
                    .and_then(|p| all.get(&p))
                    .is_none_or(|p| p.record.status != DELETING)
        });
        let Some(first) = first.map(|s| s.record.uuid) else { return Ok(()) };
        tracing::info!(%volume, snapshot = %first, "finishing a snapshot deletion that died");
        delete_in_turn(db, runtime, hosts, volume, first, vm, job).await?;
    }
}

/// [`delete`], in the volume's turn or its VM's queue. The snapshots are marked Deleting
/// first (with a sweep of their files), then the top merged, then the records deleted and
/// the files after; each step is safe to repeat, so a deletion that died is finished by
/// running it again.
async fn delete_in_turn(
    db: &Db,
    runtime: &strato_runtime::Runtime,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    snapshot: Uuid,
    vm: Option<&crate::records::VmRecord>,
    job: Option<Uuid>,
) -> Result<(), VolumeError> {
    let live = volume::live(vm)?;
    loop {
        let all = snapshots_of(db, volume)?;
        let Some(doomed_root) = all.get(&snapshot).map(|s| s.record.clone()) else {
            return Ok(());
        };
        check(&doomed_root, SnapshotOp::Delete)?;
        // The snapshot and everything taken on top of it.
        let mut doomed = BTreeSet::from([snapshot]);
        loop {
            let more: Vec<Uuid> = all
                .values()
                .filter(|s| s.record.parent_uuid.is_some_and(|p| doomed.contains(&p)))
                .map(|s| s.record.uuid)
                .filter(|s| !doomed.contains(s))
                .collect();
            if more.is_empty() {
                break;
            }
            doomed.extend(more);
        }
        let stored = volume::get(db, volume)?;
        let v = stored.record.clone();
        let host = v
            .host_uuid
            .or(doomed_root.host_uuid)
            .ok_or(VolumeError::InUse(format!("volume {volume} has no host for its snapshots")))?;
        let files: Vec<String> =
            doomed.iter().map(|id| all[id].record.primary_storage_install_path.clone()).collect();
        // Deleting, before anything is merged: a doomed layer is never used again.
        let marking: Vec<&Stored<VolumeSnapshotRecord>> =
            doomed.iter().map(|id| &all[id]).filter(|s| s.record.status != DELETING).collect();
        if !marking.is_empty() {
            let mut batch = Batch::new();
            for s in marking {
                let deleting = VolumeSnapshotRecord { status: DELETING.into(), ..s.record.clone() };
                batch.put(&deleting, Expect::Generation(s.generation))?;
            }
            landed(db, batch).await?;
            continue; // read again: now Deleting, or changed meanwhile
        }
        let sweep = Sweep::submit(runtime, volume, host, files.clone()).await?;
        let parent = doomed_root.parent_uuid.and_then(|p| all.get(&p));
        let latest_doomed =
            all.values().any(|s| s.record.latest && doomed.contains(&s.record.uuid));
        if latest_doomed {
            // The top is backed by a doomed layer: merged down to the parent first.
            let (_, top) = placed(&v, volume::VolumeOp::Snapshot)?;
            let base = parent.map(|p| p.record.primary_storage_install_path.clone());
            let command = match (live, vm, v.disk()) {
                (true, Some(vm), Some(disk)) => Command::PullDisk { uuid: vm.uuid, disk, base },
                _ => Command::RebaseVolume { top, base },
            };
            if let Err(error) = send(hosts, host, command, job).await {
                // A merge that failed leaves the chain as it was (a rebase or a pull only
                // changes the top's backing once it has copied everything): the snapshots
                // are Ready again, so the volume's other operations are not held up.
                undo_deleting(db, volume, &doomed).await;
                sweep.done().await;
                return Err(error);
            }
        }
        // The tests stop a deletion between its merge and its records.
        fail::fail_point!("snapshot-delete-after-merge");
        let mut batch = Batch::new();
        for id in &doomed {
            batch.delete::<VolumeSnapshotRecord>(*id, Expect::Generation(all[id].generation));
            crate::records::delete_refs(db, &mut batch, *id)?;
        }
        if latest_doomed && let Some(parent) = parent {
            let now_latest = VolumeSnapshotRecord { latest: true, ..parent.record.clone() };
            batch.put(&now_latest, Expect::Generation(parent.generation))?;
        }
        // A tree left with no snapshot goes.
        let trees: BTreeSet<Uuid> = all.values().map(|s| s.record.tree_uuid).collect();
        for tree in trees {
            let left = all
                .values()
                .any(|s| s.record.tree_uuid == tree && !doomed.contains(&s.record.uuid));
            if !left {
                batch.delete::<VolumeSnapshotTreeRecord>(tree, Expect::Any);
            }
        }
        batch.put(&v, Expect::Generation(stored.generation))?;
        if landed(db, batch).await? {
            delete_files(hosts, host, files).await;
            sweep.done().await;
            tracing::info!(%volume, %snapshot, deleted = doomed.len(), merged = latest_doomed, "volume snapshots deleted");
            return Ok(());
        }
        // Decided again: the files are still named, and the next round sweeps anew.
        sweep.done().await;
    }
}

/// Puts `volume`'s snapshots `doomed` back to Ready (a deletion that failed before merging
/// anything); a failure is logged, and the next operation tries the deletion again.
async fn undo_deleting(db: &Db, volume: Uuid, doomed: &BTreeSet<Uuid>) {
    let undone = async {
        loop {
            let mut batch = Batch::new();
            for (id, s) in snapshots_of(db, volume)? {
                if doomed.contains(&id) && s.record.status == DELETING {
                    let ready = VolumeSnapshotRecord { status: READY.into(), ..s.record };
                    batch.put(&ready, Expect::Generation(s.generation))?;
                }
            }
            if batch.is_empty() || landed(db, batch).await? {
                return Ok::<(), VolumeError>(());
            }
        }
    };
    if let Err(error) = undone.await {
        let error = strato_runtime::error_chain(&error);
        tracing::warn!(%volume, %error, "snapshots stay Deleting; the volume's next operation finishes their deletion");
    }
}

/// Adds to `batch` the deletion of every snapshot and tree of `volume`; returns the
/// snapshots' files (for an expunge of the volume).
pub(crate) fn forget_all(
    db: &Db,
    batch: &mut Batch,
    volume: Uuid,
) -> Result<Vec<String>, VolumeError> {
    let mut files = Vec::new();
    for (id, s) in snapshots_of(db, volume)? {
        batch.delete::<VolumeSnapshotRecord>(id, Expect::Generation(s.generation));
        crate::records::delete_refs(db, batch, id)?;
        if s.record.status == CREATING {
            files.push(new_top_of(&s.record.primary_storage_install_path, volume, id));
        }
        files.push(s.record.primary_storage_install_path);
    }
    for tree in trees_of(db, volume)? {
        batch.delete::<VolumeSnapshotTreeRecord>(tree.record.uuid, Expect::Any);
    }
    Ok(files)
}

/// Makes data volume `new` (its name, description and owner's writes given) from snapshot
/// `snapshot`: a standalone copy of the snapshot's chain, on the snapshot's host, Ready at
/// once. `extra` adds the new volume's tags and owner to the same write; with `quota`, that
/// write is admitted under the owner's account lock (the copy is made before, outside it).
/// The copy is deleted if the write fails.
pub async fn to_volume(
    runtime: &strato_runtime::Runtime,
    hosts: &Kind<Hosts>,
    snapshot: Uuid,
    mut new: VolumeRecord,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError>,
    quota: Option<(std::sync::Arc<crate::owners::Quotas>, crate::owners::OwnerRecord)>,
    job: Option<Uuid>,
) -> Result<VolumeRecord, VolumeError> {
    let db = runtime.db();
    let s = get(db, snapshot)?.record;
    check(&s, SnapshotOp::Copy)?;
    let host = s.host_uuid.ok_or(VolumeError::InUse(format!("snapshot {snapshot} has no host")))?;
    let source = s.primary_storage_install_path.clone();
    let dest = format!("{}/{}.qcow2", dir_of(&source), new.uuid);
    // In the new volume's turn: its sweep waits for this to end.
    let _turn = volume::turn(new.uuid).await;
    new.status = VolumeStatus::Ready;
    new.size = s.size;
    new.host_uuid = Some(host);
    new.primary_storage_uuid = s.primary_storage_uuid;
    new.install_path = Some(dest.clone());
    // Booked where it is made, as any data volume, before it is made.
    if let Some(ps) = volume::storage_of(db, &new)? {
        volume::book_storage(hosts, &ps, host, new.uuid, new.size).await?;
    }
    let sweep = Sweep::submit(runtime, new.uuid, host, vec![dest.clone()]).await?;
    let flatten = Command::FlattenVolume { source, dest: dest.clone() };
    if let Err(error) = send(hosts, host, flatten, job).await {
        // The sweep stays submitted: it deletes a copy made all the same (a lost answer).
        volume::unbook_storage(hosts, &new).await;
        return Err(error);
    }
    let insert =
        || async { crate::cascade::insert(db, &new, &extra).await.map_err(volume::not_written) };
    let inserted = match &quota {
        Some((quotas, owner)) => quotas.admit(db, owner, insert).await,
        None => insert().await,
    };
    if let Err(error) = inserted {
        delete_files(hosts, host, vec![dest]).await;
        volume::unbook_storage(hosts, &new).await;
        sweep.done().await;
        return Err(error);
    }
    sweep.done().await;
    Ok(new)
}

/// Makes template `image` from snapshot `snapshot`: a standalone copy of the chain from the
/// snapshot's layer down (frozen, so its VM may run meanwhile), in the volume's turn so no
/// deletion merges the layer away during the copy.
pub async fn template(
    vms: &Kind<Vms>,
    snapshot: Uuid,
    image: crate::records::ImageRecord,
    bs: crate::records::BackupStorageRecord,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError> + Send + 'static,
    job: Option<Uuid>,
) -> Result<crate::records::ImageRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let hosts = volume::hosts_kind(vms.runtime())?;
    let volume = get(&db, snapshot)?.record.volume_uuid;
    volume::on_volume(vms, volume, "snapshot-template", job, move |_| async move {
        let s = get(&db, snapshot)?.record;
        check(&s, SnapshotOp::Copy)?;
        let host =
            s.host_uuid.ok_or(VolumeError::InUse(format!("snapshot {snapshot} has no host")))?;
        let source = s.primary_storage_install_path;
        crate::vm::volumes::make_template(&db, &hosts, host, source, image, &bs, extra, job).await
    })
    .await
}
