//! The runtime's one error type, [`RuntimeError`].
//!
//! Operations return their own domain error type; it must be convertible from
//! `RuntimeError`, so a caller sees either what its operation said or why the runtime could
//! not run it. Every variant names the actor it concerns, so an error read in a log or an API
//! reply says where to look.

use std::fmt;
use std::sync::Arc;

use strato_storage::StoreError;
pub use strato_storage::error_chain;

use uuid::Uuid;

/// A boxed error for hooks the runtime calls but does not interpret (loading state, flow
/// steps, GC handlers).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A flow step's error, kept as the step returned it, shared by the clones of the
/// [`RuntimeError::FlowFailed`] that carries it.
pub type StepError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// An actor's address: its kind and UUID, printed as `kind/uuid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ActorId {
    /// The actor kind ("vm", "host", ...).
    pub kind: &'static str,
    /// The resource UUID.
    pub id: Uuid,
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// Why the runtime did not run an operation, or what happened to it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No record exists for this UUID.
    #[error("{actor} not found")]
    NotFound {
        /// The actor addressed.
        actor: ActorId,
    },
    /// The queue already holds its maximum of pending operations; retry later.
    #[error("{actor} is busy: queue `{queue}` already has {depth} pending operations")]
    Busy {
        /// The actor addressed.
        actor: ActorId,
        /// The full queue.
        queue: &'static str,
        /// How many operations were pending.
        depth: usize,
    },
    /// The operation's deadline passed before it could start; it did not run.
    #[error("{actor}: operation `{operation}` timed out in queue `{queue}` before it started")]
    Timeout {
        /// The actor addressed.
        actor: ActorId,
        /// The queue it waited in.
        queue: &'static str,
        /// The operation's name.
        operation: &'static str,
    },
    /// The operation panicked; the actor was restarted (or marked failed).
    #[error("{actor}: operation `{operation}` panicked: {message}")]
    Internal {
        /// The actor addressed.
        actor: ActorId,
        /// The operation's name.
        operation: &'static str,
        /// The panic message.
        message: String,
    },
    /// The actor exceeded its restart budget and refuses operations until restarted by hand.
    #[error("{actor} has failed and refuses operations until it is restarted: {reason}")]
    Failed {
        /// The actor addressed.
        actor: ActorId,
        /// The last failure.
        reason: String,
    },
    /// The actor's state could not be loaded; the next operation will try again.
    #[error("{actor} is unavailable: {reason}")]
    Unavailable {
        /// The actor addressed.
        actor: ActorId,
        /// What the loader said.
        reason: String,
    },
    /// The runtime is shutting down.
    #[error("the runtime is shutting down")]
    Shutdown,
    /// A serial queue's level cannot be raised (see `QueueConfig::serial`).
    #[error(
        "queue `{queue}` of {kind} is serial: its operations must run one at a time, so its level stays 1"
    )]
    SerialQueue {
        /// The actor kind.
        kind: String,
        /// The queue.
        queue: String,
    },
    /// An operation named a queue its actor kind does not declare (a typo would otherwise
    /// run it in a queue nobody configured, with nothing to serialize it).
    #[error("{kind} declares no queue `{queue}`")]
    UndeclaredQueue {
        /// The actor kind.
        kind: &'static str,
        /// The queue named.
        queue: &'static str,
    },
    /// No actor kind with this name is registered.
    #[error("no actor kind `{kind}` is registered")]
    UnknownKind {
        /// The kind asked for.
        kind: String,
    },
    /// The runtime's own records (flows, GC jobs) could not be read or written.
    #[error("the runtime's store failed")]
    Store(#[source] Arc<StoreError>),
    /// A flow step failed; the completed steps were rolled back.
    #[error("flow `{chain}` failed at step `{step}`: {message}{}", rollback_note(.rollback_failures))]
    FlowFailed {
        /// The chain's name.
        chain: String,
        /// The step that failed.
        step: String,
        /// The step's error, with its causes.
        message: String,
        /// Steps whose rollback failed too, with their errors (those steps may have left
        /// something behind; the rest of the chain was still rolled back).
        rollback_failures: Vec<String>,
        /// The step's error as the step returned it, so a caller can tell what failed by its
        /// type (`None` when the failure was not a step's own error in this process). Not
        /// a `source`: `message` already tells it.
        cause: Option<StepError>,
    },
    /// No flow chain or GC job kind with this name is defined.
    #[error("no {what} named `{name}` is defined")]
    Undefined {
        /// "flow chain", "flow step" or "GC job kind".
        what: &'static str,
        /// The name asked for.
        name: String,
    },
}

fn rollback_note(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!(" (rollback also failed: {})", failures.join("; "))
    }
}

impl From<StoreError> for RuntimeError {
    fn from(error: StoreError) -> Self {
        RuntimeError::Store(Arc::new(error))
    }
}

impl RuntimeError {
    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::NotFound { .. } => "RUNTIME.NOT_FOUND",
            RuntimeError::Busy { .. } => "RUNTIME.BUSY",
            RuntimeError::Timeout { .. } => "RUNTIME.TIMEOUT",
            RuntimeError::Internal { .. } => "RUNTIME.INTERNAL",
            RuntimeError::Failed { .. } => "RUNTIME.ACTOR_FAILED",
            RuntimeError::Unavailable { .. } => "RUNTIME.UNAVAILABLE",
            RuntimeError::Shutdown => "RUNTIME.SHUTDOWN",
            RuntimeError::UnknownKind { .. } => "RUNTIME.UNKNOWN_KIND",
            RuntimeError::Store(_) => "RUNTIME.STORE",
            RuntimeError::FlowFailed { .. } => "RUNTIME.FLOW_FAILED",
            RuntimeError::Undefined { .. } => "RUNTIME.UNDEFINED",
            RuntimeError::SerialQueue { .. } => "RUNTIME.SERIAL_QUEUE",
            RuntimeError::UndeclaredQueue { .. } => "RUNTIME.UNDECLARED_QUEUE",
        }
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
