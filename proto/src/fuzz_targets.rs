//! Fuzz targets of the wire formats every side parses (see [`crate::fuzz`]): compressed chunk
//! frames, packed ids, and every request and answer message.

use prost::Message;

use crate::fuzz;
use crate::v1;
use crate::{pack_ids, unpack_ids, ChunkId};

fn id(b: u8) -> ChunkId {
    ChunkId::from_bytes([b; 32])
}

/// Compressed frames: `[compression][raw_len: u32][data]`, decoded against the length the
/// frame claims (the decoder must never allocate past it, nor accept another length).
#[test]
fn fuzz_codec() {
    let plain: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let frame = |c: u8, data: &[u8]| {
        let mut v = vec![c];
        v.extend_from_slice(&u32::try_from(plain.len()).unwrap().to_le_bytes());
        v.extend_from_slice(data);
        v
    };
    let seeds = vec![
        frame(0, &plain),
        frame(1, &zstd::bulk::compress(&plain, 3).unwrap()),
        frame(2, &lz4_flex::block::compress(&plain)),
    ];
    fuzz::run("codec", &seeds, |b| {
        if b.len() < 5 {
            return;
        }
        let c = match b[0] % 3 {
            0 => v1::Compression::None,
            1 => v1::Compression::Zstd,
            _ => v1::Compression::Lz4,
        };
        let raw_len = u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize % (16 << 20);
        if let Ok(out) = crate::codec::decode(c, &b[5..], raw_len) {
            assert_eq!(out.len(), raw_len, "a decode answered another length");
        }
    });
}

/// Every request message as the appliance decodes it, then the id lists in it as the appliance
/// unpacks them: `[message type][protobuf]`.
#[test]
#[allow(clippy::too_many_lines)] // one seed per request type: the list is the test
fn fuzz_requests() {
    let ids = bytes::Bytes::from(pack_ids(&[id(1), id(2), id(1)]));
    let frame = v1::ChunkFrame {
        id: bytes::Bytes::copy_from_slice(id(3).as_bytes()),
        raw_len: 5,
        compression: 1,
        data: bytes::Bytes::from_static(b"hello"),
    };
    let tagged = |t: u8, m: Vec<u8>| {
        let mut v = vec![t];
        v.extend(m);
        v
    };
    let seeds = vec![
        tagged(
            0,
            v1::FindMissingRequest {
                ids: ids.clone(),
                envelope_hashes: ids.clone(),
            }
            .encode_to_vec(),
        ),
        tagged(
            1,
            v1::PutChunksRequest {
                batch: 7,
                chunks: vec![frame.clone(), frame],
            }
            .encode_to_vec(),
        ),
        tagged(2, v1::GetChunksRequest { ids }.encode_to_vec()),
        tagged(
            3,
            v1::CommitSnapshotRequest {
                snapshot: Some(v1::Snapshot {
                    path: "/home".into(),
                    root: bytes::Bytes::copy_from_slice(id(4).as_bytes()),
                    ..v1::Snapshot::default()
                }),
                commit_id: vec![9; 16].into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            4,
            v1::HelloRequest {
                protocol_version: 1,
                identity: "a@b".into(),
                password: "pw".into(),
                client_name: "coffer".into(),
            }
            .encode_to_vec(),
        ),
        tagged(5, v1::SetPolicyRequest::default().encode_to_vec()),
    ];
    fuzz::run("requests", &seeds, |b| {
        let Some((&t, m)) = b.split_first() else {
            return;
        };
        let unpack = |b: &[u8]| {
            let _ = unpack_ids(b, 1 << 16);
        };
        match t % 16 {
            0 => {
                if let Ok(r) = v1::FindMissingRequest::decode(m) {
                    unpack(&r.ids);
                }
            }
            1 => {
                if let Ok(r) = v1::PutChunksRequest::decode(m) {
                    for c in r.chunks {
                        let _ = ChunkId::from_slice(&c.id);
                        let _ = v1::Compression::try_from(c.compression);
                    }
                }
            }
            2 => {
                if let Ok(r) = v1::GetChunksRequest::decode(m) {
                    unpack(&r.ids);
                }
            }
            3 => {
                if let Ok(r) = v1::CommitSnapshotRequest::decode(m) {
                    if let Some(s) = r.snapshot {
                        let _ = ChunkId::from_slice(&s.root);
                    }
                }
            }
            4 => _ = v1::HelloRequest::decode(m),
            5 => _ = v1::SetPolicyRequest::decode(m),
            6 => _ = v1::AddRuleRequest::decode(m),
            7 => _ = v1::ProtectSnapshotRequest::decode(m),
            8 => _ = v1::LockSnapshotRequest::decode(m),
            9 => _ = v1::DeleteSnapshotRequest::decode(m),
            10 => _ = v1::ListSnapshotsRequest::decode(m),
            11 => _ = v1::OpenSnapshotRequest::decode(m),
            12 => _ = v1::GetSnapshotRequest::decode(m),
            13 => _ = v1::ChangePasswordRequest::decode(m),
            14 => _ = v1::GetPolicyRequest::decode(m),
            _ => _ = v1::Tree::decode(m),
        }
    });
}
