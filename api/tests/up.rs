//! `strato up`, the README's main job, as a user runs it: it starts a node and an agent,
//! registers what a VM needs, prints a curl line, and that line creates a running VM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn strato_up_prints_a_curl_line_that_creates_a_running_vm() {
    agent_binary(); // `strato up` starts the agent beside it
    let dir = tempfile::tempdir().unwrap();
    let (api, agent) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_strato"))
        .args([
            "up",
            "--listen",
            &api.to_string(),
            "--agent-listen",
            &agent.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read its output to the end on a thread, handing over the curl line.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim_start().starts_with("curl -s -X POST") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("strato up printed a curl line");
    let body = line.split_once("-d '").unwrap().1.trim_end_matches('\'');
    let vm = ok(api, "POST", "/v1/vm-instances", Some(body));
    assert_eq!(vm["state"], "Running");
    let volume = vm["rootVolumePath"].as_str().expect("a root volume from the registered image");
    assert!(std::path::Path::new(volume).exists(), "{volume}");
    let (_, _, hosts) = http(api, "GET", "/v1/hosts", None, &[]);
    assert_eq!(hosts["inventories"][0]["status"], "Connected");
    // Ctrl-C stops the node and its agent.
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(std::net::TcpStream::connect(agent).is_err(), "the agent stopped with it");
}
