//! The network island (tokio): listeners, TLS, the admin socket, and the gRPC services.
//!
//! Owns: starting and stopping the appliance ([`server`]), listening sockets and the TLS accept
//! loop (`listen`), the admin socket (`admin_socket`), certificates ([`tls`]), the handlers
//! ([`service`]) and the one mapping from errors to gRPC status codes (`status`). Must never
//! touch RocksDB indexes or pack files: handlers reach the shards through
//! [`crate::shard::Shards`], trees through [`crate::reach`], and the catalog through the
//! blocking pool.

mod admin_socket;
pub mod budget;
pub mod calls;
pub mod limits;
mod listen;
mod metrics_http;
pub mod server;
pub mod service;
mod status;
pub mod tls;
mod ui;

use crate::error::{ApplianceError, RepoError};

/// Why the appliance could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Plan(#[from] coffer_tuning::PlanError),
    #[error(transparent)]
    Shard(#[from] crate::shard::ShardError),
    #[error(transparent)]
    Accounts(#[from] ApplianceError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A setting or situation that forbids serving, with what to do about it.
    #[error("{0}")]
    Refused(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl ServeError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
