//! The HTTP API end to end, with real processes: `strato server` and `strato-agent` on the
//! sim driver. The VM lifecycle is checked in the API and on the agent's hypervisor (the sim
//! driver's state, read as an operator reads `virsh list` on the host: the agent admits one
//! MN session at a time, the server's, so a test cannot dial it too); bad input, unknown
//! UUIDs, refused states and job idempotency answer as documented.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use strato_agent::driver::sim::Sim;
use strato_proto::DomainState;
use uuid::Uuid;

/// The sim agent's driver arguments.
const SIM: [&str; 2] = ["--driver", "sim"];

fn env() -> TestCluster {
    env_with_driver(&SIM)
}

/// An [`env`] whose agent runs with `driver_args`.
fn env_with_driver(driver_args: &[&str]) -> TestCluster {
    TestCluster::start(ClusterOpts::default().driver(driver_args))
}

fn create(env: &TestCluster, path: &str, params: Value) -> Value {
    ok(
        env.api,
        "POST",
        path,
        Some(&json!({ "params": params, "systemTags": [], "userTags": [] }).to_string()),
    )
}

/// Zone, cluster, host, offering, L3 with a range: what a VM needs.
fn infrastructure(env: &TestCluster) -> (Value, Value, Value) {
    let zone = create(env, "/v1/zones", json!({ "name": "z1" }));
    let cluster = create(env, "/v1/clusters", json!({ "name": "c1", "zoneUuid": zone["uuid"] }));
    let host = create(
        env,
        "/v1/hosts/kvm",
        json!({ "name": "h1", "managementIp": "127.0.0.1", "agentPort": env.agent.port(), "clusterUuid": cluster["uuid"] }),
    );
    assert_eq!(host["status"], "Connected");
    let offering = create(
        env,
        "/v1/instance-offerings",
        json!({ "name": "small", "cpuNum": 1, "memorySize": 268435456u64 }),
    );
    let l2 = create(
        env,
        "/v1/l2-networks/no-vlan",
        json!({ "name": "l2", "zoneUuid": zone["uuid"], "physicalInterface": "eth0" }),
    );
    ok(
        env.api,
        "POST",
        &format!(
            "/v1/l2-networks/{}/clusters/{}",
            l2["uuid"].as_str().unwrap(),
            cluster["uuid"].as_str().unwrap()
        ),
        None,
    );
    let l3 = create(env, "/v1/l3-networks", json!({ "name": "pub", "l2NetworkUuid": l2["uuid"] }));
    let path = format!("/v1/l3-networks/{}/ip-ranges", l3["uuid"].as_str().unwrap());
    create(
        env,
        &path,
        json!({ "startIp": "10.0.0.10", "endIp": "10.0.0.20", "netmask": "255.255.255.0", "gateway": "10.0.0.1" }),
    );
    (host, offering, l3)
}

async fn domain_state(env: &TestCluster, vm: &str) -> Option<DomainState> {
    let state_file = env.dir().join("agent").join("sim-domains.json");
    let domains = Sim::domains_in(&state_file).unwrap();
    let vm: Uuid = vm.parse().unwrap();
    domains.into_iter().find(|d| d.uuid == vm).map(|d| d.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vm_lifecycle_through_the_api_and_on_the_hypervisor() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(vm["state"], "Running");
    assert_eq!(vm["hostUuid"], host["uuid"]);
    assert_eq!(vm["vmNics"][0]["ip"], "10.0.0.10");
    let uuid = vm["uuid"].as_str().unwrap().to_owned();
    assert_eq!(domain_state(&env, &uuid).await, Some(DomainState::Running));

    let action = |name: &str| {
        ok(
            env.api,
            "PUT",
            &format!("/v1/vm-instances/{uuid}/actions"),
            Some(&json!({ name: {} }).to_string()),
        )
    };
    assert_eq!(action("stopVmInstance")["state"], "Stopped");
    assert_eq!(domain_state(&env, &uuid).await, Some(DomainState::Shutoff));
    // While stopped: a bigger offering; a migration with no other host in the cluster.
    let bigger = create(
        &env,
        "/v1/instance-offerings",
        json!({ "name": "medium", "cpuNum": 2, "memorySize": 536870912u64 }),
    );
    let changed = ok(
        env.api,
        "PUT",
        &format!("/v1/vm-instances/{uuid}/actions"),
        Some(
            &json!({ "changeInstanceOffering": { "instanceOfferingUuid": bigger["uuid"] } })
                .to_string(),
        ),
    );
    assert_eq!(
        (changed["cpuNum"].as_u64(), changed["memorySize"].as_u64()),
        (Some(2), Some(536870912))
    );
    let failed = call(
        env.api,
        "PUT",
        &format!("/v1/vm-instances/{uuid}/actions"),
        Some(r#"{"migrateVm": {}}"#),
    );
    assert_eq!(failed["error"]["code"], "HOST_ALLOCATION.NO_HOST", "{failed}");
    assert_eq!(action("startVmInstance")["state"], "Running");
    assert_eq!(action("pauseVmInstance")["state"], "Paused");
    assert_eq!(domain_state(&env, &uuid).await, Some(DomainState::Paused));
    assert_eq!(action("resumeVmInstance")["state"], "Running");
    assert_eq!(action("rebootVmInstance")["state"], "Running");

    let (_, _, listed) = http(env.api, "GET", &format!("/v1/vm-instances/{uuid}"), None, &[]);
    assert_eq!(listed["inventories"][0]["state"], "Running");

    assert_eq!(
        ok(env.api, "DELETE", &format!("/v1/vm-instances/{uuid}"), None)["state"],
        "Destroyed"
    );
    assert_eq!(domain_state(&env, &uuid).await, None);
    let (_, _, listed) = http(env.api, "GET", "/v1/vm-instances", None, &[]);
    assert_eq!(listed["inventories"][0]["state"], "Destroyed", "Delay policy: still listed");
    assert_eq!(action("recoverVmInstance")["state"], "Stopped");
    assert_eq!(action("startVmInstance")["state"], "Running");
    assert_eq!(domain_state(&env, &uuid).await, Some(DomainState::Running));
    ok(env.api, "DELETE", &format!("/v1/vm-instances/{uuid}"), None);
    action("expungeVmInstance");
    let (status, _, _) = http(env.api, "GET", &format!("/v1/vm-instances/{uuid}"), None, &[]);
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_unknown_uuids_refused_states_and_job_ids() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (_, offering, l3) = infrastructure(&env);

    // Malformed JSON, a missing field, a wrong type: 400 naming the field; nothing created.
    let (status, _, body) = http(env.api, "POST", "/v1/zones", Some("{not json"), &[]);
    assert_eq!((status, body["error"]["details"]["field"].as_str()), (400, Some("body")));
    let (status, _, body) = http(env.api, "POST", "/v1/zones", Some(r#"{"params": {}}"#), &[]);
    assert_eq!((status, body["error"]["details"]["field"].as_str()), (400, Some("name")), "{body}");
    let (status, _, body) = http(
        env.api,
        "POST",
        "/v1/instance-offerings",
        Some(r#"{"params": {"name": "x", "cpuNum": "two", "memorySize": 1}}"#),
        &[],
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "SYS.INVALID_ARGUMENT");
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    assert_eq!(zones["inventories"].as_array().unwrap().len(), 1, "nothing was created");

    // Unknown UUIDs: 404.
    let missing = Uuid::new_v4();
    let (status, _, body) = http(env.api, "GET", &format!("/v1/vm-instances/{missing}"), None, &[]);
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("SYS.RESOURCE_NOT_FOUND")));
    let bad_vm = json!({ "params": { "name": "v", "instanceOfferingUuid": missing, "l3NetworkUuids": [l3["uuid"]] } });
    let (status, _, _) = http(env.api, "POST", "/v1/vm-instances", Some(&bad_vm.to_string()), &[]);
    assert_eq!(status, 404);

    // A wrong state: 409 naming the state.
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let path = format!("/v1/vm-instances/{}/actions", vm["uuid"].as_str().unwrap());
    let (status, _, reply) = http(env.api, "PUT", &path, Some(r#"{"resumeVmInstance": {}}"#), &[]);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (409, Some("VM.INVALID_STATE")),
        "{reply}"
    );
    assert!(reply["error"]["description"].as_str().unwrap().contains("Running"));
    let (status, _, _) = http(env.api, "PUT", &path, Some(r#"{"flyToTheMoon": {}}"#), &[]);
    assert_eq!(status, 400);

    // X-Job-UUID: the same id and body is the same job; another body is a 409.
    let job = Uuid::new_v4().to_string();
    let zone = r#"{"params": {"name": "z-idem"}}"#;
    let (s1, _, first) = http(env.api, "POST", "/v1/zones", Some(zone), &[("X-Job-UUID", &job)]);
    let (s2, _, second) = http(env.api, "POST", "/v1/zones", Some(zone), &[("X-Job-UUID", &job)]);
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first["location"], second["location"]);
    wait_job(env.api, first["location"].as_str().unwrap());
    let (status, _, _) = http(
        env.api,
        "POST",
        "/v1/zones",
        Some(r#"{"params": {"name": "other"}}"#),
        &[("X-Job-UUID", &job)],
    );
    assert_eq!(status, 409);
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    let named: Vec<&str> = zones["inventories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|z| z["name"].as_str())
        .collect();
    assert_eq!(
        named.iter().filter(|n| **n == "z-idem").count(),
        1,
        "the repeat did not create twice"
    );

    // An L2 network attached to no cluster: no host has it, and the trace says so.
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    let zone = zones["inventories"][0]["uuid"].clone();
    let lonely = create(
        &env,
        "/v1/l2-networks/no-vlan",
        json!({ "name": "lonely", "zoneUuid": zone, "physicalInterface": "eth1" }),
    );
    let l3b =
        create(&env, "/v1/l3-networks", json!({ "name": "b", "l2NetworkUuid": lonely["uuid"] }));
    create(
        &env,
        &format!("/v1/l3-networks/{}/ip-ranges", l3b["uuid"].as_str().unwrap()),
        json!({ "startIp": "10.9.0.10", "endIp": "10.9.0.20", "netmask": "255.255.255.0", "gateway": "10.9.0.1" }),
    );
    let body = json!({ "params": { "name": "nowhere", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3b["uuid"]] } });
    let failed = call(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let trace = failed["error"]["details"]["placementTrace"].to_string();
    assert!(trace.contains("clusters with the VM's L2 networks -> 0"), "{failed}");

    // No host can take a huge VM: the error carries the placement trace; nothing leaks.
    let huge = create(
        &env,
        "/v1/instance-offerings",
        json!({ "name": "huge", "cpuNum": 1, "memorySize": 1u64 << 45 }),
    );
    let body = json!({ "params": { "name": "big", "instanceOfferingUuid": huge["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
    let failed = call(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(failed["error"]["code"], "HOST_ALLOCATION.NO_HOST", "{failed}");
    assert!(failed["error"]["details"]["placementTrace"].as_array().unwrap().len() >= 4);
    let (_, _, vms) = http(env.api, "GET", "/v1/vm-instances", None, &[]);
    assert_eq!(vms["inventories"].as_array().unwrap().len(), 1, "the failed VM left no record");
}

/// `GET /v1/api-jobs/{uuid}?waitSeconds=N` holds its answer until the job ends: a creation
/// that takes the sim driver's latency several times over is followed in one request. A bad
/// `waitSeconds` is a 400 naming it. (That a wait which runs out answers `202`, and that
/// another tenant's wait finds nothing, is in the security tests' running import.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_followed_to_its_end_in_one_waiting_request() {
    let env = tokio::task::spawn_blocking(|| {
        env_with_driver(&["--driver", "sim", "--sim-latency-ms", "300"])
    })
    .await
    .unwrap();
    let (_, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "waited", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
    let (status, _, accepted) =
        http(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()), &[]);
    assert_eq!(status, 202, "{accepted}");
    let location = accepted["location"].as_str().unwrap();
    let job = &location[location.find("/v1/").unwrap()..];
    let (status, _, done) = http(env.api, "GET", &format!("{job}?waitSeconds=30"), None, &[]);
    assert_eq!(status, 200, "one waiting GET sees the job's end: {done}");
    assert_eq!(done["inventory"]["state"], "Running", "{done}");
    for bad in ["61", "-1", "soon", "1.5"] {
        let (status, _, reply) =
            http(env.api, "GET", &format!("{job}?waitSeconds={bad}"), None, &[]);
        assert_eq!(
            (status, reply["error"]["details"]["field"].as_str()),
            (400, Some("waitSeconds")),
            "waitSeconds={bad}: {reply}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_are_checked_then_cascade_when_enforced() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let vm_uuid = vm["uuid"].as_str().unwrap().to_owned();
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    let zone = zones["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let l3_uuid = l3["uuid"].as_str().unwrap().to_owned();

    // Permissive (the default): refused while something depends on it; nothing changes.
    let (status, _, reply) = http(env.api, "DELETE", &format!("/v1/zones/{zone}"), None, &[]);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (409, Some("SYS.RESOURCE_IN_USE")),
        "{reply}"
    );
    let (status, _, _) = http(env.api, "DELETE", &format!("/v1/l3-networks/{l3_uuid}"), None, &[]);
    assert_eq!(status, 409, "a VM has a NIC on it");
    let (status, _, _) =
        http(env.api, "DELETE", &format!("/v1/zones/{zone}?deleteMode=Sometimes"), None, &[]);
    assert_eq!(status, 400);
    assert_eq!(domain_state(&env, &vm_uuid).await, Some(DomainState::Running));

    // Nothing depends on an offering (VMs keep their own size).
    ok(
        env.api,
        "DELETE",
        &format!("/v1/instance-offerings/{}", offering["uuid"].as_str().unwrap()),
        None,
    );

    // Enforcing: the zone takes its cluster, host and VM with it.
    let done = ok(env.api, "DELETE", &format!("/v1/zones/{zone}?deleteMode=Enforcing"), None);
    let kinds: Vec<&str> =
        done["deleted"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["VmInstance", "Host", "Cluster", "L3Network", "L2Network", "Zone"]);
    for path in [
        format!("/v1/vm-instances/{vm_uuid}"),
        format!("/v1/hosts/{}", host["uuid"].as_str().unwrap()),
        format!("/v1/zones/{zone}"),
    ] {
        let (status, _, _) = http(env.api, "GET", &path, None, &[]);
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(domain_state(&env, &vm_uuid).await, None, "the domain went with the VM");
    let (status, _, _) = http(env.api, "GET", &format!("/v1/l3-networks/{l3_uuid}"), None, &[]);
    assert_eq!(status, 404, "the L3 network went with its L2 network and zone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_on_a_lost_host_is_finished_by_a_listed_gc_job() {
    let mut env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let uuid = vm["uuid"].as_str().unwrap().to_owned();
    let host_path = format!("/v1/hosts/{}", host["uuid"].as_str().unwrap());

    // The agent dies (SIGKILL): the host turns Disconnected, its VM Unknown.
    env.kill_agent();
    let api = env.api;
    let wait_for = |path: String, field: &'static str, value: &'static str| {
        let started = std::time::Instant::now();
        loop {
            let (_, _, reply) = http(api, "GET", &path, None, &[]);
            if reply["inventories"][0][field] == value {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{path} never had {field}={value}: {reply}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(host_path.clone(), "status", "Disconnected");
    wait_for(format!("/v1/vm-instances/{uuid}"), "state", "Unknown");

    // Destroying succeeds for the user and leaves a GC job, listed by the API.
    assert_eq!(
        ok(env.api, "DELETE", &format!("/v1/vm-instances/{uuid}"), None)["state"],
        "Destroyed"
    );
    let destroy_jobs = || {
        let (_, _, jobs) = http(api, "GET", "/v1/gc-jobs", None, &[]);
        jobs["inventories"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["kind"] == "vm.destroy-domain")
            .cloned()
            .collect::<Vec<Value>>()
    };
    assert_eq!(destroy_jobs().len(), 1);
    // The expunge after the grace period is a GC job too, waiting its time.
    let (_, _, jobs) = http(env.api, "GET", "/v1/gc-jobs", None, &[]);
    assert!(
        jobs["inventories"].as_array().unwrap().iter().any(|j| j["kind"] == "vm.expunge"),
        "{jobs}"
    );

    // The agent comes back on its address: the host reconnects by itself, the job runs.
    env.restart_agent();
    wait_for(host_path, "status", "Connected");
    let started = std::time::Instant::now();
    loop {
        let jobs = destroy_jobs();
        if jobs.is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the GC job did not finish: {jobs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_from_an_image_gets_a_qcow2_root_volume_on_primary_storage() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let storage = tempfile::tempdir().unwrap();
    let (_, _, clusters) = http(env.api, "GET", "/v1/clusters", None, &[]);
    let cluster = clusters["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let zone = clusters["inventories"][0]["zoneUuid"].as_str().unwrap().to_owned();

    let bs = create(
        &env,
        "/v1/backup-storage/image-store",
        json!({ "name": "bs", "url": storage.path().join("bs").display().to_string() }),
    );
    ok(
        env.api,
        "POST",
        &format!("/v1/zones/{zone}/backup-storage/{}", bs["uuid"].as_str().unwrap()),
        None,
    );
    // Files are imported only from the node's import directory.
    let imports = env.data.clone().join("image-imports");
    std::fs::create_dir_all(&imports).unwrap();
    let source = imports.join("tiny.raw");
    std::fs::write(&source, vec![0u8; 1 << 20]).unwrap();
    let image = create(
        &env,
        "/v1/images",
        json!({ "name": "tiny", "url": format!("file://{}", source.display()), "format": "raw", "backupStorageUuids": [bs["uuid"]] }),
    );
    assert_eq!((image["status"].as_str(), image["size"].as_u64()), (Some("Ready"), Some(1 << 20)));
    assert!(image["checksum"].as_str().unwrap().starts_with("sha256:"));

    // Without primary storage on the cluster, the creation fails at its volume step and
    // leaves nothing behind.
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]], "imageUuid": image["uuid"] } }).to_string();
    let failed = call(env.api, "POST", "/v1/vm-instances", Some(&body));
    assert!(
        failed["error"]["description"].as_str().unwrap().contains("create-root-volume"),
        "{failed}"
    );
    let (_, _, vms) = http(env.api, "GET", "/v1/vm-instances", None, &[]);
    assert!(vms["inventories"].as_array().unwrap().is_empty());

    let ps_dir = storage.path().join("ps");
    let ps = create(
        &env,
        "/v1/primary-storage/local-storage",
        json!({ "name": "ps", "url": ps_dir.display().to_string(), "zoneUuid": zone }),
    );
    ok(
        env.api,
        "POST",
        &format!("/v1/clusters/{cluster}/primary-storage/{}", ps["uuid"].as_str().unwrap()),
        None,
    );
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body));
    assert_eq!(vm["state"], "Running");
    assert_eq!(vm["hostUuid"], host["uuid"]);
    let volume = vm["rootVolumePath"].as_str().unwrap().to_owned();
    assert!(volume.starts_with(&ps_dir.display().to_string()), "{volume}");
    let info = std::process::Command::new("qemu-img").args(["info", &volume]).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("file format: qcow2") && info.contains("imagecache"), "{info}");

    // Expunging deletes the volume.
    let uuid = vm["uuid"].as_str().unwrap();
    ok(env.api, "DELETE", &format!("/v1/vm-instances/{uuid}"), None);
    ok(
        env.api,
        "PUT",
        &format!("/v1/vm-instances/{uuid}/actions"),
        Some(r#"{"expungeVmInstance": {}}"#),
    );
    assert!(!std::path::Path::new(&volume).exists(), "the root volume was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_stops_what_it_cannot_move_and_enable_brings_the_host_back() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } });
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    let uuid = vm["uuid"].as_str().unwrap().to_owned();
    let host_actions = format!("/v1/hosts/{}/actions", host["uuid"].as_str().unwrap());
    let maintained = ok(
        env.api,
        "PUT",
        &host_actions,
        Some(r#"{"changeHostState": {"stateEvent": "maintain"}}"#),
    );
    assert_eq!(maintained["state"], "Maintenance");
    assert_eq!(maintained["maintenance"]["stopped"][0], uuid.as_str(), "{maintained}");
    let (_, _, vms) = http(env.api, "GET", &format!("/v1/vm-instances/{uuid}"), None, &[]);
    assert_eq!(vms["inventories"][0]["state"], "Stopped");
    // A host in maintenance takes no VM.
    let failed = call(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert!(
        failed["error"]["details"]["placementTrace"].to_string().contains("state Enabled -> 0"),
        "{failed}"
    );
    assert_eq!(
        ok(env.api, "PUT", &host_actions, Some(r#"{"changeHostState": {"stateEvent": "enable"}}"#))
            ["state"],
        "Enabled"
    );
    let started = ok(
        env.api,
        "PUT",
        &format!("/v1/vm-instances/{uuid}/actions"),
        Some(r#"{"startVmInstance": {}}"#),
    );
    assert_eq!(started["state"], "Running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_starts_on_a_host_of_the_users_choice() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let second_dir = tempfile::tempdir().unwrap();
    let second_bootstrap = bootstrap(&env.data.clone());
    let (_second, second_addr) = start_agent_with(&second_bootstrap, second_dir.path(), &SIM);
    let h2 = create(
        &env,
        "/v1/hosts/kvm",
        json!({ "name": "h2", "managementIp": "127.0.0.1", "agentPort": second_addr.port(), "clusterUuid": host["clusterUuid"] }),
    );
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]], "hostUuid": host["uuid"] } });
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body.to_string()));
    assert_eq!(vm["hostUuid"], host["uuid"], "placed where it was pinned");
    let path = format!("/v1/vm-instances/{}/actions", vm["uuid"].as_str().unwrap());
    ok(env.api, "PUT", &path, Some(r#"{"stopVmInstance": {}}"#));
    let started = ok(
        env.api,
        "PUT",
        &path,
        Some(&json!({ "startVmInstance": { "hostUuid": h2["uuid"] } }).to_string()),
    );
    assert_eq!(
        (started["state"].as_str(), &started["hostUuid"], &started["lastHostUuid"]),
        (Some("Running"), &h2["uuid"], &host["uuid"])
    );
    assert_eq!(
        domain_state(&env, vm["uuid"].as_str().unwrap()).await,
        None,
        "gone from the first host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_answer_queries_and_refuse_unknown_fields() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } }).to_string();
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body));
    let ip = vm["vmNics"][0]["ip"].as_str().unwrap();
    let query = |q: &str| http(env.api, "GET", &format!("/v1/{q}"), None, &[]);

    let (status, _, found) = query(&format!("vm-instances?q=vmNics.ip={ip}&q=state=Running"));
    assert_eq!(status, 200);
    assert_eq!(found["inventories"][0]["uuid"], vm["uuid"]);
    let (_, _, found) = query("vm-instances?q=host.cluster.zone.name=z1&fields=uuid,name");
    assert_eq!(found["inventories"], json!([{ "uuid": vm["uuid"], "name": "vm1" }]));
    let (_, _, found) = query("hosts?q=vmInstance.state=Running&count=true");
    assert_eq!(found, json!({ "total": 1 }));
    let (_, _, found) =
        query(&format!("hosts?q=uuid!={}&replyWithCount=true", host["uuid"].as_str().unwrap()));
    assert_eq!(found["total"], 0);

    let (status, _, refused) = query("vm-instances?q=colour=red");
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "colour");
    assert!(refused["error"]["description"].as_str().unwrap().contains("vmNics"), "{refused}");
    let (status, _, _) = query("vm-instances?q=cpuNum>many");
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_checked_queried_honoured_and_go_with_their_resource() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let l3_uuid = l3["uuid"].as_str().unwrap();
    let host_uuid = host["uuid"].as_str().unwrap();
    let query = |q: &str| http(env.api, "GET", &format!("/v1/{q}"), None, &[]);
    let vm_body = |name: &str, system: Value| {
        json!({ "params": { "name": name, "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] },
                "systemTags": system, "userTags": ["web", "team=a"] })
        .to_string()
    };

    // A system tag that matches no pattern, or with a bad token, is refused before anything.
    for bad in [
        json!(["colour::red"]),
        json!(["hostname::-x-"]),
        json!([format!("staticIp::{l3_uuid}::10.0.9.9")]),
    ] {
        let (status, _, refused) =
            http(env.api, "POST", "/v1/vm-instances", Some(&vm_body("bad", bad)), &[]);
        assert_eq!(status, 400, "{refused}");
        assert_eq!(refused["error"]["details"]["field"], "systemTags");
    }
    assert_eq!(query("vm-instances?count=true").2, json!({ "total": 0 }));

    // staticIp is the address IPAM hands out; the tags are queryable with the VM.
    let tags = json!([format!("staticIp::{l3_uuid}::10.0.0.17"), "hostname::web-1"]);
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&vm_body("vm1", tags)));
    let vm_uuid = vm["uuid"].as_str().unwrap();
    assert_eq!(vm["vmNics"][0]["ip"], "10.0.0.17");
    let (_, _, found) = query("vm-instances?q=__userTag__=web&fields=uuid");
    assert_eq!(found["inventories"], json!([{ "uuid": vm_uuid }]));
    let (_, _, found) = query("vm-instances?q=systemTags.tag~=hostname::%25&count=true");
    assert_eq!(found, json!({ "total": 1 }));
    let (_, _, found) = query(&format!("user-tags?q=resourceUuid={vm_uuid}&sort=+tag"));
    let user_tags: Vec<&str> = found["inventories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap())
        .collect();
    assert_eq!(user_tags, ["team=a", "web"]);

    // Tags through their own API: a duplicate is a conflict; a second hostname too.
    let tag = |path: &str, resource: &str, kind: &str, tag: &str| {
        let body =
            json!({ "params": { "resourceUuid": resource, "resourceType": kind, "tag": tag } });
        http(env.api, "POST", path, Some(&body.to_string()), &[])
    };
    assert_eq!(tag("/v1/user-tags", vm_uuid, "VmInstanceVO", "web").0, 409);
    assert_eq!(tag("/v1/system-tags", vm_uuid, "VmInstanceVO", "hostname::other").0, 409);
    assert_eq!(tag("/v1/system-tags", vm_uuid, "HostVO", "hostname::x").0, 404);
    assert_eq!(tag("/v1/system-tags", host_uuid, "HostVO", "reservedMemory::lots").0, 400);
    assert_eq!(tag("/v1/user-tags", vm_uuid, "TeapotVO", "x").0, 400);

    // reservedMemory keeps a host's memory from VMs: with all of it kept, nothing fits.
    let (status, _, accepted) = tag("/v1/system-tags", host_uuid, "HostVO", "reservedMemory::1T");
    assert_eq!(status, 202, "{accepted}");
    let reserved = wait_job(env.api, accepted["location"].as_str().unwrap())["inventory"].clone();
    let (status, _, accepted) =
        http(env.api, "POST", "/v1/vm-instances", Some(&vm_body("vm2", json!([]))), &[]);
    assert_eq!(status, 202);
    let failed = wait_job(env.api, accepted["location"].as_str().unwrap());
    assert!(
        failed["error"]["details"]["placementTrace"].to_string().contains("free capacity"),
        "{failed}"
    );
    ok(env.api, "DELETE", &format!("/v1/tags/{}", reserved["uuid"].as_str().unwrap()), None);
    ok(env.api, "POST", "/v1/vm-instances", Some(&vm_body("vm2", json!([]))));
    assert_eq!(query("system-tags?q=tag~=reservedMemory%25&count=true").2, json!({ "total": 0 }));

    // The VM's tags go with it.
    ok(env.api, "DELETE", &format!("/v1/vm-instances/{vm_uuid}?deleteMode=Enforcing"), None);
    let expunge = json!({ "expungeVmInstance": {} }).to_string();
    ok(env.api, "PUT", &format!("/v1/vm-instances/{vm_uuid}/actions"), Some(&expunge));
    assert_eq!(
        query(&format!("user-tags?q=resourceUuid={vm_uuid}&count=true")).2,
        json!({ "total": 0 })
    );
    assert_eq!(
        query(&format!("system-tags?q=resourceUuid={vm_uuid}&count=true")).2,
        json!({ "total": 0 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tags_of_one_slot_leave_one_tag() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (_, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] },
                       "userTags": ["web", "web"] }).to_string();
    // The same user tag twice in one creation is refused before anything is made.
    let (status, _, refused) = http(env.api, "POST", "/v1/vm-instances", Some(&body), &[]);
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "userTags");
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } }).to_string();
    let vm = ok(env.api, "POST", "/v1/vm-instances", Some(&body));
    let vm_uuid = vm["uuid"].as_str().unwrap().to_owned();

    // Many hostnames (one slot) and one user tag many times, all at once: the check before
    // the job sees none of the others, the store takes one of each slot.
    let ends: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..24)
            .map(|i| {
                let (api, vm_uuid) = (env.api, vm_uuid.clone());
                scope.spawn(move || {
                    let (path, tag) = match i % 2 {
                        0 => ("/v1/system-tags", format!("hostname::host-{i}")),
                        _ => ("/v1/user-tags", "team=a".to_owned()),
                    };
                    let body = json!({ "params": { "resourceUuid": vm_uuid, "resourceType": "VmInstanceVO", "tag": tag } });
                    let (status, _, reply) = http(api, "POST", path, Some(&body.to_string()), &[]);
                    match status {
                        202 => {
                            let end = wait_job(api, reply["location"].as_str().unwrap());
                            match end["error"]["code"].as_str() {
                                Some(code) => (409, json!(code)),
                                None => (200, end),
                            }
                        }
                        _ => (status, reply["error"]["code"].clone()),
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let succeeded = ends.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(succeeded, 2, "one hostname and one user tag: {ends:?}");
    for (status, code) in &ends {
        assert!(*status == 200 || (*status == 409 && code == "TAG.DUPLICATE"), "{status} {code}");
    }
    let count = |table: &str, q: &str| {
        http(
            env.api,
            "GET",
            &format!("/v1/{table}?q=resourceUuid={vm_uuid}&q={q}&count=true"),
            None,
            &[],
        )
        .2
    };
    assert_eq!(count("system-tags", "tag~=hostname::%25"), json!({ "total": 1 }));
    assert_eq!(count("user-tags", "tag=team=a"), json!({ "total": 1 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_jobs_and_a_job_is_followed_into_the_agent() {
    let env = tokio::task::spawn_blocking(env).await.unwrap();
    let (host, offering, l3) = infrastructure(&env);
    let body = json!({ "params": { "name": "vm1", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } }).to_string();
    let (status, _, accepted) = http(env.api, "POST", "/v1/vm-instances", Some(&body), &[]);
    assert_eq!(status, 202);
    let location = accepted["location"].as_str().unwrap().to_owned();
    let job = location.rsplit('/').next().unwrap().to_owned();
    wait_job(env.api, &location);
    let _ = raw_http(env.api, "GET", "/v1/zones", None, &[]); // a 401

    // Prometheus' text, for the admin only.
    assert_eq!(raw_http(env.api, "GET", "/metrics", None, &[]).0, 401);
    let (status, _, text) = http(env.api, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_owned();
    for expected in [
        r#"strato_http_requests_total{route="/v1/vm-instances",method="POST",status="202"} 1"#,
        r#"strato_http_requests_total{route="/v1/zones",method="GET",status="401"} 1"#,
        r#"strato_http_request_duration_seconds_count{route="/v1/vm-instances",method="POST"} 1"#,
        r#"strato_jobs_total{api="CreateVmInstance",result="succeeded"} 1"#,
        r#"strato_queue_pending{kind="l3",queue="ip-alloc"} 0"#,
        r#"strato_actors_live{kind="host"} 1"#,
        &format!(r#"strato_agent_link_rtt_seconds{{host="{}"}}"#, host["uuid"].as_str().unwrap()),
        "strato_gc_backlog ",
    ] {
        assert!(text.contains(expected), "no `{expected}` in\n{text}");
    }

    // The job's span names it in what the MN logs of it, and the agent logs the job id with
    // the commands it ran for it.
    let mn_log = std::fs::read_to_string(log_path(&env.data.clone())).unwrap();
    assert!(
        mn_log.lines().any(|l| l.contains(&format!("job{{job={job} api=CreateVmInstance}}"))
            && l.contains("job finished")),
        "no job span in the MN's log:\n{}",
        mn_log.lines().filter(|l| l.contains("job finished")).collect::<Vec<_>>().join("\n")
    );
    let agent_log = std::fs::read_to_string(log_path(&env.dir().join("agent"))).unwrap();
    assert!(
        agent_log.lines().any(|l| l.contains(&job) && l.contains("command done")),
        "the agent did not log job {job}:\n{agent_log}"
    );
}
