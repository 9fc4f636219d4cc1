//! The debug console's data and actions over HTTP: `/debug/...` for the admin only, the
//! tree and a VM's page while a slow operation holds its queue, operator actions, the
//! console page and its cookie login, and the live event stream.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn get(api: std::net::SocketAddr, path: &str) -> Value {
    let (status, _, body) = http(api, "GET", path, None, &[]);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

#[test]
fn the_console_shows_actors_queues_flows_and_links_and_acts_with_audit() {
    // A slow simulated hypervisor: every command takes 1.5 s.
    let cluster = TestCluster::start(ClusterOpts::sim(1500));
    let api = cluster.api;
    let Infrastructure { host, offering, l3 } = cluster.infrastructure("10.0.0.10", "10.0.0.20");
    let vm = create(
        api,
        "/v1/vm-instances",
        json!({ "name": "slow", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] }),
    );
    let vm_uuid = vm["uuid"].as_str().unwrap().to_owned();

    // The tree: kinds with their supervisors, resources and queues.
    let tree = get(api, "/debug/tree");
    let vms = tree["kinds"].as_array().unwrap().iter().find(|k| k["kind"] == "vm").unwrap();
    assert_eq!(vms["resources"], 1, "{tree}");
    assert_eq!(vms["supervisor"], "vm-supervisor");

    // A slow stop, then a reboot behind it: the VM's page shows the stop holding the
    // lifecycle queue with its job, and the reboot waiting.
    let stop = http(
        api,
        "PUT",
        &format!("/v1/vm-instances/{vm_uuid}/actions"),
        Some(r#"{"stopVmInstance": {}}"#),
        &[],
    );
    let stop_job = stop.2["location"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let started = Instant::now();
    let page = loop {
        let page = get(api, &format!("/debug/actors/vm/{vm_uuid}"));
        // (An observation of the hypervisor may hold the queue for a moment first.)
        if page["blocking"][0]["holding"][0]["name"] == "stop" {
            break page;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the stop never showed: {page}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let lifecycle = &page["blocking"][0];
    assert_eq!(lifecycle["queue"], "lifecycle");
    assert_eq!(lifecycle["holding"][0]["name"], "stop");
    assert_eq!(lifecycle["holding"][0]["job_id"], json!(stop_job));
    // A destroy (what a stopping VM accepts) waits behind it.
    let destroy = http(api, "DELETE", &format!("/v1/vm-instances/{vm_uuid}"), None, &[]);
    assert_eq!(destroy.0, 202, "{}", destroy.2);
    let started = Instant::now();
    let page = loop {
        let page = get(api, &format!("/debug/actors/vm/{vm_uuid}"));
        let waiting = &page["blocking"][0]["waiting"];
        if waiting.as_array().is_some_and(|w| w.iter().any(|o| o["name"] == "destroy")) {
            break page;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the destroy never waited: {page}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(page["blocking"][0]["holding"][0]["name"], "stop", "{page}");
    assert_eq!(page["record"]["name"], "slow");
    let listed = get(api, "/debug/actors?kind=vm&filter=slo");
    assert_eq!(listed["actors"][0]["uuid"], json!(vm_uuid));
    assert_eq!(listed["actors"][0]["running"], 1, "{listed}");
    let metrics_like = get(api, "/debug/summary");
    assert!(metrics_like["kinds"].as_array().unwrap().iter().any(|k| k["kind"] == "vm"));

    // Operator actions: a queue's level for the kind; each is audited in the MN's log.
    let (status, _, done) = http(
        api,
        "POST",
        "/debug/actions/queue-level",
        Some(&json!({ "kind": "host", "queue": "command", "level": 8 }).to_string()),
        &[],
    );
    assert_eq!(status, 200, "{done}");
    let tree = get(api, "/debug/tree");
    let queues = |kind: &str| {
        let kinds = tree["kinds"].as_array().unwrap();
        kinds.iter().find(|k| k["kind"] == kind).unwrap()["queues"].as_array().unwrap().clone()
    };
    assert!(queues("host").iter().any(|q| q["name"] == "command" && q["level"] == 8), "{tree}");
    // A serial queue (a VM's lifecycle, an L3 network's addresses) stays at 1, for the kind
    // and for one actor: its operations read and write their actor's state one at a time.
    assert!(queues("vm").iter().any(|q| q["name"] == "lifecycle" && q["serial"] == true));
    for uuid in [Value::Null, json!(vm_uuid)] {
        let (status, _, refused) = http(
            api,
            "POST",
            "/debug/actions/queue-level",
            Some(
                &json!({ "kind": "vm", "queue": "lifecycle", "level": 2, "uuid": uuid })
                    .to_string(),
            ),
            &[],
        );
        assert_eq!(status, 400, "{refused}");
        assert_eq!(refused["error"]["details"]["field"], "level", "{refused}");
    }
    let (status, _, refused) = http(
        api,
        "POST",
        "/debug/actions/queue-level",
        Some(&json!({ "kind": "vm", "queue": "lifecycle", "level": 0 }).to_string()),
        &[],
    );
    assert_eq!(status, 400, "{refused}");
    let (status, _, _) = http(
        api,
        "POST",
        "/debug/actions/restart",
        Some(&json!({ "kind": "vm", "uuid": vm_uuid }).to_string()),
        &[],
    );
    assert_eq!(status, 200);
    let log = std::fs::read_to_string(log_path(&cluster.data)).unwrap();
    assert!(
        log.lines().any(|l| l.contains("audit")
            && l.contains("queue-level")
            && l.contains("operator action")),
        "no audit line"
    );

    // Flows, GC jobs and host links.
    let flows = get(api, "/debug/flows");
    assert!(
        flows["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["chain"] == "vm.create" && f["phase"] == "done"),
        "{flows}"
    );
    get(api, "/debug/gc");
    let links = get(api, "/debug/hosts");
    assert_eq!(links["hosts"][0]["host"], host["uuid"]);
    assert_eq!(links["hosts"][0]["connected"], true);
    assert!(links["hosts"][0]["rttUs"].is_number());

    // The admin only: without a session 401, a tenant 403.
    assert_eq!(raw_http(api, "GET", "/debug/tree", None, &[]).0, 401);
    create(api, "/v1/accounts", json!({ "name": "tenant", "password": "tenant-password" }));
    let tenant = log_in(api, "tenant", "tenant-password");
    let auth = format!("OAuth {tenant}");
    assert_eq!(raw_http(api, "GET", "/debug/tree", None, &[("Authorization", &auth)]).0, 403);

    // The page, served by the binary; its login sets the session cookie, which reads /debug.
    let (status, _, page) = raw_http(api, "GET", "/console", None, &[]);
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("Supervision tree"));
    let login = json!({ "accountName": "admin", "password": ADMIN_PASSWORD }).to_string();
    let (status, headers, _) = raw_http(api, "POST", "/console/login", Some(&login), &[]);
    assert_eq!(status, 200);
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("strato_session="));
    assert_eq!(raw_http(api, "GET", "/debug/tree", None, &[("Cookie", &cookie)]).0, 200);
    let tenant_login =
        json!({ "accountName": "tenant", "password": "tenant-password" }).to_string();
    assert_eq!(raw_http(api, "POST", "/console/login", Some(&tenant_login), &[]).0, 403);

    // The live stream pushes summaries.
    let mut stream = std::net::TcpStream::connect(api).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET /debug/events HTTP/1.1\r\nHost: {api}\r\nCookie: {cookie}\r\n\r\n")
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("event: summary") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream") && seen.contains("flowsInProgress"), "{seen}");
}
