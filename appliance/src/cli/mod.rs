//! The `coffer-appliance` command line: one file per command group. `main.rs` parses and calls
//! [`run`]; these modules belong to the binary, not to the library, and use only the library's
//! public surface. `anyhow` lives here and in `main.rs` only.
//!
//! Owns: argument definitions, password prompts and environment variables, everything printed,
//! exit codes. Must never hold repository logic (verification, rebuilding, serving, the admin
//! protocol): it calls the library and reports what it answers.

mod accounts;
mod history;
mod maintenance;
mod policy;
mod repo;
mod serve;
mod tune;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use coffer_appliance::{ChunkerParams, MasterKey, Mode, RepoPaths};

#[derive(Parser, Debug)]
#[command(
    name = "coffer-appliance",
    version,
    about = "The coffer deduplicating backup appliance"
)]
pub struct Cli {
    /// Log lines as `text` (for people and journald) or `json` (one object per line, for log
    /// shippers). Logs go to standard error; COFFER_LOG sets the filter (default `info`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "COFFER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// See [`Cli::log_format`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct RepoArg {
    /// Repository directory.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RepoPassword {
    /// File whose first line is the repository password (else COFFER_REPO_PASSWORD, else a prompt).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum MaintenanceCmd {
    /// Forget what retention no longer keeps, then collect garbage (in the running appliance;
    /// offline, only forget).
    Run(maintenance::RunArgs),
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a new repository.
    Init {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
        /// Number of shards (one per core when serving). Default: the CPUs available now.
        #[arg(long)]
        shards: Option<u16>,
        /// FastCDC average chunk size in bytes (min = avg/4, max = avg*4).
        #[arg(long, default_value_t = ChunkerParams::DEFAULT.avg)]
        chunk_avg: u32,
        /// What users may do with their own snapshots under the built-in rules: `append` (add,
        /// list, read; never delete: retention is the appliance's) or `full` (also delete).
        #[arg(long, default_value = "append", value_parser = ["append", "full"])]
        default_access: String,
        /// `managed`: the appliance encrypts and deduplicates across all users. `sealed`: the
        /// clients encrypt under keyrings the appliance never sees (`coffer keyring create`);
        /// dedup then happens within a keyring. Fixed for the repository's life.
        #[arg(long, default_value = "managed", value_parser = ["managed", "sealed"])]
        mode: String,
        #[command(flatten)]
        storage: repo::StorageArgs,
    },
    /// Serve a repository kept in an object store from this machine: fetch its files and packs
    /// into an empty DIR, rebuild the index and the catalog from them.
    Attach {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
        #[command(flatten)]
        storage: repo::StorageArgs,
    },
    /// Serve the repository over gRPC + TLS until SIGTERM/SIGINT.
    Serve(Box<serve::ServeArgs>),
    /// Manage accounts (through the running appliance if there is one: effective at once).
    User {
        #[command(subcommand)]
        cmd: accounts::UserCmd,
    },
    /// Manage access rules (through the running appliance if there is one: effective at once).
    Acl {
        #[command(subcommand)]
        cmd: accounts::AclCmd,
    },
    /// Show or set what FindMissing reveals about chunks stored by others: `user` (default: no
    /// existence oracle; the client uploads data it has not referenced before and nothing new is
    /// stored) or `repository` (saves that upload, reveals that someone stored the data).
    Disclosure {
        #[command(flatten)]
        repo: RepoArg,
        /// `user` or `repository`; omit to show the current mode.
        mode: Option<String>,
    },
    /// Space per user or host: logical bytes, stored bytes only they reference, stored bytes
    /// shared with others (counted by the running appliance).
    Usage(maintenance::UsageArgs),
    /// The running appliance at a glance: version, uptime, shards, sessions, throughput,
    /// space and the last maintenance (through its admin socket).
    Status(maintenance::StatusArgs),
    /// Maintenance: `run` applies retention and collects garbage.
    Maintenance {
        #[command(subcommand)]
        cmd: MaintenanceCmd,
    },
    /// Manage the policies the appliance serves: retention, compression, excludes, schedule
    /// (through the running appliance if there is one: effective at once).
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Snapshots as the operator manages them: list, delete, protect, unprotect, lock (locked
    /// snapshots cannot be deleted here either).
    Snapshot {
        #[command(subcommand)]
        cmd: history::SnapshotCmd,
    },
    /// The audit log: `show` and `verify` (its hash chain).
    Audit {
        #[command(subcommand)]
        cmd: history::AuditCmd,
    },
    /// Make the running appliance reload accounts and rules from its catalog (as SIGHUP does).
    Refresh {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Check invariants I1 (with --read-data), I2 and I5; exit 1 on any error.
    Verify {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
        /// Decrypt every chunk and check that it hashes to its id.
        #[arg(long)]
        read_data: bool,
    },
    /// Rebuild the whole index from pack files (the old index, if any, is moved aside).
    RebuildIndex {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
    },
    /// Recreate catalog/ (snapshots, accounts, rules, policies, settings) from the catalog
    /// journal the appliance keeps in packs/catalog/, after catalog/ was lost. Refuses to
    /// overwrite an existing catalog/.
    RebuildCatalog {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
    },
    /// Print the hardware found, the plan `serve` would apply (which core runs which shard,
    /// network threads, queue depth, pack size, index cache) and what to change, with reasons.
    Tune(tune::TuneArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff; `coffer-appliance manpage > coffer-appliance.8`).
    Manpage,
}

pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 660"))
}

pub fn read_secret(
    file: Option<&Path>,
    env: &str,
    prompt: &str,
    confirm: bool,
) -> anyhow::Result<String> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(s.lines().next().unwrap_or_default().to_string());
    }
    if let Ok(s) = std::env::var(env) {
        return Ok(s);
    }
    let p = rpassword::prompt_password(prompt).with_context(|| {
        format!("no terminal to ask for the password on: use --password-file or {env}")
    })?;
    if confirm && rpassword::prompt_password("Repeat: ")? != p {
        bail!("the passwords do not match");
    }
    Ok(p)
}

pub fn repo_password(p: &RepoPassword, confirm: bool) -> anyhow::Result<String> {
    let pw = read_secret(
        p.password_file.as_deref(),
        "COFFER_REPO_PASSWORD",
        "Repository password: ",
        confirm,
    )?;
    if pw.is_empty() {
        bail!("the repository password must not be empty");
    }
    Ok(pw)
}

pub fn unlock(paths: &RepoPaths, p: &RepoPassword) -> anyhow::Result<MasterKey> {
    paths.load_config()?;
    Ok(MasterKey::load(
        &paths.master_key(),
        repo_password(p, false)?.as_bytes(),
    )?)
}

/// Runs one command; the exit code says whether a check found errors.
///
/// # Errors
/// Whatever stopped the command, for `main` to print.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Init {
            repo,
            password,
            shards,
            chunk_avg,
            default_access,
            mode,
            storage,
        } => repo::init(
            &RepoPaths::new(&repo.repo),
            &password,
            shards,
            chunk_avg,
            &default_access,
            if mode == "sealed" {
                Mode::Sealed
            } else {
                Mode::Managed
            },
            &storage,
        )?,
        Cmd::Attach {
            repo,
            password,
            storage,
        } => repo::attach(&RepoPaths::new(&repo.repo), &password, &storage)?,
        Cmd::Serve(a) => serve::run(*a)?,
        Cmd::User { cmd } => accounts::user(cmd)?,
        Cmd::Acl { cmd } => accounts::acl(cmd)?,
        Cmd::Disclosure { repo, mode } => accounts::disclosure(&repo.repo, mode)?,
        Cmd::Refresh { repo } => accounts::refresh(&repo.repo)?,
        Cmd::Policy { cmd } => policy::run(cmd)?,
        Cmd::Snapshot { cmd } => history::snapshot(cmd)?,
        Cmd::Audit { cmd } => return history::audit(cmd),
        Cmd::Usage(a) => maintenance::usage(&a)?,
        Cmd::Status(a) => maintenance::status(&a)?,
        Cmd::Maintenance {
            cmd: MaintenanceCmd::Run(a),
        } => maintenance::run(&a)?,
        Cmd::Verify {
            repo,
            password,
            read_data,
        } => return repo::verify(&repo.repo, &password, read_data),
        Cmd::RebuildIndex { repo, password } => {
            repo::rebuild_index(&RepoPaths::new(&repo.repo), &password)?;
        }
        Cmd::RebuildCatalog { repo, password } => {
            repo::rebuild_catalog(&RepoPaths::new(&repo.repo), &password)?;
        }
        Cmd::Tune(a) => tune::run(&a)?,
        Cmd::Completions { shell } => print_help_file(Some(shell))?,
        Cmd::Manpage => print_help_file(None)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the shell completion script for `shell` or the manual page (roff) of `coffer-appliance`.
fn print_help_file(shell: Option<clap_complete::Shell>) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    match shell {
        Some(sh) => clap_complete::generate(sh, &mut cmd, "coffer-appliance", &mut out),
        None => clap_mangen::Man::new(cmd).render(&mut out)?,
    }
    Ok(())
}
