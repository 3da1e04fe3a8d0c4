//! The client's half of a backup, in order: `walk -> read -> chunk -> hash -> need -> upload`,
//! then the tree objects and the snapshot commit. The only place that spells the order; each
//! stage lives in `crate::stages`, the snapshot side in `crate::snapshot`.
//!
//! * walk: parallel stat of the tree ([`crate::stages::walk`]); the parent snapshot then tells
//!   which files are unchanged and need not be read ([`crate::snapshot::parent`]).
//! * read + chunk + hash: reader threads (many: reading is I/O-bound on a cold cache) read small
//!   files many to a buffer and big files as extents, into a fixed pool of buffers, cut them
//!   with FastCDC and hash every chunk; extents of a big file are merged back into its
//!   sequential chunking ([`crate::stages::contents`]). The pool bounds memory whatever the
//!   tree or file size.
//! * need: chunks not seen earlier in this run are batched and asked for with `FindMissing`.
//! * upload: only the missing ones are sent (`PutChunks`, zstd when it helps); a batch counts
//!   once the appliance acknowledged it durable.
//! * trees, uploaded like any chunk, then the commit point ([`crate::snapshot::commit`]).

use crate::policy::{BackupPolicy, Left};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use coffer_proto::{v1, ChunkerParams};

use crate::net::{Codec, PutStats, Session};
use crate::snapshot::seen::Seen;
use crate::snapshot::{commit, parent, TreeCache};
use crate::stages::chunk::Chunk;
use crate::stages::contents::Contents;
use crate::stages::read::{Msg, Readers};
use crate::stages::upload::{self, Uploads};
use crate::stages::{need, walk, Progress};
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
    /// Where the last snapshot of each path is remembered (none: not remembered), to warn
    /// when the appliance's history goes back (`snapshot::seen`).
    pub state_dir: Option<PathBuf>,
    /// Read every file even when the parent snapshot says it is unchanged.
    pub no_parent: bool,
    /// Counters the caller may display while the backup runs.
    pub progress: Option<Arc<Progress>>,
    /// The appliance's policy for the path: what the walk leaves out (excludes, caches, other
    /// file systems, large files). Its compression is applied by the caller (`zstd_level`,
    /// `lz4_all`).
    pub policy: BackupPolicy,
    /// Every file as LZ4 when the appliance accepts it (policy `compression: lz4`).
    pub lz4_all: bool,
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
            state_dir: None,
            no_parent: false,
            progress: None,
            policy: BackupPolicy::default(),
            lz4_all: false,
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

/// Backs up the directory `path` and commits a snapshot of it.
///
/// # Errors
/// Connection and RPC failures; `path` not being a readable directory. Unreadable entries inside
/// it do not fail the backup: they are listed in the summary and the snapshot is marked partial.
pub async fn backup(
    session: &Session,
    path: &Path,
    opts: &BackupOptions,
) -> Result<BackupSummary, ClientError> {
    let start = Instant::now();
    let root = std::fs::canonicalize(path).map_err(|e| ClientError::io("read", path, e))?;
    let root_text = root.to_string_lossy().into_owned();
    // walk
    // Built on the root the walk uses, so that every path it matches lies under it.
    let filter = opts.policy.filter(&root)?;
    let w = tokio::task::spawn_blocking(move || walk::walk(&root, &filter)).await??;
    let params = chunker_params(session)?;
    let key = *session.dedup_key();
    let cache = TreeCache::new(opts.cache_dir.clone(), key);
    let parent::Reused {
        contents: reused,
        unchanged,
        own,
        warnings: reuse_warnings,
    } = parent::reuse(
        session,
        &cache,
        &w,
        &root_text,
        // A write-only account may not list or open its earlier snapshots: every file is
        // read (the appliance still deduplicates what it holds).
        opts.no_parent || session.write_only(),
    )
    .await?;
    let mut seen = Seen::load(
        opts.state_dir.as_deref(),
        &hex::encode(&session.hello.repository_id),
        &session.hello.identity,
    );
    let went_back = seen.check(&root_text, &own);

    // read + chunk + hash on reader threads, into buffers of a fixed pool
    let progress = opts.progress.clone().unwrap_or_default();
    let mut files = Contents::new(&w, reused, params, key, progress.clone());
    let mut readers = Readers::start(files.to_read(), opts.workers, params, key);

    // need + upload, batch by batch, while reading goes on
    let batch_bytes = opts.batch_bytes;
    let mut up = Uploads::new(
        session,
        opts.zstd_level,
        opts.lz4_all,
        batch_bytes,
        progress,
        |batch| need_and_upload(session.clone(), batch, batch_bytes),
    );
    gather(&mut readers, &mut files, &mut up).await?;
    readers.join();
    let read = files.finish();

    // trees, then the commit point
    let (root_id, trees) = commit::build_trees(&key, session.max_object(), &w.root, &read.contents);
    for t in &trees {
        up.add(t.clone(), None).await?;
    }
    let sent = up.finish().await?;
    let files = read.contents.iter().filter(|c| c.is_some()).count() as u64;
    let partial = !read.errors.is_empty();
    let stats = v1::SnapshotStats {
        files,
        bytes: w.bytes,
        uploaded_bytes: sent.bytes,
        chunks: sent.chunks,
    };
    let id = commit::commit(session, &cache, &root_text, root_id, &trees, stats, partial).await?;
    let mut warnings = reuse_warnings;
    warnings.extend(went_back);
    match session.snapshot(&id).await {
        _ if session.write_only() => {}
        Ok(s) => {
            if let Err(e) = seen.record(&root_text, &id.to_hex(), s.time_us) {
                warnings.push(format!(
                    "cannot remember this snapshot for the next backup's history check: {e}"
                ));
            }
        }
        Err(e) => warnings.push(format!("cannot read back the committed snapshot: {e}")),
    }
    Ok(BackupSummary {
        snapshot: id.to_hex(),
        path: root_text,
        files,
        files_unchanged: unchanged,
        bytes: w.bytes,
        bytes_read: read.bytes_read,
        chunks: sent.chunks,
        new_chunks: sent.new_chunks,
        uploaded_bytes: sent.bytes,
        errors: read.errors,
        warnings: {
            warnings.extend(read.warnings);
            warnings.extend(left_out_warnings(&w.left_out, w.left_out_total));
            warnings
        },
        partial,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What the policy left out, as warnings: every path up to 20, then a count.
fn left_out_warnings(left: &[(std::path::PathBuf, Left)], total: u64) -> Vec<String> {
    let mut out: Vec<String> = left
        .iter()
        .map(|(p, why)| {
            let why = match why {
                Left::Excluded => "excluded by the policy",
                Left::CacheDir => "a cache directory (CACHEDIR.TAG)",
                Left::OtherFileSystem => "on another file system (one_file_system)",
                Left::TooLarge => "larger than the policy's max_file_size",
            };
            format!("left out {}: {why}", p.display())
        })
        .collect();
    let shown = left.len() as u64;
    if total > shown {
        out.push(format!(
            "left out {} more entries by the policy",
            total - shown
        ));
    }
    out
}

/// The chunker sizes the appliance announced in `Hello`, checked.
fn chunker_params(session: &Session) -> Result<ChunkerParams, ClientError> {
    let announced = session
        .hello
        .chunker
        .ok_or_else(|| ClientError::Protocol("Hello without chunker parameters".into()))?;
    ChunkerParams::from(announced)
        .validate()
        .map_err(|e| ClientError::Protocol(format!("Hello announced {e}")))
}

/// need + upload of one batch: what the appliance lacks (or wants proved), then only that.
async fn need_and_upload(
    session: Session,
    batch: Vec<(Chunk, Codec)>,
    batch_bytes: usize,
) -> Result<PutStats, ClientError> {
    let todo = need::needed(&session, batch).await?;
    upload::send(&session, todo, batch_bytes).await
}

/// Moves every chunk the readers produce on to need + upload, until the readers are done.
async fn gather<F, Fut>(
    readers: &mut Readers,
    files: &mut Contents<'_>,
    up: &mut Uploads<'_, F>,
) -> Result<(), ClientError>
where
    F: FnMut(Vec<(Chunk, Codec)>) -> Fut,
    Fut: std::future::Future<Output = Result<PutStats, ClientError>> + Send + 'static,
{
    loop {
        let m = tokio::select! {
            m = readers.next() => match m {
                Some(m) => m,
                None => return Ok(()),
            },
            Some(r) = up.settle_next(), if up.busy() => {
                r?;
                Msg::Starved
            }
        };
        match m {
            // Readers wait for buffers that the pending batch may hold: send it once nothing is
            // queued and an upload slot is free (never a deadlock: flushing cannot block then,
            // and every upload that completes comes back here).
            Msg::Starved => {
                if readers.starved() && up.has_free_slot() {
                    up.flush().await?;
                }
            }
            Msg::Read(out) => {
                for (chunk, extents_of) in files.take(out) {
                    up.add(chunk, extents_of).await?;
                }
            }
        }
    }
}
