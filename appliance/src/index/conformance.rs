//! One suite every [`super::ChunkIndex`] engine passes.

use super::*;
use coffer_proto::PackId;

fn entry(i: u8) -> IndexEntry {
    IndexEntry {
        flags: 0,
        pack: PackId::from_bytes([i; 16]),
        offset: u64::from(i) * 10,
        len: 5,
        raw_len: 3,
        digest: None,
        uploader: None,
    }
}

fn suite(idx: &dyn ChunkIndex) {
    let a = ChunkId::from_bytes([1; 32]);
    let b = ChunkId::from_bytes([2; 32]);
    assert_eq!(idx.get_many(&[a, b]).unwrap(), vec![None, None]);
    idx.insert_batch(&[(a, entry(1))], false).unwrap();
    assert_eq!(idx.get_many(&[b, a]).unwrap(), vec![None, Some(entry(1))]);
    idx.insert_batch(&[(a, entry(1)), (b, entry(2))], true)
        .unwrap();
    idx.put_meta(META_OPEN_PACK, Some(b"x")).unwrap();
    assert_eq!(
        idx.get_meta(META_OPEN_PACK).unwrap().as_deref(),
        Some(&b"x"[..])
    );
    let all: Vec<_> = idx
        .entries()
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        all,
        vec![(a, entry(1)), (b, entry(2))],
        "meta keys are not chunk entries"
    );
    idx.put_meta(META_OPEN_PACK, None).unwrap();
    assert_eq!(idx.get_meta(META_OPEN_PACK).unwrap(), None);
    // Ownership records are per account and never chunk entries.
    let (alice, bob) = ([7u8; 16], [8u8; 16]);
    idx.insert_owned(&alice, &[a]).unwrap();
    assert_eq!(idx.owned(&alice, &[a, b]).unwrap(), vec![true, false]);
    assert_eq!(idx.owned(&bob, &[a, b]).unwrap(), vec![false, false]);
    assert_eq!(
        idx.entries().unwrap().len(),
        2,
        "ownership rows are not entries"
    );
    assert!(
        idx.approximate_len().unwrap() <= 1_000,
        "an estimate, but a sane one"
    );
    // A scan streams the same entries in id order.
    let mut scanned = Vec::new();
    idx.scan(&mut |id, e| {
        scanned.push((*id, *e));
        Ok(())
    })
    .unwrap();
    assert_eq!(scanned, vec![(a, entry(1)), (b, entry(2))]);
    // An error of the callback ends the scan with that error.
    let mut seen = 0;
    let stopped = idx.scan(&mut |_, _| {
        seen += 1;
        Err(RepoError::Index("stop".into()))
    });
    assert!(matches!(stopped, Err(RepoError::Index(ref m)) if m == "stop") && seen == 1);
    // Deleting removes chunk entries only, not ownership records.
    idx.delete_batch(&[a], true).unwrap();
    assert_eq!(idx.get_many(&[a, b]).unwrap(), vec![None, Some(entry(2))]);
    assert_eq!(idx.owned(&alice, &[a]).unwrap(), vec![true]);
    idx.insert_batch(&[(a, entry(1))], false).unwrap();
    idx.sync().unwrap();
}

#[test]
fn memory_engine() {
    suite(&MemIndex::default());
}

#[test]
fn rocksdb_engine() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shard-0");
    assert!(matches!(
        RocksIndex::open(&p, OpenMode::Existing, 8 << 20),
        Err(RepoError::IndexMissing(_))
    ));
    suite(&RocksIndex::open(&p, OpenMode::Create, 8 << 20).unwrap());
    let reopened = RocksIndex::open(&p, OpenMode::Existing, 8 << 20).unwrap();
    assert_eq!(reopened.entries().unwrap().len(), 2);
}
