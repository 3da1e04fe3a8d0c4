//! `coffer-appliance`: command-line entry point. It only sets up the process and hands the
//! parsed command to [`cli::run`].

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Everything the appliance creates (catalog, index, packs, keys) is private to its user:
    // RocksDB and plain creates honour the umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFFER_LOG")
        // glommio logs a benign ERROR when it probes a file system for
        // io_uring polled I/O and finds none; it then uses the normal ring.
        .unwrap_or_else(|_| "info,glommio::reactor=off".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == cli::LogFormat::Json {
        logs.json().flatten_event(true).init();
    } else if std::env::var_os("JOURNAL_STREAM").is_some() {
        // Under systemd: journald stamps every line itself and shows no colours.
        logs.with_ansi(false).without_time().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
