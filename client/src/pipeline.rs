//! The client's half of a backup, in order: `walk -> chunk -> hash -> need -> upload`, then the
//! tree objects and the snapshot commit. The only place that spells the order.
//!
//! * walk: parallel stat of the tree ([`crate::walk`]).
//! * read + chunk + hash: reader threads (many: reading is I/O-bound on a cold cache) read small
//!   files many to a buffer and big files as extents, into a fixed pool of buffers
//!   ([`crate::read`]), cut them with FastCDC and hash every chunk ([`crate::chunk`]); extents of
//!   a big file are merged back into its sequential chunking here. The pool bounds memory
//!   whatever the tree or file size.
//! * need: chunks not seen earlier in this run are batched and asked for with `FindMissing`.
//! * upload: only the missing ones are sent (`PutChunks`, zstd when it helps); a batch counts
//!   once the appliance acknowledged it durable.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use coffer_proto::{v1, ChunkId, SnapshotId};
use tokio::sync::mpsc;

use crate::chunk::{Chunk, ChunkerParams, Merge};
use crate::parent::{match_parent, TreeCache};
use crate::read::{self, BufPool, Job, Output, Stored};
use crate::session::{Codec, Frame, Need, Session};
use crate::tree::FileContent;
use crate::walk::walk;
use crate::ClientError;

/// How to back up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// zstd level for uploads (`None`: no compression).
    pub zstd_level: Option<i32>,
    /// Reader/chunker threads.
    pub workers: usize,
    /// Target bytes per need/upload batch.
    pub batch_bytes: usize,
    /// Local tree cache directory (none: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Read every file even when the parent snapshot says it is unchanged.
    pub no_parent: bool,
    /// Counters the caller may display while the backup runs.
    pub progress: Option<Arc<Progress>>,
}

/// Live counters of a running backup (the CLI renders them; the library never prints).
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_uploaded: AtomicU64,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            zstd_level: Some(3),
            // Reading is I/O-bound on a cold cache: many readers beat one per core (16 parallel
            // readers read the Linux tree 2.9x faster than one on the 2-core machine).
            workers: 16,
            batch_bytes: 8 << 20,
            cache_dir: None,
            no_parent: false,
            progress: None,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackupSummary {
    pub snapshot: String,
    pub path: String,
    pub files: u64,
    /// Files not read because the parent snapshot had them unchanged.
    pub files_unchanged: u64,
    pub bytes: u64,
    pub bytes_read: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub uploaded_bytes: u64,
    /// Entries that could not be saved (the snapshot is then partial).
    pub errors: Vec<String>,
    /// Things saved differently than found at walk time (files that grew while being read).
    pub warnings: Vec<String>,
    pub partial: bool,
    pub seconds: f64,
}

enum Msg {
    Read(Output),
    /// A reader found the buffer pool empty: send what is pending.
    Starved,
}

/// A big file whose extents are being merged.
struct FileMerge {
    merge: Merge,
    ids: Vec<ChunkId>,
    failed: bool,
}

/// Read buffers beyond one per reader thread: what the merge and the upload batches may hold
/// while every reader fills one (see `crate::read`). 8 kept the Linux tree's first backup as
/// fast as 200 did, at 155 MB peak RSS instead of 360.
const POOL_SLACK: usize = 8;

/// Own snapshots (newest per path) opened before a backup.
const OPEN_OWN_SNAPSHOTS: usize = 16;

/// Batches handed to need + upload at the same time (they overlap with reading).
const UPLOADS_IN_FLIGHT: usize = 6;

struct Uploader<'a> {
    session: &'a Session,
    opts: &'a BackupOptions,
    seen: HashSet<ChunkId>,
    /// Chunks to send, each with its compression (see [`Session::codec_for`]).
    pending: Vec<(Chunk, Codec)>,
    pending_bytes: usize,
    in_flight: tokio::task::JoinSet<Result<(u64, u64), ClientError>>,
    summary: BackupSummary,
    progress: Arc<Progress>,
}

/// need + upload of one batch: `FindMissing`, then compression and `PutChunks` for the missing
/// ones.
/// Returns (new chunks, bytes sent).
async fn need_and_upload(
    session: Session,
    batch: Vec<(Chunk, Codec)>,
    batch_bytes: usize,
) -> Result<(u64, u64), ClientError> {
    let ids: Vec<ChunkId> = batch.iter().map(|c| c.0.id).collect();
    let needs = session.need(&ids).await?;
    let todo: Vec<((Chunk, Codec), Need)> = batch
        .into_iter()
        .zip(needs)
        .filter(|(_, n)| *n != Need::Present)
        .collect();
    if todo.is_empty() {
        return Ok((0, 0));
    }
    let key = session.possession_key();
    let frames = tokio::task::spawn_blocking(move || {
        todo.into_iter()
            .map(|((c, codec), n)| match n {
                // Stored by someone else: prove we hold it instead of sending it.
                Need::Prove => Frame::proof(c.id, &c.data, &key),
                _ => Frame::new(c.id, c.data, codec),
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let st = session.put(frames, batch_bytes).await?;
    Ok((st.stored, st.sent_bytes))
}

impl Uploader<'_> {
    async fn add(&mut self, c: Chunk) -> Result<(), ClientError> {
        let codec = self.session.codec_for(self.opts.zstd_level, 0, false);
        self.push(c, codec).await
    }

    /// A chunk of a big file (read as extents) of `size` bytes.
    async fn add_big(&mut self, c: Chunk, size: u64) -> Result<(), ClientError> {
        let codec = self.session.codec_for(self.opts.zstd_level, size, true);
        self.push(c, codec).await
    }

    async fn push(&mut self, c: Chunk, codec: Codec) -> Result<(), ClientError> {
        self.summary.chunks += 1;
        if !self.seen.insert(c.id) {
            return Ok(());
        }
        self.pending_bytes += c.data.len();
        self.pending.push((c, codec));
        if self.pending_bytes >= self.opts.batch_bytes || self.pending.len() >= 4096 {
            self.flush().await?;
        }
        Ok(())
    }

    fn account(
        &mut self,
        r: Result<Result<(u64, u64), ClientError>, tokio::task::JoinError>,
    ) -> Result<(), ClientError> {
        let (stored, sent) = r.map_err(|e| ClientError::Protocol(e.to_string()))??;
        self.summary.new_chunks += stored;
        self.summary.uploaded_bytes += sent;
        self.progress
            .bytes_uploaded
            .fetch_add(sent, Ordering::Relaxed);
        Ok(())
    }

    /// Hands the pending batch to a background task, waiting first if too many are in flight.
    async fn flush(&mut self) -> Result<(), ClientError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        while self.in_flight.len() >= UPLOADS_IN_FLIGHT {
            if let Some(r) = self.in_flight.join_next().await {
                self.account(r)?;
            }
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.in_flight.spawn(need_and_upload(
            self.session.clone(),
            batch,
            self.opts.batch_bytes,
        ));
        Ok(())
    }

    /// Flushes and waits until every batch is acknowledged.
    async fn finish(&mut self) -> Result<(), ClientError> {
        self.flush().await?;
        while let Some(r) = self.in_flight.join_next().await {
            self.account(r)?;
        }
        Ok(())
    }
}

/// Backs up the directory `path` and commits a snapshot of it.
///
/// # Errors
/// Connection and RPC failures; `path` not being a readable directory. Unreadable entries inside
/// it do not fail the backup: they are listed in the summary and the snapshot is marked partial.
pub async fn backup(
    session: &Session,
    path: &Path,
    opts: &BackupOptions,
) -> Result<BackupSummary, anyhow::Error> {
    let start = Instant::now();
    let root =
        std::fs::canonicalize(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let root2 = root.clone();
    let w = tokio::task::spawn_blocking(move || walk(&root2))
        .await?
        .map_err(|e| anyhow::anyhow!(e))?;
    let chunker = session
        .hello
        .chunker
        .ok_or_else(|| anyhow::anyhow!("appliance sent no chunker parameters"))?;
    let params = ChunkerParams::from(chunker)
        .validate()
        .map_err(|e| anyhow::anyhow!("the appliance announced {e}"))?;
    let key = *session.dedup_key();
    let cache = TreeCache::new(opts.cache_dir.clone(), key);
    let root_text = root.to_string_lossy().into_owned();

    // parent snapshot: unchanged files keep their chunk lists without being read
    let mut contents: Vec<Option<FileContent>> = vec![None; w.files.len()];
    let mut unchanged = 0;
    // Open the newest snapshot of each of the user's paths (the parent among them): the
    // appliance then counts their chunks as known to this session, so that data this user
    // already backed up, from any path, is not sent again, and the new snapshot may reference
    // it (the appliance refuses references to chunks a session neither sent nor opened).
    let own = session.list("", false).await?;
    let mut newest: HashMap<&str, &v1::Snapshot> = HashMap::new();
    for s in own.iter().filter(|s| !s.partial) {
        newest.insert(&s.path, s);
    }
    let mut newest: Vec<&v1::Snapshot> = newest.into_values().collect();
    newest.sort_by_key(|s| std::cmp::Reverse(s.time_us));
    for s in newest.iter().take(OPEN_OWN_SNAPSHOTS) {
        session.open(&SnapshotId::from_slice(&s.id)?).await?;
    }
    if !opts.no_parent {
        if let Some(parent) = own
            .iter()
            .filter(|s| s.path == root_text)
            .rfind(|s| !s.partial)
        {
            let proot = ChunkId::from_slice(&parent.root)?;
            session.open(&SnapshotId::from_slice(&parent.id)?).await?;
            unchanged = match_parent(session, &cache, &w.root, proot, &mut contents).await?;
        }
    }
    let reused: Vec<bool> = contents.iter().map(Option::is_some).collect();
    let progress = opts.progress.clone().unwrap_or_default();
    progress
        .files_total
        .store(w.files.len() as u64, Ordering::Relaxed);
    progress.bytes_total.store(w.bytes, Ordering::Relaxed);
    for (f, r) in w.files.iter().zip(&reused) {
        if *r || f.same_as.is_some() {
            progress.files_done.fetch_add(1, Ordering::Relaxed);
            if *r && f.same_as.is_none() {
                progress.bytes_done.fetch_add(f.size, Ordering::Relaxed);
            }
        }
    }

    // read + chunk + hash on worker threads, into buffers of a fixed pool
    // Buffers of ~2 MiB: 4 MiB extents wasted fewer cuts (an extent's chunks before it falls in
    // step with the sequential chunking) but raised the Linux tree's peak RSS from 155 to 207 MB
    // for no measurable gain on the 2 GiB image.
    let segment = (2usize << 20).max(4 * params.max as usize);
    let capacity = segment + params.max as usize;
    let cutters = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let pool = BufPool::new(opts.workers + cutters + POOL_SLACK, capacity);
    let jobs = read::plan(
        w.files
            .iter()
            .enumerate()
            .filter(|(i, f)| f.same_as.is_none() && !reused[*i])
            .map(|(i, f)| (i, f.path.clone(), f.size)),
        segment,
        capacity,
    );
    let (tx, mut rx) = mpsc::channel::<Msg>(64);
    // Small files wait on the disk: many readers. Extents of big files wait on the CPU: one
    // cutter per core, so that the extent the merge needs next is never starved of CPU by
    // fifteen later ones.
    let (small_tx, small_rx) = crossbeam_channel::unbounded::<Job>();
    let (big_tx, big_rx) = crossbeam_channel::unbounded::<Job>();
    let (mut n_small, mut n_big) = (0, 0);
    for j in jobs {
        if matches!(j, Job::Group(_)) {
            n_small += 1;
            small_tx.send(j)?;
        } else {
            n_big += 1;
            big_tx.send(j)?;
        }
    }
    drop((small_tx, big_tx));
    let mut workers = Vec::new();
    let queues = [
        (small_rx, opts.workers.max(1).min(n_small)),
        (big_rx, cutters.min(n_big)),
    ];
    for (job_rx, n) in queues {
        for _ in 0..n {
            let (job_rx, tx, pool) = (job_rx.clone(), tx.clone(), pool.clone());
            workers.push(std::thread::spawn(move || loop {
                // A buffer before a job: see crate::read on why this order cannot deadlock.
                let buf = pool.take(|| {
                    let _ = tx.blocking_send(Msg::Starved);
                });
                let Ok(job) = job_rx.recv() else {
                    return;
                };
                let out = read::run(job, buf, &pool, params, &key);
                if tx.blocking_send(Msg::Read(out)).is_err() {
                    return;
                }
            }));
        }
    }
    drop(tx);

    // need + upload
    let mut up = Uploader {
        session,
        opts,
        seen: HashSet::new(),
        pending: Vec::new(),
        pending_bytes: 0,
        in_flight: tokio::task::JoinSet::new(),
        summary: BackupSummary::default(),
        progress: progress.clone(),
    };
    let mut errors: Vec<String> = w
        .errors
        .iter()
        .map(|(p, e)| format!("{}: {e}", p.display()))
        .collect();
    let mut warnings = Vec::new();
    let mut merges: HashMap<usize, FileMerge> = HashMap::new();
    let mut ready = Vec::new();
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
            Some(r) = up.in_flight.join_next(), if !up.in_flight.is_empty() => {
                up.account(r)?;
                Msg::Starved
            }
        };
        match m {
            // Readers wait for buffers that the pending batch may hold: send it once nothing is
            // queued and an upload slot is free (never a deadlock: flushing cannot block then,
            // and every upload that completes comes back here).
            Msg::Starved => {
                if rx.is_empty() && pool.waiting() > 0 && up.in_flight.len() < UPLOADS_IN_FLIGHT {
                    up.flush().await?;
                }
            }
            Msg::Read(Output::Group { files, bundles }) => {
                let bundle_ids: Vec<ChunkId> = bundles.iter().map(|b| b.id).collect();
                for b in bundles {
                    up.add(b).await?;
                }
                for fr in files {
                    let (n, stored) = match fr.result {
                        Ok(r) => r,
                        Err(e) => {
                            errors.push(format!("{}: {e}", w.files[fr.file].path.display()));
                            continue;
                        }
                    };
                    if fr.grew {
                        warnings.push(format!(
                            "{}: grew while it was being read; saved its first {n} bytes",
                            w.files[fr.file].path.display()
                        ));
                    }
                    match stored {
                        Stored::Chunks(chunks) => {
                            contents[fr.file] = Some(FileContent {
                                size: n,
                                chunks: chunks.iter().map(|c| c.id).collect(),
                                bundle: None,
                            });
                            for c in chunks {
                                up.add(c).await?;
                            }
                        }
                        Stored::Bundled { bundle, offset } => {
                            contents[fr.file] = Some(FileContent {
                                size: n,
                                chunks: Vec::new(),
                                bundle: Some((bundle_ids[bundle], offset)),
                            });
                        }
                    }
                    up.summary.bytes_read += n;
                    progress.files_done.fetch_add(1, Ordering::Relaxed);
                    progress.bytes_done.fetch_add(n, Ordering::Relaxed);
                }
            }
            Msg::Read(Output::Extent { file, k, result }) => {
                let st = merges.entry(file).or_insert_with(|| FileMerge {
                    merge: Merge::new(params),
                    ids: Vec::new(),
                    failed: false,
                });
                if st.failed {
                    continue;
                }
                let ext = match result {
                    Ok(ext) => ext,
                    Err(e) => {
                        errors.push(format!("{}: {e}", w.files[file].path.display()));
                        // Drop the extents waiting for this one: their buffers go back.
                        *st = FileMerge {
                            merge: Merge::new(params),
                            ids: Vec::new(),
                            failed: true,
                        };
                        continue;
                    }
                };
                let n = ext.own_len as u64;
                st.merge.push(k, ext, &key, &mut ready);
                st.ids.extend(ready.iter().map(|c| c.id));
                let size = w.files[file].size;
                let done = st.merge.merged() == read::extents_of(size, segment);
                if done {
                    contents[file] = Some(FileContent {
                        size,
                        chunks: std::mem::take(&mut st.ids),
                        bundle: None,
                    });
                    merges.remove(&file);
                    progress.files_done.fetch_add(1, Ordering::Relaxed);
                }
                for c in ready.drain(..) {
                    up.add_big(c, size).await?;
                }
                up.summary.bytes_read += n;
                progress.bytes_done.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
    for h in workers {
        let _ = h.join();
    }
    // Hard links share the chunks of the first link.
    for (i, f) in w.files.iter().enumerate() {
        if let Some(first) = f.same_as {
            let content = contents[first].clone();
            contents[i] = content;
        }
    }
    up.summary.files = contents.iter().filter(|c| c.is_some()).count() as u64;
    up.summary.files_unchanged = unchanged;
    up.summary.bytes = w.bytes;

    // trees, then the commit point
    let mut trees = Vec::new();
    let builder = crate::tree::TreeBuilder {
        dedup_key: &key,
        max_object: params.max as usize,
    };
    let root_id = builder.build(&w.root, &contents, &mut |c| trees.push(c));
    for t in &trees {
        up.add(t.clone()).await?;
    }
    up.finish().await?;
    let partial = !errors.is_empty();
    let mut s = up.summary;
    let snap = v1::Snapshot {
        path: root_text.clone(),
        root: bytes::Bytes::copy_from_slice(root_id.as_bytes()),
        stats: Some(v1::SnapshotStats {
            files: s.files,
            bytes: s.bytes,
            uploaded_bytes: s.uploaded_bytes,
            chunks: s.chunks,
        }),
        partial,
        ..v1::Snapshot::default()
    };
    let id: SnapshotId = session.commit(snap).await?;
    cache.save(&root_text, &trees);
    s.snapshot = id.to_hex();
    s.path = root_text;
    s.errors = errors;
    s.warnings = warnings;
    s.partial = partial;
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}
