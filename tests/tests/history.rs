//! Issue 13, items 1 and 5: new repositories are append-only by default (a client holding its
//! password cannot delete its own history), an existing one switches with `acl enable
//! --append-only-defaults`, and once rules are enabled an empty rule set means no access.

use coffer_tests::{admin, coffer, connect_client, create_snapshot, Appliance};

fn try_delete(cfg: &std::path::Path, id: &str) -> (i32, String) {
    let (rc, out, err) = coffer(cfg, &["snapshot", "delete", id]).unwrap();
    (rc, format!("{out}{err}"))
}

#[test]
fn new_repositories_are_append_only_and_existing_ones_switch_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    // A new repository, with init's default.
    let mut app = Appliance::init_with(base, 1, 64 << 10, &["alice@laptop"], &[]).unwrap();
    app.start().unwrap();
    let listed = admin(&app, &["acl", "list"]);
    assert!(listed.contains("append-only defaults"), "{listed}");
    assert!(
        listed.contains("default-own-snapshots") && listed.contains("access=APPEND"),
        "{listed}"
    );
    let cfg = base.join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = base.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"history").unwrap();
    let id = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let (rc, text) = try_delete(&cfg, &id);
    assert_ne!(rc, 0);
    assert!(
        text.contains("may read snapshot") && text.contains("not delete it"),
        "{text}"
    );
    let (rc, list, _) = coffer(&cfg, &["snapshot", "list"]).unwrap();
    assert!(
        rc == 0 && list.contains(&id),
        "the client still adds and lists: {list}"
    );
    drop(app);

    // A repository made with the old defaults keeps them until the operator switches.
    let old = base.join("old");
    std::fs::create_dir_all(&old).unwrap();
    let mut app = Appliance::init(&old, 1, 64 << 10, &["alice@laptop"]).unwrap();
    app.start().unwrap();
    let cfg = old.join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let a = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let b = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(admin(&app, &["acl", "list"]).contains("full defaults"));
    assert_eq!(
        try_delete(&cfg, &a).0,
        0,
        "full defaults: the owner deletes"
    );
    admin(&app, &["acl", "enable", "--append-only-defaults"]);
    let (rc, text) = try_delete(&cfg, &b);
    assert_ne!(rc, 0, "switched: {text}");
    let listed = admin(&app, &["acl", "list"]);
    assert!(listed.contains("access=APPEND"), "{listed}");

    // Rules fail closed: removing every rule leaves nobody any access, and adding works.
    admin(&app, &["acl", "remove", "--all", "--delete"]);
    let listed = admin(&app, &["acl", "list"]);
    assert!(listed.contains("nobody has access"), "{listed}");
    let (rc, out, err) = coffer(&cfg, &["snapshot", "create", src.to_str().unwrap()]).unwrap();
    assert_ne!(rc, 0, "{out}");
    assert!(err.contains("may not add snapshots"), "{err}");
    admin(&app, &["acl", "enable", "--defaults"]);
    let _ = create_snapshot(&cfg, &src);
    let (rc, text) = try_delete(&cfg, &b);
    assert_ne!(
        rc, 0,
        "the defaults brought back are the append-only ones: {text}"
    );
}

/// A repository whose rules are already stored (full defaults, enabled) narrows them in place.
#[test]
fn stored_full_defaults_are_narrowed_to_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = Appliance::init(base, 1, 64 << 10, &["alice@laptop"]).unwrap();
    app.start().unwrap();
    admin(&app, &["acl", "enable"]);
    let listed = admin(&app, &["acl", "list"]);
    assert!(listed.contains("access=FULL"), "{listed}");
    admin(&app, &["acl", "enable", "--append-only-defaults"]);
    let listed = admin(&app, &["acl", "list"]);
    assert!(
        listed.contains("default-own-snapshots") && !listed.contains("access=FULL"),
        "{listed}"
    );
    let cfg = base.join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = base.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"kept").unwrap();
    let id = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let (rc, text) = try_delete(&cfg, &id);
    assert_ne!(rc, 0, "{text}");
}
