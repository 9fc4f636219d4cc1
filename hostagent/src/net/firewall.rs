//! Security groups on a host, in nftables, applied atomically.
//!
//! Guests' traffic is bridged, and this kernel has no connection tracking in the bridge
//! family, so the work is split (as found on these machines): a bridge-family chain marks
//! each packet with the NICs it comes from and goes to (the low 16 bits name the sending
//! port, the high 16 bits the receiving one; every port gets a number), and the inet
//! family's forward hook, which sees bridged IPv4 through `br_netfilter`, keeps state: a
//! reply of a tracked flow passes, and every packet in a flow's original direction goes
//! through the sender's egress chain and the receiver's ingress chain. A chain returns for
//! an allowed flow and drops the rest, so a flow between two guests must be allowed by
//! both. The remote groups' members are named sets.
//!
//! Both tables are rewritten whole in one `nft -f` transaction, so a host never runs half
//! of a rule set, and 1,000 rules cost one call. Because the original direction is judged
//! on every packet (not only the first, as `ct state established accept` would), a removed
//! rule stops an open flow at once: there are no conntrack entries to delete. (Deleting
//! them, the other way, cost a `conntrack -D` per address, 2 s for 50 NICs, and leaves a
//! window between the rule's removal and the deletion.)
//!
//! DHCP to and from a guest always passes (its address comes before any rule can name
//! it), and ARP is not IPv4: the anti-spoofing checks, not the groups, watch it. Those
//! checks (a third table, first in the bridge's forward hook) hold every VM NIC on the host
//! to its MAC and addresses, group or no group.

use std::sync::atomic::{AtomicBool, Ordering};

use strato_proto::AgentError;
use strato_proto::net::{Firewall, FirewallRule, Protocol, Remote};

use super::host::Scope;
use super::nft::{listed, nft_script};

/// The bridge-family table that checks each NIC's source identity.
pub const ANTISPOOF_TABLE: &str = "strato_antispoof";
/// The bridge-family table that marks ports.
pub const MARK_TABLE: &str = "strato_sg_ports";
/// The inet-family table with the rules.
pub const RULE_TABLE: &str = "strato_sg";

/// The anti-spoofing table's text: a frame from a NIC's port must carry its MAC (as the
/// Ethernet and the ARP sender), and its IPv4 and ARP sender addresses must be the NIC's
/// or 0.0.0.0 (DHCP and ARP probes, before it has one). So a guest cannot pass for another:
/// the metadata service and the security groups' remote sets trust the source address.
fn render_antispoof(firewall: &Firewall) -> String {
    let mut rules = String::new();
    for nic in &firewall.nics {
        let device = &nic.device;
        let mac = nic.mac.to_ascii_lowercase();
        let mut addresses: Vec<String> = nic.addresses.iter().map(ToString::to_string).collect();
        addresses.push("0.0.0.0".into());
        let addresses = addresses.join(", ");
        for check in [
            format!("ether saddr != {mac}"),
            format!("arp saddr ether != {mac}"),
            format!("arp saddr ip != {{ {addresses} }}"),
            format!("ip saddr != {{ {addresses} }}"),
        ] {
            rules.push_str(&format!("    iifname \"{device}\" {check} drop\n"));
        }
    }
    format!(
        "table bridge {ANTISPOOF_TABLE}\ndelete table bridge {ANTISPOOF_TABLE}\n\
         table bridge {ANTISPOOF_TABLE} {{\n  chain forward {{\n    type filter hook forward priority -300; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// Refuses a firewall whose names could not be written into nft's language as they are
/// (the MN makes them; the agent does not trust that).
fn check(firewall: &Firewall) -> Result<(), AgentError> {
    let device =
        |d: &str| !d.is_empty() && d.len() <= 15 && d.bytes().all(|b| b.is_ascii_alphanumeric());
    let bad = firewall
        .nics
        .iter()
        .find(|n| !device(&n.device) || !super::dhcp::valid_mac(&n.mac))
        .map(|n| n.device.clone())
        .or_else(|| firewall.ports.iter().find(|p| !device(&p.device)).map(|p| p.device.clone()))
        .or_else(|| {
            firewall
                .groups
                .iter()
                .find(|g| !device(&g.name) && !g.name.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(|g| g.name.clone())
        });
    match bad {
        Some(name) => Err(AgentError::new(
            strato_proto::AgentErrorCode::BadRequest,
            format!("the firewall names `{name}`, which is not a device, MAC or group name"),
        )),
        None => Ok(()),
    }
}

/// The tables' text for `firewall` (none when the host has no VM NIC on a bridge): the
/// anti-spoofing table, and the security groups' two when a NIC is in a group.
pub fn render(firewall: &Firewall) -> Option<String> {
    if firewall.nics.is_empty() && firewall.ports.is_empty() {
        return None;
    }

    let antispoof = render_antispoof(firewall);
    if firewall.ports.is_empty() {
        return Some(format!(
            "{antispoof}table bridge {MARK_TABLE}\ndelete table bridge {MARK_TABLE}\n\
             table inet {RULE_TABLE}\ndelete table inet {RULE_TABLE}\n"
        ));
    }
    let mut marks = String::new();
    let mut dispatch = String::new();
    let mut chains = String::new();
    for (i, port) in firewall.ports.iter().enumerate() {
        let id = i + 1;
        let device = &port.device;
        marks.push_str(&format!(
            "    iifname \"{device}\" meta mark set meta mark or 0x{id:08x}\n    oifname \"{device}\" meta mark set meta mark or 0x{:08x}\n",
            id << 16
        ));
        dispatch.push_str(&format!(
            "    meta mark and 0x0000ffff == 0x{id:08x} jump out_{id}\n    meta mark and 0xffff0000 == 0x{:08x} jump in_{id}\n",
            id << 16
        ));
        chains.push_str(&format!("  chain in_{id} {{\n    udp sport 67 udp dport 68 return\n"));
        for rule in &port.ingress {
            chains.push_str(&format!("    {} return\n", rule_text(rule, "saddr")));
        }
        chains.push_str("    drop\n  }\n");
        chains.push_str(&format!("  chain out_{id} {{\n    udp sport 68 udp dport 67 return\n"));
        if port.egress.is_empty() {
            chains.push_str("    return\n");
        }
        for rule in &port.egress {
            chains.push_str(&format!("    {} return\n", rule_text(rule, "daddr")));
        }
        chains.push_str("    drop\n  }\n");
    }
    let mut sets = String::new();
    for group in &firewall.groups {
        sets.push_str(&format!("  set g_{} {{\n    type ipv4_addr\n", group.name));
        if !group.members.is_empty() {
            let members: Vec<String> = group.members.iter().map(ToString::to_string).collect();
            sets.push_str(&format!("    elements = {{ {} }}\n", members.join(", ")));
        }
        sets.push_str("  }\n");
    }
    Some(format!(
        "{antispoof}table bridge {MARK_TABLE}\ndelete table bridge {MARK_TABLE}\n\
         table bridge {MARK_TABLE} {{\n  chain forward {{\n    type filter hook forward priority -200; policy accept;\n{marks}  }}\n}}\n\
         table inet {RULE_TABLE}\ndelete table inet {RULE_TABLE}\n\
         table inet {RULE_TABLE} {{\n{sets}  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    \
         ct state established ct direction reply accept\n    ct state related accept\n    ct state invalid drop\n{dispatch}  }}\n{chains}}}\n"
    ))
}

fn rule_text(rule: &FirewallRule, direction: &str) -> String {
    let remote = match &rule.remote {
        Remote::Cidr { address, prefix_len } => format!("ip {direction} {address}/{prefix_len}"),
        Remote::Group(name) => format!("ip {direction} @g_{name}"),
    };
    let ports = |proto: &str| match rule.ports {
        Some((start, end)) if start == end => format!(" {proto} dport {start}"),
        Some((start, end)) => format!(" {proto} dport {start}-{end}"),
        None => format!(" meta l4proto {proto}"),
    };
    let protocol = match rule.protocol {
        Protocol::All => String::new(),
        Protocol::Tcp => ports("tcp"),
        Protocol::Udp => ports("udp"),
        Protocol::Icmp => " meta l4proto icmp".into(),
    };
    format!("{remote}{protocol}")
}

/// The security groups of one host.
#[derive(Debug, Default)]
pub struct SecurityGroups {
    /// Set once bridged IPv4 is known to reach the inet tables.
    bridged_to_inet: AtomicBool,
}

impl SecurityGroups {
    /// Makes the host's security group tables `firewall` (`tables` is `nft list tables` as
    /// the apply found it); returns what changed.
    pub fn converge(
        &self,
        scope: &Scope,
        firewall: &Firewall,
        tables: &str,
    ) -> Result<Vec<String>, AgentError> {
        let mut changes = Vec::new();
        check(firewall)?;
        match render(firewall) {
            Some(script) => {
                // Bridged IPv4 must reach the inet tables (the default in a new namespace,
                // but a host may have turned it off).
                if !self.bridged_to_inet.load(Ordering::Relaxed) {
                    scope.run(
                        "sysctl",
                        &["-qw".into(), "net.bridge.bridge-nf-call-iptables=1".into()],
                    )?;
                    self.bridged_to_inet.store(true, Ordering::Relaxed);
                }
                nft_script(scope, &script)?;
                changes.push(format!(
                    "replaced the security group tables ({} ports)",
                    firewall.ports.len()
                ));
            }
            None => {
                for (family, table) in
                    [("bridge", ANTISPOOF_TABLE), ("bridge", MARK_TABLE), ("inet", RULE_TABLE)]
                {
                    if listed(tables, family, table) {
                        nft_script(scope, &format!("delete table {family} {table}\n"))?;
                        changes.push(format!("removed nft table {family} {table}"));
                    }
                }
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use strato_proto::net::{AddressGroup, PortRules};

    #[test]
    fn each_port_has_its_chains_and_a_group_is_a_set() {
        let firewall = Firewall {
            nics: vec![],
            ports: vec![PortRules {
                device: "sv0000000000aa".into(),
                ingress: vec![
                    FirewallRule {
                        protocol: Protocol::Tcp,
                        ports: Some((80, 80)),
                        remote: Remote::Cidr { address: Ipv4Addr::UNSPECIFIED, prefix_len: 0 },
                    },
                    FirewallRule {
                        protocol: Protocol::Icmp,
                        ports: None,
                        remote: Remote::Group("abc".into()),
                    },
                ],
                egress: vec![],
            }],
            groups: vec![AddressGroup {
                name: "abc".into(),
                members: vec![Ipv4Addr::new(10, 0, 0, 6)],
            }],
        };
        let text = render(&firewall).unwrap();
        assert!(text.contains("iifname \"sv0000000000aa\" meta mark set meta mark or 0x00000001"));
        assert!(text.contains("oifname \"sv0000000000aa\" meta mark set meta mark or 0x00010000"));
        assert!(text.contains("ip saddr 0.0.0.0/0 tcp dport 80 return"));
        assert!(text.contains("ip saddr @g_abc meta l4proto icmp return"));
        assert!(text.contains("elements = { 10.0.0.6 }"));
        assert!(render(&Firewall::default()).is_none());
    }
}
