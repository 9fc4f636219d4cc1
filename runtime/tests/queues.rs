//! Keyed queues: levels, FIFO starts, slots held across awaits, bounded depth, run-time levels.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::harness;
use proptest::prelude::*;
use strato_runtime::{KindConfig, Op, RuntimeError};
use tokio::sync::oneshot;

const QUEUES: [&str; 2] = ["a", "b"];

#[derive(Default)]
struct Probe {
    running: [AtomicUsize; 2],
    max_running: [AtomicUsize; 2],
    starts: [Mutex<Vec<usize>>; 2],
}

fn run_workload(levels: [usize; 2], ops: Vec<(usize, u8)>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let h =
        harness(KindConfig::default().queue("a", levels[0], 10_000).queue("b", levels[1], 10_000));
    let id = h.create(0);
    let probe = Arc::new(Probe::default());
    let replies = rt.block_on(async {
        let calls = ops.iter().enumerate().map(|(seq, &(queue, work))| {
            let probe = probe.clone();
            h.kind.call(
                id,
                Op::within(QUEUES[queue], "probe", Duration::from_secs(60)),
                move |_ctx| async move {
                    probe.starts[queue].lock().unwrap().push(seq);
                    let now = probe.running[queue].fetch_add(1, Ordering::SeqCst) + 1;
                    probe.max_running[queue].fetch_max(now, Ordering::SeqCst);
                    // Work that waits: the slot must stay held across these awaits.
                    match work % 3 {
                        0 => {}
                        1 => tokio::task::yield_now().await,
                        _ => tokio::time::sleep(Duration::from_micros(200 * u64::from(work))).await,
                    }
                    probe.running[queue].fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, RuntimeError>(seq)
                },
            )
        });
        // join_all polls in order, and a call submits on its first poll: submission order
        // is the index order.
        futures::future::join_all(calls).await
    });
    // Exactly one reply per operation, and it is that operation's own.
    prop_assert_eq!(replies.len(), ops.len());
    for (seq, reply) in replies.into_iter().enumerate() {
        prop_assert_eq!(reply.unwrap(), seq);
    }
    for (queue, level) in levels.into_iter().enumerate() {
        let max = probe.max_running[queue].load(Ordering::SeqCst);
        prop_assert!(max <= level, "queue {queue}: {max} ran at once, level {level}");
        let submitted: Vec<usize> =
            ops.iter().enumerate().filter(|(_, (q, _))| *q == queue).map(|(seq, _)| seq).collect();
        prop_assert_eq!(&*probe.starts[queue].lock().unwrap(), &submitted, "FIFO start order");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn levels_fifo_and_one_reply(
        levels in (1usize..5, 1usize..5),
        ops in proptest::collection::vec((0usize..2, 0u8..8), 1..60),
    ) {
        run_workload([levels.0, levels.1], ops)?;
    }

    #[test]
    fn level_one_never_overlaps(ops in proptest::collection::vec((0usize..2, 0u8..8), 1..40)) {
        run_workload([1, 1], ops)?;
    }
}

/// Submits an operation that holds its slot until `gate` fires.
fn blocker(
    h: &common::Harness,
    id: uuid::Uuid,
    queue: &'static str,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), RuntimeError>>) {
    let (open, gate) = oneshot::channel::<()>();
    let kind = h.kind.clone();
    let task = tokio::spawn(async move {
        kind.call(id, Op::within(queue, "blocker", Duration::from_secs(30)), move |_| async move {
            let _ = gate.await;
            Ok(())
        })
        .await
    });
    (open, task)
}

async fn wait_until(mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached within 2.5 s");
}

#[tokio::test]
async fn queues_of_one_actor_are_independent() {
    let h = harness(KindConfig::default().queue("slow", 1, 100).queue("fast", 1, 100));
    let id = h.create(1);
    let (open, blocked) = blocker(&h, id, "slow");
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.running.len() == 1)).await;
    let value = h
        .kind
        .call(id, Op::within("fast", "read", Duration::from_secs(5)), |ctx| async move {
            Ok::<_, RuntimeError>(ctx.with_state(|c| c.value))
        })
        .await
        .unwrap();
    assert_eq!(value, 1);
    open.send(()).unwrap();
    blocked.await.unwrap().unwrap();
}

#[tokio::test]
async fn full_queue_answers_busy_with_actor_queue_and_depth() {
    let h = harness(KindConfig::default().queue("q", 1, 2));
    let id = h.create(0);
    let (open, blocked) = blocker(&h, id, "q");
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.running.len() == 1)).await;
    let pending: Vec<_> = (0..2)
        .map(|_| {
            let kind = h.kind.clone();
            tokio::spawn(async move {
                kind.call(id, Op::within("q", "wait", Duration::from_secs(30)), |_| async {
                    Ok::<_, RuntimeError>(())
                })
                .await
            })
        })
        .collect();
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.pending.len() == 2)).await;
    let refused = h
        .kind
        .call(id, Op::within("q", "one-too-many", Duration::from_secs(30)), |_| async {
            Ok::<_, RuntimeError>(())
        })
        .await
        .unwrap_err();
    match refused {
        RuntimeError::Busy { actor, queue, depth } => {
            assert_eq!((actor.kind, actor.id, queue, depth), ("counter", id, "q", 2));
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(refused_message_names_everything(id));
    // The kind-wide depth (what /metrics shows) counts them too, and drains with them.
    assert_eq!(h.kind.queue("q").unwrap().depth(), (1, 2));
    open.send(()).unwrap();
    blocked.await.unwrap().unwrap();
    for task in pending {
        task.await.unwrap().unwrap();
    }
    wait_until(async || h.kind.queue("q").unwrap().depth() == (0, 0)).await;
}

fn refused_message_names_everything(id: uuid::Uuid) -> bool {
    let text = RuntimeError::Busy {
        actor: strato_runtime::ActorId { kind: "counter", id },
        queue: "q",
        depth: 2,
    }
    .to_string();
    text.contains(&id.to_string()) && text.contains("`q`") && text.contains('2')
}

#[tokio::test]
async fn level_changed_at_run_time_applies_to_the_next_start() {
    let h = harness(KindConfig::default().queue("q", 1, 100));
    let id = h.create(0);
    let (open_a, a) = blocker(&h, id, "q");
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.running.len() == 1)).await;
    let (open_b, b) = blocker(&h, id, "q");
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.pending.len() == 1)).await;
    // At level 1, b waits behind a.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(h.kind.inspect(id).await.unwrap().running.len(), 1);

    h.runtime.set_queue_level("counter", "q", 2).unwrap();
    // The next start (triggered by the next submission) uses level 2: b runs beside a, and
    // c waits.
    let (open_c, c) = blocker(&h, id, "q");
    wait_until(async || {
        h.kind.inspect(id).await.is_some_and(|s| s.running.len() == 2 && s.pending.len() == 1)
    })
    .await;
    for open in [open_a, open_b, open_c] {
        open.send(()).unwrap();
    }
    for task in [a, b, c] {
        task.await.unwrap().unwrap();
    }
    let snapshot = h.kind.inspect(id).await.unwrap();
    assert_eq!(snapshot.queues[0].level, 2);
}

#[tokio::test]
async fn per_actor_level_override() {
    let h = harness(KindConfig::default().queue("q", 1, 100));
    let id = h.create(0);
    let (open_a, a) = blocker(&h, id, "q");
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.running.len() == 1)).await;
    let (open_b, b) = blocker(&h, id, "q");
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.pending.len() == 1)).await;
    // Raising this actor's level starts b at once.
    assert!(h.runtime.set_actor_queue_level("counter", id, "q", Some(2)).await.unwrap());
    wait_until(async || h.kind.inspect(id).await.is_some_and(|s| s.running.len() == 2)).await;
    open_a.send(()).unwrap();
    open_b.send(()).unwrap();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

#[tokio::test]
async fn queue_levels_come_from_the_runtime_config_by_kind_name() {
    use strato_runtime::{Runtime, RuntimeConfig};
    let db = strato_storage::Db::in_memory();
    let mut config = RuntimeConfig { arbiters: 1, ..Default::default() };
    config.kinds.insert("counter".into(), KindConfig::default().queue("q", 3, 7));
    let runtime = Runtime::start(config, db.clone()).unwrap();
    let kind = runtime.register(
        common::Counters { db, loads: Default::default(), load_delay: Duration::ZERO },
        // The registration's defaults lose to the operator's config.
        KindConfig::default().queue("q", 1, 100),
    );
    assert_eq!((kind.queue("q").unwrap().level(), kind.queue("q").unwrap().max_pending()), (3, 7));
    runtime.shutdown();
}

#[tokio::test]
async fn a_serial_queue_stays_at_level_1_whoever_asks() {
    use strato_runtime::{Runtime, RuntimeConfig, RuntimeError};
    let db = strato_storage::Db::in_memory();
    let mut config = RuntimeConfig { arbiters: 1, ..Default::default() };
    // The operator's config asks for 4; the kind declares the queue serial.
    config.kinds.insert("counter".into(), KindConfig::default().queue("q", 4, 7));
    let runtime = Runtime::start(config, db.clone()).unwrap();
    let kind = runtime.register(
        common::Counters { db, loads: Default::default(), load_delay: Duration::ZERO },
        KindConfig::default().serial_queue("q", 100),
    );
    assert_eq!((kind.queue("q").unwrap().level(), kind.queue("q").unwrap().max_pending()), (1, 7));
    assert!(kind.queue("q").unwrap().is_serial());
    let refused = runtime.set_queue_level("counter", "q", 2).unwrap_err();
    assert!(matches!(refused, RuntimeError::SerialQueue { .. }), "{refused}");
    let id = uuid::Uuid::new_v4();
    let refused = runtime.set_actor_queue_level("counter", id, "q", Some(2)).await.unwrap_err();
    assert!(matches!(refused, RuntimeError::SerialQueue { .. }), "{refused}");
    // Level 1 is what it has: asking for it is no change, and not refused.
    runtime.set_queue_level("counter", "q", 1).unwrap();
    assert_eq!(kind.queue("q").unwrap().level(), 1);
    runtime.shutdown();
}
