//! Maintenance of a repository at rest or beside a running appliance: [`verify`] (invariants I1,
//! I2, I5), [`rebuild`] (the index from pack footers alone, the catalog from its journal),
//! [`retention`] (which snapshots a policy keeps), [`forget`], [`gc`] (mark, barrier, sweep,
//! compaction) and [`usage`] (space per owner).
//!
//! Owns: whole-repository passes, which report every problem they meet and never present a
//! partial result as complete. Must never serve requests, nor write an index a running shard has
//! open (rebuild builds a new one beside it and swaps it in only when complete).

pub mod forget;
pub mod gc;
mod rebuild;
pub mod retention;
pub mod schedule;
pub mod usage;
mod verify;

pub use rebuild::{rebuild_catalog, rebuild_index, CatalogRebuilt, RebuildOutcome};
pub use verify::{affected, mark_damaged, verify, VerifyReport};
