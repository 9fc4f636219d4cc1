//! `libvirt`: the real driver, through the `virt` crate.
//!
//! One connection serves every call (libvirt connections are thread-safe). With
//! `test:///default` the connection *is* the hypervisor: its domains live in this process and
//! die with it, so restarting an agent on the test driver is a host reboot. With
//! `qemu:///system` domains outlive the agent, as on a real host; a lost connection to
//! libvirtd is reopened on the next call.
//!
//! State changes reach the MN by fast polling (every 200 ms, on its own thread, on the same
//! connection) rather than libvirt's event callbacks, which `virt` 0.5 exposes only as raw
//! FFI: polling needs no unsafe code, survives libvirtd restarts without re-registration, and
//! costs one list call per tick.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strato_proto::{
    AgentError, AgentErrorCode, AgentEvent, DiskSpec, DomainInfo, DomainSpec, DomainState,
    HostFacts,
};
use tokio::sync::broadcast;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use super::{Driver, not_found};

/// The libvirt driver.
#[derive(Debug, Clone)]
pub struct Libvirt {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    uri: String,
    conn: Mutex<Connect>,
    /// Where each guest's serial console is logged (`<uuid>.log`), when set.
    serial_logs: Option<PathBuf>,
}

fn driver_error(what: &str, error: &virt::error::Error) -> AgentError {
    AgentError::new(AgentErrorCode::Driver, format!("libvirt {what} failed: {}", error.message()))
}

fn map_state(state: virt::domain::DomainState) -> DomainState {
    use virt::domain::DomainState as V;
    match state {
        V::Running | V::Blocked => DomainState::Running,
        V::Paused | V::PMSuspended => DomainState::Paused,
        V::Shutdown => DomainState::ShuttingDown,
        V::Shutoff => DomainState::Shutoff,
        V::Crashed => DomainState::Crashed,
        V::NoState => DomainState::Other,
    }
}

/// Escapes text for an XML attribute or element.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A data volume's `<disk>`: virtio, named by its device number, with the volume's UUID as
/// its serial (virtio's limit is 20 characters: the first 20 of the UUID's hex), so a guest
/// finds it in `/dev/disk/by-id` whatever order it was plugged in.
fn disk_xml(disk: &DiskSpec) -> String {
    let serial: String = disk.volume.simple().to_string().chars().take(20).collect();
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='{}' bus='virtio'/><serial>{serial}</serial></disk>",
        xml_escape(&disk.path),
        disk.target()
    )
}

/// The disks' target names in a domain's XML (`vda`, `vdb`...).
fn targets(xml: &str) -> Vec<String> {
    xml.split("<target dev=")
        .skip(1)
        .filter_map(|rest| {
            let quote = rest.chars().next()?;
            rest[1..].split(quote).next().map(str::to_owned)
        })
        .collect()
}

/// How long a block pull may take.
const PULL_WAIT: Duration = Duration::from_secs(600);

/// Pulls into `target`'s top every layer of its chain above `base` and waits for the job
/// to end. `virt` 0.5 wraps neither `virDomainBlockRebase` nor `virDomainGetBlockJobInfo`,
/// so this calls them through `virt::sys`, the one unsafe code in the agent.
#[expect(unsafe_code, reason = "virt 0.5 has no safe block rebase or block job info")]
fn block_pull(domain: &Domain, target: &str, base: Option<&str>) -> Result<(), AgentError> {
    use std::ffi::CString;
    let bad = |what: &str| {
        AgentError::new(AgentErrorCode::BadRequest, format!("{what} holds a NUL byte"))
    };
    let disk = CString::new(target).map_err(|_| bad("the disk name"))?;
    let base = base.map(CString::new).transpose().map_err(|_| bad("the base path"))?;
    let base_ptr = base.as_ref().map_or(std::ptr::null(), |b| b.as_ptr());
    // SAFETY: the domain pointer is valid while `domain` lives; the strings live until the
    // call returns; libvirt copies what it keeps.
    let started =
        unsafe { virt::sys::virDomainBlockRebase(domain.as_ptr(), disk.as_ptr(), base_ptr, 0, 0) };
    if started < 0 {
        return Err(driver_error("block pull", &virt::error::Error::last_error()));
    }
    let begun = std::time::Instant::now();
    loop {
        let mut info = virt::sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
        // SAFETY: as above; `info` is a valid place for libvirt to write the job's state.
        let running = unsafe {
            virt::sys::virDomainGetBlockJobInfo(domain.as_ptr(), disk.as_ptr(), &mut info, 0)
        };
        match running {
            0 => return Ok(()),
            n if n < 0 => {
                return Err(driver_error("block job info", &virt::error::Error::last_error()));
            }
            _ if begun.elapsed() > PULL_WAIT => {
                return Err(AgentError::new(
                    AgentErrorCode::Driver,
                    format!("the block pull of {target} did not end within {PULL_WAIT:?}"),
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// How long an unplug may take: a virtio disk leaves when the guest lets it go.
const DETACH_WAIT: Duration = Duration::from_secs(20);

impl Libvirt {
    /// Connects to libvirt at `uri`.
    pub fn open(uri: &str) -> Result<Self, AgentError> {
        Self::connect(uri, None)
    }

    /// Connects to libvirt at `uri` and logs every guest's serial console to
    /// `dir/<vm uuid>.log` (written by libvirt's virtlogd), so an operator can read what a
    /// guest printed while it booted. `dir` must be absolute.
    pub fn open_with_serial_logs(uri: &str, dir: PathBuf) -> Result<Self, AgentError> {
        Self::connect(uri, Some(dir))
    }

    fn connect(uri: &str, serial_logs: Option<PathBuf>) -> Result<Self, AgentError> {
        let conn = Connect::open(Some(uri)).map_err(|e| driver_error("connect", &e))?;
        Ok(Libvirt {
            shared: Arc::new(Shared { uri: uri.to_owned(), conn: Mutex::new(conn), serial_logs }),
        })
    }

    /// The connection, reopened first if libvirtd went away.
    fn conn(&self) -> Result<Connect, AgentError> {
        let mut conn = self.shared.conn.lock().expect("libvirt lock");
        if !conn.is_alive().unwrap_or(false) {
            tracing::warn!(uri = %self.shared.uri, "libvirt connection lost; reconnecting");
            *conn =
                Connect::open(Some(&self.shared.uri)).map_err(|e| driver_error("reconnect", &e))?;
        }
        Ok(conn.clone())
    }

    fn domain(&self, uuid: Uuid) -> Result<Option<Domain>, AgentError> {
        match self.conn()?.lookup_domain_by_uuid(uuid) {
            Ok(domain) => Ok(Some(domain)),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(driver_error("lookup", &e)),
        }
    }

    fn existing(&self, uuid: Uuid) -> Result<Domain, AgentError> {
        self.domain(uuid)?.ok_or_else(|| not_found(uuid))
    }

    /// Whether the running domain has `disk`'s file plugged in.
    fn plugged(&self, domain: &Domain, disk: &DiskSpec) -> Result<bool, AgentError> {
        let xml = domain.xml_desc(0).map_err(|e| driver_error("read the domain", &e))?;
        Ok(xml.contains(&format!("file='{}'", xml_escape(&disk.path)))
            || xml.contains(&format!("file=\"{}\"", xml_escape(&disk.path))))
    }

    fn state(domain: &Domain) -> Result<DomainState, AgentError> {
        let (state, _) = domain.state().map_err(|e| driver_error("state", &e))?;
        Ok(state.known().map_or(DomainState::Other, map_state))
    }

    /// The domain XML for `spec`: TCG guests on qemu (KVM is not assumed), `test` domains on
    /// the test driver.
    fn domain_xml(&self, spec: &DomainSpec) -> String {
        let test = self.shared.uri.starts_with("test:");
        let mut devices = String::new();
        if let Some(path) = &spec.root_volume {
            devices.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
                xml_escape(path)
            ));
        }
        for disk in &spec.disks {
            devices.push_str(&disk_xml(disk));
        }
        for nic in &spec.nics {
            match &nic.bridge {
                // The tap is named from the MAC, so the host's network rules (anti-spoofing,
                // security groups) can name the port before the domain exists.
                Some(bridge) => devices.push_str(&format!(
                    "<interface type='bridge'><mac address='{}'/><source bridge='{}'/><target dev='{}'/><model type='virtio'/></interface>",
                    xml_escape(&nic.mac),
                    xml_escape(bridge),
                    xml_escape(&strato_proto::net::nic_device(&nic.mac))
                )),
                None => devices.push_str(&format!(
                    "<interface type='user'><mac address='{}'/><model type='virtio'/></interface>",
                    xml_escape(&nic.mac)
                )),
            }
        }
        if !test {
            match &self.shared.serial_logs {
                Some(dir) => devices.push_str(&format!(
                    "<serial type='pty'><log file='{}' append='on'/></serial><console type='pty'/>",
                    xml_escape(&dir.join(format!("{}.log", spec.uuid)).display().to_string())
                )),
                None => devices.push_str("<serial type='pty'/><console type='pty'/>"),
            }
        }
        format!(
            "<domain type='{kind}'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>{mem}</memory><vcpu>{vcpus}</vcpu>\
             <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>\
             <features><acpi/><apic/></features>\
             <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
             <devices>{devices}</devices></domain>",
            kind = if test { "test" } else { "qemu" },
            name = xml_escape(&spec.name),
            uuid = spec.uuid,
            mem = spec.memory_mib,
            vcpus = spec.vcpus,
        )
    }
}

impl Driver for Libvirt {
    fn facts(&self) -> Result<HostFacts, AgentError> {
        let conn = self.conn()?;
        let info = conn.node_info().map_err(|e| driver_error("node info", &e))?;
        Ok(HostFacts {
            hostname: conn.hostname().map_err(|e| driver_error("hostname", &e))?,
            hypervisor: format!("libvirt {}", self.shared.uri),
            cpus: info.cpus,
            memory_mib: info.memory / 1024,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            addresses: Vec::new(),
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>, AgentError> {
        let domains = self.conn()?.list_all_domains(0).map_err(|e| driver_error("list", &e))?;
        let mut infos = Vec::with_capacity(domains.len());
        for domain in domains {
            let uuid = domain.uuid().map_err(|e| driver_error("uuid", &e))?;
            let name = domain.name().map_err(|e| driver_error("name", &e))?;
            infos.push(DomainInfo { uuid, name, state: Self::state(&domain)? });
        }
        Ok(infos)
    }

    fn define(&self, spec: &DomainSpec) -> Result<(), AgentError> {
        if let Some(domain) = self.domain(spec.uuid)?
            && Self::state(&domain)? != DomainState::Shutoff
        {
            // Already defined and running: defining again would only stage a new config.
            return Ok(());
        }
        self.conn()?
            .define_domain_xml(&self.domain_xml(spec))
            .map(|_| ())
            .map_err(|e| driver_error("define", &e))
    }

    fn start(&self, uuid: Uuid) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        match Self::state(&domain)? {
            DomainState::Running => Ok(()),
            DomainState::Paused => {
                domain.resume().map(|_| ()).map_err(|e| driver_error("resume", &e))
            }
            _ => domain.create().map(|_| ()).map_err(|e| driver_error("start", &e)),
        }
    }

    fn shutdown(&self, uuid: Uuid) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        if Self::state(&domain)? == DomainState::Shutoff {
            return Ok(());
        }
        domain.shutdown().map(|_| ()).map_err(|e| driver_error("shutdown", &e))
    }

    fn destroy(&self, uuid: Uuid) -> Result<(), AgentError> {
        let Some(domain) = self.domain(uuid)? else { return Ok(()) };
        if Self::state(&domain)? == DomainState::Shutoff {
            return Ok(());
        }
        domain.destroy().map(|_| ()).map_err(|e| driver_error("destroy", &e))
    }

    fn reboot(&self, uuid: Uuid) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        domain.reboot(0).map(|_| ()).map_err(|e| driver_error("reboot", &e))
    }

    fn suspend(&self, uuid: Uuid) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        if Self::state(&domain)? == DomainState::Paused {
            return Ok(());
        }
        domain.suspend().map(|_| ()).map_err(|e| driver_error("suspend", &e))
    }

    fn resume(&self, uuid: Uuid) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        if Self::state(&domain)? == DomainState::Running {
            return Ok(());
        }
        domain.resume().map(|_| ()).map_err(|e| driver_error("resume", &e))
    }

    fn undefine(&self, uuid: Uuid) -> Result<(), AgentError> {
        let Some(domain) = self.domain(uuid)? else { return Ok(()) };
        domain.undefine().map(|_| ()).map_err(|e| driver_error("undefine", &e))
    }

    fn attach_disk(&self, uuid: Uuid, disk: &DiskSpec) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        if self.plugged(&domain, disk)? {
            return Ok(());
        }
        let flags = virt::sys::VIR_DOMAIN_AFFECT_LIVE | virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
        domain
            .attach_device_flags(&disk_xml(disk), flags)
            .map(|_| ())
            .map_err(|e| driver_error("attach disk", &e))
    }

    fn detach_disk(&self, uuid: Uuid, disk: &DiskSpec) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        if !self.plugged(&domain, disk)? {
            return Ok(());
        }
        let flags = virt::sys::VIR_DOMAIN_AFFECT_LIVE | virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
        domain
            .detach_device_flags(&disk_xml(disk), flags)
            .map_err(|e| driver_error("detach disk", &e))?;
        // libvirt returns once QEMU was asked; the disk is gone when the guest released it.
        let started = std::time::Instant::now();
        while self.plugged(&domain, disk)? {
            if started.elapsed() > DETACH_WAIT {
                return Err(AgentError::new(
                    AgentErrorCode::Driver,
                    format!(
                        "the guest of domain {uuid} did not release disk {} within {DETACH_WAIT:?}",
                        disk.target()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn snapshot_disk(&self, uuid: Uuid, disk: &DiskSpec, new_top: &str) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        let xml = domain.xml_desc(0).map_err(|e| driver_error("read the domain", &e))?;
        if xml.contains(&format!("file='{}'", xml_escape(new_top))) {
            return Ok(());
        }
        // Only this disk: every other one (the root volume's) is left as it is.
        let target = disk.target();
        let others: String = targets(&xml)
            .into_iter()
            .filter(|t| *t != target)
            .map(|t| format!("<disk name='{}' snapshot='no'/>", xml_escape(&t)))
            .collect();
        let snapshot = format!(
            "<domainsnapshot><disks><disk name='{target}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>{others}</disks></domainsnapshot>",
            xml_escape(new_top)
        );
        let flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        domain
            .create_snapshot_xml(&snapshot, flags)
            .map(drop)
            .map_err(|e| driver_error("snapshot disk", &e))
    }

    fn pull_disk(&self, uuid: Uuid, disk: &DiskSpec, base: Option<&str>) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        block_pull(&domain, &disk.target(), base)
    }

    fn resize_disk(&self, uuid: Uuid, disk: &DiskSpec, size: u64) -> Result<(), AgentError> {
        let domain = self.existing(uuid)?;
        domain
            .block_resize(&disk.target(), size, virt::sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            .map_err(|e| driver_error("resize disk", &e))
    }

    fn watch(&self, events: broadcast::Sender<AgentEvent>) {
        let driver = self.clone();
        let spawned = std::thread::Builder::new().name("libvirt-watch".into()).spawn(move || {
            let mut known: HashMap<Uuid, DomainState> = HashMap::new();
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let Ok(domains) = driver.conn().and_then(|conn| {
                    conn.list_all_domains(0).map_err(|e| driver_error("list", &e))
                }) else {
                    tracing::warn!(uri = %driver.shared.uri, "libvirt watch: listing domains failed");
                    continue;
                };
                let mut now = HashMap::with_capacity(domains.len());
                for domain in domains {
                    if let (Ok(uuid), Ok(state)) = (domain.uuid(), Libvirt::state(&domain)) {
                        now.insert(uuid, state);
                    }
                }
                for (uuid, state) in &now {
                    if known.get(uuid) != Some(state) {
                        let _ = events.send(AgentEvent::DomainStateChanged { uuid: *uuid, state: Some(*state) });
                    }
                }
                for uuid in known.keys() {
                    if !now.contains_key(uuid) {
                        let _ = events.send(AgentEvent::DomainStateChanged { uuid: *uuid, state: None });
                    }
                }
                known = now;
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the libvirt watch thread");
        }
    }
}
