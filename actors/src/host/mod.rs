//! The host actor: one per KVM host, holding the link to its agent. This module is the
//! handle the rest of the system calls: commands to the agent ([`command`]), capacity
//! bookings ([`reserve`], [`rebook`], [`release`], [`fence`]), the host's state and record,
//! and its removal. Making and losing the link, enrolling agents and reconciling what the
//! hypervisor runs with the store are the link loop's ([`link`]): it is the one part that
//! tells VMs what their hosts observe, so the VM actor and the allocator, which call this
//! handle, are not in a cycle with it.
//!
//! The link is TLS with a certificate on each end (see `strato_proto::tls`); its heartbeat
//! (defaults 2 s interval, 2 s timeout, 3 misses: about 8 s, well under ZStack's 60 s ping)
//! closes a dead link; the host then turns Disconnected, its VMs Unknown, and it redials with
//! capped exponential backoff until the agent answers, when it reconciles again.
//!
//! Queues: `link` (level 1) serializes connecting and losing the link; `command` (level 64)
//! carries commands to the agent, which run concurrently on the one link; `capacity` (level
//! 1) books CPU and memory for VMs, so two creations never take the same slot.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use strato_proto::pki::Pki;
use strato_proto::{Command, DomainInfo, Fingerprint, Link, LinkError, Reply, TlsError};
use strato_runtime::{BoxError, Entity, Event, Kind, KindConfig, Op, OpCtx, RuntimeError};
use strato_storage::{Batch, Db, Expect, StoreError};
use uuid::Uuid;

use crate::records::{AgentCertRecord, HostRecord, HostStatus, Reservation};

pub mod link;

/// How hosts are watched and redialed.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The MN's CA: its client certificate for the links, and what enrolls agents.
    pub pki: Arc<Pki>,
    /// How long dialing and the handshake may take.
    pub connect_timeout: Duration,
    /// Heartbeat interval.
    pub ping_interval: Duration,
    /// How long a heartbeat may go unanswered.
    pub ping_timeout: Duration,
    /// Missed heartbeats in a row that make the host Disconnected.
    pub ping_failures: u32,
    /// First redial delay; doubles up to `reconnect_max`.
    pub reconnect_base: Duration,
    /// Longest redial delay.
    pub reconnect_max: Duration,
}

impl HostConfig {
    /// How long to wait before redial number `attempt` (from 1): `reconnect_base`, doubled
    /// at each attempt, capped at `reconnect_max`.
    pub fn redial_delay(&self, attempt: u32) -> Duration {
        let exp = self.reconnect_base.saturating_mul(1 << attempt.min(16).saturating_sub(1));
        exp.min(self.reconnect_max)
    }

    /// Defaults well under ZStack's: 2 s pings, 2 s timeout, 3 misses.
    pub fn new(pki: Arc<Pki>) -> Self {
        HostConfig {
            pki,
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(2),
            ping_timeout: Duration::from_secs(2),
            ping_failures: 3,
            reconnect_base: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

/// Published when a host's link status changes (`hostUuid`, `status` fields).
#[derive(Clone, Debug)]
pub struct HostStatusChanged {
    /// The host.
    pub host: Uuid,
    /// Its new status.
    pub status: HostStatus,
}

impl Event for HostStatusChanged {
    fn topic(&self) -> &'static str {
        "host.status-changed"
    }

    fn field(&self, name: &str) -> Option<String> {
        match name {
            "hostUuid" => Some(self.host.to_string()),
            "status" => Some(self.status.as_str().to_owned()),
            _ => None,
        }
    }
}

/// Published when a host runs a domain that no VM claims.
#[derive(Clone, Debug)]
pub struct StrangerFound {
    /// The host.
    pub host: Uuid,
    /// The domain.
    pub domain: DomainInfo,
}

impl Event for StrangerFound {
    fn topic(&self) -> &'static str {
        "host.stranger-found"
    }

    fn field(&self, name: &str) -> Option<String> {
        match name {
            "hostUuid" => Some(self.host.to_string()),
            "domainUuid" => Some(self.domain.uuid.to_string()),
            _ => None,
        }
    }
}

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The runtime did not run it.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] strato_storage::StoreError),
    /// The host's agent is not connected.
    #[error("host {0} is disconnected; the command was not sent")]
    Disconnected(Uuid),
    /// The link or the agent failed the command.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The agent asked to enroll and the MN refused (a spent secret, say).
    #[error("the agent cannot enroll")]
    Enroll(#[from] TlsError),
    /// The host's network cannot be rendered (a VXLAN pool's VTEP network it has no
    /// address in).
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
}

impl HostError {
    /// Whether the host could not be reached (as opposed to the agent answering with an
    /// error): what is left to do there can wait for the host's return.
    pub fn is_unreachable(&self) -> bool {
        match self {
            HostError::Disconnected(_) | HostError::Enroll(_) => true,
            HostError::Link(LinkError::Agent { .. }) => false,
            HostError::Link(_) => true,
            HostError::Runtime(_) | HostError::Store(_) | HostError::Network(_) => false,
        }
    }
}

/// The host actor's state: its record and its live link.
#[derive(Debug)]
pub struct HostActor {
    record: HostRecord,
    generation: u64,
    /// The certificate pinned for the host's agent.
    pin: Option<Fingerprint>,
    link: Option<Link>,
    /// Bumped on every new link, so news of an old link's death is ignored.
    epoch: u64,
    redial_attempts: u32,
    redial_scheduled: bool,
    /// Set while the host is being deleted: it books nothing more.
    deleting: bool,
    /// The network the agent last acknowledged on the present link (none: not yet).
    applied_network: Option<strato_proto::net::NetworkConfig>,
    /// Held by [`save`] from reading the record to storing the change: the link and the
    /// capacity queues run at once and both write the record, and without it one's
    /// compare-and-swap fails on the other's write (concurrent deletes did, as
    /// `SYS.INTERNAL`).
    writes: Arc<tokio::sync::Mutex<()>>,
}

/// The host actor kind.
#[derive(Debug)]
pub struct Hosts {
    db: Db,
    config: HostConfig,
    directory: std::sync::RwLock<std::collections::HashMap<Uuid, HostSummary>>,
    /// Memory each host keeps for itself (its `reservedMemory` system tag), in bytes.
    kept_for_host: std::sync::RwLock<std::collections::HashMap<Uuid, u64>>,
    /// The open links, for their heartbeat round-trip times (metrics, the console).
    links: std::sync::RwLock<std::collections::HashMap<Uuid, strato_proto::Link>>,
    /// How many times each host's link came up since the MN started.
    connects: std::sync::RwLock<std::collections::HashMap<Uuid, u64>>,
    /// Hosts with a network apply asked for and not started yet: more asks are one apply.
    network_pending: std::sync::Mutex<std::collections::HashSet<Uuid>>,
}

/// A host's link as the console shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStats {
    /// The host.
    pub host: Uuid,
    /// Whether the link is up.
    pub connected: bool,
    /// The last heartbeat's round-trip time, in microseconds.
    pub rtt_us: Option<u64>,
    /// When the agent last answered a heartbeat (Unix ms).
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Times the link came up since the MN started (more than one: reconnects).
    pub connects: u64,
}

/// What the allocator needs to know of a host, kept in memory for every host: placing one
/// VM must not read a thousand host records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSummary {
    /// The host.
    pub uuid: Uuid,
    /// Its cluster.
    pub cluster_uuid: Uuid,
    /// Administrative state.
    pub state: crate::records::HostState,
    /// Link status.
    pub status: HostStatus,
    /// CPUs (0 until the first handshake).
    pub cpus: u32,
    /// Memory in bytes (0 until the first handshake).
    pub memory: u64,
    /// CPUs booked.
    pub reserved_cpu: u64,
    /// Memory booked.
    pub reserved_memory: u64,
    /// Memory the host keeps for itself (its `reservedMemory` system tag).
    pub kept_for_host: u64,
    /// Its local primary storage's size in bytes (0 until measured: not filtered on).
    pub disk: u64,
    /// Local storage booked.
    pub reserved_disk: u64,
}

impl HostSummary {
    fn of(record: &HostRecord, kept_for_host: u64) -> Self {
        HostSummary {
            uuid: record.uuid,
            cluster_uuid: record.cluster_uuid,
            state: record.state,
            status: record.status,
            cpus: record.facts.as_ref().map_or(0, |f| f.cpus),
            memory: record.facts.as_ref().map_or(0, |f| f.memory_mib << 20),
            reserved_cpu: record.reserved_cpu(),
            reserved_memory: record.reserved_memory(),
            kept_for_host,
            disk: record.local_storage.map_or(0, |c| c.total),
            reserved_disk: record.reserved_disk(),
        }
    }

    /// Whether it has room for `want` more: CPUs and memory (overcommitted), and local
    /// storage by the volumes' virtual sizes (ZStack's thick accounting), when measured.
    pub fn fits(&self, want: Reservation, overcommit: Overcommit) -> bool {
        let cpu_total = (f64::from(self.cpus) * overcommit.cpu) as u64;
        let memory_total =
            ((self.memory as f64 * overcommit.memory) as u64).saturating_sub(self.kept_for_host);
        let disk_fits = want.disk == 0
            || self.disk == 0
            || fits_within(self.reserved_disk, want.disk, self.disk);
        fits_within(self.reserved_cpu, u64::from(want.cpu), cpu_total)
            && fits_within(self.reserved_memory, want.memory, memory_total)
            && disk_fits
    }
}

/// Whether `more` on top of `used` stays within `limit`; a sum that overflows never does.
pub fn fits_within(used: u64, more: u64, limit: u64) -> bool {
    used.checked_add(more).is_some_and(|total| total <= limit)
}

impl Hosts {
    /// The kind, on `db` (every host in the store enters the directory).
    pub fn new(db: Db, config: HostConfig) -> Self {
        let kept_for_host: std::collections::HashMap<Uuid, u64> = db
            .scan::<crate::tags::SystemTag>()
            .filter_map(Result::ok)
            .filter_map(|t| {
                let size = t.record.tag.strip_prefix("reservedMemory::")?;
                Some((t.record.resource_uuid, crate::tags::parse_size(size).ok()?))
            })
            .collect();
        let directory = db
            .scan::<HostRecord>()
            .filter_map(Result::ok)
            .map(|s| {
                let kept = kept_for_host.get(&s.record.uuid).copied().unwrap_or(0);
                (s.record.uuid, HostSummary::of(&s.record, kept))
            })
            .collect();
        Hosts {
            db,
            config,
            directory: std::sync::RwLock::new(directory),
            kept_for_host: std::sync::RwLock::new(kept_for_host),
            links: Default::default(),
            connects: Default::default(),
            network_pending: Default::default(),
        }
    }

    /// Every host's link, by host (hosts whose link never came up have `connects` 0).
    pub fn link_stats(&self) -> Vec<LinkStats> {
        let links = self.links.read().expect("links lock");
        let connects = self.connects.read().expect("connects lock");
        let mut hosts: Vec<Uuid> =
            self.directory.read().expect("directory lock").keys().copied().collect();
        hosts.sort();
        hosts
            .into_iter()
            .map(|host| {
                let link = links.get(&host);
                LinkStats {
                    host,
                    connected: link.is_some(),
                    rtt_us: link.map(|l| l.rtt().as_micros() as u64),
                    last_heartbeat_unix_ms: link.map(strato_proto::Link::last_heartbeat_unix_ms),
                    connects: connects.get(&host).copied().unwrap_or(0),
                }
            })
            .collect()
    }

    /// The last heartbeat round-trip time of every connected host's link.
    pub fn link_rtts(&self) -> Vec<(Uuid, Duration)> {
        self.links.read().expect("links lock").iter().map(|(id, link)| (*id, link.rtt())).collect()
    }

    fn forget_link(&self, id: Uuid) {
        self.links.write().expect("links lock").remove(&id);
    }

    /// Host `id` as the allocator sees it, from its record.
    fn summary(&self, record: &HostRecord) -> HostSummary {
        let kept = self.kept_for_host.read().expect("kept lock").get(&record.uuid).copied();
        HostSummary::of(record, kept.unwrap_or(0))
    }

    /// Sets the memory host `id` keeps for itself (its `reservedMemory` tag; 0 when the tag
    /// goes): bookings from now on leave it free.
    pub fn keep_for_host(&self, id: Uuid, memory: u64) {
        self.kept_for_host.write().expect("kept lock").insert(id, memory);
        if let Some(summary) = self.directory.write().expect("directory lock").get_mut(&id) {
            summary.kept_for_host = memory;
        }
    }

    /// Calls `f` on every host as the allocator sees it, under the directory's read lock
    /// (so `f` must be quick and must not wait); returns how many there are.
    pub fn for_each_host(&self, mut f: impl FnMut(&HostSummary)) -> usize {
        let directory = self.directory.read().expect("directory lock");
        directory.values().for_each(&mut f);
        directory.len()
    }

    /// Every host as the allocator sees it.
    pub fn directory(&self) -> Vec<HostSummary> {
        self.directory.read().expect("directory lock").values().cloned().collect()
    }

    fn publish(&self, record: &HostRecord) {
        self.directory.write().expect("directory lock").insert(record.uuid, self.summary(record));
    }

    /// The kind's default queues.
    pub fn kind_config() -> KindConfig {
        // Hosts hold links: they never passivate.
        // The capacity queue books and gives back capacity on the host's record one change
        // at a time, as the allocator's check relies on.
        KindConfig::default()
            .serial_queue("link", 1_000)
            .serial_queue("capacity", 1_024)
            .serial_queue("network", 1_024)
            .queue("command", 64, 10_000)
            .idle_timeout(None)
    }
}

impl Entity for Hosts {
    const KIND: &'static str = "host";
    type State = HostActor;

    fn load(&self, id: Uuid) -> Result<Option<HostActor>, BoxError> {
        let stored = self.db.get::<HostRecord>(id)?;
        if let Some(stored) = &stored {
            self.publish(&stored.record);
        }
        let pin = self.db.get::<AgentCertRecord>(id)?.map(|s| s.record.fingerprint);
        Ok(stored.map(|stored| HostActor {
            record: stored.record,
            generation: stored.generation,
            pin,
            link: None,
            epoch: 0,
            redial_attempts: 0,
            redial_scheduled: false,
            deleting: false,
            applied_network: None,
            writes: Default::default(),
        }))
    }
}

fn link_op(name: &'static str) -> Op {
    Op::within("link", name, Duration::from_secs(60))
}

/// Writes the host's record with `change` applied, on the actor: one write at a time, each
/// applied to the record the previous one left.
async fn save(ctx: &OpCtx<Hosts>, change: impl Fn(&mut HostRecord)) -> Result<(), HostError> {
    let writes = ctx.with_state(|s| s.writes.clone());
    let _one_at_a_time = writes.lock().await;
    let mut reloaded = false;
    loop {
        let (mut record, generation) = ctx.with_state(|s| (s.record.clone(), s.generation));
        change(&mut record);
        let mut batch = Batch::new();
        batch.put(&record, Expect::Generation(generation))?;
        match ctx.entity().db.commit(batch).await {
            Ok(written) => {
                let generation = written[0].generation.unwrap_or(generation);
                ctx.entity().publish(&record);
                ctx.with_state(|s| {
                    s.record = record;
                    s.generation = generation;
                });
                return Ok(());
            }
            // Nothing else writes the record while the lock is held, so the generation held
            // is behind the store's: a commit reported failed was applied after all (the
            // store failed making it durable, or a fault was injected). Take the stored
            // record and apply the change to it, once.
            Err(StoreError::Conflict { .. }) if !reloaded => {
                let Some(stored) = ctx.entity().db.get::<HostRecord>(ctx.id())? else {
                    // Deleted meanwhile: the host is gone, which is what the caller hears.
                    let actor = strato_runtime::ActorId { kind: "host", id: ctx.id() };
                    return Err(HostError::Runtime(RuntimeError::NotFound { actor }));
                };
                tracing::warn!(host = %ctx.id(), held = generation, stored = stored.generation, "the host record held was behind the store's; reloaded");
                ctx.with_state(|s| {
                    s.record = stored.record;
                    s.generation = stored.generation;
                });
                reloaded = true;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

async fn set_status(
    ctx: &OpCtx<Hosts>,
    status: HostStatus,
    error: Option<String>,
) -> Result<(), HostError> {
    let changed = ctx.with_state(|s| s.record.status != status);
    save(ctx, |r| {
        r.status = status;
        r.last_error.clone_from(&error);
    })
    .await?;
    if changed {
        tracing::info!(host = %ctx.id(), status = status.as_str(), "host status changed");
        ctx.runtime().events().publish(HostStatusChanged { host: ctx.id(), status });
    }
    Ok(())
}

/// Sends `command` to host `id`'s agent and waits until `deadline`.
pub async fn command(
    hosts: &Kind<Hosts>,
    id: Uuid,
    command: Command,
    deadline: SystemTime,
    job_id: Option<Uuid>,
) -> Result<Reply, HostError> {
    hosts
        .call(
            id,
            Op::within("command", command.name(), Duration::from_secs(600)).job(job_id),
            move |ctx| async move { send(&ctx, command, deadline, job_id).await },
        )
        .await
}

/// Sends `command` on the host's link and waits for its answer until `deadline`.
///
/// One id for the command: if the link closes before the answer (a `ReconnectHost`, a
/// redial) it is sent again on the new link, and the agent, which acts at most once per id,
/// answers what the first one did. Reconnects in a row close link after link: it is sent
/// again as long as a new link comes within the wait for one.
async fn send(
    ctx: &OpCtx<Hosts>,
    command: Command,
    deadline: SystemTime,
    job_id: Option<Uuid>,
) -> Result<Reply, HostError> {
    let id = Uuid::new_v4();
    let resend_until = tokio::time::Instant::now() + RELINK_WAIT;
    loop {
        let link = live_link(ctx, deadline).await?;
        match link.request_with_id(id, command.clone(), deadline, job_id).await {
            Err(LinkError::Closed) if tokio::time::Instant::now() < resend_until => {
                // A link that died between the look and the send is seen closed at once:
                // wait for the next one, do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered => return Ok(answered?),
        }
    }
}

/// How long a removed host's agent is given to take its network down.
const HOST_NETWORK_CLEAR_TIME: Duration = Duration::from_secs(10);

/// How long a network apply may take on the agent.
const NETWORK_APPLY_TIME: Duration = Duration::from_secs(120);

/// Makes host `id`'s network what the store says now (rendered at the start of the
/// operation, in the host's `network` queue, so applies never overlap and the last one
/// sends the latest state), unless the agent acknowledged exactly that on this link.
pub async fn apply_network(
    hosts: &Kind<Hosts>,
    id: Uuid,
    job_id: Option<Uuid>,
) -> Result<(), HostError> {
    hosts
        .call(id, Op::within("network", "apply-network", NETWORK_APPLY_TIME).job(job_id), move |ctx| async move {
            ctx.entity().network_pending.lock().expect("network pending").remove(&id);
            let record = ctx.with_state(|s| s.record.clone());
            let config = crate::network::render(&ctx.entity().db, &record)?;
            if ctx.with_state(|s| s.applied_network.as_ref() == Some(&config)) {
                return Ok(());
            }
            let deadline = SystemTime::now() + NETWORK_APPLY_TIME;
            // Sent as every command is: again on the next link if a reconnect cuts it.
            let reply = send(&ctx, Command::ApplyNetwork(config.clone()), deadline, job_id).await?;
            if let Reply::Network(report) = reply
                && !report.changes.is_empty()
            {
                tracing::info!(host = %id, changes = report.changes.len(), "host network applied");
            }
            ctx.with_state(|s| s.applied_network = Some(config));
            Ok(())
        })
        .await
}

/// Asks for host `id`'s network to be applied soon, without waiting; asks made before the
/// apply starts are one apply. A failed apply is tried again every few seconds while the
/// host is connected (a reconnect applies anyway).
pub fn refresh_network(hosts: &Kind<Hosts>, id: Uuid) {
    if !hosts.entity().network_pending.lock().expect("network pending").insert(id) {
        return;
    }
    let hosts = hosts.clone();
    tokio::spawn(async move {
        if let Err(error) = apply_network(&hosts, id, None).await {
            let message = strato_runtime::error_chain(&error);
            if error.is_unreachable() {
                tracing::debug!(host = %id, error = %message, "network apply waits for the host's link");
                return;
            }
            tracing::warn!(host = %id, error = %message, "cannot apply the host's network; trying again");
            tokio::time::sleep(Duration::from_secs(5)).await;
            refresh_network(&hosts, id);
        }
    });
}

/// How long a command waits for a link being made again (`ReconnectHost`, a redial).
const RELINK_WAIT: Duration = Duration::from_secs(10);

/// The host's live link. A link being made again (a reconnect takes the old link away
/// first, and the host is Connecting until the new one is up) is waited for, rather than
/// failing a user's operation on a host that is only reconnecting. A link that died (still
/// held, but closed) or a Disconnected host fails at once.
async fn live_link(ctx: &OpCtx<Hosts>, deadline: SystemTime) -> Result<Link, HostError> {
    let until = tokio::time::Instant::now()
        + RELINK_WAIT.min(deadline.duration_since(SystemTime::now()).unwrap_or_default());
    loop {
        let (link, status) = ctx.with_state(|s| (s.link.clone(), s.record.status));
        let relinking = match &link {
            Some(link) if !link.is_closed() => return Ok(link.clone()),
            Some(_) => false,
            None => status != HostStatus::Disconnected,
        };
        if !relinking || tokio::time::Instant::now() >= until {
            return Err(HostError::Disconnected(ctx.id()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The host's record as the actor holds it (activating it).
pub async fn record(hosts: &Kind<Hosts>, id: Uuid) -> Result<HostRecord, HostError> {
    hosts
        .call(id, Op::within("command", "read", Duration::from_secs(10)), |ctx| async move {
            Ok(ctx.with_state(|s| s.record.clone()))
        })
        .await
}

/// How far CPU and memory may be overcommitted (ZStack's defaults: CPU 10x, memory 1x).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overcommit {
    /// Virtual CPUs per physical CPU.
    pub cpu: f64,
    /// Memory booked per byte of memory.
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Overcommit { cpu: 10.0, memory: 1.0 }
    }
}

/// Whether `record` has room for `want` more.
fn fits(hosts: &Hosts, record: &HostRecord, want: Reservation, overcommit: Overcommit) -> bool {
    hosts.summary(record).fits(want, overcommit)
}

/// Books `want` on host `id` for VM `vm` (or a data volume) if it still has room; returns
/// whether it did. Booking again for the same key is a no-op that answers true.
pub async fn reserve(
    hosts: &Kind<Hosts>,
    id: Uuid,
    vm: Uuid,
    want: Reservation,
    overcommit: Overcommit,
) -> Result<bool, HostError> {
    hosts
        .call(
            id,
            Op::within("capacity", "reserve", Duration::from_secs(30)),
            move |ctx| async move {
                if ctx.with_state(|s| s.record.reservations.contains_key(&vm)) {
                    return Ok(true);
                }
                // The allocator chose from the directory, which may be a moment old: the host
                // checks again, in its queue, that it still takes VMs.
                let takes_vms = ctx.with_state(|s| {
                    !s.deleting
                        && s.record.state == crate::records::HostState::Enabled
                        && s.record.status == HostStatus::Connected
                        && fits(ctx.entity(), &s.record, want, overcommit)
                });
                if !takes_vms {
                    return Ok(false);
                }
                save(&ctx, |r| {
                    r.reservations.insert(vm, want);
                })
                .await?;
                Ok(true)
            },
        )
        .await
}

/// Stops (`deleting`) or lets again host `id` book capacity, in its capacity queue, so no
/// booking starts after the fence. Returns how many VMs still hold bookings: a deletion waits
/// for them to be deleted, or for creations that booked before the fence to end.
pub async fn fence(hosts: &Kind<Hosts>, id: Uuid, deleting: bool) -> Result<usize, HostError> {
    hosts
        .call(id, Op::within("capacity", "fence", Duration::from_secs(30)), move |ctx| async move {
            Ok(ctx.with_state(|s| {
                s.deleting = deleting;
                s.record.reservations.len()
            }))
        })
        .await
}

/// Replaces `vm`'s booking on host `id` by what `change` makes of it (of nothing, if it has
/// none) if the host has room for that beside its other bookings; returns whether it did
/// (the old booking stays if not). One capacity operation, so no other booking can come
/// between giving back and booking again.
pub async fn rebook(
    hosts: &Kind<Hosts>,
    id: Uuid,
    vm: Uuid,
    change: impl FnOnce(&mut Reservation) + Send + 'static,
    overcommit: Overcommit,
) -> Result<bool, HostError> {
    hosts
        .call(
            id,
            Op::within("capacity", "rebook", Duration::from_secs(30)),
            move |ctx| async move {
                let (room, want) = ctx.with_state(|s| {
                    let mut others = s.record.clone();
                    let mut want = others.reservations.remove(&vm).unwrap_or(Reservation {
                        cpu: 0,
                        memory: 0,
                        disk: 0,
                    });
                    change(&mut want);
                    (!s.deleting && fits(ctx.entity(), &others, want, overcommit), want)
                });
                if !room {
                    return Ok(false);
                }
                save(&ctx, |r| {
                    r.reservations.insert(vm, want);
                })
                .await?;
                Ok(true)
            },
        )
        .await
}

/// Measures the primary storage host `id` uses: its local storage (the first attached to
/// its cluster), whose size bounds the host's disk bookings, and each shared storage of its
/// cluster, whose size bounds the storage's bookings (`shared_capacity`).
pub async fn measure_storage(hosts: &Kind<Hosts>, id: Uuid) -> Result<(), HostError> {
    let db = hosts.entity().db.clone();
    let Some(host) = db.get::<HostRecord>(id)? else { return Ok(()) };
    let mut storages = Vec::new();
    for stored in db.scan::<crate::records::PrimaryStorageRecord>() {
        let ps = stored?.record;
        if ps.attached_cluster_uuids.contains(&host.record.cluster_uuid) {
            storages.push(ps);
        }
    }
    storages.sort_by_key(|ps| ps.uuid);
    let mut local_measured = false;
    for ps in storages {
        if ps.is_local() && local_measured {
            continue;
        }
        let deadline = SystemTime::now() + Duration::from_secs(30);
        let measure = Command::StorageCapacity { dir: ps.base_dir().to_owned() };
        let total_available = match command(hosts, id, measure, deadline, None).await {
            Ok(Reply::Capacity { total, available }) => (total, available),
            Ok(_) => continue,
            // One storage that cannot be measured does not keep the others unmeasured.
            Err(error) => {
                let error = strato_runtime::error_chain(&error);
                tracing::warn!(host = %id, ps = %ps.uuid, %error, "a primary storage was not measured");
                continue;
            }
        };
        let (total, available) = total_available;
        if !ps.is_local() {
            crate::shared_capacity::measured(&db, ps.uuid, total, available).await?;
            tracing::info!(host = %id, ps = %ps.uuid, total, available, "shared storage measured");
            continue;
        }
        let measured = crate::records::LocalStorageCapacity {
            primary_storage_uuid: ps.uuid,
            total,
            available_physical: available,
        };
        hosts
            .call(
                id,
                Op::within("capacity", "measure-storage", Duration::from_secs(30)),
                move |ctx| async move { save(&ctx, |r| r.local_storage = Some(measured)).await },
            )
            .await?;
        local_measured = true;
        tracing::info!(host = %id, ps = %ps.uuid, total, available, "local storage measured");
    }
    Ok(())
}

/// Gives back what VM `vm` booked on host `id` (nothing if it booked nothing).
pub async fn release(hosts: &Kind<Hosts>, id: Uuid, vm: Uuid) -> Result<(), HostError> {
    hosts
        .call(
            id,
            Op::within("capacity", "release", Duration::from_secs(30)),
            move |ctx| async move {
                if ctx.with_state(|s| !s.record.reservations.contains_key(&vm)) {
                    return Ok(());
                }
                save(&ctx, |r| {
                    r.reservations.remove(&vm);
                })
                .await
            },
        )
        .await
}

/// Sets a host's administrative state (`changeHostState`).
pub async fn set_state(
    hosts: &Kind<Hosts>,
    id: Uuid,
    state: crate::records::HostState,
) -> Result<HostRecord, HostError> {
    hosts
        .call(
            id,
            Op::within("capacity", "change-state", Duration::from_secs(30)),
            move |ctx| async move {
                save(&ctx, |r| r.state = state).await?;
                Ok(ctx.with_state(|s| s.record.clone()))
            },
        )
        .await
}

/// Removes host `id`: closes its link, deletes its record, and lets its actor go. The caller
/// has dealt with its VMs (see [`crate::cascade`]).
pub async fn remove(hosts: &Kind<Hosts>, id: Uuid) -> Result<(), HostError> {
    hosts
        .call(id, link_op("remove"), move |ctx| async move {
            if let Some(link) = ctx.with_state(|s| {
                s.epoch += 1; // the watcher's news of this link's end is now stale
                s.link.take()
            }) {
                // What the host's agent made for Strato goes with the host, while it can
                // still be asked (a host that is away keeps it until it is added again,
                // when the whole state is applied).
                let empty = Command::ApplyNetwork(strato_proto::net::NetworkConfig::default());
                let deadline = SystemTime::now() + HOST_NETWORK_CLEAR_TIME;
                if let Err(error) = link.request_with_id(Uuid::new_v4(), empty, deadline, None).await
                {
                    tracing::warn!(host = %id, %error, "the removed host's network stays as it was");
                }
                ctx.entity().forget_link(id);
                link.close();
            }
            let mut batch = Batch::new();
            batch.delete::<HostRecord>(id, Expect::Any);
            crate::records::delete_refs(&ctx.entity().db, &mut batch, id)?;
            ctx.entity().db.commit(batch).await?;
            ctx.entity().directory.write().expect("directory lock").remove(&id);
            ctx.passivate_when_idle();
            tracing::info!(host = %id, "host removed");
            Ok(())
        })
        .await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::fits_within;

    proptest! {
        /// The check agrees with exact arithmetic for every pair, the largest included: a
        /// sum past `u64::MAX` never fits (it used to wrap and pass).
        #[test]
        fn fits_within_is_exact_arithmetic(used: u64, more: u64, limit: u64) {
            let exact = u128::from(used) + u128::from(more) <= u128::from(limit);
            prop_assert_eq!(fits_within(used, more, limit), exact);
        }

        #[test]
        fn near_the_top_nothing_wraps(used in (u64::MAX - 1024)..=u64::MAX, more in 1u64..=u64::MAX) {
            prop_assert!(!fits_within(used, more, u64::MAX - 1025));
            prop_assert_eq!(fits_within(used, more, u64::MAX), used.checked_add(more).is_some());
        }
    }
}
