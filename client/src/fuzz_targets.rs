//! Fuzz targets of what the client decodes from the appliance (F1, F2; see
//! `coffer_proto::fuzz`): tree objects as restore and the parent match read them, and
//! `FindMissing` and `GetChunks` answers as the session checks them.

use coffer_proto::fuzz;
use coffer_proto::v1;
use coffer_proto::{ChunkId, DedupKey};
use prost::Message;

use crate::net::session::{answered_chunk, answered_needs};

#[test]
fn fuzz_client_trees() {
    let tree = v1::Tree {
        nodes: vec![v1::Node {
            name: bytes::Bytes::from_static(b"file"),
            chunks: coffer_proto::pack_ids(&[ChunkId::from_bytes([1; 32])]).into(),
            size: 10,
            ..v1::Node::default()
        }],
        ..v1::Tree::default()
    }
    .encode_to_vec();
    fuzz::run("client_tree", &[tree], |b| {
        let _ = crate::snapshot::tree::decode_checked(&ChunkId::from_bytes([0; 32]), b);
    });
}

/// Answers: `[0][FindMissingResponse]` for a batch of 5, `[1][GetChunksResponse]` for the
/// chunk the seed holds. Whatever the appliance sends, the client answers an error or exactly
/// what was asked, never more than its own limit.
#[test]
fn fuzz_client_answers() {
    let key = DedupKey::from_bytes([3; 32]);
    let plain = b"hello, coffer".repeat(50);
    let want = coffer_proto::chunk_id(&key, &plain);
    let mut miss = vec![0u8; 1];
    coffer_proto::bitmap_set(&mut miss, 2);
    let tagged = |t: u8, mut v: Vec<u8>| {
        v.insert(0, t);
        v
    };
    let seeds = vec![
        tagged(
            0,
            v1::FindMissingResponse {
                missing: miss.into(),
                count: 5,
                prove: vec![0].into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            1,
            v1::GetChunksResponse {
                chunks: vec![v1::ChunkFrame {
                    id: bytes::Bytes::copy_from_slice(want.as_bytes()),
                    raw_len: u32::try_from(plain.len()).unwrap(),
                    compression: v1::Compression::Zstd.into(),
                    data: zstd::bulk::compress(&plain, 3).unwrap().into(),
                }],
            }
            .encode_to_vec(),
        ),
    ];
    let limit = 1 << 20;
    fuzz::run("client_answers", &seeds, |b| {
        let Some((&t, m)) = b.split_first() else {
            return;
        };
        if t % 2 == 0 {
            if let Ok(r) = v1::FindMissingResponse::decode(m) {
                if let Ok(needs) = answered_needs(&r, 5) {
                    assert_eq!(needs.len(), 5);
                }
            }
        } else if let Ok(r) = v1::GetChunksResponse::decode(m) {
            for f in r.chunks {
                if let Ok(p) = answered_chunk(&want, f, limit, &key) {
                    assert_eq!(&p[..], &plain[..], "a wrong chunk was accepted");
                }
            }
        }
    });
}
