//! Snapshots as the client sees them: tree objects ([`tree`]: encode, decode and check), reading
//! them back ([`fetch`]) and keeping them locally ([`cache`]), the parent snapshot whose
//! unchanged files are not read again ([`parent`]), what changed between two snapshots
//! ([`diff`]), and the end of a backup: trees, then the commit point ([`commit`]).
//!
//! Must never touch: the files being backed up or restored (it sees the walk's results and
//! hands trees to the caller), the order of the backup stages (`crate::pipeline`), or a tree it
//! has not checked ([`tree::decode_checked`] before any use).

pub mod cache;
pub mod commit;
pub mod diff;
pub mod fetch;
pub mod parent;
pub mod seen;
pub mod tree;

pub use cache::TreeCache;
pub use diff::{diff, Change};
pub use fetch::{fetch_tree, fetch_trees, node_chunk_ids};
pub use tree::{FileContent, TreeError};
