//! Volume snapshots: layers of a data volume's qcow2 chain, in trees.
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
//! volume's operations compare-and-swap its record, and one that loses gives back the file
//! it made and decides again. Records are written before old files are deleted; a file whose
//! deletion fails is left to the GC's delete-volume job (the host may be away).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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

/// Takes snapshot `snapshot` of data volume `volume`: live if its VM runs, offline
/// otherwise. `extra` adds the snapshot's tags to the same write.
pub async fn create(
    vms: &Kind<Vms>,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    snapshot: Asked,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError> + Send + 'static,
    job: Option<Uuid>,
) -> Result<VolumeSnapshotRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let hosts = hosts.clone();
    volume::on_volume(vms, volume, "snapshot-volume", job, move |vm| async move {
        let live = volume::live(vm.as_ref())?;
        loop {
            let stored = volume::get(&db, volume)?;
            let mut v = stored.record;
            let (host, top) = placed(&v, volume::VolumeOp::Snapshot)?;
            let new_top = format!("{}/{volume}-{}.qcow2", dir_of(&top), snapshot.uuid);
            let command = match (live, vm.as_ref(), v.disk()) {
                (true, Some(vm), Some(disk)) => {
                    Command::SnapshotDisk { uuid: vm.uuid, disk, new_top: new_top.clone() }
                }
                _ => Command::SnapshotVolume { top: top.clone(), new_top: new_top.clone() },
            };
            send(&hosts, host, command, job).await?;

            let all = snapshots_of(&db, volume)?;
            let latest = all.values().find(|s| s.record.latest);
            let mut batch = Batch::new();
            let mut taken = VolumeSnapshotRecord {
                uuid: snapshot.uuid,
                name: snapshot.name.clone(),
                description: snapshot.description.clone(),
                volume_uuid: volume,
                volume_type: v.r#type.clone(),
                tree_uuid: Uuid::nil(),
                parent_uuid: None,
                distance: 0,
                latest: true,
                status: "Ready".into(),
                size: v.size,
                primary_storage_install_path: top.clone(),
                primary_storage_uuid: v.primary_storage_uuid,
                host_uuid: Some(host),
            };
            match latest {
                Some(parent) => {
                    (taken.tree_uuid, taken.parent_uuid) =
                        (parent.record.tree_uuid, Some(parent.record.uuid));
                    taken.distance = parent.record.distance.saturating_add(1);
                    let was = VolumeSnapshotRecord { latest: false, ..parent.record.clone() };
                    batch.put(&was, Expect::Generation(parent.generation))?;
                }
                None => {
                    // A new tree, now the volume's current one.
                    let tree = VolumeSnapshotTreeRecord {
                        uuid: Uuid::new_v4(),
                        volume_uuid: volume,
                        current: true,
                    };
                    batch.put(&tree, Expect::Absent)?;
                    for other in trees_of(&db, volume)? {
                        let other_record =
                            VolumeSnapshotTreeRecord { current: false, ..other.record };
                        batch.put(&other_record, Expect::Generation(other.generation))?;
                    }
                    (taken.tree_uuid, taken.parent_uuid, taken.distance) = (tree.uuid, None, 0);
                }
            }
            batch.put(&taken, Expect::Absent)?;
            extra(&mut batch)?;
            v.install_path = Some(new_top.clone());
            batch.put(&v, Expect::Generation(stored.generation))?;
            if landed(&db, batch).await? {
                tracing::info!(%volume, snapshot = %taken.uuid, live, "volume snapshot taken");
                return Ok(taken);
            }
            // Another change of the volume came first. Live, the domain writes to the new
            // top already (in the VM's queue nothing else changes it): decided again on the
            // same file. Offline, the new top is given back and made again on the new state.
            if !live {
                send(&hosts, host, Command::DeleteVolume { path: new_top }, job).await?;
            }
        }
    })
    .await
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
            let new_top = format!("{}/{volume}-{}.qcow2", dir_of(&old_top), Uuid::new_v4());
            let base = target.record.primary_storage_install_path.clone();
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
            v.install_path = Some(new_top.clone());
            batch.put(&v, Expect::Generation(stored.generation))?;
            if landed(&db, batch).await? {
                // The old top was the volume's alone (no snapshot is backed by it).
                delete_files(&hosts, host, vec![old_top]).await;
                tracing::info!(%volume, %snapshot, "volume reverted to a snapshot");
                return Ok(VolumeSnapshotRecord { latest: true, ..target.record });
            }
            send(&hosts, host, Command::DeleteVolume { path: new_top }, job).await?;
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
    let hosts = hosts.clone();
    volume::on_volume(vms, volume, "delete-volume-snapshot", job, move |vm| async move {
        let live = volume::live(vm.as_ref())?;
        loop {
            let all = snapshots_of(&db, volume)?;
            let Some(doomed_root) = all.get(&snapshot).map(|s| s.record.clone()) else {
                return Ok(());
            };
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
            let stored = volume::get(&db, volume)?;
            let v = stored.record.clone();
            let host = v.host_uuid.or(doomed_root.host_uuid).ok_or(VolumeError::InUse(format!(
                "volume {volume} has no host for its snapshots"
            )))?;
            let parent = doomed_root.parent_uuid.and_then(|p| all.get(&p));
            let latest_doomed = all.values().any(|s| s.record.latest && doomed.contains(&s.record.uuid));
            if latest_doomed {
                // The top is backed by a doomed layer: merged down to the parent first.
                let (_, top) = placed(&v, volume::VolumeOp::Snapshot)?;
                let base = parent.map(|p| p.record.primary_storage_install_path.clone());
                let command = match (live, vm.as_ref(), v.disk()) {
                    (true, Some(vm), Some(disk)) => Command::PullDisk { uuid: vm.uuid, disk, base },
                    _ => Command::RebaseVolume { top, base },
                };
                send(&hosts, host, command, job).await?;
            }
            let mut batch = Batch::new();
            let mut files = Vec::new();
            for id in &doomed {
                let s = &all[id];
                batch.delete::<VolumeSnapshotRecord>(*id, Expect::Generation(s.generation));
                crate::records::delete_refs(&db, &mut batch, *id)?;
                files.push(s.record.primary_storage_install_path.clone());
            }
            if latest_doomed && let Some(parent) = parent {
                let now_latest = VolumeSnapshotRecord { latest: true, ..parent.record.clone() };
                batch.put(&now_latest, Expect::Generation(parent.generation))?;
            }
            // A tree left with no snapshot goes.
            let trees: BTreeSet<Uuid> = all.values().map(|s| s.record.tree_uuid).collect();
            for tree in trees {
                let left = all.values().any(|s| s.record.tree_uuid == tree && !doomed.contains(&s.record.uuid));
                if !left {
                    batch.delete::<VolumeSnapshotTreeRecord>(tree, Expect::Any);
                }
            }
            batch.put(&v, Expect::Generation(stored.generation))?;
            if landed(&db, batch).await? {
                delete_files(&hosts, host, files).await;
                tracing::info!(%volume, %snapshot, deleted = doomed.len(), merged = latest_doomed, "volume snapshots deleted");
                return Ok(());
            }
        }
    })
    .await
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
        files.push(s.record.primary_storage_install_path);
    }
    for tree in trees_of(db, volume)? {
        batch.delete::<VolumeSnapshotTreeRecord>(tree.record.uuid, Expect::Any);
    }
    Ok(files)
}

/// Makes data volume `new` (its name, description and owner's writes given) from snapshot
/// `snapshot`: a standalone copy of the snapshot's chain, on the snapshot's host, Ready at
/// once. `extra` adds the new volume's tags and owner to the same write; the copy is deleted
/// if that write fails.
pub async fn to_volume(
    db: &Db,
    hosts: &Kind<Hosts>,
    snapshot: Uuid,
    mut new: VolumeRecord,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError>,
    job: Option<Uuid>,
) -> Result<VolumeRecord, VolumeError> {
    let s = get(db, snapshot)?.record;
    let host = s.host_uuid.ok_or(VolumeError::InUse(format!("snapshot {snapshot} has no host")))?;
    let source = s.primary_storage_install_path.clone();
    let dest = format!("{}/{}.qcow2", dir_of(&source), new.uuid);
    send(hosts, host, Command::FlattenVolume { source, dest: dest.clone() }, job).await?;
    new.status = VolumeStatus::Ready;
    new.size = s.size;
    new.host_uuid = Some(host);
    new.primary_storage_uuid = s.primary_storage_uuid;
    new.install_path = Some(dest.clone());
    if let Err(error) = crate::cascade::insert(db, &new, extra).await {
        delete_files(hosts, host, vec![dest]).await;
        return Err(volume::not_written(error));
    }
    Ok(new)
}
