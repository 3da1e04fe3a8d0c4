//! The catalog journal: every catalog change, encrypted under a key derived from the master key,
//! appended to segment files under `packs/catalog/` — beside the packs, where a repository's
//! data already lives — so that `rebuild-catalog` restores every snapshot, account, rule, policy
//! and setting after `catalog/` is lost (issue 12, item 4; format in `docs/format.md`).
//!
//! A segment starts with a *checkpoint* (every key of the catalog) followed by *changes* (puts
//! and deletes, one record per catalog write, in order). The appliance starts a new segment with
//! a checkpoint at each start (taking in changes made offline meanwhile) and when a segment
//! exceeds [`SEGMENT_MAX`]; older segments are deleted once the new checkpoint is durable.
//! Replay takes the newest segment whose checkpoint is whole and applies its records in order up
//! to the first that does not open (a torn tail: a write that was never acknowledged).
//!
//! Owns: the segment files. Must never write the catalog itself (the catalog calls in after each
//! write it made durable) nor touch chunk packs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffer_proto::{ChunkId, PackId, RepositoryId};

use crate::crypto::{Encryption, TAG_LEN};
use crate::pack::format::{record_nonce, RecordHeader, RECORD_AAD_LEN, RECORD_HEADER_LEN};
use crate::repo::{le_u32, le_u64, RepoPaths};

/// Magic of a journal segment's 64-byte header.
pub const JOURNAL_MAGIC: &[u8; 8] = b"COFFJRNL";
pub const JOURNAL_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
/// A segment this large is closed with a new checkpoint at the next write.
pub const SEGMENT_MAX: u64 = 64 << 20;
/// Largest record replay accepts (a checkpoint of a catalog with millions of snapshots).
const MAX_RECORD: u64 = 1 << 31;

const KIND_CHECKPOINT: u8 = 1;
const KIND_CHANGES: u8 = 2;

/// One catalog change: a put (`Some`) or a delete (`None`) of a key.
pub type Op = (Vec<u8>, Option<Vec<u8>>);

/// A journal failure.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("catalog journal {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog journal {path}: {why}")]
    Corrupt { path: String, why: String },
    #[error("no catalog journal under {0} (it is written by a running appliance)")]
    Missing(String),
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl Fn(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        what,
        source,
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Where the segments live.
#[must_use]
pub fn dir(paths: &RepoPaths) -> PathBuf {
    paths.packs().join("catalog")
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.journal"))
}

/// Segment numbers present, ascending.
fn segments(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir, "listing")(e)),
    };
    for f in rd {
        let f = f.map_err(io(dir, "listing"))?;
        let name = f.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".journal")) else {
            continue;
        };
        if let Ok(n) = u64::from_str_radix(stem, 16) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    crate::repo::sync_dir(dir).map_err(io(dir, "syncing the directory"))
}

pub(crate) fn encode_ops(kind: u8, ops: &[Op]) -> Vec<u8> {
    let mut b = Vec::with_capacity(
        16 + ops
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 9)
            .sum::<usize>(),
    );
    b.push(kind);
    b.extend_from_slice(&u32::try_from(ops.len()).expect("ops fit u32").to_le_bytes());
    for (k, v) in ops {
        b.push(u8::from(v.is_some()));
        b.extend_from_slice(
            &u32::try_from(k.len())
                .expect("keys are small")
                .to_le_bytes(),
        );
        b.extend_from_slice(k);
        if let Some(v) = v {
            b.extend_from_slice(
                &u32::try_from(v.len())
                    .expect("values < 4 GiB")
                    .to_le_bytes(),
            );
            b.extend_from_slice(v);
        }
    }
    b
}

pub(crate) fn decode_ops(b: &[u8]) -> Option<(u8, Vec<Op>)> {
    let take = |pos: &mut usize, n: usize| -> Option<&[u8]> {
        let s = b.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(s)
    };
    let mut pos = 0;
    let kind = *take(&mut pos, 1)?.first()?;
    let count = le_u32(take(&mut pos, 4)?, 0);
    let mut ops = Vec::new();
    for _ in 0..count {
        let put = take(&mut pos, 1)?[0] == 1;
        let kl = le_u32(take(&mut pos, 4)?, 0) as usize;
        let k = take(&mut pos, kl)?.to_vec();
        let v = if put {
            let vl = le_u32(take(&mut pos, 4)?, 0) as usize;
            Some(take(&mut pos, vl)?.to_vec())
        } else {
            None
        };
        ops.push((k, v));
    }
    (pos == b.len()).then_some((kind, ops))
}

/// The open segment the appliance appends to.
pub struct Journal {
    dir: PathBuf,
    encryption: Arc<dyn Encryption>,
    repo_id: RepositoryId,
    number: u64,
    file: File,
    id: PackId,
    records: u64,
    len: u64,
    /// A write failed: the next one writes a checkpoint into a new segment instead.
    broken: bool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("segment", &self.number)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Starts a new segment holding `state` (every key of the catalog) as its checkpoint, makes
    /// it durable, then deletes the older segments.
    ///
    /// # Errors
    /// I/O errors (nothing older is deleted then).
    pub fn start(
        paths: &RepoPaths,
        encryption: Arc<dyn Encryption>,
        repo_id: RepositoryId,
        state: &[Op],
    ) -> Result<Self, JournalError> {
        let dir = dir(paths);
        crate::repo::create_dir_durable(&dir).map_err(io(&dir, "creating"))?;
        let older = segments(&dir)?;
        let number = older.last().map_or(1, |n| n + 1);
        let path = segment_path(&dir, number);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path, "creating"))?;
        let id = PackId::from_bytes(rand::random());
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(JOURNAL_MAGIC);
        h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
        h[16..32].copy_from_slice(id.as_bytes());
        h[32..48].copy_from_slice(repo_id.as_bytes());
        h[48..56].copy_from_slice(&number.to_le_bytes());
        let crc = crc32fast::hash(&h[..56]);
        h[56..60].copy_from_slice(&crc.to_le_bytes());
        let mut j = Self {
            dir: dir.clone(),
            encryption,
            repo_id,
            number,
            file,
            id,
            records: 0,
            len: 0,
            broken: false,
        };
        j.file.write_all(&h).map_err(io(&path, "writing"))?;
        j.len = HEADER_LEN as u64;
        j.write_record(KIND_CHECKPOINT, state)?;
        sync_dir(&dir)?;
        crate::faults::point("journal.checkpointed");
        for n in older {
            let p = segment_path(&dir, n);
            std::fs::remove_file(&p).map_err(io(&p, "deleting an older segment"))?;
        }
        sync_dir(&dir)?;
        Ok(j)
    }

    fn write_record(&mut self, kind: u8, ops: &[Op]) -> Result<(), JournalError> {
        let path = segment_path(&self.dir, self.number);
        let mut payload = encode_ops(kind, ops);
        if payload.len() as u64 + TAG_LEN as u64 > MAX_RECORD {
            return Err(corrupt(
                &path,
                "a catalog change larger than a journal record (2 GiB)",
            ));
        }
        let nonce = record_nonce(self.records);
        let h = RecordHeader {
            flags: 0,
            id: ChunkId::from_bytes(*blake3::hash(&payload).as_bytes()),
            raw_len: u32::try_from(payload.len())
                .map_err(|_| corrupt(&path, "record too large"))?,
            stored_len: u32::try_from(payload.len() + TAG_LEN)
                .map_err(|_| corrupt(&path, "record too large"))?,
            nonce,
        }
        .encode();
        let tag =
            self.encryption
                .pack_cipher(&self.id)
                .seal(nonce, &h[..RECORD_AAD_LEN], &mut payload);
        let mut rec = Vec::with_capacity(RECORD_HEADER_LEN + payload.len() + TAG_LEN);
        rec.extend_from_slice(&h);
        rec.extend_from_slice(&payload);
        rec.extend_from_slice(&tag);
        self.file
            .write_all_at(&rec, self.len)
            .and_then(|()| self.file.sync_data())
            .map_err(io(&path, "appending"))?;
        self.len += rec.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Whether the last write failed (the next one starts a new segment with a checkpoint).
    #[must_use]
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Appends changes the catalog made durable. When the segment is full, or an earlier write
    /// failed, `state` (called only then) gives the whole catalog for a new segment's checkpoint.
    ///
    /// # Errors
    /// I/O errors; the next call starts a new segment.
    pub fn append(
        &mut self,
        paths: &RepoPaths,
        ops: &[Op],
        state: impl FnOnce() -> Result<Vec<Op>, JournalError>,
    ) -> Result<(), JournalError> {
        if self.broken || self.len > SEGMENT_MAX {
            let fresh = Self::start(paths, self.encryption.clone(), self.repo_id, &state()?)?;
            *self = fresh;
            return Ok(());
        }
        let r = self.write_record(KIND_CHANGES, ops);
        self.broken = r.is_err();
        r
    }
}

/// What replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// The catalog's keys and values.
    pub state: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    pub segment: u64,
    pub changes: u64,
    /// Bytes after the last record that opened (a write cut short by a crash).
    pub torn_bytes: u64,
}

/// Reads segment `n`: its checkpoint and changes applied in order. `None` when its checkpoint
/// does not open (a segment cut short while it was being started).
fn replay_segment(
    dir: &Path,
    n: u64,
    encryption: &dyn Encryption,
    repo_id: RepositoryId,
) -> Result<Option<Replayed>, JournalError> {
    let path = segment_path(dir, n);
    let f = File::open(&path).map_err(io(&path, "opening"))?;
    let len = f.metadata().map_err(io(&path, "reading its size"))?.len();
    let mut h = [0u8; HEADER_LEN];
    if f.read_exact_at(&mut h, 0).is_err() {
        return Ok(None);
    }
    if &h[0..8] != JOURNAL_MAGIC || crc32fast::hash(&h[..56]) != le_u32(&h, 56) {
        return Err(corrupt(&path, "not a catalog journal segment (bad header)"));
    }
    if le_u32(&h, 8) > JOURNAL_VERSION {
        return Err(corrupt(&path, "written by a newer coffer"));
    }
    if h[32..48] != repo_id.as_bytes()[..] {
        return Err(corrupt(&path, "belongs to another repository"));
    }
    let id = PackId::from_slice(&h[16..32]).map_err(|e| corrupt(&path, e.to_string()))?;
    if le_u64(&h, 48) != n {
        return Err(corrupt(&path, "its header names another segment number"));
    }
    let cipher = encryption.pack_cipher(&id);
    let mut out = Replayed {
        segment: n,
        ..Replayed::default()
    };
    let mut pos = HEADER_LEN as u64;
    let mut seq = 0;
    loop {
        let mut rh = [0u8; RECORD_HEADER_LEN];
        if pos + RECORD_HEADER_LEN as u64 > len || f.read_exact_at(&mut rh, pos).is_err() {
            break;
        }
        let Ok(hdr) = RecordHeader::decode(&rh) else {
            break;
        };
        let rec_len = u64::from(hdr.stored_len);
        if hdr.nonce != record_nonce(seq) || rec_len > MAX_RECORD || pos + 64 + rec_len > len {
            break;
        }
        let mut body = vec![0u8; usize::try_from(rec_len).expect("bounded by MAX_RECORD")];
        if f.read_exact_at(&mut body, pos + RECORD_HEADER_LEN as u64)
            .is_err()
        {
            break;
        }
        let Some(n) = cipher.open(hdr.nonce, &rh[..RECORD_AAD_LEN], &mut body) else {
            break;
        };
        let Some((kind, ops)) = decode_ops(&body[..n]) else {
            return Err(corrupt(
                &path,
                format!("record {seq} opens but does not decode"),
            ));
        };
        match (seq, kind) {
            (0, KIND_CHECKPOINT) => {}
            (0, _) => return Err(corrupt(&path, "does not start with a checkpoint")),
            (_, KIND_CHANGES) => out.changes += 1,
            _ => {
                return Err(corrupt(
                    &path,
                    format!("record {seq} is of unknown kind {kind}"),
                ))
            }
        }
        for (k, v) in ops {
            match v {
                Some(v) => out.state.insert(k, v),
                None => out.state.remove(&k),
            };
        }
        pos += RECORD_HEADER_LEN as u64 + rec_len;
        seq += 1;
    }
    if seq == 0 {
        return Ok(None);
    }
    out.torn_bytes = len - pos;
    Ok(Some(out))
}

/// The catalog as the journal last recorded it: the newest segment whose checkpoint is whole.
///
/// # Errors
/// [`JournalError::Missing`] without any segment; I/O and decoding errors.
pub fn replay(
    paths: &RepoPaths,
    encryption: &dyn Encryption,
    repo_id: RepositoryId,
) -> Result<Replayed, JournalError> {
    let dir = dir(paths);
    for n in segments(&dir)?.into_iter().rev() {
        if let Some(r) = replay_segment(&dir, n, encryption, repo_id)? {
            return Ok(r);
        }
    }
    Err(JournalError::Missing(dir.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::MasterKey;

    fn op(k: &str, v: Option<&str>) -> Op {
        (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))
    }

    #[test]
    fn replays_the_newest_whole_segment_up_to_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let paths = RepoPaths::new(dir.path());
        let key: Arc<dyn Encryption> = Arc::new(MasterKey::generate());
        let repo = RepositoryId::from_bytes([7; 16]);
        let mut j = Journal::start(&paths, key.clone(), repo, &[op("a", Some("1"))]).unwrap();
        j.append(
            &paths,
            &[op("b", Some("2")), op("a", None)],
            || unreachable!(),
        )
        .unwrap();
        let r = replay(&paths, key.as_ref(), repo).unwrap();
        assert_eq!(r.state.len(), 1);
        assert_eq!(r.state.get(&b"b"[..]).map(Vec::as_slice), Some(&b"2"[..]));
        assert_eq!((r.changes, r.torn_bytes), (1, 0));
        // A torn append (half a record) is ignored; what was whole stays.
        let seg = segment_path(&super::dir(&paths), j.number);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[b'C', b'R', b'E', b'C', 0, 0, 0]).unwrap();
        let r2 = replay(&paths, key.as_ref(), repo).unwrap();
        assert_eq!((r2.state.clone(), r2.torn_bytes), (r.state.clone(), 7));
        // A new start checkpoints and removes the older segment.
        let state: Vec<Op> = r
            .state
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        let j2 = Journal::start(&paths, key.clone(), repo, &state).unwrap();
        assert!(!seg.exists() && j2.number == j.number + 1);
        assert_eq!(replay(&paths, key.as_ref(), repo).unwrap().state, r.state);
        // Another key cannot read it; another repository's journal is refused.
        let other = MasterKey::generate();
        assert!(replay(&paths, &other, repo).is_err());
        assert!(replay(&paths, key.as_ref(), RepositoryId::from_bytes([8; 16])).is_err());
    }
}

#[cfg(test)]
mod guard {
    use super::*;
    use crate::catalog::{Catalog, UserRecord};
    use crate::crypto::keys::MasterKey;

    #[test]
    fn an_empty_catalog_is_not_checkpointed_over_a_journal_that_knows_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let paths = RepoPaths::new(dir.path());
        let key: Arc<dyn Encryption> = Arc::new(MasterKey::generate());
        let repo = RepositoryId::from_bytes([3; 16]);
        {
            let c = Catalog::open(&dir.path().join("catalog"), true).unwrap();
            c.attach_journal(&paths, key.clone(), repo).unwrap();
            c.add_user(&UserRecord {
                identity: "a@h".into(),
                password_hash: "$argon2id$x".into(),
                created_unix: 1,
                owner: None,
                quota: None,
                delete_passphrase: None,
                role: None,
            })
            .unwrap();
        }
        // catalog/ replaced by an empty one: the appliance must refuse to start on it.
        let empty = Catalog::open(&dir.path().join("catalog-empty"), true).unwrap();
        let e = empty.attach_journal(&paths, key.clone(), repo).unwrap_err();
        assert!(e.to_string().contains("rebuild-catalog"), "{e}");
        // The journal still has the account.
        let r = replay(&paths, key.as_ref(), repo).unwrap();
        assert!(r.state.contains_key(&b"user/a@h"[..]));
    }
}
