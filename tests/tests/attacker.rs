//! Issue 13: a compromised client cannot destroy history. The attacker holds a client's whole
//! configuration and login password — with FULL access to its own snapshots — but not its
//! delete passphrase; protections and retention locks bind everyone, the operator too; every
//! refusal is in the audit log, whose hash chain names an edited, removed or moved entry.

use coffer_client::Session;
use coffer_proto::v1;
use coffer_proto::{ChunkId, SnapshotId};
use coffer_tests::{admin, code, coffer, connect_client, create_snapshot, data, Appliance};
use tonic::Code;

const PASSPHRASE: &str = "not the login password, kept offline";

fn id_of(summary: &serde_json::Value) -> String {
    summary["snapshot"].as_str().unwrap().to_string()
}

fn sid(hex: &str) -> SnapshotId {
    SnapshotId::from_hex(hex).unwrap()
}

#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, coffer_client::ClientError>, want: Code, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(code(&e), Some(want), "{what}: {e}");
}

/// The audit log as JSON entries.
fn audit(app: &Appliance) -> Vec<serde_json::Value> {
    admin(app, &["audit", "show", "--json"])
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `verify --read-data`'s verdict lines (without timings).
fn verified(app: &Appliance) -> Vec<String> {
    let (rc, text) = app.verify(true).unwrap();
    assert_eq!(rc, 0, "{text}");
    text.lines()
        .filter(|l| !l.contains(" s ") && !l.contains("elapsed"))
        .map(str::to_string)
        .collect()
}

fn write_tree(dir: &std::path::Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("unique.bin"), data(seed, 300_000, false)).unwrap();
}

/// A repository where alice (FULL on her snapshots, with a delete passphrase) has four
/// snapshots — a0 and a1 plain, a2 protected, a3 locked for 30 days — and bob one.
struct Scene {
    _dir: tempfile::TempDir,
    app: Appliance,
    cfg: std::path::PathBuf,
    pass_file: std::path::PathBuf,
    src: std::path::PathBuf,
    a: [String; 4],
    b0: String,
    broot: ChunkId,
    bob: Session,
}

async fn scene() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    // Full defaults: the owner may delete its own snapshots, so only the passphrase, the
    // protection and the lock stand between the attacker and the history.
    let mut app = Appliance::init(base, 1, 64 << 10, &["alice@laptop", "bob@desktop"]).unwrap();
    app.start().unwrap();
    let pass_file = base.join("delete-passphrase");
    std::fs::write(&pass_file, format!("{PASSPHRASE}\n")).unwrap();
    let out = admin(
        &app,
        &[
            "user",
            "set",
            "alice@laptop",
            "--delete-passphrase-file",
            pass_file.to_str().unwrap(),
        ],
    );
    assert!(out.contains("needs its delete passphrase"), "{out}");

    let cfg = base.join("alice.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = base.join("src");
    write_tree(&src, 1);
    let a0 = id_of(&create_snapshot(&cfg, &src));
    let a1 = id_of(&create_snapshot(&cfg, &src));
    let a2 = id_of(&create_snapshot(&cfg, &src));
    let (rc, out, err) = coffer(&cfg, &["snapshot", "protect", &a2]).unwrap();
    assert_eq!(rc, 0, "protecting needs APPEND only: {out}{err}");
    assert!(out.contains("protected"), "{out}");
    admin(&app, &["policy", "set", "alice@laptop", "--lock", "30d"]);
    let a3 = id_of(&create_snapshot(&cfg, &src));
    let (_, listed, _) = coffer(&cfg, &["snapshot", "list"]).unwrap();
    let line = listed.lines().find(|l| l.starts_with(&a3)).unwrap();
    assert!(line.contains("locked until"), "{listed}");

    let bcfg = base.join("bob.json");
    connect_client(&app, &bcfg, "bob", "desktop");
    let bsrc = base.join("bob-src");
    write_tree(&bsrc, 2);
    let b0 = id_of(&create_snapshot(&bcfg, &bsrc));
    let bob = app.session("bob@desktop").await.unwrap();
    let broot = ChunkId::from_slice(&bob.snapshot(&sid(&b0)).await.unwrap().root).unwrap();
    Scene {
        _dir: dir,
        app,
        cfg,
        pass_file,
        src,
        a: [a0, a1, a2, a3],
        b0,
        broot,
        bob,
    }
}

/// The attacker tries to keep nothing, drop the lock, unprotect, shorten a lock and grant
/// itself rules: each is refused.
async fn weaken_retention_and_rules(s: &Session, src: &std::path::Path, a2: &str, a3: &str) {
    // Keep nothing, or drop the lock.
    refused(
        s.set_policy("alice@laptop", r#"{"keep_last":1}"#, &[], "")
            .await,
        Code::PermissionDenied,
        "policy keeping one",
    );
    refused(
        s.set_policy("alice@laptop", "{}", &["lock_secs".into()], "")
            .await,
        Code::PermissionDenied,
        "policy without lock",
    );
    let path = src.canonicalize().unwrap().to_string_lossy().into_owned();
    refused(
        s.set_policy(
            &format!("alice@laptop:{path}"),
            r#"{"keep_last":1,"lock_secs":0}"#,
            &[],
            "",
        )
        .await,
        Code::PermissionDenied,
        "path policy keeping one",
    );
    refused(
        s.protect(&sid(a2), false, 0, "").await,
        Code::PermissionDenied,
        "unprotect",
    );
    refused(
        s.lock(&sid(a3), coffer_proto::now_us()).await,
        Code::PermissionDenied,
        "shorten the lock",
    );
    // Nor pin storage for ever: a client's locks end within a year.
    refused(
        s.lock(
            &sid(a3),
            coffer_proto::now_us() + 2 * 365 * 86_400 * 1_000_000,
        )
        .await,
        Code::PermissionDenied,
        "a lock for two years",
    );
    let rule = s
        .raw()
        .add_rule(v1::AddRuleRequest {
            user: "alice@laptop".into(),
            access: "FULL".into(),
            target: "type=acl".into(),
            delete_passphrase: String::new(),
        })
        .await;
    assert_eq!(
        rule.unwrap_err().code(),
        Code::PermissionDenied,
        "add a rule"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_its_password_cannot_destroy_history() {
    let Scene {
        _dir: _keep,
        app,
        cfg,
        src,
        a: [a0, a1, a2, a3],
        b0,
        broot,
        bob,
        ..
    } = scene().await;
    let list_before = admin(&app, &["snapshot", "list", "--json"]);
    let verify_before = verified(&app);
    let entries_before = audit(&app).len();

    // The attacker: alice's password and configuration.
    let s: Session = app.session("alice@laptop").await.unwrap();
    assert!(s.hello.delete_passphrase_set);
    for id in [&a0, &a1, &a2, &a3] {
        refused(
            s.delete(&sid(id), "").await,
            Code::PermissionDenied,
            "delete without passphrase",
        );
        refused(
            s.delete(&sid(id), "a guess").await,
            Code::PermissionDenied,
            "delete, wrong passphrase",
        );
    }
    let (rc, _, err) = coffer(&cfg, &["snapshot", "delete", &a0]).unwrap();
    assert_ne!(rc, 0);
    assert!(err.contains("delete passphrase"), "the CLI says why: {err}");
    // Replace a snapshot: same id, same path, other content.
    let mut replacement = s.snapshot(&sid(&a0)).await.unwrap();
    replacement.root = bob.snapshot(&sid(&b0)).await.unwrap().root;
    refused(
        s.commit_as(replacement, rand::random()).await,
        Code::PermissionDenied,
        "replace",
    );
    weaken_retention_and_rules(&s, &src, &a2, &a3).await;
    // Another user's data: "not found", as for what does not exist.
    refused(s.get(&[broot]).await, Code::NotFound, "read bob's chunks");
    refused(
        s.snapshot(&sid(&b0)).await,
        Code::NotFound,
        "get bob's snapshot",
    );
    refused(
        s.open(&sid(&b0)).await,
        Code::NotFound,
        "open bob's snapshot",
    );
    refused(
        s.delete(&sid(&b0), "").await,
        Code::NotFound,
        "delete bob's snapshot",
    );

    // Nothing changed.
    assert_eq!(admin(&app, &["snapshot", "list", "--json"]), list_before);
    assert_eq!(verified(&app), verify_before);
    let log = audit(&app);
    let refusals: Vec<&serde_json::Value> = log[entries_before..]
        .iter()
        .filter(|e| e["outcome"] == "refused")
        .collect();
    for (action, target) in [
        ("snapshot.delete", a0.as_str()),
        ("snapshot.delete", &a1),
        ("snapshot.delete", &a2),
        ("snapshot.delete", &a3),
        ("snapshot.replace", &a0),
        ("policy.set", "alice@laptop"),
        ("snapshot.unprotect", &a2),
        ("snapshot.lock", &a3),
        ("acl.add", ""),
        ("chunk.read", &broot.to_string()),
    ] {
        assert!(
            refusals.iter().any(|e| e["action"] == action
                && e["actor"] == "alice@laptop"
                && e["target"].as_str().unwrap().contains(target)),
            "no refused {action} {target} in the audit log: {refusals:#?}"
        );
    }

    let out = admin(&app, &["audit", "verify"]);
    assert!(out.contains("audit log intact"), "{out}");
}

/// The owner, with the passphrase, deletes what is neither protected nor locked — one call at
/// a time; a lock binds the owner and the operator alike, and can only be extended.
#[tokio::test(flavor = "multi_thread")]
async fn the_passphrase_deletes_for_one_call_and_a_lock_binds_everyone() {
    let Scene {
        _dir: _keep,
        app,
        cfg,
        pass_file,
        a: [a0, a1, a2, a3],
        ..
    } = scene().await;
    let s: Session = app.session("alice@laptop").await.unwrap();
    // With the passphrase the owner deletes an unlocked, unprotected snapshot — for that one
    // call: the next one needs it again.
    s.delete(&sid(&a0), PASSPHRASE).await.unwrap();
    refused(
        s.delete(&sid(&a1), "").await,
        Code::PermissionDenied,
        "no step-up is remembered",
    );
    let (rc, out, err) = coffer(
        &cfg,
        &[
            "snapshot",
            "delete",
            &a1,
            "--delete-passphrase-file",
            pass_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    // Protected: the passphrase removes the protection, then the snapshot can go.
    refused(
        s.delete(&sid(&a2), PASSPHRASE).await,
        Code::PermissionDenied,
        "protected",
    );
    s.protect(&sid(&a2), false, 0, PASSPHRASE).await.unwrap();
    // Locked: nobody deletes it — not the owner with the passphrase, not the admin CLI.
    refused(
        s.delete(&sid(&a3), PASSPHRASE).await,
        Code::PermissionDenied,
        "locked",
    );
    // Protecting adds: allowed on a locked snapshot, without the passphrase.
    s.protect(&sid(&a3), true, 0, "").await.unwrap();
    let out = app
        .run(&["snapshot", "delete", &a3, "--repo", &app.repo_str()])
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked until"), "{err}");
    let out = app
        .run(&["snapshot", "unprotect", &a3, "--repo", &app.repo_str()])
        .unwrap();
    assert!(!out.status.success(), "nobody unprotects a locked snapshot");
    let extended = coffer_proto::now_us() + 200 * 86_400 * 1_000_000;
    let locked = s.lock(&sid(&a3), extended).await.unwrap();
    assert_eq!(locked.lock_until_us, extended, "a lock can be extended");
    let remaining: Vec<String> = s
        .list("", false)
        .await
        .unwrap()
        .iter()
        .map(|x| hex::encode(&x.id))
        .collect();
    assert_eq!(remaining, vec![a2.clone(), a3.clone()]);
    let log = audit(&app);
    assert!(log.iter().any(|e| e["action"] == "snapshot.delete"
        && e["outcome"] == "done"
        && e["target"] == a0.as_str()));
    for action in ["snapshot.delete", "snapshot.unprotect"] {
        assert!(
            log.iter().any(|e| e["action"] == action
                && e["actor"] == "admin"
                && e["outcome"] == "refused"
                && e["target"] == a3.as_str()),
            "the operator's refused {action} is on the record: {log:#?}"
        );
    }
}

/// A retention lock binds everyone until it expires (the appliance is started "later" with an
/// injected clock); then retention forgets the snapshot and garbage collection frees its data.
#[test]
fn a_lock_holds_until_it_expires_then_retention_and_gc_free_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = Appliance::init(base, 1, 64 << 10, &["alice@laptop"]).unwrap();
    app.serve_args = vec!["--gc-grace".into(), "0".into()];
    app.start().unwrap();
    admin(
        &app,
        &[
            "policy",
            "set",
            "alice@laptop",
            "--lock",
            "2h",
            "--keep-last",
            "1",
        ],
    );
    let cfg = base.join("alice.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = base.join("src");
    write_tree(&src, 7);
    let old = id_of(&create_snapshot(&cfg, &src));
    // The newer snapshot no longer holds the old one's data.
    std::fs::remove_file(src.join("unique.bin")).unwrap();
    std::fs::write(src.join("small"), b"new").unwrap();
    let new = id_of(&create_snapshot(&cfg, &src));

    // Before expiry: retention keeps it ("locked"), and neither its owner (FULL access, no
    // passphrase set) nor the admin CLI deletes it.
    let out = admin(&app, &["maintenance", "run"]);
    assert!(
        out.contains(&format!("keep   {old}")) && out.contains("locked"),
        "{out}"
    );
    assert!(out.contains("forgot 0 snapshots"), "{out}");
    let (rc, _, err) = coffer(&cfg, &["snapshot", "delete", &old]).unwrap();
    assert_ne!(rc, 0);
    assert!(err.contains("locked until"), "{err}");
    let out = app
        .run(&["snapshot", "delete", &old, "--repo", &app.repo_str()])
        .unwrap();
    assert!(!out.status.success());
    // A retention run asked to decide "in the future" does not move the lock's clock.
    let later = (coffer_proto::now_us() + 3 * 3600 * 1_000_000).to_string();
    let out = admin(&app, &["maintenance", "run", "--now-us", &later]);
    assert!(out.contains("forgot 0 snapshots"), "{out}");
    let (before, _) = app.pack_bytes().unwrap();

    // Three hours later by the appliance's clock: the lock has expired.
    app.stop().unwrap();
    // Only `serve` reads the clock shift: the offline CLI cannot use it to pass a lock.
    let offline = std::process::Command::new(coffer_tests::bin("coffer-appliance"))
        .args(["snapshot", "delete", &old, "--repo", &app.repo_str()])
        .env("COFFER_CLOCK_OFFSET_SECS", (3 * 3600).to_string())
        .output()
        .unwrap();
    assert!(!offline.status.success());
    assert!(String::from_utf8_lossy(&offline.stderr).contains("locked until"));
    app.serve_env = vec![("COFFER_CLOCK_OFFSET_SECS".into(), (3 * 3600).to_string())];
    app.start().unwrap();
    connect_client(&app, &cfg, "alice", "laptop");
    let out = admin(&app, &["maintenance", "run"]);
    assert!(out.contains(&format!("forget {old}")), "{out}");
    assert!(out.contains("forgot 1 snapshots"), "{out}");
    let (after, _) = app.pack_bytes().unwrap();
    assert!(
        before - after >= 250_000,
        "the old snapshot's 300 kB of incompressible data is freed: {before} -> {after}"
    );
    let (rc, listed, err) = coffer(&cfg, &["snapshot", "list"]).unwrap();
    assert_eq!(rc, 0, "{err}");
    assert!(!listed.contains(&old) && listed.contains(&new), "{listed}");
    let (rc, text) = app.verify(true).unwrap();
    assert_eq!(rc, 0, "{text}");
    let log = audit(&app);
    assert!(log
        .iter()
        .any(|e| e["action"] == "snapshot.forget" && e["target"] == old.as_str()));
    assert!(log.iter().any(|e| e["action"] == "maintenance.run"));
    assert!(
        log.iter()
            .any(|e| e["action"] == "clock.shifted" && e["target"] == "10800"),
        "a shifted clock is on the record"
    );
}

/// `audit verify` passes on a real log and, with the appliance stopped, names the entry after
/// one byte of it is changed, after it is removed, and after two entries are swapped.
#[test]
fn audit_verify_names_an_edited_removed_or_moved_entry() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = Appliance::init(base, 1, 64 << 10, &["alice@laptop"]).unwrap();
    app.start().unwrap();
    for keep in ["3", "4", "5"] {
        admin(&app, &["policy", "set", "global", "--keep-daily", keep]);
    }
    admin(&app, &["user", "set", "alice@laptop", "--quota", "1G"]);
    let out = admin(&app, &["audit", "verify"]);
    assert!(out.contains("audit log intact"), "{out}");
    app.stop().unwrap();
    let verify = || {
        let out = app
            .run(&["audit", "verify", "--repo", &app.repo_str()])
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(verify().0, Some(0), "{}", verify().1);
    let key = |n: u64| format!("audit/{n:016x}").into_bytes();
    let db_path = app.repo.join("catalog");
    let with_db = |f: &dyn Fn(&rocksdb::DB)| {
        let db = rocksdb::DB::open_default(&db_path).unwrap();
        f(&db);
    };
    let original = |n: u64| {
        let db = rocksdb::DB::open_default(&db_path).unwrap();
        db.get(key(n)).unwrap().unwrap()
    };
    let (e3, e4, e2, e5) = (original(3), original(4), original(2), original(5));

    // One byte of entry 3.
    let mut edited = e3.clone();
    let at = edited.windows(6).position(|w| w == b"policy").unwrap();
    edited[at] = b'P';
    with_db(&|db| db.put(key(3), &edited).unwrap());
    let (rc, out) = verify();
    assert_eq!(rc, Some(1), "{out}");
    assert!(out.contains("entry 3 was changed"), "{out}");
    with_db(&|db| db.put(key(3), &e3).unwrap());
    assert_eq!(verify().0, Some(0));

    // Entry 4 removed.
    with_db(&|db| db.delete(key(4)).unwrap());
    let (rc, out) = verify();
    assert_eq!(rc, Some(1), "{out}");
    assert!(out.contains("entry 4 is missing"), "{out}");
    with_db(&|db| db.put(key(4), &e4).unwrap());
    assert_eq!(verify().0, Some(0));

    // Entries 2 and 5 swapped.
    with_db(&|db| {
        db.put(key(2), &e5).unwrap();
        db.put(key(5), &e2).unwrap();
    });
    let (rc, out) = verify();
    assert_eq!(rc, Some(1), "{out}");
    assert!(
        out.contains("entry 2 was moved") && out.contains("entry 5 was moved"),
        "{out}"
    );
}
