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
