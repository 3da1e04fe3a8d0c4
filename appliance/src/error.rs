//! Error policy of the appliance.
//!
//! * Each module returns its own `thiserror` enum whose message tells the operator or client what
//!   to do next. Messages never contain secrets.
//! * [`ApplianceError`] is the boundary error: it knows whether a failure is the caller's fault
//!   (bad input), transient (retry), or internal.
//! * `impl From<ApplianceError> for tonic::Status` in [`crate::net::status`] is the only place that
//!   maps errors to gRPC status codes; handlers return [`ApplianceError`] and never build a
//!   `Status` themselves.
//! * **Disclosure rule** (S2, S3): no message a caller receives carries bytes derived from stored
//!   data the caller may not read (no decoded "ids" from someone else's chunk, no lengths), and no
//!   message (nor status code) differs by whether *another* user stored something. Handlers check
//!   what the session may read *before* touching stored data, and answer an unknown chunk with the
//!   same words whether or not it exists. Ids quoted in errors come from the caller's own input or
//!   from chunks the caller uploaded, proved or may read.

use std::path::PathBuf;

/// Problems with the repository on disk.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0} is not a coffer repository (no coffer.repo); create one with `coffer-appliance init --repo {0}`")]
    NotARepository(PathBuf),
    #[error("{0} already holds a coffer repository; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    #[error("invalid repository: {0}")]
    Invalid(String),
    #[error("wrong repository password (the key file could not be unlocked)")]
    WrongPassword,
    #[error("the index is missing ({0}) while pack files exist; run `coffer-appliance rebuild-index --repo <DIR>` before serving")]
    IndexMissing(PathBuf),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("index database error: {0}")]
    Index(String),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
}

/// Why a chunk upload was refused or failed.
#[derive(Debug, thiserror::Error, Clone)]
pub enum IngestError {
    #[error(
        "chunk {id}: the data does not hash to its id (keyed BLAKE3 mismatch); nothing stored"
    )]
    IdMismatch { id: String },
    #[error("chunk {id}: {len} bytes exceeds the maximum chunk size of {max} bytes")]
    TooLarge { id: String, len: u64, max: u32 },
    #[error("chunk {id}: {why}")]
    BadFrame { id: String, why: String },
    #[error("storage failure, nothing acknowledged (retry later): {0}")]
    Storage(String),
    #[error("the appliance's disk is full, nothing acknowledged; the operator must free space (the appliance resumes by itself): {0}")]
    NoSpace(String),
    #[error("the appliance is shutting down; retry later")]
    ShuttingDown,
}

/// The appliance's boundary error.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Stored data that cannot be read back as it was written: a damaged record (bit rot), a
    /// pack shorter than the index says, a pack file gone. `DATA_LOSS`, never `INTERNAL`: the
    /// operator must run `verify`, and the next backup holding the data heals it.
    #[error("{0}")]
    DataLoss(String),
}

impl ApplianceError {
    /// Whether the same request may succeed if retried later.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_)
                | Self::Ingest(IngestError::Storage(_) | IngestError::ShuttingDown)
        )
    }
}

impl From<crate::catalog::CatalogError> for ApplianceError {
    /// "No such user" is `NOT_FOUND`, an existing one `ALREADY_EXISTS`; the rest is the
    /// appliance's fault, named.
    fn from(e: crate::catalog::CatalogError) -> Self {
        use crate::catalog::CatalogError as C;
        match e {
            C::NotFound(m) => Self::NotFound(m),
            C::Exists(m) => Self::AlreadyExists(m),
            C::Held(m) => Self::PermissionDenied(m),
            e => Self::Internal(e.to_string()),
        }
    }
}

impl From<RepoError> for ApplianceError {
    /// A repository or catalog failure while serving a request: the appliance's fault, named.
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Catalog(c) => c.into(),
            e => Self::Internal(e.to_string()),
        }
    }
}
