//! The [`Runtime`]: the actix system and its arbiter threads, the registry of actor kinds,
//! the event bus, the flow engine and the garbage collector, behind one cheap handle.
//!
//! The actix system runs on its own thread (`strato-system`) with one arbiter thread per
//! core by default; an actor lives on the arbiter its UUID hashes to, for its whole life, so
//! its operations never migrate between threads and its state needs no locks. Callers may be
//! anywhere (a tokio runtime, a plain thread): sending an operation is a channel send and the
//! reply comes back on a oneshot channel.
//!
//! Kinds register themselves with [`Runtime::register`]; from then on the runtime can
//! inspect, restart and re-level their actors by kind *name*, which is what the console and
//! the chaos checks need, without knowing their types.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use actix::{Arbiter, System};
use actix_rt::ArbiterHandle;
use async_trait::async_trait;
use serde::Serialize;
use strato_storage::Db;
use uuid::Uuid;

use crate::config::{KindConfig, QueueSpec, RuntimeConfig};
use crate::entity::Entity;
use crate::error::{ActorId, RuntimeError};
use crate::event::{Event, EventBus, SubscriberInfo};
use crate::flow::{FlowEngine, FlowView};
use crate::gc::{Gc, GcJobView, GcShared};
use crate::inspect::{ActorSnapshot, ActorStatus};
use crate::kind::{Kind, KindCounters};

/// Published when an actor restarted after a panic (or by hand) and reloaded its state.
#[derive(Clone, Debug)]
pub struct ActorRestarted {
    /// The actor.
    pub actor: ActorId,
    /// Why it restarted.
    pub reason: String,
    /// Restarts of this actor since it was activated.
    pub restarts: u64,
}

impl Event for ActorRestarted {
    fn topic(&self) -> &'static str {
        "actor.restarted"
    }

    fn field(&self, name: &str) -> Option<String> {
        match name {
            "kind" => Some(self.actor.kind.to_owned()),
            "uuid" => Some(self.actor.id.to_string()),
            _ => None,
        }
    }
}

/// Published when an actor exhausted its restart budget and became `Failed`.
#[derive(Clone, Debug)]
pub struct ActorFailed {
    /// The actor.
    pub actor: ActorId,
    /// The last failure.
    pub reason: String,
}

impl Event for ActorFailed {
    fn topic(&self) -> &'static str {
        "actor.failed"
    }

    fn field(&self, name: &str) -> Option<String> {
        match name {
            "kind" => Some(self.actor.kind.to_owned()),
            "uuid" => Some(self.actor.id.to_string()),
            _ => None,
        }
    }
}

/// What the runtime can do with a kind it only knows by name.
#[async_trait]
trait ErasedKind: Send + Sync {
    fn counters(&self) -> KindCounters;
    fn live_ids(&self) -> Vec<Uuid>;
    fn queue(&self, name: &str) -> Option<Arc<QueueSpec>>;
    fn queue_settings(&self) -> Vec<QueueSetting>;
    async fn inspect(&self, id: Uuid) -> Option<ActorSnapshot>;
    async fn restart(&self, id: Uuid) -> Result<(), RuntimeError>;
    async fn set_actor_queue_level(&self, id: Uuid, queue: &str, level: Option<usize>) -> bool;
}

#[async_trait]
impl<E: Entity> ErasedKind for Kind<E> {
    fn counters(&self) -> KindCounters {
        Kind::counters(self)
    }

    fn live_ids(&self) -> Vec<Uuid> {
        Kind::live_ids(self)
    }

    fn queue(&self, name: &str) -> Option<Arc<QueueSpec>> {
        Kind::queue_settings(self).into_iter().find(|(queue, _)| *queue == name).map(|(_, s)| s)
    }

    fn queue_settings(&self) -> Vec<QueueSetting> {
        Kind::queue_settings(self)
            .into_iter()
            .map(|(name, spec)| {
                let (running, pending) = spec.depth();
                QueueSetting {
                    name,
                    level: spec.level(),
                    max_pending: spec.max_pending(),
                    serial: spec.is_serial(),
                    running,
                    pending,
                }
            })
            .collect()
    }

    async fn inspect(&self, id: Uuid) -> Option<ActorSnapshot> {
        Kind::inspect(self, id).await
    }

    async fn restart(&self, id: Uuid) -> Result<(), RuntimeError> {
        Kind::restart(self, id).await
    }

    async fn set_actor_queue_level(&self, id: Uuid, queue: &str, level: Option<usize>) -> bool {
        Kind::set_actor_queue_level(self, id, queue, level).await
    }
}

/// A queue kind's setting, shared by every actor of its kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueSetting {
    /// The queue's name.
    pub name: &'static str,
    /// Operations it runs at once.
    pub level: usize,
    /// Pending operations it accepts before answering `Busy`.
    pub max_pending: usize,
    /// Whether it is serial (its level is 1 for good).
    pub serial: bool,
    /// Operations running in it now, over every actor of the kind.
    pub running: usize,
    /// Operations waiting in it now, over every actor of the kind.
    pub pending: usize,
}

/// One kind in a [`RuntimeSnapshot`].
#[derive(Clone, Debug, Serialize)]
pub struct KindSnapshot {
    /// The kind's name.
    pub kind: &'static str,
    /// Its supervisor's name (one per kind).
    pub supervisor: String,
    /// Live actors, activations and departures.
    pub counters: KindCounters,
    /// Its queue kinds and their settings.
    pub queues: Vec<QueueSetting>,
}

/// Everything the runtime is doing: the console and the chaos checks read this.
#[derive(Clone, Debug, Serialize)]
pub struct RuntimeSnapshot {
    /// When the snapshot was taken (ms since the Unix epoch).
    pub taken_unix_ms: u64,
    /// Every registered kind.
    pub kinds: Vec<KindSnapshot>,
    /// Every live actor that matched the filter.
    pub actors: Vec<ActorSnapshot>,
    /// Flows in progress.
    pub flows_in_progress: Vec<FlowView>,
    /// Flows that finished recently (done or rolled back), newest last.
    pub flows_recent: Vec<FlowView>,
    /// Garbage-collector jobs.
    pub gc_jobs: Vec<GcJobView>,
    /// Event-bus subscribers and what each dropped.
    pub subscribers: Vec<SubscriberInfo>,
}

/// Which actors a snapshot includes.
#[derive(Clone, Debug, Default)]
pub struct ActorFilter {
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this UUID.
    pub id: Option<Uuid>,
    /// Only actors in this status.
    pub status: Option<ActorStatus>,
    /// At most this many actors (sorted by kind, then UUID); `None` for all.
    pub limit: Option<usize>,
}

struct Registered {
    name: &'static str,
    erased: Arc<dyn ErasedKind>,
    typed: Box<dyn Any + Send + Sync>,
}

struct SystemThread {
    system: System,
    thread: JoinHandle<()>,
}

struct RuntimeInner {
    config: RuntimeConfig,
    db: Db,
    events: EventBus,
    arbiters: Vec<ArbiterHandle>,
    system: Mutex<Option<SystemThread>>,
    kinds: RwLock<Vec<Registered>>,
    by_type: RwLock<HashMap<TypeId, usize>>,
    flows: OnceLock<FlowEngine>,
    gc: Arc<GcShared>,
}

/// The actor runtime. Cheap to clone; every clone is the same runtime.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("arbiters", &self.inner.arbiters.len())
            .field("kinds", &self.kind_names())
            .finish()
    }
}

impl Runtime {
    /// Starts the actix system and its arbiters, the flow engine and the garbage collector
    /// (whose scheduler waits for [`Gc::start`]), on `db`.
    pub fn start(config: RuntimeConfig, db: Db) -> Result<Runtime, RuntimeError> {
        let count = config.arbiter_count();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("strato-system".into())
            .spawn(move || {
                let runner = System::new();
                let arbiters: Vec<Arbiter> = (0..count).map(|_| Arbiter::new()).collect();
                let handles: Vec<ArbiterHandle> = arbiters.iter().map(Arbiter::handle).collect();
                if tx.send((System::current(), handles)).is_err() {
                    return;
                }
                if let Err(error) = runner.run() {
                    tracing::error!(%error, "actix system ended with an error");
                }
                for arbiter in arbiters {
                    arbiter.stop();
                    let _ = arbiter.join();
                }
            })
            .map_err(|_| RuntimeError::Shutdown)?;
        let (system, arbiters) = rx.recv().map_err(|_| RuntimeError::Shutdown)?;
        let runtime = Runtime {
            inner: Arc::new(RuntimeInner {
                config: config.clone(),
                db: db.clone(),
                events: EventBus::new(),
                arbiters,
                system: Mutex::new(Some(SystemThread { system, thread })),
                kinds: RwLock::new(Vec::new()),
                by_type: RwLock::new(HashMap::new()),
                flows: OnceLock::new(),
                gc: GcShared::new(db.clone(), config.gc),
            }),
        };
        let _ = runtime.inner.flows.set(FlowEngine::new(runtime.db().clone()));
        crate::gc::register(&runtime, runtime.inner.gc.clone());
        runtime.start_housekeeping(Duration::from_secs(10), 10_000);
        tracing::info!(arbiters = count, store = runtime.db().backend_name(), "runtime started");
        Ok(runtime)
    }

    /// The store the runtime and its kinds use.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    /// The flow engine.
    pub fn flows(&self) -> &FlowEngine {
        self.inner.flows.get().expect("set at start")
    }

    /// The garbage collector.
    pub fn gc(&self) -> Gc {
        Gc::new(self.clone())
    }

    pub(crate) fn gc_shared(&self) -> Arc<GcShared> {
        self.inner.gc.clone()
    }

    /// The arbiter actor `id` lives on.
    pub(crate) fn arbiter_for(&self, id: Uuid) -> ArbiterHandle {
        let arbiters = &self.inner.arbiters;
        arbiters[(id.as_u64_pair().1 % arbiters.len() as u64) as usize].clone()
    }

    /// Any arbiter, for the runtime's own background tasks.
    pub(crate) fn service_arbiter(&self) -> ArbiterHandle {
        self.inner.arbiters[0].clone()
    }

    /// Runs `future` on the arbiter thread of actor `id`, so it talks to that actor without
    /// crossing threads (a driver colocated with the actors it drives). Returns false once the
    /// runtime has stopped.
    pub fn spawn_near(&self, id: Uuid, future: impl Future<Output = ()> + Send + 'static) -> bool {
        self.arbiter_for(id).spawn(future)
    }

    /// Total departures (passivations) across kinds, for memory housekeeping.
    fn departures(&self) -> u64 {
        self.inner
            .kinds
            .read()
            .expect("kinds lock")
            .iter()
            .map(|k| k.erased.counters().departures)
            .sum()
    }

    /// Every `interval`, if at least `threshold` actors passivated since the last time, gives
    /// the allocator's free memory back to the system (see [`release_memory`]).
    fn start_housekeeping(&self, interval: Duration, threshold: u64) {
        let weak = Arc::downgrade(&self.inner);
        self.service_arbiter().spawn(async move {
            let mut trimmed_at = 0;
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let runtime = Runtime { inner };
                let departures = runtime.departures();
                if departures.saturating_sub(trimmed_at) >= threshold {
                    trimmed_at = departures;
                    release_memory();
                }
            }
        });
    }

    /// Registers an actor kind. Settings for the kind in the runtime's config (by name)
    /// replace `defaults`. Registering a kind twice returns the first registration's handle.
    pub fn register<E: Entity>(&self, entity: E, defaults: KindConfig) -> Kind<E> {
        if let Some(kind) = self.kind::<E>() {
            return kind;
        }
        let config = match self.inner.config.kinds.get(E::KIND) {
            Some(set) => set.clone().over(E::KIND, &defaults),
            None => defaults,
        };
        let kind = Kind::new(entity, self.clone(), config);
        let mut kinds = self.inner.kinds.write().expect("kinds lock");
        self.inner.by_type.write().expect("kinds lock").insert(TypeId::of::<E>(), kinds.len());
        kinds.push(Registered {
            name: E::KIND,
            erased: Arc::new(kind.clone()),
            typed: Box::new(kind.clone()),
        });
        kind
    }

    /// The handle of a registered kind.
    pub fn kind<E: Entity>(&self) -> Option<Kind<E>> {
        let index = *self.inner.by_type.read().expect("kinds lock").get(&TypeId::of::<E>())?;
        let kinds = self.inner.kinds.read().expect("kinds lock");
        kinds[index].typed.downcast_ref::<Kind<E>>().cloned()
    }

    fn erased(&self, kind: &str) -> Result<Arc<dyn ErasedKind>, RuntimeError> {
        self.inner
            .kinds
            .read()
            .expect("kinds lock")
            .iter()
            .find(|k| k.name == kind)
            .map(|k| k.erased.clone())
            .ok_or_else(|| RuntimeError::UnknownKind { kind: kind.to_owned() })
    }

    /// Names of the registered kinds.
    pub fn kind_names(&self) -> Vec<&'static str> {
        self.inner.kinds.read().expect("kinds lock").iter().map(|k| k.name).collect()
    }

    /// A snapshot of one live actor, by kind name (never activates it).
    pub async fn inspect(
        &self,
        kind: &str,
        id: Uuid,
    ) -> Result<Option<ActorSnapshot>, RuntimeError> {
        Ok(self.erased(kind)?.inspect(id).await)
    }

    /// Restarts an actor by hand (see [`Kind::restart`]).
    pub async fn restart(&self, kind: &str, id: Uuid) -> Result<(), RuntimeError> {
        self.erased(kind)?.restart(id).await
    }

    /// Sets the level of `queue` for every actor of `kind`; it applies to the next start.
    pub fn set_queue_level(
        &self,
        kind: &str,
        queue: &str,
        level: usize,
    ) -> Result<(), RuntimeError> {
        let spec = self.erased(kind)?.queue(queue).ok_or_else(|| RuntimeError::Undefined {
            what: "queue",
            name: format!("{kind}/{queue}"),
        })?;
        refuse_serial(kind, queue, &spec, Some(level))?;
        tracing::info!(kind, queue, level, "queue level changed");
        spec.set_level(level);
        Ok(())
    }

    /// Sets (or clears) the level of `queue` on one actor only.
    pub async fn set_actor_queue_level(
        &self,
        kind: &str,
        id: Uuid,
        queue: &str,
        level: Option<usize>,
    ) -> Result<bool, RuntimeError> {
        let erased = self.erased(kind)?;
        if let Some(spec) = erased.queue(queue) {
            refuse_serial(kind, queue, &spec, level)?;
        }
        Ok(erased.set_actor_queue_level(id, queue, level).await)
    }

    /// Every kind with its counters and its queues' settings and depths, without asking any
    /// actor (cheap enough for every metrics scrape).
    pub fn kinds(&self) -> Vec<KindSnapshot> {
        self.inner
            .kinds
            .read()
            .expect("kinds lock")
            .iter()
            .map(|k| KindSnapshot {
                kind: k.name,
                supervisor: format!("{}-supervisor", k.name),
                counters: k.erased.counters(),
                queues: k.erased.queue_settings(),
            })
            .collect()
    }

    /// A snapshot of the runtime: kinds, the live actors matching `filter`, flows, GC jobs
    /// and event subscribers.
    pub async fn snapshot(&self, filter: &ActorFilter) -> Result<RuntimeSnapshot, RuntimeError> {
        let registered: Vec<(&'static str, Arc<dyn ErasedKind>)> = self
            .inner
            .kinds
            .read()
            .expect("kinds lock")
            .iter()
            .map(|k| (k.name, k.erased.clone()))
            .collect();
        let mut kinds = Vec::new();
        let mut actors = Vec::new();
        for (name, kind) in &registered {
            kinds.push(KindSnapshot {
                kind: name,
                supervisor: format!("{name}-supervisor"),
                counters: kind.counters(),
                queues: kind.queue_settings(),
            });
            if filter.kind.as_deref().is_some_and(|k| k != *name) {
                continue;
            }
            let mut ids = match filter.id {
                Some(id) => vec![id],
                None => kind.live_ids(),
            };
            ids.sort_unstable();
            let snapshots = futures::future::join_all(ids.iter().map(|id| kind.inspect(*id))).await;
            actors.extend(
                snapshots
                    .into_iter()
                    .flatten()
                    .filter(|s| filter.status.is_none_or(|status| s.status == status)),
            );
            if filter.limit.is_some_and(|limit| actors.len() >= limit) {
                break;
            }
        }
        if let Some(limit) = filter.limit {
            actors.truncate(limit);
        }
        Ok(RuntimeSnapshot {
            taken_unix_ms: crate::inspect::unix_ms_now(),
            kinds,
            actors,
            flows_in_progress: self.flows().in_progress()?,
            flows_recent: self.flows().recent(),
            gc_jobs: self.gc().list()?,
            subscribers: self.events().subscribers(),
        })
    }

    /// Stops the garbage collector's scheduler, every actor and the arbiter threads, and
    /// waits for them. Operations still pending get [`RuntimeError::Shutdown`]. Idempotent.
    pub fn shutdown(&self) {
        let Some(system) = self.inner.system.lock().expect("system lock").take() else {
            return;
        };
        self.gc().stop();
        system.system.stop();
        if system.thread.join().is_err() {
            tracing::error!("the actix system thread panicked");
        }
        // Kinds hold the runtime, and flow steps and GC handlers usually hold kinds, while the
        // runtime holds all three: break the cycles so the store closes once the last handle
        // is dropped.
        self.inner.kinds.write().expect("kinds lock").clear();
        self.inner.by_type.write().expect("kinds lock").clear();
        self.flows().clear();
        self.inner.gc.clear_handlers();
        tracing::info!("runtime stopped");
    }
}

/// Returns the allocator's free memory to the operating system.
///
/// glibc keeps the memory of freed small allocations in its arenas; after a million actors
/// passivate, the process would otherwise keep their ~1 GB resident although nothing uses it.
/// The runtime calls this on its own after many passivations; it is public for benchmarks and
/// for operators who want it now.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
    // pointers from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Refuses a level other than 1 for a serial queue: the one check behind both ways of
/// setting a level (the kind's and one actor's).
fn refuse_serial(
    kind: &str,
    queue: &str,
    spec: &QueueSpec,
    level: Option<usize>,
) -> Result<(), RuntimeError> {
    match level {
        Some(level) if level != 1 && spec.is_serial() => {
            Err(RuntimeError::SerialQueue { kind: kind.to_owned(), queue: queue.to_owned() })
        }
        _ => Ok(()),
    }
}
