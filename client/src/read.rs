//! The read stage: worker threads read files into buffers from a fixed pool and cut them
//! ([`crate::chunk`]).
//!
//! * Small files (up to one segment) are read whole, many to a buffer ([`Job::Group`]): one
//!   buffer per group instead of one allocation per file or chunk.
//! * Big files are split into extents of one segment ([`Job::Extent`]) that any worker reads with
//!   `pread` and cuts, so one big file keeps every core busy; [`crate::chunk::Merge`] stitches
//!   them back into the file's sequential chunking.
//!
//! Chunks are zero-copy slices of the pooled buffers; a buffer goes back to the pool when its last
//! chunk is dropped (uploaded or found present). The pool is the read stage's memory bound: a
//! worker takes a buffer *before* it takes a job, so the oldest unfinished extent of a file
//! always has one and merging can always progress. A worker that finds the pool empty says so
//! before waiting, and while workers wait and no read is queued the uploader sends its partly
//! filled batch as soon as an upload slot is free, instead of holding buffers while it waits
//! for more chunks (see the main loop in [`crate::pipeline`]).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

use crate::chunk::{cut, Chunk, ChunkerParams, Cut, Extent};

/// A fixed number of equally sized read buffers.
#[derive(Debug)]
pub struct BufPool {
    state: Mutex<PoolState>,
    freed: Condvar,
    count: usize,
    capacity: usize,
}

/// A read buffer: zero-filled once when made, then reused as is (no clearing between uses);
/// `used` bytes at the front hold data.
#[derive(Debug)]
pub struct Buf {
    data: Vec<u8>,
    used: usize,
}

impl Buf {
    /// The filled part.
    #[must_use]
    pub fn filled(&self) -> &[u8] {
        &self.data[..self.used]
    }
}

#[derive(Debug)]
struct PoolState {
    free: Vec<Buf>,
    made: usize,
    waiting: usize,
}

impl BufPool {
    /// `count` buffers of `capacity` bytes, allocated on first use.
    #[must_use]
    pub fn new(count: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PoolState {
                free: Vec::new(),
                made: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
            count: count.max(1),
            capacity,
        })
    }

    /// Bytes of one buffer.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn take_locked(&self, s: &mut PoolState) -> Option<Buf> {
        if let Some(b) = s.free.pop() {
            return Some(b);
        }
        if s.made < self.count {
            s.made += 1;
            return Some(Buf {
                data: vec![0; self.capacity],
                used: 0,
            });
        }
        None
    }

    /// A free buffer, if there is one.
    pub fn try_take(&self) -> Option<Buf> {
        self.take_locked(&mut self.state.lock().expect("pool lock"))
    }

    /// A free buffer; when there is none, counts this thread as waiting, calls `on_wait` and
    /// waits for one.
    pub fn take(&self, on_wait: impl FnOnce()) -> Buf {
        let mut s = self.state.lock().expect("pool lock");
        if let Some(b) = self.take_locked(&mut s) {
            return b;
        }
        s.waiting += 1;
        drop(s);
        on_wait();
        let mut s = self.state.lock().expect("pool lock");
        loop {
            if let Some(b) = self.take_locked(&mut s) {
                s.waiting -= 1;
                return b;
            }
            s = self.freed.wait(s).expect("pool lock");
        }
    }

    /// Threads waiting for a buffer now.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.state.lock().expect("pool lock").waiting
    }

    fn give(&self, mut b: Buf) {
        b.used = 0;
        self.state.lock().expect("pool lock").free.push(b);
        self.freed.notify_one();
    }
}

/// A pooled buffer shared by the chunks cut from it; returns to the pool when the last one drops.
struct Pooled {
    buf: Option<Buf>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], Buf::filled)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

/// Freezes a filled buffer into shared bytes that go back to `pool` when dropped.
#[must_use]
pub fn freeze(buf: Buf, pool: &Arc<BufPool>) -> Bytes {
    Bytes::from_owner(Pooled {
        buf: Some(buf),
        pool: pool.clone(),
    })
}

/// Work for one reader: one buffer's worth.
#[derive(Debug)]
pub enum Job {
    /// Small files read whole into one buffer: (file index, path, size at walk time).
    Group(Vec<(usize, PathBuf, u64)>),
    /// Extent `k` of big file `file`: bytes `[start, start + own_len)` plus up to `max` more.
    Extent {
        file: usize,
        path: Arc<PathBuf>,
        k: u64,
        start: u64,
        own_len: usize,
        size: u64,
    },
}

/// Splits files into jobs: files up to `segment` bytes go into groups of at most `capacity`
/// bytes, bigger ones into extents of `segment` bytes. `files` is (index, path, size).
pub fn plan(
    files: impl IntoIterator<Item = (usize, PathBuf, u64)>,
    segment: usize,
    capacity: usize,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut group = Vec::new();
    let mut group_bytes = 0u64;
    for (file, path, size) in files {
        if size <= segment as u64 {
            if group_bytes + size > capacity as u64 || group.len() >= 4096 {
                jobs.push(Job::Group(std::mem::take(&mut group)));
                group_bytes = 0;
            }
            group_bytes += size;
            group.push((file, path, size));
            continue;
        }
        let path = Arc::new(path);
        let mut start = 0u64;
        let mut k = 0;
        while start < size {
            let own_len = usize::try_from((size - start).min(segment as u64)).expect("segment");
            jobs.push(Job::Extent {
                file,
                path: path.clone(),
                k,
                start,
                own_len,
                size,
            });
            start += own_len as u64;
            k += 1;
        }
    }
    if !group.is_empty() {
        jobs.push(Job::Group(group));
    }
    jobs
}

/// How many extents a file of `size` bytes has under [`plan`] (0 for small files).
#[must_use]
pub fn extents_of(size: u64, segment: usize) -> u64 {
    if size <= segment as u64 {
        0
    } else {
        size.div_ceil(segment as u64)
    }
}

/// A file of a group, read.
#[derive(Debug)]
pub struct FileRead {
    pub file: usize,
    /// (bytes read, where they are), or why it could not be read.
    pub result: Result<(u64, Stored), String>,
    /// The file had more bytes than at walk time: the walk-time prefix was kept.
    pub grew: bool,
}

/// Where a file's bytes went.
#[derive(Debug)]
pub enum Stored {
    /// Its own chunks, in order.
    Chunks(Vec<Chunk>),
    /// `size` bytes at `offset` in bundle number `bundle` of the group.
    Bundled { bundle: usize, offset: u64 },
}

/// Files smaller than this (and not empty) go into bundles with their neighbours in the group.
pub const BUNDLE_FILE_MAX: usize = 16 << 10;
/// A bundle is closed once it holds this much.
pub const BUNDLE_TARGET: usize = 64 << 10;

/// A file of a group as read: (file, (bytes read, its cuts or (bundle, offset), grew) or the
/// error).
type GroupRead = (
    usize,
    Result<(u64, Result<Vec<Cut>, (usize, usize)>, bool), String>,
);

/// Bundle limits for chunker maximum `max`: a bundle never exceeds `max`.
fn bundle_limits(max: usize) -> (usize, usize) {
    (BUNDLE_FILE_MAX.min(max / 4), BUNDLE_TARGET.min(max / 2))
}

/// What a reader produces.
#[derive(Debug)]
pub enum Output {
    /// The files of a group, and the bundles their small files were packed into.
    Group {
        files: Vec<FileRead>,
        bundles: Vec<Chunk>,
    },
    Extent {
        file: usize,
        k: u64,
        result: Result<Extent, String>,
    },
}

/// Reads up to `want` bytes of `f` after the filled part of `buf`; returns how many it got and
/// whether the file had more.
fn read_prefix(f: &mut File, buf: &mut Buf, want: u64) -> std::io::Result<(usize, bool)> {
    let at = buf.used;
    let want = usize::try_from(want).map_err(std::io::Error::other)?;
    let mut got = 0;
    while got < want {
        match f.read(&mut buf.data[at + got..at + want]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.used = at + got;
    let mut probe = [0u8; 1];
    let grew = got == want && matches!(f.read(&mut probe), Ok(n) if n > 0);
    Ok((got, grew))
}

/// Runs one job with `buf` (an empty pooled buffer), cutting with `params` and hashing with
/// `dedup_key`.
pub fn run(
    job: Job,
    mut buf: Buf,
    pool: &Arc<BufPool>,
    params: ChunkerParams,
    dedup_key: &[u8; 32],
) -> Output {
    match job {
        Job::Group(files) => {
            let (small, target) = bundle_limits(params.max as usize);
            // Small files land next to each other in the buffer (a failed read adds nothing),
            // so a run of them is one contiguous slice: a bundle. The runs depend only on the
            // files and their order, so the same tree bundles the same way (dedup holds).
            let mut bundles: Vec<(usize, usize)> = Vec::new(); // (start, end) in the buffer
            let mut open: Option<usize> = None;
            let mut read: Vec<GroupRead> = Vec::with_capacity(files.len());
            for (file, path, size) in files {
                let room = (pool.capacity() - buf.used) as u64;
                let r = File::open(&path)
                    .and_then(|mut f| read_prefix(&mut f, &mut buf, size.min(room)))
                    .map(|(got, grew)| {
                        let at = buf.used - got;
                        if got > 0 && got < small {
                            let start = *open.get_or_insert(at);
                            let b = bundles.len();
                            if buf.used - start >= target {
                                bundles.push((start, buf.used));
                                open = None;
                            }
                            return (got as u64, Err((b, at - start)), grew);
                        }
                        if let Some(start) = open.take() {
                            bundles.push((start, at));
                        }
                        let mut cuts = cut(&buf.data[at..buf.used], got, params, dedup_key);
                        for c in &mut cuts {
                            c.offset += at;
                        }
                        (got as u64, Ok(cuts), grew)
                    })
                    .map_err(|e| e.to_string());
                read.push((file, r));
            }
            if let Some(start) = open.take() {
                bundles.push((start, buf.used));
            }
            let bundle_cuts: Vec<Cut> = bundles
                .iter()
                .map(|&(a, b)| Cut {
                    offset: a,
                    len: b - a,
                    id: coffer_proto::chunk_id(dedup_key, &buf.data[a..b]),
                })
                .collect();
            let data = freeze(buf, pool);
            Output::Group {
                files: read
                    .into_iter()
                    .map(|(file, r)| match r {
                        Ok((n, Ok(cuts), grew)) => FileRead {
                            file,
                            result: Ok((
                                n,
                                Stored::Chunks(crate::chunk::chunk_slice(&data, &cuts)),
                            )),
                            grew,
                        },
                        Ok((n, Err((bundle, offset)), grew)) => FileRead {
                            file,
                            result: Ok((
                                n,
                                Stored::Bundled {
                                    bundle,
                                    offset: offset as u64,
                                },
                            )),
                            grew,
                        },
                        Err(e) => FileRead {
                            file,
                            result: Err(e),
                            grew: false,
                        },
                    })
                    .collect(),
                bundles: crate::chunk::chunk_slice(&data, &bundle_cuts),
            }
        }
        Job::Extent {
            file,
            path,
            k,
            start,
            own_len,
            size,
        } => {
            let end = (start + own_len as u64 + u64::from(params.max)).min(size);
            let len = usize::try_from(end - start).expect("extent fits a buffer");
            let result = File::open(&*path)
                .and_then(|f| f.read_exact_at(&mut buf.data[..len], start))
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "file shrank while it was being read".to_string()
                    } else {
                        e.to_string()
                    }
                })
                .map(|()| {
                    buf.used = len;
                    cut(buf.filled(), own_len, params, dedup_key)
                });
            let result = match result {
                Ok(cuts) => Ok(Extent {
                    start,
                    own_len,
                    data: freeze(buf, pool),
                    cuts,
                }),
                Err(e) => {
                    pool.give(buf);
                    Err(e)
                }
            };
            Output::Extent { file, k, result }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_the_pool_when_the_last_chunk_drops() {
        let pool = BufPool::new(2, 64);
        let mut a = pool.try_take().unwrap();
        a.data[..5].copy_from_slice(b"chunk");
        a.used = 5;
        let b = pool.try_take().unwrap();
        assert!(pool.try_take().is_none(), "two buffers only");
        let shared = freeze(a, &pool);
        let chunk = shared.slice(1..3);
        drop(shared);
        assert!(pool.try_take().is_none(), "a chunk still holds the buffer");
        drop(chunk);
        assert!(pool.try_take().is_some());
        pool.give(b);
        assert!(pool.try_take().is_some());
    }

    #[test]
    fn plan_groups_small_files_and_splits_big_ones() {
        let files = vec![
            (0, PathBuf::from("a"), 10),
            (1, PathBuf::from("b"), 95),
            (2, PathBuf::from("big"), 250),
            (3, PathBuf::from("c"), 0),
        ];
        let jobs = plan(files, 100, 100);
        let groups: Vec<Vec<usize>> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Group(g) => Some(g.iter().map(|f| f.0).collect()),
                Job::Extent { .. } => None,
            })
            .collect();
        assert_eq!(groups, vec![vec![0], vec![1, 3]]);
        let extents: Vec<(u64, u64, usize)> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Extent {
                    k, start, own_len, ..
                } => Some((*k, *start, *own_len)),
                Job::Group(_) => None,
            })
            .collect();
        assert_eq!(extents, vec![(0, 0, 100), (1, 100, 100), (2, 200, 50)]);
        assert_eq!(extents_of(250, 100), 3);
        assert_eq!(extents_of(100, 100), 0);
    }
}
