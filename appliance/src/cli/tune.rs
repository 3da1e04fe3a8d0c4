//! `tune`: the hardware found and the plan `serve` would apply.

use std::path::PathBuf;

use coffer_appliance::RepoPaths;

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// Shards to plan for (default: the repository's with --repo, else all CPUs).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Repository to plan for (its shard count and the disks under it).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &TuneArgs) -> anyhow::Result<()> {
    let (hw, repo_shards) = match &a.repo {
        Some(r) => {
            let cfg = RepoPaths::new(r).load_config()?;
            (
                coffer_tuning::Hardware::detect_for(r),
                Some(usize::from(cfg.shards)),
            )
        }
        None => (coffer_tuning::Hardware::detect(), None),
    };
    let n = a.shards.or(repo_shards).unwrap_or(hw.cpus.len());
    let plan = coffer_tuning::Plan::new(&hw, n)?;
    if a.json {
        println!("{}", serde_json::json!({ "hardware": hw, "plan": plan }));
    } else {
        println!(
            "cpus: {:?} ({} physical cores: {:?})\nfeatures: {:?}\nmemlock: {}\n\
             memory: {} MiB\nio_uring: kernel {}, io_uring_disabled={}\ndisks: {:?}",
            hw.cpus,
            hw.cores.len(),
            hw.cores,
            hw.features,
            hw.memlock_bytes,
            hw.memory_bytes >> 20,
            hw.io_uring.kernel,
            hw.io_uring.disabled,
            hw.disks
        );
        for s in &plan.shards {
            println!("shard {} -> cpu {}", s.shard, s.cpu);
        }
        println!(
            "network threads: {} (floating)\nio_uring depth: {}, registered buffers: {} KiB \
             per shard\npack target: {} MiB\nindex cache: {} MiB per shard",
            plan.network_threads,
            plan.ring_depth,
            plan.io_memory_per_shard >> 10,
            plan.pack_target_bytes >> 20,
            plan.index_cache_bytes >> 20
        );
        let l = &plan.limits;
        println!(
            "limits (serve flags override):\n  connections: {} (--max-connections), streams: {} \
             per connection, {} per account, {} messages per stream\n  idle: connection {} s, \
             stream {} s; admission wait {} s\n  read budget: {} MiB; uploads: {} MiB per \
             account, {} MiB queued per shard\n  session chunk ids: {} per session, {} in all",
            l.connections,
            l.streams_per_connection,
            l.streams_per_account,
            l.messages_per_stream,
            l.idle_secs,
            l.stream_idle_secs,
            l.admission_wait_secs,
            l.read_budget_bytes >> 20,
            l.upload_bytes_per_account >> 20,
            l.shard_queue_bytes >> 20,
            l.session_chunks,
            l.all_session_chunks
        );
        for a in &plan.advice {
            println!("advice: {a}");
        }
    }
    Ok(())
}
