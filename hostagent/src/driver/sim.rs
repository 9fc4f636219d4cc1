//! `sim`: a hypervisor in pure Rust, for tests and for simulating many hosts.
//!
//! It keeps its domains in a JSON file in its data directory, as libvirtd keeps its state
//! beyond the agent's life on a real host: restarting a sim agent is not a host reboot
//! (`--sim-reset` makes it one: every domain is powered off). Every call can be slowed by a
//! configurable latency and made to fail with a configurable probability per command, which
//! is how tests and chaos runs inject driver faults.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strato_proto::{
    AgentError, AgentErrorCode, AgentEvent, DomainInfo, DomainSpec, DomainState, HostFacts,
};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{Driver, not_found};

/// How a simulated host behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The host's name.
    pub hostname: String,
    /// Its CPUs.
    pub cpus: u32,
    /// Its memory.
    pub memory_mib: u64,
    /// Added to every call.
    pub latency: Duration,
    /// Probability (0-1) that a call of this command name fails (`start-domain`, ...).
    pub failures: HashMap<String, f64>,
    /// Where the domains are kept.
    pub state_file: PathBuf,
    /// Power every domain off at start (a host reboot).
    pub reset: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SimDomain {
    spec: DomainSpec,
    state: DomainState,
}

/// The simulated hypervisor.
#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    domains: Mutex<BTreeMap<Uuid, SimDomain>>,
    events: Mutex<Option<broadcast::Sender<AgentEvent>>>,
}

impl Sim {
    /// Opens (or creates) the simulated host's state.
    pub fn open(config: SimConfig) -> Result<Self, std::io::Error> {
        let mut domains: BTreeMap<Uuid, SimDomain> = match std::fs::read(&config.state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        if config.reset {
            for domain in domains.values_mut() {
                domain.state = DomainState::Shutoff;
            }
        }
        let sim = Sim { config, domains: Mutex::new(domains), events: Mutex::new(None) };
        sim.save(&sim.domains.lock().expect("sim lock"))?;
        Ok(sim)
    }

    /// The domains a simulated host's state file holds, as the hypervisor lists them: how a
    /// test or a chaos check looks at the host from outside, as an operator runs `virsh list`
    /// (the agent admits one MN session at a time, so an observer cannot dial it while the
    /// MN is linked).
    pub fn domains_in(state_file: &Path) -> Result<Vec<DomainInfo>, std::io::Error> {
        // A reader that opened the state file just before it was exchanged holds the spare,
        // which the next save rewrites: a read torn that way does not parse, and is retried.
        let mut attempts = 0;
        let domains: BTreeMap<Uuid, SimDomain> = loop {
            match serde_json::from_slice(&std::fs::read(state_file)?) {
                Ok(domains) => break domains,
                Err(_) if attempts < 10 => attempts += 1,
                Err(e) => return Err(std::io::Error::other(e)),
            }
        };
        Ok(domains
            .into_iter()
            .map(|(uuid, d)| DomainInfo { uuid, name: d.spec.name, state: d.state })
            .collect())
    }

    /// Replaces the state file whole, so that a reader sees one state or the next.
    ///
    /// The new state is written into a spare file which is then exchanged with the state
    /// file in one `renameat2(RENAME_EXCHANGE)`; the old state becomes the next spare. A
    /// temporary file renamed over the state file did the same, but allocated and freed an
    /// inode on every change: with a thousand simulated hosts that was a tenth of the
    /// machine's CPU in ext4's inode allocator (`recently_deleted`), measured by perf during
    /// the 10,000-VM load run.
    fn save(&self, domains: &BTreeMap<Uuid, SimDomain>) -> Result<(), std::io::Error> {
        let state = &self.config.state_file;
        let spare = state.with_extension("spare");
        std::fs::write(&spare, serde_json::to_vec(domains).map_err(std::io::Error::other)?)?;
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &spare,
            rustix::fs::CWD,
            state,
            rustix::fs::RenameFlags::EXCHANGE,
        ) {
            Ok(()) => Ok(()),
            // The first save: there is no state file to exchange with yet.
            Err(rustix::io::Errno::NOENT) => std::fs::rename(&spare, state),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies latency and injected failures for `command`.
    fn call(&self, command: &str) -> Result<(), AgentError> {
        if !self.config.latency.is_zero() {
            std::thread::sleep(self.config.latency);
        }
        if let Some(p) = self.config.failures.get(command)
            && fastrand::f64() < *p
        {
            return Err(AgentError::new(
                AgentErrorCode::Driver,
                format!("injected failure in {command}"),
            ));
        }
        Ok(())
    }

    /// Changes one domain under the lock, saves, and reports the new state.
    fn change(
        &self,
        command: &str,
        uuid: Uuid,
        f: impl FnOnce(&mut SimDomain) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        self.call(command)?;
        let mut domains = self.domains.lock().expect("sim lock");
        let domain = domains.get_mut(&uuid).ok_or_else(|| not_found(uuid))?;
        let before = domain.state;
        f(domain)?;
        let after = domain.state;
        self.save(&domains).map_err(|e| AgentError::new(AgentErrorCode::Driver, e.to_string()))?;
        drop(domains);
        if before != after {
            self.emit(AgentEvent::DomainStateChanged { uuid, state: Some(after) });
        }
        Ok(())
    }

    fn emit(&self, event: AgentEvent) {
        if let Some(tx) = self.events.lock().expect("sim lock").as_ref() {
            let _ = tx.send(event);
        }
    }
}

fn invalid(uuid: Uuid, state: DomainState, what: &str) -> AgentError {
    AgentError::new(
        AgentErrorCode::InvalidState,
        format!("domain {uuid} is {state:?}; cannot {what}"),
    )
}

impl Driver for Sim {
    fn facts(&self) -> Result<HostFacts, AgentError> {
        Ok(HostFacts {
            hostname: self.config.hostname.clone(),
            hypervisor: "sim".into(),
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>, AgentError> {
        self.call("list-domains")?;
        Ok(self
            .domains
            .lock()
            .expect("sim lock")
            .iter()
            .map(|(uuid, d)| DomainInfo { uuid: *uuid, name: d.spec.name.clone(), state: d.state })
            .collect())
    }

    fn define(&self, spec: &DomainSpec) -> Result<(), AgentError> {
        self.call("define-domain")?;
        let mut domains = self.domains.lock().expect("sim lock");
        match domains.get_mut(&spec.uuid) {
            Some(existing) if existing.state != DomainState::Shutoff && existing.spec != *spec => {
                return Err(invalid(spec.uuid, existing.state, "redefine it"));
            }
            Some(existing) => existing.spec = spec.clone(),
            None => {
                domains.insert(
                    spec.uuid,
                    SimDomain { spec: spec.clone(), state: DomainState::Shutoff },
                );
            }
        }
        self.save(&domains).map_err(|e| AgentError::new(AgentErrorCode::Driver, e.to_string()))
    }

    fn start(&self, uuid: Uuid) -> Result<(), AgentError> {
        self.change("start-domain", uuid, |d| match d.state {
            DomainState::Running => Ok(()),
            DomainState::Shutoff | DomainState::Crashed => {
                d.state = DomainState::Running;
                Ok(())
            }
            other => Err(invalid(uuid, other, "start it")),
        })
    }

    fn shutdown(&self, uuid: Uuid) -> Result<(), AgentError> {
        // A simulated guest obeys the power button at once.
        self.change("shutdown-domain", uuid, |d| {
            d.state = DomainState::Shutoff;
            Ok(())
        })
    }

    fn destroy(&self, uuid: Uuid) -> Result<(), AgentError> {
        if !self.domains.lock().expect("sim lock").contains_key(&uuid) {
            // Like libvirt's driver: a domain that is not there is as destroyed as it gets.
            return self.call("destroy-domain");
        }
        self.change("destroy-domain", uuid, |d| {
            d.state = DomainState::Shutoff;
            Ok(())
        })
    }

    fn reboot(&self, uuid: Uuid) -> Result<(), AgentError> {
        self.change("reboot-domain", uuid, |d| match d.state {
            DomainState::Running => Ok(()),
            other => Err(invalid(uuid, other, "reboot it")),
        })
    }

    fn suspend(&self, uuid: Uuid) -> Result<(), AgentError> {
        self.change("suspend-domain", uuid, |d| match d.state {
            DomainState::Running | DomainState::Paused => {
                d.state = DomainState::Paused;
                Ok(())
            }
            other => Err(invalid(uuid, other, "pause it")),
        })
    }

    fn resume(&self, uuid: Uuid) -> Result<(), AgentError> {
        self.change("resume-domain", uuid, |d| match d.state {
            DomainState::Running | DomainState::Paused => {
                d.state = DomainState::Running;
                Ok(())
            }
            other => Err(invalid(uuid, other, "resume it")),
        })
    }

    fn undefine(&self, uuid: Uuid) -> Result<(), AgentError> {
        self.call("undefine-domain")?;
        let mut domains = self.domains.lock().expect("sim lock");
        match domains.get(&uuid) {
            None => return Ok(()),
            Some(d) if d.state != DomainState::Shutoff => {
                return Err(invalid(uuid, d.state, "undefine it while it runs"));
            }
            Some(_) => {}
        }
        domains.remove(&uuid);
        self.save(&domains).map_err(|e| AgentError::new(AgentErrorCode::Driver, e.to_string()))?;
        drop(domains);
        self.emit(AgentEvent::DomainStateChanged { uuid, state: None });
        Ok(())
    }

    fn watch(&self, events: broadcast::Sender<AgentEvent>) {
        *self.events.lock().expect("sim lock") = Some(events);
    }
}
