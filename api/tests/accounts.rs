//! Accounts and sessions end to end: logging in and out, 401s, expiry, API keys, quotas, and
//! tenant isolation (tenant B tries every API with tenant A's UUIDs and gets not found or
//! forbidden, with nothing changed).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Admin's infrastructure: returns (offering, l3).
fn infrastructure(env: &TestCluster) -> (Value, Value) {
    let Infrastructure { offering, l3, .. } =
        vm_infrastructure(env.api, env.agent, "10.0.0.10", "10.0.0.20");
    (offering, l3)
}

fn vm_body(offering: &Value, l3: &Value, name: &str) -> Value {
    json!({ "params": { "name": name, "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] }, "userTags": ["mine"] })
}

#[test]
fn sessions_are_needed_expire_end_at_log_out_and_api_keys_work() {
    let env = TestCluster::start(ClusterOpts::default().env("STRATO_SESSION_TIMEOUT_SECS", "2"));
    assert_eq!(raw_http(env.api, "GET", "/v1/zones", None, &[]).0, 401);
    let wrong = json!({ "logInByAccount": { "accountName": "admin", "password": "nope" } });
    assert_eq!(
        raw_http(env.api, "PUT", "/v1/accounts/login", Some(&wrong.to_string()), &[]).0,
        401
    );
    // A failed login holds the next attempt back a moment (the throttle's first delay).
    std::thread::sleep(Duration::from_millis(300));
    let session = log_in(env.api, "admin", ADMIN_PASSWORD);
    assert_eq!(env.as_(&session, "GET", "/v1/zones", None).0, 200);
    assert_eq!(env.as_("not-a-session", "GET", "/v1/zones", None).0, 401);

    // An API key: its secret works until the key is deleted; a wrong secret never does.
    let (status, key) = env.as_(
        &session,
        "POST",
        "/v1/accounts/api-keys",
        Some(json!({ "params": { "description": "ci" } })),
    );
    assert_eq!(status, 200, "{key}");
    let key_auth =
        key["inventory"]["authorization"].as_str().unwrap().trim_start_matches("OAuth ").to_owned();
    let key_uuid = key["inventory"]["uuid"].as_str().unwrap().to_owned();
    assert_eq!(env.as_(&key_auth, "GET", "/v1/zones", None).0, 200);
    assert_eq!(env.as_(&format!("{key_uuid}:wrong"), "GET", "/v1/zones", None).0, 401);

    // Sessions expire (2 s here); API keys do not.
    std::thread::sleep(Duration::from_millis(2500));
    let (status, expired) = env.as_(&session, "GET", "/v1/zones", None);
    assert_eq!((status, expired["error"]["code"].as_str()), (401, Some("ID.SESSION_EXPIRED")));
    assert_eq!(env.as_(&key_auth, "GET", "/v1/zones", None).0, 200);

    // Logging out ends a session at once.
    let session = log_in(env.api, "admin", ADMIN_PASSWORD);
    assert_eq!(
        env.as_(&session, "DELETE", &format!("/v1/accounts/sessions/{session}"), None).0,
        200
    );
    assert_eq!(env.as_(&session, "GET", "/v1/zones", None).0, 401);
    assert_eq!(
        env.as_(&key_auth, "DELETE", &format!("/v1/accounts/api-keys/{key_uuid}"), None).0,
        200
    );
    assert_eq!(env.as_(&key_auth, "GET", "/v1/zones", None).0, 401);
}

#[test]
fn quotas_refuse_creations_beyond_them_with_a_clear_error() {
    let env = TestCluster::start(ClusterOpts::default());
    let (offering, l3) = infrastructure(&env);
    let a = env.account("alice", json!({ "vmNum": 1, "cpuNum": 8, "memorySize": 8589934592u64 }));
    let first = env.done_as(&a, "POST", "/v1/vm-instances", vm_body(&offering, &l3, "a1"));
    assert_eq!(first["inventory"]["state"], "Running", "{first}");
    let (status, refused) =
        env.as_(&a, "POST", "/v1/vm-instances", Some(vm_body(&offering, &l3, "a2")));
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "ID.QUOTA_EXCEEDED");
    assert!(refused["error"]["description"].as_str().unwrap().contains("vmNum"), "{refused}");
    // The admin raises it; then it fits.
    let (_, _, listed) = http(env.api, "GET", "/v1/accounts?q=name=alice", None, &[]);
    let alice_uuid = listed["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let raise = json!({ "updateQuota": { "vmNum": 2, "cpuNum": 8, "memorySize": 8589934592u64 } });
    ok(env.api, "PUT", &format!("/v1/accounts/{alice_uuid}/actions"), Some(&raise.to_string()));
    let second = env.done_as(&a, "POST", "/v1/vm-instances", vm_body(&offering, &l3, "a2"));
    assert_eq!(second["inventory"]["state"], "Running", "{second}");

    // Growing a VM past the quota is refused too; within it, the charge follows the size.
    let vm = second["inventory"]["uuid"].as_str().unwrap().to_owned();
    let actions = format!("/v1/vm-instances/{vm}/actions");
    env.done_as(&a, "PUT", &actions, json!({ "stopVmInstance": {} }));
    let big = create(
        env.api,
        "/v1/instance-offerings",
        json!({ "name": "big", "cpuNum": 8, "memorySize": 268435456u64 }),
    );
    let grow = json!({ "changeInstanceOffering": { "instanceOfferingUuid": big["uuid"] } });
    let (status, refused) = env.as_(&a, "PUT", &actions, Some(grow));
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("ID.QUOTA_EXCEEDED")),
        "{refused}"
    );
    assert!(refused["error"]["description"].as_str().unwrap().contains("cpuNum"), "{refused}");
    let fits = create(
        env.api,
        "/v1/instance-offerings",
        json!({ "name": "mid", "cpuNum": 7, "memorySize": 268435456u64 }),
    );
    let grow = json!({ "changeInstanceOffering": { "instanceOfferingUuid": fits["uuid"] } });
    let changed = env.done_as(&a, "PUT", &actions, grow);
    assert_eq!(changed["inventory"]["cpuNum"], 7, "{changed}");
    // Now 1 + 7 CPUs are charged of 8: even one more CPU does not fit.
    let (status, _) = env.as_(&a, "POST", "/v1/vm-instances", Some(vm_body(&offering, &l3, "a3")));
    assert_eq!(status, 409);
}

#[test]
fn tenant_b_reaches_nothing_of_tenant_a_and_changes_nothing() {
    let env = TestCluster::start(ClusterOpts::default());
    let (offering, l3) = infrastructure(&env);
    let a = env.account("alice", json!({ "vmNum": 5, "cpuNum": 8, "memorySize": 8589934592u64 }));
    let b = env.account("bob", json!({ "vmNum": 5, "cpuNum": 8, "memorySize": 8589934592u64 }));
    let (status, accepted) =
        env.as_(&a, "POST", "/v1/vm-instances", Some(vm_body(&offering, &l3, "a1")));
    assert_eq!(status, 202);
    let job_path =
        format!("/v1/{}", accepted["location"].as_str().unwrap().split_once("/v1/").unwrap().1);
    let auth_a = format!("OAuth {a}");
    let vm = wait_job_as(env.api, &job_path, ("Authorization", &auth_a))["inventory"].clone();
    let vm_uuid = vm["uuid"].as_str().unwrap().to_owned();
    let (_, tags) = env.as_(&a, "GET", &format!("/v1/user-tags?q=resourceUuid={vm_uuid}"), None);
    let tag_uuid = tags["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let (_, me) = env.as_(&a, "GET", "/v1/accounts", None);
    assert_eq!(me["inventories"].as_array().unwrap().len(), 1, "alice sees only herself: {me}");
    let alice_uuid = me["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let snapshot = |session: &str| {
        let (_, vms) = env.as_(session, "GET", "/v1/vm-instances", None);
        let (_, tags) = env.as_(session, "GET", "/v1/user-tags", None);
        (vms, tags)
    };
    let before = snapshot(&a);

    // Every API, as bob, naming alice's resources.
    let vm_path = format!("/v1/vm-instances/{vm_uuid}");
    let actions = format!("{vm_path}/actions");
    let tag_on_vm = |kind: &str, tag: &str| {
        json!({ "params": { "resourceUuid": vm_uuid, "resourceType": "VmInstanceVO", "tag": tag } })
            .to_string()
            .replace("KIND", kind)
    };
    let not_found: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", vm_path.clone(), None),
        ("DELETE", vm_path.clone(), None),
        ("DELETE", format!("{vm_path}?deleteMode=Enforcing"), None),
        ("PUT", actions.clone(), Some(json!({ "stopVmInstance": {} }))),
        ("PUT", actions.clone(), Some(json!({ "rebootVmInstance": {} }))),
        ("PUT", actions.clone(), Some(json!({ "pauseVmInstance": {} }))),
        ("PUT", actions.clone(), Some(json!({ "migrateVm": {} }))),
        ("PUT", actions.clone(), Some(json!({ "expungeVmInstance": {} }))),
        ("GET", job_path.clone(), None),
        (
            "POST",
            "/v1/user-tags".into(),
            Some(serde_json::from_str(&tag_on_vm("User", "bob-was-here")).unwrap()),
        ),
        (
            "POST",
            "/v1/system-tags".into(),
            Some(serde_json::from_str(&tag_on_vm("System", "hostname::bob")).unwrap()),
        ),
        ("DELETE", format!("/v1/tags/{tag_uuid}"), None),
        ("GET", format!("/v1/accounts/{alice_uuid}"), None),
        (
            "PUT",
            format!("/v1/accounts/{alice_uuid}/actions"),
            Some(json!({ "updateAccount": { "password": "bob-owns-you" } })),
        ),
        ("DELETE", format!("/v1/accounts/sessions/{a}"), None),
    ];
    for (method, path, body) in &not_found {
        let (status, reply) = env.as_(&b, method, path, body.clone());
        assert_eq!(status, 404, "bob: {method} {path}: {reply}");
    }
    let forbidden: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/v1/hosts".into(), None),
        ("GET", "/v1/zones".into(), None),
        ("POST", "/v1/zones".into(), Some(json!({ "params": { "name": "mine" } }))),
        ("GET", "/v1/gc-jobs".into(), None),
        (
            "POST",
            "/v1/accounts".into(),
            Some(json!({ "params": { "name": "eve", "password": "eve-password" } })),
        ),
        ("DELETE", format!("/v1/accounts/{alice_uuid}"), None),
        (
            "POST",
            "/v1/instance-offerings".into(),
            Some(json!({ "params": { "name": "x", "cpuNum": 1, "memorySize": 1 } })),
        ),
        ("DELETE", format!("/v1/instance-offerings/{}", offering["uuid"].as_str().unwrap()), None),
        ("DELETE", format!("/v1/l3-networks/{}", l3["uuid"].as_str().unwrap()), None),
    ];
    for (method, path, body) in &forbidden {
        let (status, reply) = env.as_(&b, method, path, body.clone());
        assert!(status == 403 || status == 404, "bob: {method} {path}: {status} {reply}");
    }
    // Lists, counts, joins and lookups by alice's values show bob nothing of hers.
    for query in [
        "vm-instances".to_owned(),
        format!("vm-instances?q=uuid={vm_uuid}"),
        format!("vm-instances?q=vmNics.ip={}", vm["vmNics"][0]["ip"].as_str().unwrap()),
        "vm-instances?q=__userTag__=mine".into(),
        "vm-instances?q=state=Running&count=true".into(),
        format!("user-tags?q=resourceUuid={vm_uuid}"),
    ] {
        let (status, found) = env.as_(&b, "GET", &format!("/v1/{query}"), None);
        assert_eq!(status, 200, "{query}: {found}");
        let none = found["inventories"].as_array().is_some_and(Vec::is_empty)
            || found == json!({ "total": 0 });
        assert!(none, "bob's {query}: {found}");
    }
    // Shared resources are readable; bob's own VM works on them.
    assert_eq!(
        env.as_(&b, "GET", "/v1/instance-offerings", None).1["inventories"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let bobs = env.done_as(&b, "POST", "/v1/vm-instances", vm_body(&offering, &l3, "b1"));
    assert_eq!(bobs["inventory"]["state"], "Running", "{bobs}");
    assert_eq!(
        env.as_(&b, "GET", "/v1/vm-instances", None).1["inventories"].as_array().unwrap().len(),
        1
    );

    // Nothing of alice's changed.
    let after = snapshot(&a);
    assert_eq!(before, after);
    assert_eq!(after.0["inventories"][0]["state"], "Running");
    // And the admin sees both.
    let (_, _, all) = http(env.api, "GET", "/v1/vm-instances?count=true", None, &[]);
    assert_eq!(all, json!({ "total": 2 }));
}

/// Accounts created at once under one name: one is made, the others are told it exists
/// (both passed the check at the door before it was made again inside the job).
#[test]
fn one_name_one_account_even_when_created_at_once() {
    let env = TestCluster::start(ClusterOpts::default());
    let api = env.api;
    let tries: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let body = json!({ "params": { "name": "twin", "password": "twin-password" } });
                let (status, _, reply) =
                    http(api, "POST", "/v1/accounts", Some(&body.to_string()), &[]);
                match status {
                    202 => wait_job(api, reply["location"].as_str().unwrap()),
                    _ => reply,
                }
            })
        })
        .collect();
    let outcomes: Vec<Value> = tries.into_iter().map(|t| t.join().unwrap()).collect();
    let made = outcomes.iter().filter(|o| o["inventory"]["name"] == "twin").count();
    let refused = outcomes.iter().filter(|o| o["error"]["code"] == "ID.ACCOUNT_EXISTS").count();
    assert_eq!((made, refused), (1, 5), "{outcomes:?}");
    let (_, _, listed) = http(api, "GET", "/v1/accounts?q=name=twin", None, &[]);
    assert_eq!(listed["inventories"].as_array().map(Vec::len), Some(1), "{listed}");
}
