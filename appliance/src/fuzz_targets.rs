//! Fuzz targets of what the appliance decodes from disk and from its own records (F2; see
//! `coffer_proto::fuzz`): pack headers, records (authenticated decryption and decompression),
//! footers and trailers, index entries, tree objects and list chunks as the reachability walk
//! reads them, journal entries, and catalog records.

use bytes::Bytes;
use coffer_proto::fuzz;
use coffer_proto::v1;
use coffer_proto::{ChunkId, PackId, RepositoryId, ShardId};
use prost::Message;

use crate::crypto::keys::MasterKey;
use crate::crypto::Encryption;
use crate::pack::format::{
    decode_footer, decode_trailer, encode_footer, record_nonce, FooterEntry, IndexEntry,
    PackHeader, RecordHeader, FLAG_ZSTD, RECORD_AAD_LEN, RECORD_HEADER_LEN, TRAILER_LEN,
};
use crate::pack::read::{open_record, raw_plaintext};
use crate::shard::StoredChunk;

fn id(b: u8) -> ChunkId {
    ChunkId::from_bytes([b; 32])
}

#[test]
fn fuzz_pack_header_and_index_entry() {
    let h = PackHeader {
        pack: PackId::from_bytes([1; 16]),
        shard: ShardId(3),
        repo_id: RepositoryId::from_bytes([2; 16]),
        created_us: 1_700_000_000_000_000,
    }
    .encode();
    let e = IndexEntry {
        flags: 0,
        pack: PackId::from_bytes([5; 16]),
        offset: 64,
        len: 1000,
        raw_len: 900,
        digest: None,
        uploader: None,
    }
    .encode();
    fuzz::run("pack_header", &[h.to_vec()], |b| {
        let _ = PackHeader::decode(b);
    });
    fuzz::run("index_entry", &[e], |b| {
        let _ = IndexEntry::decode(b);
    });
}

/// Records: header, authenticated decryption under the pack's key, decompression bounded by the
/// header's raw length.
#[test]
fn fuzz_pack_record() {
    let master = MasterKey::generate();
    let pack = PackId::from_bytes([7; 16]);
    let cipher = master.pack_cipher(&pack);
    let plain: Vec<u8> = (0..5000u32).map(|i| (i % 13) as u8).collect();
    let seal = |flags: u8, data: &[u8]| {
        let nonce = record_nonce(1);
        let h = RecordHeader {
            flags,
            id: id(9),
            raw_len: u32::try_from(plain.len()).unwrap(),
            stored_len: u32::try_from(data.len() + 16).unwrap(),
            nonce,
        }
        .encode();
        let mut rec = h.to_vec();
        let mut payload = data.to_vec();
        let tag = cipher.seal(nonce, &h[..RECORD_AAD_LEN], &mut payload);
        rec.extend(payload);
        rec.extend(tag);
        rec
    };
    let seeds = vec![
        seal(0, &plain),
        seal(FLAG_ZSTD, &zstd::bulk::compress(&plain, 3).unwrap()),
    ];
    fuzz::run("pack_record", &seeds, |b| {
        let _ = RecordHeader::decode(b);
        let mut rec = b.to_vec();
        if let Ok((h, stored)) = open_record(cipher.as_ref(), &mut rec) {
            if let Ok(raw) = raw_plaintext(&h, stored) {
                assert_eq!(raw.len(), h.raw_len as usize);
            }
        }
        assert!(rec.len() >= RECORD_HEADER_LEN || RecordHeader::decode(b).is_err());
    });
}

/// Footers and trailers as `read_footer` takes them from the end of a pack: `[footer offset:
/// u64][footer body and trailer]`.
#[test]
fn fuzz_pack_footer() {
    let entries: Vec<FooterEntry> = (0..3u8)
        .map(|i| FooterEntry {
            id: id(i),
            offset: 64 + u64::from(i) * 100,
            len: 100,
            raw_len: 80,
        })
        .collect();
    let mut seed = 364u64.to_le_bytes().to_vec();
    seed.extend(encode_footer(&entries, 364));
    fuzz::run("pack_footer", &[seed], |b| {
        if b.len() < 8 + TRAILER_LEN {
            return;
        }
        let off = u64::from_le_bytes(b[..8].try_into().unwrap());
        let rest = &b[8..];
        let file_len = off.saturating_add(rest.len() as u64);
        if let Ok((o, len, crc)) = decode_trailer(&rest[rest.len() - TRAILER_LEN..], file_len) {
            let body = &rest[..rest.len() - TRAILER_LEN];
            if usize::try_from(len).is_ok_and(|l| l == body.len()) {
                if let Ok(es) = decode_footer(body, crc, o) {
                    assert!(es.iter().all(|e| e.offset + u64::from(e.len) <= o));
                }
            }
        }
        // The checksum gate passed, so that the entries themselves are exercised.
        let body = &rest[..rest.len() - TRAILER_LEN];
        let _ = decode_footer(body, crc32fast::hash(body), off);
    });
}

/// Tree objects and list chunks as the reachability walk decodes them (commit, open, GC).
#[test]
fn fuzz_tree_objects() {
    let tree = v1::Tree {
        nodes: vec![
            v1::Node {
                name: Bytes::from_static(b"file"),
                chunks: coffer_proto::pack_ids(&[id(1), id(2)]).into(),
                chunk_lists: coffer_proto::pack_ids(&[id(3)]).into(),
                ..v1::Node::default()
            },
            v1::Node {
                name: Bytes::from_static(b"dir"),
                subtree: Bytes::copy_from_slice(id(4).as_bytes()),
                ..v1::Node::default()
            },
        ],
        next: Bytes::copy_from_slice(id(5).as_bytes()),
    }
    .encode_to_vec();
    let list = coffer_proto::pack_ids(&[id(6), id(7)]);
    fuzz::run("tree_object", &[tree, list], |b| {
        let c = StoredChunk {
            id: id(0),
            raw_len: u32::try_from(b.len()).unwrap_or(u32::MAX),
            compression: v1::Compression::None,
            data: Bytes::copy_from_slice(b),
            sealed: b.first() == Some(&b'C'),
        };
        let _ = crate::reach::tree_refs(std::slice::from_ref(&c));
        let _ = crate::reach::list_refs(std::slice::from_ref(&c));
    });
}

/// Journal entries (the catalog's copy in the packs, read by `rebuild-catalog`) and catalog
/// records: `[kind][bytes]`.
#[test]
fn fuzz_catalog_records() {
    let ops: Vec<crate::catalog::journal::Op> = vec![
        (b"user/a@b".to_vec(), Some(b"{}".to_vec())),
        (b"snap/x".to_vec(), None),
    ];
    let user = serde_json::to_vec(&crate::catalog::UserRecord {
        identity: "a@b".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$x$y".into(),
        created_unix: 1,
        owner: Some("00".repeat(16)),
        quota: Some(5),
        delete_passphrase: None,
        role: None,
    })
    .unwrap();
    let tagged = |t: u8, mut v: Vec<u8>| {
        v.insert(0, t);
        v
    };
    let seeds = vec![
        tagged(0, crate::catalog::journal::encode_ops(1, &ops)),
        tagged(1, user),
        tagged(
            2,
            v1::Snapshot {
                path: "/p".into(),
                ..v1::Snapshot::default()
            }
            .encode_to_vec(),
        ),
    ];
    fuzz::run("catalog_records", &seeds, |b| {
        let Some((&t, m)) = b.split_first() else {
            return;
        };
        match t % 5 {
            0 => _ = crate::catalog::journal::decode_ops(m),
            1 => _ = serde_json::from_slice::<crate::catalog::UserRecord>(m),
            2 => _ = v1::Snapshot::decode(m),
            3 => _ = serde_json::from_slice::<crate::catalog::audit::Entry>(m),
            _ => _ = serde_json::from_slice::<crate::catalog::policy::Policy>(m),
        }
    });
}
