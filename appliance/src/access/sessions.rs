//! Sessions: what each logged-in session knows (uploaded, proved, opened) and when it ends.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_proto::v1;
use coffer_proto::ChunkId;
// tokio's clock: real time in production, pausable and advanced by hand in tests (no sleeps).
use tokio::time::Instant;

use crate::error::ApplianceError;
use crate::reach::Reach;

/// Snapshots one session may hold open at once; opening another forgets the least recently
/// opened. The client opens at most 17 per backup (its 16 newest paths and the parent), so a
/// command backing up several paths keeps what its current backup relies on.
pub const MAX_OPENED: usize = 64;
/// Sessions one account may hold at once; a new login ends the least recently used.
pub const MAX_SESSIONS_PER_ACCOUNT: usize = 32;

/// How many chunk ids sessions may hold (uploaded, proved, answered present): each costs memory
/// until its session ends (`serve --session-chunks`; all sessions together at most a quarter of
/// memory, see `coffer_tuning::Limits`).
#[derive(Debug)]
pub struct ChunkAllowance {
    pub per_session: u64,
    pub all_sessions: u64,
    held: AtomicU64,
}

impl ChunkAllowance {
    #[must_use]
    pub fn new(per_session: u64, all_sessions: u64) -> Self {
        Self {
            per_session,
            all_sessions,
            held: AtomicU64::new(0),
        }
    }

    /// Chunk ids all sessions hold now.
    #[must_use]
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

impl Default for ChunkAllowance {
    fn default() -> Self {
        Self::new(16 << 20, u64::MAX)
    }
}

/// A snapshot a session opened: the record it was opened as (to re-check access when rules
/// change) and everything reachable from it.
#[derive(Debug, Clone)]
pub struct Opened {
    pub snapshot: v1::Snapshot,
    pub reach: Arc<Reach>,
}

/// What a session knows: chunks it uploaded or proved it holds, and everything reachable from
/// the snapshots it opened. Reads and snapshot references are limited to what it knows.
#[derive(Debug)]
pub struct SessionState {
    /// Key of this session's possession proofs.
    pub possession_key: [u8; 32],
    /// The account's ownership key (chunks its sessions uploaded; see `shard::Owned`); `None`
    /// for the server control user.
    pub owner: Option<[u8; 16]>,
    uploaded: Mutex<HashSet<ChunkId>>,
    /// Chunks answered "prove" (stored, not yet known): pinned against the GC until the session
    /// ends, so that the proof it sends next finds them (G3). Not readable.
    pinned: Mutex<HashSet<ChunkId>>,
    opened: Mutex<Vec<Opened>>,
    /// Reachable sets of snapshots the session opened and may no longer read (deleted,
    /// forgotten, access revoked): still pinned against the GC while the session lives — its
    /// client may have been answered "present" for their chunks (G3) — but no longer known.
    released: Mutex<Vec<Arc<Reach>>>,
    /// Set when the session is ended (account deleted, password changed, idle): streams already
    /// running check it before every message.
    revoked: AtomicBool,
    /// New bytes this session's uploads stored (quotas: counted until the session ends).
    pub stored_bytes: std::sync::atomic::AtomicU64,
    last_used: Mutex<Instant>,
    /// When the session was opened.
    pub started: Instant,
    allowance: Arc<ChunkAllowance>,
    /// Chunk ids in `uploaded` and `pinned` (counted in `allowance` until the session ends).
    held: AtomicU64,
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.release_held();
    }
}

impl SessionState {
    pub(super) fn new(
        owner: Option<[u8; 16]>,
        now: Instant,
        allowance: Arc<ChunkAllowance>,
    ) -> Self {
        Self {
            possession_key: rand::random(),
            owner,
            uploaded: Mutex::new(HashSet::new()),
            pinned: Mutex::new(HashSet::new()),
            opened: Mutex::new(Vec::new()),
            released: Mutex::new(Vec::new()),
            revoked: AtomicBool::new(false),
            stored_bytes: std::sync::atomic::AtomicU64::new(0),
            last_used: Mutex::new(now),
            started: now,
            allowance,
            held: AtomicU64::new(0),
        }
    }

    /// Refuses a request that would take this session (or all sessions) past the chunk ids
    /// they may hold, before anything is done for it. Concurrent requests of one session may
    /// each pass and together exceed the cap by what is in flight (a pipeline's few batches).
    ///
    /// # Errors
    /// [`ApplianceError::ResourceExhausted`] naming the limit.
    pub fn room_for(&self, n: usize) -> Result<(), ApplianceError> {
        let n = n as u64;
        let mine = self.held.load(Ordering::Relaxed);
        if mine + n > self.allowance.per_session {
            return Err(ApplianceError::ResourceExhausted(format!(
                "this session holds {mine} chunk ids, its limit is {} (--session-chunks): \
                 commit a snapshot and log in again for the rest",
                self.allowance.per_session
            )));
        }
        let all = self.allowance.held();
        if all + n > self.allowance.all_sessions {
            return Err(ApplianceError::ResourceExhausted(format!(
                "the appliance's sessions hold {all} chunk ids, their limit is {}; try again \
                 when running backups have finished",
                self.allowance.all_sessions
            )));
        }
        Ok(())
    }

    fn count(&self, added: usize) {
        self.held.fetch_add(added as u64, Ordering::Relaxed);
        self.allowance
            .held
            .fetch_add(added as u64, Ordering::Relaxed);
    }

    fn release_held(&self) {
        let n = self.held.swap(0, Ordering::Relaxed);
        self.allowance.held.fetch_sub(n, Ordering::Relaxed);
    }

    /// Records chunks the session uploaded (verified against their ids) or proved.
    pub fn add_uploaded(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut set = lock(&self.uploaded);
        let before = set.len();
        set.extend(ids);
        self.count(set.len() - before);
    }

    /// Pins chunks answered "present" that the session does not know yet (see `pinned`).
    pub fn add_pinned(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut set = lock(&self.pinned);
        let before = set.len();
        set.extend(ids);
        self.count(set.len() - before);
    }

    /// Reports every chunk this session holds against the GC: uploaded, proved, answered
    /// present, and reachable from what it opened.
    pub fn each_pinned(&self, mark: &mut dyn FnMut(&ChunkId)) {
        lock(&self.uploaded).iter().for_each(&mut *mark);
        lock(&self.pinned).iter().for_each(&mut *mark);
        for o in lock(&self.opened).iter() {
            o.reach.trees.iter().for_each(&mut *mark);
            o.reach.leaves.iter().for_each(&mut *mark);
        }
        for r in lock(&self.released).iter() {
            r.trees.iter().for_each(&mut *mark);
            r.leaves.iter().for_each(&mut *mark);
        }
    }

    /// Records the reachable set of a snapshot the session opened.
    pub fn add_opened(&self, snapshot: v1::Snapshot, reach: Arc<Reach>) {
        let mut o = lock(&self.opened);
        // Opening again makes it the most recent (the end of the list).
        o.retain(|r| r.snapshot.id != snapshot.id);
        o.push(Opened { snapshot, reach });
        if o.len() > MAX_OPENED {
            o.remove(0);
        }
    }

    /// Keeps only the opened snapshots for which `keep` holds (access re-checked on reload).
    pub fn retain_opened(&self, keep: impl Fn(&v1::Snapshot) -> bool) -> usize {
        let mut o = lock(&self.opened);
        let (kept, dropped): (Vec<Opened>, Vec<Opened>) = std::mem::take(&mut *o)
            .into_iter()
            .partition(|x| keep(&x.snapshot));
        *o = kept;
        drop(o);
        let n = dropped.len();
        let mut r = lock(&self.released);
        r.extend(dropped.into_iter().map(|x| x.reach));
        if r.len() > MAX_OPENED {
            let excess = r.len() - MAX_OPENED;
            r.drain(..excess);
        }
        n
    }

    /// The snapshots this session opened.
    #[must_use]
    pub fn opened_snapshots(&self) -> Vec<v1::Snapshot> {
        lock(&self.opened)
            .iter()
            .map(|o| o.snapshot.clone())
            .collect()
    }

    /// Whether `id` is reachable from a snapshot the session opened.
    #[must_use]
    pub fn opened(&self, id: &ChunkId) -> bool {
        lock(&self.opened).iter().any(|r| r.reach.contains(id))
    }

    /// Whether `id` is a tree object of a snapshot the session opened (a subtree a commit need
    /// not walk again).
    #[must_use]
    pub fn opened_tree(&self, id: &ChunkId) -> bool {
        lock(&self.opened)
            .iter()
            .any(|r| r.reach.trees.contains(id))
    }

    /// Whether the session uploaded, proved or opened `id`.
    #[must_use]
    pub fn knows(&self, id: &ChunkId) -> bool {
        lock(&self.uploaded).contains(id) || self.opened(id)
    }

    /// Ends the session for every call already in progress.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        lock(&self.uploaded).clear();
        lock(&self.pinned).clear();
        self.release_held();
        lock(&self.opened).clear();
        lock(&self.released).clear();
    }

    /// Fails once the session was ended; marks it used otherwise. Called for every message of
    /// a stream, so that ending a session ends the streams it has open.
    ///
    /// # Errors
    /// [`ApplianceError::Unauthenticated`] once revoked.
    pub fn check(&self) -> Result<(), ApplianceError> {
        if self.revoked.load(Ordering::SeqCst) {
            return Err(ApplianceError::Unauthenticated(
                "session ended (account deleted, password changed, or idle too long): log in again"
                    .into(),
            ));
        }
        *lock(&self.last_used) = Instant::now();
        Ok(())
    }

    /// When the session was last used.
    #[must_use]
    pub fn idle_since(&self) -> Instant {
        *lock(&self.last_used)
    }
}

/// An authenticated session.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: String,
    /// What the account's role lets it do whatever the rules say.
    pub role: Role,
    pub state: Arc<SessionState>,
    /// The server control user: may refresh and ask for status, nothing else.
    pub control: bool,
    pub(super) expires: Instant,
    /// The password hash the session was opened with: a changed password ends the session.
    pub(super) phc: String,
}

/// A restricted account: limits that apply on top of the access rules (sealed mode's member
/// roles, enforced here as well as by the keys a member holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// The rules alone decide.
    #[default]
    Any,
    /// May add snapshots (upload, prove, commit); may not list, read, open or delete any, its
    /// own included.
    WriteOnly,
    /// May list snapshots; may not read, open, add or delete any.
    LogOnly,
}

/// What a call does, as far as roles are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// FindMissing, PutChunks, CommitSnapshot.
    Write,
    /// ListSnapshots, GetSnapshot.
    List,
    /// GetChunks, OpenSnapshot.
    Read,
    /// DeleteSnapshot, unprotecting, policy and rule changes.
    Change,
}

impl Role {
    /// Parses a stored or given role name.
    ///
    /// # Errors
    /// A name other than `write-only` and `log-only`.
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        match s {
            None => Ok(Self::Any),
            Some("write-only") => Ok(Self::WriteOnly),
            Some("log-only") => Ok(Self::LogOnly),
            Some(o) => Err(format!("role {o:?}: expected write-only or log-only")),
        }
    }

    /// The stored name (`None` for [`Role::Any`]).
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::Any => None,
            Self::WriteOnly => Some("write-only"),
            Self::LogOnly => Some("log-only"),
        }
    }

    /// Refuses what the role does not allow.
    ///
    /// # Errors
    /// `PermissionDenied` naming the role.
    pub fn allows(self, what: Use) -> Result<(), crate::error::ApplianceError> {
        let ok = match self {
            Self::Any => true,
            Self::WriteOnly => what == Use::Write,
            Self::LogOnly => what == Use::List,
        };
        if ok {
            Ok(())
        } else {
            let name = self.name().unwrap_or_default();
            Err(crate::error::ApplianceError::PermissionDenied(format!(
                "this account is {name}: {}",
                match self {
                    Self::WriteOnly => "it may add snapshots, never list, read, open or delete any",
                    _ => "it may list snapshots, never read, add or delete any",
                }
            )))
        }
    }
}

/// A session unused this long ends (its memory is released); the client logs in again.
pub const SESSION_IDLE: Duration = Duration::from_mins(30);

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl crate::reach::Known for SessionState {
    fn knows(&self, id: &ChunkId) -> bool {
        SessionState::knows(self, id)
    }

    fn opened_tree(&self, id: &ChunkId) -> bool {
        SessionState::opened_tree(self, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_dropped_from_a_session_stays_pinned_but_unknown() {
        let s = SessionState::new(None, Instant::now(), Arc::default());
        let (tree, leaf) = (ChunkId::from_bytes([1; 32]), ChunkId::from_bytes([2; 32]));
        let reach = Reach {
            trees: [tree].into(),
            leaves: [leaf].into(),
        };
        let snap = v1::Snapshot {
            id: vec![9; 16].into(),
            ..v1::Snapshot::default()
        };
        s.add_opened(snap, Arc::new(reach));
        assert!(s.knows(&leaf));
        assert_eq!(s.retain_opened(|_| false), 1);
        assert!(!s.knows(&leaf), "a dropped snapshot is no longer readable");
        let mut pinned = Vec::new();
        s.each_pinned(&mut |id| pinned.push(*id));
        assert!(
            pinned.contains(&tree) && pinned.contains(&leaf),
            "but still pinned (G3)"
        );
        s.revoke();
        let mut after = Vec::new();
        s.each_pinned(&mut |id| after.push(*id));
        assert!(after.is_empty(), "until the session ends");
    }
}
