//! L2 (issue 14): `FindMissing` against a repository index of 10⁸ entries, through the real
//! appliance over loopback TLS.
//!
//! 1. `init` a repository (`COFFER_L2_SHARDS` shards, 2 by default) and bulk-load
//!    `COFFER_L2_CHUNKS` synthetic entries (10⁸ by default) into its shard indexes: the same
//!    records a group commit writes (uniform ids routed by `ShardId::for_chunk`, index entries
//!    in 4,096-record packs), one loader thread per shard.
//! 2. `serve`: time from start to listening (the need set is loaded from the index before the
//!    appliance listens, every shard in parallel), resident memory then, and per entry; then a
//!    second start (what an operator's restart costs, with the file cache warm).
//! 3. After it, `FindMissing` from `COFFER_L2_SESSIONS` sessions at once (4), each for
//!    `COFFER_L2_SECS` (20): calls of 1,000 ids (half stored, half never stored, in random order) for the
//!    per-batch latency, then calls of 65,536 ids for throughput.
//!
//! One pass, not criterion. Run with `cargo bench -p coffer-benches --bench index_scale`;
//! `COFFER_BENCH_DIR` picks the disk (about 80 bytes per entry).

use std::time::{Duration, Instant};

use coffer_appliance::pack::format::IndexEntry;
use coffer_appliance::{ChunkIndex, OpenMode, RepoPaths, RocksIndex};
use coffer_proto::{ChunkId, PackId, ShardId};
use coffer_tests::{proc_status_kib, Appliance};

const USER: &str = "bench@host";

/// The `i`-th synthetic id: uniformly spread, like keyed BLAKE3 outputs.
fn id(i: u64) -> ChunkId {
    ChunkId::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Loads the entries of ids `0..n` that shard `s` owns.
fn load_shard(paths: &RepoPaths, s: u16, shards: u16, n: u64) -> u64 {
    let idx = RocksIndex::open(
        &paths.shard_index(ShardId(s)),
        OpenMode::Existing,
        256 << 20,
    )
    .expect("shard index");
    let mut batch = Vec::with_capacity(65_536);
    let mut mine = 0u64;
    for i in 0..n {
        let c = id(i);
        if ShardId::for_chunk(&c, shards) != ShardId(s) {
            continue;
        }
        let mut pack = [0u8; 16];
        pack[..8].copy_from_slice(&(mine / 4096).to_le_bytes());
        pack[8..10].copy_from_slice(&s.to_le_bytes());
        batch.push((
            c,
            IndexEntry {
                flags: 0,
                pack: PackId::from_bytes(pack),
                offset: 64 + (mine % 4096) * 65_600,
                len: 65_600,
                raw_len: 65_536,
                digest: None,
                uploader: None,
            },
        ));
        mine += 1;
        if batch.len() == batch.capacity() {
            idx.insert_batch(&batch, false).expect("insert");
            batch.clear();
        }
    }
    idx.insert_batch(&batch, true).expect("insert");
    mine
}

/// The `pct`-th percentile of `sorted` (nearest rank below).
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() - 1) * pct / 100]
}

/// Calls of `per` ids (half below `n`: stored) from one session for `secs`; answers each
/// call's latency and the ids asked.
async fn ask(
    s: coffer_client::Session,
    n: u64,
    per: usize,
    secs: u64,
    seed: u64,
) -> (Vec<Duration>, u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut lat = Vec::new();
    let mut asked = 0u64;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let ids: Vec<ChunkId> = (0..per)
            .map(|k| {
                if k % 2 == 0 {
                    id(rng.gen_range(0..n))
                } else {
                    id(n + rng.gen_range(0..u64::MAX / 2))
                }
            })
            .collect();
        let t = Instant::now();
        let need = s.need(&ids).await.expect("FindMissing");
        lat.push(t.elapsed());
        asked += ids.len() as u64;
        let missing = need
            .iter()
            .filter(|x| **x == coffer_client::Need::Missing)
            .count();
        // The account stored nothing: every id reads as missing (user disclosure), and the
        // appliance still looked each one up (need set, then the account's ownership records).
        assert_eq!(missing, per);
    }
    (lat, asked)
}

#[allow(clippy::cast_precision_loss)]
fn main() {
    let n = env("COFFER_L2_CHUNKS", 100_000_000);
    let shards = u16::try_from(env("COFFER_L2_SHARDS", 2)).expect("shards");
    let sessions = env("COFFER_L2_SESSIONS", 4);
    let secs = env("COFFER_L2_SECS", 20);
    let base = std::env::var_os("COFFER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    if std::env::var_os("COFFER_L2_KEEP").is_some() {
        println!("keeping {}", dir.path().display());
    }
    let mut app = Appliance::init(dir.path(), shards, 1 << 20, &[USER]).expect("init");
    let paths = RepoPaths::new(&app.repo);

    let t = Instant::now();
    let loaded: u64 = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..shards)
            .map(|s| {
                let paths = &paths;
                sc.spawn(move || load_shard(paths, s, shards, n))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("loader")).sum()
    });
    assert_eq!(loaded, n);
    let load_s = t.elapsed().as_secs_f64();
    println!(
        "load: {n} entries in {load_s:.1} s ({:.2} M/s)",
        n as f64 / load_s / 1e6
    );
    let disk: u64 = walk_size(&app.repo.join("index"));
    println!(
        "index on disk: {:.2} GiB ({:.1} bytes per entry)",
        disk as f64 / f64::from(1 << 30),
        disk as f64 / n as f64
    );

    app.serve_args = ["--maintenance-at", "off"].map(String::from).to_vec();
    let t = Instant::now();
    app.start().expect("serve");
    let startup = t.elapsed();
    let pid = app.pid().expect("pid");
    let rss = proc_status_kib(pid, "VmRSS:") * 1024;
    println!(
        "startup: {:.1} s to listening; resident {:.2} GiB ({:.1} bytes per entry)",
        startup.as_secs_f64(),
        rss as f64 / f64::from(1 << 30),
        rss as f64 / n as f64
    );

    app.stop().expect("stop");
    // A second start: what an operator's restart costs (the file cache is warm; RocksDB may
    // still be compacting after the bulk load).
    let t = Instant::now();
    app.start().expect("serve again");
    println!(
        "restart: {:.1} s to listening; resident {:.2} GiB",
        t.elapsed().as_secs_f64(),
        (proc_status_kib(app.pid().expect("pid"), "VmRSS:") * 1024) as f64 / f64::from(1 << 30)
    );
    let pid = app.pid().expect("pid");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (per, what) in [(1_000usize, "1,000-id calls"), (65_536, "65,536-id calls")] {
        let (mut lat, asked) = rt.block_on(async {
            let mut tasks = Vec::new();
            for k in 0..sessions {
                let s = app.session(USER).await.expect("session");
                tasks.push(tokio::spawn(ask(s, n, per, secs, k)));
            }
            let mut lat = Vec::new();
            let mut asked = 0;
            for t in tasks {
                let (l, a) = t.await.expect("task");
                lat.extend(l);
                asked += a;
            }
            (lat, asked)
        });
        lat.sort();
        println!(
            "FindMissing, {what}, {sessions} sessions: {:.2} M ids/s; per call p50 {:.2} ms, p99 \
             {:.2} ms, max {:.2} ms ({} calls)",
            asked as f64 / secs as f64 / 1e6,
            percentile(&lat, 50).as_secs_f64() * 1e3,
            percentile(&lat, 99).as_secs_f64() * 1e3,
            lat.last().expect("calls").as_secs_f64() * 1e3,
            lat.len()
        );
    }
    let peak = proc_status_kib(pid, "VmHWM:") * 1024;
    println!(
        "appliance peak resident: {:.2} GiB",
        peak as f64 / f64::from(1 << 30)
    );
    app.stop().expect("stop");
    if std::env::var_os("COFFER_L2_KEEP").is_some() {
        std::mem::forget(dir);
    }
}

fn walk_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p).map_or(0, |d| {
        d.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk_size(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}
