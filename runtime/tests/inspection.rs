//! The inspection snapshot: what the console and the chaos checks read.

mod common;

use std::time::Duration;

use common::harness;
use strato_runtime::{ActorFilter, ActorStatus, KindConfig, Op, OpResult, RuntimeError};
use tokio::sync::oneshot;
use uuid::Uuid;

#[tokio::test]
async fn snapshot_shows_queues_running_and_pending_operations_and_history() {
    let h = harness(KindConfig::default().queue("q", 1, 100));
    let id = h.create(1);
    let idle = h.create(2);
    h.kind
        .call(idle, Op::within("q", "fails", Duration::from_secs(5)), |_| async {
            Err::<(), _>(RuntimeError::Undefined { what: "test", name: "x".into() })
        })
        .await
        .unwrap_err();

    let job = Uuid::new_v4();
    let (open, gate) = oneshot::channel::<()>();
    let kind = h.kind.clone();
    let holder = tokio::spawn(async move {
        kind.call(
            id,
            Op::within("q", "hold", Duration::from_secs(30)).job(Some(job)),
            move |_| async move {
                let _ = gate.await;
                Ok::<_, RuntimeError>(())
            },
        )
        .await
    });
    let kind = h.kind.clone();
    let waiter = tokio::spawn(async move {
        kind.call(id, Op::within("q", "wait", Duration::from_secs(30)), |_| async {
            Ok::<_, RuntimeError>(())
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    // A flow in progress and a GC job appear in the same snapshot.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    h.runtime
        .flows()
        .define(strato_runtime::ChainSpec::new("held").step("wait", Held(gate.clone())));
    let flows = h.runtime.clone();
    let flow = tokio::spawn(async move { flows.flows().run("held", (), None).await });
    h.runtime
        .gc()
        .submit("inspect-me", "nobody", &(), strato_runtime::Trigger::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let snapshot = h.runtime.snapshot(&ActorFilter::default()).await.unwrap();
    assert_eq!(snapshot.flows_in_progress.len(), 1);
    assert_eq!(snapshot.flows_in_progress[0].current_step.as_deref(), Some("wait"));
    assert_eq!(snapshot.gc_jobs.len(), 1);
    assert_eq!(snapshot.gc_jobs[0].name, "inspect-me");
    gate.notify_one();
    flow.await.unwrap().unwrap();
    let kind = snapshot.kinds.iter().find(|k| k.kind == "counter").unwrap();
    assert_eq!(kind.counters.live, 2);
    assert_eq!(kind.supervisor, "counter-supervisor");
    assert!(snapshot.kinds.iter().any(|k| k.kind == "gc-job"), "the GC's own kind is listed");

    let busy = snapshot.actors.iter().find(|a| a.id == id).unwrap();
    assert_eq!(busy.status, ActorStatus::Active);
    let queue = &busy.queues[0];
    assert_eq!((queue.name, queue.level, queue.running, queue.pending), ("q", 1, 1, 1));
    assert!(queue.oldest_pending_ms.unwrap() >= 40);
    assert_eq!(busy.running.len(), 1);
    assert_eq!(busy.running[0].name, "hold");
    assert_eq!(busy.running[0].job_id, Some(job));
    assert!(busy.running[0].deadline_unix_ms > busy.running[0].since_unix_ms);
    assert_eq!(busy.pending[0].name, "wait");

    let failed_op = snapshot.actors.iter().find(|a| a.id == idle).unwrap();
    assert_eq!(failed_op.processed, 1);
    assert!(failed_op.last_error.as_deref().unwrap().contains("no test named"));
    assert!(matches!(failed_op.recent[0].result, OpResult::Error(_)));

    // Filters and limits keep large registries browsable.
    let only =
        h.runtime.snapshot(&ActorFilter { id: Some(idle), ..Default::default() }).await.unwrap();
    assert_eq!(only.actors.len(), 1);
    let limited =
        h.runtime.snapshot(&ActorFilter { limit: Some(1), ..Default::default() }).await.unwrap();
    assert_eq!(limited.actors.len(), 1);
    let json = serde_json::to_value(&snapshot).unwrap();
    assert!(json["actors"][0]["queues"][0]["level"].is_number());

    open.send(()).unwrap();
    holder.await.unwrap().unwrap();
    waiter.await.unwrap().unwrap();
    let after = h.kind.inspect(id).await.unwrap();
    assert_eq!(after.processed, 2);
    assert!(after.recent.iter().all(|op| op.result == OpResult::Ok));
}

#[tokio::test]
async fn inspecting_never_activates() {
    let h = harness(KindConfig::default());
    let id = h.create(1);
    assert!(h.kind.inspect(id).await.is_none());
    assert!(h.runtime.inspect("counter", id).await.unwrap().is_none());
    assert_eq!(h.kind.live_count(), 0);
    assert!(matches!(h.runtime.inspect("nope", id).await, Err(RuntimeError::UnknownKind { .. })));
}

/// A flow step that waits until told to go on.
struct Held(std::sync::Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl strato_runtime::Step<()> for Held {
    async fn run(
        &self,
        _: &mut (),
        _: &strato_runtime::FlowInfo,
    ) -> Result<(), strato_runtime::BoxError> {
        self.0.notified().await;
        Ok(())
    }

    async fn rollback(
        &self,
        _: &mut (),
        _: &strato_runtime::FlowInfo,
    ) -> Result<(), strato_runtime::BoxError> {
        Ok(())
    }
}
