//! A management node's runtime with host and VM kinds, and in-process agents (the real
//! agent server and sim driver, over TLS on loopback). The MNs of one test binary share one
//! CA; an agent enrolls with it on first contact, as a real one does, and keeps its identity
//! by address, so an agent served again on its address is the same machine.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use strato_actors::host::{HostConfig, Hosts, Overcommit};
use strato_actors::l3::L3s;
use strato_actors::records::{HostRecord, VmRecord};
use strato_actors::vm::Vms;
use strato_actors::vm::state::VmState;
use strato_agent::credentials::Credentials;
use strato_agent::driver::Driver;
use strato_agent::driver::sim::{Sim, SimConfig};
use strato_agent::net::SimNet;
use strato_agent::server::Agent;
use strato_proto::DomainSpec;
use strato_proto::pki::{Bootstrap, Pki};
use strato_proto::tls::AgentIdentity;
use strato_runtime::{Kind, Runtime, RuntimeConfig};
use strato_storage::{Batch, Db, Expect};
use uuid::Uuid;

/// A CA in a directory of its own, with the agents it enrolls beside it.
pub struct TestCa {
    pub pki: Arc<Pki>,
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(Pki::open(&dir.path().join("pki")).unwrap());
        TestCa { pki, dir }
    }

    /// The data directory of the agent at `addr`.
    fn agent_dir(&self, addr: SocketAddr) -> PathBuf {
        self.dir.path().join(format!("agent-{}", addr.port()))
    }

    /// Credentials for the agent at `addr`: those it enrolled with, or a fresh bootstrap
    /// secret.
    pub fn credentials(&self, addr: SocketAddr) -> Credentials {
        let dir = self.agent_dir(addr);
        if AgentIdentity::is_enrolled(&dir) {
            return Credentials::open(&dir, None).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bootstrap");
        self.pki.mint(&file, 1).unwrap();
        let secret = Bootstrap::read(&file).unwrap().secret(0);
        Credentials::open(&dir, secret).unwrap()
    }
}

/// The CA every MN of this test binary keeps.
pub fn ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(TestCa::new)
}

pub struct Cluster {
    pub runtime: Runtime,
    pub db: Db,
    pub hosts: Kind<Hosts>,
    pub vms: Kind<Vms>,
    pub l3s: Kind<L3s>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.runtime.shutdown();
    }
}

pub fn mn() -> Cluster {
    mn_with(strato_actors::vm::ops::VmPolicy::default())
}

pub fn mn_with(policy: strato_actors::vm::ops::VmPolicy) -> Cluster {
    mn_on(Db::in_memory(), policy)
}

/// A node on `db`: a test that wants the store to fail gives its own.
pub fn mn_on(db: Db, policy: strato_actors::vm::ops::VmPolicy) -> Cluster {
    let runtime =
        Runtime::start(RuntimeConfig { arbiters: 2, ..Default::default() }, db.clone()).unwrap();
    let vms = runtime.register(Vms::with_policy(db.clone(), policy), Vms::kind_config());
    let mut config = HostConfig::new(ca().pki.clone());
    config.ping_interval = Duration::from_millis(100);
    config.ping_timeout = Duration::from_millis(200);
    config.ping_failures = 2;
    config.reconnect_base = Duration::from_millis(50);
    config.reconnect_max = Duration::from_millis(400);
    let hosts = runtime.register(Hosts::new(db.clone(), config), Hosts::kind_config());
    let l3s = runtime.register(L3s::new(db.clone()), L3s::kind_config());
    strato_actors::vm::create::define(
        &runtime,
        hosts.clone(),
        l3s.clone(),
        vms.entity().quotas().clone(),
        Overcommit::default(),
    );
    Cluster { runtime, db, hosts, vms, l3s }
}

pub fn sim(dir: &std::path::Path) -> Arc<Sim> {
    Arc::new(
        Sim::open(SimConfig {
            hostname: "sim-test".into(),
            cpus: 8,
            memory_mib: 16_384,
            latency: Duration::ZERO,
            failures: Default::default(),
            state_file: dir.join("sim.json"),
            reset: false,
        })
        .unwrap(),
    )
}

/// Serves `driver` on `addr` (port 0: any) with an agent of the test binary's CA.
pub async fn serve(driver: Arc<Sim>, addr: SocketAddr) -> (Arc<Agent>, SocketAddr) {
    serve_for(ca(), "sim-test", driver, addr).await
}

/// Serves `driver` on `addr` with an agent enrolled by (or waiting to enroll with) `ca`.
pub async fn serve_for(
    ca: &TestCa,
    label: &str,
    driver: Arc<dyn Driver>,
    addr: SocketAddr,
) -> (Arc<Agent>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Agent::new(label, ca.credentials(addr), driver, Arc::new(SimNet::default()));
    tokio::spawn(agent.clone().serve(listener));
    (agent, addr)
}

#[expect(clippy::disallowed_methods, reason = "the tests set the store up from any thread")]
pub fn put<R: strato_storage::Record>(db: &Db, record: &R) {
    let mut batch = Batch::new();
    batch.put(record, Expect::Any).unwrap();
    db.commit_blocking(batch).unwrap();
}

pub fn host_record(addr: SocketAddr) -> HostRecord {
    HostRecord::added("h1".into(), Uuid::new_v4(), addr.ip().to_string(), addr.port())
}

pub fn vm_record(host: Uuid, state: VmState) -> VmRecord {
    VmRecord {
        uuid: Uuid::new_v4(),
        name: "vm".into(),
        state,
        host_uuid: Some(host),
        last_host_uuid: None,
        cpu_num: 1,
        memory_size: 1 << 30,
        root_volume_path: None,
        vm_nics: vec![],
    }
}

/// An L3 network with no ranges or services, on `l2` if given.
pub fn l3_record(name: &str, l2: Option<Uuid>) -> strato_actors::records::L3NetworkRecord {
    strato_actors::records::L3NetworkRecord {
        uuid: Uuid::new_v4(),
        name: name.into(),
        l2_network_uuid: l2,
        ip_ranges: vec![],
        dns: vec![],
        bridge: None,
        mtu: None,
        host_routes: vec![],
        dhcp_server_ip: None,
    }
}

pub fn domain(uuid: Uuid) -> DomainSpec {
    DomainSpec {
        uuid,
        name: uuid.to_string(),
        vcpus: 1,
        memory_mib: 64,
        root_volume: None,
        nics: vec![],
        disks: vec![],
    }
}

pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(10), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
