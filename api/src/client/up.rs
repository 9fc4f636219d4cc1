//! `strato up`: the README's main job. Starts the management node and a local agent on
//! libvirt's test driver, registers a zone, a cluster, the host, backup and primary storage,
//! an image, an instance offering, an L2 network and an L3 network with an IP range through
//! the real HTTP API, and prints the API's address and a curl line that creates a VM.
//!
//! The agent enrolls as a real host's does: `strato up` writes a bootstrap file (the node's CA
//! and a one-time secret) into the data directory and starts the agent with
//! `--bootstrap-file`, and the agent gets its certificate when the host is registered; the
//! spent file is removed then. An agent that enrolled on an earlier run starts with its
//! certificate and needs no file.
//!
//! Running it again on the same data directory reuses what it registered (found by name).
//! The agent is a child process and stops with `strato up`; on the test driver that is a
//! host reboot, so VMs from an earlier run come back Stopped.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strato_proto::tls::AgentIdentity;
use strato_runtime::BoxError;

use super::{self as client, ClientError};
use crate::mn::Mn;
use crate::server;

/// Prints a line to stdout, ignoring a closed stdout: a user piping `strato up` into `head`
/// must not take the node down with the pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Kills the agent when `strato up` ends, however it ends.
struct AgentChild(Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent_binary() -> Result<PathBuf, BoxError> {
    let me = std::env::current_exe()?;
    let agent = me.with_file_name("strato-agent");
    if agent.exists() {
        Ok(agent)
    } else {
        Err(format!("`strato-agent` is not beside `strato` ({}); build it with `cargo build -p strato-agent`", agent.display()).into())
    }
}

fn find_or_create(
    api: SocketAddr,
    kind: &str,
    create_path: &str,
    name: &str,
    params: Value,
) -> Result<Value, ClientError> {
    if let Some(found) = client::list(api, kind)?.into_iter().find(|i| i["name"] == name) {
        return Ok(found);
    }
    let mut params = params;
    params["name"] = json!(name);
    let made = client::mutate(api, "POST", create_path, &json!({ "params": params }))?;
    say!("  registered {kind} {name}: {}", made["uuid"].as_str().unwrap_or("?"));
    Ok(made)
}

/// Runs the main job until Ctrl-C.
pub async fn run(
    data_dir: &Path,
    listen: SocketAddr,
    agent_listen: SocketAddr,
) -> Result<(), BoxError> {
    let agent_dir = data_dir.join("agent");
    let bootstrap = data_dir.join("agent-bootstrap");
    let mut agent = Command::new(agent_binary()?);
    agent
        .args(["--listen", &agent_listen.to_string()])
        // The test driver's guests are not real: neither is their network (nothing on the
        // machine changes).
        .args(["--driver", "libvirt", "--libvirt-uri", "test:///default", "--network", "sim"])
        .arg("--data-dir")
        .arg(&agent_dir);
    if !AgentIdentity::is_enrolled(&agent_dir) {
        crate::mn::pki(data_dir)?.mint(&bootstrap, 1)?;
        agent.arg("--bootstrap-file").arg(&bootstrap);
    }
    let child = agent.stdout(Stdio::null()).spawn()?;
    let _agent = AgentChild(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(agent_listen).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            return Err(format!("the agent did not start listening on {agent_listen}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say!("strato up: agent on {agent_listen} (libvirt test:///default)");

    let listener = server::bind(listen).await?;
    let mn = Mn::start(data_dir, None, Default::default(), Default::default()).await?;
    let serving = tokio::spawn(server::serve(mn.clone(), listener));

    if let Some(password) = &mn.generated_admin_password {
        say!(
            "strato up: the admin account's password (generated; shown once, kept in {}): {password}",
            data_dir.join(crate::mn::INITIAL_ADMIN_PASSWORD).display()
        );
    }
    let password = crate::mn::admin_password(data_dir)?;
    let session = {
        let password = password.clone();
        tokio::task::spawn_blocking(move || client::log_in(listen, "admin", &password)).await??
    };
    let storage_dir = std::fs::canonicalize(data_dir)?;
    // The node imports files only from its import directory (see `crate::mn::image_policy`).
    let imports = storage_dir.join(crate::mn::IMAGE_IMPORTS);
    std::fs::create_dir_all(&imports)?;
    let tryout = imports.join("tryout.raw");
    if !tryout.exists() {
        // A tiny blank disk to build root volumes from (the test driver boots nothing).
        std::fs::write(&tryout, vec![0u8; 1 << 20])?;
    }
    let registered = tokio::task::spawn_blocking(move || -> Result<(Value, Value, Value), ClientError> {
        let zone = find_or_create(listen, "zones", "/v1/zones", "zone-1", json!({}))?;
        let cluster = find_or_create(listen, "clusters", "/v1/clusters", "cluster-1", json!({ "zoneUuid": zone["uuid"] }))?;
        find_or_create(
            listen,
            "hosts",
            "/v1/hosts/kvm",
            "host-1",
            json!({ "managementIp": agent_listen.ip().to_string(), "agentPort": agent_listen.port(), "clusterUuid": cluster["uuid"] }),
        )?;
        let bs = find_or_create(
            listen,
            "backup-storage",
            "/v1/backup-storage/image-store",
            "bs-1",
            json!({ "url": storage_dir.join("backup-storage").display().to_string() }),
        )?;
        if bs["attachedZoneUuids"].as_array().is_none_or(Vec::is_empty) {
            let path = format!("/v1/zones/{}/backup-storage/{}", zone["uuid"].as_str().unwrap_or_default(), bs["uuid"].as_str().unwrap_or_default());
            client::mutate(listen, "POST", &path, &json!({}))?;
        }
        let ps = find_or_create(
            listen,
            "primary-storage",
            "/v1/primary-storage/local-storage",
            "ps-1",
            json!({ "url": storage_dir.join("primary-storage").display().to_string(), "zoneUuid": zone["uuid"] }),
        )?;
        if ps["attachedClusterUuids"].as_array().is_none_or(Vec::is_empty) {
            let path = format!("/v1/clusters/{}/primary-storage/{}", cluster["uuid"].as_str().unwrap_or_default(), ps["uuid"].as_str().unwrap_or_default());
            client::mutate(listen, "POST", &path, &json!({}))?;
        }
        let image = find_or_create(
            listen,
            "images",
            "/v1/images",
            "tryout",
            json!({ "url": format!("file://{}", tryout.display()), "format": "raw", "backupStorageUuids": [bs["uuid"]] }),
        )?;
        let offering = find_or_create(listen, "instance-offerings", "/v1/instance-offerings", "small", json!({ "cpuNum": 1, "memorySize": 536_870_912u64 }))?;
        let l2 = find_or_create(
            listen,
            "l2-networks",
            "/v1/l2-networks/no-vlan",
            "l2-1",
            json!({ "zoneUuid": zone["uuid"], "physicalInterface": "eth0" }),
        )?;
        if l2["attachedClusterUuids"].as_array().is_none_or(Vec::is_empty) {
            let path = format!("/v1/l2-networks/{}/clusters/{}", l2["uuid"].as_str().unwrap_or_default(), cluster["uuid"].as_str().unwrap_or_default());
            client::mutate(listen, "POST", &path, &json!({}))?;
        }
        let l3 = find_or_create(listen, "l3-networks", "/v1/l3-networks", "l3-1", json!({ "l2NetworkUuid": l2["uuid"] }))?;
        if l3["ipRanges"].as_array().is_none_or(Vec::is_empty) {
            let path = format!("/v1/l3-networks/{}/ip-ranges", l3["uuid"].as_str().unwrap_or_default());
            let range = json!({ "params": { "startIp": "192.168.100.10", "endIp": "192.168.100.250", "netmask": "255.255.255.0", "gateway": "192.168.100.1" } });
            client::mutate(listen, "POST", &path, &range)?;
            say!("  registered IP range 192.168.100.10-250 on l3-1");
        }
        Ok((offering, l3, image))
    })
    .await??;
    let (offering, l3, image) = registered;
    if AgentIdentity::is_enrolled(&agent_dir) && bootstrap.exists() {
        // Spent when the agent enrolled.
        std::fs::remove_file(&bootstrap)?;
    }
    say!();
    say!("Strato is up. The API: http://{listen}/v1");
    say!(
        "The debug console: http://{listen}/console (log in as admin; the password is in {})",
        data_dir.join(crate::mn::INITIAL_ADMIN_PASSWORD).display()
    );
    say!("Logged in as admin; requests carry the session (it lasts two hours; log in again with");
    say!(
        "  curl -s -X PUT http://{listen}/v1/accounts/login -d '{{\"logInByAccount\": {{\"accountName\": \"admin\", \"password\": \"...\"}}}}')"
    );
    say!("  export AUTH='Authorization: OAuth {session}'");
    say!("Create a VM:");
    say!(
        "  curl -s -H \"$AUTH\" -X POST http://{listen}/v1/vm-instances -d '{{\"params\": {{\"name\": \"vm1\", \"instanceOfferingUuid\": \"{}\", \"imageUuid\": \"{}\", \"l3NetworkUuids\": [\"{}\"]}}}}'",
        offering["uuid"].as_str().unwrap_or_default(),
        image["uuid"].as_str().unwrap_or_default(),
        l3["uuid"].as_str().unwrap_or_default()
    );
    say!(
        "then follow the job (the answer comes when it ends):  curl -s -H \"$AUTH\" 'http://{listen}<location>?waitSeconds=30'"
    );
    say!("and list VMs:  curl -s -H \"$AUTH\" http://{listen}/v1/vm-instances");
    say!("Ctrl-C stops the node and its agent.");
    tokio::select! {
        served = serving => { served??; }
        _ = tokio::signal::ctrl_c() => {}
    }
    mn.shutdown();
    Ok(())
}
