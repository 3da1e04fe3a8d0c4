//! Chunk compressions both sides decode: zstd frames and LZ4 blocks, always bounded by the
//! chunk's declared plaintext length (a compression bomb fails, it never allocates more).

use crate::v1::Compression;

thread_local! {
    /// One zstd context per thread: creating one per chunk costs more than decoding a small
    /// chunk.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Why a stored or received form does not decode to its declared plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("zstd frame does not decompress within {raw_len} bytes: {why}")]
    Zstd { raw_len: usize, why: String },
    #[error("LZ4 block does not decompress to {raw_len} bytes: {why}")]
    Lz4 { raw_len: usize, why: String },
    #[error("decoded to {got} bytes, the declared length is {raw_len}")]
    Length { got: usize, raw_len: usize },
    #[error("{0:?} is not a data compression")]
    NotData(Compression),
}

/// The most stored bytes a chunk of at most `raw_max` plaintext bytes may take (zstd's bound,
/// which also covers LZ4's): what both sides accept, never more.
#[must_use]
pub fn max_stored_len(raw_max: usize) -> usize {
    zstd::zstd_safe::compress_bound(raw_max)
}

/// The plaintext of `data` stored as `compression`, which must be exactly `raw_len` bytes.
/// `None` data is returned as is (after the length check).
///
/// # Errors
/// [`CodecError`] for malformed input or a length other than `raw_len`.
pub fn decode(
    compression: Compression,
    data: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, CodecError> {
    let out = match compression {
        Compression::None => data.to_vec(),
        Compression::Zstd => ZSTD
            .with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                d.as_mut().expect("set above").decompress(data, raw_len)
            })
            .map_err(|e| CodecError::Zstd {
                raw_len,
                why: e.to_string(),
            })?,
        Compression::Lz4 => {
            let mut out = vec![0u8; raw_len];
            let n =
                lz4_flex::block::decompress_into(data, &mut out).map_err(|e| CodecError::Lz4 {
                    raw_len,
                    why: e.to_string(),
                })?;
            out.truncate(n);
            out
        }
        Compression::Proof => return Err(CodecError::NotData(compression)),
    };
    if out.len() == raw_len {
        Ok(out)
    } else {
        Err(CodecError::Length {
            got: out.len(),
            raw_len,
        })
    }
}

/// The LZ4 block of `plain`, or `None` when it would not be smaller.
#[must_use]
pub fn lz4(plain: &[u8]) -> Option<Vec<u8>> {
    let out = lz4_flex::block::compress(plain);
    (out.len() < plain.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_wrong_lengths_and_garbage() {
        let plain: Vec<u8> = b"coffer ".iter().copied().cycle().take(100_000).collect();
        let z = zstd::bulk::compress(&plain, 1).expect("zstd");
        let l = lz4(&plain).expect("compressible");
        for (c, data) in [
            (Compression::None, plain.clone()),
            (Compression::Zstd, z),
            (Compression::Lz4, l),
        ] {
            assert_eq!(decode(c, &data, plain.len()).expect("decodes"), plain);
            assert!(decode(c, &data, plain.len() - 1).is_err(), "{c:?} shorter");
            assert!(decode(c, &data, plain.len() + 1).is_err(), "{c:?} longer");
        }
        assert!(decode(Compression::Lz4, &[0xff; 64], 1000).is_err());
        assert!(decode(Compression::Zstd, &[0xff; 64], 1000).is_err());
        assert!(decode(Compression::Proof, &[0; 32], 32).is_err());
        assert!(
            lz4(&[0x5a; 3]).is_none(),
            "incompressible input is sent as is"
        );
    }
}
