//! The actix actor behind every resource: keyed queues, panic isolation, restarts,
//! activation and passivation.
//!
//! ```text
//!              load ok                     panic (within budget)
//! Activating ──────────► Active ◄──────────────────────────────┐
//!     │                    │ │                                  │ reload ok, once
//!     │ load: none/error   │ └──────────► Restarting ───────────┘ running ops drained
//!     ▼                    │ over budget       │ reload fails
//!   Gone ──► leaves        ▼                   ▼
//!   the registry         Failed ◄──────────────┘   (manual restart ──► Restarting)
//! ```
//!
//! Why not actix's own `Supervisor`: its restart cancels every future the actor spawned,
//! which would drop the replies of the *other* operations running on the actor, and it
//! restarts whenever any address is alive, which fights passivation. Here a panic is caught
//! around the one operation, that operation's caller gets `Internal`, the other running
//! operations finish normally, no new operation starts, and once the actor is drained it
//! reloads its state from the store and resumes its queues. Pending operations are never
//! dropped; they wait (up to their deadlines) and run on the reloaded state.
//!
//! Leaving the registry (passivation, or a UUID that does not exist) must not lose a message
//! sent just before: callers count messages per actor under the registry's shard lock and
//! the actor counts what it received; it leaves only when the two agree (see
//! [`Kind::try_remove`](crate::kind::Kind)).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture,
};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::config::QueueSpec;
use crate::entity::{Entity, Envelope, OpCtx, Outcome};
use crate::error::{ActorId, RuntimeError, panic_message};
use crate::inspect::{
    ActorSnapshot, ActorStatus, Clock, FinishedOp, OpResult, OpSnapshot, QueueSnapshot,
    RestartRecord, unix_ms_now,
};
use crate::kind::Kind;
use crate::runtime::{ActorFailed, ActorRestarted};

/// How many finished operations and restarts an actor remembers for inspection.
const HISTORY: usize = 16;

enum Status {
    Activating,
    Active,
    Restarting {
        reason: String,
    },
    Failed {
        reason: String,
    },
    /// The resource does not exist (`None`) or could not be loaded (`Some(reason)`).
    Gone {
        unavailable: Option<String>,
    },
}

struct Pending<E: Entity> {
    envelope: Box<dyn Envelope<E>>,
    queued_at: Instant,
}

struct Running {
    seq: u64,
    op: crate::entity::Op,
    started_at: Instant,
}

struct Queue<E: Entity> {
    name: &'static str,
    spec: Arc<QueueSpec>,
    level_override: Option<usize>,
    running: Vec<Running>,
    pending: VecDeque<Pending<E>>,
    /// (running, pending) as last added to the kind-wide depth of the queue.
    reported: (usize, usize),
}

impl<E: Entity> Queue<E> {
    fn level(&self) -> usize {
        self.level_override.unwrap_or_else(|| self.spec.level())
    }

    /// Brings the kind-wide depth (what `/metrics` and the console show) up to this queue's.
    fn report(&mut self) {
        let now = (self.running.len(), self.pending.len());
        if now != self.reported {
            self.spec.report(self.reported, now);
            self.reported = now;
        }
    }
}

impl<E: Entity> Drop for Queue<E> {
    fn drop(&mut self) {
        self.spec.report(self.reported, (0, 0));
    }
}

#[derive(Default)]
struct History {
    processed: u64,
    restarts: u64,
    restart_times: VecDeque<Instant>,
    restart_log: VecDeque<RestartRecord>,
    last_error: Option<String>,
    recent: VecDeque<FinishedOp>,
}

/// Appends to a ring of at most [`HISTORY`] items, growing it one slot at a time: most actors
/// record a few operations and then sit idle, and a million of them should not each hold a
/// full ring.
fn push_bounded<T>(ring: &mut VecDeque<T>, item: T) {
    if ring.len() == HISTORY {
        ring.pop_front();
    } else if ring.len() == ring.capacity() {
        ring.reserve_exact(1);
    }
    ring.push_back(item);
}

/// The actor for one resource of kind `E`.
pub(crate) struct ActorCell<E: Entity> {
    id: Uuid,
    incarnation: u64,
    kind: Kind<E>,
    status: Status,
    state: Option<Rc<RefCell<E::State>>>,
    passivate_hint: Rc<std::cell::Cell<bool>>,
    queues: Vec<Queue<E>>,
    /// Messages received; compared with the registry's count of messages sent.
    received: u64,
    next_seq: u64,
    history: History,
    activated_at: Instant,
    last_activity: Instant,
    idle_timer_armed: bool,
    expiry_timer_at: Option<Instant>,
    pumping: bool,
    /// A leave was deferred because a message was in flight.
    leave_pending: bool,
}

impl<E: Entity> ActorCell<E> {
    pub(crate) fn new(id: Uuid, incarnation: u64, kind: Kind<E>) -> Self {
        let now = Instant::now();
        ActorCell {
            id,
            incarnation,
            kind,
            status: Status::Activating,
            state: None,
            passivate_hint: Rc::new(std::cell::Cell::new(false)),
            queues: Vec::new(),
            received: 0,
            next_seq: 0,
            history: History::default(),
            activated_at: now,
            last_activity: now,
            idle_timer_armed: false,
            expiry_timer_at: None,
            pumping: false,
            leave_pending: false,
        }
    }

    fn actor(&self) -> ActorId {
        ActorId { kind: E::KIND, id: self.id }
    }

    /// The index of queue `name`, made on its first use (`UndeclaredQueue` for a queue the
    /// kind does not declare).
    fn queue_index(&mut self, name: &'static str) -> Result<usize, RuntimeError> {
        if let Some(i) = self.queues.iter().position(|q| q.name == name) {
            return Ok(i);
        }
        let spec = self.kind.queue_spec(name)?;
        // Most kinds use one or two queues per actor: grow by one, not by four.
        self.queues.reserve_exact(1);
        self.queues.push(Queue {
            name,
            spec,
            level_override: None,
            running: Vec::new(),
            pending: VecDeque::new(),
            reported: (0, 0),
        });
        Ok(self.queues.len() - 1)
    }

    fn running_total(&self) -> usize {
        self.queues.iter().map(|q| q.running.len()).sum()
    }

    fn is_idle(&self) -> bool {
        self.queues.iter().all(|q| q.running.is_empty() && q.pending.is_empty())
    }

    /// Loads (or reloads) the state; decides the next status.
    fn load(&mut self, ctx: &mut Context<Self>) {
        let loaded =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.kind.entity().load(self.id)));
        match loaded {
            Ok(Ok(Some(state))) => {
                self.state = Some(Rc::new(RefCell::new(state)));
                let restarted = match std::mem::replace(&mut self.status, Status::Active) {
                    Status::Restarting { reason } => Some(reason),
                    _ => None,
                };
                if let Some(reason) = restarted {
                    self.history.restarts += 1;
                    push_bounded(
                        &mut self.history.restart_log,
                        RestartRecord { at_unix_ms: unix_ms_now(), reason: reason.clone() },
                    );
                    tracing::warn!(actor = %self.actor(), %reason, "actor restarted with reloaded state");
                    self.kind.runtime().events().publish(ActorRestarted {
                        actor: self.actor(),
                        reason,
                        restarts: self.history.restarts,
                    });
                }
                self.pump(ctx);
            }
            Ok(Ok(None)) => self.leave_as_gone(None, ctx),
            Ok(Err(err)) => {
                let reason = format!("loading state failed: {err}");
                if matches!(self.status, Status::Restarting { .. }) {
                    self.fail(reason);
                } else {
                    self.leave_as_gone(Some(reason), ctx);
                }
            }
            Err(payload) => {
                let reason = format!("loading state panicked: {}", panic_message(&*payload));
                if matches!(self.status, Status::Restarting { .. }) {
                    self.fail(reason);
                } else {
                    self.leave_as_gone(Some(reason), ctx);
                }
            }
        }
    }

    fn gone_error(&self, unavailable: &Option<String>) -> RuntimeError {
        match unavailable {
            None => RuntimeError::NotFound { actor: self.actor() },
            Some(reason) => {
                RuntimeError::Unavailable { actor: self.actor(), reason: reason.clone() }
            }
        }
    }

    /// Reports every queue's depth to its kind.
    fn report_depths(&mut self) {
        for queue in &mut self.queues {
            queue.report();
        }
    }

    fn leave_as_gone(&mut self, unavailable: Option<String>, ctx: &mut Context<Self>) {
        let error = self.gone_error(&unavailable);
        self.status = Status::Gone { unavailable };
        self.state = None;
        for queue in &mut self.queues {
            for pending in queue.pending.drain(..) {
                pending.envelope.reject(error.clone());
            }
        }
        self.report_depths();
        self.try_leave(ctx);
    }

    /// Leaves the registry if no message is in flight to this actor; otherwise stays until
    /// the next message arrives and tries again.
    fn try_leave(&mut self, ctx: &mut Context<Self>) {
        if self.kind.try_remove(self.id, self.incarnation, self.received) {
            ctx.stop();
        } else {
            self.leave_pending = true;
        }
    }

    /// After every message: a leave deferred because this message was in flight is retried
    /// now, or the actor could stay in the registry for good.
    fn retry_leave(&mut self, ctx: &mut Context<Self>) {
        if !self.leave_pending {
            return;
        }
        self.leave_pending = false;
        let idle_active = matches!(self.status, Status::Active) && self.is_idle();
        if matches!(self.status, Status::Gone { .. }) || (idle_active && self.wants_to_leave()) {
            self.try_leave(ctx);
        }
    }

    /// Whether an idle, active actor should leave now: it was asked to, or it has been idle
    /// for its kind's idle timeout.
    fn wants_to_leave(&self) -> bool {
        self.passivate_hint.get()
            || self
                .kind
                .config()
                .idle_timeout
                .is_some_and(|idle| self.last_activity.elapsed() >= idle)
    }

    fn fail(&mut self, reason: String) {
        tracing::error!(actor = %self.actor(), %reason, "actor failed: restart budget exhausted");
        let error = RuntimeError::Failed { actor: self.actor(), reason: reason.clone() };
        for queue in &mut self.queues {
            for pending in queue.pending.drain(..) {
                pending.envelope.reject(error.clone());
            }
        }
        self.report_depths();
        self.status = Status::Failed { reason: reason.clone() };
        self.kind.runtime().events().publish(ActorFailed { actor: self.actor(), reason });
    }

    fn on_panic(&mut self, message: &str) {
        let now = Instant::now();
        let budget = self.kind.config().restart_budget;
        let times = &mut self.history.restart_times;
        times.push_back(now);
        while times.front().is_some_and(|t| now.duration_since(*t) > budget.within) {
            times.pop_front();
        }
        let panics = times.len();
        let reason = format!("panic: {message}");
        if panics > budget.max_restarts as usize {
            self.fail(format!(
                "{} panics within {:?} (budget {}): last {reason}",
                panics, budget.within, budget.max_restarts
            ));
        } else if matches!(self.status, Status::Active | Status::Restarting { .. }) {
            self.status = Status::Restarting { reason };
        }
    }

    fn submit(&mut self, envelope: Box<dyn Envelope<E>>, ctx: &mut Context<Self>) {
        match &self.status {
            Status::Failed { reason } => {
                envelope
                    .reject(RuntimeError::Failed { actor: self.actor(), reason: reason.clone() });
                return;
            }
            Status::Gone { .. } => {
                // This message was sent after the actor found nothing to load; the resource
                // may exist by now (created after a lookup raced ahead of it). Look again.
                self.status = Status::Activating;
                self.load(ctx);
                if let Status::Gone { unavailable } = &self.status {
                    envelope.reject(self.gone_error(unavailable));
                    self.try_leave(ctx);
                    return;
                }
            }
            _ => {}
        }
        let queue = envelope.op().queue;
        let deadline = envelope.op().deadline;
        let index = match self.queue_index(queue) {
            Ok(index) => index,
            Err(error) => return envelope.reject(error),
        };
        let q = &mut self.queues[index];
        let depth = q.pending.len();
        if depth >= q.spec.max_pending() {
            envelope.reject(RuntimeError::Busy { actor: self.actor(), queue, depth });
            return;
        }
        q.pending.push_back(Pending { envelope, queued_at: Instant::now() });
        self.pump(ctx);
        // FIFO: if anything is still pending in this queue, the newcomer is among it.
        if !self.queues[index].pending.is_empty()
            && self.expiry_timer_at.is_none_or(|at| deadline < at)
        {
            self.arm_expiry(deadline, ctx);
        }
    }

    /// Starts whatever the queue levels allow. Operations that complete without waiting are
    /// finished inline; the loop (not recursion) picks up the next one, so a long queue of
    /// quick operations cannot grow the stack.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.pumping {
            return;
        }
        self.pumping = true;
        let mut progress = true;
        while progress && matches!(self.status, Status::Active) {
            progress = false;
            for index in 0..self.queues.len() {
                while matches!(self.status, Status::Active) {
                    let q = &mut self.queues[index];
                    if q.running.len() >= q.level() {
                        break;
                    }
                    let Some(pending) = q.pending.pop_front() else { break };
                    progress = true;
                    let op = *pending.envelope.op();
                    if op.deadline <= Instant::now() {
                        pending.envelope.reject(RuntimeError::Timeout {
                            actor: self.actor(),
                            queue: op.queue,
                            operation: op.name,
                        });
                        self.record(
                            op,
                            pending.queued_at,
                            OpResult::Refused("deadline passed before start".into()),
                        );
                        continue;
                    }
                    self.start(index, pending, ctx);
                }
            }
        }
        self.pumping = false;
        self.after_progress(ctx);
    }

    fn start(&mut self, index: usize, pending: Pending<E>, ctx: &mut Context<Self>) {
        let op = *pending.envelope.op();
        let state = self.state.clone().expect("an active actor has state");
        let op_ctx = OpCtx {
            kind: self.kind.clone(),
            id: self.id,
            op,
            state,
            passivate: self.passivate_hint.clone(),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let running = &mut self.queues[index].running;
        // Grow by one: a queue's running list never exceeds its level, usually 1.
        if running.len() == running.capacity() {
            running.reserve_exact(1);
        }
        running.push(Running { seq, op, started_at: Instant::now() });
        // An operation a job asked for runs in a span naming the job, so everything it logs
        // (and the agent commands it sends, which carry the job id) ties back to the job.
        let span = match op.job_id {
            Some(job) => {
                tracing::info_span!("op", kind = E::KIND, actor = %self.id, op = op.name, %job)
            }
            None => tracing::Span::none(),
        };
        let mut future = pending.envelope.start(op_ctx);
        // Poll once right here: most operations that touch only the actor's state finish
        // without waiting, and finishing them inline saves a spawn and a wake-up. An
        // operation that waits is polled again by the actor's context with a real waker.
        let waker = futures::task::noop_waker_ref();
        let first = span.in_scope(|| future.as_mut().poll(&mut TaskContext::from_waker(waker)));
        match first {
            Poll::Ready(outcome) => self.finish(index, seq, outcome),
            Poll::Pending => {
                let future = tracing::Instrument::instrument(future, span);
                ctx.spawn(future.into_actor(self).map(move |outcome, act, ctx| {
                    act.finish(index, seq, outcome);
                    act.pump(ctx);
                }));
            }
        }
    }

    fn finish(&mut self, index: usize, seq: u64, outcome: Outcome) {
        let queue = &mut self.queues[index];
        let Some(at) = queue.running.iter().position(|r| r.seq == seq) else {
            return;
        };
        let running = queue.running.swap_remove(at);
        self.history.processed += 1;
        self.last_activity = Instant::now();
        let result = match outcome {
            Outcome::Ok => OpResult::Ok,
            Outcome::Err(message) => {
                self.history.last_error = Some(message.clone());
                OpResult::Error(message)
            }
            Outcome::Panicked(message) => {
                tracing::error!(actor = %self.actor(), operation = running.op.name, %message, "operation panicked");
                self.history.last_error = Some(format!("panic: {message}"));
                self.on_panic(&message);
                OpResult::Panic(message)
            }
        };
        self.record(running.op, running.started_at, result);
    }

    fn record(&mut self, op: crate::entity::Op, started_at: Instant, result: OpResult) {
        push_bounded(
            &mut self.history.recent,
            FinishedOp {
                queue: op.queue,
                name: op.name,
                job_id: op.job_id,
                ended_unix_ms: unix_ms_now(),
                duration_us: started_at.elapsed().as_micros() as u64,
                result,
            },
        );
    }

    /// Restarts a drained actor, or lets an idle one passivate.
    fn after_progress(&mut self, ctx: &mut Context<Self>) {
        self.report_depths();
        if matches!(self.status, Status::Restarting { .. }) && self.running_total() == 0 {
            self.state = None;
            self.load(ctx);
            return;
        }
        if !matches!(self.status, Status::Active) || !self.is_idle() {
            return;
        }
        // An idle actor keeps no queue buffers: with a million live actors, the few hundred
        // bytes each would hold add up to gigabytes.
        for queue in &mut self.queues {
            queue.running.shrink_to_fit();
            queue.pending.shrink_to_fit();
        }
        if self.passivate_hint.get() {
            self.try_leave(ctx);
        } else {
            self.arm_idle_timer(ctx);
        }
    }

    fn arm_idle_timer(&mut self, ctx: &mut Context<Self>) {
        let Some(idle) = self.kind.config().idle_timeout else { return };
        if self.idle_timer_armed {
            return;
        }
        self.idle_timer_armed = true;
        let wait = (self.last_activity + idle).saturating_duration_since(Instant::now());
        ctx.run_later(wait, move |act, ctx| {
            act.idle_timer_armed = false;
            if !matches!(act.status, Status::Active) || !act.is_idle() {
                return;
            }
            if act.last_activity.elapsed() >= idle {
                act.try_leave(ctx);
            } else {
                act.arm_idle_timer(ctx);
            }
        });
    }

    fn arm_expiry(&mut self, at: Instant, ctx: &mut Context<Self>) {
        self.expiry_timer_at = Some(at);
        ctx.run_later(at.saturating_duration_since(Instant::now()), move |act, ctx| {
            if act.expiry_timer_at == Some(at) {
                act.expiry_timer_at = None;
            }
            act.expire_pending(ctx);
        });
    }

    /// Fails every pending operation whose deadline has passed, without running it.
    fn expire_pending(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let actor = self.actor();
        let mut next: Option<Instant> = None;
        let mut expired = Vec::new();
        for queue in &mut self.queues {
            let mut kept = VecDeque::with_capacity(queue.pending.len());
            for pending in queue.pending.drain(..) {
                let op = *pending.envelope.op();
                if op.deadline <= now {
                    pending.envelope.reject(RuntimeError::Timeout {
                        actor,
                        queue: op.queue,
                        operation: op.name,
                    });
                    expired.push((op, pending.queued_at));
                } else {
                    next = Some(next.map_or(op.deadline, |n| n.min(op.deadline)));
                    kept.push_back(pending);
                }
            }
            queue.pending = kept;
        }
        for (op, queued_at) in expired {
            self.record(op, queued_at, OpResult::Refused("deadline passed before start".into()));
        }
        if let Some(at) = next
            && self.expiry_timer_at.is_none_or(|t| at < t)
        {
            self.arm_expiry(at, ctx);
        }
        self.after_progress(ctx);
    }

    fn snapshot(&self) -> ActorSnapshot {
        let clock = Clock::now();
        let op_snapshot = |op: &crate::entity::Op, since: Instant| OpSnapshot {
            queue: op.queue,
            name: op.name,
            job_id: op.job_id,
            since_unix_ms: clock.unix_ms(since),
            age_ms: clock.age_ms(since),
            deadline_unix_ms: clock.unix_ms(op.deadline),
        };
        let (status, status_reason) = match &self.status {
            Status::Activating => (ActorStatus::Activating, None),
            Status::Active => (ActorStatus::Active, None),
            Status::Restarting { reason } => (ActorStatus::Restarting, Some(reason.clone())),
            Status::Failed { reason } => (ActorStatus::Failed, Some(reason.clone())),
            Status::Gone { unavailable } => (ActorStatus::Gone, unavailable.clone()),
        };
        ActorSnapshot {
            kind: E::KIND,
            id: self.id,
            supervisor: format!("{}-supervisor", E::KIND),
            status,
            status_reason,
            activated_unix_ms: clock.unix_ms(self.activated_at),
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    name: q.name,
                    level: q.level(),
                    level_override: q.level_override,
                    serial: q.spec.is_serial(),
                    max_pending: q.spec.max_pending(),
                    running: q.running.len(),
                    pending: q.pending.len(),
                    oldest_pending_ms: q.pending.front().map(|p| clock.age_ms(p.queued_at)),
                })
                .collect(),
            running: self
                .queues
                .iter()
                .flat_map(|q| q.running.iter().map(|r| op_snapshot(&r.op, r.started_at)))
                .collect(),
            pending: self
                .queues
                .iter()
                .flat_map(|q| q.pending.iter().map(|p| op_snapshot(p.envelope.op(), p.queued_at)))
                .collect(),
            processed: self.history.processed,
            restarts: self.history.restarts,
            restart_log: self.history.restart_log.iter().cloned().collect(),
            last_error: self.history.last_error.clone(),
            recent: self.history.recent.iter().cloned().collect(),
        }
    }
}

impl<E: Entity> Actor for ActorCell<E> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.load(ctx);
    }
}

/// Runs an operation on the actor.
pub(crate) struct Submit<E: Entity>(pub(crate) Box<dyn Envelope<E>>);

impl<E: Entity> Message for Submit<E> {
    type Result = ();
}

impl<E: Entity> Handler<Submit<E>> for ActorCell<E> {
    type Result = ();

    fn handle(&mut self, msg: Submit<E>, ctx: &mut Self::Context) {
        self.received += 1;
        self.last_activity = Instant::now();
        self.submit(msg.0, ctx);
        self.retry_leave(ctx);
    }
}

/// Administrative requests: inspection, per-actor queue levels, manual restart.
pub(crate) enum Control {
    Inspect(oneshot::Sender<ActorSnapshot>),
    SetQueueLevel { queue: String, level: Option<usize>, done: oneshot::Sender<bool> },
    Restart(oneshot::Sender<()>),
}

impl Message for Control {
    type Result = ();
}

impl<E: Entity> Handler<Control> for ActorCell<E> {
    type Result = ();

    fn handle(&mut self, msg: Control, ctx: &mut Self::Context) {
        self.received += 1;
        match msg {
            Control::Inspect(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Control::SetQueueLevel { queue, level, done } => {
                let found = match self.queues.iter_mut().find(|q| q.name == queue) {
                    Some(q) => {
                        q.level_override = level.map(|l| l.max(1));
                        true
                    }
                    None => false,
                };
                let _ = done.send(found);
                self.pump(ctx);
            }
            Control::Restart(done) => {
                if let Status::Failed { reason } | Status::Restarting { reason } = &self.status {
                    tracing::info!(actor = %self.actor(), previous = %reason, "actor restarted by hand");
                }
                if !matches!(self.status, Status::Gone { .. } | Status::Activating) {
                    self.history.restart_times.clear();
                    self.status = Status::Restarting { reason: "restarted by hand".into() };
                    self.after_progress(ctx);
                }
                let _ = done.send(());
            }
        }
        if matches!(self.status, Status::Gone { .. }) {
            self.try_leave(ctx);
        }
        self.retry_leave(ctx);
    }
}
