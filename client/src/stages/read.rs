//! The read stage: worker threads read files into buffers from a fixed pool ([`super::pool`])
//! and cut ([`super::chunk`]) and hash ([`super::hash`]) them while the bytes are hot.
//!
//! * Small files (up to one segment) are read whole, many to a buffer ([`Job::Group`]): one
//!   buffer per group instead of one allocation per file or chunk.
//! * Big files are split into extents of one segment ([`Job::Extent`]) that any worker reads with
//!   `pread` and cuts, so one big file keeps every core busy; [`super::chunk::Merge`] stitches
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
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffer_proto::{ChunkerParams, DedupKey};
use tokio::sync::mpsc;

use super::chunk::{chunk_slice, cut, Chunk, Cut, Extent};
use super::pool::{freeze, Buf, BufPool};

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

/// Bytes of one extent of a big file, and the most that a group of small files holds (plus
/// `max`, the buffer size), for chunker sizes `params`.
#[must_use]
pub fn segment(params: ChunkerParams) -> usize {
    // Buffers of ~2 MiB: 4 MiB extents wasted fewer cuts (an extent's chunks before it falls in
    // step with the sequential chunking) but raised the Linux tree's peak RSS from 155 to 207 MB
    // for no measurable gain on the 2 GiB image.
    (2usize << 20).max(4 * params.max as usize)
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
    pub result: Result<(u64, Stored), std::io::Error>,
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
    Result<(u64, Result<Vec<Cut>, (usize, usize)>, bool), std::io::Error>,
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
        result: Result<Extent, std::io::Error>,
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
    dedup_key: &DedupKey,
) -> Output {
    match job {
        Job::Group(files) => read_group(files, buf, pool, params, dedup_key),
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
            let result = match read_at(&path, &mut buf, start, len) {
                Ok(()) => {
                    let cuts = cut(buf.filled(), own_len, params, dedup_key);
                    Ok(Extent {
                        start,
                        own_len,
                        data: freeze(buf, pool),
                        cuts,
                    })
                }
                Err(e) => {
                    pool.give(buf);
                    Err(e)
                }
            };
            Output::Extent { file, k, result }
        }
    }
}

/// Reads small files whole into `buf`, one after the other. Files below the bundle limit that
/// land next to each other form a bundle; the others are cut on their own.
fn read_group(
    files: Vec<(usize, PathBuf, u64)>,
    mut buf: Buf,
    pool: &Arc<BufPool>,
    params: ChunkerParams,
    dedup_key: &DedupKey,
) -> Output {
    let (small, target) = bundle_limits(params.max as usize);
    // Small files land next to each other in the buffer (a failed read adds nothing), so a run
    // of them is one contiguous slice: a bundle. The runs depend only on the files and their
    // order, so the same tree bundles the same way (dedup holds).
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
            });
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
    let files = read
        .into_iter()
        .map(|(file, r)| match r {
            Ok((n, Ok(cuts), grew)) => FileRead {
                file,
                result: Ok((n, Stored::Chunks(chunk_slice(&data, &cuts)))),
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
        .collect();
    Output::Group {
        files,
        bundles: chunk_slice(&data, &bundle_cuts),
    }
}

/// Reads `len` bytes of `path` at `start` into `buf` with `pread`.
fn read_at(path: &Path, buf: &mut Buf, start: u64, len: usize) -> std::io::Result<()> {
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf.data[..len], start))
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(e.kind(), "file shrank while it was being read")
            } else {
                e
            }
        })?;
    buf.used = len;
    Ok(())
}

/// What a reader thread sends to the pipeline.
#[derive(Debug)]
pub enum Msg {
    Read(Output),
    /// A reader found the buffer pool empty: send what is pending.
    Starved,
}

/// Read buffers beyond one per reader thread: what the merge and the upload batches may hold
/// while every reader fills one. 8 kept the Linux tree's first backup as fast as 200 did, at
/// 155 MB peak RSS instead of 360.
const POOL_SLACK: usize = 8;

/// The reader threads of one backup and the pool they fill.
#[derive(Debug)]
pub struct Readers {
    rx: mpsc::Receiver<Msg>,
    pool: Arc<BufPool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    /// Starts reading `files` ((index, path, size at walk time)): small files on `workers` reader
    /// threads, extents of big files on one cutter thread per core; chunks are cut with `params`
    /// and hashed with `dedup_key`.
    pub fn start(
        files: impl IntoIterator<Item = (usize, PathBuf, u64)>,
        workers: usize,
        params: ChunkerParams,
        dedup_key: DedupKey,
    ) -> Self {
        let segment = segment(params);
        let capacity = segment + params.max as usize;
        let cutters = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let pool = BufPool::new(workers + cutters + POOL_SLACK, capacity);
        let (tx, rx) = mpsc::channel::<Msg>(64);
        // Small files wait on the disk: many readers. Extents of big files wait on the CPU: one
        // cutter per core, so that the extent the merge needs next is never starved of CPU by
        // fifteen later ones.
        let (small_tx, small_rx) = crossbeam_channel::unbounded::<Job>();
        let (big_tx, big_rx) = crossbeam_channel::unbounded::<Job>();
        let (mut n_small, mut n_big) = (0, 0);
        for j in plan(files, segment, capacity) {
            let queue = if matches!(j, Job::Group(_)) {
                n_small += 1;
                &small_tx
            } else {
                n_big += 1;
                &big_tx
            };
            queue.send(j).expect("the receiving end is held here");
        }
        drop((small_tx, big_tx));
        let mut threads = Vec::new();
        let queues = [
            (small_rx, workers.max(1).min(n_small)),
            (big_rx, cutters.min(n_big)),
        ];
        for (job_rx, n) in queues {
            for _ in 0..n {
                let (job_rx, tx, pool) = (job_rx.clone(), tx.clone(), pool.clone());
                threads.push(std::thread::spawn(move || loop {
                    // A buffer before a job: see the module doc on why this order cannot
                    // deadlock.
                    let buf = pool.take(|| {
                        let _ = tx.blocking_send(Msg::Starved);
                    });
                    let Ok(job) = job_rx.recv() else {
                        return;
                    };
                    let out = run(job, buf, &pool, params, &dedup_key);
                    if tx.blocking_send(Msg::Read(out)).is_err() {
                        return;
                    }
                }));
            }
        }
        Self { rx, pool, threads }
    }

    /// The next message of any reader; `None` once every reader is done.
    pub async fn next(&mut self) -> Option<Msg> {
        self.rx.recv().await
    }

    /// Readers wait for a buffer and nothing they read is queued: the buffers are held by the
    /// merge or the pending upload batch.
    #[must_use]
    pub fn starved(&self) -> bool {
        self.rx.is_empty() && self.pool.waiting() > 0
    }

    /// Waits for the reader threads to exit (after [`Readers::next`] returned `None`).
    pub fn join(self) {
        for h in self.threads {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
