//! A host's network, as the MN wants it: every bridge its clusters' L2 networks need, and
//! every flat DHCP service its VMs' L3 networks need.
//!
//! The MN always sends the whole of it ([`crate::Command::ApplyNetwork`]), on every
//! (re)connect and after every change, and the agent converges the host to it: it makes
//! what is missing, repairs what differs and removes what it made earlier that is no longer
//! wanted. So a lost message, a restarted agent or something removed behind the agent's
//! back is repaired by the next apply, and nothing depends on the history of applies.
//!
//! The names of what the agent makes are derived here, in one place, because both ends need
//! them: the MN to tell a hypervisor which bridge a NIC plugs into, the agent to make it.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The longest interface name Linux accepts (`IFNAMSIZ` less the terminating NUL).
pub const IFNAME_MAX: usize = 15;

/// The UDP port VXLAN devices use (IANA's).
pub const VXLAN_PORT: u16 = 4789;

/// Everything about a host's network the MN decides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The bridges, one per L2 network attached to the host's cluster.
    pub bridges: Vec<BridgeSpec>,
    /// The flat DHCP services, one per L3 network with the Flat provider's DHCP on one of
    /// those bridges.
    pub dhcp: Vec<DhcpSpec>,
    /// The security groups' rules on this host's VM NICs.
    pub firewall: Firewall,
    /// The VIPs whose namespace lives on this host (each lives on exactly one).
    pub vips: Vec<VipSpec>,
}

/// A VIP: a namespace with one leg on the public L3's bridge holding the VIP and one on a
/// private L3's bridge, translating between them ([`Nat`]) in one nftables table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSpec {
    /// The VIP.
    pub vip: Uuid,
    /// Its address on the public L3.
    pub address: Ipv4Addr,
    /// The public L3's prefix length.
    pub prefix_len: u8,
    /// The public L3's bridge.
    pub public_bridge: String,
    /// The public L3's gateway: the namespace's default route.
    pub public_gateway: Option<Ipv4Addr>,
    /// The private L3's bridge.
    pub private_bridge: String,
    /// The namespace's address there: the private L3's gateway (an EIP, SNAT) or an
    /// address of its own (port forwarding).
    pub private_address: Ipv4Addr,
    /// The private L3's prefix length.
    pub private_prefix_len: u8,
    /// An EIP's NIC ([`nic_device`]): the namespace is that NIC's gateway and no other
    /// frame reaches it (ZStack's flat EIP).
    pub steered: Option<String>,
    /// What it translates.
    pub nat: Vec<Nat>,
}

/// One translation of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Nat {
    /// Everything sent to the VIP goes to `guest`, and what `guest` sends out leaves as the
    /// VIP.
    Eip {
        /// The guest's private address.
        guest: Ipv4Addr,
    },
    /// Connections to the VIP's ports go to the guest's ports (the same count, in order).
    Forward {
        /// TCP or UDP.
        protocol: Protocol,
        /// The VIP's ports (inclusive).
        vip_ports: (u16, u16),
        /// The guest's private address.
        guest: Ipv4Addr,
        /// The guest's ports (inclusive).
        guest_ports: (u16, u16),
        /// Only sources in this network (none: any).
        allowed: Option<(Ipv4Addr, u8)>,
    },
    /// What the private network sends out leaves as the VIP.
    Snat {
        /// The private network.
        network: Ipv4Addr,
        /// Its prefix length.
        prefix_len: u8,
    },
}

/// Security groups as a host applies them: each NIC's rules, and the address sets of the
/// groups rules name as their remote end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firewall {
    /// Every VM NIC on the host's bridges: what it may send as (anti-spoofing).
    pub nics: Vec<NicIdentity>,
    /// One entry per NIC in at least one security group, by its device.
    pub ports: Vec<PortRules>,
    /// The members' addresses of every group a rule names as its remote end.
    pub groups: Vec<AddressGroup>,
}

/// Who a VM NIC is: frames from it must carry its MAC, and its IPv4 packets and ARP its
/// addresses (or 0.0.0.0, as DHCP and ARP probes do before it has one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicIdentity {
    /// Its device on the host ([`nic_device`]).
    pub device: String,
    /// Its MAC address.
    pub mac: String,
    /// Its addresses.
    pub addresses: Vec<Ipv4Addr>,
}

/// The rules of one VM NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRules {
    /// Its device on the host ([`nic_device`]).
    pub device: String,
    /// What may reach it; nothing else does.
    pub ingress: Vec<FirewallRule>,
    /// What it may reach; with no egress rule, everything.
    pub egress: Vec<FirewallRule>,
}

/// One allowed flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallRule {
    /// Its protocol.
    pub protocol: Protocol,
    /// Its ports (TCP and UDP; inclusive), none for all.
    pub ports: Option<(u16, u16)>,
    /// The other end.
    pub remote: Remote,
}

/// A rule's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// Any.
    All,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
}

/// A rule's other end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Remote {
    /// Addresses in a network.
    Cidr {
        /// The network.
        address: Ipv4Addr,
        /// Its prefix length.
        prefix_len: u8,
    },
    /// The members of a group ([`AddressGroup::name`]).
    Group(String),
}

/// The addresses of a security group's members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressGroup {
    /// Its name (letters and digits: the group's UUID without hyphens).
    pub name: String,
    /// Its members' addresses.
    pub members: Vec<Ipv4Addr>,
}

/// A bridge for one L2 network, with its uplink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeSpec {
    /// The L2 network.
    pub l2: Uuid,
    /// The bridge's name ([`bridge_name`]).
    pub name: String,
    /// What carries its frames off the host.
    pub uplink: Uplink,
    /// The bridge's MTU, if the MN sets one.
    pub mtu: Option<u32>,
}

/// What connects a bridge to the other hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Uplink {
    /// The host's interface itself, enslaved to the bridge (NoVlan).
    Interface {
        /// Its name (`eth0`).
        name: String,
    },
    /// An 802.1Q device over the host's interface (Vlan).
    Vlan {
        /// The host's interface.
        interface: String,
        /// The VLAN id (1-4094).
        vlan: u16,
    },
    /// A VXLAN device whose floods go to each peer's VTEP (static FDB entries, no learning
    /// by multicast).
    Vxlan {
        /// The VXLAN network identifier.
        vni: u32,
        /// This host's VTEP address.
        local: Ipv4Addr,
        /// The other hosts' VTEP addresses.
        peers: Vec<Ipv4Addr>,
    },
}

impl Uplink {
    /// The uplink device's name: the interface, `<if>.<vlan>`, or `vxlan<vni>`.
    pub fn device(&self) -> String {
        match self {
            Uplink::Interface { name } => name.clone(),
            Uplink::Vlan { interface, vlan } => format!("{interface}.{vlan}"),
            Uplink::Vxlan { vni, .. } => format!("vxlan{vni}"),
        }
    }
}

/// A flat DHCP service: a namespace on the bridge holding the L3's DHCP address, with
/// dnsmasq handing each NIC its reserved address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpSpec {
    /// The L3 network.
    pub l3: Uuid,
    /// The bridge its namespace plugs into.
    pub bridge: String,
    /// The DHCP server's address: the same on every host.
    pub address: Ipv4Addr,
    /// The L3's prefix length.
    pub prefix_len: u8,
    /// The router handed to guests (always explicit: without one dnsmasq names itself).
    pub gateway: Ipv4Addr,
    /// DNS servers handed to guests.
    pub dns: Vec<Ipv4Addr>,
    /// Routes handed to guests (option 121), each a destination and a next hop.
    pub routes: Vec<HostRoute>,
    /// The MTU handed to guests.
    pub mtu: Option<u32>,
    /// The DNS domain handed to guests, if any.
    pub domain: Option<String>,
    /// One reservation per NIC on this host.
    pub hosts: Vec<DhcpHost>,
    /// With the Flat provider's Userdata: what the metadata service at 169.254.169.254
    /// answers each guest, by its address (none: no metadata service).
    pub metadata: Option<Vec<GuestMetadata>>,
}

/// The address of the metadata service, in every flat DHCP namespace that has one.
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What the metadata service tells one guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMetadata {
    /// The guest's address: the only source it is answered at.
    pub ip: Ipv4Addr,
    /// Its VM's UUID (`instance-id`).
    pub instance_id: Uuid,
    /// Its host name.
    pub hostname: String,
    /// Its user data (`userdata::` system tag, decoded), if any.
    pub user_data: Option<Vec<u8>>,
    /// Its SSH public keys (`sshkey::` system tags).
    pub ssh_keys: Vec<String>,
}

/// A route handed to guests by DHCP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoute {
    /// The destination network.
    pub destination: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The next hop.
    pub nexthop: Ipv4Addr,
}

/// A DHCP reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpHost {
    /// The NIC's MAC address (lowercase, colon-separated).
    pub mac: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The guest's host name.
    pub hostname: String,
}

/// What the agent finds on its host, for the MN's checks and the chaos invariants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkReport {
    /// The bridges the agent made, by name.
    pub bridges: Vec<String>,
    /// Per DHCP service: its L3, its namespace and its dnsmasq's pid (none: not running).
    pub dhcp: Vec<DhcpReport>,
    /// What the apply changed (empty when the host was already as wanted).
    pub changes: Vec<String>,
}

/// One DHCP service as found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpReport {
    /// The L3 network.
    pub l3: Uuid,
    /// Its namespace.
    pub namespace: String,
    /// Its dnsmasq's pid, if one runs.
    pub pid: Option<u32>,
    /// The reservations its hosts file holds.
    pub hosts: Vec<DhcpHost>,
}

/// The bridge of a NoVlan L2 network (`br_<if>`), a Vlan one (`br_<if>_<vlan>`) or a
/// VXLAN one (`br_vx_<vni>`); a name too long for Linux falls back to `l2_<uuid[..12]>`, as
/// ZStack's does.
pub fn bridge_name(l2: Uuid, uplink: &Uplink) -> String {
    let name = match uplink {
        Uplink::Interface { name } => format!("br_{name}"),
        Uplink::Vlan { interface, vlan } => format!("br_{interface}_{vlan}"),
        Uplink::Vxlan { vni, .. } => format!("br_vx_{vni}"),
    };
    if name.len() <= IFNAME_MAX { name } else { format!("l2_{}", &l2.simple().to_string()[..12]) }
}

/// The host ends of a VIP namespace's legs: `sp` (public) and `se` (private) and the VIP's
/// first 12 hex digits.
pub fn vip_devices(vip: Uuid) -> (String, String) {
    let id = &vip.simple().to_string()[..12];
    (format!("sp{id}"), format!("se{id}"))
}

/// The tap (or, in tests, the veth) of a VM's NIC on the host: `sv` and the MAC's 12 hex
/// digits, unique per NIC because MACs are.
pub fn nic_device(mac: &str) -> String {
    let hex: String = mac.chars().filter(char::is_ascii_hexdigit).collect();
    format!("sv{}", hex.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_follow_zstack_and_fit_linux() {
        let l2 = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let eth = Uplink::Interface { name: "eth0".into() };
        assert_eq!(bridge_name(l2, &eth), "br_eth0");
        let vlan = Uplink::Vlan { interface: "eth0".into(), vlan: 100 };
        assert_eq!(bridge_name(l2, &vlan), "br_eth0_100");
        assert_eq!(vlan.device(), "eth0.100");
        let vx = Uplink::Vxlan { vni: 16_777_215, local: Ipv4Addr::LOCALHOST, peers: vec![] };
        assert_eq!(bridge_name(l2, &vx), "br_vx_16777215");
        assert_eq!(vx.device(), "vxlan16777215");
        let long = Uplink::Vlan { interface: "enp0s31f6".into(), vlan: 4094 };
        assert_eq!(bridge_name(l2, &long), "l2_0123456789ab");
        assert_eq!(nic_device("FA:16:3E:00:00:01"), "svfa163e000001");
    }
}
