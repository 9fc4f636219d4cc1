//! The flow engine: chains of named steps with rollback, persisted so a crash never leaves a
//! half-done operation behind (ZStack's `FlowChain`, made durable).
//!
//! A chain is declared once ([`FlowEngine::define`]) as an ordered list of named
//! [`Step`]s sharing a serde context `C`. Other modules can add steps before or after a named
//! step ([`FlowEngine::insert_before`], [`FlowEngine::insert_after`]), as ZStack's extension
//! points do. Running a chain ([`FlowEngine::run`]) writes a [`FlowRecord`] before every step
//! (which also records the end of the step before) and after every rollback step, holding
//! the step list, the context and the phase:
//!
//! - `Running { next, in_step }`: steps `0..next` are done; `in_step` says step `next` has
//!   started and may have done part of its work.
//! - `RollingBack { next }`: steps `next, next-1, ..., 0` still have to be rolled back.
//!
//! When a step fails, the engine rolls back that step *and* every completed step, in reverse
//! order. The failing step is included because it may have done part of its work before it
//! failed (and after a crash, nobody knows how far a step in progress got); so a rollback
//! must tolerate finding nothing to undo, and both `run` and `rollback` must be safe to repeat.
//! A rollback that fails is recorded and the rest still roll back; the chain then reports the
//! original error with the rollback failures attached.
//!
//! At startup, [`FlowEngine::recover`] finds every unfinished record: a chain declared
//! resumable continues from where it stopped (re-running the step in progress); any other
//! chain rolls back. Records of chains this build does not define are left untouched and
//! reported. Finished flows are removed from the store; the last few are kept in memory for
//! inspection.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use strato_storage::{Batch, Db, Expect, Record, StoreError, codec};
use uuid::Uuid;

use crate::error::{BoxError, RuntimeError, StepError, error_chain};
use crate::inspect::unix_ms_now;

/// How many times a failing rollback step is tried before the flow gives up on it.
const ROLLBACK_ATTEMPTS: u32 = 6;

/// The first retry's delay; it doubles each time (about 6 s in all).
const ROLLBACK_RETRY_BASE: std::time::Duration = std::time::Duration::from_millis(50);

/// How many finished flows the engine remembers for inspection.
const RECENT: usize = 64;

/// One step of a chain.
#[async_trait]
pub trait Step<C>: Send + Sync + 'static {
    /// Does the step's work. May be called again for the same flow after a crash.
    async fn run(&self, ctx: &mut C, flow: &FlowInfo) -> Result<(), BoxError>;

    /// Undoes the step's work, including partial work of a failed `run`. Must succeed when
    /// there is nothing to undo, and be safe to repeat.
    async fn rollback(&self, ctx: &mut C, flow: &FlowInfo) -> Result<(), BoxError>;
}

/// What a flow runs for: the job that asked for it, and when that job must be done by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowJob {
    /// The job.
    pub id: Option<Uuid>,
    /// When it must be done by; the steps and the commands they send inherit it.
    pub deadline: Option<SystemTime>,
}

impl From<Option<Uuid>> for FlowJob {
    fn from(id: Option<Uuid>) -> Self {
        FlowJob { id, deadline: None }
    }
}

/// How long a rollback has at least, whatever the job's deadline: undoing must not fail
/// because doing took the time.
const ROLLBACK_TIME: Duration = Duration::from_secs(120);

/// What a step knows about the flow it runs in.
#[derive(Clone, Debug)]
pub struct FlowInfo {
    /// The flow's id.
    pub id: Uuid,
    /// The chain's name.
    pub chain: String,
    /// The step's name.
    pub step: String,
    /// The job the flow serves, if any.
    pub job_id: Option<Uuid>,
    /// When the step must be done by: the job's deadline for a step, and for a rollback that
    /// or `ROLLBACK_TIME` from its start, whichever is later. `None` when the flow has no
    /// deadline (a flow recovered after a crash, whose job has ended).
    pub deadline: Option<SystemTime>,
    /// Writes that end the step: see [`FlowInfo::write_at_end`].
    at_end: Arc<Mutex<Batch>>,
}

/// The end writes staged so far, leaving none.
fn take_writes(at_end: &Mutex<Batch>) -> Batch {
    std::mem::take(&mut *at_end.lock().expect("flow writes lock"))
}

impl FlowInfo {
    /// The step's deadline, or `default` from now when the flow has none.
    pub fn deadline_or(&self, default: Duration) -> SystemTime {
        self.deadline.unwrap_or_else(|| SystemTime::now() + default)
    }

    /// Adds `batch` to the writes committed when the step ends, in one atomic batch with the
    /// flow's checkpoint that records the end (the next step's start, or the flow record's
    /// removal after the last step). A step that keeps its own records this way costs one
    /// durable write less, and its records and its recorded end cannot disagree after a
    /// crash. If that batch fails (a compare-and-swap conflict, a store error) the step
    /// counts as failed and is rolled back. The writes are not visible until the step has
    /// returned; a rollback's are committed when it returns, and their failure fails it.
    pub fn write_at_end(&self, batch: Batch) {
        self.at_end.lock().expect("flow writes lock").append(batch);
    }
}

/// Where a flow stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowPhase {
    /// Steps before `next` are done; `in_step` means step `next` has started.
    Running {
        /// The next step to run (or the one running).
        next: usize,
        /// Whether step `next` has started.
        in_step: bool,
    },
    /// Steps `next` down to 0 still have to be rolled back.
    RollingBack {
        /// The next step to roll back.
        next: usize,
    },
    /// Every step ran.
    Done,
    /// Every step that ran was rolled back (some rollbacks may have failed).
    RolledBack,
}

/// The persisted state of one flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// The flow's id.
    pub id: Uuid,
    /// The chain's name.
    pub chain: String,
    /// The job the flow serves.
    pub job_id: Option<Uuid>,
    /// The step names, in order, as they were when the flow started.
    pub steps: Vec<String>,
    /// The encoded context.
    pub context: Vec<u8>,
    /// Where the flow stands.
    pub phase: FlowPhase,
    /// The step that failed and its error, once one has.
    pub failure: Option<(String, String)>,
    /// Rollbacks that failed, as `step: error`.
    pub rollback_failures: Vec<String>,
    /// When the flow started (ms since the Unix epoch).
    pub started_unix_ms: u64,
    /// When the record last changed.
    pub updated_unix_ms: u64,
    /// Whether this flow was picked up by a recovery pass.
    pub recovered: bool,
}

impl Record for FlowRecord {
    const KIND: &'static str = "flow";
    const VERSION: u16 = 1;
    const IDS_NEVER_REUSED: bool = true;

    fn id(&self) -> Uuid {
        self.id
    }
}

/// A flow as inspection shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FlowView {
    /// The flow's id.
    pub id: Uuid,
    /// The chain's name.
    pub chain: String,
    /// The job it serves.
    pub job_id: Option<Uuid>,
    /// `running`, `rolling-back`, `done` or `rolled-back`.
    pub phase: &'static str,
    /// The step running or being rolled back (`None` once finished).
    pub current_step: Option<String>,
    /// The step that failed and its error.
    pub failure: Option<(String, String)>,
    /// Rollbacks that failed.
    pub rollback_failures: Vec<String>,
    /// When it started.
    pub started_unix_ms: u64,
    /// Milliseconds since it started (for finished flows: how long it took).
    pub age_ms: u64,
    /// Whether it was picked up by a recovery pass.
    pub recovered: bool,
}

impl FlowRecord {
    fn view(&self) -> FlowView {
        let (phase, current) = match &self.phase {
            FlowPhase::Running { next, .. } => ("running", self.steps.get(*next).cloned()),
            FlowPhase::RollingBack { next } => ("rolling-back", self.steps.get(*next).cloned()),
            FlowPhase::Done => ("done", None),
            FlowPhase::RolledBack => ("rolled-back", None),
        };
        let end = if current.is_some() { unix_ms_now() } else { self.updated_unix_ms };
        FlowView {
            id: self.id,
            chain: self.chain.clone(),
            job_id: self.job_id,
            phase,
            current_step: current,
            failure: self.failure.clone(),
            rollback_failures: self.rollback_failures.clone(),
            started_unix_ms: self.started_unix_ms,
            age_ms: end.saturating_sub(self.started_unix_ms),
            recovered: self.recovered,
        }
    }
}

/// What a recovery pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Flows resumed and completed.
    pub resumed: Vec<Uuid>,
    /// Flows rolled back (including resumed flows whose next step failed).
    pub rolled_back: Vec<Uuid>,
    /// Flows whose chain this build does not define; left in the store.
    pub unknown_chain: Vec<(Uuid, String)>,
    /// Flows that could not be recovered (an unreadable context, say), with why; left in
    /// the store.
    pub failed: Vec<(Uuid, String)>,
}

struct ChainDef<C> {
    resumable: bool,
    steps: Vec<(String, Arc<dyn Step<C>>)>,
}

impl<C> Clone for ChainDef<C> {
    fn clone(&self) -> Self {
        ChainDef { resumable: self.resumable, steps: self.steps.clone() }
    }
}

/// A chain as the engine stores it: typed for running, erased for recovery.
#[async_trait]
trait ErasedChain: Send + Sync {
    fn as_any(&self) -> &dyn Any;
    async fn recover(&self, engine: &FlowEngine, record: FlowRecord) -> Result<bool, RuntimeError>;
}

struct Chain<C> {
    def: RwLock<ChainDef<C>>,
}

/// The declaration of a chain, built step by step and handed to [`FlowEngine::define`].
pub struct ChainSpec<C> {
    name: String,
    def: ChainDef<C>,
}

impl<C> std::fmt::Debug for ChainSpec<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<&str> = self.def.steps.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ChainSpec").field("name", &self.name).field("steps", &steps).finish()
    }
}

impl<C> ChainSpec<C> {
    /// A chain named `name` with no steps, rolled back (not resumed) after a crash.
    pub fn new(name: &str) -> Self {
        ChainSpec { name: name.to_owned(), def: ChainDef { resumable: false, steps: Vec::new() } }
    }

    /// After a crash, resume the chain instead of rolling it back.
    pub fn resumable(mut self) -> Self {
        self.def.resumable = true;
        self
    }

    /// Appends a step.
    pub fn step(mut self, name: &str, step: impl Step<C>) -> Self {
        self.def.steps.push((name.to_owned(), Arc::new(step)));
        self
    }
}

/// Runs, persists and recovers flows. One per runtime ([`crate::Runtime::flows`]).
pub struct FlowEngine {
    db: Db,
    chains: RwLock<HashMap<String, Arc<dyn ErasedChain>>>,
    recent: Mutex<VecDeque<FlowView>>,
}

impl std::fmt::Debug for FlowEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let chains: Vec<String> =
            self.chains.read().expect("chains lock").keys().cloned().collect();
        f.debug_struct("FlowEngine").field("chains", &chains).finish()
    }
}

/// The context types a chain can carry.
pub trait FlowContext: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> FlowContext for T {}

impl FlowEngine {
    pub(crate) fn new(db: Db) -> Self {
        FlowEngine { db, chains: RwLock::new(HashMap::new()), recent: Mutex::new(VecDeque::new()) }
    }

    /// Declares a chain. Declaring a name again replaces the chain for flows started later.
    pub fn define<C: FlowContext>(&self, spec: ChainSpec<C>) {
        let chain: Arc<dyn ErasedChain> = Arc::new(Chain { def: RwLock::new(spec.def) });
        self.chains.write().expect("chains lock").insert(spec.name, chain);
    }

    fn chain<C: FlowContext>(&self, name: &str) -> Result<Arc<dyn ErasedChain>, RuntimeError> {
        let chain =
            self.chains.read().expect("chains lock").get(name).cloned().ok_or_else(|| {
                RuntimeError::Undefined { what: "flow chain", name: name.to_owned() }
            })?;
        if chain.as_any().downcast_ref::<Chain<C>>().is_none() {
            return Err(RuntimeError::Undefined {
                what: "flow chain with this context type",
                name: name.to_owned(),
            });
        }
        Ok(chain)
    }

    fn insert<C: FlowContext>(
        &self,
        chain: &str,
        anchor: &str,
        offset: usize,
        name: &str,
        step: impl Step<C>,
    ) -> Result<(), RuntimeError> {
        let erased = self.chain::<C>(chain)?;
        let typed = erased.as_any().downcast_ref::<Chain<C>>().expect("checked by chain()");
        let mut def = typed.def.write().expect("chain lock");
        let at = def.steps.iter().position(|(n, _)| n == anchor).ok_or_else(|| {
            RuntimeError::Undefined { what: "flow step", name: format!("{chain}/{anchor}") }
        })?;
        def.steps.insert(at + offset, (name.to_owned(), Arc::new(step)));
        Ok(())
    }

    /// Inserts a step into chain `chain` just before its step `anchor`.
    pub fn insert_before<C: FlowContext>(
        &self,
        chain: &str,
        anchor: &str,
        name: &str,
        step: impl Step<C>,
    ) -> Result<(), RuntimeError> {
        self.insert(chain, anchor, 0, name, step)
    }

    /// Inserts a step into chain `chain` just after its step `anchor`.
    pub fn insert_after<C: FlowContext>(
        &self,
        chain: &str,
        anchor: &str,
        name: &str,
        step: impl Step<C>,
    ) -> Result<(), RuntimeError> {
        self.insert(chain, anchor, 1, name, step)
    }

    /// The step names of a chain, in order.
    pub fn steps_of<C: FlowContext>(&self, chain: &str) -> Result<Vec<String>, RuntimeError> {
        let erased = self.chain::<C>(chain)?;
        let typed = erased.as_any().downcast_ref::<Chain<C>>().expect("checked by chain()");
        Ok(typed.def.read().expect("chain lock").steps.iter().map(|(n, _)| n.clone()).collect())
    }

    /// Runs chain `chain` on `ctx` and returns the context as the last step left it, or the
    /// error of the step that failed once every step that ran has been rolled back.
    pub async fn run<C: FlowContext>(
        &self,
        chain: &str,
        ctx: C,
        job: impl Into<FlowJob>,
    ) -> Result<C, RuntimeError> {
        let FlowJob { id: job_id, deadline } = job.into();
        let erased = self.chain::<C>(chain)?;
        let typed = erased.as_any().downcast_ref::<Chain<C>>().expect("checked by chain()");
        let def = typed.def.read().expect("chain lock").clone();
        let now = unix_ms_now();
        let mut record = FlowRecord {
            id: Uuid::new_v4(),
            chain: chain.to_owned(),
            job_id,
            steps: def.steps.iter().map(|(n, _)| n.clone()).collect(),
            context: Vec::new(),
            phase: FlowPhase::Running { next: 0, in_step: false },
            failure: None,
            rollback_failures: Vec::new(),
            started_unix_ms: now,
            updated_unix_ms: now,
            recovered: false,
        };
        let mut ctx = ctx;
        let (finished, cause) = self.finish(&def, &mut record, &mut ctx, deadline).await;
        if let Err(error) = finished {
            tracing::error!(flow = %record.id, chain = %record.chain, error = %error_chain(&error), "removing a finished flow's record failed");
        }
        match record.failure {
            None => Ok(ctx),
            Some((step, message)) => Err(RuntimeError::FlowFailed {
                chain: record.chain,
                step,
                message,
                rollback_failures: record.rollback_failures,
                cause,
            }),
        }
    }

    /// Saves `record` with `ctx`, in one atomic batch with `writes` (a step's end writes).
    async fn save<C: FlowContext>(
        &self,
        record: &mut FlowRecord,
        ctx: &C,
        mut writes: Batch,
    ) -> Result<(), RuntimeError> {
        let id = record.id;
        record.context = codec::encode_payload(FlowRecord::KIND, ctx)
            .map_err(|source| StoreError::Codec { table: FlowRecord::KIND, id, source })?;
        record.updated_unix_ms = unix_ms_now();
        writes.put(record, Expect::Any)?;
        self.db.commit(writes).await?;
        Ok(())
    }

    /// Drives `record` to its end and removes it with the last step's end writes; if those
    /// fail, the flow rolls back after all. An error means only that the record of the ended
    /// flow could not be removed (recovery removes it).
    async fn finish<C: FlowContext>(
        &self,
        def: &ChainDef<C>,
        record: &mut FlowRecord,
        ctx: &mut C,
        deadline: Option<SystemTime>,
    ) -> (Result<(), RuntimeError>, Option<StepError>) {
        let at_end = Arc::new(Mutex::new(Batch::new()));
        let cause = self.drive(def, record, ctx, &at_end, deadline).await;
        let writes = take_writes(&at_end);
        let had_writes = !writes.is_empty();
        let error = match self.conclude(record, writes).await {
            Ok(()) => return (Ok(()), cause),
            Err(error) => error,
        };
        let last = record.steps.len().checked_sub(1);
        let (FlowPhase::Done, Some(last), true) = (&record.phase, last, had_writes) else {
            return (Err(error), cause);
        };
        let step = record.steps[last].clone();
        let message = format!("the step's end could not be saved: {}", error_chain(&error));
        tracing::error!(flow = %record.id, chain = %record.chain, step = %step, error = %message, "flow stopped; rolling back");
        record.failure = Some((step, message));
        record.phase = FlowPhase::RollingBack { next: last };
        self.drive(def, record, ctx, &at_end, deadline).await;
        (self.conclude(record, Batch::new()).await, Some(Arc::new(error)))
    }

    /// Moves `record` forward from its phase until it is `Done` or `RolledBack`, persisting
    /// before every step and after every rollback step. Returns the error of the step that
    /// failed, as the step returned it (the record keeps its text, for inspection and after
    /// a crash). The last step's end writes are left in `at_end` for the record's removal
    /// to commit.
    async fn drive<C: FlowContext>(
        &self,
        def: &ChainDef<C>,
        record: &mut FlowRecord,
        ctx: &mut C,
        at_end: &Arc<Mutex<Batch>>,
        deadline: Option<SystemTime>,
    ) -> Option<StepError> {
        let mut cause: Option<StepError> = None;
        let step_by_name =
            |name: &str| def.steps.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone());
        let info = |record: &FlowRecord, step: &str, rollback: bool| FlowInfo {
            id: record.id,
            chain: record.chain.clone(),
            step: step.to_owned(),
            job_id: record.job_id,
            deadline: match (deadline, rollback) {
                (Some(deadline), true) => Some(deadline.max(SystemTime::now() + ROLLBACK_TIME)),
                (deadline, _) => deadline,
            },
            at_end: at_end.clone(),
        };
        let take_writes = || take_writes(at_end);
        loop {
            match record.phase.clone() {
                FlowPhase::Running { next, .. } if next >= record.steps.len() => {
                    record.phase = FlowPhase::Done;
                    return cause;
                }
                FlowPhase::Running { next, in_step } => {
                    let name = record.steps[next].clone();
                    // In memory, `in_step` is true only once it is saved: when the step
                    // before ended, its checkpoint already said this one had started.
                    if !in_step
                        && let Err(error) =
                            self.mark_started(record, ctx, next, take_writes()).await
                    {
                        // Without a durable record a crash could leave this step's work
                        // behind unnoticed: do not start it; undo what is done. The
                        // checkpoint also held the end of the step before (and its writes):
                        // that step is the one that failed.
                        let chain = error_chain(&error);
                        let (failed, message, phase) = match next.checked_sub(1) {
                            None => (
                                name,
                                format!("the flow's progress could not be saved: {chain}"),
                                FlowPhase::RolledBack,
                            ),
                            Some(last) => (
                                record.steps[last].clone(),
                                format!("the step's end could not be saved: {chain}"),
                                FlowPhase::RollingBack { next: last },
                            ),
                        };
                        tracing::error!(flow = %record.id, chain = %record.chain, step = %failed, error = %message, "flow stopped; rolling back");
                        record.failure = Some((failed, message));
                        record.phase = phase;
                        cause = Some(Arc::new(error));
                        continue;
                    }
                    let outcome = match step_by_name(&name) {
                        Some(step) => step.run(ctx, &info(record, &name, false)).await,
                        None => Err("step is not defined by this build".into()),
                    };
                    match outcome {
                        Ok(()) => {
                            tracing::debug!(flow = %record.id, chain = %record.chain, step = %name, "flow step done");
                            // Not saved here: the next step's start checkpoint records this
                            // end too. After the last step the record is removed instead; a
                            // crash before that undoes (or, resumable, repeats) a step whose
                            // end nobody has been told of.
                            record.phase = FlowPhase::Running { next: next + 1, in_step: false };
                        }
                        Err(error) => {
                            let message = error_chain(&*error);
                            tracing::warn!(flow = %record.id, chain = %record.chain, step = %name, error = %message, job = ?record.job_id, "flow step failed; rolling back");
                            // A failed step's end writes describe an end it did not reach.
                            drop(take_writes());
                            cause = Some(Arc::from(error));
                            record.failure = Some((name, message));
                            record.phase = FlowPhase::RollingBack { next };
                            self.save_logged(record, ctx).await;
                        }
                    }
                }
                FlowPhase::RollingBack { next } => {
                    let name = record.steps[next].clone();
                    // Rollbacks are safe to repeat, and what makes one fail (a panic, a store
                    // write error, an actor restarting) is often gone a moment later: a
                    // rollback given up leaves something behind, so it is tried again first.
                    let mut attempt = 0;
                    let outcome = loop {
                        let outcome = match step_by_name(&name) {
                            Some(step) => {
                                match step.rollback(ctx, &info(record, &name, true)).await {
                                    Ok(()) => match take_writes() {
                                        writes if writes.is_empty() => Ok(()),
                                        writes => self
                                            .db
                                            .commit(writes)
                                            .await
                                            .map(drop)
                                            .map_err(|e| error_chain(&e)),
                                    },
                                    Err(e) => {
                                        drop(take_writes());
                                        Err(error_chain(&*e))
                                    }
                                }
                            }
                            None => break Err("step is not defined by this build".to_owned()),
                        };
                        attempt += 1;
                        match outcome {
                            Err(message) if attempt < ROLLBACK_ATTEMPTS => {
                                tracing::warn!(flow = %record.id, chain = %record.chain, step = %name, attempt, error = %message, "flow rollback failed; trying again");
                                tokio::time::sleep(ROLLBACK_RETRY_BASE * (1 << attempt)).await;
                            }
                            outcome => break outcome,
                        }
                    };
                    if let Err(message) = outcome {
                        tracing::error!(flow = %record.id, chain = %record.chain, step = %name, error = %message, "flow rollback failed; continuing with the other steps");
                        record.rollback_failures.push(format!("{name}: {message}"));
                    }
                    record.phase = if next == 0 {
                        FlowPhase::RolledBack
                    } else {
                        FlowPhase::RollingBack { next: next - 1 }
                    };
                    if next == 0 {
                        return cause;
                    }
                    self.save_logged(record, ctx).await;
                }
                FlowPhase::Done | FlowPhase::RolledBack => return cause,
            }
        }
    }

    /// Saves that step `next` has started (so that a crash from here on undoes or repeats
    /// it) with the context as the steps before it left it. This one checkpoint also records
    /// the end of the step before: one durable write between two steps, not two. On failure
    /// the caller sets the phase the rollback starts from.
    async fn mark_started<C: FlowContext>(
        &self,
        record: &mut FlowRecord,
        ctx: &C,
        next: usize,
        writes: Batch,
    ) -> Result<(), RuntimeError> {
        record.phase = FlowPhase::Running { next, in_step: true };
        self.save(record, ctx, writes).await
    }

    /// Saves progress once a step has failed or a rollback step has ended. A failure is
    /// logged and the flow goes on: the record still says where it was before, and recovery
    /// from there repeats at most a step or a rollback, which are safe to repeat.
    async fn save_logged<C: FlowContext>(&self, record: &mut FlowRecord, ctx: &C) {
        if let Err(error) = self.save(record, ctx, Batch::new()).await {
            tracing::error!(flow = %record.id, chain = %record.chain, error = %error_chain(&error), "saving flow progress failed");
        }
    }

    /// Removes a finished flow's record, with `writes`, and remembers it for inspection.
    async fn conclude(&self, record: &FlowRecord, mut writes: Batch) -> Result<(), RuntimeError> {
        writes.delete::<FlowRecord>(record.id, Expect::Any);
        self.db.commit(writes).await?;
        let mut finished = record.clone();
        finished.updated_unix_ms = unix_ms_now();
        let mut recent = self.recent.lock().expect("recent lock");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(finished.view());
        Ok(())
    }

    /// Finishes every flow left unfinished by a previous process: resumes resumable chains,
    /// rolls back the others. Call once at startup, after every chain has been defined.
    pub async fn recover(&self) -> Result<RecoveryReport, RuntimeError> {
        let records: Vec<FlowRecord> =
            self.db.scan::<FlowRecord>().map(|r| r.map(|s| s.record)).collect::<Result<_, _>>()?;
        let mut report = RecoveryReport::default();
        for mut record in records {
            if matches!(record.phase, FlowPhase::Done | FlowPhase::RolledBack) {
                self.conclude(&record, Batch::new()).await?;
                continue;
            }
            let chain = self.chains.read().expect("chains lock").get(&record.chain).cloned();
            let Some(chain) = chain else {
                tracing::error!(flow = %record.id, chain = %record.chain, "unfinished flow of an unknown chain left in the store");
                report.unknown_chain.push((record.id, record.chain));
                continue;
            };
            record.recovered = true;
            let id = record.id;
            tracing::info!(flow = %id, chain = %record.chain, phase = ?record.phase, "recovering unfinished flow");
            match chain.recover(self, record).await {
                Ok(true) => report.resumed.push(id),
                Ok(false) => report.rolled_back.push(id),
                // One unreadable flow must not keep the others from recovering.
                Err(error) => {
                    tracing::error!(flow = %id, error = %error_chain(&error), "recovering a flow failed; left in the store");
                    report.failed.push((id, error_chain(&error)));
                }
            }
        }
        Ok(report)
    }

    /// Flows in progress, from the store.
    pub fn in_progress(&self) -> Result<Vec<FlowView>, RuntimeError> {
        let mut views = Vec::new();
        for stored in self.db.scan::<FlowRecord>() {
            views.push(stored?.record.view());
        }
        Ok(views)
    }

    /// Forgets every chain definition (at shutdown).
    pub(crate) fn clear(&self) {
        self.chains.write().expect("chains lock").clear();
    }

    /// Flows that finished recently, oldest first.
    pub fn recent(&self) -> Vec<FlowView> {
        self.recent.lock().expect("recent lock").iter().cloned().collect()
    }
}

#[async_trait]
impl<C: FlowContext> ErasedChain for Chain<C> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Returns true when the flow was resumed to completion.
    async fn recover(
        &self,
        engine: &FlowEngine,
        mut record: FlowRecord,
    ) -> Result<bool, RuntimeError> {
        let def = self.def.read().expect("chain lock").clone();
        let id = record.id;
        let mut ctx: C = codec::decode_payload(FlowRecord::KIND, &record.context)
            .map_err(|source| StoreError::Codec { table: FlowRecord::KIND, id, source })?;
        match record.phase {
            // Every step ran; only the final bookkeeping was lost.
            FlowPhase::Running { next, .. } if next >= record.steps.len() => {
                record.phase = FlowPhase::Done;
            }
            FlowPhase::Running { next, in_step } if !def.resumable => {
                let failure = "the process stopped while this flow was running".to_owned();
                record.failure =
                    Some((record.steps.get(next).cloned().unwrap_or_default(), failure));
                let first = if in_step { Some(next) } else { next.checked_sub(1) };
                match first {
                    Some(first) if first < record.steps.len() => {
                        record.phase = FlowPhase::RollingBack { next: first };
                    }
                    _ => record.phase = FlowPhase::RolledBack,
                }
            }
            // Resumable: re-run the step in progress (steps are safe to repeat).
            FlowPhase::Running { next, .. } => {
                record.phase = FlowPhase::Running { next, in_step: false }
            }
            _ => {}
        }
        engine.finish(&def, &mut record, &mut ctx, None).await.0?;
        Ok(record.phase == FlowPhase::Done)
    }
}
