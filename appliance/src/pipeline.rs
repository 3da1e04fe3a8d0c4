//! The appliance's half of a backup, in order. This is the one place that spells the order of the
//! stages; each links to where it is implemented.
//!
//! 1. **need** — [`crate::net::service`] splits a `FindMissing` batch by shard
//!    ([`coffer_proto::ShardId::for_chunk`]); each shard answers from its index
//!    ([`crate::index::ChunkIndex::get_many`]). Chunks still waiting for their group commit count
//!    as missing: only durable chunks are ever reported present.
//! 2. **ingest** — `shard::ingest::put` verifies every chunk of a request (size limits, bounded
//!    zstd decompression, keyed BLAKE3 == claimed id) before any of it is queued, then dedupes
//!    against the index and against chunks in flight.
//! 3. **encrypt** and 4. **pack** — [`crate::pack::writer::PackWriter::write`] encrypts each
//!    queued chunk with its pack's AES-256-GCM key straight into an aligned buffer, writes it with
//!    one io_uring O_DIRECT write per group commit and `fdatasync`s.
//! 5. **index** — only after the fsync succeeded, the same call inserts the index entries; then
//!    every request waiting on that group commit is acknowledged.
//!
//! Rebuild path: [`crate::pack::recover::rebuild`] recreates step 5 from pack footers alone.
pub use crate::pack::recover::rebuild;
pub use crate::shard::spawn as spawn_shard;
