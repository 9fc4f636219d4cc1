//! The workload: several seeded clients walking the API at random, ZStack woodpecker style.
//!
//! At each step a client reads the current resources through the API (its model of the
//! world) and picks an action that is legal for them: a VM operation its state allows, a
//! host action, an L3 network change, or a burst of creations on the network with one free
//! address. The strategy decides among the legal actions: `random` (uniform), `weighted`
//! (the mix a user produces: mostly creations and power operations), or `fair` (the action
//! used least so far). One VM is "hot": clients often pick it, so calls on it conflict.
//!
//! With `--storm`, a client often fires a storm instead of one action: many creations and
//! an operation on each of many VMs (some twice, so they collide) at the same instant, on
//! few hosts and one L3 network, to hunt the races a sequence of single calls never meets.
//!
//! Every call and its outcome goes into the [`History`] the checks read. A client follows
//! each accepted job to its end, through MN restarts, as a user would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strato_api::client;
use strato_api::types::actions::{
    ChangeHostState, HostAction, NoParams, OnHost, StateEvent, VmAction,
};
use strato_api::types::{Create, HostParams, L3Params, RangeParams, VmParams, canonical_uuid};
use uuid::Uuid;

/// How a client chooses among legal actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Uniformly.
    Random,
    /// By the weights a user's mix has.
    Weighted,
    /// The action used least so far.
    Fair,
}

/// What a client can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    CreateVm,
    StartVm,
    StopVm,
    RebootVm,
    PauseVm,
    ResumeVm,
    MigrateVm,
    DestroyVm,
    RecoverVm,
    ExpungeVm,
    /// A creation sent twice with one `X-Job-UUID`.
    RepeatCreate,
    /// Several creations at once on the network with one address.
    CreateBurst,
    AddHost,
    ReconnectHost,
    DisableHost,
    EnableHost,
    DeleteHost,
    CreateL3,
    DeleteL3,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 19] = [
        Action::CreateVm,
        Action::StartVm,
        Action::StopVm,
        Action::RebootVm,
        Action::PauseVm,
        Action::ResumeVm,
        Action::MigrateVm,
        Action::DestroyVm,
        Action::RecoverVm,
        Action::ExpungeVm,
        Action::RepeatCreate,
        Action::CreateBurst,
        Action::AddHost,
        Action::ReconnectHost,
        Action::DisableHost,
        Action::EnableHost,
        Action::DeleteHost,
        Action::CreateL3,
        Action::DeleteL3,
    ];

    fn weight(self) -> f64 {
        match self {
            Action::CreateVm => 6.0,
            Action::StartVm | Action::StopVm => 5.0,
            Action::DestroyVm => 3.0,
            Action::RebootVm | Action::PauseVm | Action::ResumeVm | Action::MigrateVm => 2.0,
            Action::ExpungeVm => 2.0,
            Action::RecoverVm | Action::RepeatCreate | Action::ReconnectHost => 1.0,
            Action::DisableHost | Action::EnableHost | Action::AddHost => 0.7,
            Action::CreateL3 | Action::DeleteL3 | Action::CreateBurst => 0.4,
            Action::DeleteHost => 0.2,
        }
    }

    /// The VM operations a VM in `state` allows (the state table of DESIGN section 5, as a
    /// user reads it in the documentation).
    fn allowed_from(state: &str) -> &'static [Action] {
        use Action::*;
        match state {
            "Created" => &[],
            "Stopped" => &[StartVm, MigrateVm, DestroyVm],
            "Running" => &[StopVm, RebootVm, PauseVm, DestroyVm],
            "Paused" => &[StopVm, ResumeVm, DestroyVm],
            "Destroyed" => &[RecoverVm, ExpungeVm],
            "Unknown" | "Error" => &[StopVm, DestroyVm],
            "Destroying" | "Expunging" => &[],
            _ => &[DestroyVm],
        }
    }

    /// The state a successful operation leaves the VM in (`None`: it is gone).
    pub fn lands_in(self) -> Option<Option<&'static str>> {
        Some(match self {
            Action::CreateVm | Action::RepeatCreate | Action::CreateBurst => Some("Running"),
            Action::StartVm | Action::RebootVm | Action::ResumeVm => Some("Running"),
            Action::StopVm | Action::MigrateVm | Action::RecoverVm => Some("Stopped"),
            Action::PauseVm => Some("Paused"),
            Action::DestroyVm => Some("Destroyed"),
            Action::ExpungeVm => None,
            _ => return None,
        })
    }
}

/// How a call ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Not answered yet.
    Pending,
    /// The job succeeded with this inventory.
    Succeeded(Value),
    /// The job failed with this error code.
    Failed(String),
    /// Refused before a job existed (4xx) with this code.
    Refused(u16, String),
    /// The MN did not answer the submission (it was down).
    Unreachable,
    /// The job was accepted, then never found again.
    Lost,
}

/// One recorded call.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its index in the history.
    pub seq: usize,
    /// The client that made it.
    pub client: usize,
    /// What it was.
    pub action: Action,
    /// The resource it addressed, if any.
    pub target: Option<String>,
    /// When it was sent (ms since the run started).
    pub sent_ms: u64,
    /// The job, when one was accepted.
    pub job: Option<String>,
    /// When it ended (ms since the run started).
    pub ended_ms: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
}

/// Everything the clients did, in order of sending.
#[derive(Debug, Default)]
pub struct History {
    entries: Mutex<Vec<Entry>>,
    /// Every job a repeated creation must map to: (job id, the location both calls got).
    pub repeats: Mutex<Vec<(String, Vec<String>)>>,
}

impl History {
    fn open(&self, client: usize, action: Action, target: Option<String>, now: u64) -> usize {
        let mut entries = self.entries.lock().expect("history");
        let seq = entries.len();
        entries.push(Entry {
            seq,
            client,
            action,
            target,
            sent_ms: now,
            job: None,
            ended_ms: None,
            outcome: Outcome::Pending,
        });
        seq
    }

    fn set_job(&self, seq: usize, job: String) {
        self.entries.lock().expect("history")[seq].job = Some(job);
    }

    fn close(&self, seq: usize, outcome: Outcome, now: u64) {
        let mut entries = self.entries.lock().expect("history");
        entries[seq].outcome = outcome;
        entries[seq].ended_ms = Some(now);
    }

    /// A copy of every entry.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().expect("history").clone()
    }
}

/// What the clients share.
#[derive(Debug)]
pub struct Shared {
    /// The API.
    pub api: SocketAddr,
    /// The recorded history.
    pub history: History,
    /// Set to end the workload.
    pub stop: AtomicBool,
    /// When the run started.
    pub started: Instant,
    /// What the infrastructure is: the IDs the workload needs.
    pub infra: Infra,
    /// How often each action was chosen (for `fair`).
    used: Mutex<HashMap<Action, u64>>,
    /// Hosts deleted by the workload (their index among the cluster's agents), to add again.
    deleted_hosts: Mutex<Vec<usize>>,
    /// L3 networks the workload made and has not deleted.
    extra_l3s: Mutex<Vec<String>>,
    /// Whether clients fire storms (`--storm`).
    pub storm: bool,
    /// The host each data volume was last seen on, by volume: a volume whose host was
    /// deleted while it could not be reached leaves its files there, on a machine Strato no
    /// longer manages (here, one directory all the hosts share).
    pub volume_hosts: Mutex<HashMap<String, String>>,
}

/// The infrastructure the run registers first.
#[derive(Clone, Debug)]
pub struct Infra {
    /// The cluster.
    pub cluster: String,
    /// The zone.
    pub zone: String,
    /// The offering (1 CPU, 512 MiB).
    pub offering: String,
    /// The L2 network.
    pub l2: String,
    /// The main L3 network (addresses for every VM).
    pub l3: String,
    /// An L3 network with a single address, for bursts.
    pub tight_l3: String,
    /// Where the MN dials each host (its proxy).
    pub host_addrs: Vec<SocketAddr>,
    /// An EIP (on a public L3 network of the same L2) that [`network_mover`] keeps moving
    /// between the main network's VMs, when the hosts make their networks for real.
    pub eip: Option<String>,
    /// A security group of the main network (SSH from anywhere, everything between its
    /// members) whose membership [`network_mover`] keeps changing, then too.
    pub security_group: Option<String>,
    /// The directory of the cluster's local primary storage (on every host: they share
    /// this machine), where [`storage_mover`]'s data volumes and snapshots are files.
    pub primary_storage_dir: std::path::PathBuf,
    /// An image in the run's backup storage: every other VM is made from it, so it has a
    /// root volume (a real qcow2 file on the primary storage, and a record).
    pub image: String,
}

impl Shared {
    /// The clients' shared state.
    pub fn new(api: SocketAddr, infra: Infra, storm: bool) -> Self {
        Shared {
            api,
            history: History::default(),
            stop: AtomicBool::new(false),
            started: Instant::now(),
            infra,
            used: Mutex::default(),
            deleted_hosts: Mutex::default(),
            extra_l3s: Mutex::default(),
            storm,
            volume_hosts: Mutex::default(),
        }
    }

    /// Milliseconds since the run started.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// A GET that waits out an MN restart; `None` once the run is stopping and the MN stays away.
pub fn get(api: SocketAddr, path: &str, patience: Duration) -> Option<Value> {
    let started = Instant::now();
    loop {
        if let Ok((200, body)) = client::request(api, "GET", path, None) {
            return Some(body);
        }
        if started.elapsed() > patience {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The inventories of a kind.
pub fn list(api: SocketAddr, kind: &str, patience: Duration) -> Option<Vec<Value>> {
    get(api, &format!("/v1/{kind}"), patience)
        .and_then(|body| body["inventories"].as_array().cloned())
}

/// Follows a job to its end (through MN restarts) within `limit`.
pub fn follow(api: SocketAddr, location: &str, limit: Duration) -> Outcome {
    // Each GET waits up to a second for the job's end, so a restart's 404s and the limit
    // are noticed as promptly as when this polled.
    let path = client::job_path(location, Duration::from_secs(1));
    let started = Instant::now();
    let mut missing = 0;
    loop {
        match client::request(api, "GET", &path, None) {
            Ok((200, body)) => {
                return match body.get("error") {
                    Some(error) => Outcome::Failed(error["code"].as_str().unwrap_or("").to_owned()),
                    None => Outcome::Succeeded(body["inventory"].clone()),
                };
            }
            // A job the MN accepted must be there; give a restart a few tries.
            Ok((404, _)) => {
                missing += 1;
                if missing > 50 {
                    return Outcome::Lost;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // Still running: the GET has waited already.
            Ok((202, _)) => {}
            // The MN is restarting, or refused for a moment.
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
        if started.elapsed() > limit {
            return Outcome::Pending;
        }
    }
}

/// How long a client follows one job: the API's operation timeout, plus an MN restart.
pub const JOB_LIMIT: Duration = Duration::from_secs(330);

fn submit(
    shared: &Shared,
    client_id: usize,
    action: Action,
    target: Option<String>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Outcome {
    let seq = shared.history.open(client_id, action, target, shared.now());
    let outcome = match client::request(shared.api, method, path, body) {
        Ok((202, reply)) => {
            let location = reply["location"].as_str().unwrap_or_default().to_owned();
            shared.history.set_job(seq, location.rsplit('/').next().unwrap_or("").to_owned());
            follow(shared.api, &location, JOB_LIMIT)
        }
        Ok((status, reply)) => {
            Outcome::Refused(status, reply["error"]["code"].as_str().unwrap_or("").to_owned())
        }
        Err(_) => Outcome::Unreachable,
    };
    shared.history.close(seq, outcome.clone(), shared.now());
    outcome
}

/// The UUID `text` names (the run's own resources, as their inventories spell them).
fn id(text: &str) -> Uuid {
    canonical_uuid(text).unwrap_or_default()
}

/// A VM's creation on `l3` with the run's offering.
pub(crate) fn create_body(shared: &Shared, name: &str, l3: &str) -> Value {
    client::body(&Create::new(VmParams {
        name: name.to_owned(),
        instance_offering_uuid: id(&shared.infra.offering),
        l3_network_uuids: vec![id(l3)],
        host_uuid: None,
        cluster_uuid: None,
        // Every other one from the run's image (by its name, so a repeat makes the same).
        image_uuid: (name.bytes().map(u32::from).sum::<u32>() % 2 == 0)
            .then(|| id(&shared.infra.image)),
    }))
}

/// One client: steps until the run stops.
pub fn client(shared: Arc<Shared>, id: usize, seed: u64, strategy: Strategy) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut step = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        step += 1;
        let Some(vms) = list(shared.api, "vm-instances", Duration::from_secs(2)) else {
            continue;
        };
        let Some(hosts) = list(shared.api, "hosts", Duration::from_secs(2)) else { continue };
        // The hot VM: the oldest-named one; clients pick it half the time, so they collide.
        let mut vms = vms;
        vms.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let vm = if !vms.is_empty() && rng.bool() {
            Some(vms[0].clone())
        } else if vms.is_empty() {
            None
        } else {
            Some(vms[rng.usize(..vms.len())].clone())
        };
        if shared.storm && rng.f64() < 0.3 {
            storm(&shared, id, &mut rng, step, &vms, &hosts);
            continue;
        }
        let legal = legal_actions(&shared, vm.as_ref(), &hosts);
        let Some(action) = choose(&shared, &mut rng, strategy, &legal) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        *shared.used.lock().expect("used").entry(action).or_default() += 1;
        act(&shared, id, &mut rng, step, action, vm.as_ref(), &hosts);
    }
}

fn legal_actions(shared: &Shared, vm: Option<&Value>, hosts: &[Value]) -> Vec<Action> {
    let mut legal = vec![Action::CreateVm, Action::RepeatCreate, Action::CreateBurst];
    if let Some(vm) = vm {
        legal.extend_from_slice(Action::allowed_from(vm["state"].as_str().unwrap_or("")));
    }
    if !hosts.is_empty() {
        legal.extend_from_slice(&[Action::ReconnectHost, Action::DisableHost, Action::EnableHost]);
    }
    // Keep at least two hosts: deleting is for one at a time.
    if hosts.len() > 2 && shared.deleted_hosts.lock().expect("deleted").is_empty() {
        legal.push(Action::DeleteHost);
    }
    if !shared.deleted_hosts.lock().expect("deleted").is_empty() {
        legal.push(Action::AddHost);
    }
    legal.push(Action::CreateL3);
    if !shared.extra_l3s.lock().expect("l3s").is_empty() {
        legal.push(Action::DeleteL3);
    }
    legal
}

fn choose(
    shared: &Shared,
    rng: &mut fastrand::Rng,
    strategy: Strategy,
    legal: &[Action],
) -> Option<Action> {
    if legal.is_empty() {
        return None;
    }
    Some(match strategy {
        Strategy::Random => legal[rng.usize(..legal.len())],
        Strategy::Weighted => {
            let total: f64 = legal.iter().map(|a| a.weight()).sum();
            let mut pick = rng.f64() * total;
            *legal
                .iter()
                .find(|a| {
                    pick -= a.weight();
                    pick <= 0.0
                })
                .unwrap_or(&legal[legal.len() - 1])
        }
        Strategy::Fair => {
            let used = shared.used.lock().expect("used");
            *legal.iter().min_by_key(|a| used.get(a).copied().unwrap_or(0)).expect("non-empty")
        }
    })
}

/// The API action name of a VM operation sent as `PUT /v1/vm-instances/{uuid}/actions`.
/// The API's action for a workload's VM operation.
fn vm_action(action: Action) -> Option<VmAction> {
    let none = NoParams {};
    Some(match action {
        Action::StartVm => VmAction::StartVmInstance(Some(OnHost::default())),
        Action::StopVm => VmAction::StopVmInstance(none),
        Action::RebootVm => VmAction::RebootVmInstance(none),
        Action::PauseVm => VmAction::PauseVmInstance(none),
        Action::ResumeVm => VmAction::ResumeVmInstance(none),
        Action::MigrateVm => VmAction::MigrateVm(Some(OnHost::default())),
        Action::RecoverVm => VmAction::RecoverVmInstance(none),
        Action::ExpungeVm => VmAction::ExpungeVmInstance(none),
        _ => return None,
    })
}

fn act(
    shared: &Arc<Shared>,
    client_id: usize,
    rng: &mut fastrand::Rng,
    step: u64,
    action: Action,
    vm: Option<&Value>,
    hosts: &[Value],
) {
    let uuid = vm.and_then(|v| v["uuid"].as_str()).unwrap_or_default().to_owned();
    let name = format!("c{client_id}-s{step}");
    match action {
        Action::CreateVm => {
            let body = create_body(shared, &name, &shared.infra.l3);
            submit(shared, client_id, action, None, "POST", "/v1/vm-instances", Some(&body));
        }
        Action::RepeatCreate => repeat_create(shared, client_id, &name),
        Action::CreateBurst => {
            let threads: Vec<_> = (0..4)
                .map(|i| {
                    let shared = shared.clone();
                    let name = format!("{name}-burst{i}");
                    std::thread::spawn(move || {
                        let body = create_body(&shared, &name, &shared.infra.tight_l3);
                        submit(
                            &shared,
                            client_id,
                            Action::CreateBurst,
                            None,
                            "POST",
                            "/v1/vm-instances",
                            Some(&body),
                        );
                    })
                })
                .collect();
            for thread in threads {
                let _ = thread.join();
            }
        }
        Action::StartVm
        | Action::StopVm
        | Action::RebootVm
        | Action::PauseVm
        | Action::ResumeVm
        | Action::MigrateVm
        | Action::RecoverVm
        | Action::ExpungeVm => {
            let body = client::body(&vm_action(action).expect("a VM operation"));
            let path = format!("/v1/vm-instances/{uuid}/actions");
            submit(shared, client_id, action, Some(uuid), "PUT", &path, Some(&body));
        }
        Action::DestroyVm => {
            let path = format!("/v1/vm-instances/{uuid}");
            submit(shared, client_id, action, Some(uuid), "DELETE", &path, None);
        }
        Action::ReconnectHost | Action::DisableHost | Action::EnableHost | Action::DeleteHost => {
            let host = &hosts[rng.usize(..hosts.len())];
            let host_uuid = host["uuid"].as_str().unwrap_or_default().to_owned();
            let path = format!("/v1/hosts/{host_uuid}/actions");
            let target = Some(host_uuid.clone());
            match action {
                Action::ReconnectHost => {
                    let body = client::body(&HostAction::ReconnectHost(NoParams {}));
                    submit(shared, client_id, action, target, "PUT", &path, Some(&body));
                }
                Action::DisableHost | Action::EnableHost => {
                    let state_event = if action == Action::DisableHost {
                        StateEvent::Disable
                    } else {
                        StateEvent::Enable
                    };
                    let body =
                        client::body(&HostAction::ChangeHostState(ChangeHostState { state_event }));
                    submit(shared, client_id, action, target, "PUT", &path, Some(&body));
                }
                _ => {
                    let index = shared
                        .infra
                        .host_addrs
                        .iter()
                        .position(|a| Some(a.port() as u64) == host["agentPort"].as_u64());
                    let path = format!("/v1/hosts/{host_uuid}?deleteMode=Enforcing");
                    let outcome = submit(shared, client_id, action, target, "DELETE", &path, None);
                    if let (Outcome::Succeeded(_), Some(index)) = (outcome, index) {
                        shared.deleted_hosts.lock().expect("deleted").push(index);
                    }
                }
            }
        }
        Action::AddHost => {
            let Some(index) = shared.deleted_hosts.lock().expect("deleted").pop() else { return };
            let addr = shared.infra.host_addrs[index];
            // An addition the MN died in may have left the host registered after all. One
            // machine is one host (its agent serves one MN session): not added twice.
            if hosts.iter().any(|h| h["agentPort"].as_u64() == Some(u64::from(addr.port()))) {
                return;
            }
            let body = client::body(&Create::new(HostParams {
                name: format!("host-{index}"),
                management_ip: addr.ip().to_string(),
                agent_port: addr.port(),
                cluster_uuid: id(&shared.infra.cluster),
            }));
            let outcome =
                submit(shared, client_id, action, None, "POST", "/v1/hosts/kvm", Some(&body));
            if !matches!(outcome, Outcome::Succeeded(_)) {
                shared.deleted_hosts.lock().expect("deleted").push(index);
            }
        }
        Action::CreateL3 => {
            let body = client::body(&Create::new(L3Params {
                name,
                l2_network_uuid: Some(id(&shared.infra.l2)),
                dns: vec![],
                bridge: None,
            }));
            if let Outcome::Succeeded(l3) =
                submit(shared, client_id, action, None, "POST", "/v1/l3-networks", Some(&body))
            {
                let l3 = l3["uuid"].as_str().unwrap_or_default().to_owned();
                let third = 100 + (step % 100);
                let net =
                    |host: u8| std::net::Ipv4Addr::new(10, client_id as u8, third as u8, host);
                let range = client::body(&Create::new(RangeParams {
                    start_ip: net(10),
                    end_ip: net(20),
                    netmask: std::net::Ipv4Addr::new(255, 255, 255, 0),
                    gateway: net(1),
                    name: None,
                }));
                let path = format!("/v1/l3-networks/{l3}/ip-ranges");
                submit(shared, client_id, action, Some(l3.clone()), "POST", &path, Some(&range));
                shared.extra_l3s.lock().expect("l3s").push(l3);
            }
        }
        Action::DeleteL3 => {
            let l3 = {
                let mut l3s = shared.extra_l3s.lock().expect("l3s");
                if l3s.is_empty() {
                    return;
                }
                let at = rng.usize(..l3s.len());
                l3s.remove(at)
            };
            let mode = if rng.bool() { "Permissive" } else { "Enforcing" };
            let path = format!("/v1/l3-networks/{l3}?deleteMode={mode}");
            let outcome =
                submit(shared, client_id, action, Some(l3.clone()), "DELETE", &path, None);
            if !matches!(outcome, Outcome::Succeeded(_)) {
                shared.extra_l3s.lock().expect("l3s").push(l3);
            }
        }
    }
}

/// VMs a storm acts on, and creations it sends, at most.
const STORM_VMS: usize = 16;
const STORM_CREATES: usize = 6;

/// A storm: creations, and an operation each state allows on many VMs (a second one on
/// some, so they collide on the VM, its host and the L3 network), all sent at once.
fn storm(
    shared: &Arc<Shared>,
    client_id: usize,
    rng: &mut fastrand::Rng,
    step: u64,
    vms: &[Value],
    hosts: &[Value],
) {
    let mut calls: Vec<(Action, Option<Value>)> =
        (0..STORM_CREATES).map(|_| (Action::CreateVm, None)).collect();
    for vm in vms.iter().take(STORM_VMS) {
        let allowed = Action::allowed_from(vm["state"].as_str().unwrap_or(""));
        if allowed.is_empty() {
            continue;
        }
        for _ in 0..if rng.bool() { 2 } else { 1 } {
            calls.push((allowed[rng.usize(..allowed.len())], Some(vm.clone())));
        }
    }
    let hosts = Arc::new(hosts.to_vec());
    let threads: Vec<_> = calls
        .into_iter()
        .enumerate()
        .map(|(i, (action, vm))| {
            let (shared, hosts) = (shared.clone(), hosts.clone());
            let seed = rng.u64(..);
            // Each call a step of its own, so the names it makes are unique.
            let step = step * 1000 + i as u64;
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed);
                act(&shared, client_id, &mut rng, step, action, vm.as_ref(), &hosts);
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

/// A creation sent twice with the same `X-Job-UUID` and body: both answers must name one job.
fn repeat_create(shared: &Shared, client_id: usize, name: &str) {
    let job = uuid::Uuid::new_v4().to_string();
    let body = create_body(shared, name, &shared.infra.l3);
    let seq = shared.history.open(client_id, Action::RepeatCreate, None, shared.now());
    let mut locations = Vec::new();
    for _ in 0..2 {
        if let Ok((202, reply)) = client::request_with_headers(
            shared.api,
            "POST",
            "/v1/vm-instances",
            Some(&body),
            &[("X-Job-UUID", &job)],
        ) {
            locations.push(reply["location"].as_str().unwrap_or_default().to_owned());
        }
    }
    let outcome = match locations.first() {
        Some(location) => {
            shared.history.set_job(seq, job.clone());
            follow(shared.api, location, JOB_LIMIT)
        }
        None => Outcome::Unreachable,
    };
    shared.history.repeats.lock().expect("repeats").push((job, locations));
    shared.history.close(seq, outcome, shared.now());
}

/// Moves the run's EIP every few seconds to a random VM of the main network (detached
/// first), and adds a random NIC of that network to the run's security group or takes one
/// out, until the run stops: where the VIP lives and which addresses the group's rules name
/// follow the VMs under the faults, and the checks find the VIP in exactly one place and each
/// host's rules equal what the store renders. These calls are not the workload's (they are
/// not in the history); a refusal (the VM went meanwhile) is as good as a success.
pub fn network_mover(shared: Arc<Shared>, seed: u64) {
    use strato_api::types::actions::{EipAction, NoParams, OnVmNic, SecurityGroupAction, VmNics};
    if shared.infra.eip.is_none() && shared.infra.security_group.is_none() {
        return;
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let act = |path: &str, body: Value| {
        if let Ok((202, reply)) = client::request(shared.api, "PUT", path, Some(&body)) {
            follow(shared.api, reply["location"].as_str().unwrap_or_default(), JOB_LIMIT);
        }
    };
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.u64(1500..4000)));
        let Some(vms) = list(shared.api, "vm-instances", Duration::from_secs(5)) else { continue };
        let nics: Vec<Uuid> = vms
            .iter()
            .filter(|vm| vm["state"] != "Destroyed")
            .flat_map(|vm| vm["vmNics"].as_array().cloned().unwrap_or_default())
            .filter(|nic| nic["l3NetworkUuid"] == shared.infra.l3.as_str())
            .filter_map(|nic| canonical_uuid(nic["uuid"].as_str()?))
            .collect();
        if let Some(eip) = &shared.infra.eip {
            let path = format!("/v1/eips/{eip}/actions");
            act(&path, client::body(&EipAction::DetachEip(NoParams {})));
            if !nics.is_empty() {
                let vm_nic_uuid = nics[rng.usize(..nics.len())];
                act(&path, client::body(&EipAction::AttachEip(OnVmNic { vm_nic_uuid })));
            }
        }
        if let (Some(group), false) = (&shared.infra.security_group, nics.is_empty()) {
            let vm_nics = VmNics { vm_nic_uuids: vec![nics[rng.usize(..nics.len())].to_string()] };
            let action = if rng.bool() {
                SecurityGroupAction::AddVmNicToSecurityGroup(vm_nics)
            } else {
                SecurityGroupAction::DeleteVmNicFromSecurityGroup(vm_nics)
            };
            act(&format!("/v1/security-groups/{group}/actions"), client::body(&action));
        }
    }
}

/// Keeps changing data volumes while the run lasts: makes a few, attaches and detaches them
/// to random VMs, snapshots them (and VMs' root volumes), reverts and deletes snapshots, moves detached ones to
/// other hosts, deletes and expunges volumes. The volumes' files are real qcow2 files (the sim agents run `qemu-img`), so the
/// checks find after healing that every file belongs to a record, each volume's chain on
/// disk is its snapshots', and no volume is on two domains. Like [`network_mover`]'s, its
/// calls are not the workload's history; a refusal is as good as a success.
pub fn storage_mover(shared: Arc<Shared>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5707_a6e5);
    let api = shared.api;
    let seen = |volume: &Value| {
        if let (Some(id), Some(host)) = (volume["uuid"].as_str(), volume["hostUuid"].as_str()) {
            shared
                .volume_hosts
                .lock()
                .expect("volume hosts")
                .insert(id.to_owned(), host.to_owned());
        }
    };
    let call = |method: &str, path: &str, body: Option<Value>| {
        if let Ok((202, reply)) = client::request(api, method, path, body.as_ref())
            && let Outcome::Succeeded(inventory) =
                follow(api, reply["location"].as_str().unwrap_or_default(), JOB_LIMIT)
        {
            seen(&inventory);
        }
    };
    let pick = |rng: &mut fastrand::Rng, items: &[Value]| -> Option<String> {
        (!items.is_empty()).then(|| {
            items[rng.usize(..items.len())]["uuid"].as_str().unwrap_or_default().to_owned()
        })
    };
    let mut made = 0u32;
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.u64(400..1200)));
        let (Some(volumes), Some(snapshots), Some(vms)) = (
            list(api, "volumes", Duration::from_secs(5)),
            list(api, "volume-snapshots", Duration::from_secs(5)),
            list(api, "vm-instances", Duration::from_secs(5)),
        ) else {
            continue;
        };
        // Root volumes go with their VMs: this thread moves data volumes, and snapshots
        // both (the snapshot deletions and reverts below pick among all snapshots).
        let roots: Vec<Value> = volumes
            .iter()
            .filter(|v| v["type"] == "Root" && v["status"] == "Ready")
            .cloned()
            .collect();
        let volumes: Vec<Value> = volumes.into_iter().filter(|v| v["type"] == "Data").collect();
        volumes.iter().for_each(seen);
        let vms: Vec<Value> = vms.into_iter().filter(|vm| vm["state"] != "Destroyed").collect();
        let live: Vec<Value> =
            volumes.iter().filter(|v| v["status"] != "Deleted").cloned().collect();
        match rng.u32(0..12) {
            11 => {
                let Some(root) = pick(&mut rng, &roots) else { continue };
                let body = json!({ "params": { "name": "chaos-root-snapshot" } });
                call("POST", &format!("/v1/volumes/{root}/volume-snapshots"), Some(body));
            }
            0 | 1 if live.len() < 6 => {
                made += 1;
                let body = json!({ "params": { "name": format!("chaos-volume-{made}"), "diskSize": 16u64 << 20 } });
                call("POST", "/v1/volumes/data", Some(body));
            }
            2 | 3 => {
                let (Some(volume), Some(vm)) = (pick(&mut rng, &live), pick(&mut rng, &vms)) else {
                    continue;
                };
                let body = json!({ "attachDataVolumeToVm": { "vmInstanceUuid": vm } });
                call("PUT", &format!("/v1/volumes/{volume}/actions"), Some(body));
            }
            4 => {
                let attached: Vec<Value> =
                    live.iter().filter(|v| !v["vmInstanceUuid"].is_null()).cloned().collect();
                let Some(volume) = pick(&mut rng, &attached) else { continue };
                call(
                    "PUT",
                    &format!("/v1/volumes/{volume}/actions"),
                    Some(json!({ "detachDataVolumeFromVm": {} })),
                );
            }
            5 | 6 => {
                let ready: Vec<Value> =
                    live.iter().filter(|v| v["status"] == "Ready").cloned().collect();
                let Some(volume) = pick(&mut rng, &ready) else { continue };
                let body = json!({ "params": { "name": "chaos-snapshot" } });
                call("POST", &format!("/v1/volumes/{volume}/volume-snapshots"), Some(body));
            }
            7 => {
                let Some(snapshot) = pick(&mut rng, &snapshots) else { continue };
                call("DELETE", &format!("/v1/volume-snapshots/{snapshot}"), None);
            }
            8 => {
                let Some(snapshot) = pick(&mut rng, &snapshots) else { continue };
                let body = json!({ "revertVolumeFromSnapshot": {} });
                call("PUT", &format!("/v1/volume-snapshots/{snapshot}/actions"), Some(body));
            }
            9 => {
                // Moved to another host (here every host sees one directory: the move finds
                // the files already there and changes only the records).
                let ready: Vec<Value> =
                    live.iter().filter(|v| v["status"] == "Ready").cloned().collect();
                let Some(volume) = pick(&mut rng, &ready) else { continue };
                let detach = json!({ "detachDataVolumeFromVm": {} });
                call("PUT", &format!("/v1/volumes/{volume}/actions"), Some(detach));
                let targets = format!("/v1/volumes/{volume}/migration-target-hosts");
                let Some(hosts) = get(api, &targets, Duration::from_secs(5))
                    .and_then(|body| body["inventories"].as_array().cloned())
                else {
                    continue;
                };
                let Some(host) = pick(&mut rng, &hosts) else { continue };
                let body = json!({ "localStorageMigrateVolume": { "destHostUuid": host } });
                call("PUT", &format!("/v1/volumes/{volume}/actions"), Some(body));
            }
            _ => {
                let Some(volume) = pick(&mut rng, &live) else { continue };
                call("DELETE", &format!("/v1/volumes/{volume}"), None);
                call(
                    "PUT",
                    &format!("/v1/volumes/{volume}/actions"),
                    Some(json!({ "expungeDataVolume": {} })),
                );
            }
        }
    }
}
