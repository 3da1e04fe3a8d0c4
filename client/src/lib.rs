//! `coffer-client`: the client every fleet machine runs.
//!
//! Owns the connection to an appliance (TLS pinned by SHA-256 fingerprint, session token) and
//! the backup stages `walk -> chunk -> hash -> need -> upload`. Must never depend on
//! `coffer-appliance`, RocksDB or glommio: the client stays small.

mod connect;
mod error;
mod session;

pub use connect::{channel, PinnedVerifier, Target};
pub use error::ClientError;
pub use session::{Frame, PutStats, Session, SessionOptions};
