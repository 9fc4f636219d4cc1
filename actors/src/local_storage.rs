//! Copying a volume's files from one host's local storage to another's: what ZStack's
//! `LocalStorageMigrateVolume` does for a detached data volume, and what a stopped VM's cold
//! migration does for its root volume.
//!
//! The bytes go through the MN, over the two hosts' agent links: the agents have no link to
//! each other, and the MN's links are the only authenticated ones. Each byte crosses two
//! links, which costs bandwidth, but the hosts gain no listener and no credential. A file
//! is read from the source in chunks and written into the destination's `.part-copy` file,
//! then sealed: the destination computes its size and SHA-256 and renames it into place
//! only if they are the source's. Byte-identical files hold the same guest-visible content,
//! which is what `qemu-img compare` would check, and this check needs no host to hold both
//! files. The caller deletes the source only after every file is sealed and the records
//! name the destination.
//!
//! Two hosts can see one directory (simulated hosts on one machine, or a "local" storage
//! that is in fact shared): copying there would copy a file onto itself, and deleting the
//! source would delete the only copy. The source therefore leaves a mark file in the
//! storage's directory and the destination looks for it; if it sees the mark, the files are
//! already where they must be and nothing is copied or deleted.

use std::collections::BTreeSet;
use std::time::SystemTime;

use strato_proto::{AgentErrorCode, Command, LinkError, Reply};
use strato_runtime::Kind;
use strato_storage::{Batch, Db, Expect, IndexValue};
use uuid::Uuid;

use crate::files::{self, End, is_not_found};
use crate::host::{self, HostError, Hosts};
use crate::records::{
    HostRecord, HostState, HostStatus, PrimaryStorageRecord, VolumeRecord, VolumeSnapshotRecord,
    VolumeStatus,
};
use crate::snapshot::Sweep;
use crate::vm::Vms;
use crate::volume::{self, VolumeError, VolumeOp};

/// A volume's files on their way from `source` to `destination`.
#[derive(Clone)]
pub(crate) struct Move {
    /// The hosts' kind, which commands them.
    pub(crate) hosts: Kind<Hosts>,
    /// The host holding them.
    pub(crate) source: Uuid,
    /// The host they go to.
    pub(crate) destination: Uuid,
    /// When every command of the move must be done.
    pub(crate) deadline: SystemTime,
    /// The job it is for.
    pub(crate) job: Option<Uuid>,
    /// Names this move's unsealed copies on the destination, apart from another move's.
    transfer: Uuid,
}

impl Move {
    /// A move of files from `source` to `destination`, its commands due by `deadline`.
    pub(crate) fn new(
        hosts: Kind<Hosts>,
        source: Uuid,
        destination: Uuid,
        deadline: SystemTime,
        job: Option<Uuid>,
    ) -> Move {
        Move { hosts, source, destination, deadline, job, transfer: Uuid::new_v4() }
    }

    async fn on(&self, host: Uuid, command: Command) -> Result<Reply, HostError> {
        host::command(&self.hosts, host, command, self.deadline, self.job).await
    }

    /// Whether the destination sees the source's storage under `storage_dir` (then there is
    /// nothing to copy).
    pub(crate) async fn shares_storage(&self, storage_dir: &str) -> Result<bool, HostError> {
        let mark = format!("{}/.strato-mark-{}", storage_dir.trim_end_matches('/'), Uuid::new_v4());
        self.on(self.source, Command::MarkStorage { path: mark.clone() }).await?;
        let seen = self
            .on(self.destination, Command::DescribeVolume { path: mark.clone(), domain: None })
            .await;
        let unmarked = self.on(self.source, Command::DeleteVolume { path: mark.clone() }).await;
        if let Err(error) = unmarked {
            tracing::warn!(host = %self.source, %mark, error = %strato_runtime::error_chain(&error), "a storage mark stays behind");
        }
        match seen {
            Ok(_) => Ok(true),
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Copies `files` to the destination, with the files below them in their backing chains
    /// that the destination lacks (a root volume's cached image). Cached images copied stay
    /// whatever becomes of the move: the image cache's collector deletes them once nothing
    /// uses them.
    ///
    /// Answers whether the destination turned out to hold the source's very files: a file
    /// found already there is only possible after an earlier attempt, or if the two hosts
    /// see one directory after all, which is asked again the other way round (the
    /// destination marks, the source looks) so that the caller never deletes the only copy.
    ///
    /// The files of `files` sealed anew on the destination are pushed onto `sealed`: all an
    /// undo may delete there besides the unsealed copies.
    pub(crate) async fn copy(
        &self,
        files: &[String],
        storage_dir: &str,
        sealed: &mut Vec<String>,
    ) -> Result<bool, HostError> {
        let moving: BTreeSet<&str> = files.iter().map(String::as_str).collect();
        let mut below = Vec::new();
        for file in files {
            let mut next = self.backing_of(self.source, file).await?;
            while let Some(backing) = next {
                if moving.contains(backing.as_str()) || below.contains(&backing) {
                    break;
                }
                next = self.backing_of(self.source, &backing).await?;
                below.push(backing);
            }
        }
        // The deepest first, so that no file lands on the destination before what it needs.
        for backing in below.iter().rev() {
            match self.on(self.destination, describe(backing)).await {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => match self.copy_file(backing).await {
                    // The destination cached the same image itself meanwhile: its own copy
                    // serves as well.
                    Err(HostError::Link(LinkError::Agent { error, .. }))
                        if error.code == AgentErrorCode::InvalidState => {}
                    copied => {
                        copied?;
                    }
                },
                Err(error) => return Err(error),
            }
        }
        let mut found_there = false;
        for file in files {
            if self.copy_file(file).await? {
                found_there = true;
            } else {
                sealed.push(file.clone());
            }
        }
        if found_there {
            let back = Move::new(
                self.hosts.clone(),
                self.destination,
                self.source,
                self.deadline,
                self.job,
            );
            return back.shares_storage(storage_dir).await;
        }
        Ok(false)
    }

    async fn backing_of(&self, host: Uuid, path: &str) -> Result<Option<String>, HostError> {
        match self.on(host, describe(path)).await? {
            Reply::Volume { backing, .. } => Ok(backing),
            _ => Ok(None),
        }
    }

    /// Copies one file in chunks and seals it (the destination checks the digest); answers
    /// whether the destination had it already.
    async fn copy_file(&self, path: &str) -> Result<bool, HostError> {
        let from = End::Host(self.hosts.clone(), self.source);
        let to = End::Host(self.hosts.clone(), self.destination);
        let copied =
            files::copy(&from, path, &to, path, self.transfer, self.deadline, self.job).await?;
        Ok(copied.existed)
    }

    /// Deletes `files` on `host` (the source after a move, the destination after a failed
    /// one); a file that cannot be deleted now is left to the GC.
    ///
    /// Answers whether every file went. One that did not is left to the sweep covering
    /// `host`, which the caller then keeps: it deletes only files the records do not name on
    /// that host when it runs, so a volume moved back meanwhile keeps its files.
    pub(crate) async fn delete(&self, host: Uuid, files: Vec<String>) -> bool {
        let mut all = true;
        for path in files {
            let command = Command::DeleteVolume { path: path.clone() };
            if let Err(error) = self.on(host, command).await {
                let error = strato_runtime::error_chain(&error);
                tracing::warn!(%host, %path, %error, "a moved volume's file stays until its sweep deletes it");
                all = false;
            }
        }
        all
    }

    /// What the destination may hold after a failed move: the files and their unsealed
    /// copies.
    pub(crate) fn leftovers(&self, files: &[String]) -> Vec<String> {
        files.iter().flat_map(|f| [f.clone(), format!("{f}.part-copy-{}", self.transfer)]).collect()
    }

    /// What an undo deletes on the destination: the files this move sealed there, and every
    /// unsealed copy (never a file that was there before it).
    pub(crate) fn undo_list(&self, files: &[String], sealed: &[String]) -> Vec<String> {
        let parts = files.iter().map(|f| format!("{f}.part-copy-{}", self.transfer));
        sealed.iter().cloned().chain(parts).collect()
    }
}

fn describe(path: &str) -> Command {
    Command::DescribeVolume { path: path.to_owned(), domain: None }
}

/// The hosts a volume on local storage can move to: the other hosts of the clusters its
/// storage is attached to, Enabled and Connected (ZStack's
/// `LocalStorageGetVolumeMigratableHosts`).
pub fn migratable_hosts(db: &Db, volume: Uuid) -> Result<Vec<HostRecord>, VolumeError> {
    let v = volume::get(db, volume)?.record;
    let Some(ps) = volume::storage_of(db, &v)? else { return Ok(Vec::new()) };
    if !ps.is_local() {
        return Ok(Vec::new()); // every host of its clusters reaches it already
    }
    let mut out = Vec::new();
    for cluster in &ps.attached_cluster_uuids {
        for id in db.find::<HostRecord>("cluster", &IndexValue::Uuid(*cluster))? {
            let Some(host) = db.get::<HostRecord>(id)? else { continue };
            let usable = host.record.state == HostState::Enabled
                && host.record.status == HostStatus::Connected;
            if usable && Some(id) != v.host_uuid {
                out.push(host.record);
            }
        }
    }
    out.sort_by_key(|h| h.uuid);
    Ok(out)
}

/// The local primary storage volume `v` is on, checked to be one host `destination` uses.
pub(crate) fn destination_storage(
    db: &Db,
    v: &VolumeRecord,
    destination: Uuid,
) -> Result<PrimaryStorageRecord, VolumeError> {
    let ps = volume::storage_of(db, v)?.ok_or_else(|| VolumeError::Invalid {
        field: "volumeUuid",
        message: format!("volume {} is on no primary storage: it has no file to move", v.uuid),
    })?;
    if !ps.is_local() {
        return Err(VolumeError::Invalid {
            field: "volumeUuid",
            message: format!(
                "volume {} is on {} primary storage {}: only local storage volumes are migrated between hosts",
                v.uuid, ps.r#type, ps.uuid
            ),
        });
    }
    let host = db
        .get::<HostRecord>(destination)?
        .ok_or(VolumeError::NotFound { kind: "Host", uuid: destination })?
        .record;
    if Some(destination) == v.host_uuid {
        return Err(VolumeError::Invalid {
            field: "destHostUuid",
            message: format!("volume {} is already on host {destination}", v.uuid),
        });
    }
    if !ps.attached_cluster_uuids.contains(&host.cluster_uuid) {
        return Err(VolumeError::Invalid {
            field: "destHostUuid",
            message: format!(
                "host {destination}'s cluster {} does not use primary storage {}: pick one of LocalStorageGetVolumeMigratableHosts",
                host.cluster_uuid, ps.uuid
            ),
        });
    }
    if host.state != HostState::Enabled {
        return Err(VolumeError::Invalid {
            field: "destHostUuid",
            message: format!(
                "host {destination} is {:?}: a volume moves to an Enabled host",
                host.state
            ),
        });
    }
    if host.status != HostStatus::Connected {
        return Err(HostError::Disconnected(destination).into());
    }
    Ok(ps)
}

/// Moves volume `volume` to host `destination`'s local storage: a detached data volume with
/// every snapshot's file (ZStack's `LocalStorageMigrateVolume`), or a stopped VM's root
/// volume, which moves its VM (a cold migration to that host). The source's files are
/// deleted only once the copies are verified and the records name the destination.
pub async fn migrate_volume(
    vms: &Kind<Vms>,
    hosts: &Kind<Hosts>,
    volume: Uuid,
    destination: Uuid,
    job: Option<Uuid>,
) -> Result<VolumeRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let v = volume::get(&db, volume)?.record;
    if v.is_root() {
        let vm =
            v.vm_instance_uuid.ok_or(VolumeError::NotFound { kind: "VmInstance", uuid: volume })?;
        destination_storage(&db, &v, destination)?;
        crate::vm::ops::migrate(vms, vm, Some(destination), crate::vm::ops::MIGRATE_TIMEOUT, job)
            .await?;
        return Ok(volume::get(&db, volume)?.record);
    }
    let runtime = vms.runtime().clone();
    let hosts = hosts.clone();
    volume::on_volume(vms, volume, "migrate-volume", job, move |vm| async move {
        if let Some(vm) = vm {
            return Err(VolumeError::InUse(format!(
                "volume {volume} is attached to VM {}: detach it first (a local storage migration moves a detached data volume, or a stopped VM's root volume)",
                vm.uuid
            )));
        }
        // Migrating: nothing else may change it while its files move.
        let (v, ps, files) = loop {
            let stored = volume::get(&db, volume)?;
            let mut v = stored.record;
            if !volume::allows(v.status, VolumeOp::Migrate) {
                return Err(VolumeError::InvalidStatus {
                    volume,
                    status: v.status,
                    op: VolumeOp::Migrate,
                    hint: "",
                });
            }
            let ps = destination_storage(&db, &v, destination)?;
            let mut files: Vec<String> = v.install_path.iter().cloned().collect();
            files.extend(
                crate::snapshot::snapshots_of(&db, volume)?
                    .into_values()
                    .map(|s| s.record.primary_storage_install_path),
            );
            v.status = VolumeStatus::Migrating;
            let mut batch = Batch::new();
            batch.put(&v, Expect::Generation(stored.generation))?;
            if crate::landed(&db, batch).await? {
                break (v, ps, files);
            }
        };
        // However the move ends (an error on the way, a panic), the volume is Ready again.
        let _ready_again = ReadyAgain { db: db.clone(), hosts: hosts.clone(), volume };
        let source = v.host_uuid.ok_or_else(|| VolumeError::InUse(format!("volume {volume} names no host")))?;
        let deadline = SystemTime::now() + crate::vm::ops::MIGRATE_TIMEOUT;
        let mv = Move::new(hosts.clone(), source, destination, deadline, job);
        let moved = async {
            // The destination's disk is booked first (a host's disk is not promised twice).
            volume::book_disk(&hosts, destination, volume, v.size).await?;
            let shared = mv.shares_storage(ps.base_dir()).await?;
            if shared {
                return Ok::<_, VolumeError>((true, None));
            }
            // Whichever way it ends, the files that the records do not name on a host go
            // from it: the copies if the move fails, the originals once it landed.
            let on_destination =
                Sweep::submit_for_move(&runtime, volume, destination, mv.leftovers(&files)).await?;
            let on_source = Sweep::submit_for_move(&runtime, volume, source, files.clone()).await?;
            let mut sealed = Vec::new();
            let copied = mv.copy(&files, ps.base_dir(), &mut sealed).await;
            fail::fail_point!("volume-migrate-after-copy");
            Ok((false, Some((on_destination, on_source, copied, sealed))))
        }
        .await;
        let (shared, sweeps) = match moved {
            Ok((shared, None)) => (shared, None),
            Ok((_, Some((on_destination, on_source, Ok(true), _)))) => {
                // One storage after all: nothing to sweep on either side.
                on_destination.done().await;
                on_source.done().await;
                (true, None)
            }
            Ok((_, Some((on_destination, on_source, Ok(false), _)))) => {
                (false, Some((on_destination, on_source)))
            }
            Ok((_, Some((on_destination, on_source, Err(error), sealed)))) => {
                let cleared = mv.delete(destination, mv.undo_list(&files, &sealed)).await;
                volume::unbook_disk(&hosts, destination, volume).await;
                back_to_ready(&db, &hosts, volume).await?;
                if cleared {
                    on_destination.done().await;
                }
                on_source.done().await;
                return Err(error.into());
            }
            Err(error) => {
                volume::unbook_disk(&hosts, destination, volume).await;
                back_to_ready(&db, &hosts, volume).await?;
                return Err(error);
            }
        };
        let landed = match switch_records(&db, volume, destination).await {
            Ok(landed) => landed,
            Err(error) => {
                // Not written (the store failed): the volume stays where its records say,
                // and the destination gives back what it booked. Its copies, if any, are its
                // sweep's: the records do not name them there.
                volume::unbook_disk(&hosts, destination, volume).await;
                if let Some((on_destination, on_source)) = sweeps {
                    drop(on_destination);
                    on_source.done().await;
                }
                return Err(error);
            }
        };
        tracing::info!(%volume, from = %source, to = %destination, shared, job = ?job, "volume migrated");
        volume::unbook_disk(&hosts, source, volume).await;
        if let Some((on_destination, on_source)) = sweeps {
            if mv.delete(source, files).await {
                on_source.done().await;
            }
            on_destination.done().await;
        }
        Ok(landed)
    })
    .await
}

/// Names `destination` as the host of volume `volume` and of its snapshots, Ready, in one
/// write (decided again on a conflict).
async fn switch_records(
    db: &Db,
    volume: Uuid,
    destination: Uuid,
) -> Result<VolumeRecord, VolumeError> {
    loop {
        let stored = volume::get(db, volume)?;
        let mut batch = Batch::new();
        let moved = VolumeRecord {
            status: VolumeStatus::Ready,
            host_uuid: Some(destination),
            ..stored.record
        };
        batch.put(&moved, Expect::Generation(stored.generation))?;
        for s in crate::snapshot::snapshots_of(db, volume)?.into_values() {
            let followed = VolumeSnapshotRecord { host_uuid: Some(destination), ..s.record };
            batch.put(&followed, Expect::Generation(s.generation))?;
        }
        if crate::landed(db, batch).await? {
            return Ok(moved);
        }
    }
}

/// Puts its volume back to Ready when a move ends, whichever way: in the background, in the
/// volume's turn (so after the move, and never during another).
struct ReadyAgain {
    db: Db,
    hosts: Kind<Hosts>,
    volume: Uuid,
}

impl Drop for ReadyAgain {
    fn drop(&mut self) {
        let (db, hosts, volume) = (self.db.clone(), self.hosts.clone(), self.volume);
        tokio::spawn(async move {
            let _turn = volume::turn(volume).await;
            if let Err(error) = back_to_ready(&db, &hosts, volume).await {
                let error = strato_runtime::error_chain(&error);
                tracing::warn!(%volume, %error, "a volume left Migrating stays so until its next operation");
            }
        });
    }
}

/// Puts a volume whose move failed (or died with its MN) back to Ready: its records still
/// name the source, which still holds its files; a destination's booking for it is given
/// back.
pub(crate) async fn back_to_ready(
    db: &Db,
    hosts: &Kind<Hosts>,
    volume: Uuid,
) -> Result<(), VolumeError> {
    loop {
        let Some(stored) = db.get::<VolumeRecord>(volume)? else { return Ok(()) };
        if stored.record.status != VolumeStatus::Migrating {
            return Ok(());
        }
        let home = stored.record.host_uuid;
        let ready = VolumeRecord { status: VolumeStatus::Ready, ..stored.record };
        let mut batch = Batch::new();
        batch.put(&ready, Expect::Generation(stored.generation))?;
        if crate::landed(db, batch).await? {
            for host in db.scan::<HostRecord>() {
                let host = host?.record;
                if Some(host.uuid) != home && host.reservations.contains_key(&volume) {
                    volume::unbook_disk(hosts, host.uuid, volume).await;
                }
            }
            tracing::info!(%volume, "a volume left Migrating is Ready again on its host");
            return Ok(());
        }
    }
}
