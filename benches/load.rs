//! L1 (issue 14): 1,000 authenticated sessions held open at once (each on its own connection,
//! over 40 accounts), 50 of them uploading while another restores and maintenance (retention and
//! garbage collection) runs, with 0 %, 50 % and 95 % of the uploaded data shared between
//! uploaders.
//!
//! Each uploader sends `COFFER_L1_MIB` (16) MiB as 64 KiB chunks in batches of 64: `FindMissing`
//! for the batch, then `PutChunks` for what is missing, like a backup's upload stage. Reported
//! per overlap: errors (any failed call), `FindMissing` latency per batch (p50, p99), upload
//! throughput, and the appliance's resident memory.
//!
//! One pass, not criterion. Run with `cargo bench -p coffer-benches --bench load`
//! (`COFFER_L1_SESSIONS`, `COFFER_L1_UPLOADERS` to change the counts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coffer_tests::{data, frame, proc_status_kib, Appliance};
use futures::StreamExt;

const ACCOUNTS: usize = 40;
const CHUNK: usize = 64 << 10;
const BATCH: usize = 64;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn account(i: usize) -> String {
    format!("user{i}@host{i}")
}

/// The `pct`-th percentile of `sorted` (nearest rank below).
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() - 1) * pct / 100]
}

/// The frames uploader `who` sends in `round`: chunk `k` is shared by every uploader when its
/// hash falls under `overlap_pct`, else the uploader's own. Made before the clock starts, so that
/// the client's hashing and compressing do not count as the appliance's latency.
fn frames_for(
    s: &coffer_client::Session,
    who: u64,
    round: u64,
    chunks: usize,
    overlap_pct: u64,
) -> Vec<coffer_client::Frame> {
    (0..chunks as u64)
        .map(|k| {
            let shared = (k.wrapping_mul(2_654_435_761) ^ round) % 100 < overlap_pct;
            let seed = if shared {
                round << 40 | k
            } else {
                round << 40 | 1 << 39 | who << 20 | k
            };
            frame(s, Bytes::from(data(seed, CHUNK, false)))
        })
        .collect()
}

/// Uploads `all` in batches of [`BATCH`]: `FindMissing`, then `PutChunks` for what is missing.
/// Answers the `FindMissing` latencies.
async fn upload(
    s: coffer_client::Session,
    all: Vec<coffer_client::Frame>,
    errors: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
) -> Vec<Duration> {
    let mut lat = Vec::new();
    let mut all = all.into_iter().peekable();
    while all.peek().is_some() {
        let frames: Vec<_> = all.by_ref().take(BATCH).collect();
        let ids: Vec<_> = frames.iter().map(|f| f.id).collect();
        let t = Instant::now();
        let need = match s.need(&ids).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("FindMissing failed: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        lat.push(t.elapsed());
        let todo: Vec<_> = frames
            .into_iter()
            .zip(need)
            .filter(|(_, n)| *n != coffer_client::Need::Present)
            .map(|(f, _)| f)
            .collect();
        let bytes: u64 = todo.iter().map(|f| f.data.len() as u64).sum();
        match s.put(todo, 8 << 20).await {
            Ok(_) => {
                sent.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("PutChunks failed: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    lat
}

#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
fn main() {
    let sessions = usize::try_from(env("COFFER_L1_SESSIONS", 1000)).expect("count");
    let uploaders = usize::try_from(env("COFFER_L1_UPLOADERS", 50)).expect("count");
    let chunks = usize::try_from(env("COFFER_L1_MIB", 16) << 20).expect("size") / CHUNK;
    let base = std::env::var_os("COFFER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let users: Vec<String> = (0..ACCOUNTS).map(account).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &user_refs).expect("init");
    app.serve_args = ["--maintenance-at", "off"].map(String::from).to_vec();
    app.start().expect("serve");
    println!(
        "setup: {ACCOUNTS} accounts in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let pid = app.pid().expect("pid");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    let t = Instant::now();
    let held: Vec<coffer_client::Session> = rt.block_on(async {
        let mut out = Vec::with_capacity(sessions);
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        while out.len() < sessions {
            // Four at a time: attempts in flight count against the login throttle until they
            // succeed (S4), and a whole fleet here shares one source address.
            while pending.len() < 4 && next < sessions {
                let o = app.options(&users[next % ACCOUNTS]);
                pending.push(async move { coffer_client::Session::connect(&o).await });
                next += 1;
            }
            out.push(pending.next().await.expect("a login").expect("login"));
        }
        out
    });
    println!(
        "{sessions} sessions logged in, each on its own connection, in {:.1} s; appliance \
         resident {} MiB",
        t.elapsed().as_secs_f64(),
        proc_status_kib(pid, "VmRSS:") >> 10
    );

    // What the restorer reads back: one uploader's data from the first round.
    let mut restore_ids = Vec::new();
    for (round, overlap) in [0u64, 50, 95].into_iter().enumerate() {
        let round = round as u64 + 1;
        let errors = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Maintenance beside the uploads, as often as it completes.
        let maint = {
            let (repo, stop) = (app.repo_str(), stop.clone());
            std::thread::spawn(move || {
                let mut runs = 0;
                let off = std::env::var_os("COFFER_L1_NO_MAINTENANCE").is_some();
                while !off && !stop.load(Ordering::Relaxed) {
                    let out = std::process::Command::new(coffer_tests::bin("coffer-appliance"))
                        .args(["maintenance", "run", "--repo", &repo])
                        .env("COFFER_REPO_PASSWORD", coffer_tests::REPO_PASSWORD)
                        .output()
                        .expect("running maintenance");
                    assert!(
                        out.status.success(),
                        "maintenance run failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    runs += 1;
                }
                runs
            })
        };
        let work: Vec<Vec<coffer_client::Frame>> = std::thread::scope(|sc| {
            let hs: Vec<_> = held
                .iter()
                .take(uploaders)
                .enumerate()
                .map(|(k, s)| sc.spawn(move || frames_for(s, k as u64, round, chunks, overlap)))
                .collect();
            hs.into_iter().map(|h| h.join().expect("frames")).collect()
        });
        // A prober on a thread of its own: FindMissing for 64 ids every 5 ms, as a client that
        // is not itself busy sees it.
        let probe = {
            let (s, stop) = (held[uploaders + 1].clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("prober runtime");
                rt.block_on(async {
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let ids: Vec<_> = (0..BATCH)
                            .map(|_| coffer_proto::ChunkId::from_bytes(rand::random()))
                            .collect();
                        let t = Instant::now();
                        s.need(&ids).await.expect("probe");
                        lat.push(t.elapsed());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    lat
                })
            })
        };
        let t = Instant::now();
        let (lat, restored) = rt.block_on(async {
            let mut tasks = Vec::new();
            for (s, frames) in held.iter().zip(work) {
                tasks.push(tokio::spawn(upload(
                    s.clone(),
                    frames,
                    errors.clone(),
                    sent.clone(),
                )));
            }
            // A restore meanwhile: the reader session reads back what it uploaded last round.
            let reader = held[uploaders].clone();
            let ids = std::mem::take(&mut restore_ids);
            let restore = tokio::spawn(async move {
                if ids.is_empty() {
                    return 0;
                }
                let n = reader.get(&ids).await.expect("restore").len();
                n
            });
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await.expect("uploader"));
            }
            (lat, restore.await.expect("restore"))
        });
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let runs = maint.join().expect("maintenance");
        let mut probed = probe.join().expect("prober");
        probed.sort();
        // The next round's restore reads what the reader uploads now.
        let reader = held[uploaders].clone();
        restore_ids = rt.block_on(async {
            let frames: Vec<_> = (0..chunks as u64)
                .map(|k| {
                    frame(
                        &reader,
                        Bytes::from(data(round << 40 | 1 << 38 | k, CHUNK, false)),
                    )
                })
                .collect();
            let ids = frames.iter().map(|f| f.id).collect::<Vec<_>>();
            reader.put(frames, 8 << 20).await.expect("reader's upload");
            ids
        });
        let mut lat = lat;
        lat.sort();
        let logical = (uploaders * chunks * CHUNK) as f64;
        println!(
            "overlap {overlap:>2} %: {uploaders} uploaders x {} MiB in {secs:.1} s ({:.0} MiB/s \
             logical, {:.0} MiB/s sent); FindMissing per batch of {BATCH}: prober p50 {:.2} ms, \
             p99 {:.2} ms ({} calls), uploaders p50 {:.2} ms, p99 {:.2} ms; errors {}; restore {} \
             chunks; maintenance runs {runs}; appliance resident {} MiB (peak {} MiB); {} \
             sessions open",
            (chunks * CHUNK) >> 20,
            logical / secs / f64::from(1 << 20),
            sent.load(Ordering::Relaxed) as f64 / secs / f64::from(1 << 20),
            percentile(&probed, 50).as_secs_f64() * 1e3,
            percentile(&probed, 99).as_secs_f64() * 1e3,
            probed.len(),
            percentile(&lat, 50).as_secs_f64() * 1e3,
            percentile(&lat, 99).as_secs_f64() * 1e3,
            errors.load(Ordering::Relaxed),
            restored,
            proc_status_kib(pid, "VmRSS:") >> 10,
            proc_status_kib(pid, "VmHWM:") >> 10,
            held.len()
        );
        assert_eq!(errors.load(Ordering::Relaxed), 0, "calls failed under load");
    }
    drop(held);
    app.stop().expect("stop");
}
