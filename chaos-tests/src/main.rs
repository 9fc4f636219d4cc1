//! `strato-chaos`: load runs and seeded chaos runs against real processes.

use std::time::Duration;

use clap::{Parser, Subcommand};
use strato_chaos::load::{self, LoadConfig};
use strato_chaos::peer::{self, PeerConfig};
use strato_chaos::run::{self, RunConfig};
use strato_chaos::workload::Strategy;

/// Strato's load and chaos runs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Creates many VMs on many simulated hosts through the API and prints the figures.
    Load {
        /// Simulated hosts (one agent process serves them all).
        #[arg(long, default_value_t = 1000)]
        sim_hosts: u32,
        /// VMs to create.
        #[arg(long, default_value_t = 10_000)]
        vms: u32,
        /// Concurrent API clients.
        #[arg(long, default_value_t = 256)]
        concurrency: u32,
        /// Latency of every simulated driver call, in milliseconds.
        #[arg(long, default_value_t = 0)]
        sim_latency_ms: u64,
    },
    /// N snapshots of one data volume, then their deletions (each merged into the
    /// volume's top), on a simulated host with real qcow2 files: each phase's latencies.
    SnapshotBench {
        /// Snapshots to take.
        #[arg(short = 'n', long, default_value_t = 100)]
        snapshots: u32,
    },
    /// A data volume hot-plugged into a live guest on `qemu:///system` and unplugged, N
    /// times: each call's latency to its job's end and to the guest's console seeing it.
    AttachBench {
        /// The tryout image (`scripts/real-guest` builds it and prints its path).
        #[arg(long)]
        image: std::path::PathBuf,
        /// Detach/attach cycles after the first attachment.
        #[arg(short = 'n', long, default_value_t = 20)]
        cycles: u32,
    },
    /// The workload Rally runs on Nova's fake driver: boot, wait, list, delete (direct);
    /// exits 1 when any call failed.
    PeerWorkload {
        /// Simulated hosts.
        #[arg(short = 'm', long, default_value_t = 10)]
        hosts: u32,
        /// VMs to boot.
        #[arg(short = 'n', long, default_value_t = 100)]
        vms: u32,
        /// Concurrent clients.
        #[arg(short = 'c', long, default_value_t = 10)]
        concurrency: u32,
    },
    /// A seeded chaos run: workload, faults, invariant checks; exits 1 on a violation.
    Run {
        /// The seed (random when not given; the report prints it).
        #[arg(long)]
        seed: Option<u64>,
        /// How long the workload and faults run: `90s`, `30m`, `2h`.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        /// Simulated hosts, one agent process each.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Concurrent API clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// How clients choose among legal actions.
        #[arg(long, value_enum, default_value = "weighted")]
        strategy: Strategy,
        /// Run the workload without faults.
        #[arg(long)]
        no_faults: bool,
        /// Fire storms: many conflicting and independent operations at once.
        #[arg(long)]
        storm: bool,
        /// Keep every agent on loopback even where network namespaces are available.
        #[arg(long)]
        no_netns: bool,
        /// Keep the run's directory (logs, stores, journals) instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) =
        text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 =
        number.parse().map_err(|_| format!("`{text}` is not a duration like 90s or 30m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{text}`: the unit must be s, m or h")),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Load { sim_hosts, vms, concurrency, sim_latency_ms } => {
            let dir = std::env::temp_dir().join(format!("strato-load-{}", std::process::id()));
            let config = LoadConfig { sim_hosts, vms, concurrency, sim_latency_ms };
            let result = load::run(&config, &dir);
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        Cmd::SnapshotBench { snapshots } => {
            let dir = std::env::temp_dir().join(format!("strato-snapshots-{}", std::process::id()));
            let result = strato_chaos::snapshots::run(&dir, snapshots);
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        Cmd::AttachBench { image, cycles } => {
            let dir = std::env::temp_dir().join(format!("strato-attach-{}", std::process::id()));
            let result = strato_chaos::attach::run(&dir, &image, cycles);
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        Cmd::PeerWorkload { hosts, vms, concurrency } => {
            let dir = std::env::temp_dir().join(format!("strato-peer-{}", std::process::id()));
            let result = peer::run(&PeerConfig { hosts, vms, concurrency }, &dir);
            let _ = std::fs::remove_dir_all(&dir);
            match result {
                Ok(true) => Ok(()),
                Ok(false) => return std::process::ExitCode::FAILURE,
                Err(error) => Err(error),
            }
        }
        Cmd::Run { seed, duration, hosts, clients, strategy, no_faults, storm, no_netns, keep } => {
            let seed = seed.unwrap_or_else(|| fastrand::u64(..1_000_000));
            let dir =
                std::env::temp_dir().join(format!("strato-chaos-{seed}-{}", std::process::id()));
            let config = RunConfig {
                seed,
                duration,
                hosts,
                clients,
                strategy,
                faults: !no_faults,
                namespaces: !no_netns,
                storm,
            };
            let result = run::run(&config, &dir);
            if keep {
                eprintln!("strato-chaos: the run's files are in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
            match result {
                Ok(true) => Ok(()),
                Ok(false) => return std::process::ExitCode::FAILURE,
                Err(error) => Err(error),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("strato-chaos: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
