//! One chunk as it travels to the appliance: plaintext, compressed (zstd or LZ4, whichever the
//! file's size calls for and only when it saves space), or a possession proof instead of the
//! bytes. Building a frame is CPU work and runs on the upload stage's blocking threads; this
//! module only knows bytes and codecs, never sessions or files.

use bytes::Bytes;
use coffer_proto::v1;
use coffer_proto::ChunkId;

/// A chunk to upload.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: ChunkId,
    pub raw_len: u32,
    /// How `data` holds the chunk: plaintext, zstd frame, LZ4 block, or `Proof`: a possession
    /// proof (keyed BLAKE3 of the plaintext under the session's possession key), not the chunk.
    pub compression: v1::Compression,
    pub data: Bytes,
}

/// Files at least this large (disk images, archives, databases) are sent as LZ4: the 2 GiB image
/// of the peer bench backs up ~5 % faster than with zstd 1 on 2 cores, for ~9 % more bytes.
/// Smaller files keep zstd, whose ratio the repository-size goal (a tree of source files with
/// headers of up to 24 MB) depends on.
pub const LZ4_MIN_FILE: u64 = 256 << 20;

/// The codec for a chunk of a file of `size` bytes: zstd at `level` for files read whole, capped
/// at 1 for files read as extents, LZ4 from [`LZ4_MIN_FILE`] bytes when the appliance accepts it
/// (`lz4`); `None` when compression is off.
#[must_use]
pub fn codec_for(lz4: bool, level: Option<i32>, size: u64, extents: bool) -> Codec {
    match level {
        None => Codec::None,
        Some(_) if lz4 && size >= LZ4_MIN_FILE => Codec::Lz4,
        Some(l) if extents => Codec::Zstd(l.min(1)),
        Some(l) => Codec::Zstd(l),
    }
}

/// How a chunk is compressed for upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    /// zstd at this level.
    Zstd(i32),
    /// LZ4 block: compresses about 1.4× and decompresses 3× faster than zstd level 1 on source
    /// text, for a larger result (`benches/stages.rs`, docs/PERFORMANCE.md).
    Lz4,
}

impl Frame {
    /// Builds a frame from plaintext, compressed with `codec` when that saves space.
    #[must_use]
    pub fn new(id: ChunkId, plain: Bytes, codec: Codec) -> Self {
        let raw_len = u32::try_from(plain.len()).expect("chunks are < 4 GiB");
        let packed = match codec {
            Codec::None => None,
            Codec::Zstd(level) => compress(&plain, level)
                .ok()
                .flatten()
                .map(|c| (v1::Compression::Zstd, c)),
            Codec::Lz4 => {
                coffer_proto::codec::lz4(&plain).map(|c| (v1::Compression::Lz4, c.into()))
            }
        };
        let (compression, data) = packed.unwrap_or((v1::Compression::None, plain));
        Self {
            id,
            raw_len,
            compression,
            data,
        }
    }

    /// A possession proof of `plain` (whose id is `id`) under the session key `key`.
    #[must_use]
    pub fn proof(id: ChunkId, plain: &[u8], key: &[u8; 32]) -> Self {
        Self {
            id,
            raw_len: u32::try_from(plain.len()).expect("chunks are < 4 GiB"),
            compression: v1::Compression::Proof,
            data: Bytes::copy_from_slice(blake3::keyed_hash(key, plain).as_bytes()),
        }
    }
}

thread_local! {
    /// One zstd context per thread and level: creating one per chunk costs more than
    /// compressing a small chunk. The scratch buffer takes the output so that each frame is
    /// then kept at its exact size (a Vec of the compress bound per chunk held ~40 MB of slack
    /// in flight during the Linux tree's first backup).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The zstd frame of `plain`, or None when it would not be smaller.
fn compress(plain: &[u8], level: i32) -> std::io::Result<Option<Bytes>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?, Vec::new()));
        }
        let (_, z, scratch) = c.as_mut().expect("set above");
        scratch.clear();
        scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
        z.compress_to_buffer(plain, scratch)?;
        Ok((scratch.len() < plain.len()).then(|| Bytes::copy_from_slice(scratch)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_by_file_size_and_what_the_appliance_accepts() {
        let huge = LZ4_MIN_FILE;
        assert_eq!(codec_for(true, Some(3), 10, false), Codec::Zstd(3));
        assert_eq!(codec_for(true, Some(3), 24 << 20, true), Codec::Zstd(1));
        assert_eq!(codec_for(true, Some(3), huge, true), Codec::Lz4);
        assert_eq!(codec_for(false, Some(3), huge, true), Codec::Zstd(1));
        assert_eq!(codec_for(true, None, huge, true), Codec::None);
        assert_eq!(codec_for(true, None, 10, false), Codec::None);
    }

    #[test]
    fn frames_keep_incompressible_data_as_is() {
        let id = ChunkId::from_bytes([1; 32]);
        let text = Bytes::from("coffer ".repeat(10_000));
        for (codec, want) in [
            (Codec::Lz4, v1::Compression::Lz4),
            (Codec::Zstd(3), v1::Compression::Zstd),
            (Codec::None, v1::Compression::None),
        ] {
            let f = Frame::new(id, text.clone(), codec);
            assert_eq!(f.compression, want);
            let back = coffer_proto::codec::decode(f.compression, &f.data, f.raw_len as usize);
            assert_eq!(back.expect("decodes"), text);
        }
        let mut noise = vec![0u8; 5000];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let noise = Bytes::from(noise);
        let f = Frame::new(id, noise.clone(), Codec::Lz4);
        assert_eq!((f.compression, f.data), (v1::Compression::None, noise));
    }
}
