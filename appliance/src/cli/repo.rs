//! `init`, `verify`, `rebuild-index` and `rebuild-catalog`: the repository on disk.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use coffer_appliance::Catalog;
use coffer_appliance::{ChunkerParams, Mode, RepoConfig, RepoPaths, Sharding};
use coffer_appliance::{KdfParams, MasterKey};
use coffer_appliance::{OpenMode, RocksIndex};

use super::{repo_password, unlock, RepoPassword};

/// Where packs live: the local disk (default) or an S3-compatible bucket.
#[derive(clap::Args, Debug)]
pub struct StorageArgs {
    /// Keep packs in an S3-compatible object store: s3://BUCKET/PREFIX (the local packs/
    /// directory becomes the staging area and read cache). Credentials come from
    /// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --s3-credentials-file, never the repository.
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// The object store's endpoint, e.g. http://127.0.0.1:3900 (Garage) or https://rgw:7480.
    #[arg(long, value_name = "URL", requires = "storage")]
    pub s3_endpoint: Option<String>,
    /// The bucket's region (Garage: the `s3_region` of its configuration).
    #[arg(long, value_name = "REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// An AWS shared-credentials file (section [default], or $AWS_PROFILE), read at each start.
    #[arg(long, value_name = "FILE", requires = "storage")]
    pub s3_credentials_file: Option<std::path::PathBuf>,
}

impl StorageArgs {
    fn config(&self) -> anyhow::Result<Option<coffer_appliance::StorageConfig>> {
        let Some(url) = &self.storage else {
            return Ok(None);
        };
        let cfg = coffer_appliance::StorageConfig {
            url: url.clone(),
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            credentials_file: match &self.s3_credentials_file {
                Some(f) => Some(std::path::absolute(f)?),
                None => None,
            },
            object_lock: false,
        };
        cfg.bucket_prefix()?;
        Ok(Some(cfg))
    }
}

#[allow(clippy::too_many_arguments)] // one per `init` flag group
pub fn init(
    paths: &RepoPaths,
    password: &RepoPassword,
    shards: Option<u16>,
    avg: u32,
    default_access: &str,
    mode: Mode,
    storage: &StorageArgs,
) -> anyhow::Result<()> {
    if paths.config().exists() {
        return Err(coffer_appliance::RepoError::AlreadyExists(paths.root.clone()).into());
    }
    let storage = storage.config()?;
    if let Some(s) = &storage {
        // Before anything is created: the bucket is reachable and holds no repository.
        coffer_appliance::pack::store::s3::check_empty(s)?;
    }
    let chunker = ChunkerParams {
        min: (avg / 4).max(64),
        avg,
        max: avg.saturating_mul(4),
    };
    chunker.validate()?;
    let shards = match shards {
        Some(0) => bail!("--shards must be at least 1"),
        Some(n) => n,
        None => u16::try_from(coffer_tuning::Hardware::detect().cpus.len()).unwrap_or(u16::MAX),
    };
    let pw = repo_password(password, true)?;
    coffer_appliance::create_dir_durable(&paths.root)?;
    // Private to the appliance's user even when the directory existed before.
    std::fs::set_permissions(&paths.root, std::fs::Permissions::from_mode(0o700))?;
    let cfg = RepoConfig {
        id: coffer_proto::RepositoryId::from_bytes(rand::random()),
        mode,
        sharding: Sharding::Le64Mod,
        shards,
        chunker,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            .cast_signed(),
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(paths.keys())?;
    std::fs::create_dir_all(paths.packs())?;
    let key = MasterKey::generate().wrap(pw.as_bytes(), KdfParams::DEFAULT)?;
    // Durable before anything is encrypted with it: without it the repository is unreadable.
    coffer_appliance::write_file_durable(&paths.master_key(), &key, 0o600)?;
    for s in 0..shards {
        RocksIndex::open(
            &paths.shard_index(coffer_proto::ShardId(s)),
            OpenMode::Create,
            8 << 20,
        )?;
    }
    let catalog = Catalog::open(&paths.catalog(), true)?;
    coffer_appliance::admin::apply(
        &catalog,
        &coffer_appliance::admin::Request::DefaultAccess {
            access: default_access.to_string(),
        },
    )?;
    drop(catalog);
    // The repository file is written last: its presence means the repository is complete.
    coffer_appliance::write_file_durable(&paths.config(), &cfg.encode(), 0o600)?;
    if let Some(s) = &storage {
        let p = coffer_appliance::pack::store::s3::publish(paths, s)?;
        println!(
            "packs are kept in {} (the local packs/ is the staging area and cache)",
            s.url
        );
        if !p.conditional {
            println!(
                "warning: this object store ignores conditional writes (If-None-Match): the \
                 one-writer lease is checked, not enforced atomically"
            );
        }
        match &p.object_lock {
            coffer_appliance::pack::store::objectlock::LockSupport::Enabled => println!(
                "object lock: enabled on the bucket: the objects of locked snapshots get \
                 compliance retention until the lock's end (nobody can delete them earlier)"
            ),
            coffer_appliance::pack::store::objectlock::LockSupport::Unavailable(why) => println!(
                "object lock: not available ({why}): objects in the bucket are protected by the \
                 appliance's retention locks and by the bucket's own access policy only \
                 (docs/object-storage.md, \"Retention locks and the store\")"
            ),
        }
    }
    println!(
        "built-in access: {}",
        if default_access == "append" {
            "append-only (users add and read their own snapshots, never delete them; retention \
             is the appliance's policies)"
        } else {
            "full (users may delete their own snapshots)"
        }
    );
    println!(
        "created {} repository {} in {} ({} shards, chunks {}..{}..{} bytes)",
        mode.name(),
        cfg.id,
        paths.root.display(),
        shards,
        chunker.min,
        chunker.avg,
        chunker.max
    );
    Ok(())
}

/// `attach`: a repository kept in an object store, brought to an empty directory.
pub fn attach(
    paths: &RepoPaths,
    password: &RepoPassword,
    storage: &StorageArgs,
) -> anyhow::Result<()> {
    let Some(mut cfg) = storage.config()? else {
        bail!("attach needs --storage s3://BUCKET/PREFIX");
    };
    cfg.object_lock = coffer_appliance::pack::store::s3::detect_object_lock(&cfg)?
        == coffer_appliance::pack::store::objectlock::LockSupport::Enabled;
    if paths.catalog().exists() {
        bail!(
            "{} already holds a repository: attach into an empty directory",
            paths.root.display()
        );
    }
    // Empty, or left by an interrupted attach (storage.json comes first, the catalog last): it
    // is taken up again.
    if paths.root.exists()
        && coffer_appliance::StorageConfig::load(paths)?.is_none()
        && std::fs::read_dir(&paths.root)?.next().is_some()
    {
        bail!(
            "{} is not empty: attach into an empty or new directory",
            paths.root.display()
        );
    }
    coffer_appliance::create_dir_durable(&paths.root)?;
    std::fs::set_permissions(&paths.root, std::fs::Permissions::from_mode(0o700))?;
    // First: whatever happens next, this directory is never served as a local-only repository.
    cfg.save(paths)?;
    let mut last = std::time::Instant::now();
    let got = coffer_appliance::pack::store::s3::fetch_repository(paths, &cfg, |done, total| {
        if done == total || last.elapsed() >= std::time::Duration::from_secs(2) {
            eprintln!("fetched {done}/{total} packs");
            last = std::time::Instant::now();
        }
    })?;
    println!(
        "fetched {} packs ({}) and {} catalog journal segments from {}",
        got.packs,
        coffer_appliance::human_bytes(got.bytes),
        got.journals,
        cfg.url
    );
    let master = unlock(paths, password)?;
    let out = coffer_appliance::rebuild_index(paths, &master)?;
    println!(
        "rebuilt the index from {} packs: {} chunks",
        out.stats.packs, out.stats.chunks
    );
    let r = coffer_appliance::rebuild_catalog(paths, &master)?;
    println!(
        "rebuilt the catalog: {} users, {} snapshots, {} access rules, {} policies",
        r.users, r.snapshots, r.rules, r.policies
    );
    println!(
        "attached {} to {}: start it with `coffer-appliance serve --repo {}`",
        cfg.url,
        paths.root.display(),
        paths.root.display()
    );
    Ok(())
}

pub fn rebuild_index(paths: &RepoPaths, password: &RepoPassword) -> anyhow::Result<()> {
    paths.load_config()?;
    let master = unlock(paths, password)?;
    let out = coffer_appliance::rebuild_index(paths, &master)?;
    if let Some(aside) = out.previous {
        println!("moved the previous index aside to {}", aside.display());
    }
    let stats = out.stats;
    println!(
        "rebuilt the index from {} packs: {} chunks ({} unsealed packs sealed, {} torn packs \
         set aside as <id>.torn)",
        stats.packs, stats.chunks, stats.unsealed_packs_sealed, stats.set_aside
    );
    Ok(())
}

pub fn rebuild_catalog(paths: &RepoPaths, password: &RepoPassword) -> anyhow::Result<()> {
    paths.load_config()?;
    let master = unlock(paths, password)?;
    let r = coffer_appliance::rebuild_catalog(paths, &master)?;
    println!(
        "rebuilt the catalog from journal segment {} (checkpoint + {} changes): {} users, {} \
         snapshots, {} access rules, {} policies",
        r.segment, r.changes, r.users, r.snapshots, r.rules, r.policies
    );
    if r.torn_bytes > 0 {
        println!(
            "ignored {} bytes at the journal's end: a write cut short by a crash, never \
             acknowledged",
            r.torn_bytes
        );
    }
    Ok(())
}

/// Names what damaged chunks affect and marks them for replacement (C8).
fn report_damage(
    paths: &RepoPaths,
    cfg: &coffer_appliance::RepoConfig,
    master: Option<&coffer_appliance::MasterKey>,
    damaged: &[(coffer_proto::ShardId, coffer_proto::ChunkId)],
) {
    eprintln!("{} damaged chunks", damaged.len());
    let ids: Vec<coffer_proto::ChunkId> = damaged.iter().map(|(_, id)| *id).collect();
    match master.map(|m| coffer_appliance::affected(paths, cfg, m, &ids)) {
        Some(Ok(lines)) => {
            for l in &lines {
                eprintln!("damaged: {l}");
            }
            if lines.is_empty() {
                eprintln!("no snapshot references the damaged chunks");
            }
        }
        Some(Err(e)) => eprintln!(
            "cannot list the snapshots and files the damage affects ({e}); stop the appliance \
             and run verify --read-data again"
        ),
        None => eprintln!(
            "run verify --read-data (appliance stopped) to list the snapshots and files the \
             damage affects"
        ),
    }
    match coffer_appliance::mark_damaged(paths, cfg, damaged) {
        Ok(n) => eprintln!(
            "marked {n} damaged chunks: the appliance answers them missing, so the next backup \
             holding their data uploads them again and replaces the damaged records; restores of \
             affected files fail until then"
        ),
        Err(e) => eprintln!(
            "damaged chunks not marked ({e}): a running appliance marks a damaged record when it \
             reads one; or stop it and run verify again"
        ),
    }
}

pub fn verify(repo: &Path, password: &RepoPassword, read_data: bool) -> anyhow::Result<ExitCode> {
    let paths = RepoPaths::new(repo);
    let cfg = paths.load_config()?;
    let master = if read_data {
        Some(unlock(&paths, password)?)
    } else {
        None
    };
    let rep =
        coffer_appliance::verify(&paths, &cfg, master.as_ref()).map_err(|e| anyhow::anyhow!(e))?;
    for e in &rep.errors {
        eprintln!("error: {e}");
    }
    for w in &rep.warnings {
        eprintln!("warning: {w}");
    }
    if !rep.damaged.is_empty() {
        report_damage(&paths, &cfg, master.as_ref(), &rep.damaged);
    }
    println!(
        "verify: {} chunks in {} packs checked{}, {} errors, {} warnings",
        rep.chunks,
        rep.packs,
        if read_data {
            " (data read and hashed)"
        } else {
            ""
        },
        rep.errors.len(),
        rep.warnings.len()
    );
    if !rep.errors.is_empty() {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
