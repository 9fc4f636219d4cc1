//! Real processes for API tests ([`TestCluster`]): the `strato` server and `strato-agent`
//! binaries (libvirt's test driver or the sim driver) on loopback ports, and requests through
//! the API's own client. Each agent enrolls with its server as a real host's does, from a
//! bootstrap file (`strato agent-bootstrap`) minted in the server's data directory before the
//! server starts.

#![allow(dead_code, unreachable_pub)]

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

/// An agent enrolling with the bootstrap file `bootstrap`, its data in `dir`.
pub fn start_agent_with(bootstrap: &Path, dir: &Path, driver_args: &[&str]) -> (Proc, SocketAddr) {
    launch_agent(Command::new(agent_binary()), bootstrap, dir, driver_args)
}

/// Runs `command` (the agent, or something that execs it, with the agent's arguments to
/// follow) with the agent's arguments: on a free port, enrolling with `bootstrap`, its data
/// and log in `dir`.
fn launch_agent(
    command: Command,
    bootstrap: &Path,
    dir: &Path,
    driver_args: &[&str],
) -> (Proc, SocketAddr) {
    launch_agent_at(free_port(), command, bootstrap, dir, driver_args)
}

fn launch_agent_at(
    addr: SocketAddr,
    mut command: Command,
    bootstrap: &Path,
    dir: &Path,
    driver_args: &[&str],
) -> (Proc, SocketAddr) {
    let mut child = command
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

/// An agent like [`start_agent_with`]'s in a mount namespace of its own, with each `(own,
/// at)` of `binds` mounted over `at` there: a host whose local storage at `at` is its own
/// disk, not the directory the machine's other agents see there, and whose own mounts (of
/// shared storage) stay its own.
pub fn start_agent_in_own_mount_namespace(
    bootstrap: &Path,
    dir: &Path,
    driver_args: &[&str],
    binds: &[(&Path, &Path)],
) -> (Proc, SocketAddr) {
    start_agent_in_own_mount_namespace_at(free_port(), bootstrap, dir, driver_args, binds)
}

/// [`start_agent_in_own_mount_namespace`], listening at `addr` (an agent started again).
pub fn start_agent_in_own_mount_namespace_at(
    addr: SocketAddr,
    bootstrap: &Path,
    dir: &Path,
    driver_args: &[&str],
    binds: &[(&Path, &Path)],
) -> (Proc, SocketAddr) {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 1; shift 2; done; shift; exec "$@""#)
        .arg("sh");
    for (own, at) in binds {
        std::fs::create_dir_all(own).unwrap();
        std::fs::create_dir_all(at).unwrap();
        command.arg(own).arg(at);
    }
    // `unshare` and `sh` exec in turn, so the child's pid is the agent's.
    command.arg("--").arg(agent_binary());
    launch_agent_at(addr, command, bootstrap, dir, driver_args)
}

/// The admin password every test server starts with.
pub const ADMIN_PASSWORD: &str = "test-admin-password";

/// The server on `data_dir`, listening at `addr`, with extra environment.
pub fn start_server_with(
    data_dir: &Path,
    addr: SocketAddr,
    env: &[(&str, &str)],
    args: &[String],
) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strato"))
        .envs(env.iter().copied())
        .env("STRATO_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .args(["server", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data_dir)
        .args(args)
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

/// One HTTP/1.1 request with exactly `headers` (the API's own client, `strato_api::client`).
pub fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Value) {
    let reply = strato_api::client::send(addr, method, path, body, headers).unwrap();
    (reply.status, reply.headers, reply.body)
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

/// How a [`TestCluster`] is made.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// The server's environment (`STRATO_SESSION_TIMEOUT_SECS`, failpoints, ...).
    pub server_env: Vec<(String, String)>,
    /// The server's extra arguments (`--volume-deletion-policy direct`, ...).
    pub server_args: Vec<String>,
    /// The agent's driver arguments.
    pub driver: Vec<String>,
    /// The permissions of the cluster's directory (default: the temporary directory's).
    pub mode: Option<u32>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            server_env: Vec::new(),
            server_args: Vec::new(),
            driver: ["--driver", "libvirt", "--libvirt-uri", "test:///default", "--network", "sim"]
                .map(str::to_owned)
                .to_vec(),
            mode: None,
        }
    }
}

impl ClusterOpts {
    /// The agent on the sim driver, each command taking `latency_ms`.
    pub fn sim(latency_ms: u64) -> Self {
        ClusterOpts::default().driver(&[
            "--driver",
            "sim",
            "--sim-latency-ms",
            &latency_ms.to_string(),
        ])
    }

    /// The agent with these driver arguments.
    pub fn driver(mut self, args: &[&str]) -> Self {
        self.driver = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// The server with these extra arguments.
    pub fn server_args(mut self, args: &[&str]) -> Self {
        self.server_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// The server with `name=value` in its environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.server_env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The cluster's directory with these permissions (QEMU, as libvirt's own user, must
    /// reach a real guest's storage).
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }
}

/// A management node and one agent as real processes, the agent enrolled from a bootstrap
/// file the node minted: what every API test starts from (as Omicron's
/// `ControlPlaneTestContext`). Both logs are beside their data directories (`<dir>.log`).
pub struct TestCluster {
    /// Where the API listens.
    pub api: SocketAddr,
    /// Where the agent listens.
    pub agent: SocketAddr,
    /// The server's data directory.
    pub data: PathBuf,
    server: Proc,
    agent_proc: Proc,
    opts: ClusterOpts,
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts the agent, then the server.
    pub fn start(opts: ClusterOpts) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        if let Some(mode) = opts.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let data = dir.path().join("mn");
        let bootstrap = bootstrap(&data);
        let driver: Vec<&str> = opts.driver.iter().map(String::as_str).collect();
        let (agent_proc, agent) = start_agent_with(&bootstrap, &dir.path().join("agent"), &driver);
        let api = free_port();
        let server = Self::server(&data, api, &opts);
        TestCluster { api, agent, data, server, agent_proc, opts, dir }
    }

    fn server(data: &Path, api: SocketAddr, opts: &ClusterOpts) -> Proc {
        let env: Vec<(&str, &str)> =
            opts.server_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        start_server_with(data, api, &env, &opts.server_args)
    }

    /// The directory everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's data directory.
    pub fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// Kills the server with SIGKILL and starts it again on the same store and address.
    pub fn kill_and_restart_server(&mut self) {
        self.server.child.kill().unwrap();
        self.server.child.wait().unwrap();
        self.server = Self::server(&self.data, self.api, &self.opts);
    }

    /// Kills the agent with SIGKILL (the host's machine lost).
    pub fn kill_agent(&mut self) {
        self.agent_proc.child.kill().unwrap();
        self.agent_proc.child.wait().unwrap();
    }

    /// Starts the agent again on its address: enrolled on its first start, it needs no
    /// bootstrap file now.
    pub fn restart_agent(&mut self) {
        let child = Command::new(agent_binary())
            .args(&self.opts.driver)
            .args(["--listen", &self.agent.to_string(), "--data-dir"])
            .arg(self.agent_dir())
            .stdout(Stdio::null())
            .stderr(log_file(&self.agent_dir()))
            .spawn()
            .unwrap();
        self.agent_proc = Proc { child };
    }

    /// The admin's zone, cluster, this cluster's host, an offering and an L3 network with
    /// the range `start`-`end` ([`vm_infrastructure`]).
    pub fn infrastructure(&self, start: &str, end: &str) -> Infrastructure {
        vm_infrastructure(self.api, self.agent, start, end)
    }

    /// A request as the holder of `session`: its status and body.
    pub fn as_(
        &self,
        session: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let auth = format!("OAuth {session}");
        let body = body.map(|b| b.to_string());
        let (status, _, reply) =
            raw_http(self.api, method, path, body.as_deref(), &[("Authorization", &auth)]);
        (status, reply)
    }

    /// A mutation as the holder of `session`, followed to its end.
    pub fn done_as(&self, session: &str, method: &str, path: &str, body: Value) -> Value {
        let (status, accepted) = self.as_(session, method, path, Some(body));
        assert_eq!(status, 202, "{method} {path}: {accepted}");
        let auth = format!("OAuth {session}");
        wait_job_as(self.api, accepted["location"].as_str().unwrap(), ("Authorization", &auth))
    }

    /// A normal account `name` (password `<name>-password`) with `quota` (ZStack's defaults
    /// when `null`), logged in: its session.
    pub fn account(&self, name: &str, quota: Value) -> String {
        let mut params =
            serde_json::json!({ "name": name, "password": format!("{name}-password") });
        if !quota.is_null() {
            params["quota"] = quota;
        }
        let made = create(self.api, "/v1/accounts", params);
        assert_eq!(made["type"], "Normal");
        assert!(made.get("passwordHash").is_none(), "{made}");
        log_in(self.api, name, &format!("{name}-password"))
    }
}

/// Runs a command and returns its output, whatever its status.
pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().expect("run a command")
}

/// Runs a command that must succeed and returns its standard output.
pub fn run(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test's namespaces, removed with everything in them when it ends.
pub struct Namespaces {
    pub tag: String,
}

impl Namespaces {
    pub fn add(&self, role: &str) -> String {
        let name = format!("{}-{role}", self.tag);
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let listed = String::from_utf8_lossy(&sh(&["ip", "netns", "list"]).stdout).into_owned();
        for ns in listed.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&self.tag) {
                let pids =
                    String::from_utf8_lossy(&sh(&["ip", "netns", "pids", ns]).stdout).into_owned();
                for pid in pids.split_whitespace() {
                    sh(&["kill", "-9", pid]);
                }
                sh(&["ip", "netns", "del", ns]);
            }
        }
    }
}

/// `text` in base64, as `userdata::` tags carry it.
pub fn base64_of(text: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    out.stdin.as_ref().unwrap().write_all(text.as_bytes()).unwrap();
    String::from_utf8(out.wait_with_output().unwrap().stdout).unwrap()
}
