//! Runtime benchmarks: keyed-queue throughput beside raw actix round trips, and activating
//! (then passivating) 1,000,000 actors from the store.
//!
//! ```text
//! cargo bench -p strato-runtime --bench runtime                  # both
//! cargo bench -p strato-runtime --bench runtime -- queues
//! STRATO_BENCH_ACTORS=100000 cargo bench -p strato-runtime --bench runtime -- activation
//! ```
//!
//! Figures print as `bench <name> <key>=<value> ...` lines; BENCHMARKS.md records them.

#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous program: it writes with the blocking commit, outside any runtime"
)]

use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use strato_runtime::{
    BoxError, Entity, Kind, KindConfig, Op, Runtime, RuntimeConfig, RuntimeError, release_memory,
};
use strato_storage::{Batch, Db, Expect, Record};
use tokio::sync::oneshot;
use uuid::Uuid;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Counter {
    id: Uuid,
    value: u64,
    name: String,
}

impl Record for Counter {
    const KIND: &'static str = "counter";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.id
    }
}

struct Counters {
    db: Db,
}

impl Entity for Counters {
    const KIND: &'static str = "counter";
    type State = Counter;

    fn load(&self, id: Uuid) -> Result<Option<Counter>, BoxError> {
        Ok(self.db.get::<Counter>(id)?.map(|s| s.record))
    }
}

/// The raw actix baseline: the same increment as a plain actix message.
struct Echo {
    value: u64,
}

impl Actor for Echo {
    type Context = Context<Self>;
}

struct Increment;

impl Message for Increment {
    type Result = u64;
}

impl Handler<Increment> for Echo {
    type Result = u64;

    fn handle(&mut self, _: Increment, _: &mut Context<Self>) -> u64 {
        self.value += 1;
        self.value
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn put_counters(db: &Db, ids: &[Uuid]) {
    for chunk in ids.chunks(10_000) {
        let mut batch = Batch::new();
        for id in chunk {
            batch
                .put(&Counter { id: *id, value: 0, name: format!("counter-{id}") }, Expect::Any)
                .expect("encode");
        }
        db.commit_blocking(batch).expect("write");
    }
}

/// Runs `total` operations with at most `window` in flight, from a driver on the arbiter of
/// `near` (so no message crosses threads), and returns operations per second.
fn drive<F, Fut>(runtime: &Runtime, near: Uuid, total: u64, window: usize, make: F) -> f64
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    runtime.spawn_near(near, async move {
        let started = Instant::now();
        let done = futures::stream::iter(0..total)
            .map(move |_| make())
            .buffer_unordered(window)
            .count()
            .await;
        assert_eq!(done as u64, total, "every operation answered");
        let _ = tx.send(started.elapsed().as_secs_f64());
    });
    let seconds = rx.blocking_recv().expect("driver finished");
    total as f64 / seconds
}

fn bench_queues() {
    let db = Db::in_memory();
    let runtime =
        Runtime::start(RuntimeConfig { arbiters: 1, ..Default::default() }, db.clone()).unwrap();
    let kind: Kind<Counters> = runtime.register(
        Counters { db: db.clone() },
        KindConfig::default().queue("l1", 1, 1 << 20).queue("l8", 8, 1 << 20),
    );
    let ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
    put_counters(&db, &ids);

    // The actix baseline lives on the same (single) arbiter as the actors under test.
    let (tx, rx) = oneshot::channel();
    runtime.spawn_near(ids[0], async move {
        let _ = tx.send(Echo { value: 0 }.start());
    });
    let echo = rx.blocking_recv().expect("echo started");
    let deadline = Instant::now() + Duration::from_secs(3600);

    for (window, total) in [(256usize, 2_000_000u64), (1, 500_000)] {
        let mut results = Vec::new();
        // Each measurement runs three times, interleaved; the best is reported (the machine
        // is noisy).
        for _ in 0..3 {
            let addr = echo.clone();
            let raw = drive(&runtime, ids[0], total, window, move || {
                let addr = addr.clone();
                async move {
                    addr.send(Increment).await.expect("echo");
                }
            });
            let mut keyed = Vec::new();
            for (queue, id) in [("l1", ids[0]), ("l8", ids[1])] {
                let kind = kind.clone();
                keyed.push(drive(&runtime, ids[0], total, window, move || {
                    let kind = kind.clone();
                    async move {
                        kind.call(id, Op::new(queue, "increment", deadline), |ctx| async move {
                            ctx.with_state(|c| c.value += 1);
                            Ok::<_, RuntimeError>(())
                        })
                        .await
                        .expect("increment");
                    }
                }));
            }
            results.push((raw, keyed[0], keyed[1]));
        }
        let best = |f: fn(&(f64, f64, f64)) -> f64| results.iter().map(f).fold(0.0, f64::max);
        let (raw, l1, l8) = (best(|r| r.0), best(|r| r.1), best(|r| r.2));
        println!(
            "bench queues window={window} ops={total} raw_actix_per_s={raw:.0} keyed_level1_per_s={l1:.0} keyed_level8_per_s={l8:.0} overhead_level1={:.2}x overhead_level8={:.2}x",
            raw / l1,
            raw / l8
        );
    }
    runtime.shutdown();
}

fn bench_activation(actors: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::open_sled(dir.path()).expect("open sled");
    let ids: Vec<Uuid> = (0..actors).map(|_| Uuid::new_v4()).collect();
    let started = Instant::now();
    put_counters(&db, &ids);
    println!(
        "bench activation-fill records={actors} seconds={:.1}",
        started.elapsed().as_secs_f64()
    );
    // Read everything once so the store's cache is warm and counted in the baseline.
    let scanned = db.scan::<Counter>().count();
    assert_eq!(scanned, actors);
    let runtime =
        Runtime::start(RuntimeConfig { arbiters: 2, ..Default::default() }, db.clone()).unwrap();
    let kind: Kind<Counters> = runtime.register(
        Counters { db: db.clone() },
        KindConfig::default().queue("q", 1, 64).idle_timeout(None),
    );
    release_memory();
    let baseline = rss_mib();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let driver = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let started = Instant::now();
    driver.block_on(async {
        futures::stream::iter(ids.iter().copied())
            .map(|id| {
                kind.call(id, Op::new("q", "activate", deadline), |ctx| async move {
                    Ok::<_, RuntimeError>(ctx.with_state(|c| c.value))
                })
            })
            .buffer_unordered(8192)
            .for_each(|r| {
                r.expect("activated");
                async {}
            })
            .await;
    });
    let activation = started.elapsed().as_secs_f64();
    assert_eq!(kind.live_count(), actors);
    let active = rss_mib();

    let started = Instant::now();
    driver.block_on(async {
        futures::stream::iter(ids.iter().copied())
            .map(|id| {
                kind.call(id, Op::new("q", "passivate", deadline), |ctx| async move {
                    ctx.passivate_when_idle();
                    Ok::<_, RuntimeError>(())
                })
            })
            .buffer_unordered(8192)
            .for_each(|r| {
                r.expect("passivated");
                async {}
            })
            .await;
        while kind.live_count() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let passivation = started.elapsed().as_secs_f64();
    let passivated_untrimmed = rss_mib();
    release_memory();
    let passivated = rss_mib();
    println!(
        "bench activation actors={actors} activate_s={activation:.2} activations_per_s={:.0} rss_baseline_mib={baseline:.0} rss_active_mib={active:.0} active_bytes_per_actor={:.0} passivate_s={passivation:.2} rss_passivated_before_trim_mib={passivated_untrimmed:.0} rss_passivated_mib={passivated:.0} passivated_bytes_per_resource={:.0}",
        actors as f64 / activation,
        (active - baseline) * 1_048_576.0 / actors as f64,
        ((passivated - baseline) * 1_048_576.0 / actors as f64).max(0.0),
    );
    runtime.shutdown();
}

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let actors =
        std::env::var("STRATO_BENCH_ACTORS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    if wanted("queues") {
        bench_queues();
    }
    if wanted("activation") {
        bench_activation(actors);
    }
}
