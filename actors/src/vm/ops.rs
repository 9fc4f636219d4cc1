//! The user's VM operations: start, stop, reboot, pause, resume, destroy, recover, expunge.
//!
//! Each runs on the VM's actor in its `lifecycle` queue (level 1), looks itself up in the
//! state table, records the transitional state, commands the host's agent through the host
//! actor, and records where it landed: the table's success or failure state. Every agent
//! command is safe to repeat, so an operation interrupted by a crash can simply be run again.
//!
//! Destroying a VM whose host is unreachable succeeds for the user: the VM is Destroyed and a
//! persisted GC job destroys the domain once the host reconnects (or on a timer).

use std::time::{Duration, SystemTime};

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use strato_proto::{Command, DomainState, Reply};
use strato_runtime::{EventMatcher, Kind, Op, OpCtx, Runtime, Trigger};
use strato_storage::{Batch, Expect};
use uuid::Uuid;

use super::state::{VmOp, VmState, plan};
use super::{VmError, VmStateChanged, Vms};
use crate::host::{self, HostError, Hosts};
use crate::records::VmRecord;

/// What to do with a destroyed VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeletionPolicy {
    /// Expunge at once.
    Direct,
    /// Keep it Destroyed (recoverable) until expunged (ZStack's default).
    #[default]
    Delay,
}

/// How VM operations behave.
#[derive(Clone, Copy, Debug)]
pub struct VmPolicy {
    /// How long a graceful stop may take before the domain is powered off.
    pub graceful_stop: Duration,
    /// What destroying does.
    pub deletion: DeletionPolicy,
    /// With the Delay policy, how long a destroyed VM can be recovered before the GC expunges
    /// it (`None`: only by hand).
    pub expunge_after: Option<Duration>,
}

impl Default for VmPolicy {
    fn default() -> Self {
        VmPolicy {
            graceful_stop: Duration::from_secs(60),
            deletion: DeletionPolicy::Delay,
            expunge_after: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// The GC job kind that expunges a destroyed VM once its grace period is over.
pub const EXPUNGE_JOB: &str = "vm.expunge";

/// The context of an [`EXPUNGE_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpungeJob {
    /// The VM.
    pub vm: Uuid,
}

fn expunge_job_name(vm: Uuid) -> String {
    format!("{EXPUNGE_JOB}/{vm}")
}

/// The GC job kind that destroys a domain left on a host that was unreachable.
pub const DESTROY_DOMAIN_JOB: &str = "vm.destroy-domain";

/// The context of a [`DESTROY_DOMAIN_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DestroyDomainJob {
    /// The host.
    pub host: Uuid,
    /// The domain (the VM's UUID).
    pub vm: Uuid,
}

/// The GC job kind that deletes a root volume left on a host that was unreachable when a
/// failed creation rolled back.
pub const DELETE_VOLUME_JOB: &str = "vm.delete-volume";

/// The context of a [`DELETE_VOLUME_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteVolumeJob {
    /// The host.
    pub host: Uuid,
    /// The volume's path on the host.
    pub path: String,
}

/// The GC job kind that gives back the addresses of a VM whose expunge was interrupted
/// between deleting its record and releasing them.
pub const RELEASE_IPS_JOB: &str = "vm.release-ips";

/// How long after an expunge its address job runs (the expunge itself releases them at once
/// and cancels the job; the job is for an MN that died in between).
const RELEASE_IPS_DELAY: Duration = Duration::from_secs(30);

/// The context of a [`RELEASE_IPS_JOB`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseIpsJob {
    /// The VM.
    pub vm: Uuid,
    /// Its NICs: (L3 network, address, NIC).
    pub nics: Vec<(Uuid, String, Uuid)>,
}

/// Registers the VM kind's GC handlers. Call once at startup, before `gc().start()`.
pub fn register_gc(runtime: &Runtime, hosts: Kind<Hosts>) {
    let expunging = runtime.clone();
    runtime.gc().register_handler(EXPUNGE_JOB, move |job: ExpungeJob| {
        let runtime = expunging.clone();
        async move {
            let Some(vms) = runtime.kind::<Vms>() else {
                return Err("the VM kind is not registered".into());
            };
            let state = runtime.db().get::<VmRecord>(job.vm)?.map(|s| s.record.state);
            // Recovered or already gone: nothing to do.
            if state == Some(VmState::Destroyed) {
                operate(&vms, job.vm, Lifecycle::Expunge, Duration::from_secs(300), None).await?;
                tracing::info!(vm = %job.vm, "destroyed VM expunged after its grace period");
            }
            Ok(())
        }
    });
    let destroying = runtime.clone();
    runtime.gc().register_handler(DESTROY_DOMAIN_JOB, move |job: DestroyDomainJob| {
        let (hosts, runtime) = (hosts.clone(), destroying.clone());
        async move {
            if host_was_deleted(&runtime, job.host)? {
                return Ok(());
            }
            let deadline = SystemTime::now() + Duration::from_secs(60);
            host::command(
                &hosts,
                job.host,
                Command::DestroyDomain { uuid: job.vm },
                deadline,
                None,
            )
            .await?;
            host::command(
                &hosts,
                job.host,
                Command::UndefineDomain { uuid: job.vm },
                deadline,
                None,
            )
            .await?;
            tracing::info!(vm = %job.vm, host = %job.host, "leftover domain destroyed");
            Ok(())
        }
    });
    let releasing = runtime.clone();
    runtime.gc().register_handler(RELEASE_IPS_JOB, move |job: ReleaseIpsJob| {
        let runtime = releasing.clone();
        async move {
            // Still recorded: the VM holds its addresses (its expunge failed before the end).
            if runtime.db().get::<VmRecord>(job.vm)?.is_none() {
                release_ips(&runtime, &job).await?;
                tracing::info!(vm = %job.vm, "addresses of an expunged VM given back");
            }
            Ok(())
        }
    });
    let deleting = runtime.clone();
    runtime.gc().register_handler(DELETE_VOLUME_JOB, move |job: DeleteVolumeJob| {
        let runtime = deleting.clone();
        async move {
            let Some(hosts) = runtime.kind::<Hosts>() else {
                return Err("the host kind is not registered".into());
            };
            if host_was_deleted(&runtime, job.host)? {
                return Ok(());
            }
            let deadline = SystemTime::now() + Duration::from_secs(60);
            let command = Command::DeleteVolume { path: job.path.clone() };
            host::command(&hosts, job.host, command, deadline, None).await?;
            tracing::info!(path = %job.path, host = %job.host, "leftover volume deleted");
            Ok(())
        }
    });
}

/// Whether `host` was deleted: its leftovers are then no longer the MN's to clean (the machine
/// left management; if it is added again, what runs there is reported as strangers).
pub(crate) fn host_was_deleted(
    runtime: &Runtime,
    host: Uuid,
) -> Result<bool, strato_storage::StoreError> {
    let deleted = runtime.db().get::<crate::records::HostRecord>(host)?.is_none();
    if deleted {
        tracing::info!(%host, "leftover on a deleted host: nothing to clean");
    }
    Ok(deleted)
}

/// Fires when host `host` is Connected again, and every minute in case the event was missed.
pub(crate) fn when_host_is_back(host: Uuid) -> Trigger {
    Trigger::every(Duration::from_secs(60)).and_on_event(
        EventMatcher::topic("host.status-changed")
            .field("hostUuid", host)
            .field("status", "Connected"),
    )
}

/// Leaves a GC job that deletes the volume at `path` on `host` once the host is back.
pub async fn submit_delete_volume(
    runtime: &Runtime,
    host: Uuid,
    path: String,
) -> Result<(), strato_runtime::RuntimeError> {
    let name = format!("{DELETE_VOLUME_JOB}/{host}/{path}");
    let job = DeleteVolumeJob { host, path };
    runtime.gc().submit(&name, DELETE_VOLUME_JOB, &job, when_host_is_back(host)).await?;
    tracing::warn!(%host, path = %job.path, "host unreachable: the volume will be deleted by the GC");
    Ok(())
}

/// Leaves a GC job that destroys VM `vm`'s domain on `host` once the host is back (on its
/// reconnection event, or every minute).
pub async fn submit_destroy_domain(
    runtime: &Runtime,
    host: Uuid,
    vm: Uuid,
) -> Result<(), strato_runtime::RuntimeError> {
    let job = DestroyDomainJob { host, vm };
    runtime
        .gc()
        .submit(
            &format!("{DESTROY_DOMAIN_JOB}/{vm}"),
            DESTROY_DOMAIN_JOB,
            &job,
            when_host_is_back(host),
        )
        .await?;
    tracing::warn!(%vm, %host, "host unreachable: the domain will be destroyed by the GC");
    Ok(())
}

fn deadline_of(ctx: &OpCtx<Vms>) -> SystemTime {
    SystemTime::now() + ctx.remaining()
}

pub(super) async fn save(
    ctx: &OpCtx<Vms>,
    change: impl FnOnce(&mut VmRecord),
) -> Result<VmRecord, VmError> {
    save_with(ctx, change, |_, _| Ok(())).await
}

/// [`save`], with `also`'s writes for the changed record in the same batch.
pub(super) async fn save_with(
    ctx: &OpCtx<Vms>,
    change: impl FnOnce(&mut VmRecord),
    also: impl FnOnce(&VmRecord, &mut Batch) -> Result<(), VmError>,
) -> Result<VmRecord, VmError> {
    let (mut record, generation) = super::current(ctx)?;
    let from = record.state;
    change(&mut record);
    let mut batch = Batch::new();
    batch.put(&record, Expect::Generation(generation))?;
    also(&record, &mut batch)?;
    let written = ctx.entity().db.commit(batch).await?;
    let generation = written[0].generation.unwrap_or(generation);
    ctx.with_state(|s| {
        s.record = record.clone();
        s.generation = generation;
    });
    if from != record.state {
        ctx.runtime().events().publish(VmStateChanged { vm: record.uuid, from, to: record.state });
    }
    Ok(record)
}

fn hosts_of(ctx: &OpCtx<Vms>) -> Result<Kind<Hosts>, VmError> {
    ctx.runtime()
        .kind::<Hosts>()
        .ok_or(VmError::Runtime(strato_runtime::RuntimeError::UnknownKind { kind: "host".into() }))
}

/// An operation [`operate`] runs. Migration and offering changes take arguments and have
/// their own entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifecycle {
    /// Start.
    Start,
    /// Stop: graceful, then forced after the policy's timeout.
    Stop,
    /// Reboot.
    Reboot,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Destroy (per the deletion policy).
    Destroy,
    /// Recover a destroyed VM.
    Recover,
    /// Expunge a destroyed VM.
    Expunge,
}

impl Lifecycle {
    /// The state table's operation.
    pub fn op(self) -> VmOp {
        match self {
            Lifecycle::Start => VmOp::Start,
            Lifecycle::Stop => VmOp::Stop,
            Lifecycle::Reboot => VmOp::Reboot,
            Lifecycle::Pause => VmOp::Pause,
            Lifecycle::Resume => VmOp::Resume,
            Lifecycle::Destroy => VmOp::Destroy,
            Lifecycle::Recover => VmOp::Recover,
            Lifecycle::Expunge => VmOp::Expunge,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Lifecycle::Start => "start",
            Lifecycle::Stop => "stop",
            Lifecycle::Reboot => "reboot",
            Lifecycle::Pause => "pause",
            Lifecycle::Resume => "resume",
            Lifecycle::Destroy => "destroy",
            Lifecycle::Recover => "recover",
            Lifecycle::Expunge => "expunge",
        }
    }
}

/// Runs `op` on VM `id` and returns its record afterwards.
pub async fn operate(
    vms: &Kind<Vms>,
    id: Uuid,
    op: Lifecycle,
    timeout: Duration,
    job_id: Option<Uuid>,
) -> Result<VmRecord, VmError> {
    vms.call(id, Op::within("lifecycle", op.name(), timeout).job(job_id), move |ctx| async move {
        run(ctx, op).await
    })
    .await
}

async fn run(ctx: OpCtx<Vms>, op: Lifecycle) -> Result<VmRecord, VmError> {
    let (record, _) = super::begin(&ctx).await?;
    let transition = plan(record.state, op.op())?;
    if op == Lifecycle::Recover {
        let recovered = save(&ctx, |r| r.state = transition.on_success).await?;
        // The VM is recovered once its record says so. A job left behind by a failed cancel
        // expunges only a VM that is Destroyed when it runs.
        let expunge = strato_runtime::Gc::job_id(&expunge_job_name(recovered.uuid));
        if let Err(error) = ctx.runtime().gc().cancel(expunge).await {
            tracing::warn!(vm = %recovered.uuid, %error, "a recovered VM's expunge job stays; it will find the VM alive");
        }
        return Ok(recovered);
    }
    save(&ctx, |r| r.state = transition.during).await?;
    let outcome = match std::panic::AssertUnwindSafe(drive(&ctx, op, &record)).catch_unwind().await
    {
        Ok(outcome) => outcome,
        Err(panic) => {
            // A bug in the operation: it lands where a failure lands, not in its
            // transitional state, and the runtime still sees (and reports) the panic.
            let _ = save(&ctx, |r| r.state = transition.on_failure).await;
            std::panic::resume_unwind(panic);
        }
    };
    match outcome {
        Ok(Landing::Table) => {
            let landed = save(&ctx, |r| r.state = transition.on_success).await?;
            if op == Lifecycle::Destroy {
                // Its DHCP reservation goes, now that its record says it is destroyed.
                refresh_host_network(&ctx, &landed)?;
            }
            // A destroyed VM can be recovered until the GC expunges it after its grace period.
            if let (Lifecycle::Destroy, Some(grace)) = (op, ctx.entity().policy.expunge_after) {
                let job = ExpungeJob { vm: landed.uuid };
                ctx.runtime()
                    .gc()
                    .submit_after(
                        &expunge_job_name(landed.uuid),
                        EXPUNGE_JOB,
                        &job,
                        Trigger::default(),
                        grace,
                    )
                    .await?;
            }
            Ok(landed)
        }
        Ok(Landing::Expunged) => {
            forget(&ctx, &record).await?;
            refresh_host_network(&ctx, &record)?;
            ctx.passivate_when_idle();
            tracing::info!(vm = %record.uuid, "VM expunged");
            Ok(VmRecord { state: VmState::Expunging, ..record })
        }
        Err(error) => {
            tracing::warn!(vm = %record.uuid, ?op, %error, "VM operation failed");
            save(&ctx, |r| r.state = transition.on_failure).await?;
            Err(error)
        }
    }
}

/// Asks the VM's host to apply its network again (its reservations follow the record).
fn refresh_host_network(ctx: &OpCtx<Vms>, record: &VmRecord) -> Result<(), VmError> {
    if let Some(host) = record.host_uuid.or(record.last_host_uuid) {
        host::refresh_network(&hosts_of(ctx)?, host);
    }
    Ok(())
}

enum Landing {
    /// Where the state table says.
    Table,
    /// The VM is gone.
    Expunged,
}

async fn drive(ctx: &OpCtx<Vms>, op: Lifecycle, record: &VmRecord) -> Result<Landing, VmError> {
    let hosts = hosts_of(ctx)?;
    let host = record.host_uuid.or(record.last_host_uuid).ok_or(VmError::NoHost(record.uuid))?;
    let deadline = deadline_of(ctx);
    let job = ctx.job_id();
    let uuid = record.uuid;
    let send = |command: Command| host::command(&hosts, host, command, deadline, job);
    match op {
        Lifecycle::Start => {
            // The guest asks for its address as it boots: its host's DHCP knows it first.
            host::apply_network(&hosts, host, job).await?;
            // A volume's snapshot left Creating is settled first: the domain is defined on
            // the top the volume really has.
            let db = &ctx.entity().db;
            let mut volumes: Vec<Uuid> =
                crate::volume::attached_to(db, uuid)?.into_iter().map(|v| v.record.uuid).collect();
            volumes.push(crate::records::root_volume_id(uuid));
            for volume in volumes {
                crate::snapshot::settle(db, &hosts, volume, job)
                    .await
                    .map_err(|e| VmError::Volume(Box::new(e)))?;
            }
            // Settling may have moved the root volume's top, and the VM's record with it.
            let record = match db.get::<VmRecord>(uuid)? {
                Some(stored) => stored.record,
                None => record.clone(),
            };
            let disks = crate::volume::disks_of(db, uuid)?;
            send(Command::DefineDomain(record.domain_spec(disks))).await?;
            // The chaos runs panic here: an operation dying between two agent commands.
            fail::fail_point!("vm-start-after-define");
            send(Command::StartDomain { uuid }).await?;
        }
        Lifecycle::Stop => {
            if record.state != VmState::Unknown {
                send(Command::ShutdownDomain { uuid }).await?;
                let graceful = ctx.entity().policy.graceful_stop.min(ctx.remaining());
                let started = std::time::Instant::now();
                while started.elapsed() < graceful {
                    if domain_state(&send(Command::ListDomains).await?, uuid)
                        != Some(DomainState::Running)
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            // Forced: harmless if the guest already powered off.
            send(Command::DestroyDomain { uuid }).await?;
        }
        Lifecycle::Reboot => {
            send(Command::RebootDomain { uuid }).await?;
        }
        Lifecycle::Pause => {
            send(Command::SuspendDomain { uuid }).await?;
        }
        Lifecycle::Resume => {
            send(Command::ResumeDomain { uuid }).await?;
        }
        Lifecycle::Destroy => {
            let destroyed = async {
                send(Command::DestroyDomain { uuid }).await?;
                send(Command::UndefineDomain { uuid }).await
            }
            .await;
            match destroyed {
                Ok(_) => {}
                Err(error) if error.is_unreachable() => {
                    // The user's destroy succeeds; the domain goes when the host is back.
                    submit_destroy_domain(ctx.runtime(), host, uuid).await?;
                }
                Err(error) => return Err(error.into()),
            }
            if ctx.entity().policy.deletion == DeletionPolicy::Direct {
                return expunge_volume(ctx, record, &send).await;
            }
        }
        Lifecycle::Expunge => return expunge_volume(ctx, record, &send).await,
        // Recovering only changes the record (handled in `run`).
        Lifecycle::Recover => {}
    }
    Ok(Landing::Table)
}

/// Expunging gives everything back: the root volume, the NICs' addresses and the host's
/// capacity booking (a destroyed VM keeps them, so that it can be recovered as it was).
async fn expunge_volume<F, Fut>(
    ctx: &OpCtx<Vms>,
    record: &VmRecord,
    send: &F,
) -> Result<Landing, VmError>
where
    F: Fn(Command) -> Fut,
    Fut: std::future::Future<Output = Result<Reply, HostError>>,
{
    if let Some(path) = &record.root_volume_path {
        send(Command::DeleteVolume { path: path.clone() }).await?;
    }
    if let Some(host) = record.host_uuid {
        host::release(&hosts_of(ctx)?, host, record.uuid).await?;
    }
    // The addresses go last, after the record (see `forget`): while the record exists, it
    // lists them, so they must stay booked.
    Ok(Landing::Expunged)
}

/// Deletes an expunged VM's record, then gives its addresses back. A GC job, submitted
/// first, gives them back if the MN dies between the two; it does nothing if the record is
/// still there, since the VM then still holds its addresses.
async fn forget(ctx: &OpCtx<Vms>, record: &VmRecord) -> Result<(), VmError> {
    let job = ReleaseIpsJob {
        vm: record.uuid,
        nics: record.vm_nics.iter().map(|n| (n.l3_network_uuid, n.ip.clone(), n.uuid)).collect(),
    };
    let name = format!("{RELEASE_IPS_JOB}/{}", record.uuid);
    if !job.nics.is_empty() {
        let gc = ctx.runtime().gc();
        gc.submit_after(&name, RELEASE_IPS_JOB, &job, Trigger::default(), RELEASE_IPS_DELAY)
            .await?;
    }
    // Its root volume's booking on shared storage is given back with its record.
    let db = &ctx.entity().db;
    let root_storage = match db
        .get::<crate::records::VolumeRecord>(crate::records::root_volume_id(record.uuid))?
    {
        Some(root) => crate::volume::storage_of(db, &root.record)?.filter(|ps| !ps.is_local()),
        None => None,
    };
    // Its data volumes are detached in the same write (they stay, Ready, on their host).
    let host = record.host_uuid.or(record.last_host_uuid);
    let volume_error = |e| VmError::Volume(Box::new(e));
    let (snapshot_files, sweep) = loop {
        let mut batch = Batch::new();
        batch.delete::<VmRecord>(record.uuid, Expect::Any);
        crate::records::delete_refs(&ctx.entity().db, &mut batch, record.uuid)?;
        super::volumes::detach_all(&ctx.entity().db, &mut batch, record.uuid)?;
        // Its root volume's record goes with it (the file went in `expunge_volume`), with
        // its snapshots' records; their files go after, swept if the MN dies first.
        let root = crate::records::root_volume_id(record.uuid);
        batch.delete::<crate::records::VolumeRecord>(root, Expect::Any);
        crate::records::delete_refs(&ctx.entity().db, &mut batch, root)?;
        let files = crate::snapshot::forget_all(&ctx.entity().db, &mut batch, root)
            .map_err(volume_error)?;
        if let Some(ps) = &root_storage {
            crate::shared_capacity::unbook_with(&ctx.entity().db, &mut batch, ps.uuid, root)?;
        }
        let sweep = match host.filter(|_| !files.is_empty()) {
            Some(host) => Some(
                crate::snapshot::Sweep::submit(ctx.runtime(), root, host, files.clone())
                    .await
                    .map_err(volume_error)?,
            ),
            None => None,
        };
        match ctx.entity().db.commit(batch).await {
            Ok(_) => break (files, sweep),
            // A volume changed meanwhile (its deletion was refused: it was attached).
            Err(strato_storage::StoreError::Conflict { .. }) => {
                if let Some(sweep) = sweep {
                    sweep.done().await;
                }
                continue;
            }
            Err(error) => return Err(error.into()),
        }
    };
    if let (Some(host), Some(sweep)) = (host, sweep) {
        // One that cannot be deleted now is left to the GC's delete job.
        crate::snapshot::delete_files(&hosts_of(ctx)?, host, snapshot_files).await;
        sweep.done().await;
    }
    // The VM is gone: the expunge has happened, whatever befalls what follows. Giving the
    // addresses back and cancelling the job are tidying the job does itself if they fail
    // (a release names its owner, so the job's late repeat frees nothing someone else holds).
    if !job.nics.is_empty()
        && release_ips(ctx.runtime(), &job).await.is_ok()
        && let Err(error) = ctx.runtime().gc().cancel(strato_runtime::Gc::job_id(&name)).await
    {
        tracing::warn!(vm = %record.uuid, %error, "an expunged VM's address job stays; it will find nothing to do");
    }
    Ok(())
}

async fn release_ips(runtime: &Runtime, job: &ReleaseIpsJob) -> Result<(), VmError> {
    let Some(l3s) = runtime.kind::<crate::l3::L3s>() else { return Ok(()) };
    // Its NICs' EIPs and port forwarding rules are detached first (they name the NICs).
    let nics: Vec<Uuid> = job.nics.iter().map(|(_, _, nic)| *nic).collect();
    if let Some(hosts) = runtime.kind::<Hosts>() {
        crate::vip::detach_nics(runtime.db(), &l3s, &hosts, &nics).await?;
    }
    for (l3, ip, nic) in &job.nics {
        let Ok(ip) = ip.parse() else { continue };
        match crate::l3::release_ip(&l3s, *l3, ip, *nic).await {
            // A network deleted since holds no addresses.
            Err(crate::l3::L3Error::Runtime(strato_runtime::RuntimeError::NotFound { .. })) => {}
            other => other?,
        }
    }
    Ok(())
}

fn domain_state(reply: &Reply, uuid: Uuid) -> Option<DomainState> {
    match reply {
        Reply::Domains(domains) => domains.iter().find(|d| d.uuid == uuid).map(|d| d.state),
        _ => None,
    }
}

/// How long a cold migration may take: on local storage it copies the root volume through
/// the MN.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Moves a stopped VM to another host of its cluster (`target`, or the allocator's choice),
/// booking capacity there before giving it back on the old host. Cold: the domain is
/// undefined on the old host and defined again when the VM starts.
pub async fn migrate(
    vms: &Kind<Vms>,
    id: Uuid,
    target: Option<Uuid>,
    timeout: Duration,
    job_id: Option<Uuid>,
) -> Result<VmRecord, VmError> {
    vms.call(id, Op::within("lifecycle", "migrate", timeout).job(job_id), move |ctx| async move {
        let (record, _) = super::begin(&ctx).await?;
        let transition = plan(record.state, VmOp::Migrate)?;
        let source = record.host_uuid.ok_or(VmError::NoHost(id))?;
        // Data volumes on a host's own disk keep the VM there; those on shared storage
        // follow it.
        let db = &ctx.entity().db;
        let mut local = Vec::new();
        for v in crate::volume::attached_to(db, id)? {
            if crate::volume::is_local(db, &v.record)? {
                local.push(v.record.uuid);
            }
        }
        if !local.is_empty() {
            return Err(VmError::HasDataVolumes { vm: id, volumes: local });
        }
        let hosts = hosts_of(&ctx)?;
        let db = ctx.entity().db.clone();
        let cluster = db
            .get::<crate::records::HostRecord>(source)?
            .map(|h| h.record.cluster_uuid)
            .ok_or(VmError::NoHost(id))?;
        save(&ctx, |r| r.state = transition.during).await?;
        let moved = async {
            // Book the target first (a different host of the same cluster).
            // Its root volume's booking on local storage goes with it.
            let disk = db
                .get::<crate::records::HostRecord>(source)?
                .and_then(|h| h.record.reservations.get(&id).map(|r| r.disk))
                .unwrap_or(0);
            let need = crate::allocator::Need {
                cpu: record.cpu_num,
                memory: record.memory_size,
                disk,
                clusters: Some(vec![cluster]),
                pinned: target,
                l2_clusters: None,
            };
            let destination = crate::allocator::place_excluding(
                &hosts,
                id,
                &need,
                source,
                host::Overcommit::default(),
            )
            .await?;
            let deadline = deadline_of(&ctx);
            // Its root volume's files go first (the VM is stopped: they do not change).
            let mv = crate::local_storage::Move::new(
                hosts.clone(),
                source,
                destination,
                deadline,
                ctx.job_id(),
            );
            let root = match move_root_volume(&ctx, &record, &mv).await {
                Ok(root) => root,
                Err(error) => {
                    host::release(&hosts, destination, id).await?;
                    return Err(error);
                }
            };
            let left = host::command(
                &hosts,
                source,
                Command::UndefineDomain { uuid: id },
                deadline,
                ctx.job_id(),
            )
            .await;
            if let Err(error) = left {
                // The VM stays where it was: the copies and the target's booking are undone.
                if let Some(root) = root {
                    root.undo(&mv).await;
                }
                host::release(&hosts, destination, id).await?;
                return Err(error.into());
            }
            host::release(&hosts, source, id).await?;
            Ok::<_, VmError>((destination, root, mv))
        }
        .await;
        match moved {
            Ok((destination, moved_root, mv)) => {
                tracing::info!(vm = %id, from = %source, to = %destination, "VM migrated");
                let root =
                    db.get::<crate::records::VolumeRecord>(crate::records::root_volume_id(id))?;
                let change = |r: &mut VmRecord| {
                    r.state = transition.on_success;
                    r.last_host_uuid = Some(source);
                    r.host_uuid = Some(destination);
                };
                // Its root volume's record and its (shared) data volumes' follow it, in the
                // same write.
                let mut following: Vec<_> = crate::volume::attached_to(&db, id)?;
                following.extend(root);
                let moved = save_with(&ctx, change, |_, batch| {
                    for v in &following {
                        let followed = crate::records::VolumeRecord {
                            host_uuid: Some(destination),
                            ..v.record.clone()
                        };
                        batch.put(&followed, Expect::Generation(v.generation))?;
                    }
                    Ok(())
                })
                .await?;
                if let Some(root) = moved_root {
                    root.finish(&mv).await;
                }
                // Its reservation and rules leave the source; the destination gets them
                // before the VM starts there.
                host::refresh_network(&hosts, source);
                Ok(moved)
            }
            Err(error) => {
                // Whatever step failed (booking, undefining, giving a booking back), the VM
                // stays on its host and only that host keeps a booking. Should that fail too,
                // the VM stays Migrating and the next operation repairs it (`begin`).
                super::release_bookings_elsewhere(&ctx, &record).await?;
                save(&ctx, |r| r.state = transition.on_failure).await?;
                Err(error)
            }
        }
    })
    .await
}

/// A root volume's files copied to a cold migration's destination, until the move ends.
struct MovedRoot {
    files: Vec<String>,
    /// Those sealed anew on the destination (an undo deletes no other).
    sealed: Vec<String>,
    on_destination: crate::snapshot::Sweep,
    on_source: crate::snapshot::Sweep,
}

impl MovedRoot {
    /// The VM moved: the source's files go.
    async fn finish(self, mv: &crate::local_storage::Move) {
        if mv.delete(mv.source, self.files).await {
            self.on_source.done().await;
        }
        self.on_destination.done().await;
    }

    /// The VM stays: the copies go.
    async fn undo(self, mv: &crate::local_storage::Move) {
        if mv.delete(mv.destination, mv.undo_list(&self.files, &self.sealed)).await {
            self.on_destination.done().await;
        }
        self.on_source.done().await;
    }
}

/// Copies VM `record`'s root volume to the destination's local storage, unless the two hosts
/// see one storage (then its file is already there). Answers what was copied; sweeps make
/// sure that whatever becomes of the move, each host keeps only the files the records name
/// on it.
async fn move_root_volume(
    ctx: &OpCtx<Vms>,
    record: &VmRecord,
    mv: &crate::local_storage::Move,
) -> Result<Option<MovedRoot>, VmError> {
    let db = &ctx.entity().db;
    let Some(path) = record.root_volume_path.clone() else { return Ok(None) };
    let root_id = crate::records::root_volume_id(record.uuid);
    let root = db.get::<crate::records::VolumeRecord>(root_id)?.ok_or_else(|| {
        boxed(crate::volume::VolumeError::InUse(format!(
            "VM {}'s root volume has no record: its storage is unknown, so it is not moved",
            record.uuid
        )))
    })?;
    let ps = crate::volume::storage_of(db, &root.record)?.ok_or_else(|| {
        boxed(crate::volume::VolumeError::InUse(format!(
            "VM {}'s root volume names no primary storage",
            record.uuid
        )))
    })?;
    // On shared storage, or local storage both hosts see, the file is already there.
    if !ps.is_local() || mv.shares_storage(ps.base_dir()).await? {
        return Ok(None);
    }
    if !crate::snapshot::snapshots_of(db, root_id).map_err(boxed)?.is_empty() {
        return Err(boxed(crate::volume::VolumeError::InUse(format!(
            "VM {}'s root volume has snapshots, which do not move between hosts' local storage: delete them first",
            record.uuid
        ))));
    }
    let runtime = ctx.runtime();
    let files = vec![path];
    let sweep =
        |host, paths| crate::snapshot::Sweep::submit_for_move(runtime, root_id, host, paths);
    let on_destination = sweep(mv.destination, mv.leftovers(&files)).await.map_err(boxed)?;
    let on_source = sweep(mv.source, files.clone()).await.map_err(boxed)?;
    let mut moved = MovedRoot { files, sealed: Vec::new(), on_destination, on_source };
    match mv.copy(&moved.files, ps.base_dir(), &mut moved.sealed).await {
        Ok(false) => Ok(Some(moved)),
        Ok(true) => {
            // One storage after all: nothing to sweep, nothing to delete.
            moved.on_destination.done().await;
            moved.on_source.done().await;
            Ok(None)
        }
        Err(error) => {
            moved.undo(mv).await;
            Err(error.into())
        }
    }
}

fn boxed(error: crate::volume::VolumeError) -> VmError {
    VmError::Volume(Box::new(error))
}

/// Changes a stopped VM's CPUs and memory: charged to its owner's quota (the growth must
/// fit it), then re-booked on its host (the old booking stays if the new size does not fit,
/// and so does the old charge).
pub async fn change_offering(
    vms: &Kind<Vms>,
    id: Uuid,
    cpu: u32,
    memory: u64,
    timeout: Duration,
    job_id: Option<Uuid>,
) -> Result<VmRecord, VmError> {
    vms.call(
        id,
        Op::within("lifecycle", "change-offering", timeout).job(job_id),
        move |ctx| async move {
            let (record, _) = super::begin(&ctx).await?;
            plan(record.state, VmOp::ChangeOffering)?;
            let (db, quotas) = (&ctx.entity().db, ctx.entity().quotas.clone());
            let charge =
                crate::owners::Charge {
                    vm_num: 1,
                    cpu_num: u64::from(cpu),
                    memory_size: memory,
                    ..Default::default()
                };
            let charged = quotas.recharge(db, id, charge).await?;
            let resized = async {
                if let Some(host) = record.host_uuid {
                    let hosts = hosts_of(&ctx)?;
                    let overcommit = host::Overcommit::default();
                    let resize = move |r: &mut crate::records::Reservation| {
                        (r.cpu, r.memory) = (cpu, memory);
                    };
                    if !host::rebook(&hosts, host, id, resize, overcommit).await? {
                        return Err(VmError::Alloc(crate::allocator::AllocError::NoHost {
                            trace: vec![crate::allocator::FilterStep {
                                filter: format!(
                                    "host {host} has room for {cpu} CPU and {} MiB",
                                    memory >> 20
                                ),
                                hosts_left: 0,
                            }],
                        }));
                    }
                }
                save(&ctx, |r| {
                    r.cpu_num = cpu;
                    r.memory_size = memory;
                })
                .await
            }
            .await;
            if resized.is_err()
                && let Some(previous) = charged
                && let Err(error) = quotas.restore(db, previous).await
            {
                // The change's own failure is what the caller hears; the charge left at
                // the new size is the operator's to see.
                tracing::error!(vm = %id, %error, "the VM kept its size but its charge could not be given back");
            }
            resized
        },
    )
    .await
}
