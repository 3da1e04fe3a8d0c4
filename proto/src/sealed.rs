//! Sealed-mode chunk envelopes: the one part of a client-encrypted chunk the appliance reads.
//!
//! In a sealed repository every chunk travels and is stored as an *envelope*:
//!
//! ```text
//! envelope = magic "CSE1" | trees u32 | leaves u32 | lists u32 | ids (32 bytes each) | sealed
//! ```
//!
//! The ids are the chunk's references in clear — for a tree object the subtrees and `next`
//! part (`trees`), the file chunks and bundles (`leaves`) and the list chunks (`lists`); for a
//! list chunk the ids it lists (`leaves`); for file data none — so that the appliance can walk
//! reachability (commit checks, opened snapshots, the GC mark) without reading a tree. `sealed`
//! is the client's ciphertext (`docs/format.md`, "Sealed chunk"), opaque here. What the clear
//! part reveals (the shape of the tree, never a name or a byte of content) is in
//! `docs/security.md`.
//!
//! Pure functions on bytes: every decode of untrusted input answers an error, never panics.

use crate::{pack_ids, unpack_ids, v1, ChunkId, CHUNK_ID_LEN};

/// First bytes of every envelope.
pub const ENVELOPE_MAGIC: &[u8; 4] = b"CSE1";
/// Magic and the three counts.
pub const ENVELOPE_HEAD_LEN: usize = 16;
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
    #[error("a sealed envelope declares {declared} references but holds room for {room}")]
    Counts { declared: u64, room: u64 },
}

/// The head and references of an envelope; the client appends its sealed part.
#[must_use]
pub fn encode_refs(refs: &Refs) -> Vec<u8> {
    let n = refs.trees.len() + refs.leaves.len() + refs.lists.len();
    let mut out = Vec::with_capacity(ENVELOPE_HEAD_LEN + n * CHUNK_ID_LEN);
    out.extend_from_slice(ENVELOPE_MAGIC);
    for part in [&refs.trees, &refs.leaves, &refs.lists] {
        out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
    }
    out.extend_from_slice(&pack_ids(&refs.trees));
    out.extend_from_slice(&pack_ids(&refs.leaves));
    out.extend_from_slice(&pack_ids(&refs.lists));
    out
}

/// Splits an envelope into its references and the offset where the sealed part starts.
///
/// # Errors
/// [`EnvelopeError`] for anything but a well-formed head whose ids fit in `envelope`.
pub fn decode_refs(envelope: &[u8]) -> Result<(Refs, usize), EnvelopeError> {
    if envelope.len() < ENVELOPE_HEAD_LEN || &envelope[..4] != ENVELOPE_MAGIC {
        return Err(EnvelopeError::Magic);
    }
    let count = |at: usize| {
        u64::from(u32::from_le_bytes([
            envelope[at],
            envelope[at + 1],
            envelope[at + 2],
            envelope[at + 3],
        ]))
    };
    let (t, l, s) = (count(4), count(8), count(12));
    let declared = t + l + s;
    let room = ((envelope.len() - ENVELOPE_HEAD_LEN) / CHUNK_ID_LEN) as u64;
    if declared > room {
        return Err(EnvelopeError::Counts { declared, room });
    }
    // Bounded by `room` above: every cast below fits in usize.
    #[allow(clippy::cast_possible_truncation)]
    let (t, l, s) = (t as usize, l as usize, s as usize);
    let ids = |from: usize, n: usize| {
        let at = ENVELOPE_HEAD_LEN + from * CHUNK_ID_LEN;
        unpack_ids(&envelope[at..at + n * CHUNK_ID_LEN], n).expect("whole ids within bounds")
    };
    let refs = Refs {
        trees: ids(0, t),
        leaves: ids(t, l),
        lists: ids(t + l, s),
    };
    Ok((refs, ENVELOPE_HEAD_LEN + (t + l + s) * CHUNK_ID_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_round_trip_and_bad_heads_are_refused() {
        let id = |b| ChunkId::from_bytes([b; 32]);
        let refs = Refs {
            trees: vec![id(1)],
            leaves: vec![id(2), id(3)],
            lists: vec![id(4)],
        };
        let mut env = encode_refs(&refs);
        let head = env.len();
        env.extend_from_slice(b"opaque");
        assert_eq!(decode_refs(&env), Ok((refs, head)));
        assert_eq!(decode_refs(b"CSE1"), Err(EnvelopeError::Magic));
        assert_eq!(decode_refs(b"XXXX000000000000"), Err(EnvelopeError::Magic));
        let mut lying = encode_refs(&Refs::default());
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        lying[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_refs(&lying),
            Err(EnvelopeError::Counts { room: 0, .. })
        ));
    }
}
