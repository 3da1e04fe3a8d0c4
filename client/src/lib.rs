//! `coffer-client`: the client every fleet machine runs.
//!
//! Owns the connection to an appliance (TLS pinned by SHA-256 fingerprint, session token) and
//! the backup stages `walk -> chunk -> hash -> need -> upload` ([`pipeline`]), tree objects and
//! restore. Must never depend on `coffer-appliance`, RocksDB or glommio: the client stays small.

pub mod chunk;
pub mod config;
mod connect;
pub mod diff;
mod error;
pub mod parent;
pub mod pipeline;
pub mod read;
pub mod restore;
mod session;
pub mod tree;
pub mod walk;

pub use connect::{channel, PinnedVerifier, Target};
pub use error::ClientError;
pub use session::{Codec, Frame, Need, PutStats, Session, SessionOptions};
