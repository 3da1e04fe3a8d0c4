//! Garbage collection (issue 12, item 3): space comes back, a SIGKILL anywhere inside forget,
//! mark, sweep and compaction loses nothing, and maintenance in a loop beside four clients that
//! back up, delete and back up again never loses a chunk a kept snapshot needs.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use coffer_tests::{admin, assert_restores, coffer, connect_client, create_snapshot, Appliance};

const ALICE: &str = "alice@laptop";

/// Bytes the repository's packs take on disk, as `du` counts them.
fn du(repo: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(repo.join("packs"))
        .output()
        .expect("du runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a size")
}

/// Writes `files` files of `len` pseudo-random (incompressible) bytes named `{prefix}{k}` into
/// `dir`, the k-th from seed `seed + k`.
fn fill(dir: &Path, prefix: &str, seed: u64, files: u64, len: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..files {
        std::fs::write(
            dir.join(format!("{prefix}{k:02}")),
            coffer_tests::data(seed + k, len, false),
        )
        .unwrap();
    }
}

fn appliance(dir: &Path, pack_target: u64) -> Appliance {
    let mut app = Appliance::init(dir, 2, 64 << 10, &[ALICE]).unwrap();
    app.pack_target = Some(pack_target);
    app.serve_args = vec!["--gc-grace".into(), "0".into()];
    app.start().unwrap();
    app
}

/// How many chunks a `maintenance run` report says it removed.
fn removed_chunks(report: &str) -> u64 {
    report
        .split("removed ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn id_of(summary: &serde_json::Value) -> String {
    summary["snapshot"].as_str().unwrap().to_string()
}

fn verify_clean(app: &Appliance) {
    let (rc, text) = app.verify(true).unwrap();
    assert_eq!(rc, 0, "verify --read-data after garbage collection: {text}");
}

/// Reclaim: deleting the snapshot that alone references X bytes of unique data frees ≥ 90 % of
/// X on disk after one maintenance run (measured with `du`); what stays restores bit-exact.
#[test]
fn deleting_the_only_snapshot_of_data_frees_its_space() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    // Small packs: a shard's open pack (never deleted while open) holds little of X.
    let app = appliance(dir.path(), 512 << 10);
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let shared = dir.path().join("shared");
    fill(&shared, "s", 1, 4, MIB);
    let unique = dir.path().join("unique");
    fill(&unique, "u", 100, 16, MIB);
    let x = 16 * MIB as u64;
    let kept = id_of(&create_snapshot(&cfg, &shared));
    let gone = id_of(&create_snapshot(&cfg, &unique));
    let before = du(&app.repo);
    let (rc, out, err) = coffer(&cfg, &["snapshot", "delete", &gone]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    let report = admin(&app, &["maintenance", "run"]);
    let after = du(&app.repo);
    assert!(
        before.saturating_sub(after) * 10 >= x * 9,
        "freed {} of {x} bytes ({before} -> {after}): {report}",
        before.saturating_sub(after)
    );
    eprintln!(
        "reclaim: {before} -> {after} bytes on disk, {} freed of {x} unique ({:.1} %)",
        before - after,
        (before - after) as f64 * 100.0 / x as f64
    );
    verify_clean(&app);
    assert_restores(&cfg, &kept, &shared, &dir.path().join("restored"));
    // A second run finds nothing more to do.
    let again = admin(&app, &["maintenance", "run"]);
    assert!(again.contains("removed 0 unreachable chunks"), "{again}");
}

/// The kill points of forget, mark, sweep and compaction (see `appliance/src/faults.rs`); a point
/// with `@n` kills at its n-th passage.
const KILL_POINTS: &[&str] = &[
    "forget.deleted",
    "gc.mark-snapshot@3",
    "maintenance.forgotten",
    "gc.start",
    "gc.sealed",
    "gc.tables",
    "gc.mark-snapshot",
    "gc.marked",
    "gc.listed",
    "gc.barrier",
    "gc.pins",
    "shard.condemn.indexed",
    "gc.condemned-batch",
    "gc.condemned",
    "gc.live-counted",
    "store.unlinked",
    "shard.pack-deleted",
    "shard.pack-deleted@3",
    "gc.deleted-packs",
    "gc.compact-listed",
    "shard.rewrite.read",
    "pack.appended",
    "pack.indexed",
    "gc.rewrote-batch",
    "gc.compacted",
    "gc.checked-compacted",
    "gc.deleted-compacted",
];

/// One round's data: `p/` holds short-lived files (`e*`, `g*`) between long-lived ones (`k*`,
/// also backed up from `keep-N/`, which no policy forgets): once `p`'s snapshot is forgotten its
/// packs are partly dead (compaction) or wholly dead (`g*`, deletion).
fn round(base: &Path, i: u64) -> (PathBuf, PathBuf) {
    let p = base.join("p");
    let _ = std::fs::remove_dir_all(&p);
    let seed = 1_000 * (i + 1);
    fill(&p, "e", seed, 6, 48 << 10);
    fill(&p, "k", seed + 100, 6, 48 << 10);
    fill(&p, "z", seed + 200, 2, 700 << 10);
    let keep = base.join(format!("keep-{i}"));
    fill(&keep, "k", seed + 100, 6, 48 << 10);
    (p, keep)
}

/// Crash safety: the appliance is SIGKILLed at each kill point in turn while maintenance runs.
/// After each restart `verify --read-data` finds nothing wrong, every kept snapshot restores
/// bit-exact, and the next maintenance run completes the interrupted one.
#[test]
fn a_kill_anywhere_in_maintenance_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = appliance(base, 256 << 10);
    let cfg = base.join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let p_path = base.join("p");
    let target = format!("{ALICE}:{}", p_path.display());
    admin(&app, &["policy", "set", &target, "--keep-last", "1"]);
    let mut kept: Vec<(String, PathBuf)> = Vec::new();
    let (p, keep) = round(base, 0);
    let _ = id_of(&create_snapshot(&cfg, &p));
    kept.push((id_of(&create_snapshot(&cfg, &keep)), keep));
    let mut condemned = 0;
    for (i, point) in KILL_POINTS.iter().enumerate() {
        let (p, keep) = round(base, i as u64 + 1);
        let latest = id_of(&create_snapshot(&cfg, &p));
        kept.push((id_of(&create_snapshot(&cfg, &keep)), keep));
        // Restart with the kill point armed, and run maintenance into it.
        app.stop().unwrap();
        app.serve_env = vec![("COFFER_KILL_AT".into(), (*point).into())];
        app.start().unwrap();
        let out = app
            .run(&["maintenance", "run", "--repo", &app.repo_str()])
            .unwrap();
        assert!(
            !out.status.success(),
            "maintenance passed kill point {point} without reaching it: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let status = app.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{point}: {}", app.log_tail());
        app.serve_env.clear();
        app.start().unwrap();
        // A new start listens on a new port.
        connect_client(&app, &cfg, "alice", "laptop");
        verify_clean(&app);
        let restored = base.join(format!("restored-{i}"));
        std::fs::create_dir_all(&restored).unwrap();
        assert_restores(&cfg, &latest, &p, &restored.join("p"));
        for (id, src) in kept.iter().rev().take(3) {
            assert_restores(&cfg, id, src, &restored.join(id));
        }
        // The next run completes what the killed one began.
        let report = admin(&app, &["maintenance", "run"]);
        condemned += removed_chunks(&report);
        verify_clean(&app);
        assert_restores(&cfg, &latest, &p, &restored.join("p-again"));
    }
    // Every kept snapshot, from the first round on.
    std::fs::create_dir_all(base.join("final")).unwrap();
    for (id, src) in &kept {
        assert_restores(&cfg, id, src, &base.join("final").join(id));
    }
    // Collection really happened: what is left is about the live data (the `k` files of every
    // round and the last round's `p`), not everything ever written (~2 MiB a round).
    let (bytes, _) = app.pack_bytes().unwrap();
    let live = (KILL_POINTS.len() as u64 + 1) * 6 * (48 << 10) + (2 << 20);
    assert!(
        bytes < live * 2,
        "{bytes} bytes of packs left; about {live} are live ({condemned} condemned on reruns)"
    );
}

/// Writes one backup round of a client: 5 files built from a shared pool of 24 KiB blocks
/// (other clients and rounds reuse them: chunks are shared, freed and uploaded again) and one
/// file of its own.
fn concurrent_round(dir: &Path, client: u64, round: u64) {
    const BLOCK: usize = 24 << 10;
    std::fs::create_dir_all(dir).unwrap();
    let mut x = (client * 1_000 + round).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for f in 0..5 {
        let mut body = Vec::new();
        for _ in 0..6 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.extend(coffer_tests::data(x % 40, BLOCK, false));
        }
        std::fs::write(dir.join(format!("f{f}")), body).unwrap();
    }
    std::fs::write(
        dir.join("own"),
        coffer_tests::data(1_000_000 + client * 10_000 + round, 100 << 10, false),
    )
    .unwrap();
}

/// C5/C6: maintenance runs in a loop (grace window 0) while four clients back up overlapping
/// data, delete older snapshots and back up again, for two minutes. Every snapshot still kept
/// restores bit-exact afterwards, `verify --read-data` finds nothing wrong, and the collector
/// did remove chunks meanwhile (the test is not vacuous).
#[test]
fn maintenance_in_a_loop_beside_four_busy_clients_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const CLIENTS: [&str; 4] = ["alice", "bob", "carol", "dave"];
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let users: Vec<String> = CLIENTS.iter().map(|c| format!("{c}@laptop")).collect();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut app = Appliance::init(&base, 2, 64 << 10, &users).unwrap();
    app.pack_target = Some(256 << 10);
    app.serve_args = vec!["--gc-grace".into(), "0".into()];
    app.set_disclosure("repository").unwrap();
    app.start().unwrap();
    for c in CLIENTS {
        connect_client(&app, &base.join(format!("{c}.toml")), c, "laptop");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(2);
    let clients: Vec<_> = (0..CLIENTS.len())
        .map(|n| {
            let base = base.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let cfg = base.join(format!("{}.toml", CLIENTS[n]));
                let mut kept: Vec<(String, PathBuf)> = Vec::new();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // One path per client, backed up again and again: each snapshot builds on
                    // the previous one (its parent), which may just have been deleted.
                    let src = base.join(format!("src-{n}"));
                    let _ = std::fs::remove_dir_all(&src);
                    concurrent_round(&src, n as u64, round);
                    let id = id_of(&create_snapshot(&cfg, &src));
                    let copy = base.join(format!("copy-{n}-{round}"));
                    std::fs::rename(&src, &copy).unwrap();
                    kept.push((id, copy));
                    // Keep about three: delete the oldest but one, or the oldest.
                    if kept.len() > 3 {
                        let (old, path) = kept.remove(usize::from(round % 2 == 1));
                        let (rc, out, err) = coffer(&cfg, &["snapshot", "delete", &old]).unwrap();
                        assert_eq!(rc, 0, "{out}{err}");
                        std::fs::remove_dir_all(path).unwrap();
                    }
                    round += 1;
                }
                (kept, round)
            })
        })
        .collect();
    let mut runs = 0;
    let mut removed = 0u64;
    while std::time::Instant::now() < deadline {
        let report = admin(&app, &["maintenance", "run"]);
        removed += removed_chunks(&report);
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (kept, rounds): (Vec<Vec<(String, PathBuf)>>, Vec<u64>) =
        clients.into_iter().map(|c| c.join().unwrap()).unzip();
    assert!(removed > 0, "{runs} maintenance runs removed nothing");
    assert!(
        rounds.iter().all(|r| *r >= 4),
        "every client backed up and deleted during maintenance: {rounds:?}"
    );
    // One more run after the clients stopped, then everything kept must be intact.
    admin(&app, &["maintenance", "run"]);
    verify_clean(&app);
    let out = base.join("restored");
    std::fs::create_dir_all(&out).unwrap();
    let mut snapshots = 0;
    for (n, list) in kept.iter().enumerate() {
        let cfg = base.join(format!("{}.toml", CLIENTS[n]));
        for (id, src) in list {
            assert_restores(&cfg, id, src, &out.join(id));
            snapshots += 1;
        }
    }
    eprintln!(
        "{runs} maintenance runs removed {removed} chunks while the clients made {rounds:?} \
         backups; {snapshots} kept snapshots restore"
    );
}
