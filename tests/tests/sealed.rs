//! Issue 15: sealed mode. The appliance stores what keyring members sealed and orchestrates
//! everything else, but never holds a key that reads a snapshot: nothing readable is on it,
//! and a stolen appliance (its directory and its own secrets) gives no content and no path.
//! Roles hold by the rules and by the keys alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use coffer_client::{backup, restore, BackupOptions, Master, Member, Role, Session};
use coffer_proto::{v1, ChunkId, SnapshotId};
use coffer_tests::{
    acl_add, admin, assert_restores, code, coffer, create_snapshot, data, describe, Appliance,
    REPO_PASSWORD,
};

const ALICE: &str = "alice@laptop";
const WALLY: &str = "wally@kiosk";
const LOGAN: &str = "logan@audit";
/// What the backed-up tree says, in its files and in its names; none of it may be found on the
/// appliance in any form it can read.
const MARKERS: &[&str] = &[
    "COFFER-MARKER-f81d4fae7dec",
    "payroll-secret-2026",
    "project-nightingale",
];

/// A tree whose contents and names carry the markers: small files (bundled), a file of many
/// chunks, nested directories, a symlink.
fn source(root: &Path) -> PathBuf {
    let src = root.join("src");
    let deep = src.join("project-nightingale").join("payroll-secret-2026");
    std::fs::create_dir_all(&deep).unwrap();
    for i in 0..40u64 {
        let mut body = data(i, 3000 + usize::try_from(i).unwrap() * 97, true);
        body.extend_from_slice(MARKERS[(i % 3) as usize].as_bytes());
        std::fs::write(deep.join(format!("note-{i}.txt")), body).unwrap();
    }
    let mut big = Vec::new();
    for i in 0..300u64 {
        big.extend_from_slice(&data(1000 + i, 20_000, i % 2 == 0));
        big.extend_from_slice(MARKERS[0].as_bytes());
    }
    std::fs::write(src.join("big.bin"), big).unwrap();
    std::os::unix::fs::symlink("project-nightingale", src.join("link")).unwrap();
    src
}

struct Sealed {
    _dir: tempfile::TempDir,
    app: Appliance,
    master: Master,
    src: PathBuf,
    dir: PathBuf,
}

/// A sealed appliance with Alice (read-write), Wally (write-only account) and Logan (log-only
/// account), and a keyring.
fn sealed() -> Sealed {
    let d = tempfile::tempdir().unwrap();
    let mut app = Appliance::init_with(
        d.path(),
        2,
        64 * 1024,
        &[ALICE],
        &["--default-access", "full", "--mode", "sealed"],
    )
    .unwrap();
    let repo = app.repo_str();
    for (who, role) in [(WALLY, "write-only"), (LOGAN, "log-only")] {
        let out = app
            .run(&["user", "add", who, "--repo", &repo, "--role", role])
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    app.start().unwrap();
    // Store the built-in rules, so that tests can add rules beside them.
    admin(&app, &["acl", "enable"]);
    let src = source(d.path());
    Sealed {
        dir: d.path().to_path_buf(),
        _dir: d,
        app,
        master: Master::generate(),
        src,
    }
}

impl Sealed {
    /// A session of `identity` holding the member file `role` issues (read back from its file,
    /// as a fleet machine would).
    async fn session(&self, identity: &str, role: Role) -> anyhow::Result<Session> {
        let text = self.master.issue(identity, role).to_file()?;
        let mut o = self.app.options(identity);
        o.keyring = Some(Arc::new(Member::from_file(&text)?));
        Ok(Session::connect(&o).await?)
    }

    fn opts() -> BackupOptions {
        BackupOptions {
            workers: 2,
            ..BackupOptions::default()
        }
    }
}

/// Restores snapshot `id` through `s` into a new directory under `dir` and answers its path.
async fn restored(s: &Session, id: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let snap = s.snapshot(&SnapshotId::from_hex(id)?).await?;
    let target = dir.join(format!("restore-{}", &id[..8]));
    restore(s, ChunkId::from_slice(&snap.root)?, &target, false).await?;
    Ok(target)
}

/// Every file under `root`, recursively.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// The secret keys of a member file (hex fields holding keys), as bytes.
fn key_bytes(member_file: &str) -> Vec<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_str(member_file).unwrap();
    let mut keys = Vec::new();
    for f in ["id_key", "conv_key", "path_key", "signing_secret"] {
        if let Some(h) = v[f].as_str() {
            keys.push(hex::decode(h).unwrap());
        }
    }
    for f in ["data_secret", "log_secret"] {
        for h in v[f].as_object().unwrap().values() {
            keys.push(hex::decode(h.as_str().unwrap()).unwrap());
        }
    }
    assert!(keys.len() >= 6, "a read-write member holds six keys");
    keys
}

/// Which of `needles` occur in `hay` (as bytes, or as lower-case hex).
fn found<'a>(hay: &[u8], needles: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    needles
        .iter()
        .filter(|n| {
            hay.windows(n.len()).any(|w| w == n.as_slice()) || {
                let h = hex::encode(n);
                hay.windows(h.len()).any(|w| w == h.as_bytes())
            }
        })
        .map(Vec::as_slice)
        .collect()
}

/// Every record of every pack, opened with the appliance's own key (what a thief who holds the
/// repository directory and the repository password gets): (flags, stored plaintext).
fn stolen_records(repo: &Path) -> Vec<(u8, Vec<u8>)> {
    use coffer_appliance::pack::read::{raw_plaintext, scan};
    use coffer_appliance::Encryption as _;
    let master = coffer_appliance::MasterKey::load(
        &repo.join("keys").join("master.key"),
        REPO_PASSWORD.as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    for f in files(&repo.join("packs")) {
        if f.components().any(|c| c.as_os_str() == "catalog") {
            continue;
        }
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let pack = coffer_proto::PackId::from_hex(&name).unwrap();
        let key = master.pack_cipher(&pack);
        let s = scan(&f, key.as_ref(), 64 << 20).unwrap();
        let bytes = std::fs::read(&f).unwrap();
        for r in s.records {
            let start = usize::try_from(r.offset).unwrap();
            let mut rec =
                bytes[start..start + usize::try_from(r.header.record_len()).unwrap()].to_vec();
            let (h, stored) =
                coffer_appliance::pack::read::open_record(key.as_ref(), &mut rec).unwrap();
            out.push((h.flags, raw_plaintext(&h, stored).unwrap()));
        }
    }
    out
}

/// Acceptance "nothing readable on the appliance" and "stolen appliance": Alice backs up a tree
/// whose contents and names carry markers, twice; both restore bit-exact. Then no marker, no
/// path and no byte of her keys is found in any file of the repository, in any record opened
/// with the appliance's own key, in the catalog as the appliance reads it, or in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sealed_backups_restore_bit_exact_and_the_appliance_holds_nothing_readable() {
    let t = sealed();
    let alice_file = t.master.issue(ALICE, Role::ReadWrite).to_file().unwrap();
    let s = t.session(ALICE, Role::ReadWrite).await.unwrap();
    assert_eq!(s.hello.mode, i32::from(v1::EncryptionMode::Sealed));
    assert!(
        s.hello.dedup_key.is_empty(),
        "the appliance has no dedup key to give"
    );
    let first = backup(&s, &t.src, &Sealed::opts()).await.unwrap();
    std::fs::write(t.src.join("added.txt"), b"added later payroll-secret-2026").unwrap();
    let second = backup(&s, &t.src, &Sealed::opts()).await.unwrap();
    assert!(second.files_unchanged > 0, "the sealed parent was reused");
    assert!(second.new_chunks < first.new_chunks);
    for (sum, expect_added) in [(&first, false), (&second, true)] {
        let target = restored(&s, &sum.snapshot, &t.dir).await.unwrap();
        let mut want = describe(&t.src).unwrap();
        if !expect_added {
            want.remove("added.txt");
        }
        assert_eq!(describe(&target).unwrap(), want, "{}", sum.snapshot);
    }
    // The list shows the real path, from the verified header.
    let listed = s.list("", false).await.unwrap();
    let path = std::fs::canonicalize(&t.src).unwrap();
    assert!(listed.iter().all(|l| l.path == path.to_string_lossy()));
    s.end().await;

    let mut needles: Vec<Vec<u8>> = MARKERS.iter().map(|m| m.as_bytes().to_vec()).collect();
    needles.push(t.src.to_string_lossy().as_bytes().to_vec());
    needles.push(b"note-17.txt".to_vec());
    let keys = key_bytes(&alice_file);
    needles.extend(keys.iter().cloned());

    // Every file of the repository directory, raw.
    let mut scanned = 0u64;
    for f in files(&t.app.repo) {
        let bytes = std::fs::read(&f).unwrap();
        scanned += bytes.len() as u64;
        assert!(
            found(&bytes, &needles).is_empty(),
            "{} holds a secret",
            f.display()
        );
    }
    assert!(scanned > 5 << 20, "scanned only {scanned} bytes");
    // Every record, opened with the appliance's own key: envelopes only.
    let records = stolen_records(&t.app.repo);
    assert!(records.len() > 20, "{} records", records.len());
    for (flags, plain) in &records {
        assert!(flags & 0b10 != 0, "a record without the sealed flag");
        assert!(plain.starts_with(b"CSE2"));
        let hit = found(plain, &needles);
        assert!(
            hit.is_empty(),
            "a record opened by the appliance's key holds {hit:?}"
        );
    }
    // The catalog as the appliance reads it, and its log.
    let listing = admin(&t.app, &["snapshot", "list", "--json"]);
    assert_eq!(listing.matches("/.sealed/").count(), 2, "{listing}");
    let log = std::fs::read(t.dir.join("appliance.log")).unwrap();
    for hay in [listing.as_bytes(), &log] {
        assert!(found(hay, &needles).is_empty());
    }
    let (rc, report) = t.app.verify(true).unwrap();
    assert_eq!(rc, 0, "{report}");
}

/// Acceptance "write-only": backups work; listing, reading, opening, restoring and deleting —
/// its own snapshots and others' — fail by the rules (a write-only account) and by the keys (a
/// write-only member on an unrestricted account). A read-write member of the keyring, allowed
/// by the rules, restores what the write-only member wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_only_members_add_snapshots_and_read_nothing() {
    let t = sealed();
    let w = t.session(WALLY, Role::WriteOnly).await.unwrap();
    assert_eq!(w.hello.role, "write-only");
    let mine = backup(&w, &t.src, &Sealed::opts()).await.unwrap();
    let again = backup(&w, &t.src, &Sealed::opts()).await.unwrap();
    assert_eq!(
        again.new_chunks, 0,
        "the second backup deduplicates everything"
    );
    let id = SnapshotId::from_hex(&mine.snapshot).unwrap();
    let a = t.session(ALICE, Role::ReadWrite).await.unwrap();
    let alices = backup(&a, &t.src, &Sealed::opts()).await.unwrap();
    let theirs = SnapshotId::from_hex(&alices.snapshot).unwrap();

    // By the rules.
    let denied = |r: Result<_, coffer_client::ClientError>| {
        let e = r.expect_err("refused");
        assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
        assert!(e.to_string().contains("write-only"), "{e}");
    };
    denied(w.list("", false).await.map(|_| ()));
    denied(w.list("", true).await.map(|_| ()));
    for snap in [&id, &theirs] {
        denied(w.snapshot(snap).await.map(|_| ()));
        denied(w.open(snap).await.map(|_| ()));
        denied(w.delete(snap, "").await);
    }
    let root = ChunkId::from_slice(&a.snapshot(&theirs).await.unwrap().root).unwrap();
    denied(w.get(&[root]).await.map(|_| ()));

    // By the keys: Alice's account holds a write-only member file.
    let keyless = t.session(ALICE, Role::WriteOnly).await.unwrap();
    let listed = keyless.list("", false).await.unwrap();
    assert!(listed
        .iter()
        .all(|s| s.tags.first().is_some_and(|t| t.contains("UNVERIFIED"))));
    let e = keyless.snapshot(&theirs).await.unwrap_err().to_string();
    assert!(e.contains("write-only") && e.contains("list"), "{e}");
    keyless.open(&theirs).await.unwrap();
    let e = keyless.get(&[root]).await.unwrap_err().to_string();
    assert!(e.contains("write-only") && e.contains("read chunks"), "{e}");

    // A reader the rules allow restores what the write-only member wrote.
    admin(
        &t.app,
        &[
            "acl",
            "add",
            "--user",
            ALICE,
            "--access",
            "READ",
            "--target",
            "type=snapshot,username=wally,hostname=kiosk",
        ],
    );
    let target = restored(&a, &mine.snapshot, &t.dir).await.unwrap();
    assert_eq!(describe(&target).unwrap(), describe(&t.src).unwrap());
    let shown = a.snapshot(&id).await.unwrap().path;
    assert_eq!(
        shown,
        std::fs::canonicalize(&t.src).unwrap().to_string_lossy()
    );
}

/// Log-only: lists snapshots (their real paths, from the headers) and reads nothing, by the
/// rules and by the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_only_members_list_and_read_nothing() {
    let t = sealed();
    let a = t.session(ALICE, Role::ReadWrite).await.unwrap();
    let sum = backup(&a, &t.src, &Sealed::opts()).await.unwrap();
    let id = SnapshotId::from_hex(&sum.snapshot).unwrap();
    acl_add(
        &t.app,
        LOGAN,
        "READ",
        "type=snapshot,username=alice,hostname=laptop",
    );
    let l = t.session(LOGAN, Role::LogOnly).await.unwrap();
    let listed = l.list("", true).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].path,
        std::fs::canonicalize(&t.src).unwrap().to_string_lossy()
    );
    let e = l.open(&id).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    let root = ChunkId::from_slice(&listed[0].root).unwrap();
    let e = l.get(&[root]).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    // A log-only member cannot back up: it has no id key.
    let e = backup(&l, &t.src, &Sealed::opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("log-only"), "{e}");
}

/// Signatures: a snapshot whose header was taken from another snapshot (another root), or
/// written by another keyring, is reported and never restored; the honest one still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_altered_or_foreign_header_is_reported_and_never_restored() {
    let t = sealed();
    let alice = t.session(ALICE, Role::ReadWrite).await.unwrap();
    let first = backup(&alice, &t.src, &Sealed::opts()).await.unwrap();
    std::fs::write(t.src.join("more.txt"), b"more").unwrap();
    let second = backup(&alice, &t.src, &Sealed::opts()).await.unwrap();
    let one = alice
        .snapshot(&SnapshotId::from_hex(&first.snapshot).unwrap())
        .await
        .unwrap();
    let two = alice
        .snapshot(&SnapshotId::from_hex(&second.snapshot).unwrap())
        .await
        .unwrap();
    // The first header over the second root, committed raw (as a malicious appliance or
    // member would present it).
    let swapped = v1::Snapshot {
        path: "/.sealed/00".into(),
        root: two.root.clone(),
        sealed: one.sealed.clone(),
        ..v1::Snapshot::default()
    };
    let r = alice
        .raw()
        .commit_snapshot(v1::CommitSnapshotRequest {
            snapshot: Some(swapped),
            commit_id: Bytes::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let forged = SnapshotId::from_slice(&r.id).unwrap();
    let e = alice.snapshot(&forged).await.unwrap_err().to_string();
    assert!(
        e.contains("does not match") && e.contains("not restored"),
        "{e}"
    );
    // Another keyring's member, same account: its headers do not open here.
    let stranger = {
        let mut o = t.app.options(ALICE);
        o.keyring = Some(Arc::new(Master::generate().issue(ALICE, Role::ReadWrite)));
        Session::connect(&o).await.unwrap()
    };
    let foreign = backup(&stranger, &t.src, &Sealed::opts()).await.unwrap();
    let e = alice
        .snapshot(&SnapshotId::from_hex(&foreign.snapshot).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("another keyring"), "{e}");
    let listed = alice.list("", false).await.unwrap();
    let unverified = listed
        .iter()
        .filter(|s| s.tags.first().is_some_and(|t| t.starts_with("UNVERIFIED")))
        .count();
    assert_eq!((listed.len(), unverified), (4, 2));
    // The honest snapshot restores.
    let target = restored(&alice, &second.snapshot, &t.dir).await.unwrap();
    assert_eq!(describe(&target).unwrap(), describe(&t.src).unwrap());
}

/// A managed client cannot talk to a sealed appliance without a keyring, and a keyring is
/// refused by a managed one: neither silently does the other mode's thing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_and_keyrings_must_match() {
    let t = sealed();
    let e = Session::connect(&t.app.options(ALICE)).await.unwrap_err();
    assert!(e.to_string().contains("sealed"), "{e}");
    let d = tempfile::tempdir().unwrap();
    let managed = Appliance::started(d.path(), 1, 64 * 1024, &[ALICE]).unwrap();
    let mut o = managed.options(ALICE);
    o.keyring = Some(Arc::new(t.master.issue(ALICE, Role::ReadWrite)));
    let e = Session::connect(&o).await.unwrap_err();
    assert!(e.to_string().contains("managed"), "{e}");
}

/// Every chunk id reachable from `root`, trees first (read and decoded through `s`).
async fn reachable(s: &Session, root: ChunkId) -> Vec<ChunkId> {
    use coffer_proto::sealed::Refs;
    use prost::Message as _;
    let mut out = Vec::new();
    let mut trees = vec![root];
    while let Some(t) = trees.pop() {
        out.push(t);
        let plain = s.get(&[t]).await.unwrap().remove(0);
        let refs = Refs::of_tree(&v1::Tree::decode(&plain[..]).unwrap()).unwrap();
        trees.extend(refs.trees);
        out.extend(refs.leaves);
        for l in refs.lists {
            out.push(l);
            let ids = s.get(&[l]).await.unwrap().remove(0);
            out.extend(coffer_proto::unpack_ids(&ids, usize::MAX).unwrap());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Acceptance "poisoning": Mallory, a member of the same keyring, learns the ids of a tree by
/// backing it up, then uploads garbage under every one of them. Her own restore detects it and
/// writes nothing. Alice then backs up the same tree: her envelope hashes differ from the
/// stored ones, so the appliance answers "missing", her uploads replace the garbage, and her
/// backup restores bit-exact; `verify` reports every replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoned_chunk_is_replaced_by_the_honest_upload_and_reported() {
    const MALLORY: &str = "mallory@evil";
    let t = sealed();
    // Repository disclosure: a stored chunk is answered "prove" — unless its envelope differs
    // from the client's, which only the envelope hashes show (a proof over the honest envelope
    // would be refused against the garbage, and the backup would fail).
    t.app.set_disclosure("repository").unwrap();
    admin(&t.app, &["user", "add", MALLORY]);
    // Alice's backup writes the records; Mallory's of the same tree deduplicates against them
    // (an account never replaces records it wrote itself, so she poisons Alice's).
    let a = t.session(ALICE, Role::ReadWrite).await.unwrap();
    backup(&a, &t.src, &Sealed::opts()).await.unwrap();
    let m = t.session(MALLORY, Role::ReadWrite).await.unwrap();
    let hers = backup(&m, &t.src, &Sealed::opts()).await.unwrap();
    let snap = m
        .snapshot(&SnapshotId::from_hex(&hers.snapshot).unwrap())
        .await
        .unwrap();
    let ids = reachable(&m, ChunkId::from_slice(&snap.root).unwrap()).await;
    assert!(ids.len() > 10, "{} ids", ids.len());
    let garbage: Vec<coffer_client::Frame> = ids
        .iter()
        .map(|id| {
            let mut env = coffer_proto::sealed::encode_refs(&coffer_proto::sealed::Refs::default());
            env.extend_from_slice(&data(u64::from(id.as_bytes()[0]), 300, false));
            coffer_client::Frame {
                id: *id,
                raw_len: u32::try_from(env.len()).unwrap(),
                compression: v1::Compression::None,
                data: Bytes::from(env),
            }
        })
        .collect();
    let st = m.put(garbage, 1 << 20).await.unwrap();
    assert_eq!(
        st.stored,
        ids.len() as u64,
        "every record replaced by garbage"
    );
    // Mallory's own snapshot now reads garbage: detected, nothing written. (Garbage may also
    // name a key generation her file lacks, which the message says can be a damaged record.)
    let target = t.dir.join("poisoned-restore");
    let e = restore(&m, ChunkId::from_slice(&snap.root).unwrap(), &target, false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            coffer_client::ClientError::Corrupt(_) | coffer_client::ClientError::Keyring(_)
        ),
        "{e}"
    );
    assert!(!target.join("big.bin").exists());

    // Alice's next backup reads every file again (no parent): her envelopes differ from the
    // garbage, so every chunk is answered missing and her upload replaces Mallory's records.
    let opts = BackupOptions {
        no_parent: true,
        ..Sealed::opts()
    };
    let sum = backup(&a, &t.src, &opts).await.unwrap();
    assert_eq!(
        sum.new_chunks,
        ids.len() as u64,
        "every poisoned chunk uploaded again"
    );
    let target = restored(&a, &sum.snapshot, &t.dir).await.unwrap();
    assert_eq!(describe(&target).unwrap(), describe(&t.src).unwrap());
    // Mallory's snapshot reads the honest records again.
    let target = restored(&m, &hers.snapshot, &t.dir).await.unwrap();
    assert_eq!(describe(&target).unwrap(), describe(&t.src).unwrap());
    let (rc, report) = t.app.verify(true).unwrap();
    assert_eq!(rc, 0, "{report}");
    assert_eq!(
        report.matches("S1: chunk").count(),
        2 * ids.len(),
        "both replacements of every chunk are reported: {report}"
    );
}

/// `coffer connect server --token` for `user@host` against `t`'s appliance: (exit code, output).
fn enroll_cli(t: &Sealed, config: &Path, user: &str, host: &str, token: &str) -> (i32, String) {
    let url = format!("https://{}", t.app.addr.as_ref().unwrap());
    let (rc, out, err) = coffer(
        config,
        &[
            "connect",
            "server",
            "--url",
            &url,
            "--server-cert-fingerprint",
            t.app.fingerprint.as_ref().unwrap(),
            "--override-username",
            user,
            "--override-hostname",
            host,
            "--token",
            token,
        ],
    )
    .unwrap();
    (rc, format!("{out}{err}"))
}

/// Acceptance "enrollment": an operator's client creates tokens; a fleet machine enrolls with
/// nothing but its token (account, password and keys), once. A second use, another account's
/// use and an expired token are refused alike; a write-only machine backs up and reads nothing,
/// a read-write one restores bit-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrollment_tokens_enroll_once_for_their_account_until_they_expire() {
    const OPS: &str = "ops@admin";
    let mut t = sealed();
    admin(&t.app, &["user", "add", OPS]);
    for target in ["type=user", "type=acl"] {
        admin(
            &t.app,
            &[
                "acl", "add", "--user", OPS, "--access", "FULL", "--target", target,
            ],
        );
    }
    let ops = t.session(OPS, Role::ReadWrite).await.unwrap();
    let in_a_day = coffer_proto::now_us() + 86_400_000_000;
    let token = |who: &'static str, role| {
        let ops = &ops;
        let master = &t.master;
        async move {
            coffer_client::create_enrollment(ops, Some(master), who, role, in_a_day, "")
                .await
                .unwrap()
        }
    };
    let kiosk = token("fleet1@kiosk", Role::WriteOnly).await;
    let desk = token("fleet2@desk", Role::ReadWrite).await;
    let late = token("fleet3@late", Role::ReadWrite).await;
    assert!(kiosk.starts_with("coffer-enroll-v1:") && kiosk.contains('.'));
    // A managed-style token (no keys) is refused by a sealed appliance's client side.
    let e = coffer_client::create_enrollment(&ops, None, "x@y", Role::ReadWrite, in_a_day, "")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--master"), "{e}");
    // Nobody else may create tokens.
    let a = t.session(ALICE, Role::ReadWrite).await.unwrap();
    let e =
        coffer_client::create_enrollment(&a, Some(&t.master), "x@y", Role::ReadWrite, in_a_day, "")
            .await
            .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");

    // The write-only kiosk enrolls with its token alone, backs up, lists nothing.
    let kcfg = t.dir.join("kiosk.json");
    let (rc, out) = enroll_cli(&t, &kcfg, "fleet1", "kiosk", &kiosk);
    assert_eq!(rc, 0, "{out}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&kcfg).unwrap()).unwrap();
    assert!(saved["password"].as_str().unwrap().len() >= 32);
    let sum = create_snapshot(&kcfg, &t.src);
    assert!(sum["files"].as_u64().unwrap() > 40);
    let (rc, _, err) = coffer(&kcfg, &["snapshot", "list"]).unwrap();
    assert_ne!(rc, 0);
    assert!(err.contains("write-only"), "{err}");
    // Used once.
    let (rc, out) = enroll_cli(&t, &t.dir.join("again.json"), "fleet1", "kiosk", &kiosk);
    assert_ne!(rc, 0);
    assert!(
        out.contains("unknown, used, expired or for another account"),
        "{out}"
    );
    // Another account's token is refused, and stays usable by its own account.
    let (rc, out) = enroll_cli(&t, &t.dir.join("thief.json"), "thief", "desk", &desk);
    assert_ne!(rc, 0);
    assert!(
        out.contains("unknown, used, expired or for another account"),
        "{out}"
    );
    let dcfg = t.dir.join("desk.json");
    let (rc, out) = enroll_cli(&t, &dcfg, "fleet2", "desk", &desk);
    assert_eq!(rc, 0, "{out}");
    let sum = create_snapshot(&dcfg, &t.src);
    assert_restores(
        &dcfg,
        sum["snapshot"].as_str().unwrap(),
        &t.src,
        &t.dir.join("desk-restore"),
    );
    // Expired: the appliance's clock two days on.
    t.app.stop().unwrap();
    t.app
        .serve_env
        .push(("COFFER_CLOCK_OFFSET_SECS".into(), (2 * 86_400).to_string()));
    t.app.start().unwrap();
    let (rc, out) = enroll_cli(&t, &t.dir.join("late.json"), "fleet3", "late", &late);
    assert_ne!(rc, 0);
    assert!(
        out.contains("unknown, used, expired or for another account"),
        "{out}"
    );
    let audit = admin(&t.app, &["audit", "show"]);
    // Three created, and Alice's attempt refused.
    assert_eq!(audit.matches("enroll.create").count(), 4, "{audit}");
    assert_eq!(audit.matches("enroll.redeem").count(), 2, "{audit}");
}

/// Issue 18: a sealed snapshot mounts (the client decrypts with its keyring, as for restore) and
/// reads back as recorded: names, modes, times, contents, symlinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_snapshot_mounts_and_reads_back_as_recorded() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: /dev/fuse is absent, so FUSE cannot mount here");
        return;
    }
    let t = sealed();
    let s = t.session(ALICE, Role::ReadWrite).await.unwrap();
    let sum = backup(&s, &t.src, &Sealed::opts()).await.unwrap();
    let at = t.dir.join("mnt");
    std::fs::create_dir_all(&at).unwrap();
    let fs = coffer_client::CofferFs::new(
        s.clone(),
        tokio::runtime::Handle::current(),
        coffer_client::MountOptions::default(),
    )
    .unwrap();
    let mounted = fuser::spawn_mount2(fs, &at, &[fuser::MountOption::RO]).unwrap();
    let (src, snap) = (t.src.clone(), at.join("ids").join(&sum.snapshot));
    let (want, got) =
        tokio::task::spawn_blocking(move || (describe(&src).unwrap(), describe(&snap).unwrap()))
            .await
            .unwrap();
    assert_eq!(
        want, got,
        "the sealed snapshot reads back through the mount"
    );
    drop(mounted);
}
