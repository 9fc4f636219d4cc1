//! Networking through the API, with real packets: two hosts are network namespaces joined
//! by an underlay, each with a real agent (sim hypervisor, real network: `--network host
//! --netns`); the L2 network is a VXLAN pool's network, the L3 has the Flat provider's DHCP,
//! DNS and host routes; each VM's "guest" is a namespace with a veth on its host's bridge
//! and the VM's MAC, asking for an address with busybox's udhcpc.
//!
//! Needs root, iproute2, nftables, dnsmasq and busybox (`scripts/setup` installs them).

mod common;

use std::path::Path;
use std::process::Command;

use common::{
    ClusterOpts, Namespaces, TestCluster, base64_of, bootstrap, create, http, ok, run, sh,
    start_agent_with,
};
use serde_json::{Value, json};

/// The options a guest was handed by DHCP (none: no lease).
fn dhcp(dir: &Path, guest: &str) -> Option<Value> {
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr flush dev \"$interface\"\n  \
         ip addr add \"$ip/$mask\" dev \"$interface\"\n  \
         set -- $staticroutes\n  while [ $# -ge 2 ]; do ip route replace \"$1\" via \"$2\" dev \"$interface\"; shift 2; done\n  \
         printf '{\"ip\":\"%s\",\"router\":\"%s\",\"dns\":\"%s\",\"hostname\":\"%s\",\"mtu\":\"%s\",\"routes\":\"%s\"}' \
         \"$ip\" \"$router\" \"$dns\" \"$hostname\" \"$mtu\" \"$staticroutes\" > \"$LEASE_OUT\"\n;;\nesac\n",
    )
    .unwrap();
    run(&["chmod", "755", script.to_str().unwrap()]);
    let out = dir.join(format!("{guest}.lease"));
    let _ = std::fs::remove_file(&out);
    let status = Command::new("ip")
        .args(["netns", "exec", guest, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f"])
        .args(["-t", "4", "-T", "1", "-O", "staticroutes", "-O", "mtu", "-O", "hostname", "-s"])
        .arg(&script)
        .env("LEASE_OUT", &out)
        .output()
        .unwrap();
    if !status.status.success() {
        return None;
    }
    serde_json::from_str(&std::fs::read_to_string(&out).ok()?).ok()
}

fn uuid(v: &Value) -> &str {
    v["uuid"].as_str().unwrap()
}

/// The Strato-marked links of a host namespace.
fn marked_links(ns: &str) -> Vec<String> {
    run(&["ip", "-n", ns, "-o", "link", "show"])
        .lines()
        .filter(|l| l.contains("alias strato:"))
        .map(|l| l.split(':').nth(1).unwrap_or_default().trim().to_owned())
        .collect()
}

/// Two namespace hosts joined by an underlay (10.98.0.0/24), each with a real agent (sim
/// hypervisor, real network), in one cluster with a VXLAN pool attached.
struct Lab {
    cluster: TestCluster,
    _agent_b: common::Proc,
    hosts: Vec<Value>,
    pool: Value,
    a: String,
    b: String,
    // Last: the namespaces go after the agents that work in them.
    ns: Namespaces,
}

impl Lab {
    fn start(tag: &str) -> Lab {
        let ns = Namespaces { tag: format!("{tag}{}", std::process::id() % 100_000) };
        let (a, b) = (ns.add("a"), ns.add("b"));
        run(&[
            "ip", "-n", &a, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns",
            &b,
        ]);
        for (host, ip) in [(&a, "10.98.0.1/24"), (&b, "10.98.0.2/24")] {
            run(&["ip", "-n", host, "addr", "add", ip, "dev", "ul0"]);
            run(&["ip", "-n", host, "link", "set", "ul0", "up"]);
        }
        let agent_args = |host: &str, suffix: &str| -> Vec<String> {
            ["--driver", "sim", "--network", "host", "--netns", host, "--netns-prefix"]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("{}-{suffix}-", ns.tag)])
                .collect()
        };
        let args_a = agent_args(&a, "na");
        let cluster = TestCluster::start(
            ClusterOpts::default().driver(&args_a.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        let api = cluster.api;
        let dir_b = cluster.dir().join("agent-b");
        let args_b = agent_args(&b, "nb");
        let (agent_b, addr_b) = start_agent_with(
            &bootstrap(&cluster.data),
            &dir_b,
            &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let zone = create(api, "/v1/zones", json!({ "name": "z" }));
        let c1 = create(api, "/v1/clusters", json!({ "name": "c", "zoneUuid": zone["uuid"] }));
        let mut hosts = Vec::new();
        for (name, port) in [("ha", cluster.agent.port()), ("hb", addr_b.port())] {
            hosts.push(create(
                api,
                "/v1/hosts/kvm",
                json!({ "name": name, "managementIp": "127.0.0.1", "agentPort": port, "clusterUuid": c1["uuid"] }),
            ));
        }
        let pool = create(
            api,
            "/v1/l2-networks/vxlan-pool",
            json!({ "name": "pool", "zoneUuid": zone["uuid"], "vtepCidr": "10.98.0.0/24", "startVni": 4000, "endVni": 4100 }),
        );
        ok(api, "POST", &format!("/v1/l2-networks/{}/clusters/{}", uuid(&pool), uuid(&c1)), None);
        Lab { cluster, _agent_b: agent_b, hosts, pool, a, b, ns }
    }

    /// The Strato-made links and namespaces of both hosts' agents.
    fn made_by_agents(&self) -> Vec<String> {
        let mut left: Vec<String> =
            [&self.a, &self.b].iter().flat_map(|ns| marked_links(ns)).collect();
        let namespaces = run(&["ip", "netns", "list"]);
        left.extend(
            namespaces
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("{}-na-", self.ns.tag))
                        || l.starts_with(&format!("{}-nb-", self.ns.tag))
                })
                .map(str::to_owned),
        );
        left
    }

    /// A guest of `vm`'s first NIC: a namespace with a veth on `host_ns`'s `bridge`, with
    /// the NIC's MAC.
    fn guest(&self, name: &str, vm: &Value, host_ns: &str, bridge: &str) -> String {
        let guest = self.ns.add(name);
        plug(&guest, vm, host_ns, bridge);
        guest
    }
}

/// Plugs guest namespace `guest` into `host_ns`'s `bridge` as `vm`'s first NIC (its `eth0`,
/// with the NIC's MAC, on the port the NIC's device name gives).
fn plug(guest: &str, vm: &Value, host_ns: &str, bridge: &str) {
    {
        let nic = &vm["vmNics"][0];
        let port = strato_proto::net::nic_device(nic["mac"].as_str().unwrap());
        run(&[
            "ip", "-n", host_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", guest,
        ]);
        run(&[
            "ip",
            "-n",
            guest,
            "link",
            "set",
            "eth0",
            "address",
            nic["mac"].as_str().unwrap(),
            "up",
        ]);
        run(&["ip", "-n", host_ns, "link", "set", &port, "master", bridge, "up"]);
    }
}

#[test]
fn vms_on_a_vxlan_get_their_addresses_by_flat_dhcp_and_reach_each_other() {
    let lab = Lab::start("snet");
    let (api, hosts, pool) = (lab.cluster.api, &lab.hosts, &lab.pool);
    let (a, b) = (&lab.a, &lab.b);
    let l2 =
        create(api, "/v1/l2-networks/vxlan", json!({ "name": "vx", "poolUuid": pool["uuid"] }));
    assert_eq!(l2["vni"], 4000);
    // Two creations of one VNI at once: one network, whichever way the other is refused.
    let dup =
        json!({ "params": { "name": "dup", "poolUuid": pool["uuid"], "vni": 4001 } }).to_string();
    let sent: Vec<_> =
        (0..2).map(|_| http(api, "POST", "/v1/l2-networks/vxlan", Some(&dup), &[])).collect();
    for (status, _, reply) in &sent {
        if *status == 202 {
            common::wait_job(api, reply["location"].as_str().unwrap());
        } else {
            assert_eq!(*status, 400, "{reply}");
        }
    }
    let (_, _, same_vni) = http(api, "GET", "/v1/l2-networks?q=vni=4001", None, &[]);
    assert_eq!(same_vni["inventories"].as_array().unwrap().len(), 1, "{same_vni}");
    let l3 =
        create(api, "/v1/l3-networks", json!({ "name": "private", "l2NetworkUuid": l2["uuid"] }));
    let l3_id = uuid(&l3).to_owned();
    create(
        api,
        &format!("/v1/l3-networks/{l3_id}/ip-ranges"),
        json!({ "startIp": "10.60.0.10", "endIp": "10.60.0.100", "netmask": "255.255.255.0", "gateway": "10.60.0.1" }),
    );

    // The providers: query Flat, attach it to the L2, give the L3 its services.
    let (status, _, flat) =
        http(api, "GET", "/v1/network-service-providers?q=type=Flat", None, &[]);
    assert_eq!(status, 200, "{flat}");
    let flat = flat["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    let action = |body: Value| {
        ok(api, "PUT", &format!("/v1/l3-networks/{l3_id}/actions"), Some(&body.to_string()))
    };
    // Before the provider is attached to the L2, the services are refused, naming why.
    let (status, _, refused) = http(
        api,
        "PUT",
        &format!("/v1/l3-networks/{l3_id}/actions"),
        Some(&json!({ "attachNetworkServiceToL3Network": { "networkServices": { &flat: ["DHCP"] } } }).to_string()),
        &[],
    );
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["description"]
            .as_str()
            .unwrap()
            .contains("AttachNetworkServiceProviderToL2Network")
    );
    ok(
        api,
        "POST",
        &format!("/v1/network-service-providers/{flat}/l2-networks/{}", uuid(&l2)),
        None,
    );
    let with_dhcp = action(
        json!({ "attachNetworkServiceToL3Network": { "networkServices": { &flat: ["DHCP", "DNS", "HostRoute", "Userdata"] } } }),
    );
    let dhcp_ip = with_dhcp["dhcpServerIp"].as_str().unwrap().to_owned();
    assert_eq!(dhcp_ip, "10.60.0.10", "the DHCP server takes the range's first address");
    action(json!({ "addDnsToL3Network": { "dns": "10.60.0.53" } }));
    action(
        json!({ "addHostRouteToL3Network": { "prefix": "172.16.0.0/12", "nexthop": "10.60.0.254" } }),
    );
    action(json!({ "setL3NetworkMtu": { "mtu": 1400 } }));
    let (_, _, refs) = http(
        api,
        "GET",
        &format!("/v1/network-service-l3-refs?q=l3NetworkUuid={l3_id}"),
        None,
        &[],
    );
    assert_eq!(refs["inventories"].as_array().unwrap().len(), 4, "{refs}");

    let offering = create(
        api,
        "/v1/instance-offerings",
        json!({ "name": "s", "cpuNum": 1, "memorySize": 268435456u64 }),
    );
    let mut vms = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let body = json!({
            "params": { "name": format!("vm{i}"), "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3_id], "hostUuid": host["uuid"] },
            "systemTags": [
                format!("hostname::guest-{i}"),
                format!("userdata::{}", base64_of(&format!("#cloud-config for guest {i}\n"))),
                "sshkey::ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey test@strato".to_string(),
            ],
        });
        vms.push(ok(api, "POST", "/v1/vm-instances", Some(&body.to_string())));
    }

    // Each VM's guest: a namespace on its host's bridge with its NIC's MAC.
    let work = lab.cluster.dir().to_path_buf();
    let mut guests = Vec::new();
    for (i, (vm, host_ns)) in vms.iter().zip([a, b]).enumerate() {
        let nic = &vm["vmNics"][0];
        assert_eq!(nic["bridge"], "br_vx_4000");
        let guest = lab.guest(&format!("g{i}"), vm, host_ns, "br_vx_4000");
        let lease = dhcp(&work, &guest).unwrap_or_else(|| panic!("guest {i} got no lease"));
        assert_eq!(lease["ip"], nic["ip"], "guest {i}: {lease}");
        assert_eq!(lease["router"], "10.60.0.1");
        assert_eq!(lease["dns"], "10.60.0.53");
        assert_eq!(lease["hostname"], format!("guest-{i}"));
        assert_eq!(lease["mtu"], "1400");
        assert!(lease["routes"].as_str().unwrap().contains("172.16.0.0/12 10.60.0.254"), "{lease}");
        guests.push(guest);
    }
    // Each guest reads its own user data and host name from 169.254.169.254 (routed by
    // DHCP's option 121 to its host's DHCP namespace), keyed by its source address.
    for (i, guest) in guests.iter().enumerate() {
        // busybox's wget dies of SIGSEGV in a namespace here: a plain HTTP/1.0 GET by nc.
        let get = |path: &str| -> String {
            let request = format!(
                "printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | ip netns exec {guest} busybox nc -w 3 169.254.169.254 80"
            );
            let reply = run(&["sh", "-c", &request]);
            assert!(reply.starts_with("HTTP/1.0 200"), "{path}: {reply}");
            reply.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
        };
        assert_eq!(get("/latest/user-data"), format!("#cloud-config for guest {i}\n"));
        assert_eq!(get("/latest/meta-data/hostname"), format!("guest-{i}"));
        assert_eq!(get("/latest/meta-data/instance-id"), uuid(&vms[i]));
        assert!(get("/latest/meta-data/public-keys/0/openssh-key").starts_with("ssh-ed25519 "));
    }

    // A guest sending as another's address reads nothing: its port drops what it sends.
    let own = vms[0]["vmNics"][0]["ip"].as_str().unwrap().to_owned();
    let other = vms[1]["vmNics"][0]["ip"].as_str().unwrap().to_owned();
    let readdress = |ip: &str| {
        run(&["ip", "-n", &guests[0], "addr", "flush", "dev", "eth0"]);
        run(&["ip", "-n", &guests[0], "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        run(&[
            "ip",
            "-n",
            &guests[0],
            "route",
            "replace",
            "169.254.169.254",
            "via",
            &dhcp_ip,
            "dev",
            "eth0",
        ]);
    };
    readdress(&other);
    let request = format!(
        "printf 'GET /latest/user-data HTTP/1.0\\r\\n\\r\\n' | ip netns exec {} busybox nc -w 2 169.254.169.254 80",
        guests[0]
    );
    let spoofed = sh(&["sh", "-c", &request]);
    assert!(
        !String::from_utf8_lossy(&spoofed.stdout).contains("guest 1"),
        "a spoofed source read another's data"
    );
    readdress(&own);

    // Across hosts, over the VXLAN.
    let peer_ip = vms[1]["vmNics"][0]["ip"].as_str().unwrap();
    run(&["ip", "netns", "exec", &guests[0], "busybox", "ping", "-c", "2", "-W", "2", peer_ip]);

    // Security groups: guest 1 joins a group with no ingress rule: guest 0's pings stop;
    // a rule for ICMP from guest 0's network opens them; deleting it closes them again.
    let sg = create(api, "/v1/security-groups", json!({ "name": "web" }));
    let sg_id = uuid(&sg).to_owned();
    let sg_action = |body: Value| {
        ok(api, "PUT", &format!("/v1/security-groups/{sg_id}/actions"), Some(&body.to_string()))
    };
    let nic1 = vms[1]["vmNics"][0]["uuid"].as_str().unwrap().to_owned();
    let (status, _, refused) = http(
        api,
        "PUT",
        &format!("/v1/security-groups/{sg_id}/actions"),
        Some(&json!({ "addVmNicToSecurityGroup": { "vmNicUuids": [nic1] } }).to_string()),
        &[],
    );
    assert_eq!(status, 400, "a NIC joins only through an attached L3: {refused}");
    sg_action(json!({ "attachSecurityGroupToL3Network": { "l3NetworkUuid": l3_id } }));
    sg_action(json!({ "addVmNicToSecurityGroup": { "vmNicUuids": [nic1] } }));
    let pings = |from: &str, to: &str| {
        sh(&["ip", "netns", "exec", from, "busybox", "ping", "-c", "1", "-W", "1", to])
            .status
            .success()
    };
    let until = |want: bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pings(&guests[0], peer_ip) != want {
            assert!(std::time::Instant::now() < deadline, "pings never became {want}");
        }
    };
    until(false);
    let with_rule = sg_action(json!({ "addSecurityGroupRule": { "rules": [
        { "type": "Ingress", "protocol": "ICMP", "allowedCidr": "10.60.0.0/24" }
    ] } }));
    until(true);
    let (_, _, found) =
        http(api, "GET", "/v1/security-groups?q=rules.allowedCidr=10.60.0.0/24", None, &[]);
    assert_eq!(found["inventories"][0]["uuid"], sg_id.as_str(), "{found}");
    // The VMs whose NICs a rule of that network reaches, by a join through the NIC.
    let (_, _, found) = http(
        api,
        "GET",
        "/v1/vm-instances?q=vmNics.securityGroup.rules.allowedCidr=10.60.0.0/24",
        None,
        &[],
    );
    let found = found["inventories"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["uuid"], vms[1]["uuid"]);
    let rule = with_rule["rules"][0]["uuid"].as_str().unwrap();
    sg_action(json!({ "deleteSecurityGroupRule": { "ruleUuids": [rule] } }));
    until(false);
    ok(api, "DELETE", &format!("/v1/security-groups/{sg_id}"), None);
    until(true);

    // A reconnect sends the whole state again: what was removed behind the agent's back
    // (dnsmasq's namespace) is back, and the guest is served.
    let dhcp_ns = format!("{}-na-br_vx_4000_{}", lab.ns.tag, l3_id.replace('-', ""));
    let pids = run(&["ip", "netns", "pids", &dhcp_ns]);
    for pid in pids.split_whitespace() {
        sh(&["kill", "-9", pid]);
    }
    run(&["ip", "netns", "del", &dhcp_ns]);
    ok(
        api,
        "PUT",
        &format!("/v1/hosts/{}/actions", uuid(&hosts[0])),
        Some(&json!({ "reconnectHost": {} }).to_string()),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let lease = loop {
        if let Some(lease) = dhcp(&work, &guests[0]) {
            break lease;
        }
        assert!(std::time::Instant::now() < deadline, "no lease after the reconnect");
    };
    assert_eq!(lease["ip"], vms[0]["vmNics"][0]["ip"]);

    // A destroyed VM's reservation goes; deleting the networks takes everything the agents
    // made with it.
    let hosts_file = lab.cluster.agent_dir().join("net").join(&l3_id).join("hosts");
    let mac0 = vms[0]["vmNics"][0]["mac"].as_str().unwrap().to_owned();
    assert!(std::fs::read_to_string(&hosts_file).unwrap().contains(&mac0));
    for vm in &vms {
        ok(api, "DELETE", &format!("/v1/vm-instances/{}", uuid(vm)), None);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(&hosts_file).unwrap_or_default().contains(&mac0) {
        assert!(std::time::Instant::now() < deadline, "the destroyed VM's reservation stayed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for vm in &vms {
        ok(
            api,
            "PUT",
            &format!("/v1/vm-instances/{}/actions", uuid(vm)),
            Some(&json!({ "expungeVmInstance": {} }).to_string()),
        );
    }
    ok(api, "DELETE", &format!("/v1/l2-networks/{}?deleteMode=Enforcing", uuid(pool)), None);
    // Everything the agents made goes: links, then the DHCP namespaces.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !lab.made_by_agents().is_empty() {
        assert!(std::time::Instant::now() < deadline, "left behind: {:?}", lab.made_by_agents());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn pings(from: &str, to: &str) -> bool {
    sh(&["ip", "netns", "exec", from, "busybox", "ping", "-c", "1", "-W", "1", to]).status.success()
}

/// Waits up to 20 s for `check` to hold.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A TCP listener in `ns` on `port`, what it receives written to `out`.
fn listen(ns: &str, port: u16, out: &Path) -> std::process::Child {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "nc", "-l", "-p", &port.to_string()])
        .stdout(std::fs::File::create(out).unwrap())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("nc listens", || {
        run(&["ip", "netns", "exec", ns, "busybox", "netstat", "-ltn"])
            .contains(&format!(":{port} "))
    });
    child
}

/// Whether a TCP connection from `from` to `to:port` carries `text` to `out`.
fn sends(from: &str, to: &str, port: u16, text: &str, out: &Path) -> bool {
    let mut child = Command::new("ip")
        .args(["netns", "exec", from, "busybox", "nc", "-w", "2", to, &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    if !child.wait().unwrap().success() {
        return false;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(out).unwrap_or_default().contains(text.trim()) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// Whether `ns` has an established TCP connection with `peer` as its other end (busybox
/// writes IPv4 peers of dual-stack sockets as `::ffff:a.b.c.d`, which this matches too).
fn connected_with(ns: &str, peer: &str) -> bool {
    let table = run(&["ip", "netns", "exec", ns, "busybox", "netstat", "-tn"]);
    table.lines().any(|l| l.contains("ESTABLISHED") && l.contains(&format!("{peer}:")))
}

#[test]
fn an_eip_and_port_forwarding_carry_packets_between_the_outside_and_guests() {
    let lab = Lab::start("svip");
    let api = lab.cluster.api;
    let (a, b) = (&lab.a, &lab.b);
    let work = lab.cluster.dir().to_path_buf();
    let pool = lab.pool["uuid"].clone();
    let private_l2 = create(
        api,
        "/v1/l2-networks/vxlan",
        json!({ "name": "private", "poolUuid": pool, "vni": 4000 }),
    );
    let public_l2 = create(
        api,
        "/v1/l2-networks/vxlan",
        json!({ "name": "public", "poolUuid": pool, "vni": 4001 }),
    );
    let mut l3s = Vec::new();
    for (name, l2, net) in [("private", &private_l2, "10.60.0"), ("public", &public_l2, "10.99.0")]
    {
        let l3 =
            create(api, "/v1/l3-networks", json!({ "name": name, "l2NetworkUuid": l2["uuid"] }));
        create(
            api,
            &format!("/v1/l3-networks/{}/ip-ranges", uuid(&l3)),
            json!({ "startIp": format!("{net}.10"), "endIp": format!("{net}.100"), "netmask": "255.255.255.0", "gateway": format!("{net}.1") }),
        );
        l3s.push(uuid(&l3).to_owned());
    }
    let (private, public) = (l3s[0].clone(), l3s[1].clone());
    let (_, _, flat) = http(api, "GET", "/v1/network-service-providers?q=type=Flat", None, &[]);
    let flat = flat["inventories"][0]["uuid"].as_str().unwrap().to_owned();
    ok(
        api,
        "POST",
        &format!("/v1/network-service-providers/{flat}/l2-networks/{}", uuid(&private_l2)),
        None,
    );

    let offering = create(
        api,
        "/v1/instance-offerings",
        json!({ "name": "s", "cpuNum": 1, "memorySize": 268435456u64 }),
    );
    // VM 0 (the EIP's) on host b, VM 1 (port forwarding's) on host a.
    let mut vms = Vec::new();
    for (i, host) in [&lab.hosts[1], &lab.hosts[0]].iter().enumerate() {
        let body = json!({ "params": { "name": format!("vm{i}"), "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [private], "hostUuid": host["uuid"] } });
        vms.push(ok(api, "POST", "/v1/vm-instances", Some(&body.to_string())));
    }
    let mut guests = Vec::new();
    for (i, (vm, host_ns)) in vms.iter().zip([b, a]).enumerate() {
        let guest = lab.guest(&format!("g{i}"), vm, host_ns, "br_vx_4000");
        let ip = format!("{}/24", vm["vmNics"][0]["ip"].as_str().unwrap());
        run(&["ip", "-n", &guest, "addr", "add", &ip, "dev", "eth0"]);
        run(&["ip", "-n", &guest, "route", "add", "default", "via", "10.60.0.1"]);
        guests.push(guest);
    }
    let nic = |i: usize| vms[i]["vmNics"][0]["uuid"].as_str().unwrap().to_owned();
    // The outside: a namespace on host a's public bridge, as the public network's gateway.
    eventually("host a has the public bridge", || {
        sh(&["ip", "-n", a, "link", "show", "br_vx_4001"]).status.success()
    });
    let outside = lab.ns.add("out");
    run(&[
        "ip", "-n", a, "link", "add", "vout", "type", "veth", "peer", "name", "eth0", "netns",
        &outside,
    ]);
    run(&["ip", "-n", &outside, "addr", "add", "10.99.0.1/24", "dev", "eth0"]);
    run(&["ip", "-n", &outside, "link", "set", "eth0", "up"]);
    run(&["ip", "-n", a, "link", "set", "vout", "master", "br_vx_4001", "up"]);

    // The EIP: refused until the private L3 has the Flat provider's Eip.
    let vip = create(api, "/v1/vips", json!({ "name": "web", "l3NetworkUuid": public }));
    assert_eq!(
        (&vip["ip"], &vip["netmask"], &vip["gateway"]),
        (&json!("10.99.0.10"), &json!("255.255.255.0"), &json!("10.99.0.1"))
    );
    // A creation that cannot attach leaves nothing behind: the VIP stays free.
    let early = common::call(
        api,
        "POST",
        "/v1/eips",
        Some(
            &json!({ "params": { "name": "early", "vipUuid": vip["uuid"], "vmNicUuid": nic(0) } })
                .to_string(),
        ),
    );
    assert_eq!(early["error"]["code"], "SYS.INVALID_ARGUMENT", "{early}");
    let (_, _, left) = http(api, "GET", "/v1/eips?q=name=early", None, &[]);
    assert_eq!(left["inventories"].as_array().unwrap().len(), 0, "{left}");
    let eip = create(api, "/v1/eips", json!({ "name": "web", "vipUuid": vip["uuid"] }));
    let eip_id = uuid(&eip).to_owned();
    let eip_action = |body: Value| {
        common::call(api, "PUT", &format!("/v1/eips/{eip_id}/actions"), Some(&body.to_string()))
    };
    let refused = eip_action(json!({ "attachEip": { "vmNicUuid": nic(0) } }));
    assert_eq!(refused["error"]["code"], "SYS.INVALID_ARGUMENT", "{refused}");
    assert!(refused["error"]["description"].as_str().unwrap().contains("Eip"), "{refused}");
    ok(
        api,
        "PUT",
        &format!("/v1/l3-networks/{private}/actions"),
        Some(&json!({ "attachNetworkServiceToL3Network": { "networkServices": { &flat: ["Eip", "PortForwarding"] } } }).to_string()),
    );
    let attached = eip_action(json!({ "attachEip": { "vmNicUuid": nic(0) } }));
    assert_eq!(attached["inventory"]["guestIp"], vms[0]["vmNics"][0]["ip"], "{attached}");
    // The service an attached EIP relies on stays until the EIP is detached.
    let (status, _, refused) = http(
        api,
        "PUT",
        &format!("/v1/l3-networks/{private}/actions"),
        Some(&json!({ "detachNetworkServiceFromL3Network": { "networkServices": { &flat: ["Eip"] } } }).to_string()),
        &[],
    );
    let job = if status == 202 {
        common::wait_job(api, refused["location"].as_str().unwrap())
    } else {
        refused
    };
    assert_eq!(job["error"]["code"], "SYS.RESOURCE_IN_USE", "{job}");
    assert!(job["error"]["description"].as_str().unwrap().contains("DetachEip"), "{job}");
    let second = common::call(
        api,
        "POST",
        "/v1/eips",
        Some(&json!({ "params": { "name": "again", "vipUuid": vip["uuid"] } }).to_string()),
    );
    assert_eq!(second["error"]["code"], "NETWORK.VIP_IN_USE", "{second}");

    // Two EIPs attached to one NIC at once: one NIC has one EIP, so one of them is refused.
    let mut racing = Vec::new();
    for name in ["race-a", "race-b"] {
        let vip = create(api, "/v1/vips", json!({ "name": name, "l3NetworkUuid": public }));
        racing.push(create(api, "/v1/eips", json!({ "name": name, "vipUuid": vip["uuid"] })));
    }
    let attach = json!({ "attachEip": { "vmNicUuid": nic(1) } }).to_string();
    let sent: Vec<String> = racing
        .iter()
        .map(|e| {
            let path = format!("/v1/eips/{}/actions", uuid(e));
            let (status, _, reply) = http(api, "PUT", &path, Some(&attach), &[]);
            assert_eq!(status, 202, "{reply}");
            reply["location"].as_str().unwrap().to_owned()
        })
        .collect();
    let ends: Vec<Value> = sent.iter().map(|l| common::wait_job(api, l)).collect();
    let won: Vec<&Value> = ends.iter().filter(|e| e.get("error").is_none()).collect();
    assert_eq!(won.len(), 1, "{ends:?}");
    assert!(ends.iter().any(|e| e["error"]["code"] == "NETWORK.VIP_IN_USE"), "{ends:?}");
    for eip in &racing {
        ok(api, "DELETE", &format!("/v1/eips/{}", uuid(eip)), None);
        ok(api, "DELETE", &format!("/v1/vips/{}", eip["vipUuid"].as_str().unwrap()), None);
    }

    // The guest on host b is reachable from the outside at the VIP, and goes out as it.
    eventually("the EIP answers pings", || pings(&outside, "10.99.0.10"));
    let mut server = listen(&guests[0], 5000, &work.join("eip-in"));
    assert!(sends(&outside, "10.99.0.10", 5000, "in\n", &work.join("eip-in")));
    let _ = (server.kill(), server.wait());
    let mut server = listen(&outside, 6000, &work.join("eip-out"));
    let mut client = Command::new("ip")
        .args(["netns", "exec", &guests[0], "busybox", "nc", "10.99.0.1", "6000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually("the guest appears outside as its VIP", || connected_with(&outside, "10.99.0.10"));
    let _ = (client.kill(), client.wait(), server.kill(), server.wait());
    // The other guest has no way out.
    // (The EIPs of the race above leave its host as their deletion is applied there.)
    eventually("a guest without an EIP has no way out", || !pings(&guests[1], "10.99.0.1"));
    let (_, _, found) =
        http(api, "GET", "/v1/vm-instances?q=vmNics.eip.vipIp=10.99.0.10", None, &[]);
    let found = found["inventories"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["uuid"], vms[0]["uuid"]);

    // Port forwarding: 2222 on a second VIP reaches port 22 of the guest on host a.
    let vip2 = create(api, "/v1/vips", json!({ "name": "ssh", "l3NetworkUuid": public }));
    let rule = create(
        api,
        "/v1/port-forwarding",
        json!({ "name": "ssh", "vipUuid": vip2["uuid"], "vipPortStart": 2222, "privatePortStart": 22, "protocolType": "TCP", "allowedCidr": "10.99.0.0/24", "vmNicUuid": nic(1) }),
    );
    assert_eq!(
        (rule["vipPortEnd"].as_u64(), rule["privatePortEnd"].as_u64()),
        (Some(2222), Some(22))
    );
    for (params, code) in [
        // Overlapping ports of the same protocol.
        (
            json!({ "name": "x", "vipUuid": vip2["uuid"], "vipPortStart": 2200, "vipPortEnd": 2300, "protocolType": "TCP" }),
            "NETWORK.VIP_IN_USE",
        ),
        // Ranges of different widths.
        (
            json!({ "name": "x", "vipUuid": vip2["uuid"], "vipPortStart": 80, "vipPortEnd": 81, "privatePortStart": 80, "privatePortEnd": 90, "protocolType": "TCP" }),
            "SYS.INVALID_ARGUMENT",
        ),
    ] {
        let (status, _, reply) = http(
            api,
            "POST",
            "/v1/port-forwarding",
            Some(&json!({ "params": params }).to_string()),
            &[],
        );
        let answer = if status == 202 {
            common::wait_job(api, reply["location"].as_str().unwrap())
        } else {
            reply
        };
        assert_eq!(answer["error"]["code"], code, "{answer}");
    }
    let on_forwarding = common::call(
        api,
        "POST",
        "/v1/eips",
        Some(&json!({ "params": { "name": "x", "vipUuid": vip2["uuid"] } }).to_string()),
    );
    assert_eq!(on_forwarding["error"]["code"], "NETWORK.VIP_IN_USE", "{on_forwarding}");
    let mut ssh = listen(&guests[1], 22, &work.join("pf-22"));
    eventually("port 2222 of the VIP reaches port 22", || {
        sends(&outside, "10.99.0.11", 2222, "pf\n", &work.join("pf-22"))
    });
    let _ = (ssh.kill(), ssh.wait());
    let mut other = listen(&guests[1], 2223, &work.join("pf-2223"));
    assert!(
        !sends(&outside, "10.99.0.11", 2223, "no\n", &work.join("pf-2223")),
        "an unnamed port was forwarded"
    );
    let _ = (other.kill(), other.wait());

    // The EIP follows its VM: stopped, moved to host a and started there, the guest (its
    // port moved to host a's bridge) is reachable at the VIP again, through host a.
    let vm_action = |vm: &Value, body: Value| {
        ok(api, "PUT", &format!("/v1/vm-instances/{}/actions", uuid(vm)), Some(&body.to_string()))
    };
    vm_action(&vms[0], json!({ "stopVmInstance": {} }));
    vm_action(&vms[0], json!({ "migrateVm": { "hostUuid": lab.hosts[0]["uuid"] } }));
    let port = strato_proto::net::nic_device(vms[0]["vmNics"][0]["mac"].as_str().unwrap());
    run(&["ip", "-n", b, "link", "del", &port]);
    plug(&guests[0], &vms[0], a, "br_vx_4000");
    let ip = format!("{}/24", vms[0]["vmNics"][0]["ip"].as_str().unwrap());
    run(&["ip", "-n", &guests[0], "addr", "add", &ip, "dev", "eth0"]);
    run(&["ip", "-n", &guests[0], "route", "add", "default", "via", "10.60.0.1"]);
    vm_action(&vms[0], json!({ "startVmInstance": {} }));
    eventually("the EIP answers on its VM's new host", || pings(&outside, "10.99.0.10"));
    let vip_namespaces = |host: &str| -> usize {
        let prefix = format!("{}-{host}-vip_", lab.ns.tag);
        run(&["ip", "netns", "list"]).lines().filter(|l| l.starts_with(&prefix)).count()
    };
    eventually("the VIP left host b", || vip_namespaces("nb") == 0);

    // SNAT: refused until the private network names its public one; then the guest
    // without an EIP goes out as the SNAT's VIP, and the EIP's guest keeps its own.
    let snat =
        json!({ "attachNetworkServiceToL3Network": { "networkServices": { &flat: ["SNAT"] } } });
    let (status, _, refused) = http(
        api,
        "PUT",
        &format!("/v1/l3-networks/{private}/actions"),
        Some(&snat.to_string()),
        &[],
    );
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"]["description"].as_str().unwrap().contains("snat::"), "{refused}");
    create(
        api,
        "/v1/system-tags",
        json!({ "resourceUuid": private, "resourceType": "L3NetworkVO", "tag": format!("snat::{public}") }),
    );
    ok(api, "PUT", &format!("/v1/l3-networks/{private}/actions"), Some(&snat.to_string()));
    let (_, _, snat_vips) = http(api, "GET", "/v1/vips?q=useFor=SNAT", None, &[]);
    let snat_ip = snat_vips["inventories"][0]["ip"]
        .as_str()
        .unwrap_or_else(|| panic!("{snat_vips}"))
        .to_owned();
    assert_eq!(snat_vips["inventories"][0]["peerL3NetworkUuid"], private.as_str());
    eventually("SNAT takes the guest without an EIP out", || pings(&guests[1], "10.99.0.1"));
    let mut server = listen(&outside, 6001, &work.join("snat-out"));
    let mut client = Command::new("ip")
        .args(["netns", "exec", &guests[1], "busybox", "nc", "10.99.0.1", "6001"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually("the guest appears outside as the SNAT's VIP", || {
        connected_with(&outside, &snat_ip)
    });
    let _ = (client.kill(), client.wait(), server.kill(), server.wait());
    let mut server = listen(&outside, 6002, &work.join("eip-beside-snat"));
    let mut client = Command::new("ip")
        .args(["netns", "exec", &guests[0], "busybox", "nc", "10.99.0.1", "6002"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually("the EIP's guest still goes out as its EIP", || {
        connected_with(&outside, "10.99.0.10")
    });
    let _ = (client.kill(), client.wait(), server.kill(), server.wait());
    // Detached, SNAT's VIP goes, and the way out with it.
    ok(
        api,
        "PUT",
        &format!("/v1/l3-networks/{private}/actions"),
        Some(&json!({ "detachNetworkServiceFromL3Network": { "networkServices": { &flat: ["SNAT"] } } }).to_string()),
    );
    let (_, _, snat_vips) = http(api, "GET", "/v1/vips?q=useFor=SNAT", None, &[]);
    assert_eq!(snat_vips["inventories"].as_array().unwrap().len(), 0, "{snat_vips}");
    eventually("without SNAT the guest has no way out", || !pings(&guests[1], "10.99.0.1"));
    ok(api, "PUT", &format!("/v1/l3-networks/{private}/actions"), Some(&snat.to_string()));

    // Detached, the EIP stops; its namespace goes with it.
    eip_action(json!({ "detachEip": {} }));
    eventually("the detached EIP stops answering", || !pings(&outside, "10.99.0.10"));
    // Deleting the VMs detaches what reached them; deleting the networks takes the VIPs
    // (their EIP and rules first) and everything the agents made.
    for vm in &vms {
        ok(api, "DELETE", &format!("/v1/vm-instances/{}", uuid(vm)), None);
        ok(
            api,
            "PUT",
            &format!("/v1/vm-instances/{}/actions", uuid(vm)),
            Some(&json!({ "expungeVmInstance": {} }).to_string()),
        );
    }
    let (_, _, rules) =
        http(api, "GET", &format!("/v1/port-forwarding/{}", uuid(&rule)), None, &[]);
    assert_eq!(rules["inventories"][0]["vmNicUuid"], Value::Null, "{rules}");
    let (_, _, vips) = http(api, "GET", &format!("/v1/vips/{}", uuid(&vip2)), None, &[]);
    assert_eq!(vips["inventories"][0]["peerL3NetworkUuid"], Value::Null, "{vips}");
    ok(
        api,
        "DELETE",
        &format!("/v1/l2-networks/{}?deleteMode=Enforcing", pool.as_str().unwrap()),
        None,
    );
    let (_, _, left) = http(api, "GET", "/v1/vips", None, &[]);
    assert_eq!(left["inventories"].as_array().unwrap().len(), 0, "{left}");
    eventually("nothing the agents made is left", || lab.made_by_agents().is_empty());
}
