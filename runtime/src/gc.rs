//! The garbage collector: persisted clean-up jobs that retry until they succeed (ZStack's
//! `GarbageCollector`, with both its time- and event-based triggers).
//!
//! Something that could not be cleaned up now (a volume on a disconnected host, a domain an
//! agent did not answer for) becomes a job: a unique name, a kind naming the handler, a serde
//! context and a [`Trigger`]. Submitting a job with a name that exists merges the two: the
//! job keeps its history (attempts, last error), takes the newer context and trigger, and
//! runs at the earlier of the two times. Jobs are records in the store, so they survive
//! restarts; every job that has run before runs once after [`Gc::start`], then on its
//! trigger; a deferred job ([`Gc::submit_after`]) that never ran keeps its time.
//!
//! Each job is an actor of kind `gc-job` (its UUID derives from its name), so a job runs
//! under supervision like any resource: one run at a time, a panic in a handler is caught and
//! counts against the restart budget, and the console sees it. A failed run is retried with
//! exponential backoff capped by [`GcPolicy::max_backoff`]; a run that succeeds deletes the
//! job. The scheduler is one task on a runtime arbiter; it wakes on the earliest due job and on
//! matching events, and falls back on the timer if it ever drops events.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use strato_storage::{Batch, Db, Expect, Record, StoreError, codec};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::config::KindConfig;
use crate::entity::{Entity, Op};
use crate::error::{BoxError, RuntimeError, error_chain};
use crate::event::EventMatcher;
use crate::inspect::unix_ms_now;
use crate::kind::Kind;
use crate::runtime::Runtime;

/// The namespace of job UUIDs (v5 of the job's name).
const JOB_NAMESPACE: Uuid = Uuid::from_u128(0x5c1f_0a7e_9d2b_4c8e_a1f3_6b7d_2e90_c4a1);

/// When a job runs (besides once after startup, and on failure per the backoff).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// Run at this interval until the job succeeds.
    #[serde(with = "crate::config::opt_duration_ms")]
    pub every: Option<Duration>,
    /// Run whenever an event matching this is published.
    pub on_event: Option<EventMatcher>,
}

impl Trigger {
    /// Every `interval`.
    pub fn every(interval: Duration) -> Self {
        Trigger { every: Some(interval), on_event: None }
    }

    /// On every event matching `matcher`.
    pub fn on_event(matcher: EventMatcher) -> Self {
        Trigger { every: None, on_event: Some(matcher) }
    }

    /// Also on every event matching `matcher`.
    pub fn and_on_event(mut self, matcher: EventMatcher) -> Self {
        self.on_event = Some(matcher);
        self
    }
}

/// How the collector retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcPolicy {
    /// The first retry delay after a failure; it doubles with each failed attempt.
    #[serde(with = "crate::config::duration_ms")]
    pub base_backoff: Duration,
    /// The longest delay between attempts.
    #[serde(with = "crate::config::duration_ms")]
    pub max_backoff: Duration,
    /// How long one run may take before it counts as failed.
    #[serde(with = "crate::config::duration_ms")]
    pub run_timeout: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            run_timeout: Duration::from_secs(120),
        }
    }
}

impl GcPolicy {
    /// The delay before the next run after `attempts` failed attempts.
    pub fn backoff(&self, attempts: u32, every: Option<Duration>) -> Duration {
        let exponential =
            self.base_backoff.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let delay = exponential.min(self.max_backoff);
        // An interval trigger is a promise to try at least that often.
        every.map_or(delay, |every| delay.min(every))
    }
}

/// A persisted job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcJobRecord {
    /// Derived from the name.
    pub id: Uuid,
    /// The unique name.
    pub name: String,
    /// The handler's kind.
    pub kind: String,
    /// The encoded context.
    pub context: Vec<u8>,
    /// When it runs.
    pub trigger: Trigger,
    /// Failed attempts so far.
    pub attempts: u32,
    /// How many submissions were merged into this job.
    pub merged: u32,
    /// When it runs next on its timer (ms since the Unix epoch).
    pub next_run_unix_ms: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was first submitted.
    pub created_unix_ms: u64,
    /// When it last ran.
    pub last_run_unix_ms: Option<u64>,
}

impl Record for GcJobRecord {
    const KIND: &'static str = "gc-job";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.id
    }
}

/// A job as listings show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GcJobView {
    /// The job's UUID.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its handler kind.
    pub kind: String,
    /// Its trigger.
    pub trigger: Trigger,
    /// Failed attempts.
    pub attempts: u32,
    /// Submissions merged into it.
    pub merged: u32,
    /// Its next timed run.
    pub next_run_unix_ms: u64,
    /// Its last error.
    pub last_error: Option<String>,
    /// When it was created.
    pub created_unix_ms: u64,
    /// When it last ran.
    pub last_run_unix_ms: Option<u64>,
}

impl From<&GcJobRecord> for GcJobView {
    fn from(job: &GcJobRecord) -> Self {
        GcJobView {
            id: job.id,
            name: job.name.clone(),
            kind: job.kind.clone(),
            trigger: job.trigger.clone(),
            attempts: job.attempts,
            merged: job.merged,
            next_run_unix_ms: job.next_run_unix_ms,
            last_error: job.last_error.clone(),
            created_unix_ms: job.created_unix_ms,
            last_run_unix_ms: job.last_run_unix_ms,
        }
    }
}

/// What one run of a job did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum GcRunResult {
    /// The handler succeeded; the job is gone.
    Done,
    /// The handler failed; the job runs again at `next_run_unix_ms`.
    Retry {
        /// The error.
        error: String,
        /// The next timed run.
        next_run_unix_ms: u64,
    },
    /// The job no longer exists (it finished or was cancelled meanwhile).
    Gone,
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type Handler = Arc<dyn Fn(&[u8]) -> Result<HandlerFuture, BoxError> + Send + Sync>;

enum SchedulerMsg {
    Upsert {
        id: Uuid,
        next_run_unix_ms: u64,
        on_event: Option<EventMatcher>,
    },
    /// A run ended; `epoch` is the entry's epoch when the scheduler launched it (`None` for a
    /// run started by hand).
    Finished {
        id: Uuid,
        epoch: Option<u64>,
        result: Result<GcRunResult, RuntimeError>,
    },
    Remove(Uuid),
    Stop,
}

/// The collector's state shared by its handle, its job actors and its scheduler.
pub(crate) struct GcShared {
    db: Db,
    policy: GcPolicy,
    handlers: RwLock<HashMap<String, Handler>>,
    scheduler: Mutex<Option<mpsc::UnboundedSender<SchedulerMsg>>>,
}

impl GcShared {
    pub(crate) fn new(db: Db, policy: GcPolicy) -> Arc<Self> {
        Arc::new(GcShared {
            db,
            policy,
            handlers: RwLock::new(HashMap::new()),
            scheduler: Mutex::new(None),
        })
    }

    /// Forgets every handler (at shutdown).
    pub(crate) fn clear_handlers(&self) {
        self.handlers.write().expect("handlers lock").clear();
    }

    fn notify(&self, msg: SchedulerMsg) {
        if let Some(tx) = self.scheduler.lock().expect("scheduler lock").as_ref() {
            let _ = tx.send(msg);
        }
    }
}

/// The actor kind of GC jobs. Its state is only a marker that the job exists: every run
/// reads the job afresh, because submissions merge into it directly in the store.
pub(crate) struct GcJobs {
    shared: Arc<GcShared>,
}

impl Entity for GcJobs {
    const KIND: &'static str = "gc-job";
    type State = ();

    fn load(&self, id: Uuid) -> Result<Option<()>, BoxError> {
        Ok(self.shared.db.get::<GcJobRecord>(id)?.map(|_| ()))
    }
}

pub(crate) fn register(runtime: &Runtime, shared: Arc<GcShared>) {
    runtime.register(
        GcJobs { shared },
        KindConfig::default().queue("run", 1, 64).idle_timeout(Some(Duration::from_secs(30))),
    );
}

/// The garbage collector's handle ([`Runtime::gc`]).
#[derive(Clone, Debug)]
pub struct Gc {
    runtime: Runtime,
}

impl Gc {
    pub(crate) fn new(runtime: Runtime) -> Self {
        Gc { runtime }
    }

    fn shared(&self) -> Arc<GcShared> {
        self.runtime.gc_shared()
    }

    fn kind(&self) -> Result<Kind<GcJobs>, RuntimeError> {
        self.runtime.kind::<GcJobs>().ok_or(RuntimeError::Shutdown)
    }

    /// The UUID of the job named `name`.
    pub fn job_id(name: &str) -> Uuid {
        Uuid::new_v5(&JOB_NAMESPACE, name.as_bytes())
    }

    /// Registers the handler of job kind `kind`: called with the job's context, it must
    /// succeed when there is nothing left to clean up.
    pub fn register_handler<C, F, Fut>(&self, kind: &str, handler: F)
    where
        C: DeserializeOwned + Send + 'static,
        F: Fn(C) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |bytes: &[u8]| {
            let context: C = codec::decode_payload(GcJobRecord::KIND, bytes)?;
            Ok(Box::pin(handler(context)) as HandlerFuture)
        });
        self.shared().handlers.write().expect("handlers lock").insert(kind.to_owned(), handler);
    }

    /// Submits (or merges into) the job `name`. It runs at once if the collector is started.
    pub async fn submit<C: Serialize>(
        &self,
        name: &str,
        kind: &str,
        context: &C,
        trigger: Trigger,
    ) -> Result<Uuid, RuntimeError> {
        self.submit_after(name, kind, context, trigger, Duration::ZERO).await
    }

    /// Submits (or merges into) the job `name`, to run first after `delay` (a deferred
    /// clean-up, such as expunging a destroyed VM after its grace period). A restart keeps a
    /// job that has never run waiting until its time.
    pub async fn submit_after<C: Serialize>(
        &self,
        name: &str,
        kind: &str,
        context: &C,
        trigger: Trigger,
        delay: Duration,
    ) -> Result<Uuid, RuntimeError> {
        let shared = self.shared();
        let id = Gc::job_id(name);
        let encoded = codec::encode_payload(GcJobRecord::KIND, context)
            .map_err(|source| StoreError::Codec { table: GcJobRecord::KIND, id, source })?;
        let now = unix_ms_now() + delay.as_millis() as u64;
        loop {
            let existing = shared.db.get::<GcJobRecord>(id)?;
            let (job, expect) = match existing {
                Some(stored) => {
                    let mut job = stored.record;
                    job.kind = kind.to_owned();
                    job.context = encoded.clone();
                    job.trigger = trigger.clone();
                    job.merged += 1;
                    job.next_run_unix_ms = job.next_run_unix_ms.min(now);
                    (job, Expect::Generation(stored.generation))
                }
                None => (
                    GcJobRecord {
                        id,
                        name: name.to_owned(),
                        kind: kind.to_owned(),
                        context: encoded.clone(),
                        trigger: trigger.clone(),
                        attempts: 0,
                        merged: 0,
                        next_run_unix_ms: now,
                        last_error: None,
                        created_unix_ms: now,
                        last_run_unix_ms: None,
                    },
                    Expect::Absent,
                ),
            };
            let mut batch = Batch::new();
            batch.put(&job, expect)?;
            match shared.db.commit(batch).await {
                Ok(_) => {
                    tracing::info!(job = %name, kind, merged = job.merged, "gc job submitted");
                    shared.notify(SchedulerMsg::Upsert {
                        id,
                        next_run_unix_ms: job.next_run_unix_ms,
                        on_event: job.trigger.on_event.clone(),
                    });
                    return Ok(id);
                }
                // A run or another submission changed it meanwhile: merge again.
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Every job, as listings show it.
    pub fn list(&self) -> Result<Vec<GcJobView>, RuntimeError> {
        let mut jobs = Vec::new();
        for stored in self.runtime.db().scan::<GcJobRecord>() {
            jobs.push(GcJobView::from(&stored?.record));
        }
        Ok(jobs)
    }

    /// Runs job `id` now, whatever its schedule, and returns what the run did.
    pub async fn run_now(&self, id: Uuid) -> Result<GcRunResult, RuntimeError> {
        let result = run_job(&self.kind()?, id).await;
        self.shared().notify(SchedulerMsg::Finished { id, epoch: None, result: result.clone() });
        result
    }

    /// Removes job `id` without running it. Returns whether it existed.
    pub async fn cancel(&self, id: Uuid) -> Result<bool, RuntimeError> {
        let db = self.runtime.db();
        let existed = db.get::<GcJobRecord>(id)?.is_some();
        let mut batch = Batch::new();
        batch.delete::<GcJobRecord>(id, Expect::Any);
        db.commit(batch).await?;
        self.shared().notify(SchedulerMsg::Remove(id));
        tracing::info!(job = %id, existed, "gc job cancelled");
        Ok(existed)
    }

    /// Starts the scheduler: every persisted job runs once now, then on its trigger. Register
    /// the handlers first. Calling it again does nothing.
    pub fn start(&self) -> Result<(), RuntimeError> {
        let shared = self.shared();
        let kind = self.kind()?;
        let mut slot = shared.scheduler.lock().expect("scheduler lock");
        if slot.is_some() {
            return Ok(());
        }
        let now = unix_ms_now();
        let mut table = HashMap::new();
        for stored in shared.db.scan::<GcJobRecord>() {
            let job = stored?.record;
            // Every job that has run before runs once now; one that never ran keeps its time
            // (a deferred job must not run early because the node restarted).
            let at = if job.attempts == 0 { job.next_run_unix_ms.max(now) } else { now };
            table.insert(job.id, Entry::new(at, job.trigger.on_event));
        }
        tracing::info!(jobs = table.len(), "gc scheduler starting");
        let (tx, rx) = mpsc::unbounded_channel();
        *slot = Some(tx.clone());
        let events = self.runtime.events().subscribe_all("gc-scheduler", 4096);
        self.runtime.service_arbiter().spawn(schedule(kind, table, tx, rx, events));
        Ok(())
    }

    /// Stops the scheduler (jobs stay in the store).
    pub(crate) fn stop(&self) {
        let shared = self.shared();
        if let Some(tx) = shared.scheduler.lock().expect("scheduler lock").take() {
            let _ = tx.send(SchedulerMsg::Stop);
        }
    }
}

/// Runs one job on its actor.
async fn run_job(kind: &Kind<GcJobs>, id: Uuid) -> Result<GcRunResult, RuntimeError> {
    let timeout = kind.entity().shared.policy.run_timeout;
    let result = kind
        .call(id, Op::within("run", "gc.run", timeout), move |ctx| async move {
            let shared = ctx.entity().shared.clone();
            let Some(stored) = shared.db.get::<GcJobRecord>(id)? else {
                ctx.passivate_when_idle();
                return Ok(GcRunResult::Gone);
            };
            let job = stored.record;
            let handler = shared.handlers.read().expect("handlers lock").get(&job.kind).cloned();
            let outcome: Result<(), String> = match handler {
                None => Err(format!("no handler is registered for job kind `{}`", job.kind)),
                Some(handler) => match handler(&job.context) {
                    Err(error) => Err(error_chain(&*error)),
                    Ok(run) => match tokio::time::timeout(shared.policy.run_timeout, run).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(error)) => Err(error_chain(&*error)),
                        Err(_) => {
                            Err(format!("the run took longer than {:?}", shared.policy.run_timeout))
                        }
                    },
                },
            };
            finish_run(&shared, id, stored.generation, outcome, &ctx).await
        })
        .await;
    match result {
        Err(RuntimeError::NotFound { .. }) => Ok(GcRunResult::Gone),
        other => other,
    }
}

/// Records the outcome of a run: deletes the job, or counts the failure and schedules the
/// retry. A submission merged during the run wins the race: the job then runs again soon.
async fn finish_run(
    shared: &GcShared,
    id: Uuid,
    generation: u64,
    outcome: Result<(), String>,
    ctx: &crate::entity::OpCtx<GcJobs>,
) -> Result<GcRunResult, RuntimeError> {
    let now = unix_ms_now();
    let mut batch = Batch::new();
    let result = match outcome {
        Ok(()) => {
            batch.delete::<GcJobRecord>(id, Expect::Generation(generation));
            GcRunResult::Done
        }
        Err(error) => {
            let Some(stored) = shared.db.get::<GcJobRecord>(id)? else {
                return Ok(GcRunResult::Gone);
            };
            if stored.generation != generation {
                // A submission merged into the job while it ran: its new context has not run
                // yet, so this failure is not charged to it; run it again now.
                return Ok(GcRunResult::Retry {
                    error: format!("{error} (merged with a new submission during the run)"),
                    next_run_unix_ms: now,
                });
            }
            let mut job = stored.record;
            job.attempts += 1;
            job.last_error = Some(error.clone());
            job.last_run_unix_ms = Some(now);
            let delay = shared.policy.backoff(job.attempts, job.trigger.every);
            job.next_run_unix_ms = now + delay.as_millis() as u64;
            batch.put(&job, Expect::Generation(generation))?;
            tracing::warn!(job = %job.name, attempts = job.attempts, retry_in = ?delay, %error, "gc job failed");
            GcRunResult::Retry { error, next_run_unix_ms: job.next_run_unix_ms }
        }
    };
    match shared.db.commit(batch).await {
        Ok(_) => {
            if result == GcRunResult::Done {
                tracing::info!(job = %id, "gc job done");
                ctx.passivate_when_idle();
            }
            Ok(result)
        }
        Err(StoreError::Conflict { .. }) => Ok(GcRunResult::Retry {
            error: "merged with a new submission during the run".into(),
            next_run_unix_ms: now,
        }),
        Err(error) => Err(error.into()),
    }
}

struct Entry {
    next_run_unix_ms: u64,
    on_event: Option<EventMatcher>,
    running: bool,
    /// Bumped by every submission, so a run that ends can tell whether the job changed
    /// while it ran (and must run again rather than be dropped or pushed back).
    epoch: u64,
    /// A matching event arrived while it ran: run again as soon as it ends.
    rerun: bool,
    /// Runs in a row that the runtime refused (a panic, a failed actor): backs off.
    refused: u32,
}

impl Entry {
    fn new(next_run_unix_ms: u64, on_event: Option<EventMatcher>) -> Self {
        Entry { next_run_unix_ms, on_event, running: false, epoch: 0, rerun: false, refused: 0 }
    }
}

async fn schedule(
    kind: Kind<GcJobs>,
    mut table: HashMap<Uuid, Entry>,
    tx: mpsc::UnboundedSender<SchedulerMsg>,
    mut rx: mpsc::UnboundedReceiver<SchedulerMsg>,
    mut events: crate::event::Subscription<Arc<dyn crate::event::DynEvent>>,
) {
    let policy = kind.entity().shared.policy;
    let launch = |table: &mut HashMap<Uuid, Entry>, id: Uuid| {
        let Some(entry) = table.get_mut(&id) else { return };
        if entry.running {
            entry.rerun = true;
            return;
        }
        entry.running = true;
        entry.rerun = false;
        let epoch = entry.epoch;
        let (kind, tx) = (kind.clone(), tx.clone());
        actix_rt::spawn(async move {
            let result = run_job(&kind, id).await;
            let _ = tx.send(SchedulerMsg::Finished { id, epoch: Some(epoch), result });
        });
    };
    loop {
        let now = unix_ms_now();
        let due: Vec<Uuid> = table
            .iter()
            .filter(|(_, e)| !e.running && e.next_run_unix_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            launch(&mut table, id);
        }
        let wait = table
            .values()
            .filter(|e| !e.running)
            .map(|e| e.next_run_unix_ms.saturating_sub(now))
            .min()
            .unwrap_or(60_000);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            msg = rx.recv() => match msg {
                None | Some(SchedulerMsg::Stop) => return,
                Some(SchedulerMsg::Upsert { id, next_run_unix_ms, on_event }) => {
                    let entry =
                        table.entry(id).or_insert_with(|| Entry::new(next_run_unix_ms, None));
                    entry.next_run_unix_ms = entry.next_run_unix_ms.min(next_run_unix_ms);
                    entry.on_event = on_event;
                    entry.epoch += 1;
                }
                Some(SchedulerMsg::Remove(id)) => {
                    table.remove(&id);
                }
                Some(SchedulerMsg::Finished { id, epoch, result }) => {
                    let Some(entry) = table.get_mut(&id) else { continue };
                    if epoch.is_some() {
                        entry.running = false;
                    }
                    let changed = epoch.is_some_and(|e| e != entry.epoch) || entry.rerun;
                    match result {
                        _ if changed => {
                            // Resubmitted or triggered during the run: run it again now.
                            entry.rerun = false;
                            entry.next_run_unix_ms = unix_ms_now();
                        }
                        Ok(GcRunResult::Done | GcRunResult::Gone) => {
                            table.remove(&id);
                        }
                        Ok(GcRunResult::Retry { next_run_unix_ms, .. }) => {
                            entry.refused = 0;
                            entry.next_run_unix_ms = next_run_unix_ms;
                        }
                        Err(error) => {
                            // The runtime refused or the handler panicked: back off as for a
                            // failure, and give a failed job actor a fresh start next time.
                            entry.refused += 1;
                            let delay = policy.backoff(entry.refused, None);
                            tracing::warn!(job = %id, %error, retry_in = ?delay, "gc job could not run");
                            entry.next_run_unix_ms = unix_ms_now() + delay.as_millis() as u64;
                            if matches!(error, RuntimeError::Failed { .. }) {
                                let kind = kind.clone();
                                actix_rt::spawn(async move {
                                    let _ = kind.restart(id).await;
                                });
                            }
                        }
                    }
                }
            },
            event = events.recv() => {
                let Some(event) = event else { return };
                let matching: Vec<Uuid> = table
                    .iter()
                    .filter(|(_, e)| e.on_event.as_ref().is_some_and(|m| m.matches(&*event)))
                    .map(|(id, _)| *id)
                    .collect();
                for id in matching {
                    tracing::debug!(job = %id, topic = event.topic(), "gc job triggered by event");
                    launch(&mut table, id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = GcPolicy {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            run_timeout: Duration::from_secs(1),
        };
        let delays: Vec<u64> =
            (1..=6).map(|a| policy.backoff(a, None).as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff(3, Some(Duration::from_millis(250))), Duration::from_millis(250));
        assert_eq!(policy.backoff(u32::MAX, None), Duration::from_secs(1));
    }

    #[test]
    fn job_ids_follow_names() {
        assert_eq!(Gc::job_id("a"), Gc::job_id("a"));
        assert_ne!(Gc::job_id("a"), Gc::job_id("b"));
    }
}
