//! Disk offerings and data volumes, with ZStack's names: a data volume is created as a
//! record (NotInstantiated), made on the host of the VM it is first attached to, and deleted
//! by the Delay policy (recoverable until expunged). The checks that need only the request
//! are made here, at once; those that depend on the records at the time (is the volume
//! attached elsewhere, how many the VM has) are made by `strato_actors::vm::volumes` in the
//! VM's queue.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use serde_json::{Value, json};
use strato_actors::kinds;
use strato_actors::owners::{self, Charge};
use strato_actors::records::{
    BackupStorageRecord, DiskOfferingRecord, HostRecord, ImageRecord, PrimaryStorageRecord,
    VmRecord, VolumeRecord, VolumeSnapshotRecord,
};
use strato_actors::{backup_storage, local_storage, snapshot, volume};
use uuid::Uuid;

use super::api::{Answer, Api, Body, Method, actions, schema};
use super::{
    Id, Shared, accepted, action, creation, get_record, job_header, owned, owned_charged,
    submit_record,
};
use crate::auth;
use crate::error::ApiError;
use crate::types::actions::{NewSize, OnVm, ToHost, VolumeAction, VolumeSnapshotAction};
use crate::types::{
    DataVolumeParams, DiskOfferingParams, RootTemplateParams, VolumeFromTemplateParams,
    VolumeSnapshotParams, inventory, validate,
};

/// How long an attachment or detachment may wait for its VM's turn and run.
const OP_TIMEOUT: Duration = Duration::from_secs(300);

/// The smallest volume: 1 MiB.
const MIN_DISK_SIZE: u64 = 1 << 20;

/// The largest volume: 64 TiB.
const MAX_DISK_SIZE: u64 = 64 << 40;

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = vec![
        Api::create(
            "CreateDiskOffering",
            "/v1/disk-offerings",
            schema::<DiskOfferingParams>(),
            "Creates a disk offering",
            || post(create_disk_offering),
        ),
        Api::create(
            "CreateDataVolume",
            "/v1/volumes/data",
            schema::<DataVolumeParams>(),
            "Creates a data volume (made on its first attachment)",
            || post(create_data_volume),
        ),
        Api::new(
            "DeleteDataVolume",
            Method::Delete,
            "/v1/volumes/{uuid}",
            Body::None,
            Answer::Job,
            "Deletes a data volume, detached first (recoverable until expunged)",
            || delete(delete_data_volume),
        ),
    ];
    apis.extend(actions::<VolumeAction>("/v1/volumes/{uuid}/actions", || put(volume_action)));
    apis.push(Api::new(
        "LocalStorageGetVolumeMigratableHosts",
        Method::Get,
        "/v1/volumes/{uuid}/migration-target-hosts",
        Body::None,
        Answer::Immediate,
        "The hosts a local storage volume can move to (admin)",
        || get(migratable_hosts),
    ));
    apis.push(Api::create(
        "CreateVolumeSnapshot",
        "/v1/volumes/{uuid}/volume-snapshots",
        schema::<VolumeSnapshotParams>(),
        "Takes a snapshot of a data volume (live on a running VM)",
        || post(create_snapshot),
    ));
    apis.push(Api::new(
        "DeleteVolumeSnapshot",
        Method::Delete,
        "/v1/volume-snapshots/{uuid}",
        Body::None,
        Answer::Job,
        "Deletes a volume snapshot with its descendants, merging what the volume needs",
        || delete(delete_snapshot),
    ));
    apis.extend(actions::<VolumeSnapshotAction>("/v1/volume-snapshots/{uuid}/actions", || {
        put(snapshot_action)
    }));
    apis.push(Api::create(
        "CreateDataVolumeFromVolumeSnapshot",
        "/v1/volumes/data/from/volume-snapshots/{uuid}",
        schema::<VolumeSnapshotParams>(),
        "Creates a data volume from a snapshot (a standalone copy on its host)",
        || post(volume_from_snapshot),
    ));
    apis.push(Api::create(
        "CreateRootVolumeTemplateFromRootVolume",
        "/v1/images/root-volume-templates/from/root-volumes/{uuid}",
        schema::<RootTemplateParams>(),
        "Creates an image from a stopped VM's root volume (a root volume's UUID is its VM's)",
        || post(root_template),
    ));
    apis.push(Api::create(
        "CreateDataVolumeTemplateFromVolume",
        "/v1/images/data-volume-templates/from/volumes/{uuid}",
        schema::<RootTemplateParams>(),
        "Creates a data volume template from a data volume (detached, or its VM stopped)",
        || post(data_template),
    ));
    apis.push(Api::create(
        "CreateRootVolumeTemplateFromVolumeSnapshot",
        "/v1/images/root-volume-templates/from/volume-snapshots/{uuid}",
        schema::<RootTemplateParams>(),
        "Creates an image from a volume snapshot (a standalone copy of its layer's chain)",
        || post(snapshot_template),
    ));
    apis.push(Api::create(
        "CreateDataVolumeFromVolumeTemplate",
        "/v1/volumes/data/from/data-volume-templates/{uuid}",
        schema::<VolumeFromTemplateParams>(),
        "Creates a data volume from a data volume template (made on its first attachment)",
        || post(volume_from_template),
    ));
    apis
}

fn check_size(field: &'static str, size: u64) -> Result<(), ApiError> {
    if !(MIN_DISK_SIZE..=MAX_DISK_SIZE).contains(&size) || !size.is_multiple_of(MIN_DISK_SIZE) {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` is in bytes: whole MiB, from 1 MiB to {} TiB", MAX_DISK_SIZE >> 40),
        ));
    }
    Ok(())
}

async fn create_disk_offering(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (DiskOfferingParams, _, _) =
        creation(&body, kinds::of::<DiskOfferingRecord>())?;
    validate::name("name", &p.name)?;
    validate::text("description", &p.description, validate::MAX_DESCRIPTION_CHARS)?;
    check_size("diskSize", p.disk_size)?;
    auth::admin_only("creating a disk offering")?;
    submit_record(&mn, &headers, "CreateDiskOffering", &raw, tags, move || {
        Ok(DiskOfferingRecord {
            uuid: Uuid::new_v4(),
            name: p.name,
            description: p.description,
            disk_size: p.disk_size,
        })
    })
    .await
}

async fn create_data_volume(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kinds::of::<VolumeRecord>();
    let (p, raw, tags): (DataVolumeParams, _, _) = creation(&body, kind)?;
    validate::name("name", &p.name)?;
    validate::text("description", &p.description, validate::MAX_DESCRIPTION_CHARS)?;
    let size = match (p.disk_offering_uuid, p.disk_size) {
        (Some(offering), None) => {
            auth::may_use(&mn.db, "disk-offerings", offering)?;
            get_record::<DiskOfferingRecord>(&mn, offering)?.disk_size
        }
        (None, Some(size)) => {
            check_size("diskSize", size)?;
            size
        }
        _ => {
            return Err(ApiError::invalid(
                "diskOfferingUuid",
                "give a disk offering (`diskOfferingUuid`) or a size (`diskSize`), one of the two",
            ));
        }
    };
    chosen_storage(&mn, p.primary_storage_uuid)?;
    let owner = auth::tenant();
    let charge = quota_precheck(&mn, owner, size)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "CreateDataVolume", &raw, move |_| async move {
            let record = VolumeRecord {
                disk_offering_uuid: p.disk_offering_uuid,
                primary_storage_uuid: p.primary_storage_uuid,
                ..VolumeRecord::data(p.name, p.description, size)
            };
            let extra = owned_charged(&tags, kind, owner, record.uuid, charge);
            charged(&m, owner, record.uuid, charge, || async {
                strato_actors::cascade::insert(&m.db, &record, extra).await.map_err(ApiError::from)
            })
            .await?;
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}

/// Checks the primary storage a new data volume names, if any: the admin's choice alone.
fn chosen_storage(mn: &crate::mn::Mn, ps: Option<Uuid>) -> Result<(), ApiError> {
    if let Some(ps) = ps {
        auth::admin_only("choosing a data volume's primary storage")?;
        get_record::<PrimaryStorageRecord>(mn, ps)?;
    }
    Ok(())
}

/// What a new data volume of `size` bytes charges: refused at once if it does not fit the
/// tenant's quota now (the creation checks again under the account's lock).
fn quota_precheck(mn: &crate::mn::Mn, owner: Option<Uuid>, size: u64) -> Result<Charge, ApiError> {
    let charge = Charge::data_volume(size);
    if let Some(tenant) = owner {
        owners::check(&mn.db, tenant, charge)?;
    }
    Ok(charge)
}

/// Runs `write`, which stores new resource `resource` charged `charge` to `owner`: for a
/// tenant, under its account's lock, once its quota is checked again.
async fn charged<T, F, Fut>(
    m: &crate::mn::Mn,
    owner: Option<Uuid>,
    resource: Uuid,
    charge: Charge,
    write: F,
) -> Result<T, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let Some(account) = owner else { return write().await };
    let record = owner_record(account, resource, charge);
    m.vms.entity().quotas().admit(&m.db, &record, write).await
}

/// Data volume `resource`'s owner record: `account`'s, charged `charge`.
fn owner_record(account: Uuid, resource: Uuid, charge: Charge) -> owners::OwnerRecord {
    owners::OwnerRecord {
        resource_uuid: resource,
        resource_type: "VolumeVO".into(),
        account_uuid: account,
        charge,
    }
}

/// The volume, which the caller may use.
fn usable_volume(mn: &crate::mn::Mn, uuid: Uuid) -> Result<VolumeRecord, ApiError> {
    auth::may_use(&mn.db, "volumes", uuid)?;
    get_record::<VolumeRecord>(mn, uuid)
}

async fn delete_data_volume(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    usable_volume(&mn, uuid)?;
    let m = mn.clone();
    let keyed = json!({ "uuid": uuid });
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "DeleteDataVolume", &keyed, move |job| async move {
            let policy = m.volume_policy;
            volume::delete(&m.runtime, &m.vms, &m.hosts, uuid, policy, Some(job)).await?;
            Ok(json!({}))
        })
        .await?;
    Ok(accepted(&mn, job))
}

async fn volume_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (action, keyed): (VolumeAction, _) = action(&body, uuid)?;
    usable_volume(&mn, uuid)?;
    let m = mn.clone();
    let job_header = job_header(&headers)?;
    let job = match action {
        VolumeAction::AttachDataVolumeToVm(OnVm { vm_instance_uuid: vm }) => {
            auth::may_use(&mn.db, "vm-instances", vm)?;
            get_record::<VmRecord>(&mn, vm)?;
            mn.jobs
                .submit(job_header, "AttachDataVolumeToVm", &keyed, move |job| async move {
                    let vms = &m.vms;
                    let attached =
                        strato_actors::vm::volumes::attach(vms, uuid, vm, OP_TIMEOUT, Some(job))
                            .await?;
                    inventory(&attached)
                })
                .await?
        }
        VolumeAction::DetachDataVolumeFromVm(_) => {
            mn.jobs
                .submit(job_header, "DetachDataVolumeFromVm", &keyed, move |job| async move {
                    let detached =
                        strato_actors::vm::volumes::detach(&m.vms, uuid, OP_TIMEOUT, Some(job))
                            .await?;
                    inventory(&detached)
                })
                .await?
        }
        VolumeAction::RecoverDataVolume(_) => {
            mn.jobs
                .submit(job_header, "RecoverDataVolume", &keyed, move |_| async move {
                    inventory(&volume::recover(&m.runtime, uuid).await?)
                })
                .await?
        }
        VolumeAction::ResizeDataVolume(NewSize { size }) => {
            check_size("size", size)?;
            mn.jobs
                .submit(job_header, "ResizeDataVolume", &keyed, move |job| async move {
                    inventory(&volume::resize(&m.vms, &m.hosts, uuid, size, Some(job)).await?)
                })
                .await?
        }
        VolumeAction::LocalStorageMigrateVolume(ToHost { dest_host_uuid: host }) => {
            auth::admin_only("moving a volume between hosts")?;
            get_record::<HostRecord>(&mn, host)?;
            mn.jobs
                .submit(job_header, "LocalStorageMigrateVolume", &keyed, move |job| async move {
                    let (vms, hosts) = (&m.vms, &m.hosts);
                    inventory(
                        &local_storage::migrate_volume(vms, hosts, uuid, host, Some(job)).await?,
                    )
                })
                .await?
        }
        VolumeAction::ExpungeDataVolume(_) => {
            mn.jobs
                .submit(job_header, "ExpungeDataVolume", &keyed, move |_| async move {
                    volume::expunge(&m.runtime, &m.hosts, uuid).await?;
                    Ok(json!({}))
                })
                .await?
        }
    };
    Ok(accepted(&mn, job))
}

async fn migratable_hosts(State(mn): Shared, Id(uuid): Id) -> Result<Json<Value>, ApiError> {
    auth::admin_only("listing the hosts a volume can move to")?;
    get_record::<VolumeRecord>(&mn, uuid)?;
    let hosts = local_storage::migratable_hosts(&mn.db, uuid)?;
    let inventories = hosts.iter().map(inventory).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "inventories": inventories })))
}

async fn create_snapshot(
    State(mn): Shared,
    Id(volume): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kinds::of::<VolumeSnapshotRecord>();
    let (p, raw, tags): (VolumeSnapshotParams, _, _) = creation(&body, kind)?;
    validate::name("name", &p.name)?;
    validate::text("description", &p.description, validate::MAX_DESCRIPTION_CHARS)?;
    usable_volume(&mn, volume)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "CreateVolumeSnapshot", &raw, move |job| async move {
            let uuid = Uuid::new_v4();
            // Owned through its volume: its tags alone go with it.
            let extra = owned(&tags, kind, None, uuid);
            let asked = snapshot::Asked { uuid, name: p.name, description: p.description };
            let max = m.volume_policy.max_incremental_snapshots;
            let taken =
                snapshot::create(&m.vms, &m.hosts, volume, asked, max, extra, Some(job)).await?;
            inventory(&taken)
        })
        .await?;
    Ok(accepted(&mn, job))
}

/// The snapshot, whose volume the caller may use.
fn usable_snapshot(mn: &crate::mn::Mn, uuid: Uuid) -> Result<VolumeSnapshotRecord, ApiError> {
    auth::may_use(&mn.db, "volume-snapshots", uuid)?;
    get_record::<VolumeSnapshotRecord>(mn, uuid)
}

async fn delete_snapshot(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    usable_snapshot(&mn, uuid)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(
            job_header(&headers)?,
            "DeleteVolumeSnapshot",
            &json!({ "uuid": uuid }),
            move |job| async move {
                snapshot::delete(&m.vms, &m.hosts, uuid, Some(job)).await?;
                Ok(json!({}))
            },
        )
        .await?;
    Ok(accepted(&mn, job))
}

async fn snapshot_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (action, keyed): (VolumeSnapshotAction, _) = action(&body, uuid)?;
    usable_snapshot(&mn, uuid)?;
    let m = mn.clone();
    let job = match action {
        VolumeSnapshotAction::RevertVolumeFromSnapshot(_) => {
            mn.jobs
                .submit(
                    job_header(&headers)?,
                    "RevertVolumeFromSnapshot",
                    &keyed,
                    move |job| async move {
                        inventory(&snapshot::revert(&m.vms, &m.hosts, uuid, Some(job)).await?)
                    },
                )
                .await?
        }
    };
    Ok(accepted(&mn, job))
}

async fn volume_from_snapshot(
    State(mn): Shared,
    Id(snapshot_uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kinds::of::<VolumeRecord>();
    let (p, raw, tags): (VolumeSnapshotParams, _, _) = creation(&body, kind)?;
    validate::name("name", &p.name)?;
    validate::text("description", &p.description, validate::MAX_DESCRIPTION_CHARS)?;
    let size = usable_snapshot(&mn, snapshot_uuid)?.size;
    let owner = auth::tenant();
    let charge = quota_precheck(&mn, owner, size)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(
            job_header(&headers)?,
            "CreateDataVolumeFromVolumeSnapshot",
            &raw,
            move |job| async move {
                // Its size, place and file are those of the snapshot's copy.
                let new = VolumeRecord::data(p.name, p.description, 0);
                let uuid = new.uuid;
                let extra = owned_charged(&tags, kind, owner, uuid, charge);
                // The copy is made first; its record is admitted under the account's lock.
                let quota = owner.map(|account| {
                    let owner = owner_record(account, uuid, charge);
                    (m.vms.entity().quotas().clone(), owner)
                });
                let made = snapshot::to_volume(
                    &m.runtime,
                    &m.hosts,
                    snapshot_uuid,
                    new,
                    extra,
                    quota,
                    Some(job),
                )
                .await?;
                inventory(&made)
            },
        )
        .await?;
    Ok(accepted(&mn, job))
}

/// What a template is copied from.
#[derive(Clone, Copy, Debug)]
enum TemplateSource {
    /// A stopped VM's root volume (the path names the VM).
    RootVolume,
    /// A data volume, detached or on a stopped VM.
    DataVolume,
    /// A volume snapshot's layer.
    Snapshot,
}

async fn root_template(
    State(mn): Shared,
    Id(vm): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    make_template(mn, TemplateSource::RootVolume, vm, headers, body).await
}

async fn data_template(
    State(mn): Shared,
    Id(volume): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    make_template(mn, TemplateSource::DataVolume, volume, headers, body).await
}

async fn snapshot_template(
    State(mn): Shared,
    Id(snapshot): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    make_template(mn, TemplateSource::Snapshot, snapshot, headers, body).await
}

/// A template into backup storage from `source` `from`: a standalone qcow2 copy, owned by
/// the caller.
async fn make_template(
    mn: std::sync::Arc<crate::mn::Mn>,
    source: TemplateSource,
    from: Uuid,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    use strato_actors::records::{DATA_VOLUME_TEMPLATE, ROOT_VOLUME_TEMPLATE};
    let kind = kinds::of::<ImageRecord>();
    let (p, raw, tags): (RootTemplateParams, _, _) = creation(&body, kind)?;
    validate::name("name", &p.name)?;
    let (api, url, media_type) = match source {
        TemplateSource::RootVolume => {
            auth::may_use(&mn.db, "vm-instances", from)?;
            get_record::<VmRecord>(&mn, from)?;
            ("CreateRootVolumeTemplateFromRootVolume", "volume", ROOT_VOLUME_TEMPLATE)
        }
        TemplateSource::DataVolume => {
            let v = usable_volume(&mn, from)?;
            if v.is_root() {
                return Err(ApiError::invalid(
                    "volumeUuid",
                    "a data volume template is made from a data volume",
                ));
            }
            ("CreateDataVolumeTemplateFromVolume", "volume", DATA_VOLUME_TEMPLATE)
        }
        TemplateSource::Snapshot => {
            usable_snapshot(&mn, from)?;
            ("CreateRootVolumeTemplateFromVolumeSnapshot", "volume-snapshot", ROOT_VOLUME_TEMPLATE)
        }
    };
    let bs_uuid = *p
        .backup_storage_uuids
        .first()
        .ok_or_else(|| ApiError::invalid("backupStorageUuids", "name one backup storage"))?;
    let bs: BackupStorageRecord = get_record(&mn, bs_uuid)?;
    let owner = auth::tenant();
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, api, &raw, move |job| async move {
            let image = ImageRecord {
                uuid: Uuid::new_v4(),
                name: p.name,
                url: format!("{url}://{from}"),
                format: "qcow2".into(),
                media_type: media_type.into(),
                size: 0,
                checksum: String::new(),
                backup_storage_refs: vec![(bs.uuid, String::new())],
                status: "Creating".into(),
            };
            let extra = owned(&tags, kind, owner, image.uuid);
            let job = Some(job);
            let made = match source {
                TemplateSource::RootVolume => {
                    strato_actors::vm::volumes::root_template(&m.vms, from, image, bs, extra, job)
                        .await?
                }
                TemplateSource::DataVolume => {
                    strato_actors::vm::volumes::data_template(&m.vms, from, image, bs, extra, job)
                        .await?
                }
                TemplateSource::Snapshot => {
                    snapshot::template(&m.vms, from, image, bs, extra, job).await?
                }
            };
            inventory(&made)
        })
        .await?;
    Ok(accepted(&mn, job))
}

async fn volume_from_template(
    State(mn): Shared,
    Id(image_uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kinds::of::<VolumeRecord>();
    let (p, raw, tags): (VolumeFromTemplateParams, _, _) = creation(&body, kind)?;
    validate::name("name", &p.name)?;
    validate::text("description", &p.description, validate::MAX_DESCRIPTION_CHARS)?;
    auth::may_use(&mn.db, "images", image_uuid)?;
    let image: ImageRecord = get_record(&mn, image_uuid)?;
    if image.media_type != strato_actors::records::DATA_VOLUME_TEMPLATE
        || image.status != "Ready"
        || image.format != "qcow2"
    {
        return Err(ApiError::invalid(
            "imageUuid",
            format!(
                "image {image_uuid} is a {} {} in {}: data volumes are made from a Ready DataVolumeTemplate in qcow2",
                image.status, image.media_type, image.format
            ),
        ));
    }
    chosen_storage(&mn, p.primary_storage_uuid)?;
    // Its size is the template's virtual size, read from the file's header.
    let size = match backup_storage::describe_image(&mn.db, &mn.stores, &image).await {
        Ok(Some((size, None))) => size,
        // Copied with its chain, a backing file would bring a host's file into a volume.
        Ok(Some((_, Some(backing)))) => {
            return Err(ApiError::invalid(
                "imageUuid",
                format!(
                    "image {image_uuid}'s file names a backing file ({backing}): a template stands alone"
                ),
            ));
        }
        Ok(None) => {
            return Err(ApiError::invalid(
                "imageUuid",
                format!("image {image_uuid}'s file cannot be read as qcow2"),
            ));
        }
        Err(error) => return Err(error.into()),
    };
    let owner = auth::tenant();
    let charge = quota_precheck(&mn, owner, size)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(
            job_header(&headers)?,
            "CreateDataVolumeFromVolumeTemplate",
            &raw,
            move |_| async move {
                let record = VolumeRecord {
                    root_image_uuid: Some(image_uuid),
                    primary_storage_uuid: p.primary_storage_uuid,
                    ..VolumeRecord::data(p.name, p.description, size)
                };
                let extra = owned_charged(&tags, kind, owner, record.uuid, charge);
                charged(&m, owner, record.uuid, charge, || async {
                    strato_actors::cascade::insert(&m.db, &record, extra)
                        .await
                        .map_err(ApiError::from)
                })
                .await?;
                inventory(&record)
            },
        )
        .await?;
    Ok(accepted(&mn, job))
}
