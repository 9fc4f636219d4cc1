//! Attaching and detaching data volumes, in the VM's lifecycle queue, so they never overlap
//! the VM's starts, stops and migrations.
//!
//! A running VM gets the disk live (the agent plugs it into the domain and its definition);
//! a stopped one has it in its definition when it next starts (every start defines the
//! domain from the records, with its Ready volumes).
//!
//! The attachment is claimed in the volume's record first (after ZStack's checks, with the
//! VM's record expected unchanged): two VMs attaching one volume at once compare-and-swap on
//! it, and the loser is refused before anything is made or plugged. A volume never attached
//! before is then made on the VM's host's local storage: Creating is written before the agent
//! makes the file, so a repeat after a failure finds the same file to finish (the agent's
//! creation is idempotent), and a failed creation gives the volume back as it was. The disk
//! is plugged last; a failed plug gives the claim back. Detaching unplugs first, then writes
//! the record: a detach stopped in between is repeated from the record, and unplugging is
//! idempotent.

use std::time::Duration;

use strato_proto::{Command, DiskSpec};
use strato_runtime::{Kind, Op, OpCtx};
use strato_storage::{Batch, Db, Expect};
use uuid::Uuid;

use super::state::VmState;
use super::{VmError, Vms};
use crate::host::{self, Hosts};
use crate::landed;
use crate::records::{HostRecord, PrimaryStorageRecord, VmRecord, VolumeRecord, VolumeStatus};
use crate::volume::{self, MAX_DATA_VOLUMES, VolumeError, VolumeOp, allows};

fn hosts_of(ctx: &OpCtx<Vms>) -> Result<Kind<Hosts>, VolumeError> {
    volume::hosts_kind(ctx.runtime())
}

/// Whether the VM in `state` takes a disk live (`Some(true)`), in its definition only
/// (`Some(false)`), or not at all.
fn live(state: VmState) -> Option<bool> {
    match state {
        VmState::Running | VmState::Paused => Some(true),
        VmState::Stopped => Some(false),
        _ => None,
    }
}

/// The primary storage of `host`'s cluster that `volume` may be made on: the one it names,
/// if attached to that cluster, or the cluster's first.
fn storage_for(
    db: &Db,
    volume: &VolumeRecord,
    host: &HostRecord,
) -> Result<PrimaryStorageRecord, VolumeError> {
    let mut attached = Vec::new();
    for stored in db.scan::<PrimaryStorageRecord>() {
        let ps = stored?.record;
        if ps.attached_cluster_uuids.contains(&host.cluster_uuid) {
            attached.push(ps);
        }
    }
    attached.sort_by_key(|ps| ps.uuid);
    match volume.primary_storage_uuid {
        Some(wanted) => attached.into_iter().find(|ps| ps.uuid == wanted).ok_or_else(|| {
            VolumeError::Invalid {
                field: "vmInstanceUuid",
                message: format!(
                    "volume {} is to be on primary storage {wanted}, which the VM's cluster {} has not attached",
                    volume.uuid, host.cluster_uuid
                ),
            }
        }),
        None => attached.into_iter().next().ok_or_else(|| VolumeError::Invalid {
            field: "vmInstanceUuid",
            message: format!("the VM's cluster {} has no primary storage", host.cluster_uuid),
        }),
    }
}

/// The lowest device number `vm`'s data volumes leave free (1 is `vdb`).
fn free_device(db: &Db, vm: Uuid) -> Result<Option<u32>, VolumeError> {
    let used: Vec<u32> =
        volume::attached_to(db, vm)?.iter().filter_map(|v| v.record.device_id).collect();
    Ok((1..=MAX_DATA_VOLUMES).find(|d| !used.contains(d)))
}

fn too_many(vm: Uuid) -> VolumeError {
    VolumeError::Invalid {
        field: "vmInstanceUuid",
        message: format!("VM {vm} has {MAX_DATA_VOLUMES} data volumes, the most it takes"),
    }
}

/// Attaches data volume `volume` to VM `vm` (nothing to do if it is attached there).
pub async fn attach(
    vms: &Kind<Vms>,
    volume: Uuid,
    vm: Uuid,
    timeout: Duration,
    job: Option<Uuid>,
) -> Result<VolumeRecord, VolumeError> {
    vms.call(vm, Op::within("lifecycle", "attach-volume", timeout).job(job), move |ctx| async move {
        let (record, _) = super::begin(&ctx).await?;
        let live = live(record.state).ok_or(VolumeError::VmState {
            vm,
            state: record.state.as_str(),
            rule: "a data volume is attached to a Running, Paused or Stopped VM",
        })?;
        let hosts = hosts_of(&ctx)?;
        let host_uuid = record.host_uuid.ok_or(VmError::NoHost(vm))?;
        let db = ctx.entity().db.clone();
        let host = db
            .get::<HostRecord>(host_uuid)?
            .map(|h| h.record)
            .ok_or(VmError::NoHost(vm))?;
        let deadline = std::time::SystemTime::now() + ctx.remaining();
        let send = |command: Command| host::command(&hosts, host_uuid, command, deadline, job);

        // A volume being moved holds its turn for as long as its copy takes: refused now,
        // rather than holding the VM's queue until then.
        let current = volume::get(&db, volume)?.record;
        if current.status == VolumeStatus::Migrating {
            return Err(VolumeError::InvalidStatus {
                volume,
                status: current.status,
                op: VolumeOp::Attach,
                hint: ": it is being moved to another host; attach it once it is Ready",
            });
        }
        // In the volume's turn: no operation on it as a detached volume runs meanwhile (one
        // that began detached would go on as if it still were).
        let _turn = volume::turn(volume).await;
        // Claimed first: a volume another VM is attaching at the same moment is refused
        // here, before either makes or plugs anything.
        claim(&db, volume, &record, &host).await?;
        // A snapshot of it left Creating is settled before its top is plugged.
        if let Err(error) = crate::snapshot::settle(&db, &hosts, volume, job).await {
            release_claim(&db, volume, vm).await?;
            return Err(error);
        }
        // Made next, if never attached before; plugged last.
        let made = match instantiate(&db, &hosts, &send, volume, vm, &host, job).await {
            Ok(made) => made,
            Err(error) => {
                release_claim(&db, volume, vm).await?;
                return Err(error);
            }
        };
        let disk = volume::get(&db, volume)?.record.disk().ok_or_else(|| {
            VolumeError::InUse(format!("volume {volume} has no file after it was made"))
        })?;
        if live
            && let Err(error) = send(Command::AttachDisk { uuid: vm, disk: disk.clone() }).await
        {
            release_claim(&db, volume, vm).await?;
            return Err(error.into());
        }
        tracing::info!(vm = %vm, %volume, device = disk.target(), live, made, "data volume attached");
        Ok(volume::get(&db, volume)?.record)
    })
    .await
}

/// Makes `volume`'s file on `host`'s local storage if it has none; `true` if it made it.
async fn instantiate<F, Fut>(
    db: &Db,
    hosts: &Kind<crate::host::Hosts>,
    send: &F,
    volume: Uuid,
    vm: Uuid,
    host: &HostRecord,
    job: Option<Uuid>,
) -> Result<bool, VolumeError>
where
    F: Fn(Command) -> Fut,
    Fut: std::future::Future<Output = Result<strato_proto::Reply, crate::host::HostError>>,
{
    let current = volume::get(db, volume)?.record;
    if current.status == VolumeStatus::Ready {
        return Ok(false);
    }
    // A template is brought to the host first: a failure here has changed nothing.
    let template = match current.root_image_uuid {
        Some(image) => Some(template_on_host(db, hosts, host, &current, image, job).await?),
        None => None,
    };
    // Creating, with where it goes, before the file is made.
    let (dir, size) = if current.status == VolumeStatus::Creating {
        let path = current.install_path.clone().unwrap_or_default();
        let dir = path.rsplit_once('/').map(|(dir, _)| dir.to_owned()).unwrap_or_default();
        (dir, current.size)
    } else {
        let ps = storage_for(db, &current, host)?;
        // Booked before it is made: no storage is promised twice.
        volume::book_storage(hosts, &ps, host.uuid, volume, current.size).await?;
        let dir = ps.data_volumes_dir();
        let path = format!("{dir}/{volume}.qcow2");
        let host_uuid = host.uuid;
        let claimed = volume::update(db, volume, |v| {
            if v.status != VolumeStatus::NotInstantiated || v.vm_instance_uuid != Some(vm) {
                return Err(VolumeError::InUse(format!(
                    "volume {volume} changed ({}, on VM {:?}) while it was being attached to VM {vm}",
                    v.status.as_str(),
                    v.vm_instance_uuid
                )));
            }
            v.status = VolumeStatus::Creating;
            v.primary_storage_uuid = Some(ps.uuid);
            v.host_uuid = Some(host_uuid);
            v.install_path = Some(path.clone());
            Ok(())
        })
        .await;
        if let Err(error) = claimed {
            // Not made here after all: the booking goes back.
            let booked = VolumeRecord {
                primary_storage_uuid: Some(ps.uuid),
                host_uuid: Some(host_uuid),
                ..current.clone()
            };
            volume::unbook_storage(hosts, &booked).await;
            return Err(error);
        }
        (dir, current.size)
    };
    // From a data volume template: a standalone copy of it; otherwise an empty file.
    let command = match template {
        Some(source) => Command::FlattenVolume { source, dest: format!("{dir}/{volume}.qcow2") },
        None => Command::CreateDataVolume { volume, size, dir: dir.clone() },
    };
    let made = match (send(command).await, current.root_image_uuid) {
        // A template's copy takes the template's size: grown to the volume's, if it was
        // grown before it was made (growing to the same size changes nothing).
        (Ok(_), Some(_)) => {
            let path = format!("{dir}/{volume}.qcow2");
            send(Command::ResizeVolume { path, size }).await
        }
        (made, _) => made,
    };
    match made {
        Ok(_) => {
            volume::update(db, volume, |v| {
                v.status = VolumeStatus::Ready;
                Ok(())
            })
            .await?;
            Ok(true)
        }
        Err(error) => {
            // Undone: no file (whatever the agent left under a temporary name is its own),
            // and the volume a record again.
            if let Some(path) = volume::get(db, volume)?.record.install_path
                && send(Command::DeleteVolume { path: path.clone() }).await.is_err()
            {
                // A file made all the same (a lost answer) that cannot be deleted now goes
                // once its host answers, unless a record names it by then.
                let runtime = hosts.runtime();
                crate::snapshot::Sweep::submit(runtime, volume, host.uuid, vec![path]).await?;
            }
            volume::unbook_storage(hosts, &volume::get(db, volume)?.record).await;
            volume::update(db, volume, |v| {
                v.status = VolumeStatus::NotInstantiated;
                (v.host_uuid, v.install_path, v.primary_storage_uuid) =
                    (None, None, current.primary_storage_uuid);
                Ok(())
            })
            .await?;
            Err(error.into())
        }
    }
}

/// Where host `host` reads template `image`'s file to make volume `v` from it: in a backup
/// storage on the MN, at its path there; in one on its own host, in the image cache of the
/// host's storage, where it is brought first (`backup_storage::cache_on_host`).
async fn template_on_host(
    db: &Db,
    hosts: &Kind<Hosts>,
    host: &HostRecord,
    v: &VolumeRecord,
    image: Uuid,
    job: Option<Uuid>,
) -> Result<String, VolumeError> {
    let record = db
        .get::<crate::records::ImageRecord>(image)?
        .ok_or(VolumeError::NotFound { kind: "Image", uuid: image })?
        .record;
    let source = crate::backup_storage::image_source(db, &record)?
        .ok_or(VolumeError::NotFound { kind: "Image", uuid: image })?;
    if source.remote.is_none() {
        return Ok(source.path);
    }
    let cache_dir = storage_for(db, v, host)?.image_cache_dir();
    let deadline = std::time::SystemTime::now() + Duration::from_secs(1800);
    let cached = crate::backup_storage::cache_on_host(
        hosts, host.uuid, image, &source, &cache_dir, deadline, job,
    )
    .await?;
    Ok(cached)
}

/// ZStack's checks before an attachment.
fn check_attachable(
    v: &VolumeRecord,
    local: bool,
    vm: &VmRecord,
    host: &HostRecord,
) -> Result<(), VolumeError> {
    volume::data_only(v, VolumeOp::Attach)?;
    if !allows(v.status, VolumeOp::Attach) {
        return Err(VolumeError::InvalidStatus {
            volume: v.uuid,
            status: v.status,
            op: VolumeOp::Attach,
            hint: ": recover it first (RecoverDataVolume)",
        });
    }
    if let Some(other) = v.vm_instance_uuid.filter(|other| *other != vm.uuid) {
        return Err(VolumeError::InUse(format!(
            "volume {} is attached to VM {other}: detach it first (DetachDataVolumeFromVm)",
            v.uuid
        )));
    }
    if let Some(on) = v.host_uuid.filter(|on| local && *on != host.uuid) {
        return Err(VolumeError::Invalid {
            field: "vmInstanceUuid",
            message: format!(
                "volume {} is on host {on}'s local storage and VM {} on host {}: a local volume is attached on its own host (move it with LocalStorageMigrateVolume)",
                v.uuid, vm.uuid, host.uuid
            ),
        });
    }
    Ok(())
}

/// Claims `volume` for VM `vm` at a free device (after ZStack's checks), with the VM's
/// record written back at the generation read (so an expunge of the VM meanwhile makes the
/// claim decide again). Nothing to do if it is `vm`'s already.
async fn claim(
    db: &Db,
    volume: Uuid,
    vm: &VmRecord,
    host: &HostRecord,
) -> Result<VolumeRecord, VolumeError> {
    loop {
        let stored = volume::get(db, volume)?;
        let mut v = stored.record;
        let local = volume::is_local(db, &v)?;
        check_attachable(&v, local, vm, host)?;
        if v.vm_instance_uuid == Some(vm.uuid) {
            return Ok(v);
        }
        if !local && v.host_uuid.is_some() {
            // On shared storage the VM's host serves it from now on.
            v.host_uuid = Some(host.uuid);
        }
        let device = free_device(db, vm.uuid)?.ok_or_else(|| too_many(vm.uuid))?;
        let vm_stored = db
            .get::<VmRecord>(vm.uuid)?
            .ok_or(VolumeError::NotFound { kind: "VmInstance", uuid: vm.uuid })?;
        v.vm_instance_uuid = Some(vm.uuid);
        v.device_id = Some(device);
        let mut batch = Batch::new();
        batch.put(&v, Expect::Generation(stored.generation))?;
        batch.put(&vm_stored.record, Expect::Generation(vm_stored.generation))?;
        if landed(db, batch).await? {
            return Ok(v);
        }
    }
}

/// Gives back `vm`'s claim on `volume` (its disk was not plugged).
async fn release_claim(db: &Db, volume: Uuid, vm: Uuid) -> Result<(), VolumeError> {
    volume::update(db, volume, |v| {
        if v.vm_instance_uuid == Some(vm) {
            (v.vm_instance_uuid, v.device_id) = (None, None);
        }
        Ok(())
    })
    .await
    .map(drop)
}

/// Detaches data volume `volume` from its VM (nothing to do if it is attached to none).
pub async fn detach(
    vms: &Kind<Vms>,
    volume: Uuid,
    timeout: Duration,
    job: Option<Uuid>,
) -> Result<VolumeRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let current = volume::get(&db, volume)?.record;
    volume::data_only(&current, VolumeOp::Detach)?;
    let Some(vm) = current.vm_instance_uuid else { return Ok(current) };
    vms.call(
        vm,
        Op::within("lifecycle", "detach-volume", timeout).job(job),
        move |ctx| async move {
            let (record, _) = super::begin(&ctx).await?;
            let current = volume::get(&db, volume)?.record;
            if current.vm_instance_uuid != Some(vm) {
                return Ok(current);
            }
            // A destroyed VM has no domain: its volumes are detached from the record alone.
            let state =
                if record.state == VmState::Destroyed { VmState::Stopped } else { record.state };
            if let Some(disk) = current.disk() {
                match live(state) {
                    Some(true) => unplug(&ctx, &record, disk, job).await?,
                    Some(false) => {}
                    None => {
                        return Err(VolumeError::VmState {
                            vm,
                            state: record.state.as_str(),
                            rule: "a data volume is detached from a Running, Paused, Stopped or Destroyed VM",
                        });
                    }
                }
            }
            let detached = volume::update(&db, volume, |v| {
                if v.vm_instance_uuid == Some(vm) {
                    (v.vm_instance_uuid, v.device_id) = (None, None);
                }
                Ok(())
            })
            .await?;
            tracing::info!(vm = %vm, %volume, "data volume detached");
            Ok(detached)
        },
    )
    .await
}

async fn unplug(
    ctx: &OpCtx<Vms>,
    record: &VmRecord,
    disk: DiskSpec,
    job: Option<Uuid>,
) -> Result<(), VolumeError> {
    let hosts = hosts_of(ctx)?;
    let host = record.host_uuid.ok_or(VmError::NoHost(record.uuid))?;
    let deadline = std::time::SystemTime::now() + ctx.remaining();
    host::command(&hosts, host, Command::DetachDisk { uuid: record.uuid, disk }, deadline, job)
        .await?;
    Ok(())
}

/// Adds to `batch` the detachment of every data volume of expunged VM `vm` (its domain is
/// gone; the volumes stay, Ready, on their host).
pub(crate) fn detach_all(db: &Db, batch: &mut Batch, vm: Uuid) -> Result<(), VmError> {
    for stored in volume::attached_to(db, vm)? {
        let mut v = stored.record;
        (v.vm_instance_uuid, v.device_id) = (None, None);
        batch.put(&v, Expect::Generation(stored.generation))?;
    }
    Ok(())
}

/// Makes root volume template `image` (its name and backup storage reference given; its
/// size and checksum filled in here) from stopped VM `vm`'s root volume: a standalone copy
/// of the root volume's chain, into backup storage `bs` (`make_template`). In the VM's
/// queue, so the VM does not start while it is copied. `extra` adds the image's tags and owner to the same write; the copy is
/// deleted if that write fails.
pub async fn root_template(
    vms: &Kind<Vms>,
    vm: Uuid,
    image: crate::records::ImageRecord,
    bs: crate::records::BackupStorageRecord,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError> + Send + 'static,
    job: Option<Uuid>,
) -> Result<crate::records::ImageRecord, VolumeError> {
    vms.call(
        vm,
        Op::within("lifecycle", "root-template", Duration::from_secs(1800)).job(job),
        move |ctx| async move {
            let (record, _) = super::begin(&ctx).await?;
            if record.state != VmState::Stopped {
                return Err(VolumeError::VmState {
                    vm,
                    state: record.state.as_str(),
                    rule: "a root volume template is made from a Stopped VM",
                });
            }
            let (Some(host), Some(source)) = (record.host_uuid, record.root_volume_path.clone())
            else {
                return Err(VolumeError::Invalid {
                    field: "rootVolumeUuid",
                    message: format!("VM {vm} has no root volume (it was made without an image)"),
                });
            };
            let hosts = hosts_of(&ctx)?;
            let db = ctx.entity().db.clone();
            let made = make_template(&db, &hosts, host, source, image, &bs, extra, job).await?;
            tracing::info!(%vm, image = %made.uuid, "root volume template made");
            Ok(made)
        },
    )
    .await
}

/// Writes `image` (a record waiting for its file: its size and checksum are filled in here)
/// as a standalone copy of the chain whose top is `source` on `host`, into backup storage
/// `bs`. Into a directory on the MN the host writes it itself and the MN reads it for its
/// checksum; into one on its own host it is flattened into the host's image cache (where it
/// serves as the new image's cache, or is collected) and copied from there, sealed only if
/// its size and SHA-256 are the flattened file's. `extra` adds the image's tags and owner to
/// the record's write; the copy is deleted if that write fails.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn make_template(
    db: &Db,
    hosts: &Kind<Hosts>,
    host: Uuid,
    source: String,
    image: crate::records::ImageRecord,
    bs: &crate::records::BackupStorageRecord,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError>,
    job: Option<Uuid>,
) -> Result<crate::records::ImageRecord, VolumeError> {
    let dest = format!("{}/{}.qcow2", bs.url.trim_end_matches('/'), image.uuid);
    let deadline = std::time::SystemTime::now() + Duration::from_secs(1800);
    let delete_on_host = |path: String| async {
        let deadline = std::time::SystemTime::now() + Duration::from_secs(60);
        let _ = host::command(hosts, host, Command::DeleteVolume { path }, deadline, None).await;
    };
    let (size, checksum) = if bs.is_remote() {
        let cache_dir = super::create::primary_storage_of(db, host)
            .map_err(|e| VolumeError::InUse(e.to_string()))?
            .image_cache_dir();
        let staged = format!("{cache_dir}/{}.qcow2", image.uuid);
        let flatten = Command::FlattenVolume { source, dest: staged.clone() };
        host::command(hosts, host, flatten, deadline, job).await?;
        let stored = crate::backup_storage::store_from_host(
            hosts, host, &staged, bs.uuid, &dest, deadline, job,
        )
        .await;
        match stored {
            Ok(described) => described,
            Err(error) => {
                delete_on_host(staged).await;
                return Err(error.into());
            }
        }
    } else {
        let flatten = Command::FlattenVolume { source, dest: dest.clone() };
        host::command(hosts, host, flatten, deadline, job).await?;
        match crate::images::describe(std::path::Path::new(&dest)).await {
            Ok(described) => described,
            Err(error) => {
                delete_on_host(dest.clone()).await;
                return Err(VolumeError::Invalid {
                    field: "backupStorageUuids",
                    message: format!(
                        "the template was written to {dest}, which this node cannot read: {error}"
                    ),
                });
            }
        }
    };
    let made = crate::records::ImageRecord {
        size,
        checksum,
        format: "qcow2".into(),
        status: "Ready".into(),
        backup_storage_refs: image
            .backup_storage_refs
            .iter()
            .map(|(bs, _)| (*bs, dest.clone()))
            .collect(),
        ..image
    };
    if let Err(error) = crate::cascade::insert(db, &made, extra).await {
        if bs.is_remote() {
            let stores = crate::backup_storage::kind(hosts.runtime())?;
            crate::backup_storage::delete_file(&stores, bs.uuid, &dest).await;
        } else {
            delete_on_host(dest).await;
        }
        return Err(volume::not_written(error));
    }
    tracing::info!(image = %made.uuid, media_type = %made.media_type, "template made");
    Ok(made)
}

/// Makes data volume template `image` from data volume `volume`: a standalone copy of its
/// chain. The volume must be Ready and not in use by a running VM (detached, or its VM
/// stopped), so the copy is of one moment.
pub async fn data_template(
    vms: &Kind<Vms>,
    volume: Uuid,
    image: crate::records::ImageRecord,
    bs: crate::records::BackupStorageRecord,
    extra: impl Fn(&mut Batch) -> Result<(), strato_storage::StoreError> + Send + 'static,
    job: Option<Uuid>,
) -> Result<crate::records::ImageRecord, VolumeError> {
    let db = vms.runtime().db().clone();
    let hosts = volume::hosts_kind(vms.runtime())?;
    volume::on_volume(vms, volume, "data-template", job, move |vm| async move {
        if let Some(vm) = vm.as_ref().filter(|_| volume::live(vm.as_ref()).unwrap_or(true)) {
            return Err(VolumeError::VmState {
                vm: vm.uuid,
                state: vm.state.as_str(),
                rule: "a data volume template is made from a volume whose VM is Stopped (or a detached one)",
            });
        }
        let v = volume::get(&db, volume)?.record;
        volume::data_only(&v, VolumeOp::Template)?;
        let (VolumeStatus::Ready, Some(host), Some(top)) = (v.status, v.host_uuid, v.install_path.clone()) else {
            return Err(VolumeError::InvalidStatus {
                volume,
                status: v.status,
                op: VolumeOp::Template,
                hint: ": only a Ready volume (one attached at least once) has a file to copy",
            });
        };
        make_template(&db, &hosts, host, top, image, &bs, extra, job).await
    })
    .await
}
