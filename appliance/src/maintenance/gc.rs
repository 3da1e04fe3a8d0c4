//! Garbage collection while backups run: mark, a short barrier that condemns, then pack deletion
//! and compaction. The rules (G1–G10) are in `docs/maintenance.md`; the code cites them.
//!
//! A run, on one blocking-pool thread (shard calls are driven with `block_on`):
//! 1. **Candidates** (G6, G8): packs whose file was last written before the run's start minus the
//!    grace window, and not poisoned. Only index entries pointing into them may be collected;
//!    everything newer is kept whole. A shard's open pack may be a candidate (its records are
//!    old) but is never deleted or compacted.
//! 2. **Mark** (G1, G9): every snapshot in the catalog is walked ([`Marker`]) into a bitmap per
//!    shard over the candidates' positions in index order ([`Table`]). Snapshots committed
//!    meanwhile are walked too, until a pass finds none.
//! 3. **List** the unmarked candidates (a scan outside any lock).
//! 4. **Barrier** (G3, G4, G5): with the [`Gate`] held for writing — no `FindMissing`,
//!    `PutChunks`, proof, open or commit is between its lookup and its effect — the catalog is
//!    read once more and every live session's uploaded, proved, answered-present and opened
//!    chunks are marked; what is still unmarked is removed from each shard's index and need set
//!    in one step, and the gate's generation moves on so that a commit or open checked before
//!    is checked again.
//! 5. **Packs** (G7, G8): a candidate pack no entry points into is deleted; one whose dead share
//!    exceeds the threshold has its live records copied into the shard's open pack (durable and
//!    indexed first) and is deleted once no entry points into it.
//!
//! Any error before step 4 ends the run with nothing changed (G10). A crash anywhere leaves a
//! state the next run completes: entries are removed only after their chunk is unreachable, and
//! a pack is deleted only when the index no longer points into it.
//!
//! Owns: the run and its report. Must never delete an entry a snapshot or a live session can
//! reach, nor a pack an entry points into.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, UNIX_EPOCH};

use coffer_proto::{ChunkId, PackId, SnapshotId};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{ApplianceError, RepoError};
use crate::faults::point;
use crate::index::{ChunkIndex, META_OPEN_PACK, META_POISONED};
use crate::pack::format::PACK_HEADER_LEN;
use crate::pack::store::s3::Tier;
use crate::reach::Marker;
use crate::repo::RepoPaths;
use crate::shard::Shards;

mod objectlock;

/// Default grace window: chunks in packs written within it are never collected (G6).
pub const DEFAULT_GRACE_US: i64 = 24 * 3600 * 1_000_000;
/// Default dead share above which a pack is compacted (G7).
pub const DEFAULT_COMPACT_ABOVE: f64 = 0.25;
/// Entries removed per index batch.
const CONDEMN_BATCH: usize = 16_384;
/// Records copied per compaction request (bounded by the shard's ingest budget too).
const REWRITE_BATCH: usize = 512;

/// How a run collects.
#[derive(Debug, Clone, Copy)]
pub struct GcConfig {
    /// Microseconds before the run's start within which written chunks are kept.
    pub grace_us: i64,
    /// Dead share (0..1) above which a pack is compacted.
    pub compact_above: f64,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            grace_us: DEFAULT_GRACE_US,
            compact_above: DEFAULT_COMPACT_ABOVE,
        }
    }
}

/// The gate between the GC's barrier and the calls that turn an index lookup into something a
/// session may later reference (G3, G4). Those calls hold it for reading; the barrier holds it
/// for writing, and moves the generation on when it removed anything.
#[derive(Debug, Default)]
pub struct Gate {
    lock: tokio::sync::RwLock<()>,
    generation: AtomicU64,
}

impl Gate {
    /// Held by `FindMissing`, `PutChunks` (proofs included), and the last step of opens and
    /// commits.
    pub async fn enter(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.lock.read().await
    }

    /// How many barriers removed chunks so far. A commit or open whose walk started at another
    /// generation must be checked again: what it relied on may be gone.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// What live sessions hold (G3): read under the barrier.
pub trait Pins: Send + Sync {
    /// Reports every chunk some live session uploaded, proved, was answered "present" for, or
    /// reaches through a snapshot it opened.
    fn pinned(&self, mark: &mut dyn FnMut(&ChunkId));
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Index entries old enough to collect (in candidate packs).
    pub candidates: u64,
    /// Candidates found reachable.
    pub marked: u64,
    /// Trees and list chunks read by the mark.
    pub trees_read: u64,
    /// Entries removed (dry: that would be).
    pub condemned: u64,
    /// Record bytes of those entries.
    pub condemned_bytes: u64,
    pub packs_deleted: u64,
    pub packs_compacted: u64,
    /// Packs left alone because the bucket retains them (S3 Object Lock) until a later date.
    #[serde(default)]
    pub packs_retained: u64,
    /// Live records copied by compaction, and their bytes.
    pub records_moved: u64,
    pub bytes_moved: u64,
    /// Pack bytes deleted from disk.
    pub bytes_deleted: u64,
    /// Seconds spent in the mark, and with the gate held.
    pub mark_seconds: f64,
    pub barrier_seconds: f64,
}

/// Positions of one shard's candidate entries, in index order, and the mark bitmap over them.
///
/// An id is looked up by the first 64 bits of its id (its *key*): the top `bits` choose a bucket
/// (`dir` holds where each bucket starts), and the next 32 bits are stored (`subs`, 4 bytes per
/// entry). With about 8 entries per bucket that is 4.6 bytes per candidate plus 1 bit of mark.
/// Ids whose stored bits agree are marked together: the mark may only ever keep more.
#[derive(Debug)]
struct Table {
    bits: u32,
    dir: Vec<u32>,
    subs: Vec<u32>,
    marks: Vec<u64>,
    /// Build state: the previous key (entries must arrive in key order).
    last: Option<u64>,
}

fn prefix(id: &ChunkId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.as_bytes()[..8]);
    u64::from_be_bytes(b)
}

impl Table {
    /// An empty table sized for about `expected` entries.
    fn new(expected: u64) -> Self {
        let bits = (expected / 8).max(2).ilog2().clamp(1, 28);
        Self {
            bits,
            dir: Vec::with_capacity((1 << bits) + 1),
            subs: Vec::with_capacity(usize::try_from(expected).unwrap_or(0).min(1 << 32)),
            marks: Vec::new(),
            last: None,
        }
    }

    fn bucket(&self, key: u64) -> usize {
        usize::try_from(key >> (64 - self.bits)).expect("bits <= 28")
    }

    fn sub(&self, key: u64) -> u32 {
        u32::try_from((key << self.bits) >> 32).expect("32 bits")
    }

    /// Adds the next candidate (keys in ascending order).
    fn push(&mut self, key: u64) -> Result<(), RepoError> {
        if self.last.is_some_and(|l| key < l) {
            return Err(RepoError::Index(
                "the index did not list its entries in key order".into(),
            ));
        }
        self.last = Some(key);
        let b = self.bucket(key);
        let at = u32::try_from(self.subs.len())
            .map_err(|_| RepoError::Index("more than 2^32 entries in one shard".into()))?;
        while self.dir.len() <= b {
            self.dir.push(at);
        }
        self.subs.push(self.sub(key));
        Ok(())
    }

    fn seal(&mut self) {
        let end = u32::try_from(self.subs.len()).expect("checked in push");
        while self.dir.len() <= 1 << self.bits {
            self.dir.push(end);
        }
        self.subs.shrink_to_fit();
        self.marks = vec![0; self.subs.len().div_ceil(64)];
    }

    fn run(&self, id: &ChunkId) -> std::ops::Range<usize> {
        let key = prefix(id);
        let b = self.bucket(key);
        let (lo, hi) = (self.dir[b] as usize, self.dir[b + 1] as usize);
        let s = self.sub(key);
        let bucket = &self.subs[lo..hi];
        let start = bucket.partition_point(|x| *x < s);
        let len = bucket[start..].iter().take_while(|x| **x == s).count();
        lo + start..lo + start + len
    }

    fn mark(&mut self, id: &ChunkId) {
        for i in self.run(id) {
            self.marks[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether `id` is a candidate that nothing marked. An id that is not in the table (an
    /// entry added after it was built, e.g. into an open pack) is never dead.
    fn dead(&self, id: &ChunkId) -> bool {
        let mut run = self.run(id);
        !run.is_empty() && run.all(|i| self.marks[i / 64] & (1 << (i % 64)) == 0)
    }

    fn count_marked(&self) -> u64 {
        self.marks.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn len(&self) -> u64 {
        self.subs.len() as u64
    }

    /// Bytes this table holds (for the report and `docs/PERFORMANCE.md`).
    fn bytes(&self) -> usize {
        self.subs.capacity() * 4 + self.dir.capacity() * 4 + self.marks.capacity() * 8
    }
}

/// The mark of one run: one [`Table`] per shard.
#[derive(Debug)]
pub struct Mark {
    tables: Vec<Table>,
    count: u16,
}

impl Mark {
    fn shard(&self, id: &ChunkId) -> usize {
        coffer_proto::ShardId::for_chunk(id, self.count).index()
    }

    /// Marks `id` reachable (no-op for an id that is not a candidate).
    pub fn mark(&mut self, id: &ChunkId) {
        let s = self.shard(id);
        self.tables[s].mark(id);
    }

    /// The shard of `id` and its positions there (empty when it is not in the table).
    #[must_use]
    pub fn positions(&self, id: &ChunkId) -> (usize, std::ops::Range<usize>) {
        let s = self.shard(id);
        (s, self.tables[s].run(id))
    }

    /// Whether `id` is a candidate nothing marked (see [`Table::dead`]).
    #[must_use]
    pub fn dead(&self, id: &ChunkId) -> bool {
        self.tables[self.shard(id)].dead(id)
    }

    /// Memory the mark holds.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.tables.iter().map(Table::bytes).sum()
    }

    /// Builds the tables from each shard's candidate entries (`candidate` decides by pack).
    ///
    /// # Errors
    /// Index scan errors.
    pub fn build(
        indexes: &[&dyn ChunkIndex],
        candidate: &dyn Fn(&PackId) -> bool,
    ) -> Result<Self, RepoError> {
        Self::build_with(indexes, candidate, &mut |_, _| {})
    }

    /// [`Self::build`], calling `each(shard, entry)` for every candidate in position order (the
    /// usage count keeps each record's length beside its position).
    ///
    /// # Errors
    /// Index scan errors.
    pub fn build_with(
        indexes: &[&dyn ChunkIndex],
        candidate: &dyn Fn(&PackId) -> bool,
        each: &mut dyn FnMut(usize, &crate::pack::format::IndexEntry),
    ) -> Result<Self, RepoError> {
        let mut tables = Vec::with_capacity(indexes.len());
        for (s, idx) in indexes.iter().enumerate() {
            let mut t = Table::new(idx.approximate_len()?);
            idx.scan(&mut |id, e| {
                if candidate(&e.pack) {
                    t.push(prefix(id))?;
                    each(s, e);
                }
                Ok(())
            })?;
            t.seal();
            tables.push(t);
        }
        let count = u16::try_from(indexes.len()).map_err(|_| RepoError::Index("shards".into()))?;
        Ok(Self { tables, count })
    }

    /// Candidates, and how many are marked.
    #[must_use]
    pub fn counts(&self) -> (u64, u64) {
        (
            self.tables.iter().map(Table::len).sum(),
            self.tables.iter().map(Table::count_marked).sum(),
        )
    }
}

/// A pack old enough to collect from.
#[derive(Debug, Clone, Copy)]
struct PackFile {
    len: u64,
    /// A shard's open pack: its records may be collected (they were all written before the
    /// cutoff), the file is neither deleted nor compacted while it may still grow.
    open: bool,
}

/// One unmarked candidate: a chunk no root reached when the list was made.
#[derive(Debug, Clone, Copy)]
struct Dead {
    id: ChunkId,
    len: u32,
}

/// The appliance's collector: one run at a time.
pub struct Collector {
    shards: Shards,
    catalog: Arc<Catalog>,
    pins: Arc<dyn Pins>,
    gate: Arc<Gate>,
    paths: RepoPaths,
    cfg: GcConfig,
    running: Mutex<()>,
    /// Locked snapshots whose packs the bucket retains, and until when (`objectlock`).
    locks_done: Mutex<HashMap<SnapshotId, i64>>,
    /// The repository files' retention: until when it was last set, and whether a snapshot
    /// was done since (its lock is in a newer journal version).
    repo_retained: Mutex<(i64, bool)>,
    /// The object store behind the local packs: its packs are candidates too, and deleted there
    /// after the local copy.
    tier: Option<Arc<Tier>>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn internal(what: &str) -> impl Fn(RepoError) -> ApplianceError + '_ {
    move |e| ApplianceError::Internal(format!("garbage collection, {what}: {e}"))
}

impl Collector {
    #[must_use]
    pub fn new(
        shards: Shards,
        catalog: Arc<Catalog>,
        pins: Arc<dyn Pins>,
        gate: Arc<Gate>,
        paths: RepoPaths,
        cfg: GcConfig,
    ) -> Self {
        Self {
            shards,
            catalog,
            pins,
            gate,
            paths,
            cfg,
            running: Mutex::new(()),
            locks_done: Mutex::new(HashMap::new()),
            repo_retained: Mutex::new((0, false)),
            tier: None,
        }
    }

    /// The same collector for a repository whose packs live in an object store.
    #[must_use]
    pub fn with_tier(mut self, tier: Option<Arc<Tier>>) -> Self {
        self.tier = tier;
        self
    }

    /// Counts space per owner (see [`crate::maintenance::usage`]); not beside a running
    /// collection (they would share the two cores for nothing).
    ///
    /// # Errors
    /// As [`crate::maintenance::usage::count`].
    pub fn usage(
        &self,
        rt: &tokio::runtime::Handle,
        by: crate::maintenance::usage::By,
    ) -> Result<crate::maintenance::usage::UsageReport, ApplianceError> {
        let _one = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        crate::maintenance::usage::count(rt, &self.shards, &self.catalog, by)
    }

    fn indexes(&self) -> Vec<Arc<dyn ChunkIndex>> {
        self.shards
            .handles()
            .iter()
            .map(|h| h.index.clone())
            .collect()
    }

    /// Packs some shard has open, and packs poisoned by a failed write (sealed at the next
    /// start; never candidates until then).
    fn busy_packs(&self) -> Result<(HashSet<PackId>, HashSet<PackId>), ApplianceError> {
        let (mut open, mut poisoned) = (HashSet::new(), HashSet::new());
        for idx in self.indexes() {
            let err = internal("reading the open packs");
            if let Some(v) = idx.get_meta(META_OPEN_PACK).map_err(&err)? {
                if let Ok(id) = PackId::from_slice(&v) {
                    open.insert(id);
                }
            }
            if let Some(v) = idx.get_meta(META_POISONED).map_err(&err)? {
                for c in v.chunks_exact(16) {
                    if let Ok(id) = PackId::from_slice(c) {
                        poisoned.insert(id);
                    }
                }
            }
        }
        Ok((open, poisoned))
    }

    /// Step 1: the candidate packs (last written before `cutoff_us`, not poisoned). A pack's
    /// modification time is its newest record's: every record of a candidate is older than the
    /// cutoff.
    fn candidate_packs(&self, cutoff_us: i64) -> Result<HashMap<PackId, PackFile>, ApplianceError> {
        let (open, poisoned) = self.busy_packs()?;
        let io = |e: std::io::Error| {
            ApplianceError::Internal(format!("garbage collection, listing packs: {e}"))
        };
        let mut out = HashMap::new();
        for (id, path) in self.paths.list_packs().map_err(io)? {
            if poisoned.contains(&id) {
                continue;
            }
            let md = match std::fs::metadata(&path) {
                Ok(md) => md,
                // Dropped from the object store's local cache meanwhile: listed from the bucket
                // below.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.tier.is_some() => {
                    continue
                }
                Err(e) => return Err(io(e)),
            };
            let written = md
                .modified()
                .map_err(io)?
                .duration_since(UNIX_EPOCH)
                .map_or(i64::MAX, |d| {
                    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
                });
            if written < cutoff_us {
                out.insert(
                    id,
                    PackFile {
                        len: md.len(),
                        open: open.contains(&id),
                    },
                );
            }
        }
        if let Some(t) = &self.tier {
            // Packs only in the bucket (dropped from the local cache). A listing error ends the
            // run with nothing changed (G10). The object's time is its upload's, never earlier
            // than its last record.
            let remote = t.list_remote().map_err(|e| {
                ApplianceError::Internal(format!("garbage collection, listing the bucket: {e}"))
            })?;
            let busy = t.busy();
            for (id, size, modified_us) in remote {
                if poisoned.contains(&id) || busy.contains(&id) || modified_us >= cutoff_us {
                    continue;
                }
                if self.paths.pack(&id).exists() {
                    continue;
                }
                out.insert(
                    id,
                    PackFile {
                        len: size,
                        open: open.contains(&id),
                    },
                );
            }
        }
        Ok(out)
    }

    /// Step 2's walks: every snapshot not walked yet (and not `exclude`d); answers how many.
    fn mark_snapshots(
        &self,
        rt: &tokio::runtime::Handle,
        marker: &mut Marker,
        mark: &mut Mark,
        walked: &mut HashSet<SnapshotId>,
        exclude: &HashSet<SnapshotId>,
    ) -> Result<usize, ApplianceError> {
        let mut n = 0;
        for s in self.catalog.snapshots()? {
            let id = SnapshotId::from_slice(&s.id)
                .map_err(|e| ApplianceError::Internal(format!("a stored snapshot's id: {e}")))?;
            if exclude.contains(&id) || !walked.insert(id) {
                continue;
            }
            let root = ChunkId::from_slice(&s.root).map_err(|e| {
                ApplianceError::Internal(format!("snapshot {id}: its root is not an id: {e}"))
            })?;
            rt.block_on(marker.mark_from(root, &mut |c| mark.mark(c)))
                .map_err(|e| {
                    ApplianceError::FailedPrecondition(format!(
                        "garbage collection stopped before removing anything: snapshot {id} \
                         cannot be walked ({e}); run `coffer-appliance verify`"
                    ))
                })?;
            point("gc.mark-snapshot");
            n += 1;
        }
        Ok(n)
    }

    /// Step 3: every candidate not marked, per shard.
    fn list_dead(
        indexes: &[Arc<dyn ChunkIndex>],
        packs: &HashMap<PackId, PackFile>,
        mark: &Mark,
    ) -> Result<Vec<Vec<Dead>>, ApplianceError> {
        let mut out = Vec::with_capacity(indexes.len());
        for idx in indexes {
            let mut dead = Vec::new();
            idx.scan(&mut |id, e| {
                if packs.contains_key(&e.pack) && mark.dead(id) {
                    dead.push(Dead {
                        id: *id,
                        len: e.len,
                    });
                }
                Ok(())
            })
            .map_err(internal("listing unreachable chunks"))?;
            out.push(dead);
        }
        Ok(out)
    }

    /// Runs one collection (after forgetting, see `admin`). With `dry_run` nothing changes and
    /// the snapshots in `exclude` (those retention would forget) count as gone.
    ///
    /// # Errors
    /// `FailedPrecondition` when a snapshot cannot be walked (nothing is removed then); index,
    /// catalog and storage errors. A run that fails after its barrier has removed what it
    /// removed; the next run completes it.
    pub fn run(
        &self,
        rt: &tokio::runtime::Handle,
        dry_run: bool,
        exclude: &HashSet<SnapshotId>,
    ) -> Result<GcReport, ApplianceError> {
        let _one = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        point("gc.start");
        if !dry_run {
            // Open packs hold records like any other; sealed, they can be compacted or deleted.
            for h in self.shards.handles() {
                rt.block_on(h.seal())?;
            }
            point("gc.sealed");
        }
        if let Some(t) = &self.tier {
            // Staged packs are never deleted (they are busy): let them reach the bucket first,
            // so that this run can collect from them. Failing that, nothing changes.
            t.flush(std::time::Duration::from_mins(10))
                .map_err(|e| ApplianceError::Unavailable(format!("garbage collection: {e}")))?;
            if !dry_run {
                // Locks applied before packs are chosen; a failure here only delays them: the
                // retention check below is what keeps a retained pack.
                if let Err(e) = self.lock_pass(rt) {
                    tracing::warn!(error = %e, "gc: applying snapshot locks to the bucket");
                }
            }
        }
        // Taken after the seals, so that with a grace of 0 the packs they closed are candidates
        // (with a longer grace, a pack sealed now becomes one at a later run: sealing rewrote
        // its modification time).
        let start_us = coffer_proto::now_us();
        let packs = self.candidate_packs(start_us.saturating_sub(self.cfg.grace_us))?;
        let indexes = self.indexes();
        let t_mark = Instant::now();
        let refs: Vec<&dyn ChunkIndex> = indexes.iter().map(AsRef::as_ref).collect();
        let mut mark = Mark::build(&refs, &|p| packs.contains_key(p))
            .map_err(internal("reading the index"))?;
        point("gc.tables");
        let mut marker = Marker::new(self.shards.clone());
        let mut walked = HashSet::new();
        self.mark_snapshots(rt, &mut marker, &mut mark, &mut walked, exclude)?;
        point("gc.marked");
        // G1: snapshots committed while the mark ran are roots too.
        for _ in 0..3 {
            if self.mark_snapshots(rt, &mut marker, &mut mark, &mut walked, exclude)? == 0 {
                break;
            }
        }
        report.mark_seconds = t_mark.elapsed().as_secs_f64();
        let mut dead = Self::list_dead(&indexes, &packs, &mark)?;
        point("gc.listed");
        if dry_run {
            self.pins.pinned(&mut |c| mark.mark(c));
            for d in dead.iter().flatten().filter(|d| mark.dead(&d.id)) {
                report.condemned += 1;
                report.condemned_bytes += u64::from(d.len);
            }
        } else {
            let t_barrier = Instant::now();
            let gate = rt.block_on(self.gate.lock.write());
            point("gc.barrier");
            self.mark_snapshots(rt, &mut marker, &mut mark, &mut walked, exclude)?;
            self.pins.pinned(&mut |c| mark.mark(c));
            point("gc.pins");
            let mut removed = false;
            for (shard, list) in dead.iter_mut().enumerate() {
                list.retain(|d| mark.dead(&d.id));
                for part in list.chunks(CONDEMN_BATCH) {
                    let ids = part.iter().map(|d| d.id).collect();
                    // Moved on before the first removal: a commit checked against the old state
                    // cannot land after it (G4).
                    self.gate.generation.fetch_add(1, Ordering::SeqCst);
                    removed = true;
                    rt.block_on(self.shards.handles()[shard].condemn(ids))?;
                    report.condemned += part.len() as u64;
                    report.condemned_bytes += part.iter().map(|d| u64::from(d.len)).sum::<u64>();
                    point("gc.condemned-batch");
                }
            }
            drop(gate);
            report.barrier_seconds = t_barrier.elapsed().as_secs_f64();
            if removed {
                tracing::info!(
                    chunks = report.condemned,
                    bytes = report.condemned_bytes,
                    "gc: unreachable chunks removed from the index"
                );
            }
            point("gc.condemned");
            self.collect_packs(rt, &indexes, &packs, &mut report)?;
        }
        (report.candidates, report.marked) = mark.counts();
        report.trees_read = marker.trees_seen() as u64;
        tracing::info!(
            ?report,
            mark_bytes = mark.bytes(),
            "garbage collection done"
        );
        Ok(report)
    }

    /// Step 5: deletes candidate packs nothing points into, compacts mostly dead ones.
    fn collect_packs(
        &self,
        rt: &tokio::runtime::Handle,
        indexes: &[Arc<dyn ChunkIndex>],
        packs: &HashMap<PackId, PackFile>,
        report: &mut GcReport,
    ) -> Result<(), ApplianceError> {
        let mut live: HashMap<PackId, u64> = HashMap::new();
        for idx in indexes {
            idx.scan(&mut |_, e| {
                if packs.contains_key(&e.pack) {
                    *live.entry(e.pack).or_default() += u64::from(e.len);
                }
                Ok(())
            })
            .map_err(internal("counting live records"))?;
        }
        point("gc.live-counted");
        let mut empty = Vec::new();
        let mut sparse = HashSet::new();
        for (id, f) in packs.iter().filter(|(_, f)| !f.open) {
            let records = f.len.saturating_sub(PACK_HEADER_LEN as u64).max(1);
            match live.get(id) {
                None => empty.push(*id),
                #[allow(clippy::cast_precision_loss)] // a share, not an amount
                Some(&l) if 1.0 - (l as f64 / records as f64) > self.cfg.compact_above => {
                    sparse.insert(*id);
                }
                Some(_) => {}
            }
        }
        if let Some(t) = &self.tier {
            // Never delete nor compact what the bucket retains (its snapshot's lock holds; the
            // store would refuse the delete of that version anyway).
            let all: Vec<PackId> = empty.iter().chain(&sparse).copied().collect();
            let kept = t.retained(&all).map_err(|e| {
                ApplianceError::Unavailable(format!("garbage collection, reading retention: {e}"))
            })?;
            if !kept.is_empty() {
                empty.retain(|p| !kept.contains(p));
                sparse.retain(|p| !kept.contains(p));
                report.packs_retained = kept.len() as u64;
                tracing::info!(
                    packs = kept.len(),
                    "gc: packs retained by the bucket's object lock are kept"
                );
            }
        }
        for part in empty.chunks(64) {
            self.delete_packs(rt, part, packs, report)?;
            point("gc.deleted-packs");
        }
        if sparse.is_empty() {
            return Ok(());
        }
        // Live records of the packs to compact, per shard.
        let mut moving: Vec<Vec<ChunkId>> = vec![Vec::new(); indexes.len()];
        for (s, idx) in indexes.iter().enumerate() {
            idx.scan(&mut |id, e| {
                if sparse.contains(&e.pack) {
                    moving[s].push(*id);
                }
                Ok(())
            })
            .map_err(internal("listing records to compact"))?;
        }
        point("gc.compact-listed");
        for (s, ids) in moving.iter().enumerate() {
            for part in ids.chunks(REWRITE_BATCH) {
                report.bytes_moved +=
                    rt.block_on(self.shards.handles()[s].rewrite(part.to_vec()))?;
                report.records_moved += part.len() as u64;
                point("gc.rewrote-batch");
            }
        }
        point("gc.compacted");
        // G7: a compacted pack goes only once no entry points into it any more.
        let mut still: HashSet<PackId> = HashSet::new();
        for (s, ids) in moving.iter().enumerate() {
            for part in ids.chunks(CONDEMN_BATCH) {
                let now = indexes[s]
                    .get_many(part)
                    .map_err(internal("checking compacted records"))?;
                for e in now.into_iter().flatten() {
                    if sparse.contains(&e.pack) {
                        still.insert(e.pack);
                    }
                }
            }
        }
        point("gc.checked-compacted");
        if let Some(t) = &self.tier {
            // The moved records sit in the shards' open packs, on the local disk only: they
            // reach the bucket before the packs they came from leave it.
            for h in self.shards.handles() {
                rt.block_on(h.seal())?;
            }
            t.flush(std::time::Duration::from_mins(10))
                .map_err(|e| ApplianceError::Unavailable(format!("garbage collection: {e}")))?;
        }
        let done: Vec<PackId> = sparse.into_iter().filter(|p| !still.contains(p)).collect();
        if !still.is_empty() {
            tracing::warn!(
                packs = still.len(),
                "gc: some compacted packs are still referenced; kept for the next run"
            );
        }
        report.packs_compacted = done.len() as u64;
        for part in done.chunks(64) {
            self.delete_packs(rt, part, packs, report)?;
            point("gc.deleted-compacted");
        }
        Ok(())
    }

    fn delete_packs(
        &self,
        rt: &tokio::runtime::Handle,
        ids: &[PackId],
        packs: &HashMap<PackId, PackFile>,
        report: &mut GcReport,
    ) -> Result<(), ApplianceError> {
        // Every shard first says which it refuses (written during this run, or poisoned); a
        // pack no shard refuses is never written again. Then every shard drops its readers of
        // the rest and the first one unlinks them.
        let mut ids = ids.to_vec();
        if let Some(t) = &self.tier {
            // Never a pack still open, staged or uploading.
            let busy = t.busy();
            ids.retain(|p| !busy.contains(p));
        }
        for h in self.shards.handles() {
            let refused: HashSet<PackId> = rt
                .block_on(h.check_packs(ids.clone()))?
                .into_iter()
                .collect();
            ids.retain(|p| !refused.contains(p));
        }
        for h in self.shards.handles() {
            let done: HashSet<PackId> = rt
                .block_on(h.delete_packs(ids.clone()))?
                .into_iter()
                .collect();
            ids.retain(|p| done.contains(p));
        }
        if let Some(t) = &self.tier {
            // Gone locally (and from the index): now from the bucket, once the bucket's catalog
            // no longer lists the snapshots forgotten before (an attach must never find a
            // snapshot whose packs are gone). A failure stops the run; the next one lists the
            // leftover objects again and deletes them.
            t.mirror_now().map_err(|e| {
                ApplianceError::Unavailable(format!(
                    "garbage collection, mirroring the catalog: {e}"
                ))
            })?;
            t.delete_remote(&ids).map_err(|e| {
                ApplianceError::Unavailable(format!("garbage collection, deleting objects: {e}"))
            })?;
            point("gc.deleted-objects");
        }
        report.packs_deleted += ids.len() as u64;
        report.bytes_deleted += ids
            .iter()
            .filter_map(|p| packs.get(p))
            .map(|f| f.len)
            .sum::<u64>();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(first: u8, rest: u8) -> ChunkId {
        let mut b = [rest; 32];
        b[0] = first;
        ChunkId::from_bytes(b)
    }

    #[test]
    fn table_marks_by_position_and_keeps_twins_together() {
        // Two ids share their first 8 bytes; one differs; the table is sized for far fewer
        // entries than it gets, and for far more (an estimate may be off either way).
        for expected in [0, 3, 1 << 20] {
            let mut t = Table::new(expected);
            let (a, b) = (id(1, 0), id(2, 0));
            let mut a2b = *a.as_bytes();
            a2b[31] = 9;
            let a2 = ChunkId::from_bytes(a2b);
            for x in [a, a2, b] {
                t.push(prefix(&x)).unwrap();
            }
            t.seal();
            assert!(t.dead(&a) && t.dead(&b));
            t.mark(&a2);
            assert!(!t.dead(&a), "a twin of a marked id is kept too");
            assert!(t.dead(&b));
            assert_eq!(t.count_marked(), 2);
            // An id that is not a candidate marks nothing and is never dead (added after the
            // table was built).
            t.mark(&id(3, 3));
            assert_eq!(t.count_marked(), 2);
            assert!(!t.dead(&id(3, 3)) && !t.dead(&id(0, 0)) && !t.dead(&id(255, 255)));
        }
    }

    #[test]
    fn table_finds_every_entry_of_a_large_sorted_set_and_refuses_disorder() {
        let mut keys: Vec<ChunkId> = (0u64..50_000)
            .map(|i| ChunkId::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        keys.sort();
        let mut t = Table::new(10_000);
        for k in &keys {
            t.push(prefix(k)).unwrap();
        }
        t.seal();
        for (i, k) in keys.iter().enumerate() {
            if i % 3 == 0 {
                t.mark(k);
            }
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(t.dead(k), i % 3 != 0, "entry {i}");
        }
        let mut u = Table::new(10);
        u.push(prefix(&keys[1])).unwrap();
        assert!(u.push(prefix(&keys[0])).is_err());
    }
}
