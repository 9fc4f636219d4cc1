//! Panic isolation, restarts with reloaded state, the restart budget, `Failed` and manual
//! restarts.

mod common;

use std::time::Duration;

use common::harness;
use strato_runtime::{
    ActorFailed, ActorRestarted, ActorStatus, KindConfig, Op, OpResult, RuntimeError,
};
use tokio::sync::oneshot;

fn op(name: &'static str) -> Op {
    Op::within("q", name, Duration::from_secs(10))
}

/// Bumps the in-memory value without writing it to the store, then maybe panics.
async fn bump_then(
    h: &common::Harness,
    id: uuid::Uuid,
    panic: Option<bool>,
) -> Result<u64, RuntimeError> {
    h.kind
        .call(id, op("bump"), move |ctx| async move {
            let value = ctx.with_state(|c| {
                c.value += 100;
                c.value
            });
            match panic {
                Some(false) => panic!("boom before any await"),
                Some(true) => {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    panic!("boom after an await");
                }
                None => Ok(value),
            }
        })
        .await
}

async fn read(h: &common::Harness, id: uuid::Uuid) -> Result<u64, RuntimeError> {
    h.kind.call(id, op("read"), |ctx| async move { Ok(ctx.with_state(|c| c.value)) }).await
}

#[tokio::test]
async fn panic_answers_internal_and_the_actor_reloads_from_the_store() {
    for after_await in [false, true] {
        let h = harness(KindConfig::default().queue("q", 1, 100));
        let id = h.create(7);
        let mut restarted = h.runtime.events().subscribe::<ActorRestarted>("test", 16);
        assert_eq!(bump_then(&h, id, None).await.unwrap(), 107);
        assert_eq!(h.kind.entity().loads(id), 1);

        // Queue a panicking operation and, behind it, two more: none of them may be lost.
        let panicking = bump_then(&h, id, Some(after_await));
        let behind_1 = read(&h, id);
        let behind_2 = read(&h, id);
        let (panicked, r1, r2) = tokio::join!(panicking, behind_1, behind_2);

        match panicked.unwrap_err() {
            RuntimeError::Internal { actor, operation, message } => {
                assert_eq!((actor.id, operation), (id, "bump"));
                assert!(message.contains("boom"), "{message}");
            }
            other => panic!("expected Internal, got {other:?}"),
        }
        // The operations behind it ran on state reloaded from the store (7), not on the
        // in-memory value the panicking and earlier operations left (207).
        assert_eq!((r1.unwrap(), r2.unwrap()), (7, 7));
        assert_eq!(h.kind.entity().loads(id), 2, "reloaded exactly once");
        let event = restarted.recv().await.unwrap();
        assert_eq!(event.actor.id, id);
        assert!(event.reason.contains("boom"));

        let snapshot = h.kind.inspect(id).await.unwrap();
        assert_eq!(snapshot.status, ActorStatus::Active);
        assert_eq!(snapshot.restarts, 1);
        assert!(snapshot.last_error.unwrap().contains("boom"));
        assert!(snapshot.recent.iter().any(|op| matches!(op.result, OpResult::Panic(_))));
    }
}

#[tokio::test]
async fn a_panic_does_not_touch_other_operations_or_actors() {
    let h = harness(KindConfig::default().queue("q", 2, 100));
    let id = h.create(1);
    let others: Vec<_> = (0..20).map(|i| h.create(i)).collect();

    // A long operation runs beside the one that panics; its reply must still arrive.
    let (open, gate) = oneshot::channel::<()>();
    let kind = h.kind.clone();
    let long = tokio::spawn(async move {
        kind.call(id, op("long"), move |ctx| async move {
            let _ = gate.await;
            Ok::<_, RuntimeError>(ctx.with_state(|c| c.value))
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(matches!(bump_then(&h, id, Some(true)).await, Err(RuntimeError::Internal { .. })));
    // Other actors, on every arbiter, are unaffected meanwhile.
    for (i, other) in others.iter().enumerate() {
        assert_eq!(read(&h, *other).await.unwrap(), i as u64);
    }
    // The actor waits for its running operation before it reloads.
    let snapshot = h.kind.inspect(id).await.unwrap();
    assert_eq!(snapshot.status, ActorStatus::Restarting);
    open.send(()).unwrap();
    assert_eq!(long.await.unwrap().unwrap(), 101);
    assert_eq!(read(&h, id).await.unwrap(), 1);
    assert_eq!(h.kind.inspect(id).await.unwrap().status, ActorStatus::Active);
}

#[tokio::test]
async fn beyond_the_budget_the_actor_fails_until_restarted_by_hand() {
    let h = harness(
        KindConfig::default().queue("q", 1, 100).restart_budget(2, Duration::from_secs(60)),
    );
    let id = h.create(3);
    let mut failed = h.runtime.events().subscribe::<ActorFailed>("test", 16);
    for _ in 0..2 {
        assert!(matches!(bump_then(&h, id, Some(false)).await, Err(RuntimeError::Internal { .. })));
        assert_eq!(read(&h, id).await.unwrap(), 3);
    }
    // The third panic within the window exhausts the budget; the operation queued behind it
    // gets `Failed`, naming the actor.
    let (third, behind) = tokio::join!(bump_then(&h, id, Some(false)), read(&h, id));
    assert!(matches!(third, Err(RuntimeError::Internal { .. })));
    match behind.unwrap_err() {
        RuntimeError::Failed { actor, reason } => {
            assert_eq!(actor.id, id);
            assert!(reason.contains("3 panics"), "{reason}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let event = failed.recv().await.unwrap();
    assert_eq!(event.actor.id, id);
    assert!(matches!(read(&h, id).await, Err(RuntimeError::Failed { .. })), "later ops too");
    assert_eq!(h.kind.inspect(id).await.unwrap().status, ActorStatus::Failed);

    h.runtime.restart("counter", id).await.unwrap();
    assert_eq!(read(&h, id).await.unwrap(), 3);
    assert_eq!(h.kind.inspect(id).await.unwrap().status, ActorStatus::Active);
}

#[tokio::test]
async fn panics_outside_the_window_do_not_exhaust_the_budget() {
    let h = harness(
        KindConfig::default().queue("q", 1, 100).restart_budget(1, Duration::from_millis(50)),
    );
    let id = h.create(3);
    for _ in 0..3 {
        assert!(matches!(bump_then(&h, id, Some(false)).await, Err(RuntimeError::Internal { .. })));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(read(&h, id).await.unwrap(), 3);
    }
}
