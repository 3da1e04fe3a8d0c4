//! Per-stage benches with in-memory inputs: chunking (the FastCDC crate against coffer's cutter), hashing (keyed BLAKE3),
//! AES-256-GCM (RustCrypto `aes-gcm` against `ring`), zstd, the RocksDB index (lookup, insert)
//! and the glommio pack writer (append + fdatasync).
//!
//! Run with `cargo bench -p coffer-benches --bench stages`.

#![allow(clippy::many_single_char_names)] // criterion closures: b, c, f, g, s by convention

use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_appliance::pack::format::IndexEntry;
use coffer_appliance::pack::store::LocalStore;
use coffer_appliance::pack::writer::{PackWriter, PendingChunk};
use coffer_appliance::MasterKey;
use coffer_appliance::RepoPaths;
use coffer_appliance::{ChunkIndex, MemIndex, OpenMode, RocksIndex};
use coffer_proto::{ChunkId, PackId};
use coffer_tests::data;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const MIB: usize = 1 << 20;

/// Counts the chunks of `data` with coffer's cutter (the crate's cut points, zero runs skipped).
fn coffer_cdc(data: &[u8], avg: u32) -> usize {
    let cdc = coffer_client::Cdc::new(coffer_proto::ChunkerParams {
        min: avg / 4,
        avg,
        max: avg * 4,
    });
    let (mut pos, mut n) = (0, 0);
    while pos < data.len() {
        pos += cdc.first_len(&data[pos..]);
        n += 1;
    }
    n
}

/// FastCDC: the crate against coffer's cutter (same cut points, checked here and by the
/// client's proptest), on noise and on a disk-image-like input with 30 % zero runs.
fn chunking(c: &mut Criterion) {
    let noise = data(1, 64 * MIB, true);
    let mut image = noise.clone();
    for (i, mib) in image.chunks_mut(MIB).enumerate() {
        if i % 10 < 3 {
            mib.fill(0);
        }
    }
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(noise.len() as u64))
        .sample_size(10);
    for (name, buf) in [("noise", &noise), ("image", &image)] {
        for avg in [128 << 10, 1 << 20] {
            let krate = fastcdc::v2020::FastCDC::new(buf, avg / 4, avg, avg * 4).count();
            assert_eq!(coffer_cdc(buf, avg), krate, "same cut points");
            g.bench_with_input(
                BenchmarkId::new(format!("fastcdc_crate_{name}"), avg),
                &avg,
                |b, &avg| {
                    b.iter(|| {
                        fastcdc::v2020::FastCDC::new(buf, avg / 4, avg, avg * 4)
                            .map(|c| c.length)
                            .sum::<usize>()
                    });
                },
            );
            g.bench_with_input(
                BenchmarkId::new(format!("coffer_cdc_{name}"), avg),
                &avg,
                |b, &avg| b.iter(|| coffer_cdc(buf, avg)),
            );
        }
    }
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let buf = data(2, MIB, false);
    let key = [7u8; 32];
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("blake3_keyed_1MiB", |b| {
        b.iter(|| blake3::keyed_hash(&key, &buf));
    });
    g.bench_function("blake3_keyed_1MiB_rayon_free_update", |b| {
        b.iter(|| blake3::Hasher::new_keyed(&key).update(&buf).finalize());
    });
    g.finish();
}

fn aes(c: &mut Criterion) {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    let key = [9u8; 32];
    let rc = aes_gcm::Aes256Gcm::new_from_slice(&key).expect("key");
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("key"),
    );
    let mut g = c.benchmark_group("aes256gcm");
    for size in [64 << 10, MIB] {
        let src = data(3, size, false);
        let mut buf = src.clone();
        g.throughput(Throughput::Bytes(size as u64));
        // Both include the copy into the destination buffer, as the pack writer does.
        g.bench_with_input(
            BenchmarkId::new("rustcrypto_aes_gcm", size),
            &size,
            |b, _| {
                b.iter(|| {
                    buf.copy_from_slice(&src);
                    rc.encrypt_in_place_detached(&[0u8; 12].into(), b"aad", &mut buf)
                        .expect("seal")
                });
            },
        );
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            b.iter(|| {
                buf.copy_from_slice(&src);
                ring_key
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key([0; 12]),
                        ring::aead::Aad::from(b"aad"),
                        &mut buf,
                    )
                    .expect("seal")
            });
        });
    }
    g.finish();
}

/// About 1 MiB of source text (this repository's Rust and Markdown files).
fn source_text() -> Vec<u8> {
    fn walk(dir: &std::path::Path, out: &mut Vec<u8>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() && !name.starts_with('.') && name != "target" {
                walk(&p, out);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("rs" | "md")) {
                out.extend(std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    let mut out = Vec::new();
    walk(
        concat!(env!("CARGO_MANIFEST_DIR"), "/..").as_ref(),
        &mut out,
    );
    while out.len() < MIB {
        out.extend_from_within(..);
    }
    out.truncate(MIB);
    out
}

/// zstd (levels 1 and 3) against LZ4 (`lz4_flex`, block format), on synthetic half-text data
/// and on source text.
fn compression(c: &mut Criterion) {
    for (name, buf) in [("halftext", data(4, MIB, true)), ("source", source_text())] {
        let mut g = c.benchmark_group(format!("compress_{name}"));
        g.throughput(Throughput::Bytes(buf.len() as u64));
        for level in [1, 3] {
            g.bench_with_input(BenchmarkId::new("zstd", level), &level, |b, &l| {
                b.iter(|| zstd::bulk::compress(&buf, l).expect("zstd"));
            });
        }
        g.bench_function("lz4", |b| b.iter(|| lz4_flex::block::compress(&buf)));
        let z = zstd::bulk::compress(&buf, 1).expect("zstd");
        let l = lz4_flex::block::compress(&buf);
        eprintln!(
            "{name}: zstd 1 {} bytes, lz4 {} bytes of {}",
            z.len(),
            l.len(),
            buf.len()
        );
        g.bench_function("zstd_decompress_bounded", |b| {
            b.iter(|| zstd::bulk::decompress(&z, MIB).expect("unzstd"));
        });
        g.bench_function("lz4_decompress_bounded", |b| {
            let mut out = vec![0u8; MIB];
            b.iter(|| lz4_flex::block::decompress_into(&l, &mut out).expect("unlz4"));
        });
        g.finish();
    }
}

fn ids(n: usize, salt: u64) -> Vec<ChunkId> {
    (0..n as u64)
        .map(|i| ChunkId::from_bytes(*blake3::hash(&(i ^ (salt << 40)).to_le_bytes()).as_bytes()))
        .collect()
}

fn entry(i: usize) -> IndexEntry {
    IndexEntry {
        flags: 0,
        pack: PackId::from_bytes([1; 16]),
        offset: i as u64 * 100,
        len: 100,
        raw_len: 50,
        digest: None,
        uploader: None,
    }
}

fn index(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rocks =
        RocksIndex::open(&dir.path().join("shard-0"), OpenMode::Create, 128 << 20).expect("open");
    let mem = MemIndex::default();
    let n = 1usize << 19;
    let present = ids(n, 1);
    for part in present.chunks(4096).enumerate() {
        let batch: Vec<_> = part
            .1
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, entry(part.0 * 4096 + i)))
            .collect();
        rocks.insert_batch(&batch, false).expect("insert");
        mem.insert_batch(&batch, false).expect("insert");
    }
    let absent = ids(n, 2);
    let mut g = c.benchmark_group("index");
    let batch = 1024;
    g.throughput(Throughput::Elements(batch as u64));
    for (name, idx) in [
        ("rocksdb", &rocks as &dyn ChunkIndex),
        ("memory", &mem as &dyn ChunkIndex),
    ] {
        let mut k = 0;
        g.bench_function(BenchmarkId::new("lookup_hit_512k", name), |b| {
            b.iter(|| {
                k = (k + batch) % (n - batch);
                idx.get_many(&present[k..k + batch]).expect("get")
            });
        });
        g.bench_function(BenchmarkId::new("lookup_miss_512k", name), |b| {
            b.iter(|| {
                k = (k + batch) % (n - batch);
                idx.get_many(&absent[k..k + batch]).expect("get")
            });
        });
    }
    let fresh = ids(1 << 22, 3);
    let mut k = 0;
    g.bench_function("insert_rocksdb", |b| {
        b.iter(|| {
            let batch: Vec<_> = fresh[k..k + batch]
                .iter()
                .map(|id| (*id, entry(k)))
                .collect();
            k = (k + batch.len()) % (fresh.len() - batch.len());
            rocks.insert_batch(&batch, false).expect("insert");
        });
    });
    g.finish();
}

fn pack_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("pack");
    let per = 64usize;
    g.throughput(Throughput::Bytes((per * MIB) as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    g.bench_function("append_fsync_64x1MiB", |b| {
        b.iter_custom(|iters| {
            let base =
                std::env::var_os("COFFER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
            let dir = tempfile::tempdir_in(base).expect("tempdir");
            let paths = RepoPaths::new(dir.path());
            let chunk = bytes::Bytes::from(data(5, MIB, false));
            let ex = glommio::LocalExecutorBuilder::default()
                .make()
                .expect("executor");
            ex.run(async move {
                let index: Arc<dyn ChunkIndex> = Arc::new(MemIndex::default());
                let mut w = PackWriter::new(
                    std::rc::Rc::new(LocalStore::new(paths, None)),
                    Arc::new(MasterKey::generate()),
                    index,
                    coffer_proto::ShardId(0),
                    coffer_proto::RepositoryId::from_bytes([0; 16]),
                    1 << 30,
                );
                let mut total = Duration::ZERO;
                let mut n = 0u64;
                for _ in 0..iters {
                    let batch: Vec<PendingChunk> = (0..per)
                        .map(|_| {
                            n += 1;
                            let mut id = [0u8; 32];
                            id[..8].copy_from_slice(&n.to_le_bytes());
                            PendingChunk {
                                id: ChunkId::from_bytes(id),
                                raw_len: 1 << 20,
                                flags: 0,
                                data: chunk.clone(),
                                owner: None,
                            }
                        })
                        .collect();
                    let t = Instant::now();
                    w.write(&batch).await.expect("write");
                    total += t.elapsed();
                }
                total
            })
        });
    });
    g.finish();
}

/// The need set of one shard of 2, 16, 64 and 256: the ids such an appliance routes to shard 0.
/// Compares the set as shipped (hash = bytes 8..16 of the id) with the layout it replaced (hash
/// = bytes 0..8, the bits the shard choice uses), which on such a shard leaves all but 1/N of
/// the table's home slots unused; the 2-shard benches could not show that.
fn need_set(c: &mut Criterion) {
    use std::collections::HashSet;
    use std::hash::{BuildHasherDefault, Hasher};

    const N: usize = 1_000_000;

    /// The replaced hasher, kept here only to measure what it cost.
    #[derive(Default)]
    struct ShardBits(u64);
    impl Hasher for ShardBits {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, _: &[u8]) {
            unreachable!("u128 keys only")
        }
        #[allow(clippy::cast_possible_truncation)]
        fn write_u128(&mut self, v: u128) {
            self.0 = v as u64;
        }
    }
    let key = |id: &ChunkId| u128::from_le_bytes(id.as_bytes()[..16].try_into().unwrap());

    let mut g = c.benchmark_group("need_set_shard0");
    g.throughput(Throughput::Elements(N as u64)).sample_size(10);
    for shards in [2u64, 16, 64, 256] {
        // The ids a `shards`-shard appliance routes to shard 0: uniform, except that their
        // first 8 bytes (little-endian) are a multiple of `shards`.
        let ids: Vec<ChunkId> = (0..N as u64)
            .map(|n| {
                let mut b = *blake3::hash(&n.to_le_bytes()).as_bytes();
                let first = u64::from_le_bytes(b[..8].try_into().unwrap());
                b[..8].copy_from_slice(&(first - first % shards).to_le_bytes());
                ChunkId::from_bytes(b)
            })
            .collect();
        // Half present, half absent: what FindMissing asks.
        let (stored, asked) = ids.split_at(N / 2);
        g.bench_with_input(BenchmarkId::new("bytes8_16", shards), &shards, |b, _| {
            b.iter(|| {
                let mut s = coffer_appliance::NeedSet::default();
                for id in stored {
                    s.insert(id);
                }
                stored
                    .iter()
                    .chain(asked)
                    .filter(|id| s.contains(id))
                    .count()
            });
        });
        g.bench_with_input(
            BenchmarkId::new("bytes0_8_replaced", shards),
            &shards,
            |b, _| {
                b.iter(|| {
                    let mut s: HashSet<u128, BuildHasherDefault<ShardBits>> = HashSet::default();
                    for id in stored {
                        s.insert(key(id));
                    }
                    stored
                        .iter()
                        .chain(asked)
                        .filter(|id| s.contains(&key(id)))
                        .count()
                });
            },
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    chunking,
    hashing,
    aes,
    compression,
    index,
    pack_append,
    need_set
);
criterion_main!(benches);
