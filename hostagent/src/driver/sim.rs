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
    AgentError, AgentErrorCode, AgentEvent, DiskSpec, DomainInfo, DomainSpec, DomainState,
    HostFacts,
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

/// The file domain `uuid` (`d`) has for `disk`: its root volume's for device 0, as libvirt
/// names it `vda`, or the data disk plugged for the volume.
fn disk_path<'d>(
    uuid: Uuid,
    d: &'d mut SimDomain,
    disk: &DiskSpec,
) -> Result<&'d mut String, AgentError> {
    let found = if disk.device_id == 0 {
        d.spec.root_volume.as_mut()
    } else {
        d.spec.disks.iter_mut().find(|o| o.volume == disk.volume).map(|o| &mut o.path)
    };
    found.ok_or_else(|| {
        AgentError::new(
            AgentErrorCode::NotFound,
            format!("domain {uuid} has no disk of volume {}", disk.volume),
        )
    })
}

/// The state file's content. The file is rewritten in place (see [`Sim::save`]), so a read
/// that overlapped a rewrite may join the start of one state to the end of another: `seq`
/// opens the file and `end` closes it with the same number, which no two saves share.
#[derive(Serialize, Deserialize)]
struct StateFile<D> {
    seq: u64,
    domains: D,
    end: u64,
}

impl StateFile<BTreeMap<Uuid, SimDomain>> {
    /// Reads a state file, retrying a read torn by a concurrent save.
    fn read(path: &Path) -> Result<Self, std::io::Error> {
        let mut attempts = 0;
        loop {
            let torn = match serde_json::from_slice::<Self>(&std::fs::read(path)?) {
                Ok(file) if file.seq == file.end => return Ok(file),
                Ok(_) => std::io::Error::other("the state file changed while it was read"),
                Err(e) => std::io::Error::other(e),
            };
            attempts += 1;
            if attempts == 10 {
                return Err(torn);
            }
        }
    }
}

/// The simulated hypervisor.
#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    domains: Mutex<BTreeMap<Uuid, SimDomain>>,
    /// The last save's number (saves run under the `domains` lock).
    seq: std::sync::atomic::AtomicU64,
    events: Mutex<Option<broadcast::Sender<AgentEvent>>>,
}

impl Sim {
    /// Opens (or creates) the simulated host's state.
    pub fn open(config: SimConfig) -> Result<Self, std::io::Error> {
        let (seq, mut domains) = match StateFile::read(&config.state_file) {
            Ok(file) => (file.seq, file.domains),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, BTreeMap::new()),
            Err(e) => return Err(e),
        };
        if config.reset {
            for domain in domains.values_mut() {
                domain.state = DomainState::Shutoff;
            }
        }
        let sim =
            Sim { config, domains: Mutex::new(domains), seq: seq.into(), events: Mutex::new(None) };
        sim.save(&sim.domains.lock().expect("sim lock"))?;
        Ok(sim)
    }

    /// The domains a simulated host's state file holds, as the hypervisor lists them: how a
    /// test or a chaos check looks at the host from outside, as an operator runs `virsh list`
    /// (the agent admits one MN session at a time, so an observer cannot dial it while the
    /// MN is linked).
    pub fn domains_in(state_file: &Path) -> Result<Vec<DomainInfo>, std::io::Error> {
        Ok(StateFile::read(state_file)?
            .domains
            .into_iter()
            .map(|(uuid, d)| DomainInfo { uuid, name: d.spec.name, state: d.state })
            .collect())
    }

    /// The disks of each domain in the state file at `state_file` (as `domains_in`).
    pub fn disks_in(state_file: &Path) -> Result<BTreeMap<Uuid, Vec<DiskSpec>>, std::io::Error> {
        Ok(StateFile::read(state_file)?
            .domains
            .into_iter()
            .map(|(uuid, d)| (uuid, d.spec.disks))
            .collect())
    }

    /// The root volume file of each domain in the state file at `state_file` (as
    /// `domains_in`).
    pub fn root_volumes_in(
        state_file: &Path,
    ) -> Result<BTreeMap<Uuid, Option<String>>, std::io::Error> {
        Ok(StateFile::read(state_file)?
            .domains
            .into_iter()
            .map(|(uuid, d)| (uuid, d.spec.root_volume))
            .collect())
    }

    /// Replaces the state file whole, so that a reader sees one state or the next.
    ///
    /// The new state is written over a spare file, which is then exchanged with the state
    /// file in one `renameat2(RENAME_EXCHANGE)`; the old state becomes the next spare. A
    /// temporary file renamed over the state file did the same, but allocated and freed an
    /// inode on every change: with a thousand simulated hosts that was a tenth of the
    /// machine's CPU in ext4's inode allocator (`recently_deleted`), measured by perf during
    /// the 10,000-VM load run. The spare is not truncated either (which freed and allocated
    /// its blocks again on every save: 2 of 29 CPU-seconds in the same run): a shorter state
    /// is padded with spaces, which JSON ignores after the value. A reader slow enough to
    /// still hold the spare when it is rewritten is caught by [`StateFile`]'s numbers.
    fn save(&self, domains: &BTreeMap<Uuid, SimDomain>) -> Result<(), std::io::Error> {
        use std::io::Write;
        let state = &self.config.state_file;
        let spare = state.with_extension("spare");
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut json = serde_json::to_vec(&StateFile { seq, domains, end: seq })
            .map_err(std::io::Error::other)?;
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&spare)?;
        let old_len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        json.resize(json.len().max(old_len), b' ');
        file.write_all(&json)?;
        drop(file);
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
            addresses: Vec::new(),
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

    fn attach_disk(&self, uuid: Uuid, disk: &DiskSpec) -> Result<(), AgentError> {
        self.change("attach-disk", uuid, |d| match d.state {
            DomainState::Running | DomainState::Paused => {
                if let Some(other) =
                    d.spec.disks.iter().find(|o| o.device_id == disk.device_id && o != &disk)
                {
                    return Err(AgentError::new(
                        AgentErrorCode::InvalidState,
                        format!("domain {uuid} has {} as {} already", other.path, disk.target()),
                    ));
                }
                if !d.spec.disks.contains(disk) {
                    d.spec.disks.push(disk.clone());
                }
                Ok(())
            }
            other => Err(invalid(uuid, other, "plug a disk into it")),
        })
    }

    fn detach_disk(&self, uuid: Uuid, disk: &DiskSpec) -> Result<(), AgentError> {
        self.change("detach-disk", uuid, |d| match d.state {
            DomainState::Running | DomainState::Paused => {
                d.spec.disks.retain(|o| o.volume != disk.volume);
                Ok(())
            }
            other => Err(invalid(uuid, other, "unplug a disk from it")),
        })
    }

    fn snapshot_disk(&self, uuid: Uuid, disk: &DiskSpec, new_top: &str) -> Result<(), AgentError> {
        self.change("snapshot-disk", uuid, |d| {
            if !matches!(d.state, DomainState::Running | DomainState::Paused) {
                return Err(invalid(uuid, d.state, "snapshot its disk live"));
            }
            let plugged = disk_path(uuid, d, disk)?;
            if plugged != new_top {
                // The files are real where they exist: the sim freezes them as QEMU would.
                if Path::new(plugged.as_str()).exists() {
                    files(&["create", "-q", "-f", "qcow2", "-b", plugged, "-F", "qcow2", new_top])?;
                }
                *plugged = new_top.to_owned();
            }
            Ok(())
        })
    }

    fn pull_disk(&self, uuid: Uuid, disk: &DiskSpec, base: Option<&str>) -> Result<(), AgentError> {
        self.change("pull-disk", uuid, |d| {
            if !matches!(d.state, DomainState::Running | DomainState::Paused) {
                return Err(invalid(uuid, d.state, "pull its disk live"));
            }
            let plugged = disk_path(uuid, d, disk)?.clone();
            if Path::new(&plugged).exists() {
                match base {
                    Some(base) => files(&[
                        "rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, &plugged,
                    ])?,
                    None => files(&["rebase", "-q", "-f", "qcow2", "-b", "", &plugged])?,
                }
            }
            Ok(())
        })
    }

    fn resize_disk(&self, uuid: Uuid, disk: &DiskSpec, size: u64) -> Result<(), AgentError> {
        self.change("resize-disk", uuid, |d| {
            if !matches!(d.state, DomainState::Running | DomainState::Paused) {
                return Err(invalid(uuid, d.state, "resize its disk live"));
            }
            let Some(plugged) = d.spec.disks.iter().find(|o| o.volume == disk.volume) else {
                return Err(AgentError::new(
                    AgentErrorCode::NotFound,
                    format!("domain {uuid} has no disk of volume {}", disk.volume),
                ));
            };
            if Path::new(&plugged.path).exists() {
                files(&["resize", "-q", "-f", "qcow2", &plugged.path, &size.to_string()])?;
            }
            Ok(())
        })
    }

    fn watch(&self, events: broadcast::Sender<AgentEvent>) {
        *self.events.lock().expect("sim lock") = Some(events);
    }
}

/// Runs `qemu-img` on a simulated domain's real files.
fn files(args: &[&str]) -> Result<(), AgentError> {
    let out = std::process::Command::new("qemu-img").args(args).output().map_err(|e| {
        AgentError::new(AgentErrorCode::Driver, format!("cannot run qemu-img: {e}"))
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(AgentError::new(
        AgentErrorCode::Driver,
        format!("qemu-img {} failed: {}", args[0], String::from_utf8_lossy(&out.stderr).trim()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> SimConfig {
        SimConfig {
            hostname: "sim".into(),
            cpus: 4,
            memory_mib: 4096,
            latency: Duration::ZERO,
            failures: HashMap::new(),
            state_file: dir.join("sim-domains.json"),
            reset: false,
        }
    }

    fn spec(name: &str) -> DomainSpec {
        DomainSpec {
            uuid: Uuid::new_v4(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            root_volume: None,
            nics: vec![],
            disks: vec![],
        }
    }

    #[test]
    fn the_state_shrinks_and_grows_in_place_and_outlives_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let sim = Sim::open(config(dir.path())).unwrap();
        let (long, short) = (spec(&"long".repeat(100)), spec("short"));
        sim.define(&long).unwrap();
        sim.define(&short).unwrap();
        sim.start(short.uuid).unwrap();
        // A shorter state written over a longer one (the padding must not confuse a reader).
        sim.undefine(long.uuid).unwrap();
        let seen = Sim::domains_in(&config(dir.path()).state_file).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].uuid, seen[0].state), (short.uuid, DomainState::Running));
        drop(sim);
        let again = Sim::open(config(dir.path())).unwrap();
        let listed = again.list().unwrap();
        assert_eq!(listed.iter().map(|d| d.uuid).collect::<Vec<_>>(), [short.uuid]);
    }

    #[test]
    fn a_read_that_joins_two_states_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim-domains.json");
        let state = |seq: u64, name: &str| {
            let spec = spec(name);
            let domains =
                BTreeMap::from([(spec.uuid, SimDomain { spec, state: DomainState::Running })]);
            serde_json::to_vec(&StateFile { seq, domains, end: seq }).unwrap()
        };
        let (old, new) = (state(7, "same-length-a"), state(8, "same-length-b"));
        assert_eq!(old.len(), new.len());
        // The start of the new state and the end of the old one: valid JSON, never a state.
        let half = old.len() / 2;
        std::fs::write(&path, [&new[..half], &old[half..]].concat()).unwrap();
        let error = StateFile::read(&path).err().expect("a torn state was accepted");
        assert!(error.to_string().contains("changed while it was read"), "{error}");
        std::fs::write(&path, &new).unwrap();
        assert_eq!(StateFile::read(&path).unwrap().seq, 8);
    }
}
