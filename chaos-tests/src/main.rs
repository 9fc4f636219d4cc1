//! `strato-chaos`: load runs (and, with its own issue, chaos runs) against real processes.

use clap::{Parser, Subcommand};
use strato_chaos::load::{self, LoadConfig};

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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("strato-chaos: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
