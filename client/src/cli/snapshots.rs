//! `coffer snapshot create|list|diff|delete|protect|unprotect|lock`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use coffer_client::{backup, diff, BackupOptions, BackupPolicy, Progress, Session, TreeCache};
use coffer_proto::SnapshotId;

use super::browse::{locate, resolve};
use super::progress::show_progress;
use super::{cache_dir, connected, state_dir, EXIT_PARTIAL};

#[derive(Subcommand, Debug)]
pub enum SnapCmd {
    /// Back up each PATH (a directory) as its own snapshot; without PATH, every path your
    /// policies schedule (`coffer policy schedule`).
    Create {
        paths: Vec<PathBuf>,
        /// Print a JSON summary per snapshot.
        #[arg(long)]
        json: bool,
        /// Read every file, even those the previous snapshot has unchanged.
        #[arg(long)]
        no_parent: bool,
        /// Files read at the same time (reading is I/O-bound: more readers than cores helps).
        #[arg(long, default_value_t = 16)]
        readers: usize,
        /// zstd level for new chunks (1-19; 0 = store uncompressed); overrides the policy's
        /// `compression`. Default: the policy's, else 3 (level 3 stores the Linux tree 4%
        /// smaller than level 1 for no loss of speed on a 2-core machine).
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19))]
        compression: Option<i32>,
    },
    /// What changed from snapshot A to snapshot B.
    Diff {
        a: String,
        b: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; its space is reclaimed later by maintenance. Asks for the account's
    /// delete passphrase when it has one (it is never stored).
    Delete {
        id: String,
        #[command(flatten)]
        step_up: StepUp,
    },
    /// Protect a snapshot from deletion and retention, until DATE or until unprotected.
    Protect {
        id: String,
        /// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or a duration from now (`90d`).
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
    },
    /// Remove a snapshot's protection (needs FULL access and the delete passphrase; refused
    /// while the snapshot is locked).
    Unprotect {
        id: String,
        #[command(flatten)]
        step_up: StepUp,
    },
    /// Extend a snapshot's retention lock to DATE (needs FULL access; never shortens a lock).
    Lock {
        id: String,
        /// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or a duration from now (`1y`).
        #[arg(long, value_name = "DATE")]
        until: String,
    },
    /// List your snapshots, optionally of one PATH.
    List {
        path: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Every snapshot you may read (other users' too, where the access rules allow).
        #[arg(long)]
        all: bool,
    },
}

/// Where the delete passphrase comes from.
#[derive(clap::Args, Debug)]
pub struct StepUp {
    /// File whose first line is the account's delete passphrase (else
    /// COFFER_DELETE_PASSPHRASE, else a prompt when the account has one).
    #[arg(long, value_name = "FILE")]
    delete_passphrase_file: Option<PathBuf>,
}

impl StepUp {
    /// The passphrase for one operation: empty when the account has none.
    fn read(&self, s: &Session) -> anyhow::Result<String> {
        if let Some(f) = &self.delete_passphrase_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?;
            return Ok(text.lines().next().unwrap_or_default().to_string());
        }
        if !s.hello.delete_passphrase_set {
            return Ok(String::new());
        }
        if let Ok(p) = std::env::var("COFFER_DELETE_PASSPHRASE") {
            return Ok(p);
        }
        rpassword::prompt_password(format!("Delete passphrase for {}: ", s.hello.identity)).map_err(
            |e| {
                anyhow::anyhow!(
                    "{} has a delete passphrase and there is no terminal to ask for it on: use \
                     --delete-passphrase-file or COFFER_DELETE_PASSPHRASE ({e})",
                    s.hello.identity
                )
            },
        )
    }
}

/// How a snapshot's protection and lock read in a listing.
fn holds(snap: &coffer_proto::v1::Snapshot) -> String {
    coffer_proto::when::holds(
        snap.protected_until_us,
        snap.lock_until_us,
        coffer_proto::now_us(),
    )
}

/// Runs one `snapshot` subcommand.
pub async fn run(cmd: SnapCmd, cfg_path: &Path) -> anyhow::Result<ExitCode> {
    connected(cfg_path, async |s| run_with(cmd, s).await).await
}

async fn run_with(cmd: SnapCmd, s: &Session) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapCmd::Create {
            paths,
            json,
            no_parent,
            readers,
            compression,
        } => {
            let opts = BackupOptions {
                cache_dir: cache_dir(),
                state_dir: state_dir(),
                no_parent,
                workers: readers.max(1),
                ..BackupOptions::default()
            };
            let paths = if paths.is_empty() {
                // The paths the appliance's policy schedules for this account.
                let p = s.policy("/").await?;
                if p.scheduled.is_empty() {
                    anyhow::bail!(
                        "no paths given, and no policy schedules a path for {}: name the \
                         directories to back up, or ask the operator to set a schedule \
                         (coffer-appliance policy set USER@HOST:/path --schedule 'daily 02:30')",
                        s.hello.identity
                    );
                }
                p.scheduled
                    .into_iter()
                    .map(|(path, _)| PathBuf::from(path))
                    .collect()
            } else {
                paths
            };
            if create(s, paths, &opts, compression, json).await? {
                return Ok(ExitCode::from(EXIT_PARTIAL));
            }
        }
        SnapCmd::List { path, json, all } => list(s, path, json, all).await?,
        SnapCmd::Diff { a, b, json } => {
            let (ta, _) = locate(s, &a).await?;
            let (tb, _) = locate(s, &b).await?;
            let cache = TreeCache::new(cache_dir(), *s.dedup_key());
            for c in diff(s, &cache, ta, tb).await? {
                if json {
                    println!("{}", serde_json::to_string(&c)?);
                } else {
                    println!("{} {}", c.kind, c.path);
                }
            }
        }
        SnapCmd::Delete { id, step_up } => {
            let snap = resolve(s, &id).await?;
            let sid = SnapshotId::from_slice(&snap.id)?;
            s.delete(&sid, &step_up.read(s)?).await?;
            println!(
                "deleted snapshot {sid} of {}:{} (its space is freed by the appliance's next \
                 maintenance run)",
                snap.identity, snap.path
            );
        }
        SnapCmd::Protect { id, until } => {
            let snap = resolve(s, &id).await?;
            let sid = SnapshotId::from_slice(&snap.id)?;
            let until_us = match until {
                Some(u) => coffer_proto::when::parse_time_us(&u, coffer_proto::now_us())
                    .map_err(anyhow::Error::msg)?,
                None => 0,
            };
            let after = s.protect(&sid, true, until_us, "").await?;
            println!("snapshot {sid}{}", holds(&after));
        }
        SnapCmd::Unprotect { id, step_up } => {
            let snap = resolve(s, &id).await?;
            let sid = SnapshotId::from_slice(&snap.id)?;
            let after = s.protect(&sid, false, 0, &step_up.read(s)?).await?;
            println!("snapshot {sid} is no longer protected{}", holds(&after));
        }
        SnapCmd::Lock { id, until } => {
            let snap = resolve(s, &id).await?;
            let sid = SnapshotId::from_slice(&snap.id)?;
            let until_us = coffer_proto::when::parse_time_us(&until, coffer_proto::now_us())
                .map_err(anyhow::Error::msg)?;
            let after = s.lock(&sid, until_us).await?;
            println!("snapshot {sid}{}", holds(&after));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Backs up each of `paths` as its own snapshot with `opts`, showing progress; returns whether
/// any snapshot is partial.
async fn create(
    s: &Session,
    paths: Vec<PathBuf>,
    opts: &BackupOptions,
    compression: Option<i32>,
    json: bool,
) -> anyhow::Result<bool> {
    let mut partial = false;
    for p in paths {
        let progress = Arc::new(Progress::default());
        let root = std::fs::canonicalize(&p)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
        // The appliance's policy for this path: excludes, size limit, compression.
        let policy = match s.policy(&root.to_string_lossy()).await {
            Ok(policy) => policy,
            Err(e) => {
                eprintln!("warning: no policy applied to {} ({e})", root.display());
                BackupPolicy::default()
            }
        };
        let (zstd_level, lz4_all) = match compression {
            Some(c) => ((c > 0).then_some(c), false),
            None => policy.codec(opts.zstd_level)?,
        };
        let opts = BackupOptions {
            progress: Some(progress.clone()),
            policy,
            zstd_level,
            lz4_all,
            ..opts.clone()
        };
        let ticker = tokio::spawn(show_progress(progress));
        let res = backup(s, &p, &opts).await;
        ticker.abort();
        let _ = ticker.await;
        let sum = res?;
        for e in &sum.errors {
            eprintln!("error: not saved: {e}");
        }
        for w in &sum.warnings {
            eprintln!("warning: {w}");
        }
        partial |= sum.partial;
        if json {
            println!("{}", serde_json::to_string(&sum)?);
        } else {
            println!(
                "snapshot {} of {}: {} files ({} unchanged, not read), {} bytes ({} read), \
                 {} bytes uploaded in {} new chunks of {}, {:.2}s{}",
                sum.snapshot,
                sum.path,
                sum.files,
                sum.files_unchanged,
                sum.bytes,
                sum.bytes_read,
                sum.uploaded_bytes,
                sum.new_chunks,
                sum.chunks,
                sum.seconds,
                if sum.partial {
                    " (PARTIAL: some entries could not be read)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(partial)
}

/// Prints the snapshots of `path` (all paths when none), this user's or, with `all`, every
/// snapshot the user may read.
async fn list(s: &Session, path: Option<PathBuf>, json: bool, all: bool) -> anyhow::Result<()> {
    let filter = match path {
        Some(p) => std::fs::canonicalize(&p)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned(),
        None => String::new(),
    };
    for snap in s.list(&filter, all).await? {
        let st = snap.stats.unwrap_or_default();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "id": hex::encode(&snap.id), "identity": snap.identity, "path": snap.path,
                    "time_us": snap.time_us, "time": coffer_proto::when::format_us(snap.time_us),
                    "files": st.files, "bytes": st.bytes, "partial": snap.partial,
                    "lock_until_us": snap.lock_until_us, "protected_until_us": snap.protected_until_us,
                    "lock_until": (snap.lock_until_us > 0 && snap.lock_until_us < i64::MAX)
                        .then(|| coffer_proto::when::format_us(snap.lock_until_us)),
                    "protected_until": (snap.protected_until_us > 0 && snap.protected_until_us < i64::MAX)
                        .then(|| coffer_proto::when::format_us(snap.protected_until_us)),
                })
            );
        } else {
            println!(
                "{}  {}  {}:{}  {} files  {}{}{}",
                hex::encode(&snap.id),
                super::local_time(snap.time_us),
                snap.identity,
                snap.path,
                st.files,
                indicatif::HumanBytes(st.bytes),
                if snap.partial { "  partial" } else { "" },
                holds(&snap)
            );
        }
    }
    Ok(())
}
