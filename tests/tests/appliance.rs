//! Acceptance tests of the appliance foundation, against the real binary.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use coffer_client::{ClientError, Codec, Frame, Session};
use coffer_proto::{v1, ChunkId};
use coffer_tests::{data, read_back, Appliance};

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@server";

/// Bytes a pack adds around its records: header (64) + footer head (16) + trailer (32).
const PACK_OVERHEAD: u64 = 64 + 16 + 32;
/// Bytes a record adds around its payload: header (64) + AEAD tag (16) + footer line (48).
const RECORD_OVERHEAD: u64 = 64 + 16 + 48;

fn frame(s: &Session, seed: u64) -> Frame {
    let len = 1024 + usize::try_from(seed.wrapping_mul(7919) % 15_000).expect("small");
    let plain = Bytes::from(data(seed, len, seed.is_multiple_of(3)));
    // Both compressions the appliance accepts, so that durability tests cover both records.
    let codec = if seed.is_multiple_of(2) {
        Codec::Lz4
    } else {
        Codec::Zstd(3)
    };
    Frame::new(s.chunk_id(&plain), plain, codec)
}

/// The plaintext of a frame built by [`frame`].
fn plain_of(f: &Frame) -> anyhow::Result<Bytes> {
    Ok(coffer_proto::codec::decode(f.compression, &f.data, f.raw_len as usize)?.into())
}

fn code(e: &ClientError) -> Option<tonic::Code> {
    match e {
        ClientError::Rpc(s) => Some(s.code()),
        _ => None,
    }
}

/// ≥ 20,000 chunks from 4 concurrent streams with duplicates inside batches, across batches and
/// across streams; restart; every chunk reads back bit-exact; verify --read-data is clean; what is
/// stored is exactly the unique (compressed) data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dedup_ingest_survives_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE, BOB])?;
    app.pack_target = Some(4 << 20); // many packs: exercises sealing and rotation
    app.set_disclosure("repository")?; // so that the read-back can prove what it holds
    app.start()?;
    let probe = app.session(ALICE).await?;

    // 4 streams x 5,200 frames = 20,800 uploads of 9,000 distinct chunks:
    // seeds 0..1000 are shared by every stream, each stream has 2,000 of its own, and every
    // stream repeats chunks within and across its batches.
    let mut plans: Vec<Vec<Frame>> = Vec::new();
    for s in 0..4u64 {
        let mut v = Vec::new();
        for i in 0..5_200u64 {
            let seed = match i % 5 {
                0 | 1 => i % 1_000,                        // shared across streams
                2 => 10_000 * (s + 1) + (i % 2_000),       // own
                3 => 10_000 * (s + 1) + ((i + 1) % 2_000), // own again: across batches
                _ => 10_000 * (s + 1) + ((i / 5) % 2_000), // within batch repeats
            };
            v.push(frame(&probe, seed));
        }
        plans.push(v);
    }
    let mut unique: HashMap<ChunkId, Frame> = HashMap::new();
    for f in plans.iter().flatten() {
        unique.insert(f.id, f.clone());
    }
    let uploaded: usize = plans.iter().map(Vec::len).sum();
    assert!(uploaded >= 20_000);

    let mut tasks = Vec::new();
    for plan in plans {
        let s = app.session(ALICE).await?;
        tasks.push(tokio::spawn(async move { s.put(plan, 256 << 10).await }));
    }
    let mut stored = 0;
    let mut stored_bytes = 0;
    let mut dedup = 0;
    for t in tasks {
        let st = t.await??;
        stored += st.stored;
        stored_bytes += st.stored_bytes;
        dedup += st.deduplicated;
    }
    let unique_payload: u64 = unique.values().map(|f| f.data.len() as u64).sum();
    assert_eq!(
        stored,
        unique.len() as u64,
        "each distinct chunk stored exactly once"
    );
    assert_eq!(stored + dedup, uploaded as u64);
    assert_eq!(stored_bytes, unique_payload);

    // Restart, then read everything back from another user's session: it proves it holds
    // each chunk (the appliance checks the proof against what it stored), then reads it.
    assert_eq!(app.stop()?, Some(0), "graceful stop exits 0");
    app.start()?;
    let s = app.session(BOB).await?;
    let ids: Vec<ChunkId> = unique.keys().copied().collect();
    let originals: Vec<Bytes> = ids
        .iter()
        .map(|id| plain_of(&unique[id]))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(
        s.get(&ids[..1]).await.err().and_then(|e| code(&e)),
        Some(tonic::Code::NotFound),
        "a chunk id alone reads nothing"
    );
    let back = read_back(&s, &originals).await?;
    for ((id, plain), expect) in ids.iter().zip(back).zip(&originals) {
        assert_eq!(plain, expect, "chunk {id} bit-exact");
    }
    app.stop()?;

    // Stored payload equals the unique data after compression, not the uploaded data: every
    // pack byte is accounted for by unique payloads plus fixed per-record and per-pack overhead.
    let (bytes, packs) = app.pack_bytes()?;
    assert!(
        packs > 2,
        "small pack target should have produced several packs, got {packs}"
    );
    assert_eq!(
        bytes,
        unique_payload + unique.len() as u64 * RECORD_OVERHEAD + packs * PACK_OVERHEAD
    );

    let (rc, out) = app.verify(true)?;
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains(&format!("verify: {} chunks", unique.len())) && out.contains(", 0 errors"),
        "{out}"
    );
    Ok(())
}

/// C1 (first form): SIGKILL at ≥ 10 random moments during concurrent uploads; every acknowledged
/// chunk reads back bit-exact after each restart, and verify reports 0 errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c1_sigkill_during_uploads_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE])?;
    app.pack_target = Some(2 << 20);
    app.set_disclosure("repository")?; // the read-back proves possession of what it reads
    let oracle: Arc<Mutex<Vec<(ChunkId, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut next_seed = 1_000_000u64;
    for round in 0..10u64 {
        app.start()?;
        // Every acknowledged chunk so far is readable and exact.
        let s = app.session(ALICE).await?;
        let known: Vec<(ChunkId, u64)> = oracle.lock().unwrap().clone();
        let mut plains = Vec::new();
        for (id, seed) in &known {
            let f = frame(&s, *seed);
            assert_eq!(f.id, *id);
            plains.push(plain_of(&f)?);
        }
        let back = read_back(&s, &plains).await?;
        for (((id, _), plain), expect) in known.iter().zip(back).zip(&plains) {
            assert_eq!(
                &plain, expect,
                "round {round}: acknowledged chunk {id} differs"
            );
        }
        // Kill after a random number of acknowledged batches, with uploads still in flight.
        let kill_after = 3 + (round * 7919 + 13) % 20;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut tasks = Vec::new();
        for w in 0..3u64 {
            let s = app.session(ALICE).await?;
            let oracle = oracle.clone();
            let tx = tx.clone();
            let base = next_seed + w * 100_000;
            tasks.push(tokio::spawn(async move {
                for b in 0..10_000u64 {
                    let seeds: Vec<u64> = (0..24).map(|i| base + b * 24 + i).collect();
                    let frames: Vec<Frame> = seeds.iter().map(|&x| frame(&s, x)).collect();
                    let ids: Vec<ChunkId> = frames.iter().map(|f| f.id).collect();
                    if s.put(frames, 64 << 10).await.is_err() {
                        return; // the appliance died under us: those are not acknowledged
                    }
                    oracle.lock().unwrap().extend(ids.into_iter().zip(seeds));
                    let _ = tx.send(());
                }
            }));
        }
        drop(tx);
        for _ in 0..kill_after {
            rx.recv().await;
        }
        app.kill();
        for t in tasks {
            t.await?;
        }
        next_seed += 1_000_000;
        let (rc, out) = app.verify(false)?;
        assert_eq!(rc, 0, "round {round}: {out}");
    }
    app.start()?;
    let s = app.session(ALICE).await?;
    let known = oracle.lock().unwrap().clone();
    assert!(
        known.len() > 10 * 3 * 24,
        "the test acknowledged too little to mean anything"
    );
    let ids: Vec<ChunkId> = known.iter().map(|k| k.0).collect();
    assert!(s.find_missing(&ids).await?.iter().all(|m| !m));
    app.stop()?;
    let (rc, out) = app.verify(true)?;
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains(", 0 errors"), "{out}");
    Ok(())
}

/// C7: without its index the appliance refuses to serve and says what to do; `rebuild-index`
/// restores it from packs alone and every chunk reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c7_lost_index_is_refused_then_rebuilt() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE])?;
    app.pack_target = Some(1 << 20);
    app.set_disclosure("repository")?; // the read-back proves possession of what it reads
    app.start()?;
    let s = app.session(ALICE).await?;
    let frames: Vec<Frame> = (0..600).map(|i| frame(&s, 77_000 + i)).collect();
    s.put(frames.clone(), 128 << 10).await?;
    // Leave the last pack open (SIGKILL) so the rebuild also has to seal an unsealed pack.
    app.kill();

    std::fs::remove_dir_all(app.repo.join("index"))?;
    let err = app
        .start()
        .expect_err("must refuse to serve without an index");
    let msg = err.to_string();
    assert!(msg.contains("rebuild-index"), "{msg}");

    let out = app.run(&["rebuild-index", "--repo", &app.repo_str()])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("600 chunks"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    app.start()?;
    let s = app.session(ALICE).await?;
    let plains: Vec<Bytes> = frames.iter().map(plain_of).collect::<anyhow::Result<_>>()?;
    let back = read_back(&s, &plains).await?;
    assert_eq!(back, plains);
    app.stop()?;
    let (rc, out) = app.verify(true)?;
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains(", 0 warnings"), "{out}");

    // A pack nothing in the index points at is reported (not an error: no data is wrong).
    let some_pack = std::fs::read_dir(app.repo.join("packs"))?
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .next()
        .expect("a pack file")
        .path();
    let stray = app.repo.join("packs").join("ff").join("ff".repeat(16));
    std::fs::create_dir_all(stray.parent().unwrap())?;
    std::fs::copy(&some_pack, &stray)?;
    let (rc, out) = app.verify(false)?;
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("holds no indexed chunk") && out.contains(&"ff".repeat(16)),
        "{out}"
    );
    Ok(())
}

/// S1 and F5: a chunk whose bytes do not match its id, one above the maximum size, and a zstd
/// bomb are rejected with INVALID_ARGUMENT and nothing is stored. S5: a wrong fingerprint fails
/// in the TLS handshake, before any credential is sent. A wrong protocol version is refused first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // each bad input against one appliance (starting one costs seconds)
async fn s1_f5_s5_bad_input_is_rejected_and_nothing_stored() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE])?;
    app.start()?;
    let s = app.session(ALICE).await?;
    let max = s.limits().max_chunk_size as usize;

    let victim = Bytes::from(data(5, 5000, false));
    let victim_id = s.chunk_id(&victim);
    let lie = Frame {
        id: victim_id,
        raw_len: 5000,
        compression: v1::Compression::None,
        data: Bytes::from(data(6, 5000, false)),
    };
    let big_plain = Bytes::from(data(7, max + 1, false));
    let big = Frame {
        id: s.chunk_id(&big_plain),
        raw_len: u32::try_from(max + 1)?,
        compression: v1::Compression::None,
        data: big_plain,
    };
    let bomb_plain = vec![0u8; max * 4];
    let bomb = Frame {
        id: s.chunk_id(&bomb_plain[..1000]),
        raw_len: 1000,
        compression: v1::Compression::Zstd,
        data: zstd::bulk::compress(&bomb_plain, 3)?.into(),
    };
    let lz4_bomb = Frame {
        id: s.chunk_id(&bomb_plain[..1000]),
        raw_len: 1000,
        compression: v1::Compression::Lz4,
        data: lz4_flex::block::compress(&bomb_plain).into(),
    };
    let lz4_garbage = Frame {
        id: victim_id,
        raw_len: 5000,
        compression: v1::Compression::Lz4,
        data: Bytes::from(vec![0xf0; 300]),
    };
    let short = Frame {
        id: victim_id,
        raw_len: 5000,
        compression: v1::Compression::None,
        data: victim.slice(..4000),
    };
    for (what, f) in [
        ("lying id", lie),
        ("oversized", big),
        ("zstd bomb", bomb),
        ("lz4 bomb", lz4_bomb),
        ("lz4 garbage", lz4_garbage),
        ("short data", short),
    ] {
        let err = s.put(vec![f.clone()], 1 << 20).await.expect_err(what);
        assert_eq!(
            code(&err),
            Some(tonic::Code::InvalidArgument),
            "{what}: {err}"
        );
        assert_eq!(
            s.find_missing(&[f.id]).await?,
            vec![true],
            "{what}: nothing stored"
        );
    }
    // The victim's real upload afterwards is stored and reads back exactly (S1).
    s.put(
        vec![Frame::new(victim_id, victim.clone(), Codec::None)],
        1 << 20,
    )
    .await?;
    assert_eq!(s.get(&[victim_id]).await?[0], victim);
    app.stop()?;
    let (rc, out) = app.verify(true)?;
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("verify: 1 chunks"),
        "only the honest chunk was stored: {out}"
    );

    app.start()?;
    // S5: pinned to another fingerprint.
    let mut opts = app.options(ALICE);
    opts.target.fingerprint = [0xab; 32];
    let err = Session::connect(&opts)
        .await
        .expect_err("wrong fingerprint must fail");
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    // Wrong password and unknown user get the same answer.
    let mut bad = app.options(ALICE);
    bad.password = "wrong-password".into();
    let e1 = Session::connect(&bad).await.expect_err("wrong password");
    bad.identity = "nobody@nowhere".into();
    let e2 = Session::connect(&bad).await.expect_err("unknown user");
    assert_eq!(code(&e1), Some(tonic::Code::Unauthenticated));
    assert_eq!(e1.to_string(), e2.to_string());
    // Protocol version is checked before credentials.
    let ch = coffer_client::channel(&app.options(ALICE).target).await?;
    let mut raw = coffer_proto::v1::coffer_client::CofferClient::new(ch);
    let st = raw
        .hello(coffer_proto::v1::HelloRequest {
            protocol_version: 99,
            ..Default::default()
        })
        .await
        .expect_err("version 99");
    assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st}");
    // Calls without a session are refused.
    let st = raw
        .list_snapshots(coffer_proto::v1::ListSnapshotsRequest::default())
        .await
        .expect_err("no session");
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    Ok(())
}
