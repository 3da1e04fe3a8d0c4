//! The upload stage: chunks are passed once per backup, gathered into batches of about
//! `batch_bytes`, and each batch runs as a background task (need, then upload: the job
//! `crate::pipeline` hands in) while reading goes on, at most [`UPLOADS_IN_FLIGHT`] at a time.
//! A batch counts once the appliance acknowledged it durable.
//!
//! [`send`] is the upload proper: frames are built (compressed, or a possession proof) on a
//! blocking thread and sent with `PutChunks`.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use coffer_proto::ChunkId;
use tokio::task::{JoinError, JoinSet};

use super::chunk::Chunk;
use super::Progress;
use crate::net::{Codec, Frame, Need, PutStats, Session};
use crate::ClientError;

/// Batches handed to need + upload at the same time (they overlap with reading).
pub const UPLOADS_IN_FLIGHT: usize = 6;

/// A batch closes at this many chunks even when it holds fewer than `batch_bytes`.
const BATCH_CHUNKS: usize = 4096;

/// Builds the frames of `todo` (each chunk compressed with its codec, or a possession proof where
/// the appliance asked for one) off the async threads and uploads them in batches of about
/// `batch_bytes`.
///
/// # Errors
/// RPC failures; [`ClientError::Task`] when the frame builder died.
pub async fn send(
    session: &Session,
    todo: Vec<((Chunk, Codec), Need)>,
    batch_bytes: usize,
) -> Result<PutStats, ClientError> {
    if todo.is_empty() {
        return Ok(PutStats::default());
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
    .await?;
    session.put(frames, batch_bytes).await
}

/// Totals of the uploads of one backup.
#[derive(Debug, Default, Clone, Copy)]
pub struct Uploaded {
    /// Chunks passed in, repeats included.
    pub chunks: u64,
    /// Chunks the appliance stored as new.
    pub new_chunks: u64,
    /// Bytes sent.
    pub bytes: u64,
}

/// Batches chunks and runs `job` (need + upload) on each batch in the background.
pub struct Uploads<'a, F> {
    session: &'a Session,
    zstd_level: Option<i32>,
    /// Every file as LZ4 (when the appliance accepts it).
    lz4_all: bool,
    batch_bytes: usize,
    seen: HashSet<ChunkId>,
    /// Chunks to send, each with its compression (see [`Session::codec_for`]).
    pending: Vec<(Chunk, Codec)>,
    pending_bytes: usize,
    in_flight: JoinSet<Result<PutStats, ClientError>>,
    job: F,
    progress: Arc<Progress>,
    totals: Uploaded,
}

impl<'a, F, Fut> Uploads<'a, F>
where
    F: FnMut(Vec<(Chunk, Codec)>) -> Fut,
    Fut: Future<Output = Result<PutStats, ClientError>> + Send + 'static,
{
    /// Uploads through `session`, compressing at `zstd_level`; `job` takes one batch.
    pub fn new(
        session: &'a Session,
        zstd_level: Option<i32>,
        lz4_all: bool,
        batch_bytes: usize,
        progress: Arc<Progress>,
        job: F,
    ) -> Self {
        Self {
            session,
            zstd_level,
            lz4_all,
            batch_bytes,
            seen: HashSet::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            in_flight: JoinSet::new(),
            job,
            progress,
            totals: Uploaded::default(),
        }
    }

    /// Adds a chunk; `extents_of` is the size of its file when that file was read as extents
    /// (it decides the codec). Sends the batch once it is full.
    ///
    /// # Errors
    /// The failure of an earlier batch.
    pub async fn add(&mut self, c: Chunk, extents_of: Option<u64>) -> Result<(), ClientError> {
        let codec = match extents_of {
            // LZ4 for every file: any size counts as one past the LZ4 threshold.
            Some(_) | None if self.lz4_all => {
                self.session.codec_for(self.zstd_level, u64::MAX, true)
            }
            Some(size) => self.session.codec_for(self.zstd_level, size, true),
            None => self.session.codec_for(self.zstd_level, 0, false),
        };
        self.totals.chunks += 1;
        if !self.seen.insert(c.id) {
            return Ok(());
        }
        self.pending_bytes += c.data.len();
        self.pending.push((c, codec));
        if self.pending_bytes >= self.batch_bytes || self.pending.len() >= BATCH_CHUNKS {
            self.flush().await?;
        }
        Ok(())
    }

    fn account(
        &mut self,
        r: Result<Result<PutStats, ClientError>, JoinError>,
    ) -> Result<(), ClientError> {
        let st = r??;
        self.totals.new_chunks += st.stored;
        self.totals.bytes += st.sent_bytes;
        self.progress
            .bytes_uploaded
            .fetch_add(st.sent_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a batch is in flight.
    #[must_use]
    pub fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Whether another batch may start without waiting.
    #[must_use]
    pub fn has_free_slot(&self) -> bool {
        self.in_flight.len() < UPLOADS_IN_FLIGHT
    }

    /// Waits for the next batch in flight and counts it; `None` when none is in flight.
    /// Cancel-safe (for `select!`).
    pub async fn settle_next(&mut self) -> Option<Result<(), ClientError>> {
        let r = self.in_flight.join_next().await?;
        Some(self.account(r))
    }

    /// Hands the pending batch to a background task, waiting first if too many are in flight.
    ///
    /// # Errors
    /// The failure of an earlier batch.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        while !self.has_free_slot() {
            if let Some(r) = self.in_flight.join_next().await {
                self.account(r)?;
            }
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.in_flight.spawn((self.job)(batch));
        Ok(())
    }

    /// Flushes and waits until every batch is acknowledged; returns the totals.
    ///
    /// # Errors
    /// The failure of any batch.
    pub async fn finish(&mut self) -> Result<Uploaded, ClientError> {
        self.flush().await?;
        while let Some(r) = self.in_flight.join_next().await {
            self.account(r)?;
        }
        Ok(self.totals)
    }
}
