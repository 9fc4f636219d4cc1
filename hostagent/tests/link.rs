//! The real `strato-agent` binary, driven over a real link: handshake checks, commands on
//! libvirt's test driver and on sim, at-most-once by id, deadlines, events, heartbeats. Each
//! agent enrolls with the test's MN on first contact (the TLS checks themselves are in
//! `tls.rs`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::*;
use strato_proto::{
    AgentErrorCode, AgentEvent, Command, DomainSpec, DomainState, Link, LinkError, Reply,
};
use uuid::Uuid;

fn soon() -> SystemTime {
    SystemTime::now() + Duration::from_secs(10)
}

fn spec(name: &str) -> DomainSpec {
    DomainSpec {
        uuid: Uuid::new_v4(),
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        root_volume: None,
        nics: vec![],
        disks: vec![],
    }
}

async fn state_of(link: &Link, uuid: Uuid) -> Option<DomainState> {
    match link.request(Command::ListDomains, soon(), None).await.unwrap() {
        Reply::Domains(domains) => domains.into_iter().find(|d| d.uuid == uuid).map(|d| d.state),
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test]
async fn a_protocol_mismatch_is_refused_with_a_reason() {
    use strato_proto::codec::{read_frame, write_frame};
    let mn = Mn::new();
    let agent = start_agent(&mn, &["--driver", "sim"]);
    let (mut stream, _) = mn.pki.tls().dial(agent.addr).await.unwrap();
    let hello =
        strato_proto::ClientHello { protocol: 999, host_uuid: Uuid::nil(), idle_timeout_ms: 5000 };
    write_frame(&mut stream, &hello).await.unwrap();
    match read_frame::<_, strato_proto::ServerHello>(&mut stream).await.unwrap() {
        Some(strato_proto::ServerHello::Refused { reason }) => {
            assert!(reason.contains("protocol"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn lifecycle(driver_args: &[&str]) {
    let mn = Mn::new();
    let agent = start_agent(&mn, driver_args);
    let (link, welcome, mut events) = agent.link(&mn).await.unwrap();
    assert!(welcome.facts.cpus > 0);
    let vm = spec("vm-1");
    let uuid = vm.uuid;
    assert_eq!(
        link.request(Command::DefineDomain(vm.clone()), soon(), None).await.unwrap(),
        Reply::Done
    );
    // Defining again is harmless.
    link.request(Command::DefineDomain(vm), soon(), None).await.unwrap();
    assert_eq!(state_of(&link, uuid).await, Some(DomainState::Shutoff));
    link.request(Command::StartDomain { uuid }, soon(), None).await.unwrap();
    assert_eq!(state_of(&link, uuid).await, Some(DomainState::Running));
    // The change is pushed as an event.
    let event = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(AgentEvent::DomainStateChanged {
                uuid: u,
                state: Some(DomainState::Running),
            }) = events.recv().await
                && u == uuid
            {
                return;
            }
        }
    })
    .await;
    assert!(event.is_ok(), "no Running event");
    link.request(Command::SuspendDomain { uuid }, soon(), None).await.unwrap();
    assert_eq!(state_of(&link, uuid).await, Some(DomainState::Paused));
    link.request(Command::ResumeDomain { uuid }, soon(), None).await.unwrap();

    // At most once per id: a repeated destroy after a new start does not act again.
    let destroy_id = Uuid::new_v4();
    link.request_with_id(destroy_id, Command::DestroyDomain { uuid }, soon(), None).await.unwrap();
    assert_eq!(state_of(&link, uuid).await, Some(DomainState::Shutoff));
    link.request(Command::StartDomain { uuid }, soon(), None).await.unwrap();
    link.request_with_id(destroy_id, Command::DestroyDomain { uuid }, soon(), None).await.unwrap();
    assert_eq!(
        state_of(&link, uuid).await,
        Some(DomainState::Running),
        "the repeat did not act twice"
    );

    // A command past its deadline is refused and does nothing.
    let late = SystemTime::now() - Duration::from_secs(1);
    match link.request(Command::DestroyDomain { uuid }, late, None).await {
        Err(LinkError::Agent { error, .. }) => {
            assert_eq!(error.code, AgentErrorCode::DeadlineExceeded)
        }
        Err(LinkError::Timeout { .. }) => {} // our own deadline may fire first; either way:
        other => panic!("expected a deadline refusal, got {other:?}"),
    }
    assert_eq!(state_of(&link, uuid).await, Some(DomainState::Running));

    link.request(Command::DestroyDomain { uuid }, soon(), None).await.unwrap();
    link.request(Command::UndefineDomain { uuid }, soon(), None).await.unwrap();
    link.request(Command::UndefineDomain { uuid }, soon(), None).await.unwrap();
    assert_eq!(state_of(&link, uuid).await, None);
    match link.request(Command::StartDomain { uuid }, soon(), None).await {
        Err(LinkError::Agent { error, .. }) => assert_eq!(error.code, AgentErrorCode::NotFound),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Heartbeats flow.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(link.rtt() > Duration::ZERO);
}

#[tokio::test]
async fn lifecycle_on_libvirt_test_driver() {
    lifecycle(&["--driver", "libvirt", "--libvirt-uri", "test:///default", "--network", "sim"])
        .await;
}

#[tokio::test]
async fn lifecycle_on_sim() {
    lifecycle(&["--driver", "sim"]).await;
}

#[tokio::test]
async fn a_killed_agent_closes_the_link_and_sim_state_survives_a_restart() {
    let mn = Mn::new();
    let mut agent = start_agent(&mn, &["--driver", "sim"]);
    let (link, _, _) = agent.link(&mn).await.unwrap();
    let vm = spec("survivor");
    link.request(Command::DefineDomain(vm.clone()), soon(), None).await.unwrap();
    link.request(Command::StartDomain { uuid: vm.uuid }, soon(), None).await.unwrap();
    agent.child.kill().unwrap(); // SIGKILL
    agent.child.wait().unwrap();
    tokio::time::timeout(Duration::from_secs(3), link.closed()).await.expect("link closed");
    assert!(matches!(
        link.request(Command::ListDomains, soon(), None).await,
        Err(LinkError::Closed)
    ));
    // A sim agent restarted on the same data is not a host reboot: the domain still runs. It
    // needs no bootstrap file: it presents the certificate it enrolled with, still pinned.
    let pin = agent.pin.lock().unwrap().take();
    let (addr, dir) = (agent.addr, std::mem::replace(&mut agent.dir, tempfile::tempdir().unwrap()));
    drop(agent);
    let agent = start_agent_on(addr, None, dir, &["--driver", "sim"], None);
    *agent.pin.lock().unwrap() = pin;
    let (_, welcome, _) = agent.link(&mn).await.expect("reconnected with the pinned certificate");
    assert_eq!(*agent.pin.lock().unwrap(), pin, "the same certificate");
    let domain =
        welcome.domains.iter().find(|d| d.uuid == vm.uuid).expect("domain reported in the welcome");
    assert_eq!(domain.state, DomainState::Running);
}

#[tokio::test]
async fn injected_sim_failures_and_many_hosts_in_one_process() {
    let mn = Mn::new();
    let bootstrap = mn.bootstrap(3);
    let base = free_port();
    let base_text = base.to_string();
    let args = [
        "--driver",
        "sim",
        "--sim-hosts",
        "3",
        "--listen-base",
        &base_text,
        "--sim-fail",
        "start-domain=1.0",
    ];
    let dir = tempfile::tempdir().unwrap();
    let _agent = start_agent_on(free_port(), Some(&bootstrap), dir, &args, Some(base));
    let mut hostnames = Vec::new();
    for i in 0..3u16 {
        let addr = SocketAddr::new(base.ip(), base.port() + i);
        let pin = std::sync::Mutex::default();
        let mut linked = None;
        for _ in 0..100 {
            if let Ok(l) = mn.link(addr, &pin).await {
                linked = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // Each host enrolled with a secret of its own.
        let (link, welcome, _) = linked.expect("each simulated host has its own port");
        hostnames.push(welcome.facts.hostname);
        let vm = spec("doomed");
        link.request(Command::DefineDomain(vm.clone()), soon(), None).await.unwrap();
        match link.request(Command::StartDomain { uuid: vm.uuid }, soon(), None).await {
            Err(LinkError::Agent { error, .. }) => assert!(error.message.contains("injected")),
            other => panic!("expected the injected failure, got {other:?}"),
        }
    }
    hostnames.sort();
    assert_eq!(hostnames, ["sim-0", "sim-1", "sim-2"]);
}

#[tokio::test]
async fn commands_on_one_domain_run_one_at_a_time_and_are_journaled() {
    // Each driver call takes 200 ms: a start and a destroy sent together would overlap.
    let mn = Mn::new();
    let agent = start_agent(&mn, &["--driver", "sim", "--sim-latency-ms", "200", "--journal"]);
    let (link, _, _) = agent.link(&mn).await.unwrap();
    let domain = spec("serial");
    link.request(Command::DefineDomain(domain.clone()), soon(), None).await.unwrap();
    let (started, destroyed) = tokio::join!(
        link.request(Command::StartDomain { uuid: domain.uuid }, soon(), Some(Uuid::new_v4())),
        link.request(Command::DestroyDomain { uuid: domain.uuid }, soon(), Some(Uuid::new_v4())),
    );
    started.unwrap();
    destroyed.unwrap();
    let journal = std::fs::read_to_string(agent.dir.path().join("journal.jsonl")).unwrap();
    let mut spans: Vec<(u64, u64)> = journal
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["domain"] == domain.uuid.to_string())
        .map(|l| (l["startMs"].as_u64().unwrap(), l["endMs"].as_u64().unwrap()))
        .collect();
    assert_eq!(spans.len(), 3, "{journal}");
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "overlapping commands on one domain: {journal}");
    }
}
