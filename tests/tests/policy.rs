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
    let (ok, err) = run(&["policy", "delete", "@nowhere"]);
    assert!(!ok && err.contains("no policy at @nowhere"), "{err}");
}
