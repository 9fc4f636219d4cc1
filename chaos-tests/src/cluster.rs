//! The cluster under test: the real `strato` server and one real `strato-agent` process per
//! host (sim driver), each with its own data directory, each behind a [`FaultProxy`].
//!
//! Run as root with iproute2, each agent lives in its own network namespace with its own
//! address (10.N.i.2, reached over a veth pair from 10.N.i.1), so a partition is real:
//! the host's link goes down, and TCP stalls as it would on a cut cable. Otherwise the agents
//! listen on loopback and the proxy holds frames back to play the partition. The proxy also
//! drops, duplicates and delays frames, which the kernel cannot do here (no `sch_netem`).
//!
//! With namespaces, each agent also makes its host's network for real (`--network host`):
//! the L2 network's bridge on an `eth0` of its namespace, a DHCP namespace with dnsmasq per
//! L3 network with the Flat DHCP, the nft tables; the checks compare them with the store.
//!
//! It can kill any of them with SIGKILL and start them again, with injected faults switched
//! on (failpoints in the MN, slow or failing driver calls in an agent) or off. It also reads
//! what each agent's hypervisor runs from the sim driver's state on the host, as an operator
//! would look at the host with `virsh list` (the agent admits one MN session at a time, so
//! the harness cannot dial it beside the MN).
//!
//! Each agent enrolls with the MN as a real host's does: the cluster mints a bootstrap file
//! for it (`strato agent-bootstrap`) before its first start; later starts use the certificate
//! it enrolled with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strato_agent::driver::sim::Sim;
use strato_proto::DomainInfo;
use strato_proto::tls::AgentIdentity;

use crate::Error;
use crate::proxy::FaultProxy;

/// One agent process and its proxy.
#[derive(Debug)]
struct AgentSlot {
    addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
    proxy: FaultProxy,
    netns: Option<Netns>,
}

/// An agent's own network namespace, with a veth pair to the root namespace.
#[derive(Debug)]
struct Netns {
    name: String,
    /// The root namespace's end of the veth pair: down is a partition.
    veth: String,
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())
            .into())
    }
}

impl Netns {
    /// Namespace `i` of this process, with the agent's address 10.N.`i`.2 (N from the
    /// process id).
    fn create(i: usize) -> Result<(Netns, SocketAddr), Error> {
        let tag = std::process::id() % 100_000;
        let name = format!("strato-chaos-{tag}-{i}");
        let veth = format!("sc{tag}h{i}");
        let inner = format!("sc{tag}n{i}");
        // A subnet per run, so runs side by side do not share addresses.
        let net = 100 + tag % 100;
        let (outer_ip, inner_ip) = (format!("10.{net}.{i}.1"), format!("10.{net}.{i}.2"));
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let made = Netns { name: name.clone(), veth: veth.clone() };
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &inner])?;
        ip(&["link", "set", &inner, "netns", &name])?;
        ip(&["addr", "add", &format!("{outer_ip}/30"), "dev", &veth])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&["-n", &name, "addr", "add", &format!("{inner_ip}/30"), "dev", &inner])?;
        ip(&["-n", &name, "link", "set", &inner, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        // The L2 network's interface (`eth0`): one end of a veth pair, so the host's bridge
        // has an uplink that leads nowhere beyond the namespace.
        ip(&["-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])?;
        ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        ip(&["-n", &name, "link", "set", "eth0p", "up"])?;
        Ok((made, format!("{inner_ip}:7070").parse()?))
    }

    /// The prefix of what the agent of namespace `i` makes (its namespaces), distinct per
    /// run and agent, and apart from the agents' own namespaces' names.
    fn prefix(i: usize) -> String {
        format!("sc{}-{i}-", std::process::id() % 100_000)
    }

    fn cut(&self, cut: bool) -> Result<(), Error> {
        ip(&["link", "set", &self.veth, if cut { "down" } else { "up" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // What the agent made goes first (it was killed): its namespaces, with the dnsmasq
        // processes in them. Deleting the agent's namespace deletes its veth pairs.
        if let Some(i) = self.name.rsplit('-').next().and_then(|i| i.parse().ok()) {
            for made in crate::hostnet::namespaces(&Netns::prefix(i)).unwrap_or_default() {
                for pid in crate::hostnet::pids(&made).unwrap_or_default() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
                }
                let _ = ip(&["netns", "del", &made]);
            }
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Whether agents can get namespaces of their own here: root, with iproute2.
fn namespaces_available() -> bool {
    let tag = format!("strato-chaos-probe-{}", std::process::id());
    let made = ip(&["netns", "add", &tag]).is_ok();
    if made {
        let _ = ip(&["netns", "del", &tag]);
    }
    made
}

/// The processes of one run.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    strato: PathBuf,
    agent_binary: PathBuf,
    api: SocketAddr,
    mn: Option<Child>,
    agents: Vec<AgentSlot>,
    /// The runtime the fault proxies run on, alive as long as the cluster.
    _proxies: tokio::runtime::Runtime,
}

/// How to read what one host's hypervisor runs, without holding the cluster.
#[derive(Debug)]
pub struct HypervisorView {
    state_file: PathBuf,
    agent_up: bool,
}

impl HypervisorView {
    /// What the hypervisor runs, from its state on the host; an error while its agent is
    /// down (what the MN could learn of the host then is nothing).
    pub fn domains(&self) -> Result<Vec<DomainInfo>, Error> {
        if !self.agent_up {
            return Err("the host's agent is down".into());
        }
        Ok(Sim::domains_in(&self.state_file)?)
    }

    /// The disks of each domain: (volume, file), by domain UUID.
    pub fn disks(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, Error> {
        if !self.agent_up {
            return Err("the host's agent is down".into());
        }
        Ok(Sim::disks_in(&self.state_file)?
            .into_iter()
            .map(|(domain, disks)| {
                let disks = disks.into_iter().map(|d| (d.volume.to_string(), d.path)).collect();
                (domain.to_string(), disks)
            })
            .collect())
    }
}

/// Writes a bootstrap file with `hosts` secrets to `out`, minted by `strato` (the binary) in
/// the MN's data directory `data_dir`.
pub(crate) fn bootstrap(
    strato: &Path,
    data_dir: &Path,
    out: &Path,
    hosts: usize,
) -> Result<(), Error> {
    let made = Command::new(strato)
        .arg("agent-bootstrap")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--out")
        .arg(out)
        .args(["--hosts", &hosts.to_string()])
        .output()?;
    if !made.status.success() {
        return Err(format!(
            "strato agent-bootstrap failed: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// Each simulated host's size: small, so capacity runs out under the workload.
/// The admin password the chaos runs' MN starts with.
pub(crate) const ADMIN_PASSWORD: &str = "chaos-admin-password";

const HOST_CPUS: &str = "4";
const HOST_MEMORY_MIB: &str = "4096";

/// A free port on loopback.
pub(crate) fn free_port() -> Result<SocketAddr, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A binary beside this one.
pub fn sibling(name: &str) -> Result<PathBuf, Error> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        return Err(format!(
            "{} is missing: build the workspace's binaries (`cargo build --workspace --bins`)",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// Waits until something listens on `addr`, failing if `child` (meant to listen) exits.
pub(crate) fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<(), Error> {
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait()? {
            return Err(format!("a process meant to listen on {addr} exited: {status}").into());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("nothing listens on {addr}").into());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

fn log_file(path: &Path) -> Result<Stdio, Error> {
    Ok(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path)?))
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
}

impl Cluster {
    /// Starts the MN and `hosts` agents in `dir`; `seed` seeds the proxies. With
    /// `namespaces`, each agent gets its own network namespace when this machine allows it.
    pub fn start(dir: &Path, hosts: usize, seed: u64, namespaces: bool) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let strato = sibling("strato")?;
        let agent_binary = sibling("strato-agent")?;
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let isolated = namespaces && namespaces_available();
        let mut agents = Vec::with_capacity(hosts);
        for i in 0..hosts {
            let (netns, addr) = if isolated {
                let (netns, addr) = Netns::create(i)?;
                (Some(netns), addr)
            } else {
                (None, free_port()?)
            };
            let proxy = runtime.block_on(FaultProxy::start(addr, seed ^ (i as u64 + 1)))?;
            let agent_dir = dir.join(format!("agent-{i}"));
            std::fs::create_dir_all(&agent_dir)?;
            bootstrap(&strato, &dir.join("mn"), &agent_dir.join("bootstrap"), 1)?;
            agents.push(AgentSlot { addr, dir: agent_dir, child: None, proxy, netns });
        }
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            strato,
            agent_binary,
            api: free_port()?,
            mn: None,
            agents,
            _proxies: runtime,
        };
        for i in 0..hosts {
            cluster.start_agent(i, &[])?;
        }
        cluster.start_mn(None)?;
        Ok(cluster)
    }

    /// The API's address.
    pub fn api(&self) -> SocketAddr {
        self.api
    }

    /// How many hosts.
    /// The cluster's directory (the MN's and the agents' data, and the run's primary
    /// storage).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hosts(&self) -> usize {
        self.agents.len()
    }

    /// The address the MN dials for host `i` (its proxy).
    pub fn host_addr(&self, i: usize) -> SocketAddr {
        self.agents[i].proxy.addr()
    }

    /// Host `i`'s proxy.
    pub fn proxy(&self, i: usize) -> &FaultProxy {
        &self.agents[i].proxy
    }

    /// Whether the agents live in network namespaces of their own.
    pub fn isolated(&self) -> bool {
        self.agents.iter().all(|a| a.netns.is_some())
    }

    /// Cuts (`true`) or heals host `i`'s network: its link goes down in its namespace, or,
    /// without namespaces, its proxy holds every frame back.
    pub fn partition(&self, i: usize, cut: bool) -> Result<(), Error> {
        match &self.agents[i].netns {
            Some(netns) => netns.cut(cut),
            None => {
                self.agents[i].proxy.partition(cut);
                Ok(())
            }
        }
    }

    /// Host `i`'s network, when its agent makes one for real: the namespace the agent runs
    /// in, and the prefix of the namespaces it makes.
    pub fn host_network(&self, i: usize) -> Option<(String, String)> {
        self.agents[i].netns.as_ref().map(|n| (n.name.clone(), Netns::prefix(i)))
    }

    /// Host `i`'s data directory (its command journal is `journal.jsonl` there).
    pub fn agent_dir(&self, i: usize) -> &Path {
        &self.agents[i].dir
    }

    /// Starts the MN, with `failpoints` armed (`STRATO_FAILPOINTS`) if given.
    pub fn start_mn(&mut self, failpoints: Option<&str>) -> Result<(), Error> {
        kill(&mut self.mn);
        let mut command = Command::new(&self.strato);
        command
            .args(["server", "--listen", &self.api.to_string(), "--data-dir"])
            .arg(self.dir.join("mn"))
            .env("RUST_LOG", "info,sled=warn")
            .env("STRATO_ADMIN_PASSWORD", ADMIN_PASSWORD)
            // The run's image is imported from its directory.
            .env("STRATO_IMAGE_FILE_DIRS", self.dir.join("images"))
            .env_remove("STRATO_FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join("mn.log"))?);
        if let Some(spec) = failpoints {
            command.env("STRATO_FAILPOINTS", spec);
        }
        let mut child = command.spawn()?;
        wait_listening(self.api, &mut child)?;
        self.mn = Some(child);
        // Every request of this process to the API carries the admin's session from here on.
        strato_api::client::log_in(self.api, "admin", ADMIN_PASSWORD)?;
        Ok(())
    }

    /// Kills the MN with SIGKILL.
    pub fn kill_mn(&mut self) {
        kill(&mut self.mn);
    }

    /// Starts agent `i` with `extra` arguments (`--sim-latency-ms`, `--sim-fail`).
    pub fn start_agent(&mut self, i: usize, extra: &[String]) -> Result<(), Error> {
        let slot = &mut self.agents[i];
        kill(&mut slot.child);
        let mut command = match &slot.netns {
            // `nsenter` enters the namespace and executes the agent in place (same process,
            // so SIGKILL reaches the agent itself). Not `ip netns exec`: it gives the agent a
            // mount namespace of its own, where the namespaces the agent makes would be
            // mounted for it alone (and unusable by its next start).
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{}", netns.name)).arg(&self.agent_binary);
                command
            }
            None => Command::new(&self.agent_binary),
        };
        if slot.netns.is_some() {
            // The agent makes the host's network for real, in its own namespace.
            command.args(["--network", "host", "--netns-prefix", &Netns::prefix(i)]);
        }
        if !AgentIdentity::is_enrolled(&slot.dir) {
            command.arg("--bootstrap-file").arg(slot.dir.join("bootstrap"));
        }
        let mut child = command
            .args(["--driver", "sim", "--listen", &slot.addr.to_string()])
            .args(["--sim-cpus", HOST_CPUS, "--sim-memory-mib", HOST_MEMORY_MIB, "--journal"])
            .arg("--data-dir")
            .arg(&slot.dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file(&slot.dir.join("agent.log"))?)
            .spawn()?;
        wait_listening(slot.addr, &mut child)?;
        slot.child = Some(child);
        Ok(())
    }

    /// Kills agent `i` with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        kill(&mut self.agents[i].child);
    }

    /// How to read what host `i`'s hypervisor runs.
    pub fn hypervisor(&self, i: usize) -> HypervisorView {
        let slot = &self.agents[i];
        HypervisorView {
            state_file: slot.dir.join("sim-domains.json"),
            agent_up: slot.child.is_some(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill(&mut self.mn);
        for slot in &mut self.agents {
            kill(&mut slot.child);
        }
    }
}
