//! The `strato` binary: the management node server, the main job, agents' bootstrap files, the
//! OpenAPI document, the runtime demonstration, and the client commands (`strato
//! <ApiName> key=value ...`, `strato shell`; see `strato_api::client::cli`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Strato, an IaaS control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The API a client command talks to (also $STRATO_SERVER; default: the logged-in one).
    #[arg(long)]
    server: Option<String>,
    /// How a client command prints answers: table or json.
    #[arg(long, short = 'o')]
    output: Option<String>,
    /// A client command that starts a job prints its location instead of following it.
    #[arg(long)]
    no_wait: bool,
    #[command(subcommand)]
    command: Cmd,
}

impl Args {
    /// The client options given before the command, as the client reads them.
    fn client_options(&self) -> Vec<String> {
        let mut options = Vec::new();
        if let Some(server) = &self.server {
            options.extend(["--server".to_owned(), server.clone()]);
        }
        if let Some(output) = &self.output {
            options.extend(["--output".to_owned(), output.clone()]);
        }
        if self.no_wait {
            options.push("--no-wait".to_owned());
        }
        options
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Deletion {
    Delay,
    Direct,
}

impl From<Deletion> for strato_actors::vm::ops::DeletionPolicy {
    fn from(deletion: Deletion) -> Self {
        match deletion {
            Deletion::Delay => strato_actors::vm::ops::DeletionPolicy::Delay,
            Deletion::Direct => strato_actors::vm::ops::DeletionPolicy::Direct,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The main job: the management node, a local agent on libvirt's test driver, and the
    /// resources a first VM needs; prints the API's address and a curl line that creates a VM.
    Up {
        /// Where the store, the CA and the agent's data live.
        #[arg(long, default_value = "strato-data")]
        data_dir: PathBuf,
        /// Where the API listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the local agent listens.
        #[arg(long, default_value = "127.0.0.1:7070")]
        agent_listen: SocketAddr,
    },
    /// Runs the management node: the HTTP API on its embedded store.
    Server {
        /// Where the store and the CA live.
        #[arg(long, default_value = "strato-data")]
        data_dir: PathBuf,
        /// Where the API listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// What destroying a VM does: `delay` keeps it recoverable, `direct` expunges it.
        #[arg(long, value_enum, default_value = "delay")]
        vm_deletion_policy: Deletion,
        /// How long a destroyed VM stays recoverable before it is expunged (0: until expunged
        /// by hand).
        #[arg(long, default_value_t = 86_400)]
        vm_expunge_period_secs: u64,
        /// What deleting a data volume does: `delay` keeps it recoverable, `direct` expunges
        /// it (ZStack's `volume.deletionPolicy`).
        #[arg(long, value_enum, default_value = "delay")]
        volume_deletion_policy: Deletion,
        /// How long a deleted data volume stays recoverable before it is expunged (0: until
        /// expunged by hand; ZStack's `volume.expungePeriod`, 3 days).
        #[arg(long, default_value_t = 259_200)]
        volume_expunge_period_secs: u64,
    },
    /// Writes a bootstrap file (mode 0600) that enrolls an agent with this node: the node's CA
    /// certificate and a one-time secret per host, valid for 24 hours. Copy it to the host and
    /// start the agent with `--bootstrap-file FILE`.
    AgentBootstrap {
        /// The management node's data directory.
        #[arg(long, default_value = "strato-data")]
        data_dir: PathBuf,
        /// Where to write the file.
        #[arg(long)]
        out: PathBuf,
        /// Secrets in the file: one per host the agent serves (a simulated agent serves many).
        #[arg(long, default_value_t = 1)]
        hosts: usize,
    },
    /// Prints the API's OpenAPI document (the committed copy is `api/openapi.json`).
    Openapi,
    /// An interactive client: API commands with history and Tab completion.
    Shell,
    /// The debug console's views as tables: `strato debug actors|queues|flows|gc|hosts
    /// [kind=vm status=Failed filter=web]` (admin).
    Debug {
        /// actors, queues, flows, gc or hosts, then key=value filters.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A client command: `strato <ApiName> key=value ...` (`strato QueryVmInstance
    /// state=Running`, `strato LogInByAccount accountName=admin password=...`).
    #[command(external_subcommand)]
    Api(Vec<String>),
    /// Runs the demonstration of the runtime on the embedded store.
    Demo {
        /// Where its store lives.
        #[arg(long, default_value = "strato-data/demo")]
        data_dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sled=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; plain text for a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A panic is logged once, on one line, through tracing (the runtime contains panics in
    // operations and reports them itself; this covers every other thread too).
    std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panic")));
    let args = Args::parse();
    // Client commands need neither the runtime nor the server's logging.
    match &args.command {
        Cmd::Api(command) => {
            // The options may also follow the API's name: the client splits them out.
            let mut argv = args.client_options();
            argv.extend(command.iter().cloned());
            return std::process::ExitCode::from(strato_api::client::cli::run(&argv) as u8);
        }
        Cmd::Debug { args: debug_args } => {
            let mut argv = args.client_options();
            argv.extend(debug_args.iter().cloned());
            return std::process::ExitCode::from(strato_api::client::cli::debug(&argv) as u8);
        }
        Cmd::Shell => {
            return std::process::ExitCode::from(strato_api::client::cli::shell(
                &args.client_options(),
            ) as u8);
        }
        _ => {}
    }
    #[cfg(feature = "failpoints")]
    if let Err(error) = configure_failpoints() {
        eprintln!("strato: {error}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result: Result<(), strato_runtime::BoxError> = runtime.block_on(async {
        match args.command {
            Cmd::Server {
                data_dir,
                listen,
                vm_deletion_policy,
                vm_expunge_period_secs,
                volume_deletion_policy,
                volume_expunge_period_secs,
            } => {
                let listener = strato_api::server::bind(listen).await?;
                let period = |secs: u64| (secs > 0).then(|| std::time::Duration::from_secs(secs));
                let policy = strato_actors::vm::ops::VmPolicy {
                    deletion: vm_deletion_policy.into(),
                    expunge_after: period(vm_expunge_period_secs),
                    ..Default::default()
                };
                let volume_policy = strato_actors::volume::VolumePolicy {
                    deletion: volume_deletion_policy.into(),
                    expunge_after: period(volume_expunge_period_secs),
                    ..Default::default()
                };
                let mn = strato_api::mn::Mn::start(&data_dir, None, policy, volume_policy).await?;
                let mut out = std::io::stdout();
                let _ = writeln!(
                    out,
                    "strato: API on http://{listen}/v1 (data in {})",
                    data_dir.display()
                );
                println!(
                    "strato: agents enroll with a file from `strato agent-bootstrap --data-dir {} --out FILE`",
                    data_dir.display()
                );
                if let Some(password) = &mn.generated_admin_password {
                    println!(
                        "strato: the admin account's password (generated; shown once, kept in {}): {password}",
                        data_dir.join(strato_api::mn::INITIAL_ADMIN_PASSWORD).display()
                    );
                }
                tokio::select! {
                    served = strato_api::server::serve(mn.clone(), listener) => served?,
                    _ = tokio::signal::ctrl_c() => {}
                }
                mn.shutdown();
                Ok(())
            }
            Cmd::Up { data_dir, listen, agent_listen } => {
                strato_api::client::up::run(&data_dir, listen, agent_listen).await
            }
            Cmd::AgentBootstrap { data_dir, out, hosts } => {
                strato_proto::tls::private_dir(&data_dir)?;
                strato_api::mn::pki(&data_dir)?.mint(&out, hosts)?;
                println!(
                    "strato: wrote {} ({hosts} one-time secret(s), valid for 24 hours); copy it to the host and start strato-agent with --bootstrap-file",
                    out.display()
                );
                Ok(())
            }
            Cmd::Api(_) | Cmd::Shell | Cmd::Debug { .. } => {
                unreachable!("client commands returned above")
            }
            Cmd::Openapi => {
                print!("{}", strato_api::catalog::openapi::pretty());
                Ok(())
            }
            Cmd::Demo { data_dir } => strato_api::client::demo::run(&data_dir).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("strato: {}", strato_runtime::error_chain(&*error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Arms the injection points named in `STRATO_FAILPOINTS` (`name=action;...`, in the `fail`
/// crate's action syntax, e.g. `actor-op=2%panic;store-apply=1%return`). Only binaries built
/// with the `failpoints` feature (test builds, for the chaos runs) have this; the others have
/// no injection points at all.
#[cfg(feature = "failpoints")]
fn configure_failpoints() -> Result<(), String> {
    let Ok(spec) = std::env::var("STRATO_FAILPOINTS") else { return Ok(()) };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, action) = entry
            .split_once('=')
            .ok_or_else(|| format!("STRATO_FAILPOINTS: `{entry}` is not name=action"))?;
        fail::cfg(name.trim(), action.trim())
            .map_err(|e| format!("STRATO_FAILPOINTS: `{entry}`: {e}"))?;
        tracing::warn!(failpoint = name.trim(), action = action.trim(), "failpoint armed");
    }
    Ok(())
}
