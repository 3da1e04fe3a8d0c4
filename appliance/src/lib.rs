//! `coffer-appliance`: the server that owns a coffer repository.
//!
//! Owns the network front (tonic + rustls), authentication, the shards (glommio executors, one
//! per core, each with its RocksDB index, pack writer and AES-256-GCM keys), pack files, the
//! catalog and maintenance. Must never depend on `coffer-client`.
//!
//! The order of the stages on the write path is `need -> ingest -> encrypt -> pack -> index`
//! (see [`pipeline`]).

pub mod access;
pub mod catalog;
pub mod crypto;
pub mod error;
pub mod index;
pub mod maintenance;
pub mod net;
pub mod pack;
pub mod pipeline;
pub mod reach;
pub mod repo;
pub mod shard;

pub use error::{ApplianceError, IngestError, RepoError};
pub use repo::{ChunkerParams, RepoConfig, RepoPaths};
