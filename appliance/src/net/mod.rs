//! The network island (tokio): listeners, TLS, the admin socket, and the gRPC services.
//!
//! Owns: accepting connections ([`server`]), certificates ([`tls`]), the handlers ([`service`]).
//! Must never touch RocksDB indexes or pack files: handlers reach the shards through
//! [`crate::shard::Shards`] and the catalog through the blocking pool.

pub mod server;
pub mod service;
mod status;
pub mod tls;
