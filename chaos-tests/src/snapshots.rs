//! `strato-chaos snapshot-bench -n N`: N snapshots of one data volume through the API, then
//! their deletions, on a simulated host whose volume files are real qcow2 files (the agent
//! runs `qemu-img` on them as it would on a KVM host; the VM is stopped, so every layer is
//! made and merged offline).
//!
//! Before each snapshot, 1 MiB of the volume's top is written (`qemu-io`, outside the timed
//! call), so each layer holds data of its own. It prints the latency of each phase's calls
//! (from the request to the job's end): taking a snapshot freezes the volume's top and makes
//! a new one backed by it; deleting the newest snapshot merges its layer into the top
//! (`qemu-img rebase`, which copies the layer's 1 MiB) and deletes its file. Every call must
//! succeed: nothing here is faulty.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strato_api::client;

use crate::Error;
use crate::load::{Testbed, percentile};

/// Follows a job to its end: its inventory, or the error it ended with.
pub(crate) fn done(api: SocketAddr, method: &str, path: &str, body: Value) -> Result<Value, Error> {
    let body = (!body.is_null()).then_some(body);
    let (status, reply) = client::request(api, method, path, body.as_ref())?;
    if status != 202 {
        return Err(format!("{method} {path} answered {status}: {reply}").into());
    }
    let location =
        client::job_path(reply["location"].as_str().unwrap_or_default(), Duration::from_secs(30));
    loop {
        let (status, end) = client::request(api, "GET", &location, None)?;
        match status {
            202 => {}
            200 if end.get("error").is_none() => return Ok(end["inventory"].clone()),
            _ => return Err(format!("{method} {path} ended {status}: {end}").into()),
        }
    }
}

fn uuid(v: &Value) -> String {
    v["uuid"].as_str().unwrap_or_default().to_owned()
}

fn report(name: &str, latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let ms = |p| percentile(&sorted, p).as_secs_f64() * 1e3;
    let total: Duration = sorted.iter().sum();
    println!(
        "snapshot-bench phase={name} calls={} total_s={:.2} p50_ms={:.1} p95_ms={:.1} max_ms={:.1}",
        sorted.len(),
        total.as_secs_f64(),
        ms(0.5),
        ms(0.95),
        sorted.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
}

/// Runs the bench in `work_dir` with `snapshots` snapshots.
pub fn run(work_dir: &Path, snapshots: u32) -> Result<(), Error> {
    let bed = Testbed::start(work_dir, 1, 0, 1, &[])?;
    let api = bed.api;
    let clusters = client::list(api, "clusters")?;
    let cluster = clusters.first().ok_or("no cluster")?;
    let ps = done(
        api,
        "POST",
        "/v1/primary-storage/local-storage",
        json!({ "params": { "name": "ps", "url": work_dir.join("ps").display().to_string(), "zoneUuid": cluster["zoneUuid"] } }),
    )?;
    done(
        api,
        "POST",
        &format!("/v1/clusters/{}/primary-storage/{}", uuid(cluster), uuid(&ps)),
        json!({}),
    )?;
    let vm = done(api, "POST", "/v1/vm-instances", bed.vm_body.clone())?;
    let vm = uuid(&vm);
    let volume = done(
        api,
        "POST",
        "/v1/volumes/data",
        json!({ "params": { "name": "bench", "diskSize": 1u64 << 30 } }),
    )?;
    let volume = uuid(&volume);
    let actions = format!("/v1/volumes/{volume}/actions");
    done(api, "PUT", &actions, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }))?;
    done(api, "PUT", &format!("/v1/vm-instances/{vm}/actions"), json!({ "stopVmInstance": {} }))?;

    eprintln!("taking {snapshots} snapshots of one volume");
    let mut taken = Vec::new();
    let mut latencies = Vec::new();
    for i in 0..snapshots {
        // Each layer holds 1 MiB of its own, so deleting it merges real data.
        let top =
            client::request(api, "GET", &format!("/v1/volumes/{volume}"), None)?.1["inventories"]
                [0]["installPath"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        let write = format!("write -P {:#x} {i}M 1M", i % 250 + 1);
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &write, &top])
            .output()?;
        if !out.status.success() {
            return Err(
                format!("qemu-io on {top}: {}", String::from_utf8_lossy(&out.stderr)).into()
            );
        }
        let started = Instant::now();
        let snapshot = done(
            api,
            "POST",
            &format!("/v1/volumes/{volume}/volume-snapshots"),
            json!({ "params": { "name": format!("s{i}") } }),
        )?;
        latencies.push(started.elapsed());
        taken.push(uuid(&snapshot));
    }
    report("snapshot", &latencies);

    eprintln!("deleting them, newest first (each merged into the volume's top)");
    let mut latencies = Vec::new();
    for snapshot in taken.iter().rev() {
        let started = Instant::now();
        done(api, "DELETE", &format!("/v1/volume-snapshots/{snapshot}"), Value::Null)?;
        latencies.push(started.elapsed());
    }
    report("delete-merge", &latencies);
    let left = client::list(api, "volume-snapshots")?;
    if !left.is_empty() {
        return Err(format!("{} snapshots are left", left.len()).into());
    }
    Ok(())
}
