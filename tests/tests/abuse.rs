//! Issue 14, item 1 (S6): what one peer may hold of the appliance is bounded, a limit hit answers
//! `RESOURCE_EXHAUSTED` naming the flag that sets it, and other users keep working.
//!
//! - idle connections make room for new ones and are closed after `--idle-timeout`; when every
//!   connection is busy a newcomer is refused;
//! - streams: per account, messages per stream, silence on a stream;
//! - a flood of tiny-chunk batches runs into `--session-chunks` while another user backs up;
//! - a reader that stops reading is refused past its account's read budget.
//!
//! The `GetChunks` repeat attack's memory bound is in `probing_resources.rs`.

use std::time::Duration;

use bytes::Bytes;
use coffer_proto::v1;
use coffer_proto::{pack_ids, ChunkId};
use coffer_tests::{
    assert_restores, code, connect_client, create_snapshot, data, eventually, frame,
    proc_status_kib, sockets, Appliance,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desktop";

/// A `FindMissing` call kept open: its request stream ends only when `tx` is dropped.
struct OpenStream {
    tx: mpsc::Sender<v1::FindMissingRequest>,
    answers: tonic::Streaming<v1::FindMissingResponse>,
}

impl OpenStream {
    /// Opens the call and has one message answered (the appliance then counts it as running).
    async fn open(s: &coffer_client::Session) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(one_id()).await.unwrap();
        let mut answers = s
            .raw()
            .find_missing(ReceiverStream::new(rx))
            .await?
            .into_inner();
        answers.message().await?.expect("an answer");
        Ok(Self { tx, answers })
    }
}

fn one_id() -> v1::FindMissingRequest {
    v1::FindMissingRequest {
        ids: Bytes::from(pack_ids(&[ChunkId::from_bytes(rand::random())])),
        envelope_hashes: Bytes::new(),
    }
}

fn backup_and_restore(app: &Appliance, dir: &std::path::Path, seed: u64) {
    let src = dir.join(format!("src-{seed}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), data(seed, 3 << 20, false)).unwrap();
    std::fs::write(src.join("g"), data(seed + 1, 100_000, true)).unwrap();
    let cfg = dir.join(format!("alice-{seed}.json"));
    connect_client(app, &cfg, "alice", "laptop");
    let snap = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    assert_restores(&cfg, &snap, &src, &dir.join(format!("out-{seed}")));
}

/// 200 connections that never call anything, against a cap of 16: each new one closes the
/// longest-idle, so the appliance never holds more than 16 and a real backup gets in. When all
/// 16 are busy a newcomer is answered `RESOURCE_EXHAUSTED`; when one becomes idle it makes room
/// again. With `--idle-timeout`, idle connections close by themselves and busy ones stay.
#[test]
fn idle_connections_make_room_and_close_and_busy_ones_refuse_newcomers() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE, BOB]).unwrap();
    app.serve_args = ["--max-connections", "16", "--idle-timeout", "1h"]
        .map(String::from)
        .to_vec();
    app.start().unwrap();
    let pid = app.pid().unwrap();
    let base = sockets(pid);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let target = app.options(BOB).target;
    let idle: Vec<tonic::transport::Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..200 {
            v.push(coffer_client::channel(&target).await.unwrap());
        }
        v
    });
    assert!(
        eventually(Duration::from_secs(30), || sockets(pid) <= base + 16),
        "the appliance holds {} sockets (cap 16 connections, {base} before)",
        sockets(pid)
    );
    // A real backup gets a connection (an idle one makes room).
    backup_and_restore(&app, dir.path(), 1);

    rt.block_on(async {
        // 16 busy connections: a call open on each.
        let mut busy = Vec::new();
        for _ in 0..16 {
            let s = app.session(BOB).await.unwrap();
            let open = OpenStream::open(&s).await.unwrap();
            busy.push((s, open));
        }
        let e = app.session(BOB).await.unwrap_err();
        let e = e.downcast::<coffer_client::ClientError>().unwrap();
        assert_eq!(code(&e), Some(Code::ResourceExhausted), "{e}");
        assert!(e.to_string().contains("--max-connections"), "{e}");
        // Busy connections were not closed: their calls still answer.
        for (_, o) in &mut busy {
            o.tx.send(one_id()).await.unwrap();
            assert!(o.answers.message().await.unwrap().is_some());
        }
        // One call ends: its connection is idle, and the next newcomer takes its place.
        let (s, o) = busy.pop().unwrap();
        drop(o);
        drop(s);
        // (The call's end reaches the appliance a little later than the client drops it.)
        let room = eventually_async(|| async { app.session(BOB).await.is_ok() }).await;
        assert!(room, "no room after a connection became idle");
    });
    drop(idle);

    // --idle-timeout: idle connections close by themselves, a busy one stays.
    app.stop().unwrap();
    app.serve_args = ["--idle-timeout", "2s"].map(String::from).to_vec();
    app.start().unwrap();
    let pid = app.pid().unwrap();
    let base = sockets(pid);
    let target = app.options(BOB).target;
    rt.block_on(async {
        let s = app.session(BOB).await.unwrap();
        let mut busy = OpenStream::open(&s).await.unwrap();
        let mut idle = Vec::new();
        let mut peak = 0;
        for _ in 0..50 {
            idle.push(coffer_client::channel(&target).await.unwrap());
            peak = peak.max(sockets(pid));
        }
        assert!(
            peak > base + 10,
            "the idle connections were never open ({peak})"
        );
        let settled = tokio::task::spawn_blocking(move || {
            eventually(Duration::from_mins(1), || sockets(pid) <= base + 1)
        })
        .await
        .unwrap();
        assert!(settled, "idle connections stayed open: {}", sockets(pid));
        busy.tx.send(one_id()).await.unwrap();
        assert!(
            busy.answers.message().await.unwrap().is_some(),
            "the busy connection was closed"
        );
    });
}

/// An account's streaming calls, a stream's messages and the silence between them are bounded;
/// each limit ends the call with `RESOURCE_EXHAUSTED` naming its flag, and another account is
/// not affected.
#[test]
fn streams_are_bounded_in_number_length_and_silence() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE, BOB]).unwrap();
    app.serve_args = [
        "--max-streams-per-account",
        "4",
        "--max-stream-messages",
        "50",
    ]
    .map(String::from)
    .to_vec();
    app.start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bob = app.session(BOB).await.unwrap();
        // 60 messages on one stream: 50 answered, then refused.
        let reqs: Vec<_> = (0..60).map(|_| one_id()).collect();
        let mut answers = bob
            .raw()
            .find_missing(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let mut answered = 0;
        let e = loop {
            match answers.message().await {
                Ok(Some(_)) => answered += 1,
                Ok(None) => panic!("the stream ended after {answered} answers, unrefused"),
                Err(e) => break e,
            }
        };
        assert_eq!(answered, 50);
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("--max-stream-messages"), "{e}");

        // Four streams open; a fifth is refused, on any of the account's sessions.
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(OpenStream::open(&bob).await.unwrap());
        }
        let other = app.session(BOB).await.unwrap();
        let e = OpenStream::open(&other).await.err().unwrap();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("--max-streams-per-account"), "{e}");
        // Another account is not affected.
        let alice = app.session(ALICE).await.unwrap();
        OpenStream::open(&alice).await.unwrap();
        // A stream that ends gives its slot back.
        drop(open.pop());
        let reopened = eventually_async(|| async { OpenStream::open(&other).await.is_ok() }).await;
        assert!(reopened, "the slot of an ended stream was not given back");
    });

    // A stream that goes silent is ended.
    app.stop().unwrap();
    app.serve_args = ["--stream-idle-timeout", "2s"].map(String::from).to_vec();
    app.start().unwrap();
    rt.block_on(async {
        let bob = app.session(BOB).await.unwrap();
        let mut silent = OpenStream::open(&bob).await.unwrap();
        let e = tokio::time::timeout(Duration::from_mins(1), silent.answers.message())
            .await
            .expect("the silent stream is ended within a minute")
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("--stream-idle-timeout"), "{e}");
        drop(silent);
    });
}

/// Retries `f` every 50 ms for up to 10 s (a slot is given back when the appliance sees the
/// stream end, which the client cannot observe directly).
async fn eventually_async<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One user sends up to 1,000 batches of 64 tiny chunks against `--session-chunks 20000`: it is
/// refused with `RESOURCE_EXHAUSTED` once its session holds 20,000, while another user backs up
/// and restores meanwhile, and the appliance's memory grows by little.
#[test]
fn a_tiny_chunk_flood_is_refused_while_another_user_backs_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &[ALICE, BOB]).unwrap();
    app.serve_args = ["--session-chunks", "20000"].map(String::from).to_vec();
    app.start().unwrap();
    let pid = app.pid().unwrap();
    let base = proc_status_kib(pid, "VmRSS:");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bob = rt.block_on(app.session(BOB)).unwrap();
    let flood = rt.spawn(async move {
        for batch in 0..1000u64 {
            let frames = (0..64)
                .map(|i| frame(&bob, Bytes::from(data(batch * 64 + i, 64, false))))
                .collect();
            if let Err(e) = bob.put(frames, 1 << 20).await {
                return (batch, e);
            }
        }
        panic!("1,000 batches were accepted");
    });
    backup_and_restore(&app, dir.path(), 7);
    let (batch, e) = rt.block_on(flood).unwrap();
    assert_eq!(code(&e), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("--session-chunks"), "{e}");
    assert_eq!(batch, 20_000 / 64, "refused at batch {batch}");
    let grown = proc_status_kib(pid, "VmHWM:").saturating_sub(base) / 1024;
    eprintln!("tiny-chunk flood beside a backup: peak RSS +{grown} MiB");
    assert!(grown < 256, "peak RSS grew by {grown} MiB");
}

/// A reader that asks for more than its account's read budget (256 MiB) on streams it never
/// reads is refused `RESOURCE_EXHAUSTED` after `--admission-wait` without progress; another
/// user reads meanwhile.
#[test]
fn a_reader_that_stops_reading_is_refused_past_its_read_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 1 << 20, &[ALICE, BOB]).unwrap();
    app.serve_args = ["--admission-wait", "3s"].map(String::from).to_vec();
    app.start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bob = app.session(BOB).await.unwrap();
        let max = bob.limits().max_chunk_size as usize;
        // 64 distinct chunks of the largest size: one message asks 2 pieces of 32 MiB ahead.
        let frames: Vec<_> = (0..64)
            .map(|i| frame(&bob, Bytes::from(data(500 + i, max, false))))
            .collect();
        let ids: Vec<ChunkId> = frames.iter().map(|f| f.id).collect();
        bob.put(frames, 32 << 20).await.unwrap();
        let ask = v1::GetChunksRequest {
            ids: Bytes::from(pack_ids(&ids)),
        };
        // Streams on sessions (and connections) of their own: one connection's flow-control
        // window would stop the appliance from sending long before the budget. Each session
        // learns the account's chunks by asking for them (they are its account's uploads).
        let mut streams = Vec::new();
        let mut sessions = Vec::new();
        for _ in 0..12 {
            let s = app.session(BOB).await.unwrap();
            assert!(s.find_missing(&ids).await.unwrap().iter().all(|m| !m));
            let client = s.raw();
            sessions.push(s);
            let reqs = vec![ask.clone(); 4];
            streams.push(tokio::spawn(async move {
                let mut answers = client
                    .clone()
                    .get_chunks(tokio_stream::iter(reqs))
                    .await?
                    .into_inner();
                // Takes the first answer, then stops reading: what was admitted stays held.
                answers.message().await?;
                std::future::pending::<()>().await;
                Ok::<(), tonic::Status>(())
            }));
        }
        // Another user reads meanwhile.
        let alice = app.session(ALICE).await.unwrap();
        let plain = Bytes::from(data(77, 300_000, false));
        alice
            .put(vec![frame(&alice, plain.clone())], 1 << 20)
            .await
            .unwrap();
        assert_eq!(
            coffer_tests::read_back(&alice, std::slice::from_ref(&plain))
                .await
                .unwrap(),
            vec![plain]
        );
        let mut refused = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for s in streams {
            if let Ok(Ok(r)) = tokio::time::timeout_at(deadline, s).await {
                let e = r.unwrap_err();
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("read budget"), "{e}");
                refused += 1;
            }
        }
        assert!(refused > 0, "no reader was refused past its budget");
        drop(sessions);
    });
}
