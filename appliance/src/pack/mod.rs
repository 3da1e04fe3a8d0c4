//! Pack files: the only place chunk bytes live.
//!
//! Invariants this module enforces:
//! * A record is written once and never modified; a sealed pack (footer + trailer present) is
//!   immutable.
//! * [`writer::PackWriter::write`] returns only after the records' bytes are fsynced, and inserts
//!   their index entries only after that (durability rule 1).
//! * A pack whose write or fsync failed is poisoned: the writer drops it and never appends to it
//!   again (rule 3). Its records are never acknowledged.
//! * Every record carries its chunk id, and the footer lists every record, so the index can be
//!   rebuilt from packs alone ([`recover`]).
//!
//! Owns: the pack byte format ([`format`], specified in `docs/format.md`), writing records
//! ([`writer`]) through the [`crate::crypto::Encryption`] seam into a [`store::PackStore`], reading
//! and recovering them. Must never decide what is stored (ingest's job) nor answer the network.

pub mod format;
pub mod read;
pub mod recover;
pub mod store;
pub mod writer;

use std::path::{Path, PathBuf};

/// Why a pack file could not be read, sealed, set aside or indexed.
#[derive(Debug, thiserror::Error)]
pub enum PackFileError {
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error("bad pack id: {0}")]
    Id(#[from] coffer_proto::IdError),
    #[error("the index: {0}")]
    Index(#[from] crate::error::RepoError),
    #[error("{}: {source}", path.display())]
    At {
        path: PathBuf,
        #[source]
        source: Box<PackFileError>,
    },
}

impl PackFileError {
    /// An I/O step that failed.
    pub fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            action: action.into(),
            source,
        }
    }

    /// The same error, naming the pack file it happened on.
    #[must_use]
    pub fn at(self, path: &Path) -> Self {
        Self::At {
            path: path.to_path_buf(),
            source: Box::new(self),
        }
    }
}
