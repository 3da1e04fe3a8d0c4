//! Issue 14, item 4 (F1): every RPC fuzzed with structured input against a real appliance —
//! random and repeated ids, frames whose bytes do not match their ids, unknown compressions,
//! lengths at the edges, batches out of order, commits of garbage roots, snapshot calls on
//! random ids and times, policies and rules of random text — from two users at once, for
//! `COFFER_FUZZ_SECS` (5 when unset; the README's test command sets 60). Every call gets an
//! answer within its bound and never `INTERNAL` or `UNKNOWN` (what a panic or an unhandled
//! case becomes); afterwards the appliance still serves, `verify --read-data` is clean and its
//! memory grew by little.

use std::time::{Duration, Instant};

use bytes::Bytes;
use coffer_proto::v1;
use coffer_proto::{pack_ids, ChunkId};
use coffer_tests::{frame, proc_status_kib, Appliance};
use rand::{Rng, SeedableRng};
use tonic::Code;

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desktop";

fn budget() -> Duration {
    Duration::from_secs(
        std::env::var("COFFER_FUZZ_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    )
}

fn random_bytes(rng: &mut impl Rng, max: usize) -> Bytes {
    let n = rng.gen_range(0..=max);
    (0..n).map(|_| rng.r#gen::<u8>()).collect::<Vec<_>>().into()
}

/// A snapshot id: mostly well-formed (16 bytes), sometimes not.
fn snapshot_id(rng: &mut impl Rng) -> Bytes {
    if rng.gen_bool(0.8) {
        Bytes::copy_from_slice(&rng.r#gen::<[u8; 16]>())
    } else {
        random_bytes(rng, 17)
    }
}

/// Ids drawn from a small pool (so that repeats and known ids occur), with some random ones.
fn some_ids(rng: &mut impl Rng, pool: &[ChunkId]) -> Vec<ChunkId> {
    let n = rng.gen_range(0..40);
    (0..n)
        .map(|_| {
            if rng.gen_bool(0.7) {
                pool[rng.gen_range(0..pool.len())]
            } else {
                ChunkId::from_bytes(rng.r#gen())
            }
        })
        .collect()
}

/// Packed ids, sometimes cut or padded so that they are no whole number of ids.
fn packed(rng: &mut impl Rng, ids: &[ChunkId]) -> Bytes {
    let mut b = pack_ids(ids);
    match rng.gen_range(0..6) {
        0 => b.truncate(rng.gen_range(0..=b.len())),
        1 => b.extend((0..rng.gen_range(1..32)).map(|_| rng.r#gen::<u8>())),
        _ => {}
    }
    b.into()
}

fn text(rng: &mut impl Rng) -> String {
    const PIECES: [&str; 12] = [
        "/",
        "..",
        "alice",
        "@",
        "laptop",
        "*",
        "{",
        "}",
        "\"keep_daily\":",
        "-1",
        "\u{0}",
        "9999999999",
    ];
    (0..rng.gen_range(0..8))
        .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
        .collect()
}

/// Reads a streaming answer to its end (at most 10,000 messages).
async fn streamed<T>(
    r: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<(), tonic::Status> {
    let mut st = r?.into_inner();
    let mut n = 0;
    while st.message().await?.is_some() {
        n += 1;
        if n > 10_000 {
            break;
        }
    }
    Ok(())
}

/// `PutChunks` messages: real frames, frames whose bytes are not their id's, unknown
/// compressions, proofs, lengths at the edges; batch numbers in any order.
fn fuzzed_puts(
    rng: &mut rand::rngs::StdRng,
    s: &coffer_client::Session,
    plains: &[Bytes],
) -> Vec<v1::PutChunksRequest> {
    (0..rng.gen_range(0..4))
        .map(|_| v1::PutChunksRequest {
            batch: rng.r#gen(),
            chunks: (0..rng.gen_range(0..6))
                .map(|_| {
                    let mut f = frame(s, plains[rng.gen_range(0..plains.len())].clone());
                    let mut cf = v1::ChunkFrame {
                        id: Bytes::copy_from_slice(f.id.as_bytes()),
                        raw_len: f.raw_len,
                        compression: f.compression.into(),
                        data: std::mem::take(&mut f.data),
                    };
                    match rng.gen_range(0..8) {
                        0 => cf.id = random_bytes(rng, 40),
                        1 => cf.compression = rng.gen_range(-2..8),
                        2 => cf.raw_len = [0, 1, u32::MAX, 16 << 20][rng.gen_range(0..4)],
                        3 => cf.data = random_bytes(rng, 300),
                        4 => {
                            cf.compression = v1::Compression::Proof.into();
                            cf.data = random_bytes(rng, 32);
                        }
                        _ => {}
                    }
                    cf
                })
                .collect(),
        })
        .collect()
}

/// One random streaming call (`FindMissing`, `PutChunks`, `GetChunks`).
async fn stream_call(
    rng: &mut rand::rngs::StdRng,
    s: &coffer_client::Session,
    pool: &[ChunkId],
    plains: &[Bytes],
) -> Code {
    let mut c = s.raw();
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());
    match rng.gen_range(0..3) {
        0 => {
            let reqs: Vec<_> = (0..rng.gen_range(0..4))
                .map(|_| v1::FindMissingRequest {
                    ids: {
                        let ids = some_ids(rng, pool);
                        packed(rng, &ids)
                    },
                    envelope_hashes: random_bytes(rng, 64),
                })
                .collect();
            let r = c.find_missing(tokio_stream::iter(reqs)).await;
            code(streamed(r).await)
        }
        1 => {
            // Frames: real ones, ones whose bytes are not their id's, unknown compressions,
            // proofs, lengths at the edges; batch numbers in any order.
            let reqs = fuzzed_puts(rng, s, plains);
            let r = c.put_chunks(tokio_stream::iter(reqs)).await;
            code(streamed(r).await)
        }
        2 => {
            let reqs: Vec<_> = (0..rng.gen_range(0..3))
                .map(|_| v1::GetChunksRequest {
                    ids: {
                        let ids = some_ids(rng, pool);
                        packed(rng, &ids)
                    },
                })
                .collect();
            let r = c.get_chunks(tokio_stream::iter(reqs)).await;
            code(streamed(r).await)
        }
        _ => unreachable!(),
    }
}

/// One random call; answers its status code (`Ok` for success).
async fn one_call(
    rng: &mut rand::rngs::StdRng,
    s: &coffer_client::Session,
    pool: &[ChunkId],
    plains: &[Bytes],
) -> Code {
    let mut c = s.raw();
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());
    match rng.gen_range(0..14) {
        0..=2 => stream_call(rng, s, pool, plains).await,
        11 | 12 => enrollment_call(rng, s).await,
        3 => {
            let root = if rng.gen_bool(0.5) {
                Bytes::copy_from_slice(pool[rng.gen_range(0..pool.len())].as_bytes())
            } else {
                random_bytes(rng, 40)
            };
            let r = c
                .commit_snapshot(v1::CommitSnapshotRequest {
                    snapshot: rng.gen_bool(0.9).then(|| v1::Snapshot {
                        path: text(rng),
                        root,
                        time_us: [0, -1, i64::MAX, 1][rng.gen_range(0..4)],
                        partial: rng.r#gen(),
                        id: if rng.gen_bool(0.1) {
                            random_bytes(rng, 16)
                        } else {
                            Bytes::new()
                        },
                        ..v1::Snapshot::default()
                    }),
                    commit_id: snapshot_id(rng),
                })
                .await;
            code(r.map(drop))
        }
        4 => code(
            c.open_snapshot(v1::OpenSnapshotRequest {
                id: snapshot_id(rng),
            })
            .await
            .map(drop),
        ),
        5 => code(
            c.list_snapshots(v1::ListSnapshotsRequest {
                path: text(rng),
                all: rng.r#gen(),
            })
            .await
            .map(drop),
        ),
        6 => code(
            c.delete_snapshot(v1::DeleteSnapshotRequest {
                id: snapshot_id(rng),
                delete_passphrase: text(rng),
            })
            .await
            .map(drop),
        ),
        7 => code(
            c.protect_snapshot(v1::ProtectSnapshotRequest {
                id: snapshot_id(rng),
                protect: rng.r#gen(),
                until_us: rng.r#gen(),
                delete_passphrase: text(rng),
            })
            .await
            .map(drop),
        ),
        8 => code(
            c.lock_snapshot(v1::LockSnapshotRequest {
                id: snapshot_id(rng),
                until_us: rng.r#gen(),
            })
            .await
            .map(drop),
        ),
        9 => code(
            c.set_policy(v1::SetPolicyRequest {
                target: text(rng),
                policy_json: format!("{{{}}}", text(rng)),
                unset: vec![text(rng)],
                delete_passphrase: text(rng),
            })
            .await
            .map(drop),
        ),
        10 => code(
            c.get_policy(v1::GetPolicyRequest { path: text(rng) })
                .await
                .map(drop),
        ),
        _ => code(
            c.get_snapshot(v1::GetSnapshotRequest {
                id: snapshot_id(rng),
            })
            .await
            .map(drop),
        ),
    }
}

/// `CreateEnrollment` or `Enroll` with structured garbage.
async fn enrollment_call(rng: &mut rand::rngs::StdRng, s: &coffer_client::Session) -> Code {
    let mut c = s.raw();
    let r = if rng.r#gen() {
        c.create_enrollment(v1::CreateEnrollmentRequest {
            identity: text(rng),
            role: text(rng),
            expires_us: rng.r#gen(),
            auth_hash: random_bytes(rng, 40),
            sealed_keys: random_bytes(rng, 100),
            delete_passphrase: text(rng),
        })
        .await
        .map(drop)
    } else {
        c.enroll(v1::EnrollRequest {
            protocol_version: rng.gen_range(0..3),
            identity: text(rng),
            auth: random_bytes(rng, 20),
            password: text(rng),
        })
        .await
        .map(drop)
    };
    r.err().map_or(Code::Ok, |e| e.code())
}

#[test]
fn every_rpc_fuzzed_with_structured_input_answers_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::started(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    let pid = app.pid().unwrap();
    let seed: u64 = std::env::var("COFFER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz_rpc seed {seed}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let calls = rt.block_on(async {
        let base = proc_status_kib(pid, "VmRSS:");
        let mut tasks = Vec::new();
        for (n, who) in [ALICE, BOB].into_iter().enumerate() {
            let s = app.session(who).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + n as u64);
                let plains: Vec<Bytes> = (0..8usize)
                    .map(|i| coffer_tests::data(seed ^ i as u64, 100 + 700 * i, i % 2 == 0).into())
                    .collect();
                let mut pool: Vec<ChunkId> = plains.iter().map(|p| s.chunk_id(p)).collect();
                // Some are stored, so that reads and commits reach further.
                s.put(
                    plains
                        .iter()
                        .take(4)
                        .map(|p| frame(&s, p.clone()))
                        .collect(),
                    1 << 20,
                )
                .await
                .unwrap();
                pool.push(ChunkId::from_bytes([0; 32]));
                let end = Instant::now() + budget();
                let mut calls = 0u64;
                let mut codes = std::collections::BTreeMap::<String, u64>::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    let code = tokio::time::timeout(
                        Duration::from_secs(30),
                        one_call(&mut rng, &s, &pool, &plains),
                    )
                    .await
                    .unwrap_or_else(|_| panic!("a call took over 30 s (seed {seed})"));
                    assert!(
                        !matches!(code, Code::Internal | Code::Unknown | Code::Unavailable),
                        "a fuzzed call was answered {code:?} (seed {seed}, call {calls}, {:?})",
                        t.elapsed()
                    );
                    *codes.entry(format!("{code:?}")).or_default() += 1;
                    calls += 1;
                }
                eprintln!("fuzz_rpc answers: {codes:?}");
                calls
            }));
        }
        let mut calls = 0;
        for t in tasks {
            calls += t.await.unwrap();
        }
        let grown = proc_status_kib(pid, "VmRSS:").saturating_sub(base) / 1024;
        eprintln!("fuzz_rpc: {calls} calls, RSS +{grown} MiB");
        assert!(grown < 512, "RSS grew by {grown} MiB");
        // Still serving.
        app.session(ALICE).await.unwrap();
        calls
    });
    assert!(calls > 0);
    assert!(app.running(), "the appliance died: {}", app.log_tail());
    app.stop().unwrap();
    let (rc, text) = app.verify(true).unwrap();
    assert_eq!(rc, 0, "{text}");
}
