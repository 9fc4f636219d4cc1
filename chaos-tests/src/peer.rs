//! `strato-chaos peer-workload`: the workload OpenStack's Rally runs against Nova's fake
//! driver, run the same way against the real management node, so the figures sit side by
//! side with Nova's.
//!
//! Rally's scenario is: `-m` fake hosts, `-c` concurrent clients, boot `-n` servers, wait
//! until every one is ACTIVE, list them, delete them all. Here the hosts are simulated by one
//! agent process, the MN runs with `--vm-deletion-policy direct` (Nova's delete is final),
//! and each phase prints its wall time, its rate, the latency percentiles of its calls, the
//! MN's CPU-seconds per VM and its RSS. Every call that fails is counted by its error code:
//! nothing here is faulty, so the run exits non-zero on any failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use strato_api::client;

use crate::Error;
use crate::load::{Testbed, percentile, run_parallel, status_mib};

/// What to run.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Simulated hosts (Rally's fake compute nodes).
    pub hosts: u32,
    /// Servers to boot.
    pub vms: u32,
    /// Concurrent clients.
    pub concurrency: u32,
}

/// The MN's CPU time so far (user + system), from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after its `)`.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the state), in USER_HZ,
    // which Linux fixes at 100 for what /proc reports.
    (ticks(11) + ticks(12)) / 100.0
}

/// One call's outcome: how long it took, and the error code when it failed.
struct Outcome {
    latency: Duration,
    failure: Option<String>,
}

/// The path to follow a job's `Location` by, each `GET` waiting for its end.
fn job_path(reply: &Value) -> String {
    client::job_path(reply["location"].as_str().unwrap_or_default(), Duration::from_secs(30))
}

fn code_of(reply: &Value, status: u16) -> String {
    reply["error"]["code"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_owned)
}

/// Follows a job to its end; returns the error code when it failed.
fn follow(api: SocketAddr, path: &str) -> Result<Option<String>, Error> {
    loop {
        let (status, done) = client::request(api, "GET", path, None)?;
        match status {
            202 => {}
            200 if done.get("error").is_some() => return Ok(Some(code_of(&done, status))),
            200 => return Ok(None),
            _ => return Ok(Some(code_of(&done, status))),
        }
    }
}

/// The figures of one phase.
struct Phase {
    name: &'static str,
    wall: Duration,
    latencies: Vec<Duration>,
    failures: BTreeMap<String, usize>,
    cpu_s: f64,
    rss_mib: f64,
}

impl Phase {
    fn print(&self, vms: u32) {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let ms = |p| percentile(&sorted, p).as_secs_f64() * 1e3;
        let failures: Vec<String> =
            self.failures.iter().map(|(code, n)| format!("{code}:{n}")).collect();
        println!(
            "peer-workload phase={} wall_s={:.2} per_s={:.1} calls={} p50_ms={:.1} p95_ms={:.1} p99_ms={:.1} max_ms={:.1} mn_cpu_s_per_vm={:.4} mn_rss_mib={:.0} failed={} {}",
            self.name,
            self.wall.as_secs_f64(),
            f64::from(vms) / self.wall.as_secs_f64().max(1e-9),
            sorted.len(),
            ms(0.5),
            ms(0.95),
            ms(0.99),
            sorted.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            self.cpu_s / f64::from(vms.max(1)),
            self.rss_mib,
            self.failures.values().sum::<usize>(),
            failures.join(","),
        );
    }

    fn failed(&self) -> usize {
        self.failures.values().sum()
    }
}

/// Runs `work` over `items` with `concurrency` clients and measures it as `name`.
fn phase<T: Clone + Send + Sync + 'static>(
    name: &'static str,
    bed: &Testbed,
    items: Vec<T>,
    concurrency: u32,
    work: impl Fn(SocketAddr, T) -> Result<Outcome, Error> + Send + Sync + 'static,
) -> Result<(Phase, Vec<(T, Outcome)>), Error> {
    let api = bed.api;
    let cpu_before = cpu_seconds(bed.server_pid);
    let started = Instant::now();
    let items = Arc::new(items);
    let shared = items.clone();
    let outcomes = run_parallel(name, items.len() as u32, concurrency, move |i| {
        let item = shared[i as usize].clone();
        Ok((item.clone(), work(api, item)?))
    })?;
    let wall = started.elapsed();
    let mut failures = BTreeMap::new();
    for (_, outcome) in &outcomes {
        if let Some(code) = &outcome.failure {
            *failures.entry(code.clone()).or_insert(0) += 1;
        }
    }
    let phase = Phase {
        name,
        wall,
        latencies: outcomes.iter().map(|(_, o)| o.latency).collect(),
        failures,
        cpu_s: cpu_seconds(bed.server_pid) - cpu_before,
        rss_mib: status_mib(bed.server_pid, "VmRSS:"),
    };
    Ok((phase, outcomes))
}

/// Runs the peer workload and prints its figures; `Ok(false)` when any call failed.
pub fn run(config: &PeerConfig, work_dir: &Path) -> Result<bool, Error> {
    let bed = Testbed::start(
        work_dir,
        config.hosts,
        0,
        config.concurrency,
        &["--vm-deletion-policy", "direct"],
    )?;
    let body = Arc::new(bed.vm_body.clone());
    eprintln!(
        "peer workload: {} VMs on {} hosts with {} clients",
        config.vms, config.hosts, config.concurrency
    );
    // Boot: every POST answered (Rally's boot call returns once Nova accepted the server).
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let booted = jobs.clone();
    let (boot, _) =
        phase("boot", &bed, (0..config.vms).collect(), config.concurrency, move |api, _| {
            let started = Instant::now();
            let (status, reply) = client::request(api, "POST", "/v1/vm-instances", Some(&body))?;
            let latency = started.elapsed();
            if status != 202 {
                return Ok(Outcome { latency, failure: Some(code_of(&reply, status)) });
            }
            booted.lock().expect("jobs").push(job_path(&reply));
            Ok(Outcome { latency, failure: None })
        })?;
    // Wait: every creation followed to its end (Rally polls each server until ACTIVE).
    let jobs = std::mem::take(&mut *jobs.lock().expect("jobs"));
    let boot_started = Instant::now() - boot.wall;
    let created = Arc::new(Mutex::new(Vec::new()));
    let made = created.clone();
    let (mut wait, _) = phase("wait", &bed, jobs, config.concurrency, move |api, path| {
        let started = Instant::now();
        let failure = follow(api, &path)?;
        if failure.is_none() {
            let (_, done) = client::request(api, "GET", &path, None)?;
            if done["inventory"]["state"] != "Running" {
                return Ok(Outcome {
                    latency: started.elapsed(),
                    failure: Some(format!("ended {}", done["inventory"]["state"])),
                });
            }
            made.lock()
                .expect("vms")
                .push(done["inventory"]["uuid"].as_str().unwrap_or_default().to_owned());
        }
        Ok(Outcome { latency: started.elapsed(), failure })
    })?;
    let all_running = boot_started.elapsed();
    // Rally's boot-and-wait: from the first POST until every VM runs, the MN's CPU included.
    wait.wall = all_running;
    wait.cpu_s += boot.cpu_s;
    wait.name = "boot+wait";
    // List: the full list, as Rally's `nova list` after the boot.
    let api = bed.api;
    let expected = created.lock().expect("vms").len();
    let (list, _) = phase("list", &bed, vec![(); 10], 1, move |api, ()| {
        let started = Instant::now();
        let listed = client::list(api, "vm-instances")?;
        let latency = started.elapsed();
        let running = listed.iter().filter(|v| v["state"] == "Running").count();
        let failure = (running != expected).then(|| format!("listed {running} of {expected}"));
        Ok(Outcome { latency, failure })
    })?;
    // Delete: every VM destroyed (deletion policy direct) and its job followed to its end.
    let vms = std::mem::take(&mut *created.lock().expect("vms"));
    let (delete, _) = phase("delete", &bed, vms, config.concurrency, move |api, vm| {
        let started = Instant::now();
        let (status, reply) =
            client::request(api, "DELETE", &format!("/v1/vm-instances/{vm}"), None)?;
        if status != 202 {
            return Ok(Outcome {
                latency: started.elapsed(),
                failure: Some(code_of(&reply, status)),
            });
        }
        let failure = follow(api, &job_path(&reply))?;
        Ok(Outcome { latency: started.elapsed(), failure })
    })?;
    let left = client::list(api, "vm-instances")?.len();
    for p in [&boot, &wait, &list, &delete] {
        p.print(config.vms);
    }
    println!(
        "peer-workload hosts={} vms={} concurrency={} all_running_s={:.2} vms_left={} mn_peak_rss_mib={:.0}",
        config.hosts,
        config.vms,
        config.concurrency,
        all_running.as_secs_f64(),
        left,
        status_mib(bed.server_pid, "VmHWM:"),
    );
    let failed = boot.failed() + wait.failed() + list.failed() + delete.failed();
    Ok(failed == 0 && left == 0)
}
