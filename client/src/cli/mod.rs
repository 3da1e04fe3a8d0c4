//! The `coffer` binary's command handlers, one file per command group: [`connect`] (`connect`,
//! `disconnect`), [`snapshots`] (`snapshot create|list|diff|delete`, with [`progress`] for the
//! bar), [`browse`] (`ls`, and resolving `SNAPSHOT[:/path]` for every command that takes one) and
//! [`restore`]. `main.rs` only parses the arguments and calls [`run`].
//!
//! This module belongs to the binary, not to the library (`mod cli;` in `main.rs`), so that clap,
//! `anyhow`, the terminal and the environment stay out of the `coffer_client` surface: the
//! handlers use only what `coffer_client` re-exports.
//!
//! Owns: argument definitions, reading the environment (`$COFFER_CONFIG`, `$XDG_*`, `$HOME`,
//! `$USER`, `$COFFER_PASSWORD`), everything printed, and exit codes. Must never hold backup or
//! restore logic (that is the library's), nor print anything the library could return instead.

mod browse;
mod connect;
mod keyring;
mod progress;
mod restore;
mod snapshots;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coffer_client::{default_path, ClientConfig, Session, SessionOptions, Target};

/// Exit code when a snapshot was committed but some entries could not be read.
const EXIT_PARTIAL: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "coffer", version, about = "coffer backup client")]
pub struct Cli {
    /// Client configuration file (default: $COFFER_CONFIG, else ~/.config/coffer/client.json).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// The effective policy for PATH, each field with its level.
    Show {
        path: Option<PathBuf>,
        /// One JSON object per field.
        #[arg(long)]
        json: bool,
    },
    /// The paths your policies schedule, with their schedules; with --systemd, the [Timer]
    /// lines of a systemd timer that fires on them (the Ansible client role installs it).
    Schedule {
        #[arg(long)]
        systemd: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Connect to an appliance and save the client configuration.
    Connect {
        #[command(subcommand)]
        to: connect::ConnectTo,
    },
    /// Forget the saved configuration.
    Disconnect,
    /// Keys of sealed repositories (on an admin machine): create, issue members, rotate.
    Keyring {
        #[command(subcommand)]
        cmd: keyring::KeyringCmd,
    },
    /// Create and list snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: snapshots::SnapCmd,
    },
    /// Show the policy the appliance applies to PATH (default: the current directory): each
    /// field with the level it came from.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff; `coffer manpage > coffer.1`).
    Manpage,
    /// List the contents of SNAPSHOT[:/path]: names, or with -l mode, owner, size and
    /// modification time.
    Ls {
        target: String,
        /// Long listing: mode, uid:gid, size in bytes, modification time (local), name.
        #[arg(short = 'l', long = "long")]
        long: bool,
    },
    /// Restore SNAPSHOT[:/path] into TARGET (created if missing).
    Restore {
        source: String,
        target: PathBuf,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
        /// What to do with files already in TARGET: replace them (`always`), replace them when
        /// size or modification time differ (`if-changed`), or keep them (`never`).
        #[arg(long, value_enum, default_value = "always")]
        overwrite: coffer_client::Overwrite,
    },
    /// Mount the snapshots you may read as a read-only file system (FUSE) at MOUNTPOINT:
    /// hosts/HOST/TIME, paths/PATH/TIME (`/` as %2F) and ids/ID, each group with `latest`.
    /// Runs until Ctrl-C, SIGTERM or `coffer umount MOUNTPOINT`.
    Mount {
        mountpoint: PathBuf,
        /// Memory for chunks read (e.g. 256M, 2G).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        cache_size: u64,
        /// How often the snapshot list is read again (seconds).
        #[arg(long, default_value_t = 10)]
        refresh: u64,
        /// Also keep chunks read on local disk, in DIR (sealed under a key of this mount and
        /// removed at unmount): reading a large working set again does not fetch it again.
        #[arg(long, value_name = "DIR")]
        disk_cache: Option<PathBuf>,
        /// Disk for chunks read, with --disk-cache (e.g. 2G, 20G).
        #[arg(long, default_value = "2G", value_parser = parse_size)]
        disk_cache_size: u64,
    },
    /// Unmount a `coffer mount`.
    Umount { mountpoint: PathBuf },
}

/// `256M`, `2G`, `512K` or plain bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?}: use a number with K, M, G or T");
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &t[..i],
            match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            },
        ),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(bad)
}

/// Runs one command; the exit code is 0, or [`EXIT_PARTIAL`] for a partial backup.
///
/// # Errors
/// Whatever stopped the command; `main` prints it with its chain and exits with 1.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cfg_path = config_path(cli.config);
    match cli.cmd {
        Cmd::Connect { to } => connect::connect(to, &cfg_path).await?,
        Cmd::Disconnect => connect::disconnect(&cfg_path)?,
        Cmd::Keyring { cmd } => keyring::run(cmd, &cfg_path).await?,
        Cmd::Snapshot { cmd } => return snapshots::run(cmd, &cfg_path).await,
        Cmd::Completions { shell } => print_help_file(Some(shell))?,
        Cmd::Manpage => print_help_file(None)?,
        Cmd::Ls { target, long } => browse::ls(&cfg_path, &target, long).await?,
        Cmd::Policy {
            cmd: PolicyCmd::Schedule { systemd },
        } => {
            let p = connected(&cfg_path, async |s| Ok(s.policy("/").await?)).await?;
            if systemd {
                let schedules: Vec<String> = p.scheduled.iter().map(|(_, s)| s.clone()).collect();
                println!("{}", coffer_client::systemd_timer(&schedules)?);
            } else if p.scheduled.is_empty() {
                println!("no policy schedules a path for this account");
            } else {
                for (path, schedule) in &p.scheduled {
                    println!("{path}\t{schedule}");
                }
            }
        }
        Cmd::Policy {
            cmd: PolicyCmd::Show { path, json },
        } => {
            let path = std::fs::canonicalize(path.unwrap_or_else(|| PathBuf::from(".")))?;
            let text = path.to_string_lossy().into_owned();
            let (p, stored) = connected(&cfg_path, async |s| {
                Ok((s.policy(&text).await?, s.path_as_stored(&text)))
            })
            .await?;
            if let Some(tag) = stored.filter(|t| *t != text) {
                println!("(sealed repository: the appliance knows {text} as {tag})");
            }
            if p.fields.is_empty() {
                println!("no policy sets anything for {text}: retention keeps everything");
            }
            for f in &p.fields {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"field": f.name, "value": serde_json::from_str::<serde_json::Value>(&f.value_json)?, "from": f.level})
                    );
                } else {
                    println!("{} = {}  (from {})", f.name, f.value_json, f.level);
                }
            }
        }
        Cmd::Restore {
            source,
            target,
            json,
            overwrite,
        } => restore::restore(&cfg_path, &source, &target, json, overwrite).await?,
        Cmd::Mount {
            mountpoint,
            cache_size,
            refresh,
            disk_cache,
            disk_cache_size,
        } => {
            coffer_client::check_fuse()?;
            let cfg = ClientConfig::load(&cfg_path)?;
            let s = session(&cfg).await?;
            let opts = coffer_client::MountOptions {
                cache_bytes: cache_size,
                refresh: std::time::Duration::from_secs(refresh.max(1)),
                disk_cache,
                disk_cache_bytes: disk_cache_size,
            };
            let r = coffer_client::mount(s.clone(), &mountpoint, opts).await;
            s.end().await;
            r?;
        }
        Cmd::Umount { mountpoint } => coffer_client::umount(&mountpoint)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn config_path(cli: Option<PathBuf>) -> PathBuf {
    cli.unwrap_or_else(|| {
        default_path(
            std::env::var_os("COFFER_CONFIG").map(Into::into),
            std::env::var_os("XDG_CONFIG_HOME").map(Into::into),
            std::env::var_os("HOME").map(Into::into),
        )
    })
}

/// `$XDG_STATE_HOME/coffer`, else `~/.local/state/coffer`.
fn state_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state"))
        })?;
    Some(base.join("coffer"))
}

/// `$XDG_CACHE_HOME/coffer/trees`, else `~/.cache/coffer/trees`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("coffer").join("trees"))
}

async fn session(cfg: &ClientConfig) -> anyhow::Result<Session> {
    let opts = SessionOptions {
        target: Target::parse(&cfg.url, &cfg.fingerprint)?,
        identity: cfg.identity.clone(),
        password: cfg.password.clone(),
        deadlines: coffer_client::Deadlines::default(),
        keyring: match &cfg.keyring {
            Some(p) => Some(std::sync::Arc::new(coffer_client::Member::load(p)?)),
            None => None,
        },
    };
    Ok(Session::connect(&opts).await?)
}

/// Runs `f` with a session of the saved configuration at `cfg_path`, then ends the session
/// (whatever `f` answered), so that the appliance releases what it held for it.
async fn connected<T>(
    cfg_path: &Path,
    f: impl AsyncFnOnce(&Session) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cfg = ClientConfig::load(cfg_path)?;
    let s = session(&cfg).await?;
    let r = f(&s).await;
    s.end().await;
    r
}

/// Unix microseconds as local date and time to the second (`2026-12-03 01:02:03`).
pub(crate) fn local_time(us: i64) -> String {
    use chrono::TimeZone;
    chrono::Local.timestamp_micros(us).single().map_or_else(
        || format!("@{us}us"),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// Prints the shell completion script for `shell` or the manual page (roff) of `coffer`.
fn print_help_file(shell: Option<clap_complete::Shell>) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    match shell {
        Some(sh) => clap_complete::generate(sh, &mut cmd, "coffer", &mut out),
        None => clap_mangen::Man::new(cmd).render(&mut out)?,
    }
    Ok(())
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn times_read_as_dates() {
        assert_eq!(super::local_time(1_764_720_123_456_789).len(), 19);
    }
}
