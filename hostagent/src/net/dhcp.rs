//! Flat DHCP: per L3 network on a host, a namespace on the L3's bridge holding the L3's
//! DHCP address, and dnsmasq in it, supervised by the agent.
//!
//! Mechanics, and why (see `../shared/reference/networking.md`):
//!
//! - The namespace plugs into the bridge by a veth pair (`sdo<l3>` on the bridge, `sdi<l3>`
//!   inside), so dnsmasq answers only that bridge's guests and its address is the same on
//!   every host (the uplink isolation in [`super::nft`] keeps each host's DHCP to itself).
//! - Reservations only (`dhcp-range=...,static`): a MAC without one gets no address. The
//!   hosts file has no `set:` tags, because dnsmasq 2.90 crashes on SIGHUP with them and a
//!   live lease; per-L3 options live in the config file instead. The router is always
//!   given (without one dnsmasq hands out itself), and repeated in the classless routes
//!   (a client that takes option 121 ignores option 3).
//! - A change that only adds reservations is a rewrite of the hosts file and a SIGHUP. One
//!   that removes or changes one restarts dnsmasq with a leases file seeded from the
//!   reservations, so no guest is NAKed for a lease the old process gave (dnsmasq answers a
//!   renewal of a lease it does not know, or of one changed under it, with a NAK).
//! - dnsmasq runs in the foreground as the agent's child, one thread waiting on it; when it
//!   dies it is started again. Processes in the namespace that the agent did not start (a
//!   previous agent's dnsmasq, which outlives it) are killed before its own starts, since
//!   two would fight over the port. `ip netns del` does not end the processes in a
//!   namespace, so they are killed first.
//! - Everything a guest names (its host name) is checked before it reaches a file, so a
//!   name cannot add lines to dnsmasq's configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use strato_proto::AgentError;
use strato_proto::net::{DhcpHost, DhcpReport, DhcpSpec};
use uuid::Uuid;

use strato_proto::net::METADATA_ADDRESS;

use super::host::{Link, MARK, Observed, Scope, output, tool_error};
use super::metadata::MetadataServer;

/// How long an apply waits for a started dnsmasq to have a pid.
const START_WAIT: Duration = Duration::from_secs(5);

/// The flat DHCP services of one host.
#[derive(Debug)]
pub struct Dhcp {
    scope: Scope,
    dir: PathBuf,
    services: Mutex<BTreeMap<Uuid, Service>>,
    /// The metadata services, by L3 (those with the Flat provider's Userdata).
    metadata: Mutex<BTreeMap<Uuid, MetadataServer>>,
}

#[derive(Debug)]
struct Service {
    namespace: String,
    supervisor: Supervisor,
}

impl Dhcp {
    /// The DHCP services of the host `scope` names, with their files under `dir`.
    pub fn new(scope: Scope, dir: PathBuf) -> Self {
        Dhcp { scope, dir, services: Mutex::default(), metadata: Mutex::default() }
    }

    /// The host end of an L3's veth pair: `sdo` and the L3's first 12 hex digits.
    pub fn outer_device(&self, l3: Uuid) -> String {
        format!("sdo{}", &l3.simple().to_string()[..12])
    }

    fn inner_device(l3: Uuid) -> String {
        format!("sdi{}", &l3.simple().to_string()[..12])
    }

    /// The namespace of an L3's DHCP on `bridge`: the agent's prefix, the bridge and the L3
    /// (ZStack's `<bridge>_<l3Uuid>`, prefixed so the agent knows its own).
    pub fn namespace(&self, bridge: &str, l3: Uuid) -> String {
        format!("{}{bridge}_{}", self.scope.prefix, l3.simple())
    }

    fn service_dir(&self, l3: Uuid) -> PathBuf {
        self.dir.join(l3.to_string())
    }

    /// Makes the host's DHCP services `wanted` and removes the others (`links` is the host
    /// namespace as it is now). Returns what changed.
    pub fn converge(
        &self,
        wanted: &[DhcpSpec],
        observed: &Observed,
    ) -> Result<Vec<String>, AgentError> {
        let mut changes = Vec::new();
        let wanted_ns: BTreeMap<String, &DhcpSpec> =
            wanted.iter().map(|s| (self.namespace(&s.bridge, s.l3), s)).collect();
        let mut services = self.services.lock().expect("dhcp services");
        // Services no longer wanted, or moved to another namespace, stop first.
        let stale: Vec<Uuid> = services
            .iter()
            .filter(|(_, s)| !wanted_ns.contains_key(&s.namespace))
            .map(|(l3, _)| *l3)
            .collect();
        for l3 in stale {
            if let Some(service) = services.remove(&l3) {
                service.supervisor.stop();
            }
        }
        // A metadata service holds its namespace: it stops before the namespace goes.
        let with_metadata: BTreeSet<Uuid> =
            wanted.iter().filter(|s| s.metadata.is_some()).map(|s| s.l3).collect();
        self.metadata.lock().expect("metadata services").retain(|l3, _| with_metadata.contains(l3));
        for namespace in self.namespaces()? {
            if !wanted_ns.contains_key(&namespace) {
                self.remove_namespace(&namespace)?;
                changes.push(format!("removed namespace {namespace}"));
            }
        }
        // The directory holds one subdirectory per service, named by its L3: the others are
        // left from services no longer wanted.
        let wanted_dirs: BTreeSet<String> = wanted.iter().map(|s| s.l3.to_string()).collect();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if !entry.file_name().to_str().is_some_and(|n| wanted_dirs.contains(n)) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let present = self.namespaces()?;
        for (namespace, spec) in wanted_ns {
            self.converge_one(
                spec,
                &namespace,
                present.contains(&namespace) && usable_or_removed(&namespace),
                observed,
                &mut services,
                &mut changes,
            )?;
        }
        Ok(changes)
    }

    fn converge_one(
        &self,
        spec: &DhcpSpec,
        namespace: &str,
        present: bool,
        observed: &Observed,
        services: &mut BTreeMap<Uuid, Service>,
        changes: &mut Vec<String>,
    ) -> Result<(), AgentError> {
        let outer = self.outer_device(spec.l3);
        let inner = Self::inner_device(spec.l3);
        if !present {
            run_ip(&["netns", "add", namespace])?;
            run_ip(&["-n", namespace, "link", "set", "lo", "up"])?;
            changes.push(format!("made namespace {namespace}"));
        }
        let inside: Vec<Link> =
            serde_json::from_str(&run_ip(&["-n", namespace, "-j", "-d", "link", "show"])?)
                .map_err(|e| tool_error(format!("cannot read the links of {namespace}: {e}")))?;
        let inner_present = inside.iter().any(|l| l.ifname == inner);
        let outer_link = observed.links.get(&outer);
        if outer_link.is_none() || !inner_present {
            if outer_link.is_some() {
                // It may be gone already: a removed namespace takes its veth pair with it,
                // a moment after (the kernel cleans namespaces up in the background).
                let _ = self.scope.run("ip", &strings(&["link", "del", &outer]));
            }
            self.scope.run(
                "ip",
                &strings(&[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns",
                    namespace,
                ]),
            )?;
            self.scope
                .run("ip", &strings(&["link", "set", &outer, "alias", &format!("{MARK}dhcp")]))?;
            changes.push(format!("made veth {outer} into {namespace}"));
        }
        if outer_link.is_none_or(|l| l.master.as_deref() != Some(spec.bridge.as_str()))
            || !inner_present
        {
            self.scope
                .run("ip", &strings(&["link", "set", &outer, "master", &spec.bridge, "up"]))?;
        }
        if let Some(mtu) = spec.mtu {
            run_ip(&["-n", namespace, "link", "set", &inner, "mtu", &mtu.to_string()])?;
        }
        run_ip(&["-n", namespace, "link", "set", &inner, "up"])?;
        let mut wanted_addresses = vec![format!("{}/{}", spec.address, spec.prefix_len)];
        if spec.metadata.is_some() {
            wanted_addresses.push(format!("{METADATA_ADDRESS}/32"));
        }
        let addresses = run_ip(&["-n", namespace, "-4", "-o", "addr", "show", "dev", &inner])?;
        let current: Vec<&str> =
            addresses.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
        if current != wanted_addresses {
            run_ip(&["-n", namespace, "addr", "flush", "dev", &inner])?;
            for address in &wanted_addresses {
                run_ip(&["-n", namespace, "addr", "add", address, "dev", &inner])?;
            }
            changes.push(format!(
                "addressed {inner} in {namespace} as {}",
                wanted_addresses.join(", ")
            ));
        }
        if let Some(guests) = &spec.metadata {
            let mut servers = self.metadata.lock().expect("metadata services");
            if !present {
                // Its socket is in the namespace that was removed (and that it keeps
                // alive): a new one listens in the new namespace.
                servers.remove(&spec.l3);
            }
            let server = match servers.entry(spec.l3) {
                std::collections::btree_map::Entry::Occupied(running) => running.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    changes.push(format!(
                        "started the metadata service of {} in {namespace}",
                        spec.l3
                    ));
                    slot.insert(MetadataServer::start(namespace)?)
                }
            };
            server.set(guests);
        }

        let dir = self.service_dir(spec.l3);
        std::fs::create_dir_all(&dir)
            .map_err(|e| tool_error(format!("cannot make {}: {e}", dir.display())))?;
        let config = render_config(spec, &inner, &dir);
        let hosts = valid_hosts(&spec.hosts);
        let hosts_text = render_hosts(&hosts);
        let config_path = dir.join("dnsmasq.conf");
        let hosts_path = dir.join("hosts");
        let old_config = std::fs::read_to_string(&config_path).ok();
        let old_hosts = std::fs::read_to_string(&hosts_path).map(|t| parse_hosts(&t)).ok();
        write_atomically(&hosts_path, &hosts_text)?;
        write_atomically(&config_path, &config)?;

        let running = services.get(&spec.l3).and_then(|s| s.supervisor.pid());
        if let Some(pid) = running {
            kill_strangers(namespace, Some(pid))?;
            if old_config.as_deref() != Some(config.as_str()) {
                services[&spec.l3].supervisor.restart();
                changes.push(format!("restarted dnsmasq of {} (configuration)", spec.l3));
            } else if old_hosts.as_ref() != Some(&hosts) {
                let only_added =
                    old_hosts.as_ref().is_some_and(|old| old.iter().all(|h| hosts.contains(h)));
                if only_added {
                    signal(pid, Signal::HUP);
                    changes.push(format!("reloaded dnsmasq of {} (reservations added)", spec.l3));
                } else {
                    services[&spec.l3].supervisor.restart();
                    changes
                        .push(format!("restarted dnsmasq of {} (reservations changed)", spec.l3));
                }
            }
        } else {
            if let Some(old) = services.remove(&spec.l3) {
                old.supervisor.stop();
            }
            kill_strangers(namespace, None)?;
            let supervisor = Supervisor::start(spec.l3, namespace.to_owned(), dir)?;
            services.insert(spec.l3, Service { namespace: namespace.to_owned(), supervisor });
            changes.push(format!("started dnsmasq of {} in {namespace}", spec.l3));
        }
        Ok(())
    }

    /// The DHCP services as they are: namespace, dnsmasq's pid and the reservations in
    /// its hosts file.
    pub fn report(&self) -> Result<Vec<DhcpReport>, AgentError> {
        let services = self.services.lock().expect("dhcp services");
        Ok(services
            .iter()
            .map(|(l3, s)| DhcpReport {
                l3: *l3,
                namespace: s.namespace.clone(),
                pid: s.supervisor.pid(),
                hosts: std::fs::read_to_string(self.service_dir(*l3).join("hosts"))
                    .map(|t| parse_hosts(&t))
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// The namespaces with the agent's prefix.
    fn namespaces(&self) -> Result<Vec<String>, AgentError> {
        Ok(run_ip(&["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&self.scope.prefix))
            .filter(|n| !n.starts_with(&super::vip::namespace_prefix(&self.scope)))
            .map(str::to_owned)
            .collect())
    }

    fn remove_namespace(&self, namespace: &str) -> Result<(), AgentError> {
        if !usable_or_removed(namespace) {
            return Ok(());
        }
        kill_strangers(namespace, None)?;
        run_ip(&["netns", "del", namespace]).map(|_| ())
    }

    /// Stops every dnsmasq the agent runs (the agent is stopping; the next one adopts
    /// nothing and starts its own).
    pub fn stop_all(&self) {
        self.metadata.lock().expect("metadata services").clear();
        let mut services = self.services.lock().expect("dhcp services");
        for (_, service) in std::mem::take(&mut *services) {
            service.supervisor.stop();
        }
    }
}

impl Drop for Dhcp {
    fn drop(&mut self) {
        self.stop_all();
    }
}

pub(crate) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// `ip` run in the agent's own namespace (named namespaces are the machine's).
pub(crate) fn run_ip(args: &[&str]) -> Result<String, AgentError> {
    let mut command = Command::new("ip");
    command.args(args);
    output(command, &format!("ip {}", args.join(" ")))
}

/// Whether namespace `namespace` (listed in `/run/netns`) can be entered. One that cannot
/// (its file outlived its mount: made in a mount namespace that ended, or unmounted by
/// hand) is removed, so that it is made again rather than failing every apply.
pub(crate) fn usable_or_removed(namespace: &str) -> bool {
    if run_ip(&["-n", namespace, "link", "show", "lo"]).is_ok() {
        return true;
    }
    tracing::warn!(namespace, "a namespace that cannot be entered is removed, to be made again");
    let _ = run_ip(&["netns", "del", namespace]);
    false
}

/// Kills every process in `namespace` but `ours`.
pub(crate) fn kill_strangers(namespace: &str, ours: Option<u32>) -> Result<(), AgentError> {
    let pids = run_ip(&["netns", "pids", namespace])?;
    for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if Some(pid) != ours {
            tracing::warn!(namespace, pid, "killing a process the agent did not start");
            signal(pid, Signal::KILL);
        }
    }
    Ok(())
}

fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, signal);
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), AgentError> {
    let spare = path.with_extension("new");
    std::fs::write(&spare, text)
        .and_then(|()| std::fs::rename(&spare, path))
        .map_err(|e| tool_error(format!("cannot write {}: {e}", path.display())))
}

/// Whether `name` can be a guest's host name: one DNS label.
fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `mac` is six colon-separated pairs of hex digits.
pub(crate) fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The reservations that can be written: a bad MAC drops the reservation, a bad host name
/// drops the name (both logged), in a stable order.
fn valid_hosts(hosts: &[DhcpHost]) -> Vec<DhcpHost> {
    let mut valid: Vec<DhcpHost> = hosts
        .iter()
        .filter(|h| {
            let ok = valid_mac(&h.mac);
            if !ok {
                tracing::warn!(mac = %h.mac, "refusing a DHCP reservation with a malformed MAC");
            }
            ok
        })
        .map(|h| DhcpHost {
            mac: h.mac.to_ascii_lowercase(),
            ip: h.ip,
            hostname: if valid_hostname(&h.hostname) {
                h.hostname.clone()
            } else {
                tracing::warn!(mac = %h.mac, "a DHCP reservation's host name is not a DNS label; left out");
                String::new()
            },
        })
        .collect();
    valid.sort_by(|a, b| a.mac.cmp(&b.mac));
    valid.dedup_by(|a, b| a.mac == b.mac);
    valid
}

fn render_hosts(hosts: &[DhcpHost]) -> String {
    hosts
        .iter()
        .map(|h| {
            if h.hostname.is_empty() {
                format!("{},{},infinite\n", h.mac, h.ip)
            } else {
                format!("{},{},{},infinite\n", h.mac, h.ip, h.hostname)
            }
        })
        .collect()
}

fn parse_hosts(text: &str) -> Vec<DhcpHost> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let (mac, ip, hostname) = match fields.as_slice() {
                [mac, ip, "infinite"] => (mac, ip, ""),
                [mac, ip, hostname, "infinite"] => (mac, ip, *hostname),
                _ => return None,
            };
            Some(DhcpHost {
                mac: (*mac).to_owned(),
                ip: ip.parse().ok()?,
                hostname: hostname.to_owned(),
            })
        })
        .collect()
}

fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix_len.min(32))).unwrap_or(0))
}

/// dnsmasq's configuration for one L3: DHCP only (no DNS server), reservations only, the
/// L3's options.
pub fn render_config(spec: &DhcpSpec, inner: &str, dir: &Path) -> String {
    let mask = netmask(spec.prefix_len);
    let network = Ipv4Addr::from(u32::from(spec.address) & u32::from(mask));
    let mut c = format!(
        "# strato-agent: the flat DHCP of L3 {l3}, rewritten whole on every change\n\
         port=0\nno-resolv\nno-hosts\nuser=root\n\
         interface={inner}\nbind-interfaces\nexcept-interface=lo\n\
         dhcp-authoritative\n\
         dhcp-range={network},static,{mask},infinite\n\
         dhcp-hostsfile={hosts}\ndhcp-leasefile={leases}\n\
         log-facility={log}\nlog-dhcp\n\
         dhcp-option=option:router,{gw}\n",
        l3 = spec.l3,
        hosts = dir.join("hosts").display(),
        leases = dir.join("leases").display(),
        log = dir.join("dnsmasq.log").display(),
        gw = spec.gateway,
    );
    if !spec.dns.is_empty() {
        let dns: Vec<String> = spec.dns.iter().map(Ipv4Addr::to_string).collect();
        c.push_str(&format!("dhcp-option=option:dns-server,{}\n", dns.join(",")));
    }
    if !spec.routes.is_empty() {
        let mut routes: Vec<String> = spec
            .routes
            .iter()
            .map(|r| format!("{}/{},{}", r.destination, r.prefix_len, r.nexthop))
            .collect();
        routes.push(format!("0.0.0.0/0,{}", spec.gateway));
        c.push_str(&format!("dhcp-option=option:classless-static-route,{}\n", routes.join(",")));
    }
    if let Some(mtu) = spec.mtu {
        c.push_str(&format!("dhcp-option=option:mtu,{mtu}\n"));
    }
    if let Some(domain) = spec.domain.as_deref().filter(|d| d.split('.').all(valid_hostname)) {
        c.push_str(&format!("domain={domain}\ndhcp-option=option:domain-name,{domain}\n"));
    }
    c
}

/// The leases file dnsmasq starts from: every reservation as an infinite lease, so a guest
/// renewing after a restart is not refused.
fn seed_leases(dir: &Path) -> std::io::Result<()> {
    let hosts =
        std::fs::read_to_string(dir.join("hosts")).map(|t| parse_hosts(&t)).unwrap_or_default();
    let text: String = hosts
        .iter()
        .map(|h| {
            let name = if h.hostname.is_empty() { "*" } else { h.hostname.as_str() };
            format!("0 {} {} {name} *\n", h.mac, h.ip)
        })
        .collect();
    std::fs::write(dir.join("leases"), text)
}

/// One dnsmasq, kept running by a thread that waits on it and starts it again when it dies.
#[derive(Debug)]
struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    pid: Mutex<Option<u32>>,
    started: Condvar,
    stop: AtomicBool,
    /// Set by an apply that restarts it on purpose (not logged as a crash).
    restarting: AtomicBool,
}

impl Supervisor {
    fn start(l3: Uuid, namespace: String, dir: PathBuf) -> Result<Self, AgentError> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("dnsmasq-{}", &l3.simple().to_string()[..8]))
                .spawn(move || supervise(l3, &namespace, &dir, &shared))
                .map_err(|e| tool_error(format!("cannot start dnsmasq's supervisor: {e}")))?
        };
        let supervisor = Supervisor { shared, thread: Some(thread) };
        let pid = supervisor.shared.pid.lock().expect("dnsmasq pid");
        let (pid, _) = supervisor
            .shared
            .started
            .wait_timeout_while(pid, START_WAIT, |pid| pid.is_none())
            .expect("dnsmasq pid");
        if pid.is_none() {
            drop(pid);
            supervisor.stop();
            return Err(tool_error(format!("dnsmasq of L3 {l3} did not start")));
        }
        drop(pid);
        Ok(supervisor)
    }

    fn pid(&self) -> Option<u32> {
        *self.shared.pid.lock().expect("dnsmasq pid")
    }

    fn restart(&self) {
        self.shared.restarting.store(true, Ordering::SeqCst);
        if let Some(pid) = self.pid() {
            signal(pid, Signal::TERM);
        }
    }

    fn stop(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(pid) = self.pid() {
            signal(pid, Signal::TERM);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn supervise(l3: Uuid, namespace: &str, dir: &Path, shared: &Shared) {
    let mut backoff = Duration::from_millis(200);
    while !shared.stop.load(Ordering::SeqCst) {
        if let Err(error) = seed_leases(dir) {
            tracing::error!(%l3, %error, "cannot seed dnsmasq's leases");
        }
        let child = Command::new("ip")
            .args(["netns", "exec", namespace, "dnsmasq", "--keep-in-foreground", "--pid-file"])
            .arg(format!("--conf-file={}", dir.join("dnsmasq.conf").display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(%l3, %error, "cannot start dnsmasq");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        *shared.pid.lock().expect("dnsmasq pid") = Some(child.id());
        shared.started.notify_all();
        let status = child.wait();
        *shared.pid.lock().expect("dnsmasq pid") = None;
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if shared.restarting.swap(false, Ordering::SeqCst) {
            backoff = Duration::from_millis(200);
            continue;
        }
        tracing::warn!(%l3, namespace, ?status, "dnsmasq exited; starting it again");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strato_proto::net::HostRoute;

    fn spec() -> DhcpSpec {
        DhcpSpec {
            l3: Uuid::nil(),
            bridge: "br_vx_5".into(),
            address: Ipv4Addr::new(10, 1, 0, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 1, 0, 1),
            dns: vec![Ipv4Addr::new(10, 1, 0, 53)],
            routes: vec![HostRoute {
                destination: Ipv4Addr::new(172, 16, 0, 0),
                prefix_len: 12,
                nexthop: Ipv4Addr::new(10, 1, 0, 254),
            }],
            mtu: Some(1450),
            domain: Some("example.org".into()),
            hosts: vec![],
            metadata: None,
        }
    }

    #[test]
    fn the_configuration_names_the_router_and_repeats_it_among_the_routes() {
        let text = render_config(&spec(), "sdi000000000000", Path::new("/d"));
        assert!(text.contains("dhcp-range=10.1.0.0,static,255.255.255.0,infinite\n"));
        assert!(text.contains("dhcp-option=option:router,10.1.0.1\n"));
        assert!(text.contains(
            "dhcp-option=option:classless-static-route,172.16.0.0/12,10.1.0.254,0.0.0.0/0,10.1.0.1\n"
        ));
        assert!(text.contains("dhcp-option=option:dns-server,10.1.0.53\n"));
        assert!(text.contains("dhcp-option=option:mtu,1450\n"));
        assert!(!text.contains("set:"));
    }

    #[test]
    fn a_hostile_name_or_mac_never_reaches_the_hosts_file() {
        let hosts = valid_hosts(&[
            DhcpHost {
                mac: "FA:16:3E:00:00:02".into(),
                ip: Ipv4Addr::new(10, 1, 0, 9),
                hostname: "web-1".into(),
            },
            DhcpHost {
                mac: "fa:16:3e:00:00:01".into(),
                ip: Ipv4Addr::new(10, 1, 0, 8),
                hostname: "x\ndhcp-option=3,6.6.6.6".into(),
            },
            DhcpHost {
                mac: "fa:16:3e:00:00,9".into(),
                ip: Ipv4Addr::new(10, 1, 0, 7),
                hostname: "a".into(),
            },
        ]);
        let text = render_hosts(&hosts);
        assert_eq!(
            text,
            "fa:16:3e:00:00:01,10.1.0.8,infinite\nfa:16:3e:00:00:02,10.1.0.9,web-1,infinite\n"
        );
        assert_eq!(parse_hosts(&text), hosts);
    }
}
