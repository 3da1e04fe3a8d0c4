//! Client end to end: real `coffer` and `coffer-appliance` binaries, bit-exact restores, dedup
//! on the wire, malicious trees (F3) and random trees (F4).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coffer_client::{backup, restore, BackupOptions, Codec, Frame, Session};
use coffer_proto::v1::{Node, NodeKind, Snapshot, Tree};
use coffer_proto::{pack_ids, ChunkId};
use coffer_tests::{coffer, connect_client, create_snapshot, data, describe, Appliance};
use prost::Message;

const ALICE: &str = "alice@laptop";

fn set_mtime(p: &Path, secs: u64, nanos: u32) {
    let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    std::fs::File::open(p)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(t))
        .unwrap();
}

/// A tree with every supported file type.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("small.txt"), b"hello coffer\n").unwrap();
    std::fs::write(root.join("dir/big.bin"), data(1, 3 << 20, false)).unwrap();
    std::fs::write(root.join("dir/sub/text.log"), data(2, 300_000, true)).unwrap();
    std::fs::write(root.join("dir/sub/deeper/exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("dir/sub/deeper/exec.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("small.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::hard_link(root.join("dir/sub/text.log"), root.join("hardlink.log")).unwrap();
    std::os::unix::fs::symlink("dir/big.bin", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("link-dangling")).unwrap();
    std::fs::write(root.join("name with spaces & ünïcode"), b"odd name").unwrap();
    set_mtime(&root.join("small.txt"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("dir/sub"), 1_500_000_000, 5);
}

/// Every file type backs up and restores bit-exact (content, mode, mtime, symlink targets,
/// hardlink identity); a second backup reads nothing; diff, ls, list, delete work.
#[test]
fn backup_restore_every_file_type_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE]).unwrap();
    app.start().unwrap();
    let cfg = dir.path().join("client.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("src");
    make_tree(&src);

    let first = create_snapshot(&cfg, &src);
    assert_eq!(first["partial"], false);
    assert!(first["uploaded_bytes"].as_u64().unwrap() > 0);
    let again = create_snapshot(&cfg, &src);
    assert_eq!(
        again["bytes_read"], 0,
        "unchanged files are not read again: {again}"
    );
    assert_eq!(again["uploaded_bytes"], 0);

    let id = again["snapshot"].as_str().unwrap().to_string();
    let target = dir.path().join("restored");
    let (rc, out, err) = coffer(&cfg, &["restore", &id, target.to_str().unwrap()]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    assert_eq!(describe(&src).unwrap(), describe(&target).unwrap());

    // Sub-path restore and ls.
    let (rc, out, _) = coffer(&cfg, &["ls", &format!("{id}:/dir/sub")]).unwrap();
    assert_eq!(rc, 0);
    assert!(out.contains("text.log") && out.contains("deeper"), "{out}");
    let sub = dir.path().join("only-sub");
    let (rc, _, err) = coffer(
        &cfg,
        &[
            "restore",
            &format!("{}:/dir", &id[..10]),
            sub.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        std::fs::read(sub.join("big.bin")).unwrap(),
        data(1, 3 << 20, false)
    );

    // diff after a change
    std::fs::write(src.join("small.txt"), b"changed").unwrap();
    std::fs::remove_file(src.join("empty-file")).unwrap();
    let third = create_snapshot(&cfg, &src);
    let (rc, out, _) = coffer(
        &cfg,
        &["snapshot", "diff", &id, third["snapshot"].as_str().unwrap()],
    )
    .unwrap();
    assert_eq!(rc, 0);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["- /empty-file", "M /small.txt"],
        "{out}"
    );

    // list and delete
    let (_, out, _) = coffer(&cfg, &["snapshot", "list", "--json"]).unwrap();
    assert_eq!(out.lines().count(), 3);
    let (rc, _, err) = coffer(&cfg, &["snapshot", "delete", &id]).unwrap();
    assert_eq!(rc, 0, "{err}");
    let (_, out, _) = coffer(&cfg, &["snapshot", "list", "--json"]).unwrap();
    assert_eq!(out.lines().count(), 2);
    let (rc, _, err) = coffer(
        &cfg,
        &["restore", &id, dir.path().join("x").to_str().unwrap()],
    )
    .unwrap();
    assert_ne!(rc, 0);
    assert!(err.contains("no snapshot"), "{err}");
}

/// Dedup on the wire: a copy of a backed-up tree under another path uploads < 1 % of its bytes;
/// changing 1 % of the files uploads about the changed data only.
#[test]
fn dedup_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE]).unwrap();
    app.start().unwrap();
    let cfg = dir.path().join("client.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("a");
    for i in 0..200u64 {
        let d = src.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("f{i}")),
            data(
                1000 + i,
                20_000 + (usize::try_from(i).unwrap() * 997) % 60_000,
                false,
            ),
        )
        .unwrap();
    }
    let first = create_snapshot(&cfg, &src);
    let total = first["bytes"].as_u64().unwrap();
    let copy = dir.path().join("b");
    std::fs::create_dir_all(&copy).unwrap();
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(copy.join("a"))
        .status()
        .unwrap()
        .success());
    let second = create_snapshot(&cfg, &copy.join("a"));
    let up = second["uploaded_bytes"].as_u64().unwrap();
    eprintln!(
        "copy under another path: {total} bytes, {up} uploaded ({:.3}%)",
        up as f64 * 100.0 / total as f64
    );
    assert!(up * 100 < total, "copy uploaded {up} of {total}");

    // change 2 of 200 files (1 %)
    let mut changed = 0;
    for i in [3u64, 117] {
        let p = src.join(format!("d{}", i % 10)).join(format!("f{i}"));
        let new = data(
            5000 + i,
            20_000 + (usize::try_from(i).unwrap() * 997) % 60_000,
            false,
        );
        changed += new.len() as u64;
        std::fs::write(p, new).unwrap();
    }
    let third = create_snapshot(&cfg, &src);
    let up = third["uploaded_bytes"].as_u64().unwrap();
    eprintln!("1% of files changed: {changed} bytes changed, {up} uploaded");
    assert!(
        up >= changed && up < changed + 64 * 1024,
        "uploaded {up} for {changed} changed bytes"
    );
    assert_eq!(
        third["bytes_read"].as_u64().unwrap(),
        changed,
        "only the changed files are read"
    );
}

/// A big file is read as extents cut in parallel and merged back into its sequential chunking:
/// changing 2 % of its 64 KiB blocks in place, or inserting bytes at its start, uploads only
/// the chunks around the changes (extents cut independently would re-upload the chunks at
/// every extent boundary after a shift), and every version restores bit-exact.
#[test]
fn big_file_changes_upload_only_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE]).unwrap();
    app.start().unwrap();
    let cfg = dir.path().join("client.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("img");
    std::fs::create_dir_all(&src).unwrap();
    let file = src.join("disk.img");
    let size = 24usize << 20;
    let mut img = data(77, size, false);
    std::fs::write(&file, &img).unwrap();
    let first = create_snapshot(&cfg, &src);
    assert!(first["uploaded_bytes"].as_u64().unwrap() >= size as u64);

    let restore_and_compare = |snap: &serde_json::Value, want: &[u8], name: &str| {
        let target = dir.path().join(name);
        let id = snap["snapshot"].as_str().unwrap();
        let (rc, out, err) = coffer(&cfg, &["restore", id, target.to_str().unwrap()]).unwrap();
        assert_eq!(rc, 0, "{out}{err}");
        assert!(
            std::fs::read(target.join("disk.img")).unwrap() == want,
            "{name}: restored bytes differ"
        );
    };
    restore_and_compare(&first, &img, "r1");

    // 2 % of the 64 KiB blocks rewritten in place (8 of 384).
    let blocks = size / (64 << 10);
    let mut changed = 0;
    for b in (0..blocks).step_by(blocks / 8).take(8) {
        let at = b * (64 << 10) + 1000;
        img[at..at + 4096].copy_from_slice(&data(900 + b as u64, 4096, false));
        changed += 1;
    }
    std::fs::write(&file, &img).unwrap();
    let second = create_snapshot(&cfg, &src);
    let up = second["uploaded_bytes"].as_u64().unwrap();
    eprintln!("{changed} blocks changed in place: {up} bytes uploaded of {size}");
    assert!(up * 100 < 5 * size as u64, "uploaded {up} of {size}");
    restore_and_compare(&second, &img, "r2");

    // 100 bytes inserted at the start shift every extent boundary's content.
    let mut shifted = data(5, 100, false);
    shifted.extend_from_slice(&img);
    std::fs::write(&file, &shifted).unwrap();
    let third = create_snapshot(&cfg, &src);
    let up = third["uploaded_bytes"].as_u64().unwrap();
    eprintln!("100 bytes inserted at the start: {up} bytes uploaded");
    assert!(up < 1 << 20, "uploaded {up} after a 100-byte insertion");
    restore_and_compare(&third, &shifted, "r3");
}

fn tree_chunk(s: &Session, nodes: Vec<Node>) -> (ChunkId, Frame) {
    let bytes = Bytes::from(
        Tree {
            nodes,
            ..Tree::default()
        }
        .encode_to_vec(),
    );
    let id = s.chunk_id(&bytes);
    (id, Frame::new(id, bytes, Codec::None))
}

fn node(name: &[u8], kind: NodeKind) -> Node {
    Node {
        name: Bytes::copy_from_slice(name),
        kind: kind.into(),
        mode: 0o644,
        ..Node::default()
    }
}

/// F3: snapshots made by a deliberately broken client, with `..`, absolute names, '/', NUL,
/// duplicates and symlink-then-file tricks, never change anything outside the target; a symlink
/// planted in the target is replaced, not followed.
#[test]
fn f3_malicious_trees_never_escape_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE]).unwrap();
    app.start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(app.session(ALICE)).unwrap();
    let canary = dir.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::write(canary.join("keep"), b"untouched").unwrap();
    let before = describe(dir.path().join("canary").as_path()).unwrap();

    let payload = Bytes::from_static(b"evil bytes");
    let pid = s.chunk_id(&payload);
    let evil_file = |name: &[u8]| {
        let mut n = node(name, NodeKind::File);
        n.chunks = pack_ids(&[pid]).into();
        n.size = payload.len() as u64;
        n
    };
    let mut cases: Vec<(&str, Vec<Node>)> = vec![
        ("dotdot", vec![evil_file(b"..")]),
        ("slash", vec![evil_file(b"../canary/keep")]),
        ("absolute", vec![evil_file(b"/tmp/evil")]),
        ("nul", vec![evil_file(b"a\0b")]),
        ("empty", vec![evil_file(b"")]),
        ("duplicate", vec![evil_file(b"x"), evil_file(b"x")]),
    ];
    // A bundled file placed beyond the end of its bundle: refused, no short or wrong file.
    let mut outside = node(b"outside", NodeKind::File);
    outside.bundle = Bytes::copy_from_slice(pid.as_bytes());
    outside.bundle_offset = 4;
    outside.size = payload.len() as u64;
    cases.push(("bundle-range", vec![outside]));
    // symlink-then-file: a symlink "l" -> canary, then a directory "l" whose file would land in it
    let (inner, inner_frame) = tree_chunk(&s, vec![evil_file(b"keep")]);
    let mut link = node(b"l", NodeKind::Symlink);
    link.symlink_target = Bytes::from(canary.to_string_lossy().into_owned().into_bytes());
    let mut sub = node(b"l", NodeKind::Dir);
    sub.subtree = Bytes::copy_from_slice(inner.as_bytes());
    cases.push(("symlink-then-dir", vec![link, sub]));
    let mut frames = vec![Frame::new(pid, payload.clone(), Codec::None), inner_frame];
    let mut roots = Vec::new();
    for (name, nodes) in cases {
        let (id, f) = tree_chunk(&s, nodes);
        frames.push(f);
        roots.push((name, id));
    }
    // A target with a planted symlink pointing at the canary, restored over by a file of that name.
    let (plant_root, f) = tree_chunk(&s, vec![evil_file(b"planted")]);
    frames.push(f);
    rt.block_on(s.put(frames, 1 << 20)).unwrap();

    for (name, root) in roots {
        let target = dir.path().join(format!("t-{name}"));
        let res = rt.block_on(restore(&s, root, &target, false));
        assert_eq!(
            describe(&canary).unwrap(),
            before,
            "{name} changed the canary"
        );
        assert!(!Path::new("/tmp/evil").exists());
        // symlink-then-dir is refused too: it names "l" twice.
        assert!(res.is_err(), "{name} must be refused");
        assert!(
            !target.join("outside").exists(),
            "{name}: no partial file left"
        );
    }
    let target = dir.path().join("t-planted");
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(canary.join("keep"), target.join("planted")).unwrap();
    rt.block_on(restore(&s, plant_root, &target, false))
        .unwrap();
    assert_eq!(
        describe(&canary).unwrap(),
        before,
        "planted symlink was followed"
    );
    assert_eq!(std::fs::read(target.join("planted")).unwrap(), payload);
    assert!(!std::fs::symlink_metadata(target.join("planted"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A commit is refused when its root is not stored (in the words used for any root the
    // session does not know: whether it is stored is not revealed).
    let err = rt
        .block_on(s.commit(Snapshot {
            root: Bytes::copy_from_slice(&[7u8; 32]),
            path: "/x".into(),
            ..Snapshot::default()
        }))
        .unwrap_err();
    assert!(err.to_string().contains("neither uploaded"), "{err}");
}

mod f4 {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Item {
        File(Vec<u8>, u32, u64),
        Empty,
        Sparse(u64),
        Link(String),
        Dir(Vec<(String, Item)>),
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,8}",
            "[ -~&&[^/]]{1,12}".prop_filter("no dots", |s| s != "." && s != ".."),
            Just("ünï cödé".to_string()),
        ]
    }

    fn item() -> impl Strategy<Value = Item> {
        let leaf = prop_oneof![
            (
                proptest::collection::vec(any::<u8>(), 0..5000),
                prop_oneof![Just(0o644u32), Just(0o600), Just(0o755)],
                1_000_000_000u64..1_800_000_000
            )
                .prop_map(|(d, m, t)| Item::File(d, m, t)),
            Just(Item::Empty),
            (1u64..3_000_000).prop_map(Item::Sparse),
            "[a-z/.]{1,20}".prop_map(Item::Link),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            proptest::collection::vec((name(), inner), 0..6).prop_map(Item::Dir)
        })
    }

    #[allow(clippy::many_single_char_names)]
    fn build(p: &Path, items: &[(String, Item)], links: &mut Vec<std::path::PathBuf>) {
        let mut seen = std::collections::HashSet::new();
        for (n, it) in items {
            if !seen.insert(n.clone()) {
                continue;
            }
            let q = p.join(n);
            match it {
                Item::File(d, m, t) => {
                    std::fs::write(&q, d).unwrap();
                    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(*m)).unwrap();
                    set_mtime(&q, *t, 0);
                    links.push(q);
                }
                Item::Empty => std::fs::write(&q, b"").unwrap(),
                Item::Sparse(len) => {
                    let f = std::fs::File::create(&q).unwrap();
                    f.set_len(*len).unwrap();
                }
                Item::Link(t) => std::os::unix::fs::symlink(t, &q).unwrap(),
                Item::Dir(sub) => {
                    std::fs::create_dir(&q).unwrap();
                    build(&q, sub, links);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

        /// F4: random trees (empty, sparse and ordinary files, odd names, symlinks, hard links)
        /// back up and restore with 0 differences.
        #[test]
        fn random_trees_round_trip(items in proptest::collection::vec((name(), item()), 0..8), hardlink in any::<bool>()) {
            let (app, rt, s, dir) = &*FIXTURE;
            let _ = app;
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let src = dir.path().join(format!("src-{n}"));
            std::fs::create_dir(&src).unwrap();
            let mut files = Vec::new();
            build(&src, &items, &mut files);
            if hardlink {
                if let Some(f) = files.first() {
                    std::fs::hard_link(f, src.join("zz-hardlink")).unwrap();
                }
            }
            let opts = BackupOptions { workers: 2, ..BackupOptions::default() };
            let sum = rt.block_on(backup(s, &src, &opts)).unwrap();
            prop_assert!(!sum.partial);
            let sid = coffer_proto::SnapshotId::from_hex(&sum.snapshot).unwrap();
            let snap = rt.block_on(s.snapshot(&sid)).unwrap();
            rt.block_on(s.open(&sid)).unwrap();
            let target = dir.path().join(format!("dst-{n}"));
            rt.block_on(restore(s, ChunkId::from_slice(&snap.root).unwrap(), &target, false)).unwrap();
            prop_assert_eq!(describe(&src).unwrap(), describe(&target).unwrap());
        }
    }

    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    static FIXTURE: std::sync::LazyLock<(
        Appliance,
        tokio::runtime::Runtime,
        Session,
        tempfile::TempDir,
    )> = std::sync::LazyLock::new(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut app = Appliance::init(dir.path(), 2, 16 << 10, &[ALICE]).unwrap();
        app.start().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let s = rt.block_on(app.session(ALICE)).unwrap();
        (app, rt, s, dir)
    });
}

/// Issue 16, the terminal: `snapshot list` in local time and human sizes (RFC 3339 in JSON),
/// `ls -l`, and `restore --overwrite always|if-changed|never` — an existing file is never
/// overwritten silently.
#[test]
fn listings_read_as_dates_and_restore_says_what_it_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE]).unwrap();
    app.start().unwrap();
    let cfg = dir.path().join("client.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("src");
    make_tree(&src);
    let id = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    let (rc, out, _) = coffer(&cfg, &["snapshot", "list"]).unwrap();
    assert_eq!(rc, 0);
    let line = out.lines().find(|l| l.starts_with(&id)).unwrap();
    // `ID  YYYY-MM-DD HH:MM:SS  identity:path  N files  3.3 MiB`
    let when = &line[id.len() + 2..id.len() + 21];
    assert!(
        when.as_bytes()[4] == b'-' && when.as_bytes()[13] == b':',
        "{line}"
    );
    assert!(line.contains(" MiB"), "{line}");
    let (_, json, _) = coffer(&cfg, &["snapshot", "list", "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    let t = v["time"].as_str().unwrap();
    assert!(t.ends_with('Z') && t.contains('T'), "{v}");
    assert!(v["time_us"].as_i64().unwrap() > 0);

    let (rc, long, _) = coffer(&cfg, &["ls", "-l", &format!("{id}:/")]).unwrap();
    assert_eq!(rc, 0);
    let small = long.lines().find(|l| l.ends_with(" small.txt")).unwrap();
    assert!(small.starts_with("-rw------- "), "{small}");
    assert!(small.contains(" 13 "), "size in bytes: {small}");
    assert!(
        small.contains("2020-09-1"),
        "mtime 1600000000 in local time: {small}"
    );
    assert!(long.contains("link-rel -> dir/big.bin"), "{long}");
    let (_, short, _) = coffer(&cfg, &["ls", &format!("{id}:/")]).unwrap();
    assert!(short.lines().any(|l| l == "small.txt"), "{short}");

    let target = dir.path().join("restored");
    let restore = |mode: &str| {
        let (rc, out, err) = coffer(
            &cfg,
            &[
                "restore",
                &id,
                target.to_str().unwrap(),
                "--json",
                "--overwrite",
                mode,
            ],
        )
        .unwrap();
        assert_eq!(rc, 0, "{out}{err}");
        serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()
    };
    let first = restore("never");
    assert_eq!(
        (first["replaced"].as_u64(), first["kept"].as_u64()),
        (Some(0), Some(0))
    );
    // Local edits: one file changed, one left alone.
    std::fs::write(target.join("small.txt"), b"edited locally\n").unwrap();
    let kept = restore("never");
    assert_eq!(
        std::fs::read(target.join("small.txt")).unwrap(),
        b"edited locally\n"
    );
    assert!(kept["kept"].as_u64().unwrap() >= 8, "{kept}");
    assert_eq!(kept["replaced"], 0);
    let changed = restore("if-changed");
    assert_eq!(changed["replaced"], 1, "only the edited file: {changed}");
    assert_eq!(
        std::fs::read(target.join("small.txt")).unwrap(),
        b"hello coffer\n"
    );
    let all = restore("always");
    assert_eq!(all["kept"], 0);
    assert!(all["replaced"].as_u64().unwrap() >= 8, "{all}");
    assert_eq!(describe(&src).unwrap(), describe(&target).unwrap());
}
