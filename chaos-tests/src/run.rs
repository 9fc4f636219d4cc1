//! `strato-chaos run`: one seeded chaos run, from an empty cluster to a verdict.
//!
//! It starts the cluster, registers the infrastructure, then runs the workload's clients, the
//! fault schedule and the sampled checks together for `--duration`. Then it heals every fault
//! (links whole, every process up without injected faults), waits for the cluster to settle,
//! runs the final checks, and prints the report: the seed, the faults injected, operations by
//! result, and each violation with the history around it. The exit code is the verdict.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strato_api::client;
use strato_api::types::actions::{
    L3Action, NetworkServices, OnL3Network, RuleParams, SecurityGroupAction, SecurityGroupRules,
};
use strato_api::types::{
    ClusterParams, Create, EipParams, HostParams, L2Params, L3Params, OfferingParams, RangeParams,
    SecurityGroupParams, VipParams, ZoneParams, canonical_uuid,
};
use uuid::Uuid;

use crate::Error;
use crate::checks::{self, Violation};
use crate::cluster::Cluster;
use crate::faults::{self, Scheduled};
use crate::workload::{self, Entry, Infra, Outcome, Shared, Strategy};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The seed of the workload and of the fault schedule.
    pub seed: u64,
    /// How long the workload and the faults run.
    pub duration: Duration,
    /// Simulated hosts (one agent process each).
    pub hosts: usize,
    /// Concurrent API clients.
    pub clients: usize,
    /// How clients choose actions.
    pub strategy: Strategy,
    /// Whether faults are injected (without, the run checks the workload alone).
    pub faults: bool,
    /// Whether agents get network namespaces of their own (when the machine allows it).
    pub namespaces: bool,
    /// Whether clients fire storms of simultaneous operations (`--storm`).
    pub storm: bool,
}

fn ok(api: std::net::SocketAddr, method: &str, path: &str, body: Value) -> Result<Value, Error> {
    let (status, reply) = client::request(api, method, path, Some(&body))?;
    if status != 202 {
        return Err(format!("{method} {path} answered {status}: {reply}").into());
    }
    match workload::follow(api, reply["location"].as_str().unwrap_or_default(), workload::JOB_LIMIT)
    {
        Outcome::Succeeded(inventory) => Ok(inventory),
        other => Err(format!("{method} {path} ended {other:?}").into()),
    }
}

fn uuid(v: &Value) -> String {
    v["uuid"].as_str().unwrap_or_default().to_owned()
}

/// A resource's UUID, as its inventory names it.
fn id(v: &Value) -> Result<Uuid, Error> {
    canonical_uuid(v["uuid"].as_str().unwrap_or_default())
        .ok_or_else(|| format!("no UUID in {v}").into())
}

/// Registers a zone, a cluster, every host, an offering, an L2 network, the main L3 network
/// (with the Flat provider's DHCP, DNS and metadata when the hosts make their network) and
/// the one-address L3 network.
fn register(cluster: &Cluster) -> Result<Infra, Error> {
    let api = cluster.api();
    let create =
        |path: &str, params: Value| ok(api, "POST", path, client::body(&Create::new(params)));
    let zone = id(&create(
        "/v1/zones",
        client::body(&ZoneParams { name: "z1".into(), description: None }),
    )?)?;
    let cl = id(&create(
        "/v1/clusters",
        client::body(&ClusterParams {
            name: "c1".into(),
            zone_uuid: zone,
            hypervisor_type: "KVM".into(),
        }),
    )?)?;
    let mut host_addrs = Vec::new();
    for i in 0..cluster.hosts() {
        let addr = cluster.host_addr(i);
        let host = HostParams {
            name: format!("host-{i}"),
            management_ip: addr.ip().to_string(),
            agent_port: addr.port(),
            cluster_uuid: cl,
        };
        create("/v1/hosts/kvm", client::body(&host))?;
        host_addrs.push(addr);
    }
    let offering = OfferingParams { name: "small".into(), cpu_num: 1, memory_size: 512 << 20 };
    let offering = uuid(&create("/v1/instance-offerings", client::body(&offering))?);
    let l2 = L2Params { name: "l2".into(), zone_uuid: zone, physical_interface: "eth0".into() };
    let l2 = id(&create("/v1/l2-networks/no-vlan", client::body(&l2))?)?;
    ok(api, "POST", &format!("/v1/l2-networks/{l2}/clusters/{cl}"), json!({}))?;
    let l3_with = |name: &str, net: &str, last: u8| -> Result<String, Error> {
        let params =
            L3Params { name: name.into(), l2_network_uuid: Some(l2), dns: vec![], bridge: None };
        let l3 = uuid(&create("/v1/l3-networks", client::body(&params))?);
        let ip = |host: &str| format!("{net}.{host}").parse::<std::net::Ipv4Addr>();
        let range = RangeParams {
            start_ip: ip("10")?,
            end_ip: ip(&last.to_string())?,
            netmask: std::net::Ipv4Addr::new(255, 255, 255, 0),
            gateway: ip("1")?,
            name: None,
        };
        create(&format!("/v1/l3-networks/{l3}/ip-ranges"), client::body(&range))?;
        Ok(l3)
    };
    let l3 = l3_with("pub", "192.168.0", 250)?;
    let tight_l3 = l3_with("tight", "192.168.1", 10)?;
    let (mut eip, mut security_group) = (None, None);
    if cluster.isolated() {
        // The hosts make the main network's DHCP, DNS, metadata and EIPs for real.
        let (_, providers) =
            client::request(api, "GET", "/v1/network-service-providers?q=type=Flat", None)?;
        let flat = providers["inventories"][0]["uuid"].as_str().unwrap_or_default().to_owned();
        ok(
            api,
            "POST",
            &format!("/v1/network-service-providers/{flat}/l2-networks/{l2}"),
            json!({}),
        )?;
        let services = [(flat, ["DHCP", "DNS", "Userdata", "Eip"].map(String::from).to_vec())];
        let attach = L3Action::AttachNetworkServiceToL3Network(NetworkServices {
            network_services: services.into_iter().collect(),
        });
        ok(api, "PUT", &format!("/v1/l3-networks/{l3}/actions"), client::body(&attach))?;
        // A public network on the same L2, and an EIP on a VIP of it.
        let public = l3_with("public", "192.168.9", 20)?;
        let vip = VipParams {
            name: "vip".into(),
            description: String::new(),
            l3_network_uuid: id(&json!({ "uuid": public }))?,
            required_ip: None,
        };
        let vip = id(&create("/v1/vips", client::body(&vip))?)?;
        let params = EipParams {
            name: "eip".into(),
            description: String::new(),
            vip_uuid: vip,
            vm_nic_uuid: None,
        };
        eip = Some(uuid(&create("/v1/eips", client::body(&params))?));
        // A security group on the main network: SSH from anywhere, everything between its
        // members (a set of addresses that follows the membership).
        let params = SecurityGroupParams { name: "members".into(), description: String::new() };
        let group = id(&create("/v1/security-groups", client::body(&params))?)?;
        let rule = |protocol: &str, ports: Option<i32>, remote: Option<Uuid>| RuleParams {
            r#type: "Ingress".into(),
            protocol: protocol.into(),
            start_port: ports,
            end_port: ports,
            allowed_cidr: None,
            remote_security_group_uuid: remote,
        };
        let group_path = format!("/v1/security-groups/{group}/actions");
        let rules = SecurityGroupAction::AddSecurityGroupRule(SecurityGroupRules {
            rules: vec![rule("TCP", Some(22), None), rule("ALL", None, Some(group))],
        });
        ok(api, "PUT", &group_path, client::body(&rules))?;
        let attach = SecurityGroupAction::AttachSecurityGroupToL3Network(OnL3Network {
            l3_network_uuid: id(&json!({ "uuid": l3 }))?,
        });
        ok(api, "PUT", &group_path, client::body(&attach))?;
        security_group = Some(group.to_string());
    }
    // Local primary storage: the run's data volumes are real qcow2 files there.
    let primary_storage_dir = cluster.dir().join("ps");
    let ps = create(
        "/v1/primary-storage/local-storage",
        json!({ "name": "ps", "url": primary_storage_dir.display().to_string(), "zoneUuid": zone }),
    )?;
    ok(api, "POST", &format!("/v1/clusters/{cl}/primary-storage/{}", uuid(&ps)), json!({}))?;
    // An image in backup storage, for the VMs with root volumes.
    let images = cluster.dir().join("images");
    std::fs::create_dir_all(&images)?;
    let source = images.join("image.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&source)
        .arg("16M")
        .status()?;
    if !made.success() {
        return Err("qemu-img could not make the run's image".into());
    }
    let bs = create(
        "/v1/backup-storage/image-store",
        json!({ "name": "bs", "url": cluster.dir().join("bs").display().to_string() }),
    )?;
    ok(api, "POST", &format!("/v1/zones/{zone}/backup-storage/{}", uuid(&bs)), json!({}))?;
    let image = create(
        "/v1/images",
        json!({ "name": "image", "url": format!("file://{}", source.display()), "format": "qcow2", "backupStorageUuids": [bs["uuid"]] }),
    )?;
    let image = uuid(&image).to_owned();
    let (cluster, zone, l2) = (cl.to_string(), zone.to_string(), l2.to_string());
    Ok(Infra {
        cluster,
        zone,
        offering,
        l2,
        l3,
        tight_l3,
        host_addrs,
        eip,
        security_group,
        primary_storage_dir,
        image,
    })
}

/// Runs one chaos run in `dir`; returns whether every check passed.
pub fn run(config: &RunConfig, dir: &Path) -> Result<bool, Error> {
    println!(
        "strato-chaos run --seed {} --duration {}s --hosts {} --clients {} --strategy {:?}{}{}",
        config.seed,
        config.duration.as_secs(),
        config.hosts,
        config.clients,
        config.strategy,
        if config.faults { "" } else { " --no-faults" },
        if config.storm { " --storm" } else { "" }
    );
    let cluster = Cluster::start(dir, config.hosts, config.seed, config.namespaces)?;
    println!(
        "network: {}",
        if cluster.isolated() {
            "each agent in its own network namespace (partitions cut its link)"
        } else {
            "loopback (partitions are played by the fault proxies)"
        }
    );
    let infra = register(&cluster)?;
    let api = cluster.api();
    let cluster = Arc::new(Mutex::new(cluster));
    let schedule = if config.faults {
        faults::schedule(
            config.seed,
            config.duration,
            config.hosts,
            cluster.lock().expect("cluster").isolated(),
        )
    } else {
        vec![]
    };
    println!("faults scheduled: {}", schedule.len());

    let shared = Arc::new(Shared::new(api, infra, config.storm));
    let clients: Vec<_> = (0..config.clients)
        .map(|i| {
            let shared = shared.clone();
            let (seed, strategy) = (config.seed.wrapping_mul(1000) + i as u64, config.strategy);
            std::thread::spawn(move || workload::client(shared, i, seed, strategy))
        })
        .collect();
    let mover = {
        let shared = shared.clone();
        let seed = config.seed;
        std::thread::spawn(move || workload::network_mover(shared, seed))
    };
    let storage = {
        let shared = shared.clone();
        let seed = config.seed;
        std::thread::spawn(move || workload::storage_mover(shared, seed))
    };
    let fault_log: Arc<Mutex<Vec<String>>> = Arc::default();
    let windows: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let injectors: Vec<_> = schedule
        .iter()
        .cloned()
        .map(|Scheduled { at, fault }| {
            let (cluster, shared, log) = (cluster.clone(), shared.clone(), fault_log.clone());
            let windows = windows.clone();
            std::thread::spawn(move || {
                std::thread::sleep(at.saturating_sub(shared.started.elapsed()));
                let start = shared.now();
                // Open until it ends: what runs meanwhile may fail because of it.
                windows.lock().expect("windows").push((start, u64::MAX));
                let result = faults::apply(&cluster, &fault);
                if let Some(w) = windows.lock().expect("windows").iter_mut().find(|w| w.0 == start)
                {
                    w.1 = shared.now();
                }
                let line = format!(
                    "  {:>7.1}s  {:>5.1}s  {fault:?}{}",
                    start as f64 / 1000.0,
                    (shared.now() - start) as f64 / 1000.0,
                    result.err().map(|e| format!("  (failed: {e})")).unwrap_or_default()
                );
                eprintln!("chaos: fault {line}");
                log.lock().expect("fault log").push(line);
            })
        })
        .collect();

    let mut violations: Vec<Violation> = Vec::new();
    let deadline = Instant::now() + config.duration;
    let mut last_progress = Instant::now();
    let mut double_booked = Default::default();
    while Instant::now() < deadline {
        violations.extend(checks::sample(&shared, &cluster, &mut double_booked));
        if last_progress.elapsed() > Duration::from_secs(10) {
            last_progress = Instant::now();
            eprintln!(
                "chaos: {:>4}s  {} calls, {} violations so far",
                shared.started.elapsed().as_secs(),
                shared.history.entries().len(),
                violations.len()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    shared.stop.store(true, Ordering::SeqCst);
    eprintln!("chaos: workload stopped; waiting for the last calls and faults to end");
    for injector in injectors {
        let _ = injector.join();
    }
    for client in clients {
        let _ = client.join();
    }
    let _ = mover.join();
    let _ = storage.join();
    // Heal: every link whole and every process up without injected faults.
    {
        let mut c = cluster.lock().expect("cluster");
        for i in 0..c.hosts() {
            c.partition(i, false)?;
            c.proxy(i).partition(false);
            c.proxy(i).set_faults(Default::default());
        }
        c.start_mn(None)?;
        for i in 0..c.hosts() {
            c.start_agent(i, &[])?;
        }
    }
    eprintln!("chaos: healed; checking");
    violations.extend(checks::after_healing(&shared, &cluster));
    violations.extend(checks::failures_without_a_fault(
        &shared.history.entries(),
        &windows.lock().expect("windows"),
    ));

    let entries = shared.history.entries();
    report(config, &fault_log.lock().expect("fault log"), &entries, &violations);
    Ok(violations.is_empty())
}

fn outcome_name(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Pending => "pending".into(),
        Outcome::Succeeded(_) => "succeeded".into(),
        Outcome::Failed(code) => format!("failed {code}"),
        Outcome::Refused(status, code) => format!("refused {status} {code}"),
        Outcome::Unreachable => "MN unreachable".into(),
        Outcome::Lost => "lost".into(),
    }
}

fn report(config: &RunConfig, faults: &[String], entries: &[Entry], violations: &[Violation]) {
    println!("\n== seed {}", config.seed);
    println!("faults injected ({}):", faults.len());
    println!("  {:>8}  {:>6}  fault", "at", "length");
    for line in faults {
        println!("{line}");
    }
    let mut by_result: BTreeMap<(String, String), u64> = BTreeMap::new();
    for entry in entries {
        let result = match &entry.outcome {
            Outcome::Failed(_) | Outcome::Refused(..) => outcome_name(&entry.outcome),
            other => outcome_name(other),
        };
        *by_result.entry((format!("{:?}", entry.action), result)).or_default() += 1;
    }
    println!("operations by result ({} calls):", entries.len());
    for ((action, result), count) in &by_result {
        println!("  {action:<14} {result:<40} {count:>6}");
    }
    println!(
        "tenant isolation: not checked here (the workload runs as the admin); api/tests/accounts.rs checks it"
    );
    if violations.is_empty() {
        println!("PASS: no invariant violated (seed {})", config.seed);
        return;
    }
    println!("FAIL: {} violations (seed {})", violations.len(), config.seed);
    let mut seen = std::collections::HashSet::new();
    for v in violations {
        // One report per (invariant, resource, detail): samples repeat what persists.
        if !seen.insert((v.invariant, v.resource.clone(), v.detail.clone())) {
            continue;
        }
        println!(
            "\n-- {} at {:.1}s: {}\n   resource {}",
            v.invariant,
            v.at_ms as f64 / 1000.0,
            v.detail,
            v.resource.as_deref().unwrap_or("-")
        );
        let around: Vec<&Entry> = entries
            .iter()
            .filter(|e| {
                let near = e.sent_ms + 10_000 >= v.at_ms && e.sent_ms <= v.at_ms + 2_000;
                let same = v.resource.is_some() && e.target == v.resource;
                let made = v.resource.as_deref().is_some_and(
                    |r| matches!(&e.outcome, Outcome::Succeeded(inv) if inv["uuid"] == r),
                );
                same || made || (v.resource.is_none() && near)
            })
            .collect();
        for e in around.iter().rev().take(12).rev() {
            println!(
                "   #{:<5} {:>7.1}s..{:<7} client {} {:?} {} -> {}",
                e.seq,
                e.sent_ms as f64 / 1000.0,
                e.ended_ms.map(|m| format!("{:.1}s", m as f64 / 1000.0)).unwrap_or_default(),
                e.client,
                e.action,
                e.target.as_deref().unwrap_or(""),
                outcome_name(&e.outcome)
            );
        }
    }
}
