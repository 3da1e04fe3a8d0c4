//! Where pack bytes live: the [`PackStore`] seam.
//!
//! Owns: creating, appending to, reading and discarding packs. The local store ([`LocalStore`]:
//! O_DIRECT files under `<repo>/packs/`, glommio/io_uring) is the first implementation; an
//! S3-compatible store and a fault-injecting store for crash tests plug in behind the same trait.
//!
//! Invariants every store keeps:
//! * [`PackSink::append`] returns only once the appended bytes are durable (and, on the first
//!   append, the pack's name too); nothing is acknowledged before.
//! * Bytes once appended are never rewritten with other content: what a reader saw stays valid.
//! * A failed append leaves the pack's durable prefix intact; the writer then poisons the pack.
//!
//! Must never decide what goes into a pack (records, footers: [`super::writer`]) nor touch the
//! index.

pub mod local;
pub mod objectlock;
pub mod s3;

use std::ops::Deref;

use coffer_proto::PackId;

pub use local::LocalStore;

/// A store operation that failed: which step, and the system's error (its kind tells a full
/// disk apart).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StoreError {
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl StoreError {
    pub(crate) fn new(what: &'static str, source: impl Into<std::io::Error>) -> Self {
        Self {
            what,
            source: source.into(),
        }
    }
}

/// Where a shard's packs live. Used from the shard's own glommio executor only, so its futures
/// need not be `Send`.
#[allow(async_fn_in_trait)] // single-threaded executors: no `Send` bound is wanted on these futures
pub trait PackStore: std::fmt::Debug {
    /// A pack being written.
    type Sink: PackSink;
    /// Bytes read back.
    type Read: Deref<Target = [u8]>;

    /// Creates pack `id` whose first bytes will be `header` (written with the first append).
    ///
    /// # Errors
    /// The pack cannot be created or its name made durable.
    async fn create(&self, id: &PackId, header: &[u8]) -> Result<Self::Sink, StoreError>;

    /// Reads `len` bytes at `offset` of pack `id` (fewer only past its end).
    ///
    /// # Errors
    /// The pack cannot be opened or read.
    async fn read_at(&self, id: &PackId, offset: u64, len: usize)
        -> Result<Self::Read, StoreError>;

    /// Whether every group commit must seal its pack (a store that can only confirm whole
    /// objects, such as an object store acknowledging after upload).
    fn seals_every_commit(&self) -> bool {
        false
    }

    /// Removes a pack nothing was acknowledged from (an empty pack at shutdown).
    ///
    /// # Errors
    /// The pack cannot be removed.
    fn discard(&self, id: &PackId) -> Result<(), StoreError>;

    /// Deletes a sealed pack the GC emptied or compacted, durably (its name is gone after a
    /// crash). A pack that is already gone is not an error: a run repeated after a crash deletes
    /// again. Readers of it that are in flight may fail; the shard's read path then looks the
    /// chunk up again.
    ///
    /// # Errors
    /// The pack cannot be removed or the removal made durable.
    fn delete(&self, id: &PackId) -> Result<(), StoreError>;

    /// Fails (`StorageFull`) when `need` more bytes would leave the store's reserve short.
    ///
    /// # Errors
    /// `StorageFull` saying how much is free, needed and kept.
    fn check_space(&self, need: u64) -> Result<(), StoreError>;
}

/// A pack being written: append-only, durable on return.
#[allow(async_fn_in_trait)] // as for `PackStore`
pub trait PackSink {
    /// The pack's logical length: every byte appended so far, header included.
    fn len(&self) -> u64;

    /// Whether nothing was appended yet (the header alone).
    fn is_empty(&self) -> bool;

    /// Appends `len` bytes, which `fill` writes straight into the store's own buffer (records
    /// are encrypted in place there, never copied), and makes them durable. With `last`, these
    /// are the pack's final bytes.
    ///
    /// # Errors
    /// A write, truncate or sync that failed or was short (a full disk reads as `StorageFull`).
    async fn append(
        &mut self,
        len: usize,
        last: bool,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), StoreError>;
}
