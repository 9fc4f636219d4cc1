//! The security findings, replayed as an attacker would against a real server on loopback:
//! each test names the finding it replays and fails on the code before its fix. The route
//! walk at the end tries every route of the catalog, as another account, with many spellings
//! of each UUID, and checks that nothing was read or changed.

mod common;

use std::net::SocketAddr;

use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Two tenants, the admin's shared infrastructure, and tenant A's VM with a tag and a job.
struct World {
    env: TestCluster,
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
    let env = TestCluster::start(ClusterOpts::default());
    let Infrastructure { offering, l3, .. } =
        vm_infrastructure(env.api, env.agent, "10.0.0.10", "10.0.0.20");
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    let zone = zones["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let a = env.account("tenanta", Value::Null);
    let b = env.account("tenantb", Value::Null);
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
    let (_, tags) = env.as_(&a, "GET", &format!("/v1/user-tags?q=resourceUuid={vm}"), None);
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
            self.env.as_(&self.a, "GET", &format!("/v1/vm-instances/{}", self.vm), None);
        assert_eq!(status, 200, "{vm}");
        assert_eq!(vm["inventories"][0]["state"], "Running", "{vm}");
        assert_eq!(vm["inventories"][0]["name"], "a-vm", "{vm}");
        let (status, tags) =
            self.env.as_(&self.a, "GET", &format!("/v1/user-tags?q=uuid={}", self.tag), None);
        assert_eq!((status, tags["inventories"].as_array().map(Vec::len)), (200, Some(1)));
        let (status, job) =
            self.env.as_(&self.a, "GET", &format!("/v1/api-jobs/{}", self.job), None);
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["inventory"]["uuid"], self.vm.as_str());
        for path in [
            format!("/v1/instance-offerings/{}", self.offering),
            format!("/v1/l3-networks/{}", self.l3),
        ] {
            let (status, found) = self.env.as_(&self.a, "GET", &path, None);
            assert_eq!(status, 200, "{path}: {found}");
            assert_eq!(found["inventories"].as_array().map(Vec::len), Some(1), "{path}");
        }
        let (status, _, zone) =
            http(self.env.api, "GET", &format!("/v1/zones/{}", self.zone), None, &[]);
        assert_eq!((status, zone["inventories"].as_array().map(Vec::len)), (200, Some(1)));
        // B sees nothing of A's or the admin's as its own: no capture went through.
        let (_, mine) = self.env.as_(&self.b, "GET", "/v1/vm-instances", None);
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
        let (status, reply) = w.env.as_(&w.b, method, &path, body);
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
        let (status, _) = w.env.as_(&w.b, "DELETE", &format!("/v1/vm-instances/{b_vm}"), None);
        assert_eq!(status, 202);
    }
    // The offering is still the admin's: A sees it, B cannot delete it.
    let (status, reply) =
        w.env.as_(&w.b, "DELETE", &format!("/v1/instance-offerings/{}", w.offering), None);
    assert_eq!(status, 403, "{reply}");
    // A's job under the same UUID is still A's, with A's result.
    let (status, job) = w.env.as_(&w.a, "GET", &format!("/v1/api-jobs/{}", w.job), None);
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["inventory"]["uuid"], w.vm.as_str());
    // B reads its own job under that UUID, never A's.
    let (_, b_job) = w.env.as_(&w.b, "GET", &format!("/v1/api-jobs/{}", w.job), None);
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
        (_, "/v1/api-jobs/{uuid}/actions") => Some(json!({ "cancelApiJob": {} })),
        (_, "/v1/volumes/{uuid}/actions") => Some(json!({ "detachDataVolumeFromVm": {} })),
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
            let (status, reply) = w.env.as_(&w.b, method, &path, body_for(method, template));
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
            let (status, reply) = w.env.as_(&w.b, method, &path, body_for(method, template));
            prop_assert!(
                matches!(status, 400 | 404 | 405),
                "{} {} answered {}: {}", method, path, status, reply
            );
        }
    });
    w.assert_untouched();
}

/// Finding 4: an offering of 2^64-1 bytes passed the quota and the host's free-capacity
/// check (the sums wrapped). Offerings out of bounds are refused, naming the field.
#[test]
fn finding_4_sizes_out_of_bounds_are_refused_naming_the_field() {
    let env = TestCluster::start(ClusterOpts::default());
    for (params, field) in [
        (json!({ "name": "max", "cpuNum": 1, "memorySize": u64::MAX }), "memorySize"),
        (json!({ "name": "tiny", "cpuNum": 1, "memorySize": 1 }), "memorySize"),
        (json!({ "name": "zero", "cpuNum": 0, "memorySize": 268435456u64 }), "cpuNum"),
        (json!({ "name": "wide", "cpuNum": 1u64 << 33, "memorySize": 268435456u64 }), "cpuNum"),
    ] {
        let body = json!({ "params": params }).to_string();
        let (status, _, reply) = http(env.api, "POST", "/v1/instance-offerings", Some(&body), &[]);
        assert_eq!(status, 400, "{params}: {reply}");
        assert_eq!(reply["error"]["details"]["field"], field, "{params}: {reply}");
    }
    let (_, _, offerings) = http(env.api, "GET", "/v1/instance-offerings", None, &[]);
    assert_eq!(offerings["inventories"].as_array().map(Vec::len), Some(0));
}

fn log_in_reply(env: &TestCluster, name: &str, password: &str) -> (u16, Value) {
    let body = json!({ "logInByAccount": { "accountName": name, "password": password } });
    let (status, _, reply) =
        raw_http(env.api, "PUT", "/v1/accounts/login", Some(&body.to_string()), &[]);
    (status, reply)
}

/// Finding 6: hundreds of guesses a second, no lockout. Failures now delay the next try,
/// exponentially, then lock the account name; the right password is refused while locked.
#[test]
fn finding_6_guessing_is_delayed_then_locked_out() {
    let env = TestCluster::start(
        ClusterOpts::default()
            .env("STRATO_LOGIN_LOCKOUT_ATTEMPTS", "3")
            .env("STRATO_LOGIN_LOCKOUT_SECS", "600")
            .env("STRATO_LOGIN_DELAY_MS", "100"),
    );
    let (status, _) = log_in_reply(&env, "admin", "guess-1");
    assert_eq!(status, 401);
    // At once again: held back, and told for how long.
    let (status, reply) = log_in_reply(&env, "admin", "guess-2");
    assert_eq!((status, reply["error"]["code"].as_str()), (429, Some("ID.LOGIN_THROTTLED")));
    let wait = reply["error"]["details"]["retryAfterMs"].as_u64().unwrap();
    assert!((1..=100).contains(&wait), "{reply}");
    let mut guesses = 1;
    while guesses < 3 {
        std::thread::sleep(std::time::Duration::from_millis(450));
        let (status, reply) = log_in_reply(&env, "admin", "guess");
        assert_eq!(status, 401, "{reply}");
        guesses += 1;
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (status, reply) = log_in_reply(&env, "admin", ADMIN_PASSWORD);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (429, Some("ID.LOGIN_LOCKED")),
        "{reply}"
    );
    // The log names the failures, never the passwords.
    let log = std::fs::read_to_string(log_path(&env.data.clone())).unwrap();
    assert!(log.contains("failed login"), "{log}");
    assert!(!log.contains("guess") && !log.contains(ADMIN_PASSWORD), "{log}");
}

/// Finding 6: an unknown account answered 30 times faster than a wrong password. Both now
/// cost one argon2 verification; the bound below is loose (a third), since the machines are
/// noisy, and the oracle was a factor of 30.
#[test]
fn finding_6_an_unknown_account_costs_what_a_wrong_password_costs() {
    let env = TestCluster::start(
        ClusterOpts::default()
            .env("STRATO_LOGIN_LOCKOUT_ATTEMPTS", "1000")
            .env("STRATO_LOGIN_DELAY_MS", "0"),
    );
    let time = |name: &str| {
        let started = std::time::Instant::now();
        for _ in 0..8 {
            assert_eq!(log_in_reply(&env, name, "wrong-password").0, 401);
        }
        started.elapsed()
    };
    let _ = time("admin"); // warm
    let wrong_password = time("admin");
    let unknown = time("nobody-by-this-name");
    assert!(
        unknown * 3 > wrong_password,
        "unknown {unknown:?} vs wrong password {wrong_password:?}"
    );
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            found.push(bytes);
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Finding 7: session tokens logged and stored raw, kept alive by a password change, a
/// session made by a refused console login, API keys that never expire.
#[test]
fn finding_7_tokens_are_hashed_unlogged_revoked_and_expire() {
    let env = TestCluster::start(ClusterOpts::default());
    create(env.api, "/v1/accounts", json!({ "name": "tenanta", "password": "tenanta-password" }));
    let first = log_in(env.api, "tenanta", "tenanta-password");
    let second = log_in(env.api, "tenanta", "tenanta-password");
    let (status, key) =
        env.as_(&first, "POST", "/v1/accounts/api-keys", Some(json!({ "params": {} })));
    assert_eq!(status, 200, "{key}");
    let key_auth =
        key["inventory"]["authorization"].as_str().unwrap().trim_start_matches("OAuth ").to_owned();

    // Neither the log nor the store holds a token, in text or as bytes.
    let data = env.data.clone();
    let log = std::fs::read_to_string(log_path(&data)).unwrap();
    let token = strato_actors::canonical_uuid(&first).unwrap();
    assert!(!log.contains(&first) && !log.contains(&token.simple().to_string()), "{log}");
    for file in files_under(&data) {
        assert!(!contains(&file, token.as_bytes()) && !contains(&file, first.as_bytes()));
    }

    // A tenant changes its own password only with the old one; the change ends the other
    // session and the key, and keeps the one that made it.
    let tenant = env.as_(&second, "GET", "/v1/accounts", None).1["inventories"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/accounts/{tenant}/actions");
    let (status, reply) = env.as_(
        &second,
        "PUT",
        &path,
        Some(json!({ "updateAccount": { "password": "new-password-1" } })),
    );
    assert_eq!(
        (status, reply["error"]["details"]["field"].as_str()),
        (400, Some("updateAccount.oldPassword"))
    );
    let (status, reply) = env.as_(
        &second,
        "PUT",
        &path,
        Some(
            json!({ "updateAccount": { "password": "new-password-1", "oldPassword": "not-it-at-all" } }),
        ),
    );
    assert_eq!((status, reply["error"]["code"].as_str()), (403, Some("ID.WRONG_PASSWORD")));
    let (status, accepted) = env.as_(
        &second,
        "PUT",
        &path,
        Some(
            json!({ "updateAccount": { "password": "new-password-1", "oldPassword": "tenanta-password" } }),
        ),
    );
    assert_eq!(status, 202, "{accepted}");
    let auth = format!("OAuth {second}");
    wait_job_as(env.api, accepted["location"].as_str().unwrap(), ("Authorization", &auth));
    assert_eq!(env.as_(&first, "GET", "/v1/vm-instances", None).0, 401);
    assert_eq!(env.as_(&key_auth, "GET", "/v1/vm-instances", None).0, 401);
    assert_eq!(env.as_(&second, "GET", "/v1/vm-instances", None).0, 200);
    log_in(env.api, "tenanta", "new-password-1");

    // A tenant's right password at the console's login: 403, no cookie, no session.
    let logged_in_before =
        std::fs::read_to_string(log_path(&data)).unwrap().matches("logged in").count();
    let form = json!({ "accountName": "tenanta", "password": "new-password-1" }).to_string();
    let (status, headers, _) = raw_http(
        env.api,
        "POST",
        "/console/login",
        Some(&form),
        &[("Content-Type", "application/json")],
    );
    assert_eq!(status, 403);
    assert!(!headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("set-cookie")), "{headers:?}");
    let logged_in_after =
        std::fs::read_to_string(log_path(&data)).unwrap().matches("logged in").count();
    assert_eq!(logged_in_before, logged_in_after, "a session was made");

    // An API key with a lifetime stops working when it ends.
    let (_, key) = env.as_(
        &second,
        "POST",
        "/v1/accounts/api-keys",
        Some(json!({ "params": { "expiresInSeconds": 1 } })),
    );
    let short =
        key["inventory"]["authorization"].as_str().unwrap().trim_start_matches("OAuth ").to_owned();
    assert_eq!(env.as_(&short, "GET", "/v1/vm-instances", None).0, 200);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (status, reply) = env.as_(&short, "GET", "/v1/vm-instances", None);
    assert_eq!((status, reply["error"]["code"].as_str()), (401, Some("ID.SESSION_EXPIRED")));
}

/// Finding 8: the console's cookie was honoured on every route, with no Origin check (a
/// `text/plain` POST from another origin created a zone).
#[test]
fn finding_8_the_cookie_works_only_for_the_consoles_own_requests() {
    let env = TestCluster::start(ClusterOpts::default());
    let form = json!({ "accountName": "admin", "password": ADMIN_PASSWORD }).to_string();
    let (status, headers, _) = raw_http(
        env.api,
        "POST",
        "/console/login",
        Some(&form),
        &[("Content-Type", "application/json")],
    );
    assert_eq!(status, 200);
    let cookie = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.split(';').next().unwrap().to_owned())
        .unwrap();
    // A form on another origin can post text/plain to the login, but it is refused.
    let (status, _, _) =
        raw_http(env.api, "POST", "/console/login", Some(&form), &[("Content-Type", "text/plain")]);
    assert_eq!(status, 415);
    // The cookie does nothing on /v1.
    let zone = json!({ "params": { "name": "csrf" } }).to_string();
    let (status, _, _) = raw_http(
        env.api,
        "POST",
        "/v1/zones",
        Some(&zone),
        &[("Cookie", &cookie), ("Content-Type", "text/plain"), ("Origin", "http://evil.example")],
    );
    assert_eq!(status, 401);
    // It reads /debug; a change needs the console's origin and header.
    assert_eq!(raw_http(env.api, "GET", "/debug/tree", None, &[("Cookie", &cookie)]).0, 200);
    let host = env.api.to_string();
    let own_origin = format!("http://{host}");
    for headers in [
        vec![("Cookie", cookie.as_str())],
        vec![
            ("Cookie", cookie.as_str()),
            ("Origin", "http://evil.example"),
            ("X-Strato-Console", "1"),
        ],
        vec![("Cookie", cookie.as_str()), ("Origin", own_origin.as_str())],
    ] {
        let (status, _, reply) =
            raw_http(env.api, "POST", "/debug/actions/no-such-action", Some("{}"), &headers);
        assert_eq!(status, 403, "{headers:?}: {reply}");
    }
    let (status, _, reply) = raw_http(
        env.api,
        "POST",
        "/debug/actions/no-such-action",
        Some("{}"),
        &[("Cookie", &cookie), ("Origin", &own_origin), ("X-Strato-Console", "1")],
    );
    assert_ne!(status, 403, "{reply}");
    assert_ne!(status, 401, "{reply}");
    // The page is framed by nothing, runs only its own script, and is not sniffed.
    let (_, headers, _) = raw_http(env.api, "GET", "/console", None, &[]);
    let header = |name: &str| {
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    assert!(header("content-security-policy").unwrap().contains("script-src 'self'"));
    assert_eq!(header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));
}

/// Finding 9: tenants saw host UUIDs, volume paths and placement traces; `Location`
/// reflected `Host`; `/metrics` was public.
#[test]
fn finding_9_tenants_see_no_internals() {
    let w = world();
    let (_, vm) = w.env.as_(&w.a, "GET", &format!("/v1/vm-instances/{}", w.vm), None);
    let (_, job) = w.env.as_(&w.a, "GET", &format!("/v1/api-jobs/{}", w.job), None);
    let (_, list) = w.env.as_(&w.a, "GET", "/v1/vm-instances", None);
    for answer in [&vm, &job, &list] {
        let text = answer.to_string();
        for hidden in ["hostUuid", "rootVolumePath", "bridge"] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
        assert!(text.contains(&w.vm), "{text}");
    }
    // The admin still sees them.
    let (_, _, admin_view) =
        http(w.env.api, "GET", &format!("/v1/vm-instances/{}", w.vm), None, &[]);
    assert!(admin_view["inventories"][0]["hostUuid"].is_string(), "{admin_view}");
    // Nor can a query select by them.
    let (status, reply) = w.env.as_(&w.a, "GET", "/v1/vm-instances?q=hostUuid!=null", None);
    assert_eq!((status, reply["error"]["details"]["field"].as_str()), (400, Some("q")), "{reply}");
    let (status, _) = w.env.as_(&w.a, "GET", "/v1/vm-instances?sort=rootVolumePath", None);
    assert_eq!(status, 400);
    // A placement failure tells the tenant no host could take it, not why.
    let huge = create(
        w.env.api,
        "/v1/instance-offerings",
        json!({ "name": "huge", "cpuNum": 1, "memorySize": 1u64 << 36 }),
    );
    let body = json!({ "params": { "name": "big", "instanceOfferingUuid": huge["uuid"], "l3NetworkUuids": [w.l3] } });
    let (status, _, accepted) = raw_http(
        w.env.api,
        "POST",
        "/v1/vm-instances",
        Some(&body.to_string()),
        &[("Authorization", &format!("OAuth {}", w.a)), ("Host", "evil.example")],
    );
    assert_eq!(status, 202);
    let location = accepted["location"].as_str().unwrap();
    assert!(location.starts_with("/v1/api-jobs/"), "{location}");
    let failed = wait_job_as(w.env.api, location, ("Authorization", &format!("OAuth {}", w.a)));
    assert_eq!(failed["error"]["code"], "HOST_ALLOCATION.NO_HOST", "{failed}");
    assert!(failed["error"]["details"].get("placementTrace").is_none(), "{failed}");
    // /metrics is the admin's.
    assert_eq!(raw_http(w.env.api, "GET", "/metrics", None, &[]).0, 401);
    assert_eq!(w.env.as_(&w.a, "GET", "/metrics", None).0, 403);
    w.assert_untouched();
}

/// Finding 10: names with NUL, `/`, ESC or 10,000 characters were accepted; unknown keys
/// ignored; the `field` wrong; IPAM took a /0 mask, loopback and multicast; header reads
/// never timed out.
#[test]
fn finding_10_input_is_validated_at_the_door() {
    let env = TestCluster::start(ClusterOpts::default());
    let long = "x".repeat(10_000);
    for name in ["nul\u{0}", "a/b", "esc\u{1b}[31m", long.as_str(), "  "] {
        let body = json!({ "params": { "name": name } }).to_string();
        let (status, _, reply) = http(env.api, "POST", "/v1/zones", Some(&body), &[]);
        assert_eq!(
            (status, reply["error"]["details"]["field"].as_str()),
            (400, Some("name")),
            "{reply}"
        );
    }
    for (body, field) in [
        (json!({ "parms": { "name": "z" } }), "parms"),
        (json!({ "params": { "name": "z", "colour": "red" } }), "colour"),
        (json!({ "params": { "name": "o", "cpuNum": 1.5, "memorySize": 268435456u64 } }), "cpuNum"),
    ] {
        let path =
            if body["params"]["cpuNum"].is_null() { "/v1/zones" } else { "/v1/instance-offerings" };
        let (status, _, reply) = http(env.api, "POST", path, Some(&body.to_string()), &[]);
        assert_eq!(
            (status, reply["error"]["details"]["field"].as_str()),
            (400, Some(field)),
            "{body}: {reply}"
        );
    }
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    assert_eq!(zones["inventories"].as_array().map(Vec::len), Some(0), "nothing was created");
    // Inside an action's object too, and one action per request.
    let admin = "00000000-0000-0000-0000-000000000000";
    let (_, _, accounts) = http(env.api, "GET", "/v1/accounts", None, &[]);
    let me = accounts["inventories"][0]["uuid"].as_str().unwrap_or(admin).to_owned();
    let path = format!("/v1/accounts/{me}/actions");
    for (body, field) in [
        (
            json!({ "updateQuota": { "vmNum": 1, "cpuNum": 1, "memorySize": 1, "gpus": 1 } }),
            "updateQuota.gpus",
        ),
        (json!({ "updateAccount": { "password": "long-enough-1" }, "updateQuota": {} }), "action"),
    ] {
        let (status, _, reply) = http(env.api, "PUT", &path, Some(&body.to_string()), &[]);
        assert_eq!(
            (status, reply["error"]["details"]["field"].as_str()),
            (400, Some(field)),
            "{body}: {reply}"
        );
    }

    // A client that never finishes its headers is cut off.
    use std::io::{Read, Write};
    let mut slow = std::net::TcpStream::connect(env.api).unwrap();
    slow.write_all(b"GET /v1/zones HTTP/1.1\r\nHost: x\r\n").unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(started.elapsed() < std::time::Duration::from_secs(25), "the connection stayed open");
}

/// A zone with a backup storage in `<env>/bs`: its UUID and directory.
fn backup_storage(env: &TestCluster) -> (String, std::path::PathBuf) {
    let dir = env.dir().join("bs");
    let (_, _, zones) = http(env.api, "GET", "/v1/zones", None, &[]);
    let zone = match zones["inventories"][0]["uuid"].as_str() {
        Some(zone) => zone.to_owned(),
        None => create(env.api, "/v1/zones", json!({ "name": "z" }))["uuid"]
            .as_str()
            .unwrap()
            .to_owned(),
    };
    let bs = create(
        env.api,
        "/v1/backup-storage/image-store",
        json!({ "name": "bs", "url": dir.display().to_string() }),
    );
    let bs = bs["uuid"].as_str().unwrap().to_owned();
    ok(env.api, "POST", &format!("/v1/zones/{zone}/backup-storage/{bs}"), None);
    (bs, dir)
}

/// Finding 5: an import read `file:///etc/shadow`, the API's own `/metrics` and
/// `file:///dev/zero` without end, and tenants saw the URL. Now: files only under the
/// import directories, no local addresses, a size cap, and no URL in a tenant's view.
#[test]
fn finding_5_imports_read_only_what_the_server_allows() {
    let env = TestCluster::start(
        ClusterOpts::default()
            .env("STRATO_IMAGE_FILE_DIRS", "/dev")
            .env("STRATO_IMAGE_MAX_BYTES", "1048576"),
    );
    let (bs, dir) = backup_storage(&env);
    let image = |url: &str| {
        let body = json!({ "params": { "name": "i", "url": url, "format": "raw", "backupStorageUuids": [bs] } });
        http(env.api, "POST", "/v1/images", Some(&body.to_string()), &[])
    };
    for url in [
        "file:///etc/shadow".to_owned(),
        "file:///dev/../etc/shadow".to_owned(),
        format!("http://{}/metrics", env.api),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
    ] {
        let (status, _, reply) = image(&url);
        assert_eq!(
            (status, reply["error"]["details"]["field"].as_str()),
            (400, Some("url")),
            "{url}: {reply}"
        );
    }
    // An endless file stops at the cap and leaves nothing behind.
    let (status, _, accepted) = image("file:///dev/zero");
    assert_eq!(status, 202, "{accepted}");
    let failed = wait_job(env.api, accepted["location"].as_str().unwrap());
    assert_eq!(failed["error"]["code"], "IMAGE.DOWNLOAD_FAILED", "{failed}");
    let left: Vec<_> = std::fs::read_dir(&dir).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // A tenant sees an image without where it came from or where it is.
    let source = env.data.clone().join("image-imports");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("ok.raw"), b"image").unwrap();
    let (status, _, accepted) = image(&format!("file://{}", source.join("ok.raw").display()));
    assert_eq!(status, 202);
    let made = wait_job(env.api, accepted["location"].as_str().unwrap());
    let uuid = made["inventory"]["uuid"].as_str().unwrap().to_owned();
    let tenant = env.account("tenanta", Value::Null);
    let (status, seen) = env.as_(&tenant, "GET", &format!("/v1/images/{uuid}"), None);
    assert_eq!(status, 200, "{seen}");
    let text = seen.to_string();
    assert!(
        !text.contains("file://") && !text.contains("image-imports") && !text.contains("bs"),
        "{text}"
    );
}

/// Finding 5, "no cancel": a running import is cancelled by its owner (`CancelApiJob`),
/// ends `SYS.JOB_CANCELLED` and leaves no `.part`; another account cannot cancel it, and a
/// finished job has nothing to cancel.
#[test]
fn finding_5_a_running_import_is_cancelled_by_its_owner_alone() {
    let env = TestCluster::start(ClusterOpts::default().env("STRATO_IMAGE_ALLOW_LOCAL", "1"));
    let (bs, dir) = backup_storage(&env);
    // A mirror that promises a gigabyte and trickles it.
    let mirror = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mirror_addr = mirror.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut socket in mirror.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request);
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n");
            while socket.write_all(&[0u8; 4096]).is_ok() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    });
    let body = json!({ "params": { "name": "slow", "url": format!("http://{mirror_addr}/big.raw"),
        "format": "raw", "backupStorageUuids": [bs] } });
    let (status, _, accepted) = http(env.api, "POST", "/v1/images", Some(&body.to_string()), &[]);
    assert_eq!(status, 202, "{accepted}");
    let location = accepted["location"].as_str().unwrap().to_owned();
    let job = location.rsplit('/').next().unwrap().to_owned();
    let parts = || {
        std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_else(|_| Vec::<String>::new())
    };
    let started = std::time::Instant::now();
    while !parts().iter().any(|p| p.ends_with(".part")) {
        assert!(started.elapsed().as_secs() < 30, "the import never started: {:?}", parts());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let cancel = json!({ "cancelApiJob": {} });
    let actions = format!("/v1/api-jobs/{job}/actions");
    // Another account's cancel finds no such job, and the import goes on.
    let tenant = env.account("tenantb", Value::Null);
    let (status, reply) = env.as_(&tenant, "PUT", &actions, Some(cancel.clone()));
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (404, Some("SYS.RESOURCE_NOT_FOUND")),
        "{reply}"
    );
    // Nor does its wait for the job's end: it answers at once.
    let waited = format!("/v1/api-jobs/{job}?waitSeconds=2");
    let (status, reply) = env.as_(&tenant, "GET", &waited, None);
    assert_eq!(status, 404, "{reply}");
    // The owner's wait runs out with the import still running.
    let (status, _, running) =
        http(env.api, "GET", &format!("/v1/api-jobs/{job}?waitSeconds=1"), None, &[]);
    assert_eq!((status, running["state"].as_str()), (202, Some("Running")), "{running}");
    // Only cancelApiJob is a job action.
    let (status, _, reply) =
        http(env.api, "PUT", &actions, Some(&json!({ "pauseApiJob": {} }).to_string()), &[]);
    assert_eq!(
        (status, reply["error"]["details"]["field"].as_str()),
        (400, Some("pauseApiJob")),
        "{reply}"
    );
    // The owner's cancel is a job that ends once the import has.
    let (status, _, accepted) = http(env.api, "PUT", &actions, Some(&cancel.to_string()), &[]);
    assert_eq!(status, 202, "{accepted}");
    let cancelled = wait_job(env.api, accepted["location"].as_str().unwrap());
    assert_eq!(cancelled["inventory"]["state"], "Cancelled", "{cancelled}");
    let import = wait_job(env.api, &location);
    assert_eq!(import["error"]["code"], "SYS.JOB_CANCELLED", "{import}");
    assert!(parts().is_empty(), "the cancelled import left {:?}", parts());
    let (_, _, images) = http(env.api, "GET", "/v1/images?q=name=slow", None, &[]);
    assert_eq!(images["inventories"].as_array().map(Vec::len), Some(0), "{images}");
    // A finished job has nothing left to cancel.
    let (status, _, reply) = http(env.api, "PUT", &actions, Some(&cancel.to_string()), &[]);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (409, Some("SYS.JOB_NOT_RUNNING")),
        "{reply}"
    );
}

/// VIPs, EIPs and port forwarding rules are their creator's: another account neither sees
/// them, nor builds on them, nor points its own at the first one's NICs.
#[test]
fn vips_eips_and_rules_are_their_owners_alone() {
    let w = world();
    let api = w.env.api;
    let (_, _, zones) = http(api, "GET", "/v1/zones", None, &[]);
    let zone = zones["inventories"][0]["uuid"].clone();
    let l2 = create(
        api,
        "/v1/l2-networks/no-vlan",
        json!({ "name": "public", "zoneUuid": zone, "physicalInterface": "eth9" }),
    );
    let public =
        create(api, "/v1/l3-networks", json!({ "name": "public", "l2NetworkUuid": l2["uuid"] }));
    let public = public["uuid"].as_str().unwrap().to_owned();
    create(
        api,
        &format!("/v1/l3-networks/{public}/ip-ranges"),
        json!({ "startIp": "10.99.0.10", "endIp": "10.99.0.20", "netmask": "255.255.255.0", "gateway": "10.99.0.1" }),
    );
    let vip_of = |session: &str, name: &str| -> String {
        let made = w.env.done_as(
            session,
            "POST",
            "/v1/vips",
            json!({ "params": { "name": name, "l3NetworkUuid": public } }),
        );
        made["inventory"]["uuid"].as_str().unwrap_or_else(|| panic!("{made}")).to_owned()
    };
    let a_vip = vip_of(&w.a, "a-vip");
    let made = w.env.done_as(
        &w.a,
        "POST",
        "/v1/eips",
        json!({ "params": { "name": "a-eip", "vipUuid": a_vip } }),
    );
    let a_eip = made["inventory"]["uuid"].as_str().unwrap().to_owned();
    let (_, vms) = w.env.as_(&w.a, "GET", &format!("/v1/vm-instances/{}", w.vm), None);
    let a_nic = vms["inventories"][0]["vmNics"][0]["uuid"].as_str().unwrap().to_owned();

    // B sees none of A's.
    for path in ["/v1/vips", "/v1/eips", "/v1/port-forwarding"] {
        let (status, seen) = w.env.as_(&w.b, "GET", path, None);
        assert_eq!(
            (status, seen["inventories"].as_array().map(Vec::len)),
            (200, Some(0)),
            "{path}: {seen}"
        );
    }
    for path in [format!("/v1/vips/{a_vip}"), format!("/v1/eips/{a_eip}")] {
        assert_eq!(w.env.as_(&w.b, "GET", &path, None).0, 404, "{path}");
    }
    // Nor builds on A's VIP, nor attaches A's EIP, nor deletes either.
    let b_vip = vip_of(&w.b, "b-vip");
    for (method, path, body) in [
        ("POST", "/v1/eips".to_owned(), json!({ "params": { "name": "x", "vipUuid": a_vip } })),
        (
            "POST",
            "/v1/port-forwarding".to_owned(),
            json!({ "params": { "name": "x", "vipUuid": a_vip, "vipPortStart": 22, "protocolType": "TCP" } }),
        ),
        // B's own EIP and rule, pointed at A's NIC.
        (
            "POST",
            "/v1/eips".to_owned(),
            json!({ "params": { "name": "x", "vipUuid": b_vip, "vmNicUuid": a_nic } }),
        ),
        (
            "POST",
            "/v1/port-forwarding".to_owned(),
            json!({ "params": { "name": "x", "vipUuid": b_vip, "vipPortStart": 22, "protocolType": "TCP", "vmNicUuid": a_nic } }),
        ),
        (
            "PUT",
            format!("/v1/eips/{a_eip}/actions"),
            json!({ "attachEip": { "vmNicUuid": a_nic } }),
        ),
        ("PUT", format!("/v1/eips/{a_eip}/actions"), json!({ "detachEip": {} })),
        ("DELETE", format!("/v1/eips/{a_eip}"), Value::Null),
        ("DELETE", format!("/v1/vips/{a_vip}"), Value::Null),
    ] {
        let body = (!body.is_null()).then_some(body);
        let (status, reply) = w.env.as_(&w.b, method, &path, body);
        assert_eq!(status, 404, "{method} {path}: {reply}");
    }
    let made = w.env.done_as(
        &w.b,
        "POST",
        "/v1/eips",
        json!({ "params": { "name": "b-eip", "vipUuid": b_vip } }),
    );
    let b_eip = made["inventory"]["uuid"].as_str().unwrap().to_owned();
    let (status, reply) = w.env.as_(
        &w.b,
        "PUT",
        &format!("/v1/eips/{b_eip}/actions"),
        Some(json!({ "attachEip": { "vmNicUuid": a_nic } })),
    );
    assert_eq!(status, 404, "{reply}");
    // A's are as they were.
    let (_, eip) = w.env.as_(&w.a, "GET", &format!("/v1/eips/{a_eip}"), None);
    assert_eq!(eip["inventories"][0]["vipUuid"], a_vip.as_str(), "{eip}");
    let (_, vip) = w.env.as_(&w.a, "GET", &format!("/v1/vips/{a_vip}"), None);
    assert_eq!(vip["inventories"][0]["useFor"], "Eip", "{vip}");
    w.assert_untouched();
}

/// Data volumes are their creators' alone: another account neither sees nor attaches,
/// detaches, deletes, recovers nor expunges them, nor attaches its own to their VMs; disk
/// offerings and a volume's primary storage are the admin's to choose; a tenant never sees
/// where a volume lives.
#[test]
fn data_volumes_are_their_owners_alone() {
    let w = world();
    let api = w.env.api;
    let offering =
        create(api, "/v1/disk-offerings", json!({ "name": "d", "diskSize": 1u64 << 30 }));
    let volume_of = |session: &str, name: &str| -> String {
        let made = w.env.done_as(
            session,
            "POST",
            "/v1/volumes/data",
            json!({ "params": { "name": name, "diskOfferingUuid": offering["uuid"] } }),
        );
        made["inventory"]["uuid"].as_str().unwrap_or_else(|| panic!("{made}")).to_owned()
    };
    let (a_volume, b_volume) = (volume_of(&w.a, "a-volume"), volume_of(&w.b, "b-volume"));
    let (_, seen) = w.env.as_(&w.b, "GET", "/v1/volumes", None);
    let names: Vec<&str> =
        seen["inventories"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["b-volume"], "{seen}");
    let attach_to = |vm: &str| json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } });
    for (method, path, body) in [
        ("GET", format!("/v1/volumes/{a_volume}"), Value::Null),
        ("PUT", format!("/v1/volumes/{a_volume}/actions"), attach_to(&w.vm)),
        ("PUT", format!("/v1/volumes/{b_volume}/actions"), attach_to(&w.vm)),
        ("PUT", format!("/v1/volumes/{a_volume}/actions"), json!({ "detachDataVolumeFromVm": {} })),
        ("PUT", format!("/v1/volumes/{a_volume}/actions"), json!({ "recoverDataVolume": {} })),
        ("PUT", format!("/v1/volumes/{a_volume}/actions"), json!({ "expungeDataVolume": {} })),
        ("DELETE", format!("/v1/volumes/{a_volume}"), Value::Null),
        (
            "POST",
            format!("/v1/volumes/{a_volume}/volume-snapshots"),
            json!({ "params": { "name": "s" } }),
        ),
        (
            "POST",
            format!("/v1/images/data-volume-templates/from/volumes/{a_volume}"),
            json!({ "params": { "name": "t", "backupStorageUuids": [w.zone] } }),
        ),
    ] {
        let body = (!body.is_null()).then_some(body);
        let (status, reply) = w.env.as_(&w.b, method, &path, body);
        assert_eq!(status, 404, "{method} {path}: {reply}");
    }
    for (path, params) in [
        ("/v1/disk-offerings", json!({ "name": "mine", "diskSize": 1u64 << 30 })),
        (
            "/v1/volumes/data",
            json!({ "name": "placed", "diskSize": 1u64 << 30, "primaryStorageUuid": w.zone }),
        ),
    ] {
        let (status, reply) = w.env.as_(&w.b, "POST", path, Some(json!({ "params": params })));
        assert_eq!(status, 403, "{path}: {reply}");
    }
    let (_, mine) = w.env.as_(&w.a, "GET", &format!("/v1/volumes/{a_volume}"), None);
    let inventory = mine["inventories"][0].as_object().unwrap();
    assert_eq!(inventory["status"], "NotInstantiated", "{mine}");
    for hidden in ["installPath", "primaryStorageUuid", "hostUuid"] {
        assert!(!inventory.contains_key(hidden), "a tenant sees `{hidden}`: {mine}");
    }
    w.assert_untouched();
}
