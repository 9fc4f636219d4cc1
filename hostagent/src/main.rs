//! `strato-agent`: serves one host (libvirt) or many simulated hosts (sim) to the MN.
//!
//! ```text
//! strato-agent --listen 127.0.0.1:7070 --driver libvirt --libvirt-uri test:///default \
//!              --bootstrap-file FILE --data-dir DIR
//! strato-agent --driver sim --sim-hosts 1000 --listen-base 127.0.0.1:20000 \
//!              --bootstrap-file FILE --data-dir DIR
//! ```
//!
//! The bootstrap file (from `strato agent-bootstrap` on the MN) is needed until the agent has
//! enrolled; an agent of several simulated hosts needs a file with one secret per host
//! (`--hosts N`). Secrets are read from the file only: never from the command line or the
//! environment, where other local users could read them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use strato_agent::credentials::Credentials;
use strato_agent::driver::Driver;
use strato_agent::driver::libvirt::Libvirt;
use strato_agent::driver::sim::{Sim, SimConfig};
use strato_agent::net::host::{HostNet, Scope};
use strato_agent::net::{Network, SimNet};
use strato_agent::server::Agent;
use strato_proto::pki::{Bootstrap, BootstrapSecret};
use strato_proto::tls::{AgentIdentity, private_dir};
use tokio::net::TcpListener;

/// Who makes the host's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum NetworkKind {
    /// The host's own tools (iproute2, nftables, dnsmasq), run as root.
    Host,
    /// Nothing on the machine: the desired state is kept and reported (simulated hosts).
    Sim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MounterKind {
    Nfs4,
    Bind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DriverKind {
    Libvirt,
    Sim,
    /// No hypervisor: the host serves backup storage (an ImageStore) and runs no VMs.
    None,
}

/// The Strato host agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where to listen for the MN (one host).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The hypervisor driver (`none` on a backup storage host, which runs no VMs).
    #[arg(long, value_enum, default_value = "libvirt")]
    driver: DriverKind,
    /// libvirt's URI (`qemu:///system` on a real host, `test:///default` for tests).
    #[arg(long, default_value = "qemu:///system")]
    libvirt_uri: String,
    /// The bootstrap file from `strato agent-bootstrap` (needed until the agent enrolled):
    /// the MN's CA and a one-time secret per host.
    #[arg(long)]
    bootstrap_file: Option<PathBuf>,
    /// Who makes the host's network: `host` (the default with libvirt) or `sim` (the
    /// default with the sim driver, and the only choice with several simulated hosts).
    #[arg(long, value_enum)]
    network: Option<NetworkKind>,
    /// Manage this network namespace as the host's network instead of the agent's own
    /// (tests build several hosts on one machine this way).
    #[arg(long)]
    netns: Option<String>,
    /// The prefix of the namespaces the agent makes; agents sharing a machine need
    /// distinct ones.
    #[arg(long, default_value = "strato-net-")]
    netns_prefix: String,
    /// Where the agent keeps its state, its key and its certificate (made mode 0700).
    #[arg(long, default_value = "strato-agent-data")]
    data_dir: PathBuf,
    /// Simulated hosts served by this process (sim driver).
    #[arg(long, default_value_t = 1)]
    sim_hosts: u32,
    /// With several simulated hosts: host i listens on this port + i.
    #[arg(long)]
    listen_base: Option<SocketAddr>,
    /// Latency added to every simulated driver call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    sim_latency_ms: u64,
    /// Make a simulated command fail with a probability: `start-domain=0.5` (repeatable).
    #[arg(long, value_parser = parse_failure)]
    sim_fail: Vec<(String, f64)>,
    /// Treat this start as a host reboot: power every simulated domain off.
    #[arg(long)]
    sim_reset: bool,
    /// CPUs of each simulated host.
    #[arg(long, default_value_t = 32)]
    sim_cpus: u32,
    /// Memory of each simulated host, in MiB.
    #[arg(long, default_value_t = 131_072)]
    sim_memory_mib: u64,
    /// How shared (NFS) primary storage is mounted: `nfs4` (the kernel's client) or `bind`
    /// (the export's path bind-mounted from this machine: for tests without an NFS client).
    #[arg(long, value_enum, default_value = "nfs4")]
    nfs_mounter: MounterKind,
    /// Append every executed command to `journal.jsonl` in each host's data directory (for
    /// the chaos runs' checks).
    #[arg(long)]
    journal: bool,
}

/// The bootstrap file, read when a host first needs it: an enrolled agent needs none, and
/// its spent file may be gone.
struct BootstrapFile {
    path: Option<PathBuf>,
    read: Option<Bootstrap>,
}

impl BootstrapFile {
    /// The secret for host `index`, if a file was given.
    fn secret(&mut self, index: usize, hosts: u32) -> Result<Option<BootstrapSecret>, String> {
        let Some(path) = &self.path else { return Ok(None) };
        if self.read.is_none() {
            self.read = Some(Bootstrap::read(path).map_err(|e| error_chain(&e))?);
        }
        let secret = self.read.as_ref().and_then(|b| b.secret(index));
        match secret {
            Some(secret) => Ok(Some(secret)),
            None => Err(format!(
                "{} holds no secret for host {index}: make one with `strato agent-bootstrap --hosts {hosts}`",
                path.display()
            )),
        }
    }
}

/// An agent for host `index`, with its credentials in `dir` (or, before it enrolled, its
/// secret from `bootstrap`), journaled into `dir` when asked.
/// The host's network for the agent of `dir`.
fn network(args: &Args, kind: NetworkKind, dir: &std::path::Path) -> Arc<dyn Network> {
    match kind {
        NetworkKind::Sim => Arc::new(SimNet::default()),
        NetworkKind::Host => Arc::new(HostNet::new(
            Scope { netns: args.netns.clone(), prefix: args.netns_prefix.clone() },
            dir.join("net"),
        )),
    }
}

fn agent(
    args: &Args,
    index: usize,
    label: &str,
    bootstrap: &mut BootstrapFile,
    driver: Arc<dyn Driver>,
    network: Arc<dyn Network>,
    dir: &std::path::Path,
) -> Result<Arc<Agent>, String> {
    let secret = if AgentIdentity::is_enrolled(dir) {
        if bootstrap.path.is_some() {
            tracing::info!(
                host = label,
                "enrolled already: --bootstrap-file is not needed (its secret is spent), and the file can be deleted"
            );
        }
        None
    } else {
        bootstrap.secret(index, args.sim_hosts)?
    };
    let credentials = Credentials::open(dir, secret).map_err(|e| error_chain(&e))?;
    let agent = if args.journal {
        let path = dir.join("journal.jsonl");
        Agent::journaled(label, credentials, driver, network, &path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?
    } else {
        Agent::new(label, credentials, driver, network)
    };
    let mounter: Arc<dyn strato_agent::mount::Mounter> = match args.nfs_mounter {
        MounterKind::Nfs4 => Arc::new(strato_agent::mount::Nfs4),
        MounterKind::Bind => Arc::new(strato_agent::mount::Bind),
    };
    Ok(agent.with_mounter(mounter))
}

/// An error with its causes, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn parse_failure(text: &str) -> Result<(String, f64), String> {
    let (command, p) = text.split_once('=').ok_or("expected COMMAND=PROBABILITY")?;
    let p: f64 = p.parse().map_err(|_| format!("`{p}` is not a probability"))?;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("{p} is not between 0 and 1"));
    }
    Ok((command.to_owned(), p))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; plain text for a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("strato-agent: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut bootstrap = BootstrapFile { path: args.bootstrap_file.clone(), read: None };
    // The data directory holds the agent's key: its owner alone reads it.
    private_dir(&args.data_dir).map_err(|e| error_chain(&e))?;
    let mut tasks = Vec::new();
    match args.driver {
        DriverKind::Libvirt => {
            // Guests' serial consoles are logged beside the agent's other state; libvirt
            // wants an absolute path.
            let serial_logs = std::path::absolute(args.data_dir.join("serial"))
                .map_err(|e| format!("cannot resolve {}: {e}", args.data_dir.display()))?;
            std::fs::create_dir_all(&serial_logs)
                .map_err(|e| format!("cannot create {}: {e}", serial_logs.display()))?;
            let driver: Arc<dyn Driver> = Arc::new(
                Libvirt::open_with_serial_logs(&args.libvirt_uri, serial_logs)
                    .map_err(|e| e.to_string())?,
            );
            let listener = TcpListener::bind(args.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
            tracing::info!(listen = %args.listen, uri = %args.libvirt_uri, "agent ready");
            println!("strato-agent: listening on {} (libvirt {})", args.listen, args.libvirt_uri);
            let net = network(&args, args.network.unwrap_or(NetworkKind::Host), &args.data_dir);
            let agent = agent(&args, 0, "libvirt", &mut bootstrap, driver, net, &args.data_dir)?;
            tasks.push(tokio::spawn(agent.serve(listener)));
        }
        DriverKind::Sim => {
            // `--listen-base` wins whatever the count (one simulated host given a base
            // listened on `--listen` instead, and its caller waited for nothing).
            let base = args.listen_base.unwrap_or(args.listen);
            let failures: HashMap<String, f64> = args.sim_fail.iter().cloned().collect();
            let net_kind = args.network.unwrap_or(NetworkKind::Sim);
            if net_kind == NetworkKind::Host && args.sim_hosts > 1 {
                return Err("--network host manages one host: use it with --sim-hosts 1".into());
            }
            for i in 0..args.sim_hosts {
                let addr = SocketAddr::new(base.ip(), base.port() + i as u16);
                let dir = if args.sim_hosts > 1 {
                    args.data_dir.join(format!("host-{i}"))
                } else {
                    args.data_dir.clone()
                };
                private_dir(&dir).map_err(|e| error_chain(&e))?;
                let sim = Sim::open(SimConfig {
                    hostname: format!("sim-{i}"),
                    cpus: args.sim_cpus,
                    memory_mib: args.sim_memory_mib,
                    latency: Duration::from_millis(args.sim_latency_ms),
                    failures: failures.clone(),
                    state_file: dir.join("sim-domains.json"),
                    reset: args.sim_reset,
                })
                .map_err(|e| format!("cannot open simulated host {i}: {e}"))?;
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                let label = format!("sim-{i}");
                let net = network(&args, net_kind, &dir);
                let agent =
                    agent(&args, i as usize, &label, &mut bootstrap, Arc::new(sim), net, &dir)?;
                tasks.push(tokio::spawn(agent.serve(listener)));
            }
            tracing::info!(hosts = args.sim_hosts, base = %base, "simulated agent ready");
            println!("strato-agent: {} simulated host(s) from {base}", args.sim_hosts);
        }
        DriverKind::None => {
            let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_owned())
                .unwrap_or_else(|_| "backup-storage".into());
            let driver = Arc::new(strato_agent::driver::none::NoHypervisor::new(hostname));
            let listener = TcpListener::bind(args.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
            tracing::info!(listen = %args.listen, "agent ready, serving files only");
            println!("strato-agent: listening on {} (no hypervisor: backup storage)", args.listen);
            let net = Arc::new(SimNet::default());
            let agent = agent(&args, 0, "storage", &mut bootstrap, driver, net, &args.data_dir)?;
            tasks.push(tokio::spawn(agent.serve(listener)));
        }
    }
    tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    for task in tasks {
        task.abort();
    }
    Ok(())
}
