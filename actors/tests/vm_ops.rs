//! The user's VM operations against a real agent server: the lifecycle checked on the
//! hypervisor as well as in the store, refused operations, failures landing per the state
//! table, destroy while the host is unreachable finished by the GC, and operations that
//! succeed although the tidying after their effect fails.

mod common;

use std::sync::Arc;
use std::time::Duration;

/// What the tests' VMs book: one CPU and 1 GiB, no local storage.
const ONE_VM: strato_actors::records::Reservation =
    strato_actors::records::Reservation { cpu: 1, memory: 1 << 30, disk: 0 };

use common::*;
use strato_actors::host;
use strato_actors::vm::ops::{self, DESTROY_DOMAIN_JOB, Lifecycle};
use strato_actors::vm::state::VmState;
use strato_actors::vm::{self, VmError};
use strato_agent::driver::Driver;
use strato_agent::driver::libvirt::Libvirt;
use strato_agent::driver::sim::{Sim, SimConfig};
use strato_proto::DomainState;
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

fn hypervisor_state(driver: &dyn Driver, vm: Uuid) -> Option<DomainState> {
    driver.list().unwrap().into_iter().find(|d| d.uuid == vm).map(|d| d.state)
}

async fn walk_the_lifecycle(
    driver: Arc<dyn Driver>,
    serve_it: impl std::future::Future<Output = std::net::SocketAddr>,
) {
    let addr = serve_it.await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    let vm = vm_record(host.uuid, VmState::Stopped);
    put(&c.db, &vm);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let id = vm.uuid;
    let step = |op| ops::operate(&c.vms, id, op, T, None);

    assert_eq!(step(Lifecycle::Start).await.unwrap().state, VmState::Running);
    assert_eq!(hypervisor_state(&*driver, id), Some(DomainState::Running));
    assert_eq!(step(Lifecycle::Pause).await.unwrap().state, VmState::Paused);
    assert_eq!(hypervisor_state(&*driver, id), Some(DomainState::Paused));
    assert_eq!(step(Lifecycle::Resume).await.unwrap().state, VmState::Running);
    assert_eq!(hypervisor_state(&*driver, id), Some(DomainState::Running));
    assert_eq!(step(Lifecycle::Reboot).await.unwrap().state, VmState::Running);
    assert_eq!(step(Lifecycle::Stop).await.unwrap().state, VmState::Stopped);
    assert_eq!(hypervisor_state(&*driver, id), Some(DomainState::Shutoff));

    // A refused operation names the state and changes nothing.
    match step(Lifecycle::Resume).await {
        Err(VmError::InvalidState(e)) => assert!(e.to_string().contains("Stopped"), "{e}"),
        other => panic!("expected InvalidState, got {other:?}"),
    }
    assert_eq!(vm::record(&c.vms, id).await.unwrap().state, VmState::Stopped);

    assert_eq!(step(Lifecycle::Start).await.unwrap().state, VmState::Running);
    assert_eq!(step(Lifecycle::Destroy).await.unwrap().state, VmState::Destroyed);
    assert_eq!(hypervisor_state(&*driver, id), None, "domain destroyed and undefined");
    assert_eq!(step(Lifecycle::Recover).await.unwrap().state, VmState::Stopped);
    assert_eq!(step(Lifecycle::Start).await.unwrap().state, VmState::Running, "redefined on start");
    assert_eq!(hypervisor_state(&*driver, id), Some(DomainState::Running));
    step(Lifecycle::Destroy).await.unwrap();
    step(Lifecycle::Expunge).await.unwrap();
    assert!(c.db.get::<strato_actors::records::VmRecord>(id).unwrap().is_none(), "expunged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_sim() {
    let dir = tempfile::tempdir().unwrap();
    let driver = sim(dir.path());
    let served = driver.clone();
    walk_the_lifecycle(
        driver,
        async move { serve(served, "127.0.0.1:0".parse().unwrap()).await.1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_libvirt_test_driver() {
    let driver: Arc<dyn Driver> = Arc::new(Libvirt::open("test:///default").unwrap());
    let served = driver.clone();
    walk_the_lifecycle(driver, async move {
        serve_for(ca(), "libvirt-test", served, "127.0.0.1:0".parse().unwrap()).await.1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_lands_where_the_table_says() {
    let dir = tempfile::tempdir().unwrap();
    let driver = Arc::new(
        Sim::open(SimConfig {
            hostname: "flaky".into(),
            cpus: 4,
            memory_mib: 8192,
            latency: Duration::ZERO,
            failures: [("start-domain".to_owned(), 1.0)].into_iter().collect(),
            state_file: dir.path().join("sim.json"),
            reset: false,
        })
        .unwrap(),
    );
    let (_agent, addr) = serve(driver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    let vm = vm_record(host.uuid, VmState::Stopped);
    put(&c.db, &vm);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let error = ops::operate(&c.vms, vm.uuid, Lifecycle::Start, T, None).await.unwrap_err();
    assert!(error.to_string().contains("injected"), "{error}");
    assert_eq!(vm::record(&c.vms, vm.uuid).await.unwrap().state, VmState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_on_a_disconnected_host_succeeds_and_the_gc_finishes_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let driver = sim(dir.path());
    let (agent, addr) = serve(driver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    ops::register_gc(&c.runtime, c.hosts.clone());
    c.runtime.gc().start().unwrap();
    let host = host_record(addr);
    put(&c.db, &host);
    let vm = vm_record(host.uuid, VmState::Stopped);
    put(&c.db, &vm);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    ops::operate(&c.vms, vm.uuid, Lifecycle::Start, T, None).await.unwrap();

    agent.shutdown();
    eventually("VM Unknown", || async {
        vm::record(&c.vms, vm.uuid).await.unwrap().state == VmState::Unknown
    })
    .await;
    // The user's destroy succeeds although the host is away.
    let destroyed = ops::operate(&c.vms, vm.uuid, Lifecycle::Destroy, T, None).await.unwrap();
    assert_eq!(destroyed.state, VmState::Destroyed);
    let destroy_jobs = || {
        c.runtime.gc().list().unwrap().into_iter().filter(|j| j.kind == DESTROY_DOMAIN_JOB).count()
    };
    assert_eq!(destroy_jobs(), 1);
    assert_eq!(hypervisor_state(&*driver, vm.uuid), Some(DomainState::Running), "still there");

    // The agent comes back; the host reconnects; the GC job runs on that event.
    let (_agent, _) = serve(driver.clone(), addr).await;
    eventually("leftover domain destroyed", || async {
        hypervisor_state(&*driver, vm.uuid).is_none()
    })
    .await;
    eventually("GC job done", || async { destroy_jobs() == 0 }).await;
    assert_eq!(vm::record(&c.vms, vm.uuid).await.unwrap().state, VmState::Destroyed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_migration_within_the_cluster_and_offering_changes() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (driver_a, driver_b) = (sim(dir_a.path()), sim(dir_b.path()));
    let (_agent_a, addr_a) = serve(driver_a.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (_agent_b, addr_b) = serve(driver_b.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let a = host_record(addr_a);
    let b =
        strato_actors::records::HostRecord { cluster_uuid: a.cluster_uuid, ..host_record(addr_b) };
    put(&c.db, &a);
    put(&c.db, &b);
    host::link::connect(&c.hosts, a.uuid).await.unwrap();
    host::link::connect(&c.hosts, b.uuid).await.unwrap();
    let vm = vm_record(a.uuid, VmState::Stopped);
    put(&c.db, &vm);
    let overcommit = host::Overcommit::default();
    assert!(host::reserve(&c.hosts, a.uuid, vm.uuid, ONE_VM, overcommit).await.unwrap());
    ops::operate(&c.vms, vm.uuid, Lifecycle::Start, T, None).await.unwrap();

    // Running VMs are stopped first: migration is cold.
    assert!(matches!(
        ops::migrate(&c.vms, vm.uuid, None, T, None).await,
        Err(VmError::InvalidState(_))
    ));
    ops::operate(&c.vms, vm.uuid, Lifecycle::Stop, T, None).await.unwrap();
    let moved = ops::migrate(&c.vms, vm.uuid, None, T, None).await.unwrap();
    assert_eq!(
        (moved.host_uuid, moved.last_host_uuid, moved.state),
        (Some(b.uuid), Some(a.uuid), VmState::Stopped)
    );
    let booked = |h: Uuid| {
        c.db.get::<strato_actors::records::HostRecord>(h)
            .unwrap()
            .unwrap()
            .record
            .reservations
            .contains_key(&vm.uuid)
    };
    assert!(!booked(a.uuid) && booked(b.uuid), "capacity moved with the VM");
    assert_eq!(hypervisor_state(&*driver_a, vm.uuid), None, "undefined on the old host");
    ops::operate(&c.vms, vm.uuid, Lifecycle::Start, T, None).await.unwrap();
    assert_eq!(hypervisor_state(&*driver_b, vm.uuid), Some(DomainState::Running));
    ops::operate(&c.vms, vm.uuid, Lifecycle::Stop, T, None).await.unwrap();

    // Only another host of the cluster will do: asking for the VM's own host has no answer.
    let error = ops::migrate(&c.vms, vm.uuid, Some(b.uuid), T, None).await.unwrap_err();
    assert!(error.to_string().contains("no host can take the VM"), "{error}");
    assert_eq!(vm::record(&c.vms, vm.uuid).await.unwrap().state, VmState::Stopped);

    // Offering changes re-book the host; one that does not fit keeps the old size.
    let changed = ops::change_offering(&c.vms, vm.uuid, 4, 2 << 30, T, None).await.unwrap();
    assert_eq!((changed.cpu_num, changed.memory_size), (4, 2 << 30));
    let reservation = |h: Uuid| {
        c.db.get::<strato_actors::records::HostRecord>(h).unwrap().unwrap().record.reservations
            [&vm.uuid]
    };
    assert_eq!(reservation(b.uuid).memory, 2 << 30);
    assert!(ops::change_offering(&c.vms, vm.uuid, 4, 64 << 30, T, None).await.is_err());
    assert_eq!(reservation(b.uuid).memory, 2 << 30, "the old booking stands");
    assert_eq!(vm::record(&c.vms, vm.uuid).await.unwrap().memory_size, 2 << 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_moves_vms_away_or_stops_them() {
    use strato_actors::maintenance;
    use strato_actors::records::{HostRecord, HostState};
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (driver_a, driver_b) = (sim(dir_a.path()), sim(dir_b.path()));
    let (_agent_a, addr_a) = serve(driver_a.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (_agent_b, addr_b) = serve(driver_b.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let a = host_record(addr_a);
    let b = HostRecord { cluster_uuid: a.cluster_uuid, ..host_record(addr_b) };
    put(&c.db, &a);
    put(&c.db, &b);
    host::link::connect(&c.hosts, a.uuid).await.unwrap();
    host::link::connect(&c.hosts, b.uuid).await.unwrap();
    let running = vm_record(a.uuid, VmState::Stopped);
    let stopped = vm_record(a.uuid, VmState::Stopped);
    for vm in [&running, &stopped] {
        put(&c.db, vm);
        assert!(
            host::reserve(&c.hosts, a.uuid, vm.uuid, ONE_VM, host::Overcommit::default())
                .await
                .unwrap()
        );
    }
    ops::operate(&c.vms, running.uuid, Lifecycle::Start, T, None).await.unwrap();

    let (record, report) = maintenance::maintain(&c.db, &c.hosts, &c.vms, a.uuid).await.unwrap();
    assert_eq!(record.state, HostState::Maintenance);
    assert_eq!(report.migrated.len(), 2);
    let moved = vm::record(&c.vms, running.uuid).await.unwrap();
    assert_eq!(
        (moved.host_uuid, moved.state),
        (Some(b.uuid), VmState::Running),
        "running again on the other host"
    );
    assert_eq!(hypervisor_state(&*driver_b, running.uuid), Some(DomainState::Running));
    assert_eq!(hypervisor_state(&*driver_a, running.uuid), None);
    assert_eq!(vm::record(&c.vms, stopped.uuid).await.unwrap().host_uuid, Some(b.uuid));

    // With no other host left, maintenance stops what it cannot move.
    let (record, report) = maintenance::maintain(&c.db, &c.hosts, &c.vms, b.uuid).await.unwrap();
    assert_eq!(record.state, HostState::Maintenance);
    assert_eq!(report.stopped.len(), 2);
    assert_eq!(vm::record(&c.vms, running.uuid).await.unwrap().state, VmState::Stopped);
    assert_eq!(hypervisor_state(&*driver_b, running.uuid), Some(DomainState::Shutoff));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_vms_are_expunged_after_their_grace_period_unless_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, addr) = serve(sim(dir.path()), "127.0.0.1:0".parse().unwrap()).await;
    let policy =
        ops::VmPolicy { expunge_after: Some(Duration::from_millis(300)), ..Default::default() };
    let c = mn_with(policy);
    ops::register_gc(&c.runtime, c.hosts.clone());
    c.runtime.gc().start().unwrap();
    let host = host_record(addr);
    put(&c.db, &host);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let (doomed, saved) =
        (vm_record(host.uuid, VmState::Stopped), vm_record(host.uuid, VmState::Stopped));
    put(&c.db, &doomed);
    put(&c.db, &saved);
    ops::operate(&c.vms, doomed.uuid, Lifecycle::Destroy, T, None).await.unwrap();
    ops::operate(&c.vms, saved.uuid, Lifecycle::Destroy, T, None).await.unwrap();
    assert_eq!(c.runtime.gc().list().unwrap().len(), 2, "one expunge job per destroyed VM");
    // Still recoverable within the grace period.
    assert!(c.db.get::<strato_actors::records::VmRecord>(doomed.uuid).unwrap().is_some());
    ops::operate(&c.vms, saved.uuid, Lifecycle::Recover, T, None).await.unwrap();
    eventually("the doomed VM expunged", || async {
        c.db.get::<strato_actors::records::VmRecord>(doomed.uuid).unwrap().is_none()
    })
    .await;
    assert_eq!(
        vm::record(&c.vms, saved.uuid).await.unwrap().state,
        VmState::Stopped,
        "recovered, kept"
    );
    eventually("no job left", || async { c.runtime.gc().list().unwrap().is_empty() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_left_by_an_interrupted_operation_is_repaired_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let driver = sim(dir.path());
    let (_agent, addr) = serve(driver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    // An MN killed in the middle of a stop left the VM Stopping, its domain still running.
    let vm = vm_record(host.uuid, VmState::Stopping);
    put(&c.db, &vm);
    driver.define(&domain(vm.uuid)).unwrap();
    driver.start(vm.uuid).unwrap();
    // The host's reconnection observes every VM on it: the VM is no longer stuck.
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    eventually("VM reconciled", || async {
        vm::record(&c.vms, vm.uuid).await.unwrap().state == VmState::Running
    })
    .await;
    // An interrupted expunge goes back to Destroyed, from which it can be expunged again.
    let mut expunging = vm_record(host.uuid, VmState::Expunging);
    expunging.name = "expunging".into();
    put(&c.db, &expunging);
    let expunged = ops::operate(&c.vms, expunging.uuid, Lifecycle::Expunge, T, None).await.unwrap();
    assert_eq!(expunged.state, VmState::Expunging);
    assert!(c.db.get::<strato_actors::records::VmRecord>(expunging.uuid).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_being_deleted_books_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, addr) = serve(sim(dir.path()), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let overcommit = host::Overcommit::default();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    assert!(host::reserve(&c.hosts, host.uuid, a, ONE_VM, overcommit).await.unwrap());
    assert_eq!(host::fence(&c.hosts, host.uuid, true).await.unwrap(), 1, "one booking held");
    assert!(!host::reserve(&c.hosts, host.uuid, b, ONE_VM, overcommit).await.unwrap());
    host::fence(&c.hosts, host.uuid, false).await.unwrap();
    assert!(host::reserve(&c.hosts, host.uuid, b, ONE_VM, overcommit).await.unwrap());
}

/// A store that, once armed, refuses every write that deletes a GC job: the tidying an
/// expunge or a recover does after its effect is in the store.
struct GcDeletesFail {
    inner: strato_storage::MemStore,
    armed: std::sync::atomic::AtomicBool,
}

impl strato_storage::Store for GcDeletesFail {
    fn backend_name(&self) -> &'static str {
        "gc-deletes-fail"
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, strato_storage::StoreError> {
        self.inner.get(key)
    }
    fn range(&self, start: &[u8], end: Option<&[u8]>, reverse: bool) -> strato_storage::KvIter<'_> {
        self.inner.range(start, end, reverse)
    }
    fn apply(&self, ops: Vec<strato_storage::RawOp>) -> Result<(), strato_storage::StoreError> {
        let deletes_a_job = ops.iter().any(
            |op| matches!(op, strato_storage::RawOp::Delete(key) if key.starts_with(b"r/gc-job/")),
        );
        if deletes_a_job && self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(strato_storage::StoreError::Backend {
                backend: "gc-deletes-fail",
                operation: "apply",
                source: "a GC job's delete refused by the test".into(),
            });
        }
        self.inner.apply(ops)
    }
    fn flush(&self) -> Result<(), strato_storage::StoreError> {
        self.inner.flush()
    }
}

/// CI's chaos seed 2 saw an expunge answer `SYS.STORE_FAILED` after it had deleted the VM:
/// the cancel of its address job failed. An operation whose effect is in the store has
/// succeeded; what tidies after it is the GC's to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expunge_and_recover_succeed_when_only_their_tidying_fails() {
    let dir = tempfile::tempdir().unwrap();
    let driver = sim(dir.path());
    let (_agent, addr) = serve(driver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let store = Arc::new(GcDeletesFail {
        inner: strato_storage::MemStore::new(),
        armed: Default::default(),
    });
    let c = mn_on(strato_storage::Db::new(store.clone()), ops::VmPolicy::default());
    ops::register_gc(&c.runtime, c.hosts.clone());
    let host = host_record(addr);
    put(&c.db, &host);
    // A NIC on a network that no longer exists: its address goes back without an L3 actor.
    let nic = strato_actors::records::VmNic {
        uuid: Uuid::new_v4(),
        l3_network_uuid: Uuid::new_v4(),
        ip: "10.0.0.5".into(),
        mac: "fa:16:3e:00:00:05".into(),
        bridge: None,
    };
    let vm = strato_actors::records::VmRecord {
        vm_nics: vec![nic],
        ..vm_record(host.uuid, VmState::Stopped)
    };
    put(&c.db, &vm);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let step = |op| ops::operate(&c.vms, vm.uuid, op, T, None);
    let arm = |on| store.armed.store(on, std::sync::atomic::Ordering::SeqCst);
    let jobs = || c.runtime.gc().list().unwrap().len();

    step(Lifecycle::Destroy).await.unwrap();
    assert_eq!(jobs(), 1, "the expunge after the grace period");
    arm(true);
    let recovered = step(Lifecycle::Recover).await.expect("recovered although its job stays");
    assert_eq!(recovered.state, VmState::Stopped);
    assert_eq!(vm::record(&c.vms, vm.uuid).await.unwrap().state, VmState::Stopped);
    assert_eq!(jobs(), 1, "the expunge job the cancel could not delete");

    arm(false);
    step(Lifecycle::Destroy).await.unwrap();
    arm(true);
    step(Lifecycle::Expunge).await.expect("expunged although its address job stays");
    assert!(c.db.get::<strato_actors::records::VmRecord>(vm.uuid).unwrap().is_none());
}

/// A creation racing the deletion of what it depends on leaves no orphan: the deletion sees
/// the new dependent and refuses, or the creation finds its parent gone (found in the audit
/// of issue 18: a cluster created while its zone was deleted outlived the zone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_racing_its_parents_deletion_leaves_no_orphan() {
    use strato_actors::cascade::{self, CascadeError, DeleteMode, Deleter, Resource};
    use strato_actors::records::{ClusterRecord, ZoneRecord};
    let c = mn();
    let deleter = Deleter {
        db: c.db.clone(),
        hosts: c.hosts.clone(),
        vms: c.vms.clone(),
        l3s: c.l3s.clone(),
    };
    let (mut refused, mut gone) = (0, 0);
    for round in 0..100 {
        let zone = ZoneRecord { uuid: Uuid::new_v4(), name: "z".into(), description: None };
        put(&c.db, &zone);
        let cluster = ClusterRecord {
            uuid: Uuid::new_v4(),
            name: "c".into(),
            zone_uuid: zone.uuid,
            hypervisor_type: "KVM".into(),
        };
        let resource = Resource { kind: strato_actors::kinds::of::<ZoneRecord>(), uuid: zone.uuid };
        let (deleted, created) = tokio::join!(
            tokio::spawn({
                let deleter = deleter.clone();
                async move { deleter.delete(resource, DeleteMode::Permissive).await }
            }),
            tokio::spawn({
                let (db, cluster) = (c.db.clone(), cluster.clone());
                async move { cascade::insert(&db, &cluster, |_| Ok(())).await }
            }),
        );
        let (deleted, created) = (deleted.unwrap(), created.unwrap());
        let zone_left = c.db.get::<ZoneRecord>(zone.uuid).unwrap().is_some();
        let cluster_left = c.db.get::<ClusterRecord>(cluster.uuid).unwrap().is_some();
        assert!(zone_left || !cluster_left, "round {round}: the cluster outlived its zone");
        match (&deleted, &created) {
            (Err(CascadeError::HasDependents { .. }), Ok(())) => refused += 1,
            (Ok(_), Err(CascadeError::NotFound(_))) => gone += 1,
            (Ok(_), Ok(())) | (Err(_), Err(_)) => {
                panic!("round {round}: {deleted:?} and {created:?}")
            }
            _ => {}
        }
    }
    eprintln!("{refused} deletions refused, {gone} creations found their zone gone");
}
