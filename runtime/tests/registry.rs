//! Addressing, activation on first message, exactly-once activation under concurrency,
//! passivation and transparent reactivation; deadlines.

mod common;

use std::time::{Duration, Instant};

use common::{harness, harness_with};
use strato_runtime::{KindConfig, Op, RuntimeError};
use tokio::sync::oneshot;
use uuid::Uuid;

fn op(name: &'static str) -> Op {
    Op::within("q", name, Duration::from_secs(10))
}

async fn read(h: &common::Harness, id: Uuid) -> Result<u64, RuntimeError> {
    h.kind.call(id, op("read"), |ctx| async move { Ok(ctx.with_state(|c| c.value)) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_messages_activate_exactly_one_actor() {
    // A slow load widens the window in which the other first messages arrive.
    let h = harness_with(KindConfig::default().queue("q", 4, 1000), Duration::from_millis(30));
    let ids: Vec<Uuid> = (0..8).map(|i| h.create(i)).collect();
    let mut calls = Vec::new();
    for _ in 0..25 {
        for id in &ids {
            let kind = h.kind.clone();
            let id = *id;
            calls.push(tokio::spawn(async move {
                kind.call(id, op("read"), |ctx| async move {
                    Ok::<_, RuntimeError>(ctx.with_state(|c| c.value))
                })
                .await
            }));
        }
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    for id in &ids {
        assert_eq!(h.kind.entity().loads(*id), 1, "actor {id} loaded once");
    }
    assert_eq!(h.kind.counters().activations, 8);
    assert_eq!(h.kind.live_count(), 8);
}

#[tokio::test]
async fn unknown_uuid_is_not_found_and_leaves_no_actor() {
    let h = harness(KindConfig::default().queue("q", 1, 100));
    let id = Uuid::new_v4();
    match read(&h, id).await.unwrap_err() {
        RuntimeError::NotFound { actor } => assert_eq!((actor.kind, actor.id), ("counter", id)),
        other => panic!("expected NotFound, got {other:?}"),
    }
    for _ in 0..200 {
        if h.kind.live_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.kind.live_count(), 0);
    // Once the resource exists, the same UUID activates.
    let created = h.create(5);
    assert_eq!(read(&h, created).await.unwrap(), 5);
}

#[tokio::test]
async fn idle_actors_passivate_and_reactivate_transparently() {
    let h = harness(
        KindConfig::default().queue("q", 1, 100).idle_timeout(Some(Duration::from_millis(40))),
    );
    let id = h.create(9);
    assert_eq!(read(&h, id).await.unwrap(), 9);
    assert_eq!(h.kind.live_count(), 1);
    let start = Instant::now();
    while h.kind.live_count() > 0 && start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.kind.live_count(), 0, "passivated after the idle timeout");
    assert_eq!(read(&h, id).await.unwrap(), 9);
    assert_eq!(h.kind.entity().loads(id), 2, "reactivated by loading again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_message_is_lost_while_actors_passivate() {
    // An idle timeout of 1 ms makes actors leave the registry constantly while callers send
    // to them: every call must still get its answer.
    let h = harness(
        KindConfig::default().queue("q", 1, 1000).idle_timeout(Some(Duration::from_millis(1))),
    );
    let ids: Vec<Uuid> = (0..4).map(|i| h.create(i)).collect();
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let kind = h.kind.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..150u64 {
                let id = ids[((worker + round) % 4) as usize];
                let value = kind
                    .call(id, op("read"), |ctx| async move {
                        Ok::<_, RuntimeError>(ctx.with_state(|c| c.value))
                    })
                    .await
                    .unwrap();
                assert_eq!(value, ids.iter().position(|i| *i == id).unwrap() as u64);
                if round % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(h.kind.counters().departures > 0, "actors did passivate during the run");
}

#[tokio::test]
async fn an_operation_past_its_deadline_fails_without_running() {
    let h = harness(KindConfig::default().queue("q", 1, 100));
    let id = h.create(1);
    let (ran_tx, mut ran_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let late = Op::new("q", "late", Instant::now() - Duration::from_millis(1));
    let result = h
        .kind
        .call(id, late, move |_| async move {
            ran_tx.send(()).unwrap();
            Ok::<_, RuntimeError>(())
        })
        .await;
    match result.unwrap_err() {
        RuntimeError::Timeout { actor, queue, operation } => {
            assert_eq!((actor.id, queue, operation), (id, "q", "late"));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(ran_rx.try_recv().is_err(), "the operation did not run");
}

#[tokio::test]
async fn a_pending_operation_times_out_at_its_deadline_while_the_queue_is_held() {
    let h = harness(KindConfig::default().queue("q", 1, 100));
    let id = h.create(1);
    let (open, gate) = oneshot::channel::<()>();
    let kind = h.kind.clone();
    let holder = tokio::spawn(async move {
        kind.call(id, op("hold"), move |_| async move {
            let _ = gate.await;
            Ok::<_, RuntimeError>(())
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    let (ran_tx, mut ran_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let result = h
        .kind
        .call(id, Op::within("q", "impatient", Duration::from_millis(50)), move |_| async move {
            ran_tx.send(()).unwrap();
            Ok::<_, RuntimeError>(())
        })
        .await;
    assert!(matches!(result, Err(RuntimeError::Timeout { .. })));
    // It was answered at its deadline, while the holder still ran.
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!holder.is_finished());
    open.send(()).unwrap();
    holder.await.unwrap().unwrap();
    assert!(ran_rx.try_recv().is_err());
}

#[tokio::test]
async fn a_running_operation_reads_its_deadline_and_hands_it_to_children() {
    let h = harness(KindConfig::default().queue("q", 1, 100).queue("child", 1, 100));
    let parent_id = h.create(1);
    let child_id = h.create(2);
    let deadline = Instant::now() + Duration::from_secs(7);
    let job = Uuid::new_v4();
    let (parent_deadline, child_deadline, child_job) = h
        .kind
        .call(parent_id, Op::new("q", "parent", deadline).job(Some(job)), move |ctx| async move {
            assert!(ctx.remaining() > Duration::from_secs(5));
            let child = ctx.child("child", "child-op");
            let (child_deadline, child_job) = ctx
                .kind()
                .call(child_id, child, |child_ctx| async move {
                    Ok::<_, RuntimeError>((child_ctx.deadline(), child_ctx.job_id()))
                })
                .await?;
            Ok::<_, RuntimeError>((ctx.deadline(), child_deadline, child_job))
        })
        .await
        .unwrap();
    assert_eq!(parent_deadline, deadline);
    assert_eq!(child_deadline, deadline);
    assert_eq!(child_job, Some(job));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_inspected_while_it_goes_idle_still_passivates() {
    // The console inspects every live actor; a leave deferred by an inspection in flight
    // must be retried, or idle actors would pile up in the registry.
    let h = harness(
        KindConfig::default().queue("q", 1, 100).idle_timeout(Some(Duration::from_millis(20))),
    );
    let ids: Vec<Uuid> = (0..20).map(|i| h.create(i)).collect();
    for id in &ids {
        read(&h, *id).await.unwrap();
    }
    // Several inspectors at once keep inspections in flight nearly all the time.
    let inspectors: Vec<_> = (0..4)
        .map(|_| {
            let (kind, ids) = (h.kind.clone(), ids.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                while started.elapsed() < Duration::from_millis(400) {
                    futures::future::join_all(ids.iter().map(|id| kind.inspect(*id))).await;
                }
            })
        })
        .collect();
    for inspector in inspectors {
        inspector.await.unwrap();
    }
    let started = Instant::now();
    while h.kind.live_count() > 0 && started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.kind.live_count(), 0, "every idle actor left the registry");
}

/// A queue is its kind's declaration: an operation naming another is refused before anything
/// runs or is activated (a misspelt queue would otherwise run outside its serialization).
#[tokio::test]
async fn an_undeclared_queue_is_an_error_not_a_default() {
    let h = harness(KindConfig::default().queue("q", 1, 100));
    let id = h.create(3);
    let refused = h
        .kind
        .call(id, Op::within("misspelt", "read", Duration::from_secs(5)), |ctx| async move {
            Ok::<u64, RuntimeError>(ctx.with_state(|s| s.value))
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(RuntimeError::UndeclaredQueue { kind: "counter", queue: "misspelt" })
        ),
        "{refused:?}"
    );
    assert_eq!(h.kind.live_count(), 0, "nothing was activated");
    assert!(h.kind.queue("misspelt").is_err());
    assert_eq!(read(&h, id).await.unwrap(), 3, "the declared queue works");
}
