//! `maintenance run [--dry-run]`: forget the snapshots retention no longer keeps, then collect
//! garbage (in the running appliance).

use coffer_appliance::admin;
use coffer_appliance::human_bytes as bytes;

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
    let gc = r.gc.unwrap_or_default();
    if a.dry_run {
        println!(
            "dry run: {forget} snapshots would be forgotten; {} chunks ({}) would be removed; \
             nothing changed",
            gc.condemned,
            bytes(gc.condemned_bytes)
        );
    } else {
        println!(
            "forgot {} snapshots; removed {} unreachable chunks ({}); deleted {} packs, \
             compacted {} (moved {} records, {}); freed {} on disk",
            r.forgotten,
            gc.condemned,
            bytes(gc.condemned_bytes),
            gc.packs_deleted,
            gc.packs_compacted,
            gc.records_moved,
            bytes(gc.bytes_moved),
            bytes(gc.bytes_deleted.saturating_sub(gc.bytes_moved))
        );
        if gc.packs_retained > 0 {
            println!(
                "kept {} packs that the bucket retains for locked snapshots (S3 Object Lock)",
                gc.packs_retained
            );
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Count per `user` (user@host) or per `host`.
    #[arg(long, default_value = "user", value_parser = ["user", "host"])]
    by: String,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn usage(a: &UsageArgs) -> anyhow::Result<()> {
    let by = if a.by == "host" {
        admin::UsageBy::Host
    } else {
        admin::UsageBy::User
    };
    let r = admin_run(&a.repo.repo, &admin::Request::Usage { by })?;
    let u = r.usage.unwrap_or_default();
    if a.json {
        println!("{}", serde_json::to_string(&u)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>9} {:>12} {:>12} {:>12}",
        "owner", "snapshots", "logical", "only theirs", "shared"
    );
    for o in &u.owners {
        println!(
            "{:<32} {:>9} {:>12} {:>12} {:>12}",
            o.owner,
            o.snapshots,
            bytes(o.logical_bytes),
            bytes(o.only_bytes),
            bytes(o.shared_bytes)
        );
    }
    println!(
        "stored bytes referenced by any snapshot (each chunk once): {}",
        bytes(u.referenced_bytes)
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// `status [--json]`: the running appliance's [`admin::StatusReport`].
pub fn status(a: &StatusArgs) -> anyhow::Result<()> {
    let s = admin_run(&a.repo.repo, &admin::Request::Status)?
        .status
        .ok_or_else(|| {
            anyhow::anyhow!("the appliance answered without a status (older version?)")
        })?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    let (days, hours, mins) = (
        s.uptime_secs / 86_400,
        s.uptime_secs / 3600 % 24,
        s.uptime_secs / 60 % 60,
    );
    println!("coffer-appliance {} ({} mode)", s.version, s.mode);
    println!(
        "started       {} (up {days}d {hours}h {mins}m)",
        coffer_proto::when::format_us(s.started_us)
    );
    println!(
        "shards        {} ({} index entries)",
        s.shards, s.index_entries
    );
    println!(
        "sessions      {} open, {} calls in progress",
        s.sessions, s.rpcs_in_flight
    );
    println!(
        "in flight     {} of uploads, {} of reads",
        bytes(s.upload_bytes_in_flight),
        bytes(s.read_bytes_in_flight)
    );
    println!(
        "since start   {} snapshots covering {}; {} received, {} of it new",
        s.snapshots_committed,
        bytes(s.logical_bytes),
        bytes(s.received_bytes),
        bytes(s.stored_bytes)
    );
    // Whole bytes per second are precise enough for a person.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rate = s.receive_rate_1m.max(0.0) as u64;
    println!("receiving     {}/s (last minute)", bytes(rate));
    println!(
        "disk          {} free of {}",
        bytes(s.disk_free_bytes),
        bytes(s.disk_size_bytes)
    );
    if s.maintenance_last_run_us == 0 {
        println!("maintenance   none since the start");
    } else {
        println!(
            "maintenance   last {} ({:.1} s); {} runs, {} failed, {} freed since the start",
            coffer_proto::when::format_us(s.maintenance_last_run_us),
            s.maintenance_last_duration_secs,
            s.maintenance_runs,
            s.maintenance_errors,
            bytes(s.maintenance_freed_bytes)
        );
    }
    Ok(())
}
