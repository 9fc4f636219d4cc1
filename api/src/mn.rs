//! The management node assembled: the store, the runtime, the actor kinds, the flows and the
//! GC, recovered and started in the right order.
//!
//! Order matters at startup: kinds and chains are declared and hosts dialed before the flow
//! recovery pass (it needs the chains, and rolling back a creation needs its host), jobs are
//! ended after it (their flows are rolled back by then), and GC handlers are registered
//! before the GC starts.

use std::path::Path;
use std::sync::Arc;

use strato_actors::backup_storage::{self, BackupStorages};
use strato_actors::host::{self, HostConfig, Hosts, Overcommit};
use strato_actors::l3::L3s;
use strato_actors::records::{BackupStorageRecord, HostRecord};
use strato_actors::vm::ops::VmPolicy;
use strato_actors::vm::{self, Vms};
use strato_runtime::{BoxError, Kind, Runtime, RuntimeConfig};
use strato_storage::Db;

/// The running management node.
#[derive(Debug)]
pub struct Mn {
    /// The runtime.
    pub runtime: Runtime,
    /// The store.
    pub db: Db,
    /// VM actors.
    pub vms: Kind<Vms>,
    /// Host actors.
    pub hosts: Kind<Hosts>,
    /// L3 network actors.
    pub l3s: Kind<L3s>,
    /// Backup storage actors: the links to image stores on their own hosts.
    pub stores: Kind<BackupStorages>,
    /// Where images bound for an image store on its own host are fetched first (emptied
    /// at every start: what is there was left by an import that died).
    pub image_staging: std::path::PathBuf,
    /// What authentication needs: the store, the session lifetime, the login throttle.
    pub auth: crate::auth::Auth,
    /// The admin's password when this start generated it, to print once.
    pub generated_admin_password: Option<String>,
    /// Held while an account is created: account names are unique.
    pub account_creation: tokio::sync::Mutex<()>,
    /// The URL clients reach the API at (`STRATO_EXTERNAL_URL`), for the `Location` of a
    /// job; without it a `Location` is a path, never built from the request's `Host`.
    pub external_url: Option<String>,
    /// What an image import may read.
    pub image_policy: strato_actors::images::ImportPolicy,
    /// Where hosts mount NFS primary storage (`STRATO_NFS_MOUNT_ROOT`, by default
    /// `/opt/strato/nfsprimarystorage`): each storage at `prim-<uuid>` under it.
    pub nfs_mount_root: String,
    /// The jobs: submitted, waited for, cancelled.
    pub jobs: crate::jobs::Jobs,
    /// How deleting a data volume behaves (the VMs' deletion policy and grace period).
    pub volume_policy: strato_actors::volume::VolumePolicy,
    /// When image caches are cleaned and what is spared.
    pub image_cache: strato_actors::image_cache::CacheSettings,
    /// The periodic image cache collector, stopped before the runtime.
    image_cache_collector: Option<tokio::task::AbortHandle>,
}

impl Mn {
    /// What deletions with cascade need.
    pub fn deleter(&self) -> strato_actors::cascade::Deleter {
        strato_actors::cascade::Deleter {
            db: self.db.clone(),
            hosts: self.hosts.clone(),
            vms: self.vms.clone(),
            l3s: self.l3s.clone(),
        }
    }
}

/// Makes the image staging directory (private, as the data directory) and deletes what an
/// earlier run left there; answers how many files it deleted.
fn clear_staging(dir: &Path) -> Result<usize, BoxError> {
    let mut cleared = 0;
    if dir.exists() {
        for entry in std::fs::read_dir(dir)? {
            std::fs::remove_file(entry?.path())?;
            cleared += 1;
        }
    }
    std::fs::create_dir_all(dir)?;
    Ok(cleared)
}

/// The file, in the data directory, that keeps a generated admin password.
pub const INITIAL_ADMIN_PASSWORD: &str = "initial-admin-password";

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut file, text.as_bytes())
}

/// The admin password `strato up` logs in with: `STRATO_ADMIN_PASSWORD`, or the one the
/// first start generated into the data directory.
pub fn admin_password(data_dir: &Path) -> Result<String, BoxError> {
    if let Ok(password) = std::env::var("STRATO_ADMIN_PASSWORD")
        && !password.is_empty()
    {
        return Ok(password);
    }
    let path = data_dir.join(INITIAL_ADMIN_PASSWORD);
    std::fs::read_to_string(&path).map(|p| p.trim().to_owned()).map_err(|e| {
        format!(
            "the admin password is neither in STRATO_ADMIN_PASSWORD nor in {} ({e})",
            path.display()
        )
        .into()
    })
}

/// The MN's certificate authority, in `pki/` under the data directory (made on first use):
/// what the agent links are authenticated with and what bootstrap files are minted from.
pub fn pki(data_dir: &Path) -> Result<strato_proto::pki::Pki, strato_proto::TlsError> {
    strato_proto::pki::Pki::open(&data_dir.join("pki"))
}

/// Makes the data directory private (0700) and its secrets 0600, repairing looser modes, and
/// removes the agent token earlier versions kept there (mode 0644, so any local user could
/// read it; the link is on certificates now).
fn secure_data_dir(data_dir: &Path) -> Result<(), strato_proto::TlsError> {
    strato_proto::tls::private_dir(data_dir)?;
    let password = data_dir.join(INITIAL_ADMIN_PASSWORD);
    if password.exists() {
        strato_proto::tls::private_file(&password)?;
    }
    let token = data_dir.join("agent-token");
    if token.exists() {
        std::fs::remove_file(&token)
            .map_err(|source| strato_proto::TlsError::Io { path: token.clone(), source })?;
        tracing::warn!(path = %token.display(), "removed the agent token of an earlier version: agents enroll with a bootstrap file now (`strato agent-bootstrap`)");
    }
    Ok(())
}

impl Mn {
    /// Opens the store in `data_dir` and starts everything.
    pub async fn start(
        data_dir: &Path,
        host_config: Option<HostConfig>,
        vm_policy: VmPolicy,
        volume_policy: strato_actors::volume::VolumePolicy,
    ) -> Result<Arc<Mn>, BoxError> {
        secure_data_dir(data_dir)?;
        let pki = std::sync::Arc::new(pki(data_dir)?);
        let db = Db::open_sled(&data_dir.join("store"))?;
        // A store written by an older build may lack entries of indexes added since.
        strato_actors::kinds::ensure_indexes(&db)?;
        // The network service providers are fixed: written once, the same UUIDs everywhere.
        strato_actors::network::ensure_providers(&db).await?;
        let generated_admin_password =
            crate::auth::accounts::bootstrap(&db).await.map_err(|e| e.description)?;
        if let Some(password) = &generated_admin_password {
            // As Jenkins keeps its initial admin password: readable by whoever runs the node.
            write_private(&data_dir.join(INITIAL_ADMIN_PASSWORD), password)?;
        }
        let session_timeout = match std::env::var("STRATO_SESSION_TIMEOUT_SECS") {
            Ok(secs) => std::time::Duration::from_secs(secs.parse().map_err(|_| {
                format!("STRATO_SESSION_TIMEOUT_SECS=`{secs}` is not a number of seconds")
            })?),
            Err(_) => crate::auth::DEFAULT_SESSION_TIMEOUT,
        };
        let login_policy = login_policy()?;
        let image_policy = image_policy(data_dir)?;
        let external_url = match std::env::var("STRATO_EXTERNAL_URL") {
            Ok(url) if !url.is_empty() => Some(external_url(&url)?),
            _ => None,
        };
        let runtime = Runtime::start(RuntimeConfig::default(), db.clone())?;
        let vms = runtime.register(Vms::with_policy(db.clone(), vm_policy), Vms::kind_config());
        let host_config = host_config.unwrap_or_else(|| HostConfig::new(pki));
        let hosts =
            runtime.register(Hosts::new(db.clone(), host_config.clone()), Hosts::kind_config());
        let stores = runtime
            .register(BackupStorages::new(db.clone(), host_config), BackupStorages::kind_config());
        let l3s = runtime.register(L3s::new(db.clone()), L3s::kind_config());
        vm::create::define(
            &runtime,
            hosts.clone(),
            l3s.clone(),
            vms.entity().quotas().clone(),
            Overcommit::default(),
        );
        vm::ops::register_gc(&runtime, hosts.clone());
        strato_actors::volume::register_gc(&runtime, hosts.clone());
        strato_actors::snapshot::register_gc(vms.clone(), hosts.clone());

        // Dial the hosts first: rolling back an interrupted creation may need its host.
        let mut dials = Vec::new();
        for stored in db.scan::<HostRecord>() {
            let id = stored?.record.uuid;
            let hosts = hosts.clone();
            dials.push(async move {
                if let Err(error) = host::link::connect(&hosts, id).await {
                    tracing::warn!(host = %id, %error, "host not connected at startup; redialing");
                }
            });
        }
        // And the image stores, which an interrupted creation may read an image from.
        let mut store_dials = Vec::new();
        for stored in db.scan::<BackupStorageRecord>() {
            let record = stored?.record;
            if !record.is_remote() {
                continue;
            }
            let stores = stores.clone();
            store_dials.push(async move {
                if let Err(error) = backup_storage::connect(&stores, record.uuid).await {
                    tracing::warn!(backup_storage = %record.uuid, %error, "backup storage not connected at startup; redialing");
                }
            });
        }
        futures::future::join(
            futures::future::join_all(dials),
            futures::future::join_all(store_dials),
        )
        .await;
        let recovered = runtime.flows().recover().await?;
        // Before anything can touch a volume: a snapshot left Creating is finished or undone.
        let settled = strato_actors::snapshot::settle_all(&db, &hosts).await;
        let ended = crate::jobs::recover(&db, |job| {
            // A creation whose flow finished before the crash: its VM runs.
            let vm = db.get::<strato_actors::records::VmRecord>(job.resource?).ok()??.record;
            (vm.state == strato_actors::vm::state::VmState::Running)
                .then(|| serde_json::to_value(&vm).ok())
                .flatten()
        })
        .await?;
        let image_staging = data_dir.join("image-staging");
        let mut partial_imports = clear_staging(&image_staging)?;
        for stored in db.scan::<BackupStorageRecord>() {
            let record = stored?.record;
            if record.is_remote() {
                continue;
            }
            let dir = record.url;
            match strato_actors::images::remove_partial_imports(Path::new(&dir)) {
                Ok(removed) => partial_imports += removed,
                Err(error) => {
                    tracing::warn!(%dir, %error, "could not remove interrupted image imports")
                }
            }
        }
        tracing::info!(
            rolled_back = recovered.rolled_back.len(),
            partial_imports,
            settled_snapshot_volumes = settled,
            resumed = recovered.resumed.len(),
            jobs_ended = ended,
            "recovered from the previous run"
        );
        runtime.gc().start()?;
        let image_cache = image_cache_settings()?;
        let image_cache_collector = image_cache.interval.map(|every| {
            let (db, hosts) = (db.clone(), hosts.clone());
            strato_actors::image_cache::collect_periodically(db, hosts, every, image_cache.grace)
        });
        let jobs = crate::jobs::Jobs::new(db.clone());
        let auth_db = db.clone();
        Ok(Arc::new(Mn {
            runtime,
            db,
            vms,
            hosts,
            l3s,
            stores,
            image_staging,
            auth: crate::auth::Auth {
                db: auth_db,
                session_timeout,
                logins: std::sync::Arc::new(crate::auth::login::LoginThrottle::new(login_policy)),
            },
            generated_admin_password,
            account_creation: Default::default(),
            external_url,
            image_policy,
            nfs_mount_root: std::env::var("STRATO_NFS_MOUNT_ROOT")
                .unwrap_or_else(|_| "/opt/strato/nfsprimarystorage".into())
                .trim_end_matches('/')
                .to_owned(),
            jobs,
            volume_policy: strato_actors::volume::VolumePolicy {
                max_incremental_snapshots: max_incremental_snapshots(&volume_policy)?,
                ..volume_policy
            },
            image_cache,
            image_cache_collector,
        }))
    }

    /// Stops the runtime.
    pub fn shutdown(&self) {
        if let Some(collector) = &self.image_cache_collector {
            collector.abort();
        }
        self.runtime.shutdown();
    }
}

/// When image caches are cleaned (`STRATO_IMAGE_CACHE_GC_SECS`, 0 for only when asked) and
/// how recent a cache stays whatever uses it (`STRATO_IMAGE_CACHE_GRACE_SECS`).
fn image_cache_settings() -> Result<strato_actors::image_cache::CacheSettings, BoxError> {
    use std::time::Duration;
    let mut settings = strato_actors::image_cache::CacheSettings::default();
    if let Some(secs) = number("STRATO_IMAGE_CACHE_GC_SECS")? {
        settings.interval = (secs > 0).then(|| Duration::from_secs(secs));
    }
    if let Some(secs) = number("STRATO_IMAGE_CACHE_GRACE_SECS")? {
        settings.grace = Duration::from_secs(secs);
    }
    Ok(settings)
}

/// How long a snapshot chain grows before a full snapshot starts a new tree
/// (`STRATO_SNAPSHOT_MAX_INCREMENTAL`, ZStack's `incrementalSnapshot.maxNum`: 64).
fn max_incremental_snapshots(
    policy: &strato_actors::volume::VolumePolicy,
) -> Result<u32, BoxError> {
    let max = number("STRATO_SNAPSHOT_MAX_INCREMENTAL")?
        .unwrap_or(u64::from(policy.max_incremental_snapshots));
    match u32::try_from(max) {
        Ok(max) if (1..=1024).contains(&max) => Ok(max),
        _ => Err(format!("STRATO_SNAPSHOT_MAX_INCREMENTAL=`{max}` is not within 1..=1024").into()),
    }
}

/// The number in environment variable `name`, if it is set.
fn number(name: &str) -> Result<Option<u64>, BoxError> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v.parse().map_err(|_| format!("{name}=`{v}` is not a number"))?)),
        Err(_) => Ok(None),
    }
}

/// The login throttle's policy: the defaults, or `STRATO_LOGIN_LOCKOUT_ATTEMPTS`,
/// `STRATO_LOGIN_LOCKOUT_SECS` and `STRATO_LOGIN_DELAY_MS`.
fn login_policy() -> Result<crate::auth::login::LoginPolicy, BoxError> {
    let mut policy = crate::auth::login::LoginPolicy::default();
    if let Some(n) = number("STRATO_LOGIN_LOCKOUT_ATTEMPTS")? {
        policy.lockout_failure_attempts = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        policy.source_failure_attempts =
            policy.source_failure_attempts.max(policy.lockout_failure_attempts);
    }
    if let Some(secs) = number("STRATO_LOGIN_LOCKOUT_SECS")? {
        policy.lockout_duration = std::time::Duration::from_secs(secs);
    }
    if let Some(ms) = number("STRATO_LOGIN_DELAY_MS")? {
        policy.base_delay = std::time::Duration::from_millis(ms);
    }
    Ok(policy)
}

/// `url` without a trailing slash, if it is an http(s) URL with a host and nothing after it.
fn external_url(url: &str) -> Result<String, BoxError> {
    let trimmed = url.trim_end_matches('/');
    let rest =
        trimmed.strip_prefix("https://").or_else(|| trimmed.strip_prefix("http://")).ok_or_else(
            || format!("STRATO_EXTERNAL_URL=`{url}` must start with http:// or https://"),
        )?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_control)
    {
        return Err(format!(
            "STRATO_EXTERNAL_URL=`{url}` must be a scheme and a host (with an optional port), like https://strato.example.com"
        )
        .into());
    }
    Ok(trimmed.to_owned())
}

/// The directory under the data directory that `file://` images may always be imported
/// from.
pub const IMAGE_IMPORTS: &str = "image-imports";

/// What an image import may read: `file://` under `<data dir>/image-imports` and the
/// directories in `STRATO_IMAGE_FILE_DIRS` (`:`-separated); `http://` from the hosts in
/// `STRATO_IMAGE_ALLOWED_HOSTS` (`,`-separated; any when unset), never local addresses
/// unless `STRATO_IMAGE_ALLOW_LOCAL=1`; at most `STRATO_IMAGE_MAX_BYTES` (64 GiB) within
/// `STRATO_IMAGE_TIMEOUT_SECS` (an hour); `https://` servers verified against the CAs in
/// `STRATO_IMAGE_CA_FILE` (Debian's bundle, `/etc/ssl/certs/ca-certificates.crt`).
pub fn image_policy(data_dir: &Path) -> Result<strato_actors::images::ImportPolicy, BoxError> {
    let mut policy = strato_actors::images::ImportPolicy {
        file_dirs: vec![data_dir.join(IMAGE_IMPORTS)],
        ..Default::default()
    };
    if let Ok(dirs) = std::env::var("STRATO_IMAGE_FILE_DIRS") {
        policy.file_dirs.extend(dirs.split(':').filter(|d| !d.is_empty()).map(Into::into));
    }
    if let Ok(hosts) = std::env::var("STRATO_IMAGE_ALLOWED_HOSTS") {
        policy.allowed_hosts =
            hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_owned).collect();
    }
    policy.allow_local = std::env::var("STRATO_IMAGE_ALLOW_LOCAL").is_ok_and(|v| v == "1");
    if let Some(bytes) = number("STRATO_IMAGE_MAX_BYTES")? {
        policy.max_bytes = bytes;
    }
    if let Some(secs) = number("STRATO_IMAGE_TIMEOUT_SECS")? {
        policy.timeout = std::time::Duration::from_secs(secs);
    }
    if let Ok(file) = std::env::var("STRATO_IMAGE_CA_FILE")
        && !file.is_empty()
    {
        policy.ca_file = file.into();
    }
    Ok(policy)
}
