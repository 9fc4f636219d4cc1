//! Creating VMs through the `vm.create` flow against a real agent server: success, then a
//! failure at each step (and after the last) leaving nothing behind, the placement trace,
//! and a burst of creations for one free address.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use strato_actors::host;
use strato_actors::ipam::IpRange;
use strato_actors::records::{
    HostRecord, HostStatus, ImageRecord, L3NetworkRecord, PrimaryStorageRecord, UsedIpRecord,
    VmRecord,
};
use strato_actors::vm::create::{self, CREATE_CHAIN, CreateVm};
use strato_actors::vm::ops::DELETE_VOLUME_JOB;
use strato_actors::vm::state::VmState;
use strato_agent::driver::Driver;
use strato_agent::driver::sim::{Sim, SimConfig};
use strato_proto::DomainState;
use strato_runtime::{BoxError, FlowInfo, FlowJob, RuntimeError, Step};
use uuid::Uuid;

struct Setup {
    c: Cluster,
    driver: Arc<Sim>,
    host: Uuid,
    l3: Uuid,
    agent: Arc<strato_agent::server::Agent>,
    _dir: tempfile::TempDir,
}

/// One sim host (8 CPUs, 16 GiB), connected, and an L3 with `ips` addresses.
async fn setup(failures: &[(&str, f64)], ips: u8) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let driver = Arc::new(
        Sim::open(SimConfig {
            hostname: "h".into(),
            cpus: 8,
            memory_mib: 16_384,
            latency: Duration::ZERO,
            failures: failures.iter().map(|(k, p)| ((*k).to_owned(), *p)).collect(),
            state_file: dir.path().join("sim.json"),
            reset: false,
        })
        .unwrap(),
    );
    let (agent, addr) = serve(driver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let c = mn();
    let host = host_record(addr);
    put(&c.db, &host);
    host::link::connect(&c.hosts, host.uuid).await.unwrap();
    let l3 = l3_record("pub", None);
    put(&c.db, &l3);
    let range = IpRange::new(
        "10.0.0.10".parse().unwrap(),
        format!("10.0.0.{}", 9 + ips).parse().unwrap(),
        "255.255.255.0".parse().unwrap(),
        "10.0.0.1".parse().unwrap(),
    )
    .unwrap();
    strato_actors::l3::add_ip_range(&c.l3s, l3.uuid, range).await.unwrap();
    Setup { c, driver, host: host.uuid, l3: l3.uuid, agent, _dir: dir }
}

fn request(s: &Setup, memory_gib: u64) -> CreateVm {
    CreateVm {
        vm: Uuid::new_v4(),
        name: "vm".into(),
        cpu_num: 2,
        memory_size: memory_gib << 30,
        l3_networks: vec![s.l3],
        clusters: None,
        pinned_host: None,
        host: None,
        nics: vec![],
        image: None,
        static_ips: vec![],
        system_tags: vec![],
        user_tags: vec![],
        created: None,
        charge_to: None,
    }
}

/// Nothing of VM `vm` is left: no record, booking, address or domain.
fn assert_nothing_left(s: &Setup, vm: Uuid) {
    assert!(s.c.db.get::<VmRecord>(vm).unwrap().is_none(), "VM record left");
    let host = s.c.db.get::<HostRecord>(s.host).unwrap().unwrap().record;
    assert!(!host.reservations.contains_key(&vm), "capacity left booked");
    let nic = create::nic_id(vm, s.l3);
    let leaked = s.c.db.scan::<UsedIpRecord>().map(|r| r.unwrap().record).any(|u| u.owner == nic);
    assert!(!leaked, "address left allocated");
    assert!(s.driver.list().unwrap().iter().all(|d| d.uuid != vm), "domain left on the host");
    assert!(s.c.runtime.flows().in_progress().unwrap().is_empty(), "flow record left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_created_running_with_its_ip_booking_and_domain() {
    let s = setup(&[], 5).await;
    let vm = create::create(&s.c.runtime, request(&s, 1), FlowJob::default()).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.host_uuid, Some(s.host));
    assert_eq!(vm.vm_nics.len(), 1);
    assert_eq!(vm.vm_nics[0].ip, "10.0.0.10");
    let domain = s.driver.list().unwrap().into_iter().find(|d| d.uuid == vm.uuid).unwrap();
    assert_eq!(domain.state, DomainState::Running);
    let host = s.c.db.get::<HostRecord>(s.host).unwrap().unwrap().record;
    assert_eq!(host.reservations[&vm.uuid].cpu, 2);
    assert_eq!(s.c.db.find::<VmRecord>("ip", &"10.0.0.10".into()).unwrap(), vec![vm.uuid]);
}

/// The creation's agent commands carry its job's deadline (they had 120 s each, whatever
/// the job): a job already past its deadline gets no domain started, and rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_steps_commands_carry_the_jobs_deadline() {
    let s = setup(&[], 5).await;
    let late = FlowJob {
        id: Some(Uuid::new_v4()),
        deadline: Some(std::time::SystemTime::now() - Duration::from_secs(1)),
    };
    let req = request(&s, 1);
    let error = create::create(&s.c.runtime, req.clone(), late).await.unwrap_err();
    let RuntimeError::FlowFailed { step, cause, .. } = &error else { panic!("{error:?}") };
    assert_eq!(step, "start-domain", "{error}");
    // The command was sent with the job's deadline, already past: the link gave up on it at
    // once, or the agent refused it as late; either way it was not given 120 s.
    let late = cause.as_ref().and_then(|c| c.downcast_ref::<host::HostError>());
    assert!(
        matches!(late, Some(host::HostError::Link(strato_proto::LinkError::Timeout { .. })))
            || matches!(
                late,
                Some(host::HostError::Link(strato_proto::LinkError::Agent { error, .. }))
                    if error.code == strato_proto::AgentErrorCode::DeadlineExceeded
            ),
        "{error:?}"
    );
    assert_nothing_left(&s, req.vm);
    // Without a deadline of its own, the same creation runs.
    create::create(&s.c.runtime, request(&s, 1), FlowJob::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_host_rolls_back_and_carries_the_placement_trace() {
    let s = setup(&[], 5).await;
    let mut big = request(&s, 64); // 64 GiB on a 16 GiB host
    big.name = "big".into();
    let error = create::create(&s.c.runtime, big.clone(), FlowJob::default()).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("allocate-host"), "{text}");
    assert!(
        text.contains("status Connected -> 1")
            && text.contains("free capacity for 2 CPU and 65536 MiB -> 0"),
        "{text}"
    );
    assert_nothing_left(&s, big.vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_address_rolls_back_the_booking_and_the_record() {
    let s = setup(&[], 1).await;
    create::create(&s.c.runtime, request(&s, 1), FlowJob::default()).await.unwrap();
    let second = request(&s, 1);
    let error = create::create(&s.c.runtime, second.clone(), FlowJob::default()).await.unwrap_err();
    assert!(
        error.to_string().contains("allocate-nics") && error.to_string().contains("no free IP"),
        "{error}"
    );
    assert_nothing_left(&s, second.vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_start_rolls_back_the_domain_address_booking_and_record() {
    let s = setup(&[("start-domain", 1.0)], 5).await;
    let vm = request(&s, 1);
    let error = create::create(&s.c.runtime, vm.clone(), FlowJob::default()).await.unwrap_err();
    assert!(error.to_string().contains("start-domain"), "{error}");
    assert_nothing_left(&s, vm.vm);
}

/// A step another module adds after the last one, failing: everything before rolls back,
/// including a domain that was already running.
struct Refuse;

#[async_trait::async_trait]
impl Step<CreateVm> for Refuse {
    async fn run(&self, _: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        Err("refused by an extension".into())
    }

    async fn rollback(&self, _: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_last_step_undoes_a_running_vm() {
    let s = setup(&[], 5).await;
    s.c.runtime
        .flows()
        .insert_after::<CreateVm>(CREATE_CHAIN, "start-domain", "extension", Refuse)
        .unwrap();
    let vm = request(&s, 1);
    let error = create::create(&s.c.runtime, vm.clone(), FlowJob::default()).await.unwrap_err();
    assert!(
        matches!(error, RuntimeError::FlowFailed { ref step, .. } if step == "extension"),
        "{error}"
    );
    assert_nothing_left(&s, vm.vm);
}

/// The quota is charged by the creation's first step, under the account's lock: creations
/// at once for the last slots take exactly as many as the quota has, the others fail on it
/// and leave no charge behind (the handler's look before the job lets them all through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creations_takes_exactly_the_quotas_slots() {
    use strato_actors::accounts::{AccountRecord, AccountType, Quota};
    use strato_actors::owners::{self, Charge, OwnerRecord, QuotaError};
    let s = setup(&[], 20).await;
    let account = AccountRecord {
        uuid: Uuid::new_v4(),
        name: "tenant".into(),
        account_type: AccountType::Normal,
        quota: Quota { vm_num: 2, ..Quota::default() },
        create_date: 0,
    };
    put(&s.c.db, &account);
    let charge = Charge { vm_num: 1, cpu_num: 2, memory_size: 1 << 30, ..Charge::default() };
    let requests: Vec<CreateVm> = (0..6)
        .map(|_| CreateVm { charge_to: Some((account.uuid, charge)), ..request(&s, 1) })
        .collect();
    let results = futures::future::join_all(
        requests.iter().cloned().map(|r| create::create(&s.c.runtime, r, FlowJob::default())),
    )
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2, "two slots, two VMs");
    for (request, result) in requests.iter().zip(&results) {
        let Err(error) = result else { continue };
        let RuntimeError::FlowFailed { step, cause, .. } = error else { panic!("{error:?}") };
        assert_eq!(step, "record");
        let exceeded = cause.as_ref().and_then(|c| c.downcast_ref::<QuotaError>());
        assert!(matches!(exceeded, Some(QuotaError::Exceeded { quota: "vmNum", .. })), "{error}");
        assert!(s.c.db.get::<OwnerRecord>(request.vm).unwrap().is_none(), "a charge left");
        assert_nothing_left(&s, request.vm);
    }
    assert_eq!(owners::usage(&s.c.db, account.uuid).unwrap(), charge + charge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_one_free_address_creates_exactly_one_vm() {
    let s = setup(&[], 1).await;
    let requests: Vec<CreateVm> = (0..6).map(|_| request(&s, 1)).collect();
    let results = futures::future::join_all(
        requests.iter().cloned().map(|r| create::create(&s.c.runtime, r, FlowJob::default())),
    )
    .await;
    let created: Vec<&VmRecord> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(created.len(), 1, "one address, one VM");
    for (request, result) in requests.iter().zip(&results) {
        if result.is_err() {
            assert_nothing_left(&s, request.vm);
        }
    }
    assert_eq!(s.c.db.count::<UsedIpRecord>().unwrap(), 1);
    let host = s.c.db.get::<HostRecord>(s.host).unwrap().unwrap().record;
    assert_eq!(host.reservations.len(), 1, "only the created VM holds capacity");
}

/// A step that wakes the VM's actor while its creation is still running, as an early
/// hypervisor report does.
struct WakeTheVm(strato_runtime::Kind<strato_actors::vm::Vms>);

#[async_trait::async_trait]
impl Step<CreateVm> for WakeTheVm {
    async fn run(&self, c: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        strato_actors::vm::record(&self.0, c.vm).await?;
        Ok(())
    }

    async fn rollback(&self, _: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_actor_woken_during_its_creation_sees_the_created_vm() {
    let s = setup(&[], 5).await;
    s.c.runtime
        .flows()
        .insert_before::<CreateVm>(CREATE_CHAIN, "start-domain", "wake", WakeTheVm(s.c.vms.clone()))
        .unwrap();
    let vm = create::create(&s.c.runtime, request(&s, 1), FlowJob::default()).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    // The actor's first operation after the creation starts from the created VM, not from
    // the copy it loaded while the flow ran.
    let stopped = strato_actors::vm::ops::operate(
        &s.c.vms,
        vm.uuid,
        strato_actors::vm::ops::Lifecycle::Stop,
        Duration::from_secs(10),
        None,
    )
    .await
    .unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
}

/// A step that takes the host away and fails, after the root volume exists.
struct LoseTheHost(Arc<strato_agent::server::Agent>, strato_runtime::Kind<host::Hosts>);

#[async_trait::async_trait]
impl Step<CreateVm> for LoseTheHost {
    async fn run(&self, c: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        self.0.shutdown();
        let host = c.host.unwrap();
        let started = std::time::Instant::now();
        while host::record(&self.1, host).await?.status != HostStatus::Disconnected {
            assert!(started.elapsed() < Duration::from_secs(10), "the host stays connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("the host went away".into())
    }

    async fn rollback(&self, _: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_left_on_a_lost_host_is_deleted_by_the_gc_when_it_is_back() {
    let s = setup(&[], 5).await;
    strato_actors::vm::ops::register_gc(&s.c.runtime, s.c.hosts.clone());
    s.c.runtime.gc().start().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let source = storage.path().join("image.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&source)
        .arg("1M")
        .status()
        .unwrap();
    assert!(made.success());
    let cluster = s.c.db.get::<HostRecord>(s.host).unwrap().unwrap().record.cluster_uuid;
    put(
        &s.c.db,
        &PrimaryStorageRecord {
            uuid: Uuid::new_v4(),
            name: "ps".into(),
            url: storage.path().join("ps").display().to_string(),
            zone_uuid: Uuid::new_v4(),
            r#type: "LocalStorage".into(),
            attached_cluster_uuids: vec![cluster],
            mount_path: None,
        },
    );
    let image = ImageRecord {
        uuid: Uuid::new_v4(),
        name: "image".into(),
        url: format!("file://{}", source.display()),
        format: "qcow2".into(),
        media_type: strato_actors::records::ROOT_VOLUME_TEMPLATE.into(),
        size: 0,
        checksum: String::new(),
        backup_storage_refs: vec![(Uuid::new_v4(), source.display().to_string())],
        status: "Ready".into(),
    };
    put(&s.c.db, &image);
    s.c.runtime
        .flows()
        .insert_after::<CreateVm>(
            CREATE_CHAIN,
            "create-root-volume",
            "lose-the-host",
            LoseTheHost(s.agent.clone(), s.c.hosts.clone()),
        )
        .unwrap();
    let mut vm = request(&s, 1);
    vm.image = Some(image.uuid);
    let error = create::create(&s.c.runtime, vm.clone(), FlowJob::default()).await.unwrap_err();
    assert!(error.to_string().contains("lose-the-host"), "{error}");
    let volume = storage.path().join("ps/rootvolumes").join(format!("{}.qcow2", vm.vm));
    assert!(volume.exists(), "the host was away: the volume is still there");
    let jobs = || {
        s.c.runtime.gc().list().unwrap().into_iter().filter(|j| j.kind == DELETE_VOLUME_JOB).count()
    };
    assert_eq!(jobs(), 1, "a GC job will delete it");

    // The agent comes back on its address; the host reconnects; the GC job runs.
    let addr = {
        let h = s.c.db.get::<HostRecord>(s.host).unwrap().unwrap().record;
        format!("{}:{}", h.management_ip, h.agent_port).parse().unwrap()
    };
    let (_agent, _) = serve(s.driver.clone(), addr).await;
    eventually("leftover volume deleted", || async { !volume.exists() }).await;
    eventually("GC job done", || async { jobs() == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_is_given_back_only_by_its_owner() {
    let s = setup(&[], 1).await;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let ip = strato_actors::l3::allocate_ip(&s.c.l3s, s.l3, first, None).await.unwrap();
    // A late repeat of someone else's release (after a crash, or by the GC) changes nothing.
    strato_actors::l3::release_ip(&s.c.l3s, s.l3, ip, second).await.unwrap();
    assert!(strato_actors::l3::allocate_ip(&s.c.l3s, s.l3, second, None).await.is_err());
    strato_actors::l3::release_ip(&s.c.l3s, s.l3, ip, first).await.unwrap();
    assert_eq!(strato_actors::l3::allocate_ip(&s.c.l3s, s.l3, second, None).await.unwrap(), ip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l3_network_outlives_the_addresses_it_hands_out() {
    use strato_actors::cascade::{DeleteMode, Deleter, Resource};
    let s = setup(&[], 2).await;
    // A creation in flight holds an address its VM record does not name yet: no dependents
    // check sees it, so the network itself refuses to go until it is given back.
    let nic = Uuid::new_v4();
    let ip = strato_actors::l3::allocate_ip(&s.c.l3s, s.l3, nic, None).await.unwrap();
    let deleter = Deleter {
        db: s.c.db.clone(),
        hosts: s.c.hosts.clone(),
        vms: s.c.vms.clone(),
        l3s: s.c.l3s.clone(),
    };
    let resource = Resource { kind: strato_actors::kinds::of::<L3NetworkRecord>(), uuid: s.l3 };
    let deletion =
        tokio::spawn(async move { deleter.delete(resource, DeleteMode::Permissive).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!deletion.is_finished(), "the deletion waits while an address is held");
    assert!(s.c.db.get::<L3NetworkRecord>(s.l3).unwrap().is_some());
    let used = || s.c.db.count::<UsedIpRecord>().unwrap();
    assert_eq!(used(), 1, "the held address is still booked");
    strato_actors::l3::release_ip(&s.c.l3s, s.l3, ip, nic).await.unwrap();
    let deleted = deletion.await.unwrap().unwrap();
    assert_eq!(deleted, vec![resource]);
    assert!(s.c.db.get::<L3NetworkRecord>(s.l3).unwrap().is_none());
    assert_eq!(used(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_ip_tag_is_the_address_ipam_hands_out_or_the_creation_fails() {
    let s = setup(&[], 5).await;
    let mut pinned = request(&s, 1);
    pinned.static_ips = vec![(s.l3, "10.0.0.13".parse().unwrap())];
    let vm = create::create(&s.c.runtime, pinned, FlowJob::default()).await.unwrap();
    assert_eq!(vm.vm_nics[0].ip, "10.0.0.13", "not the lowest free address: the tag's");
    // The same address again is taken: that creation fails and leaves nothing.
    let mut again = request(&s, 1);
    again.static_ips = vec![(s.l3, "10.0.0.13".parse().unwrap())];
    let error = create::create(&s.c.runtime, again.clone(), FlowJob::default()).await.unwrap_err();
    assert!(error.to_string().contains("10.0.0.13 is already in use"), "{error}");
    assert_nothing_left(&s, again.vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_reserved_memory_tag_keeps_that_memory_from_vms() {
    let s = setup(&[], 5).await;
    // 16 GiB host: 12 GiB kept for the host leaves 4 GiB (the test overcommit is 1.0).
    let tag = strato_actors::tags::SystemTag::new(s.host, "HostVO", "reservedMemory::12G");
    put(&s.c.db, &tag);
    s.c.hosts.entity().keep_for_host(s.host, 12 << 30);
    let error = create::create(&s.c.runtime, request(&s, 5), FlowJob::default()).await.unwrap_err();
    assert!(error.to_string().contains("free capacity for 2 CPU and 5120 MiB -> 0"), "{error}");
    create::create(&s.c.runtime, request(&s, 4), FlowJob::default()).await.unwrap();
    s.c.hosts.entity().keep_for_host(s.host, 0);
    create::create(&s.c.runtime, request(&s, 5), FlowJob::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_tags_go_with_its_record() {
    let s = setup(&[("start-domain", 1.0)], 5).await;
    let mut req = request(&s, 1);
    req.user_tags = vec!["web".into()];
    req.system_tags = vec!["hostname::web-1".into()];
    create::create(&s.c.runtime, req.clone(), FlowJob::default()).await.unwrap_err();
    assert_nothing_left(&s, req.vm);
    assert!(
        strato_actors::tags::of::<strato_actors::tags::User>(&s.c.db, req.vm).unwrap().is_empty()
    );
    assert!(
        strato_actors::tags::of::<strato_actors::tags::System>(&s.c.db, req.vm).unwrap().is_empty()
    );
    // And a created VM keeps them.
    let s = setup(&[], 5).await;
    let mut req = request(&s, 1);
    req.user_tags = vec!["web".into()];
    let vm = create::create(&s.c.runtime, req, FlowJob::default()).await.unwrap();
    let tags = strato_actors::tags::of::<strato_actors::tags::User>(&s.c.db, vm.uuid).unwrap();
    assert_eq!(tags.iter().map(|t| t.tag.as_str()).collect::<Vec<_>>(), ["web"]);
}
