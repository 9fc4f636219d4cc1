//! The invariants of DESIGN section 8, checked against what a run recorded and what it can
//! see: the API's view of the store, each agent's hypervisor (asked directly), and each
//! agent's command journal.
//!
//! Some are sampled while the faults run ([`sample`]: no address twice, no capacity twice,
//! at most one running copy, expunged VMs stay gone); the rest are checked once the faults
//! have healed ([`after_healing`]: every accepted job ended, nothing acknowledged was lost,
//! only legal landings, the store and the hypervisors agree, no orphans and the GC backlog
//! drains, repeats had no extra effect, no two jobs changed one domain at once; and, when
//! the agents make their hosts' networks, one dnsmasq per L3 network and host with the
//! store's reservations, each host's rules unchanged by a reconnect, and nothing left once
//! the networks are deleted; and the data volumes' files, chains and attachments as the
//! store says).
//!
//! [`failures_without_a_fault`] holds every call to account: no `SYS.INTERNAL` in any run,
//! and, outside the faults' windows, no failure but the refusals the state it found
//! explains (a VM in another state, no room, a resource in use or gone).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;
use crate::workload::{Action, Entry, JOB_LIMIT, Outcome, Shared, follow, list};

/// One broken invariant.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Which (DESIGN section 8's wording).
    pub invariant: &'static str,
    /// When it was seen (ms since the run started).
    pub at_ms: u64,
    /// The resource concerned.
    pub resource: Option<String>,
    /// What was seen.
    pub detail: String,
}

/// The CPU overcommit ratio the MN applies by default (memory is not overcommitted).
const CPU_OVERCOMMIT: f64 = 10.0;

fn violation(
    invariant: &'static str,
    at_ms: u64,
    resource: Option<&str>,
    detail: String,
) -> Violation {
    Violation { invariant, at_ms, resource: resource.map(str::to_owned), detail }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// VMs the history says were expunged, with when; with `interrupted`, also those whose
/// expunge the MN's death interrupted (it may have deleted the VM before it died).
fn expunged(entries: &[Entry], interrupted: bool) -> HashMap<String, u64> {
    let took = |outcome: &Outcome| match outcome {
        Outcome::Succeeded(_) => true,
        Outcome::Failed(code) => interrupted && code == "SYS.JOB_INTERRUPTED",
        _ => false,
    };
    entries
        .iter()
        .filter(|e| e.action == Action::ExpungeVm && took(&e.outcome))
        .filter_map(|e| Some((e.target.clone()?, e.ended_ms?)))
        .collect()
}

/// The checks that hold at every instant; run repeatedly while the faults are active.
/// `double_booked` carries the VMs seen booked on two hosts by the previous sample: the
/// listings of VMs and hosts are two reads, so a migration can end between them, and only a
/// double booking seen twice in a row, with the VM not migrating, is reported.
pub fn sample(
    shared: &Shared,
    cluster: &std::sync::Mutex<Cluster>,
    double_booked: &mut HashSet<String>,
) -> Vec<Violation> {
    let mut found = Vec::new();
    let now = shared.now();
    let patience = Duration::from_millis(500);
    let Some(vms) = list(shared.api, "vm-instances", patience) else { return found };
    let Some(hosts) = list(shared.api, "hosts", patience) else { return found };

    // No IP twice.
    let mut ips: HashMap<(String, String), String> = HashMap::new();
    for vm in &vms {
        for nic in vm["vmNics"].as_array().into_iter().flatten() {
            let key = (s(&nic["l3NetworkUuid"]).to_owned(), s(&nic["ip"]).to_owned());
            if let Some(other) = ips.insert(key.clone(), s(&vm["uuid"]).to_owned()) {
                found.push(violation(
                    "no IP twice",
                    now,
                    Some(s(&vm["uuid"])),
                    format!("{} on L3 {} is held by VM {other} too", key.1, key.0),
                ));
            }
        }
    }
    // No capacity twice. A VM being migrated (or a data volume being moved) holds its
    // target's booking before it gives back its source's, by design; any other VM or volume
    // is booked on one host at most.
    let volumes = list(shared.api, "volumes", Duration::from_secs(10)).unwrap_or_default();
    let migrating: HashSet<&str> = vms
        .iter()
        .filter(|v| v["state"] == "Migrating")
        .chain(volumes.iter().filter(|v| v["status"] == "Migrating"))
        .map(|v| s(&v["uuid"]))
        .collect();
    let mut booked: HashMap<String, String> = HashMap::new();
    let mut seen_twice = HashSet::new();
    for host in &hosts {
        let (mut cpu, mut memory) = (0.0, 0u64);
        for (vm, booking) in host["reservations"].as_object().into_iter().flatten() {
            cpu += booking["cpu"].as_f64().unwrap_or(0.0);
            memory += booking["memory"].as_u64().unwrap_or(0);
            if let Some(other) = booked.insert(vm.clone(), s(&host["uuid"]).to_owned())
                && !migrating.contains(vm.as_str())
                && {
                    seen_twice.insert(vm.clone());
                    double_booked.contains(vm)
                }
            {
                found.push(violation(
                    "no capacity twice",
                    now,
                    Some(vm),
                    format!("booked on host {other} and host {}", s(&host["uuid"])),
                ));
            }
        }
        let cpus = host["facts"]["cpus"].as_f64().unwrap_or(f64::MAX);
        let memory_cap = host["facts"]["memoryMib"].as_u64().map_or(u64::MAX, |mib| mib << 20);
        if cpu > cpus * CPU_OVERCOMMIT || memory > memory_cap {
            found.push(violation(
                "no capacity twice",
                now,
                Some(s(&host["uuid"])),
                format!("bookings of {cpu} CPU and {memory} B exceed the host's capacity"),
            ));
        }
    }
    *double_booked = seen_twice;
    // Expunged VMs stay gone.
    let gone = expunged(&shared.history.entries(), false);
    for vm in &vms {
        if let Some(at) = gone.get(s(&vm["uuid"]))
            && *at + 200 < now
        {
            found.push(violation(
                "only legal transitions",
                now,
                Some(s(&vm["uuid"])),
                format!("expunged at {at} ms, listed again as {}", s(&vm["state"])),
            ));
        }
    }
    // At most one running copy.
    let hypervisors = hypervisors(cluster);
    let mut running: HashMap<String, Vec<usize>> = HashMap::new();
    for (host, domains) in hypervisors.iter().enumerate() {
        for domain in domains.iter().flatten() {
            if domain.1 == "Running" {
                running.entry(domain.0.clone()).or_default().push(host);
            }
        }
    }
    for (vm, on) in running {
        if on.len() > 1 {
            found.push(violation(
                "at most one running copy of a VM",
                now,
                Some(&vm),
                format!("running on hosts {on:?}"),
            ));
        }
    }
    found
}

/// What each host's hypervisor runs: (VM UUID, state) per host; `None` when its agent is down.
fn hypervisors(cluster: &std::sync::Mutex<Cluster>) -> Vec<Option<Vec<(String, String)>>> {
    let hosts = cluster.lock().expect("cluster").hosts();
    (0..hosts)
        .map(|i| {
            // Dial without holding the cluster: faults must not wait for a slow handshake.
            let view = cluster.lock().expect("cluster").hypervisor(i);
            let domains = view.domains().ok()?;
            Some(
                domains
                    .into_iter()
                    .map(|d| (d.uuid.to_string(), format!("{:?}", d.state)))
                    .collect(),
            )
        })
        .collect()
}

/// The checks once every fault has healed and the workload stopped.
pub fn after_healing(shared: &Shared, cluster: &std::sync::Mutex<Cluster>) -> Vec<Violation> {
    let mut found = Vec::new();
    let entries = shared.history.entries();
    let api = shared.api;

    // Every accepted operation ends, and nothing acknowledged is lost. Clients follow their
    // jobs for the API's timeout; what is still pending now is followed to the same limit.
    for entry in &entries {
        let Some(job) = &entry.job else { continue };
        let outcome = match &entry.outcome {
            Outcome::Pending => follow(api, &format!("/v1/api-jobs/{job}"), JOB_LIMIT),
            other => other.clone(),
        };
        match outcome {
            Outcome::Pending => found.push(violation(
                "every accepted operation ends by its deadline",
                entry.sent_ms,
                entry.target.as_deref(),
                format!("job {job} ({:?}) did not end within {JOB_LIMIT:?}", entry.action),
            )),
            Outcome::Lost => found.push(violation(
                "nothing acknowledged is lost across kill -9",
                entry.sent_ms,
                entry.target.as_deref(),
                format!("job {job} ({:?}) was accepted, then not found", entry.action),
            )),
            _ => {}
        }
    }

    // Only legal transitions: a successful operation lands where the state table says.
    for entry in &entries {
        let Outcome::Succeeded(inventory) = &entry.outcome else { continue };
        if let Some(Some(expected)) = entry.action.lands_in()
            && s(&inventory["state"]) != expected
        {
            found.push(violation(
                "only legal transitions",
                entry.ended_ms.unwrap_or(entry.sent_ms),
                Some(s(&inventory["uuid"])),
                format!("{:?} succeeded but left the VM {}", entry.action, s(&inventory["state"])),
            ));
        }
    }

    // Repeats have no extra effect: one X-Job-UUID, one job.
    for (job, locations) in shared.history.repeats.lock().expect("repeats").iter() {
        if locations.windows(2).any(|w| w[0] != w[1]) || locations.iter().any(|l| !l.ends_with(job))
        {
            found.push(violation(
                "repeats have no extra effect",
                0,
                None,
                format!("X-Job-UUID {job} answered {locations:?}"),
            ));
        }
    }

    // The GC backlog of leftovers drains (expunge jobs of destroyed VMs and deleted volumes
    // wait for their grace period by design).
    let started = Instant::now();
    let backlog = loop {
        let jobs = list(api, "gc-jobs", Duration::from_secs(10)).unwrap_or_default();
        let leftovers: Vec<Value> = jobs
            .into_iter()
            .filter(|j| !matches!(s(&j["kind"]), "vm.expunge" | "volume.expunge"))
            .collect();
        if leftovers.is_empty() || started.elapsed() > Duration::from_secs(90) {
            break leftovers;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for job in backlog {
        found.push(violation(
            "no orphans after failed flows and the GC backlog drains",
            shared.now(),
            None,
            format!("GC job still pending 90 s after healing: {job}"),
        ));
    }

    // The store and the hypervisors agree within a bound after healing.
    let started = Instant::now();
    let disagreements = loop {
        let problems = disagreements(shared, cluster);
        if problems.is_empty() || started.elapsed() > Duration::from_secs(60) {
            break problems;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    found.extend(disagreements);

    // Nothing acknowledged is lost: every VM whose creation succeeded is still there, unless
    // the workload expunged it or deleted its host or network with its dependents.
    let vms = list(api, "vm-instances", Duration::from_secs(10)).unwrap_or_default();
    let present: HashSet<&str> = vms.iter().map(|v| s(&v["uuid"])).collect();
    // A cascade that was accepted may have deleted dependents even if it failed later.
    let removed_parents: HashSet<String> = entries
        .iter()
        .filter(|e| matches!(e.action, Action::DeleteHost | Action::DeleteL3) && e.job.is_some())
        .filter_map(|e| e.target.clone())
        .collect();
    let gone = expunged(&entries, true);
    let mut last_seen: HashMap<String, Value> = HashMap::new();
    for entry in &entries {
        if let Outcome::Succeeded(inventory) = &entry.outcome
            && inventory["vmNics"].is_array()
        {
            last_seen.insert(s(&inventory["uuid"]).to_owned(), inventory.clone());
        }
    }
    for entry in &entries {
        let created =
            matches!(entry.action, Action::CreateVm | Action::RepeatCreate | Action::CreateBurst);
        let Outcome::Succeeded(inventory) = &entry.outcome else { continue };
        let uuid = s(&inventory["uuid"]);
        if !created || present.contains(uuid) || gone.contains_key(uuid) {
            continue;
        }
        let seen = last_seen.get(uuid).unwrap_or(inventory);
        let parents = [s(&seen["hostUuid"]), s(&seen["lastHostUuid"])]
            .into_iter()
            .chain(seen["vmNics"].as_array().into_iter().flatten().map(|n| s(&n["l3NetworkUuid"])))
            .any(|p| removed_parents.contains(p));
        if !parents {
            found.push(violation(
                "nothing acknowledged is lost across kill -9",
                entry.ended_ms.unwrap_or(0),
                Some(uuid),
                "the VM's creation succeeded; the VM is gone and nobody deleted it".into(),
            ));
        }
    }

    // No address leaked: when no VM holds the single address of the tight network, a new VM
    // gets it.
    let tight = &shared.infra.tight_l3;
    let held = vms.iter().any(|v| {
        v["vmNics"].as_array().into_iter().flatten().any(|n| s(&n["l3NetworkUuid"]) == tight)
    });
    if !held {
        let body = crate::workload::create_body(shared, "leak-probe", tight);
        if let Ok((202, reply)) =
            strato_api::client::request(api, "POST", "/v1/vm-instances", Some(&body))
            && let Outcome::Failed(code) = follow(api, s(&reply["location"]), JOB_LIMIT)
            && code.contains("IP")
        {
            found.push(violation(
                "no orphans after failed flows and the GC backlog drains",
                shared.now(),
                Some(tight),
                format!(
                    "no VM holds the tight network's address, yet a new VM cannot get it ({code})"
                ),
            ));
        }
    }

    // The agents' journals: each command id ran once; no two jobs changed one domain at once.
    let hosts = cluster.lock().expect("cluster").hosts();
    for host in 0..hosts {
        let path = cluster.lock().expect("cluster").agent_dir(host).join("journal.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        found.extend(journal_violations(host, &text, shared.started));
    }

    // The volumes: their files, chains and attachments agree with the store (the GC may
    // still be deleting files of volumes and snapshots expunged under the faults).
    let started = Instant::now();
    found.extend(loop {
        let problems = storage_disagreements(shared, cluster);
        if problems.is_empty() || started.elapsed() > Duration::from_secs(120) {
            break problems;
        }
        std::thread::sleep(Duration::from_secs(2));
    });

    // The hosts' networks: what the agents made equals what the store says, and once the
    // networks are deleted nothing they made is left.
    if cluster.lock().expect("cluster").isolated() {
        let started = Instant::now();
        let differences = loop {
            let problems = network_disagreements(shared, cluster);
            if problems.is_empty() || started.elapsed() > Duration::from_secs(60) {
                break problems;
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        found.extend(differences);
        found.extend(rules_differ_from_a_fresh_render(shared, cluster));
        found.extend(network_leftovers(shared, cluster));
    }
    found
}

/// Compares the data volumes with the store: no volume on two domains, each running VM's
/// disks are its Ready volumes at their files, every file under the primary storage's
/// `datavolumes` is a volume's or a snapshot's, each volume's backing chain on disk is its
/// snapshots' from its latest up, and a volume with snapshots has one latest and one current
/// tree.
fn storage_disagreements(shared: &Shared, cluster: &std::sync::Mutex<Cluster>) -> Vec<Violation> {
    const ONE_VM: &str = "no volume attached to two VMs: the store and every host's domains agree";
    const FILES: &str = "every file under primary storage belongs to a record";
    const CHAIN: &str = "each volume's backing chain on disk equals its snapshot records";
    const TREES: &str = "one current tree and one latest snapshot per volume";
    const ROOT: &str = "each VM's root volume record names its file and host";
    let mut found_roots = Vec::new();
    let now = shared.now();
    let patience = Duration::from_secs(10);
    let (Some(all_volumes), Some(snapshots), Some(trees), Some(vms)) = (
        list(shared.api, "volumes", patience),
        list(shared.api, "volume-snapshots", patience),
        list(shared.api, "volume-snapshot-trees", patience),
        list(shared.api, "vm-instances", patience),
    ) else {
        return vec![violation(ONE_VM, now, None, "the API is down".into())];
    };
    // A root volume's record mirrors its VM: each VM with an image has one, on its host.
    for vm in vms.iter().filter(|vm| vm["rootVolumePath"].is_string()) {
        let id = s(&vm["uuid"]);
        let roots: Vec<&Value> = all_volumes
            .iter()
            .filter(|v| v["type"] == "Root" && v["vmInstanceUuid"] == id)
            .collect();
        // (A destroyed VM keeps its root volume where it last ran.)
        let on = |root: &Value| {
            root["hostUuid"] == vm["hostUuid"]
                || (vm["hostUuid"].is_null() && root["hostUuid"] == vm["lastHostUuid"])
        };
        let mirrored = matches!(roots.as_slice(), [root]
            if root["installPath"] == vm["rootVolumePath"] && on(root));
        if !mirrored {
            found_roots.push(violation(
                ROOT,
                now,
                Some(id),
                format!("root volume records {roots:?} for {vm}"),
            ));
        }
    }
    let volumes: Vec<&Value> = all_volumes.iter().filter(|v| v["type"] == "Data").collect();
    // Root volumes with snapshots have chains to check too (above their cached image).
    let snapshotted_roots: Vec<&Value> = all_volumes
        .iter()
        .filter(|v| v["type"] == "Root" && snapshots.iter().any(|s| s["volumeUuid"] == v["uuid"]))
        .collect();
    let mut found = found_roots;
    let snapshots_of = |volume: &str| -> Vec<&Value> {
        snapshots.iter().filter(|s| s["volumeUuid"] == volume).collect()
    };
    for volume in volumes.iter().chain(&snapshotted_roots) {
        let id = s(&volume["uuid"]);
        let own = snapshots_of(id);
        let latest = own.iter().filter(|s| s["latest"] == true).count();
        let current =
            trees.iter().filter(|t| t["volumeUuid"] == id && t["current"] == true).count();
        if !own.is_empty() && (latest != 1 || current != 1) {
            found.push(violation(
                TREES,
                now,
                Some(id),
                format!("{latest} latest, {current} current trees"),
            ));
        }
        // The chain on disk: the top, then the latest snapshot's file, then its parent's...
        let Some(top) = volume["installPath"].as_str().filter(|_| volume["status"] == "Ready")
        else {
            continue;
        };
        let mut expected = vec![top.to_owned()];
        let mut at = own.iter().find(|s| s["latest"] == true).copied();
        while let Some(snapshot) = at {
            expected.push(s(&snapshot["primaryStorageInstallPath"]).to_owned());
            at = own.iter().find(|o| o["uuid"] == snapshot["parentUuid"]).copied();
        }
        let chain = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--backing-chain", "--output=json", top])
            .output();
        let on_disk: Vec<String> = chain
            .ok()
            .and_then(|out| serde_json::from_slice::<Vec<Value>>(&out.stdout).ok())
            .map(|images| images.iter().map(|i| s(&i["filename"]).to_owned()).collect())
            .unwrap_or_default();
        // A deletion that died leaves its snapshots Deleting until it is finished; their
        // layers may be merged into the top already.
        let deleting: HashSet<&str> = own
            .iter()
            .filter(|s| s["status"] == "Deleting")
            .filter_map(|s| s["primaryStorageInstallPath"].as_str())
            .collect();
        let merged: Vec<String> =
            expected.iter().filter(|f| !deleting.contains(f.as_str())).cloned().collect();
        // A root volume's chain ends in the image it was made from (until a merge of its
        // oldest layer makes the top stand alone).
        let on_disk = match on_disk.split_last() {
            Some((bottom, above))
                if volume["type"] == "Root" && bottom.contains("/imagecache/") =>
            {
                above.to_vec()
            }
            _ => on_disk,
        };
        if on_disk != expected && (deleting.is_empty() || on_disk != merged) {
            found.push(violation(
                CHAIN,
                now,
                Some(id),
                format!("on disk {on_disk:?}, in the store {expected:?}"),
            ));
        }
    }
    // Files: each one a volume's top, a snapshot's layer, or the new top of a snapshot being
    // taken (named after its volume and itself, beside the top it freezes).
    let creating_tops: Vec<String> = snapshots
        .iter()
        .filter(|s| s["status"] == "Creating")
        .filter_map(|snap| {
            let top = snap["primaryStorageInstallPath"].as_str()?;
            let dir = top.rsplit_once('/').map_or(".", |(dir, _)| dir);
            Some(format!("{dir}/{}-{}.qcow2", s(&snap["volumeUuid"]), s(&snap["uuid"])))
        })
        .collect();
    let known: HashSet<&str> = volumes
        .iter()
        .filter_map(|v| v["installPath"].as_str())
        .chain(snapshots.iter().filter_map(|s| s["primaryStorageInstallPath"].as_str()))
        .chain(creating_tops.iter().map(String::as_str))
        .collect();
    let dir = shared.infra.primary_storage_dir.join("datavolumes");
    let registered: HashSet<String> = registered_hosts(shared)
        .unwrap_or_default()
        .iter()
        .map(|(h, _)| s(&h["uuid"]).to_owned())
        .collect();
    let on_deleted_host = |name: &str| {
        let volume = name.get(..36).unwrap_or_default();
        let hosts = shared.volume_hosts.lock().expect("volume hosts");
        hosts.get(volume).is_some_and(|host| !registered.contains(host))
    };
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = entry.path().display().to_string();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.ends_with(".qcow2") || known.contains(path.as_str()) || on_deleted_host(&name) {
            continue;
        }
        found.push(violation(FILES, now, None, format!("{path} belongs to no volume or snapshot")));
    }
    // Attachments: on the hosts as in the store.
    let Some(hosts) = registered_hosts(shared) else { return found };
    let mut on_domains: HashMap<String, Vec<String>> = HashMap::new();
    let mut disks_of_domain: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (_, i) in &hosts {
        let view = cluster.lock().expect("cluster").hypervisor(*i);
        let Ok(disks) = view.disks() else { continue };
        for (domain, disks) in disks {
            for (volume, _) in &disks {
                on_domains.entry(volume.clone()).or_default().push(domain.clone());
            }
            disks_of_domain.insert(domain, disks);
        }
    }
    for (volume, domains) in &on_domains {
        if domains.len() > 1 {
            found.push(violation(ONE_VM, now, Some(volume), format!("on domains {domains:?}")));
        }
    }
    for vm in vms.iter().filter(|vm| vm["state"] == "Running") {
        let id = s(&vm["uuid"]);
        let mut wanted: Vec<(String, String)> = volumes
            .iter()
            .filter(|v| v["vmInstanceUuid"] == id && v["status"] == "Ready")
            .map(|v| (s(&v["uuid"]).to_owned(), s(&v["installPath"]).to_owned()))
            .collect();
        let mut plugged = disks_of_domain.get(id).cloned().unwrap_or_default();
        wanted.sort();
        plugged.sort();
        if wanted != plugged {
            found.push(violation(
                ONE_VM,
                now,
                Some(id),
                format!("the store attaches {wanted:?}, the domain has {plugged:?}"),
            ));
        }
    }
    found
}

/// The registered hosts, each with its index in the cluster.
fn registered_hosts(shared: &Shared) -> Option<Vec<(Value, usize)>> {
    let hosts = list(shared.api, "hosts", Duration::from_secs(10))?;
    Some(
        hosts
            .into_iter()
            .filter_map(|h| {
                let port = h["agentPort"].as_u64()? as u16;
                let index = shared.infra.host_addrs.iter().position(|a| a.port() == port)?;
                Some((h, index))
            })
            .collect(),
    )
}

/// Compares each registered host's DHCP with the store: the main network's namespace runs
/// exactly one dnsmasq and no other namespace of the agent runs one; its reservations hold
/// each MAC and each address once, and are those of the NICs of the VMs placed there.
fn network_disagreements(shared: &Shared, cluster: &std::sync::Mutex<Cluster>) -> Vec<Violation> {
    const DNSMASQ: &str = "per L3 network and host exactly one dnsmasq, in its namespace";
    const HOSTS: &str = "hosts files hold each MAC and each IP once and equal the store";
    let mut found = Vec::new();
    let now = shared.now();
    let (Some(vms), Some(hosts)) =
        (list(shared.api, "vm-instances", Duration::from_secs(10)), registered_hosts(shared))
    else {
        return vec![violation(DNSMASQ, now, None, "the API is down".into())];
    };
    let l3 = &shared.infra.l3;
    // Where the run's EIP should be: on the host of the VM its NIC belongs to.
    let eip = shared.infra.eip.as_ref().and_then(|eip| {
        let found =
            crate::workload::get(shared.api, &format!("/v1/eips/{eip}"), Duration::from_secs(10))?;
        let eip = found["inventories"].get(0)?.clone();
        let home = eip["vmNicUuid"].as_str().and_then(|nic| {
            vms.iter()
                .filter(|vm| s(&vm["state"]) != "Destroyed")
                .find(|vm| vm["vmNics"].as_array().into_iter().flatten().any(|n| n["uuid"] == nic))
                .map(|vm| s(&vm["hostUuid"]).to_owned())
        });
        Some((s(&eip["vipUuid"]).replace('-', ""), home))
    });
    for (host, i) in hosts {
        let host_uuid = s(&host["uuid"]);
        let (network, dir) = {
            let c = cluster.lock().expect("cluster");
            (c.host_network(i), c.agent_dir(i).to_owned())
        };
        let Some((_, prefix)) = network else { continue };
        let dhcp_ns = format!("{prefix}br_eth0_{}", l3.replace('-', ""));
        let namespaces = crate::hostnet::namespaces(&prefix).unwrap_or_default();
        if !namespaces.contains(&dhcp_ns) {
            found.push(violation(DNSMASQ, now, Some(host_uuid), format!("no namespace {dhcp_ns}")));
        }
        if let Some((vip, home)) = &eip {
            let held = namespaces.iter().filter(|n| n.ends_with(&format!("vip_{vip}"))).count();
            let wanted = usize::from(home.as_deref() == Some(host_uuid));
            if held != wanted {
                found.push(violation(
                    "a VIP lives in exactly one place",
                    now,
                    Some(host_uuid),
                    format!("{held} namespace(s) of VIP {vip} here, where {wanted} belongs"),
                ));
            }
        }
        for ns in &namespaces {
            let running = crate::hostnet::dnsmasq_in(ns).map(|p| p.len()).unwrap_or_default();
            let wanted = usize::from(*ns == dhcp_ns);
            if running != wanted {
                found.push(violation(
                    DNSMASQ,
                    now,
                    Some(host_uuid),
                    format!("{running} dnsmasq in {ns}, where {wanted} belongs"),
                ));
            }
        }
        let text =
            std::fs::read_to_string(dir.join("net").join(l3).join("hosts")).unwrap_or_default();
        let mut macs = HashSet::new();
        let mut ips = HashSet::new();
        let mut reserved = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut fields = line.split(',');
            let (mac, ip) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
            if !macs.insert(mac.to_lowercase()) || !ips.insert(ip.to_owned()) {
                found.push(violation(HOSTS, now, Some(host_uuid), format!("held twice: {line}")));
            }
            reserved.insert((mac.to_lowercase(), ip.to_owned()));
        }
        let expected: std::collections::BTreeSet<(String, String)> = vms
            .iter()
            .filter(|vm| s(&vm["hostUuid"]) == host_uuid && s(&vm["state"]) != "Destroyed")
            .flat_map(|vm| vm["vmNics"].as_array().into_iter().flatten())
            .filter(|nic| s(&nic["l3NetworkUuid"]) == l3)
            .map(|nic| (s(&nic["mac"]).to_lowercase(), s(&nic["ip"]).to_owned()))
            .collect();
        if reserved != expected {
            found.push(violation(
                HOSTS,
                now,
                Some(host_uuid),
                format!(
                    "reserved but not in the store: {:?}; in the store but not reserved: {:?}",
                    reserved.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&reserved).collect::<Vec<_>>()
                ),
            ));
        }
    }
    found
}

/// Checks that each registered host's rules are what the store renders: its agent's tables
/// (security groups, anti-spoofing, DHCP isolation) and its VIP namespaces' tables are read,
/// the host is reconnected, which renders its whole network from the store and applies it,
/// and they are read again. A host that kept a rule the store no longer renders, or missed
/// one it does, changes; a converged one does not.
fn rules_differ_from_a_fresh_render(
    shared: &Shared,
    cluster: &std::sync::Mutex<Cluster>,
) -> Vec<Violation> {
    use strato_api::types::actions::{HostAction, NoParams};
    const RULES: &str = "after reconnect the rules equal what the store renders";
    let Some(hosts) = registered_hosts(shared) else { return Vec::new() };
    let mut found = Vec::new();
    for (host, i) in hosts {
        let host_uuid = s(&host["uuid"]);
        let Some((agent_ns, prefix)) = cluster.lock().expect("cluster").host_network(i) else {
            continue;
        };
        // A read can meet a namespace being made or removed (`ip netns exec` fails): it is
        // read again, and a difference is reported whatever the reads it took.
        let read = || {
            let mut tries = 0;
            loop {
                match crate::hostnet::strato_rules(&agent_ns, &prefix) {
                    Err(_) if tries < 3 => tries += 1,
                    read => return read,
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        };
        let before = read();
        let body = strato_api::client::body(&HostAction::ReconnectHost(NoParams {}));
        let path = format!("/v1/hosts/{host_uuid}/actions");
        let reconnected = match strato_api::client::request(shared.api, "PUT", &path, Some(&body)) {
            Ok((202, reply)) => follow(shared.api, s(&reply["location"]), JOB_LIMIT),
            other => Outcome::Failed(format!("{other:?}")),
        };
        let detail = match (before, &reconnected, read()) {
            (_, outcome, _) if !matches!(outcome, Outcome::Succeeded(_)) => {
                format!("reconnecting the host ended {outcome:?}")
            }
            (Ok(before), _, Ok(after)) if before == after => continue,
            (Ok(before), _, Ok(after)) => {
                let changed: Vec<&String> = before
                    .keys()
                    .chain(after.keys())
                    .filter(|table| before.get(*table) != after.get(*table))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                format!("a reconnect changed the tables {changed:?}")
            }
            (before, _, after) => {
                format!("cannot read the rules: {:?} {:?}", before.err(), after.err())
            }
        };
        found.push(violation(RULES, shared.now(), Some(host_uuid), detail));
    }
    found
}

/// Deletes the run's L2 network with everything on it, then checks that the registered
/// hosts' agents removed everything they made: namespaces, processes in them, marked links
/// and tables.
fn network_leftovers(shared: &Shared, cluster: &std::sync::Mutex<Cluster>) -> Vec<Violation> {
    const LEFT: &str = "after deletes no namespace, process, bridge, veth or nft table is left";
    let path = format!("/v1/l2-networks/{}?deleteMode=Enforcing", shared.infra.l2);
    let deleted = match strato_api::client::request(shared.api, "DELETE", &path, None) {
        Ok((202, reply)) => follow(shared.api, s(&reply["location"]), JOB_LIMIT),
        other => Outcome::Failed(format!("{other:?}")),
    };
    if !matches!(deleted, Outcome::Succeeded(_)) {
        return vec![violation(
            LEFT,
            shared.now(),
            Some(&shared.infra.l2),
            format!("deleting the L2 network with its dependents ended {deleted:?}"),
        )];
    }
    let Some(hosts) = registered_hosts(shared) else { return Vec::new() };
    let started = Instant::now();
    loop {
        let mut left = Vec::new();
        for (host, i) in &hosts {
            let Some((agent_ns, prefix)) = cluster.lock().expect("cluster").host_network(*i) else {
                continue;
            };
            let mut made = crate::hostnet::namespaces(&prefix).unwrap_or_default();
            made.extend(crate::hostnet::strato_links(&agent_ns).unwrap_or_default());
            made.extend(
                crate::hostnet::strato_tables(&agent_ns)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(family, name)| format!("table {family} {name}")),
            );
            if !made.is_empty() {
                left.push(violation(
                    LEFT,
                    shared.now(),
                    Some(s(&host["uuid"])),
                    format!("{made:?}"),
                ));
            }
        }
        if left.is_empty() || started.elapsed() > Duration::from_secs(30) {
            return left;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Compares the store (through the API) with every hypervisor.
fn disagreements(shared: &Shared, cluster: &std::sync::Mutex<Cluster>) -> Vec<Violation> {
    let mut found = Vec::new();
    let now = shared.now();
    let Some(vms) = list(shared.api, "vm-instances", Duration::from_secs(10)) else {
        return vec![violation(
            "database and hypervisors agree",
            now,
            None,
            "the API is down".into(),
        )];
    };
    let Some(hosts) = list(shared.api, "hosts", Duration::from_secs(10)) else { return found };
    let index_of: HashMap<String, usize> = hosts
        .iter()
        .filter_map(|h| {
            let port = h["agentPort"].as_u64()? as u16;
            let index = shared.infra.host_addrs.iter().position(|a| a.port() == port)?;
            Some((s(&h["uuid"]).to_owned(), index))
        })
        .collect();
    for host in &hosts {
        if s(&host["status"]) != "Connected" {
            found.push(violation(
                "database and hypervisors agree",
                now,
                Some(s(&host["uuid"])),
                format!("host is {} after healing", s(&host["status"])),
            ));
        }
    }
    let hypervisors = hypervisors(cluster);
    let mut domains: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for (host, listed) in hypervisors.iter().enumerate() {
        for (uuid, state) in listed.iter().flatten() {
            domains.entry(uuid.clone()).or_default().push((host, state.clone()));
        }
    }
    let known: HashSet<&str> = vms.iter().map(|v| s(&v["uuid"])).collect();
    // Domains the MN reports as strangers are known to the operator (left on a machine that
    // was deleted as a host while it was away, then added again), not orphans.
    let strangers: HashSet<&str> =
        hosts.iter().flat_map(|h| h["strangers"].as_array().into_iter().flatten().map(s)).collect();
    for vm in &vms {
        let uuid = s(&vm["uuid"]);
        let state = s(&vm["state"]);
        let on = domains.get(uuid).cloned().unwrap_or_default();
        let running: Vec<&(usize, String)> = on.iter().filter(|(_, st)| st != "Shutoff").collect();
        let host = index_of.get(s(&vm["hostUuid"])).copied();
        let expected = match state {
            "Running" => Some("Running"),
            "Paused" => Some("Paused"),
            "Stopped" | "Destroyed" | "Created" => None,
            other => {
                found.push(violation(
                    "database and hypervisors agree",
                    now,
                    Some(uuid),
                    format!("VM still {other} after healing"),
                ));
                continue;
            }
        };
        let agrees = match expected {
            Some(want) => running.len() == 1 && Some(running[0].0) == host && running[0].1 == want,
            None => running.is_empty(),
        };
        if !agrees {
            found.push(violation(
                "database and hypervisors agree",
                now,
                Some(uuid),
                format!("the store says {state} on host {host:?}; the hypervisors have {on:?}"),
            ));
        }
        if state == "Destroyed" && !on.is_empty() {
            found.push(violation(
                "no orphans after failed flows and the GC backlog drains",
                now,
                Some(uuid),
                format!("destroyed VM still has domains {on:?}"),
            ));
        }
    }
    // Machines whose host was deleted (and not added again) are outside management.
    let managed: HashSet<usize> = index_of.values().copied().collect();
    for (uuid, on) in &domains {
        let on_managed: Vec<&(usize, String)> =
            on.iter().filter(|(h, _)| managed.contains(h)).collect();
        if !on_managed.is_empty()
            && !known.contains(uuid.as_str())
            && !strangers.contains(uuid.as_str())
        {
            found.push(violation(
                "no orphans after failed flows and the GC backlog drains",
                now,
                Some(uuid),
                format!("domain of no VM on hosts {on:?}"),
            ));
        }
    }
    // A data volume's local storage is booked on the host holding it, under its UUID.
    let volumes = list(shared.api, "volumes", Duration::from_secs(10)).unwrap_or_default();
    let volume_host: HashMap<&str, &str> =
        volumes.iter().map(|v| (s(&v["uuid"]), s(&v["hostUuid"]))).collect();
    for host in &hosts {
        let here = s(&host["uuid"]);
        for vm in host["reservations"].as_object().into_iter().flatten().map(|(vm, _)| vm) {
            let volume_here = volume_host.get(vm.as_str()) == Some(&here);
            if !known.contains(vm.as_str()) && !volume_here {
                found.push(violation(
                    "no orphans after failed flows and the GC backlog drains",
                    now,
                    Some(vm),
                    format!("capacity still booked on host {here} for a VM or volume that is gone"),
                ));
            }
        }
    }
    found
}

/// Commands that change a domain.
const MUTATING: [&str; 8] = [
    "define-domain",
    "start-domain",
    "shutdown-domain",
    "destroy-domain",
    "reboot-domain",
    "suspend-domain",
    "resume-domain",
    "undefine-domain",
];

/// Checks one agent's journal: at-most-once ids, and no overlapping changes of one domain by
/// two different jobs (or by a job and a job-less command, such as the GC's).
pub fn journal_violations(host: usize, journal: &str, started: Instant) -> Vec<Violation> {
    let run_start_ms = crate::unix_ms_at(started);
    let mut found = Vec::new();
    let lines: Vec<Value> = journal.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for line in &lines {
        *ids.entry(s(&line["id"])).or_default() += 1;
    }
    for (id, count) in ids {
        if count > 1 {
            found.push(violation(
                "repeats have no extra effect",
                0,
                None,
                format!("host {host} executed command {id} {count} times"),
            ));
        }
    }
    let mut by_domain: HashMap<&str, Vec<&Value>> = HashMap::new();
    for line in &lines {
        if MUTATING.contains(&s(&line["command"])) {
            by_domain.entry(s(&line["domain"])).or_default().push(line);
        }
    }
    for (domain, mut commands) in by_domain {
        commands.sort_by_key(|c| c["startMs"].as_u64());
        for (i, a) in commands.iter().enumerate() {
            for b in &commands[i + 1..] {
                let (a_end, b_start) = (a["endMs"].as_u64(), b["startMs"].as_u64());
                if b_start >= a_end {
                    break;
                }
                let job = |c: &Value| {
                    c["job"].as_str().map_or_else(|| s(&c["id"]).to_owned(), str::to_owned)
                };
                if job(a) != job(b) {
                    found.push(violation(
                        "no overlapping mutations of one resource",
                        a["startMs"].as_u64().unwrap_or(0).saturating_sub(run_start_ms),
                        Some(domain),
                        format!(
                            "host {host}: {} (job {}) and {} (job {}) ran at once",
                            s(&a["command"]),
                            job(a),
                            s(&b["command"]),
                            job(b)
                        ),
                    ));
                }
            }
        }
    }
    found
}

/// How long after a fault ends its effects may still be felt: a partitioned host redials
/// with backoff, an MN restarted reloads and reconnects its hosts.
const FAULT_GRACE_MS: u64 = 15_000;

/// The failures the state an operation found explains, with nothing faulty: another client
/// changed the VM first, no host has room, the resource is in use or already gone, the quota
/// is spent.
const STATE_REFUSALS: &[&str] = &[
    "VM.INVALID_STATE",
    "HOST_ALLOCATION.NO_HOST",
    "L3.IP_EXHAUSTED",
    "SYS.RESOURCE_IN_USE",
    "SYS.RESOURCE_BUSY",
    "SYS.RESOURCE_NOT_FOUND",
    "ID.QUOTA_EXCEEDED",
];

/// No operation fails without a fault: `SYS.INTERNAL` is a violation in any run (every real
/// failure, an injected one included, has a code that names it), and outside every fault's
/// window (`windows`: start and end, ms since the run started; plus `FAULT_GRACE_MS`) an
/// operation fails only with a refusal the state it found explains.
pub fn failures_without_a_fault(entries: &[Entry], windows: &[(u64, u64)]) -> Vec<Violation> {
    let mut found = Vec::new();
    for entry in entries {
        let code = match &entry.outcome {
            Outcome::Failed(code) | Outcome::Refused(_, code) => code,
            _ => continue,
        };
        let ended = entry.ended_ms.unwrap_or(u64::MAX);
        let during_a_fault = windows.iter().any(|(start, end)| {
            entry.sent_ms <= end.saturating_add(FAULT_GRACE_MS) && ended >= *start
        });
        if code == "SYS.INTERNAL" {
            found.push(violation(
                "no internal errors: every failure has a code that names it",
                entry.sent_ms,
                entry.target.as_deref(),
                format!("{:?} answered SYS.INTERNAL", entry.action),
            ));
        } else if !during_a_fault && !STATE_REFUSALS.contains(&code.as_str()) {
            found.push(violation(
                "no operation fails without a fault",
                entry.sent_ms,
                entry.target.as_deref(),
                format!("{:?} failed {code} with no fault active", entry.action),
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_journal_check_finds_repeats_and_overlaps_and_nothing_else() {
        let started = Instant::now();
        let base = crate::unix_ms_at(started);
        let line = |id: &str, job: Option<&str>, command: &str, start: u64, end: u64| {
            json!({ "id": id, "job": job, "command": command, "domain": "d1",
                    "startMs": base + start, "endMs": base + end, "ok": true })
            .to_string()
        };
        let clean = [
            line("a", Some("j1"), "define-domain", 0, 10),
            line("b", Some("j1"), "start-domain", 10, 20),
            line("c", Some("j2"), "destroy-domain", 20, 30),
            line("l", None, "list-domains", 0, 30),
        ]
        .join("\n");
        assert!(journal_violations(0, &clean, started).is_empty());
        let repeated = [
            line("a", Some("j1"), "start-domain", 0, 10),
            line("a", Some("j1"), "start-domain", 10, 20),
        ]
        .join("\n");
        let found = journal_violations(0, &repeated, started);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].invariant, "repeats have no extra effect");
        let overlapping = [
            line("a", Some("j1"), "start-domain", 0, 10),
            line("b", None, "destroy-domain", 5, 15),
        ]
        .join("\n");
        let found = journal_violations(0, &overlapping, started);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].invariant, "no overlapping mutations of one resource");
    }

    fn entry(sent_ms: u64, ended_ms: u64, outcome: Outcome) -> Entry {
        Entry {
            seq: 0,
            client: 0,
            action: Action::StopVm,
            target: None,
            sent_ms,
            job: None,
            ended_ms: Some(ended_ms),
            outcome,
        }
    }

    #[test]
    fn only_faults_and_the_state_found_excuse_a_failure() {
        let failed = |code: &str| Outcome::Failed(code.into());
        let windows = [(10_000, 20_000)];
        let judged = |e: Entry| failures_without_a_fault(&[e], &windows).len();
        // Inside a fault's window, or its grace after: excused.
        assert_eq!(judged(entry(12_000, 13_000, failed("HOST.UNAVAILABLE"))), 0);
        assert_eq!(judged(entry(30_000, 31_000, failed("HOST.UNAVAILABLE"))), 0);
        // Long after, or before it: a violation.
        assert_eq!(judged(entry(40_000, 41_000, failed("HOST.UNAVAILABLE"))), 1);
        assert_eq!(judged(entry(1_000, 2_000, failed("SYS.CONCURRENT_CHANGE"))), 1);
        // What the state explains is never one; SYS.INTERNAL always is.
        assert_eq!(judged(entry(1_000, 2_000, failed("VM.INVALID_STATE"))), 0);
        assert_eq!(
            judged(entry(1_000, 2_000, Outcome::Refused(409, "VM.INVALID_STATE".into()))),
            0
        );
        assert_eq!(judged(entry(12_000, 13_000, failed("SYS.INTERNAL"))), 1);
        assert_eq!(judged(entry(1_000, 2_000, Outcome::Succeeded(Value::Null))), 0);
    }
}
