//! S3 Object Lock (issue 17, item 5): a locked snapshot's objects get compliance retention in
//! the bucket until the lock's end, which the store then enforces against anyone holding the
//! credentials; extending the lock extends it; the GC neither deletes nor compacts a retained
//! pack. Garage has no Object Lock (the Garage tests check the appliance says so), so these run
//! against moto's S3 server, a mock that implements the lock calls and refuses a locked
//! version's delete.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use coffer_tests::moto::{self, Moto};
use coffer_tests::{admin, assert_restores, coffer, connect_client, create_snapshot, Appliance};

const ALICE: &str = "alice@laptop";
const DAY: i64 = 86_400;

fn fill(dir: &Path, seed: u64, files: u64, len: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..files {
        std::fs::write(
            dir.join(format!("blob-{seed}-{k:02}")),
            coffer_tests::data(seed * 100 + k, len, false),
        )
        .unwrap();
    }
}

fn id_of(summary: &serde_json::Value) -> String {
    summary["snapshot"].as_str().unwrap().to_string()
}

fn now_s() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Pack objects in the bucket now, with their retention's end (s).
fn packs(m: &Moto) -> Vec<(String, Option<i64>)> {
    m.retention("lock/packs/").unwrap()
}

/// Whether every object of `keys` is current and retained until at least `until_s`.
fn all_retained(m: &Moto, keys: &HashSet<String>, until_s: i64) -> bool {
    let now: Vec<_> = packs(m);
    keys.iter().all(|k| {
        now.iter()
            .any(|(n, r)| n == k && r.is_some_and(|r| r >= until_s))
    })
}

/// An appliance (2 shards, GC grace 0) whose packs live under `lock/` of moto's bucket, started,
/// and alice's client configuration.
fn appliance_on(m: &Moto, dir: &Path) -> (Appliance, std::path::PathBuf) {
    let storage = m.storage_args("lock");
    let mut extra: Vec<&str> = vec!["--default-access", "full"];
    extra.extend(storage.iter().map(String::as_str));
    let d = dir.join("a");
    std::fs::create_dir_all(&d).unwrap();
    let mut app = Appliance::init_with(&d, 2, 64 << 10, &[ALICE], &extra).unwrap();
    app.serve_args = vec!["--gc-grace".into(), "0".into()];
    app.start().unwrap();
    assert!(
        std::fs::read_to_string(&app.log)
            .unwrap()
            .contains("object lock enabled"),
        "the start says the bucket has Object Lock: {}",
        app.log_tail()
    );
    let storage = std::fs::read_to_string(app.repo.join("storage.json")).unwrap();
    assert!(
        storage.contains("\"object_lock\": true") || storage.contains("\"object_lock\":true"),
        "init records that the bucket has Object Lock: {storage}"
    );
    let cfg = dir.join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    (app, cfg)
}

#[test]
fn a_locked_snapshots_objects_are_retained_by_the_store_until_the_lock_ends() {
    if !moto::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "moto's S3 server is not installed, and CI must run this test (.ci/run installs \
             moto[server])"
        );
        eprintln!(
            "skipped: python3 cannot import moto.server and boto3 (pip install 'moto[server]')"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = Moto::start(&dir.path().join("moto"), "coffer-lock").unwrap();
    let (app, cfg) = appliance_on(&m, dir.path());

    // A (to be locked) and C (to be deleted) share the open packs; B comes after them.
    let a_src = dir.path().join("a-src");
    fill(&a_src, 1, 2, 512 << 10);
    let a = id_of(&create_snapshot(&cfg, &a_src));
    let c_src = dir.path().join("c-src");
    fill(&c_src, 3, 4, 1 << 20);
    let c = id_of(&create_snapshot(&cfg, &c_src));
    admin(&app, &["maintenance", "run"]);
    let shared: HashSet<String> = packs(&m).into_iter().map(|p| p.0).collect();
    assert!(!shared.is_empty(), "A and C were uploaded");
    let b_src = dir.path().join("b-src");
    fill(&b_src, 2, 2, 512 << 10);
    let _b = create_snapshot(&cfg, &b_src);
    admin(&app, &["maintenance", "run"]);
    let later: HashSet<String> = packs(&m)
        .into_iter()
        .map(|p| p.0)
        .filter(|p| !shared.contains(p))
        .collect();
    assert!(!later.is_empty(), "B was uploaded into packs of its own");
    assert!(
        packs(&m).iter().all(|p| p.1.is_none()),
        "nothing is retained before a lock"
    );

    // The lock reaches every pack of A within a few passes, and no pack of B.
    admin(&app, &["snapshot", "lock", &a, "--until", "30d"]);
    assert!(
        coffer_tests::eventually(Duration::from_mins(1), || all_retained(
            &m,
            &shared,
            now_s() + 29 * DAY
        )),
        "A's packs were not retained for 30 days: {:?}\n{}",
        packs(&m),
        app.log_tail()
    );
    for (k, r) in packs(&m) {
        if later.contains(&k) {
            assert_eq!(r, None, "{k} holds only B (not locked) but is retained");
        }
    }
    let files = m.retention("lock/").unwrap();
    for want in ["lock/coffer.repo", "lock/keys/", "lock/catalog/"] {
        assert!(
            files
                .iter()
                .any(|(k, r)| k.starts_with(want) && r.is_some_and(|r| r >= now_s() + 29 * DAY)),
            "{want} is not retained: {files:?}"
        );
    }

    // Whoever holds the bucket's key cannot destroy a retained pack, though they can destroy
    // an object without retention.
    let victim = shared.iter().next().unwrap();
    assert!(
        m.destroy(victim).unwrap() >= 1,
        "the store let {victim} be deleted"
    );
    m.py("s3.put_object(Bucket=B, Key='lock/junk', Body=b'x')")
        .unwrap();
    assert_eq!(
        m.destroy("lock/junk").unwrap(),
        0,
        "deletes work on objects without retention"
    );

    // Extending the lock extends the retention.
    admin(&app, &["snapshot", "lock", &a, "--until", "60d"]);
    assert!(
        coffer_tests::eventually(Duration::from_mins(1), || all_retained(
            &m,
            &shared,
            now_s() + 59 * DAY
        )),
        "A's packs were not retained for 60 days: {:?}",
        packs(&m)
    );

    // C gone, its records make A's packs mostly dead: they would be compacted and deleted, but
    // the bucket retains them, so the GC keeps them whole.
    let (rc, out, err) = coffer(&cfg, &["snapshot", "delete", &c]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    let report = admin(&app, &["maintenance", "run"]);
    assert!(
        report.contains("the bucket retains"),
        "the run did not keep retained packs: {report}"
    );
    assert!(
        all_retained(&m, &shared, now_s() + 59 * DAY),
        "a retained pack was compacted away: {:?}\n{report}",
        packs(&m)
    );
    assert_restores(&cfg, &a, &a_src, &dir.path().join("restore-a"));
}
