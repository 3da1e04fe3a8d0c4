//! `coffer-appliance`: the server that owns a coffer repository.
//!
//! Owns the network front (tonic + rustls), authentication, the shards (glommio executors, one
//! per core, each with its RocksDB index, pack writer and AES-256-GCM keys), pack files, the
//! catalog and maintenance. Must never depend on `coffer-client`.
//!
//! The order of the stages on the write path is `need -> ingest -> encrypt -> pack -> index`
//! (see [`pipeline`]).
//!
//! Modules are private; what the `coffer-appliance` binary, the benches and the tests use is
//! re-exported here. `pack` stays public: its byte format is a specification that the frozen
//! fixtures and the benches exercise directly.

mod access;
mod catalog;
mod clock;
mod crypto;
mod error;
pub mod faults;
#[cfg(test)]
mod fuzz_targets;
mod index;
mod maintenance;
pub mod metrics;
mod net;
pub mod pack;
pub mod pipeline;
mod reach;
mod repo;
mod shard;

pub use access::accounts::{hash_password, normalise_identity, MIN_PASSWORD_CHARS};
pub use access::admin;
pub use access::quota::human_bytes;
pub use access::rules::{Access, Rule, Target};
pub use access::ControlUser;
pub use catalog::policy::{self, Policy, PolicyTarget};
pub use catalog::{audit, Catalog, CatalogError, EnrollmentRecord, UserRecord};
pub use crypto::keys::{KdfParams, MasterKey};
pub use crypto::{Encryption, RecordCipher};
pub use error::{ApplianceError, IngestError, RepoError};
pub use index::need::NeedSet;
pub use index::{ChunkIndex, MemIndex, OpenMode, RocksIndex};
pub use maintenance::gc::{GcConfig, GcReport, Mark as GcMark};
pub use maintenance::retention::{self, Retention};
pub use maintenance::schedule::Schedule;
pub use maintenance::{
    affected, mark_damaged, rebuild_catalog, rebuild_index, verify, CatalogRebuilt, RebuildOutcome,
    VerifyReport,
};
pub use net::limits::LimitFlags;
pub use net::server::{serve, ServeOptions};
pub use net::tls::{self, TlsError, TlsIdentity};
pub use net::ServeError;
pub use pack::store::s3::{AckAfter, StorageConfig, TierOptions};
pub use repo::{
    create_dir_durable, write_file_durable, ChunkerParams, Mode, RepoConfig, RepoPaths, Sharding,
};
