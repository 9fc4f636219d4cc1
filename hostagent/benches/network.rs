//! The host network's costs, on a namespace host (needs root and the tools `scripts/setup`
//! installs): applying security groups of 1,000 rules in one transaction (issue 14's goal:
//! at most 100 ms), and DHCP for 250 NICs on one L3 (goal: every lease within 5 s of the
//! reservations' apply), each guest a namespace running busybox's udhcpc.
//!
//! `cargo bench -p strato-agent --bench network`

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Instant;

use strato_agent::net::Network;
use strato_agent::net::host::{HostNet, Scope};
use strato_proto::net::{
    AddressGroup, BridgeSpec, DhcpHost, DhcpSpec, Firewall, FirewallRule, NetworkConfig, PortRules,
    Protocol, Remote, Uplink, nic_device,
};
use uuid::Uuid;

const PORTS: usize = 50;
const RULES_PER_PORT: usize = 20;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn firewall(first_port: u16) -> Firewall {
    let ports = (0..PORTS)
        .map(|p| PortRules {
            device: nic_device(&format!("fa:16:3e:00:{:02x}:{:02x}", p / 256, p % 256)),
            ingress: (0..RULES_PER_PORT)
                .map(|r| FirewallRule {
                    protocol: if r % 2 == 0 { Protocol::Tcp } else { Protocol::Udp },
                    ports: Some((first_port + r as u16, first_port + r as u16)),
                    remote: if r % 5 == 0 {
                        Remote::Group("g0".into())
                    } else {
                        Remote::Cidr {
                            address: Ipv4Addr::new(192, 168, r as u8, 0),
                            prefix_len: 24,
                        }
                    },
                })
                .collect(),
            egress: vec![],
        })
        .collect();
    Firewall {
        nics: vec![],
        ports,
        groups: vec![AddressGroup {
            name: "g0".into(),
            members: (1..=200).map(|i| Ipv4Addr::new(10, 81, 0, i as u8)).collect(),
        }],
    }
}

fn main() {
    let ns = format!("strato-bench-{}", std::process::id());
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    let dir = tempfile::tempdir().unwrap();
    let net = HostNet::new(
        Scope { netns: Some(ns.clone()), prefix: format!("{ns}-") },
        dir.path().into(),
    );
    let l2 = Uuid::from_u128(1);
    let uplink = Uplink::Interface { name: "eth0".into() };
    let mut config = NetworkConfig {
        bridges: vec![BridgeSpec {
            l2,
            name: strato_proto::net::bridge_name(l2, &uplink),
            uplink,
            mtu: None,
        }],
        ..NetworkConfig::default()
    };
    net.apply(&config).unwrap();
    println!(
        "security groups: {PORTS} NICs x {RULES_PER_PORT} rules = {} rules, a 200-member remote group",
        PORTS * RULES_PER_PORT
    );
    let mut times = Vec::new();
    for round in 0..10u16 {
        config.firewall = firewall(1000 + round * 100);
        let started = Instant::now();
        let report = net.apply(&config).unwrap();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(!report.changes.is_empty());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "apply of all rules (the whole host apply: links read, one nft transaction): min {:.1} ms, median {:.1} ms, max {:.1} ms",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    // The security groups' own apply: rendering and the one nft transaction.
    let scope = Scope { netns: Some(ns.clone()), prefix: format!("{ns}-") };
    let groups = strato_agent::net::firewall::SecurityGroups::default();
    let mut times = Vec::new();
    for round in 0..10u16 {
        let firewall = firewall(3000 + round * 100);
        let started = Instant::now();
        groups.converge(&scope, &firewall, "").unwrap();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "the security groups' transaction alone: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    config.firewall = Firewall::default();
    dhcp_for_250(&net, &ns, config);
    net.apply(&NetworkConfig::default()).unwrap();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
}

const GUESTS: usize = 250;

fn dhcp_for_250(net: &HostNet, ns: &str, mut config: NetworkConfig) {
    let bridge = config.bridges[0].name.clone();
    let mac = |i: usize| format!("fa:16:3e:01:{:02x}:{:02x}", i / 256, i % 256);
    // Not under the agent's prefix, or its apply would remove them as its own.
    let guests: Vec<String> =
        (0..GUESTS).map(|i| format!("sbg{}-{i}", std::process::id())).collect();
    for (i, guest) in guests.iter().enumerate() {
        ip(&["netns", "add", guest]);
        let port = nic_device(&mac(i));
        ip(&[
            "-n", ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", guest,
        ]);
        ip(&["-n", guest, "link", "set", "eth0", "address", &mac(i), "up"]);
        ip(&["-n", ns, "link", "set", &port, "master", &bridge, "up"]);
    }
    let hosts = (0..GUESTS)
        .map(|i| DhcpHost {
            mac: mac(i),
            ip: Ipv4Addr::new(10, 90, (i / 200) as u8, (i % 200) as u8 + 10),
            hostname: format!("guest-{i}"),
        })
        .collect();
    config.dhcp = vec![DhcpSpec {
        l3: Uuid::from_u128(2),
        bridge,
        address: Ipv4Addr::new(10, 90, 3, 250),
        prefix_len: 22,
        gateway: Ipv4Addr::new(10, 90, 3, 254),
        dns: vec![],
        routes: vec![],
        mtu: None,
        domain: None,
        hosts: Vec::new(),
        metadata: None,
    }];
    net.apply(&config).unwrap();
    config.dhcp[0].hosts = hosts;
    let started = Instant::now();
    net.apply(&config).unwrap();
    let applied = started.elapsed();
    let clients: Vec<_> = guests
        .iter()
        .map(|guest| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    guest,
                    "busybox",
                    "udhcpc",
                    "-i",
                    "eth0",
                    "-n",
                    "-q",
                    "-f",
                    "-t",
                    "10",
                    "-T",
                    "1",
                    "-s",
                    "/bin/true",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let leased =
        clients.into_iter().filter_map(|mut c| c.wait().ok()).filter(|s| s.success()).count();
    let all = started.elapsed();
    println!(
        "DHCP for {GUESTS} NICs on one L3: reservations applied in {:.0} ms; {leased} of {GUESTS} leases, the last {:.2} s after the apply began",
        applied.as_secs_f64() * 1000.0,
        all.as_secs_f64()
    );
    for guest in &guests {
        let _ = Command::new("ip").args(["netns", "del", guest]).status();
    }
}
