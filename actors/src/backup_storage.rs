//! Backup storage on its own host, as ZStack's ImageStore: a directory on a machine that
//! runs no VMs, whose agent (`strato-agent --driver none`) the MN reaches over the same
//! authenticated link as a KVM host's (mutual TLS, enrolled with a bootstrap secret, its
//! certificate pinned in an `AgentCertRecord` under the storage's UUID).
//!
//! The actor holds the link: it dials at the node's start and when the storage is added,
//! measures the directory's file system on every connect (and deletes the unsealed copies
//! an MN that died left there, once an hour has passed without a write), marks the storage Disconnected
//! when the link dies and redials with capped backoff, and sends the file commands that
//! move images. No byte goes between two agents directly: an image imported from a URL is
//! fetched by the MN (under its import policy) and written to the storage's agent; one
//! cached on a host is read from the storage's agent and written to the host's, into a
//! landing file in the host's image cache that the cache is converted from; a template is
//! flattened into the host's image cache and copied from there. Every copy is sealed by its
//! destination only if its size and SHA-256 are the source's (`files::copy`).
//!
//! A backup storage without a host (its directory on the MN, read by the hosts at the same
//! path) has an actor too, which sends nothing.

use std::time::{Duration, SystemTime};

use strato_proto::{Command, Fingerprint, Link, LinkError, Reply};
use strato_runtime::{BoxError, Entity, Kind, KindConfig, Op, OpCtx, RuntimeError};
use strato_storage::{Batch, Db, Expect, StoreError};
use uuid::Uuid;

use crate::files::{self, End};
use crate::host::{self, HostConfig, HostError, Hosts};
use crate::records::{AgentCertRecord, BackupStorageRecord, HostStatus, ImageRecord};

/// The backup storage actor kind.
#[derive(Debug)]
pub struct BackupStorages {
    db: Db,
    config: HostConfig,
}

/// A backup storage's actor state: its host's link.
#[derive(Debug)]
pub struct StoreLink {
    record: BackupStorageRecord,
    /// The certificate pinned for its agent.
    pin: Option<Fingerprint>,
    link: Option<Link>,
    /// Bumped on every new link, so news of an old link's death is ignored.
    epoch: u64,
    redial_attempts: u32,
    redial_scheduled: bool,
}

impl BackupStorages {
    /// The kind, on `db`, dialing with the hosts' settings.
    pub fn new(db: Db, config: HostConfig) -> Self {
        BackupStorages { db, config }
    }

    /// The kind's queues: the link's, one change at a time, and the commands'.
    pub fn kind_config() -> KindConfig {
        // They hold links: they never passivate.
        KindConfig::default()
            .serial_queue("link", 1_000)
            .queue("command", 64, 10_000)
            .idle_timeout(None)
    }
}

impl Entity for BackupStorages {
    const KIND: &'static str = "backup-storage";
    type State = StoreLink;

    fn load(&self, id: Uuid) -> Result<Option<StoreLink>, BoxError> {
        let pin = self.db.get::<AgentCertRecord>(id)?.map(|s| s.record.fingerprint);
        Ok(self.db.get::<BackupStorageRecord>(id)?.map(|stored| StoreLink {
            record: stored.record,
            pin,
            link: None,
            epoch: 0,
            redial_attempts: 0,
            redial_scheduled: false,
        }))
    }
}

fn link_op(name: &'static str) -> Op {
    Op::within("link", name, Duration::from_secs(60))
}

/// How long an unsealed copy in a store must have been untouched to be deleted at a
/// connect: a copy under way writes its file with every 4 MiB chunk.
const STALE_COPY: Duration = Duration::from_secs(3600);

/// How long measuring the storage's file system may take.
const MEASURE_TIME: Duration = Duration::from_secs(30);

/// Connects backup storage `id`'s agent if it has a host and is not connected. Returns
/// once connected, or with why not (a redial is then scheduled).
pub async fn connect(stores: &Kind<BackupStorages>, id: Uuid) -> Result<(), HostError> {
    stores.call(id, link_op("connect"), |ctx| async move { connect_op(ctx).await }).await
}

/// Drops the link (if any) and connects again: `ReconnectBackupStorage`.
pub async fn reconnect(stores: &Kind<BackupStorages>, id: Uuid) -> Result<(), HostError> {
    stores
        .call(id, link_op("reconnect"), |ctx| async move {
            if let Some(link) = ctx.with_state(|s| s.link.take()) {
                link.close();
            }
            connect_op(ctx).await
        })
        .await
}

async fn connect_op(ctx: OpCtx<BackupStorages>) -> Result<(), HostError> {
    let record = ctx.with_state(|s| s.record.clone());
    let Some(hostname) = record.hostname.clone() else { return Ok(()) };
    if ctx.with_state(|s| s.link.as_ref().is_some_and(|l| !l.is_closed())) {
        return Ok(());
    }
    let id = ctx.id();
    if record.status != HostStatus::Disconnected {
        save(&ctx, |r| r.status = HostStatus::Connecting).await?;
    }
    let dialed = async {
        let addr = tokio::net::lookup_host((hostname.as_str(), record.agent_port))
            .await
            .ok()
            .and_then(|mut found| found.next())
            .ok_or_else(|| {
                HostError::Link(LinkError::Refused {
                    reason: format!("`{hostname}` does not resolve to an address"),
                })
            })?;
        let pin = ctx.with_state(|s| s.pin);
        let entity = ctx.entity();
        host::link::dial_agent(&entity.db, &entity.config, id, pin, addr).await
    };
    let (link, _welcome, mut events) = match dialed.await {
        Ok((link, welcome, events, pinned)) => {
            ctx.with_state(|s| s.pin = Some(pinned));
            (link, welcome, events)
        }
        Err(error) => {
            let message = strato_runtime::error_chain(&error);
            tracing::warn!(backup_storage = %id, %hostname, error = %message, "cannot connect to the backup storage's agent");
            disconnected(&ctx, message).await?;
            schedule_redial(&ctx);
            return Err(error);
        }
    };
    let epoch = ctx.with_state(|s| {
        s.epoch += 1;
        s.link = Some(link.clone());
        s.redial_attempts = 0;
        s.epoch
    });
    let measure = Command::StorageCapacity { dir: record.url.clone() };
    let measured =
        link.request_with_id(Uuid::new_v4(), measure, SystemTime::now() + MEASURE_TIME, None).await;
    let capacity = match measured {
        Ok(Reply::Capacity { total, available }) => Some((total, available)),
        Ok(_) => None,
        Err(error) => {
            let error = strato_runtime::error_chain(&error);
            tracing::warn!(backup_storage = %id, %error, "the backup storage's directory was not measured");
            None
        }
    };
    // Copies into the store cut by an MN that died are deleted once nothing writes them.
    let sweep = Command::SweepPartialCopies {
        dir: record.url.clone(),
        older_than_secs: STALE_COPY.as_secs(),
    };
    let swept =
        link.request_with_id(Uuid::new_v4(), sweep, SystemTime::now() + MEASURE_TIME, None).await;
    if let Err(error) = swept {
        let error = strato_runtime::error_chain(&error);
        tracing::warn!(backup_storage = %id, %error, "unfinished copies in the store stay until its next connect");
    }
    save(&ctx, |r| {
        r.status = HostStatus::Connected;
        r.last_error = None;
        if let Some((total, available)) = capacity {
            (r.total_capacity, r.available_capacity) = (total, available);
        }
    })
    .await?;
    tracing::info!(backup_storage = %id, %hostname, "backup storage connected");
    let stores = ctx.kind().clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = link.closed() => break,
                // A host without a hypervisor reports no domains; anything else is ignored.
                event = events.recv() => if event.is_none() { break },
            }
        }
        let _ = stores
            .call(id, link_op("link-lost"), move |ctx| async move { link_lost(ctx, epoch).await })
            .await;
    });
    Ok(())
}

async fn link_lost(ctx: OpCtx<BackupStorages>, epoch: u64) -> Result<(), HostError> {
    if ctx.with_state(|s| s.epoch != epoch) {
        return Ok(()); // an old link; a newer one is up
    }
    ctx.with_state(|s| s.link = None);
    tracing::warn!(backup_storage = %ctx.id(), "lost the link to the backup storage's agent");
    disconnected(&ctx, "the link to the agent was lost".into()).await?;
    schedule_redial(&ctx);
    Ok(())
}

async fn disconnected(ctx: &OpCtx<BackupStorages>, why: String) -> Result<(), HostError> {
    save(ctx, |r| {
        r.status = HostStatus::Disconnected;
        r.last_error = Some(why.clone());
    })
    .await
}

/// Redials after a capped exponential backoff (once at a time).
fn schedule_redial(ctx: &OpCtx<BackupStorages>) {
    let config = &ctx.entity().config;
    let Some(delay) = ctx.with_state(|s| {
        if s.redial_scheduled {
            return None;
        }
        s.redial_scheduled = true;
        s.redial_attempts += 1;
        Some(config.redial_delay(s.redial_attempts))
    }) else {
        return;
    };
    let (stores, id) = (ctx.kind().clone(), ctx.id());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = stores
            .call(id, link_op("redial"), |ctx| async move {
                ctx.with_state(|s| s.redial_scheduled = false);
                connect_op(ctx).await
            })
            .await;
    });
}

/// Writes the storage's record with `change` applied to the stored one. The attachment to
/// zones writes it too, from the API: a conflict is that write, and the change is applied
/// again on top of it.
async fn save(
    ctx: &OpCtx<BackupStorages>,
    change: impl Fn(&mut BackupStorageRecord),
) -> Result<(), HostError> {
    let db = &ctx.entity().db;
    loop {
        let Some(stored) = db.get::<BackupStorageRecord>(ctx.id())? else {
            let actor = strato_runtime::ActorId { kind: BackupStorages::KIND, id: ctx.id() };
            return Err(HostError::Runtime(RuntimeError::NotFound { actor }));
        };
        let mut record = stored.record;
        change(&mut record);
        let mut batch = Batch::new();
        batch.put(&record, Expect::Generation(stored.generation))?;
        match db.commit(batch).await {
            Ok(_) => {
                ctx.with_state(|s| s.record = record);
                return Ok(());
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// How long a command waits for a link being made again (`ReconnectBackupStorage`).
const RELINK_WAIT: Duration = Duration::from_secs(10);

/// Sends `command` to backup storage `id`'s agent and waits until `deadline`. One id for
/// the command: a link that closes before the answer gets it again on the next link within
/// the wait for one, and the agent, which acts at most once per id, answers what the first
/// one did.
pub async fn command(
    stores: &Kind<BackupStorages>,
    id: Uuid,
    command: Command,
    deadline: SystemTime,
    job_id: Option<Uuid>,
) -> Result<Reply, HostError> {
    stores
        .call(
            id,
            Op::within("command", command.name(), Duration::from_secs(600)).job(job_id),
            move |ctx| async move {
                let request = Uuid::new_v4();
                let until = tokio::time::Instant::now() + RELINK_WAIT;
                loop {
                    let link = ctx.with_state(|s| s.link.clone()).filter(|l| !l.is_closed());
                    let relinking = ctx.with_state(|s| s.record.status == HostStatus::Connecting);
                    match link {
                        Some(link) => {
                            match link
                                .request_with_id(request, command.clone(), deadline, job_id)
                                .await
                            {
                                Err(LinkError::Closed) if tokio::time::Instant::now() < until => {}
                                answered => return Ok(answered?),
                            }
                        }
                        None if relinking && tokio::time::Instant::now() < until => {}
                        None => return Err(HostError::Disconnected(id)),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await
}

/// The kind of the backup storage actors, from the runtime.
pub fn kind(runtime: &strato_runtime::Runtime) -> Result<Kind<BackupStorages>, HostError> {
    runtime.kind::<BackupStorages>().ok_or_else(|| {
        HostError::Runtime(RuntimeError::UnknownKind { kind: BackupStorages::KIND.into() })
    })
}

/// Where an image's file is: the path in its first backup storage, and that storage when
/// it is on its own host (none: the hosts read the path as it is).
#[derive(Clone, Debug)]
pub struct ImageSource {
    /// The file's path in the backup storage's directory.
    pub path: String,
    /// The backup storage holding it, when its directory is on its own host.
    pub remote: Option<Uuid>,
}

/// Where image `image`'s file is, if it is in a backup storage.
pub fn image_source(db: &Db, image: &ImageRecord) -> Result<Option<ImageSource>, StoreError> {
    let Some((bs, path)) = image.backup_storage_refs.first() else { return Ok(None) };
    let remote = db.get::<BackupStorageRecord>(*bs)?.filter(|s| s.record.is_remote()).map(|_| *bs);
    Ok(Some(ImageSource { path: path.clone(), remote }))
}

/// Caches image `image` in `cache_dir` on host `host` and answers the cached file's path.
///
/// From a backup storage on the MN the host's agent converts the file at its path. From one
/// on its own host, a cache already there is handed out as it is; otherwise the file is
/// copied into a landing file in the cache directory (sealed only if its size and SHA-256
/// are the storage's), the cache is converted from it and the landing file deleted. A
/// landing file left by a dead MN is converted by the next attempt, or deleted by the image
/// cache's collector once it is older than the grace period.
pub async fn cache_on_host(
    hosts: &Kind<Hosts>,
    host: Uuid,
    image: Uuid,
    source: &ImageSource,
    cache_dir: &str,
    deadline: SystemTime,
    job: Option<Uuid>,
) -> Result<String, HostError> {
    let cache = |source: String| async move {
        let command = Command::CacheImage { image, source, cache_dir: cache_dir.to_owned() };
        match host::command(hosts, host, command, deadline, job).await? {
            Reply::File { path, .. } => Ok(path),
            _ => Err(files::unexpected("cache-image", cache_dir)),
        }
    };
    let Some(store) = source.remote else { return cache(source.path.clone()).await };
    let landing = format!("{}/{image}.download", cache_dir.trim_end_matches('/'));
    match cache(landing.clone()).await {
        Ok(path) => return Ok(path),
        Err(error) if files::is_not_found(&error) => {}
        Err(error) => return Err(error),
    }
    let stores = kind(hosts.runtime())?;
    let from = End::Store(stores, store);
    let to = End::Host(hosts.clone(), host);
    files::copy(&from, &source.path, &to, &landing, Uuid::new_v4(), deadline, job).await?;
    let cached = cache(landing.clone()).await?;
    let delete = Command::DeleteVolume { path: landing.clone() };
    if let Err(error) = host::command(hosts, host, delete, deadline, job).await {
        let error = strato_runtime::error_chain(&error);
        tracing::warn!(%host, %landing, %error, "an image's landing file stays until the image cache's collector deletes it");
    }
    Ok(cached)
}

/// Removes a copy's unsealed file on its destination if the copy does not finish (an
/// error, or the copying future dropped by a cancelled job).
struct UnsealedCopy {
    to: Option<(End, String)>,
}

impl UnsealedCopy {
    fn finished(mut self) {
        self.to = None;
    }
}

impl Drop for UnsealedCopy {
    fn drop(&mut self) {
        let Some((to, part)) = self.to.take() else { return };
        tokio::spawn(async move {
            let deadline = SystemTime::now() + Duration::from_secs(60);
            if let Err(error) =
                to.send(Command::DeleteVolume { path: part.clone() }, deadline, None).await
            {
                let error = strato_runtime::error_chain(&error);
                tracing::warn!(%part, %error, "an unfinished copy's file stays behind");
            }
        });
    }
}

/// Copies `from_path` on `from` into backup storage `store` at `path`, sealed only if its
/// size and SHA-256 are the source's; an unfinished copy's file is removed however the
/// copy ends. Answers the copy's size and `sha256:<hex>` checksum.
async fn store_file(
    from: &End,
    from_path: &str,
    stores: &Kind<BackupStorages>,
    store: Uuid,
    path: &str,
    deadline: SystemTime,
    job: Option<Uuid>,
) -> Result<(u64, String), HostError> {
    let transfer = Uuid::new_v4();
    let to = End::Store(stores.clone(), store);
    let guard = UnsealedCopy { to: Some((to.clone(), format!("{path}.part-copy-{transfer}"))) };
    let copied = files::copy(from, from_path, &to, path, transfer, deadline, job).await?;
    guard.finished();
    Ok((copied.size, format!("sha256:{}", copied.sha256)))
}

/// Uploads the MN's file `local` (an image fetched from a URL) into backup storage `store`
/// at `path`. Answers its size and checksum.
pub async fn upload(
    stores: &Kind<BackupStorages>,
    store: Uuid,
    local: &std::path::Path,
    path: &str,
    deadline: SystemTime,
    job: Option<Uuid>,
) -> Result<(u64, String), HostError> {
    let local = local.display().to_string();
    store_file(&End::Node, &local, stores, store, path, deadline, job).await
}

/// Copies host `host`'s file `from_path` (a template flattened into its image cache) into
/// backup storage `store` at `path`. Answers its size and checksum.
pub async fn store_from_host(
    hosts: &Kind<Hosts>,
    host: Uuid,
    from_path: &str,
    store: Uuid,
    path: &str,
    deadline: SystemTime,
    job: Option<Uuid>,
) -> Result<(u64, String), HostError> {
    let stores = kind(hosts.runtime())?;
    let from = End::Host(hosts.clone(), host);
    store_file(&from, from_path, &stores, store, path, deadline, job).await
}

/// Deletes `path` in backup storage `store` (an undo; a failure is logged).
pub async fn delete_file(stores: &Kind<BackupStorages>, store: Uuid, path: &str) {
    let deadline = SystemTime::now() + Duration::from_secs(60);
    let delete = Command::DeleteVolume { path: path.to_owned() };
    if let Err(error) = command(stores, store, delete, deadline, None).await {
        let error = strato_runtime::error_chain(&error);
        tracing::warn!(backup_storage = %store, %path, %error, "a file stays in backup storage");
    }
}

/// Image `image`'s virtual size and backing file, from its file's header: read on the MN
/// for a backup storage there, by its agent for an image store on its own host. None: the
/// file is not qcow2 (or, on the MN, cannot be read).
pub async fn describe_image(
    db: &Db,
    stores: &Kind<BackupStorages>,
    image: &ImageRecord,
) -> Result<Option<(u64, Option<String>)>, HostError> {
    let Some(source) = image_source(db, image)? else { return Ok(None) };
    let Some(store) = source.remote else {
        let header = strato_proto::qcow2::read_header(std::path::Path::new(&source.path));
        return Ok(header
            .ok()
            .flatten()
            .map(|(size, backing)| (size, backing.map(|b| b.display().to_string()))));
    };
    let deadline = SystemTime::now() + MEASURE_TIME;
    let describe = Command::DescribeVolume { path: source.path.clone(), domain: None };
    match command(stores, store, describe, deadline, None).await? {
        Reply::Volume { virtual_size, backing, .. } => Ok(Some((virtual_size, backing))),
        _ => Ok(None),
    }
}
