//! Issue 4: users who do not trust each other share one deduplicated repository. A chunk id never
//! grants its data (S2); `user` disclosure gives no existence oracle (S3); identical data is
//! stored once across users in both disclosure modes.

use bytes::Bytes;
use coffer_client::{Codec, Frame, Need, Session};
use coffer_proto::v1::{self, Node, NodeKind, Tree};
use coffer_proto::{pack_ids, ChunkId, SnapshotId};
use coffer_tests::{code, coffer, connect_client, create_snapshot, data, describe, Appliance};
use prost::Message as _;

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desktop";

/// A tree object with one file node listing `chunks`.
fn tree_with(s: &Session, chunks: &[ChunkId]) -> Frame {
    let t = Tree {
        nodes: vec![Node {
            name: Bytes::from_static(b"stolen"),
            kind: NodeKind::File.into(),
            mode: 0o644,
            size: 1,
            chunks: pack_ids(chunks).into(),
            ..Node::default()
        }],
        next: Bytes::new(),
    };
    let plain = Bytes::from(t.encode_to_vec());
    Frame::new(s.chunk_id(&plain), plain, Codec::None)
}

fn snapshot_of(root: ChunkId) -> v1::Snapshot {
    v1::Snapshot {
        path: "/stolen".into(),
        root: Bytes::copy_from_slice(root.as_bytes()),
        ..v1::Snapshot::default()
    }
}

/// S2: user B cannot obtain one byte of user A's data: not by asking for A's chunk ids, not by
/// committing a snapshot that references them (or A's whole tree), not by restoring or opening
/// A's snapshot; in `repository` disclosure a proof made without the data is refused.
#[test]
fn s2_a_chunk_id_never_grants_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    app.start().unwrap();
    let src = dir.path().join("alice-home");
    std::fs::create_dir_all(&src).unwrap();
    let secret = data(4242, 50_000, true);
    std::fs::write(src.join("secret.txt"), &secret).unwrap();
    let acfg = dir.path().join("alice.json");
    connect_client(&app, &acfg, "alice", "laptop");
    let snap = create_snapshot(&acfg, &src);
    let snap_id = SnapshotId::from_hex(snap["snapshot"].as_str().unwrap()).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    // `repository` first: at the end of the `user` round B has uploaded the secret itself, and
    // what an account uploaded stays its own (a later session of B finds it present).
    for mode in ["repository", "user"] {
        app.stop().unwrap();
        app.set_disclosure(mode).unwrap();
        app.start().unwrap();
        rt.block_on(async {
            let alice = app.session(ALICE).await.unwrap();
            alice.open(&snap_id).await.unwrap();
            let a_snap = alice.snapshot(&snap_id).await.unwrap();
            let a_root = ChunkId::from_slice(&a_snap.root).unwrap();
            let bob = app.session(BOB).await.unwrap();
            // The secret's chunk id: anyone who guesses the content (or learns the id) has it.
            let secret_id = bob.chunk_id(&secret);

            // 1. Asking for the ids directly: answered like chunks that do not exist.
            for id in [secret_id, a_root] {
                let e = bob.get(&[id]).await.unwrap_err();
                assert_eq!(code(&e), Some(tonic::Code::NotFound), "{mode}: {e}");
            }
            // 2. A's snapshot cannot be opened, listed or restored by B.
            let e = bob.open(&snap_id).await.unwrap_err();
            assert_eq!(code(&e), Some(tonic::Code::NotFound), "{mode}: {e}");
            let listed = bob.list("", true).await.unwrap();
            assert!(
                listed.iter().all(|s| s.identity == BOB),
                "{mode}: B lists only its own"
            );
            let had = listed.len();

            // 3. Committing a snapshot that references A's chunk, or A's root tree: refused.
            let t = tree_with(&bob, &[secret_id]);
            let troot = t.id;
            bob.put(vec![t], 1 << 20).await.unwrap();
            for root in [troot, a_root] {
                let e = bob.commit(snapshot_of(root)).await.unwrap_err();
                assert_eq!(
                    code(&e),
                    Some(tonic::Code::FailedPrecondition),
                    "{mode}: {e}"
                );
                assert!(e.to_string().contains("neither uploaded"), "{e}");
            }
            assert_eq!(
                bob.list("", true).await.unwrap().len(),
                had,
                "nothing committed"
            );

            // 4. What FindMissing says about A's chunk depends on the mode; a proof made without
            // the data is refused either way.
            let need = bob.need(&[secret_id]).await.unwrap();
            let want = if mode == "user" {
                Need::Missing
            } else {
                Need::Prove
            };
            assert_eq!(need, vec![want], "{mode}");
            let forged = Frame::proof(secret_id, b"not the secret", &bob.possession_key());
            let e = bob.put(vec![forged], 1 << 20).await.unwrap_err();
            assert_eq!(code(&e), Some(tonic::Code::InvalidArgument), "{mode}: {e}");
            let e = bob.get(&[secret_id]).await.unwrap_err();
            assert_eq!(code(&e), Some(tonic::Code::NotFound), "{mode}: {e}");

            // With the data itself, B holds it legitimately (dedup, nothing new stored).
            let before = app.pack_bytes().unwrap().0;
            if mode == "user" {
                bob.put(
                    vec![Frame::new(
                        secret_id,
                        Bytes::from(secret.clone()),
                        Codec::Zstd(3),
                    )],
                    1 << 20,
                )
                .await
                .unwrap();
            } else {
                let p = Frame::proof(secret_id, &secret, &bob.possession_key());
                bob.put(vec![p], 1 << 20).await.unwrap();
            }
            assert_eq!(bob.get(&[secret_id]).await.unwrap()[0], secret);
            bob.commit(snapshot_of(troot)).await.unwrap();
            // (the tree object itself was new; the secret was not stored again)
            let grown = app.pack_bytes().unwrap().0 - before;
            assert!(
                grown < 1000,
                "{mode}: {grown} bytes stored for data already held"
            );
        });
    }
}

/// S3: in `user` disclosure, B's FindMissing answers and upload acknowledgements for a file only
/// A holds are the same as for a file nobody holds; the appliance stores nothing new.
#[test]
fn s3_user_disclosure_has_no_existence_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    app.start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let alice = app.session(ALICE).await.unwrap();
        let held = Bytes::from(data(7, 40_000, false));
        let fresh = Bytes::from(data(8, 40_000, false));
        alice
            .put(
                vec![Frame::new(alice.chunk_id(&held), held.clone(), Codec::None)],
                1 << 20,
            )
            .await
            .unwrap();
        let bob = app.session(BOB).await.unwrap();
        let (h, f) = (bob.chunk_id(&held), bob.chunk_id(&fresh));
        assert_eq!(
            bob.need(&[h, f]).await.unwrap(),
            vec![Need::Missing, Need::Missing]
        );
        let before = app.pack_bytes().unwrap().0;
        let ack_held = bob
            .put(vec![Frame::new(h, held, Codec::None)], 1 << 20)
            .await
            .unwrap();
        let stored_by_held = app.pack_bytes().unwrap().0 - before;
        let ack_fresh = bob
            .put(vec![Frame::new(f, fresh, Codec::None)], 1 << 20)
            .await
            .unwrap();
        assert_eq!(ack_held, ack_fresh, "acknowledgements reveal nothing");
        assert_eq!(ack_held.stored, 1);
        assert_eq!(stored_by_held, 0, "the held chunk was not stored again");
        // Once B sent it, B knows it: present for B from then on.
        assert_eq!(bob.need(&[h]).await.unwrap(), vec![Need::Present]);
    });
}

/// The README flow with two users on two hostnames backing up the same data: the second backup
/// stores nothing new, in both disclosure modes, and each restores bit-exact; neither sees the
/// other's snapshots.
#[test]
fn two_users_share_storage_in_both_disclosure_modes() {
    for mode in ["user", "repository"] {
        let dir = tempfile::tempdir().unwrap();
        let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
        app.set_disclosure(mode).unwrap();
        app.start().unwrap();
        let src = dir.path().join("shared");
        for i in 0..40u64 {
            let d = src.join(format!("d{}", i % 4));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join(format!("f{i}")),
                data(i, 3_000 + 997 * usize::try_from(i).unwrap(), i % 2 == 0),
            )
            .unwrap();
        }
        let (acfg, bcfg) = (dir.path().join("a.json"), dir.path().join("b.json"));
        connect_client(&app, &acfg, "alice", "laptop");
        connect_client(&app, &bcfg, "bob", "desktop");
        let a = create_snapshot(&acfg, &src);
        let before = app.pack_bytes().unwrap().0;
        let b = create_snapshot(&bcfg, &src);
        let after = app.pack_bytes().unwrap().0;
        eprintln!(
            "{mode}: bob uploaded {} bytes, stored {} new bytes",
            b["uploaded_bytes"],
            after - before
        );
        assert_eq!(
            after, before,
            "{mode}: the second user's identical backup stores nothing"
        );
        if mode == "repository" {
            assert!(
                b["uploaded_bytes"].as_u64().unwrap() * 10 < a["uploaded_bytes"].as_u64().unwrap(),
                "repository disclosure: proofs instead of data"
            );
        }
        for (cfg, snap, name) in [(&acfg, &a, "ra"), (&bcfg, &b, "rb")] {
            let target = dir.path().join(name);
            let id = snap["snapshot"].as_str().unwrap();
            let (rc, out, err) = coffer(cfg, &["restore", id, target.to_str().unwrap()]).unwrap();
            assert_eq!(rc, 0, "{out}{err}");
            assert_eq!(describe(&src).unwrap(), describe(&target).unwrap());
        }
        // Each sees only its own snapshot.
        for (cfg, other) in [(&acfg, &b), (&bcfg, &a)] {
            let (rc, out, _) = coffer(cfg, &["snapshot", "list", "--all", "--json"]).unwrap();
            assert_eq!(rc, 0);
            assert_eq!(out.lines().count(), 1, "{out}");
            assert!(!out.contains(other["snapshot"].as_str().unwrap()));
            let (rc, _, err) = coffer(
                cfg,
                &["restore", other["snapshot"].as_str().unwrap(), "/tmp/x"],
            )
            .unwrap();
            assert_ne!(rc, 0);
            assert!(err.contains("no snapshot"), "{err}");
        }
    }
}
