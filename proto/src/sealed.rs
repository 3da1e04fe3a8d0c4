//! Sealed-mode chunk envelopes: the one part of a client-encrypted chunk the appliance reads.
//!
//! In a sealed repository every chunk travels and is stored as an *envelope*:
//!
//! ```text
//! envelope = magic "CSE2" | trees | leaves | lists (LEB128 varints) | ids (32 bytes each) | sealed
//! ```
//!
//! The ids are the chunk's references in clear — for a tree object the subtrees and `next`
//! part (`trees`), the file chunks and bundles (`leaves`) and the list chunks (`lists`); for a
//! list chunk the ids it lists (`leaves`); for file data none — so that the appliance can walk
//! reachability (commit checks, opened snapshots, the GC mark) without reading a tree. `sealed`
//! is the client's ciphertext (`docs/format.md`, "Sealed chunk"), opaque here. What the clear
//! part reveals (the shape of the tree, never a name or a byte of content) is in
//! `docs/security.md`. Each part lists an id once: a bundle shared by a hundred small files is
//! one reference, not a hundred (the set is what the walk needs, and every byte here is stored
//! in clear beside a ciphertext that already holds it).
//!
//! Pure functions on bytes: every decode of untrusted input answers an error, never panics.

use std::collections::HashSet;

use crate::{unpack_ids, v1, ChunkId, CHUNK_ID_LEN};

/// First bytes of every envelope (version 2: varint counts, each id once per part).
pub const ENVELOPE_MAGIC: &[u8; 4] = b"CSE2";
/// Magic and the three counts at their shortest (an envelope without references).
pub const ENVELOPE_HEAD_LEN: usize = 7;
/// How much larger than its plaintext chunk a data envelope may be: the head, the client's key
/// wrap and AEAD tag, and room to spare (`docs/format.md`). The appliance accepts envelopes of
/// up to the chunker maximum plus this; tree objects are built within half the maximum, so
/// that their references fit beside them.
pub const ENVELOPE_OVERHEAD: usize = 4096;

/// The references an envelope declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    /// Tree objects to walk next (subtrees, the next part of a listing).
    pub trees: Vec<ChunkId>,
    /// Chunks that hold data (file chunks, bundles, the ids of a list chunk).
    pub leaves: Vec<ChunkId>,
    /// List chunks (files with too many chunks for one tree).
    pub lists: Vec<ChunkId>,
}

impl Refs {
    /// Every id, in order: trees, leaves, lists.
    pub fn all(&self) -> impl Iterator<Item = &ChunkId> {
        self.trees.iter().chain(&self.leaves).chain(&self.lists)
    }

    /// The references of one decoded tree object.
    ///
    /// # Errors
    /// A subtree, bundle or `next` that is not an id, or a ragged packed list.
    pub fn of_tree(t: &v1::Tree) -> Result<Self, String> {
        let id_of = |b: &[u8]| ChunkId::from_slice(b).map_err(|e| format!("bad id: {e}"));
        let packed = |b: &[u8]| unpack_ids(b, usize::MAX).map_err(|e| e.to_string());
        let mut r = Self::default();
        // Repeats are dropped by `encode_refs`.
        if !t.next.is_empty() {
            r.trees.push(id_of(&t.next)?);
        }
        for n in &t.nodes {
            if !n.subtree.is_empty() {
                r.trees.push(id_of(&n.subtree)?);
            }
            r.leaves.extend(packed(&n.chunks)?);
            if !n.bundle.is_empty() {
                r.leaves.push(id_of(&n.bundle)?);
            }
            r.lists.extend(packed(&n.chunk_lists)?);
        }
        Ok(r)
    }
}

/// Why an envelope's clear part does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("not a sealed envelope (bad magic or shorter than its head)")]
    Magic,
    #[error("a sealed envelope's reference count is not a varint below 2^32")]
    Count,
    #[error("a sealed envelope declares {declared} references but holds room for {room}")]
    Counts { declared: u64, room: u64 },
}

/// Each id of `part` once, in the order of first appearance.
fn unique(part: &[ChunkId]) -> Vec<&ChunkId> {
    let mut seen = HashSet::with_capacity(part.len());
    part.iter().filter(|id| seen.insert(*id)).collect()
}

/// The head and references of an envelope (each id once per part); the client appends its
/// sealed part.
#[must_use]
pub fn encode_refs(refs: &Refs) -> Vec<u8> {
    let parts = [
        unique(&refs.trees),
        unique(&refs.leaves),
        unique(&refs.lists),
    ];
    let n: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(ENVELOPE_HEAD_LEN + 12 + n * CHUNK_ID_LEN);
    out.extend_from_slice(ENVELOPE_MAGIC);
    for part in &parts {
        prost::encoding::encode_varint(part.len() as u64, &mut out);
    }
    for id in parts.iter().flatten() {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// A LEB128 varint below 2^32 at the front of `buf`, and the bytes it took.
///
/// # Errors
/// [`EnvelopeError::Count`] for a truncated, overlong or too large varint.
pub fn read_varint(buf: &[u8]) -> Result<(u32, usize), EnvelopeError> {
    let mut rest = buf;
    let v = prost::encoding::decode_varint(&mut rest).map_err(|_| EnvelopeError::Count)?;
    let v = u32::try_from(v).map_err(|_| EnvelopeError::Count)?;
    Ok((v, buf.len() - rest.len()))
}

/// Splits an envelope into its references and the offset where the sealed part starts.
///
/// # Errors
/// [`EnvelopeError`] for anything but a well-formed head whose ids fit in `envelope`.
pub fn decode_refs(envelope: &[u8]) -> Result<(Refs, usize), EnvelopeError> {
    if envelope.len() < ENVELOPE_HEAD_LEN || &envelope[..4] != ENVELOPE_MAGIC {
        return Err(EnvelopeError::Magic);
    }
    let mut head = 4;
    let mut counts = [0u64; 3];
    for c in &mut counts {
        let (v, used) = read_varint(&envelope[head..])?;
        *c = u64::from(v);
        head += used;
    }
    let [t, l, s] = counts;
    let declared = t + l + s;
    let room = ((envelope.len() - head) / CHUNK_ID_LEN) as u64;
    if declared > room {
        return Err(EnvelopeError::Counts { declared, room });
    }
    // Bounded by `room` above: every cast below fits in usize.
    #[allow(clippy::cast_possible_truncation)]
    let (t, l, s) = (t as usize, l as usize, s as usize);
    let ids = |from: usize, n: usize| {
        let at = head + from * CHUNK_ID_LEN;
        unpack_ids(&envelope[at..at + n * CHUNK_ID_LEN], n).expect("whole ids within bounds")
    };
    let refs = Refs {
        trees: ids(0, t),
        leaves: ids(t, l),
        lists: ids(t + l, s),
    };
    Ok((refs, head + (t + l + s) * CHUNK_ID_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_round_trip_and_bad_heads_are_refused() {
        let id = |b| ChunkId::from_bytes([b; 32]);
        let refs = Refs {
            trees: vec![id(1)],
            leaves: vec![id(2), id(3), id(2), id(2)],
            lists: vec![id(4), id(2)],
        };
        let mut env = encode_refs(&refs);
        let head = env.len();
        assert_eq!(
            head,
            4 + 3 + 5 * 32,
            "repeats within a part are stored once"
        );
        env.extend_from_slice(b"opaque");
        let once = Refs {
            leaves: vec![id(2), id(3)],
            ..refs.clone()
        };
        assert_eq!(decode_refs(&env), Ok((once, head)));
        assert_eq!(encode_refs(&Refs::default()).len(), ENVELOPE_HEAD_LEN);
        assert_eq!(decode_refs(b"CSE2"), Err(EnvelopeError::Magic));
        assert_eq!(decode_refs(b"XXXX000000000000"), Err(EnvelopeError::Magic));
        assert_eq!(decode_refs(b"CSE1\0\0\0\0\0\0"), Err(EnvelopeError::Magic));
        // Counts past 2^32, truncated or overlong varints.
        assert_eq!(
            decode_refs(b"CSE2\xff\xff\xff\xff\x7f\0\0"),
            Err(EnvelopeError::Count)
        );
        assert_eq!(decode_refs(b"CSE2\0\0\x80"), Err(EnvelopeError::Count));
        let mut lying = b"CSE2".to_vec();
        for _ in 0..3 {
            prost::encoding::encode_varint(u64::from(u32::MAX), &mut lying);
        }
        assert!(matches!(
            decode_refs(&lying),
            Err(EnvelopeError::Counts { room: 0, .. })
        ));
    }
}
