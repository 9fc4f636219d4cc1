//! The host network with real packets: two hosts are network namespaces joined by an
//! underlay veth, their L2 a VXLAN between them; guests are namespaces with a veth on a
//! host's bridge, asking for an address with busybox's udhcpc, as Neutron's fullstack tests
//! do. Nothing touches the machine's own network.
//!
//! Needs root, iproute2, nftables, dnsmasq and busybox (`scripts/setup` installs them).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use strato_agent::net::Network;
use strato_agent::net::host::{HostNet, Scope};
use strato_proto::net::{
    BridgeSpec, DhcpHost, DhcpSpec, HostRoute, NetworkConfig, NetworkReport, Uplink, bridge_name,
    nic_device,
};
use uuid::Uuid;

const VNI: u32 = 4242;

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().expect("run a command")
}

fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces of one test, removed (their processes first) when it ends.
struct Lab {
    tag: String,
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(name: &str) -> Lab {
        Lab {
            tag: format!("snt{}{name}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn namespace(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.tag);
        ok(&["ip", "netns", "add", &name]);
        ok(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        self.namespaces.push(name.clone());
        name
    }

    /// The prefix the agent of `host` gives its namespaces.
    fn prefix(&self, host: &str) -> String {
        format!("{}-{host}-", self.tag)
    }

    fn host_net(&self, host_ns: &str, host: &str) -> HostNet {
        HostNet::new(
            Scope { netns: Some(host_ns.to_owned()), prefix: self.prefix(host) },
            self.dir.path().join(host),
        )
    }

    /// A guest: a namespace whose `eth0` (with `mac`) is a port of `bridge` in `host_ns`.
    fn guest(&mut self, role: &str, host_ns: &str, bridge: &str, mac: &str) -> String {
        let ns = self.namespace(role);
        let port = nic_device(mac);
        ok(&[
            "ip", "-n", host_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        ok(&["ip", "-n", &ns, "link", "set", "eth0", "address", mac, "up"]);
        ok(&["ip", "-n", host_ns, "link", "set", &port, "master", bridge, "up"]);
        ns
    }

    /// Runs udhcpc in `guest`; the options it was handed, or none if it got no lease.
    fn dhcp(&self, guest: &str) -> Option<Lease> {
        let script = self.dir.path().join("udhcpc.sh");
        if !script.exists() {
            std::fs::write(
                &script,
                "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr flush dev \"$interface\"\n  \
                 ip addr add \"$ip/$mask\" dev \"$interface\"\n  \
                 env | grep -E '^(ip|router|dns|hostname|mtu|staticroutes|serverid)=' > \"$LEASE_OUT\"\n;;\nesac\n",
            )
            .unwrap();
            ok(&["chmod", "755", script.to_str().unwrap()]);
        }
        let out = self.dir.path().join(format!("{guest}.lease"));
        let _ = std::fs::remove_file(&out);
        let status = Command::new("ip")
            .args(["netns", "exec", guest, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f"])
            .args(["-t", "3", "-T", "1", "-O", "staticroutes", "-O", "mtu", "-O", "hostname", "-s"])
            .arg(&script)
            .env("LEASE_OUT", &out)
            .output()
            .unwrap();
        if !status.status.success() {
            return None;
        }
        Lease::read(&out)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Everything in the lab's namespaces first (a namespace outlives `ip netns del`
        // while a process holds it), then the namespaces the agents made, then the lab's.
        let listed = String::from_utf8_lossy(&sh(&["ip", "netns", "list"]).stdout).into_owned();
        for ns in listed.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&self.tag) {
                let pids =
                    String::from_utf8_lossy(&sh(&["ip", "netns", "pids", ns]).stdout).into_owned();
                for pid in pids.split_whitespace() {
                    sh(&["kill", "-9", pid]);
                }
                sh(&["ip", "netns", "del", ns]);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Lease {
    ip: String,
    router: String,
    dns: String,
    hostname: String,
    mtu: String,
    staticroutes: String,
}

impl Lease {
    fn read(path: &Path) -> Option<Lease> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut lease = Lease::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else { continue };
            let value = value.trim_matches('\'').to_owned();
            match key {
                "ip" => lease.ip = value,
                "router" => lease.router = value,
                "dns" => lease.dns = value,
                "hostname" => lease.hostname = value,
                "mtu" => lease.mtu = value,
                "staticroutes" => lease.staticroutes = value,
                _ => {}
            }
        }
        Some(lease)
    }
}

fn l3() -> Uuid {
    Uuid::from_u128(0x5e7a_0000_0000_4000_8000_0000_0000_0001)
}

fn config(local: Ipv4Addr, peer: Ipv4Addr, hosts: Vec<DhcpHost>) -> NetworkConfig {
    let uplink = Uplink::Vxlan { vni: VNI, local, peers: vec![peer] };
    let l2 = Uuid::from_u128(7);
    let bridge = bridge_name(l2, &uplink);
    NetworkConfig {
        bridges: vec![BridgeSpec { l2, name: bridge.clone(), uplink, mtu: Some(1450) }],
        dhcp: vec![DhcpSpec {
            l3: l3(),
            bridge,
            address: Ipv4Addr::new(10, 50, 0, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 50, 0, 1),
            dns: vec![Ipv4Addr::new(10, 50, 0, 53)],
            routes: vec![HostRoute {
                destination: Ipv4Addr::new(172, 16, 0, 0),
                prefix_len: 12,
                nexthop: Ipv4Addr::new(10, 50, 0, 254),
            }],
            mtu: Some(1400),
            domain: None,
            hosts,
            metadata: None,
        }],
        ..NetworkConfig::default()
    }
}

fn host(mac: &str, ip: [u8; 4], hostname: &str) -> DhcpHost {
    DhcpHost { mac: mac.into(), ip: Ipv4Addr::from(ip), hostname: hostname.into() }
}

fn underlay(lab: &mut Lab) -> (String, String) {
    let (a, b) = (lab.namespace("a"), lab.namespace("b"));
    ok(&["ip", "-n", &a, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &b]);
    ok(&["ip", "-n", &a, "addr", "add", "10.99.0.1/24", "dev", "ul0"]);
    ok(&["ip", "-n", &b, "addr", "add", "10.99.0.2/24", "dev", "ul0"]);
    ok(&["ip", "-n", &a, "link", "set", "ul0", "up"]);
    ok(&["ip", "-n", &b, "link", "set", "ul0", "up"]);
    (a, b)
}

fn links_marked(ns: &str) -> Vec<String> {
    ok(&["ip", "-n", ns, "-o", "link", "show"])
        .lines()
        .filter(|l| l.contains("alias strato:"))
        .map(|l| l.split(':').nth(1).unwrap_or_default().trim().to_owned())
        .collect()
}

fn dnsmasq_pid(report: &NetworkReport) -> u32 {
    report.dhcp[0].pid.expect("dnsmasq runs")
}

const MAC1: &str = "fa:16:3e:00:00:11";
const MAC2: &str = "fa:16:3e:00:00:12";
const MAC3: &str = "fa:16:3e:00:00:13";

#[test]
fn hosts_on_a_vxlan_hand_out_their_own_guests_addresses_and_carry_their_packets() {
    let mut lab = Lab::new("v");
    let (a, b) = underlay(&mut lab);
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2));
    let net_a = lab.host_net(&a, "a");
    let net_b = lab.host_net(&b, "b");

    // The agent reports where its tunnels can end.
    let addresses = net_a.addresses().unwrap();
    assert!(addresses.iter().any(|x| x.address == ip_a && x.prefix_len == 24), "{addresses:?}");

    let conf_a = config(ip_a, ip_b, vec![host(MAC1, [10, 50, 0, 11], "guest-one")]);
    let conf_b = config(ip_b, ip_a, vec![host(MAC2, [10, 50, 0, 12], "guest-two")]);
    let report = net_a.apply(&conf_a).unwrap();
    assert!(!report.changes.is_empty());
    assert_eq!(report.bridges, ["br_vx_4242"]);
    net_b.apply(&conf_b).unwrap();

    let g1 = lab.guest("g1", &a, "br_vx_4242", MAC1);
    let g2 = lab.guest("g2", &b, "br_vx_4242", MAC2);
    let g3 = lab.guest("g3", &a, "br_vx_4242", MAC3);

    // Each guest gets its reservation and the L3's options from its own host's dnsmasq,
    // although both hosts answer from 10.50.0.2: the uplink isolation keeps them apart.
    let one = lab.dhcp(&g1).expect("guest one gets a lease");
    assert_eq!(one.ip, "10.50.0.11");
    assert_eq!(one.router, "10.50.0.1");
    assert_eq!(one.dns, "10.50.0.53");
    assert_eq!(one.hostname, "guest-one");
    assert_eq!(one.mtu, "1400");
    assert!(one.staticroutes.contains("172.16.0.0/12 10.50.0.254"), "{}", one.staticroutes);
    let two = lab.dhcp(&g2).expect("guest two gets a lease");
    assert_eq!(two.ip, "10.50.0.12");
    assert_eq!(two.hostname, "guest-two");
    // A MAC without a reservation gets nothing.
    assert!(lab.dhcp(&g3).is_none(), "an unknown MAC got an address");

    // Guests on two hosts reach each other over the VXLAN.
    ok(&["ip", "netns", "exec", &g1, "busybox", "ping", "-c", "2", "-W", "2", "10.50.0.12"]);

    // Applying the same state again changes nothing.
    let again = net_a.apply(&conf_a).unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);

    // dnsmasq killed is started again by the agent.
    let pid = dnsmasq_pid(&again);
    ok(&["kill", "-9", &pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = net_a.status().unwrap();
        if status.dhcp[0].pid.is_some_and(|p| p != pid) {
            break;
        }
        assert!(Instant::now() < deadline, "dnsmasq was not started again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lab.dhcp(&g1).expect("a lease after the respawn").ip, "10.50.0.11");

    // What is removed behind the agent's back, and a stranger in its namespace, are
    // repaired by the next apply.
    let dhcp_ns = net_a.status().unwrap().dhcp[0].namespace.clone();
    let mut stranger =
        Command::new("ip").args(["netns", "exec", &dhcp_ns, "sleep", "60"]).spawn().unwrap();
    ok(&["ip", "netns", "exec", &a, "nft", "delete", "table", "bridge", "strato_dhcp_isolation"]);
    ok(&[
        "bridge",
        "-n",
        &a,
        "fdb",
        "del",
        "00:00:00:00:00:00",
        "dev",
        "vxlan4242",
        "dst",
        "10.99.0.2",
    ]);
    let repaired = net_a.apply(&conf_a).unwrap();
    assert!(repaired.changes.iter().any(|c| c.contains("fdb append")), "{:?}", repaired.changes);
    assert!(
        repaired.changes.iter().any(|c| c.contains("strato_dhcp_isolation")),
        "{:?}",
        repaired.changes
    );
    assert!(stranger.wait().unwrap().code().is_none(), "the stranger was killed by a signal");
    ok(&["ip", "netns", "exec", &g1, "busybox", "ping", "-c", "1", "-W", "2", "10.50.0.12"]);

    // A namespace whose file outlived its mount (made in a mount namespace that ended, as
    // under `ip netns exec`, then listed by the next agent) is made again, not failed on.
    let pid = dnsmasq_pid(&net_a.status().unwrap());
    sh(&["kill", "-9", &pid.to_string()]);
    ok(&["ip", "netns", "del", &dhcp_ns]);
    std::fs::write(format!("/run/netns/{dhcp_ns}"), "").unwrap();
    let remade = net_a.apply(&conf_a).expect("an apply over a namespace that cannot be entered");
    assert!(
        remade.changes.iter().any(|c| c.contains(&format!("made namespace {dhcp_ns}"))),
        "{:?}",
        remade.changes
    );
    assert_eq!(lab.dhcp(&g1).expect("a lease from the namespace made again").ip, "10.50.0.11");

    // A reservation changed under a live lease: the guest gets its new address, no NAK.
    let moved = config(ip_a, ip_b, vec![host(MAC1, [10, 50, 0, 21], "guest-one")]);
    let report = net_a.apply(&moved).unwrap();
    assert!(report.changes.iter().any(|c| c.contains("restarted")), "{:?}", report.changes);
    assert_eq!(lab.dhcp(&g1).expect("a lease at the new address").ip, "10.50.0.21");
    // A reservation added is a reload, and the new guest is served.
    let added = config(
        ip_a,
        ip_b,
        vec![host(MAC1, [10, 50, 0, 21], "guest-one"), host(MAC3, [10, 50, 0, 13], "")],
    );
    let report = net_a.apply(&added).unwrap();
    assert!(report.changes.iter().any(|c| c.contains("reloaded")), "{:?}", report.changes);
    assert_eq!(lab.dhcp(&g3).expect("the added guest gets a lease").ip, "10.50.0.13");

    // An empty state removes everything the agent made, and nothing else.
    for (net, ns, host) in [(&net_a, &a, "a"), (&net_b, &b, "b")] {
        let pid = dnsmasq_pid(&net.status().unwrap());
        net.apply(&NetworkConfig::default()).unwrap();
        assert_eq!(links_marked(ns), Vec::<String>::new());
        let namespaces = ok(&["ip", "netns", "list"]);
        assert!(!namespaces.contains(&lab.prefix(host)), "{namespaces}");
        let tables = ok(&["ip", "netns", "exec", ns, "nft", "list", "tables"]);
        assert!(!tables.contains("strato"), "{tables}");
        assert!(!PathBuf::from(format!("/proc/{pid}")).exists(), "dnsmasq {pid} outlived its L3");
        assert!(ok(&["ip", "-n", ns, "link", "show", "ul0"]).contains("ul0"));
    }
}

/// A guest with a fixed address on `bridge` in `host_ns`.
fn static_guest(
    lab: &mut Lab,
    role: &str,
    host_ns: &str,
    bridge: &str,
    mac: &str,
    ip: &str,
) -> String {
    let ns = lab.guest(role, host_ns, bridge, mac);
    ok(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns
}

fn pings(from: &str, to: &str) -> bool {
    sh(&["ip", "netns", "exec", from, "busybox", "ping", "-c", "1", "-W", "1", to]).status.success()
}

/// A TCP listener in `ns` on `port`, what it receives written to `out`.
fn listen(ns: &str, port: u16, out: &Path) -> std::process::Child {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "nc", "-l", "-p", &port.to_string()])
        .stdout(std::fs::File::create(out).unwrap())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The listener is up when the namespace has the socket.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok(&["ip", "netns", "exec", ns, "busybox", "netstat", "-ltn"])
        .contains(&format!(":{port} "))
    {
        assert!(Instant::now() < deadline, "nc did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Whether a TCP connection from `from` to `to:port` carries `text`.
fn sends(from: &str, to: &str, port: u16, text: &str) -> bool {
    let mut child = Command::new("ip")
        .args(["netns", "exec", from, "busybox", "nc", "-w", "2", to, &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    child.wait().unwrap().success()
}

fn wait_for(path: &Path, text: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).unwrap_or_default().contains(text) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn security_groups_allow_deny_follow_remote_groups_and_stop_open_connections() {
    use strato_proto::net::{
        AddressGroup, Firewall, FirewallRule, NicIdentity, PortRules, Protocol, Remote,
    };
    let mut lab = Lab::new("s");
    let h = lab.namespace("h");
    ok(&["ip", "-n", &h, "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p"]);
    let net = lab.host_net(&h, "h");
    let l2 = Uuid::from_u128(9);
    let uplink = Uplink::Interface { name: "eth9".into() };
    let bridge = bridge_name(l2, &uplink);
    let mut config = NetworkConfig {
        bridges: vec![BridgeSpec { l2, name: bridge.clone(), uplink, mtu: None }],
        ..NetworkConfig::default()
    };
    net.apply(&config).unwrap();
    let (mac_a, mac_b, mac_c) = ("fa:16:3e:00:01:0a", "fa:16:3e:00:01:0b", "fa:16:3e:00:01:0c");
    let a = static_guest(&mut lab, "a", &h, &bridge, mac_a, "10.70.0.1");
    let b = static_guest(&mut lab, "b", &h, &bridge, mac_b, "10.70.0.2");
    let c = static_guest(&mut lab, "c", &h, &bridge, mac_c, "10.70.0.3");
    assert!(pings(&c, "10.70.0.2"), "no firewall yet: everything passes");

    let any = Remote::Cidr { address: Ipv4Addr::UNSPECIFIED, prefix_len: 0 };
    let tcp_7000 =
        FirewallRule { protocol: Protocol::Tcp, ports: Some((7000, 7000)), remote: any.clone() };
    let icmp_from_admins = FirewallRule {
        protocol: Protocol::Icmp,
        ports: None,
        remote: Remote::Group("admins".into()),
    };
    let port = |mac: &str, ingress: Vec<FirewallRule>| PortRules {
        device: nic_device(mac),
        ingress,
        egress: vec![],
    };
    let identity = |mac: &str, ip: [u8; 4]| NicIdentity {
        device: nic_device(mac),
        mac: mac.into(),
        addresses: vec![Ipv4Addr::from(ip)],
    };
    let nics = vec![
        identity(mac_a, [10, 70, 0, 1]),
        identity(mac_b, [10, 70, 0, 2]),
        identity(mac_c, [10, 70, 0, 3]),
    ];
    // Anti-spoofing alone (no group yet): C passes as itself, not as another address or MAC.
    config.firewall = Firewall { nics: nics.clone(), ..Firewall::default() };
    net.apply(&config).unwrap();
    assert!(pings(&c, "10.70.0.2"), "a NIC as itself passes");
    let readdress = |ip: &str| {
        ok(&["ip", "-n", &c, "addr", "flush", "dev", "eth0"]);
        ok(&["ip", "-n", &c, "addr", "add", ip, "dev", "eth0"]);
    };
    readdress("10.70.0.1/24");
    assert!(!pings(&c, "10.70.0.2"), "a NIC sending as another's address is dropped");
    readdress("10.70.0.3/24");
    ok(&["ip", "-n", &c, "link", "set", "eth0", "address", "fa:16:3e:00:01:99"]);
    assert!(!pings(&c, "10.70.0.2"), "a NIC sending as another MAC is dropped");
    ok(&["ip", "-n", &c, "link", "set", "eth0", "address", mac_c]);
    assert!(pings(&c, "10.70.0.2"), "back as itself, it passes again");

    let firewall = |b_rules: Vec<FirewallRule>, admins: Vec<Ipv4Addr>| Firewall {
        nics: nics.clone(),
        ports: vec![port(mac_a, vec![]), port(mac_b, b_rules)],
        groups: vec![AddressGroup { name: "admins".into(), members: admins }],
    };
    config.firewall = firewall(
        vec![tcp_7000.clone(), icmp_from_admins.clone()],
        vec![Ipv4Addr::new(10, 70, 0, 1)],
    );
    net.apply(&config).unwrap();

    // A remote group's member pings; a stranger does not.
    assert!(pings(&a, "10.70.0.2"), "a member of the remote group is allowed");
    assert!(!pings(&c, "10.70.0.2"), "ICMP from outside the group is refused");
    // Only the named port is open; replies of allowed flows come back (state).
    let dir = lab.dir.path().to_path_buf();
    let mut open = listen(&b, 7000, &dir.join("7000"));
    let mut closed = listen(&b, 7001, &dir.join("7001"));
    assert!(sends(&c, "10.70.0.2", 7000, "hello\n") && wait_for(&dir.join("7000"), "hello"));
    assert!(!sends(&c, "10.70.0.2", 7001, "nope\n"), "a port no rule opens is refused");
    let _ = (open.kill(), open.wait(), closed.kill(), closed.wait());

    // An open connection stops when the rule that allowed it goes.
    let out = dir.join("7000-open");
    let mut server = listen(&b, 7000, &out);
    let mut client = Command::new("ip")
        .args(["netns", "exec", &c, "busybox", "nc", "10.70.0.2", "7000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut to_server = client.stdin.take().unwrap();
    to_server.write_all(b"first\n").unwrap();
    to_server.flush().unwrap();
    assert!(wait_for(&out, "first"), "the connection carries data while its rule stands");
    config.firewall = firewall(vec![icmp_from_admins.clone()], vec![Ipv4Addr::new(10, 70, 0, 1)]);
    let report = net.apply(&config).unwrap();
    assert!(!report.changes.is_empty());
    let _ = to_server.write_all(b"second\n").and_then(|()| to_server.flush());
    assert!(!wait_for(&out, "second"), "data passed after its rule was removed");
    let _ = (client.kill(), client.wait(), server.kill(), server.wait());

    // The group's membership decides: A leaves it, and its pings stop.
    config.firewall = firewall(vec![icmp_from_admins], vec![]);
    net.apply(&config).unwrap();
    assert!(!pings(&a, "10.70.0.2"), "a former member is refused");

    // No group left: the tables go and everything passes again.
    config.firewall = Firewall::default();
    net.apply(&config).unwrap();
    let tables = ok(&["ip", "netns", "exec", &h, "nft", "list", "tables"]);
    assert!(!tables.contains("strato_"), "{tables}");
    assert!(pings(&c, "10.70.0.2"));
    net.apply(&NetworkConfig::default()).unwrap();
}

/// Whether `ns` has a TCP connection with `peer` as its other end.
fn connected_with(ns: &str, peer: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let table = ok(&["ip", "netns", "exec", ns, "busybox", "netstat", "-tn"]);
        if table.lines().any(|l| l.contains("ESTABLISHED") && l.contains(&format!("{peer}:"))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn eips_port_forwarding_and_snat_carry_packets_between_a_private_and_a_public_network() {
    use strato_proto::net::{Nat, NicIdentity, Protocol, VipSpec, vip_devices};
    let mut lab = Lab::new("v");
    let h = lab.namespace("h");
    let outside_ns = lab.namespace("out");
    ok(&["ip", "-n", &h, "link", "add", "eth8", "type", "veth", "peer", "name", "eth8p"]);
    ok(&["ip", "-n", &h, "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p"]);
    let net = lab.host_net(&h, "h");
    let private = Uplink::Interface { name: "eth8".into() };
    let public = Uplink::Interface { name: "eth9".into() };
    let (private_br, public_br) =
        (bridge_name(Uuid::from_u128(1), &private), bridge_name(Uuid::from_u128(2), &public));
    let mut config = NetworkConfig {
        bridges: vec![
            BridgeSpec {
                l2: Uuid::from_u128(1),
                name: private_br.clone(),
                uplink: private,
                mtu: None,
            },
            BridgeSpec {
                l2: Uuid::from_u128(2),
                name: public_br.clone(),
                uplink: public,
                mtu: None,
            },
        ],
        ..NetworkConfig::default()
    };
    net.apply(&config).unwrap();
    let (mac1, mac2) = ("fa:16:3e:00:02:01", "fa:16:3e:00:02:02");
    let g1 = static_guest(&mut lab, "g1", &h, &private_br, mac1, "10.80.0.5");
    let g2 = static_guest(&mut lab, "g2", &h, &private_br, mac2, "10.80.0.6");
    for g in [&g1, &g2] {
        ok(&["ip", "-n", g, "route", "add", "default", "via", "10.80.0.1"]);
    }
    // The outside: a machine on the public network, which knows nothing of 10.80.0.0/24.
    ok(&[
        "ip",
        "-n",
        &h,
        "link",
        "add",
        "outp",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &outside_ns,
    ]);
    ok(&["ip", "-n", &h, "link", "set", "outp", "master", &public_br, "up"]);
    ok(&["ip", "-n", &outside_ns, "addr", "add", "192.168.77.200/24", "dev", "eth0"]);
    ok(&["ip", "-n", &outside_ns, "link", "set", "eth0", "up"]);
    let outside = "192.168.77.200";
    assert!(!pings(&g1, outside), "no VIP yet: the private network cannot get out");

    let identity = |mac: &str, ip: [u8; 4]| NicIdentity {
        device: nic_device(mac),
        mac: mac.into(),
        addresses: vec![Ipv4Addr::from(ip)],
    };
    config.firewall.nics = vec![identity(mac1, [10, 80, 0, 5]), identity(mac2, [10, 80, 0, 6])];
    let vip = |n: u128, address: [u8; 4], private_address: [u8; 4], steered, nat| VipSpec {
        vip: Uuid::from_u128((0x7a00 + n) << 100),
        address: Ipv4Addr::from(address),
        prefix_len: 24,
        public_bridge: public_br.clone(),
        public_gateway: None,
        private_bridge: private_br.clone(),
        private_address: Ipv4Addr::from(private_address),
        private_prefix_len: 24,
        steered,
        nat,
    };
    let eip = vip(
        1,
        [192, 168, 77, 11],
        [10, 80, 0, 1],
        Some(nic_device(mac1)),
        vec![Nat::Eip { guest: Ipv4Addr::new(10, 80, 0, 5) }],
    );
    let forward = |vip_ports, guest_ports, allowed| Nat::Forward {
        protocol: Protocol::Tcp,
        vip_ports,
        guest: Ipv4Addr::new(10, 80, 0, 6),
        guest_ports,
        allowed,
    };
    let port_forwarding = vip(
        2,
        [192, 168, 77, 12],
        [10, 80, 0, 250],
        None,
        vec![
            forward((2222, 2222), (22, 22), Some((Ipv4Addr::new(192, 168, 77, 0), 24))),
            forward((2300, 2301), (23, 24), Some((Ipv4Addr::new(10, 99, 0, 0), 16))),
        ],
    );
    config.vips = vec![eip.clone(), port_forwarding.clone()];
    net.apply(&config).unwrap();
    let dir = lab.dir.path().to_path_buf();

    // The EIP: the guest is reachable at the VIP, and reaches out as the VIP.
    assert!(pings(&outside_ns, "192.168.77.11"), "the EIP does not reach its guest");
    let mut server = listen(&g1, 5000, &dir.join("eip-in"));
    assert!(
        sends(&outside_ns, "192.168.77.11", 5000, "in\n") && wait_for(&dir.join("eip-in"), "in")
    );
    let _ = (server.kill(), server.wait());
    let mut server = listen(&outside_ns, 6000, &dir.join("eip-out"));
    let mut client = Command::new("ip")
        .args(["netns", "exec", &g1, "busybox", "nc", outside, "6000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        connected_with(&outside_ns, "192.168.77.11"),
        "the guest did not appear as its VIP: {} {}",
        ok(&["ip", "netns", "exec", &outside_ns, "busybox", "netstat", "-tn"]),
        ok(&["ip", "netns", "exec", &g1, "busybox", "netstat", "-tn"])
    );
    let _ = (client.kill(), client.wait(), server.kill(), server.wait());
    // The other guest is not the EIP's: it still has no way out.
    assert!(!pings(&g2, outside), "a guest without an EIP went out through another's");

    // Port forwarding: the named port reaches the guest's port, from the allowed network
    // only, and no other port does.
    let mut ssh = listen(&g2, 22, &dir.join("pf-22"));
    assert!(
        sends(&outside_ns, "192.168.77.12", 2222, "pf\n") && wait_for(&dir.join("pf-22"), "pf")
    );
    let _ = (ssh.kill(), ssh.wait());
    let mut telnet = listen(&g2, 23, &dir.join("pf-23"));
    assert!(
        !sends(&outside_ns, "192.168.77.12", 2300, "no\n"),
        "a source outside allowedCidr got in"
    );
    let _ = (telnet.kill(), telnet.wait());
    let mut other = listen(&g2, 2223, &dir.join("pf-2223"));
    assert!(!sends(&outside_ns, "192.168.77.12", 2223, "no\n"), "an unnamed port was forwarded");
    let _ = (other.kill(), other.wait());

    // SNAT: the private network's gateway, out as its VIP; the EIP's guest keeps its EIP.
    let snat = vip(
        3,
        [192, 168, 77, 13],
        [10, 80, 0, 1],
        None,
        vec![Nat::Snat { network: Ipv4Addr::new(10, 80, 0, 0), prefix_len: 24 }],
    );
    config.vips.push(snat);
    net.apply(&config).unwrap();
    assert!(pings(&g2, outside), "SNAT does not take the private network out");
    let mut server = listen(&outside_ns, 6001, &dir.join("snat-out"));
    let mut client = Command::new("ip")
        .args(["netns", "exec", &g2, "busybox", "nc", outside, "6001"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(connected_with(&outside_ns, "192.168.77.13"), "SNAT did not leave as its VIP");
    let _ = (client.kill(), client.wait(), server.kill(), server.wait());
    assert!(pings(&outside_ns, "192.168.77.11"), "the EIP stopped working beside SNAT");

    // A table removed behind the agent's back is made again by the next apply.
    let eip_ns = format!("{}vip_{}", lab.prefix("h"), eip.vip.simple());
    ok(&["ip", "netns", "exec", &eip_ns, "nft", "delete", "table", "ip", "strato_vip"]);
    let mut server = listen(&g1, 5001, &dir.join("eip-repaired"));
    assert!(!sends(&outside_ns, "192.168.77.11", 5001, "lost\n"), "no table, yet translated");
    let report = net.apply(&config).unwrap();
    assert!(report.changes.iter().any(|c| c.contains("strato_vip")), "{:?}", report.changes);
    assert!(
        sends(&outside_ns, "192.168.77.11", 5001, "back\n")
            && wait_for(&dir.join("eip-repaired"), "back"),
        "the EIP was not repaired"
    );
    let _ = (server.kill(), server.wait());

    // No VIP left: their namespaces, legs and the steering table go.
    config.vips.clear();
    net.apply(&config).unwrap();
    let namespaces = ok(&["ip", "netns", "list"]);
    assert!(!namespaces.contains(&format!("{}vip_", lab.prefix("h"))), "{namespaces}");
    let (public_leg, private_leg) = vip_devices(eip.vip);
    let links = links_marked(&h);
    assert!(!links.contains(&public_leg) && !links.contains(&private_leg), "{links:?}");
    let tables = ok(&["ip", "netns", "exec", &h, "nft", "list", "tables"]);
    assert!(!tables.contains("strato_eip"), "{tables}");
    assert!(!pings(&outside_ns, "192.168.77.11"), "the VIP outlived its namespace");
    net.apply(&NetworkConfig::default()).unwrap();
}
