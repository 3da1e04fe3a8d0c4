//! `policy set|show|list|delete`: the policies the appliance serves (through the running
//! appliance if there is one: in force at once).

use std::path::PathBuf;

use clap::Subcommand;
use coffer_appliance::{admin, Policy};

use super::accounts::admin_run;
use super::RepoArg;

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Set fields of the policy at TARGET (`global`, `@host`, `user@host`, `user@host:/path`);
    /// fields not given keep their stored value, `--unset FIELD` returns one to inheritance.
    Set {
        target: String,
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        fields: Fields,
        /// Fields to clear at this level (inherited again), e.g. `--unset keep_daily`.
        #[arg(long, value_name = "FIELD")]
        unset: Vec<String>,
    },
    /// The effective policy of IDENTITY backing up PATH, each field with the level it came from.
    Show {
        identity: String,
        path: PathBuf,
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Every stored policy.
    List {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Delete the policy at TARGET (its fields are inherited again).
    Delete {
        target: String,
        #[command(flatten)]
        repo: RepoArg,
    },
}

/// Policy fields as flags.
#[derive(clap::Args, Debug)]
pub struct Fields {
    #[arg(long)]
    keep_last: Option<u32>,
    #[arg(long)]
    keep_hourly: Option<u32>,
    #[arg(long)]
    keep_daily: Option<u32>,
    #[arg(long)]
    keep_weekly: Option<u32>,
    #[arg(long)]
    keep_monthly: Option<u32>,
    #[arg(long)]
    keep_yearly: Option<u32>,
    /// Keep every snapshot newer than this many seconds.
    #[arg(long, value_name = "SECS")]
    keep_within_secs: Option<u64>,
    /// `none`, `zstd:N` or `lz4`.
    #[arg(long)]
    compression: Option<String>,
    /// A gitignore-syntax pattern (repeat for several; replaces the inherited list).
    #[arg(long = "exclude", value_name = "PATTERN")]
    excludes: Vec<String>,
    #[arg(long)]
    exclude_caches: Option<bool>,
    #[arg(long)]
    one_file_system: Option<bool>,
    #[arg(long, value_name = "BYTES")]
    max_file_size: Option<u64>,
    /// An interval (`6h`) or a calendar expression (`daily 02:30`).
    #[arg(long)]
    schedule: Option<String>,
    /// Retention lock (compliance mode): every snapshot committed under this policy cannot be
    /// deleted, forgotten or unprotected by anyone for this long (`30d`, `1y`).
    #[arg(long, value_name = "DURATION", value_parser = coffer_proto::when::parse_duration_secs)]
    lock: Option<u64>,
}

impl Fields {
    fn policy(self) -> anyhow::Result<Policy> {
        if let Some(c) = &self.compression {
            let ok = c == "none"
                || c == "lz4"
                || c.strip_prefix("zstd:")
                    .and_then(|n| n.parse::<i32>().ok())
                    .is_some_and(|n| (1..=19).contains(&n));
            anyhow::ensure!(
                ok,
                "--compression {c:?}: expected none, lz4 or zstd:1 to zstd:19"
            );
        }
        Ok(Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within_secs: self.keep_within_secs,
            compression: self.compression,
            excludes: (!self.excludes.is_empty()).then_some(self.excludes),
            exclude_caches: self.exclude_caches,
            one_file_system: self.one_file_system,
            max_file_size: self.max_file_size,
            schedule: self.schedule,
            lock_secs: self.lock,
        })
    }
}

fn print(target: &str, p: &Policy) -> anyhow::Result<()> {
    println!("{target} {}", serde_json::to_string(p)?);
    Ok(())
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Set {
            target,
            repo,
            fields,
            unset,
        } => {
            let policy = fields.policy()?;
            let r = admin_run(
                &repo.repo,
                &admin::Request::PolicySet {
                    target,
                    policy,
                    unset,
                },
            )?;
            for (t, p) in &r.policies {
                print(t, p)?;
            }
        }
        PolicyCmd::Show {
            identity,
            path,
            repo,
        } => {
            let r = admin_run(
                &repo.repo,
                &admin::Request::PolicyShow {
                    identity,
                    path: path.to_string_lossy().into_owned(),
                },
            )?;
            if r.effective.is_empty() {
                println!(
                    "# no policy applies: nothing is scheduled and retention keeps everything"
                );
            }
            for f in &r.effective {
                println!("{} = {}  (from {})", f.field, f.value, f.from);
            }
        }
        PolicyCmd::List { repo } => {
            for (t, p) in &admin_run(&repo.repo, &admin::Request::PolicyList)?.policies {
                print(t, p)?;
            }
        }
        PolicyCmd::Delete { target, repo } => {
            admin_run(
                &repo.repo,
                &admin::Request::PolicyDelete {
                    target: target.clone(),
                },
            )?;
            println!("deleted the policy at {target}");
        }
    }
    Ok(())
}
