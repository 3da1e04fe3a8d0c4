//! Policies served by the appliance (issue 12, item 1, in part): levels global → `@host` →
//! `user@host` → `user@host:/path`, each field inherited unless set, set and shown through the
//! CLI offline (on the catalog) and live (through the running appliance).

use coffer_tests::{admin, Appliance};

const ALICE: &str = "alice@laptop";

/// `policy show` for Alice's home directory, as `field = value  (from level)` lines.
fn show(app: &Appliance) -> String {
    admin(app, &["policy", "show", ALICE, "/home/alice"])
}

#[test]
fn levels_combine_field_by_field_and_show_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE]).unwrap();
    assert!(show(&app).contains("no policy applies"));
    // Offline: written to the catalog.
    admin(
        &app,
        &[
            "policy",
            "set",
            "global",
            "--keep-daily",
            "7",
            "--keep-weekly",
            "4",
            "--compression",
            "zstd:3",
            "--exclude",
            "*.tmp",
            "--exclude",
            "node_modules/",
        ],
    );
    app.start().unwrap();
    // Live: through the running appliance.
    admin(&app, &["policy", "set", "@laptop", "--compression", "lz4"]);
    admin(
        &app,
        &[
            "policy",
            "set",
            "alice@laptop:/home/alice",
            "--keep-daily",
            "3",
        ],
    );
    let s = show(&app);
    for line in [
        "keep_daily = 3  (from alice@laptop:/home/alice)",
        "keep_weekly = 4  (from global)",
        "compression = \"lz4\"  (from @laptop)",
        "excludes = [\"*.tmp\",\"node_modules/\"]  (from global)",
    ] {
        assert!(s.contains(line), "missing {line:?} in:\n{s}");
    }
    assert!(!s.contains("keep_last"), "{s}");
    // Another path of the same account inherits the global retention.
    let other = admin(&app, &["policy", "show", ALICE, "/srv"]);
    assert!(other.contains("keep_daily = 7  (from global)"), "{other}");
    // Clearing a field returns it to inheritance; deleting a level removes all of it.
    admin(
        &app,
        &[
            "policy",
            "set",
            "alice@laptop:/home/alice",
            "--unset",
            "keep_daily",
        ],
    );
    assert!(show(&app).contains("keep_daily = 7  (from global)"));
    admin(&app, &["policy", "delete", "@laptop"]);
    assert!(show(&app).contains("compression = \"zstd:3\"  (from global)"));
    let list = admin(&app, &["policy", "list"]);
    assert!(
        list.contains("global {") && !list.contains("@laptop {"),
        "{list}"
    );
}

#[test]
fn bad_targets_fields_and_values_are_refused_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE]).unwrap();
    let run = |args: &[&str]| {
        let repo = app.repo_str();
        let mut full = args.to_vec();
        full.extend(["--repo", &repo]);
        let out = app.run(&full).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["policy", "set", "alice", "--keep-last", "1"]);
    assert!(!ok && err.contains("expected `global`, `@host`"), "{err}");
    let (ok, err) = run(&["policy", "set", "global", "--unset", "keep_dialy"]);
    assert!(
        !ok && err.contains("no policy field \"keep_dialy\""),
        "{err}"
    );
    let (ok, err) = run(&["policy", "set", "global", "--compression", "zstd:99"]);
    assert!(
        !ok && err.contains("expected none, lz4 or zstd:1 to zstd:19"),
        "{err}"
    );
    let (ok, err) = run(&["policy", "set", "global", "--schedule", "weekly"]);
    assert!(
        !ok && err.contains("expected an interval like `30m`"),
        "{err}"
    );
    let (ok, err) = run(&["policy", "delete", "@nowhere"]);
    assert!(!ok && err.contains("no policy at @nowhere"), "{err}");
}

/// Acceptance of issue 12: an APPEND-only client whose policy keeps 3 daily snapshots ends,
/// after 10 simulated days of two backups a day and a maintenance run each day (the clock is
/// injected), with exactly the snapshots retention keeps — without ever being able to delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_only_client_keeps_exactly_what_retention_keeps() {
    const HOUR: i64 = 3_600_000_000;
    const DAY: i64 = 24 * HOUR;
    // 2026-01-05 00:00 UTC.
    const T0: i64 = 1_767_571_200_000_000;
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE, "bob@laptop"]).unwrap();
    app.start().unwrap();
    admin(&app, &["acl", "enable"]);
    admin(
        &app,
        &["acl", "remove", "default-own-snapshots", "--delete"],
    );
    admin(
        &app,
        &[
            "acl",
            "add",
            "--user",
            "*@laptop",
            "--access",
            "APPEND",
            "--target",
            "type=snapshot,username=OWN_USER,hostname=OWN_HOST",
        ],
    );
    admin(
        &app,
        &["policy", "set", "alice@laptop:/probe", "--keep-daily", "3"],
    );
    let alice = app.session(ALICE).await.unwrap();
    // Bob backs up the same path on the same host; no policy names him: he keeps everything.
    let bob = app.session("bob@laptop").await.unwrap();
    let root = coffer_tests::tree_frame(&alice, vec![]);
    let root_id = root.id;
    alice.put(vec![root.clone()], 1 << 20).await.unwrap();
    bob.put(vec![root], 1 << 20).await.unwrap();
    for day in 0..10 {
        for hour in [2, 14] {
            let mut snap = coffer_tests::snapshot_of(root_id);
            snap.time_us = T0 + day * DAY + hour * HOUR;
            alice.commit(snap.clone()).await.unwrap();
            bob.commit(snap).await.unwrap();
        }
        let now = (T0 + day * DAY + 15 * HOUR).to_string();
        admin(&app, &["maintenance", "run", "--now-us", &now]);
    }
    let mut left: Vec<i64> = alice
        .list("/probe", false)
        .await
        .unwrap()
        .iter()
        .map(|s| s.time_us)
        .collect();
    left.sort_unstable();
    assert_eq!(
        left,
        vec![
            T0 + 7 * DAY + 14 * HOUR,
            T0 + 8 * DAY + 14 * HOUR,
            T0 + 9 * DAY + 14 * HOUR
        ]
    );
    assert_eq!(bob.list("/probe", false).await.unwrap().len(), 20);
    // The client could not have done it itself.
    let mine = alice.list("/probe", false).await.unwrap();
    let id = coffer_proto::SnapshotId::from_slice(&mine[0].id).unwrap();
    let e = alice.delete(&id, "").await.unwrap_err();
    assert_eq!(
        coffer_tests::code(&e),
        Some(tonic::Code::PermissionDenied),
        "{e}"
    );
    // A dry run changes nothing and says why each is kept.
    let dry = admin(
        &app,
        &[
            "maintenance",
            "run",
            "--dry-run",
            "--now-us",
            &(T0 + 10 * DAY).to_string(),
        ],
    );
    assert!(
        dry.contains("(daily") && dry.contains("0 snapshots would be forgotten"),
        "{dry}"
    );
}

/// The client applies what each level sets: excludes from the global level, cache directories
/// from Alice's level, the size limit from her host's, compression from her path's — and
/// `coffer policy show` names the level of each.
#[test]
fn a_backup_applies_every_level_and_policy_show_names_each_source() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::started(dir.path(), 1, 64 << 10, &[ALICE]).unwrap();
    let src = dir.path().join("src");
    for d in ["build/deep", "cache", "sub"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("a.iso"), b"disk image").unwrap();
    std::fs::write(src.join("build/deep/out.o"), b"object").unwrap();
    std::fs::write(
        src.join("cache/CACHEDIR.TAG"),
        b"Signature: 8a477f597d28d172789f06886806bc55\n",
    )
    .unwrap();
    std::fs::write(src.join("cache/blob"), b"cached").unwrap();
    std::fs::write(src.join("big"), vec![7u8; 200_000]).unwrap();
    // Very compressible: stored as is only because the path's policy says `none`.
    std::fs::write(src.join("keep.txt"), "all work and no play ".repeat(2000)).unwrap();
    std::fs::write(src.join("sub/keep2"), b"kept").unwrap();
    let src = std::fs::canonicalize(&src).unwrap();
    let path_level = format!("{ALICE}:{}", src.display());
    admin(
        &app,
        &[
            "policy",
            "set",
            "global",
            "--exclude",
            "*.iso",
            "--exclude",
            "build/",
        ],
    );
    admin(
        &app,
        &["policy", "set", "@laptop", "--max-file-size", "100000"],
    );
    admin(&app, &["policy", "set", ALICE, "--exclude-caches", "true"]);
    admin(
        &app,
        &["policy", "set", &path_level, "--compression", "none"],
    );

    let cfg = dir.path().join("alice.toml");
    coffer_tests::connect_client(&app, &cfg, "alice", "laptop");
    let (rc, shown, err) =
        coffer_tests::coffer(&cfg, &["policy", "show", src.to_str().unwrap()]).unwrap();
    assert_eq!(rc, 0, "{err}");
    for line in [
        r#"excludes = ["*.iso","build/"]  (from global)"#.to_string(),
        "max_file_size = 100000  (from @laptop)".to_string(),
        format!("exclude_caches = true  (from {ALICE})"),
        format!(r#"compression = "none"  (from {path_level})"#),
    ] {
        assert!(shown.contains(&line), "{line:?} not in:\n{shown}");
    }

    let sum = coffer_tests::create_snapshot(&cfg, &src);
    let warnings = sum["warnings"].to_string();
    for left in ["a.iso", "build", "cache", "big"] {
        assert!(
            warnings.contains(&format!("{left}: ")),
            "{left}: {warnings}"
        );
    }
    assert!(
        sum["uploaded_bytes"].as_u64().unwrap() >= 42_000,
        "compression none stores keep.txt as is: {sum}"
    );
    let out = dir.path().join("restored");
    let (rc, o, e) = coffer_tests::coffer(
        &cfg,
        &[
            "restore",
            sum["snapshot"].as_str().unwrap(),
            out.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(rc, 0, "{o}{e}");
    let got = coffer_tests::describe(&out).unwrap();
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(names, ["keep.txt", "sub", "sub/keep2"], "{got:?}");

    // Without paths, `snapshot create` backs up what the policies schedule; the systemd timer
    // lines come from the same schedules (the Ansible client role installs them).
    let (rc, _, err) = coffer_tests::coffer(&cfg, &["snapshot", "create"]).unwrap();
    assert_ne!(rc, 0);
    assert!(err.contains("no policy schedules a path"), "{err}");
    admin(
        &app,
        &["policy", "set", &path_level, "--schedule", "daily 02:30"],
    );
    let (rc, listed, _) = coffer_tests::coffer(&cfg, &["policy", "schedule"]).unwrap();
    assert_eq!(
        (rc, listed.trim()),
        (0, format!("{}\tdaily 02:30", src.display()).as_str())
    );
    let (_, timer, _) = coffer_tests::coffer(&cfg, &["policy", "schedule", "--systemd"]).unwrap();
    assert_eq!(timer.trim(), "OnCalendar=*-*-* 02:30:00 UTC");
    let (rc, out, err) = coffer_tests::coffer(&cfg, &["snapshot", "create", "--json"]).unwrap();
    assert_eq!(rc, 0, "{err}");
    let again: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(again["path"], src.to_str().unwrap());
    assert_eq!(again["files"], 2, "the same policy applies: {again}");
}
