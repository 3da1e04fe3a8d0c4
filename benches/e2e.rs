//! End-to-end benches over loopback TLS against the real `coffer-appliance` binary (2 shards):
//!
//! * `ingest/unique_1MiB_avg`: unique chunks of 512 KiB–1.5 MiB (1 MiB average), already hashed,
//!   uploaded by 4 concurrent sessions (connections); measured until every batch is acknowledged,
//!   i.e. encrypted, written with O_DIRECT, fsynced and indexed.
//! * `find_missing/1M_index`: `FindMissing` of 262,144 ids (half stored, half not) on one
//!   stream against an index of 1,048,576 entries.
//!
//! Run with `cargo build --release --bins && cargo bench -p coffer-benches --bench e2e`.

#![allow(clippy::many_single_char_names)] // criterion closures: b, c, f, g, s by convention

use std::time::{Duration, Instant};

use bytes::Bytes;
use coffer_client::{Codec, Frame, Session};
use coffer_proto::ChunkId;
use coffer_tests::{data, Appliance};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const USER: &str = "bench@localhost";

struct Fixture {
    _dir: tempfile::TempDir,
    app: Appliance,
    rt: tokio::runtime::Runtime,
}

fn fixture(chunk_avg: u32) -> Fixture {
    let base = std::env::var_os("COFFER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let mut app = Appliance::init(dir.path(), 2, chunk_avg, &[USER]).expect("init");
    app.start().expect("start");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    Fixture { _dir: dir, app, rt }
}

fn ingest(c: &mut Criterion) {
    let f = fixture(1 << 20);
    let sessions: Vec<Session> =
        f.rt.block_on(async {
            futures::future::try_join_all((0..4).map(|_| f.app.session(USER))).await
        })
        .expect("sessions");
    // 1.5 MiB of random bytes; each chunk is a window of it with a unique 16-byte prefix.
    let base = Bytes::from(data(42, 3 << 19, false));
    let per_iter: u64 = 256;
    let lens: Vec<usize> = (0..per_iter)
        .map(|i| (512 << 10) + ((i * 2_654_435_761) % (1 << 20)) as usize)
        .collect();
    let bytes_per_iter: u64 = lens.iter().map(|&l| l as u64).sum();
    let mut counter = 0u64;
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(bytes_per_iter));
    g.bench_function("unique_1MiB_avg", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut plans: Vec<Vec<Frame>> = vec![Vec::new(); sessions.len()];
                for (i, &len) in lens.iter().enumerate() {
                    counter += 1;
                    let mut v = base[..len].to_vec();
                    v[..8].copy_from_slice(&counter.to_le_bytes());
                    v[8..16].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
                    let plain = Bytes::from(v);
                    plans[i % sessions.len()].push(Frame::new(
                        sessions[0].chunk_id(&plain),
                        plain,
                        Codec::None,
                    ));
                }
                let start = Instant::now();
                f.rt.block_on(async {
                    let puts = sessions.iter().zip(plans).map(|(s, p)| s.put(p, 4 << 20));
                    let res = futures::future::try_join_all(puts).await.expect("put");
                    let stored: u64 = res.iter().map(|r| r.stored).sum();
                    assert_eq!(stored, per_iter, "every chunk is new");
                });
                total += start.elapsed();
            }
            total
        });
    });
    g.finish();
}

fn find_missing(c: &mut Criterion) {
    let f = fixture(64 << 10);
    let s = f.rt.block_on(f.app.session(USER)).expect("session");
    // Populate 1,048,576 tiny chunks through the real ingest path.
    let n = 1usize << 20;
    let t = Instant::now();
    let mut present: Vec<ChunkId> = Vec::with_capacity(n);
    f.rt.block_on(async {
        for part in 0..16u64 {
            let frames: Vec<Frame> = (0..n as u64 / 16)
                .map(|i| {
                    let plain = Bytes::copy_from_slice(&(part << 32 | i).to_le_bytes());
                    Frame::new(s.chunk_id(&plain), plain, Codec::None)
                })
                .collect();
            present.extend(frames.iter().map(|f| f.id));
            s.put(frames, 1 << 20).await.expect("populate");
        }
    });
    eprintln!(
        "populated {n} index entries in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let q = 1usize << 18;
    let ids: Vec<ChunkId> = (0..q)
        .map(|i| {
            if i % 2 == 0 {
                present[(i * 7) % n]
            } else {
                s.chunk_id(format!("absent-{i}").as_bytes())
            }
        })
        .collect();
    let mut g = c.benchmark_group("find_missing");
    g.sample_size(10).throughput(Throughput::Elements(q as u64));
    g.bench_function("1M_index", |b| {
        b.iter(|| {
            let m = f.rt.block_on(s.find_missing(&ids)).expect("find_missing");
            assert_eq!(m.iter().filter(|x| **x).count(), q / 2);
        });
    });
    g.finish();
}

criterion_group!(benches, ingest, find_missing);
criterion_main!(benches);
