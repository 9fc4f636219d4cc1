//! The `strato` binary. Until the management node lands it runs the runtime demonstration
//! (see [`strato_api::demo`]).

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sled=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A panic is logged once, on one line, through tracing (the runtime contains panics in
    // operations and reports them itself; this covers every other thread too).
    std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panic")));
    let mut args = std::env::args().skip(1);
    let mut data_dir = PathBuf::from("strato-data");
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--data-dir", Some(dir)) => data_dir = PathBuf::from(dir),
            _ => {
                eprintln!("usage: strato [--data-dir DIR]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(strato_api::demo::run(&data_dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("strato: {}", strato_runtime::error_chain(&*error));
            std::process::ExitCode::FAILURE
        }
    }
}
