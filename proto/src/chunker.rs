//! FastCDC sizes: recorded in each repository, announced by `Hello`, used by every client.

/// Chunker sizes out of the range FastCDC v2020 accepts.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "unusable chunker sizes min {min} avg {avg} max {max}: FastCDC needs 64 <= min <= 1 MiB, \
     256 <= avg <= 4 MiB, 1 KiB <= max <= 16 MiB and min <= avg <= max"
)]
pub struct ChunkerError {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// FastCDC sizes (bytes). One definition for the appliance (which records them in
/// `coffer.repo`) and the client (which cuts with them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkerParams {
    /// Default: 16 KiB / 64 KiB / 256 KiB. Small enough that a block-level change inside a disk
    /// image re-uploads little (1 MiB chunks re-uploaded 15 % of the bench's image-v2, where 2 %
    /// of the blocks changed), large enough that per-chunk costs stay small.
    pub const DEFAULT: Self = Self {
        min: 16 << 10,
        avg: 64 << 10,
        max: 256 << 10,
    };

    /// Largest maximum chunk size (FastCDC v2020's `MAXIMUM_MAX`).
    pub const MAX_MAX: u32 = 16 << 20;

    /// Checks the sizes against FastCDC v2020's bounds (its `MINIMUM_*`, `AVERAGE_*` and
    /// `MAXIMUM_*` constants; it asserts on anything else).
    ///
    /// # Errors
    /// [`ChunkerError`] naming the sizes.
    pub fn validate(self) -> Result<Self, ChunkerError> {
        let ok = (64..=1 << 20).contains(&self.min)
            && (256..=4 << 20).contains(&self.avg)
            && (1024..=Self::MAX_MAX).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max;
        if ok {
            Ok(self)
        } else {
            Err(ChunkerError {
                min: self.min,
                avg: self.avg,
                max: self.max,
            })
        }
    }
}

impl From<crate::v1::ChunkerParams> for ChunkerParams {
    fn from(c: crate::v1::ChunkerParams) -> Self {
        Self {
            min: c.min_size,
            avg: c.avg_size,
            max: c.max_size,
        }
    }
}

impl From<ChunkerParams> for crate::v1::ChunkerParams {
    fn from(c: ChunkerParams) -> Self {
        Self {
            min_size: c.min,
            avg_size: c.avg,
            max_size: c.max,
        }
    }
}
