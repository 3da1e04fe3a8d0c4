//! The repository file `coffer.repo`: what a repository is and how it is laid out on disk.
//!
//! Format (version 1, little-endian, 64 bytes, see `docs/format.md`):
//! magic, format version, flags, repository id, mode, sharding function, shard count, chunker
//! parameters, creation time, CRC-32 of everything before it.

use std::path::{Path, PathBuf};

use coffer_proto::{PackId, RepositoryId, ShardId};

use crate::error::RepoError;

/// Magic at offset 0 of `coffer.repo`.
pub const REPO_MAGIC: &[u8; 8] = b"COFFREPO";
/// The only repository format version this build writes; it reads versions `<=` this.
pub const REPO_FORMAT_VERSION: u32 = 1;
/// Total length of the repository file, version 1.
pub const REPO_FILE_LEN: usize = 64;

mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const FLAGS: usize = 12;
    pub const REPO_ID: usize = 16;
    pub const MODE: usize = 32;
    pub const SHARDING: usize = 33;
    pub const SHARDS: usize = 34;
    pub const CHUNK_MIN: usize = 36;
    pub const CHUNK_AVG: usize = 40;
    pub const CHUNK_MAX: usize = 44;
    pub const CREATED: usize = 48;
    pub const CRC: usize = 56;
}

/// Encryption mode of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The appliance holds the keys (value 1).
    Managed,
    /// The clients hold the keys (value 2): chunks are sealed envelopes the appliance stores
    /// without reading (`coffer_proto::sealed`); its own key only wraps records at rest.
    Sealed,
}

impl Mode {
    /// The name `init --mode` takes and `status` shows.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Managed => "managed",
            Self::Sealed => "sealed",
        }
    }
}

/// The stable `ChunkId -> shard` function (value 1 = `le64-mod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// `le_u64(id[0..8]) mod shard_count`.
    Le64Mod,
}

pub use coffer_proto::ChunkerParams;

impl From<coffer_proto::ChunkerError> for RepoError {
    fn from(e: coffer_proto::ChunkerError) -> Self {
        RepoError::Invalid(e.to_string())
    }
}

/// The contents of `coffer.repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoConfig {
    pub id: RepositoryId,
    pub mode: Mode,
    pub sharding: Sharding,
    pub shards: u16,
    pub chunker: ChunkerParams,
    pub created_unix: i64,
}

impl RepoConfig {
    /// Every shard of the repository, in order.
    pub fn shard_ids(&self) -> impl Iterator<Item = ShardId> {
        (0..self.shards).map(ShardId)
    }

    /// Serialises to the 64-byte version-1 layout.
    #[must_use]
    pub fn encode(&self) -> [u8; REPO_FILE_LEN] {
        let mut b = [0u8; REPO_FILE_LEN];
        b[off::MAGIC..off::MAGIC + 8].copy_from_slice(REPO_MAGIC);
        b[off::VERSION..off::VERSION + 4].copy_from_slice(&REPO_FORMAT_VERSION.to_le_bytes());
        b[off::FLAGS..off::FLAGS + 4].copy_from_slice(&0u32.to_le_bytes());
        b[off::REPO_ID..off::REPO_ID + 16].copy_from_slice(self.id.as_bytes());
        b[off::MODE] = match self.mode {
            Mode::Managed => 1,
            Mode::Sealed => 2,
        };
        b[off::SHARDING] = match self.sharding {
            Sharding::Le64Mod => 1,
        };
        b[off::SHARDS..off::SHARDS + 2].copy_from_slice(&self.shards.to_le_bytes());
        b[off::CHUNK_MIN..off::CHUNK_MIN + 4].copy_from_slice(&self.chunker.min.to_le_bytes());
        b[off::CHUNK_AVG..off::CHUNK_AVG + 4].copy_from_slice(&self.chunker.avg.to_le_bytes());
        b[off::CHUNK_MAX..off::CHUNK_MAX + 4].copy_from_slice(&self.chunker.max.to_le_bytes());
        b[off::CREATED..off::CREATED + 8].copy_from_slice(&self.created_unix.to_le_bytes());
        let crc = crc32fast::hash(&b[..off::CRC]);
        b[off::CRC..off::CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a repository file.
    ///
    /// # Errors
    /// [`RepoError::Invalid`] naming what is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, RepoError> {
        let bad = |why: &str| RepoError::Invalid(why.to_string());
        if b.len() < REPO_FILE_LEN || &b[..8] != REPO_MAGIC {
            return Err(bad("not a coffer repository file (bad magic or too short)"));
        }
        let version = le_u32(b, off::VERSION);
        if version > REPO_FORMAT_VERSION {
            return Err(RepoError::Invalid(format!(
                "repository format version {version} is newer than this build understands \
                 ({REPO_FORMAT_VERSION}); upgrade coffer-appliance"
            )));
        }
        if crc32fast::hash(&b[..off::CRC]) != le_u32(b, off::CRC) {
            return Err(bad(
                "repository file checksum mismatch: the file is damaged",
            ));
        }
        let mode = match b[off::MODE] {
            1 => Mode::Managed,
            2 => Mode::Sealed,
            m => return Err(RepoError::Invalid(format!("unknown encryption mode {m}"))),
        };
        let sharding = match b[off::SHARDING] {
            1 => Sharding::Le64Mod,
            s => return Err(RepoError::Invalid(format!("unknown sharding function {s}"))),
        };
        let shards = u16::from_le_bytes([b[off::SHARDS], b[off::SHARDS + 1]]);
        if shards == 0 {
            return Err(bad("repository file says 0 shards"));
        }
        let chunker = ChunkerParams {
            min: le_u32(b, off::CHUNK_MIN),
            avg: le_u32(b, off::CHUNK_AVG),
            max: le_u32(b, off::CHUNK_MAX),
        };
        chunker.validate()?;
        let id = RepositoryId::from_slice(&b[off::REPO_ID..off::REPO_ID + 16])
            .map_err(|e| RepoError::Invalid(format!("repository id: {e}")))?;
        let mut created = [0u8; 8];
        created.copy_from_slice(&b[off::CREATED..off::CREATED + 8]);
        Ok(Self {
            id,
            mode,
            sharding,
            shards,
            chunker,
            created_unix: i64::from_le_bytes(created),
        })
    }
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Paths inside a repository directory.
#[derive(Debug, Clone)]
pub struct RepoPaths {
    pub root: PathBuf,
}

impl RepoPaths {
    #[must_use]
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    #[must_use]
    pub fn config(&self) -> PathBuf {
        self.root.join("coffer.repo")
    }
    #[must_use]
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }
    #[must_use]
    pub fn master_key(&self) -> PathBuf {
        self.keys().join("master.key")
    }
    #[must_use]
    pub fn packs(&self) -> PathBuf {
        self.root.join("packs")
    }
    #[must_use]
    pub fn pack(&self, id: &PackId) -> PathBuf {
        let hex = id.to_hex();
        self.packs().join(&hex[..2]).join(hex)
    }
    #[must_use]
    pub fn index(&self) -> PathBuf {
        self.root.join("index")
    }
    #[must_use]
    pub fn shard_index(&self, shard: ShardId) -> PathBuf {
        self.index().join(format!("shard-{}", shard.0))
    }
    #[must_use]
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog")
    }

    /// The running appliance's admin socket (see [`crate::access::admin`]).
    #[must_use]
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }

    /// Every pack file under `packs/`, sorted by path.
    ///
    /// # Errors
    /// Any listing error: callers (rebuild, verify) must not continue on a partial listing.
    pub fn list_packs(&self) -> std::io::Result<Vec<(PackId, PathBuf)>> {
        let mut out = Vec::new();
        let dir = self.packs();
        if !dir.exists() {
            return Ok(out);
        }
        for sub in std::fs::read_dir(&dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Ok(id) = PackId::from_hex(name) {
                    out.push((id, f.path()));
                }
            }
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    /// Reads and validates `coffer.repo`.
    ///
    /// # Errors
    /// [`RepoError`] when the directory is not a repository or the file is damaged.
    pub fn load_config(&self) -> Result<RepoConfig, RepoError> {
        let path = self.config();
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RepoError::NotARepository(self.root.clone())
            } else {
                RepoError::Io(format!("reading {}", path.display()), e)
            }
        })?;
        RepoConfig::decode(&bytes)
    }
}

/// Creates `dir` and any missing parents **durably**: after each `mkdir` its parent directory is
/// synced, so that a power cut cannot take away a directory (and every file in it) whose
/// contents were synced. `create_dir_all` alone leaves the new names in the page cache.
///
/// # Errors
/// `mkdir` and `fsync` failures.
pub fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    // One at a time in the process, the existence check included: a directory another shard
    // has just made is seen only after its parent was synced (else this caller could skip it
    // and acknowledge too early). Directories are made rarely (a new `packs/<xx>/`), so the lock
    // costs nothing that matters.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.is_dir() {
        missing.push(p);
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Made meanwhile by another process: sync its parent all the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// `fsync` of a directory: the names in it are durable.
///
/// # Errors
/// Open and `fsync` failures.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a small file **durably** and atomically: `<path>.tmp` with `mode`, `fsync`, rename
/// over `path`, `fsync` of the directory. A power cut leaves the old file or the new one whole.
///
/// # Errors
/// Create, write, sync and rename failures.
pub fn write_file_durable(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RepoConfig {
        RepoConfig {
            id: RepositoryId::from_bytes([9; 16]),
            mode: Mode::Managed,
            sharding: Sharding::Le64Mod,
            shards: 3,
            chunker: ChunkerParams::DEFAULT,
            created_unix: 1_700_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let c = cfg();
        assert_eq!(RepoConfig::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn damage_is_detected() {
        let mut b = cfg().encode();
        b[20] ^= 1;
        assert!(RepoConfig::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut b = cfg().encode();
        b[0] = b'X';
        assert!(RepoConfig::decode(&b).is_err());
        let mut b = cfg().encode();
        b[off::VERSION] = 9;
        assert!(RepoConfig::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("newer"));
    }
}
