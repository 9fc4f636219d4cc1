//! A real guest: `strato server` and `strato-agent` on `qemu:///system` boot a VM made from
//! the tiny tryout image, the guest's serial log shows its init, and a graceful stop powers it
//! off through ACPI. On an L2 network, the guest's virtio NIC gets its address, host name and
//! routes from the Flat provider's DHCP and reads its user data from 169.254.169.254: its
//! libvirtd then runs inside the host's network namespace (`scripts/netns-libvirtd`), so the
//! tap QEMU opens is plugged into the bridge the agent made there, and nothing touches this
//! machine's own network. There too, a data volume is hot-plugged into the running guest
//! (which writes a pattern on it), snapshotted live (libvirt's external snapshot: the
//! snapshot's file holds the pattern), its snapshot deleted live (a block pull), grown live
//! (the guest sees the new size), unplugged and plugged again, and the guest finds its
//! pattern.
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
use serde_json::{Value, json};

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

/// Waits until the serial log holds one of `lines`; returns the log.
fn wait_serial(log: &Path, lines: &[&str], within: Duration) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if lines.iter().any(|line| text.contains(line)) {
            return text;
        }
        assert!(
            started.elapsed() < within,
            "none of {lines:?} in {} after {within:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a tryout guest is made from: a host with local storage, the tryout image on an
/// image store, and a small offering.
struct Guest {
    zone: Value,
    cluster: Value,
    image: Value,
    offering: Value,
}

impl Guest {
    fn define(api: std::net::SocketAddr, agent_port: u16, dir: &Path, image: &str) -> Guest {
        let zone = create(api, "/v1/zones", json!({ "name": "z1" }));
        let cluster =
            create(api, "/v1/clusters", json!({ "name": "c1", "zoneUuid": zone["uuid"] }));
        let host = create(
            api,
            "/v1/hosts/kvm",
            json!({ "name": "h1", "managementIp": "127.0.0.1", "agentPort": agent_port, "clusterUuid": cluster["uuid"] }),
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
        Guest { zone, cluster, image, offering }
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

    let guest = Guest::define(api, agent.port(), dir, &image);
    let (image, offering) = (guest.image, guest.offering);
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
    wait_serial(&log, &["strato-tryout: init reached"], Duration::from_secs(120));
    wait_serial(&log, &["strato-tryout: waiting for the power button"], Duration::from_secs(60));

    // A graceful stop: ACPI power button, the guest powers itself off, the domain shuts off.
    let started = Instant::now();
    let stopped = ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{uuid}/actions"),
        Some(r#"{"stopVmInstance": {}}"#),
    );
    assert_eq!(stopped["state"], "Stopped");
    let text = wait_serial(&log, &["powering off"], Duration::from_secs(5));
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

/// The path of `scripts/` in this checkout.
fn script(name: &str) -> String {
    format!("{}/../scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A host that is a network namespace with an uplink (a veth whose peer is in an otherwise
/// empty namespace: this kernel has no dummy devices) and its own libvirtd, which the agent
/// reaches through that daemon's socket, managing the namespace as the host's network.
struct NetnsHost {
    // In drop order: the agent and server, then the namespaces with what runs in them (the
    // daemon and its guests), then the daemon's directory.
    cluster: TestCluster,
    ns_name: String,
    uri: String,
    _ns: Namespaces,
    _libvirt_dir: tempfile::TempDir,
}

impl NetnsHost {
    fn start(image: &str) -> NetnsHost {
        let image_dir = Path::new(image).parent().unwrap().display().to_string();
        let libvirt_dir = tempfile::tempdir().unwrap();
        let ns = Namespaces { tag: format!("srg{}", std::process::id() % 100_000) };
        let host_ns = ns.add("h");
        let outside = ns.add("o");
        run(&[
            "ip", "-n", &host_ns, "link", "add", "up0", "type", "veth", "peer", "name", "up0",
            "netns", &outside,
        ]);
        run(&["ip", "-n", &host_ns, "link", "set", "up0", "up"]);
        let uri = run(&[&script("netns-libvirtd"), &host_ns, libvirt_dir.path().to_str().unwrap()])
            .trim()
            .to_owned();
        let prefix = format!("{}-n-", ns.tag);
        let cluster = TestCluster::start(
            ClusterOpts::default()
                .driver(&[
                    "--driver",
                    "libvirt",
                    "--libvirt-uri",
                    &uri,
                    "--network",
                    "host",
                    "--netns",
                    &host_ns,
                    "--netns-prefix",
                    &prefix,
                ])
                .env("STRATO_IMAGE_FILE_DIRS", &image_dir)
                .mode(0o755),
        );
        NetnsHost { cluster, ns_name: host_ns, uri, _ns: ns, _libvirt_dir: libvirt_dir }
    }
}

#[test]
#[ignore = "needs libvirtd and the guest image: scripts/real-guest prepares both, scripts/test runs it"]
fn a_real_guest_gets_its_address_host_name_and_user_data_from_the_flat_provider() {
    let image = std::env::var("STRATO_GUEST_IMAGE")
        .expect("STRATO_GUEST_IMAGE must name the image built by scripts/real-guest");
    let host = NetnsHost::start(&image);
    let (cluster, host_ns) = (&host.cluster, &host.ns_name);
    let (api, dir) = (cluster.api, cluster.dir());
    let guest = Guest::define(api, cluster.agent.port(), dir, &image);
    let uuid_of = |v: &Value| v["uuid"].as_str().unwrap().to_owned();

    // A NoVlan L2 on the host's uplink and an L3 with the Flat provider's DHCP, DNS and
    // user data, as the walkthrough makes them.
    let l2 = create(
        api,
        "/v1/l2-networks/no-vlan",
        json!({ "name": "flat", "zoneUuid": guest.zone["uuid"], "physicalInterface": "up0" }),
    );
    ok(
        api,
        "POST",
        &format!("/v1/l2-networks/{}/clusters/{}", uuid_of(&l2), uuid_of(&guest.cluster)),
        None,
    );
    let l3 = create(api, "/v1/l3-networks", json!({ "name": "flat", "l2NetworkUuid": l2["uuid"] }));
    let l3_id = uuid_of(&l3);
    create(
        api,
        &format!("/v1/l3-networks/{l3_id}/ip-ranges"),
        json!({ "startIp": "10.61.0.10", "endIp": "10.61.0.100", "netmask": "255.255.255.0", "gateway": "10.61.0.1" }),
    );
    let (_, _, flat) = http(api, "GET", "/v1/network-service-providers?q=type=Flat", None, &[]);
    let flat = flat["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    ok(
        api,
        "POST",
        &format!("/v1/network-service-providers/{flat}/l2-networks/{}", uuid_of(&l2)),
        None,
    );
    let action = |body: Value| {
        ok(api, "PUT", &format!("/v1/l3-networks/{l3_id}/actions"), Some(&body.to_string()))
    };
    action(
        json!({ "attachNetworkServiceToL3Network": { "networkServices": { &flat: ["DHCP", "DNS", "Userdata"] } } }),
    );
    action(json!({ "addDnsToL3Network": { "dns": "10.61.0.53" } }));

    let body = json!({
        "params": { "name": "guest", "instanceOfferingUuid": guest.offering["uuid"], "imageUuid": guest.image["uuid"], "l3NetworkUuids": [l3_id] },
        "systemTags": [
            "hostname::tryout-guest",
            format!("userdata::{}", base64_of("#cloud-config\nstrato: user data for the tryout guest\n")),
        ],
    });
    let vm = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(vm["state"], "Running", "{vm}");
    let uuid = uuid_of(&vm);
    let nic = &vm["vmNics"][0];
    assert_eq!(nic["bridge"], "br_up0", "{vm}");
    let ip = nic["ip"].as_str().unwrap();

    // QEMU's tap is on the bridge in the host's namespace, named after the NIC.
    let port = strato_proto::net::nic_device(nic["mac"].as_str().unwrap());
    let bridged = run(&["ip", "-n", host_ns, "-o", "link", "show", "master", "br_up0"]);
    assert!(bridged.contains(&format!("{port}:")), "{bridged}");

    // The guest's console: its lease, the host name it took, its instance id and user data.
    let log = cluster.agent_dir().join("serial").join(format!("{uuid}.log"));
    // (The guest says when it got no lease or no device: the test fails then, not later.)
    let text = wait_serial(
        &log,
        &["strato-tryout: metadata read", "strato-tryout: no lease", "strato-tryout: no network"],
        Duration::from_secs(180),
    );
    assert!(
        text.contains(&format!(
            "strato-tryout: lease ip={ip} mask=24 router=10.61.0.1 dns=10.61.0.53"
        )),
        "{text}"
    );
    assert!(text.contains("hostname=tryout-guest"), "{text}");
    assert!(text.contains(&format!("strato-tryout: instance-id={uuid}")), "{text}");
    assert!(text.contains("strato-tryout: user-data: #cloud-config"), "{text}");
    assert!(
        text.contains("strato-tryout: user-data: strato: user data for the tryout guest"),
        "{text}"
    );
}

#[test]
#[ignore = "needs libvirtd and the guest image: scripts/real-guest prepares both, scripts/test runs it"]
fn a_real_guest_keeps_its_disks_bytes_through_hot_plug_live_snapshots_of_data_and_root_and_pulls() {
    let image = std::env::var("STRATO_GUEST_IMAGE")
        .expect("STRATO_GUEST_IMAGE must name the image built by scripts/real-guest");
    let host = NetnsHost::start(&image);
    let (api, dir) = (host.cluster.api, host.cluster.dir());
    let guest = Guest::define(api, host.cluster.agent.port(), dir, &image);
    let l3 = create(api, "/v1/l3-networks", json!({ "name": "none" }));
    create(
        api,
        &format!("/v1/l3-networks/{}/ip-ranges", l3["uuid"].as_str().unwrap()),
        json!({ "startIp": "10.0.0.10", "endIp": "10.0.0.20", "netmask": "255.255.255.0", "gateway": "10.0.0.1" }),
    );
    let body = json!({
        "params": { "name": "disks", "instanceOfferingUuid": guest.offering["uuid"], "imageUuid": guest.image["uuid"], "l3NetworkUuids": [l3["uuid"]] },
    });
    let vm = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let vm_id = vm["uuid"].as_str().unwrap().to_owned();
    let log = host.cluster.agent_dir().join("serial").join(format!("{vm_id}.log"));
    wait_serial(&log, &["strato-tryout: watching disks"], Duration::from_secs(120));

    let volume =
        create(api, "/v1/volumes/data", json!({ "name": "data", "diskSize": 16u64 << 20 }));
    let volume_id = volume["uuid"].as_str().unwrap().to_owned();
    let serial: String = volume_id.replace('-', "").chars().take(20).collect();
    let action = |body: Value| {
        ok(api, "PUT", &format!("/v1/volumes/{volume_id}/actions"), Some(&body.to_string()))
    };
    // Plugged live: the guest sees vdb with the volume's serial and writes its pattern.
    let attached = action(json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    assert_eq!(attached["deviceId"], 1, "{attached}");
    let text = wait_serial(&log, &["strato-tryout: vdb written"], Duration::from_secs(60));
    let written = text
        .lines()
        .find_map(|l| l.split_once("strato-tryout: vdb written ").map(|(_, p)| p.trim().to_owned()))
        .unwrap();
    let xml = Command::new("virsh").args(["-c", &host.uri, "dumpxml", &vm_id]).output().unwrap();
    let xml = String::from_utf8_lossy(&xml.stdout);
    assert!(xml.contains(&format!("<serial>{serial}</serial>")), "{xml}");
    assert!(written.starts_with(&format!("strato-pattern:{serial}:")), "{written}\n{text}\n{xml}");
    // Snapshotted live: the guest's disk moves to a new top and the snapshot's file holds
    // what the guest wrote; deleted live, its layer is pulled back into the top, which then
    // stands alone.
    let snapshot = ok(
        api,
        "POST",
        &format!("/v1/volumes/{volume_id}/volume-snapshots"),
        Some(&json!({ "params": { "name": "live" } }).to_string()),
    );
    let frozen = snapshot["primaryStorageInstallPath"].as_str().unwrap().to_owned();
    let dump = Command::new("qemu-io")
        .args(["-U", "-r", "-f", "qcow2", "-c", "read -v 0 32", &frozen])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    // "strato-pattern" in the dump's hexadecimal column.
    let written_hex = "73 74 72 61 74 6f 2d 70 61 74 74 65 72 6e";
    assert!(dump.contains(written_hex), "the snapshot holds the guest's bytes: {dump}");
    let top = |api| {
        let (_, _, found) = http(api, "GET", &format!("/v1/volumes/{volume_id}"), None, &[]);
        found["inventories"][0]["installPath"].as_str().unwrap().to_owned()
    };
    assert_ne!(top(api), frozen);
    let xml = Command::new("virsh").args(["-c", &host.uri, "dumpxml", &vm_id]).output().unwrap();
    assert!(String::from_utf8_lossy(&xml.stdout).contains(&top(api)), "QEMU writes the new top");
    let snapshot_id = snapshot["uuid"].as_str().unwrap();
    ok(api, "DELETE", &format!("/v1/volume-snapshots/{snapshot_id}"), None);
    let info =
        Command::new("qemu-img").args(["info", "-U", "--output=json", &top(api)]).output().unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], Value::Null, "pulled: the top stands alone: {info}");
    assert!(!Path::new(&frozen).exists());
    // Grown live: the guest sees the new size.
    action(json!({ "resizeDataVolume": { "size": 32u64 << 20 } }));
    wait_serial(
        &log,
        &[&format!("strato-tryout: vdb size {}", 32u64 << 20)],
        Duration::from_secs(30),
    );
    // Unplugged: the guest lets it go.
    action(json!({ "detachDataVolumeFromVm": {} }));
    wait_serial(&log, &["strato-tryout: vdb gone"], Duration::from_secs(60));
    // Plugged again: the same bytes are there.
    action(json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    let text = wait_serial(&log, &["strato-tryout: vdb holds"], Duration::from_secs(60));
    assert!(text.contains(&format!("strato-tryout: vdb holds {written}")), "{text}");

    // The root volume snapshotted live: QEMU writes vda to a new top. Deleted live, the
    // layer and the image below it are pulled into the top, which then stands alone, and
    // the guest carries on (it still sees its data disk go).
    let (_, _, roots) =
        http(api, "GET", &format!("/v1/volumes?q=vmInstanceUuid={vm_id}&q=type=Root"), None, &[]);
    let root_id = roots["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let root_snapshot = ok(
        api,
        "POST",
        &format!("/v1/volumes/{root_id}/volume-snapshots"),
        Some(&json!({ "params": { "name": "root-live" } }).to_string()),
    );
    let (_, _, root) = http(api, "GET", &format!("/v1/volumes/{root_id}"), None, &[]);
    let root_top = root["inventories"][0]["installPath"].as_str().unwrap().to_owned();
    assert_ne!(root_top, root_snapshot["primaryStorageInstallPath"].as_str().unwrap());
    let xml = Command::new("virsh").args(["-c", &host.uri, "dumpxml", &vm_id]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&xml.stdout).contains(&root_top),
        "QEMU writes the root's new top"
    );
    let root_snapshot_id = root_snapshot["uuid"].as_str().unwrap();
    ok(api, "DELETE", &format!("/v1/volume-snapshots/{root_snapshot_id}"), None);
    let info =
        Command::new("qemu-img").args(["info", "-U", "--output=json", &root_top]).output().unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], Value::Null, "the root's top stands alone: {info}");
    action(json!({ "detachDataVolumeFromVm": {} }));
    let started = Instant::now();
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("strato-tryout: vdb gone")
        .count()
        < 2
    {
        assert!(started.elapsed() < Duration::from_secs(60), "the guest never saw vdb go again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes `pattern`, padded to 64 bytes with spaces as the tryout guest writes its own, at
/// the start of the qcow2 chain whose top is `top` (its VM stopped).
fn write_pattern(top: &str, pattern: &str) {
    let source = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(source.path(), format!("{pattern:<64}")).unwrap();
    let command = format!("write -s {} 0 64", source.path().display());
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", &command, top]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the first 64 bytes of the qcow2 chain at `path` start with `pattern`.
fn reads_pattern(path: &str, pattern: &str) -> bool {
    let raw = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw", path])
        .arg(raw.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(raw.path()).unwrap();
    bytes.starts_with(pattern.as_bytes())
}

#[test]
#[ignore = "needs libvirtd and the guest image: scripts/real-guest prepares both, scripts/test runs it"]
fn a_real_guest_sees_a_reverted_snapshot_s_bytes_keeps_them_when_a_middle_one_goes_and_boots_a_template()
 {
    let image = std::env::var("STRATO_GUEST_IMAGE")
        .expect("STRATO_GUEST_IMAGE must name the image built by scripts/real-guest");
    let image_dir = Path::new(&image).parent().unwrap().display().to_string();
    let cluster = TestCluster::start(
        ClusterOpts::default()
            .driver(&["--driver", "libvirt", "--libvirt-uri", URI, "--network", "sim"])
            .env("STRATO_IMAGE_FILE_DIRS", &image_dir)
            .mode(0o755),
    );
    let (api, dir) = (cluster.api, cluster.dir());
    let guest = Guest::define(api, cluster.agent.port(), dir, &image);
    let l3 = create(api, "/v1/l3-networks", json!({ "name": "none" }));
    create(
        api,
        &format!("/v1/l3-networks/{}/ip-ranges", l3["uuid"].as_str().unwrap()),
        json!({ "startIp": "10.0.0.10", "endIp": "10.0.0.20", "netmask": "255.255.255.0", "gateway": "10.0.0.1" }),
    );
    let boot = |name: &str, image: &Value| {
        let body = json!({ "params": { "name": name, "instanceOfferingUuid": guest.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
        let vm = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
        let id = vm["uuid"].as_str().unwrap().to_owned();
        (id.clone(), DomainGuard(id))
    };
    let serial_log = |vm: &str| cluster.agent_dir().join("serial").join(format!("{vm}.log"));
    let (vm, _guard) = boot("layers", &guest.image);
    let vm_actions = format!("/v1/vm-instances/{vm}/actions");
    let log = serial_log(&vm);
    wait_serial(&log, &["strato-tryout: watching disks"], Duration::from_secs(120));
    let volume =
        create(api, "/v1/volumes/data", json!({ "name": "layers", "diskSize": 16u64 << 20 }));
    let volume_id = volume["uuid"].as_str().unwrap().to_owned();
    let attach = json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } });
    ok(api, "PUT", &format!("/v1/volumes/{volume_id}/actions"), Some(&attach.to_string()));
    let text = wait_serial(&log, &["strato-tryout: vdb written"], Duration::from_secs(60));
    let first = text
        .lines()
        .find_map(|l| l.split_once("strato-tryout: vdb written ").map(|(_, p)| p.trim().to_owned()))
        .unwrap();

    // Stopped, three snapshots, each taken over a pattern of its own at the disk's start.
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));
    let top = || {
        let (_, _, found) = http(api, "GET", &format!("/v1/volumes/{volume_id}"), None, &[]);
        found["inventories"][0]["installPath"].as_str().unwrap().to_owned()
    };
    let snapshot = |name: &str| {
        ok(
            api,
            "POST",
            &format!("/v1/volumes/{volume_id}/volume-snapshots"),
            Some(&json!({ "params": { "name": name } }).to_string()),
        )
    };
    let s1 = snapshot("s1");
    write_pattern(&top(), "strato-pattern:second");
    let s2 = snapshot("s2");
    write_pattern(&top(), "strato-pattern:third");
    let s3 = snapshot("s3");
    write_pattern(&top(), "strato-pattern:fourth");

    // Reverted to the middle one: the guest, started again, reads its bytes.
    let s2_id = s2["uuid"].as_str().unwrap();
    ok(
        api,
        "PUT",
        &format!("/v1/volume-snapshots/{s2_id}/actions"),
        Some(r#"{"revertVolumeFromSnapshot": {}}"#),
    );
    ok(api, "PUT", &vm_actions, Some(r#"{"startVmInstance": {}}"#));
    let text = wait_serial(
        &log,
        &["strato-tryout: vdb holds strato-pattern:second"],
        Duration::from_secs(120),
    );
    assert!(!text.contains("vdb holds strato-pattern:fourth"), "{text}");

    // The middle one deleted (with the one taken on it): the top takes its layer in, the
    // oldest keeps its own bytes, and the guest still reads the reverted ones.
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));
    ok(api, "DELETE", &format!("/v1/volume-snapshots/{s2_id}"), None);
    let s1_file = s1["primaryStorageInstallPath"].as_str().unwrap();
    assert!(reads_pattern(s1_file, &first), "the oldest snapshot keeps the guest's own pattern");
    for gone in [&s2, &s3] {
        assert!(!Path::new(gone["primaryStorageInstallPath"].as_str().unwrap()).exists());
    }
    assert!(reads_pattern(&top(), "strato-pattern:second"));
    let before =
        std::fs::read_to_string(&log).unwrap().matches("vdb holds strato-pattern:second").count();
    ok(api, "PUT", &vm_actions, Some(r#"{"startVmInstance": {}}"#));
    let started = Instant::now();
    while std::fs::read_to_string(&log).unwrap().matches("vdb holds strato-pattern:second").count()
        <= before
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the guest never read its disk again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A template of the stopped VM's root volume boots a new guest.
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));
    let bs = guest.image["backupStorageRefs"][0][0].clone();
    let template = ok(
        api,
        "POST",
        &format!("/v1/images/root-volume-templates/from/root-volumes/{vm}"),
        Some(
            &json!({ "params": { "name": "from-layers", "backupStorageUuids": [bs] } }).to_string(),
        ),
    );
    let (copy, _copy_guard) = boot("from-template", &template);
    wait_serial(&serial_log(&copy), &["strato-tryout: init reached"], Duration::from_secs(120));
}
