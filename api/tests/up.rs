//! `strato up`, the README's main job, as a user runs it: it starts a node and an agent,
//! registers what a VM needs, prints a curl line, and that line creates a running VM. The
//! agent enrolls with a bootstrap file on the first run and with its certificate on the next;
//! the data directory is private.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts `strato up` on `dir`; returns the child and the lines its reader hands over.
fn up(
    dir: &Path,
    api: std::net::SocketAddr,
    agent: std::net::SocketAddr,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strato"))
        .args([
            "up",
            "--listen",
            &api.to_string(),
            "--agent-listen",
            &agent.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read its output to the end on a thread, handing over the password, the session's
    // header and the curl line.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim_start();
            if line.contains("password (generated; shown once")
                || line.starts_with("The debug console: ")
                || line.starts_with("export AUTH=")
                || line.starts_with("curl -s -H \"$AUTH\" -X POST")
            {
                let _ = tx.send(line.to_owned());
            }
        }
    });
    (child, rx)
}

#[test]
fn strato_up_prints_a_curl_line_that_creates_a_running_vm() {
    agent_binary(); // `strato up` starts the agent beside it
    let dir = tempfile::tempdir().unwrap();
    // What an earlier version left: a data directory open to all and a readable agent token.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("agent-token"), "an-old-token").unwrap();
    let (api, agent) = (free_port(), free_port());
    let (mut child, rx) = up(dir.path(), api, agent);
    let next = || rx.recv_timeout(Duration::from_secs(60)).expect("strato up printed it");
    let password_line = next();
    let password = password_line.rsplit(": ").next().unwrap();
    let stored = std::fs::read_to_string(dir.path().join("initial-admin-password")).unwrap();
    assert_eq!(stored, password, "the generated password is kept for the next start");
    // Where the console is: its page answers there.
    let console_line = next();
    let console = format!("http://{api}/console");
    assert!(console_line.contains(&format!("{console} ")), "{console_line}");
    assert_eq!(raw_http(api, "GET", "/console", None, &[]).0, 200, "{console_line}");
    let auth_line = next();
    let auth = auth_line.trim_start_matches("export AUTH='").trim_end_matches('\'').to_owned();
    let (name, value) = auth.split_once(": ").unwrap();
    let line = next();
    let body = line.split_once("-d '").unwrap().1.trim_end_matches('\'');
    // As the user runs the printed line: with the printed session.
    let (status, _, accepted) =
        raw_http(api, "POST", "/v1/vm-instances", Some(body), &[(name, value)]);
    assert_eq!(status, 202, "{accepted}");
    let vm = wait_job_as(api, accepted["location"].as_str().unwrap(), (name, value))["inventory"]
        .clone();
    assert_eq!(vm["state"], "Running");
    let volume = vm["rootVolumePath"].as_str().expect("a root volume from the registered image");
    assert!(std::path::Path::new(volume).exists(), "{volume}");
    // Without the session, the API answers 401.
    assert_eq!(raw_http(api, "GET", "/v1/hosts", None, &[]).0, 401);
    let session = log_in(api, "admin", password);
    let auth = format!("OAuth {session}");
    let (_, _, hosts) = raw_http(api, "GET", "/v1/hosts", None, &[("Authorization", &auth)]);
    assert_eq!(hosts["inventories"][0]["status"], "Connected");
    // The agent enrolled: its spent bootstrap file is gone, and every secret is private.
    let data = dir.path();
    assert!(!data.join("agent-bootstrap").exists(), "the spent bootstrap file was removed");
    assert!(!data.join("agent-token").exists(), "the old token was removed");
    assert_eq!(mode(data), 0o700, "the data directory was made private");
    for secret in ["initial-admin-password", "pki/ca.key", "pki/mn.key", "agent/tls/agent.key"] {
        assert_eq!(mode(&data.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(mode(&data.join("pki")), 0o700);
    assert_eq!(mode(&data.join("agent")), 0o700);
    // Ctrl-C stops the node and its agent.
    let stop = |child: &mut std::process::Child| {
        Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(std::net::TcpStream::connect(agent).is_err(), "the agent stopped with it");
    };
    stop(&mut child);

    // Again on the same data: the agent links with the certificate it enrolled with.
    let (mut again, rx) = up(data, api, agent);
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("strato up printed it again");
    assert!(line.starts_with("The debug console: "), "{line}");
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("strato up printed it again");
    assert!(line.starts_with("export AUTH="), "{line}");
    let auth = format!("OAuth {}", log_in(api, "admin", password));
    let (_, _, hosts) = raw_http(api, "GET", "/v1/hosts", None, &[("Authorization", &auth)]);
    assert_eq!(hosts["inventories"].as_array().unwrap().len(), 1, "{hosts}");
    assert_eq!(hosts["inventories"][0]["status"], "Connected", "{hosts}");
    let unspent = std::fs::read_dir(data.join("pki/bootstrap")).unwrap().count();
    assert_eq!(unspent, 0, "no bootstrap secret was made for an enrolled agent");
    stop(&mut again);
}
