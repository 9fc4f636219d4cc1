//! Storage: image-store backup storage attached to zones, local primary storage attached to
//! clusters, and images imported into backup storage.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{MethodRouter, get, post, put};
use serde_json::{Value, json};
use strato_actors::records::{
    BackupStorageRecord, ClusterRecord, HostRecord, HostStatus, ImageRecord, LOCAL_STORAGE, NFS,
    PrimaryStorageRecord, SHARED_MOUNT_POINT, ZoneRecord,
};
use strato_actors::{backup_storage, kinds};
use strato_storage::{Batch, Expect};
use uuid::Uuid;

use super::api::{Answer, Api, Body, Method, actions, schema};
use super::resources::Attachment;
use super::{Id, Shared, accepted, action, creation, get_record, job_header, submit_record, write};
use crate::auth;
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::actions::{BackupStorageAction, PrimaryStorageAction};
use crate::types::{ImageParams, ImageStoreParams, StorageParams, inventory, validate};

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let attach = |name, path, summary, handler| {
        Api::new(name, Method::Post, path, Body::None, Answer::Job, summary, handler)
    };
    vec![
        Api::create(
            "AddImageStoreBackupStorage",
            "/v1/backup-storage/image-store",
            schema::<ImageStoreParams>(),
            "Adds image-store backup storage: a directory on its own host, whose agent (`strato-agent --driver none`) the node reaches over an authenticated link, or without `hostname` a directory on the node that the hosts read at the same path",
            || post(create_backup_storage),
        ),
        attach(
            "AttachBackupStorageToZone",
            "/v1/zones/{zone}/backup-storage/{bs}",
            "Attaches backup storage to a zone",
            attach_backup_storage as fn() -> MethodRouter<Arc<Mn>>,
        ),
        Api::create(
            "AddLocalPrimaryStorage",
            "/v1/primary-storage/local-storage",
            schema::<StorageParams>(),
            "Adds local primary storage (a directory on each host's own disk)",
            || post(|mn, headers, body| add_primary_storage(mn, headers, body, LOCAL_STORAGE)),
        ),
        Api::create(
            "AddNfsPrimaryStorage",
            "/v1/primary-storage/nfs",
            schema::<StorageParams>(),
            "Adds NFS primary storage (`url`: `server:/export`, mounted by every host of its clusters before it is Connected)",
            || post(|mn, headers, body| add_primary_storage(mn, headers, body, NFS)),
        ),
        Api::create(
            "AddSharedMountPointPrimaryStorage",
            "/v1/primary-storage/smp",
            schema::<StorageParams>(),
            "Adds shared mount point primary storage (a directory every host of its clusters mounts)",
            || post(|mn, headers, body| add_primary_storage(mn, headers, body, SHARED_MOUNT_POINT)),
        ),
        Api::new(
            "GetPrimaryStorageCapacity",
            Method::Get,
            "/v1/primary-storage/{uuid}/capacity",
            Body::None,
            Answer::Immediate,
            "A primary storage's size and what is free (admin): local storage by host, booked by the volumes' virtual sizes",
            || get(storage_capacity),
        ),
        attach(
            "AttachPrimaryStorageToCluster",
            "/v1/clusters/{cluster}/primary-storage/{ps}",
            "Attaches primary storage to a cluster",
            attach_primary_storage,
        ),
        Api::create(
            "AddImage",
            "/v1/images",
            schema::<ImageParams>(),
            "Adds an image from a URL to backup storage",
            || post(add_image),
        ),
    ]
    .into_iter()
    .chain(actions::<BackupStorageAction>("/v1/backup-storage/{uuid}/actions", || {
        put(backup_storage_action)
    }))
    .chain(actions::<PrimaryStorageAction>("/v1/primary-storage/{uuid}/actions", || {
        put(primary_storage_action)
    }))
    .collect()
}

async fn primary_storage_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (action, keyed): (PrimaryStorageAction, _) = action(&body, uuid)?;
    auth::admin_only("cleaning an image cache")?;
    get_record::<PrimaryStorageRecord>(&mn, uuid)?;
    let (m, grace) = (mn.clone(), mn.image_cache.grace);
    let job = match action {
        PrimaryStorageAction::CleanUpImageCacheOnPrimaryStorage(_) => {
            mn.jobs
                .submit(job_header(&headers)?, "CleanUpImageCacheOnPrimaryStorage", &keyed, {
                    move |job| async move {
                        let cleaned = strato_actors::image_cache::clean(
                            &m.db,
                            &m.hosts,
                            uuid,
                            grace,
                            Some(job),
                        )
                        .await?;
                        Ok(json!({ "hosts": cleaned }))
                    }
                })
                .await?
        }
    };
    Ok(accepted(&mn, job))
}

fn directory_url(url: &str) -> Result<String, ApiError> {
    if !url.starts_with('/') {
        return Err(ApiError::invalid("url", format!("`{url}` is not an absolute directory path")));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

async fn create_backup_storage(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, mut raw, tags): (ImageStoreParams, _, _) =
        creation(&body, kinds::of::<BackupStorageRecord>())?;
    // Never kept: the job's record holds its parameters.
    if let Some(params) = raw.as_object_mut() {
        params.remove("password");
    }
    validate::name("name", &p.name)?;
    let url = directory_url(&p.url)?;
    if let Some(hostname) = &p.hostname {
        host_name("hostname", hostname)?;
    }
    if let Some(username) = &p.username {
        validate::name("username", username)?;
    }
    let record = BackupStorageRecord {
        uuid: Uuid::new_v4(),
        name: p.name,
        url,
        r#type: "ImageStoreBackupStorage".into(),
        attached_zone_uuids: vec![],
        hostname: p.hostname,
        agent_port: p.agent_port,
        username: p.username,
        ssh_port: p.ssh_port,
        status: HostStatus::Connected,
        last_error: None,
        total_capacity: 0,
        available_capacity: 0,
    };
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(&headers)?, "AddImageStoreBackupStorage", &raw, move |_| async move {
            if !record.is_remote() {
                std::fs::create_dir_all(&record.url).map_err(|e| {
                    ApiError::invalid("url", format!("cannot use {}: {e}", record.url))
                })?;
                write(&m, &record, &tags).await?;
                return inventory(&record);
            }
            let record = BackupStorageRecord { status: HostStatus::Connecting, ..record };
            write(&m, &record, &tags).await?;
            if let Err(error) = backup_storage::connect(&m.stores, record.uuid).await {
                // As in ZStack: storage whose host cannot be reached on adding is not added.
                let _ = m.stores.restart(record.uuid).await;
                let mut batch = Batch::new();
                batch.delete::<BackupStorageRecord>(record.uuid, Expect::Any);
                strato_actors::records::delete_refs(&m.db, &mut batch, record.uuid)?;
                m.db.commit(batch).await?;
                return Err(error.into());
            }
            inventory(&get_record::<BackupStorageRecord>(&m, record.uuid)?)
        })
        .await?;
    Ok(accepted(&mn, job))
}

/// A host's name or IP address, as the storage's agent is dialed.
fn host_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    strato_actors::tags::check_hostname(name).map_err(|reason| ApiError::invalid(field, reason))
}

async fn backup_storage_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (action, keyed): (BackupStorageAction, _) = action(&body, uuid)?;
    auth::admin_only("reconnecting backup storage")?;
    get_record::<BackupStorageRecord>(&mn, uuid)?;
    let m = mn.clone();
    let job = match action {
        BackupStorageAction::ReconnectBackupStorage(_) => {
            mn.jobs
                .submit(
                    job_header(&headers)?,
                    "ReconnectBackupStorage",
                    &keyed,
                    move |_| async move {
                        backup_storage::reconnect(&m.stores, uuid).await?;
                        inventory(&get_record::<BackupStorageRecord>(&m, uuid)?)
                    },
                )
                .await?
        }
    };
    Ok(accepted(&mn, job))
}

fn attach_backup_storage() -> MethodRouter<Arc<Mn>> {
    Attachment::<BackupStorageRecord, ZoneRecord> {
        api: "AttachBackupStorageToZone",
        params: [("zone", "zoneUuid"), ("bs", "backupStorageUuid")],
        target_first: false,
        list: |r| &mut r.attached_zone_uuids,
        parent: std::marker::PhantomData,
        detach: false,
        then: super::resources::nothing_then,
    }
    .handler()
}

/// NFS storage attached to a cluster is mounted by each of its hosts now, over their links
/// (a host that cannot connects again, and stays Disconnected saying why, since a host
/// mounts it before it is Connected). Each host measures its storage, which bounds the
/// bookings: its local storage's, and the shared storage's.
fn mount_on_cluster_hosts(mn: &crate::mn::Mn, ps: &PrimaryStorageRecord, cluster: Uuid) {
    let mount = ps.mount_path.clone().map(|mount_point| strato_proto::Command::MountStorage {
        url: ps.url.clone(),
        mount_point,
    });
    let hosts: Vec<Uuid> = mn.db.find::<HostRecord>("cluster", &cluster.into()).unwrap_or_default();
    for host in hosts {
        let (kind, mount) = (mn.hosts.clone(), mount.clone());
        tokio::spawn(async move {
            if let Some(command) = mount {
                let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
                if let Err(error) =
                    strato_actors::host::command(&kind, host, command, deadline, None).await
                {
                    let error = strato_runtime::error_chain(&error);
                    tracing::warn!(%host, %error, "a host did not mount NFS storage; it connects again, and mounts it first");
                    let _ = strato_actors::host::link::reconnect(&kind, host).await;
                }
            }
            if let Err(error) = strato_actors::host::measure_storage(&kind, host).await {
                let error = strato_runtime::error_chain(&error);
                tracing::warn!(%host, %error, "a host's storage was not measured; it is when the host next connects");
            }
        });
    }
}

/// `GetPrimaryStorageCapacity` (admin): local storage summed over its hosts as measured at
/// their connect, with what is booked on them; shared storage measured now by one host,
/// with what is booked on it.
async fn storage_capacity(State(mn): Shared, Id(uuid): Id) -> Result<Json<Value>, ApiError> {
    auth::admin_only("primary storage capacity")?;
    let ps: PrimaryStorageRecord = get_record(&mn, uuid)?;
    let mut hosts = Vec::new();
    for cluster in &ps.attached_cluster_uuids {
        for id in mn.db.find::<HostRecord>("cluster", &(*cluster).into())? {
            hosts.extend(mn.db.get::<HostRecord>(id)?.map(|h| h.record));
        }
    }
    hosts.sort_by_key(|h| h.uuid);
    if !ps.is_local() {
        let connected = hosts.iter().find(|h| h.status == HostStatus::Connected);
        let host = connected.ok_or_else(|| {
            ApiError::of(
                crate::codes::HOST_UNAVAILABLE,
                "no host of the storage's clusters is connected to measure it",
            )
        })?;
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(30);
        let command = strato_proto::Command::StorageCapacity { dir: ps.base_dir().to_owned() };
        let reply =
            strato_actors::host::command(&mn.hosts, host.uuid, command, deadline, None).await?;
        let strato_proto::Reply::Capacity { total, available } = reply else {
            return Err(ApiError::of(
                crate::codes::HOST_OPERATION_FAILED,
                "the agent did not measure the storage",
            ));
        };
        strato_actors::shared_capacity::measured(&mn.db, uuid, total, available).await?;
        let booked = mn
            .db
            .get::<strato_actors::shared_capacity::SharedCapacityRecord>(uuid)?
            .map_or(0, |s| s.record.booked());
        return Ok(Json(json!({
            "totalCapacity": total,
            "availableCapacity": total.saturating_sub(booked),
            "totalPhysicalCapacity": total,
            "availablePhysicalCapacity": available,
        })));
    }
    let (mut total, mut available, mut physical) = (0u64, 0u64, 0u64);
    let mut per_host = Vec::new();
    for host in hosts {
        let Some(measured) = host.local_storage.filter(|m| m.primary_storage_uuid == uuid) else {
            continue;
        };
        let free = measured.total.saturating_sub(host.reserved_disk());
        total = total.saturating_add(measured.total);
        available = available.saturating_add(free);
        physical = physical.saturating_add(measured.available_physical);
        per_host.push(json!({
            "hostUuid": host.uuid,
            "totalCapacity": measured.total,
            "availableCapacity": free,
            "availablePhysicalCapacity": measured.available_physical,
        }));
    }
    Ok(Json(json!({
        "totalCapacity": total,
        "availableCapacity": available,
        "totalPhysicalCapacity": total,
        "availablePhysicalCapacity": physical,
        "hosts": per_host,
    })))
}

async fn add_primary_storage(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
    kind: &'static str,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (StorageParams, _, _) =
        creation(&body, kinds::of::<PrimaryStorageRecord>())?;
    validate::name("name", &p.name)?;
    let url = if kind == NFS { nfs_url(&p.url)? } else { directory_url(&p.url)? };
    let zone =
        p.zone_uuid.ok_or_else(|| ApiError::invalid("zoneUuid", "`zoneUuid` is required"))?;
    get_record::<ZoneRecord>(&mn, zone)?;
    let api = match kind {
        LOCAL_STORAGE => "AddLocalPrimaryStorage",
        NFS => "AddNfsPrimaryStorage",
        _ => "AddSharedMountPointPrimaryStorage",
    };
    let mount_root = mn.nfs_mount_root.clone();
    submit_record(&mn, &headers, api, &raw, tags, move || {
        let uuid = Uuid::new_v4();
        Ok(PrimaryStorageRecord {
            uuid,
            name: p.name,
            url,
            zone_uuid: zone,
            r#type: kind.into(),
            attached_cluster_uuids: vec![],
            // ZStack's layout: one mount point per storage under a root every host has.
            mount_path: (kind == NFS).then(|| format!("{mount_root}/prim-{}", uuid.simple())),
        })
    })
    .await
}

/// An NFS export, `server:/path`: a host name or address without spaces, an absolute path.
fn nfs_url(url: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid("url", format!("`{url}` is not an NFS export (`server:/absolute/path`)"))
    };
    // Split where the path starts, so an IPv6 server (`[fd00::1]:/export`) keeps its colons.
    let at = url.find(":/").ok_or_else(bad)?;
    let (server, path) = (&url[..at], &url[at + 1..]);
    let plain = |s: &str| !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == ',');
    if !plain(server) || !plain(path) || !path.starts_with('/') || server.starts_with('-') {
        return Err(bad());
    }
    let path = match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    Ok(format!("{server}:{path}"))
}

fn attach_primary_storage() -> MethodRouter<Arc<Mn>> {
    Attachment::<PrimaryStorageRecord, ClusterRecord> {
        api: "AttachPrimaryStorageToCluster",
        params: [("cluster", "clusterUuid"), ("ps", "primaryStorageUuid")],
        target_first: false,
        list: |r| &mut r.attached_cluster_uuids,
        parent: std::marker::PhantomData,
        detach: false,
        then: mount_on_cluster_hosts,
    }
    .handler()
}

/// How long copying a fetched image into an image store on its own host may take.
const IMAGE_UPLOAD_TIME: std::time::Duration = std::time::Duration::from_secs(3600);

async fn add_image(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (ImageParams, _, _) = creation(&body, kinds::of::<ImageRecord>())?;
    validate::name("name", &p.name)?;
    strato_actors::images::check(&p.url, &mn.image_policy).await.map_err(|e| match e {
        strato_actors::images::ImageError::BadUrl(reason) => ApiError::invalid("url", reason),
        e => ApiError::invalid("url", e.to_string()),
    })?;
    if p.format != "qcow2" && p.format != "raw" {
        return Err(ApiError::invalid("format", format!("`{}` is not qcow2 or raw", p.format)));
    }
    use strato_actors::records::{DATA_VOLUME_TEMPLATE, ROOT_VOLUME_TEMPLATE};
    if p.media_type != ROOT_VOLUME_TEMPLATE && p.media_type != DATA_VOLUME_TEMPLATE {
        return Err(ApiError::invalid(
            "mediaType",
            format!("`{}` is not {ROOT_VOLUME_TEMPLATE} or {DATA_VOLUME_TEMPLATE}", p.media_type),
        ));
    }
    let bs_uuid = *p
        .backup_storage_uuids
        .first()
        .ok_or_else(|| ApiError::invalid("backupStorageUuids", "name one backup storage"))?;
    let bs: BackupStorageRecord = get_record(&mn, bs_uuid)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit_cancellable(job_header(&headers)?, "AddImage", &raw, move |cancel| async move {
            let uuid = Uuid::new_v4();
            // Into an image store on its own host: fetched here first, then copied there.
            let dir = if bs.is_remote() { m.image_staging.clone() } else { bs.url.clone().into() };
            let fetched = strato_actors::images::fetch(
                &p.url,
                &dir,
                uuid,
                &p.format,
                &m.image_policy,
                cancel.cancelled(),
            )
            .await
            .map_err(|e| match e {
                // Refused by the policy: the caller's URL is at fault.
                strato_actors::images::ImageError::BadUrl(reason) => {
                    ApiError::invalid("url", reason)
                }
                strato_actors::images::ImageError::Cancelled => crate::jobs::cancelled(),
                e => ApiError::new(
                    crate::codes::IMAGE_DOWNLOAD_FAILED,
                    "the image could not be imported from its URL",
                    json!({ "cause": e.to_string() }),
                ),
            })?;
            let path = if bs.is_remote() {
                let staged = fetched.path.clone();
                let name = staged.file_name().unwrap_or_default().to_string_lossy();
                let path = format!("{}/{name}", bs.url.trim_end_matches('/'));
                let deadline = std::time::SystemTime::now() + IMAGE_UPLOAD_TIME;
                let upload =
                    backup_storage::upload(&m.stores, bs.uuid, &staged, &path, deadline, None);
                let uploaded = tokio::select! {
                    uploaded = upload => uploaded.map(|_| ()).map_err(ApiError::from),
                    () = cancel.cancelled() => Err(crate::jobs::cancelled()),
                };
                if let Err(error) = tokio::fs::remove_file(&staged).await {
                    tracing::warn!(path = %staged.display(), %error, "a staged image stays until the node's next start");
                }
                uploaded?;
                path
            } else {
                fetched.path.display().to_string()
            };
            let image = ImageRecord {
                uuid,
                name: p.name,
                url: p.url,
                format: p.format,
                media_type: p.media_type,
                size: fetched.size,
                checksum: fetched.checksum,
                backup_storage_refs: vec![(bs.uuid, path.clone())],
                status: "Ready".into(),
            };
            if let Err(error) = write(&m, &image, &tags).await {
                // No record names the file: it goes.
                if bs.is_remote() {
                    backup_storage::delete_file(&m.stores, bs.uuid, &path).await;
                } else if let Err(removed) = std::fs::remove_file(&path) {
                    tracing::warn!(%path, error = %removed, "an image file no record names stays");
                }
                return Err(error);
            }
            inventory(&image)
        })
        .await?;
    Ok(accepted(&mn, job))
}

#[cfg(test)]
mod tests {
    use super::nfs_url;

    #[test]
    fn an_nfs_export_is_a_server_and_an_absolute_path() {
        assert_eq!(nfs_url("nfs.example:/srv/ps/").unwrap(), "nfs.example:/srv/ps");
        assert_eq!(nfs_url("[fd00::1]:/srv").unwrap(), "[fd00::1]:/srv");
        assert_eq!(nfs_url("10.0.0.1:/").unwrap(), "10.0.0.1:/");
        for bad in ["/srv/ps", ":/srv", "server:srv", "-o:/x", "a b:/x", "s:/a,b", "server"] {
            assert_eq!(
                nfs_url(bad).unwrap_err().body()["error"]["details"]["field"],
                "url",
                "{bad}"
            );
        }
    }
}
