//! The real `strato-agent` binary, and a test playing its management node: an MN CA in a
//! temporary directory (`strato_proto::pki`), bootstrap files minted from it, and links that
//! enroll the agent on first contact and pin its certificate as the host actor does.

#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use strato_proto::pki::Pki;
use strato_proto::{AgentEvent, Fingerprint, Handshake, Link, LinkConfig, LinkError, Welcome};
use tokio::sync::mpsc::UnboundedReceiver;
use uuid::Uuid;

/// A management node as far as the link goes: its CA, in a directory of its own.
pub struct Mn {
    pub pki: Pki,
    pub dir: tempfile::TempDir,
}

impl Mn {
    pub fn new() -> Mn {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::open(&dir.path().join("pki")).unwrap();
        Mn { pki, dir }
    }

    /// A fresh bootstrap file with `hosts` secrets.
    pub fn bootstrap(&self, hosts: usize) -> PathBuf {
        let path = self.dir.path().join(format!("bootstrap-{}", Uuid::new_v4().simple()));
        self.pki.mint(&path, hosts).unwrap();
        path
    }

    /// How this MN dials `addr`, trusting `pin`.
    pub fn config(&self, addr: SocketAddr, pin: Option<Fingerprint>) -> LinkConfig {
        LinkConfig {
            addr,
            tls: self.pki.tls().clone(),
            pin,
            host_uuid: Uuid::new_v4(),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(500),
            ping_failures: 3,
        }
    }

    /// Links to the agent at `addr` as the host actor does: an agent asking to enroll gets
    /// a certificate (pinned in `pin`) and is dialed again.
    pub async fn link(
        &self,
        addr: SocketAddr,
        pin: &Mutex<Option<Fingerprint>>,
    ) -> Result<(Link, Welcome, UnboundedReceiver<AgentEvent>), LinkError> {
        loop {
            let current = *pin.lock().unwrap();
            match Link::connect(&self.config(addr, current)).await? {
                Handshake::Linked { link, welcome, events, certificate } => {
                    let welcome = *welcome;
                    *pin.lock().unwrap() = Some(certificate);
                    return Ok((link, welcome, events));
                }
                Handshake::Enroll(enrollment) => {
                    let issued = match self.pki.enroll(
                        enrollment.secret(),
                        enrollment.public_key(),
                        Uuid::new_v4(),
                    ) {
                        Ok(issued) => issued,
                        Err(error) => {
                            let reason = error.to_string();
                            enrollment.refuse(reason.clone()).await;
                            return Err(LinkError::Refused { reason });
                        }
                    };
                    *pin.lock().unwrap() = Some(issued.fingerprint);
                    enrollment.issue(issued.certificate).await?;
                }
            }
        }
    }
}

pub struct AgentProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The certificate the test's MN pinned for it.
    pub pin: Mutex<Option<Fingerprint>>,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    /// Links `mn` to this agent, enrolling it on first contact.
    pub async fn link(
        &self,
        mn: &Mn,
    ) -> Result<(Link, Welcome, UnboundedReceiver<AgentEvent>), LinkError> {
        mn.link(self.addr, &self.pin).await
    }
}

pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Starts an agent waiting to enroll with `mn` (a fresh bootstrap file).
pub fn start_agent(mn: &Mn, driver_args: &[&str]) -> AgentProcess {
    let bootstrap = mn.bootstrap(1);
    start_agent_on(free_port(), Some(&bootstrap), tempfile::tempdir().unwrap(), driver_args, None)
}

/// Starts the agent listening on `addr` (or, with several simulated hosts, from
/// `listen_base`) on the data directory `dir`, with `bootstrap` if given, and waits until
/// the first host accepts connections.
pub fn start_agent_on(
    addr: SocketAddr,
    bootstrap: Option<&Path>,
    dir: tempfile::TempDir,
    driver_args: &[&str],
    listen_base: Option<SocketAddr>,
) -> AgentProcess {
    let mut command = Process::new(env!("CARGO_BIN_EXE_strato-agent"));
    command.args(["--listen", &addr.to_string(), "--data-dir"]).arg(dir.path()).args(driver_args);
    if let Some(bootstrap) = bootstrap {
        command.arg("--bootstrap-file").arg(bootstrap);
    }
    let mut child = command.stdout(Stdio::null()).spawn().unwrap();
    // Wait until it accepts connections.
    let probe = listen_base.unwrap_or(addr);
    for _ in 0..400 {
        if std::net::TcpStream::connect(probe).is_ok() {
            return AgentProcess { child, addr, dir, pin: Mutex::default() };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the agent exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the agent did not start listening on {probe}");
}
