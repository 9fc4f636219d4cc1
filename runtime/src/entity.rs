//! What an actor kind provides ([`Entity`]), how an operation is described ([`Op`]) and what
//! a running operation sees ([`OpCtx`]).
//!
//! An operation is an async closure run *on the actor*: it can read and change the actor's
//! state between awaits, and it holds its queue slot until its future completes, not only
//! until it first yields (ZStack's ChainTask calls `next()` when the work is done, and so do
//! we). Because the closure runs on the actor's arbiter thread, the future it returns need
//! not be `Send`; the closure itself is sent there.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::{ActorId, BoxError, RuntimeError, panic_message};
use crate::kind::Kind;
use crate::runtime::Runtime;

/// One kind of actor: the object shared by all actors of the kind (their services, such as
/// store handles and clients) and how an actor loads its state.
pub trait Entity: Send + Sync + Sized + 'static {
    /// The kind's name, used in addresses (`vm/<uuid>`), config and inspection.
    const KIND: &'static str;

    /// What an actor of this kind keeps in memory between operations.
    type State: 'static;

    /// Loads the state of actor `id` from the store; `Ok(None)` when no such resource exists.
    ///
    /// Called on activation and again after every restart, on the actor's thread; it should
    /// be a few store reads.
    fn load(&self, id: Uuid) -> Result<Option<Self::State>, BoxError>;
}

/// How and when to run an operation: its queue, a name for inspection, its deadline and the
/// job it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub(crate) queue: &'static str,
    pub(crate) name: &'static str,
    pub(crate) deadline: Instant,
    pub(crate) job_id: Option<Uuid>,
}

impl Op {
    /// An operation named `name` in `queue` that must start before `deadline`.
    pub fn new(queue: &'static str, name: &'static str, deadline: Instant) -> Self {
        Op { queue, name, deadline, job_id: None }
    }

    /// An operation that must start within `timeout` from now.
    pub fn within(queue: &'static str, name: &'static str, timeout: Duration) -> Self {
        Op::new(queue, name, Instant::now() + timeout)
    }

    /// Tags the operation with the job it serves (for inspection and logs).
    pub fn job(mut self, job_id: Option<Uuid>) -> Self {
        self.job_id = job_id;
        self
    }

    /// The queue.
    pub fn queue(&self) -> &'static str {
        self.queue
    }

    /// The name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The absolute deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The job, if any.
    pub fn job_id(&self) -> Option<Uuid> {
        self.job_id
    }
}

/// What a running operation sees: its actor's identity and state, its deadline and job, the
/// kind's shared object and the runtime (for child operations on other actors).
pub struct OpCtx<E: Entity> {
    pub(crate) kind: Kind<E>,
    pub(crate) id: Uuid,
    pub(crate) op: Op,
    pub(crate) state: Rc<RefCell<E::State>>,
    pub(crate) passivate: Rc<std::cell::Cell<bool>>,
}

impl<E: Entity> std::fmt::Debug for OpCtx<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpCtx").field("actor", &self.actor()).field("op", &self.op).finish()
    }
}

impl<E: Entity> OpCtx<E> {
    /// The actor's UUID.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The actor's address.
    pub fn actor(&self) -> ActorId {
        ActorId { kind: E::KIND, id: self.id }
    }

    /// The kind's shared object.
    pub fn entity(&self) -> &E {
        self.kind.entity()
    }

    /// The kind's handle (to call other actors of the same kind).
    pub fn kind(&self) -> &Kind<E> {
        &self.kind
    }

    /// The runtime, for operations on actors of other kinds.
    pub fn runtime(&self) -> &Runtime {
        self.kind.runtime()
    }

    /// The operation's absolute deadline.
    pub fn deadline(&self) -> Instant {
        self.op.deadline
    }

    /// Time left before the deadline (zero when it has passed).
    pub fn remaining(&self) -> Duration {
        self.op.deadline.saturating_duration_since(Instant::now())
    }

    /// The job this operation serves.
    pub fn job_id(&self) -> Option<Uuid> {
        self.op.job_id
    }

    /// A child operation in `queue` that inherits this operation's deadline and job.
    pub fn child(&self, queue: &'static str, name: &'static str) -> Op {
        Op { queue, name, deadline: self.op.deadline, job_id: self.op.job_id }
    }

    /// Runs `f` with the actor's state. The borrow ends when `f` returns, so it can never be
    /// held across an await (where another operation of this actor may run).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut E::State) -> R) -> R {
        f(&mut self.state.borrow_mut())
    }

    /// Asks the runtime to passivate the actor once it is idle (for example after the
    /// resource was deleted), instead of waiting for the idle timeout.
    pub fn passivate_when_idle(&self) {
        self.passivate.set(true);
    }
}

/// How an operation ended, as far as the runtime's bookkeeping is concerned.
#[derive(Debug)]
pub(crate) enum Outcome {
    Ok,
    Err(String),
    Panicked(String),
}

pub(crate) type LocalOutcome = Pin<Box<dyn Future<Output = Outcome>>>;

/// A type-erased operation: the runtime can start it or reject it without knowing its types.
/// Whatever happens, its caller gets exactly one reply: the result, the rejection, or (if the
/// envelope is dropped unstarted, as on shutdown) [`RuntimeError::Shutdown`].
pub(crate) trait Envelope<E: Entity>: Send {
    fn op(&self) -> &Op;
    fn start(self: Box<Self>, ctx: OpCtx<E>) -> LocalOutcome;
    fn reject(self: Box<Self>, error: RuntimeError);
}

pub(crate) struct TypedEnvelope<F, T, Err: From<RuntimeError>> {
    pub(crate) op: Op,
    pub(crate) actor: ActorId,
    pub(crate) f: Option<F>,
    pub(crate) reply: Option<oneshot::Sender<Result<T, Err>>>,
}

impl<F, T, Err: From<RuntimeError>> Drop for TypedEnvelope<F, T, Err> {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            // Only reachable when the actor went away with this envelope undelivered.
            let _ = reply.send(Err(Err::from(RuntimeError::Shutdown)));
        }
    }
}

impl<E, F, Fut, T, Err> Envelope<E> for TypedEnvelope<F, T, Err>
where
    E: Entity,
    F: FnOnce(OpCtx<E>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, Err>> + 'static,
    T: Send + 'static,
    Err: From<RuntimeError> + std::fmt::Display + Send + 'static,
{
    fn op(&self) -> &Op {
        &self.op
    }

    fn start(mut self: Box<Self>, ctx: OpCtx<E>) -> LocalOutcome {
        let f = self.f.take().expect("an envelope starts once");
        let reply = self.reply.take().expect("an envelope replies once");
        let (actor, op) = (self.actor, self.op);
        Box::pin(async move {
            // Building the future may panic as well as polling it. The chaos runs inject
            // panics here (failpoint `actor-op`), inside the guard, as a bug in an
            // operation would panic.
            let result = match std::panic::catch_unwind(AssertUnwindSafe(|| {
                fail::fail_point!("actor-op");
                f(ctx)
            })) {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(payload) => Err(payload),
            };
            match result {
                Ok(Ok(value)) => {
                    let _ = reply.send(Ok(value));
                    Outcome::Ok
                }
                Ok(Err(err)) => {
                    let text = err.to_string();
                    let _ = reply.send(Err(err));
                    Outcome::Err(text)
                }
                Err(payload) => {
                    let message = panic_message(&*payload);
                    let _ = reply.send(Err(Err::from(RuntimeError::Internal {
                        actor,
                        operation: op.name,
                        message: message.clone(),
                    })));
                    Outcome::Panicked(message)
                }
            }
        })
    }

    fn reject(mut self: Box<Self>, error: RuntimeError) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(Err::from(error)));
        }
    }
}
