//! One actor kind: its registry of live actors, activation on first message, and the typed
//! handle ([`Kind`]) through which operations are sent.
//!
//! The registry is a sharded map from UUID to the live actor's address. Activation happens
//! under the shard lock, so concurrent first messages to one UUID create exactly one actor.
//! Every message sent through the registry is counted in the actor's slot under the same
//! lock; an actor leaves the registry (passivates) only when it has received as many
//! messages as were sent to it, which closes the race between "the actor decides to
//! passivate" and "a caller just looked up its address".

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::cell::{ActorCell, Control, Submit};
use crate::config::{KindConfig, QueueSpec, QueueSpecs};
use crate::entity::{Entity, Op, OpCtx, TypedEnvelope};
use crate::error::{ActorId, RuntimeError};
use crate::inspect::ActorSnapshot;
use crate::runtime::Runtime;

const SHARDS: usize = 64;

struct Slot<E: Entity> {
    addr: Addr<ActorCell<E>>,
    incarnation: u64,
    sent: u64,
}

/// One shard of the registry.
type Shard<E> = Mutex<HashMap<Uuid, Slot<E>>>;

pub(crate) struct KindShared<E: Entity> {
    entity: E,
    runtime: Runtime,
    specs: QueueSpecs,
    shards: Box<[Shard<E>]>,
    incarnations: AtomicU64,
    activations: AtomicU64,
    departures: AtomicU64,
}

/// The handle to an actor kind: sends operations to its actors. Cheap to clone.
pub struct Kind<E: Entity> {
    shared: Arc<KindShared<E>>,
}

impl<E: Entity> Clone for Kind<E> {
    fn clone(&self) -> Self {
        Kind { shared: self.shared.clone() }
    }
}

impl<E: Entity> std::fmt::Debug for Kind<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kind").field("kind", &E::KIND).field("live", &self.live_count()).finish()
    }
}

/// Counters of one actor kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KindCounters {
    /// Actors live now.
    pub live: usize,
    /// Activations since start.
    pub activations: u64,
    /// Actors that left the registry (passivated or not found) since start.
    pub departures: u64,
}

impl<E: Entity> Kind<E> {
    pub(crate) fn new(entity: E, runtime: Runtime, config: KindConfig) -> Self {
        Kind {
            shared: Arc::new(KindShared {
                entity,
                runtime,
                specs: QueueSpecs::new(config),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                incarnations: AtomicU64::new(0),
                activations: AtomicU64::new(0),
                departures: AtomicU64::new(0),
            }),
        }
    }

    /// The kind's shared object.
    pub fn entity(&self) -> &E {
        &self.shared.entity
    }

    /// The runtime this kind lives in.
    pub fn runtime(&self) -> &Runtime {
        &self.shared.runtime
    }

    pub(crate) fn config(&self) -> &KindConfig {
        self.shared.specs.config()
    }

    /// The spec of declared queue `queue` (`UndeclaredQueue` for any other).
    pub(crate) fn queue_spec(&self, queue: &'static str) -> Result<Arc<QueueSpec>, RuntimeError> {
        self.shared.specs.get(queue).ok_or(RuntimeError::UndeclaredQueue { kind: E::KIND, queue })
    }

    /// The live setting of `queue` for every actor of this kind. Changing its level applies
    /// to the next operation that starts.
    pub fn queue(&self, queue: &'static str) -> Result<Arc<QueueSpec>, RuntimeError> {
        self.queue_spec(queue)
    }

    fn shard(&self, id: Uuid) -> &Shard<E> {
        &self.shared.shards[(id.as_u64_pair().0 as usize) % SHARDS]
    }

    /// The address of actor `id`, counting one message sent; activates it when asked to.
    fn address(&self, id: Uuid, activate: bool) -> Option<Addr<ActorCell<E>>> {
        let mut shard = self.shard(id).lock().expect("registry shard");
        if let Some(slot) = shard.get_mut(&id) {
            slot.sent += 1;
            return Some(slot.addr.clone());
        }
        if !activate {
            return None;
        }
        let incarnation = self.shared.incarnations.fetch_add(1, Ordering::Relaxed);
        let kind = self.clone();
        let arbiter = self.shared.runtime.arbiter_for(id);
        let addr =
            ActorCell::start_in_arbiter(&arbiter, move |_| ActorCell::new(id, incarnation, kind));
        self.shared.activations.fetch_add(1, Ordering::Relaxed);
        shard.insert(id, Slot { addr: addr.clone(), incarnation, sent: 1 });
        Some(addr)
    }

    /// Removes actor `id` from the registry if this incarnation has received every message
    /// sent to it. Returns whether the actor may stop.
    pub(crate) fn try_remove(&self, id: Uuid, incarnation: u64, received: u64) -> bool {
        let mut shard = self.shard(id).lock().expect("registry shard");
        match shard.get(&id) {
            Some(slot) if slot.incarnation == incarnation => {
                if slot.sent == received {
                    shard.remove(&id);
                    self.shared.departures.fetch_add(1, Ordering::Relaxed);
                    true
                } else {
                    false
                }
            }
            // Not registered under this incarnation: nothing can reach it any more.
            _ => true,
        }
    }

    /// Runs `op` on actor `id` (activating it if needed) and returns what `f` returned, or
    /// why the runtime did not run it.
    ///
    /// `f` is sent to the actor's thread and called there with the operation's context; the
    /// future it returns runs on the actor and holds its queue slot until it completes.
    pub async fn call<F, Fut, T, Err>(&self, id: Uuid, op: Op, f: F) -> Result<T, Err>
    where
        F: FnOnce(OpCtx<E>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Err>> + 'static,
        T: Send + 'static,
        Err: From<RuntimeError> + std::fmt::Display + Send + 'static,
    {
        // Refused here, before the actor is activated or anything is queued.
        self.queue_spec(op.queue()).map_err(Err::from)?;
        let (reply, rx) = oneshot::channel();
        let envelope = TypedEnvelope {
            op,
            actor: ActorId { kind: E::KIND, id },
            f: Some(f),
            reply: Some(reply),
        };
        let addr = self.address(id, true).expect("activation always yields an address");
        addr.do_send(Submit(Box::new(envelope)));
        rx.await.unwrap_or_else(|_| Err(Err::from(RuntimeError::Shutdown)))
    }

    async fn control<T>(
        &self,
        id: Uuid,
        activate: bool,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Option<T> {
        let addr = self.address(id, activate)?;
        let (tx, rx) = oneshot::channel();
        addr.do_send(make(tx));
        rx.await.ok()
    }

    /// A snapshot of actor `id` if it is live (never activates it).
    pub async fn inspect(&self, id: Uuid) -> Option<ActorSnapshot> {
        self.control(id, false, Control::Inspect).await
    }

    /// Sets (or with `None` clears) a queue level on actor `id` alone. Returns false when the
    /// actor is not live or has no such queue.
    pub async fn set_actor_queue_level(&self, id: Uuid, queue: &str, level: Option<usize>) -> bool {
        let queue = queue.to_owned();
        self.control(id, false, |done| Control::SetQueueLevel { queue, level, done })
            .await
            .unwrap_or(false)
    }

    /// Restarts actor `id` by hand: a failed actor gets a fresh restart budget and reloads
    /// its state; an active one reloads its state once its running operations finish.
    pub async fn restart(&self, id: Uuid) -> Result<(), RuntimeError> {
        self.control(id, false, Control::Restart)
            .await
            .ok_or(RuntimeError::NotFound { actor: ActorId { kind: E::KIND, id } })
    }

    /// UUIDs of the live actors.
    pub fn live_ids(&self) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for shard in self.shared.shards.iter() {
            ids.extend(shard.lock().expect("registry shard").keys().copied());
        }
        ids
    }

    /// How many actors are live.
    pub fn live_count(&self) -> usize {
        self.shared.shards.iter().map(|s| s.lock().expect("registry shard").len()).sum()
    }

    /// The kind's counters.
    pub fn counters(&self) -> KindCounters {
        KindCounters {
            live: self.live_count(),
            activations: self.shared.activations.load(Ordering::Relaxed),
            departures: self.shared.departures.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn queue_settings(&self) -> Vec<(&'static str, Arc<crate::config::QueueSpec>)> {
        self.shared.specs.snapshot()
    }
}
