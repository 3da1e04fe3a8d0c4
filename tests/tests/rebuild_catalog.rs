//! Snapshots survive the loss of `catalog/` (issue 12, item 4): the appliance journals every
//! catalog change in the packs, and `rebuild-catalog` recreates snapshots, accounts, rules and
//! policies from it alone.

use coffer_tests::{admin, assert_restores, coffer, connect_client, create_snapshot, Appliance};

#[test]
fn deleting_the_catalog_loses_no_snapshot_and_no_account() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = Appliance::init(base, 2, 64 << 10, &["alice@laptop", "bob@laptop"]).unwrap();
    app.start().unwrap();
    // Changes made through the running appliance (journaled as they happen).
    admin(&app, &["user", "add", "carol@desk"]);
    admin(&app, &["policy", "set", "alice@laptop", "--keep-last", "5"]);
    admin(&app, &["acl", "enable"]);
    let mut kept = Vec::new();
    let mut gone = Vec::new();
    for (user, host, n) in [
        ("alice", "laptop", 3),
        ("bob", "laptop", 2),
        ("carol", "desk", 1),
    ] {
        let cfg = base.join(format!("{user}.toml"));
        connect_client(&app, &cfg, user, host);
        for i in 0..n {
            let src = base.join(format!("src-{user}-{i}"));
            std::fs::create_dir_all(src.join("sub")).unwrap();
            std::fs::write(src.join("a"), coffer_tests::data(i, 300 << 10, false)).unwrap();
            std::fs::write(src.join("sub/b"), format!("{user} {i}")).unwrap();
            let id = create_snapshot(&cfg, &src)["snapshot"]
                .as_str()
                .unwrap()
                .to_string();
            kept.push((cfg.clone(), id, src));
        }
    }
    // Alice deletes her first snapshot: it must stay deleted.
    let (cfg, id, _) = kept.remove(0);
    let (rc, out, err) = coffer(&cfg, &["snapshot", "delete", &id]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    gone.push(id);
    // A lock and a protection are part of the records, and the audit chain is journaled too.
    admin(&app, &["snapshot", "lock", &kept[0].1, "--until", "30d"]);
    admin(&app, &["snapshot", "protect", &kept[1].1]);
    let snapshots = admin(&app, &["snapshot", "list", "--json"]);
    assert!(snapshots.contains("\"lock_until_us\":1"), "{snapshots}");
    let audit = admin(&app, &["audit", "show", "--json"]);
    let policies = admin(&app, &["policy", "list"]);
    let rules = admin(&app, &["acl", "list"]);
    app.stop().unwrap();

    // A catalog that exists is never overwritten.
    let refused = app
        .run(&["rebuild-catalog", "--repo", &app.repo_str()])
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("move it aside"));

    std::fs::remove_dir_all(app.repo.join("catalog")).unwrap();
    let rebuilt = admin(&app, &["rebuild-catalog"]);
    assert!(
        rebuilt.contains("3 users, 5 snapshots"),
        "rebuild-catalog: {rebuilt}"
    );
    assert_eq!(admin(&app, &["policy", "list"]), policies);
    assert_eq!(admin(&app, &["acl", "list"]), rules);
    assert_eq!(admin(&app, &["snapshot", "list", "--json"]), snapshots);
    assert_eq!(admin(&app, &["audit", "show", "--json"]), audit);
    assert!(admin(&app, &["audit", "verify"]).contains("audit log intact"));

    app.start().unwrap();
    let (rc, text) = app.verify(true).unwrap();
    assert_eq!(rc, 0, "{text}");
    for (user, host) in [("alice", "laptop"), ("bob", "laptop"), ("carol", "desk")] {
        // Logging in again (a new port, the same password) works for every account.
        connect_client(&app, &base.join(format!("{user}.toml")), user, host);
    }
    let out = base.join("restored");
    std::fs::create_dir_all(&out).unwrap();
    for (cfg, id, src) in &kept {
        assert_restores(cfg, id, src, &out.join(id));
    }
    let (rc, list, err) =
        coffer(&base.join("alice.toml"), &["snapshot", "list", "--json"]).unwrap();
    assert_eq!(rc, 0, "{err}");
    assert!(
        !list.contains(&gone[0]),
        "a deleted snapshot came back: {list}"
    );
}
