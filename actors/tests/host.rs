//! The host actor against a real agent server (the sim driver, in this process, over TCP on
//! loopback): connect and reconcile, strangers, events behind the MN's back, a lost link,
//! automatic redial and reconciliation again, enrollment and the pin, an agent of another MN.

use std::time::{Duration, Instant, SystemTime};

use strato_actors::host::{self, HostError, StrangerFound};
use strato_actors::records::{AgentCertRecord, HostStatus};
use strato_actors::vm;
use strato_actors::vm::state::VmState;
use strato_agent::driver::Driver;
use strato_proto::Command;
use uuid::Uuid;

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reconciles_and_reports_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let driver = sim(dir.path());
    let (_agent, addr) = serve(driver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    // A: the store says Stopped, the hypervisor runs it. B: the store says Running, no domain.
    let a = vm_record(host.uuid, VmState::Stopped);
    let b = vm_record(host.uuid, VmState::Running);
    put(&c.db, &a);
    put(&c.db, &b);
    driver.define(&domain(a.uuid)).unwrap();
    driver.start(a.uuid).unwrap();
    let stranger = Uuid::new_v4();
    driver.define(&domain(stranger)).unwrap();
    driver.start(stranger).unwrap();
    let mut strangers = c.runtime.events().subscribe::<StrangerFound>("test", 8);

    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let record = host::record(&c.hosts, host.uuid).await.unwrap();
    assert_eq!(record.status, HostStatus::Connected);
    assert_eq!(record.facts.unwrap().hostname, "sim-test");
    assert_eq!(record.strangers, vec![stranger], "reported, not adopted");
    assert_eq!(strangers.recv().await.unwrap().domain.uuid, stranger);
    assert_eq!(vm::record(&c.vms, a.uuid).await.unwrap().state, VmState::Running);
    assert_eq!(vm::record(&c.vms, b.uuid).await.unwrap().state, VmState::Stopped);
    // The stranger still runs: never killed.
    let running = driver.list().unwrap().into_iter().any(|d| d.uuid == stranger);
    assert!(running);

    // Behind the MN's back: A is destroyed on the host; the VM follows at once.
    driver.destroy(a.uuid).unwrap();
    eventually("A reconciled to Stopped", || async {
        vm::record(&c.vms, a.uuid).await.unwrap().state == VmState::Stopped
    })
    .await;
    // And started again.
    driver.start(a.uuid).unwrap();
    eventually("A reconciled to Running", || async {
        vm::record(&c.vms, a.uuid).await.unwrap().state == VmState::Running
    })
    .await;

    // Commands travel the link.
    let reply = host::command(
        &c.hosts,
        host.uuid,
        Command::ListDomains,
        SystemTime::now() + Duration::from_secs(5),
        None,
    )
    .await
    .unwrap();
    assert!(matches!(reply, strato_proto::Reply::Domains(d) if d.len() == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_makes_the_host_disconnected_and_it_comes_back_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let driver = sim(dir.path());
    let (agent, addr) = serve(driver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    let a = vm_record(host.uuid, VmState::Running);
    put(&c.db, &a);
    driver.define(&domain(a.uuid)).unwrap();
    driver.start(a.uuid).unwrap();
    host::link::connect(&c.hosts, host.uuid).await.unwrap();

    // The agent dies: within the heartbeat bound the host is Disconnected and its VMs Unknown.
    agent.shutdown();
    let died = Instant::now();
    eventually("host Disconnected", || async {
        host::record(&c.hosts, host.uuid).await.unwrap().status == HostStatus::Disconnected
    })
    .await;
    assert!(died.elapsed() < Duration::from_secs(3));
    eventually("VM Unknown", || async {
        vm::record(&c.vms, a.uuid).await.unwrap().state == VmState::Unknown
    })
    .await;
    let refused = host::command(
        &c.hosts,
        host.uuid,
        Command::ListDomains,
        SystemTime::now() + Duration::from_secs(1),
        None,
    )
    .await;
    assert!(matches!(refused, Err(HostError::Disconnected(_))));

    // While it was away, the domain stopped (as after a host reboot).
    driver.destroy(a.uuid).unwrap();
    // The agent comes back on the same address: the host redials on its own and reconciles.
    let (_agent, _) = serve(driver.clone(), addr).await;
    eventually("host Connected again", || async {
        host::record(&c.hosts, host.uuid).await.unwrap().status == HostStatus::Connected
    })
    .await;
    eventually("VM back to its true state", || async {
        vm::record(&c.vms, a.uuid).await.unwrap().state == VmState::Stopped
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_contact_enrolls_the_agent_and_pins_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, addr) = serve(sim(dir.path()), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let pin = c.db.get::<AgentCertRecord>(host.uuid).unwrap().expect("pinned").record;
    // Reconnecting presents the same certificate, and deleting the host takes its pin.
    host::link::reconnect(&c.hosts, host.uuid).await.unwrap();
    assert_eq!(c.db.get::<AgentCertRecord>(host.uuid).unwrap().unwrap().record, pin);
    host::remove(&c.hosts, host.uuid).await.unwrap();
    assert!(c.db.get::<AgentCertRecord>(host.uuid).unwrap().is_none());
    // The machine added again as a new host: its certificate is this MN's, so it is trusted
    // and pinned for the new host.
    let again = host_record(addr);
    put(&c.db, &again);
    host::link::connect(&c.hosts, again.uuid).await.unwrap();
    let repinned = c.db.get::<AgentCertRecord>(again.uuid).unwrap().unwrap().record;
    assert_eq!(repinned.fingerprint, pin.fingerprint);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_mn_leaves_the_host_disconnected_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let other = TestCa::new();
    let (_agent, addr) =
        serve_for(&other, "sim-test", sim(dir.path()), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    let error = host::link::connect(&c.hosts, host.uuid).await.unwrap_err();
    assert!(error.to_string().contains("TLS handshake"), "{error}");
    let record = host::record(&c.hosts, host.uuid).await.unwrap();
    assert_eq!(record.status, HostStatus::Disconnected);
    assert!(record.last_error.unwrap().contains("TLS handshake"));
    assert!(c.db.get::<AgentCertRecord>(host.uuid).unwrap().is_none(), "nothing pinned");
}

/// The storms' `ReconnectHost`s come in a row: a command cut by one is sent again (under its
/// one id) on the next link, and that one may be cut by the next reconnect too. It is sent
/// again as long as a new link comes, rather than failing the user's operation on a host that
/// was only reconnecting (seen as `HOST.UNAVAILABLE` in a storm without faults).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_outlive_reconnects_in_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, addr) = serve(sim(dir.path()), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (hosts, done) = (c.hosts.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let deadline = SystemTime::now() + Duration::from_secs(30);
                if let Err(error) =
                    host::command(&hosts, host.uuid, Command::ListDomains, deadline, None).await
                {
                    failures.push(error.to_string());
                }
            }
            failures
        }));
    }
    for _ in 0..100 {
        host::link::reconnect(&c.hosts, host.uuid).await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        let failures = client.await.unwrap();
        assert!(failures.is_empty(), "reconnects failed commands: {failures:?}");
    }
}
