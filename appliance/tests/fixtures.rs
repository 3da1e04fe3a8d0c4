//! Frozen format fixtures (issue 11, item 7): bytes written once by the code of format version 1
//! and committed under `tests/fixtures/`. `fixtures_decode` reads them forever: it fails the day
//! a change stops decoding today's repositories without a version bump (then write a migration
//! and new fixtures beside the old ones, never over them).
//!
//! `write_fixtures` (ignored) made them: `cargo test --release -p coffer-appliance --test
//! fixtures -- --ignored write_fixtures`.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use coffer_appliance::pack::format::{compression_of, flags_of, IndexEntry, RecordHeader};
use coffer_appliance::pack::read::{
    hashes_to, open_record, raw_plaintext, read_footer, read_header, read_record_bytes,
};
use coffer_appliance::pack::store::LocalStore;
use coffer_appliance::pack::writer::{PackWriter, PendingChunk};
use coffer_appliance::{ChunkIndex, MemIndex};
use coffer_appliance::{ChunkerParams, RepoConfig, RepoPaths};
use coffer_appliance::{KdfParams, MasterKey};
use coffer_appliance::{Mode, Sharding};
use coffer_proto::v1::{self, Compression, Node, NodeKind, Tree};
use coffer_proto::{pack_ids, ChunkId, PackId};
use prost::Message as _;

const PASSWORD: &[u8] = b"fixture-repository-password";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v1")
}

fn id(b: u8) -> ChunkId {
    ChunkId::from_bytes([b; 32])
}

fn config() -> RepoConfig {
    RepoConfig {
        id: coffer_proto::RepositoryId::from_bytes([0x11; 16]),
        mode: Mode::Managed,
        sharding: Sharding::Le64Mod,
        shards: 3,
        chunker: ChunkerParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        },
        created_unix: 1_764_633_600,
    }
}

/// A tree object with every node kind and every reference field.
fn tree() -> Tree {
    let node = |name: &str, kind: NodeKind| Node {
        name: Bytes::copy_from_slice(name.as_bytes()),
        kind: kind.into(),
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_ns: 1_764_633_600_123_456_789,
        inode: 42,
        dev: 7,
        ctime_ns: 1_764_633_601_000_000_000,
        ..Node::default()
    };
    let mut file = node("file.txt", NodeKind::File);
    file.size = 3;
    file.chunks = pack_ids(&[id(1), id(2)]).into();
    let mut big = node("big.img", NodeKind::File);
    big.size = 1 << 40;
    big.chunk_lists = pack_ids(&[id(3)]).into();
    let mut small = node("small.c", NodeKind::File);
    small.size = 100;
    small.bundle = Bytes::copy_from_slice(id(4).as_bytes());
    small.bundle_offset = 4096;
    let mut hard = node("hard-link", NodeKind::File);
    hard.hardlink_group = 9;
    hard.chunks = pack_ids(&[id(1)]).into();
    let mut sub = node("src", NodeKind::Dir);
    sub.mode = 0o755;
    sub.subtree = Bytes::copy_from_slice(id(5).as_bytes());
    let mut link = node("link", NodeKind::Symlink);
    link.mode = 0o777;
    link.symlink_target = Bytes::from_static(b"../target with spaces");
    Tree {
        nodes: vec![file, big, small, hard, sub, link],
        next: Bytes::copy_from_slice(id(6).as_bytes()),
    }
}

fn snapshot() -> v1::Snapshot {
    v1::Snapshot {
        id: Bytes::from_static(&[0x22; 16]),
        identity: "alice@laptop".into(),
        hostname: "laptop".into(),
        path: "/home/alice".into(),
        time_us: 1_764_633_600_000_001,
        root: Bytes::copy_from_slice(id(7).as_bytes()),
        stats: Some(v1::SnapshotStats {
            files: 78_600,
            bytes: 1_320_000_000,
            uploaded_bytes: 257_000_000,
            chunks: 36_000,
        }),
        partial: true,
        tags: vec!["nightly".into(), "fixture".into()],
        parent: Bytes::from_static(&[0x33; 16]),
        // Added after the fixture was written: absent from it, so they decode as empty.
        commit_id: Bytes::new(),
        lock_until_us: 0,
        protected_until_us: 0,
        sealed: Bytes::new(),
        committed_us: 0,
    }
}

fn index_entry() -> IndexEntry {
    IndexEntry {
        flags: flags_of(Compression::Zstd),
        pack: PackId::from_bytes([0x44; 16]),
        offset: 0x0102_0304_0506,
        len: 70_000,
        raw_len: 65_536,
        digest: None,
        uploader: None,
    }
}

/// The plaintexts stored in the fixture pack, with how each record holds it.
fn records() -> Vec<(Compression, Vec<u8>)> {
    let text = b"coffer fixture: the quick brown fox jumps over the lazy dog. ".repeat(64);
    vec![
        (
            Compression::None,
            b"coffer fixture: a chunk stored as it is".to_vec(),
        ),
        (Compression::Zstd, text.clone()),
        (Compression::Lz4, text.iter().rev().copied().collect()),
        (Compression::None, tree().encode_to_vec()),
    ]
}

#[test]
#[ignore = "writes the fixtures; run once when a format version is born"]
fn write_fixtures() {
    let out = dir();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("coffer.repo"), config().encode()).unwrap();
    let master = MasterKey::generate();
    let small = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };
    std::fs::write(
        out.join("master.key"),
        master.wrap(PASSWORD, small).unwrap(),
    )
    .unwrap();
    std::fs::write(out.join("index-entry"), index_entry().encode()).unwrap();
    std::fs::write(out.join("tree.pb"), tree().encode_to_vec()).unwrap();
    std::fs::write(out.join("snapshot.pb"), snapshot().encode_to_vec()).unwrap();

    let repo = tempfile::tempdir().unwrap();
    let paths = RepoPaths::new(repo.path());
    let dedup = master.dedup_key();
    let chunks: Vec<PendingChunk> = records()
        .into_iter()
        .map(|(c, raw)| {
            let data = match c {
                Compression::Zstd => zstd::encode_all(&raw[..], 3).unwrap(),
                Compression::Lz4 => coffer_proto::codec::lz4(&raw).unwrap(),
                _ => raw.clone(),
            };
            PendingChunk {
                id: coffer_proto::chunk_id(&dedup, &raw),
                raw_len: u32::try_from(raw.len()).unwrap(),
                flags: flags_of(c),
                data: Bytes::from(data),
                owner: None,
            }
        })
        .collect();
    let master = Arc::new(master);
    let p2 = paths.clone();
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move {
            let index: Arc<dyn ChunkIndex> = Arc::new(MemIndex::default());
            let store = std::rc::Rc::new(LocalStore::new(p2, None));
            let mut w = PackWriter::new(
                store,
                master,
                index,
                coffer_proto::ShardId(1),
                config().id,
                1 << 30,
            );
            w.write(&chunks[..2]).await.unwrap();
            w.write(&chunks[2..]).await.unwrap();
            w.seal().await.unwrap();
        });
    let packs = paths.list_packs().unwrap();
    assert_eq!(packs.len(), 1);
    std::fs::copy(&packs[0].1, out.join("pack")).unwrap();
}

#[test]
fn fixtures_decode() {
    let d = dir();
    let read =
        |name: &str| std::fs::read(d.join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    assert_eq!(RepoConfig::decode(&read("coffer.repo")).unwrap(), config());
    assert_eq!(
        IndexEntry::decode(&read("index-entry")).unwrap(),
        index_entry()
    );
    assert_eq!(Tree::decode(&read("tree.pb")[..]).unwrap(), tree());
    assert_eq!(
        v1::Snapshot::decode(&read("snapshot.pb")[..]).unwrap(),
        snapshot()
    );
    let master = MasterKey::unwrap(&read("master.key"), PASSWORD).unwrap();

    // The sealed pack: header, footer, and every record decrypted, decompressed and hashed.
    let file = std::fs::File::open(d.join("pack")).unwrap();
    let header = read_header(&file).unwrap();
    assert_eq!(
        (header.shard, header.repo_id),
        (coffer_proto::ShardId(1), config().id)
    );
    let footer = read_footer(&file).unwrap();
    let want = records();
    assert_eq!(footer.len(), want.len());
    let key = master.pack_key(&header.pack);
    for (entry, (compression, raw)) in footer.iter().zip(&want) {
        let mut rec = read_record_bytes(&file, entry.offset, entry.len).unwrap();
        assert_eq!(RecordHeader::decode(&rec).unwrap().id, entry.id);
        let (h, stored) = open_record(&key, &mut rec).unwrap();
        assert_eq!(compression_of(h.flags).unwrap(), *compression);
        let plain = raw_plaintext(&h, stored).unwrap();
        assert_eq!(&plain, raw);
        assert!(hashes_to(&master.dedup_key(), &entry.id, &plain));
    }
}
