//! The backup stages, one file each, in the order the data flows through them:
//! `walk -> read -> chunk -> hash -> need -> upload`.
//!
//! * [`walk`]: parallel stat of the tree; what each directory holds, which files to read.
//! * [`read`]: reader threads fill buffers of a fixed [`pool`] with small files (many to a
//!   buffer) and extents of big ones, then cut ([`chunk`]) and hash ([`hash`]) them while the
//!   bytes are hot. [`contents`] gathers what they produced into each file's chunk list, merging a
//!   big file's extents back into its sequential chunking.
//! * [`need`]: asks the appliance which chunks of a batch it lacks (`FindMissing`).
//! * [`upload`]: batches chunks, sends only the needed ones (`PutChunks`, compressed when it
//!   helps), a few batches in flight while reading goes on.
//!
//! Each stage does one step and knows nothing of the others' order: `crate::pipeline` is the one
//! place that wires them. Must never touch: snapshots and their commit (`crate::snapshot`), the
//! user's terminal (the stages only count into [`Progress`]), or anything of a restore.

pub mod chunk;
pub mod contents;
pub mod hash;
pub mod need;
pub mod pool;
pub mod read;
pub mod upload;
pub mod walk;

use std::sync::atomic::AtomicU64;

/// Live counters of a running backup (the CLI renders them; the library never prints).
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_uploaded: AtomicU64,
}
