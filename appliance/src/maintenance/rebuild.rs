//! `rebuild-index`: every shard index recreated from the pack footers alone; `rebuild-catalog`:
//! the catalog from its journal in the packs.

/// What `rebuild-catalog` restored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogRebuilt {
    pub users: usize,
    pub snapshots: usize,
    pub rules: usize,
    pub policies: usize,
    /// Journal segment replayed and the changes after its checkpoint.
    pub segment: u64,
    pub changes: u64,
    /// Bytes of a last write cut short by a crash (never acknowledged), ignored.
    pub torn_bytes: u64,
}

/// Recreates `catalog/` from the catalog journal in the packs (`catalog::journal`): every
/// snapshot, account, rule, policy and setting as of the appliance's last acknowledged change
/// (changes made offline since its last start are not in the journal).
///
/// # Errors
/// A `catalog/` that exists (it is never overwritten: move it aside first), no journal, a
/// journal that does not open with this key, catalog errors.
pub fn rebuild_catalog(
    paths: &crate::repo::RepoPaths,
    master: &crate::crypto::keys::MasterKey,
) -> Result<CatalogRebuilt, crate::error::ApplianceError> {
    use crate::error::ApplianceError;
    let cfg = paths
        .load_config()
        .map_err(|e| ApplianceError::FailedPrecondition(e.to_string()))?;
    let target = paths.catalog();
    if target.exists() {
        return Err(ApplianceError::FailedPrecondition(format!(
            "{} exists; rebuild-catalog never overwrites a catalog: stop the appliance and move it \
             aside first",
            target.display()
        )));
    }
    let r = crate::catalog::journal::replay(paths, master, cfg.id)
        .map_err(|e| ApplianceError::FailedPrecondition(e.to_string()))?;
    // Built beside and renamed into place: a crash half-way leaves no `catalog/` that a start
    // would take for the truth (and checkpoint over the journal).
    let tmp = paths.root.join("catalog.rebuilding");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| {
            ApplianceError::Internal(format!(
                "removing {} left by an interrupted rebuild: {e}",
                tmp.display()
            ))
        })?;
    }
    {
        let catalog = crate::catalog::Catalog::open(&tmp, true)?;
        catalog.restore(&r.state)?;
    }
    let io = |e: std::io::Error| {
        ApplianceError::Internal(format!("moving the rebuilt catalog into place: {e}"))
    };
    std::fs::rename(&tmp, &target).map_err(io)?;
    crate::repo::sync_dir(&paths.root).map_err(io)?;
    let count = |p: &[u8]| r.state.keys().filter(|k| k.starts_with(p)).count();
    Ok(CatalogRebuilt {
        users: count(b"user/"),
        snapshots: count(b"snap/"),
        rules: count(b"acl/"),
        policies: count(b"policy/"),
        segment: r.segment,
        changes: r.changes,
        torn_bytes: r.torn_bytes,
    })
}

use std::path::PathBuf;

use crate::crypto::keys::MasterKey;
use crate::error::RepoError;
use crate::index::{ChunkIndex, OpenMode, RocksIndex};
use crate::pack::recover::{rebuild, RebuildStats};
use crate::pack::PackFileError;
use crate::repo::RepoPaths;

/// What a rebuild did.
#[derive(Debug)]
pub struct RebuildOutcome {
    pub stats: RebuildStats,
    /// Where the previous index was moved, if there was one.
    pub previous: Option<PathBuf>,
}

/// Why a rebuild stopped; the previous index, if any, is untouched.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("rebuild aborted (the previous index is untouched): {0}")]
    Pack(#[from] PackFileError),
}

fn io(what: &str, e: std::io::Error) -> RepoError {
    RepoError::Io(what.to_string(), e)
}

/// Builds new shard indexes from the packs in `index.rebuild/`, then moves the old index aside
/// (`index.old-<unix time>`) and the new one in place. An interrupted rebuild leaves the old
/// index where it was.
///
/// # Errors
/// Listing, reading, sealing or indexing failures; renames.
pub fn rebuild_index(
    paths: &RepoPaths,
    master: &MasterKey,
) -> Result<RebuildOutcome, RebuildError> {
    let cfg = paths.load_config()?;
    let tmp = paths.root.join("index.rebuild");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io("removing an earlier index.rebuild", e))?;
    }
    let indexes: Vec<RocksIndex> = (0..cfg.shards)
        .map(|s| RocksIndex::open(&tmp.join(format!("shard-{s}")), OpenMode::Create, 64 << 20))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&dyn ChunkIndex> = indexes.iter().map(|i| i as &dyn ChunkIndex).collect();
    let stats = rebuild(paths, master, &refs)?;
    drop(refs);
    drop(indexes);
    let mut previous = None;
    if paths.index().exists() {
        let aside = paths
            .root
            .join(format!("index.old-{}", coffer_proto::now_us() / 1_000_000));
        std::fs::rename(paths.index(), &aside).map_err(|e| io("moving the old index aside", e))?;
        previous = Some(aside);
    }
    std::fs::rename(&tmp, paths.index()).map_err(|e| io("moving the new index in place", e))?;
    crate::repo::sync_dir(&paths.root).map_err(|e| io("syncing the repository directory", e))?;
    Ok(RebuildOutcome { stats, previous })
}
