//! The VM actor: one per VM, with the `lifecycle` queue at level 1 (ZStack's), so a VM's
//! operations and the hypervisor's reports about it never overlap.
//!
//! It applies what the hypervisor observes ([`observe`]) and runs the user's operations
//! ([`ops::operate`]) through the state table ([`state::plan`]).

pub mod create;
pub mod ops;
pub mod state;
pub mod volumes;

use std::time::Duration;

use strato_runtime::{BoxError, Entity, Event, Kind, KindConfig, Op, RuntimeError};
use strato_storage::{Batch, Db, Expect};
use uuid::Uuid;

use crate::records::VmRecord;
use state::{Observation, VmState, observed};

/// The VM actor's state: its record and the record's generation.
#[derive(Debug)]
pub struct VmActor {
    record: VmRecord,
    generation: u64,
}

/// The VM actor kind.
#[derive(Debug)]
pub struct Vms {
    db: Db,
    policy: ops::VmPolicy,
    /// The accounts' quota locks: VMs are what quotas count.
    quotas: std::sync::Arc<crate::owners::Quotas>,
}

impl Vms {
    /// The kind, on `db`, with the default policy.
    pub fn new(db: Db) -> Self {
        Vms::with_policy(db, ops::VmPolicy::default())
    }

    /// The kind, on `db`, with `policy`.
    pub fn with_policy(db: Db, policy: ops::VmPolicy) -> Self {
        Vms { db, policy, quotas: Default::default() }
    }

    /// The accounts' quota locks, under which VMs are charged.
    pub fn quotas(&self) -> &std::sync::Arc<crate::owners::Quotas> {
        &self.quotas
    }

    /// The kind's default queues.
    pub fn kind_config() -> KindConfig {
        KindConfig::default()
            .serial_queue("lifecycle", 1_000)
            .idle_timeout(Some(Duration::from_secs(300)))
    }
}

impl Entity for Vms {
    const KIND: &'static str = "vm";
    type State = VmActor;

    fn load(&self, id: Uuid) -> Result<Option<VmActor>, BoxError> {
        Ok(self
            .db
            .get::<VmRecord>(id)?
            .map(|s| VmActor { record: s.record, generation: s.generation }))
    }
}

/// Published when a VM's state changes (`vmUuid`, `state` fields).
#[derive(Clone, Debug)]
pub struct VmStateChanged {
    /// The VM.
    pub vm: Uuid,
    /// Its previous state.
    pub from: VmState,
    /// Its new state.
    pub to: VmState,
}

impl Event for VmStateChanged {
    fn topic(&self) -> &'static str {
        "vm.state-changed"
    }

    fn field(&self, name: &str) -> Option<String> {
        match name {
            "vmUuid" => Some(self.vm.to_string()),
            "state" => Some(format!("{:?}", self.to)),
            _ => None,
        }
    }
}

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The runtime did not run it.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] strato_storage::StoreError),
    /// The VM's state does not allow the operation.
    #[error(transparent)]
    InvalidState(#[from] state::InvalidState),
    /// The VM has no host to run on.
    #[error("VM {0} has no host")]
    NoHost(Uuid),
    /// The host or its agent failed the operation.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// No host can take the VM.
    #[error(transparent)]
    Alloc(#[from] crate::allocator::AllocError),
    /// An L3 network failed (giving back an address).
    #[error(transparent)]
    L3(#[from] crate::l3::L3Error),
    /// The VM's owner's quota does not take the change.
    #[error(transparent)]
    Quota(#[from] crate::owners::QuotaError),
    /// Detaching the VM's EIPs or port forwarding rules failed.
    #[error(transparent)]
    Vip(#[from] crate::vip::VipError),
    /// One of the VM's volumes failed (settling a snapshot before its start).
    #[error(transparent)]
    Volume(Box<crate::volume::VolumeError>),
    /// The VM's data volumes are on its host's local storage: it cannot leave the host.
    #[error(
        "VM {vm} has data volumes {volumes:?} on its host's local storage: detach them before migrating it"
    )]
    HasDataVolumes {
        /// The VM.
        vm: Uuid,
        /// Its data volumes.
        volumes: Vec<Uuid>,
    },
}

/// Applies what host `host` observed of VM `vm`'s domain. Reports from a host the VM is not
/// on are ignored; failures are logged (the next report or reconnect repeats the news).
pub async fn observe(vms: &Kind<Vms>, vm: Uuid, host: Uuid, observation: Observation) {
    let result = vms
        .call(
            vm,
            Op::within("lifecycle", "observe", Duration::from_secs(30)),
            move |ctx| async move {
                // A listing is a snapshot, perhaps older than the VM's last operation (a
                // reconnect lists the domains, then an operation ends, then the listing is
                // applied): a change it suggests is checked against the present first. A
                // host that cannot be reached has no present to ask.
                if observation == Observation::HostUnreachable {
                    return apply(&ctx, host, observation).await;
                }
                let (record, _) = begin(&ctx).await?;
                if record.host_uuid != Some(host) || observed(record.state, observation).is_none() {
                    return Ok(());
                }
                let present = present(&ctx, host).await?;
                apply(&ctx, host, present).await
            },
        )
        .await;
    if let Err(error) = result {
        tracing::warn!(vm = %vm, %error, "could not apply an observation");
    }
}

/// What host `host` says VM `vm`'s domain is doing now.
async fn present(ctx: &strato_runtime::OpCtx<Vms>, host: Uuid) -> Result<Observation, VmError> {
    let Some(hosts) = ctx.runtime().kind::<crate::host::Hosts>() else {
        return Err(VmError::Runtime(strato_runtime::RuntimeError::UnknownKind {
            kind: "host".into(),
        }));
    };
    let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
    let reply =
        crate::host::command(&hosts, host, strato_proto::Command::ListDomains, deadline, None)
            .await?;
    let strato_proto::Reply::Domains(domains) = reply else {
        return Err(VmError::Host(crate::host::HostError::Link(
            strato_proto::LinkError::Refused {
                reason: "ListDomains answered no domain list".into(),
            },
        )));
    };
    Ok(observation_of(domains.iter().find(|d| d.uuid == ctx.id()).map(|d| d.state)))
}

/// Asks host `host` what VM `vm`'s domain is doing now and applies that. Used for agent
/// events: an event is news that something changed, but it may be older than the VM's last
/// operation (it raced the operation's reply), so the VM looks at the present instead of
/// trusting the event's state.
pub async fn observe_now(vms: &Kind<Vms>, vm: Uuid, host: Uuid) {
    let result = vms
        .call(
            vm,
            Op::within("lifecycle", "observe", Duration::from_secs(30)),
            move |ctx| async move {
                let present = present(&ctx, host).await?;
                apply(&ctx, host, present).await
            },
        )
        .await;
    if let Err(error) = result {
        tracing::warn!(vm = %vm, %error, "could not check the VM's domain after an event");
    }
}

/// What a domain's state (or its absence) says about its VM.
pub fn observation_of(state: Option<strato_proto::DomainState>) -> Observation {
    match state {
        Some(strato_proto::DomainState::Running | strato_proto::DomainState::ShuttingDown) => {
            Observation::Running
        }
        Some(strato_proto::DomainState::Paused) => Observation::Paused,
        _ => Observation::Off,
    }
}

/// The VM's record as the store holds it now, refreshed into the actor's state.
///
/// The creation flow's steps write the record outside the actor (the VM has no operations
/// yet), so an actor activated early, by a hypervisor report during its own creation, holds
/// a copy older than those writes. Every operation therefore starts from the store: one point
/// read, inside the level-1 queue, so nothing the operation does is based on a stale state.
fn current(ctx: &strato_runtime::OpCtx<Vms>) -> Result<(VmRecord, u64), VmError> {
    let stored = ctx
        .entity()
        .db
        .get::<VmRecord>(ctx.id())?
        .ok_or(RuntimeError::NotFound { actor: ctx.actor() })?;
    ctx.with_state(|s| {
        s.record = stored.record.clone();
        s.generation = stored.generation;
    });
    Ok((stored.record, stored.generation))
}

/// The record at the start of an operation (or observation) in the lifecycle queue, with a
/// state left over by an interrupted operation repaired first.
///
/// The queue runs one operation at a time and the creation flow never writes a transitional
/// state, so a transitional state seen here was left by an operation that did not finish: the
/// MN was killed in its middle, or its store write failed. The truth is then unknown: the VM
/// becomes Unknown (from which the next observation of its host, or a stop or destroy,
/// recovers it), and an interrupted expunge goes back to Destroyed, to be expunged again.
/// Gives back every booking of `record`'s VM on a host other than its own (a migration's
/// target, after the migration failed or was interrupted).
async fn release_bookings_elsewhere(
    ctx: &strato_runtime::OpCtx<Vms>,
    record: &VmRecord,
) -> Result<(), VmError> {
    if let Some(hosts) = ctx.runtime().kind::<crate::host::Hosts>() {
        for stored in ctx.entity().db.scan::<crate::records::HostRecord>() {
            let host = stored?.record;
            if Some(host.uuid) != record.host_uuid && host.reservations.contains_key(&record.uuid) {
                crate::host::release(&hosts, host.uuid, record.uuid).await?;
            }
        }
    }
    Ok(())
}

pub(crate) async fn begin(ctx: &strato_runtime::OpCtx<Vms>) -> Result<(VmRecord, u64), VmError> {
    let (record, generation) = current(ctx)?;
    if !record.state.is_transitional() {
        return Ok((record, generation));
    }
    let to = if record.state == VmState::Expunging { VmState::Destroyed } else { VmState::Unknown };
    tracing::warn!(vm = %record.uuid, from = ?record.state, ?to, "an interrupted operation left the VM in a transitional state");
    // An interrupted migration may have booked its target: only the VM's host keeps one.
    release_bookings_elsewhere(ctx, &record).await?;
    let repaired = ops::save(ctx, |r| r.state = to).await?;
    Ok((repaired, ctx.with_state(|s| s.generation)))
}

async fn apply(
    ctx: &strato_runtime::OpCtx<Vms>,
    host: Uuid,
    observation: Observation,
) -> Result<(), VmError> {
    let vm = ctx.id();
    let (record, generation) = begin(ctx).await?;
    if record.host_uuid != Some(host) {
        return Ok(());
    }
    let Some(to) = observed(record.state, observation) else { return Ok(()) };
    let mut updated = record.clone();
    updated.state = to;
    let mut batch = Batch::new();
    batch.put(&updated, Expect::Generation(generation))?;
    let written = ctx.entity().db.commit(batch).await?;
    ctx.with_state(|s| {
        s.record = updated;
        s.generation = written[0].generation.unwrap_or(generation);
    });
    tracing::info!(vm = %vm, from = ?record.state, to = ?to, ?observation, "VM state reconciled");
    ctx.runtime().events().publish(VmStateChanged { vm, from: record.state, to });
    Ok(())
}

/// The VM's record, read through its actor's queue.
pub async fn record(vms: &Kind<Vms>, id: Uuid) -> Result<VmRecord, VmError> {
    vms.call(id, Op::within("lifecycle", "read", Duration::from_secs(10)), |ctx| async move {
        Ok(current(&ctx)?.0)
    })
    .await
}
