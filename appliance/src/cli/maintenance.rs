//! `maintenance run [--dry-run]`: forget the snapshots retention no longer keeps.

use coffer_appliance::admin;

use super::accounts::admin_run;
use super::RepoArg;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// List what retention keeps (and why) and what it would forget; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Decide as if it were this time (microseconds since the epoch; tests).
    #[arg(long, hide = true)]
    now_us: Option<i64>,
}

pub fn run(a: &RunArgs) -> anyhow::Result<()> {
    let r = admin_run(
        &a.repo.repo,
        &admin::Request::MaintenanceRun {
            dry_run: a.dry_run,
            now_us: a.now_us,
        },
    )?;
    for v in &r.verdicts {
        if v.kept() {
            println!(
                "keep   {} {}:{} ({})",
                v.snapshot,
                v.identity,
                v.path,
                v.kept_because.join(", ")
            );
        } else {
            println!("forget {} {}:{}", v.snapshot, v.identity, v.path);
        }
    }
    let forget = r.verdicts.iter().filter(|v| !v.kept()).count();
    if a.dry_run {
        println!("dry run: {forget} snapshots would be forgotten, nothing changed");
    } else {
        println!(
            "forgot {} snapshots; their space is reclaimed by garbage collection, which this \
             version does not run yet (docs/maintenance.md)",
            r.forgotten
        );
    }
    Ok(())
}
