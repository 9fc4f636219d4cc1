//! Cleaning primary storage's image caches (ZStack's `CleanUpImageCacheOnPrimaryStorage`
//! and its periodic garbage collector).
//!
//! A VM's root volume is a qcow2 file backed by its image's copy in its host's image cache,
//! so a cached image may go only when no file uses it. Which files use it is read from the
//! files themselves, by the agent (each file's header names its backing file): the MN's
//! records could say otherwise after a crash between a file and its record, and a cache
//! deleted under a file that still names it would make that volume unreadable. The agent
//! also keeps a cache it handed out recently, for a creation between caching its image and
//! making its root volume on it (see `strato_agent::volumes`).

use std::time::{Duration, SystemTime};

use serde::Serialize;
use strato_proto::{Command, Reply};
use strato_runtime::Kind;
use strato_storage::Db;
use uuid::Uuid;

use crate::host::{self, HostError, Hosts};
use crate::records::{HostRecord, PrimaryStorageRecord};
use crate::volume::VolumeError;

/// When the caches are cleaned and what is spared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSettings {
    /// How often the periodic collector cleans every primary storage's caches (`None`:
    /// only when asked).
    pub interval: Option<Duration>,
    /// How recently made or handed out a cached image must be to stay even if no file uses
    /// it yet: longer than any creation takes from caching its image to making its root
    /// volume.
    pub grace: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            interval: Some(Duration::from_secs(3600)),
            grace: Duration::from_secs(30 * 60),
        }
    }
}

/// What cleaning one host's cache did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCleaning {
    /// The host.
    pub host_uuid: Uuid,
    /// The cached images deleted (their files).
    pub deleted: Vec<String>,
    /// How many cached images stayed.
    pub kept: u64,
    /// How many volume and snapshot files were read to decide.
    pub volumes_read: u64,
    /// Why the host was not cleaned, if it was not (it is cleaned next time).
    pub skipped: Option<String>,
}

/// Cleans the image cache of primary storage `ps` on each host that uses it (every host of
/// its clusters, for local storage; one of them, for shared storage). A host that cannot be
/// reached is skipped and said so.
pub async fn clean(
    db: &Db,
    hosts: &Kind<Hosts>,
    ps: Uuid,
    grace: Duration,
    job: Option<Uuid>,
) -> Result<Vec<HostCleaning>, VolumeError> {
    let storage = db
        .get::<PrimaryStorageRecord>(ps)?
        .ok_or(VolumeError::NotFound { kind: "PrimaryStorage", uuid: ps })?
        .record;
    let mut users = Vec::new();
    for stored in db.scan::<HostRecord>() {
        let host = stored?.record;
        if storage.attached_cluster_uuids.contains(&host.cluster_uuid) {
            users.push(host);
        }
    }
    // Shared storage is one directory: one connected host cleans it for all (each host
    // marks a cache it hands out as new, so the others' recent ones are spared too).
    let users: Vec<Uuid> = if storage.is_local() {
        users.into_iter().map(|h| h.uuid).collect()
    } else {
        users.sort_by_key(|h| h.uuid);
        let connected = users.iter().find(|h| h.status == crate::records::HostStatus::Connected);
        connected.or(users.first()).map(|h| h.uuid).into_iter().collect()
    };
    let command = Command::CleanImageCache {
        cache_dir: storage.image_cache_dir(),
        volume_dirs: vec![storage.root_volumes_dir(), storage.data_volumes_dir()],
        grace_secs: grace.as_secs(),
    };
    let mut cleanings = Vec::new();
    for host in users {
        let deadline = SystemTime::now() + Duration::from_secs(600);
        let cleaning = match host::command(hosts, host, command.clone(), deadline, job).await {
            Ok(Reply::CacheCleaned { deleted, kept, volumes_read }) => {
                HostCleaning { host_uuid: host, deleted, kept, volumes_read, skipped: None }
            }
            Ok(other) => {
                let why = format!("the agent answered {other:?}");
                HostCleaning { host_uuid: host, skipped: Some(why), ..HostCleaning::default() }
            }
            Err(error) if error.is_unreachable() || matches!(error, HostError::Runtime(_)) => {
                let why = error.to_string();
                HostCleaning { host_uuid: host, skipped: Some(why), ..HostCleaning::default() }
            }
            Err(error) => return Err(error.into()),
        };
        tracing::info!(
            %ps,
            host = %cleaning.host_uuid,
            deleted = cleaning.deleted.len(),
            kept = cleaning.kept,
            skipped = ?cleaning.skipped,
            "image cache cleaned"
        );
        cleanings.push(cleaning);
    }
    Ok(cleanings)
}

/// Cleans every primary storage's image caches every `interval`, from `interval` after the
/// call (a failure is logged and tried again next time). The task holds the runtime: abort
/// it through the handle before the runtime stops.
pub fn collect_periodically(
    db: Db,
    hosts: Kind<Hosts>,
    interval: Duration,
    grace: Duration,
) -> tokio::task::AbortHandle {
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let storages: Vec<Uuid> = db
                .scan::<PrimaryStorageRecord>()
                .filter_map(|s| s.ok().map(|s| s.record.uuid))
                .collect();
            for ps in storages {
                if let Err(error) = clean(&db, &hosts, ps, grace, None).await {
                    let error = strato_runtime::error_chain(&error);
                    tracing::warn!(%ps, %error, "the image cache collector failed; it tries again next time");
                }
            }
        }
    });
    task.abort_handle()
}
