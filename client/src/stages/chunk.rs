//! The chunk stage: FastCDC v2020 (normalized, level 1) cut points. Pure functions over bytes;
//! the reading lives in [`super::read`], the id of each chunk in [`super::hash`] ([`cut`] hashes
//! every chunk as soon as it is cut, while its bytes are still in the CPU cache).
//!
//! A big file is read as *extents* that worker threads cut in parallel, each from its own start.
//! [`Merge`] then stitches them so that the result is exactly the sequential chunking of the
//! whole file: a FastCDC cut only depends on the bytes from the chunk's start (at most `max` of
//! them, or up to end of file), so once the sequential chunking reaches a cut point that the
//! extent's own chunking also found, the two agree from there on. Until then (usually one or two
//! chunks) `Merge` cuts the extent's bytes itself.
//!
//! Invariant (tested against the sequential chunker by a proptest below): for any data, any
//! parameters and any extent size `>= max`, merging the extents in any arrival order yields the
//! same chunks as `FastCDC` over the whole data.

use std::collections::BTreeMap;

use bytes::Bytes;
use coffer_proto::{ChunkId, ChunkerParams, DedupKey};

use super::hash::id_of;

/// One chunk: file data, or a tree object or list chunk of the snapshot's trees.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub id: ChunkId,
    pub data: Bytes,
    /// What it is: a sealed envelope declares a tree's or list's references beside it.
    pub kind: ChunkKind,
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkKind {
    /// File content (or a bundle of small files).
    #[default]
    Data,
    /// A `coffer.v1.Tree` part.
    Tree,
    /// A list chunk: packed ids of a file's chunks.
    List,
}

impl ChunkKind {
    /// The references a sealed envelope of `data` (a chunk of this kind) declares.
    ///
    /// # Errors
    /// A tree or list this client built that does not decode (a bug).
    pub fn refs(self, data: &[u8]) -> Result<coffer_proto::sealed::Refs, String> {
        use prost::Message as _;
        match self {
            Self::Data => Ok(coffer_proto::sealed::Refs::default()),
            Self::Tree => coffer_proto::v1::Tree::decode(data)
                .map_err(|e| e.to_string())
                .and_then(|t| coffer_proto::sealed::Refs::of_tree(&t)),
            Self::List => Ok(coffer_proto::sealed::Refs {
                leaves: coffer_proto::unpack_ids(data, usize::MAX).map_err(|e| e.to_string())?,
                ..Default::default()
            }),
        }
    }
}

/// A chunk inside a buffer: `data[offset..offset + len]`, already hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub offset: usize,
    pub len: usize,
    pub id: ChunkId,
}

/// FastCDC v2020 (normalized chunking, level 1, the crate's gear tables): the same cut points as
/// `fastcdc::v2020::FastCDC`, with one addition. The gear hash only remembers the last 64 bytes,
/// so after 64 zero bytes it settles at a fixed value, `zero`, and stays there for as long as
/// zeros follow. When that value cannot cut in the current phase, the run is skipped at memory
/// speed instead of hashed byte by byte (disk images are full of zeros). The proptest below
/// checks the cut points against the crate.
#[derive(Debug, Clone, Copy)]
pub struct Cdc {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: &'static [u64; 256],
    gear_ls: &'static [u64; 256],
    zero: u64,
}

/// The crate's gear table and its left-shifted twin.
type Gears = (Box<[u64; 256]>, Box<[u64; 256]>);

fn gears() -> &'static Gears {
    static GEARS: std::sync::OnceLock<Gears> = std::sync::OnceLock::new();
    GEARS.get_or_init(|| fastcdc::v2020::get_gear_with_seed(0))
}

impl Cdc {
    #[must_use]
    pub fn new(p: ChunkerParams) -> Self {
        use fastcdc::v2020::{logarithm2, MASKS};
        let bits = logarithm2(p.avg) as usize;
        let (gear, gear_ls) = gears();
        // The fixed point of `h = (h << 1) + gear[0]`.
        let zero = gear[0].wrapping_neg();
        debug_assert_eq!((zero << 1).wrapping_add(gear[0]), zero);
        Self {
            min: p.min as usize,
            avg: p.avg as usize,
            max: p.max as usize,
            mask_s: MASKS[bits + 1],
            mask_l: MASKS[bits - 1],
            gear,
            gear_ls,
            zero,
        }
    }

    /// Length of the chunk that starts at `data[0]`. `data` must hold at least `max` bytes
    /// unless it ends at the end of the file.
    #[must_use]
    pub fn first_len(&self, data: &[u8]) -> usize {
        let mut remaining = data.len();
        if remaining <= self.min {
            return remaining;
        }
        let mut center = self.avg;
        if remaining > self.max {
            remaining = self.max;
        } else if remaining < center {
            center = remaining;
        }
        // Bytes are hashed in pairs: `i` counts pairs, the first byte of a pair is checked with
        // the mask shifted left by one (the crate's "roll two bytes" form).
        let mut i = self.min / 2;
        let mut hash: u64 = 0;
        for (end, mask) in [(center / 2, self.mask_s), (remaining / 2, self.mask_l)] {
            let mask_ls = mask << 1;
            let zero_cuts = (self.zero << 1) & mask_ls == 0 || self.zero & mask == 0;
            while i < end {
                let a = 2 * i;
                hash = (hash << 2).wrapping_add(self.gear_ls[usize::from(data[a])]);
                if hash & mask_ls == 0 {
                    return a;
                }
                hash = hash.wrapping_add(self.gear[usize::from(data[a + 1])]);
                if hash & mask == 0 {
                    return a + 1;
                }
                i += 1;
                if hash == self.zero && !zero_cuts {
                    // Zero pairs keep the hash at `zero`, which cannot cut in this phase.
                    i += zero_prefix(&data[2 * i..2 * end]) / 2;
                }
            }
        }
        remaining
    }
}

/// How many bytes at the start of `data` are zero.
pub(super) fn zero_prefix(data: &[u8]) -> usize {
    let words = data
        .chunks_exact(32)
        .take_while(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0)
        .count()
        * 32;
    words + data[words..].iter().take_while(|&&b| b == 0).count()
}

/// Cuts `data` from its start until a chunk ends at or beyond `own_len` (all of it when
/// `own_len == data.len()`), hashing every chunk with the dedup key.
///
/// `data` must extend at least `max` bytes beyond `own_len` unless it ends at end of file.
#[must_use]
pub fn cut(data: &[u8], own_len: usize, p: ChunkerParams, dedup_key: &DedupKey) -> Vec<Cut> {
    let cdc = Cdc::new(p);
    let mut cuts = Vec::with_capacity(own_len / p.avg as usize + 1);
    let mut offset = 0;
    while offset < own_len {
        let end = offset + cdc.first_len(&data[offset..]);
        cuts.push(Cut {
            offset,
            len: end - offset,
            id: id_of(dedup_key, &data[offset..end]),
        });
        offset = end;
    }
    cuts
}

/// The chunks of a whole small file held in `data[range]`, as zero-copy slices of `data`.
#[must_use]
pub fn chunk_slice(data: &Bytes, cuts: &[Cut]) -> Vec<Chunk> {
    cuts.iter()
        .map(|c| Chunk {
            id: c.id,
            data: data.slice(c.offset..c.offset + c.len),
            kind: ChunkKind::Data,
        })
        .collect()
}

/// One extent of a big file as a worker read and cut it.
#[derive(Debug)]
pub struct Extent {
    /// File offset of `data[0]`.
    pub start: u64,
    /// The extent owns chunks starting before `start + own_len`; `data` runs up to `max` bytes
    /// further (or to end of file) so that those chunks can be cut.
    pub own_len: usize,
    pub data: Bytes,
    /// Chunks cut from `start` (see [`cut`]).
    pub cuts: Vec<Cut>,
}

/// Stitches the extents of one file into its sequential chunking.
#[derive(Debug)]
pub struct Merge {
    params: ChunkerParams,
    /// End of the last chunk emitted: the next chunk starts here.
    pos: u64,
    next: u64,
    waiting: BTreeMap<u64, Extent>,
}

impl Merge {
    #[must_use]
    pub fn new(params: ChunkerParams) -> Self {
        Self {
            params,
            pos: 0,
            next: 0,
            waiting: BTreeMap::new(),
        }
    }

    /// Extents merged so far (they are merged in order).
    #[must_use]
    pub fn merged(&self) -> u64 {
        self.next
    }

    /// Adds extent number `k`; appends to `out` every chunk that became final, in file order.
    pub fn push(&mut self, k: u64, e: Extent, dedup_key: &DedupKey, out: &mut Vec<Chunk>) {
        self.waiting.insert(k, e);
        while let Some(e) = self.waiting.remove(&self.next) {
            self.merge(&e, dedup_key, out);
            self.next += 1;
        }
    }

    fn merge(&mut self, e: &Extent, dedup_key: &DedupKey, out: &mut Vec<Chunk>) {
        let own_end = e.start + e.own_len as u64;
        debug_assert!(self.pos >= e.start, "extents cover the file without gaps");
        while self.pos < own_end {
            let rel = usize::try_from(self.pos - e.start).expect("inside the extent");
            if let Ok(i) = e.cuts.binary_search_by_key(&rel, |c| c.offset) {
                // In step with the extent's own chunking from here on.
                out.extend(chunk_slice(&e.data, &e.cuts[i..]));
                let last = e.cuts.last().expect("found one");
                self.pos = e.start + (last.offset + last.len) as u64;
                return;
            }
            let len = Cdc::new(self.params).first_len(&e.data[rel..]);
            let data = e.data.slice(rel..rel + len);
            out.push(Chunk {
                id: id_of(dedup_key, &data),
                data,
                kind: ChunkKind::Data,
            });
            self.pos += len as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: ChunkerParams = ChunkerParams {
        min: 64,
        avg: 256,
        max: 1024,
    };
    const KEY: DedupKey = DedupKey::from_bytes([7; 32]);

    fn sequential(data: &[u8], p: ChunkerParams) -> Vec<(usize, usize)> {
        fastcdc::v2020::FastCDC::new(data, p.min, p.avg, p.max)
            .map(|c| (c.offset, c.length))
            .collect()
    }

    /// Splits `data` into extents of `seg` bytes the way the reader does and merges them in
    /// `order`.
    fn merged(data: &[u8], seg: usize, order: &[usize], p: ChunkerParams) -> Vec<(usize, usize)> {
        let whole = Bytes::copy_from_slice(data);
        let n = data.len().div_ceil(seg);
        let extents: Vec<Extent> = (0..n)
            .map(|k| {
                let start = k * seg;
                let own_len = seg.min(data.len() - start);
                let end = (start + own_len + p.max as usize).min(data.len());
                let bytes = whole.slice(start..end);
                let cuts = cut(&bytes, own_len, p, &KEY);
                Extent {
                    start: start as u64,
                    own_len,
                    data: bytes,
                    cuts,
                }
            })
            .collect();
        let mut m = Merge::new(p);
        let mut out = Vec::new();
        let mut extents: Vec<Option<Extent>> = extents.into_iter().map(Some).collect();
        for &k in order.iter().filter(|&&k| k < n) {
            if let Some(e) = extents[k].take() {
                m.push(k as u64, e, &KEY, &mut out);
            }
        }
        for (k, e) in extents.into_iter().enumerate() {
            if let Some(e) = e {
                m.push(k as u64, e, &KEY, &mut out);
            }
        }
        assert_eq!(m.merged(), n as u64);
        // Every chunk is a slice of the data at its position, and ids are keyed BLAKE3.
        let mut pos = 0;
        out.iter()
            .map(|c| {
                assert_eq!(&c.data[..], &data[pos..pos + c.data.len()]);
                assert_eq!(c.id, coffer_proto::chunk_id(&KEY, &c.data));
                pos += c.data.len();
                (pos - c.data.len(), c.data.len())
            })
            .collect()
    }

    /// Random bytes with repeated runs and zero runs, so that cut points recur.
    fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..3000),
                (1usize..5000).prop_map(|n| vec![0u8; n]),
                (any::<u8>(), 1usize..2000).prop_map(|(b, n)| vec![b; n]),
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn extents_merge_to_the_sequential_chunking(
            data in data_strategy(),
            seg_factor in 1usize..6,
            extra in 0usize..700,
            order in prop::collection::vec(0usize..40, 0..40),
        ) {
            let seg = P.max as usize * seg_factor + extra;
            prop_assert_eq!(merged(&data, seg, &order, P), sequential(&data, P));
        }
    }

    fn params_for(avg: u32) -> ChunkerParams {
        ChunkerParams {
            min: (avg / 4).max(64),
            avg,
            max: avg * 4,
        }
    }

    fn cdc_sequential(data: &[u8], p: ChunkerParams) -> Vec<(usize, usize)> {
        let cdc = Cdc::new(p);
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let len = cdc.first_len(&data[pos..]);
            out.push((pos, len));
            pos += len;
        }
        out
    }

    /// Pseudo-random bytes (proptest's own vectors are too slow at these sizes).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The zero-run skip never moves a cut point: same chunks as the crate, for every
        /// average size an appliance may announce, on data made of noise, zero runs of every
        /// length (shorter and longer than the 64 bytes the hash remembers) and other runs.
        #[test]
        fn cdc_cuts_where_the_crate_cuts(
            avg_bits in 8u32..18,
            parts in prop::collection::vec((0u8..3, any::<u64>(), 1usize..4096), 1..24),
            scale in 1usize..64,
        ) {
            let p = params_for(1 << avg_bits);
            let mut data = Vec::new();
            for (kind, seed, len) in parts {
                let len = len * scale;
                match kind {
                    0 => data.extend(noise(seed, len)),
                    1 => data.resize(data.len() + len, 0),
                    _ => data.resize(data.len() + len, seed.to_le_bytes()[0]),
                }
            }
            prop_assert_eq!(cdc_sequential(&data, p), sequential(&data, p));
        }
    }

    #[test]
    fn zero_runs_are_skipped_for_the_default_sizes_and_cut_like_the_crate() {
        // For the default average the zero state cuts in neither phase, so the skip is used.
        let p = params_for(128 << 10);
        let cdc = Cdc::new(p);
        let (s, l) = (cdc.mask_s, cdc.mask_l);
        assert!((cdc.zero << 1) & (s << 1) != 0 && cdc.zero & s != 0);
        assert!((cdc.zero << 1) & (l << 1) != 0 && cdc.zero & l != 0);
        let mut data = noise(1, 300_000);
        data.resize(data.len() + 5_000_000, 0);
        data.extend(noise(2, 700_000));
        data[3_000_000] = 1;
        assert_eq!(cdc_sequential(&data, p), sequential(&data, p));
    }

    #[test]
    fn extent_of_exactly_max_bytes_and_empty_file() {
        let data: Vec<u8> = (0..20_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2])
            .collect();
        assert_eq!(
            merged(&data, P.max as usize, &[3, 1, 0], P),
            sequential(&data, P)
        );
        assert!(merged(&[], P.max as usize, &[], P).is_empty());
    }

    #[test]
    fn bad_parameters_from_an_appliance_are_refused() {
        assert!(P.validate().is_ok());
        for bad in [
            ChunkerParams { min: 0, ..P },
            ChunkerParams { max: 10, ..P },
            ChunkerParams { avg: 2048, ..P },
            ChunkerParams {
                max: ChunkerParams::MAX_MAX * 2,
                ..P
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
