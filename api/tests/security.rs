//! The security findings, replayed as an attacker would against a real server on loopback:
//! each test names the finding it replays and fails on the code before its fix. The route
//! walk at the end tries every route of the catalog, as another account, with many spellings
//! of each UUID, and checks that nothing was read or changed.

mod common;

use std::net::SocketAddr;

use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};

struct Env {
    api: SocketAddr,
    agent: SocketAddr,
    _server: Proc,
    _agent: Proc,
    _dir: tempfile::TempDir,
}

fn env_with(server_env: &[(&str, &str)]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mn");
    let token = token(&data);
    let (agent_proc, agent) = start_agent(&token, &dir.path().join("agent"));
    let api = free_port();
    let server = start_server_with(&data, api, server_env);
    Env { api, agent, _server: server, _agent: agent_proc, _dir: dir }
}

fn as_(env: &Env, session: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let auth = format!("OAuth {session}");
    let body = body.map(|b| b.to_string());
    let (status, _, reply) =
        raw_http(env.api, method, path, body.as_deref(), &[("Authorization", &auth)]);
    (status, reply)
}

fn account(env: &Env, name: &str) -> String {
    create(
        env.api,
        "/v1/accounts",
        json!({ "name": name, "password": format!("{name}-password") }),
    );
    log_in(env.api, name, &format!("{name}-password"))
}

/// Two tenants, the admin's shared infrastructure, and tenant A's VM with a tag and a job.
struct World {
    env: Env,
    a: String,
    b: String,
    offering: String,
    l3: String,
    zone: String,
    vm: String,
    tag: String,
    job: String,
}

fn world() -> World {
    let env = env_with(&[]);
    let Infrastructure { offering, l3, .. } =
        vm_infrastructure(env.api, env.agent, "10.0.0.10", "10.0.0.20");
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    let zone = zones["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let a = account(&env, "tenanta");
    let b = account(&env, "tenantb");
    let job = "6a1f3e2d-0c4b-4d5e-8f70-112233445566".to_owned();
    let auth = format!("OAuth {a}");
    let body = json!({ "params": { "name": "a-vm", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] }, "userTags": ["a-tag"] });
    let (status, _, accepted) = raw_http(
        env.api,
        "POST",
        "/v1/vm-instances",
        Some(&body.to_string()),
        &[("Authorization", &auth), ("X-Job-UUID", &job)],
    );
    assert_eq!(status, 202, "{accepted}");
    let vm = wait_job_as(env.api, accepted["location"].as_str().unwrap(), ("Authorization", &auth));
    let vm = vm["inventory"]["uuid"].as_str().unwrap().to_owned();
    let (_, tags) = as_(&env, &a, "GET", &format!("/v1/user-tags?q=resourceUuid={vm}"), None);
    let tag = tags["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    World {
        env,
        a,
        b,
        offering: offering["uuid"].as_str().unwrap().to_owned(),
        l3: l3["uuid"].as_str().unwrap().to_owned(),
        zone,
        vm,
        tag,
        job,
    }
}

impl World {
    /// Everything tenant A and the admin had is still there, unchanged.
    fn assert_untouched(&self) {
        let (status, vm) =
            as_(&self.env, &self.a, "GET", &format!("/v1/vm-instances/{}", self.vm), None);
        assert_eq!(status, 200, "{vm}");
        assert_eq!(vm["inventories"][0]["state"], "Running", "{vm}");
        assert_eq!(vm["inventories"][0]["name"], "a-vm", "{vm}");
        let (status, tags) =
            as_(&self.env, &self.a, "GET", &format!("/v1/user-tags?q=uuid={}", self.tag), None);
        assert_eq!((status, tags["inventories"].as_array().map(Vec::len)), (200, Some(1)));
        let (status, job) =
            as_(&self.env, &self.a, "GET", &format!("/v1/api-jobs/{}", self.job), None);
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["inventory"]["uuid"], self.vm.as_str());
        for path in [
            format!("/v1/instance-offerings/{}", self.offering),
            format!("/v1/l3-networks/{}", self.l3),
        ] {
            let (status, found) = as_(&self.env, &self.a, "GET", &path, None);
            assert_eq!(status, 200, "{path}: {found}");
            assert_eq!(found["inventories"].as_array().map(Vec::len), Some(1), "{path}");
        }
        let (status, _, zone) =
            http(self.env.api, "GET", &format!("/v1/zones/{}", self.zone), None, &[]);
        assert_eq!((status, zone["inventories"].as_array().map(Vec::len)), (200, Some(1)));
        // B sees nothing of A's or the admin's as its own: no capture went through.
        let (_, mine) = as_(&self.env, &self.b, "GET", "/v1/vm-instances", None);
        assert!(
            mine["inventories"].as_array().unwrap().iter().all(|v| v["name"] == "b-vm"),
            "{mine}"
        );
    }
}

/// Finding 1: a percent-encoded first character reached tenant A's VM, job and tag, and
/// the admin's offering and L3 network.
#[test]
fn finding_1_another_spelling_of_a_uuid_is_refused() {
    let w = world();
    let encode_first = |uuid: &str| format!("%{:02x}{}", uuid.as_bytes()[0], &uuid[1..]);
    let attempts = [
        ("GET", format!("/v1/vm-instances/{}", encode_first(&w.vm)), None),
        (
            "PUT",
            format!("/v1/vm-instances/{}/actions", encode_first(&w.vm)),
            Some(json!({ "stopVmInstance": {} })),
        ),
        ("DELETE", format!("/v1/vm-instances/{}", encode_first(&w.vm)), None),
        ("GET", format!("/v1/api-jobs/{}", encode_first(&w.job)), None),
        ("DELETE", format!("/v1/tags/{}", encode_first(&w.tag)), None),
        ("DELETE", format!("/v1/instance-offerings/{}", encode_first(&w.offering)), None),
        ("DELETE", format!("/v1/l3-networks/{}?deleteMode=Enforcing", encode_first(&w.l3)), None),
    ];
    for (method, path, body) in attempts {
        let (status, reply) = as_(&w.env, &w.b, method, &path, body);
        assert_eq!(status, 400, "{method} {path}: {reply}");
        assert_eq!(reply["error"]["code"], "SYS.INVALID_ARGUMENT", "{reply}");
        assert_eq!(reply["error"]["details"]["field"], "uuid", "{reply}");
    }
    // The admin's spellings are held to the same rule.
    let (status, _, _) =
        http(w.env.api, "GET", &format!("/v1/zones/{}", w.zone.to_uppercase()), None, &[]);
    assert_eq!(status, 400);
    w.assert_untouched();
}

/// Finding 2: naming a shared offering's UUID as `X-Job-UUID` made tenant B its owner.
#[test]
fn finding_2_a_job_uuid_captures_nothing() {
    let w = world();
    let auth = format!("OAuth {}", w.b);
    // B names the offering's UUID, then A's job's UUID, as its own job's.
    for key in [&w.offering, &w.job, &w.vm] {
        let body = json!({ "params": { "name": "b-vm", "instanceOfferingUuid": w.offering, "l3NetworkUuids": [w.l3] } });
        let (status, _, accepted) = raw_http(
            w.env.api,
            "POST",
            "/v1/vm-instances",
            Some(&body.to_string()),
            &[("Authorization", &auth), ("X-Job-UUID", key)],
        );
        assert_eq!(status, 202, "{accepted}");
        let done = wait_job_as(
            w.env.api,
            accepted["location"].as_str().unwrap(),
            ("Authorization", &auth),
        );
        assert!(done.get("error").is_none(), "{done}");
        let b_vm = done["inventory"]["uuid"].as_str().unwrap().to_owned();
        let (status, _) = as_(&w.env, &w.b, "DELETE", &format!("/v1/vm-instances/{b_vm}"), None);
        assert_eq!(status, 202);
    }
    // The offering is still the admin's: A sees it, B cannot delete it.
    let (status, reply) =
        as_(&w.env, &w.b, "DELETE", &format!("/v1/instance-offerings/{}", w.offering), None);
    assert_eq!(status, 403, "{reply}");
    // A's job under the same UUID is still A's, with A's result.
    let (status, job) = as_(&w.env, &w.a, "GET", &format!("/v1/api-jobs/{}", w.job), None);
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["inventory"]["uuid"], w.vm.as_str());
    // B reads its own job under that UUID, never A's.
    let (_, b_job) = as_(&w.env, &w.b, "GET", &format!("/v1/api-jobs/{}", w.job), None);
    assert_ne!(b_job["inventory"]["uuid"], w.vm.as_str(), "{b_job}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    w.assert_untouched();
}

/// A spelling of a UUID that is not its canonical form.
#[derive(Debug, Clone)]
enum Spelling {
    /// One character percent-encoded (upper-case hex).
    Encoded(usize),
    /// One character double-encoded (`%2533` for `3`).
    DoubleEncoded(usize),
    Upper,
    Braces,
    Urn,
    Simple,
    /// Characters appended, percent-encoded.
    Suffix(String),
    /// Hex digits prepended.
    Prefix(String),
    Nul,
    LeadingSpace,
}

impl Spelling {
    fn apply(&self, u: &str) -> String {
        match self {
            Spelling::Encoded(i) => format!("{}%{:02X}{}", &u[..*i], u.as_bytes()[*i], &u[i + 1..]),
            Spelling::DoubleEncoded(i) => {
                format!("{}%25{:02x}{}", &u[..*i], u.as_bytes()[*i], &u[i + 1..])
            }
            Spelling::Upper => u.to_uppercase(),
            Spelling::Braces => format!("%7B{u}%7D"),
            Spelling::Urn => format!("urn:uuid:{u}"),
            Spelling::Simple => u.replace('-', ""),
            Spelling::Suffix(junk) => {
                let junk: String = junk.bytes().map(|b| format!("%{b:02x}")).collect();
                format!("{u}{junk}")
            }
            Spelling::Prefix(junk) => format!("{junk}{u}"),
            Spelling::Nul => format!("{u}%00"),
            Spelling::LeadingSpace => format!("%20{u}"),
        }
    }
}

fn spellings() -> impl Strategy<Value = Spelling> {
    prop_oneof![
        (0usize..36).prop_map(Spelling::Encoded),
        (0usize..36).prop_map(Spelling::DoubleEncoded),
        Just(Spelling::Upper),
        Just(Spelling::Braces),
        Just(Spelling::Urn),
        Just(Spelling::Simple),
        "[ -~]{1,3}".prop_map(Spelling::Suffix),
        "[0-9a-f]{1,2}".prop_map(Spelling::Prefix),
        Just(Spelling::Nul),
        Just(Spelling::LeadingSpace),
    ]
}

/// The catalog's routes, from the OpenAPI document the server serves: (method, template).
fn routes(api: SocketAddr) -> Vec<(String, String)> {
    let (status, _, doc) = http(api, "GET", "/v1/openapi.json", None, &[]);
    assert_eq!(status, 200);
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), path.clone()));
        }
    }
    assert!(routes.len() > 40, "{routes:?}");
    routes
}

/// A body each mutation accepts in shape, so a refusal is the access check's and not the
/// parser's.
fn body_for(method: &str, template: &str) -> Option<Value> {
    match (method, template) {
        ("GET" | "DELETE", _) => None,
        (_, t) if t.ends_with("/actions") => Some(json!({ "stopVmInstance": {} })),
        _ => Some(json!({ "params": { "name": "x" } })),
    }
}

/// The route walk: tenant B tries every route with A's and the admin's UUIDs, in canonical
/// form and in many other spellings, and nothing is read or changed.
#[test]
fn every_route_refuses_other_accounts_under_every_spelling() {
    let w = world();
    let routes = routes(w.env.api);
    let targets = [&w.vm, &w.job, &w.tag, &w.offering, &w.l3, &w.zone, &w.a];
    let fill = |template: &str, value: &str| {
        template
            .split('/')
            .map(|s| if s.starts_with('{') { value.to_owned() } else { s.to_owned() })
            .collect::<Vec<_>>()
            .join("/")
    };
    // Canonical UUIDs of what B does not own: only shared reads succeed.
    for (method, template) in routes.iter().filter(|(_, t)| t.contains('{')) {
        for target in targets {
            let path = fill(template, target);
            let (status, reply) = as_(&w.env, &w.b, method, &path, body_for(method, template));
            let shared_read = method == "GET"
                && (template.starts_with("/v1/instance-offerings/")
                    || template.starts_with("/v1/l3-networks/")
                    || template.starts_with("/v1/images/"));
            if shared_read && (*target == w.offering || *target == w.l3) {
                continue;
            }
            if template == "/v1/api-jobs/{uuid}" {
                // B's own job under that UUID would be B's; A's is never what B reads.
                assert!(status == 404 || reply["inventory"]["uuid"] != w.vm.as_str(), "{path}");
                continue;
            }
            assert!(
                matches!(status, 400 | 403 | 404 | 405 | 409),
                "{method} {path} as another account answered {status}: {reply}"
            );
        }
    }
    // Every other spelling, on every route: a 400 (or a 404/405 from the router), never more.
    let config = ProptestConfig { cases: 24, failure_persistence: None, ..Default::default() };
    proptest!(config, |(spell in spellings(), pick in 0usize..7)| {
        for (method, template) in routes.iter().filter(|(_, t)| t.contains('{')) {
            let target = targets[pick];
            let path = fill(template, &spell.apply(target));
            let (status, reply) = as_(&w.env, &w.b, method, &path, body_for(method, template));
            prop_assert!(
                matches!(status, 400 | 404 | 405),
                "{} {} answered {}: {}", method, path, status, reply
            );
        }
    });
    w.assert_untouched();
}
