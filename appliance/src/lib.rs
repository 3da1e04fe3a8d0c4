//! `coffer-appliance`: the server that owns a coffer repository.
//!
//! Owns the network front (tonic + rustls), authentication, the shards (glommio executors, one
//! per core, each with its RocksDB index, pack writer and AES-256-GCM keys), pack files, the
//! catalog and maintenance. Must never depend on `coffer-client`.
//!
//! The order of the stages on the write path is `need -> ingest -> encrypt -> pack -> index`
//! (see [`pipeline`]).

pub mod acl;
pub mod admin;
pub mod auth;
pub mod catalog;
pub mod error;
pub mod index;
pub mod keys;
pub mod maintenance;
pub mod pack;
pub mod pipeline;
pub mod repo;
pub mod rpc;
pub mod server;
pub mod shard;
pub mod tls;

pub use error::{ApplianceError, IngestError, RepoError};
pub use repo::{ChunkerParams, RepoConfig, RepoPaths};
