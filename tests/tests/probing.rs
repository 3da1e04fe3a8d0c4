//! Issue 10: the holes found by probing the appliance as an attacker would, each played again
//! with the real binaries (raw gRPC calls where the CLI cannot express the attack).
//!
//! 1. commit walks never decode chunks the session does not know (no plaintext in errors);
//! 2. no error differs by whether another user stored something (`user` disclosure);
//! 3. revoking access or deleting an account ends it for open sessions and streams;
//! 6. (parallel guessing: unit tests in `appliance/src/access/auth.rs`);
//!
//! Items 4, 5, 7 and 8, idle connections and `verify` are in `probing_resources.rs`.

use bytes::Bytes;
use coffer_client::{ClientError, Frame, Session};
use coffer_proto::v1::{self, coffer_client::CofferClient};
use coffer_proto::{pack_ids, ChunkId, SnapshotId};
use coffer_tests::{
    acl_add, admin, code, connect_client, create_snapshot, data, frame, node_referencing,
    snapshot_of, tree_frame, Appliance,
};
use tonic::Code;

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desktop";

/// The message with `id` replaced by a placeholder, to compare answers about different ids.
fn masked(e: &ClientError, id: &ChunkId) -> String {
    e.to_string().replace(&id.to_hex(), "<ID>")
}

/// Items 1 and 2: committing trees that reference someone else's chunk — as a file chunk, a list
/// chunk, a bundle, a subtree or the root — yields errors that carry no byte of its data and read
/// exactly like the answer for an id nobody stored; possession proofs likewise.
#[test]
fn commit_errors_carry_no_stored_bytes_and_no_existence() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::started(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let alice = app.session(ALICE).await.unwrap();
        let secret = Bytes::from(data(4242, 2048, false));
        let secret_id = alice.chunk_id(&secret);
        let mut a_node = node_referencing("chunks", secret_id);
        a_node.name = Bytes::from_static(b"alice's file");
        let a_tree = tree_frame(&alice, vec![a_node]);
        let a_tree_id = a_tree.id;
        alice
            .put(vec![frame(&alice, secret.clone()), a_tree], 1 << 20)
            .await
            .unwrap();
        // Every 32-byte window of the secret, as the hex an error would quote it in.
        let windows: Vec<String> = secret.windows(32).map(hex::encode).collect();
        let leaks = |msg: &str| windows.iter().any(|w| msg.contains(w.as_str()));

        let bob = app.session(BOB).await.unwrap();
        let nobody = ChunkId::from_bytes(rand::random());
        for how in ["chunks", "chunk_lists", "bundle", "subtree"] {
            let mut answers = Vec::new();
            for target in [secret_id, a_tree_id, nobody] {
                let t = tree_frame(&bob, vec![node_referencing(how, target)]);
                let root = t.id;
                bob.put(vec![t], 1 << 20).await.unwrap();
                // Repeated commits: the old walk quoted a different block of A's data each time.
                for _ in 0..5 {
                    let e = bob
                        .commit(snapshot_of(root))
                        .await
                        .map(|s| format!("{how} -> {target}: committed {s}"))
                        .unwrap_err();
                    assert_eq!(code(&e), Some(Code::FailedPrecondition), "{how}: {e}");
                    assert!(!leaks(&e.to_string()), "{how}: plaintext in {e}");
                    answers.push(masked(&e, &target));
                }
            }
            assert!(
                answers.windows(2).all(|w| w[0] == w[1]),
                "{how}: answers differ by what is stored: {answers:#?}"
            );
        }
        // The root itself.
        let bob_ref = &bob;
        let answers: Vec<String> =
            futures::future::join_all([secret_id, a_tree_id, nobody].into_iter().map(
                |t| async move {
                    let e = bob_ref.commit(snapshot_of(t)).await.unwrap_err();
                    assert_eq!(code(&e), Some(Code::FailedPrecondition), "{e}");
                    masked(&e, &t)
                },
            ))
            .await;
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:#?}");

        // Possession proofs in `user` disclosure: refused alike, stored or not.
        let key = bob.possession_key();
        let mut proof_answers = Vec::new();
        for (target, plain) in [(secret_id, &b"a guess"[..]), (nobody, &b"a guess"[..])] {
            let e = bob
                .put(vec![Frame::proof(target, plain, &key)], 1 << 20)
                .await
                .unwrap_err();
            assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
            proof_answers.push(masked(&e, &target));
        }
        assert_eq!(proof_answers[0], proof_answers[1]);
        // Even the right proof tells nothing in `user` disclosure.
        let e = bob
            .put(vec![Frame::proof(secret_id, &secret, &key)], 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(masked(&e, &secret_id), proof_answers[0]);
    });

    // `repository` disclosure reveals existence by design (FindMissing says "prove"), but a wrong
    // proof and a proof for nothing still read the same.
    app.stop().unwrap();
    app.set_disclosure("repository").unwrap();
    app.start().unwrap();
    rt.block_on(async {
        let bob = app.session(BOB).await.unwrap();
        let secret = Bytes::from(data(4242, 2048, false));
        let secret_id = bob.chunk_id(&secret);
        let nobody = ChunkId::from_bytes(rand::random());
        let key = bob.possession_key();
        let mut answers = Vec::new();
        for target in [secret_id, nobody] {
            let e = bob
                .put(vec![Frame::proof(target, b"a guess", &key)], 1 << 20)
                .await
                .unwrap_err();
            assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
            answers.push(masked(&e, &target));
        }
        assert_eq!(answers[0], answers[1]);
    });
}

/// Found by review: a leaf of an opened snapshot whose bytes decode as a tree must not stand for
/// a subtree that needs no walk. B stores a chunk F that is a tree listing A's chunk, commits and
/// opens a snapshot holding F as a *file chunk*, then commits F as a root (or a subtree): refused,
/// and A's chunk stays unreadable. A GetChunks message asking for too many ids is refused.
#[test]
fn an_opened_leaf_never_passes_for_a_checked_tree() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::started(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let alice = app.session(ALICE).await.unwrap();
        let secret = Bytes::from(data(99, 3000, false));
        let secret_id = alice.chunk_id(&secret);
        alice
            .put(vec![frame(&alice, secret)], 1 << 20)
            .await
            .unwrap();

        let bob = app.session(BOB).await.unwrap();
        let forged = tree_frame(&bob, vec![node_referencing("chunks", secret_id)]);
        let f = forged.id;
        let holder = tree_frame(&bob, vec![node_referencing("chunks", f)]);
        let holder_id = holder.id;
        bob.put(vec![forged, holder], 1 << 20).await.unwrap();
        let s1 = bob.commit(snapshot_of(holder_id)).await.unwrap();
        bob.open(&s1).await.unwrap();
        let as_subtree = tree_frame(&bob, vec![node_referencing("subtree", f)]);
        let sub_root = as_subtree.id;
        bob.put(vec![as_subtree], 1 << 20).await.unwrap();
        for root in [f, sub_root] {
            let e = bob.commit(snapshot_of(root)).await.unwrap_err();
            assert_eq!(code(&e), Some(Code::FailedPrecondition), "{e}");
            assert!(e.to_string().contains(&secret_id.to_hex()), "{e}");
        }
        let e = bob.get(&[secret_id]).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::NotFound), "{e}");

        // 257 ids in one GetChunks message: refused before anything is read.
        let (mut client, token) = raw(&app, &bob).await;
        let ids = vec![f; 257];
        let mut req = tonic::Request::new(tokio_stream::iter(vec![v1::GetChunksRequest {
            ids: pack_ids(&ids).into(),
        }]));
        req.metadata_mut()
            .insert(coffer_proto::SESSION_HEADER, token);
        let mut stream = client.get_chunks(req).await.unwrap().into_inner();
        let e = stream.message().await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    });
}

/// A raw client on `s`'s session (to hold streams open across an admin change).
async fn raw(
    app: &Appliance,
    s: &Session,
) -> (
    CofferClient<tonic::transport::Channel>,
    tonic::metadata::AsciiMetadataValue,
) {
    let ch = coffer_client::channel(&app.options(BOB).target)
        .await
        .unwrap();
    let token = s.hello.session_token.parse().unwrap();
    (
        CofferClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        token,
    )
}

/// Item 3: B is granted READ on A's snapshots and opens one; when the rule is removed, B's
/// *same* session — and a GetChunks stream it holds open — can no longer read A's chunks nor
/// commit them. Deleting B's account ends a PutChunks stream in the middle.
#[test]
fn revoking_access_ends_it_for_open_sessions_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::started(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    let src = dir.path().join("alice-home");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("secret.txt"), data(5, 30_000, true)).unwrap();
    let acfg = dir.path().join("alice.json");
    connect_client(&app, &acfg, "alice", "laptop");
    let snap = create_snapshot(&acfg, &src);
    let snap_id = SnapshotId::from_hex(snap["snapshot"].as_str().unwrap()).unwrap();
    admin(&app, &["acl", "enable"]);
    let rule = acl_add(&app, "bob@*", "READ", "type=snapshot,username=alice");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bob = app.session(BOB).await.unwrap();
        bob.open(&snap_id).await.unwrap();
        let root = ChunkId::from_slice(&bob.snapshot(&snap_id).await.unwrap().root).unwrap();
        assert_eq!(bob.get(&[root]).await.unwrap().len(), 1, "granted: B reads");

        let (mut client, token) = raw(&app, &bob).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(coffer_proto::SESSION_HEADER, token.clone());
        let mut stream = client.get_chunks(req).await.unwrap().into_inner();
        let ask = || v1::GetChunksRequest {
            ids: pack_ids(&[root]).into(),
        };
        tx.send(ask()).await.unwrap();
        assert!(stream.message().await.unwrap().is_some());

        admin(&app, &["acl", "remove", &rule, "--delete"]);

        let e = bob.get(&[root]).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::NotFound), "same session: {e}");
        tx.send(ask()).await.unwrap();
        let e = stream.message().await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "open stream: {e}");
        let e = bob.commit(snapshot_of(root)).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::FailedPrecondition), "{e}");

        // Deleting the account ends a PutChunks stream between two messages.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(coffer_proto::SESSION_HEADER, token.clone());
        let mut acks = client.put_chunks(req).await.unwrap().into_inner();
        let put = |seed: u64, batch: u64| {
            let plain = Bytes::from(data(seed, 1000, false));
            v1::PutChunksRequest {
                batch,
                chunks: vec![v1::ChunkFrame {
                    id: Bytes::copy_from_slice(bob.chunk_id(&plain).as_bytes()),
                    raw_len: 1000,
                    compression: v1::Compression::None.into(),
                    data: plain,
                }],
            }
        };
        tx.send(put(1, 0)).await.unwrap();
        assert!(acks.message().await.unwrap().is_some());
        admin(&app, &["user", "delete", BOB]);
        tx.send(put(2, 1)).await.unwrap();
        let e = acks.message().await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    });
}
