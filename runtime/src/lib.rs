//! Strato's actor runtime: actix and tokio, plus what actix lacks for a control plane.
//!
//! Every resource (a VM, a host, a network) is an actor addressed by kind and UUID. This
//! crate provides, without knowing what any resource is:
//!
//! - **keyed queues** ([`Op`], [`KindConfig::queue`]): an operation names a queue of its
//!   actor; a queue of level N runs at most N operations at once, starts them in FIFO order and
//!   holds a slot until the operation's async work has finished (ZStack's `ChainTask`); its
//!   depth is bounded (`Busy` beyond it);
//! - **panic isolation and supervision** (the actor cell): a panicking operation answers
//!   `Internal`, the actor reloads its state from the store before its next operation, and
//!   beyond a restart budget it is `Failed` until restarted by hand;
//! - **registry and activation** ([`Kind`]): the first message activates an actor by loading
//!   it, concurrent first messages activate exactly one, idle actors passivate;
//! - **deadlines** on every operation, inherited by child operations;
//! - **flows** ([`FlowEngine`]): persisted chains of steps with rollback and crash recovery;
//! - **the garbage collector** ([`Gc`]): persisted retrying clean-up jobs;
//! - **the event bus** ([`EventBus`]), where a slow subscriber never blocks a publisher;
//! - **inspection** ([`Runtime::snapshot`]) of every live actor, flow and job.
//!
//! The runtime depends on the storage crate only through [`strato_storage::Db`]; it knows
//! nothing of VMs or hosts.

mod cell;
mod config;
mod entity;
mod error;
mod event;
mod flow;
mod gc;
mod inspect;
mod kind;
mod runtime;

pub use config::{KindConfig, QueueConfig, QueueSpec, RestartBudget, RuntimeConfig};
pub use entity::{Entity, Op, OpCtx};
pub use error::{ActorId, BoxError, RuntimeError, StepError, error_chain};
pub use event::{DynEvent, Event, EventBus, EventMatcher, SubscriberInfo, Subscription};
pub use flow::{
    ChainSpec, FlowContext, FlowEngine, FlowInfo, FlowJob, FlowPhase, FlowRecord, FlowView,
    RecoveryReport, Step,
};
pub use gc::{Gc, GcJobRecord, GcJobView, GcPolicy, GcRunResult, Trigger};
pub use inspect::{
    ActorSnapshot, ActorStatus, FinishedOp, OpResult, OpSnapshot, QueueSnapshot, RestartRecord,
    unix_ms_now,
};
pub use kind::{Kind, KindCounters};
pub use runtime::{
    ActorFailed, ActorFilter, ActorRestarted, KindSnapshot, QueueSetting, Runtime, RuntimeSnapshot,
    release_memory,
};
