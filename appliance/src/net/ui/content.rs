//! A snapshot's trees and files read on the appliance, for the web UI's browse, diff and
//! download pages (managed mode only: a sealed repository's trees are envelopes the appliance
//! cannot open).
//!
//! Owns: decoding tree parts, resolving a path, streaming a file's bytes and a directory as a
//! `.tar`. Memory is bounded: a listing is at most [`MAX_LISTING`] entries, a file is read
//! [`READ_BATCH`] chunks at a time, and a `.tar` is written into a channel of
//! [`TAR_QUEUE`] buffers of [`TAR_BUFFER`] bytes that the response drains. Must never decide
//! access: the caller has checked the snapshot against the rules.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use coffer_proto::v1::{Node, NodeKind, Tree};
use coffer_proto::{unpack_ids, ChunkId};
use futures::Stream;
use prost::Message as _;

use crate::error::ApplianceError;
use crate::shard::Shards;

/// Most entries one directory listing may have (a bound on what a crafted tree can cost).
pub(super) const MAX_LISTING: usize = 1_000_000;
/// Chunks a file read fetches at once.
const READ_BATCH: usize = 4;
/// Buffers of a `.tar` waiting to be sent, and their size.
const TAR_QUEUE: usize = 4;
const TAR_BUFFER: usize = 256 << 10;
/// Most changes a diff lists.
pub(super) const MAX_CHANGES: usize = 2000;
/// Most tree parts one listing chains, and most pairs of directories one diff compares (bounds
/// on what a crafted tree can cost: a chain or a subtree may point back at itself).
const MAX_PARTS: usize = 65_536;
const MAX_DIFF_DIRS: usize = 100_000;

/// Checked before each batch a download reads: the session still lives and may still read the
/// snapshot (a logout, a disabled account or a removed rule stops a download in progress).
pub(super) type Still = std::sync::Arc<dyn Fn() -> Result<(), ApplianceError> + Send + Sync>;

/// A name a tree may hold: one path component (never empty, `.`, `..`, nor with `/` or NUL).
fn check_name(name: &[u8]) -> Result<(), ApplianceError> {
    if name.is_empty()
        || name == b"."
        || name == b".."
        || name.iter().any(|b| *b == b'/' || *b == 0)
    {
        Err(damaged(format!(
            "it holds an invalid name {:?}",
            String::from_utf8_lossy(name)
        )))
    } else {
        Ok(())
    }
}

fn damaged(what: impl std::fmt::Display) -> ApplianceError {
    ApplianceError::FailedPrecondition(format!("the snapshot is damaged: {what}"))
}

fn id_of(bytes: &[u8], what: &str) -> Result<ChunkId, ApplianceError> {
    ChunkId::from_slice(bytes).map_err(|e| damaged(format!("{what}: {e}")))
}

/// Reads trees and file contents through the shards.
#[derive(Debug, Clone)]
pub(super) struct Contents {
    pub(super) shards: Shards,
}

/// What a path names in a snapshot.
#[derive(Debug)]
pub(super) enum Found {
    /// A directory (the root has no node) and its entries.
    Dir(Option<Node>, Vec<Node>),
    /// A file or a symlink.
    Leaf(Node),
}

/// One difference between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Change {
    /// `+` added, `-` removed, `M` modified.
    pub(super) mark: char,
    pub(super) path: Vec<u8>,
    pub(super) before: Option<u64>,
    pub(super) after: Option<u64>,
}

impl Contents {
    /// The plaintext of `ids`, in order.
    async fn plains(&self, ids: Vec<ChunkId>) -> Result<Vec<Bytes>, ApplianceError> {
        let stored = self.shards.get(ids).await?;
        stored
            .iter()
            .map(|c| {
                if c.sealed {
                    Err(ApplianceError::FailedPrecondition(
                        "sealed chunks are read by clients holding the keyring".into(),
                    ))
                } else {
                    crate::reach::plaintext(c)
                }
            })
            .collect()
    }

    /// Every entry of the tree `id` (all its parts), at most [`MAX_LISTING`].
    pub(super) async fn listing(&self, id: ChunkId) -> Result<Vec<Node>, ApplianceError> {
        let mut nodes = Vec::new();
        let mut next = Some(id);
        let mut seen = std::collections::HashSet::new();
        while let Some(part) = next.take() {
            if !seen.insert(part) || seen.len() > MAX_PARTS {
                return Err(damaged("a listing's parts loop or are too many"));
            }
            let data = self.plains(vec![part]).await?.pop().unwrap_or_default();
            let t = Tree::decode(data).map_err(|e| damaged(format!("tree {part}: {e}")))?;
            if nodes.len() + t.nodes.len() > MAX_LISTING {
                return Err(damaged(format!(
                    "a directory lists more than {MAX_LISTING} entries"
                )));
            }
            nodes.extend(t.nodes);
            if !t.next.is_empty() {
                next = Some(id_of(&t.next, "a tree part's next")?);
            }
        }
        Ok(nodes)
    }

    /// What `path` (components) names under the root tree `root`.
    ///
    /// # Errors
    /// `NotFound` when a component is missing or not a directory; read errors.
    pub(super) async fn find(
        &self,
        root: ChunkId,
        path: &[Vec<u8>],
    ) -> Result<Found, ApplianceError> {
        let mut dir: Option<Node> = None;
        let mut entries = self.listing(root).await?;
        for (i, name) in path.iter().enumerate() {
            let Some(n) = entries.iter().find(|n| n.name.as_ref() == name.as_slice()) else {
                return Err(ApplianceError::NotFound(format!(
                    "{} is not in this snapshot",
                    String::from_utf8_lossy(&path[..=i].join(&b'/'))
                )));
            };
            let n = n.clone();
            if n.kind() == NodeKind::Dir {
                entries = self.listing(id_of(&n.subtree, "a subtree")?).await?;
                dir = Some(n);
            } else if i + 1 == path.len() {
                return Ok(Found::Leaf(n));
            } else {
                return Err(ApplianceError::NotFound(format!(
                    "{} is not a directory",
                    String::from_utf8_lossy(&path[..=i].join(&b'/'))
                )));
            }
        }
        Ok(Found::Dir(dir, entries))
    }

    /// A file's chunk ids and list chunks (read one at a time as the ids run out), or its
    /// bundle.
    fn pieces(n: &Node) -> Result<Pieces, ApplianceError> {
        if !n.bundle.is_empty() {
            return Ok(Pieces::Bundle(
                id_of(&n.bundle, "a bundle")?,
                n.bundle_offset,
            ));
        }
        Ok(Pieces::Chunks {
            ids: unpack_ids(&n.chunks, usize::MAX).map_err(damaged)?.into(),
            lists: unpack_ids(&n.chunk_lists, usize::MAX)
                .map_err(damaged)?
                .into(),
        })
    }

    /// A file's bytes, [`READ_BATCH`] chunks at a time. The stream ends with an error (and the
    /// response is cut short, never presented as whole) when the content is not `size` bytes.
    pub(super) fn file(
        &self,
        node: &Node,
        still: Still,
    ) -> Result<impl Stream<Item = Result<Bytes, ApplianceError>> + Send + 'static, ApplianceError>
    {
        let me = self.clone();
        let start = Reading {
            pieces: Self::pieces(node)?,
            sent: 0,
            size: node.size,
        };
        Ok(futures::stream::try_unfold(start, move |mut r| {
            let (me, still) = (me.clone(), still.clone());
            async move {
                still()?;
                let out = me.next_bytes(&mut r).await?;
                Ok(out.map(|b| (b, r)))
            }
        }))
    }

    /// The next bytes of a file being read, `None` at its end (checked against its size).
    async fn next_bytes(&self, r: &mut Reading) -> Result<Option<Bytes>, ApplianceError> {
        let short = |sent: u64, size: u64| {
            damaged(format!(
                "a file's content is {sent} bytes or more, its entry says {size}"
            ))
        };
        if let Pieces::Chunks { ids, lists } = &mut r.pieces {
            if ids.is_empty() {
                if let Some(list) = lists.pop_front() {
                    let data = self.plains(vec![list]).await?.pop().unwrap_or_default();
                    *ids = unpack_ids(&data, usize::MAX).map_err(damaged)?.into();
                }
            }
        }
        let out = match &mut r.pieces {
            Pieces::Bundle(id, off) => {
                let (id, off) = (*id, *off);
                r.pieces = Pieces::Chunks {
                    ids: VecDeque::new(),
                    lists: VecDeque::new(),
                };
                let b = self.plains(vec![id]).await?.pop().unwrap_or_default();
                let range = usize::try_from(off)
                    .ok()
                    .zip(usize::try_from(off.saturating_add(r.size)).ok());
                let slice = range
                    .and_then(|(a, z)| (z <= b.len()).then(|| b.slice(a..z)))
                    .ok_or_else(|| damaged("a file lies outside its bundle"))?;
                vec![slice]
            }
            Pieces::Chunks { ids, .. } if !ids.is_empty() => {
                let n = ids.len().min(READ_BATCH);
                let batch: Vec<ChunkId> = ids.drain(..n).collect();
                self.plains(batch).await?
            }
            Pieces::Chunks { .. } => {
                return if r.sent == r.size {
                    Ok(None)
                } else {
                    Err(short(r.sent, r.size))
                };
            }
        };
        let mut joined = bytes::BytesMut::new();
        for b in out {
            joined.extend_from_slice(&b);
        }
        r.sent += joined.len() as u64;
        if r.sent > r.size {
            return Err(short(r.sent, r.size));
        }
        Ok(Some(joined.freeze()))
    }

    /// The changes from the tree `a` to the tree `b`, at most [`MAX_CHANGES`]; subtrees with
    /// the same id are not descended into. Answers whether the list was cut short.
    pub(super) async fn diff(
        &self,
        from: ChunkId,
        to: ChunkId,
    ) -> Result<(Vec<Change>, bool), ApplianceError> {
        let mut out = Vec::new();
        let mut todo: Vec<(Vec<u8>, ChunkId, ChunkId)> = vec![(Vec::new(), from, to)];
        // Each pair of directories once; and a bound on how many (a crafted tree can name one
        // subtree many times over).
        let mut compared = std::collections::HashSet::new();
        while let Some((prefix, before, after)) = todo.pop() {
            if before == after || !compared.insert((before, after)) {
                continue;
            }
            if compared.len() > MAX_DIFF_DIRS {
                return Err(ApplianceError::FailedPrecondition(format!(
                    "the snapshots differ in more than {MAX_DIFF_DIRS} directories: too many to \
                     compare here"
                )));
            }
            let (la, lb) = (self.listing(before).await?, self.listing(after).await?);
            let by_name = |l: Vec<Node>| -> HashMap<Vec<u8>, Node> {
                l.into_iter().map(|n| (n.name.to_vec(), n)).collect()
            };
            let (ma, mb) = (by_name(la), by_name(lb));
            let mut names: Vec<&Vec<u8>> = ma.keys().chain(mb.keys()).collect();
            names.sort_unstable();
            names.dedup();
            let find = |m: &HashMap<Vec<u8>, Node>, name: &[u8]| m.get(name).cloned();
            for name in names {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    [prefix.as_slice(), b"/", name].concat()
                };
                let (old, new) = (find(&ma, name), find(&mb, name));
                let change = |mark| Change {
                    mark,
                    path: path.clone(),
                    before: old.as_ref().map(|n| n.size),
                    after: new.as_ref().map(|n| n.size),
                };
                match (&old, &new) {
                    (Some(_), None) => out.push(change('-')),
                    (None, Some(_)) => out.push(change('+')),
                    (Some(p), Some(q))
                        if p.kind() == NodeKind::Dir && q.kind() == NodeKind::Dir =>
                    {
                        if p.mode != q.mode || p.uid != q.uid || p.gid != q.gid {
                            out.push(change('M'));
                        }
                        let (s, t) = (
                            id_of(&p.subtree, "a subtree")?,
                            id_of(&q.subtree, "a subtree")?,
                        );
                        todo.push((path.clone(), s, t));
                    }
                    (Some(p), Some(q)) if modified(p, q) => out.push(change('M')),
                    _ => {}
                }
                if out.len() >= MAX_CHANGES {
                    out.sort_by(|p, q| p.path.cmp(&q.path));
                    return Ok((out, true));
                }
            }
        }
        out.sort_by(|p, q| p.path.cmp(&q.path));
        Ok((out, false))
    }

    /// Writes the directory `dir` (its entries, under the name `top`) as a `.tar` into a
    /// stream, on a blocking thread. Subdirectories are listed as they are reached (memory: the
    /// listings on the way down). Unless the archive is complete, the stream ends with an
    /// error, never with end-of-archive blocks: a panic or an error cuts the download short.
    pub(super) fn tar(
        &self,
        top: PathBuf,
        dir: Option<Node>,
        entries: Vec<Node>,
        still: Still,
    ) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(TAR_QUEUE);
        let me = self.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut abort = Abort {
                tx: tx.clone(),
                failed: failed.clone(),
                done: false,
            };
            let w = Sender {
                tx,
                buf: Vec::with_capacity(TAR_BUFFER),
                failed,
            };
            let mut t = tar::Builder::new(w);
            t.mode(tar::HeaderMode::Complete);
            let walk = Walk {
                me: &me,
                rt: &rt,
                still: &still,
                entries: 0,
            };
            let outcome = walk
                .tar_into(&mut t, &top, dir.as_ref(), entries)
                .and_then(|()| t.into_inner())
                .and_then(|mut w| w.flush());
            match outcome {
                Ok(()) => abort.done = true,
                Err(e) => abort.fail(e),
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// Most entries one `.tar` holds (a crafted tree can name one subtree many times over).
const MAX_TAR_ENTRIES: u64 = 50_000_000;

/// One `.tar` being written.
struct Walk<'a> {
    me: &'a Contents,
    rt: &'a tokio::runtime::Handle,
    still: &'a Still,
    entries: u64,
}

impl Walk<'_> {
    fn tar_into(
        mut self,
        t: &mut tar::Builder<Sender>,
        top: &Path,
        dir: Option<&Node>,
        entries: Vec<Node>,
    ) -> io::Result<()> {
        let mut h = header(dir, tar::EntryType::Directory, 0);
        t.append_data(&mut h, top, io::empty())?;
        let mut todo: Vec<(PathBuf, ChunkId)> = Vec::new();
        self.add(t, top, entries, &mut todo)?;
        while let Some((at, sub)) = todo.pop() {
            let nodes = self.rt.block_on(self.me.listing(sub)).map_err(fail)?;
            self.add(t, &at, nodes, &mut todo)?;
        }
        Ok(())
    }

    /// Appends the entries of one directory; its subdirectories are left in `todo`.
    fn add(
        &mut self,
        t: &mut tar::Builder<Sender>,
        at: &Path,
        nodes: Vec<Node>,
        todo: &mut Vec<(PathBuf, ChunkId)>,
    ) -> io::Result<()> {
        for n in nodes {
            check_name(&n.name).map_err(fail)?;
            (self.still)().map_err(fail)?;
            self.entries += 1;
            if self.entries > MAX_TAR_ENTRIES {
                return Err(fail(damaged(format!(
                    "it holds more than {MAX_TAR_ENTRIES} entries"
                ))));
            }
            let path = at.join(std::ffi::OsStr::from_bytes(&n.name));
            match n.kind() {
                NodeKind::Dir => {
                    let mut h = header(Some(&n), tar::EntryType::Directory, 0);
                    t.append_data(&mut h, &path, io::empty())?;
                    todo.push((path, id_of(&n.subtree, "a subtree").map_err(fail)?));
                }
                NodeKind::Symlink => {
                    let mut h = header(Some(&n), tar::EntryType::Symlink, 0);
                    let target = std::ffi::OsStr::from_bytes(&n.symlink_target);
                    t.append_link(&mut h, &path, target)?;
                }
                NodeKind::File => {
                    let mut h = header(Some(&n), tar::EntryType::Regular, n.size);
                    let r = FileRead {
                        me: self.me,
                        rt: self.rt,
                        reading: Reading {
                            pieces: Contents::pieces(&n).map_err(fail)?,
                            sent: 0,
                            size: n.size,
                        },
                        have: Bytes::new(),
                    };
                    t.append_data(&mut h, &path, r)?;
                }
                NodeKind::Unspecified => {
                    return Err(fail(damaged("an entry of unknown kind")));
                }
            }
        }
        Ok(())
    }
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(fail)`
fn fail(e: ApplianceError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Ends a `.tar` stream with an error unless it completed (also when its thread panics), and
/// stops the writer from sending anything after that error.
struct Abort {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: bool,
}

impl Abort {
    fn fail(&mut self, e: io::Error) {
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let _ = self.tx.blocking_send(Err(e));
        }
        self.done = true;
    }
}

impl Drop for Abort {
    fn drop(&mut self) {
        if !self.done {
            self.fail(io::Error::other("the archive was interrupted"));
        }
    }
}

/// Whether two entries of the same name differ (kind, metadata or content).
fn modified(p: &Node, q: &Node) -> bool {
    p.kind != q.kind
        || p.size != q.size
        || p.mtime_ns != q.mtime_ns
        || p.mode != q.mode
        || p.uid != q.uid
        || p.gid != q.gid
        || p.symlink_target != q.symlink_target
        || (p.bundle.is_empty()
            && q.bundle.is_empty()
            && (p.chunks != q.chunks || p.chunk_lists != q.chunk_lists))
}

fn header(n: Option<&Node>, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    let (mode, uid, gid, mtime) = n.map_or((0o755, 0, 0, 0), |n| {
        (n.mode, n.uid, n.gid, n.mtime_ns.max(0) / 1_000_000_000)
    });
    h.set_mode(mode & 0o7777);
    h.set_uid(u64::from(uid));
    h.set_gid(u64::from(gid));
    h.set_mtime(mtime.unsigned_abs());
    h
}

/// Where a file read stands.
#[derive(Debug)]
struct Reading {
    pieces: Pieces,
    sent: u64,
    size: u64,
}

#[derive(Debug)]
enum Pieces {
    /// Chunk ids still to read, and list chunks whose ids come after them.
    Chunks {
        ids: VecDeque<ChunkId>,
        lists: VecDeque<ChunkId>,
    },
    Bundle(ChunkId, u64),
}

/// A file's bytes as a [`Read`] (for the `.tar` writer, on a blocking thread).
struct FileRead<'a> {
    me: &'a Contents,
    rt: &'a tokio::runtime::Handle,
    reading: Reading,
    have: Bytes,
}

impl Read for FileRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.have.is_empty() {
            match self.rt.block_on(self.me.next_bytes(&mut self.reading)) {
                Ok(Some(b)) => self.have = b,
                Ok(None) => return Ok(0),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        let n = buf.len().min(self.have.len());
        buf[..n].copy_from_slice(&self.have[..n]);
        let _ = self.have.split_to(n);
        Ok(n)
    }
}

/// Buffers the archive and hands it to the response in [`TAR_BUFFER`] pieces; a response
/// that went away (the browser cancelled) stops the writer, and after a failure nothing more
/// is sent (the builder's end-of-archive blocks included).
struct Sender {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Write for Sender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= TAR_BUFFER {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("the archive failed"));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let out = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(TAR_BUFFER),
        ));
        self.tx
            .blocking_send(Ok(out))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the download was cancelled"))
    }
}
