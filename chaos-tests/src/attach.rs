//! `strato-chaos attach-bench --image IMAGE -n N`: a data volume hot-plugged into a live
//! guest and unplugged again, N times, on `qemu:///system` (TCG here).
//!
//! It starts `strato server` and one `strato-agent` on libvirt, boots a VM from the tryout
//! image `scripts/real-guest` builds (whose init watches its virtio disks and says on the
//! serial console when one appears, with the pattern it finds or writes, and when it goes),
//! and times each call two ways: from the request to the job's end (libvirt's device change
//! is done, and for an unplug the guest has released the disk, which the agent waits for),
//! and from the request to the guest's console line. The first attachment makes the volume's
//! file; it is reported apart. Every call must succeed and every plug must show the guest
//! the pattern written on the first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strato_api::client;

use crate::Error;
use crate::cluster::{free_port, sibling, wait_listening};
use crate::load::{Proc, percentile};
use crate::snapshots::done;

/// Removes the guest's domain whatever happens: domains on `qemu:///system` outlive us.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        for action in ["destroy", "undefine"] {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", action, &self.0])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Waits until the serial log `log` has a line containing `needle` after its first `seen`
/// lines; answers the line and the log's line count.
fn console_line(log: &Path, needle: &str, seen: usize) -> Result<(String, usize), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = complete_lines(log);
        let lines: Vec<&str> = text.lines().collect();
        if let Some(line) = lines.iter().skip(seen).find(|l| l.contains(needle)) {
            return Ok(((*line).to_owned(), lines.len()));
        }
        if Instant::now() > deadline {
            return Err(format!("the guest never said `{needle}` (log {})", log.display()).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The log's complete lines (the console may be in the middle of one).
fn complete_lines(log: &Path) -> String {
    let mut text = std::fs::read_to_string(log).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |end| end + 1));
    text
}

fn lines_in(log: &Path) -> usize {
    complete_lines(log).lines().count()
}

fn report(name: &str, latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let ms = |p| percentile(&sorted, p).as_secs_f64() * 1e3;
    println!(
        "attach-bench phase={name} calls={} p50_ms={:.1} p95_ms={:.1} max_ms={:.1}",
        sorted.len(),
        ms(0.5),
        ms(0.95),
        sorted.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
}

fn uuid(v: &Value) -> String {
    v["uuid"].as_str().unwrap_or_default().to_owned()
}

/// Runs the bench in `work_dir`: `cycles` detach/attach cycles after the first attachment.
pub fn run(work_dir: &Path, image: &Path, cycles: u32) -> Result<(), Error> {
    let image = std::fs::canonicalize(image)?;
    // QEMU, running as its own user, reads the volumes and writes the console log here.
    std::fs::create_dir_all(work_dir)?;
    std::fs::set_permissions(work_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let data = work_dir.join("mn");
    let bootstrap = work_dir.join("agent-bootstrap");
    crate::cluster::bootstrap(&sibling("strato")?, &data, &bootstrap, 1)?;
    let agent_addr = free_port()?;
    let agent_dir = work_dir.join("agent");
    let mut agent = Proc(
        Command::new(sibling("strato-agent")?)
            .args(["--driver", "libvirt", "--libvirt-uri", "qemu:///system", "--network", "sim"])
            .args(["--listen", &agent_addr.to_string(), "--data-dir"])
            .arg(&agent_dir)
            .arg("--bootstrap-file")
            .arg(&bootstrap)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work_dir.join("agent.log"))?)
            .spawn()?,
    );
    wait_listening(agent_addr, &mut agent.0)?;
    let api = free_port()?;
    let mut server = Proc(
        Command::new(sibling("strato")?)
            .args(["server", "--listen", &api.to_string(), "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "warn")
            .env("STRATO_ADMIN_PASSWORD", crate::cluster::ADMIN_PASSWORD)
            .env("STRATO_IMAGE_FILE_DIRS", image.parent().unwrap_or(Path::new("/")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work_dir.join("mn.log"))?)
            .spawn()?,
    );
    wait_listening(api, &mut server.0)?;
    client::log_in(api, "admin", crate::cluster::ADMIN_PASSWORD)?;
    let vm = boot(api, agent_addr, work_dir, &image)?;
    let _domain = Domain(vm.clone());
    let log = agent_dir.join("serial").join(format!("{vm}.log"));
    eprintln!("waiting for the guest to boot (TCG: a minute or two)");
    console_line(&log, "strato-tryout: watching disks", 0)?;

    let volume = done(
        api,
        "POST",
        "/v1/volumes/data",
        json!({ "params": { "name": "bench", "diskSize": 16u64 << 20 } }),
    )?;
    let actions = format!("/v1/volumes/{}/actions", uuid(&volume));
    let attach = json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } });
    let detach = json!({ "detachDataVolumeFromVm": {} });
    let timed = |body: &Value, needle: &str| -> Result<(Duration, Duration, String), Error> {
        let seen = lines_in(&log);
        let started = Instant::now();
        done(api, "PUT", &actions, body.clone())?;
        let job = started.elapsed();
        let (line, _) = console_line(&log, needle, seen)?;
        Ok((job, started.elapsed(), line))
    };
    let (job, guest, line) = timed(&attach, "strato-tryout: vdb written")?;
    let pattern = line.split_once("vdb written ").map(|(_, p)| p.trim().to_owned());
    let pattern = pattern.ok_or("the guest wrote no pattern")?;
    println!(
        "attach-bench first-attach job_ms={:.1} guest_ms={:.1} (makes the file)",
        job.as_secs_f64() * 1e3,
        guest.as_secs_f64() * 1e3
    );
    eprintln!("{cycles} detach/attach cycles on the running guest");
    let (mut detach_job, mut detach_guest, mut attach_job, mut attach_guest) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cycles {
        let (job, guest, _) = timed(&detach, "strato-tryout: vdb gone")?;
        detach_job.push(job);
        detach_guest.push(guest);
        let (job, guest, line) = timed(&attach, "strato-tryout: vdb holds")?;
        if !line.contains(&pattern) {
            return Err(format!("the guest found other bytes: `{line}`, not {pattern}").into());
        }
        attach_job.push(job);
        attach_guest.push(guest);
    }
    report("attach-job", &attach_job);
    report("attach-guest-sees", &attach_guest);
    report("detach-job", &detach_job);
    report("detach-guest-sees", &detach_guest);
    done(api, "DELETE", &format!("/v1/vm-instances/{vm}"), Value::Null)?;
    Ok(())
}

/// The infrastructure and the VM: its UUID.
fn boot(api: SocketAddr, agent: SocketAddr, dir: &Path, image: &Path) -> Result<String, Error> {
    let post = |path: &str, params: Value| done(api, "POST", path, json!({ "params": params }));
    let zone = post("/v1/zones", json!({ "name": "z" }))?;
    let cluster = post("/v1/clusters", json!({ "name": "c", "zoneUuid": uuid(&zone) }))?;
    post(
        "/v1/hosts/kvm",
        json!({ "name": "h", "managementIp": "127.0.0.1", "agentPort": agent.port(), "clusterUuid": uuid(&cluster) }),
    )?;
    let ps = post(
        "/v1/primary-storage/local-storage",
        json!({ "name": "ps", "url": dir.join("ps").display().to_string(), "zoneUuid": uuid(&zone) }),
    )?;
    let attach = |path: String| done(api, "POST", &path, Value::Null);
    attach(format!("/v1/clusters/{}/primary-storage/{}", uuid(&cluster), uuid(&ps)))?;
    let bs = post(
        "/v1/backup-storage/image-store",
        json!({ "name": "bs", "url": dir.join("bs").display().to_string() }),
    )?;
    attach(format!("/v1/zones/{}/backup-storage/{}", uuid(&zone), uuid(&bs)))?;
    let image = post(
        "/v1/images",
        json!({ "name": "tryout", "url": format!("file://{}", image.display()), "format": "qcow2", "backupStorageUuids": [uuid(&bs)] }),
    )?;
    let offering = post(
        "/v1/instance-offerings",
        json!({ "name": "tiny", "cpuNum": 1, "memorySize": 128u64 << 20 }),
    )?;
    let l3 = post("/v1/l3-networks", json!({ "name": "none" }))?;
    post(
        &format!("/v1/l3-networks/{}/ip-ranges", uuid(&l3)),
        json!({ "startIp": "10.0.0.10", "endIp": "10.0.0.20", "netmask": "255.255.255.0", "gateway": "10.0.0.1" }),
    )?;
    let vm = post(
        "/v1/vm-instances",
        json!({ "name": "bench", "instanceOfferingUuid": uuid(&offering), "imageUuid": uuid(&image), "l3NetworkUuids": [uuid(&l3)] }),
    )?;
    Ok(uuid(&vm))
}
