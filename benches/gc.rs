//! Mark and sweep rates of garbage collection on a RocksDB index of 10⁷ chunk entries (issue 12):
//!
//! * `table`: the scan that builds the mark's position table (the candidates' id prefixes);
//! * `mark`: marking 90 % of the ids, in random order (what the tree walk feeds it);
//! * `list`: the scan that lists the unmarked candidates;
//! * `condemn`: removing them from the index in synced batches of 16,384 (the sweep).
//!
//! Tree reading is not part of this: `benches/maintenance.sh` times whole runs on the Linux tree.
//! One pass, not criterion: sweeping is destructive and the setup takes a minute. Run with
//! `cargo bench -p coffer-benches --bench gc` (`COFFER_GC_BENCH_CHUNKS` to change the count).

use std::time::Instant;

use coffer_appliance::pack::format::IndexEntry;
use coffer_appliance::{ChunkIndex, GcMark, OpenMode, RocksIndex};
use coffer_proto::{ChunkId, PackId};

/// The `i`-th synthetic id: uniformly spread, like keyed BLAKE3 outputs.
fn id(i: u64) -> ChunkId {
    ChunkId::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

#[allow(clippy::cast_precision_loss)] // rates for display
fn rate(n: u64, t: Instant) -> String {
    let s = t.elapsed().as_secs_f64();
    format!("{s:.2} s, {:.2} M/s", n as f64 / s / 1e6)
}

fn main() {
    let n: u64 = std::env::var("COFFER_GC_BENCH_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let base = std::env::var_os("COFFER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let idx =
        RocksIndex::open(&dir.path().join("shard-0"), OpenMode::Create, 256 << 20).expect("index");
    let t = Instant::now();
    let mut batch = Vec::with_capacity(65_536);
    for i in 0..n {
        let mut pack = [0u8; 16];
        pack[..8].copy_from_slice(&(i / 4096).to_le_bytes());
        batch.push((
            id(i),
            IndexEntry {
                flags: 0,
                pack: PackId::from_bytes(pack),
                offset: (i % 4096) * 65_600,
                len: 65_600,
                raw_len: 65_536,
                digest: None,
                uploader: None,
            },
        ));
        if batch.len() == batch.capacity() {
            idx.insert_batch(&batch, false).expect("insert");
            batch.clear();
        }
    }
    idx.insert_batch(&batch, true).expect("insert");
    println!("setup: {n} entries inserted in {}", rate(n, t));

    let t = Instant::now();
    let mut mark = GcMark::build(&[&idx], &|_| true).expect("table");
    println!("table: {}", rate(n, t));
    println!(
        "mark memory: {} bytes ({:.2} bytes per chunk)",
        mark.bytes(),
        mark.bytes() as f64 / n as f64
    );

    // 90 % live, visited in an order unrelated to the index's (ids made before the clock
    // starts: hashing them is not the mark's cost).
    let live: Vec<ChunkId> = (0..n)
        // A permutation of 0..n (1,000,003 is prime, so coprime with any n it does not divide).
        .map(|i| u64::try_from(u128::from(i) * 1_000_003 % u128::from(n)).expect("below n"))
        .filter(|j| !j.is_multiple_of(10))
        .map(id)
        .collect();
    let marked = live.len() as u64;
    let t = Instant::now();
    for c in &live {
        mark.mark(c);
    }
    println!("mark: {marked} ids in {}", rate(marked, t));
    drop(live);

    let t = Instant::now();
    let mut dead = Vec::new();
    idx.scan(&mut |c, _| {
        if mark.dead(c) {
            dead.push(*c);
        }
        Ok(())
    })
    .expect("scan");
    println!("list: {} dead of {n} in {}", dead.len(), rate(n, t));
    assert_eq!(dead.len() as u64, n - marked, "the mark lost or kept ids");

    let t = Instant::now();
    for part in dead.chunks(16_384) {
        idx.delete_batch(part, true).expect("delete");
    }
    println!("condemn: {}", rate(dead.len() as u64, t));
}
