//! The real host network, made with iproute2, nftables and dnsmasq.
//!
//! An apply reads what is on the host (`ip -j`), works out the commands that take it to the
//! desired state ([`plan`], a pure function, so the commands for what this kernel cannot
//! run, VLAN devices, are tested as commands), runs them, then converges the DHCP services
//! ([`super::dhcp`]) and the uplink isolation table ([`super::nft`]).
//!
//! What the agent makes carries its mark, so it can find and remove what is no longer
//! wanted without touching anything else on the host: links get the alias `strato:<role>`
//! (bridges keep ZStack's names, `br_eth0`, so the alias is the mark), namespaces and nft
//! tables a name prefix. The host's own interface, enslaved to a NoVlan bridge, is never
//! marked and never deleted.
//!
//! The agent may manage a network namespace instead of its own (`--netns`): every command
//! then runs in it, which is how the tests build several hosts on one machine without
//! touching the machine's network.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde::Deserialize;
use strato_proto::net::{BridgeSpec, NetworkConfig, NetworkReport, Uplink, VXLAN_PORT};
use strato_proto::{AgentError, AgentErrorCode, InterfaceAddress};

use super::Network;
use super::dhcp::Dhcp;

/// The alias every link the agent makes carries, followed by its role.
pub const MARK: &str = "strato:";

/// Where the agent's network lives and how it names what it makes.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The namespace the host's network is in (none: the agent's own).
    pub netns: Option<String>,
    /// The prefix of every namespace the agent makes; distinct per agent on one machine.
    pub prefix: String,
}

impl Scope {
    /// `program args...`, run in the host's namespace.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, program]);
                command
            }
            None => Command::new(program),
        }
    }

    /// Runs `program args` in the host's namespace and returns its standard output.
    pub fn run(&self, program: &str, args: &[String]) -> Result<String, AgentError> {
        let mut command = self.command(program);
        command.args(args);
        output(command, &format!("{program} {}", args.join(" ")))
    }
}

/// Runs `command`, its output as text or an error naming `what` and its stderr.
pub fn output(mut command: Command, what: &str) -> Result<String, AgentError> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| tool_error(format!("cannot run `{what}`: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(tool_error(format!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A host tool's failure, as the link reports it.
pub fn tool_error(message: String) -> AgentError {
    AgentError::new(AgentErrorCode::Driver, message)
}

/// A link as `ip -j -d link show` reports it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Link {
    /// Its name.
    pub ifname: String,
    /// Its alias (the agent's mark).
    #[serde(default)]
    pub ifalias: Option<String>,
    /// The bridge it is a port of.
    #[serde(default)]
    pub master: Option<String>,
    /// Its MTU.
    #[serde(default)]
    pub mtu: u32,
    /// `UP` among them when it is up.
    #[serde(default)]
    pub flags: Vec<String>,
    /// Its kind and parameters.
    #[serde(default)]
    pub linkinfo: Option<LinkInfo>,
}

/// A link's kind and its parameters.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LinkInfo {
    /// `bridge`, `vxlan`, `vlan`, `veth`...
    #[serde(default)]
    pub info_kind: Option<String>,
    /// The kind's parameters (a VXLAN's id, local address and port; a VLAN's id).
    #[serde(default)]
    pub info_data: Option<serde_json::Value>,
}

impl Link {
    fn kind(&self) -> Option<&str> {
        self.linkinfo.as_ref()?.info_kind.as_deref()
    }

    fn data(&self, key: &str) -> Option<&serde_json::Value> {
        self.linkinfo.as_ref()?.info_data.as_ref()?.get(key)
    }

    /// Whether the agent made it.
    pub fn marked(&self) -> bool {
        self.ifalias.as_deref().is_some_and(|a| a.starts_with(MARK))
    }

    fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
}

/// What an apply starts from: the host's links and each VXLAN device's flood entries.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Every link, by name.
    pub links: BTreeMap<String, Link>,
    /// Per VXLAN device, the VTEPs its all-zero FDB entries send floods to.
    pub floods: BTreeMap<String, BTreeSet<Ipv4Addr>>,
}

/// One command of a plan: the program and its arguments.
pub type Step = (&'static str, Vec<String>);

fn ip(args: &[&str]) -> Step {
    ("ip", args.iter().map(|a| (*a).to_owned()).collect())
}

fn bridge_cmd(args: &[&str]) -> Step {
    ("bridge", args.iter().map(|a| (*a).to_owned()).collect())
}

/// The commands that take the links in `observed` to the bridges in `wanted`, in order:
/// bridges and their uplinks made or repaired, then marked links no bridge wants removed
/// (`keep` names other marked links the apply still wants, the DHCP services' veths).
pub fn plan(wanted: &[BridgeSpec], observed: &Observed, keep: &BTreeSet<String>) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut wanted_links = keep.clone();
    for spec in wanted {
        let name = spec.name.as_str();
        wanted_links.insert(spec.name.clone());
        match observed.links.get(name) {
            Some(link) if link.kind() == Some("bridge") => {}
            Some(_) => {
                // Something else under the bridge's name: made by the agent, it is replaced;
                // otherwise the apply fails when it tries to make the bridge.
                if observed.links[name].marked() {
                    steps.push(ip(&["link", "del", name]));
                }
                push_new_bridge(&mut steps, name);
            }
            None => push_new_bridge(&mut steps, name),
        }
        if let Some(mtu) = spec.mtu
            && observed.links.get(name).is_none_or(|l| l.mtu != mtu)
        {
            steps.push(ip(&["link", "set", name, "mtu", &mtu.to_string()]));
        }
        if observed.links.get(name).is_none_or(|l| !l.is_up()) {
            steps.push(ip(&["link", "set", name, "up"]));
        }
        let device = spec.uplink.device();
        let existing = observed.links.get(&device);
        let mut created = false;
        match &spec.uplink {
            Uplink::Interface { .. } => {}
            Uplink::Vlan { interface, vlan } => {
                let fits = existing.is_some_and(|l| {
                    l.kind() == Some("vlan")
                        && l.data("id").and_then(|v| v.as_u64()) == Some(u64::from(*vlan))
                });
                if !fits {
                    if existing.is_some_and(Link::marked) {
                        steps.push(ip(&["link", "del", &device]));
                    }
                    steps.push(ip(&[
                        "link",
                        "add",
                        "link",
                        interface,
                        "name",
                        &device,
                        "type",
                        "vlan",
                        "id",
                        &vlan.to_string(),
                    ]));
                    steps.push(ip(&["link", "set", &device, "alias", &format!("{MARK}vlan")]));
                    created = true;
                }
                wanted_links.insert(device.clone());
            }
            Uplink::Vxlan { vni, local, peers } => {
                let fits = existing.is_some_and(|l| {
                    l.kind() == Some("vxlan")
                        && l.data("id").and_then(|v| v.as_u64()) == Some(u64::from(*vni))
                        && l.data("local").and_then(|v| v.as_str())
                            == Some(local.to_string().as_str())
                        && l.data("port").and_then(|v| v.as_u64()) == Some(u64::from(VXLAN_PORT))
                });
                let floods = if fits {
                    observed.floods.get(&device).cloned().unwrap_or_default()
                } else {
                    if existing.is_some_and(Link::marked) {
                        steps.push(ip(&["link", "del", &device]));
                    }
                    steps.push(ip(&[
                        "link",
                        "add",
                        &device,
                        "type",
                        "vxlan",
                        "id",
                        &vni.to_string(),
                        "local",
                        &local.to_string(),
                        "dstport",
                        &VXLAN_PORT.to_string(),
                        "nolearning",
                    ]));
                    steps.push(ip(&["link", "set", &device, "alias", &format!("{MARK}vxlan")]));
                    created = true;
                    BTreeSet::new()
                };
                let peers: BTreeSet<Ipv4Addr> = peers.iter().copied().collect();
                for peer in peers.difference(&floods) {
                    let dst = peer.to_string();
                    steps.push(bridge_cmd(&[
                        "fdb",
                        "append",
                        "00:00:00:00:00:00",
                        "dev",
                        &device,
                        "dst",
                        &dst,
                    ]));
                }
                for gone in floods.difference(&peers) {
                    let dst = gone.to_string();
                    steps.push(bridge_cmd(&[
                        "fdb",
                        "del",
                        "00:00:00:00:00:00",
                        "dev",
                        &device,
                        "dst",
                        &dst,
                    ]));
                }
                wanted_links.insert(device.clone());
            }
        }
        if created || existing.is_none_or(|l| l.master.as_deref() != Some(name)) {
            steps.push(ip(&["link", "set", &device, "master", name]));
        }
        if created || existing.is_none_or(|l| !l.is_up()) {
            steps.push(ip(&["link", "set", &device, "up"]));
        }
    }
    for (name, link) in &observed.links {
        if link.marked() && !wanted_links.contains(name) {
            steps.push(ip(&["link", "del", name]));
        }
    }
    steps
}

fn push_new_bridge(steps: &mut Vec<Step>, name: &str) {
    steps.push(ip(&["link", "add", "name", name, "type", "bridge"]));
    steps.push(ip(&["link", "set", name, "alias", &format!("{MARK}bridge")]));
}

/// The real host network.
#[derive(Debug)]
pub struct HostNet {
    scope: Scope,
    dhcp: Dhcp,
    isolation: super::nft::ManagedTable,
    vips: super::vip::Vips,
    firewall: super::firewall::SecurityGroups,
    /// One apply at a time.
    applying: Mutex<()>,
}

impl HostNet {
    /// The network of the host `scope` names; DHCP services keep their files under `dir`.
    pub fn new(scope: Scope, dir: PathBuf) -> Self {
        HostNet {
            dhcp: Dhcp::new(scope.clone(), dir),
            isolation: super::nft::ManagedTable::new("bridge", super::nft::ISOLATION_TABLE),
            vips: super::vip::Vips::new(scope.clone()),
            firewall: super::firewall::SecurityGroups::default(),
            scope,
            applying: Mutex::new(()),
        }
    }

    fn observe(&self) -> Result<Observed, AgentError> {
        let links: Vec<Link> = serde_json::from_str(
            &self.scope.run("ip", &["-j".into(), "-d".into(), "link".into(), "show".into()])?,
        )
        .map_err(|e| tool_error(format!("cannot read `ip -j link show`: {e}")))?;
        let mut observed = Observed::default();
        for link in links {
            if link.kind() == Some("vxlan") && link.marked() {
                observed.floods.insert(link.ifname.clone(), self.floods(&link.ifname)?);
            }
            observed.links.insert(link.ifname.clone(), link);
        }
        Ok(observed)
    }

    fn floods(&self, device: &str) -> Result<BTreeSet<Ipv4Addr>, AgentError> {
        #[derive(Deserialize)]
        struct Entry {
            mac: String,
            #[serde(default)]
            dst: Option<String>,
        }
        let text = self.scope.run(
            "bridge",
            &["-j".into(), "fdb".into(), "show".into(), "dev".into(), device.into()],
        )?;
        let entries: Vec<Entry> = serde_json::from_str(&text)
            .map_err(|e| tool_error(format!("cannot read `bridge -j fdb show`: {e}")))?;
        Ok(entries
            .into_iter()
            .filter(|e| e.mac == "00:00:00:00:00:00")
            .filter_map(|e| e.dst?.parse().ok())
            .collect())
    }
}

impl Network for HostNet {
    fn addresses(&self) -> Result<Vec<InterfaceAddress>, AgentError> {
        #[derive(Deserialize)]
        struct Iface {
            ifname: String,
            #[serde(default)]
            addr_info: Vec<Addr>,
        }
        #[derive(Deserialize)]
        struct Addr {
            local: Ipv4Addr,
            prefixlen: u8,
        }
        let text =
            self.scope.run("ip", &["-j".into(), "-4".into(), "addr".into(), "show".into()])?;
        let ifaces: Vec<Iface> = serde_json::from_str(&text)
            .map_err(|e| tool_error(format!("cannot read `ip -j addr show`: {e}")))?;
        Ok(ifaces
            .into_iter()
            .filter(|i| i.ifname != "lo")
            .flat_map(|i| {
                let name = i.ifname;
                i.addr_info.into_iter().map(move |a| InterfaceAddress {
                    interface: name.clone(),
                    address: a.local,
                    prefix_len: a.prefixlen,
                })
            })
            .collect())
    }

    fn apply(&self, config: &NetworkConfig) -> Result<NetworkReport, AgentError> {
        let _one = self.applying.lock().expect("network apply lock");
        let observed = self.observe()?;
        for spec in &config.bridges {
            if let Uplink::Interface { name } | Uplink::Vlan { interface: name, .. } = &spec.uplink
                && !observed.links.contains_key(name)
            {
                return Err(tool_error(format!(
                    "L2 network {}: the host has no interface `{name}`",
                    spec.l2
                )));
            }
        }
        let mut keep: BTreeSet<String> =
            config.dhcp.iter().map(|d| self.dhcp.outer_device(d.l3)).collect();
        for vip in &config.vips {
            let (public, private) = strato_proto::net::vip_devices(vip.vip);
            keep.extend([public, private]);
        }
        let mut changes = Vec::new();
        for (program, args) in plan(&config.bridges, &observed, &keep) {
            self.scope.run(program, &args)?;
            changes.push(format!("{program} {}", args.join(" ")));
        }
        // Read again only if the links changed (each read is a process).
        let observed = if changes.is_empty() { observed } else { self.observe()? };
        let bridges: BTreeSet<&str> = config.bridges.iter().map(|b| b.name.as_str()).collect();
        for spec in &config.dhcp {
            if !bridges.contains(spec.bridge.as_str()) {
                return Err(AgentError::new(
                    AgentErrorCode::BadRequest,
                    format!(
                        "DHCP of L3 {} names bridge {}, which is not wanted",
                        spec.l3, spec.bridge
                    ),
                ));
            }
        }
        let linked = changes.len();
        changes.extend(self.dhcp.converge(&config.dhcp, &observed)?);
        let tables = self.scope.run("nft", &["list".into(), "tables".into()])?;
        changes.extend(self.isolation.converge(
            &self.scope,
            super::nft::render_isolation(config),
            &tables,
        )?);
        changes.extend(self.firewall.converge(&self.scope, &config.firewall, &tables)?);
        changes.extend(self.vips.converge(config, &observed, &tables)?);
        let observed = if changes.len() == linked { observed } else { self.observe()? };
        let mut report = self.report(&observed)?;
        report.changes = changes;
        Ok(report)
    }

    fn status(&self) -> Result<NetworkReport, AgentError> {
        let _one = self.applying.lock().expect("network apply lock");
        self.status_unlocked()
    }
}

impl HostNet {
    fn status_unlocked(&self) -> Result<NetworkReport, AgentError> {
        self.report(&self.observe()?)
    }

    fn report(&self, observed: &Observed) -> Result<NetworkReport, AgentError> {
        Ok(NetworkReport {
            bridges: observed
                .links
                .values()
                .filter(|l| l.marked() && l.kind() == Some("bridge"))
                .map(|l| l.ifname.clone())
                .collect(),
            dhcp: self.dhcp.report()?,
            changes: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn link(name: &str, kind: &str, data: serde_json::Value, master: Option<&str>) -> Link {
        Link {
            ifname: name.into(),
            ifalias: Some(format!("{MARK}{kind}")),
            master: master.map(Into::into),
            mtu: 1500,
            flags: vec!["UP".into()],
            linkinfo: Some(LinkInfo { info_kind: Some(kind.into()), info_data: Some(data) }),
        }
    }

    fn observed(links: Vec<Link>) -> Observed {
        Observed {
            links: links.into_iter().map(|l| (l.ifname.clone(), l)).collect(),
            floods: BTreeMap::new(),
        }
    }

    fn text(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|(p, a)| format!("{p} {}", a.join(" "))).collect()
    }

    fn vlan_bridge() -> BridgeSpec {
        let uplink = Uplink::Vlan { interface: "eth0".into(), vlan: 100 };
        BridgeSpec {
            l2: Uuid::nil(),
            name: strato_proto::net::bridge_name(Uuid::nil(), &uplink),
            uplink,
            mtu: None,
        }
    }

    #[test]
    fn a_vlan_l2_is_an_8021q_device_under_its_bridge() {
        let host = observed(vec![Link { ifname: "eth0".into(), ..Link::default() }]);
        assert_eq!(
            text(&plan(&[vlan_bridge()], &host, &BTreeSet::new())),
            [
                "ip link add name br_eth0_100 type bridge",
                "ip link set br_eth0_100 alias strato:bridge",
                "ip link set br_eth0_100 up",
                "ip link add link eth0 name eth0.100 type vlan id 100",
                "ip link set eth0.100 alias strato:vlan",
                "ip link set eth0.100 master br_eth0_100",
                "ip link set eth0.100 up",
            ]
        );
    }

    #[test]
    fn a_converged_host_needs_no_command_and_a_wrong_vlan_is_replaced() {
        let bridge = link("br_eth0_100", "bridge", serde_json::json!({}), None);
        let good = link("eth0.100", "vlan", serde_json::json!({"id": 100}), Some("br_eth0_100"));
        let host = observed(vec![bridge.clone(), good]);
        assert!(plan(&[vlan_bridge()], &host, &BTreeSet::new()).is_empty());

        let wrong = link("eth0.100", "vlan", serde_json::json!({"id": 200}), Some("br_eth0_100"));
        let steps = text(&plan(&[vlan_bridge()], &observed(vec![bridge, wrong]), &BTreeSet::new()));
        assert_eq!(steps[0], "ip link del eth0.100");
        assert_eq!(steps[1], "ip link add link eth0 name eth0.100 type vlan id 100");
    }

    #[test]
    fn vxlan_floods_follow_the_peers_and_unwanted_marked_links_go() {
        let uplink = Uplink::Vxlan {
            vni: 5,
            local: Ipv4Addr::new(10, 0, 0, 1),
            peers: vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)],
        };
        let spec = BridgeSpec { l2: Uuid::nil(), name: "br_vx_5".into(), uplink, mtu: Some(1450) };
        let vx = link(
            "vxlan5",
            "vxlan",
            serde_json::json!({"id": 5, "local": "10.0.0.1", "port": 4789}),
            Some("br_vx_5"),
        );
        let mut host = observed(vec![
            link("br_vx_5", "bridge", serde_json::json!({}), None),
            vx,
            link("br_vx_9", "bridge", serde_json::json!({}), None),
            Link { ifname: "eth0".into(), ..Link::default() },
        ]);
        host.floods.insert(
            "vxlan5".into(),
            [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 4)].into_iter().collect(),
        );
        assert_eq!(
            text(&plan(&[spec], &host, &BTreeSet::new())),
            [
                "ip link set br_vx_5 mtu 1450",
                "bridge fdb append 00:00:00:00:00:00 dev vxlan5 dst 10.0.0.3",
                "bridge fdb del 00:00:00:00:00:00 dev vxlan5 dst 10.0.0.4",
                "ip link del br_vx_9",
            ]
        );
    }
}
