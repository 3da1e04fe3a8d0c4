//! Gathers what the readers produced into each file's content: the chunk list of a file read
//! whole, the bundle slot of a small one, and for a big file read as extents, its sequential
//! chunking stitched back together by [`Merge`] as the extents arrive in any order.
//!
//! It also counts: bytes read, files done (into [`Progress`]), and the entries that could not be
//! saved or changed while being read. It hands every chunk on, in file order, for need + upload;
//! it never sends anything itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use coffer_proto::{ChunkId, ChunkerParams, DedupKey};

use super::chunk::{Chunk, Extent, Merge};
use super::read::{extents_of, segment, FileRead, Output, Stored};
use super::walk::Walk;
use super::Progress;
use crate::snapshot::FileContent;

/// A chunk to hand on, with the size of its file when that file was read as extents (the codec
/// depends on it: see [`crate::net::Session::codec_for`]).
pub type Ready = (Chunk, Option<u64>);

/// A big file whose extents are being merged.
struct FileMerge {
    merge: Merge,
    ids: Vec<ChunkId>,
    failed: bool,
}

/// Every file's content as it becomes known.
pub struct Contents<'w> {
    walk: &'w Walk,
    by_file: Vec<Option<FileContent>>,
    merges: HashMap<usize, FileMerge>,
    params: ChunkerParams,
    dedup_key: DedupKey,
    segment: usize,
    progress: Arc<Progress>,
    read: FilesRead,
}

/// What reading found, once every reader is done.
#[derive(Debug, Default)]
pub struct FilesRead {
    /// The content of every file (`None`: could not be read; the entry is left out).
    pub contents: Vec<Option<FileContent>>,
    /// Entries that could not be saved, as `path: reason` (the snapshot is then partial).
    pub errors: Vec<String>,
    /// Things saved differently than found at walk time (files that grew while being read).
    pub warnings: Vec<String>,
    pub bytes_read: u64,
}

impl<'w> Contents<'w> {
    /// Starts from `reused` (the files the parent snapshot has unchanged) and counts what is
    /// already done into `progress`.
    pub fn new(
        walk: &'w Walk,
        reused: Vec<Option<FileContent>>,
        params: ChunkerParams,
        dedup_key: DedupKey,
        progress: Arc<Progress>,
    ) -> Self {
        progress
            .files_total
            .store(walk.files.len() as u64, Ordering::Relaxed);
        progress.bytes_total.store(walk.bytes, Ordering::Relaxed);
        for (f, r) in walk.files.iter().zip(&reused) {
            if r.is_some() || f.same_as.is_some() {
                progress.files_done.fetch_add(1, Ordering::Relaxed);
                if r.is_some() && f.same_as.is_none() {
                    progress.bytes_done.fetch_add(f.size, Ordering::Relaxed);
                }
            }
        }
        let errors = walk
            .errors
            .iter()
            .map(|(p, e)| format!("{}: {e}", p.display()))
            .collect();
        Self {
            walk,
            by_file: reused,
            merges: HashMap::new(),
            params,
            dedup_key,
            segment: segment(params),
            progress,
            read: FilesRead {
                errors,
                ..FilesRead::default()
            },
        }
    }

    /// The files to read: (index, path, size at walk time) of every file that is neither known
    /// from the parent nor a later hard link of an earlier file.
    #[must_use]
    pub fn to_read(&self) -> Vec<(usize, PathBuf, u64)> {
        self.walk
            .files
            .iter()
            .enumerate()
            .filter(|(i, f)| f.same_as.is_none() && self.by_file[*i].is_none())
            .map(|(i, f)| (i, f.path.clone(), f.size))
            .collect()
    }

    /// Takes one reader's output; returns the chunks that became final, in file order.
    pub fn take(&mut self, out: Output) -> Vec<Ready> {
        match out {
            Output::Group { files, bundles } => self.take_group(files, bundles),
            Output::Extent { file, k, result } => self.take_extent(file, k, result),
        }
    }

    fn take_group(&mut self, files: Vec<FileRead>, bundles: Vec<Chunk>) -> Vec<Ready> {
        let bundle_ids: Vec<ChunkId> = bundles.iter().map(|b| b.id).collect();
        let mut ready: Vec<Ready> = bundles.into_iter().map(|b| (b, None)).collect();
        for fr in files {
            let path = &self.walk.files[fr.file].path;
            let (n, stored) = match fr.result {
                Ok(r) => r,
                Err(e) => {
                    self.read.errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if fr.grew {
                self.read.warnings.push(format!(
                    "{}: grew while it was being read; saved its first {n} bytes",
                    path.display()
                ));
            }
            self.by_file[fr.file] = Some(match stored {
                Stored::Chunks(chunks) => {
                    let ids = chunks.iter().map(|c| c.id).collect();
                    ready.extend(chunks.into_iter().map(|c| (c, None)));
                    FileContent {
                        size: n,
                        chunks: ids,
                        bundle: None,
                    }
                }
                Stored::Bundled { bundle, offset } => FileContent {
                    size: n,
                    chunks: Vec::new(),
                    bundle: Some((bundle_ids[bundle], offset)),
                },
            });
            self.read.bytes_read += n;
            self.progress.files_done.fetch_add(1, Ordering::Relaxed);
            self.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
        }
        ready
    }

    fn take_extent(
        &mut self,
        file: usize,
        k: u64,
        result: Result<Extent, std::io::Error>,
    ) -> Vec<Ready> {
        let params = self.params;
        let st = self.merges.entry(file).or_insert_with(|| FileMerge {
            merge: Merge::new(params),
            ids: Vec::new(),
            failed: false,
        });
        if st.failed {
            return Vec::new();
        }
        let ext = match result {
            Ok(ext) => ext,
            Err(e) => {
                let path = &self.walk.files[file].path;
                self.read.errors.push(format!("{}: {e}", path.display()));
                // Drop the extents waiting for this one: their buffers go back.
                *st = FileMerge {
                    merge: Merge::new(params),
                    ids: Vec::new(),
                    failed: true,
                };
                return Vec::new();
            }
        };
        let n = ext.own_len as u64;
        let mut chunks = Vec::new();
        st.merge.push(k, ext, &self.dedup_key, &mut chunks);
        st.ids.extend(chunks.iter().map(|c| c.id));
        let size = self.walk.files[file].size;
        if st.merge.merged() == extents_of(size, self.segment) {
            self.by_file[file] = Some(FileContent {
                size,
                chunks: std::mem::take(&mut st.ids),
                bundle: None,
            });
            self.merges.remove(&file);
            self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        }
        self.read.bytes_read += n;
        self.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
        chunks.into_iter().map(|c| (c, Some(size))).collect()
    }

    /// Once every reader is done: hard links get the content of their first link.
    #[must_use]
    pub fn finish(mut self) -> FilesRead {
        for (i, f) in self.walk.files.iter().enumerate() {
            if let Some(first) = f.same_as {
                let content = self.by_file[first].clone();
                self.by_file[i] = content;
            }
        }
        self.read.contents = self.by_file;
        self.read
    }
}
