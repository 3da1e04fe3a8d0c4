//! The mount's inodes: what each is, its attributes, and each directory's listing as far as it
//! was read.
//!
//! Invariants:
//! * An inode number, once given, always names the same thing (the kernel may hold it); a name
//!   in a view that comes to mean another snapshot gets a new inode.
//! * `names` is the truth for lookups: a snapshot gone from the list is removed from it, so it
//!   disappears from the views even while the kernel still holds its inode.
//! * A tree listing grows part by part, names strictly increasing across the whole listing: a
//!   name not found below the last name read is known absent without reading further parts.
//! * Members of one hard-link group of one snapshot share one inode.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_proto::v1::{Node, NodeKind, Snapshot, Tree};
use coffer_proto::{ChunkId, SnapshotId};
use fuser::{FileAttr, FileType};

use crate::snapshot::tree::{next_part, MAX_TREE_PARTS};
use crate::{ClientError, TreeError};

pub(super) const ROOT: u64 = fuser::FUSE_ROOT_ID;

/// Attributes of snapshot contents never change: the kernel may keep them.
const TTL_CONTENT: Duration = Duration::from_hours(1);
/// The views, and the snapshots in them, change as snapshots come and go (a snapshot whose
/// access is revoked must stop resolving soon).
const TTL_VIEW: Duration = Duration::from_secs(1);

/// One `readdir` entry: inode, kind, name.
pub(super) type DirEntry = (u64, FileType, Vec<u8>);

/// The three views at the top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum View {
    Hosts,
    Paths,
    Ids,
}

#[derive(Debug, Clone)]
pub(super) enum Kind {
    Root,
    View,
    /// `hosts/<host>` or `paths/<path>`.
    Group(String),
    /// `latest`: the newest snapshot's name in its group.
    Latest(String),
    /// A snapshot's root or a directory in it; `path`: [`child_path`] of its path in the
    /// snapshot (0 for the root), the same whichever view it is reached through.
    Dir {
        snap: SnapshotId,
        tree: ChunkId,
        path: u64,
    },
    File {
        snap: SnapshotId,
        node: Arc<Node>,
    },
    Link(Vec<u8>),
}

#[derive(Debug, Default)]
struct Listing {
    children: Vec<(Vec<u8>, u64)>,
    /// The next tree part to read; `None` once the listing is whole.
    next: Option<ChunkId>,
    parts: usize,
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    attr: FileAttr,
    parent: u64,
    listing: Option<Listing>,
}

#[derive(Debug)]
pub(super) struct Table {
    entries: Vec<Entry>,
    /// (parent, name) -> inode, for what is listed now.
    names: HashMap<(u64, Vec<u8>), u64>,
    /// (snapshot, hard-link group) -> inode, and the [`child_path`] of each member seen (its
    /// link count, whichever view they were seen through: two directories with identical
    /// contents share a tree, but not a path).
    links: HashMap<(SnapshotId, u64), (u64, HashSet<u64>)>,
    /// Snapshots listed once and no longer: nothing in them resolves or reads any more.
    revoked: HashSet<SnapshotId>,
    listed: HashSet<SnapshotId>,
    uid: u32,
    gid: u32,
    mounted: SystemTime,
}

fn time_of_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn attr(
    ino: u64,
    kind: FileType,
    size: u64,
    perm: u32,
    owner: (u32, u32),
    mtime: SystemTime,
) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: u16::try_from(perm & 0o7777).unwrap_or(0),
        // Directories: 1, the "not counted" convention (a count of subdirectories would need
        // every listing read; tools then do not rely on it).
        nlink: 1,
        uid: owner.0,
        gid: owner.1,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// `paths/` names: the path without its leading `/`, `%` and `/` percent-encoded (`/` alone is
/// `%2F`).
pub(super) fn path_name(path: &str) -> String {
    let p = path
        .strip_prefix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    group_name(&p.replace('%', "%25").replace('/', "%2F"))
}

/// The identity of entry `name` of the directory whose identity is `dir` (0: a snapshot's
/// root): a hash of its path in the snapshot.
pub(super) fn child_path(dir: u64, name: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&dir.to_le_bytes());
    h.update(name);
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 of 32 bytes"))
}

/// A directory name for a host or an encoded path as recorded: never empty, never `.` or `..`,
/// no `/` or NUL, at most 255 bytes (longer names are cut at a character boundary).
pub(super) fn group_name(raw: &str) -> String {
    let mut s = raw.replace('/', "%2F").replace('\0', "%00");
    if s.is_empty() || s == "." || s == ".." {
        s = format!("({})", if s.is_empty() { "none" } else { &s });
    }
    let mut cut = s.len().min(255);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s
}

/// A snapshot's name in its group: its local time, to the second.
fn time_name(us: i64) -> String {
    use chrono::TimeZone;
    chrono::Local.timestamp_micros(us).single().map_or_else(
        || format!("@{us}"),
        |t| t.format("%Y-%m-%dT%H:%M:%S").to_string(),
    )
}

impl Table {
    pub(super) fn new(uid: u32, gid: u32) -> Self {
        let mounted = SystemTime::now();
        let mut t = Self {
            entries: Vec::new(),
            names: HashMap::new(),
            links: HashMap::new(),
            revoked: HashSet::new(),
            listed: HashSet::new(),
            uid,
            gid,
            mounted,
        };
        let root = t.push(ROOT, Kind::Root, FileType::Directory, 0o555, None);
        debug_assert_eq!(root, ROOT);
        let mut children = Vec::new();
        for name in ["hosts", "ids", "paths"] {
            let ino = t.push(ROOT, Kind::View, FileType::Directory, 0o555, None);
            t.names.insert((ROOT, name.as_bytes().to_vec()), ino);
            children.push((name.as_bytes().to_vec(), ino));
        }
        t.entries[0].listing = Some(Listing {
            children,
            ..Listing::default()
        });
        t
    }

    /// A new inode of a virtual entry (owned by the mounting user).
    fn push(
        &mut self,
        parent: u64,
        kind: Kind,
        ft: FileType,
        perm: u32,
        mtime: Option<SystemTime>,
    ) -> u64 {
        let ino = self.entries.len() as u64 + 1;
        let size = match &kind {
            Kind::Latest(t) => t.len() as u64,
            _ => 0,
        };
        let a = attr(
            ino,
            ft,
            size,
            perm,
            (self.uid, self.gid),
            mtime.unwrap_or(self.mounted),
        );
        let listing = matches!(ft, FileType::Directory).then(Listing::default);
        self.entries.push(Entry {
            kind,
            attr: a,
            parent,
            listing,
        });
        ino
    }

    fn entry(&self, ino: u64) -> Option<&Entry> {
        self.entries.get(usize::try_from(ino.checked_sub(1)?).ok()?)
    }

    fn entry_mut(&mut self, ino: u64) -> Option<&mut Entry> {
        self.entries
            .get_mut(usize::try_from(ino.checked_sub(1)?).ok()?)
    }

    pub(super) fn kind(&self, ino: u64) -> Option<Kind> {
        self.entry(ino).map(|e| e.kind.clone())
    }

    pub(super) fn attr(&self, ino: u64) -> Option<FileAttr> {
        self.entry(ino).map(|e| e.attr)
    }

    /// Whether `snap` was listed once and is no longer (its access revoked, or deleted).
    pub(super) fn revoked(&self, snap: &SnapshotId) -> bool {
        self.revoked.contains(snap)
    }

    /// The snapshots listed once and no longer.
    pub(super) fn revoked_ids(&self) -> impl Iterator<Item = &SnapshotId> {
        self.revoked.iter()
    }

    /// How long the kernel may keep what it learnt of `ino`: views and the snapshot
    /// directories in them briefly, snapshot contents long.
    pub(super) fn ttl(&self, ino: u64) -> Duration {
        let Some(e) = self.entry(ino) else {
            return TTL_VIEW;
        };
        let viewish = |k: &Kind| {
            matches!(
                k,
                Kind::Root | Kind::View | Kind::Group(_) | Kind::Latest(_)
            )
        };
        if viewish(&e.kind) || self.entry(e.parent).is_some_and(|p| viewish(&p.kind)) {
            TTL_VIEW
        } else {
            TTL_CONTENT
        }
    }

    pub(super) fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.names.get(&(parent, name.to_vec())).copied()
    }

    /// The next tree part directory `ino` must read to answer a lookup of `name` (or, without
    /// one, to hold more than `count` entries); `None` when what is read suffices.
    pub(super) fn wants_part(
        &self,
        ino: u64,
        name: Option<&[u8]>,
        count: usize,
    ) -> Option<ChunkId> {
        let l = self.entry(ino)?.listing.as_ref()?;
        let next = l.next?;
        match name {
            Some(n) => {
                if self.names.contains_key(&(ino, n.to_vec())) {
                    return None;
                }
                match l.children.last() {
                    Some((last, _)) if last.as_slice() >= n => None,
                    _ => Some(next),
                }
            }
            None => (l.children.len() <= count).then_some(next),
        }
    }

    /// Adds tree part `part` (read because [`Self::wants_part`] asked for it) to directory
    /// `ino`'s listing. A part another request added meanwhile is ignored.
    ///
    /// # Errors
    /// Names out of order across parts, too many parts, a bad next-part id.
    pub(super) fn add_part(
        &mut self,
        ino: u64,
        part: ChunkId,
        tree: Tree,
    ) -> Result<(), ClientError> {
        let Some(Kind::Dir { snap, path, .. }) = self.kind(ino) else {
            return Ok(());
        };
        let Some(l) = self.entry_mut(ino).and_then(|e| e.listing.as_mut()) else {
            return Ok(());
        };
        if l.next != Some(part) {
            return Ok(());
        }
        // Checked whole before anything changes: a bad part leaves the listing as it was (and
        // every later read of it fails the same way).
        if l.parts >= MAX_TREE_PARTS {
            return Err(TreeError::TooManyParts(part.to_hex()).into());
        }
        let next = next_part(&part, &tree)?;
        let mut last = l.children.last().map(|c| &c.0[..]);
        for n in &tree.nodes {
            if n.kind == NodeKind::Dir as i32 && ChunkId::from_slice(&n.subtree).is_err() {
                return Err(TreeError::BadFileEntry("subtree id").into());
            }
            if last.is_some_and(|p| p >= &n.name[..]) {
                return Err(TreeError::Duplicate(
                    part.to_hex(),
                    format!(
                        "{} (names out of order or repeated)",
                        String::from_utf8_lossy(&n.name)
                    ),
                )
                .into());
            }
            last = Some(&n.name[..]);
        }
        l.parts += 1;
        l.next = next;
        let mut added = Vec::with_capacity(tree.nodes.len());
        for n in tree.nodes {
            let name = n.name.to_vec();
            let child = self.node_inode(ino, snap, path, n)?;
            self.names.insert((ino, name.clone()), child);
            added.push((name, child));
        }
        if let Some(l) = self.entry_mut(ino).and_then(|e| e.listing.as_mut()) {
            l.children.extend(added);
        }
        Ok(())
    }

    /// The inode of entry `n` of a snapshot's directory (a hard-link group's shared one).
    fn node_inode(
        &mut self,
        parent: u64,
        snap: SnapshotId,
        dir_path: u64,
        n: Node,
    ) -> Result<u64, ClientError> {
        let kind = NodeKind::try_from(n.kind).unwrap_or(NodeKind::Unspecified);
        let path = child_path(dir_path, &n.name);
        if kind == NodeKind::File && n.hardlink_group != 0 {
            if let Some((ino, members)) = self.links.get_mut(&(snap, n.hardlink_group)) {
                let ino = *ino;
                members.insert(path);
                let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
                if let Some(e) = self.entry_mut(ino) {
                    e.attr.nlink = count;
                }
                return Ok(ino);
            }
        }
        let ino = self.entries.len() as u64 + 1;
        let owner = (n.uid, n.gid);
        let mtime = time_of_ns(n.mtime_ns);
        let (k, a, listing) = match kind {
            NodeKind::Dir => {
                let tree = ChunkId::from_slice(&n.subtree)
                    .map_err(|_| TreeError::BadFileEntry("subtree id"))?;
                (
                    Kind::Dir { snap, tree, path },
                    attr(ino, FileType::Directory, 0, n.mode, owner, mtime),
                    Some(Listing {
                        next: Some(tree),
                        ..Listing::default()
                    }),
                )
            }
            NodeKind::Symlink => (
                Kind::Link(n.symlink_target.to_vec()),
                attr(
                    ino,
                    FileType::Symlink,
                    n.symlink_target.len() as u64,
                    0o777,
                    owner,
                    mtime,
                ),
                None,
            ),
            _ => {
                let group = n.hardlink_group;
                let a = attr(ino, FileType::RegularFile, n.size, n.mode, owner, mtime);
                if group != 0 && kind == NodeKind::File {
                    let members = HashSet::from([path]);
                    self.links.insert((snap, group), (ino, members));
                }
                (
                    Kind::File {
                        snap,
                        node: Arc::new(n),
                    },
                    a,
                    None,
                )
            }
        };
        self.entries.push(Entry {
            kind: k,
            attr: a,
            parent,
            listing,
        });
        Ok(ino)
    }

    /// Directory `ino`'s parent and its listed entries from the `skip`-th (a few hundred).
    pub(super) fn entries(&self, ino: u64, skip: usize) -> Option<(u64, Vec<DirEntry>)> {
        let e = self.entry(ino)?;
        let l = e.listing.as_ref()?;
        let out = l
            .children
            .iter()
            .skip(skip)
            .take(1024)
            .map(|(name, i)| {
                let kind = self
                    .entry(*i)
                    .map_or(FileType::RegularFile, |c| c.attr.kind);
                (*i, kind, name.clone())
            })
            .collect();
        Some((e.parent, out))
    }

    /// A child of a view named `name`, for `kind`: the same inode while it means the same.
    fn view_child(
        &mut self,
        parent: u64,
        name: &str,
        kind: Kind,
        ft: FileType,
        mtime: Option<SystemTime>,
    ) -> u64 {
        let key = (parent, name.as_bytes().to_vec());
        if let Some(&ino) = self.names.get(&key) {
            let same = match (self.entry(ino).map(|e| &e.kind), &kind) {
                (Some(Kind::Dir { snap: a, .. }), Kind::Dir { snap: b, .. }) => a == b,
                (Some(Kind::Group(a)), Kind::Group(b))
                | (Some(Kind::Latest(a)), Kind::Latest(b)) => a == b,
                _ => false,
            };
            if same {
                return ino;
            }
        }
        let listing = match &kind {
            Kind::Dir { tree, .. } => Some(Listing {
                next: Some(*tree),
                ..Listing::default()
            }),
            _ => None,
        };
        let ino = self.push(parent, kind, ft, 0o555, mtime);
        if listing.is_some() {
            if let Some(e) = self.entry_mut(ino) {
                e.listing = listing;
            }
        }
        ino
    }

    /// Replaces the listing of view directory `ino` with `children` (names no longer there
    /// stop resolving).
    fn set_listing(&mut self, ino: u64, children: Vec<(Vec<u8>, u64)>) {
        self.names.retain(|(p, _), _| *p != ino);
        for (n, c) in &children {
            self.names.insert((ino, n.clone()), *c);
        }
        if let Some(e) = self.entry_mut(ino) {
            e.listing = Some(Listing {
                children,
                ..Listing::default()
            });
        }
    }

    /// Rebuilds the views from the snapshot list.
    pub(super) fn set_snapshots(&mut self, list: &[Snapshot]) {
        let now: HashSet<SnapshotId> = list
            .iter()
            .filter_map(|s| SnapshotId::from_slice(&s.id).ok())
            .collect();
        self.revoked = self.listed.difference(&now).copied().collect();
        self.listed.extend(now);
        let mut list: Vec<&Snapshot> = list.iter().collect();
        list.sort_by_key(|s| (s.time_us, s.id.clone()));
        for (view_name, view) in [
            ("hosts", View::Hosts),
            ("paths", View::Paths),
            ("ids", View::Ids),
        ] {
            let Some(view_ino) = self.child(ROOT, view_name.as_bytes()) else {
                continue;
            };
            let mut groups: std::collections::BTreeMap<String, Vec<&Snapshot>> =
                std::collections::BTreeMap::new();
            let mut children = Vec::new();
            for s in &list {
                let Ok(id) = SnapshotId::from_slice(&s.id) else {
                    continue;
                };
                let Ok(tree) = ChunkId::from_slice(&s.root) else {
                    continue;
                };
                match view {
                    View::Ids => {
                        let name = id.to_hex();
                        let ino = self.snapshot_dir(view_ino, &name, id, tree, s.time_us);
                        children.push((name.into_bytes(), ino));
                    }
                    View::Hosts => groups
                        .entry(group_name(if s.hostname.is_empty() {
                            &s.identity
                        } else {
                            &s.hostname
                        }))
                        .or_default()
                        .push(s),
                    View::Paths => groups.entry(path_name(&s.path)).or_default().push(s),
                }
            }
            for (g, snaps) in groups {
                let gino = self.view_child(
                    view_ino,
                    &g,
                    Kind::Group(g.clone()),
                    FileType::Directory,
                    None,
                );
                children.push((g.into_bytes(), gino));
                self.set_group(gino, &snaps);
            }
            children.sort();
            self.set_listing(view_ino, children);
        }
    }

    /// A snapshot's root directory, `name` in `parent`.
    fn snapshot_dir(
        &mut self,
        parent: u64,
        name: &str,
        snap: SnapshotId,
        tree: ChunkId,
        time_us: i64,
    ) -> u64 {
        let kind = Kind::Dir {
            snap,
            tree,
            path: 0,
        };
        let mtime = time_of_ns(time_us.saturating_mul(1000));
        self.view_child(parent, name, kind, FileType::Directory, Some(mtime))
    }

    /// Lists group `gino`: its snapshots (oldest first) by time, and `latest`.
    fn set_group(&mut self, gino: u64, snaps: &[&Snapshot]) {
        let mut inner: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut used = std::collections::HashSet::new();
        for s in snaps {
            let (Ok(id), Ok(tree)) = (SnapshotId::from_slice(&s.id), ChunkId::from_slice(&s.root))
            else {
                continue;
            };
            let mut name = time_name(s.time_us);
            if !used.insert(name.clone()) {
                name = format!("{name}_{}", &id.to_hex()[..8]);
                used.insert(name.clone());
            }
            let ino = self.snapshot_dir(gino, &name, id, tree, s.time_us);
            inner.push((name.into_bytes(), ino));
        }
        if let Some((newest, _)) = inner.last() {
            let target = String::from_utf8_lossy(newest).into_owned();
            let ino = self.view_child(
                gino,
                "latest",
                Kind::Latest(target),
                FileType::Symlink,
                None,
            );
            inner.push((b"latest".to_vec(), ino));
        }
        inner.sort();
        self.set_listing(gino, inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_one_directory_each() {
        assert_eq!(path_name("/home/alice"), "home%2Falice");
        assert_eq!(path_name("/"), "%2F");
        assert_eq!(path_name("/a%b/c"), "a%25b%2Fc");
        assert_eq!(path_name(""), "(none)");
        assert_eq!(group_name("a/b"), "a%2Fb");
        assert_eq!(group_name(".."), "(..)");
        assert_eq!(group_name(&"é".repeat(200)).len(), 254);
    }

    fn snap(n: u8, time_us: i64, host: &str, path: &str) -> Snapshot {
        Snapshot {
            id: vec![n; 16].into(),
            identity: format!("alice@{host}"),
            hostname: host.into(),
            path: path.into(),
            time_us,
            root: vec![n; 32].into(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn views_follow_the_list_and_a_removed_snapshot_disappears() {
        let mut t = Table::new(1000, 1000);
        let a = snap(1, 1_700_000_000_000_000, "laptop", "/home");
        let b = snap(2, 1_700_000_100_000_000, "laptop", "/home");
        t.set_snapshots(&[a.clone(), b.clone()]);
        let hosts = t.child(ROOT, b"hosts").unwrap();
        let laptop = t.child(hosts, b"laptop").unwrap();
        let (_, entries) = t.entries(laptop, 0).unwrap();
        let names: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.2).into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&"latest".to_string()));
        let latest = t.child(laptop, b"latest").unwrap();
        let Some(Kind::Latest(target)) = t.kind(latest) else {
            panic!()
        };
        assert_eq!(target, time_name(b.time_us));
        let ids = t.child(ROOT, b"ids").unwrap();
        let a_ino = t
            .child(
                ids,
                SnapshotId::from_slice(&a.id).unwrap().to_hex().as_bytes(),
            )
            .unwrap();
        t.set_snapshots(std::slice::from_ref(&b));
        assert_eq!(
            t.child(
                ids,
                SnapshotId::from_slice(&a.id).unwrap().to_hex().as_bytes()
            ),
            None
        );
        assert!(
            t.attr(a_ino).is_some(),
            "an inode the kernel holds stays answerable"
        );
        assert!(t.revoked(&SnapshotId::from_slice(&a.id).unwrap()));
        let b_hex = SnapshotId::from_slice(&b.id).unwrap().to_hex();
        let b_ino = t.child(ids, b_hex.as_bytes()).unwrap();
        t.set_snapshots(&[b]);
        assert_eq!(
            t.child(ids, b_hex.as_bytes()),
            Some(b_ino),
            "inodes are stable"
        );
    }

    fn node(name: &str, kind: NodeKind, subtree: &[u8], group: u64) -> Node {
        Node {
            name: name.as_bytes().to_vec().into(),
            kind: kind as i32,
            subtree: subtree.to_vec().into(),
            hardlink_group: group,
            ..Node::default()
        }
    }

    /// A snapshot's root directory, through `ids/`.
    fn root_of(t: &mut Table, s: &Snapshot) -> u64 {
        t.set_snapshots(std::slice::from_ref(s));
        let ids = t.child(ROOT, b"ids").unwrap();
        let hex = SnapshotId::from_slice(&s.id).unwrap().to_hex();
        t.child(ids, hex.as_bytes()).unwrap()
    }

    #[test]
    fn hard_links_in_directories_with_identical_contents_count_apart() {
        // `cp -al a a.bak`: both directories have one tree, holding the same group's member.
        let mut t = Table::new(0, 0);
        let s = snap(3, 1_700_000_000_000_000, "h", "/");
        let root = root_of(&mut t, &s);
        let sub = ChunkId::from_slice(&[7; 32]).unwrap();
        let top = Tree {
            nodes: vec![
                node("a", NodeKind::Dir, sub.as_bytes(), 0),
                node("a.bak", NodeKind::Dir, sub.as_bytes(), 0),
            ],
            ..Tree::default()
        };
        t.add_part(root, ChunkId::from_slice(&s.root).unwrap(), top)
            .unwrap();
        let inner = || Tree {
            nodes: vec![node("f", NodeKind::File, &[], 9)],
            ..Tree::default()
        };
        let a = t.child(root, b"a").unwrap();
        let bak = t.child(root, b"a.bak").unwrap();
        t.add_part(a, sub, inner()).unwrap();
        let f = t.child(a, b"f").unwrap();
        assert_eq!(t.attr(f).unwrap().nlink, 1);
        t.add_part(bak, sub, inner()).unwrap();
        assert_eq!(t.child(bak, b"f"), Some(f), "one inode per group");
        assert_eq!(t.attr(f).unwrap().nlink, 2);
        // The same links seen again (another view) count once.
        t.add_part(a, sub, inner()).unwrap();
        assert_eq!(t.attr(f).unwrap().nlink, 2);
    }

    #[test]
    fn a_bad_part_leaves_the_listing_as_it_was() {
        let mut t = Table::new(0, 0);
        let s = snap(4, 1_700_000_000_000_000, "h", "/");
        let root = root_of(&mut t, &s);
        let part = ChunkId::from_slice(&s.root).unwrap();
        let bad = Tree {
            nodes: vec![
                node("a", NodeKind::File, &[], 0),
                node("b", NodeKind::Dir, b"short", 0),
            ],
            ..Tree::default()
        };
        assert!(t.add_part(root, part, bad).is_err());
        assert_eq!(
            t.child(root, b"a"),
            None,
            "nothing of the bad part is listed"
        );
        assert_eq!(
            t.wants_part(root, None, 0),
            Some(part),
            "the part is read (and refused) again"
        );
    }
}
