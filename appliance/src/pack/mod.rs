//! Pack files: the only place chunk bytes live.
//!
//! Invariants this module enforces:
//! * A record is written once and never modified; a sealed pack (footer + trailer present) is
//!   immutable.
//! * [`writer::PackWriter::write`] returns only after the records' bytes are fsynced, and inserts
//!   their index entries only after that (durability rule 1).
//! * A pack whose write or fsync failed is poisoned: the writer drops it and never appends to it
//!   again (rule 3). Its records are never acknowledged.
//! * Every record carries its chunk id, and the footer lists every record, so the index can be
//!   rebuilt from packs alone ([`recover`]).

pub mod format;
pub mod read;
pub mod recover;
pub mod store;
pub mod writer;
