//! VIPs: EIPs, port forwarding and SNAT, each VIP a namespace of its own on one host.
//!
//! A VIP's namespace (`<prefix>vip_<uuid>`) has two legs, veth pairs into two bridges:
//! `pub` on the public L3's bridge holds the VIP, `priv` on the private L3's bridge holds
//! the namespace's private address. One nftables table in the namespace (`ip strato_vip`),
//! replaced whole in one transaction, translates between them:
//!
//! - An EIP (ZStack's flat EIP) makes the namespace its NIC's gateway: `priv` holds the
//!   private L3's gateway address, and a bridge-family table on the host
//!   ([`STEERING_TABLE`]) lets only that NIC's frames reach the namespace and sends that
//!   NIC's ARP for its gateway only there. So the guest's traffic off its network goes
//!   through the namespace, where it leaves as the VIP, and the VIP's traffic comes in to
//!   the guest with its source kept (security groups judge the real client). Several EIPs
//!   on one host each hold the same gateway address, each seen by its own NIC only.
//! - Port forwarding translates both ends (DNAT to the guest, masquerade to the
//!   namespace's own private address), so the namespace needs to be nobody's gateway and
//!   guests on other hosts are reached over the L2: the guest sees the namespace as the
//!   client, and the rule's allowed network is enforced here, on the real source.
//! - SNAT makes the namespace the private L3's gateway for every guest without an EIP, and
//!   what they send out leaves as the VIP.
//!
//! Everything is made again when it differs from what is wanted, and a namespace no VIP
//! wants is removed with its processes, its legs with it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use strato_proto::net::{Nat, NetworkConfig, Protocol, VipSpec, vip_devices};
use strato_proto::{AgentError, AgentErrorCode};
use uuid::Uuid;

use super::dhcp::{kill_strangers, run_ip, strings, usable_or_removed};
use super::host::{Link, MARK, Observed, Scope, tool_error};
use super::nft::{ManagedTable, nft_script};

/// The bridge-family table that ties each EIP's namespace to its NIC.
pub const STEERING_TABLE: &str = "strato_eip";
/// The table in each VIP's namespace.
pub const NAT_TABLE: &str = "strato_vip";
/// The veth end in the namespace on the public bridge.
const PUBLIC_LEG: &str = "pub";
/// The veth end in the namespace on the private bridge.
const PRIVATE_LEG: &str = "priv";

/// The prefix of every VIP namespace of the agent of `scope`.
pub fn namespace_prefix(scope: &Scope) -> String {
    format!("{}vip_", scope.prefix)
}

/// The VIPs of one host.
#[derive(Debug)]
pub struct Vips {
    scope: Scope,
    steering: ManagedTable,
    /// Per VIP, the NAT table last applied in its namespace.
    applied: Mutex<BTreeMap<Uuid, String>>,
}

impl Vips {
    /// The VIPs of the host `scope` names.
    pub fn new(scope: Scope) -> Self {
        Vips {
            scope,
            steering: ManagedTable::new("bridge", STEERING_TABLE),
            applied: Mutex::default(),
        }
    }

    fn namespace(&self, vip: Uuid) -> String {
        format!("{}{}", namespace_prefix(&self.scope), vip.simple())
    }

    /// Makes the host's VIP namespaces `config.vips` and removes the others; `observed` is
    /// the host's links now and `tables` its nft tables. Returns what changed.
    pub fn converge(
        &self,
        config: &NetworkConfig,
        observed: &Observed,
        tables: &str,
    ) -> Result<Vec<String>, AgentError> {
        let mut changes = Vec::new();
        for spec in &config.vips {
            check(spec)?;
            for bridge in [&spec.public_bridge, &spec.private_bridge] {
                if !observed.links.contains_key(bridge) {
                    return Err(AgentError::new(
                        AgentErrorCode::BadRequest,
                        format!("VIP {} needs bridge {bridge}, which the host has not", spec.vip),
                    ));
                }
            }
        }
        let wanted: BTreeMap<String, &VipSpec> =
            config.vips.iter().map(|v| (self.namespace(v.vip), v)).collect();
        let mut applied = self.applied.lock().expect("vip tables");
        applied.retain(|vip, _| config.vips.iter().any(|v| v.vip == *vip));
        let prefix = namespace_prefix(&self.scope);
        let present: BTreeSet<String> = run_ip(&["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
            .map(str::to_owned)
            .collect();
        for namespace in present.iter().filter(|n| !wanted.contains_key(*n)) {
            if usable_or_removed(namespace) {
                kill_strangers(namespace, None)?;
                run_ip(&["netns", "del", namespace])?;
            }
            changes.push(format!("removed namespace {namespace}"));
        }
        // Steering first: an EIP's new namespace never answers the other NICs' gateway ARP
        // (nft matches interface names that do not exist yet).
        changes.extend(self.steering.converge(&self.scope, render_steering(config), tables)?);
        let mut moved = Vec::new();
        for (namespace, spec) in wanted {
            let made = !(present.contains(&namespace) && usable_or_removed(&namespace));
            let held =
                self.converge_one(spec, &namespace, made, observed, &mut applied, &mut changes)?;
            moved.extend(held.into_iter().map(|(leg, a, p)| (namespace.clone(), leg, a, p)));
        }
        changes.extend(moved.iter().map(|(namespace, leg, address, prefix_len)| {
            format!("{namespace}: {leg} holds {address}/{prefix_len}")
        }));
        // Neighbours learn where each address newly held now answers: an EIP that followed
        // its VM to this host is reached here at once, not when the router's ARP cache
        // expires, and a NIC newly steered hears of its gateway here.
        for (namespace, leg, address, _) in &moved {
            announce(namespace, leg, *address);
        }
        Ok(changes)
    }

    fn converge_one(
        &self,
        spec: &VipSpec,
        namespace: &str,
        made: bool,
        observed: &Observed,
        applied: &mut BTreeMap<Uuid, String>,
        changes: &mut Vec<String>,
    ) -> Result<Vec<(&'static str, Ipv4Addr, u8)>, AgentError> {
        let mut held = Vec::new();
        if made {
            run_ip(&["netns", "add", namespace])?;
            run_ip(&["-n", namespace, "link", "set", "lo", "up"])?;
            changes.push(format!("made namespace {namespace}"));
            applied.remove(&spec.vip);
        }
        // The translations come before the addresses: the namespace never answers for the
        // VIP itself (a ping it answered, a connection it refused) while they are missing.
        let body = render_nat(spec);
        let inside = Scope { netns: Some(namespace.to_owned()), prefix: self.scope.prefix.clone() };
        let tables = inside.run("nft", &strings(&["list", "tables"]))?;
        let translated =
            applied.get(&spec.vip) != Some(&body) || !super::nft::listed(&tables, "ip", NAT_TABLE);
        if translated {
            nft_script(
                &inside,
                &format!("table ip {NAT_TABLE}\ndelete table ip {NAT_TABLE}\n{body}"),
            )?;
            applied.insert(spec.vip, body);
            changes.push(format!("replaced nft table ip {NAT_TABLE} in {namespace}"));
        }
        let inside: Vec<Link> =
            serde_json::from_str(&run_ip(&["-n", namespace, "-j", "-d", "link", "show"])?)
                .map_err(|e| tool_error(format!("cannot read the links of {namespace}: {e}")))?;
        let (public, private) = vip_devices(spec.vip);
        for (outer, inner, bridge, address, prefix_len) in [
            (&public, PUBLIC_LEG, &spec.public_bridge, spec.address, spec.prefix_len),
            (
                &private,
                PRIVATE_LEG,
                &spec.private_bridge,
                spec.private_address,
                spec.private_prefix_len,
            ),
        ] {
            let outer_link = observed.links.get(outer);
            let inner_present = inside.iter().any(|l| l.ifname == inner);
            if outer_link.is_none() || !inner_present {
                if outer_link.is_some() {
                    // It may be gone already, with a namespace removed a moment ago.
                    let _ = self.scope.run("ip", &strings(&["link", "del", outer]));
                }
                self.scope.run(
                    "ip",
                    &strings(&[
                        "link", "add", outer, "type", "veth", "peer", "name", inner, "netns",
                        namespace,
                    ]),
                )?;
                self.scope
                    .run("ip", &strings(&["link", "set", outer, "alias", &format!("{MARK}vip")]))?;
                changes.push(format!("made veth {outer} into {namespace}"));
            }
            if !inner_present || outer_link.is_none_or(|l| l.master.as_deref() != Some(bridge)) {
                self.scope.run("ip", &strings(&["link", "set", outer, "master", bridge, "up"]))?;
            }
            run_ip(&["-n", namespace, "link", "set", inner, "up"])?;
            let wanted = format!("{address}/{prefix_len}");
            let addresses = run_ip(&["-n", namespace, "-4", "-o", "addr", "show", "dev", inner])?;
            let current: Vec<&str> =
                addresses.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
            if current != [wanted.as_str()] {
                run_ip(&["-n", namespace, "addr", "flush", "dev", inner])?;
                run_ip(&["-n", namespace, "addr", "add", &wanted, "dev", inner])?;
                held.push((inner, address, prefix_len));
            }
        }
        run_ip(&["netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let default = run_ip(&["-n", namespace, "-4", "route", "show", "default"])?;
        match spec.public_gateway {
            Some(gateway) if !default.contains(&format!("via {gateway} ")) => {
                run_ip(&[
                    "-n",
                    namespace,
                    "route",
                    "replace",
                    "default",
                    "via",
                    &gateway.to_string(),
                    "dev",
                    PUBLIC_LEG,
                ])?;
            }
            None if !default.trim().is_empty() => {
                run_ip(&["-n", namespace, "route", "del", "default"])?;
            }
            _ => {}
        }
        // Its translations changed: an EIP's guest may be another NIC, which must learn its
        // gateway's address here.
        if translated
            && spec.steered.is_some()
            && !held.iter().any(|(leg, _, _)| *leg == PRIVATE_LEG)
        {
            held.push((PRIVATE_LEG, spec.private_address, spec.private_prefix_len));
        }
        Ok(held)
    }
}

/// Sends two gratuitous ARPs for `address` from `leg` of `namespace` (a second apart, in
/// the background: the apply does not wait). A failure costs only the neighbours' waiting
/// for their ARP caches to expire, so it is logged, not returned.
fn announce(namespace: &str, leg: &str, address: Ipv4Addr) {
    let address = address.to_string();
    let spawned = std::process::Command::new("ip")
        .args(["netns", "exec", namespace, "arping", "-q", "-U", "-c", "2", "-I", leg, &address])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(error) => tracing::warn!(namespace, leg, %address, %error, "no gratuitous ARP"),
    }
}

/// Refuses a VIP whose names could not be written into nft's language as they are, or
/// whose port ranges do not pair up (the MN makes them; the agent does not trust that).
fn check(spec: &VipSpec) -> Result<(), AgentError> {
    let device =
        |d: &str| !d.is_empty() && d.len() <= 15 && d.bytes().all(|b| b.is_ascii_alphanumeric());
    let bad = |what: String| Err(AgentError::new(AgentErrorCode::BadRequest, what));
    if let Some(nic) = &spec.steered
        && !device(nic)
    {
        return bad(format!("VIP {}: bad NIC device {nic:?}", spec.vip));
    }
    for nat in &spec.nat {
        if let Nat::Forward { protocol, vip_ports, guest_ports, .. } = nat {
            let width = |(start, end): (u16, u16)| end.checked_sub(start);
            if !matches!(protocol, Protocol::Tcp | Protocol::Udp)
                || width(*vip_ports).is_none()
                || width(*vip_ports) != width(*guest_ports)
            {
                return bad(format!("VIP {}: a port forwarding rule does not pair up", spec.vip));
            }
        }
    }
    Ok(())
}

/// The NAT table's body in a VIP's namespace.
pub fn render_nat(spec: &VipSpec) -> String {
    let vip = spec.address;
    let mut pre = Vec::new();
    let mut post = Vec::new();
    let mut forwards = false;
    for nat in &spec.nat {
        match nat {
            Nat::Eip { guest } => {
                pre.push(format!("iifname \"{PUBLIC_LEG}\" ip daddr {vip} dnat to {guest}"));
                post.push(format!("oifname \"{PUBLIC_LEG}\" ip saddr {guest} snat to {vip}"));
            }
            Nat::Forward { protocol, vip_ports, guest, guest_ports, allowed } => {
                let proto = if *protocol == Protocol::Udp { "udp" } else { "tcp" };
                let source =
                    allowed.map(|(net, len)| format!("ip saddr {net}/{len} ")).unwrap_or_default();
                let ports = if vip_ports.0 == vip_ports.1 {
                    vip_ports.0.to_string()
                } else {
                    format!("{}-{}", vip_ports.0, vip_ports.1)
                };
                let target = if vip_ports == guest_ports {
                    guest.to_string()
                } else if vip_ports.0 == vip_ports.1 {
                    format!("{guest}:{}", guest_ports.0)
                } else {
                    // A shifted range: each VIP port to its own guest port.
                    let pairs: Vec<String> = (vip_ports.0..=vip_ports.1)
                        .zip(guest_ports.0..=guest_ports.1)
                        .map(|(from, to)| format!("{from} : {to}"))
                        .collect();
                    format!("{guest} : {proto} dport map {{ {} }}", pairs.join(", "))
                };
                pre.push(format!(
                    "iifname \"{PUBLIC_LEG}\" ip daddr {vip} {source}{proto} dport {ports} dnat to {target}"
                ));
                forwards = true;
            }
            Nat::Snat { network, prefix_len } => {
                post.push(format!(
                    "oifname \"{PUBLIC_LEG}\" ip saddr {network}/{prefix_len} snat to {vip}"
                ));
            }
        }
    }
    if forwards {
        post.push(format!("oifname \"{PRIVATE_LEG}\" ct status dnat masquerade"));
    }
    let chain = |name: &str, hook: &str, priority: &str, rules: &[String]| {
        let mut text = format!(
            "  chain {name} {{\n    type nat hook {hook} priority {priority}; policy accept;\n"
        );
        for rule in rules {
            text.push_str(&format!("    {rule}\n"));
        }
        text.push_str("  }\n");
        text
    };
    format!(
        "table ip {NAT_TABLE} {{\n{}{}}}\n",
        chain("prerouting", "prerouting", "dstnat", &pre),
        chain("postrouting", "postrouting", "srcnat", &post)
    )
}

/// The steering table's body: each EIP namespace's private leg talks with its NIC only,
/// and that NIC's ARP for its gateway goes to the namespace only (none: no EIP here).
pub fn render_steering(config: &NetworkConfig) -> Option<String> {
    let mut rules = Vec::new();
    for spec in &config.vips {
        let Some(nic) = &spec.steered else { continue };
        let (_, leg) = vip_devices(spec.vip);
        let gateway = spec.private_address;
        rules.push(format!("iifname \"{leg}\" oifname != \"{nic}\" drop"));
        rules.push(format!("oifname \"{leg}\" iifname != \"{nic}\" drop"));
        rules.push(format!("iifname \"{nic}\" arp daddr ip {gateway} oifname != \"{leg}\" drop"));
        // Nor does it hear of the gateway from elsewhere (another namespace holding the
        // same address for the other NICs, as SNAT's does, announcing itself).
        rules.push(format!("oifname \"{nic}\" arp saddr ip {gateway} iifname != \"{leg}\" drop"));
    }
    if rules.is_empty() {
        return None;
    }
    let mut text = format!(
        "table bridge {STEERING_TABLE} {{\n  chain forward {{\n    type filter hook forward priority -200; policy accept;\n"
    );
    for rule in rules {
        text.push_str(&format!("    {rule}\n"));
    }
    text.push_str("  }\n}\n");
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A VIP with `nat`, an EIP's when `steered`.
    fn spec(nat: Vec<Nat>, steered: Option<&str>) -> VipSpec {
        VipSpec {
            vip: Uuid::from_u128(0xabcdef),
            address: Ipv4Addr::new(192, 168, 50, 10),
            prefix_len: 24,
            public_bridge: "br_vx_2".into(),
            public_gateway: Some(Ipv4Addr::new(192, 168, 50, 1)),
            private_bridge: "br_vx_1".into(),
            private_address: Ipv4Addr::new(10, 0, 0, 1),
            private_prefix_len: 24,
            steered: steered.map(Into::into),
            nat,
        }
    }

    #[test]
    fn an_eip_translates_both_ways_and_steers_its_nic_only() {
        let eip =
            spec(vec![Nat::Eip { guest: Ipv4Addr::new(10, 0, 0, 5) }], Some("sv0000000000aa"));
        let nat = render_nat(&eip);
        assert!(nat.contains("iifname \"pub\" ip daddr 192.168.50.10 dnat to 10.0.0.5"), "{nat}");
        assert!(nat.contains("oifname \"pub\" ip saddr 10.0.0.5 snat to 192.168.50.10"), "{nat}");
        assert!(!nat.contains("masquerade"));
        let config = NetworkConfig { vips: vec![eip], ..NetworkConfig::default() };
        let steering = render_steering(&config).unwrap();
        let (_, leg) = vip_devices(Uuid::from_u128(0xabcdef));
        assert!(
            steering.contains(&format!("iifname \"{leg}\" oifname != \"sv0000000000aa\" drop"))
        );
        assert!(steering.contains(&format!(
            "iifname \"sv0000000000aa\" arp daddr ip 10.0.0.1 oifname != \"{leg}\" drop"
        )));
        assert!(steering.contains(&format!(
            "oifname \"sv0000000000aa\" arp saddr ip 10.0.0.1 iifname != \"{leg}\" drop"
        )));
        assert!(render_steering(&NetworkConfig::default()).is_none());
    }

    #[test]
    fn port_forwarding_maps_only_its_ports_shifted_one_to_one() {
        let forward = |vip_ports, guest_ports, allowed| Nat::Forward {
            protocol: Protocol::Tcp,
            vip_ports,
            guest: Ipv4Addr::new(10, 0, 0, 5),
            guest_ports,
            allowed,
        };
        let nat = render_nat(&spec(
            vec![
                forward((2222, 2222), (22, 22), Some((Ipv4Addr::new(203, 0, 113, 0), 24))),
                forward((8080, 8081), (80, 81), None),
                forward((9000, 9001), (9000, 9001), None),
            ],
            None,
        ));
        assert!(
            nat.contains(
                "ip daddr 192.168.50.10 ip saddr 203.0.113.0/24 tcp dport 2222 dnat to 10.0.0.5:22"
            ),
            "{nat}"
        );
        assert!(
            nat.contains(
                "tcp dport 8080-8081 dnat to 10.0.0.5 : tcp dport map { 8080 : 80, 8081 : 81 }"
            ),
            "{nat}"
        );
        assert!(nat.contains("tcp dport 9000-9001 dnat to 10.0.0.5\n"), "{nat}");
        assert!(nat.contains("oifname \"priv\" ct status dnat masquerade"));
        let uneven = spec(vec![forward((1, 3), (1, 2), None)], None);
        assert!(check(&uneven).is_err());
    }
}
