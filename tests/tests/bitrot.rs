//! Issue 14, item 5 (C8): bit rot in packs — a flipped byte and a deleted pack. `verify` names
//! every damaged chunk and the snapshots and files it affects; a restore of a damaged file fails
//! loudly and leaves no wrong byte behind; the next backup holding the data uploads it again —
//! even one that would reuse the unchanged files of its parent — and `verify` is clean
//! afterwards.

use std::path::{Path, PathBuf};

use coffer_tests::{coffer, connect_client, data, Appliance};

const ALICE: &str = "alice@laptop";

fn packs(repo: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(repo.join("packs")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let f = f.unwrap();
            out.push((f.metadata().unwrap().len(), f.path()));
        }
    }
    out.sort();
    out
}

#[test]
fn damaged_chunks_are_named_never_restored_wrong_and_healed_by_the_next_backup() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE]).unwrap();
    app.pack_target = Some(512 << 10);
    app.start().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for (i, name) in ["a", "b", "sub/c", "sub/d"].iter().enumerate() {
        std::fs::write(src.join(name), data(10 + i as u64, 1 << 20, false)).unwrap();
    }
    let cfg = dir.path().join("alice.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let backup = |args: &[&str]| {
        let mut a = vec!["snapshot", "create", src.to_str().unwrap(), "--json"];
        a.extend_from_slice(args);
        let (rc, out, err) = coffer(&cfg, &a).unwrap();
        assert_eq!(rc, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        (v["snapshot"].as_str().unwrap().to_string(), err)
    };
    let (snap, _) = backup(&[]);
    app.stop().unwrap();
    assert_eq!(app.verify(true).unwrap().0, 0);

    // Rot: one byte flipped in the middle of the largest pack, and a whole pack gone.
    let all = packs(&app.repo);
    assert!(all.len() >= 4, "{all:?}");
    let (len, big) = all.last().unwrap().clone();
    let mut bytes = std::fs::read(&big).unwrap();
    bytes[(len / 2) as usize] ^= 0x40;
    std::fs::write(&big, bytes).unwrap();
    std::fs::remove_file(&all[all.len() - 2].1).unwrap();

    let (rc, text) = app.verify(true).unwrap();
    assert_ne!(rc, 0, "{text}");
    assert!(text.contains("damaged chunks"), "{text}");
    let named: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("damaged: snapshot"))
        .collect();
    assert!(!named.is_empty(), "no affected file named: {text}");
    assert!(named.iter().all(|l| l.contains(&snap[..16])), "{text}");
    assert!(text.contains("marked"), "{text}");

    // A restore fails loudly; every file it leaves is the source's, byte for byte.
    app.start().unwrap();
    connect_client(&app, &cfg, "alice", "laptop");
    let out = dir.path().join("out");
    let (rc, o, e) = coffer(&cfg, &["restore", &snap, out.to_str().unwrap()]).unwrap();
    assert_ne!(rc, 0, "a restore of damaged files succeeded: {o}{e}");
    assert!(e.contains("damaged"), "{e}");
    // DATA_LOSS, not INTERNAL: the stored data is bad, not the appliance.
    assert!(e.contains("Unrecoverable data loss"), "{e}");
    let mut restored = 0;
    for name in ["a", "b", "sub/c", "sub/d"] {
        if let Ok(b) = std::fs::read(out.join(name)) {
            assert_eq!(
                b,
                std::fs::read(src.join(name)).unwrap(),
                "{name} restored wrong"
            );
            restored += 1;
        }
    }
    assert!(
        restored < 4,
        "every file restored although chunks are damaged"
    );

    // The next backup (with the previous snapshot as its parent, nothing changed in the source)
    // is told which chunks are damaged, reads the files that use them and uploads them again:
    // healed.
    let (healed, err) = backup(&[]);
    assert!(
        err.contains("damaged") || err.contains("could not be opened"),
        "{err}"
    );
    coffer_tests::assert_restores(&cfg, &snap, &src, &dir.path().join("out-old"));
    coffer_tests::assert_restores(&cfg, &healed, &src, &dir.path().join("out-new"));
    app.stop().unwrap();
    let (rc, text) = app.verify(true).unwrap();
    assert_eq!(rc, 0, "still damaged after the healing backup: {text}");
}
