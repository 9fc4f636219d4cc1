//! What the runtime tells about itself: snapshots of actors, their queues and operations.
//!
//! The debug console, `strato debug`, the `/debug/...` JSON and the chaos checks all read
//! these types, so they are plain serializable data with times given both as ages (for people)
//! and as Unix milliseconds (for scripts comparing snapshots).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use uuid::Uuid;

/// An actor's lifecycle status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ActorStatus {
    /// Loading its state; operations wait.
    Activating,
    /// Running operations.
    Active,
    /// An operation panicked; it finishes what runs, reloads its state, then goes on.
    Restarting,
    /// Over its restart budget; refuses operations until restarted by hand.
    Failed,
    /// Its resource does not exist (or could not be loaded); it is leaving the registry.
    Gone,
}

/// One queue of one actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueSnapshot {
    /// The queue's name.
    pub name: &'static str,
    /// Operations allowed to run at once (the override if set, else the kind's setting).
    pub level: usize,
    /// A level set on this actor alone, if any.
    pub level_override: Option<usize>,
    /// Whether the queue is serial (its level is 1 for good).
    pub serial: bool,
    /// Pending operations allowed.
    pub max_pending: usize,
    /// Operations running now.
    pub running: usize,
    /// Operations waiting.
    pub pending: usize,
    /// How long the oldest pending operation has waited.
    pub oldest_pending_ms: Option<u64>,
}

/// An operation that is running or waiting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OpSnapshot {
    /// Its queue.
    pub queue: &'static str,
    /// Its name.
    pub name: &'static str,
    /// The job it serves.
    pub job_id: Option<Uuid>,
    /// When it started (running) or was queued (pending), Unix ms.
    pub since_unix_ms: u64,
    /// How long ago that was.
    pub age_ms: u64,
    /// Its deadline, Unix ms.
    pub deadline_unix_ms: u64,
}

/// How a finished operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "message", rename_all = "lowercase")]
pub enum OpResult {
    /// It returned success.
    Ok,
    /// It returned an error.
    Error(String),
    /// It panicked.
    Panic(String),
    /// It was refused before it ran (timeout, busy, failed actor).
    Refused(String),
}

/// A finished operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FinishedOp {
    /// Its queue.
    pub queue: &'static str,
    /// Its name.
    pub name: &'static str,
    /// The job it served.
    pub job_id: Option<Uuid>,
    /// When it ended, Unix ms.
    pub ended_unix_ms: u64,
    /// How long it ran, in microseconds.
    pub duration_us: u64,
    /// How it ended.
    #[serde(flatten)]
    pub result: OpResult,
}

/// One restart of an actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestartRecord {
    /// When, Unix ms.
    pub at_unix_ms: u64,
    /// Why (the panic message).
    pub reason: String,
}

/// Everything an actor reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActorSnapshot {
    /// Its kind.
    pub kind: &'static str,
    /// Its UUID.
    pub id: Uuid,
    /// The supervisor responsible for it.
    pub supervisor: String,
    /// Its status.
    pub status: ActorStatus,
    /// Why it is restarting or failed.
    pub status_reason: Option<String>,
    /// When it was activated, Unix ms.
    pub activated_unix_ms: u64,
    /// Its queues.
    pub queues: Vec<QueueSnapshot>,
    /// Operations running now.
    pub running: Vec<OpSnapshot>,
    /// Operations waiting, oldest first per queue.
    pub pending: Vec<OpSnapshot>,
    /// Operations finished since activation.
    pub processed: u64,
    /// Restarts since activation.
    pub restarts: u64,
    /// The most recent restarts.
    pub restart_log: Vec<RestartRecord>,
    /// The last error an operation returned or raised.
    pub last_error: Option<String>,
    /// The most recent finished operations, newest last.
    pub recent: Vec<FinishedOp>,
}

/// Converts between the monotonic clock the runtime runs on and wall-clock Unix time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    now: Instant,
    unix_ms: u64,
}

impl Clock {
    pub(crate) fn now() -> Self {
        Clock { now: Instant::now(), unix_ms: unix_ms_now() }
    }

    pub(crate) fn unix_ms(&self, at: Instant) -> u64 {
        if at >= self.now {
            self.unix_ms + (at - self.now).as_millis() as u64
        } else {
            self.unix_ms.saturating_sub((self.now - at).as_millis() as u64)
        }
    }

    pub(crate) fn age_ms(&self, since: Instant) -> u64 {
        self.now.saturating_duration_since(since).as_millis() as u64
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
