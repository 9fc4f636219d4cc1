//! Behaviour of `Db` on both backends: typed tables, indexes, compare-and-swap, atomic
//! batches, versioned records and group commit.

#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous program: it writes with the blocking commit, outside any runtime"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use strato_storage::{
    Batch, CodecError, Db, Expect, Index, IndexValue, MemStore, RawOp, Record, SledStore, Store,
    StoreError, Table,
};
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Vm {
    id: Uuid,
    name: String,
    state: String,
    ips: Vec<String>,
    memory: u64,
}

impl Record for Vm {
    const KIND: &'static str = "vm";
    const VERSION: u16 = 2;

    fn id(&self) -> Uuid {
        self.id
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |vm| vec![vm.name.as_str().into()] },
            Index { name: "state", values: |vm| vec![vm.state.as_str().into()] },
            Index { name: "ip", values: |vm| vm.ips.iter().map(|ip| ip.as_str().into()).collect() },
            Index { name: "memory", values: |vm| vec![vm.memory.into()] },
        ]
    }

    fn counted_indexes() -> &'static [&'static str] {
        &["state", "ip"]
    }

    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, CodecError> {
        #[derive(Deserialize)]
        struct VmV1 {
            id: Uuid,
            name: String,
        }
        match from_version {
            1 => {
                let old: VmV1 = strato_storage::codec::decode_payload("vm", payload)?;
                Ok(Vm {
                    id: old.id,
                    name: old.name,
                    state: "Stopped".into(),
                    ips: vec![],
                    memory: 0,
                })
            }
            found => Err(CodecError::UnknownVersion { kind: "vm", found, supported: 2 }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Host {
    id: Uuid,
    used_memory: u64,
}

impl Record for Host {
    const KIND: &'static str = "host";
    const VERSION: u16 = 1;
    fn id(&self) -> Uuid {
        self.id
    }
}

/// A table whose UUIDs are never used twice, as flows'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Once {
    id: Uuid,
}

impl Record for Once {
    const KIND: &'static str = "once";
    const VERSION: u16 = 1;
    const IDS_NEVER_REUSED: bool = true;
    fn id(&self) -> Uuid {
        self.id
    }
}

fn vm(name: &str, state: &str, ips: &[&str], memory: u64) -> Vm {
    Vm {
        id: Uuid::new_v4(),
        name: name.into(),
        state: state.into(),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        memory,
    }
}

/// Runs `test` against a sled store in a temporary directory and an in-memory store.
fn on_both_backends(test: impl Fn(Db)) {
    let dir = tempfile::tempdir().unwrap();
    test(Db::open_sled(dir.path()).unwrap());
    test(Db::in_memory());
}

fn put(db: &Db, record: &Vm, expect: Expect) -> Result<u64, StoreError> {
    let mut batch = Batch::new();
    batch.put(record, expect)?;
    Ok(db.commit_blocking(batch)?[0].generation.unwrap())
}

#[test]
fn records_round_trip_with_generations() {
    on_both_backends(|db| {
        let mut a = vm("a", "Running", &["10.0.0.1"], 512);
        assert_eq!(put(&db, &a, Expect::Absent).unwrap(), 1);
        a.state = "Stopped".into();
        assert_eq!(put(&db, &a, Expect::Generation(1)).unwrap(), 2);
        let stored = db.get::<Vm>(a.id).unwrap().unwrap();
        assert_eq!((stored.record, stored.generation), (a.clone(), 2));
        assert_eq!(db.get::<Vm>(Uuid::new_v4()).unwrap(), None);
        assert_eq!(db.count::<Vm>().unwrap(), 1);
    });
}

#[test]
fn a_table_whose_ids_are_never_reused_keeps_no_tombstones() {
    let store = Arc::new(strato_storage::MemStore::new());
    let db = Db::new(store.clone());
    let tombstones = || store.range(b"g/", Some(b"g0"), false).count();
    let (once, a) = (Once { id: Uuid::new_v4() }, vm("a", "Running", &[], 1));
    let mut batch = Batch::new();
    batch.put(&once, Expect::Absent).unwrap().put(&a, Expect::Absent).unwrap();
    db.commit_blocking(batch).unwrap();
    let mut batch = Batch::new();
    batch.delete::<Once>(once.id, Expect::Generation(1)).delete::<Vm>(a.id, Expect::Generation(1));
    db.commit_blocking(batch).unwrap();
    // The VM's generation is kept for a VM created again under its UUID; the other is not.
    assert_eq!(tombstones(), 1);
    assert_eq!(db.get::<Once>(once.id).unwrap(), None);
}

#[test]
fn compare_and_swap_refuses_stale_writers_and_writes_nothing() {
    on_both_backends(|db| {
        let a = vm("a", "Running", &[], 1);
        put(&db, &a, Expect::Absent).unwrap();
        let err = put(&db, &a, Expect::Absent).unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { found: Some(1), expected: Expect::Absent, .. }),
            "{err}"
        );
        let mut changed = a.clone();
        changed.state = "Stopped".into();
        let err = put(&db, &changed, Expect::Generation(7)).unwrap_err();
        assert!(matches!(err, StoreError::Conflict { found: Some(1), .. }), "{err}");
        assert_eq!(db.get::<Vm>(a.id).unwrap().unwrap().record.state, "Running");
        assert_eq!(db.find::<Vm>("state", &"Stopped".into()).unwrap(), Vec::<Uuid>::new());
    });
}

#[test]
fn a_record_created_again_continues_its_generation() {
    on_both_backends(|db| {
        let a = vm("a", "Running", &[], 1);
        put(&db, &a, Expect::Absent).unwrap();
        put(&db, &a, Expect::Generation(1)).unwrap();
        let mut batch = Batch::new();
        batch.delete::<Vm>(a.id, Expect::Generation(2));
        db.commit_blocking(batch).unwrap();
        // Created again: generation 3, so a writer still holding generation 1 or 2 of the
        // old incarnation cannot overwrite or delete the new one.
        assert_eq!(put(&db, &a, Expect::Absent).unwrap(), 3);
        let mut stale = Batch::new();
        stale.delete::<Vm>(a.id, Expect::Generation(1));
        assert!(matches!(
            db.commit_blocking(stale),
            Err(StoreError::Conflict { found: Some(3), .. })
        ));
        assert_eq!(db.count::<Vm>().unwrap(), 1);
    });
}

#[test]
fn a_batch_across_tables_is_all_or_nothing() {
    on_both_backends(|db| {
        let host = Host { id: Uuid::new_v4(), used_memory: 0 };
        let mut batch = Batch::new();
        batch.put(&host, Expect::Absent).unwrap();
        db.commit_blocking(batch).unwrap();

        // A VM placed on the host and the host's booking, in one batch whose second write
        // conflicts: neither may be written.
        let a = vm("a", "Running", &["10.0.0.9"], 256);
        let mut batch = Batch::new();
        batch.put(&a, Expect::Absent).unwrap();
        batch.put(&Host { used_memory: 256, ..host.clone() }, Expect::Generation(5)).unwrap();
        assert!(matches!(db.commit_blocking(batch), Err(StoreError::Conflict { .. })));
        assert_eq!(db.get::<Vm>(a.id).unwrap(), None);
        assert!(db.find::<Vm>("ip", &"10.0.0.9".into()).unwrap().is_empty());
        assert_eq!(db.get::<Host>(host.id).unwrap().unwrap().record.used_memory, 0);

        let mut batch = Batch::new();
        batch.put(&a, Expect::Absent).unwrap();
        batch.put(&Host { used_memory: 256, ..host.clone() }, Expect::Generation(1)).unwrap();
        let written = db.commit_blocking(batch).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(db.get::<Host>(host.id).unwrap().unwrap().record.used_memory, 256);
        assert_eq!(db.find::<Vm>("ip", &"10.0.0.9".into()).unwrap(), vec![a.id]);
    });
}

#[test]
fn indexes_follow_updates_and_deletes() {
    on_both_backends(|db| {
        let mut a = vm("alpha", "Running", &["10.0.0.1", "10.0.1.1"], 1024);
        let b = vm("beta", "Running", &["10.0.0.2"], 2048);
        put(&db, &a, Expect::Absent).unwrap();
        put(&db, &b, Expect::Absent).unwrap();
        let running: BTreeSet<Uuid> =
            db.find::<Vm>("state", &"Running".into()).unwrap().into_iter().collect();
        assert_eq!(running, BTreeSet::from([a.id, b.id]));
        assert_eq!(db.find::<Vm>("ip", &"10.0.1.1".into()).unwrap(), vec![a.id]);

        a.state = "Stopped".into();
        a.ips = vec!["10.0.0.1".into()];
        put(&db, &a, Expect::Generation(1)).unwrap();
        assert_eq!(db.find::<Vm>("state", &"Running".into()).unwrap(), vec![b.id]);
        assert_eq!(db.find::<Vm>("state", &"Stopped".into()).unwrap(), vec![a.id]);
        assert!(db.find::<Vm>("ip", &"10.0.1.1".into()).unwrap().is_empty());
        assert_eq!(db.find::<Vm>("ip", &"10.0.0.1".into()).unwrap(), vec![a.id]);

        let mut batch = Batch::new();
        batch.delete::<Vm>(b.id, Expect::Generation(1));
        db.commit_blocking(batch).unwrap();
        assert!(db.find::<Vm>("state", &"Running".into()).unwrap().is_empty());
        assert!(db.verify_indexes::<Vm>().unwrap().is_consistent());
    });
}

#[test]
fn range_lookups_follow_value_order() {
    on_both_backends(|db| {
        let vms: Vec<Vm> = [512, 1024, 2048, 4096]
            .iter()
            .map(|&m| vm(&format!("m{m}"), "Running", &[], m))
            .collect();
        for v in &vms {
            put(&db, v, Expect::Absent).unwrap();
        }
        let mid = db
            .find_range::<Vm>(
                "memory",
                Bound::Included(&IndexValue::U64(1024)),
                Bound::Excluded(&IndexValue::U64(4096)),
                false,
                usize::MAX,
            )
            .unwrap();
        assert_eq!(mid, vec![vms[1].id, vms[2].id]);
        let top_two =
            db.find_range::<Vm>("memory", Bound::Unbounded, Bound::Unbounded, true, 2).unwrap();
        assert_eq!(top_two, vec![vms[3].id, vms[2].id]);
        let above = db
            .find_range::<Vm>(
                "memory",
                Bound::Excluded(&IndexValue::U64(2048)),
                Bound::Unbounded,
                false,
                usize::MAX,
            )
            .unwrap();
        assert_eq!(above, vec![vms[3].id]);
        let names =
            db.find_range::<Vm>("name", Bound::Unbounded, Bound::Unbounded, false, 3).unwrap();
        assert_eq!(names, vec![vms[1].id, vms[2].id, vms[3].id], "m1024 < m2048 < m4096 < m512");
    });
}

#[test]
fn an_index_is_walked_in_order_and_counted_without_reading_records() {
    on_both_backends(|db| {
        let vms: Vec<Vm> = [("b", "Running"), ("a", "Stopped"), ("c", "Running"), ("a", "Running")]
            .iter()
            .map(|(name, state)| vm(name, state, &[], 1))
            .collect();
        for v in &vms {
            put(&db, v, Expect::Absent).unwrap();
        }
        let (mut a0, mut a1) = (vms[1].id, vms[3].id);
        if a1 < a0 {
            std::mem::swap(&mut a0, &mut a1);
        }
        let walked: Vec<Uuid> = db.scan_index::<Vm>("name", false).map(Result::unwrap).collect();
        assert_eq!(walked, vec![a0, a1, vms[0].id, vms[2].id], "by name, then by id");
        let back: Vec<Uuid> =
            db.scan_index::<Vm>("name", true).take(2).map(Result::unwrap).collect();
        assert_eq!(back, vec![vms[2].id, vms[0].id]);
        let running = IndexValue::from("Running");
        assert_eq!(db.count_index::<Vm>("state", &running, usize::MAX).unwrap(), 3);
        assert_eq!(db.count_index::<Vm>("state", &running, 2).unwrap(), 2, "capped");
        assert_eq!(db.count_index::<Vm>("state", &IndexValue::from("Paused"), 9).unwrap(), 0);
        assert_eq!(db.counted_total::<Vm>("state").unwrap(), 4, "the counters add up to the table");
        let mut batch = Batch::new();
        batch.delete::<Vm>(vms[0].id, Expect::Any);
        db.commit_blocking(batch).unwrap();
        assert_eq!(db.counted_total::<Vm>("state").unwrap(), 3);
    });
}

#[test]
fn old_versions_upgrade_and_unknown_versions_are_clear_errors() {
    let store = Arc::new(MemStore::new());
    let db = Db::new(store.clone());
    #[derive(Serialize)]
    struct VmV1 {
        id: Uuid,
        name: String,
    }
    let old_id = Uuid::new_v4();
    let new_id = Uuid::new_v4();
    let key = |id: Uuid| [b"r/vm/".as_slice(), id.as_bytes()].concat();
    let v1 = strato_storage::codec::encode("vm", 1, 3, &VmV1 { id: old_id, name: "old".into() })
        .unwrap();
    let v9 = strato_storage::codec::encode("vm", 9, 1, &VmV1 { id: new_id, name: "new".into() })
        .unwrap();
    store.apply(vec![RawOp::Put(key(old_id), v1), RawOp::Put(key(new_id), v9)]).unwrap();

    let upgraded = db.get::<Vm>(old_id).unwrap().unwrap();
    assert_eq!((upgraded.record.name.as_str(), upgraded.record.state.as_str()), ("old", "Stopped"));
    assert_eq!(upgraded.generation, 3);

    let err = db.get::<Vm>(new_id).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Codec {
                source: CodecError::UnknownVersion { found: 9, supported: 2, .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&new_id.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sled(dir.path()).unwrap();
    let writers = 32;
    let per_writer = 20;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let table = Table::<Vm>::new(&db);
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                table
                    .put(&vm(&format!("w{w}-{i}"), "Running", &[], i), Expect::Absent)
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let writes = writers * per_writer;
    assert_eq!(db.count::<Vm>().unwrap() as u64, writes);
    let flushes = db.flush_count();
    assert!(flushes < writes, "{flushes} flushes for {writes} writes: no flush was shared");
    drop(db);
    // Everything acknowledged is there after reopening.
    let db = Db::new(Arc::new(SledStore::open(dir.path()).unwrap()));
    assert_eq!(db.count::<Vm>().unwrap() as u64, writes);
    assert!(db.verify_indexes::<Vm>().unwrap().is_consistent());
}

#[derive(Clone, Debug)]
enum Op {
    Put { slot: usize, state: u8, ips: Vec<u8>, memory: u64 },
    Delete { slot: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..8, 0u8..3, proptest::collection::vec(0u8..6, 0..3), 0u64..4)
            .prop_map(|(slot, state, ips, memory)| Op::Put { slot, state, ips, memory }),
        1 => (0usize..8).prop_map(|slot| Op::Delete { slot }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random puts and deletes keep every index equal to what a plain map computes.
    #[test]
    fn indexes_match_a_model(ops in proptest::collection::vec(op(), 1..40)) {
        let db = Db::in_memory();
        let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
        let mut model: BTreeMap<Uuid, Vm> = BTreeMap::new();
        for op in ops {
            let mut batch = Batch::new();
            match op {
                Op::Put { slot, state, ips, memory } => {
                    let mut ips: Vec<String> = ips.iter().map(|i| format!("10.0.0.{i}")).collect();
                    ips.sort();
                    ips.dedup();
                    let record = Vm {
                        id: ids[slot],
                        name: format!("vm{slot}"),
                        state: ["Running", "Stopped", "Paused"][state as usize].into(),
                        ips,
                        memory,
                    };
                    batch.put(&record, Expect::Any).unwrap();
                    model.insert(record.id, record);
                }
                Op::Delete { slot } => {
                    batch.delete::<Vm>(ids[slot], Expect::Any);
                    model.remove(&ids[slot]);
                }
            }
            db.commit_blocking(batch).unwrap();
        }
        prop_assert!(db.verify_indexes::<Vm>().unwrap().is_consistent());
        for state in ["Running", "Stopped", "Paused"] {
            let want: Vec<Uuid> = model.values().filter(|v| v.state == state).map(|v| v.id).collect();
            let mut got = db.find::<Vm>("state", &state.into()).unwrap();
            got.sort();
            prop_assert_eq!(db.count_index::<Vm>("state", &state.into(), usize::MAX).unwrap(), want.len());
            prop_assert_eq!(got, want);
        }
        for i in 0..6 {
            let ip = format!("10.0.0.{i}");
            let want: Vec<Uuid> =
                model.values().filter(|v| v.ips.contains(&ip)).map(|v| v.id).collect();
            let mut got = db.find::<Vm>("ip", &ip.as_str().into()).unwrap();
            got.sort();
            prop_assert_eq!(db.count_index::<Vm>("ip", &ip.as_str().into(), usize::MAX).unwrap(), want.len());
            prop_assert_eq!(got, want);
        }
        let by_memory = db
            .find_range::<Vm>("memory", Bound::Included(&IndexValue::U64(1)), Bound::Included(&IndexValue::U64(2)), false, usize::MAX)
            .unwrap();
        let mut want: Vec<(u64, Uuid)> = model.values().filter(|v| (1..=2).contains(&v.memory)).map(|v| (v.memory, v.id)).collect();
        want.sort();
        prop_assert_eq!(by_memory, want.into_iter().map(|(_, id)| id).collect::<Vec<_>>());
    }
}

/// The same table as [`Vm`], as a later build declares it: with one index more.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct VmWithHost {
    id: Uuid,
    name: String,
    state: String,
    ips: Vec<String>,
    memory: u64,
}

impl Record for VmWithHost {
    const KIND: &'static str = "vm";
    const VERSION: u16 = 2;

    fn id(&self) -> Uuid {
        self.id
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "name", values: |vm| vec![vm.name.as_str().into()] },
            Index { name: "state", values: |vm| vec![vm.state.as_str().into()] },
            Index { name: "ip", values: |vm| vm.ips.iter().map(|ip| ip.as_str().into()).collect() },
            Index { name: "memory", values: |vm| vec![vm.memory.into()] },
            Index {
                name: "first-ip",
                values: |vm| vm.ips.first().map(|ip| ip.as_str().into()).into_iter().collect(),
            },
        ]
    }

    fn counted_indexes() -> &'static [&'static str] {
        &["state", "first-ip"]
    }
}

#[test]
fn an_index_declared_after_the_records_were_written_is_backfilled_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open_sled(dir.path()).unwrap();
        let mut batch = Batch::new();
        for i in 0..50 {
            batch
                .put(
                    &vm(&format!("vm{i}"), "Running", &[&format!("10.0.0.{i}")], 1),
                    Expect::Absent,
                )
                .unwrap();
        }
        db.commit_blocking(batch).unwrap();
        assert_eq!(db.ensure_indexes::<Vm>().unwrap(), 0, "up to date: nothing to add");
    }
    let db = Db::open_sled(dir.path()).unwrap();
    assert!(db.find::<VmWithHost>("first-ip", &"10.0.0.7".into()).unwrap().is_empty());
    assert!(!db.verify_indexes::<VmWithHost>().unwrap().is_consistent());
    assert_eq!(db.ensure_indexes::<VmWithHost>().unwrap(), 50);
    assert_eq!(db.find::<VmWithHost>("first-ip", &"10.0.0.7".into()).unwrap().len(), 1);
    assert!(db.verify_indexes::<VmWithHost>().unwrap().is_consistent());
    // Counters are rebuilt too, including for an index that was not counted before.
    assert_eq!(db.count_index::<VmWithHost>("first-ip", &"10.0.0.7".into(), 9).unwrap(), 1);
    assert_eq!(db.count_index::<VmWithHost>("state", &"Running".into(), 99).unwrap(), 50);
    // The marker makes the next start a single read.
    assert_eq!(db.ensure_indexes::<VmWithHost>().unwrap(), 0);
}
