//! Idempotent commits (issue 12, item 5): a commit is sent with a commit id chosen once per
//! snapshot; when its answer is lost, the client asks again with the same id and the appliance
//! answers the snapshot it already made. A lost acknowledgement never makes a second snapshot.
//!
//! And rollback (issue 14, item 6; S8): a client notices when the appliance's history of a path
//! goes back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use coffer_client::Session;
use coffer_proto::v1;
use coffer_tests::{snapshot_of, tree_frame, Appliance};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desktop";

/// Alice's snapshots of `/probe`, as the appliance lists them.
async fn probes(s: &Session) -> Vec<v1::Snapshot> {
    s.list("/probe", false).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_commit_id_answers_the_first_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    app.start().unwrap();
    let alice = app.session(ALICE).await.unwrap();
    let bob = app.session(BOB).await.unwrap();
    let root = tree_frame(&alice, vec![]);
    let root_id = root.id;
    alice.put(vec![root.clone()], 1 << 20).await.unwrap();
    bob.put(vec![root], 1 << 20).await.unwrap();

    let first = alice
        .commit_as(snapshot_of(root_id), [7; 16])
        .await
        .unwrap();
    let again = alice
        .commit_as(snapshot_of(root_id), [7; 16])
        .await
        .unwrap();
    assert_eq!(
        first, again,
        "a retried commit answers the snapshot it made"
    );
    assert_eq!(probes(&alice).await.len(), 1);
    // Another commit id is another snapshot; another identity's commit ids are its own.
    let other = alice
        .commit_as(snapshot_of(root_id), [8; 16])
        .await
        .unwrap();
    assert_ne!(other, first);
    let bobs = bob.commit_as(snapshot_of(root_id), [7; 16]).await.unwrap();
    assert_ne!(bobs, first);
    assert_eq!(probes(&alice).await.len(), 2);
    // A deleted snapshot is not answered again: the same commit id then makes a new one.
    alice.delete(&first, "").await.unwrap();
    let anew = alice
        .commit_as(snapshot_of(root_id), [7; 16])
        .await
        .unwrap();
    assert!(anew != first && anew != other);
    assert_eq!(probes(&alice).await.len(), 2);
}

/// A TCP proxy in front of the appliance. While `swallow` is set it drops every byte the
/// appliance sends; `cut` closes the connections open at that moment.
struct Proxy {
    addr: SocketAddr,
    swallow: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallow = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let sw = swallow.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let up = TcpStream::connect(upstream).await.unwrap();
                tokio::spawn(pump(down, up, sw.clone(), cuts.clone()));
            }
        });
        Self { addr, swallow, cut }
    }
}

/// Copies bytes both ways until either side closes or the connection is cut.
async fn pump(
    down: TcpStream,
    up: TcpStream,
    swallow: Arc<AtomicBool>,
    mut cuts: tokio::sync::watch::Receiver<u64>,
) {
    // Only a cut after this connection opened closes it.
    cuts.borrow_and_update();
    let (mut dr, mut dw) = down.into_split();
    let (mut ur, mut uw) = up.into_split();
    let to_server = async {
        let mut b = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = dr.read(&mut b).await {
            if uw.write_all(&b[..n]).await.is_err() {
                break;
            }
        }
    };
    let to_client = async {
        let mut b = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = ur.read(&mut b).await {
            if swallow.load(Ordering::SeqCst) {
                continue;
            }
            if dw.write_all(&b[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = to_server => {}
        () = to_client => {}
        _ = cuts.changed() => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_not_made_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE]).unwrap();
    app.start().unwrap();
    let direct = app.session(ALICE).await.unwrap();
    let mut opts = app.options(ALICE);
    let proxy = Proxy::start(
        format!("{}:{}", opts.target.host, opts.target.port)
            .parse()
            .unwrap(),
    )
    .await;
    opts.target.host = proxy.addr.ip().to_string();
    opts.target.port = proxy.addr.port();
    let alice = Session::connect(&opts).await.unwrap();
    let root = tree_frame(&alice, vec![]);
    let root_id = root.id;
    alice.put(vec![root], 1 << 20).await.unwrap();

    // The appliance's answer to the commit never arrives: the commit is durable, the client
    // does not know it.
    proxy.swallow.store(true, Ordering::SeqCst);
    let committing = tokio::spawn(async move { alice.commit(snapshot_of(root_id)).await });
    let mut made = Vec::new();
    for _ in 0..2000 {
        made = probes(&direct).await;
        if !made.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(made.len(), 1, "the commit reached the appliance");
    // Now the connection drops; the client asks again on a new one.
    proxy.swallow.store(false, Ordering::SeqCst);
    proxy.cut.send_modify(|g| *g += 1);
    let answered = committing
        .await
        .unwrap()
        .expect("the retried commit succeeds");
    assert_eq!(
        answered.as_bytes()[..],
        made[0].id[..],
        "answered with the snapshot it made"
    );
    assert_eq!(probes(&direct).await.len(), 1, "no second snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_id_is_never_reused_for_other_content_nor_the_future() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE]).unwrap();
    app.start().unwrap();
    let alice = app.session(ALICE).await.unwrap();
    let a = tree_frame(&alice, vec![]);
    let b = tree_frame(&alice, vec![coffer_tests::node_referencing("chunks", a.id)]);
    let (a_id, b_id) = (a.id, b.id);
    alice.put(vec![a, b], 1 << 20).await.unwrap();
    alice.commit_as(snapshot_of(a_id), [9; 16]).await.unwrap();
    // The same commit id for another root is a client bug: refused, not silently dropped.
    let e = alice
        .commit_as(snapshot_of(b_id), [9; 16])
        .await
        .unwrap_err();
    assert_eq!(
        coffer_tests::code(&e),
        Some(tonic::Code::AlreadyExists),
        "{e}"
    );
    assert_eq!(probes(&alice).await.len(), 1);
    // Concurrent commits with one id make one snapshot.
    let s = std::sync::Arc::new(alice);
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.commit_as(snapshot_of(b_id), [10; 16]).await.unwrap() })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tries {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(probes(&s).await.len(), 2);
    // A snapshot dated in the future would outrank every real one in retention: refused.
    let mut later = snapshot_of(a_id);
    later.time_us = coffer_proto::now_us() + 3_600_000_000;
    let e = s.commit(later).await.unwrap_err();
    assert_eq!(
        coffer_tests::code(&e),
        Some(tonic::Code::InvalidArgument),
        "{e}"
    );
}

/// S8: the appliance's repository is put back to a copy taken before the last backup (a restore
/// from an old disk image, a rollback): the next backup of that path warns that the history went
/// back, naming the snapshot this machine last committed; a backup after it does not warn again.
#[test]
fn a_rolled_back_appliance_is_noticed_by_the_next_backup() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::started(dir.path(), 1, 64 << 10, &[ALICE]).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), coffer_tests::data(1, 100_000, true)).unwrap();
    let cfg = dir.path().join("alice.json");
    coffer_tests::connect_client(&app, &cfg, "alice", "laptop");
    let backup = || {
        let (rc, out, err) = coffer_tests::coffer(
            &cfg,
            &["snapshot", "create", src.to_str().unwrap(), "--json"],
        )
        .unwrap();
        assert_eq!(rc, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        (v["snapshot"].as_str().unwrap().to_string(), err)
    };
    let (_, err) = backup();
    assert!(!err.contains("goes back"), "{err}");
    // The operator's old copy of the repository.
    app.stop().unwrap();
    let copy = dir.path().join("repo-copy");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&app.repo)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    app.start().unwrap();
    coffer_tests::connect_client(&app, &cfg, "alice", "laptop");
    std::fs::write(src.join("b"), coffer_tests::data(2, 100_000, true)).unwrap();
    let (second, err) = backup();
    assert!(!err.contains("goes back"), "{err}");
    // Rolled back: the second snapshot is gone from the appliance.
    app.stop().unwrap();
    std::fs::remove_dir_all(&app.repo).unwrap();
    std::fs::rename(&copy, &app.repo).unwrap();
    app.start().unwrap();
    coffer_tests::connect_client(&app, &cfg, "alice", "laptop");
    let (_, err) = backup();
    assert!(err.contains("goes back"), "{err}");
    assert!(
        err.contains(&second[..16]),
        "names the lost snapshot: {err}"
    );
    // The warning is given once: the next backup sees its own newest snapshot.
    let (_, err) = backup();
    assert!(!err.contains("goes back"), "{err}");
}
