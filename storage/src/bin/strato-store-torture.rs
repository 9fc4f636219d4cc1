//! Crash torture for the store: writers are killed with SIGKILL at random moments and every
//! acknowledged write must survive.
//!
//! `strato-store-torture soak --iterations N` (or `--duration SECS`) repeats: start a child
//! `writer` process on the same directory, let it write for a random 20-250 ms, kill it with
//! SIGKILL, reopen the store and check it. The writer prints an *intent* line before each
//! commit and an *ack* line after the commit returned (that is, after the write was durable).
//! After reopening, every record must be in its last acknowledged state, or in the state of
//! the one write its thread had in flight; every record must decode; every index must agree
//! with its table. The test suite runs a short soak; run a long one by hand with
//! `cargo run --release -p strato-storage --bin strato-store-torture -- soak --duration 600`.

#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous program: it writes with the blocking commit, outside any runtime"
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strato_storage::{Batch, Db, Expect, Index, Record};
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
struct TortureRecord {
    id: Uuid,
    seq: u64,
    name: String,
    bucket: u64,
    payload: Vec<u8>,
}

impl Record for TortureRecord {
    const KIND: &'static str = "torture";
    const VERSION: u16 = 1;
    fn id(&self) -> Uuid {
        self.id
    }
    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |r| vec![r.name.as_str().into()] },
            Index { name: "bucket", values: |r| vec![r.bucket.into()] },
        ]
    }
    fn counted_indexes() -> &'static [&'static str] {
        &["bucket"]
    }
}

impl TortureRecord {
    fn new(id: Uuid, seq: u64) -> Self {
        // The payload is a function of (id, seq), so the reader can check content, not only
        // presence.
        let len = (seq % 300) as usize;
        TortureRecord {
            id,
            seq,
            name: format!("n{}", seq % 97),
            bucket: seq % 13,
            payload: vec![id.as_bytes()[0] ^ (seq as u8); len],
        }
    }

    fn is_intact(&self) -> bool {
        let fresh = TortureRecord::new(self.id, self.seq);
        self.name == fresh.name && self.bucket == fresh.bucket && self.payload == fresh.payload
    }
}

const SLOTS_PER_THREAD: usize = 16;

fn slot_id(thread: usize, slot: usize) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("torture-{thread}-{slot}").as_bytes())
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("writer") => {
            let dir = PathBuf::from(arg(&args, "--dir", String::new()));
            writer(&dir, arg(&args, "--threads", 4), arg(&args, "--seed", 1))
        }
        Some("soak") => soak(&args),
        _ => {
            eprintln!(
                "usage: strato-store-torture soak [--iterations N | --duration SECS] [--threads N] [--seed S] [--dir DIR]\n       strato-store-torture writer --dir DIR [--threads N] [--seed S]"
            );
            ExitCode::from(2)
        }
    }
}

/// The child: writes forever until killed, announcing each write before and after.
fn writer(dir: &Path, threads: usize, seed: u64) -> ExitCode {
    let db = match Db::open_sled(dir) {
        Ok(db) => db,
        Err(err) => {
            eprintln!("writer: cannot open {}: {err}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut rng =
                    fastrand::Rng::with_seed(seed.wrapping_mul(31).wrapping_add(thread as u64));
                // Sequence numbers are unique per thread across restarts: they start from the
                // clock, which moves forward between iterations.
                let mut seq = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_micros() as u64;
                loop {
                    let id = slot_id(thread, rng.usize(..SLOTS_PER_THREAD));
                    let current = db.get::<TortureRecord>(id).expect("read during torture");
                    let expect =
                        current.map_or(Expect::Absent, |s| Expect::Generation(s.generation));
                    seq += 1;
                    let mut batch = Batch::new();
                    let line = if rng.u8(..5) == 0 && expect != Expect::Absent {
                        batch.delete::<TortureRecord>(id, expect);
                        format!("I {thread} D {id} {seq}")
                    } else {
                        batch.put(&TortureRecord::new(id, seq), expect).expect("encode");
                        format!("I {thread} P {id} {seq}")
                    };
                    println!("{line}");
                    db.commit_blocking(batch).expect("durable write");
                    println!("A {thread}");
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
    ExitCode::SUCCESS
}

/// What a record should be: `Some(seq)` present with that sequence number, `None` absent.
type State = Option<u64>;

#[derive(Default)]
struct Expectations {
    acked: HashMap<Uuid, State>,
    /// Per thread, the write announced but not acknowledged when the child died.
    in_flight: HashMap<usize, (Uuid, State)>,
}

impl Expectations {
    fn read_line(&mut self, line: &str) -> Result<(), String> {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["I", thread, op, id, seq] => {
                let thread: usize = thread.parse().map_err(|_| format!("bad line {line}"))?;
                let id: Uuid = id.parse().map_err(|_| format!("bad line {line}"))?;
                let seq: u64 = seq.parse().map_err(|_| format!("bad line {line}"))?;
                let state = if *op == "D" { None } else { Some(seq) };
                self.in_flight.insert(thread, (id, state));
            }
            ["A", thread] => {
                let thread: usize = thread.parse().map_err(|_| format!("bad line {line}"))?;
                let (id, state) = self
                    .in_flight
                    .remove(&thread)
                    .ok_or_else(|| format!("ack without intent: {line}"))?;
                self.acked.insert(id, state);
            }
            // A line cut short by the kill.
            _ => {}
        }
        Ok(())
    }
}

struct IterationReport {
    acked_writes: usize,
    records: usize,
}

fn soak(args: &[String]) -> ExitCode {
    let iterations: u64 = arg(args, "--iterations", 0);
    let duration = Duration::from_secs(arg(args, "--duration", 0));
    let threads: usize = arg(args, "--threads", 4);
    let seed: u64 = arg(args, "--seed", fastrand::u64(..));
    let keep_dir = args.iter().any(|a| a == "--dir");
    let temp = tempfile::TempDir::new().expect("temporary directory");
    let dir = if keep_dir {
        PathBuf::from(arg(args, "--dir", String::new()))
    } else {
        temp.path().to_owned()
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let exe = std::env::current_exe().expect("own executable");
    let mut expectations = Expectations::default();
    let mut total_acked = 0;
    let mut iteration = 0u64;
    println!("soak: seed {seed}, {threads} writer threads, store {}", dir.display());
    while (iterations > 0 && iteration < iterations)
        || (iterations == 0 && started.elapsed() < duration)
    {
        iteration += 1;
        let run_for = Duration::from_millis(rng.u64(20..250));
        match one_iteration(&exe, &dir, threads, rng.u64(..), run_for, &mut expectations) {
            Ok(report) => {
                total_acked += report.acked_writes;
                println!(
                    "iteration {iteration}: killed after {run_for:?}, {} acknowledged writes, {} records, all present and indexes consistent",
                    report.acked_writes, report.records
                );
            }
            Err(violation) => {
                println!("iteration {iteration}: VIOLATION: {violation}");
                println!("seed {seed}; store kept at {}", dir.display());
                let _ = temp.keep();
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "soak passed: {iteration} kills, {total_acked} acknowledged writes checked, seed {seed}"
    );
    ExitCode::SUCCESS
}

fn one_iteration(
    exe: &Path,
    dir: &Path,
    threads: usize,
    seed: u64,
    run_for: Duration,
    expectations: &mut Expectations,
) -> Result<IterationReport, String> {
    let mut child = Command::new(exe)
        .args(["writer", "--dir"])
        .arg(dir)
        .args(["--threads", &threads.to_string(), "--seed", &seed.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start writer: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        lines
    });
    std::thread::sleep(run_for);
    // `Child::kill` sends SIGKILL: no destructor, no flush, no goodbye.
    child.kill().map_err(|e| format!("cannot kill writer: {e}"))?;
    let status = child.wait().map_err(|e| format!("cannot reap writer: {e}"))?;
    let lines = reader.join().map_err(|_| "stdout reader panicked".to_owned())?;
    if status.code().is_some() {
        return Err(format!("writer exited by itself ({status}) instead of being killed"));
    }
    let mut acked_writes = 0;
    for line in &lines {
        if line.starts_with('A') {
            acked_writes += 1;
        }
        expectations.read_line(line)?;
    }

    let db = Db::open_sled(dir).map_err(|e| format!("reopen failed: {e}"))?;
    let mut seen = HashMap::new();
    for stored in db.scan::<TortureRecord>() {
        let stored = stored.map_err(|e| format!("a record does not decode: {e}"))?;
        if !stored.record.is_intact() {
            return Err(format!("record {} has corrupt content", stored.record.id));
        }
        seen.insert(stored.record.id, stored.record.seq);
    }
    let mut ids: Vec<Uuid> = expectations.acked.keys().copied().collect();
    ids.extend(expectations.in_flight.values().map(|(id, _)| *id));
    ids.extend(seen.keys().copied());
    ids.sort();
    ids.dedup();
    for id in ids {
        let actual: State = seen.get(&id).copied();
        let acked: State = expectations.acked.get(&id).copied().flatten();
        let in_flight: Option<State> =
            expectations.in_flight.values().find(|(i, _)| *i == id).map(|(_, s)| *s);
        if actual != acked && Some(actual) != in_flight {
            return Err(format!(
                "record {id}: store has {actual:?}, last acknowledged {acked:?}, in flight {in_flight:?}"
            ));
        }
        // The store's state is the truth from here on.
        match actual {
            Some(seq) => expectations.acked.insert(id, Some(seq)),
            None => expectations.acked.remove(&id),
        };
    }
    expectations.in_flight.clear();
    let report =
        db.verify_indexes::<TortureRecord>().map_err(|e| format!("index check failed: {e}"))?;
    if !report.is_consistent() {
        return Err(format!(
            "indexes disagree with the table: {} missing, {} stale",
            report.missing.len(),
            report.stale.len()
        ));
    }
    std::io::stdout().flush().ok();
    Ok(IterationReport { acked_writes, records: report.records })
}
