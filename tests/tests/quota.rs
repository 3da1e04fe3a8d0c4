//! Space accounting and quotas (issue 12, item 6): `usage` tells each owner's logical, own and
//! shared bytes; an upload past an account's quota fails with RESOURCE_EXHAUSTED naming the
//! quota and the usage; retention and GC still run, and what they free counts at once.

use coffer_tests::{admin, coffer, connect_client, create_snapshot, Appliance};

fn usage(app: &Appliance) -> serde_json::Value {
    let out = admin(app, &["usage", "--json"]);
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

fn owner<'a>(u: &'a serde_json::Value, who: &str) -> &'a serde_json::Value {
    u["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["owner"] == who)
        .unwrap_or_else(|| panic!("{who} not in {u}"))
}

#[test]
fn an_upload_past_the_quota_is_refused_plainly_and_freed_space_counts_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = Appliance::init(base, 2, 64 << 10, &["alice@laptop", "bob@laptop"]).unwrap();
    app.serve_args = vec!["--gc-grace".into(), "0".into()];
    app.start().unwrap();
    let set = admin(&app, &["user", "set", "alice@laptop", "--quota", "1M"]);
    assert!(set.contains("1048576"), "{set}");
    let (alice, bob) = (base.join("alice.toml"), base.join("bob.toml"));
    connect_client(&app, &alice, "alice", "laptop");
    connect_client(&app, &bob, "bob", "laptop");
    let make = |name: &str, seed: u64| {
        let d = base.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), coffer_tests::data(seed, 600 << 10, false)).unwrap();
        d
    };
    let (a, b) = (make("a", 1), make("b", 2));
    let first = create_snapshot(&alice, &a)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    // 600 KiB stored of 1 MiB: another 600 KiB of new data is refused, plainly.
    let (rc, out, err) = coffer(&alice, &["snapshot", "create", b.to_str().unwrap()]).unwrap();
    assert_ne!(rc, 0, "{out}");
    assert!(
        err.contains("quota exceeded") && err.contains("alice@laptop may store 1.0 MiB"),
        "{err}"
    );
    // Bob has no quota; he also backs up Alice's data (shared from now on).
    let _ = create_snapshot(&bob, &b);
    let _ = create_snapshot(&bob, &a);
    let u = usage(&app);
    let (ua, ub) = (owner(&u, "alice@laptop"), owner(&u, "bob@laptop"));
    assert_eq!(ua["snapshots"], 1);
    assert_eq!(ua["logical_bytes"], 600 << 10);
    assert_eq!(
        ua["only_bytes"], 0,
        "everything of Alice's is shared with Bob: {u}"
    );
    let shared = ua["shared_bytes"].as_u64().unwrap();
    assert!(shared >= 600 << 10, "{u}");
    assert_eq!(ub["shared_bytes"].as_u64().unwrap(), shared);
    assert!(ub["only_bytes"].as_u64().unwrap() >= 600 << 10, "{u}");
    let table = admin(&app, &["usage", "--by", "host"]);
    assert!(
        table.contains("laptop") && table.contains("only theirs"),
        "{table}"
    );

    // Alice deletes her snapshot; maintenance runs as usual and the space it frees for her
    // counts at once: the upload that was refused now fits.
    let (rc, out, err) = coffer(&alice, &["snapshot", "delete", &first]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    admin(&app, &["maintenance", "run"]);
    assert!(usage(&app)["owners"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["owner"] != "alice@laptop"));
    let _ = create_snapshot(&alice, &b);
    // Lifting the quota lifts the limit.
    admin(&app, &["user", "set", "alice@laptop", "--quota", "none"]);
    let c = make("c", 3);
    std::fs::write(c.join("g"), coffer_tests::data(4, 900 << 10, false)).unwrap();
    let _ = create_snapshot(&alice, &c);
}
