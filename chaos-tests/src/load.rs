//! `strato-chaos load`: how fast a real management node brings many VMs to Running.
//!
//! It starts the `strato` server and one `strato-agent` process simulating `--sim-hosts`
//! hosts, registers them through the HTTP API, then creates `--vms` VMs through the API with
//! `--concurrency` clients, each creation followed to its end through its job. It prints VMs/s,
//! the latency of the create call and of creation to Running (p50/p99), the time until all
//! run, the latency of a single VM from POST to Running on an idle node (the median of
//! `SINGLES` created one after another before the load: one is too noisy a sample on a
//! shared machine), and the MN's peak RSS.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use strato_api::client;
use strato_api::types::{
    ClusterParams, Create, HostParams, L3Params, OfferingParams, RangeParams, VmParams, ZoneParams,
    canonical_uuid,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Simulated hosts.
    pub sim_hosts: u32,
    /// VMs to create.
    pub vms: u32,
    /// Concurrent clients.
    pub concurrency: u32,
    /// Latency of every simulated driver call.
    pub sim_latency_ms: u64,
}

#[derive(Debug)]
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

use crate::Error;
use crate::cluster::{free_port, sibling, wait_listening};

/// A memory figure of process `pid` in MiB: `field` of `/proc/<pid>/status` (`VmHWM:` is
/// the peak RSS, `VmRSS:` the current one).
pub(crate) fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `work(i)` for `0..count` on `concurrency` threads, with progress on stderr.
pub(crate) fn run_parallel<T: Send + 'static>(
    what: &'static str,
    count: u32,
    concurrency: u32,
    work: impl Fn(u32) -> Result<T, Error> + Send + Sync + 'static,
) -> Result<Vec<T>, Error> {
    let work = Arc::new(work);
    let next = Arc::new(Mutex::new(0u32));
    let results = Arc::new(Mutex::new(Vec::with_capacity(count as usize)));
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency.min(count).max(1))
        .map(|_| {
            let (work, next, results) = (work.clone(), next.clone(), results.clone());
            std::thread::spawn(move || -> Result<(), String> {
                loop {
                    let i = {
                        let mut n = next.lock().expect("counter");
                        if *n >= count {
                            return Ok(());
                        }
                        *n += 1;
                        *n - 1
                    };
                    let value = work(i).map_err(|e| e.to_string())?;
                    let mut results = results.lock().expect("results");
                    results.push(value);
                    let done = results.len() as u32;
                    if done.is_multiple_of((count / 10).max(1)) {
                        eprintln!(
                            "  {what}: {done}/{count} after {:.1}s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "a client thread panicked")??;
    }
    let results = std::mem::take(&mut *results.lock().expect("results"));
    Ok(results)
}

/// Creates one VM through the API and follows its job (each `GET` waiting for its end).
/// Returns how long the create call took to answer and how long until the VM ran.
fn create_vm(api: SocketAddr, body: &serde_json::Value) -> Result<(Duration, Duration), Error> {
    let started = Instant::now();
    let (status, reply) = client::request(api, "POST", "/v1/vm-instances", Some(body))?;
    let accepted = started.elapsed();
    if status != 202 {
        return Err(format!("create answered {status}: {reply}").into());
    }
    let path =
        client::job_path(reply["location"].as_str().unwrap_or_default(), Duration::from_secs(30));
    loop {
        let (status, done) = client::request(api, "GET", &path, None)?;
        if status == 200 {
            if done["inventory"]["state"] != "Running" {
                return Err(format!("a VM did not reach Running: {done}").into());
            }
            return Ok((accepted, started.elapsed()));
        }
        if status != 202 {
            return Err(format!("the create job answered {status}: {done}").into());
        }
    }
}

/// A management node and one agent process simulating hosts, with the hosts registered and
/// an offering and an L3 network to create VMs from: what the load and the peer workload
/// run against.
#[derive(Debug)]
pub struct Testbed {
    /// The API's address (the client's session is kept by [`client`]).
    pub api: SocketAddr,
    /// The MN's process id, for its CPU time and RSS.
    pub server_pid: u32,
    /// A `CreateVmInstance` body.
    pub vm_body: serde_json::Value,
    _server: Proc,
    _agent: Proc,
}

impl Testbed {
    /// Starts the node (`strato server` with `server_args`) and `sim_hosts` simulated hosts
    /// answering after `sim_latency_ms`, registered with `concurrency` clients.
    pub fn start(
        work_dir: &Path,
        sim_hosts: u32,
        sim_latency_ms: u64,
        concurrency: u32,
        server_args: &[&str],
    ) -> Result<Testbed, Error> {
        let data = work_dir.join("mn");
        // One secret per simulated host: each enrolls when it is registered.
        let bootstrap = work_dir.join("agent-bootstrap");
        crate::cluster::bootstrap(&sibling("strato")?, &data, &bootstrap, sim_hosts as usize)?;
        // One agent process simulating every host, on consecutive ports.
        let base = {
            let mut base = 20_000 + (std::process::id() % 20_000) as u16;
            loop {
                let free = (0..sim_hosts)
                    .all(|i| TcpListener::bind(("127.0.0.1", base + i as u16)).is_ok());
                if free {
                    break SocketAddr::from(([127, 0, 0, 1], base));
                }
                base = base.wrapping_add(sim_hosts as u16 + 7).max(20_000);
            }
        };
        let mut agent = Proc(
            Command::new(sibling("strato-agent")?)
                .args(["--driver", "sim", "--sim-hosts", &sim_hosts.to_string()])
                .args(["--listen-base", &base.to_string()])
                .args(["--sim-latency-ms", &sim_latency_ms.to_string(), "--data-dir"])
                .arg(work_dir.join("agent"))
                .arg("--bootstrap-file")
                .arg(&bootstrap)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let last = SocketAddr::new(base.ip(), base.port() + sim_hosts as u16 - 1);
        wait_listening(last, &mut agent.0)?;
        let api = free_port()?;
        let mut server = Proc(
            Command::new(sibling("strato")?)
                .args(["server", "--listen", &api.to_string()])
                .args(server_args)
                .arg("--data-dir")
                .arg(&data)
                .env("RUST_LOG", "warn")
                .env("STRATO_ADMIN_PASSWORD", crate::cluster::ADMIN_PASSWORD)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_listening(api, &mut server.0)?;
        client::log_in(api, "admin", crate::cluster::ADMIN_PASSWORD)?;
        let server_pid = server.0.id();

        eprintln!("registering {sim_hosts} simulated hosts");
        let id =
            |v: &Value| canonical_uuid(v["uuid"].as_str().unwrap_or_default()).unwrap_or_default();
        let zone = client::create(
            api,
            "/v1/zones",
            ZoneParams { name: "load".into(), description: None },
        )?;
        let cluster = client::create(
            api,
            "/v1/clusters",
            ClusterParams {
                name: "load".into(),
                zone_uuid: id(&zone),
                hypervisor_type: "KVM".into(),
            },
        )?;
        let cluster_uuid = id(&cluster);
        run_parallel("hosts", sim_hosts, concurrency.min(64), move |i| {
            let host = HostParams {
                name: format!("sim-{i}"),
                management_ip: "127.0.0.1".into(),
                agent_port: base.port() + i as u16,
                cluster_uuid,
            };
            client::create(api, "/v1/hosts/kvm", host)?;
            Ok(())
        })?;
        let offering = client::create(
            api,
            "/v1/instance-offerings",
            OfferingParams { name: "tiny".into(), cpu_num: 1, memory_size: 128 << 20 },
        )?;
        let l3 = client::create(
            api,
            "/v1/l3-networks",
            L3Params { name: "load".into(), l2_network_uuid: None, dns: vec![], bridge: None },
        )?;
        let ranges = format!("/v1/l3-networks/{}/ip-ranges", id(&l3));
        let range = RangeParams {
            start_ip: Ipv4Addr::new(10, 64, 0, 2),
            end_ip: Ipv4Addr::new(10, 127, 255, 254),
            netmask: Ipv4Addr::new(255, 192, 0, 0),
            gateway: Ipv4Addr::new(10, 64, 0, 1),
            name: None,
        };
        client::create(api, &ranges, range)?;
        let vm_body = client::body(&Create::new(VmParams {
            name: "vm".into(),
            instance_offering_uuid: id(&offering),
            l3_network_uuids: vec![id(&l3)],
            host_uuid: None,
            cluster_uuid: None,
            image_uuid: None,
        }));
        Ok(Testbed { api, server_pid, vm_body, _server: server, _agent: agent })
    }
}

/// How many VMs are created one at a time on the idle node for the single-VM latency.
const SINGLES: usize = 21;

/// Runs the load and prints its figures.
pub fn run(config: &LoadConfig, work_dir: &Path) -> Result<(), Error> {
    let bed =
        Testbed::start(work_dir, config.sim_hosts, config.sim_latency_ms, config.concurrency, &[])?;
    let (api, server_pid, body) = (bed.api, bed.server_pid, bed.vm_body.clone());

    // A single VM on the idle node, POST to Running: the median of a few, one at a time.
    let mut singles =
        (0..SINGLES).map(|_| create_vm(api, &body).map(|t| t.1)).collect::<Result<Vec<_>, _>>()?;
    singles.sort();
    let single = percentile(&singles, 0.5);

    eprintln!("creating {} VMs with {} clients", config.vms, config.concurrency);
    let started = Instant::now();
    let body = Arc::new(body);
    let timings =
        run_parallel("VMs", config.vms, config.concurrency, move |_| create_vm(api, &body))?;
    let all_running = started.elapsed();
    let mut accepted: Vec<Duration> = timings.iter().map(|t| t.0).collect();
    let mut running: Vec<Duration> = timings.iter().map(|t| t.1).collect();
    accepted.sort();
    running.sort();
    let listed = client::list(api, "vm-instances")?;
    let running_count = listed.iter().filter(|v| v["state"] == "Running").count();
    let rss = status_mib(server_pid, "VmHWM:");
    println!(
        "load sim_hosts={} vms={} concurrency={} sim_latency_ms={} all_running_s={:.2} vms_per_s={:.0} create_call_p50_ms={:.1} create_call_p99_ms={:.1} to_running_p50_ms={:.1} to_running_p99_ms={:.1} single_vm_to_running_ms={:.1} running_listed={} mn_peak_rss_mib={:.0}",
        config.sim_hosts,
        config.vms,
        config.concurrency,
        config.sim_latency_ms,
        all_running.as_secs_f64(),
        f64::from(config.vms) / all_running.as_secs_f64(),
        percentile(&accepted, 0.5).as_secs_f64() * 1e3,
        percentile(&accepted, 0.99).as_secs_f64() * 1e3,
        percentile(&running, 0.5).as_secs_f64() * 1e3,
        percentile(&running, 0.99).as_secs_f64() * 1e3,
        single.as_secs_f64() * 1e3,
        running_count,
        rss,
    );
    Ok(())
}
