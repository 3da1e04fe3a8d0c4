//! Space accounting (issue 12, item 6): for each owner (an identity, or a host), the logical
//! bytes of its snapshots, the stored bytes only it references, and the stored bytes it shares
//! with other owners. Stored bytes are record bytes in packs (compressed, encrypted), each
//! distinct chunk counted once per owner.
//!
//! A count walks every snapshot of every owner (trees once per owner) over the GC's position
//! table (`gc::Mark`), with 4 bytes of owner state and 4 bytes of record length per chunk: about
//! 13 bytes per chunk in all. Owners' totals feed the quotas (`access::auth`).
//!
//! Owns: the count. Must never write anything.

use std::collections::BTreeMap;

use coffer_proto::{v1, ChunkId};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::ApplianceError;
use crate::maintenance::gc::Mark;
use crate::reach::Marker;
use crate::shard::Shards;

/// Whose usage a count reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum By {
    #[default]
    User,
    Host,
}

/// One owner's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerUsage {
    /// `user@host`, or the host.
    pub owner: String,
    pub snapshots: u64,
    /// Sum of the snapshots' file bytes, as their clients counted them.
    pub logical_bytes: u64,
    /// Stored bytes referenced by no other owner.
    pub only_bytes: u64,
    /// Stored bytes this owner references that other owners reference too.
    pub shared_bytes: u64,
}

impl OwnerUsage {
    /// What counts against a quota: every distinct stored byte the owner references.
    #[must_use]
    pub fn stored_bytes(&self) -> u64 {
        self.only_bytes + self.shared_bytes
    }
}

/// A whole count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub by: By,
    pub owners: Vec<OwnerUsage>,
    /// Record bytes of every chunk some snapshot references, counted once.
    pub referenced_bytes: u64,
}

const SHARED: u32 = u32::MAX;

/// The state value of the `k`-th owner (0 means nobody).
fn tag(k: usize) -> u32 {
    u32::try_from(k + 1).map_or(SHARED - 1, |t| t.min(SHARED - 1))
}

fn owner_of(s: &v1::Snapshot, by: By) -> String {
    match by {
        By::User => s.identity.clone(),
        By::Host => s
            .identity
            .split_once('@')
            .map_or_else(|| s.hostname.clone(), |(_, h)| h.to_string()),
    }
}

fn root(s: &v1::Snapshot) -> Result<ChunkId, ApplianceError> {
    ChunkId::from_slice(&s.root)
        .map_err(|e| ApplianceError::Internal(format!("a stored snapshot's root: {e}")))
}

/// Counts usage (on a blocking-pool thread; tree reads go through `shards`).
///
/// # Errors
/// Index and catalog errors; a snapshot that cannot be walked.
pub fn count(
    rt: &tokio::runtime::Handle,
    shards: &Shards,
    catalog: &Catalog,
    by: By,
) -> Result<UsageReport, ApplianceError> {
    let indexes: Vec<_> = shards.handles().iter().map(|h| h.index.clone()).collect();
    let refs: Vec<&dyn crate::index::ChunkIndex> = indexes.iter().map(AsRef::as_ref).collect();
    let mut lens: Vec<Vec<u32>> = vec![Vec::new(); refs.len()];
    let mark = Mark::build_with(&refs, &|_| true, &mut |s, e| lens[s].push(e.len))
        .map_err(|e| ApplianceError::Internal(format!("usage: reading the index: {e}")))?;
    let mut groups: BTreeMap<String, Vec<v1::Snapshot>> = BTreeMap::new();
    for s in catalog.snapshots()? {
        groups.entry(owner_of(&s, by)).or_default().push(s);
    }
    // Pass 1: who references each chunk (0: nobody, k + 1: owner k alone, SHARED).
    let mut state: Vec<Vec<u32>> = lens.iter().map(|l| vec![0; l.len()]).collect();
    for (k, snaps) in groups.values().enumerate() {
        let me = tag(k);
        let mut marker = Marker::new(shards.clone());
        for s in snaps {
            rt.block_on(marker.mark_from(root(s)?, &mut |id| {
                let (sh, run) = mark.positions(id);
                for i in run {
                    let st = &mut state[sh][i];
                    if *st == 0 {
                        *st = me;
                    } else if *st != me {
                        *st = SHARED;
                    }
                }
            }))?;
        }
    }
    // Pass 2: each owner's own and shared bytes (each chunk once per owner).
    let mut out = UsageReport {
        by,
        ..UsageReport::default()
    };
    for (sh, st) in state.iter().enumerate() {
        for (i, v) in st.iter().enumerate() {
            if *v != 0 {
                out.referenced_bytes += u64::from(lens[sh][i]);
            }
        }
    }
    for (k, (owner, snaps)) in groups.iter().enumerate() {
        let me = tag(k);
        let mut u = OwnerUsage {
            owner: owner.clone(),
            snapshots: snaps.len() as u64,
            logical_bytes: snaps
                .iter()
                .filter_map(|s| s.stats.as_ref())
                .map(|s| s.bytes)
                .sum(),
            ..OwnerUsage::default()
        };
        let mut seen: Vec<Vec<u64>> = st_bits(&state);
        let mut marker = Marker::new(shards.clone());
        for s in snaps {
            rt.block_on(marker.mark_from(root(s)?, &mut |id| {
                let (sh, run) = mark.positions(id);
                for i in run {
                    let bit = 1u64 << (i % 64);
                    if seen[sh][i / 64] & bit != 0 {
                        continue;
                    }
                    seen[sh][i / 64] |= bit;
                    let len = u64::from(lens[sh][i]);
                    match state[sh][i] {
                        v if v == me => u.only_bytes += len,
                        SHARED => u.shared_bytes += len,
                        _ => {}
                    }
                }
            }))?;
        }
        out.owners.push(u);
    }
    Ok(out)
}

/// An all-clear bitmap per shard as long as its state table.
fn st_bits(state: &[Vec<u32>]) -> Vec<Vec<u64>> {
    state
        .iter()
        .map(|s| vec![0; s.len().div_ceil(64)])
        .collect()
}
