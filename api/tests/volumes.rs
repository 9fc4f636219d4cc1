//! Disk offerings and data volumes through the API, on the sim driver (whose domains, disks
//! included, are read from its state file) with real qcow2 files made by the agent: ZStack's
//! rules for attaching, the Delay policy's delete, recover and expunge, and what an expunged
//! VM or a migration does with its volumes.

mod common;

use std::path::Path;

use common::{ClusterOpts, TestCluster, call, create, http, ok, vm_infrastructure};
use serde_json::{Value, json};
use strato_agent::driver::sim::Sim;
use uuid::Uuid;

fn uuid(v: &Value) -> &str {
    v["uuid"].as_str().unwrap()
}

/// The device numbers of VM `vm`'s disks on the sim host, by volume.
fn disks(cluster: &TestCluster, vm: &str) -> Vec<(String, u32)> {
    let state = cluster.agent_dir().join("sim-domains.json");
    let all = Sim::disks_in(&state).unwrap();
    let vm: Uuid = vm.parse().unwrap();
    all.get(&vm)
        .map(|d| d.iter().map(|d| (d.volume.to_string(), d.device_id)).collect())
        .unwrap_or_default()
}

fn volume(api: std::net::SocketAddr, id: &str) -> Value {
    let (status, _, found) = http(api, "GET", &format!("/v1/volumes/{id}"), None, &[]);
    assert_eq!(status, 200, "{found}");
    found["inventories"][0].clone()
}

/// Local primary storage under the cluster's directory (`ps`), attached to the host's
/// cluster.
fn local_storage(cluster: &TestCluster, infra: &common::Infrastructure) -> Value {
    let api = cluster.api;
    let host_cluster = infra.host["clusterUuid"].as_str().unwrap();
    let (_, _, clusters) = http(api, "GET", &format!("/v1/clusters/{host_cluster}"), None, &[]);
    let ps = create(
        api,
        "/v1/primary-storage/local-storage",
        json!({ "name": "ps", "url": cluster.dir().join("ps").display().to_string(), "zoneUuid": clusters["inventories"][0]["zoneUuid"] }),
    );
    ok(api, "POST", &format!("/v1/clusters/{host_cluster}/primary-storage/{}", uuid(&ps)), None);
    ps
}

fn act(api: std::net::SocketAddr, id: &str, body: Value) -> Value {
    call(api, "PUT", &format!("/v1/volumes/{id}/actions"), Some(&body.to_string()))
}

#[test]
fn data_volumes_are_made_on_first_attach_plugged_live_and_deleted_by_the_delay_policy() {
    let cluster = TestCluster::start(ClusterOpts::sim(0));
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.20.0.10", "10.20.0.50");
    let host_cluster = infra.host["clusterUuid"].as_str().unwrap();
    let (_, _, clusters) = http(api, "GET", &format!("/v1/clusters/{host_cluster}"), None, &[]);
    let zone = &clusters["inventories"][0]["zoneUuid"];
    let ps_dir = cluster.dir().join("ps");
    let ps = create(
        api,
        "/v1/primary-storage/local-storage",
        json!({ "name": "ps", "url": ps_dir.display().to_string(), "zoneUuid": zone }),
    );
    ok(api, "POST", &format!("/v1/clusters/{host_cluster}/primary-storage/{}", uuid(&ps)), None);
    let vm_body = |name: &str| {
        json!({ "params": { "name": name, "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } })
            .to_string()
    };
    let vm = ok(api, "POST", "/v1/vm-instances", Some(&vm_body("vm")));
    let other = ok(api, "POST", "/v1/vm-instances", Some(&vm_body("other")));
    let (vm_id, other_id) = (uuid(&vm).to_owned(), uuid(&other).to_owned());

    // An offering and a volume from it: a record until it is attached.
    let (status, _, refused) = http(
        api,
        "POST",
        "/v1/disk-offerings",
        Some(&json!({ "params": { "name": "odd", "diskSize": 1000 } }).to_string()),
        &[],
    );
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "diskSize", "{refused}");
    let offering =
        create(api, "/v1/disk-offerings", json!({ "name": "small", "diskSize": 64u64 << 20 }));
    let both = json!({ "params": { "name": "both", "diskOfferingUuid": offering["uuid"], "diskSize": 1u64 << 20 } });
    let (status, _, both) = http(api, "POST", "/v1/volumes/data", Some(&both.to_string()), &[]);
    assert_eq!(
        (status, &both["error"]["details"]["field"]),
        (400, &json!("diskOfferingUuid")),
        "{both}"
    );
    let data = create(
        api,
        "/v1/volumes/data",
        json!({ "name": "data", "diskOfferingUuid": offering["uuid"] }),
    );
    let data_id = uuid(&data).to_owned();
    assert_eq!(data["status"], "NotInstantiated");
    assert_eq!(data["size"], 64u64 << 20);
    assert_eq!(data["installPath"], Value::Null);

    // Attached to a running VM: made on its host's storage, then plugged live as vdb.
    let attached =
        act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    assert_eq!(attached["inventory"]["status"], "Ready", "{attached}");
    assert_eq!(attached["inventory"]["vmInstanceUuid"], vm_id.as_str());
    assert_eq!(attached["inventory"]["deviceId"], 1);
    let path = attached["inventory"]["installPath"].as_str().unwrap().to_owned();
    assert!(path.starts_with(&ps_dir.display().to_string()), "{path}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", &path])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 64u64 << 20, "a real qcow2 of the offering's size: {info}");
    assert_eq!(disks(&cluster, &vm_id), vec![(data_id.clone(), 1)]);
    // Attaching it again is no change; to another VM, it is refused.
    let again = act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    assert_eq!(again["inventory"]["deviceId"], 1, "{again}");
    let taken =
        act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": other_id } }));
    assert_eq!(taken["error"]["code"], "VOLUME.IN_USE", "{taken}");
    // The VM's volumes, by a join.
    let (_, _, found) =
        http(api, "GET", &format!("/v1/vm-instances?q=allVolumes.uuid={data_id}"), None, &[]);
    assert_eq!(found["inventories"][0]["uuid"], vm_id.as_str(), "{found}");
    // One volume attached to two VMs at the same moment: one wins, the other is told it is
    // taken, and only the winner has the disk.
    let contested =
        create(api, "/v1/volumes/data", json!({ "name": "contested", "diskSize": 1u64 << 20 }));
    let contested = uuid(&contested).to_owned();
    let sent: Vec<String> = [&vm_id, &other_id]
        .iter()
        .map(|target| {
            let body = json!({ "attachDataVolumeToVm": { "vmInstanceUuid": target } }).to_string();
            let (status, _, reply) =
                http(api, "PUT", &format!("/v1/volumes/{contested}/actions"), Some(&body), &[]);
            assert_eq!(status, 202, "{reply}");
            reply["location"].as_str().unwrap().to_owned()
        })
        .collect();
    let ends: Vec<Value> = sent.iter().map(|l| common::wait_job(api, l)).collect();
    let won: Vec<&Value> = ends.iter().filter(|e| e.get("error").is_none()).collect();
    assert_eq!(won.len(), 1, "{ends:?}");
    let lost = ends.iter().find(|e| e.get("error").is_some()).unwrap();
    assert_eq!(lost["error"]["code"], "VOLUME.IN_USE", "{lost}");
    let winner = won[0]["inventory"]["vmInstanceUuid"].as_str().unwrap().to_owned();
    let loser = if winner == vm_id { &other_id } else { &vm_id };
    assert!(disks(&cluster, &winner).iter().any(|(v, _)| *v == contested));
    assert!(!disks(&cluster, loser).iter().any(|(v, _)| *v == contested));
    act(api, &contested, json!({ "detachDataVolumeFromVm": {} }));

    // A VM with a local data volume stays on its host.
    ok(api, "PUT", &format!("/v1/vm-instances/{vm_id}/actions"), Some(r#"{"stopVmInstance": {}}"#));
    let migrate = call(
        api,
        "PUT",
        &format!("/v1/vm-instances/{vm_id}/actions"),
        Some(r#"{"migrateVm": {}}"#),
    );
    assert_eq!(migrate["error"]["code"], "SYS.RESOURCE_IN_USE", "{migrate}");

    // Detached from a stopped VM: its next start has no such disk; attached while stopped,
    // the start plugs it.
    act(api, &data_id, json!({ "detachDataVolumeFromVm": {} }));
    ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{vm_id}/actions"),
        Some(r#"{"startVmInstance": {}}"#),
    );
    assert_eq!(disks(&cluster, &vm_id), vec![]);
    ok(api, "PUT", &format!("/v1/vm-instances/{vm_id}/actions"), Some(r#"{"stopVmInstance": {}}"#));
    let stopped =
        act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    assert_eq!(stopped["inventory"]["deviceId"], 1, "{stopped}");
    ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{vm_id}/actions"),
        Some(r#"{"startVmInstance": {}}"#),
    );
    assert_eq!(disks(&cluster, &vm_id), vec![(data_id.clone(), 1)]);

    // Device numbers: the next volume is vdc; one VM takes 24 at most.
    let mut more = Vec::new();
    for i in 0..23 {
        let v = create(
            api,
            "/v1/volumes/data",
            json!({ "name": format!("more-{i}"), "diskSize": 1u64 << 20 }),
        );
        let a = act(api, uuid(&v), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
        assert_eq!(a["inventory"]["deviceId"], i + 2, "{a}");
        more.push(uuid(&v).to_owned());
    }
    let extra = create(api, "/v1/volumes/data", json!({ "name": "extra", "diskSize": 1u64 << 20 }));
    let full =
        act(api, uuid(&extra), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    assert_eq!(full["error"]["code"], "SYS.INVALID_ARGUMENT", "{full}");
    assert!(full["error"]["description"].as_str().unwrap().contains("24"), "{full}");
    assert_eq!(
        volume(api, uuid(&extra))["status"],
        "NotInstantiated",
        "a refused attachment made nothing"
    );
    assert_eq!(disks(&cluster, &vm_id).len(), 24);

    // Deleted (Delay): detached first, recoverable, not attachable meanwhile.
    ok(api, "DELETE", &format!("/v1/volumes/{data_id}"), None);
    let deleted = volume(api, &data_id);
    assert_eq!((&deleted["status"], &deleted["vmInstanceUuid"]), (&json!("Deleted"), &Value::Null));
    assert!(!disks(&cluster, &vm_id).iter().any(|(v, _)| *v == data_id), "unplugged");
    assert!(Path::new(&path).exists(), "a deleted volume keeps its file");
    let refused =
        act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": other_id } }));
    assert_eq!(refused["error"]["code"], "VOLUME.INVALID_STATUS", "{refused}");
    let recovered = act(api, &data_id, json!({ "recoverDataVolume": {} }));
    assert_eq!(recovered["inventory"]["status"], "Ready", "{recovered}");
    let early = act(api, &data_id, json!({ "expungeDataVolume": {} }));
    assert_eq!(early["error"]["code"], "VOLUME.INVALID_STATUS", "{early}");
    ok(api, "DELETE", &format!("/v1/volumes/{data_id}"), None);
    act(api, &data_id, json!({ "expungeDataVolume": {} }));
    let (status, _, gone) = http(api, "GET", &format!("/v1/volumes/{data_id}"), None, &[]);
    assert_eq!(status, 404, "{gone}");
    assert!(!Path::new(&path).exists(), "the expunged volume's file is gone");

    // An expunged VM's volumes stay, detached and Ready.
    ok(api, "DELETE", &format!("/v1/vm-instances/{vm_id}"), None);
    ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{vm_id}/actions"),
        Some(r#"{"expungeVmInstance": {}}"#),
    );
    for id in &more {
        let left = volume(api, id);
        assert_eq!(
            (&left["status"], &left["vmInstanceUuid"]),
            (&json!("Ready"), &Value::Null),
            "{left}"
        );
    }
    // And attach to another VM of the host.
    let moved =
        act(api, &more[0], json!({ "attachDataVolumeToVm": { "vmInstanceUuid": other_id } }));
    assert_eq!(moved["inventory"]["deviceId"], 1, "{moved}");
    assert_eq!(disks(&cluster, &other_id), vec![(more[0].clone(), 1)]);
}

/// A VM named `name` placed on host `host`: its UUID.
fn vm_on_host(
    api: std::net::SocketAddr,
    infra: &common::Infrastructure,
    name: &str,
    host: &Value,
) -> String {
    let body = json!({ "params": { "name": name, "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]], "hostUuid": host } });
    uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned()
}

/// A 16 MiB data volume made on VM `vm`'s host by its attachment: its UUID and file.
fn data_volume_made_on(api: std::net::SocketAddr, vm: &str) -> (String, String) {
    let data = create(api, "/v1/volumes/data", json!({ "name": "data", "diskSize": 16u64 << 20 }));
    let data_id = uuid(&data).to_owned();
    act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    let file = volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    (data_id, file)
}

/// A 16 MiB qcow2 image in `dir` holding `byte` over its first 64 KiB: its path.
fn qcow2_image(dir: &Path, byte: u8) -> String {
    let source = dir.join("base.qcow2").display().to_string();
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &source, "16M"])
        .status()
        .unwrap();
    assert!(made.success());
    write_at(&source, byte, 0);
    source
}

/// Backup storage under the cluster's directory (`bs`), attached to zone `zone`, with the
/// file `source` (`format`) imported into it: the storage and the image.
fn image_in_backup_storage(
    cluster: &TestCluster,
    zone: &str,
    source: &str,
    format: &str,
) -> (Value, Value) {
    let api = cluster.api;
    let bs = create(
        api,
        "/v1/backup-storage/image-store",
        json!({ "name": "bs", "url": cluster.dir().join("bs").display().to_string() }),
    );
    ok(api, "POST", &format!("/v1/zones/{zone}/backup-storage/{}", uuid(&bs)), None);
    let image = create(
        api,
        "/v1/images",
        json!({ "name": "image", "url": format!("file://{source}"), "format": format, "backupStorageUuids": [bs["uuid"]] }),
    );
    (bs, image)
}

/// Writes `byte` over 64 KiB at `offset` KiB of the qcow2 file at `path` (its VM stopped).
fn write_at(path: &str, byte: u8, offset: u64) {
    let command = format!("write -P {byte:#x} {}k 64k", offset);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &command, path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the 64 KiB at `offset` KiB of the qcow2 chain at `path` are all `byte`.
fn holds(path: &str, byte: u8, offset: u64) -> bool {
    let command = format!("read -P {byte:#x} {}k 64k", offset);
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", &command, path])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status.success() && !text.contains("Pattern verification failed")
}

/// The backing file of the qcow2 file at `path`, if any.
fn backing(path: &str) -> Option<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", path])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["backing-filename"].as_str().map(str::to_owned)
}

#[test]
fn snapshots_keep_each_layer_s_bytes_through_reverts_and_deletions() {
    let cluster = TestCluster::start(ClusterOpts::sim(0));
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.21.0.10", "10.21.0.50");
    local_storage(&cluster, &infra);
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let vm_id = uuid(&vm).to_owned();
    let data = create(api, "/v1/volumes/data", json!({ "name": "data", "diskSize": 16u64 << 20 }));
    let data_id = uuid(&data).to_owned();
    let vm_action = |action: &str| {
        ok(
            api,
            "PUT",
            &format!("/v1/vm-instances/{vm_id}/actions"),
            Some(&format!("{{\"{action}\": {{}}}}")),
        );
    };
    let top = || volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    let snap = |name: &str| -> Value {
        let made = ok(
            api,
            "POST",
            &format!("/v1/volumes/{data_id}/volume-snapshots"),
            Some(&json!({ "params": { "name": name } }).to_string()),
        );
        assert_eq!(made["name"], name, "{made}");
        made
    };
    // A snapshot needs a file: a volume never attached has none.
    let early = call(
        api,
        "POST",
        &format!("/v1/volumes/{data_id}/volume-snapshots"),
        Some(&json!({ "params": { "name": "early" } }).to_string()),
    );
    assert_eq!(early["error"]["code"], "VOLUME.INVALID_STATUS", "{early}");
    act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    vm_action("stopVmInstance");

    // Offline: each layer gets its own bytes at its own offset (KiB): A at 0, B at 64, ...
    write_at(&top(), 0xaa, 0);
    let s1 = snap("s1");
    assert_eq!(
        (&s1["distance"], &s1["parentUuid"], &s1["latest"]),
        (&json!(0), &Value::Null, &json!(true))
    );
    write_at(&top(), 0xbb, 64);
    let s2 = snap("s2");
    assert_eq!((&s2["distance"], &s2["parentUuid"]), (&json!(1), &s1["uuid"]));
    write_at(&top(), 0xcc, 128);
    let s3 = snap("s3");
    write_at(&top(), 0xdd, 192);
    let (_, _, listed) =
        http(api, "GET", &format!("/v1/volume-snapshots?q=volumeUuid={data_id}"), None, &[]);
    let latest: Vec<&str> = listed["inventories"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["latest"] == true)
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(latest, ["s3"], "{listed}");
    let (_, _, trees) =
        http(api, "GET", &format!("/v1/volume-snapshot-trees?q=volumeUuid={data_id}"), None, &[]);
    assert_eq!(trees["inventories"].as_array().unwrap().len(), 1, "{trees}");
    assert_eq!(trees["inventories"][0]["current"], true, "{trees}");
    assert!([(0xaa, 0), (0xbb, 64), (0xcc, 128), (0xdd, 192)].iter().all(|(b, o)| holds(
        &top(),
        *b,
        *o
    )));

    // Reverted to s2 (VM stopped): B is there, C and D are not; the old top is gone.
    let old_top = top();
    let s2_id = uuid(&s2).to_owned();
    let reverted = ok(
        api,
        "PUT",
        &format!("/v1/volume-snapshots/{s2_id}/actions"),
        Some(r#"{"revertVolumeFromSnapshot": {}}"#),
    );
    assert_eq!(reverted["latest"], true, "{reverted}");
    assert!(
        holds(&top(), 0xaa, 0) && holds(&top(), 0xbb, 64),
        "the reverted volume has s2's bytes"
    );
    assert!(!holds(&top(), 0xcc, 128) && !holds(&top(), 0xdd, 192), "nor what came after s2");
    assert!(!Path::new(&old_top).exists(), "the old top is deleted");
    // A new branch: s4 on s2, beside s3.
    write_at(&top(), 0xee, 256);
    let s4 = snap("s4");
    assert_eq!((&s4["parentUuid"], &s4["distance"]), (&s2["uuid"], &json!(2)));

    // s3 (a leaf of the other branch) deleted: the volume is untouched.
    let s3_file = {
        let (_, _, found) =
            http(api, "GET", &format!("/v1/volume-snapshots/{}", uuid(&s3)), None, &[]);
        found["inventories"][0]["primaryStorageInstallPath"].as_str().unwrap().to_owned()
    };
    ok(api, "DELETE", &format!("/v1/volume-snapshots/{}", uuid(&s3)), None);
    assert!(!Path::new(&s3_file).exists());
    assert!(holds(&top(), 0xee, 256) && holds(&top(), 0xbb, 64));

    // s2, in the middle of the volume's chain, deleted with its descendant s4: what they
    // held is merged into the top, which now stands on s1; s1 keeps exactly its own bytes.
    ok(api, "DELETE", &format!("/v1/volume-snapshots/{s2_id}"), None);
    let s1_file = {
        let (_, _, found) =
            http(api, "GET", &format!("/v1/volume-snapshots/{}", uuid(&s1)), None, &[]);
        assert_eq!(found["inventories"][0]["latest"], true, "{found}");
        found["inventories"][0]["primaryStorageInstallPath"].as_str().unwrap().to_owned()
    };
    assert_eq!(backing(&top()).as_deref(), Some(s1_file.as_str()));
    assert!([(0xaa, 0), (0xbb, 64), (0xee, 256)].iter().all(|(b, o)| holds(&top(), *b, *o)));
    assert!(holds(&s1_file, 0xaa, 0) && !holds(&s1_file, 0xbb, 64), "s1 is as it was");
    let (_, _, left) =
        http(api, "GET", &format!("/v1/volume-snapshots?q=volumeUuid={data_id}"), None, &[]);
    assert_eq!(left["inventories"].as_array().unwrap().len(), 1, "{left}");

    // Grown offline (VM stopped); never shrunk.
    let grown = act(api, &data_id, json!({ "resizeDataVolume": { "size": 32u64 << 20 } }));
    assert_eq!(grown["inventory"]["size"], 32u64 << 20, "{grown}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", &top()])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 32u64 << 20, "{info}");
    let shrunk = act(api, &data_id, json!({ "resizeDataVolume": { "size": 16u64 << 20 } }));
    assert_eq!(shrunk["error"]["details"]["field"], "size", "{shrunk}");
    assert!(holds(&top(), 0xaa, 0), "growing kept the bytes");

    // Live, on the running VM: a snapshot switches its disk to a new top, and deleting it
    // pulls the layer back into the top; the disk follows the volume's record.
    vm_action("startVmInstance");
    let live = snap("live");
    let live_file = top();
    let disk_path = |cluster: &TestCluster| {
        let state = cluster.agent_dir().join("sim-domains.json");
        let disks = Sim::disks_in(&state).unwrap();
        disks[&vm_id.parse::<Uuid>().unwrap()][0].path.clone()
    };
    assert_eq!(disk_path(&cluster), live_file);
    assert_eq!(
        backing(&live_file).as_deref(),
        Some(live["primaryStorageInstallPath"].as_str().unwrap_or(&s1_file))
    );
    ok(api, "DELETE", &format!("/v1/volume-snapshots/{}", uuid(&live)), None);
    assert!([(0xaa, 0), (0xbb, 64), (0xee, 256)].iter().all(|(b, o)| holds(&top(), *b, *o)));
    // Grown live: the running domain's disk.
    let grown = act(api, &data_id, json!({ "resizeDataVolume": { "size": 48u64 << 20 } }));
    assert_eq!(grown["inventory"]["size"], 48u64 << 20, "{grown}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", &top()])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 48u64 << 20, "{info}");
    let reverting = call(
        api,
        "PUT",
        &format!("/v1/volume-snapshots/{}/actions", uuid(&s1)),
        Some(r#"{"revertVolumeFromSnapshot": {}}"#),
    );
    assert_eq!(
        reverting["error"]["code"], "VM.INVALID_STATE",
        "a running VM's volume is not reverted: {reverting}"
    );

    // Expunged, the volume takes its snapshots and their files with it.
    vm_action("stopVmInstance");
    ok(api, "DELETE", &format!("/v1/volumes/{data_id}"), None);
    act(api, &data_id, json!({ "expungeDataVolume": {} }));
    assert!(!Path::new(&s1_file).exists());
    let (_, _, gone) =
        http(api, "GET", &format!("/v1/volume-snapshots?q=volumeUuid={data_id}"), None, &[]);
    assert_eq!(gone["inventories"].as_array().unwrap().len(), 0, "{gone}");
}

#[test]
fn a_snapshot_makes_a_volume_and_a_root_volume_makes_a_template_that_boots_a_vm() {
    let images = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        ClusterOpts::sim(0)
            .env("STRATO_IMAGE_FILE_DIRS", images.path().to_str().unwrap())
            // Caches are cleaned when asked, sparing none for being recent.
            .env("STRATO_IMAGE_CACHE_GC_SECS", "0")
            .env("STRATO_IMAGE_CACHE_GRACE_SECS", "0"),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.22.0.10", "10.22.0.50");
    let host_cluster = infra.host["clusterUuid"].as_str().unwrap();
    let (_, _, clusters) = http(api, "GET", &format!("/v1/clusters/{host_cluster}"), None, &[]);
    let zone = clusters["inventories"][0]["zoneUuid"].as_str().unwrap().to_owned();
    let ps = create(
        api,
        "/v1/primary-storage/local-storage",
        json!({ "name": "ps", "url": cluster.dir().join("ps").display().to_string(), "zoneUuid": zone }),
    );
    ok(api, "POST", &format!("/v1/clusters/{host_cluster}/primary-storage/{}", uuid(&ps)), None);
    // An image with a pattern of its own at 0.
    let source = qcow2_image(images.path(), 0x11);
    let (bs, image) = image_in_backup_storage(&cluster, &zone, &source, "qcow2");
    let vm_from = |name: &str, image: &Value| -> Value {
        let body = json!({ "params": { "name": name, "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
        ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))
    };
    let vm1 = vm_from("vm1", &image);
    let vm1_id = uuid(&vm1).to_owned();
    ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{vm1_id}/actions"),
        Some(r#"{"stopVmInstance": {}}"#),
    );
    let root = vm1["rootVolumePath"].as_str().unwrap().to_owned();
    write_at(&root, 0x5a, 1024);

    // A volume from a snapshot: the snapshot's bytes, standing alone, not what came after.
    let data = create(api, "/v1/volumes/data", json!({ "name": "data", "diskSize": 16u64 << 20 }));
    let data_id = uuid(&data).to_owned();
    act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm1_id } }));
    let top = || volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    write_at(&top(), 0x33, 0);
    let snapshot = ok(
        api,
        "POST",
        &format!("/v1/volumes/{data_id}/volume-snapshots"),
        Some(&json!({ "params": { "name": "s" } }).to_string()),
    );
    write_at(&top(), 0x44, 64);
    let copy = ok(
        api,
        "POST",
        &format!("/v1/volumes/data/from/volume-snapshots/{}", uuid(&snapshot)),
        Some(&json!({ "params": { "name": "copy" } }).to_string()),
    );
    assert_eq!(
        (&copy["status"], &copy["vmInstanceUuid"]),
        (&json!("Ready"), &Value::Null),
        "{copy}"
    );
    let copy_path = copy["installPath"].as_str().unwrap();
    assert_eq!(backing(copy_path), None, "a standalone copy");
    assert!(holds(copy_path, 0x33, 0) && !holds(copy_path, 0x44, 64));

    // A template from the stopped VM's root volume: the image's bytes and the VM's, in one
    // file on the backup storage, with its checksum; a new VM boots from it.
    let template = ok(
        api,
        "POST",
        &format!("/v1/images/root-volume-templates/from/root-volumes/{vm1_id}"),
        Some(
            &json!({ "params": { "name": "golden", "backupStorageUuids": [bs["uuid"]] } })
                .to_string(),
        ),
    );
    assert_eq!(template["status"], "Ready", "{template}");
    assert!(template["checksum"].as_str().unwrap().starts_with("sha256:"), "{template}");
    let file = template["backupStorageRefs"][0][1].as_str().unwrap();
    assert_eq!(backing(file), None, "a template stands alone");
    assert!(holds(file, 0x11, 0) && holds(file, 0x5a, 1024), "the image's and the VM's bytes");
    let vm2 = vm_from("vm2", &template);
    assert_eq!(vm2["state"], "Running", "{vm2}");
    // Root volumes are volumes too: one per VM made from an image, mirroring its file and
    // host, device 0, of the image's virtual size; data volume operations refuse them.
    let (_, _, roots) = http(api, "GET", "/v1/volumes?q=type=Root&sort=name", None, &[]);
    let roots = roots["inventories"].as_array().unwrap().clone();
    assert_eq!(roots.len(), 2, "{roots:?}");
    let root1 = roots.iter().find(|r| r["vmInstanceUuid"] == vm1_id.as_str()).unwrap();
    assert_eq!(
        (&root1["installPath"], &root1["hostUuid"], &root1["deviceId"], &root1["status"]),
        (&vm1["rootVolumePath"], &vm1["hostUuid"], &json!(0), &json!("Ready")),
        "{root1}"
    );
    assert_eq!(root1["size"], 16u64 << 20, "the image's virtual size: {root1}");
    let (_, _, joined) = http(
        api,
        "GET",
        &format!("/v1/vm-instances?q=allVolumes.uuid={}", root1["uuid"].as_str().unwrap()),
        None,
        &[],
    );
    assert_eq!(joined["inventories"][0]["uuid"], vm1_id.as_str(), "{joined}");
    let root1_id = uuid(root1).to_owned();
    for refused in [
        call(api, "DELETE", &format!("/v1/volumes/{root1_id}"), None),
        call(
            api,
            "PUT",
            &format!("/v1/volumes/{root1_id}/actions"),
            Some(&json!({ "detachDataVolumeFromVm": {} }).to_string()),
        ),
    ] {
        assert_eq!(refused["error"]["details"]["field"], "volumeUuid", "{refused}");
    }
    // A tenant's VM's root volume is the tenant's: it sees it, another does not.
    let owner = cluster.account("root-owner", Value::Null);
    let made = cluster.done_as(
        &owner,
        "POST",
        "/v1/vm-instances",
        json!({ "params": { "name": "tenant-vm", "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } }),
    );
    let tenant_vm =
        made["inventory"]["uuid"].as_str().unwrap_or_else(|| panic!("{made}")).to_owned();
    let (_, seen) = cluster.as_(&owner, "GET", "/v1/volumes", None);
    let seen = seen["inventories"].as_array().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["vmInstanceUuid"], tenant_vm.as_str());
    assert!(seen[0].get("installPath").is_none(), "a tenant sees no host internals");
    let other = cluster.account("root-stranger", Value::Null);
    let (_, unseen) = cluster.as_(&other, "GET", "/v1/volumes", None);
    assert_eq!(unseen["inventories"], json!([]), "{unseen}");
    let (status, _) = cluster.as_(&other, "GET", &format!("/v1/volumes/{}", uuid(&seen[0])), None);
    assert_eq!(status, 404);
    let root2 = vm2["rootVolumePath"].as_str().unwrap();
    assert!(holds(root2, 0x11, 0) && holds(root2, 0x5a, 1024), "the new VM's disk has them");
    // A running VM's root volume is not templated.
    let running = call(
        api,
        "POST",
        &format!("/v1/images/root-volume-templates/from/root-volumes/{}", uuid(&vm2)),
        Some(
            &json!({ "params": { "name": "no", "backupStorageUuids": [bs["uuid"]] } }).to_string(),
        ),
    );
    assert_eq!(running["error"]["code"], "VM.INVALID_STATE", "{running}");

    // A data volume template from the data volume (its VM stopped): both layers' bytes in
    // one file; no VM boots from it, and a data volume made from it is its copy.
    let in_bs = |name: &str| {
        json!({ "params": { "name": name, "backupStorageUuids": [bs["uuid"]] } }).to_string()
    };
    let data_template = ok(
        api,
        "POST",
        &format!("/v1/images/data-volume-templates/from/volumes/{data_id}"),
        Some(&in_bs("data-golden")),
    );
    assert_eq!(data_template["mediaType"], "DataVolumeTemplate", "{data_template}");
    let file = data_template["backupStorageRefs"][0][1].as_str().unwrap().to_owned();
    assert_eq!(backing(&file), None);
    assert!(holds(&file, 0x33, 0) && holds(&file, 0x44, 64));
    let body = json!({ "params": { "name": "no", "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": data_template["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let (status, _, refused) = http(api, "POST", "/v1/vm-instances", Some(&body.to_string()), &[]);
    assert_eq!(
        (status, &refused["error"]["details"]["field"]),
        (400, &json!("imageUuid")),
        "{refused}"
    );
    let from_template = ok(
        api,
        "POST",
        &format!("/v1/volumes/data/from/data-volume-templates/{}", uuid(&data_template)),
        Some(&json!({ "params": { "name": "from-template" } }).to_string()),
    );
    assert_eq!(
        (&from_template["status"], &from_template["size"], &from_template["rootImageUuid"]),
        (&json!("NotInstantiated"), &json!(16u64 << 20), &data_template["uuid"]),
        "{from_template}"
    );
    let from_id = uuid(&from_template).to_owned();
    let attached =
        act(api, &from_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": uuid(&vm2) } }));
    let copy = attached["inventory"]["installPath"].as_str().unwrap().to_owned();
    assert_eq!(attached["inventory"]["status"], "Ready", "{attached}");
    assert_eq!(backing(&copy), None, "made as a standalone copy");
    assert!(holds(&copy, 0x33, 0) && holds(&copy, 0x44, 64));
    // A root volume template is refused as a data volume's source.
    let (status, _, refused) = http(
        api,
        "POST",
        &format!("/v1/volumes/data/from/data-volume-templates/{}", uuid(&template)),
        Some(&json!({ "params": { "name": "no" } }).to_string()),
        &[],
    );
    assert_eq!(
        (status, &refused["error"]["details"]["field"]),
        (400, &json!("imageUuid")),
        "{refused}"
    );
    // A root volume template from the snapshot: its bytes, not what came after.
    let from_snapshot = ok(
        api,
        "POST",
        &format!("/v1/images/root-volume-templates/from/volume-snapshots/{}", uuid(&snapshot)),
        Some(&in_bs("from-snapshot")),
    );
    assert_eq!(from_snapshot["mediaType"], "RootVolumeTemplate", "{from_snapshot}");
    let file = from_snapshot["backupStorageRefs"][0][1].as_str().unwrap();
    assert!(holds(file, 0x33, 0) && !holds(file, 0x44, 64));
    act(api, &from_id, json!({ "detachDataVolumeFromVm": {} }));

    // Cleaning the image cache: the template's cache goes once vm2, the one volume backed by
    // it, is expunged; the image's stays, backing vm1's root volume. A tenant may not ask.
    let cache =
        |image: &Value| cluster.dir().join("ps/imagecache").join(format!("{}.qcow2", uuid(image)));
    assert!(cache(&image).exists() && cache(&template).exists());
    let vm2_actions = format!("/v1/vm-instances/{}/actions", uuid(&vm2));
    ok(api, "DELETE", &format!("/v1/vm-instances/{}", uuid(&vm2)), None);
    ok(api, "PUT", &vm2_actions, Some(r#"{"expungeVmInstance": {}}"#));
    let (_, _, gone) =
        http(api, "GET", &format!("/v1/volumes?q=vmInstanceUuid={}", uuid(&vm2)), None, &[]);
    assert_eq!(
        gone["inventories"],
        json!([]),
        "the expunged VM's root volume went with it: {gone}"
    );
    let clean = json!({ "cleanUpImageCacheOnPrimaryStorage": {} });
    let ps_actions = format!("/v1/primary-storage/{}/actions", uuid(&ps));
    let cleaned = call(api, "PUT", &ps_actions, Some(&clean.to_string()));
    let hosts = &cleaned["inventory"]["hosts"];
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{cleaned}");
    let deleted = cache(&template).display().to_string();
    assert_eq!(hosts[0]["deleted"], json!([deleted]), "{cleaned}");
    assert!(!cache(&template).exists() && cache(&image).exists());
    assert!(holds(&root, 0x11, 0), "vm1's root volume still reads its image");
    let again = call(api, "PUT", &ps_actions, Some(&clean.to_string()));
    assert_eq!(again["inventory"]["hosts"][0]["deleted"], json!([]), "{again}");
    let tenant = cluster.account("cache-cleaner", Value::Null);
    let (status, refused) = cluster.as_(&tenant, "PUT", &ps_actions, Some(clean));
    assert_eq!(status, 403, "{refused}");
}

#[test]
fn a_snapshot_stopped_on_either_side_of_its_file_is_settled_by_what_the_file_says() {
    // The first snapshot stops before the agent makes its file, the second after (the live
    // one: the VM's domain already writes to the new top).
    let cluster = TestCluster::start(
        ClusterOpts::sim(0)
            .env("STRATO_FAILPOINTS", "snapshot-before-file=1*panic;snapshot-after-file=1*panic"),
    );
    let mut cluster = cluster;
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.23.0.10", "10.23.0.50");
    local_storage(&cluster, &infra);
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm_id = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let (data_id, first_top) = data_volume_made_on(api, &vm_id);
    let snapshots = format!("/v1/volumes/{data_id}/volume-snapshots");
    let take = |name: &str| {
        call(api, "POST", &snapshots, Some(&json!({ "params": { "name": name } }).to_string()))
    };
    let snapshot_named = |name: &str| -> Option<Value> {
        let (_, _, found) =
            http(api, "GET", &format!("/v1/volume-snapshots?q=name={name}"), None, &[]);
        found["inventories"].get(0).cloned()
    };

    // Stopped before the file: Creating, and no new top.
    let failed = take("never");
    assert_eq!(failed["error"]["code"], "SYS.OPERATION_PANICKED", "{failed}");
    let never = snapshot_named("never").expect("its intent is recorded");
    assert_eq!(never["status"], "Creating", "{never}");
    let never_top = format!(
        "{}/{data_id}-{}.qcow2",
        Path::new(&first_top).parent().unwrap().display(),
        uuid(&never)
    );
    assert!(!Path::new(&never_top).exists());

    // The next snapshot settles it first (its intent goes), then stops after its own file.
    let failed = take("made");
    assert_eq!(failed["error"]["code"], "SYS.OPERATION_PANICKED", "{failed}");
    assert_eq!(snapshot_named("never"), None, "an intent whose file was never made goes");
    let made = snapshot_named("made").expect("its intent is recorded");
    assert_eq!(made["status"], "Creating", "{made}");
    let made_top = format!(
        "{}/{data_id}-{}.qcow2",
        Path::new(&first_top).parent().unwrap().display(),
        uuid(&made)
    );
    // The domain already writes to the new top; the record still names the old one.
    assert_eq!(backing(&made_top).as_deref(), Some(first_top.as_str()));
    let plugged = Sim::disks_in(&cluster.agent_dir().join("sim-domains.json")).unwrap();
    let vm: Uuid = vm_id.parse().unwrap();
    assert_eq!(plugged[&vm][0].path, made_top, "the live snapshot happened");
    assert_eq!(volume(api, &data_id)["installPath"], first_top.as_str());

    // The node dies here and comes back: the file exists, so the snapshot was taken.
    cluster.kill_and_restart_server();
    let api = cluster.api;
    let (_, _, found) = http(api, "GET", "/v1/volume-snapshots?q=name=made", None, &[]);
    let made = &found["inventories"][0];
    assert_eq!((&made["status"], &made["latest"]), (&json!("Ready"), &json!(true)), "{made}");
    assert_eq!(made["primaryStorageInstallPath"], first_top.as_str());
    assert_eq!(volume(api, &data_id)["installPath"], made_top.as_str(), "the volume is on it");
    // A stop and start defines the domain on the new top, where the guest's writes are.
    for action in ["stopVmInstance", "startVmInstance"] {
        let body = format!("{{\"{action}\": {{}}}}");
        ok(api, "PUT", &format!("/v1/vm-instances/{vm_id}/actions"), Some(&body));
    }
    let plugged = Sim::disks_in(&cluster.agent_dir().join("sim-domains.json")).unwrap();
    assert_eq!(plugged[&vm][0].path, made_top);
}

#[test]
fn a_tenant_s_data_volumes_count_against_its_volume_quotas() {
    let cluster = TestCluster::start(ClusterOpts::sim(0));
    let quota = json!({ "vmNum": 5, "cpuNum": 10, "memorySize": 10u64 << 30, "volumeDataNum": 2, "volumeCapacity": 48u64 << 20 });
    let tenant = cluster.account("volume-quota", quota);
    let create_as = |name: &str, size: u64| {
        let body = json!({ "params": { "name": name, "diskSize": size } });
        cluster.as_(&tenant, "POST", "/v1/volumes/data", Some(body))
    };
    let done = |(status, accepted): (u16, Value)| -> Value {
        assert_eq!(status, 202, "{accepted}");
        let auth = format!("OAuth {tenant}");
        common::wait_job_as(
            cluster.api,
            accepted["location"].as_str().unwrap(),
            ("Authorization", &auth),
        )
    };
    let first = done(create_as("first", 16 << 20));
    let first_id = uuid(&first["inventory"]).to_owned();
    // The capacity: 16 + 40 MiB is over 48.
    let (status, refused) = create_as("too-big", 40 << 20);
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("ID.QUOTA_EXCEEDED")),
        "{refused}"
    );
    assert_eq!(refused["error"]["details"]["quota"], "volumeCapacity", "{refused}");
    done(create_as("second", 16 << 20));
    // The number: a third is one too many.
    let (status, refused) = create_as("third", 1 << 20);
    assert_eq!(refused["error"]["details"]["quota"], "volumeDataNum", "{status} {refused}");
    // Growing counts too: 16 + 32 fits 48, 16 + 40 does not.
    let resize = |size: u64| {
        let body = json!({ "resizeDataVolume": { "size": size } });
        done(cluster.as_(&tenant, "PUT", &format!("/v1/volumes/{first_id}/actions"), Some(body)))
    };
    let grown = resize(32 << 20);
    assert_eq!(grown["inventory"]["size"], 32u64 << 20, "{grown}");
    let over = resize(40 << 20);
    assert_eq!(over["error"]["code"], "ID.QUOTA_EXCEEDED", "{over}");
    // Expunged, a volume counts no more.
    let actions = format!("/v1/volumes/{first_id}/actions");
    done(cluster.as_(&tenant, "DELETE", &format!("/v1/volumes/{first_id}"), None));
    done(cluster.as_(&tenant, "PUT", &actions, Some(json!({ "expungeDataVolume": {} }))));
    let third = done(create_as("third", 16 << 20));
    assert!(third.get("error").is_none(), "{third}");
}

/// Whether the 64 KiB at `offset` KiB of the qcow2 chain at `path` are all `byte`, as the
/// host whose own disk `own` is mounted at `storage` reads them (its chain's backing files
/// named by their paths there).
fn holds_on_host(storage: &Path, own: &Path, path: &str, byte: u8, offset: u64) -> bool {
    let command = format!("read -P {byte:#x} {offset}k 64k");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && exec qemu-io -r -f qcow2 -c "$3" "$4""#)
        .arg("sh")
        .arg(own)
        .arg(storage)
        .args([&command, path])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status.success()
        && text.contains("read 65536/65536")
        && !text.contains("verification failed")
}

/// The SHA-256 of the file at `path`.
fn digest(path: &Path) -> String {
    strato_proto::digest::file_sha256(path).unwrap().1
}

/// A second host in the first one's cluster whose local storage is its own disk: an agent
/// in a mount namespace where `ps-b` is mounted over the storage's directory `ps`.
fn host_with_own_storage(
    cluster: &TestCluster,
    infra: &common::Infrastructure,
) -> (common::Proc, Value, std::path::PathBuf) {
    let own = cluster.dir().join("ps-b");
    let (agent, addr) = common::start_agent_in_own_mount_namespace(
        &common::bootstrap(&cluster.data),
        &cluster.dir().join("agent-b"),
        &["--driver", "sim", "--network", "sim"],
        &[(&own, &cluster.dir().join("ps"))],
    );
    let host = create(
        cluster.api,
        "/v1/hosts/kvm",
        json!({ "name": "hb", "managementIp": "127.0.0.1", "agentPort": addr.port(), "clusterUuid": infra.host["clusterUuid"] }),
    );
    (agent, host, own)
}

#[test]
fn a_detached_volume_moves_to_another_hosts_local_storage_with_its_snapshots() {
    let cluster = TestCluster::start(
        ClusterOpts::sim(0).env("STRATO_FAILPOINTS", "volume-migrate-after-copy=1*panic"),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.24.0.10", "10.24.0.50");
    local_storage(&cluster, &infra);
    let storage = cluster.dir().join("ps");
    let (_agent_b, host_b, own_b) = host_with_own_storage(&cluster, &infra);
    let (host_a, host_b) = (infra.host["uuid"].clone(), host_b["uuid"].clone());
    let vm_on = |name: &str, host: &Value| vm_on_host(api, &infra, name, host);

    // A volume made on host A by its first attachment, detached, with a snapshot and bytes
    // of its own in each layer.
    let vm_a = vm_on("vm-a", &host_a);
    let data = create(api, "/v1/volumes/data", json!({ "name": "data", "diskSize": 16u64 << 20 }));
    let data_id = uuid(&data).to_owned();
    act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_a } }));
    act(api, &data_id, json!({ "detachDataVolumeFromVm": {} }));
    let first = volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    write_at(&first, 0x5a, 0);
    let snapshot = ok(
        api,
        "POST",
        &format!("/v1/volumes/{data_id}/volume-snapshots"),
        Some(&json!({ "params": { "name": "s" } }).to_string()),
    );
    let top = volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    write_at(&top, 0xa5, 1024);
    let files = [first.clone(), top.clone()];
    let digests: Vec<String> = files.iter().map(|f| digest(Path::new(f))).collect();
    let on_b = |file: &str| own_b.join(Path::new(file).strip_prefix(&storage).unwrap());

    // Only the admin sees where it can go, or moves it.
    let targets_path = format!("/v1/volumes/{data_id}/migration-target-hosts");
    let (status, _, targets) = http(api, "GET", &targets_path, None, &[]);
    assert_eq!(status, 200, "{targets}");
    assert_eq!(targets["inventories"].as_array().unwrap().len(), 1, "{targets}");
    assert_eq!(targets["inventories"][0]["uuid"], host_b, "{targets}");
    let actions = format!("/v1/volumes/{data_id}/actions");
    let migrate = json!({ "localStorageMigrateVolume": { "destHostUuid": host_b } });
    let tenant = cluster.account("tenant", Value::Null);
    let (status, refused) = cluster.as_(&tenant, "GET", &targets_path, None);
    assert_eq!(status, 404, "another's volume is not there for a tenant: {refused}");
    let (status, own) = cluster.as_(
        &tenant,
        "POST",
        "/v1/volumes/data",
        Some(json!({ "params": { "name": "own", "diskSize": 16u64 << 20 } })),
    );
    assert_eq!(status, 202, "{own}");
    let own = common::wait_job_as(
        api,
        own["location"].as_str().unwrap(),
        ("Authorization", &format!("OAuth {tenant}")),
    );
    let own_id = uuid(&own["inventory"]).to_owned();
    let (status, refused) =
        cluster.as_(&tenant, "GET", &format!("/v1/volumes/{own_id}/migration-target-hosts"), None);
    assert_eq!(status, 403, "hosts are the admin's: {refused}");
    let (status, refused) = cluster.as_(
        &tenant,
        "PUT",
        &format!("/v1/volumes/{own_id}/actions"),
        Some(migrate.clone()),
    );
    assert_eq!(status, 403, "{refused}");
    let elsewhere = json!({ "localStorageMigrateVolume": { "destHostUuid": host_a } });
    let refused = call(api, "PUT", &actions, Some(&elsewhere.to_string()));
    assert_eq!(refused["error"]["details"]["field"], "destHostUuid", "{refused}");

    // The first move stops on a bug after its copy: the volume stays on host A, Ready again,
    // every file still there.
    let failed = call(api, "PUT", &actions, Some(&migrate.to_string()));
    assert_eq!(failed["error"]["code"], "SYS.OPERATION_PANICKED", "{failed}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stayed = loop {
        let found = volume(api, &data_id);
        if found["status"] != "Migrating" || std::time::Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!((&stayed["hostUuid"], &stayed["status"]), (&host_a, &json!("Ready")), "{stayed}");
    assert!(files.iter().all(|f| Path::new(f).exists()));

    // The next move goes through (the copies already on B are found identical): then the
    // source's files are deleted.
    let moved = act(api, &data_id, migrate.clone());
    assert_eq!(
        (&moved["inventory"]["hostUuid"], &moved["inventory"]["status"]),
        (&host_b, &json!("Ready")),
        "{moved}"
    );
    let (_, _, snapshots) =
        http(api, "GET", &format!("/v1/volume-snapshots/{}", uuid(&snapshot)), None, &[]);
    assert_eq!(snapshots["inventories"][0]["hostUuid"], host_b, "{snapshots}");
    for (file, sha) in files.iter().zip(&digests) {
        assert!(!Path::new(file).exists(), "{file} is gone from host A");
        assert_eq!(&digest(&on_b(file)), sha, "{file} arrived as it left");
    }
    let arrived = std::fs::read_dir(on_b(&first).parent().unwrap()).unwrap();
    let names: Vec<String> =
        arrived.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".part-copy")), "no unsealed copy stays: {names:?}");
    assert!(holds_on_host(&storage, &own_b, &top, 0x5a, 0), "the snapshot's bytes, read on B");
    assert!(holds_on_host(&storage, &own_b, &top, 0xa5, 1024), "the top's bytes, read on B");

    // A local volume is attached on its own host: now B's VMs, not A's.
    let refused = act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_a } }));
    assert_eq!(refused["error"]["details"]["field"], "vmInstanceUuid", "{refused}");
    let vm_b = vm_on("vm-b", &host_b);
    let attached =
        act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_b } }));
    assert_eq!(attached["inventory"]["vmInstanceUuid"], json!(vm_b), "{attached}");
    // Attached, it stays where its VM is.
    let refused = call(api, "PUT", &actions, Some(&elsewhere.to_string()));
    assert_eq!(refused["error"]["code"], "VOLUME.IN_USE", "{refused}");
}

#[test]
fn a_stopped_vms_root_volume_moves_with_it_and_its_image_cache_follows() {
    let images = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        ClusterOpts::sim(0).env("STRATO_IMAGE_FILE_DIRS", images.path().to_str().unwrap()),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.25.0.10", "10.25.0.50");
    let ps = local_storage(&cluster, &infra);
    let storage = cluster.dir().join("ps");
    let (_agent_b, host_b, own_b) = host_with_own_storage(&cluster, &infra);
    let zone = ps["zoneUuid"].as_str().unwrap();
    let source = qcow2_image(images.path(), 0x11);
    let (_, image) = image_in_backup_storage(&cluster, zone, &source, "qcow2");
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [infra.l3["uuid"]], "hostUuid": infra.host["uuid"] } });
    let vm = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let vm_id = uuid(&vm).to_owned();
    let vm_actions = format!("/v1/vm-instances/{vm_id}/actions");
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));
    let root_file = vm["rootVolumePath"].as_str().unwrap().to_owned();
    write_at(&root_file, 0x5a, 1024);
    let cache = backing(&root_file).expect("a root volume is backed by its cached image");
    let root_sha = digest(Path::new(&root_file));
    let (_, _, roots) =
        http(api, "GET", &format!("/v1/volumes?q=vmInstanceUuid={vm_id}&q=type=Root"), None, &[]);
    let root_id = uuid(&roots["inventories"][0]).to_owned();
    let on_b = |file: &str| own_b.join(Path::new(file).strip_prefix(&storage).unwrap());

    // A running VM's root volume does not move.
    let (_, _, targets) =
        http(api, "GET", &format!("/v1/volumes/{root_id}/migration-target-hosts"), None, &[]);
    assert_eq!(targets["inventories"][0]["uuid"], host_b["uuid"], "{targets}");
    let migrate = json!({ "localStorageMigrateVolume": { "destHostUuid": host_b["uuid"] } });
    ok(api, "PUT", &vm_actions, Some(r#"{"startVmInstance": {}}"#));
    let refused = act(api, &root_id, migrate.clone());
    assert_eq!(refused["error"]["code"], "VM.INVALID_STATE", "{refused}");
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));

    // Stopped, it moves with its VM; host B had no copy of the image, so it gets one.
    let moved = act(api, &root_id, migrate);
    assert_eq!(moved["inventory"]["hostUuid"], host_b["uuid"], "{moved}");
    let (_, _, found) = http(api, "GET", &format!("/v1/vm-instances/{vm_id}"), None, &[]);
    let found = &found["inventories"][0];
    assert_eq!(
        (&found["hostUuid"], &found["lastHostUuid"]),
        (&host_b["uuid"], &infra.host["uuid"])
    );
    assert!(!Path::new(&root_file).exists(), "gone from host A");
    assert_eq!(digest(&on_b(&root_file)), root_sha, "arrived as it left");
    assert!(on_b(&cache).exists(), "the image cache followed");
    assert!(Path::new(&cache).exists(), "and stays on host A for its other volumes");
    assert!(holds_on_host(&storage, &own_b, &root_file, 0x11, 0), "the image's bytes, on B");
    assert!(holds_on_host(&storage, &own_b, &root_file, 0x5a, 1024), "its own bytes, on B");
    let started = ok(api, "PUT", &vm_actions, Some(r#"{"startVmInstance": {}}"#));
    assert_eq!((&started["state"], &started["hostUuid"]), (&json!("Running"), &host_b["uuid"]));
}

#[test]
fn past_the_incremental_limit_a_snapshot_is_full_and_starts_a_new_tree() {
    let cluster =
        TestCluster::start(ClusterOpts::sim(0).env("STRATO_SNAPSHOT_MAX_INCREMENTAL", "3"));
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.26.0.10", "10.26.0.50");
    local_storage(&cluster, &infra);
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm_id = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let data = create(api, "/v1/volumes/data", json!({ "name": "data", "diskSize": 16u64 << 20 }));
    let data_id = uuid(&data).to_owned();
    act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm_id } }));
    let top = || volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();

    // Five snapshots of the running VM's volume, each layer with bytes of its own.
    let mut taken = Vec::new();
    for i in 0..5u8 {
        write_at(&top(), 0x10 + i, u64::from(i) * 64);
        let body = json!({ "params": { "name": format!("s{i}") } });
        let path = format!("/v1/volumes/{data_id}/volume-snapshots");
        taken.push(ok(api, "POST", &path, Some(&body.to_string())));
    }
    let shape: Vec<(u64, bool)> = taken
        .iter()
        .map(|s| (s["distance"].as_u64().unwrap(), s["parentUuid"].is_null()))
        .collect();
    assert_eq!(shape, [(0, true), (1, false), (2, false), (0, true), (1, false)], "{taken:?}");
    let (first_tree, second_tree) = (&taken[0]["treeUuid"], &taken[3]["treeUuid"]);
    assert_ne!(first_tree, second_tree, "the fourth snapshot starts a tree");
    assert_eq!(taken[4]["treeUuid"], *second_tree);
    let (_, _, trees) =
        http(api, "GET", &format!("/v1/volume-snapshot-trees?q=volumeUuid={data_id}"), None, &[]);
    let current: Vec<&Value> = trees["inventories"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["current"] == true)
        .map(|t| &t["uuid"])
        .collect();
    assert_eq!(current, [second_tree], "{trees}");

    // On disk: the top, the fifth layer, the fourth standing alone; every byte still there.
    let fifth = taken[4]["primaryStorageInstallPath"].as_str().unwrap().to_owned();
    let fourth = taken[3]["primaryStorageInstallPath"].as_str().unwrap().to_owned();
    assert_eq!(backing(&top()).as_deref(), Some(fifth.as_str()));
    assert_eq!(backing(&fifth).as_deref(), Some(fourth.as_str()));
    assert_eq!(backing(&fourth), None, "a full snapshot's layer stands alone");
    for i in 0..5u8 {
        assert!(holds(&top(), 0x10 + i, u64::from(i) * 64), "layer {i}'s bytes");
    }
    // The first tree keeps its own chain: its deepest snapshot still reads as it was.
    let third = taken[2]["primaryStorageInstallPath"].as_str().unwrap();
    assert!(holds(third, 0x11, 64) && !holds(third, 0x13, 3 * 64));
}

#[test]
fn volumes_follow_their_own_deletion_policy_not_the_vms() {
    let cluster = TestCluster::start(
        ClusterOpts::sim(0).server_args(&["--volume-deletion-policy", "direct"]),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.27.0.10", "10.27.0.50");
    local_storage(&cluster, &infra);
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm_id = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let (data_id, file) = data_volume_made_on(api, &vm_id);

    // Direct: the volume goes at once, with its file.
    ok(api, "DELETE", &format!("/v1/volumes/{data_id}"), None);
    let (status, _, _) = http(api, "GET", &format!("/v1/volumes/{data_id}"), None, &[]);
    assert_eq!(status, 404);
    assert!(!Path::new(&file).exists());
    // The VM keeps the default Delay policy: destroyed, it can be recovered.
    let destroyed = ok(api, "DELETE", &format!("/v1/vm-instances/{vm_id}"), None);
    let (_, _, found) = http(api, "GET", &format!("/v1/vm-instances/{vm_id}"), None, &[]);
    assert_eq!(found["inventories"][0]["state"], "Destroyed", "{destroyed} {found}");
}

#[test]
fn on_shared_mount_point_storage_a_volume_follows_its_vm_between_hosts_without_a_copy() {
    let cluster = TestCluster::start(ClusterOpts::sim(0));
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.28.0.10", "10.28.0.50");
    let host_cluster = infra.host["clusterUuid"].as_str().unwrap();
    let (_, _, clusters) = http(api, "GET", &format!("/v1/clusters/{host_cluster}"), None, &[]);
    let smp = create(
        api,
        "/v1/primary-storage/smp",
        json!({ "name": "smp", "url": cluster.dir().join("smp").display().to_string(), "zoneUuid": clusters["inventories"][0]["zoneUuid"] }),
    );
    assert_eq!(smp["type"], "SharedMountPoint", "{smp}");
    ok(api, "POST", &format!("/v1/clusters/{host_cluster}/primary-storage/{}", uuid(&smp)), None);
    // A second host mounting the same directory (here: the same machine's).
    let (_agent_b, addr_b) = common::start_agent_with(
        &common::bootstrap(&cluster.data),
        &cluster.dir().join("agent-b"),
        &["--driver", "sim", "--network", "sim"],
    );
    let host_b = create(
        api,
        "/v1/hosts/kvm",
        json!({ "name": "hb", "managementIp": "127.0.0.1", "agentPort": addr_b.port(), "clusterUuid": host_cluster }),
    );
    let (host_a, host_b) = (infra.host["uuid"].clone(), host_b["uuid"].clone());
    let vm_on = |name: &str, host: &Value| vm_on_host(api, &infra, name, host);
    let vm = vm_on("vm", &host_a);
    let (data_id, file) = data_volume_made_on(api, &vm);
    assert!(file.starts_with(&cluster.dir().join("smp").display().to_string()), "{file}");
    write_at(&file, 0x5a, 0);

    // The stopped VM moves with its data volume, which stays where it is.
    let vm_actions = format!("/v1/vm-instances/{vm}/actions");
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));
    let body = json!({ "migrateVm": { "hostUuid": host_b } });
    let moved = ok(api, "PUT", &vm_actions, Some(&body.to_string()));
    assert_eq!(moved["hostUuid"], host_b, "{moved}");
    let followed = volume(api, &data_id);
    assert_eq!((&followed["hostUuid"], &followed["installPath"]), (&host_b, &json!(file)));
    assert!(holds(&file, 0x5a, 0));
    let started = ok(api, "PUT", &vm_actions, Some(r#"{"startVmInstance": {}}"#));
    assert_eq!(started["state"], "Running");
    assert_eq!(disks(&cluster, &vm), vec![], "host A's domain is gone");
    let on_b = Sim::disks_in(&cluster.dir().join("agent-b").join("sim-domains.json")).unwrap();
    let plugged: Vec<String> =
        on_b[&vm.parse::<Uuid>().unwrap()].iter().map(|d| d.volume.to_string()).collect();
    assert_eq!(plugged, std::slice::from_ref(&data_id), "host B's domain has the disk");

    // Detached, any host's VM takes it; nothing is there to move between hosts.
    act(api, &data_id, json!({ "detachDataVolumeFromVm": {} }));
    let other = vm_on("other", &host_a);
    let attached =
        act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": other } }));
    assert_eq!(attached["inventory"]["hostUuid"], host_a, "{attached}");
    assert_eq!(disks(&cluster, &other), vec![(data_id.clone(), 1)]);
    let (_, _, targets) =
        http(api, "GET", &format!("/v1/volumes/{data_id}/migration-target-hosts"), None, &[]);
    assert_eq!(targets["inventories"], json!([]), "{targets}");
}

/// Waits until host `id` is `status`; its record then.
fn host_becomes(api: std::net::SocketAddr, id: &Value, status: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, _, found) = http(api, "GET", &format!("/v1/hosts/{}", uuid(id)), None, &[]);
        let host = found["inventories"][0].clone();
        if host["status"] == status {
            return host;
        }
        assert!(std::time::Instant::now() < deadline, "host is not {status}: {host}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn nfs_storage_is_mounted_by_each_host_before_it_takes_vms() {
    let dir = tempfile::tempdir().unwrap();
    let mount_root = dir.path().join("nfs-mnt");
    let cluster = TestCluster::start(
        ClusterOpts::sim(0).env("STRATO_NFS_MOUNT_ROOT", mount_root.to_str().unwrap()),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.29.0.10", "10.29.0.50");
    let (_, _, clusters) = http(
        api,
        "GET",
        &format!("/v1/clusters/{}", infra.host["clusterUuid"].as_str().unwrap()),
        None,
        &[],
    );
    let zone = clusters["inventories"][0]["zoneUuid"].clone();
    // Two hosts in a cluster of their own, each in its own mount namespace: what one mounts
    // the other (and this test) does not see.
    let c2 = create(api, "/v1/clusters", json!({ "name": "c2", "zoneUuid": zone }));
    let mut hosts = Vec::new();
    let mut agents = Vec::new();
    for name in ["hb", "hc"] {
        let (agent, addr) = common::start_agent_in_own_mount_namespace(
            &common::bootstrap(&cluster.data),
            &cluster.dir().join(format!("agent-{name}")),
            &["--driver", "sim", "--network", "sim", "--nfs-mounter", "bind"],
            &[],
        );
        agents.push(agent);
        hosts.push(create(
            api,
            "/v1/hosts/kvm",
            json!({ "name": name, "managementIp": "127.0.0.1", "agentPort": addr.port(), "clusterUuid": c2["uuid"] }),
        ));
    }
    let export = dir.path().join("export");
    std::fs::create_dir_all(&export).unwrap();

    let body = json!({ "params": { "name": "nfs", "url": "/no/server", "zoneUuid": zone } });
    let (status, _, bad) =
        http(api, "POST", "/v1/primary-storage/nfs", Some(&body.to_string()), &[]);
    assert_eq!((status, &bad["error"]["details"]["field"]), (400, &json!("url")), "{bad}");
    let nfs = create(
        api,
        "/v1/primary-storage/nfs",
        json!({ "name": "nfs", "url": format!("127.0.0.1:{}", export.display()), "zoneUuid": zone }),
    );
    assert_eq!(nfs["type"], "NFS", "{nfs}");
    let mount_point = nfs["mountPath"].as_str().unwrap().to_owned();
    assert!(mount_point.starts_with(mount_root.to_str().unwrap()), "{nfs}");
    ok(api, "POST", &format!("/v1/clusters/{}/primary-storage/{}", uuid(&c2), uuid(&nfs)), None);
    // Each host connects again and mounts it before it is Connected.
    for host in &hosts {
        std::thread::sleep(std::time::Duration::from_millis(200));
        host_becomes(api, host, "Connected");
    }

    // A volume made through host B's mount lands in the export; this namespace, which
    // mounted nothing, sees an empty mount point.
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]], "hostUuid": hosts[0]["uuid"] } });
    let vm = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let (data_id, file) = data_volume_made_on(api, &vm);
    assert!(file.starts_with(&mount_point), "{file}");
    let in_export = export.join(Path::new(&file).strip_prefix(&mount_point).unwrap());
    assert!(in_export.exists(), "{} is in the export", in_export.display());
    assert!(!Path::new(&file).exists(), "nothing is mounted here");
    write_at(in_export.to_str().unwrap(), 0x5a, 0);

    // Shared: the stopped VM moves to host C with its volume, which C reads through its own
    // mount (a snapshot there rewrites the chain in the export).
    let vm_actions = format!("/v1/vm-instances/{vm}/actions");
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));
    let body = json!({ "migrateVm": { "hostUuid": hosts[1]["uuid"] } });
    assert_eq!(ok(api, "PUT", &vm_actions, Some(&body.to_string()))["hostUuid"], hosts[1]["uuid"]);
    let snapshot = ok(
        api,
        "POST",
        &format!("/v1/volumes/{data_id}/volume-snapshots"),
        Some(&json!({ "params": { "name": "s" } }).to_string()),
    );
    assert_eq!(snapshot["hostUuid"], hosts[1]["uuid"], "{snapshot}");
    let top = volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    assert!(holds_on_host(Path::new(&mount_point), &export, &top, 0x5a, 0), "read as a host does");

    // Storage a host cannot mount keeps it from being Connected, saying why.
    let broken = create(
        api,
        "/v1/primary-storage/nfs",
        json!({ "name": "broken", "url": format!("127.0.0.1:{}/missing", dir.path().display()), "zoneUuid": zone }),
    );
    ok(api, "POST", &format!("/v1/clusters/{}/primary-storage/{}", uuid(&c2), uuid(&broken)), None);
    let refused = host_becomes(api, &hosts[0], "Disconnected");
    assert!(refused["lastError"].as_str().unwrap_or_default().contains("mount"), "{refused}");
}

#[test]
fn hosts_that_see_one_local_storage_directory_move_a_volume_without_copying_or_deleting() {
    let cluster = TestCluster::start(ClusterOpts::sim(0));
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.30.0.10", "10.30.0.50");
    local_storage(&cluster, &infra);
    // A second host in the root mount namespace: the same `ps` directory as the first.
    let (_agent_b, addr_b) = common::start_agent_with(
        &common::bootstrap(&cluster.data),
        &cluster.dir().join("agent-b"),
        &["--driver", "sim", "--network", "sim"],
    );
    let host_b = create(
        api,
        "/v1/hosts/kvm",
        json!({ "name": "hb", "managementIp": "127.0.0.1", "agentPort": addr_b.port(), "clusterUuid": infra.host["clusterUuid"] }),
    );
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]], "hostUuid": infra.host["uuid"] } });
    let vm = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let data = create(api, "/v1/volumes/data", json!({ "name": "data", "diskSize": 16u64 << 20 }));
    let data_id = uuid(&data).to_owned();
    act(api, &data_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    act(api, &data_id, json!({ "detachDataVolumeFromVm": {} }));
    let file = volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    write_at(&file, 0x5a, 0);
    let sha = digest(Path::new(&file));

    let migrate = json!({ "localStorageMigrateVolume": { "destHostUuid": host_b["uuid"] } });
    let moved = act(api, &data_id, migrate);
    assert_eq!(moved["inventory"]["hostUuid"], host_b["uuid"], "{moved}");
    assert_eq!(digest(Path::new(&file)), sha, "the one file stays as it was");
    let names: Vec<String> = std::fs::read_dir(Path::new(&file).parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".part-copy")), "nothing was copied: {names:?}");
}

#[test]
fn local_storage_capacity_is_measured_booked_and_refuses_what_does_not_fit() {
    let images = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        ClusterOpts::sim(0).env("STRATO_IMAGE_FILE_DIRS", images.path().to_str().unwrap()),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.31.0.10", "10.31.0.50");
    let ps = local_storage(&cluster, &infra);
    let capacity_path = format!("/v1/primary-storage/{}/capacity", uuid(&ps));
    let capacity = || {
        let (status, _, found) = http(api, "GET", &capacity_path, None, &[]);
        assert_eq!(status, 200, "{found}");
        found
    };
    // Measured on the host once the storage is attached to its cluster.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let measured = loop {
        let found = capacity();
        if found["hosts"].as_array().is_some_and(|h| !h.is_empty()) {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "never measured: {found}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let total = measured["totalCapacity"].as_u64().unwrap();
    assert!(total > 0 && measured["availableCapacity"] == total, "{measured}");
    assert!(measured["availablePhysicalCapacity"].as_u64().unwrap() <= total);
    let tenant = cluster.account("tenant", Value::Null);
    let (status, refused) = cluster.as_(&tenant, "GET", &capacity_path, None);
    assert!(status == 403 || status == 404, "{status} {refused}");

    // A data volume books its virtual size when it is made on the host.
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let small =
        create(api, "/v1/volumes/data", json!({ "name": "small", "diskSize": 64u64 << 20 }));
    act(api, uuid(&small), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    assert_eq!(capacity()["availableCapacity"], total - (64 << 20));

    // One that does not fit is refused, and nothing is made or booked.
    let mib = 1u64 << 20;
    let huge_size = (total - (64 << 20)).div_ceil(mib) * mib + mib;
    let huge = create(api, "/v1/volumes/data", json!({ "name": "huge", "diskSize": huge_size }));
    let refused =
        act(api, uuid(&huge), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    assert_eq!(refused["error"]["code"], "VOLUME.NO_ROOM", "{refused}");
    let huge_now = volume(api, uuid(&huge));
    assert_eq!(
        (&huge_now["status"], &huge_now["hostUuid"]),
        (&json!("NotInstantiated"), &Value::Null)
    );
    assert_eq!(capacity()["availableCapacity"], total - (64 << 20));
    // Nor does growing past it.
    let grow = json!({ "resizeDataVolume": { "size": total.div_ceil(mib) * mib + mib } });
    let refused = act(api, uuid(&small), grow);
    assert_eq!(refused["error"]["code"], "VOLUME.NO_ROOM", "{refused}");
    assert_eq!(volume(api, uuid(&small))["size"], 64u64 << 20);

    // With the host nearly full, a VM whose image does not fit is placed nowhere.
    let filler_size = (total - (64 << 20)) / mib * mib;
    let filler =
        create(api, "/v1/volumes/data", json!({ "name": "filler", "diskSize": filler_size }));
    act(api, uuid(&filler), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    let source = images.path().join("disk.raw");
    std::fs::write(&source, vec![0u8; 2 << 20]).unwrap();
    let (_, image) = image_in_backup_storage(
        &cluster,
        ps["zoneUuid"].as_str().unwrap(),
        source.to_str().unwrap(),
        "raw",
    );
    let body = json!({ "params": { "name": "big", "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let placed = call(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(placed["error"]["code"], "HOST_ALLOCATION.NO_HOST", "{placed}");
    assert!(placed.to_string().contains("free local storage"), "{placed}");

    // Expunged, a volume gives its booking back; then the VM fits.
    ok(api, "DELETE", &format!("/v1/volumes/{}", uuid(&filler)), None);
    act(api, uuid(&filler), json!({ "expungeDataVolume": {} }));
    assert_eq!(capacity()["availableCapacity"], total - (64 << 20));
    let placed = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(placed["state"], "Running");
    assert_eq!(capacity()["availableCapacity"], total - (64 << 20) - (2 << 20));
}

/// Backup storage `id` as the admin reads it, once its status is `status`.
fn backup_storage_becomes(api: std::net::SocketAddr, id: &str, status: &str) -> Value {
    let path = format!("/v1/backup-storage/{id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, _, found) = http(api, "GET", &path, None, &[]);
        let found = found["inventories"][0].clone();
        if found["status"] == status {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "never {status}: {found}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Whether any file under `dir` holds `secret`.
fn any_file_holds(dir: &Path, secret: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            return any_file_holds(&path, secret);
        }
        let bytes = std::fs::read(&path).unwrap_or_default();
        bytes.windows(secret.len()).any(|w| w == secret)
    })
}

#[test]
fn an_image_store_on_its_own_host_serves_images_and_takes_templates_over_its_agent_link() {
    let images = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        ClusterOpts::sim(0).env("STRATO_IMAGE_FILE_DIRS", images.path().to_str().unwrap()),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.26.0.10", "10.26.0.50");
    let ps = local_storage(&cluster, &infra);
    let zone = ps["zoneUuid"].as_str().unwrap();
    // The store's directory is its host's own disk: neither the MN nor the KVM host sees
    // what is in it, so whatever reaches them went over the links.
    let (at, own) = (cluster.dir().join("image-store"), cluster.dir().join("image-store-disk"));
    let (bootstrap, agent_dir) = (common::bootstrap(&cluster.data), cluster.dir().join("agent-bs"));
    let start_store = |addr: Option<std::net::SocketAddr>| {
        let (args, binds) = (["--driver", "none"], [(own.as_path(), at.as_path())]);
        match addr {
            Some(addr) => common::start_agent_in_own_mount_namespace_at(
                addr, &bootstrap, &agent_dir, &args, &binds,
            ),
            None => {
                common::start_agent_in_own_mount_namespace(&bootstrap, &agent_dir, &args, &binds)
            }
        }
    };
    // Copies an MN cut left in the store: the one untouched for hours goes at the connect.
    std::fs::create_dir_all(&own).unwrap();
    let (stale, fresh) = (own.join("old.qcow2.part-copy-1"), own.join("new.qcow2.part-copy-2"));
    std::fs::write(&stale, b"cut").unwrap();
    std::fs::write(&fresh, b"under way").unwrap();
    let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(hours_ago).unwrap();
    let (store_agent, addr) = start_store(None);
    let password = "ssh-password-never-kept";
    let params = |hostname: &str| json!({ "params": { "name": "store", "url": at.display().to_string(), "hostname": hostname, "agentPort": addr.port(), "username": "root", "password": password, "sshPort": 22 } });
    let (status, _, refused) = http(
        api,
        "POST",
        "/v1/backup-storage/image-store",
        Some(&params("a host").to_string()),
        &[],
    );
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "hostname", "{refused}");
    let bs =
        ok(api, "POST", "/v1/backup-storage/image-store", Some(&params("127.0.0.1").to_string()));
    let bs_id = uuid(&bs).to_owned();
    assert_eq!((&bs["status"], &bs["hostname"]), (&json!("Connected"), &json!("127.0.0.1")));
    assert!(bs["totalCapacity"].as_u64().unwrap() > 0, "its directory was measured: {bs}");
    assert!(bs.get("password").is_none(), "{bs}");
    assert!(!stale.exists() && fresh.exists(), "only the stale copy was swept");
    std::fs::remove_file(&fresh).unwrap();
    ok(api, "POST", &format!("/v1/zones/{zone}/backup-storage/{bs_id}"), None);

    // An image imported from a URL is fetched by the MN and lands on the store's host only.
    let source = qcow2_image(images.path(), 0x11);
    let image = create(
        api,
        "/v1/images",
        json!({ "name": "image", "url": format!("file://{source}"), "format": "qcow2", "backupStorageUuids": [bs_id] }),
    );
    let file = image["backupStorageRefs"][0][1].as_str().unwrap().to_owned();
    let on_store = |file: &str| own.join(Path::new(file).strip_prefix(&at).unwrap());
    assert_eq!(digest(&on_store(&file)), digest(Path::new(&source)), "arrived as it was fetched");
    assert!(!Path::new(&file).exists(), "nothing of it where the MN and the KVM host look");
    let staging = cluster.data.join("image-staging");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "the MN's staged copy is gone");

    // A VM boots from it: the image reaches the KVM host's cache over the links.
    let body = |image: &Value| {
        json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } }).to_string()
    };
    let vm = ok(api, "POST", "/v1/vm-instances", Some(&body(&image)));
    assert_eq!(vm["state"], "Running", "{vm}");
    let root = vm["rootVolumePath"].as_str().unwrap().to_owned();
    let cache = backing(&root).expect("a root volume is backed by its cached image");
    assert!(holds(&root, 0x11, 0), "the image's bytes, through the cache");
    let cache_dir = Path::new(&cache).parent().unwrap();
    let landings: Vec<_> = std::fs::read_dir(cache_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".download"))
        .collect();
    assert!(landings.is_empty(), "no landing file stays: {landings:?}");

    // A template of its root volume, stopped, goes to the store and boots a VM.
    let vm_id = uuid(&vm).to_owned();
    ok(api, "PUT", &format!("/v1/vm-instances/{vm_id}/actions"), Some(r#"{"stopVmInstance": {}}"#));
    write_at(&root, 0x5a, 1024);
    let template = ok(
        api,
        "POST",
        &format!("/v1/images/root-volume-templates/from/root-volumes/{vm_id}"),
        Some(&json!({ "params": { "name": "t", "backupStorageUuids": [bs_id] } }).to_string()),
    );
    let template_file = template["backupStorageRefs"][0][1].as_str().unwrap().to_owned();
    let stored = on_store(&template_file);
    assert_eq!(backing(stored.to_str().unwrap()), None, "a template stands alone");
    assert!(
        holds(stored.to_str().unwrap(), 0x11, 0) && holds(stored.to_str().unwrap(), 0x5a, 1024)
    );
    assert_eq!(template["checksum"], format!("sha256:{}", digest(&stored)), "{template}");
    let from_template = ok(api, "POST", "/v1/vm-instances", Some(&body(&template)));
    assert_eq!(from_template["state"], "Running", "{from_template}");
    assert!(holds(from_template["rootVolumePath"].as_str().unwrap(), 0x5a, 1024));

    // A data volume's template goes there too, and a volume made from it (its size read
    // from the header by the store's agent) gets its bytes on its first attachment.
    let data_vm = uuid(&from_template).to_owned();
    let (data_id, data_file) = data_volume_made_on(api, &data_vm);
    ok(
        api,
        "PUT",
        &format!("/v1/vm-instances/{data_vm}/actions"),
        Some(r#"{"stopVmInstance": {}}"#),
    );
    write_at(&data_file, 0x77, 2048);
    let data_template = ok(
        api,
        "POST",
        &format!("/v1/images/data-volume-templates/from/volumes/{data_id}"),
        Some(&json!({ "params": { "name": "dt", "backupStorageUuids": [bs_id] } }).to_string()),
    );
    let stored = on_store(data_template["backupStorageRefs"][0][1].as_str().unwrap());
    assert!(holds(stored.to_str().unwrap(), 0x77, 2048), "the data volume's bytes, in the store");
    let copy = ok(
        api,
        "POST",
        &format!(
            "/v1/volumes/data/from/data-volume-templates/{}",
            data_template["uuid"].as_str().unwrap()
        ),
        Some(&json!({ "params": { "name": "copy" } }).to_string()),
    );
    assert_eq!(copy["size"], 16u64 << 20, "{copy}");
    let copy_id = uuid(&copy).to_owned();
    act(api, &copy_id, json!({ "attachDataVolumeToVm": { "vmInstanceUuid": data_vm } }));
    let copied = volume(api, &copy_id)["installPath"].as_str().unwrap().to_owned();
    assert!(holds(&copied, 0x77, 2048), "the template's bytes, in the new volume");

    // The password was never kept: not in the store, the jobs or the log.
    assert!(!any_file_holds(&cluster.data, password.as_bytes()), "the password is on disk");
    let log = std::fs::read(common::log_path(&cluster.data)).unwrap();
    assert!(!log.windows(password.len()).any(|w| w == password.as_bytes()), "logged");

    // A tenant sees none of it.
    let tenant = cluster.account("tenant", Value::Null);
    let (status, hidden) =
        cluster.as_(&tenant, "GET", &format!("/v1/backup-storage/{bs_id}"), None);
    assert!(status == 403 || status == 404, "{status} {hidden}");
    let (status, _) = cluster.as_(
        &tenant,
        "PUT",
        &format!("/v1/backup-storage/{bs_id}/actions"),
        Some(json!({ "reconnectBackupStorage": {} })),
    );
    assert!(status == 403 || status == 404, "{status}");

    // Its agent gone, the store is Disconnected and an import says the host is away,
    // leaving nothing behind; back, it is Connected again (at once when asked).
    drop(store_agent);
    let away = backup_storage_becomes(api, &bs_id, "Disconnected");
    assert!(away["lastError"].as_str().is_some(), "{away}");
    let failed = call(
        api,
        "POST",
        "/v1/images",
        Some(&json!({ "params": { "name": "late", "url": format!("file://{source}"), "format": "qcow2", "backupStorageUuids": [bs_id] } }).to_string()),
    );
    assert_eq!(failed["error"]["code"], "HOST.UNAVAILABLE", "{failed}");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "nothing staged stays");
    let (_store_agent, _) = start_store(Some(addr));
    let reconnected = ok(
        api,
        "PUT",
        &format!("/v1/backup-storage/{bs_id}/actions"),
        Some(r#"{"reconnectBackupStorage": {}}"#),
    );
    assert_eq!(reconnected["status"], "Connected", "{reconnected}");
}

#[test]
fn shared_storage_capacity_is_booked_on_the_storage_and_refuses_what_does_not_fit() {
    let images = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        ClusterOpts::sim(0)
            .env("STRATO_IMAGE_FILE_DIRS", images.path().to_str().unwrap())
            .server_args(&["--vm-deletion-policy", "direct"]),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.32.0.10", "10.32.0.50");
    let host_cluster = infra.host["clusterUuid"].as_str().unwrap();
    let (_, _, clusters) = http(api, "GET", &format!("/v1/clusters/{host_cluster}"), None, &[]);
    let zone = clusters["inventories"][0]["zoneUuid"].as_str().unwrap().to_owned();
    let smp = create(
        api,
        "/v1/primary-storage/smp",
        json!({ "name": "smp", "url": cluster.dir().join("smp").display().to_string(), "zoneUuid": zone }),
    );
    ok(api, "POST", &format!("/v1/clusters/{host_cluster}/primary-storage/{}", uuid(&smp)), None);
    let capacity_path = format!("/v1/primary-storage/{}/capacity", uuid(&smp));
    let capacity = || {
        let (status, _, found) = http(api, "GET", &capacity_path, None, &[]);
        assert_eq!(status, 200, "{found}");
        found["availableCapacity"].as_u64().unwrap()
    };
    let (_, _, measured) = http(api, "GET", &capacity_path, None, &[]);
    let total = measured["totalCapacity"].as_u64().unwrap();
    assert!(total > 0 && capacity() == total, "nothing booked yet: {measured}");
    let tenant = cluster.account("tenant", Value::Null);
    let (status, refused) = cluster.as_(&tenant, "GET", &capacity_path, None);
    assert!(status == 403 || status == 404, "{status} {refused}");

    // A data volume books its size on the storage when it is made, whichever host makes it.
    let mib = 1u64 << 20;
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let small = create(api, "/v1/volumes/data", json!({ "name": "small", "diskSize": 64 * mib }));
    act(api, uuid(&small), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    assert_eq!(capacity(), total - 64 * mib);

    // One that does not fit is refused naming the storage, and nothing is made or booked.
    let huge_size = (total - 64 * mib).div_ceil(mib) * mib + mib;
    let huge = create(api, "/v1/volumes/data", json!({ "name": "huge", "diskSize": huge_size }));
    let refused =
        act(api, uuid(&huge), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    assert_eq!(refused["error"]["code"], "VOLUME.NO_ROOM", "{refused}");
    assert_eq!(refused["error"]["details"]["primaryStorageUuid"], smp["uuid"], "{refused}");
    assert_eq!(volume(api, uuid(&huge))["status"], "NotInstantiated");
    assert_eq!(capacity(), total - 64 * mib);
    // Nor does growing past it; growing within it books the new size.
    let refused = act(
        api,
        uuid(&small),
        json!({ "resizeDataVolume": { "size": total.div_ceil(mib) * mib + mib } }),
    );
    assert_eq!(refused["error"]["code"], "VOLUME.NO_ROOM", "{refused}");
    act(api, uuid(&small), json!({ "resizeDataVolume": { "size": 96 * mib } }));
    assert_eq!(capacity(), total - 96 * mib);

    // Nearly full, a VM whose image does not fit is placed on no host of the cluster.
    let filler_size = (total - 97 * mib) / mib * mib;
    let filler =
        create(api, "/v1/volumes/data", json!({ "name": "filler", "diskSize": filler_size }));
    act(api, uuid(&filler), json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } }));
    let source = images.path().join("disk.raw");
    std::fs::write(&source, vec![0u8; 2 << 20]).unwrap();
    let (_, image) = image_in_backup_storage(&cluster, &zone, source.to_str().unwrap(), "raw");
    let body = json!({ "params": { "name": "big", "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let placed = call(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(placed["error"]["code"], "HOST_ALLOCATION.NO_HOST", "{placed}");
    assert!(placed.to_string().contains("free shared storage"), "{placed}");

    // Expunged, a volume gives its booking back; then the VM fits, and its root volume
    // books its image's size until the VM is expunged.
    ok(api, "DELETE", &format!("/v1/volumes/{}", uuid(&filler)), None);
    act(api, uuid(&filler), json!({ "expungeDataVolume": {} }));
    assert_eq!(capacity(), total - 96 * mib);
    let placed = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(placed["state"], "Running");
    assert_eq!(capacity(), total - 96 * mib - 2 * mib);
    ok(api, "DELETE", &format!("/v1/vm-instances/{}", uuid(&placed)), None);
    assert_eq!(capacity(), total - 96 * mib);
}

#[test]
fn a_root_volume_is_snapshotted_live_reverted_merged_and_expunged_with_its_vm() {
    let images = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        ClusterOpts::sim(0)
            .env("STRATO_IMAGE_FILE_DIRS", images.path().to_str().unwrap())
            .server_args(&["--vm-deletion-policy", "direct"]),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.33.0.10", "10.33.0.50");
    let ps = local_storage(&cluster, &infra);
    let source = qcow2_image(images.path(), 0x11);
    let (_, image) =
        image_in_backup_storage(&cluster, ps["zoneUuid"].as_str().unwrap(), &source, "qcow2");
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "imageUuid": image["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm = ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let vm_id = uuid(&vm).to_owned();
    let vm_actions = format!("/v1/vm-instances/{vm_id}/actions");
    let (_, _, roots) =
        http(api, "GET", &format!("/v1/volumes?q=vmInstanceUuid={vm_id}&q=type=Root"), None, &[]);
    let root_id = uuid(&roots["inventories"][0]).to_owned();
    let state = cluster.agent_dir().join("sim-domains.json");
    let domain_root =
        || Sim::root_volumes_in(&state).unwrap()[&vm_id.parse::<Uuid>().unwrap()].clone().unwrap();
    let vm_root = || {
        let (_, _, found) = http(api, "GET", &format!("/v1/vm-instances/{vm_id}"), None, &[]);
        found["inventories"][0]["rootVolumePath"].as_str().unwrap().to_owned()
    };
    let snapshot = |name: &str| {
        ok(
            api,
            "POST",
            &format!("/v1/volumes/{root_id}/volume-snapshots"),
            Some(&json!({ "params": { "name": name } }).to_string()),
        )
    };
    let first_file = vm_root();
    write_at(&first_file, 0x22, 1024);

    // Live: the running domain moves to a new top, which the VM's record names too.
    let first = snapshot("first");
    assert_eq!(first["volumeType"], "Root", "{first}");
    assert_eq!(first["primaryStorageInstallPath"], json!(first_file));
    let top = vm_root();
    assert_ne!(top, first_file);
    assert_eq!(volume(api, &root_id)["installPath"], json!(top));
    assert_eq!(domain_root(), top, "the domain writes to the new top");
    assert_eq!(backing(&top), Some(first_file.clone()));
    write_at(&top, 0x33, 1024);

    // Reverted (stopped): a new top on the snapshot; the VM starts on it.
    ok(api, "PUT", &vm_actions, Some(r#"{"stopVmInstance": {}}"#));
    let actions = format!("/v1/volume-snapshots/{}/actions", uuid(&first));
    ok(api, "PUT", &actions, Some(r#"{"revertVolumeFromSnapshot": {}}"#));
    let reverted = vm_root();
    assert!(reverted != top && !Path::new(&top).exists(), "the old top is gone");
    assert!(holds(&reverted, 0x22, 1024) && holds(&reverted, 0x11, 0));
    let started = ok(api, "PUT", &vm_actions, Some(r#"{"startVmInstance": {}}"#));
    assert_eq!(started["state"], "Running");
    assert_eq!(domain_root(), reverted, "defined on the reverted top");

    // Deleting the oldest snapshot merges every layer into the top, image included: the
    // top then stands alone and keeps every byte.
    write_at(&reverted, 0x44, 2048);
    let second = snapshot("second");
    let now = vm_root();
    write_at(&now, 0x55, 3072);
    ok(api, "DELETE", &format!("/v1/volume-snapshots/{}", uuid(&first)), None);
    let (_, _, left) =
        http(api, "GET", &format!("/v1/volume-snapshots?q=volumeUuid={root_id}"), None, &[]);
    assert_eq!(left["inventories"], json!([]), "its descendant went with it: {left}");
    assert_eq!(vm_root(), now, "merged in place");
    assert_eq!(backing(&now), None, "the top stands alone");
    for (byte, offset) in [(0x11, 0), (0x22, 1024), (0x44, 2048), (0x55, 3072)] {
        assert!(holds(&now, byte, offset), "{byte:#x} at {offset}k");
    }
    assert!(!Path::new(&first_file).exists());
    assert!(!Path::new(second["primaryStorageInstallPath"].as_str().unwrap()).exists());

    // A tenant does not reach another's root volume.
    let tenant = cluster.account("tenant", Value::Null);
    let (status, _) = cluster.as_(
        &tenant,
        "POST",
        &format!("/v1/volumes/{root_id}/volume-snapshots"),
        Some(json!({ "params": { "name": "theirs" } })),
    );
    assert!(status == 403 || status == 404, "{status}");

    // Expunged with its VM: the snapshots' records and files go too.
    let last = snapshot("last");
    let last_file = last["primaryStorageInstallPath"].as_str().unwrap().to_owned();
    let last_top = vm_root();
    ok(api, "DELETE", &format!("/v1/vm-instances/{vm_id}"), None);
    let (_, _, found) =
        http(api, "GET", &format!("/v1/volume-snapshots?q=uuid={}", uuid(&last)), None, &[]);
    assert_eq!(found["inventories"], json!([]), "{found}");
    assert!(!Path::new(&last_file).exists() && !Path::new(&last_top).exists());
}

#[test]
fn a_snapshot_deletion_that_dies_after_its_merge_stays_deleting_until_it_is_finished() {
    let cluster = TestCluster::start(
        ClusterOpts::sim(0).env("STRATO_FAILPOINTS", "snapshot-delete-after-merge=1*panic"),
    );
    let api = cluster.api;
    let infra = vm_infrastructure(api, cluster.agent, "10.34.0.10", "10.34.0.50");
    local_storage(&cluster, &infra);
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": infra.offering["uuid"], "l3NetworkUuids": [infra.l3["uuid"]] } });
    let vm_id = uuid(&ok(api, "POST", "/v1/vm-instances", Some(&body.to_string()))).to_owned();
    let (data_id, first) = data_volume_made_on(api, &vm_id);
    ok(api, "PUT", &format!("/v1/vm-instances/{vm_id}/actions"), Some(r#"{"stopVmInstance": {}}"#));
    write_at(&first, 0x5a, 0);
    let snapshots = format!("/v1/volumes/{data_id}/volume-snapshots");
    let take = |name: &str| {
        ok(api, "POST", &snapshots, Some(&json!({ "params": { "name": name } }).to_string()))
    };
    let doomed = take("doomed");
    let top = volume(api, &data_id)["installPath"].as_str().unwrap().to_owned();
    write_at(&top, 0xa5, 1024);
    let snapshot = |id: &str| {
        let (_, _, found) =
            http(api, "GET", &format!("/v1/volume-snapshots?q=uuid={id}"), None, &[]);
        found["inventories"].get(0).cloned()
    };

    // Stopped after the merge: the top stands alone, the snapshot is Deleting, its file
    // is still there, and nothing but its deletion is allowed on it.
    let failed = call(api, "DELETE", &format!("/v1/volume-snapshots/{}", uuid(&doomed)), None);
    assert_eq!(failed["error"]["code"], "SYS.OPERATION_PANICKED", "{failed}");
    let left = snapshot(uuid(&doomed)).expect("its record stays");
    assert_eq!(left["status"], "Deleting", "{left}");
    assert_eq!(backing(&top), None, "merged");
    assert!(Path::new(&first).exists());
    let copy = format!("/v1/volumes/data/from/volume-snapshots/{}", uuid(&doomed));
    let refused = call(api, "POST", &copy, Some(&json!({ "params": { "name": "c" } }).to_string()));
    assert_eq!(refused["error"]["code"], "VOLUME.IN_USE", "{refused}");
    assert!(refused.to_string().contains("being deleted"), "{refused}");

    // The volume's next operation finishes it first: the record and the file go.
    let next = take("next");
    assert_eq!(snapshot(uuid(&doomed)), None);
    assert!(!Path::new(&first).exists());
    assert_eq!(next["parentUuid"], Value::Null, "a new tree: {next}");
    assert!(holds(&top, 0x5a, 0) && holds(&top, 0xa5, 1024), "every byte kept");
}
