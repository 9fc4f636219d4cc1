//! The client commands end to end against a running server, as a person types them: log in
//! (the session kept in the config directory), create a VM with its progress display, query,
//! and errors with their code and details.

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::{Value, json};

struct Cli {
    server: String,
    config: tempfile::TempDir,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_strato"))
            .env("STRATO_CONFIG_DIR", self.config.path())
            .env_remove("STRATO_SERVER")
            .arg("--server")
            .arg(&self.server)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "strato {args:?} failed:\n{stdout}\n{stderr}");
        (stdout, stderr)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut with = vec!["--output", "json"];
        with.extend_from_slice(args);
        serde_json::from_str(&self.ok(&with).0).unwrap()
    }
}

#[test]
fn the_cli_logs_in_creates_with_progress_queries_and_reports_errors() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let (api, agent) = (cluster.api, cluster.agent);
    let cli = Cli { server: format!("http://{api}"), config: tempfile::tempdir().unwrap() };

    // Without a session, the API's 401 is printed with its code.
    let refused = cli.run(&["QueryZone"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("error (401) ID.NOT_AUTHENTICATED"));

    cli.ok(&["LogInByAccount", "accountName=admin", &format!("password={ADMIN_PASSWORD}")]);
    assert!(cli.config.path().join("session.json").exists(), "the session is kept");

    let zone = cli.json(&["CreateZone", "name=z1"]);
    let zone = zone["uuid"].as_str().unwrap();
    let cluster = cli.json(&["CreateCluster", "name=c1", &format!("zoneUuid={zone}")]);
    let cluster = cluster["uuid"].as_str().unwrap();
    cli.json(&[
        "AddKVMHost",
        "name=h1",
        "managementIp=127.0.0.1",
        &format!("agentPort={}", agent.port()),
        &format!("clusterUuid={cluster}"),
    ]);
    let offering =
        cli.json(&["CreateInstanceOffering", "name=small", "cpuNum=1", "memorySize=268435456"]);
    let offering = offering["uuid"].as_str().unwrap();
    let l3 = cli.json(&["CreateL3Network", "name=pub"]);
    let l3 = l3["uuid"].as_str().unwrap();
    cli.json(&[
        "AddIpRange",
        &format!("uuid={l3}"),
        "startIp=10.0.0.10",
        "endIp=10.0.0.20",
        "netmask=255.255.255.0",
        "gateway=10.0.0.1",
    ]);

    // A creation follows its job with a progress display and prints the VM.
    let (table, progress) = cli.ok(&[
        "CreateVmInstance",
        "name=vm1",
        &format!("instanceOfferingUuid={offering}"),
        &format!("l3NetworkUuids={l3}"),
        "userTags=web",
    ]);
    assert!(
        progress.contains("CreateVmInstance: job ")
            && progress.contains("CreateVmInstance: done in"),
        "{progress}"
    );
    assert!(table.lines().any(|l| l.starts_with("state") && l.contains("Running")), "{table}");

    // Queries: conditions, fields, limit; as a table and as JSON.
    let (table, _) = cli.ok(&["QueryVmInstance", "state=Running", "fields=uuid,name", "limit=10"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["name", "uuid"], "{table}");
    assert!(lines[1].starts_with("vm1"), "{table}");
    let found = cli.json(&["QueryVmInstance", "__userTag__=web", "cpuNum>0", "count=true"]);
    assert_eq!(found, json!({ "total": 1 }));

    // --no-wait answers with the job's location at once.
    let accepted = cli.json(&["--no-wait", "CreateZone", "name=z2"]);
    assert!(accepted["location"].as_str().unwrap().contains("/v1/api-jobs/"));

    // Errors: refused before a job (400 naming the field), and a job that fails with its
    // placement trace.
    let bad = cli.run(&[
        "CreateVmInstance",
        "name=vm2",
        "instanceOfferingUuid=nope",
        &format!("l3NetworkUuids={l3}"),
    ]);
    let text = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && text.contains("error (400) SYS.INVALID_ARGUMENT"), "{text}");
    let big = cli.json(&[
        "CreateInstanceOffering",
        "name=huge",
        "cpuNum=512",
        "memorySize=1099511627776",
    ]);
    let huge = big["uuid"].as_str().unwrap();
    let failed = cli.run(&[
        "CreateVmInstance",
        "name=vm3",
        &format!("instanceOfferingUuid={huge}"),
        &format!("l3NetworkUuids={l3}"),
    ]);
    let text = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{text}");
    assert!(
        text.contains("CreateVmInstance: failed in")
            && text.contains("details:")
            && text.contains("free capacity"),
        "{text}"
    );
    let unknown = cli.run(&["CreateVmInstance", "colour=red"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("takes no `colour`"));

    // The shell runs the same commands, line by line, and keeps their history.
    let mut shell = Command::new(env!("CARGO_BIN_EXE_strato"))
        .env("STRATO_CONFIG_DIR", cli.config.path())
        .args(["--server", &cli.server, "shell"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"QueryVmInstance 'name~=vm%' fields=name\nexit\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l.trim() == "vm1"), "{stdout}");
    let history = std::fs::read_to_string(cli.config.path().join("history")).unwrap();
    assert!(history.contains("QueryVmInstance 'name~=vm%' fields=name"), "{history}");

    // The debug console's views.
    let (actors, _) = cli.ok(&["debug", "actors", "kind=vm", "filter=vm1"]);
    assert!(actors.lines().nth(1).is_some_and(|l| l.contains("vm1")), "{actors}");
    let (queues, _) = cli.ok(&["debug", "queues"]);
    assert!(queues.lines().any(|l| l.contains("l3") && l.contains("ip-alloc")), "{queues}");
    let flows = cli.json(&["debug", "flows"]);
    assert!(
        flows["inventories"].as_array().unwrap().iter().any(|f| f["chain"] == "vm.create"),
        "{flows}"
    );
    cli.ok(&["debug", "gc"]);
}

/// ZStack v1.1's flat network walkthrough, as a person types it with the CLI: the L3's
/// service references, the Flat provider found and attached to the L2, DHCP and Userdata
/// attached to the L3, the hosts reconnected (which applies the flat services on them).
/// The walkthrough begins by detaching the virtual router's DHCP and DNS: Strato makes no
/// virtual router, so attaching its services is refused, and that refusal is checked too.
#[test]
fn the_flat_network_walkthrough_runs_as_written() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let (api, agent) = (cluster.api, cluster.agent);
    let cli = Cli { server: format!("http://{api}"), config: tempfile::tempdir().unwrap() };
    cli.ok(&["LogInByAccount", "accountName=admin", &format!("password={ADMIN_PASSWORD}")]);
    let uuid = |v: &Value| v["uuid"].as_str().unwrap().to_owned();
    let zone = uuid(&cli.json(&["CreateZone", "name=z1"]));
    let c1 = uuid(&cli.json(&["CreateCluster", "name=c1", &format!("zoneUuid={zone}")]));
    let host = uuid(&cli.json(&[
        "AddKVMHost",
        "name=h1",
        "managementIp=127.0.0.1",
        &format!("agentPort={}", agent.port()),
        &format!("clusterUuid={c1}"),
    ]));
    let l2 = uuid(&cli.json(&[
        "CreateL2NoVlanNetwork",
        "name=l2",
        &format!("zoneUuid={zone}"),
        "physicalInterface=eth0",
    ]));
    cli.json(&["AttachL2NetworkToCluster", &format!("l2={l2}"), &format!("cluster={c1}")]);
    let l3 = uuid(&cli.json(&["CreateL3Network", "name=flat", &format!("l2NetworkUuid={l2}")]));
    cli.json(&[
        "AddIpRange",
        &format!("uuid={l3}"),
        "startIp=10.0.1.10",
        "endIp=10.0.1.20",
        "netmask=255.255.255.0",
        "gateway=10.0.1.1",
    ]);

    let refs = cli.json(&["QueryNetworkServiceL3NetworkRef", &format!("l3NetworkUuid={l3}")]);
    assert_eq!(refs["inventories"], json!([]), "a new L3 has no services");
    let vr = cli.json(&["QueryNetworkServiceProvider", "type=VirtualRouter"]);
    let vr = uuid(&vr["inventories"][0]);
    let refused = cli.run(&[
        "AttachNetworkServiceToL3Network",
        &format!("uuid={l3}"),
        &format!("networkServices={{\"{vr}\":[\"DHCP\",\"DNS\"]}}"),
    ]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("NETWORK.SERVICE_NOT_IMPLEMENTED"), "{text}");

    let flat = cli.json(&["QueryNetworkServiceProvider", "type=Flat"]);
    let flat = uuid(&flat["inventories"][0]);
    cli.json(&[
        "AttachNetworkServiceProviderToL2Network",
        &format!("networkServiceProviderUuid={flat}"),
        &format!("l2NetworkUuid={l2}"),
    ]);
    let attached = cli.json(&[
        "AttachNetworkServiceToL3Network",
        &format!("uuid={l3}"),
        &format!("networkServices={{\"{flat}\":[\"DHCP\",\"Userdata\"]}}"),
    ]);
    assert_eq!(attached["dhcpServerIp"], "10.0.1.10");
    let refs = cli.json(&["QueryNetworkServiceL3NetworkRef", &format!("l3NetworkUuid={l3}")]);
    let mut types: Vec<&str> = refs["inventories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["networkServiceType"].as_str())
        .collect();
    types.sort_unstable();
    assert_eq!(types, ["DHCP", "Userdata"]);
    let reconnected = cli.json(&["ReconnectHost", &format!("uuid={host}")]);
    assert_eq!(reconnected["status"], "Connected");

    // The L3's DHCP server address is its own: a VM gets the next one.
    let offering =
        uuid(&cli.json(&["CreateInstanceOffering", "name=s", "cpuNum=1", "memorySize=268435456"]));
    let vm = cli.json(&[
        "CreateVmInstance",
        "name=vm1",
        &format!("instanceOfferingUuid={offering}"),
        &format!("l3NetworkUuids={l3}"),
    ]);
    assert_eq!(vm["vmNics"][0]["ip"], "10.0.1.11");
    assert_eq!(vm["vmNics"][0]["bridge"], "br_eth0");

    // The README's public addresses, as typed there: a VIP of a public L3, an EIP on the
    // VM's NIC, a port forwarding rule, SNAT, and the VM found by its EIP's address.
    let public =
        uuid(&cli.json(&["CreateL3Network", "name=public", &format!("l2NetworkUuid={l2}")]));
    cli.json(&[
        "AddIpRange",
        &format!("uuid={public}"),
        "startIp=10.0.9.10",
        "endIp=10.0.9.20",
        "netmask=255.255.255.0",
        "gateway=10.0.9.1",
    ]);
    cli.json(&[
        "AttachNetworkServiceToL3Network",
        &format!("uuid={l3}"),
        &format!("networkServices={{\"{flat}\":[\"Eip\",\"PortForwarding\"]}}"),
    ]);
    let nic = vm["vmNics"][0]["uuid"].as_str().unwrap().to_owned();
    let vip = uuid(&cli.json(&["CreateVip", "name=web", &format!("l3NetworkUuid={public}")]));
    let eip = cli.json(&[
        "CreateEip",
        "name=web",
        &format!("vipUuid={vip}"),
        &format!("vmNicUuid={nic}"),
    ]);
    assert_eq!(eip["vipIp"], "10.0.9.10");
    assert_eq!(eip["guestIp"], "10.0.1.11");
    let vip2 = uuid(&cli.json(&["CreateVip", "name=ssh", &format!("l3NetworkUuid={public}")]));
    let rule = cli.json(&[
        "CreatePortForwardingRule",
        "name=ssh",
        &format!("vipUuid={vip2}"),
        "vipPortStart=2222",
        "privatePortStart=22",
        "protocolType=TCP",
        "allowedCidr=203.0.113.0/24",
        &format!("vmNicUuid={nic}"),
    ]);
    assert_eq!(
        (rule["vipPortEnd"].as_u64(), rule["privatePortEnd"].as_u64()),
        (Some(2222), Some(22))
    );
    cli.json(&[
        "CreateSystemTag",
        &format!("resourceUuid={l3}"),
        "resourceType=L3NetworkVO",
        &format!("tag=snat::{public}"),
    ]);
    cli.json(&[
        "AttachNetworkServiceToL3Network",
        &format!("uuid={l3}"),
        &format!("networkServices={{\"{flat}\":[\"SNAT\"]}}"),
    ]);
    let snat = cli.json(&["QueryVip", "useFor=SNAT"]);
    assert_eq!(snat["inventories"][0]["peerL3NetworkUuid"], l3.as_str(), "{snat}");
    let found = cli.json(&["QueryVmInstance", "vmNics.eip.vipIp=10.0.9.10"]);
    assert_eq!(found["inventories"][0]["uuid"], vm["uuid"], "{found}");
    cli.json(&["DetachEip", &format!("uuid={}", uuid(&eip))]);
    let found = cli.json(&["QueryVmInstance", "vmNics.eip.vipIp=10.0.9.10"]);
    assert_eq!(found["inventories"], json!([]), "{found}");
}
