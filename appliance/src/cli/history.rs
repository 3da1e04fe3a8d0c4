//! `snapshot list|delete|protect|unprotect|lock` and `audit show|verify`: history as the
//! operator sees it (through the running appliance if there is one). Protections and locks bind
//! these commands as they bind clients: a locked snapshot cannot be deleted here either.

use std::process::ExitCode;

use clap::Subcommand;
use coffer_appliance::admin::{self, SnapshotRow};
use coffer_proto::when::{format_us, parse_time_us};

use super::accounts::admin_run;
use super::RepoArg;

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Every snapshot, with its protection and lock.
    List {
        #[command(flatten)]
        repo: RepoArg,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (refused while it is protected or locked).
    Delete {
        id: String,
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Protect a snapshot from deletion and retention, until DATE or until unprotected.
    Protect {
        id: String,
        #[command(flatten)]
        repo: RepoArg,
        /// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or a duration from now (`90d`).
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
    },
    /// Remove a snapshot's protection (refused while it is locked).
    Unprotect {
        id: String,
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Extend a snapshot's retention lock to DATE (a lock is never shortened).
    Lock {
        id: String,
        #[command(flatten)]
        repo: RepoArg,
        /// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or a duration from now (`1y`).
        #[arg(long, value_name = "DATE")]
        until: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// The audit log, oldest first.
    Show {
        #[command(flatten)]
        repo: RepoArg,
        /// Only entries at or after DATE (`YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ`, or `7d` for the
        /// last seven days).
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Check the audit log's hash chain: exit 1, naming the entry, if one was changed, removed
    /// or moved.
    Verify {
        #[command(flatten)]
        repo: RepoArg,
    },
}

fn row(r: &SnapshotRow) -> String {
    let mut s = format!(
        "{}  {}  {}:{}",
        r.id,
        format_us(r.time_us),
        r.identity,
        r.path
    );
    if r.partial {
        s.push_str("  partial");
    }
    s.push_str(&coffer_proto::when::holds(
        r.protected_until_us,
        r.lock_until_us,
        coffer_proto::now_us(),
    ));
    s
}

fn when(s: &str) -> anyhow::Result<i64> {
    parse_time_us(s, coffer_proto::now_us()).map_err(anyhow::Error::msg)
}

pub fn snapshot(cmd: SnapshotCmd) -> anyhow::Result<()> {
    let show = |r: &admin::Reply| {
        for s in &r.snapshots {
            println!("{}", row(s));
        }
    };
    match cmd {
        SnapshotCmd::List { repo, json } => {
            let r = admin_run(&repo.repo, &admin::Request::SnapshotList)?;
            if json {
                for s in &r.snapshots {
                    println!("{}", serde_json::to_string(s)?);
                }
            } else {
                show(&r);
            }
        }
        SnapshotCmd::Delete { id, repo } => {
            admin_run(
                &repo.repo,
                &admin::Request::SnapshotDelete { id: id.clone() },
            )?;
            println!("deleted snapshot {id} (its space is freed by the next maintenance run)");
        }
        SnapshotCmd::Protect { id, repo, until } => {
            let until_us = until.as_deref().map(when).transpose()?.unwrap_or(i64::MAX);
            show(&admin_run(
                &repo.repo,
                &admin::Request::SnapshotProtect { id, until_us },
            )?);
        }
        SnapshotCmd::Unprotect { id, repo } => {
            show(&admin_run(
                &repo.repo,
                &admin::Request::SnapshotProtect { id, until_us: 0 },
            )?);
        }
        SnapshotCmd::Lock { id, repo, until } => {
            let until_us = when(&until)?;
            show(&admin_run(
                &repo.repo,
                &admin::Request::SnapshotLock { id, until_us },
            )?);
        }
    }
    Ok(())
}

pub fn audit(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Show { repo, since, json } => {
            let since_us = match since {
                // `7d` means the last seven days here, not seven days ahead.
                Some(s) => match coffer_proto::when::parse_duration_secs(&s) {
                    Ok(secs) => {
                        coffer_proto::now_us()
                            - i64::try_from(secs).unwrap_or(i64::MAX / 2_000_000) * 1_000_000
                    }
                    Err(_) => when(&s)?,
                },
                None => 0,
            };
            let r = admin_run(&repo.repo, &admin::Request::AuditShow { since_us })?;
            for e in &r.audit {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    let outcome = match e.outcome {
                        coffer_appliance::audit::Outcome::Done => "done",
                        coffer_appliance::audit::Outcome::Refused => "REFUSED",
                    };
                    println!(
                        "{:>6}  {}  {:<8} {:<22} {} {}{}",
                        e.seq,
                        format_us(e.time_us),
                        outcome,
                        e.action,
                        e.actor,
                        e.target,
                        if e.detail.is_empty() {
                            String::new()
                        } else {
                            format!("  ({})", e.detail)
                        }
                    );
                }
            }
        }
        AuditCmd::Verify { repo } => {
            let r = admin_run(&repo.repo, &admin::Request::AuditVerify)?;
            let v = r.verified.unwrap_or_default();
            for p in &v.problems {
                println!("FAIL: {p}");
            }
            let head = v.head.as_ref().map_or("none".to_string(), |h| {
                format!("entry {} hash {}", h.seq, h.hash)
            });
            if !v.problems.is_empty() {
                println!(
                    "audit log: {} entries, {} problems (head: {head})",
                    v.entries,
                    v.problems.len()
                );
                return Ok(ExitCode::from(1));
            }
            println!(
                "audit log intact: {} entries, chain verified (head: {head})",
                v.entries
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
