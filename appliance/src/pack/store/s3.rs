//! The object-store tier: packs kept in an S3-compatible bucket, with the local store in front
//! of it as a bounded staging area and read cache.
//!
//! Writes take the local path unchanged (O_DIRECT + io_uring + fdatasync). When a pack is
//! sealed it is *staged*: queued for upload (multipart above [`MULTIPART_ABOVE`]). With
//! [`AckAfter::Local`] the seal returns at once; with [`AckAfter::Remote`] the writer seals every
//! group commit and the seal returns only once the bucket confirmed the object, so nothing is
//! acknowledged before the store holds it. An uploaded pack stays in the local cache until the
//! cache exceeds its size; the least recently read packs are then dropped locally and read back
//! with ranged GETs.
//!
//! The bucket holds everything a fresh machine needs (`attach`): `coffer.repo`, `keys/` (the
//! master key wrapped by the repository password), `catalog/` (the catalog journal, mirrored
//! within a second of each change) and `packs/`; plus `lease`, the one-writer lease.
//!
//! Invariants kept here:
//! * A staged pack's local file is never dropped before its upload was confirmed; a crash
//!   between the local seal and the upload leaves the file, and [`Tier::reconcile`] at the next
//!   start uploads every local pack the bucket lacks (or holds with another size).
//! * A pack is deleted from the bucket only by the GC, after the index stopped pointing into it
//!   ([`crate::maintenance::gc`]); never a pack that is open, staged or uploading.
//! * An older catalog journal segment is deleted from the bucket only after every newer
//!   segment present locally was uploaded: the bucket always holds a whole checkpoint.
//!
//! Owns: the bucket's layout, uploads, the cache's eviction, the lease. Must never decide what
//! a pack holds nor when one is sealed (the writer's job).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coffer_proto::PackId;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AwsCredential};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion, WriteMultipart,
};
use serde::{Deserialize, Serialize};

use super::objectlock::{LockSupport, ObjectLock};
use crate::repo::RepoPaths;

/// Packs larger than this are uploaded in parts.
pub const MULTIPART_ABOVE: u64 = 32 << 20;
/// Size of one part of a multipart upload (the S3 minimum is 5 MiB).
const PART: usize = 16 << 20;
/// Uploads running at once.
const UPLOADERS: usize = 4;
/// A lease not refreshed for this long is free.
pub const LEASE_TTL_US: i64 = 60_000_000;
/// How often the holder refreshes its lease.
const LEASE_REFRESH: Duration = Duration::from_secs(15);
/// How often the catalog journal and the repository files are compared with the bucket.
const MIRROR_EVERY: Duration = Duration::from_secs(1);
/// Test switch: while set, staged packs wait instead of uploading (crash tests kill the
/// appliance in that window).
pub const HOLD_VAR: &str = "COFFER_S3_HOLD_UPLOADS";
/// The file under the repository directory naming where its packs live.
pub const STORAGE_FILE: &str = "storage.json";
/// The file holding this repository directory's lease holder id.
const HOLDER_FILE: &str = "lease.id";
/// The file holding the lease generation this directory last held or attached at.
const GENERATION_FILE: &str = "lease.gen";
/// Bucket writes and deletes stop when the lease was not refreshed for this long (well inside
/// [`LEASE_TTL_US`], so that they stop before another appliance may take it).
const LEASE_TRUST: Duration = Duration::from_secs(40);

/// An object-store failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("object store: {0}")]
pub struct TierError(pub String);

fn err(what: impl std::fmt::Display) -> impl FnOnce(object_store::Error) -> TierError {
    move |e| TierError(format!("{what}: {e}"))
}

/// When a chunk counts as stored (`serve --ack-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AckAfter {
    /// After the local fsync of the staged pack; the upload follows in the background.
    #[default]
    Local,
    /// Only after the object store confirmed the pack (every group commit is its own pack).
    Remote,
}

/// Where a repository's packs live when not only on the local disk (`storage.json`). Never
/// holds credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `s3://BUCKET/PREFIX` as given to `init --storage`.
    pub url: String,
    /// The S3 endpoint (`https://…`; `http://` only on loopback or a private network).
    pub endpoint: Option<String>,
    pub region: String,
    /// An AWS shared-credentials file (`[default]` or `$AWS_PROFILE` section) read at each
    /// start; else `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub credentials_file: Option<PathBuf>,
    /// The bucket had S3 Object Lock when `init` or `attach` looked: a start that cannot confirm
    /// it refuses to serve (the GC would take retained packs for free ones).
    #[serde(default)]
    pub object_lock: bool,
}

impl StorageConfig {
    /// `(bucket, prefix)` of the URL; the prefix has no leading or trailing `/`.
    ///
    /// # Errors
    /// A URL that is not `s3://BUCKET[/PREFIX]`.
    pub fn bucket_prefix(&self) -> Result<(String, String), TierError> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            TierError(format!(
                "storage {:?}: only s3://BUCKET/PREFIX is supported",
                self.url
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(ok) {
            return Err(TierError(format!(
                "storage {:?}: {bucket:?} is not a bucket name (3–63 of a-z 0-9 . -)",
                self.url
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.chars().any(|c| c.is_control() || c == '\\')
        {
            return Err(TierError(format!(
                "storage {:?}: the prefix must be plain path components",
                self.url
            )));
        }
        Ok((bucket.to_string(), prefix.to_string()))
    }

    /// The repository's storage file, if it has one (`None`: packs are local only).
    ///
    /// # Errors
    /// A storage file that cannot be read or parsed.
    pub fn load(paths: &RepoPaths) -> Result<Option<Self>, TierError> {
        let p = paths.root.join(STORAGE_FILE);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| TierError(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TierError(format!("{}: {e}", p.display()))),
        }
    }

    /// Writes the storage file durably.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, paths: &RepoPaths) -> Result<(), TierError> {
        let b = serde_json::to_vec_pretty(self).map_err(|e| TierError(e.to_string()))?;
        crate::repo::write_file_durable(&paths.root.join(STORAGE_FILE), &b, 0o600)
            .map_err(|e| TierError(format!("writing {STORAGE_FILE}: {e}")))
    }

    /// A client for the bucket (credentials from the file or the environment).
    ///
    /// # Errors
    /// Missing credentials or a bad URL.
    pub fn connect(&self, timeouts: Timeouts) -> Result<Bucket, TierError> {
        install_crypto();
        let (bucket, prefix) = self.bucket_prefix()?;
        let (key, secret, token) = credentials(self.credentials_file.as_deref())?;
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(&self.region)
            .with_access_key_id(&key)
            .with_secret_access_key(&secret)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                max_retries: timeouts.retries,
                retry_timeout: timeouts.retry_for,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(timeouts.request)
                    .with_connect_timeout(Duration::from_secs(10)),
            );
        if let Some(t) = &token {
            b = b.with_token(t);
        }
        if let Some(ep) = &self.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        let store = b
            .build()
            .map_err(err(format!("configuring {}", self.url)))?;
        let lock = ObjectLock::new(
            self.endpoint.as_deref(),
            &bucket,
            &self.region,
            AwsCredential {
                key_id: key,
                secret_key: secret,
                token,
            },
            timeouts,
        )?;
        Ok(Bucket {
            store: Arc::new(store),
            lock: Arc::new(lock),
            prefix,
            url: self.url.clone(),
        })
    }
}

/// Makes ring the process's rustls provider (reqwest's TLS takes the process default; tonic
/// names ring explicitly): one crypto library in the appliance.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How long the client waits and retries (5xx, throttling, timeouts) before a call fails.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub request: Duration,
    pub retries: usize,
    pub retry_for: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_mins(1),
            retries: 10,
            retry_for: Duration::from_mins(2),
        }
    }
}

/// `(access key, secret, session token)` from an AWS shared-credentials file or the
/// environment.
fn credentials(file: Option<&Path>) -> Result<(String, String, Option<String>), TierError> {
    let file = file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from));
    if let Some(f) = file {
        let text = std::fs::read_to_string(&f)
            .map_err(|e| TierError(format!("credentials file {}: {e}", f.display())))?;
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        let mut section = String::new();
        let mut found: HashMap<String, String> = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.trim().to_string();
            } else if section == profile {
                if let Some((k, v)) = line.split_once('=') {
                    found.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
        }
        let get = |k: &str| found.get(k).cloned();
        return match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(k), Some(s)) => Ok((k, s, get("aws_session_token"))),
            _ => Err(TierError(format!(
                "credentials file {}: no aws_access_key_id and aws_secret_access_key in [{profile}]",
                f.display()
            ))),
        };
    }
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(k), Ok(s)) if !k.is_empty() && !s.is_empty() => {
            Ok((k, s, std::env::var("AWS_SESSION_TOKEN").ok()))
        }
        _ => Err(TierError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give \
             --s3-credentials-file"
                .into(),
        )),
    }
}

/// A bucket and the repository's prefix in it; async calls, any tokio runtime.
#[derive(Debug, Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    lock: Arc<ObjectLock>,
    prefix: String,
    url: String,
}

/// An object in the bucket: name under the prefix, size, last modification (µs).
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub size: u64,
    pub modified_us: i64,
}

impl Bucket {
    /// The object named `name` under the prefix.
    #[must_use]
    pub fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The object of pack `id`.
    #[must_use]
    pub fn pack_name(id: &PackId) -> String {
        let hex = id.to_hex();
        format!("packs/{}/{hex}", &hex[..2])
    }

    /// The bucket's Object Lock calls; object names given to them are full keys
    /// ([`Self::key`]).
    #[must_use]
    pub fn object_lock(&self) -> &ObjectLock {
        &self.lock
    }

    /// The bucket URL this client reaches.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes `bytes` as `name`.
    ///
    /// # Errors
    /// The store's.
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), TierError> {
        self.store
            .put(&self.key(name), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(err(format!("writing {name}")))
    }

    /// Reads all of `name`; `None` when it does not exist.
    ///
    /// # Errors
    /// The store's.
    pub async fn get(&self, name: &str) -> Result<Option<(Bytes, Option<String>)>, TierError> {
        match self.store.get(&self.key(name)).await {
            Ok(r) => {
                let tag = r.meta.e_tag.clone();
                let b = r.bytes().await.map_err(err(format!("reading {name}")))?;
                Ok(Some((b, tag)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(TierError(format!("reading {name}: {e}"))),
        }
    }

    /// Reads `len` bytes at `offset` of `name`.
    ///
    /// # Errors
    /// The store's (a missing object included).
    pub async fn get_range(&self, name: &str, offset: u64, len: usize) -> Result<Bytes, TierError> {
        self.store
            .get_range(&self.key(name), offset..offset + len as u64)
            .await
            .map_err(err(format!("reading {name} at {offset}")))
    }

    /// Deletes `name`; one that is gone already is not an error.
    ///
    /// # Errors
    /// The store's.
    pub async fn delete(&self, name: &str) -> Result<(), TierError> {
        match self.store.delete(&self.key(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(TierError(format!("deleting {name}: {e}"))),
        }
    }

    /// Every object under `dir/` of the prefix. A listing error is returned, never a partial
    /// listing.
    ///
    /// # Errors
    /// The store's.
    pub async fn list(&self, dir: &str) -> Result<Vec<Listed>, TierError> {
        let base = self.key(dir);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out = Vec::new();
        let mut s = self.store.list(Some(&base));
        while let Some(m) = s.next().await {
            let m = m.map_err(err(format!("listing {dir}/")))?;
            let full = m.location.to_string();
            let name = full.strip_prefix(&strip).unwrap_or(&full).to_string();
            out.push(Listed {
                name,
                size: m.size,
                modified_us: m.last_modified.timestamp_micros(),
            });
        }
        Ok(out)
    }

    /// Every pack in the bucket: id, size, last modification (µs).
    ///
    /// # Errors
    /// A listing error.
    pub async fn list_packs(&self) -> Result<Vec<(PackId, u64, i64)>, TierError> {
        Ok(self
            .list("packs")
            .await?
            .into_iter()
            .filter_map(|l| {
                let id = PackId::from_hex(l.name.rsplit('/').next()?).ok()?;
                Some((id, l.size, l.modified_us))
            })
            .collect())
    }

    /// Uploads the local file `path` as `name` (in parts above [`MULTIPART_ABOVE`]); `Ok(false)`
    /// when the file is gone (deleted by the GC meanwhile).
    ///
    /// # Errors
    /// Reading the file or the store's.
    pub async fn upload_file(&self, path: &Path, name: &str) -> Result<bool, TierError> {
        use tokio::io::AsyncReadExt;
        let io = |e: std::io::Error| TierError(format!("reading {}: {e}", path.display()));
        let mut f = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(e)),
        };
        let len = f.metadata().await.map_err(io)?.len();
        if len <= MULTIPART_ABOVE {
            let mut b = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            f.read_to_end(&mut b).await.map_err(io)?;
            self.put(name, Bytes::from(b)).await?;
            return Ok(true);
        }
        let up = self
            .store
            .put_multipart(&self.key(name))
            .await
            .map_err(err(format!("starting the upload of {name}")))?;
        let mut w = WriteMultipart::new_with_chunk_size(up, PART);
        let mut buf = vec![0u8; PART];
        let sent: Result<(), TierError> = async {
            loop {
                let n = f.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Ok(());
                }
                w.wait_for_capacity(2)
                    .await
                    .map_err(err(format!("uploading {name}")))?;
                w.write(&buf[..n]);
            }
        }
        .await;
        if let Err(e) = sent {
            // No half-finished multipart upload is left to accumulate in the bucket.
            let _ = w.abort().await;
            return Err(e);
        }
        w.finish()
            .await
            .map_err(err(format!("completing the upload of {name}")))?;
        Ok(true)
    }

    /// Downloads `name` into the local file `path` (written beside it and renamed, durably).
    ///
    /// # Errors
    /// The store's or the file system's.
    pub async fn download(&self, name: &str, path: &Path) -> Result<u64, TierError> {
        let r = self
            .store
            .get(&self.key(name))
            .await
            .map_err(err(format!("reading {name}")))?;
        let b = r.bytes().await.map_err(err(format!("reading {name}")))?;
        let path = path.to_path_buf();
        let len = b.len() as u64;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let dir = path.parent().expect("downloads go into a directory");
            crate::repo::create_dir_durable(dir)?;
            crate::repo::write_file_durable(&path, &b, 0o600)
        })
        .await
        .map_err(|e| TierError(e.to_string()))?
        .map_err(|e| TierError(format!("writing {name} to disk: {e}")))?;
        Ok(len)
    }

    /// Whether the store honours `If-None-Match: *` on PUT: a second create of the same new
    /// object must fail. Garage, for one, overwrites.
    ///
    /// # Errors
    /// The store's.
    pub async fn probe_conditional(&self) -> Result<bool, TierError> {
        let name = format!("lease.probe-{:016x}", rand::random::<u64>());
        let key = self.key(&name);
        let create = || PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&key, PutPayload::from_static(b"1"), create())
            .await
            .map_err(err("probing conditional writes"))?;
        let second = self
            .store
            .put_opts(&key, PutPayload::from_static(b"2"), create())
            .await;
        let _ = self.store.delete(&key).await;
        match second {
            Ok(_) => Ok(false),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(true),
            Err(e) => Err(TierError(format!("probing conditional writes: {e}"))),
        }
    }
}

/// The lease object's contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    /// The repository directory's holder id (`lease.id`): a restart of the same appliance takes
    /// its own lease back at once.
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// Appliance clock, µs: the lease is free after this (0: released by a graceful stop).
    pub until_us: i64,
    /// Moves on at every start of an appliance on the prefix. A directory that last served (or
    /// attached) at an older generation than the bucket's is stale: another appliance wrote
    /// since, and its index and catalog would undo that (its GC would delete the newer packs).
    #[serde(default)]
    pub generation: u64,
}

impl Lease {
    fn live(&self, now: i64) -> bool {
        self.until_us > now
    }
}

/// This repository directory's holder id, created on first use.
///
/// # Errors
/// The file cannot be read or written.
pub fn holder_id(paths: &RepoPaths) -> Result<String, TierError> {
    let p = paths.root.join(HOLDER_FILE);
    match std::fs::read_to_string(&p) {
        Ok(s) if s.trim().len() == 32 => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = hex::encode(rand::random::<[u8; 16]>());
            crate::repo::write_file_durable(&p, id.as_bytes(), 0o600)
                .map_err(|e| TierError(format!("writing {HOLDER_FILE}: {e}")))?;
            Ok(id)
        }
    }
}

/// The generation this directory last held or attached at (`lease.gen`; 0 when absent).
fn local_generation(paths: &RepoPaths) -> u64 {
    std::fs::read_to_string(paths.root.join(GENERATION_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Records the generation this directory holds or attached at.
///
/// # Errors
/// The file cannot be written.
pub fn set_local_generation(paths: &RepoPaths, generation: u64) -> Result<(), TierError> {
    crate::repo::write_file_durable(
        &paths.root.join(GENERATION_FILE),
        generation.to_string().as_bytes(),
        0o600,
    )
    .map_err(|e| TierError(format!("writing {GENERATION_FILE}: {e}")))
}

/// Refuses when another appliance holds a live lease on the bucket's prefix.
///
/// # Errors
/// The holder and until when, or the store's error.
pub async fn check_lease(bucket: &Bucket, holder: &str) -> Result<Option<Lease>, TierError> {
    let Some((b, _)) = bucket.get("lease").await? else {
        return Ok(None);
    };
    let lease: Lease = serde_json::from_slice(&b)
        .map_err(|e| TierError(format!("the lease object is not readable: {e}")))?;
    if lease.holder != holder && lease.live(crate::clock::now_us()) {
        return Err(held_elsewhere(bucket.url(), &lease));
    }
    Ok(Some(lease))
}

fn held_elsewhere(url: &str, lease: &Lease) -> TierError {
    TierError(format!(
        "{url} is served by another appliance (host {}, pid {}) whose lease runs until {}; stop \
         it first (a lease not refreshed for {} s expires)",
        lease.host,
        lease.pid,
        coffer_proto::when::format_us(lease.until_us),
        LEASE_TTL_US / 1_000_000
    ))
}

/// Serve-time settings of the tier.
#[derive(Debug, Clone, Copy)]
pub struct TierOptions {
    pub ack_after: AckAfter,
    /// Bytes of sealed packs waiting for upload beyond which writes are refused
    /// (RESOURCE_EXHAUSTED) until uploads catch up.
    pub staging_bytes: u64,
    /// Bytes of uploaded packs kept locally for reads.
    pub cache_bytes: u64,
    pub timeouts: Timeouts,
}

impl Default for TierOptions {
    fn default() -> Self {
        Self {
            ack_after: AckAfter::Local,
            staging_bytes: 8 << 30,
            cache_bytes: 16 << 30,
            timeouts: Timeouts::default(),
        }
    }
}

type Waiter = flume::Sender<Result<(), String>>;

impl State {
    fn cache(&mut self, id: PackId, len: u64) {
        self.tick += 1;
        let t = self.tick;
        match self.cached.insert(id, (len, t)) {
            Some((old_len, old_t)) => {
                self.lru.remove(&old_t);
                self.cached_bytes = self.cached_bytes - old_len + len;
            }
            None => self.cached_bytes += len,
        }
        self.lru.insert(t, id);
    }

    fn uncache(&mut self, id: &PackId) {
        if let Some((len, t)) = self.cached.remove(id) {
            self.lru.remove(&t);
            self.cached_bytes -= len;
        }
    }
}

#[derive(Default)]
struct State {
    /// Packs being written (never uploaded, evicted or deleted by the GC while here).
    open: HashSet<PackId>,
    /// Sealed packs waiting for or in upload: length and who waits.
    staged: HashMap<PackId, (u64, Vec<Waiter>)>,
    staged_bytes: u64,
    /// Uploaded packs still on the local disk: length and last use.
    cached: HashMap<PackId, (u64, u64)>,
    /// The same by last use, oldest first.
    lru: std::collections::BTreeMap<u64, PackId>,
    cached_bytes: u64,
    tick: u64,
    /// Uploads confirmed since the start (tests and status).
    uploaded: u64,
    /// Why writes stop: the lease was lost.
    lost: Option<String>,
    /// Catalog and repository files as last uploaded: name -> (len, mtime ns).
    mirrored: HashMap<String, (u64, i128)>,
    /// Journal segments known in the bucket.
    remote_journals: HashSet<String>,
    /// Compliance retention known to be set, by object name: its end (µs).
    retained: HashMap<String, i64>,
}

/// The running tier of one appliance: shared by the shards (reads, seals), the GC and `serve`.
pub struct Tier {
    bucket: Bucket,
    paths: RepoPaths,
    opts: TierOptions,
    rt: tokio::runtime::Runtime,
    state: Mutex<State>,
    changed: Condvar,
    jobs: flume::Sender<PackId>,
    rx: flume::Receiver<PackId>,
    holder: String,
    conditional: bool,
    object_lock: LockSupport,
    /// When the last lease write that succeeded was sent.
    lease_ok: Mutex<Option<Instant>>,
    /// The lease generation this appliance holds.
    generation: AtomicU64,
    /// Moves on at each eviction: shards then drop their open readers (the space of evicted
    /// files is freed once nothing holds them open).
    evictions: AtomicU64,
    stopping: AtomicBool,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("bucket", &self.bucket.url)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tier {
    /// Connects, takes the lease (refusing a live one held by another appliance) and starts the
    /// catalog mirror. Uploads start with [`Tier::reconcile`], once the shards have recovered.
    ///
    /// # Errors
    /// Configuration, credentials, the store, or a lease held elsewhere.
    pub fn start(
        paths: &RepoPaths,
        cfg: &StorageConfig,
        opts: TierOptions,
    ) -> Result<Arc<Self>, TierError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| TierError(format!("starting the object-store threads: {e}")))?;
        let bucket = cfg.connect(opts.timeouts)?;
        let holder = holder_id(paths)?;
        let conditional = rt.block_on(bucket.probe_conditional())?;
        if conditional {
            tracing::info!(bucket = %bucket.url, "object store honours conditional writes: the lease is exclusive");
        } else {
            tracing::warn!(bucket = %bucket.url,
                "the object store ignores conditional writes (If-None-Match): the lease is \
                 checked before it is taken, but two appliances started within the same second \
                 could both take it (docs/deployment.md, \"One writer\")");
        }
        let object_lock = match (rt.block_on(bucket.lock.support())?, cfg.object_lock) {
            (LockSupport::Enabled, _) => {
                let probe = bucket
                    .key(&format!("lease.lockprobe-{:016x}", rand::random::<u64>()))
                    .to_string();
                let lock = bucket.lock.clone();
                rt.block_on(async move { lock.self_check(&probe).await })?;
                LockSupport::Enabled
            }
            (LockSupport::Unavailable(why), true) => {
                return Err(TierError(format!(
                    "{} had S3 Object Lock when this repository was set up, but the store now \
                     answers: {why}. Refusing to serve: the garbage collector would take \
                     retained packs for free ones",
                    bucket.url
                )))
            }
            (u, false) => u,
        };
        match &object_lock {
            LockSupport::Enabled => tracing::info!(bucket = %bucket.url,
                "object lock enabled: the objects of locked snapshots get compliance retention"),
            LockSupport::Unavailable(why) => tracing::warn!(bucket = %bucket.url,
                "object lock not available ({why}): locked snapshots are protected by the \
                 appliance and the bucket's access policy only"),
        }
        let (jobs, rx) = flume::unbounded();
        let tier = Arc::new(Self {
            bucket,
            paths: paths.clone(),
            opts,
            rt,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            jobs,
            rx,
            holder,
            conditional,
            object_lock,
            lease_ok: Mutex::new(None),
            generation: AtomicU64::new(local_generation(paths)),
            evictions: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        tier.run(tier.clone().take_lease(true))?;
        let remote: HashSet<String> = tier
            .run({
                let b = tier.bucket.clone();
                async move { b.list("catalog").await }
            })?
            .into_iter()
            .map(|l| l.name)
            .collect();
        lock(&tier.state).remote_journals = remote;
        tier.mirror_now()?;
        tier.repeat(LEASE_REFRESH, "refreshing the object-store lease", |t| {
            t.take_lease(false)
        });
        tier.repeat(
            MIRROR_EVERY,
            "mirroring the catalog to the object store",
            Tier::mirror,
        );
        Ok(tier)
    }

    /// Runs `step` every `period` on the tier's threads until the stop; failures are logged.
    fn repeat<F, Fut>(self: &Arc<Self>, period: Duration, what: &'static str, step: F)
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), TierError>> + Send + 'static,
    {
        let t = self.clone();
        self.rt.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                if t.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Err(e) = step(t.clone()).await {
                    tracing::warn!(error = %e, "{what}");
                }
            }
        });
    }

    /// The bucket.
    #[must_use]
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// When chunks are acknowledged.
    #[must_use]
    pub fn ack_after(&self) -> AckAfter {
        self.opts.ack_after
    }

    /// Whether the store honours conditional writes.
    #[must_use]
    pub fn conditional(&self) -> bool {
        self.conditional
    }

    /// Whether this appliance may write to or delete from the bucket now: it holds the lease
    /// and refreshed it within [`LEASE_TRUST`].
    ///
    /// # Errors
    /// Why not.
    pub fn lease_valid(&self) -> Result<(), TierError> {
        if let Some(why) = &lock(&self.state).lost {
            return Err(TierError(format!(
                "this appliance no longer holds the object-store lease: {why}"
            )));
        }
        let last = *self.lease_ok.lock().unwrap_or_else(PoisonError::into_inner);
        match last {
            Some(t) if t.elapsed() < LEASE_TRUST => Ok(()),
            Some(t) => Err(TierError(format!(
                "the object-store lease was last refreshed {} s ago: bucket writes wait until \
                 it is refreshed",
                t.elapsed().as_secs()
            ))),
            None => Err(TierError("the object-store lease is not held".into())),
        }
    }

    /// Mirrors the catalog journal and repository files now (`--ack-after remote` calls it
    /// after every catalog change; the GC before deleting objects).
    ///
    /// # Errors
    /// The store's, or a lease not held.
    pub fn mirror_now(self: &Arc<Self>) -> Result<(), TierError> {
        self.run(self.clone().mirror())
    }

    /// Starts `fut` on the tier's threads; its answer arrives on the receiver.
    fn spawn_answer<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> flume::Receiver<T> {
        let (tx, rx) = flume::bounded(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx
    }

    /// Runs `fut` on the tier's threads and waits for it (never from an async task).
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        self.spawn_answer(fut)
            .recv()
            .expect("the tier's runtime runs until the tier is dropped")
    }

    /// Runs `fut` on the tier's threads; the answer is awaited from any executor (a shard's).
    async fn run_async<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        self.spawn_answer(fut)
            .recv_async()
            .await
            .expect("the tier's runtime runs until the tier is dropped")
    }

    /// Takes (`first`: at start, moving the generation on) or refreshes the lease.
    async fn take_lease(self: Arc<Self>, first: bool) -> Result<(), TierError> {
        if let Some(why) = lock(&self.state).lost.clone() {
            // Once another appliance wrote, this one's index may be stale: it never takes the
            // lease back without a restart.
            return Err(TierError(why));
        }
        let now = crate::clock::now_us();
        let current = self.bucket.get("lease").await?;
        let mut mode = PutMode::Overwrite;
        let mut generation = self.generation.load(Ordering::SeqCst);
        if let Some((b, tag)) = &current {
            let l: Lease = serde_json::from_slice(b)
                .map_err(|e| TierError(format!("the lease object is not readable: {e}")))?;
            let lost = if l.holder != self.holder && l.live(now) {
                Some(held_elsewhere(self.bucket.url(), &l))
            } else if first && l.holder != self.holder && l.generation > generation {
                Some(TierError(format!(
                    "{} moved on since this directory last served it: another appliance (host \
                     {}) served it at generation {}, this directory holds generation {}; its \
                     index and catalog are stale. Attach again into an empty directory \
                     (`coffer-appliance attach`)",
                    self.bucket.url(),
                    l.host,
                    l.generation,
                    generation
                )))
            } else if !first && (l.holder != self.holder || l.generation != generation) {
                Some(TierError(format!(
                    "another appliance (host {}) took the lease of {}",
                    l.host,
                    self.bucket.url()
                )))
            } else {
                None
            };
            if let Some(e) = lost {
                if !first {
                    tracing::error!(error = %e, "the object-store lease was taken over: writes stop");
                }
                lock(&self.state).lost = Some(e.0.clone());
                return Err(e);
            }
            if first {
                generation = l.generation.max(generation) + 1;
            }
            if self.conditional {
                mode = PutMode::Update(UpdateVersion {
                    e_tag: tag.clone(),
                    version: None,
                });
            }
        } else {
            if first {
                generation += 1;
            }
            if self.conditional {
                mode = PutMode::Create;
            }
        }
        let lease = Lease {
            holder: self.holder.clone(),
            host: hostname(),
            pid: std::process::id(),
            until_us: now + LEASE_TTL_US,
            generation,
        };
        let sent = Instant::now();
        let body = serde_json::to_vec(&lease).map_err(|e| TierError(e.to_string()))?;
        let r = self
            .bucket
            .store
            .put_opts(
                &self.bucket.key("lease"),
                PutPayload::from(body),
                PutOptions {
                    mode,
                    ..PutOptions::default()
                },
            )
            .await;
        match r {
            Ok(_) => {
                if first {
                    set_local_generation(&self.paths, generation)?;
                    self.generation.store(generation, Ordering::SeqCst);
                }
                // Trusted from when the request was sent, not when it was answered.
                *self.lease_ok.lock().unwrap_or_else(PoisonError::into_inner) = Some(sent);
                Ok(())
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                let why = "another appliance took the lease at the same moment".to_string();
                lock(&self.state).lost = Some(why.clone());
                Err(TierError(why))
            }
            Err(e) => Err(TierError(format!("writing the lease: {e}"))),
        }
    }

    /// Uploads the repository files and catalog journal segments that changed, then deletes the
    /// segments gone locally.
    async fn mirror(self: Arc<Self>) -> Result<(), TierError> {
        self.lease_valid()?;
        let paths = self.paths.clone();
        let files = tokio::task::spawn_blocking(move || mirrored_files(&paths))
            .await
            .map_err(|e| TierError(e.to_string()))?
            .map_err(|e| TierError(format!("listing the catalog journal: {e}")))?;
        for (name, path, stamp) in &files {
            if lock(&self.state).mirrored.get(name) == Some(stamp) {
                continue;
            }
            let b = match tokio::fs::read(path).await {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(TierError(format!("reading {}: {e}", path.display()))),
            };
            self.bucket.put(name, Bytes::from(b)).await?;
            let mut st = lock(&self.state);
            st.mirrored.insert(name.clone(), *stamp);
            if name.starts_with("catalog/") {
                st.remote_journals.insert(name.clone());
            }
        }
        let local: HashSet<&String> = files.iter().map(|f| &f.0).collect();
        let gone: Vec<String> = lock(&self.state)
            .remote_journals
            .iter()
            .filter(|n| !local.contains(n))
            .cloned()
            .collect();
        if local.iter().any(|n| n.starts_with("catalog/")) {
            for name in gone {
                self.bucket.delete(&name).await?;
                lock(&self.state).remote_journals.remove(&name);
            }
        }
        Ok(())
    }

    /// Starts the uploaders and queues every local pack the bucket lacks or holds with another
    /// size. Called once the shards recovered (every local pack but those opened since is
    /// sealed).
    ///
    /// # Errors
    /// Listing the bucket or the local packs.
    pub fn reconcile(self: &Arc<Self>) -> Result<(), TierError> {
        let remote: HashMap<PackId, u64> = self
            .run({
                let b = self.bucket.clone();
                async move { b.list_packs().await }
            })?
            .into_iter()
            .map(|(id, size, _)| (id, size))
            .collect();
        let local = self
            .paths
            .list_packs()
            .map_err(|e| TierError(format!("listing local packs: {e}")))?;
        let mut queued = 0;
        {
            let mut st = lock(&self.state);
            for (id, path) in local {
                if st.open.contains(&id) || st.staged.contains_key(&id) {
                    continue;
                }
                let Ok(md) = std::fs::metadata(&path) else {
                    continue;
                };
                match remote.get(&id) {
                    Some(&size) if size == md.len() => st.cache(id, md.len()),
                    // Pack objects are written once: never replaced by a local copy that
                    // differs (damaged?). Kept locally, not evicted; `verify` tells.
                    Some(&size) => tracing::error!(pack = %id, local = md.len(), bucket = size,
                        "the local pack and its object differ in size: both kept, run verify"),
                    None => {
                        st.staged.insert(id, (md.len(), Vec::new()));
                        st.staged_bytes += md.len();
                        queued += 1;
                        let _ = self.jobs.send(id);
                    }
                }
            }
        }
        if queued > 0 {
            tracing::info!(
                packs = queued,
                "uploading packs the object store lacks (staged before a stop or crash)"
            );
        }
        for _ in 0..UPLOADERS {
            let t = self.clone();
            self.rt.spawn(async move { t.upload_loop().await });
        }
        self.evict();
        Ok(())
    }

    async fn upload_loop(self: Arc<Self>) {
        while let Ok(id) = self.rx.recv_async().await {
            let mut wait = Duration::from_secs(1);
            loop {
                if std::env::var_os(HOLD_VAR).is_some() {
                    // Nothing held is confirmed: `--ack-after remote` answers its writers now.
                    self.fail_waiters(id, &format!("uploads are held ({HOLD_VAR})"));
                }
                while std::env::var_os(HOLD_VAR).is_some() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                crate::faults::point("s3.upload");
                let r = match self.lease_valid() {
                    Ok(()) => {
                        self.bucket
                            .upload_file(&self.paths.pack(&id), &Bucket::pack_name(&id))
                            .await
                    }
                    Err(e) => Err(e),
                };
                match r {
                    Ok(present) => {
                        self.uploaded(id, present);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(pack = %id, error = %e, retry_in = ?wait, "pack upload failed");
                        self.fail_waiters(id, &e.to_string());
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_mins(1));
                    }
                }
            }
        }
    }

    fn fail_waiters(&self, id: PackId, why: &str) {
        let mut st = lock(&self.state);
        if let Some((_, w)) = st.staged.get_mut(&id) {
            for tx in w.drain(..) {
                let _ = tx.send(Err(why.to_string()));
            }
        }
    }

    fn uploaded(&self, id: PackId, present: bool) {
        {
            let mut st = lock(&self.state);
            if let Some((len, waiters)) = st.staged.remove(&id) {
                st.staged_bytes -= len;
                for tx in waiters {
                    // A pack deleted before its upload (GC) was never confirmed by the store.
                    let _ = tx.send(if present {
                        Ok(())
                    } else {
                        Err(format!("pack {id} vanished before its upload"))
                    });
                }
                if present {
                    st.uploaded += 1;
                    st.cache(id, len);
                }
            }
        }
        crate::faults::point("s3.uploaded");
        self.changed.notify_all();
        self.evict();
    }

    /// Drops the least recently used uploaded packs from the local disk until the cache fits.
    fn evict(&self) {
        let mut victims = Vec::new();
        {
            let mut st = lock(&self.state);
            while st.cached_bytes > self.opts.cache_bytes {
                let Some((_, id)) = st.lru.pop_first() else {
                    break;
                };
                if let Some((len, _)) = st.cached.remove(&id) {
                    st.cached_bytes -= len;
                }
                victims.push(id);
            }
        }
        if victims.is_empty() {
            return;
        }
        // Outside the lock: the shards' reads and seals never wait for an unlink.
        for id in &victims {
            match std::fs::remove_file(self.paths.pack(id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(pack = %id, error = %e, "dropping a cached pack"),
            }
        }
        self.evictions.fetch_add(1, Ordering::SeqCst);
    }

    /// Moves on at each eviction (see `evictions`).
    #[must_use]
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::SeqCst)
    }

    /// A pack the writer creates: never uploaded, evicted or collected while open.
    pub fn opened(&self, id: PackId) {
        lock(&self.state).open.insert(id);
    }

    /// A pack removed before anything in it was acknowledged.
    pub fn discarded(&self, id: &PackId) {
        lock(&self.state).open.remove(id);
    }

    /// Pack `id` was sealed at `len` bytes: it is staged for upload. With
    /// [`AckAfter::Remote`], answers the receiver of the upload's outcome.
    pub fn sealed(&self, id: PackId, len: u64) -> Option<flume::Receiver<Result<(), String>>> {
        let mut st = lock(&self.state);
        st.open.remove(&id);
        let rx = match self.opts.ack_after {
            AckAfter::Remote => {
                let (tx, rx) = flume::bounded(1);
                st.staged.insert(id, (len, vec![tx]));
                Some(rx)
            }
            AckAfter::Local => {
                st.staged.insert(id, (len, Vec::new()));
                None
            }
        };
        st.staged_bytes += len;
        drop(st);
        let _ = self.jobs.send(id);
        rx
    }

    /// Reads `len` bytes at `offset` of pack `id` from the bucket.
    ///
    /// # Errors
    /// The store's.
    pub async fn read(&self, id: &PackId, offset: u64, len: usize) -> Result<Bytes, TierError> {
        let b = self.bucket.clone();
        let name = Bucket::pack_name(id);
        self.run_async(async move { b.get_range(&name, offset, len).await })
            .await
    }

    /// Marks a local read of `id` (the cache keeps recently read packs).
    pub fn touch(&self, id: &PackId) {
        let mut st = lock(&self.state);
        if let Some(&(len, _)) = st.cached.get(id) {
            st.cache(*id, len);
        }
    }

    /// Refuses writes while the staging area is full or the lease is lost.
    ///
    /// # Errors
    /// `StorageFull` or `PermissionDenied`, saying why.
    pub fn check(&self, need: u64) -> std::io::Result<()> {
        if let Err(e) = self.lease_valid() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                e.0,
            ));
        }
        let st = lock(&self.state);
        if st.staged_bytes > 0 && st.staged_bytes + need > self.opts.staging_bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "No space left in the staging area: {} bytes wait for upload to the object \
                     store (--staging-size {})",
                    st.staged_bytes, self.opts.staging_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Packs the GC must not delete now: open, staged or uploading.
    #[must_use]
    pub fn busy(&self) -> HashSet<PackId> {
        let st = lock(&self.state);
        st.open.iter().chain(st.staged.keys()).copied().collect()
    }

    /// A pack the GC deleted locally: forgotten by the cache.
    pub fn forget(&self, id: &PackId) {
        lock(&self.state).uncache(id);
    }

    /// Every pack in the bucket (GC candidates beside the local ones).
    ///
    /// # Errors
    /// A listing error (the GC run then stops, changing nothing).
    pub fn list_remote(&self) -> Result<Vec<(PackId, u64, i64)>, TierError> {
        self.lease_valid()?;
        let b = self.bucket.clone();
        self.run(async move { b.list_packs().await })
    }

    /// Deletes packs from the bucket (after the GC deleted them locally).
    ///
    /// # Errors
    /// The first failed delete.
    pub fn delete_remote(&self, ids: &[PackId]) -> Result<(), TierError> {
        self.lease_valid()?;
        let b = self.bucket.clone();
        let names: Vec<String> = ids.iter().map(Bucket::pack_name).collect();
        self.run(async move {
            let mut s = futures::stream::iter(names.into_iter().map(|n| {
                let b = b.clone();
                async move { b.delete(&n).await }
            }))
            .buffer_unordered(8);
            while let Some(r) = s.next().await {
                r?;
            }
            Ok(())
        })
    }

    /// Whether locked snapshots' objects get compliance retention (Object Lock is enabled on
    /// the bucket).
    #[must_use]
    pub fn object_lock(&self) -> bool {
        self.object_lock == LockSupport::Enabled
    }

    /// Of `ids`, the packs whose object in the bucket is retained past now: the GC neither
    /// deletes nor compacts them. Empty without Object Lock.
    ///
    /// # Errors
    /// A retention that cannot be read (the GC run then stops).
    pub fn retained(&self, ids: &[PackId]) -> Result<HashSet<PackId>, TierError> {
        if !self.object_lock() {
            return Ok(HashSet::new());
        }
        let now = coffer_proto::now_us();
        let mut out = HashSet::new();
        let mut ask = Vec::new();
        {
            let st = lock(&self.state);
            for id in ids {
                match st.retained.get(&Bucket::pack_name(id)) {
                    Some(&until) if until > now => {
                        out.insert(*id);
                    }
                    _ => ask.push(*id),
                }
            }
        }
        let b = self.bucket.clone();
        let found = self.run(async move {
            let mut s = futures::stream::iter(ask.into_iter().map(|id| {
                let b = b.clone();
                async move {
                    let key = b.key(&Bucket::pack_name(&id)).to_string();
                    b.lock.retention(&key).await.map(|r| (id, r))
                }
            }))
            .buffer_unordered(8);
            let mut found = Vec::new();
            while let Some(r) = s.next().await {
                if let (id, Some(r)) = r? {
                    found.push((id, r));
                }
            }
            Ok::<_, TierError>(found)
        })?;
        let mut st = lock(&self.state);
        for (id, r) in found {
            // Any retention keeps the pack; only compliance retention counts as set by us.
            if r.compliance {
                st.retained.insert(Bucket::pack_name(&id), r.until_us);
            }
            if r.until_us > now {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// Sets compliance retention until `until_us` on each of `names` (objects under the
    /// prefix) whose retention ends earlier; answers how many changed. Never shortens one.
    ///
    /// # Errors
    /// Without the lease, or the first refusal or failure of the store.
    pub fn retain(&self, names: Vec<String>, until_us: i64) -> Result<usize, TierError> {
        self.lease_valid()?;
        let names: Vec<String> = {
            let st = lock(&self.state);
            names
                .into_iter()
                .filter(|n| st.retained.get(n).is_none_or(|&u| u < until_us))
                .collect()
        };
        let b = self.bucket.clone();
        let done = self.run(async move {
            let mut s = futures::stream::iter(names.into_iter().map(|n| {
                let b = b.clone();
                async move {
                    let key = b.key(&n).to_string();
                    let had = b.lock.retention(&key).await?;
                    match had {
                        Some(r) if r.compliance && r.until_us >= until_us => {
                            Ok::<_, TierError>((n, r.until_us, false))
                        }
                        _ => {
                            b.lock.retain(&key, until_us).await?;
                            Ok((n, until_us, true))
                        }
                    }
                }
            }))
            .buffer_unordered(8);
            let mut done = Vec::new();
            while let Some(r) = s.next().await {
                done.push(r?);
            }
            Ok::<_, TierError>(done)
        })?;
        let mut st = lock(&self.state);
        let mut changed = 0;
        for (n, until, set) in done {
            st.retained.insert(n, until);
            changed += usize::from(set);
        }
        Ok(changed)
    }

    /// [`Self::retain`] on what a fresh machine needs besides packs: the repository file, the
    /// wrapped keys and the catalog journal as mirrored now (holding every lock so far). Later
    /// journal versions replace it as the current object; this version stays in the bucket's
    /// history until `until_us`.
    ///
    /// # Errors
    /// As [`Self::retain`], or the mirror's.
    pub fn retain_repository(self: &Arc<Self>, until_us: i64) -> Result<usize, TierError> {
        self.mirror_now()?;
        let b = self.bucket.clone();
        let mut names = vec!["coffer.repo".to_string()];
        names.extend(
            self.run(async move {
                let mut l = b.list("keys").await?;
                l.extend(b.list("catalog").await?);
                Ok::<_, TierError>(l)
            })?
            .into_iter()
            .map(|l| l.name),
        );
        // These objects are replaced (the journal at each mirror, the keys at a password
        // change): what is cached holds for the version seen then only.
        {
            let mut st = lock(&self.state);
            st.retained.retain(|n, _| n.starts_with("packs/"));
        }
        self.retain(names, until_us)
    }

    /// Waits until every pack staged now is uploaded, at most `limit`.
    ///
    /// # Errors
    /// Packs still staged at the limit.
    pub fn flush(&self, limit: Duration) -> Result<(), TierError> {
        let until = Instant::now() + limit;
        let mut st = lock(&self.state);
        let want: Vec<PackId> = st.staged.keys().copied().collect();
        loop {
            let left = want.iter().filter(|id| st.staged.contains_key(id)).count();
            if left == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= until {
                return Err(TierError(format!(
                    "{left} packs still wait for upload after {} s",
                    limit.as_secs()
                )));
            }
            st = self
                .changed
                .wait_timeout(st, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// `(staged packs, staged bytes, cached bytes, uploads since start)`.
    #[must_use]
    pub fn counts(&self) -> (usize, u64, u64, u64) {
        let st = lock(&self.state);
        (
            st.staged.len(),
            st.staged_bytes,
            st.cached_bytes,
            st.uploaded,
        )
    }

    /// At a graceful stop (shards already sealed their packs): uploads what is staged (at most
    /// `limit`; the rest goes at the next start), mirrors the catalog, releases the lease.
    pub fn shutdown(self: &Arc<Self>, limit: Duration) {
        let mut whole = true;
        if let Err(e) = self.flush(limit) {
            tracing::error!(error = %e, "stopping with packs not uploaded yet: the lease is kept \
                (it expires in a minute); restart this appliance to upload them, do not attach \
                elsewhere before");
            whole = false;
        }
        if let Err(e) = self.mirror_now() {
            tracing::error!(error = %e, "mirroring the catalog at the stop: the lease is kept; \
                restart this appliance to finish");
            whole = false;
        }
        self.stopping.store(true, Ordering::SeqCst);
        if !whole {
            return;
        }
        // Released, not deleted: the generation stays in the bucket.
        let (b, holder, generation) = (
            self.bucket.clone(),
            self.holder.clone(),
            self.generation.load(Ordering::SeqCst),
        );
        let r = self.run(async move {
            let Some((bytes, _)) = b.get("lease").await? else {
                return Ok(());
            };
            let mut l: Lease = serde_json::from_slice(&bytes)
                .map_err(|e| TierError(format!("the lease object is not readable: {e}")))?;
            if l.holder == holder && l.generation == generation {
                l.until_us = 0;
                let body = serde_json::to_vec(&l).map_err(|e| TierError(e.to_string()))?;
                b.put("lease", Bytes::from(body)).await?;
            }
            Ok::<(), TierError>(())
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "releasing the object-store lease (it expires by itself)");
        }
    }
}

/// A small runtime for the one-shot commands (`init`, `attach`).
fn oneshot_runtime() -> Result<tokio::runtime::Runtime, TierError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| TierError(format!("starting the object-store threads: {e}")))
}

/// What `init --storage` found and did.
#[derive(Debug, Clone)]
pub struct Published {
    /// Whether the store honours conditional writes (an exclusive lease).
    pub conditional: bool,
    /// Whether locked snapshots' objects get compliance retention.
    pub object_lock: LockSupport,
}

/// Whether the bucket has S3 Object Lock (`attach` records it in `storage.json`).
///
/// # Errors
/// The store's, or an answer that is neither yes nor a definite no.
pub fn detect_object_lock(cfg: &StorageConfig) -> Result<LockSupport, TierError> {
    let bucket = cfg.connect(Timeouts::default())?;
    oneshot_runtime()?.block_on(bucket.lock.support())
}

/// Refuses a bucket prefix that already holds a repository (before `init` creates anything).
///
/// # Errors
/// A repository is there, or the store cannot be reached.
pub fn check_empty(cfg: &StorageConfig) -> Result<(), TierError> {
    let bucket = cfg.connect(Timeouts::default())?;
    let rt = oneshot_runtime()?;
    if rt.block_on(bucket.get("coffer.repo"))?.is_some() {
        return Err(TierError(format!(
            "{} already holds a coffer repository: use `coffer-appliance attach` to serve it",
            cfg.url
        )));
    }
    Ok(())
}

/// After `init`: the repository file and wrapped keys go to the bucket, and `storage.json`
/// names it.
///
/// # Errors
/// The store's, or writing `storage.json`.
pub fn publish(paths: &RepoPaths, cfg: &StorageConfig) -> Result<Published, TierError> {
    let bucket = cfg.connect(Timeouts::default())?;
    let rt = oneshot_runtime()?;
    let conditional = rt.block_on(bucket.probe_conditional())?;
    let object_lock = rt.block_on(bucket.lock.support())?;
    let cfg = &StorageConfig {
        object_lock: object_lock == LockSupport::Enabled,
        ..cfg.clone()
    };
    let files =
        mirrored_files(paths).map_err(|e| TierError(format!("reading the repository: {e}")))?;
    rt.block_on(async {
        for (name, path, _) in files {
            let b = tokio::fs::read(&path)
                .await
                .map_err(|e| TierError(format!("reading {}: {e}", path.display())))?;
            bucket.put(&name, Bytes::from(b)).await?;
        }
        Ok::<(), TierError>(())
    })?;
    holder_id(paths)?;
    set_local_generation(paths, 0)?;
    cfg.save(paths)?;
    Ok(Published {
        conditional,
        object_lock,
    })
}

/// What `attach` brought down.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fetched {
    pub packs: u64,
    pub bytes: u64,
    pub journals: u64,
}

/// `attach`, first half: everything the bucket holds for the repository, into the empty
/// directory `paths.root` (`coffer.repo` last, so that an interrupted attach is never taken for
/// a repository). `progress(done, total)` is called after each pack. The caller unlocks the
/// key, rebuilds the index and the catalog, then [`StorageConfig::save`]s.
///
/// # Errors
/// A live lease held by a running appliance, a prefix without a repository, the store's, the
/// file system's.
pub fn fetch_repository(
    paths: &RepoPaths,
    cfg: &StorageConfig,
    mut progress: impl FnMut(u64, u64),
) -> Result<Fetched, TierError> {
    let bucket = cfg.connect(Timeouts::default())?;
    let rt = oneshot_runtime()?;
    let holder = holder_id(paths)?;
    let lease = rt.block_on(check_lease(&bucket, &holder))?;
    set_local_generation(paths, lease.map_or(0, |l| l.generation))?;
    let Some((repo_file, _)) = rt.block_on(bucket.get("coffer.repo"))? else {
        return Err(TierError(format!("{} holds no coffer repository", cfg.url)));
    };
    crate::repo::RepoConfig::decode(&repo_file)
        .map_err(|e| TierError(format!("{}: coffer.repo: {e}", cfg.url)))?;
    let io = |what: &str, e: std::io::Error| TierError(format!("{what}: {e}"));
    std::fs::create_dir_all(paths.keys()).map_err(|e| io("creating keys/", e))?;
    let mut out = Fetched::default();
    let listed = rt.block_on(async {
        let keys = bucket.list("keys").await?;
        let journals = bucket.list("catalog").await?;
        let packs = bucket.list_packs().await?;
        Ok::<_, TierError>((keys, journals, packs))
    })?;
    let (keys, journals, packs) = listed;
    for l in keys.iter().chain(&journals) {
        let local = if let Some(n) = l.name.strip_prefix("keys/") {
            paths.keys().join(n)
        } else {
            let n = l.name.strip_prefix("catalog/").unwrap_or(&l.name);
            crate::catalog::journal::dir(paths).join(n)
        };
        if l.name.contains("..") || l.name.matches('/').count() != 1 {
            continue;
        }
        rt.block_on(bucket.download(&l.name, &local))?;
        if l.name.starts_with("catalog/") {
            out.journals += 1;
        }
    }
    let ids = packs.into_iter().map(|p| p.0).collect();
    (out.packs, out.bytes) = rt.block_on(download_packs(&bucket, paths, ids, &mut progress))?;
    crate::repo::write_file_durable(&paths.config(), &repo_file, 0o600)
        .map_err(|e| io("writing coffer.repo", e))?;
    Ok(out)
}

/// Downloads every pack of the bucket that is not on the local disk (`verify` reads pack files).
/// Answers `(packs, bytes)` fetched.
///
/// # Errors
/// The store's or the file system's.
pub fn fetch_missing_packs(
    paths: &RepoPaths,
    cfg: &StorageConfig,
) -> Result<(u64, u64), TierError> {
    let bucket = cfg.connect(Timeouts::default())?;
    let rt = oneshot_runtime()?;
    rt.block_on(async {
        let missing: Vec<PackId> = bucket
            .list_packs()
            .await?
            .into_iter()
            .map(|p| p.0)
            .filter(|id| !paths.pack(id).exists())
            .collect();
        download_packs(&bucket, paths, missing, &mut |_, _| {}).await
    })
}

/// Downloads packs `ids` into their local files, 8 at a time; `progress(done, total)` after
/// each. Answers `(packs, bytes)`.
async fn download_packs(
    bucket: &Bucket,
    paths: &RepoPaths,
    ids: Vec<PackId>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, u64), TierError> {
    let total = ids.len() as u64;
    let mut s = futures::stream::iter(ids.into_iter().map(|id| {
        let b = bucket.clone();
        let path = paths.pack(&id);
        async move { b.download(&Bucket::pack_name(&id), &path).await }
    }))
    .buffer_unordered(4);
    let (mut n, mut bytes) = (0, 0);
    while let Some(r) = s.next().await {
        bytes += r?;
        n += 1;
        progress(n, total);
    }
    Ok((n, bytes))
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// The files mirrored to the bucket: `(object name, path, (len, mtime ns))`.
/// A mirrored file: object name, local path, `(len, mtime ns)`.
type Mirrored = (String, PathBuf, (u64, i128));

fn mirrored_files(paths: &RepoPaths) -> std::io::Result<Vec<Mirrored>> {
    let stamp = |p: &Path| -> std::io::Result<(u64, i128)> {
        let md = std::fs::metadata(p)?;
        let t = md
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        Ok((md.len(), t))
    };
    let mut out = vec![(
        "coffer.repo".to_string(),
        paths.config(),
        stamp(&paths.config())?,
    )];
    for (dir, under) in [
        (paths.keys(), "keys"),
        (crate::catalog::journal::dir(paths), "catalog"),
    ] {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for f in rd {
            let f = f?;
            if !f.file_type()?.is_file() {
                continue;
            }
            let Some(name) = f.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // Temporary files of durable writes are not the file yet.
            if name.starts_with('.') || name.to_ascii_lowercase().ends_with(".tmp") {
                continue;
            }
            let p = f.path();
            if let Ok(s) = stamp(&p) {
                out.push((format!("{under}/{name}"), p, s));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> StorageConfig {
        StorageConfig {
            url: url.into(),
            endpoint: None,
            region: "garage".into(),
            credentials_file: None,
            object_lock: false,
        }
    }

    #[test]
    fn storage_urls_name_a_bucket_and_a_clean_prefix() {
        assert_eq!(
            cfg("s3://backups/site-a/coffer/").bucket_prefix().unwrap(),
            ("backups".into(), "site-a/coffer".into())
        );
        assert_eq!(
            cfg("s3://backups").bucket_prefix().unwrap(),
            ("backups".into(), String::new())
        );
        for bad in [
            "backups/x",
            "file:///x",
            "s3://BIG/x",
            "s3://ab",
            "s3://b_c/x",
            "s3://bucket/../x",
            "s3://bucket/a\n",
        ] {
            assert!(cfg(bad).bucket_prefix().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn credentials_come_from_the_named_profile_of_the_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("creds");
        std::fs::write(
            &f,
            "[other]\naws_access_key_id = NO\naws_secret_access_key = NO\n\n[default]\n\
             # comment\naws_access_key_id = GK1\naws_secret_access_key=s3cr3t\n",
        )
        .unwrap();
        let (key, secret, token) = credentials(Some(&f)).unwrap();
        assert_eq!(
            (key.as_str(), secret.as_str(), token),
            ("GK1", "s3cr3t", None)
        );
        std::fs::write(&f, "[default]\naws_access_key_id = GK1\n").unwrap();
        let e = credentials(Some(&f)).unwrap_err().to_string();
        assert!(e.contains("aws_secret_access_key"), "{e}");
    }
}
