//! The mount's optional disk cache (`--disk-cache DIR`): chunks read, kept on local disk beyond
//! what the memory cache holds, so that reading a large working set again does not fetch it
//! again.
//!
//! * Each chunk is one file, `<id in hex>`, sealed with AES-256-GCM under a key that exists only
//!   in this process (random nonce first, the chunk id as associated data). Nothing on disk is
//!   readable without the running mount — not in a sealed repository either — and a file that
//!   was altered or swapped for another chunk's fails to open and is fetched again.
//! * The files live in a directory of their own, `DIR/mount-<pid>-<random>`, created 0700 and
//!   removed at unmount; one left by a mount that died is removed by the next mount using DIR.
//! * Bounded in bytes, the least recently used file deleted first. Writes happen in the
//!   background, at most [`WRITES_IN_FLIGHT`] batches at once: a read that fetched more waits
//!   for one to finish, so a disk slower than the network slows reads down rather than letting
//!   chunks waiting to be written pile up in memory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use coffer_proto::ChunkId;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::cache::Lru;
use crate::ClientError;

/// Batches of chunks being written at once.
pub(super) const WRITES_IN_FLIGHT: usize = 4;

pub(super) struct DiskCache {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
    /// Chunk id -> size of its file.
    index: Mutex<Lru<()>>,
    writes: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DiskCache {
    /// A new cache of at most `limit` bytes in a directory of its own under `parent` (created
    /// if missing); directories of mounts no longer running are removed first.
    ///
    /// # Errors
    /// `parent` cannot be created or written.
    pub(super) fn create(parent: &Path, limit: u64) -> Result<Self, ClientError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |e| ClientError::io("create the disk cache in", parent, e);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io)?;
        remove_stale(parent);
        let rng = SystemRandom::new();
        let mut key = [0u8; 32];
        let mut tag = [0u8; 8];
        rng.fill(&mut key)
            .and_then(|()| rng.fill(&mut tag))
            .map_err(|_| ClientError::Mount("no randomness for the disk cache key".into()))?;
        let dir = parent.join(format!("mount-{}-{}", std::process::id(), hex::encode(tag)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io)?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("32-byte key"));
        Ok(Self {
            dir,
            key,
            rng,
            index: Mutex::new(Lru::new(limit)),
            writes: Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT)),
        })
    }

    /// Where the files are.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// The chunk, when a file of it is here and opens.
    pub(super) async fn get(&self, id: &ChunkId) -> Option<Bytes> {
        lock(&self.index).get(id)?;
        let opened = tokio::fs::read(self.path(id))
            .await
            .ok()
            .and_then(|sealed| self.open(id, sealed));
        if opened.is_none() {
            // Gone (evicted meanwhile) or damaged: forgotten, fetched again.
            lock(&self.index).remove(id);
            let _ = tokio::fs::remove_file(self.path(id)).await;
        }
        opened
    }

    fn open(&self, id: &ChunkId, mut sealed: Vec<u8>) -> Option<Bytes> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let mut body = sealed.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&sealed).ok()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut body)
            .ok()?;
        let n = plain.len();
        body.truncate(n);
        Some(Bytes::from(body))
    }

    fn seal(&self, id: &ChunkId, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut body,
            )
            .ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + body.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Writes `chunks` in the background, once fewer than [`WRITES_IN_FLIGHT`] batches are
    /// being written.
    pub(super) async fn put_later(self: &Arc<Self>, chunks: Vec<(ChunkId, Bytes)>) {
        let Ok(permit) = self.writes.clone().acquire_owned().await else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            for (id, b) in chunks {
                me.put(&id, &b).await;
            }
            drop(permit);
        });
    }

    /// Writes one chunk (best effort: a failed write only means a later read fetches it).
    pub(super) async fn put(&self, id: &ChunkId, plain: &[u8]) {
        if lock(&self.index).contains(id) {
            return;
        }
        let Some(sealed) = self.seal(id, plain) else {
            return;
        };
        let mut tmp = [0u8; 8];
        if self.rng.fill(&mut tmp).is_err() {
            return;
        }
        let tmp = self
            .dir
            .join(format!(".{}.{}", id.to_hex(), hex::encode(tmp)));
        let size = sealed.len() as u64;
        if tokio::fs::write(&tmp, sealed).await.is_err()
            || tokio::fs::rename(&tmp, self.path(id)).await.is_err()
        {
            let _ = tokio::fs::remove_file(&tmp).await;
            return;
        }
        let dropped = lock(&self.index).put(*id, (), size);
        for old in dropped {
            let _ = tokio::fs::remove_file(self.path(&old)).await;
        }
    }

    /// Removes the directory and everything in it.
    pub(super) fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes `parent/mount-<pid>-*` directories whose process is gone.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mount-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::from_slice(&[n; 32]).unwrap()
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn chunks_come_back_sealed_bounded_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("cache");
        // A directory left by a process that is gone, and one of a live process (this one).
        let stale = parent.join("mount-4000000000-00");
        let live = parent.join(format!("mount-{}-00", std::process::id()));
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        let c = DiskCache::create(&parent, 3 * 1100).unwrap();
        let mode = std::fs::metadata(c.dir()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        assert!(!stale.exists(), "a dead mount's cache is removed");
        assert!(live.exists(), "a running mount's cache is kept");

        let plain = |n: u8| vec![n; 1000];
        for n in 1..=3 {
            c.put(&id(n), &plain(n)).await;
        }
        assert_eq!(c.get(&id(1)).await.as_deref(), Some(&plain(1)[..]));
        // Sealed: no plaintext on disk.
        for f in files(c.dir()) {
            let b = std::fs::read(&f).unwrap();
            assert!(
                !b.windows(16).any(|w| w.iter().all(|x| *x == w[0])),
                "{f:?}"
            );
        }
        // Bounded: 4 does not fit with three others; 2 is the least recently used.
        c.put(&id(4), &plain(4)).await;
        assert_eq!(files(c.dir()).len(), 3);
        assert_eq!(c.get(&id(2)).await, None);
        assert!(c.get(&id(3)).await.is_some() && c.get(&id(4)).await.is_some());

        // A file swapped for another chunk's does not open, and is forgotten.
        std::fs::copy(c.path(&id(3)), c.path(&id(4))).unwrap();
        assert_eq!(c.get(&id(4)).await, None);
        assert!(!c.path(&id(4)).exists());
        // A damaged file neither.
        let mut b = std::fs::read(c.path(&id(3))).unwrap();
        b[20] ^= 1;
        std::fs::write(c.path(&id(3)), b).unwrap();
        assert_eq!(c.get(&id(3)).await, None);
        // Another process (another key) cannot read this one's files.
        let other = DiskCache::create(&parent, 1 << 20).unwrap();
        std::fs::copy(c.path(&id(1)), other.path(&id(1))).unwrap();
        other.index.lock().unwrap().put(id(1), (), 1028);
        assert_eq!(other.get(&id(1)).await, None);

        c.remove();
        assert!(!c.dir().exists());
        other.remove();
    }
}
