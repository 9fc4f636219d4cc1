//! Store benchmarks: durable writes with 64 concurrent writers (group commit beside one flush
//! per write) and reopening a store of 1,000,000 records.
//!
//! ```text
//! cargo bench -p strato-storage --bench store               # both
//! cargo bench -p strato-storage --bench store -- writes     # one of them
//! STRATO_BENCH_RECORDS=200000 cargo bench -p strato-storage --bench store -- reopen
//! ```
//!
//! Figures print as `bench <name> <key>=<value> ...` lines; BENCHMARKS.md records them.

#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous program: it writes with the blocking commit, outside any runtime"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strato_storage::{Batch, Db, Durability, Expect, Index, Record, SledStore};
use uuid::Uuid;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Vm {
    id: Uuid,
    name: String,
    state: String,
    host: Uuid,
    memory: u64,
    note: String,
}

impl Record for Vm {
    const KIND: &'static str = "vm";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.id
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |vm| vec![vm.name.as_str().into()] },
            Index { name: "state", values: |vm| vec![vm.state.as_str().into()] },
        ]
    }
}

fn vm(i: u64) -> Vm {
    Vm {
        id: Uuid::new_v4(),
        name: format!("vm-{i:08}"),
        state: ["Running", "Stopped", "Starting"][(i % 3) as usize].to_owned(),
        host: Uuid::from_u128(u128::from(i % 100)),
        memory: 1 << 30,
        note: "x".repeat(96),
    }
}

/// 64 writer threads, each committing one record at a time, for `duration`.
fn durable_writes(durability: Durability, duration: Duration) -> (u64, u64, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SledStore::open(dir.path()).expect("open sled"));
    let db = Db::with_durability(store, durability);
    let writes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writers: Vec<_> = (0..64u64)
        .map(|w| {
            let (db, writes, stop) = (db.clone(), writes.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = w << 32;
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = Batch::new();
                    batch.put(&vm(i), Expect::Absent).expect("encode");
                    db.commit_blocking(batch).expect("durable write");
                    writes.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = writes.load(Ordering::Relaxed);
    (writes, db.flush_count(), writes as f64 / elapsed)
}

fn bench_writes() {
    let duration = Duration::from_secs(5);
    let (writes, flushes, rate) = durable_writes(Durability::GroupCommit, duration);
    println!(
        "bench writes-group-commit writers=64 writes={writes} flushes={flushes} writes_per_s={rate:.0} writes_per_flush={:.1}",
        writes as f64 / flushes.max(1) as f64
    );
    let (writes, flushes, rate) = durable_writes(Durability::FlushEach, duration);
    println!(
        "bench writes-flush-each writers=64 writes={writes} flushes={flushes} writes_per_s={rate:.0}"
    );
}

fn bench_reopen(records: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let probe;
    {
        let started = Instant::now();
        let db = Db::open_sled(dir.path()).expect("open");
        let mut i = 0;
        let mut last = None;
        while i < records {
            let mut batch = Batch::new();
            for _ in 0..5_000.min(records - i) {
                let record = vm(i);
                last = Some(record.id);
                batch.put(&record, Expect::Any).expect("encode");
                i += 1;
            }
            db.commit_blocking(batch).expect("write");
        }
        probe = last.expect("at least one record");
        println!(
            "bench fill records={records} indexes_per_record=2 seconds={:.1}",
            started.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let db = Db::open_sled(dir.path()).expect("reopen");
    let found = db.get::<Vm>(probe).expect("read").is_some();
    let reopen = started.elapsed().as_secs_f64();
    assert!(found, "the last record written is there after reopening");
    let started = Instant::now();
    let running = db.find::<Vm>("state", &"Running".into()).expect("index").len();
    println!(
        "bench reopen records={records} reopen_and_first_read_s={reopen:.2} index_lookup_running={running} index_lookup_s={:.2}",
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let records = std::env::var("STRATO_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    if wanted("writes") {
        bench_writes();
    }
    if wanted("reopen") {
        bench_reopen(records);
    }
}
