//! nftables: the uplink isolation of the flat DHCP services.
//!
//! Every host answers DHCP from the same address on an L3 (ZStack's distributed DHCP), so
//! a guest must reach its own host's dnsmasq and no other: on each bridge's uplink (the
//! interface, VLAN device or VXLAN device that leads to the other hosts) the bridge drops
//! DHCP (UDP 67-68) and ARP to or from the DHCP address, both ways. Without it guests get
//! NAKs from the other hosts' dnsmasqs (seen here over VXLAN).
//!
//! The table is rendered whole from the desired state and replaced in one `nft -f`
//! transaction (made, deleted, made again: the delete cannot fail and nothing is ever
//! half-applied); the listing read back after an apply tells the next apply whether anyone
//! changed it since.

use std::io::Write;
use std::process::Stdio;

use strato_proto::AgentError;
use strato_proto::net::NetworkConfig;

use super::host::{Scope, tool_error};

/// The table's name, in the bridge family.
pub const ISOLATION_TABLE: &str = "strato_dhcp_isolation";

/// The isolation table's body for `config` (none when no DHCP service runs).
pub fn render_isolation(config: &NetworkConfig) -> Option<String> {
    let mut rules = Vec::new();
    for dhcp in &config.dhcp {
        let Some(bridge) = config.bridges.iter().find(|b| b.name == dhcp.bridge) else { continue };
        let uplink = bridge.uplink.device();
        let address = dhcp.address;
        for dir in ["iifname", "oifname"] {
            rules.push(format!("{dir} \"{uplink}\" udp dport 67-68 drop"));
            rules.push(format!("{dir} \"{uplink}\" arp saddr ip {address} drop"));
            rules.push(format!("{dir} \"{uplink}\" arp daddr ip {address} drop"));
        }
    }
    if rules.is_empty() {
        return None;
    }
    rules.dedup();
    let mut text = format!(
        "table bridge {ISOLATION_TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n"
    );
    for rule in rules {
        text.push_str(&format!("    {rule}\n"));
    }
    text.push_str("  }\n}\n");
    Some(text)
}

/// Runs `nft -f -` with `script` in the host's namespace.
pub fn nft_script(scope: &Scope, script: &str) -> Result<(), AgentError> {
    let mut child = scope
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_error(format!("cannot run nft: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(|e| tool_error(format!("cannot write to nft: {e}")))?;
    let out = child.wait_with_output().map_err(|e| tool_error(format!("nft: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(tool_error(format!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Whether `family name` is among `tables` (`nft list tables`).
pub fn listed(tables: &str, family: &str, name: &str) -> bool {
    tables.lines().any(|l| l.trim() == format!("table {family} {name}"))
}

/// A table the agent keeps in the host's namespace, rendered whole from the desired state,
/// remembering what it last applied.
#[derive(Debug)]
pub struct ManagedTable {
    family: &'static str,
    name: &'static str,
    /// The body last applied and the table as nft listed it right after.
    last: std::sync::Mutex<Option<(String, String)>>,
}

impl ManagedTable {
    /// The table `family name`.
    pub const fn new(family: &'static str, name: &'static str) -> Self {
        ManagedTable { family, name, last: std::sync::Mutex::new(None) }
    }

    /// Makes the table `body` (none: no table); returns what changed. The table is replaced
    /// unless both the wanted body and the listing equal those of the last apply, so a table
    /// changed or removed behind the agent's back is made again. `tables` is
    /// `nft list tables` as the apply found it.
    pub fn converge(
        &self,
        scope: &Scope,
        body: Option<String>,
        tables: &str,
    ) -> Result<Vec<String>, AgentError> {
        let (family, name) = (self.family, self.name);
        let mut last = self.last.lock().expect("nft table lock");
        let present = listed(tables, family, name);
        let list =
            || scope.run("nft", &["list".into(), "table".into(), family.into(), name.into()]);
        match body {
            Some(body) => {
                if present
                    && let Some((applied, listing)) = last.as_ref()
                    && *applied == body
                    && *listing == list()?
                {
                    return Ok(Vec::new());
                }
                nft_script(
                    scope,
                    &format!("table {family} {name}\ndelete table {family} {name}\n{body}"),
                )?;
                *last = Some((body, list()?));
                Ok(vec![format!("replaced nft table {family} {name}")])
            }
            None => {
                *last = None;
                if present {
                    nft_script(scope, &format!("delete table {family} {name}\n"))?;
                    Ok(vec![format!("removed nft table {family} {name}")])
                } else {
                    Ok(Vec::new())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use strato_proto::net::{BridgeSpec, DhcpSpec, Uplink};
    use uuid::Uuid;

    #[test]
    fn the_isolation_drops_dhcp_and_the_dhcp_address_on_the_uplink_only() {
        let config = NetworkConfig {
            bridges: vec![BridgeSpec {
                l2: Uuid::nil(),
                name: "br_vx_5".into(),
                uplink: Uplink::Vxlan { vni: 5, local: Ipv4Addr::new(10, 0, 0, 1), peers: vec![] },
                mtu: None,
            }],
            dhcp: vec![DhcpSpec {
                l3: Uuid::nil(),
                bridge: "br_vx_5".into(),
                address: Ipv4Addr::new(10, 1, 0, 2),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 1, 0, 1),
                dns: vec![],
                routes: vec![],
                mtu: None,
                domain: None,
                hosts: vec![],
                metadata: None,
            }],
            firewall: Default::default(),
            vips: vec![],
        };
        let text = render_isolation(&config).unwrap();
        assert!(text.contains("iifname \"vxlan5\" udp dport 67-68 drop"));
        assert!(text.contains("oifname \"vxlan5\" arp daddr ip 10.1.0.2 drop"));
        assert_eq!(text.matches("drop").count(), 6);
        assert!(render_isolation(&NetworkConfig::default()).is_none());
    }
}
