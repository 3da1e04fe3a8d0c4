//! The chunk and hash stages: FastCDC v2020 (normalized, level 1) cut points, keyed BLAKE3 of
//! each chunk. Pure functions over bytes; the reading lives in [`crate::read`].
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
use coffer_proto::ChunkId;

/// FastCDC sizes, as the appliance announced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkerParams {
    /// Largest maximum chunk size a client accepts from an appliance.
    pub const MAX_MAX: u32 = 16 << 20;

    /// Checks parameters received from an appliance (FastCDC asserts on out-of-range values).
    ///
    /// # Errors
    /// A description of what is out of range.
    pub fn validate(self) -> Result<Self, String> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX.min(Self::MAX_MAX)).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max;
        if ok {
            Ok(self)
        } else {
            Err(format!(
                "appliance announced unusable chunker sizes min {} avg {} max {}",
                self.min, self.avg, self.max
            ))
        }
    }
}

/// One chunk of a file.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub id: ChunkId,
    pub data: Bytes,
}

/// A chunk inside a buffer: `data[offset..offset + len]`, already hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub offset: usize,
    pub len: usize,
    pub id: ChunkId,
}

/// Length of the chunk that starts at `data[0]`. `data` must hold at least `max` bytes unless
/// it ends at the end of the file.
fn first_len(data: &[u8], p: ChunkerParams) -> usize {
    let cdc = fastcdc::v2020::FastCDC::new(data, p.min, p.avg, p.max);
    cdc.cut(0, data.len()).1
}

/// Cuts `data` from its start until a chunk ends at or beyond `own_len` (all of it when
/// `own_len == data.len()`), hashing every chunk with the dedup key.
///
/// `data` must extend at least `max` bytes beyond `own_len` unless it ends at end of file.
#[must_use]
pub fn cut(data: &[u8], own_len: usize, p: ChunkerParams, dedup_key: &[u8; 32]) -> Vec<Cut> {
    let cdc = fastcdc::v2020::FastCDC::new(data, p.min, p.avg, p.max);
    let mut cuts = Vec::with_capacity(own_len / p.avg as usize + 1);
    let mut offset = 0;
    while offset < own_len {
        let end = cdc.cut(offset, data.len() - offset).1;
        cuts.push(Cut {
            offset,
            len: end - offset,
            id: coffer_proto::chunk_id(dedup_key, &data[offset..end]),
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
    pub fn push(&mut self, k: u64, e: Extent, dedup_key: &[u8; 32], out: &mut Vec<Chunk>) {
        self.waiting.insert(k, e);
        while let Some(e) = self.waiting.remove(&self.next) {
            self.merge(&e, dedup_key, out);
            self.next += 1;
        }
    }

    fn merge(&mut self, e: &Extent, dedup_key: &[u8; 32], out: &mut Vec<Chunk>) {
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
            let len = first_len(&e.data[rel..], self.params);
            let data = e.data.slice(rel..rel + len);
            out.push(Chunk {
                id: coffer_proto::chunk_id(dedup_key, &data),
                data,
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
    const KEY: [u8; 32] = [7; 32];

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
