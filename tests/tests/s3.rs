//! Packs in an S3-compatible object store (issue 17), against a real Garage on 127.0.0.1: a
//! backup lives in the bucket and restores from it; `attach` serves it from an empty directory;
//! a crash between the local acknowledgement and the upload loses nothing; a second appliance is
//! refused the lease; the GC frees objects; errors, resets and stalls of the store lose nothing
//! acknowledged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use coffer_tests::garage::{FaultProxy, Garage, FAIL, PASS, STALL};
use coffer_tests::{admin, assert_restores, coffer, connect_client, create_snapshot, Appliance};

const ALICE: &str = "alice@laptop";

/// Files of pseudo-random bytes (incompressible: every byte must come back from a pack) and a
/// few small text files.
fn fill(dir: &Path, seed: u64, files: u64, len: usize) {
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    for k in 0..files {
        std::fs::write(
            dir.join(format!("blob-{seed}-{k:02}")),
            coffer_tests::data(seed * 100 + k, len, false),
        )
        .unwrap();
        std::fs::write(
            dir.join("notes").join(format!("n{seed}-{k}.txt")),
            format!("note {k} of set {seed}\n"),
        )
        .unwrap();
    }
}

/// `/metrics` of the running appliance (plain HTTP on loopback).
fn scrape(app: &Appliance) -> String {
    coffer_tests::scrape_metrics(app, None).1
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
}

fn id_of(summary: &serde_json::Value) -> String {
    summary["snapshot"].as_str().unwrap().to_string()
}

/// A repository in `dir/NAME/repo` whose packs live under `prefix` of the bucket, reached
/// through `endpoint`.
fn init(dir: &Path, name: &str, g: &Garage, prefix: &str, endpoint: &str) -> Appliance {
    let storage = g.storage_args(prefix, endpoint);
    let mut extra: Vec<&str> = vec!["--default-access", "full"];
    extra.extend(storage.iter().map(String::as_str));
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut app = Appliance::init_with(&d, 2, 64 << 10, &[ALICE], &extra).unwrap();
    app.pack_target = Some(256 << 10);
    app
}

/// `attach` of `prefix` into `dir/NAME/repo`; the outcome (exit code, output).
fn attach(dir: &Path, name: &str, g: &Garage, prefix: &str) -> (bool, String, Appliance) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let app = Appliance::existing(&d, &d.join("repo"));
    let mut args = vec!["attach".to_string(), "--repo".into(), app.repo_str()];
    args.extend(g.storage_args(prefix, &g.endpoint));
    let out = app
        .run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, app)
}

fn objects(g: &Garage, under: &str) -> Vec<(String, u64)> {
    g.objects(under).unwrap()
}

/// Bytes of pack files on the appliance's local disk (staging area and cache).
fn local_pack_bytes(repo: &Path) -> u64 {
    let mut n = 0;
    for sub in std::fs::read_dir(repo.join("packs")).unwrap().flatten() {
        if sub.file_name() == "catalog" || !sub.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            n += f.metadata().unwrap().len();
        }
    }
    n
}

/// Serves the attached copy and restores every snapshot bit-exact from it.
fn restore_all_from(app: &mut Appliance, dir: &Path, snaps: &[(String, PathBuf)]) {
    app.start().unwrap();
    let cfg = dir.join(format!("client-{}.toml", rand::random::<u32>()));
    connect_client(app, &cfg, "alice", "laptop");
    let (rc, out, err) = coffer(&cfg, &["snapshot", "list", "--json"]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    for (id, src) in snaps {
        assert!(
            out.contains(id.as_str()),
            "snapshot {id} missing after attach: {out}"
        );
        let target = dir.join(format!("restore-{}", rand::random::<u32>()));
        assert_restores(&cfg, id, src, &target);
    }
}

/// Backups land in the bucket (the local disk keeps only the cache's worth) and restore from it
/// with ranged reads; the bucket holds the repository file, wrapped keys and catalog journal;
/// `attach` on an empty directory brings back service and every snapshot.
#[test]
fn backups_live_in_the_bucket_and_attach_serves_them_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let g = Garage::start(&dir.path().join("garage"), "coffer").unwrap();
    let mut app = init(dir.path(), "a", &g, "site-a", &g.endpoint);
    // A cache of 512 KiB: uploaded packs leave the local disk, reads become ranged GETs.
    app.serve_args = vec!["--cache-size".into(), "512K".into()];
    app.start().unwrap();
    // Garage has no S3 Object Lock: the start says so (tests/tests/s3_lock.rs checks a store
    // that has it).
    let log = std::fs::read_to_string(&app.log).unwrap();
    assert!(
        log.contains("object lock not available")
            && log.contains("does not support S3 Object Lock (NotImplemented"),
        "the start does not say Garage lacks Object Lock: {log}"
    );
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let src1 = dir.path().join("src1");
    fill(&src1, 1, 8, 1 << 20);
    let s1 = id_of(&create_snapshot(&cfg, &src1));
    let src2 = dir.path().join("src2");
    fill(&src2, 1, 8, 1 << 20);
    fill(&src2, 2, 4, 512 << 10);
    let s2 = id_of(&create_snapshot(&cfg, &src2));
    // A maintenance run seals the open packs and waits for every staged one to reach the
    // bucket (nothing is collected: the default grace window keeps today's chunks).
    admin(&app, &["maintenance", "run"]);
    let packs = objects(&g, "site-a/packs");
    let bucket_bytes: u64 = packs.iter().map(|p| p.1).sum();
    assert!(
        bucket_bytes >= 10 << 20,
        "packs in the bucket: {bucket_bytes} bytes"
    );
    let local = local_pack_bytes(&app.repo);
    assert!(
        local < bucket_bytes / 2,
        "the local cache keeps {local} of {bucket_bytes} bytes despite --cache-size 512K"
    );
    // Restores read what left the local disk from the bucket.
    assert_restores(&cfg, &s1, &src1, &dir.path().join("r1"));
    assert_restores(&cfg, &s2, &src2, &dir.path().join("r2"));
    assert_eq!(app.stop().unwrap(), Some(0), "{}", app.log_tail());
    let names: Vec<String> = objects(&g, "site-a").into_iter().map(|o| o.0).collect();
    for want in ["site-a/coffer.repo", "site-a/keys/master.key"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("site-a/catalog/")));
    let lease: serde_json::Value =
        serde_json::from_slice(&g.read("site-a/lease").unwrap()).unwrap();
    assert_eq!(
        lease["until_us"], 0,
        "a graceful stop releases the lease: {lease}"
    );
    assert_eq!(lease["generation"], 1, "{lease}");
    // Credentials never reach the repository directory or the bucket.
    let storage = std::fs::read_to_string(app.repo.join("storage.json")).unwrap();
    assert!(!storage.contains(&g.secret) && !storage.contains(&g.key_id));

    let (ok, text, mut b) = attach(dir.path(), "b", &g, "site-a");
    assert!(ok, "attach: {text}");
    assert!(text.contains("2 snapshots"), "{text}");
    restore_all_from(&mut b, dir.path(), &[(s1, src1), (s2, src2)]);
}

/// Kill between the local acknowledgement and the upload (`--ack-after local`, uploads held):
/// the restart uploads the staged packs (one of them above the multipart threshold), and a copy
/// attached from the bucket alone restores every acknowledged snapshot bit-exact.
#[test]
fn a_crash_between_local_ack_and_upload_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let g = Garage::start(&dir.path().join("garage"), "coffer").unwrap();
    let mut app = init(dir.path(), "a", &g, "crash", &g.endpoint);
    // One shard's packs fill to 40 MiB: uploaded in parts (above 32 MiB).
    app.pack_target = Some(40 << 20);
    app.serve_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    app.serve_env = vec![("COFFER_S3_HOLD_UPLOADS".into(), "1".into())];
    app.start().unwrap();
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("src");
    fill(&src, 3, 12, 8 << 20);
    let s = id_of(&create_snapshot(&cfg, &src));
    assert!(
        objects(&g, "crash/packs").is_empty(),
        "uploads were held, yet packs reached the bucket"
    );
    // The operator sees what waits: each shard sealed a pack of nearly 40 MiB, staged and not
    // uploaded.
    let metrics = scrape(&app);
    let staged = metric(&metrics, "coffer_object_store_staged_bytes");
    assert!(staged >= 64.0 * 1024.0 * 1024.0, "staged bytes {staged}");
    assert!(metric(&metrics, "coffer_object_store_staged_packs") >= 2.0);
    app.kill();
    app.serve_args.clear();
    app.serve_env.clear();
    app.start().unwrap();
    assert_eq!(app.stop().unwrap(), Some(0), "{}", app.log_tail());
    let packs = objects(&g, "crash/packs");
    assert!(
        packs.iter().any(|p| p.1 > 32 << 20),
        "no pack above the multipart threshold: {packs:?}"
    );
    let (ok, text, mut b) = attach(dir.path(), "b", &g, "crash");
    assert!(ok, "attach: {text}");
    restore_all_from(&mut b, dir.path(), &[(s, src)]);
}

/// `--ack-after remote` acknowledges nothing the store has not confirmed: with uploads held,
/// the backup fails and no snapshot exists; released, the same backup succeeds from the bucket.
#[test]
fn remote_ack_acknowledges_nothing_the_store_has_not_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let g = Garage::start(&dir.path().join("garage"), "coffer").unwrap();
    let mut app = init(dir.path(), "a", &g, "remote", &g.endpoint);
    app.serve_args = vec!["--ack-after".into(), "remote".into()];
    app.serve_env = vec![("COFFER_S3_HOLD_UPLOADS".into(), "1".into())];
    app.start().unwrap();
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("src");
    fill(&src, 7, 3, 1 << 20);
    let (rc, out, err) = coffer(&cfg, &["snapshot", "create", src.to_str().unwrap()]).unwrap();
    assert_ne!(
        rc, 0,
        "a backup was acknowledged while no upload was allowed: {out}{err}"
    );
    let (rc, out, err) = coffer(&cfg, &["snapshot", "list", "--json"]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    assert!(!out.contains("\"id\""), "a snapshot exists: {out}");
    app.kill();
    app.serve_env.clear();
    app.start().unwrap();
    let cfg = dir.path().join("alice-2.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let s = id_of(&create_snapshot(&cfg, &src));
    assert_restores(&cfg, &s, &src, &dir.path().join("r"));
}

/// One writer per repository: while an appliance holds the lease, attaching elsewhere and
/// serving a second copy are refused, naming the holder. A copy attached before the first
/// appliance served again is stale and refused even once the lease is free; a fresh attach
/// serves.
#[test]
fn a_second_appliance_is_refused_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let g = Garage::start(&dir.path().join("garage"), "coffer").unwrap();
    let mut first = init(dir.path(), "a", &g, "lease", &g.endpoint);
    first.start().unwrap();
    let (ok, text, _) = attach(dir.path(), "b", &g, "lease");
    assert!(!ok, "attach beside a running appliance succeeded: {text}");
    assert!(text.contains("served by another appliance"), "{text}");
    assert_eq!(first.stop().unwrap(), Some(0));
    std::fs::remove_dir_all(dir.path().join("b")).unwrap();
    let (ok, text, mut second) = attach(dir.path(), "b", &g, "lease");
    assert!(ok, "attach after the stop: {text}");
    first.start().unwrap();
    let e = second
        .start()
        .expect_err("a second appliance started on a leased prefix");
    assert!(
        format!("{e:#}").contains("served by another appliance"),
        "{e:#}"
    );
    assert_eq!(first.stop().unwrap(), Some(0));
    // The first served after the second attached: the second's index and catalog are stale.
    let e = second.start().expect_err("a stale copy started");
    assert!(format!("{e:#}").contains("Attach again"), "{e:#}");
    let (ok, text, mut third) = attach(dir.path(), "c", &g, "lease");
    assert!(ok, "a fresh attach: {text}");
    third.start().unwrap();
    assert_eq!(third.stop().unwrap(), Some(0));
}

/// The GC deletes objects in the bucket (the cache is empty: every pack is only there) once no
/// snapshot needs them; what is kept restores bit-exact.
#[test]
fn garbage_collection_frees_objects_in_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let g = Garage::start(&dir.path().join("garage"), "coffer").unwrap();
    let mut app = init(dir.path(), "a", &g, "gc", &g.endpoint);
    app.serve_args = vec![
        "--cache-size".into(),
        "0".into(),
        "--gc-grace".into(),
        "0".into(),
    ];
    app.start().unwrap();
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let keep = dir.path().join("keep");
    fill(&keep, 4, 2, 1 << 20);
    let kept = id_of(&create_snapshot(&cfg, &keep));
    let gone = dir.path().join("gone");
    fill(&gone, 5, 6, 1 << 20);
    let gone_id = id_of(&create_snapshot(&cfg, &gone));
    // Seals and uploads every pack (nothing collected yet: both snapshots are live).
    admin(&app, &["maintenance", "run"]);
    let before: u64 = objects(&g, "gc/packs").iter().map(|o| o.1).sum();
    let (rc, out, err) = coffer(&cfg, &["snapshot", "delete", &gone_id]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    let report = admin(&app, &["maintenance", "run"]);
    let after: u64 = objects(&g, "gc/packs").iter().map(|o| o.1).sum();
    assert!(
        before.saturating_sub(after) >= 5 << 20,
        "the bucket went from {before} to {after} bytes after deleting 6 MiB of unique data: \
         {report}"
    );
    assert_eq!(
        local_pack_bytes(&app.repo),
        0,
        "--cache-size 0 keeps nothing locally"
    );
    assert_restores(&cfg, &kept, &keep, &dir.path().join("r"));
}

/// `--ack-after remote` through a proxy that answers 503, resets connections mid-request and
/// stalls: the backup completes (retries with backoff). The appliance is then killed at once:
/// a copy attached from the bucket alone (the dead appliance's lease declared void) restores
/// the acknowledged snapshot bit-exact.
#[test]
fn store_errors_resets_and_stalls_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let g = Garage::start(&dir.path().join("garage"), "coffer").unwrap();
    let proxy = Arc::new(FaultProxy::start(([127, 0, 0, 1], g.s3_port).into()).unwrap());
    let mut app = init(dir.path(), "a", &g, "faults", &proxy.endpoint);
    app.serve_args = [
        "--ack-after",
        "remote",
        "--s3-timeout",
        "2",
        "--s3-retry-for",
        "60",
    ]
    .map(String::from)
    .to_vec();
    app.start().unwrap();
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (p, stop) = (proxy.clone(), stop.clone());
        std::thread::spawn(move || {
            // Load, not synchronisation: the store flips between healthy, failing and stalled
            // while the backup runs.
            let mut k = 0u32;
            while !stop.load(Ordering::SeqCst) {
                p.set([FAIL, PASS, STALL, PASS][k as usize % 4]);
                k += 1;
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            p.set(PASS);
        })
    };
    // A backup that happens to fall between faults injects none: another one then runs (new
    // data, new uploads), a few at most.
    let mut snaps = Vec::new();
    for round in 0..4 {
        let src = dir.path().join(format!("src-{round}"));
        fill(&src, 6 + round, 6, 1 << 20);
        snaps.push((id_of(&create_snapshot(&cfg, &src)), src));
        if proxy.injected() > 0 {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    chaos.join().unwrap();
    assert!(proxy.injected() > 0, "the proxy injected no fault");
    app.kill();
    g.delete("faults/lease").unwrap();
    let (ok, text, mut b) = attach(dir.path(), "b", &g, "faults");
    assert!(ok, "attach: {text}");
    restore_all_from(&mut b, dir.path(), &snaps);
}
