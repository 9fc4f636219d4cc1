//! The MN killed with SIGKILL in the middle of VM creations: after a restart every job ends
//! in a terminal state and nothing leaks (no record, booking, address or domain of a VM that
//! does not exist). The agent runs the sim driver with latency, so creations are caught in
//! the middle.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn sigkill_of_the_mn_mid_creation_leaves_every_job_terminal_and_nothing_behind() {
    let mut cluster = TestCluster::start(ClusterOpts::sim(600));
    let api = cluster.api;
    let Infrastructure { host, offering, l3 } = cluster.infrastructure("10.1.0.10", "10.1.0.13");

    // Four creations, one per free address; the MN dies while they run.
    let body = json!({ "params": { "name": "vm", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] } }).to_string();
    let jobs: Vec<String> = (0..4)
        .map(|_| {
            let (status, _, reply) = http(api, "POST", "/v1/vm-instances", Some(&body), &[]);
            assert_eq!(status, 202);
            reply["location"].as_str().unwrap().to_owned()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill_and_restart_server();

    // Every accepted job ends.
    let mut succeeded = 0;
    for job in &jobs {
        let done = wait_job(api, job);
        if done.get("inventory").is_some() {
            assert_eq!(done["inventory"]["state"], "Running", "{done}");
            succeeded += 1;
        } else {
            assert!(done["error"]["code"].is_string(), "{done}");
        }
    }
    eprintln!("{succeeded} of 4 creations completed before the kill");
    // The store and the hypervisor agree on what exists.
    let (_, _, vms) = http(api, "GET", "/v1/vm-instances", None, &[]);
    let vms = vms["inventories"].as_array().unwrap().clone();
    assert!(succeeded < 4, "the kill landed after every creation; nothing was interrupted");
    assert_eq!(vms.len(), succeeded, "only completed creations left VMs: {vms:?}");
    assert!(vms.iter().all(|v| v["state"] == "Running"));
    let started = Instant::now();
    let host_uuid = host["uuid"].as_str().unwrap();
    loop {
        let (_, _, hosts) = http(api, "GET", &format!("/v1/hosts/{host_uuid}"), None, &[]);
        let booked = hosts["inventories"][0]["reservations"].as_object().map_or(0, |m| m.len());
        if booked == succeeded || started.elapsed() > Duration::from_secs(10) {
            assert_eq!(booked, succeeded, "capacity booked only for existing VMs");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The hypervisor runs exactly those VMs: interrupted creations left no domain.
    // Read on the host, as an operator would: the MN holds the agent's one session.
    let state_file = cluster.agent_dir().join("sim-domains.json");
    let domains = strato_agent::driver::sim::Sim::domains_in(&state_file).unwrap();
    assert_eq!(domains.len(), succeeded, "{domains:?}");
    // No address leaked: the free ones can all be taken again.
    for _ in succeeded..4 {
        let vm = ok(api, "POST", "/v1/vm-instances", Some(&body));
        assert_eq!(vm["state"], "Running");
    }
    let failed = call(api, "POST", "/v1/vm-instances", Some(&body));
    assert_eq!(failed["error"]["code"], "L3.IP_EXHAUSTED", "{failed}");
}
