//! A real guest: `strato server` and `strato-agent` on `qemu:///system` boot a VM made from
//! the tiny tryout image, the guest's serial log shows its init, and a graceful stop powers it
//! off through ACPI.
//!
//! It needs libvirtd and the image that `scripts/real-guest` installs, starts and builds, so
//! it is ignored by a plain `cargo nextest run`; `scripts/test` prepares the machine and runs
//! it. Run alone: `STRATO_GUEST_IMAGE=$(scripts/real-guest) cargo nextest run -p strato-api
//! --test real_guest --run-ignored all`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const URI: &str = "qemu:///system";

/// Removes the domain when the test ends, whatever happened: on `qemu:///system` domains
/// outlive the processes that made them.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh").args(["-c", URI]).args(args).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Waits until the serial log holds `line`; returns the log.
fn wait_serial(log: &Path, line: &str, within: Duration) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(line) {
            return text;
        }
        assert!(
            started.elapsed() < within,
            "no `{line}` in {} after {within:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs libvirtd and the guest image: scripts/real-guest prepares both, scripts/test runs it"]
fn a_real_guest_boots_and_powers_off_on_a_graceful_stop() {
    let image = std::env::var("STRATO_GUEST_IMAGE")
        .expect("STRATO_GUEST_IMAGE must name the image built by scripts/real-guest");
    // QEMU runs as libvirt's own user: the storage directories must be reachable by it.
    let image_dir = std::path::Path::new(&image).parent().unwrap().display().to_string();
    let cluster = TestCluster::start(
        ClusterOpts::default()
            .driver(&["--driver", "libvirt", "--libvirt-uri", URI, "--network", "sim"])
            .env("STRATO_IMAGE_FILE_DIRS", &image_dir)
            .mode(0o755),
    );
    let (api, agent, dir) = (cluster.api, cluster.agent, cluster.dir());
    let agent_dir = cluster.agent_dir();

    let zone = create(api, "/v1/zones", json!({ "name": "z1" }));
    let cluster = create(api, "/v1/clusters", json!({ "name": "c1", "zoneUuid": zone["uuid"] }));
    let host = create(
        api,
        "/v1/hosts/kvm",
        json!({ "name": "h1", "managementIp": "127.0.0.1", "agentPort": agent.port(), "clusterUuid": cluster["uuid"] }),
    );
    assert_eq!(host["status"], "Connected");
    let ps = create(
        api,
        "/v1/primary-storage/local-storage",
        json!({ "name": "ps", "url": dir.join("ps").display().to_string(), "zoneUuid": zone["uuid"] }),
    );
    ok(
        api,
        "POST",
        &format!(
            "/v1/clusters/{}/primary-storage/{}",
            cluster["uuid"].as_str().unwrap(),
            ps["uuid"].as_str().unwrap()
        ),
        None,
    );
    let bs = create(
        api,
        "/v1/backup-storage/image-store",
        json!({ "name": "bs", "url": dir.join("bs").display().to_string() }),
    );
    ok(
        api,
        "POST",
        &format!(
            "/v1/zones/{}/backup-storage/{}",
            zone["uuid"].as_str().unwrap(),
            bs["uuid"].as_str().unwrap()
        ),
        None,
    );
    let image = create(
        api,
        "/v1/images",
        json!({ "name": "tryout", "url": format!("file://{image}"), "format": "qcow2", "backupStorageUuids": [bs["uuid"]] }),
    );
    let offering = create(
        api,
        "/v1/instance-offerings",
        json!({ "name": "tiny", "cpuNum": 1, "memorySize": 128u64 << 20 }),
    );
    // An L3 on no L2 network: the guest's NIC is QEMU's user-mode network, so the test
    // touches no bridge of this machine (an L2 network's NICs plug into its bridge, which
    // the agent makes only with `--network host`).
    let l3 = create(api, "/v1/l3-networks", json!({ "name": "pub" }));
    create(
        api,
        &format!("/v1/l3-networks/{}/ip-ranges", l3["uuid"].as_str().unwrap()),
        json!({ "startIp": "10.0.0.10", "endIp": "10.0.0.20", "netmask": "255.255.255.0", "gateway": "10.0.0.1" }),
    );

    let vm = create(
        api,
        "/v1/vm-instances",
        json!({ "name": "guest", "instanceOfferingUuid": offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [l3["uuid"]] }),
    );
    let uuid = vm["uuid"].as_str().unwrap().to_owned();
    let _guard = DomainGuard(uuid.clone());
    assert_eq!(vm["state"], "Running");
    assert_eq!(virsh(&["domstate", &uuid]).unwrap(), "running");
    let xml = virsh(&["dumpxml", &uuid]).unwrap();
    assert!(xml.contains("type='qemu'") || xml.contains("type=\"qemu\""), "a TCG guest: {xml}");

    // The guest really boots: Debian's kernel runs the initramfs's init, which says so on the
    // serial console, and arms its power-button handler.
    let log = agent_dir.join("serial").join(format!("{uuid}.log"));
    wait_serial(&log, "strato-tryout: init reached", Duration::from_secs(120));
    wait_serial(&log, "strato-tryout: waiting for the power button", Duration::from_secs(60));

    // A graceful stop: ACPI power button, the guest powers itself off, the domain shuts off.
    let started = Instant::now();
    let stopped = ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{uuid}/actions"),
        Some(r#"{"stopVmInstance": {}}"#),
    );
    assert_eq!(stopped["state"], "Stopped");
    let text = wait_serial(&log, "powering off", Duration::from_secs(5));
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the stop waited for the forced power-off, not the guest:\n{text}"
    );
    assert_eq!(virsh(&["domstate", &uuid]).unwrap(), "shut off");

    // Destroy and expunge: the domain and the root volume go.
    let volume = stopped["rootVolumePath"].as_str().unwrap().to_owned();
    assert!(Path::new(&volume).exists());
    ok(api, "DELETE", &format!("/v1/vm-instances/{uuid}"), None);
    ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{uuid}/actions"),
        Some(r#"{"expungeVmInstance": {}}"#),
    );
    assert!(virsh(&["domstate", &uuid]).is_err(), "the domain is undefined");
    assert!(!Path::new(&volume).exists(), "the root volume is removed");
}
