//! Real processes for API tests: the `strato` server and the `strato-agent` binary on
//! libvirt's test driver, on loopback ports, and a small HTTP client (curl's part). Each agent
//! enrolls with its server as a real host's does, from a bootstrap file (`strato
//! agent-bootstrap`) minted in the server's data directory before the server starts.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where a process whose data is in `dir` logs: `<dir>.log` beside it (appended to, so a
/// restarted process adds to the same file).
pub fn log_path(dir: &Path) -> PathBuf {
    dir.with_extension("log")
}

fn log_file(dir: &Path) -> std::fs::File {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::OpenOptions::new().create(true).append(true).open(log_path(dir)).unwrap()
}

pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(addr: SocketAddr, child: &mut Child) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

/// The `strato-agent` binary beside `strato` (built on demand when only this package's tests
/// were built).
pub fn agent_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_strato")).with_file_name("strato-agent");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "strato-agent", "--bin", "strato-agent"])
            .status()
            .unwrap();
        assert!(status.success(), "building strato-agent failed");
    }
    path
}

/// A fresh bootstrap file for one agent of the node whose data directory is `data_dir`
/// (made, with its CA, if the node has not started yet), written beside that directory.
pub fn bootstrap(data_dir: &Path) -> PathBuf {
    let name = format!("bootstrap-{}", uuid::Uuid::new_v4().simple());
    let out_path = data_dir.with_file_name(name);
    let out = Command::new(env!("CARGO_BIN_EXE_strato"))
        .arg("agent-bootstrap")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out_path
}

pub fn start_agent(bootstrap: &Path, dir: &Path) -> (Proc, SocketAddr) {
    start_agent_with(bootstrap, dir, &["--driver", "libvirt", "--libvirt-uri", "test:///default"])
}

/// An agent enrolling with the bootstrap file `bootstrap`, its data in `dir`.
pub fn start_agent_with(bootstrap: &Path, dir: &Path, driver_args: &[&str]) -> (Proc, SocketAddr) {
    let addr = free_port();
    let mut child = Command::new(agent_binary())
        .args(driver_args)
        .args(["--listen", &addr.to_string(), "--data-dir"])
        .arg(dir)
        .arg("--bootstrap-file")
        .arg(bootstrap)
        .stdout(Stdio::null())
        .stderr(log_file(dir))
        .spawn()
        .unwrap();
    wait_listening(addr, &mut child);
    (Proc { child }, addr)
}

/// The admin password every test server starts with.
pub const ADMIN_PASSWORD: &str = "test-admin-password";

pub fn start_server(data_dir: &Path, addr: SocketAddr) -> Proc {
    start_server_with(data_dir, addr, &[])
}

/// [`start_server`] with extra environment (`STRATO_SESSION_TIMEOUT_SECS`).
pub fn start_server_with(data_dir: &Path, addr: SocketAddr, env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strato"))
        .envs(env.iter().copied())
        .env("STRATO_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .args(["server", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::null())
        .stderr(log_file(data_dir))
        .spawn()
        .unwrap();
    wait_listening(addr, &mut child);
    Proc { child }
}

/// The admin sessions the tests hold, by server.
static SESSIONS: std::sync::Mutex<Vec<(SocketAddr, String)>> = std::sync::Mutex::new(Vec::new());

/// An admin session on the server at `addr` (logged in once per server).
pub fn admin_session(addr: SocketAddr) -> String {
    if let Some((_, session)) = SESSIONS.lock().unwrap().iter().find(|(a, _)| *a == addr) {
        return session.clone();
    }
    let session = log_in(addr, "admin", ADMIN_PASSWORD);
    SESSIONS.lock().unwrap().push((addr, session.clone()));
    session
}

/// Logs in; returns the session's UUID.
pub fn log_in(addr: SocketAddr, account: &str, password: &str) -> String {
    let body =
        serde_json::json!({ "logInByAccount": { "accountName": account, "password": password } });
    let (status, _, reply) =
        raw_http(addr, "PUT", "/v1/accounts/login", Some(&body.to_string()), &[]);
    assert_eq!(status, 200, "log in as {account}: {reply}");
    reply["inventory"]["uuid"].as_str().unwrap().to_owned()
}

/// One HTTP/1.1 request as the admin (unless `headers` carry an `Authorization`); returns the
/// status, the headers and the JSON body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Value) {
    if headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
        return raw_http(addr, method, path, body, headers);
    }
    let auth = format!("OAuth {}", admin_session(addr));
    let mut with_auth = headers.to_vec();
    with_auth.push(("Authorization", &auth));
    raw_http(addr, method, path, body, &with_auth)
}

/// One HTTP/1.1 request with exactly `headers`.
pub fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()))
    };
    (status, headers, json)
}

/// Waits for a job to end; returns its final body (`{"inventory": ...}` or `{"error": ...}`).
pub fn wait_job(addr: SocketAddr, location: &str) -> Value {
    let auth = format!("OAuth {}", admin_session(addr));
    wait_job_as(addr, location, ("Authorization", &auth))
}

/// [`wait_job`] with the given `Authorization` header.
pub fn wait_job_as(addr: SocketAddr, location: &str, auth: (&str, &str)) -> Value {
    let path = location.split_once("/v1/").map(|(_, p)| format!("/v1/{p}")).unwrap();
    let started = Instant::now();
    loop {
        let (status, _, body) = raw_http(addr, "GET", &path, None, &[auth]);
        if status == 200 {
            return body;
        }
        assert_eq!(status, 202, "{body}");
        assert!(started.elapsed() < Duration::from_secs(60), "job {path} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// POSTs/PUTs/DELETEs, expects 202, and waits for the job's end.
pub fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Value {
    let (status, headers, reply) = http(addr, method, path, body, &[]);
    assert_eq!(status, 202, "{method} {path}: {reply}");
    let location = reply["location"].as_str().unwrap().to_owned();
    assert!(headers.iter().any(|(k, v)| k == "location" && *v == location));
    wait_job(addr, &location)
}

/// Like [`call`], but expects success and returns the inventory.
pub fn ok(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Value {
    let done = call(addr, method, path, body);
    assert!(done.get("error").is_none(), "{method} {path} failed: {done}");
    done["inventory"].clone()
}

/// A creation as the admin, followed to its end; returns the inventory.
pub fn create(addr: SocketAddr, path: &str, params: Value) -> Value {
    ok(addr, "POST", path, Some(&serde_json::json!({ "params": params }).to_string()))
}

/// What a VM needs, made by the admin.
pub struct Infrastructure {
    /// The host whose agent the caller started.
    pub host: Value,
    /// 1 CPU, 256 MiB.
    pub offering: Value,
    /// An L3 network with the addresses asked for.
    pub l3: Value,
}

/// A zone, a cluster, the host whose agent listens at `agent`, an offering and an L3
/// network with the range `start`-`end` (a /24 whose gateway is `.1`).
pub fn vm_infrastructure(
    addr: SocketAddr,
    agent: SocketAddr,
    start: &str,
    end: &str,
) -> Infrastructure {
    use serde_json::json;
    let zone = create(addr, "/v1/zones", json!({ "name": "z1" }));
    let cluster = create(addr, "/v1/clusters", json!({ "name": "c1", "zoneUuid": zone["uuid"] }));
    let host = create(
        addr,
        "/v1/hosts/kvm",
        json!({ "name": "h1", "managementIp": "127.0.0.1", "agentPort": agent.port(), "clusterUuid": cluster["uuid"] }),
    );
    let offering = create(
        addr,
        "/v1/instance-offerings",
        json!({ "name": "small", "cpuNum": 1, "memorySize": 268435456u64 }),
    );
    let l3 = create(addr, "/v1/l3-networks", json!({ "name": "pub" }));
    let gateway = format!("{}.1", start.rsplit_once('.').unwrap().0);
    create(
        addr,
        &format!("/v1/l3-networks/{}/ip-ranges", l3["uuid"].as_str().unwrap()),
        json!({ "startIp": start, "endIp": end, "netmask": "255.255.255.0", "gateway": gateway }),
    );
    Infrastructure { host, offering, l3 }
}
