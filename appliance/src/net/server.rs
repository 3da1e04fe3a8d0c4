//! `serve`: opens the repository, starts one pinned shard per planned core, then the network
//! island (tokio + tonic + rustls) on the listening socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use coffer_proto::{v1, ShardId};
use coffer_tuning::{Hardware, Plan};
use tokio::io::AsyncReadExt;

use super::admin_socket::Admin;
use super::calls::ObserveLayer;
use super::limits::{CallLayer, Connections};
use super::listen::{accept_tls, listener, tls_acceptor, Listener};
use super::metrics_http::{self, Scrape};
use super::ServeError;
use crate::access::{Auth, ControlUser};
use crate::catalog::Catalog;
use crate::crypto::keys::MasterKey;
use crate::error::{ApplianceError, RepoError};
use crate::maintenance::gc::{Collector, Gate, GcConfig};
use crate::maintenance::schedule::Schedule;
use crate::net::service::{CofferService, HelloInfo};
use crate::net::tls::TlsIdentity;
use crate::repo::{RepoConfig, RepoPaths};
use crate::shard::{self, RunningShard, ShardConfig};

/// Options of `serve`, as plain data.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: String,
    pub tls: TlsIdentity,
    /// Override of the pack size target (tests use small packs).
    pub pack_target: Option<u64>,
    /// Shut down gracefully when standard input reaches end of file (embedding, tests).
    pub shutdown_on_stdin: bool,
    /// The server control account, if any.
    pub control: Option<ControlUser>,
    /// Permissions of a `unix:` listening socket.
    pub listen_mode: u32,
    /// A connection that has not completed its TLS handshake by then is closed.
    pub handshake_timeout: Duration,
    /// Free bytes kept on the packs' file system for the index and catalog (`None`: 2 % of
    /// it, between 8 MiB and 1 GiB).
    pub space_reserve: Option<u64>,
    /// When retention runs (`None`: never, only `maintenance run`).
    pub maintenance: Option<Schedule>,
    /// How garbage collection collects (grace window, compaction threshold).
    pub gc: GcConfig,
    /// Overrides of the tuning plan's resource limits (`net::limits`).
    pub limits: super::limits::LimitFlags,
    /// Where `/metrics` is served in plain HTTP (`None`: nowhere).
    pub metrics_listen: Option<String>,
    /// The bearer token a scrape must present (`None`: none needed).
    pub metrics_token: Option<String>,
    /// Where the web UI is served over HTTPS (`None`: nowhere).
    pub ui_listen: Option<String>,
    /// The built-in UI administrator's password (`--random-password`).
    pub ui_password: Option<String>,
    /// How the object store is used when the repository has one (`storage.json`).
    pub tier: crate::pack::store::s3::TierOptions,
}

/// Warns when the repository is readable or writable by other local users (it holds password
/// hashes, identities, snapshot metadata and wrapped keys). Returns the warnings.
#[must_use]
pub fn check_private(paths: &RepoPaths) -> Vec<String> {
    let mut out = Vec::new();
    let mut look = vec![paths.root.clone()];
    if let Ok(rd) = std::fs::read_dir(&paths.root) {
        look.extend(rd.flatten().map(|e| e.path()));
    }
    for p in look {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !m.file_type().is_socket() {
            out.push(format!(
                "{} is mode {mode:04o}: other local users can reach the repository (password \
                 hashes, identities, snapshot metadata); run `chmod -R go-rwx {}`",
                p.display(),
                paths.root.display()
            ));
        }
    }
    out
}

/// Message size limit for a repository with chunks of at most `max_chunk` bytes.
#[must_use]
pub fn max_message_size(max_chunk: u32) -> u32 {
    (2 * max_chunk + (1 << 20)).max(16 << 20)
}

/// Refuses to serve an index that is missing while packs exist (C7).
///
/// # Errors
/// [`RepoError::IndexMissing`].
pub fn check_index_present(paths: &RepoPaths, cfg: &RepoConfig) -> Result<(), RepoError> {
    for s in cfg.shard_ids() {
        let p = paths.shard_index(s);
        if !p.join("CURRENT").exists() {
            return Err(RepoError::IndexMissing(p));
        }
    }
    Ok(())
}

/// Size of `<repo>/ballast`, space set aside so that RocksDB (index and catalog) can always
/// open: opening replays its logs into new files, and fails on a file system filled to the last
/// byte (by something else, or with `--space-reserve 0`).
pub const BALLAST_BYTES: u64 = 8 << 20;

/// Releases the ballast when the repository's file system is full, so that the indexes can open;
/// re-creates it when there is room again (at least twice its size free).
pub fn emergency_space(paths: &RepoPaths) {
    let ballast = paths.root.join("ballast");
    let Ok(st) = rustix::fs::statvfs(&paths.root) else {
        return;
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if ballast.exists() {
        if free < BALLAST_BYTES {
            match std::fs::remove_file(&ballast) {
                Ok(()) => tracing::warn!(
                    free,
                    "the repository's file system is full: released the {} MiB emergency reserve \
                     ({}) so that the index and catalog can open; free space — backups are \
                     refused until there is room, and the reserve is re-created then",
                    BALLAST_BYTES >> 20,
                    ballast.display()
                ),
                Err(e) => tracing::error!(error = %e, "cannot release the emergency reserve"),
            }
        }
    } else if free >= 2 * BALLAST_BYTES {
        let made = std::fs::File::create(&ballast).and_then(|f| {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, BALLAST_BYTES)?;
            f.sync_all()
        });
        if let Err(e) = made {
            tracing::warn!(error = %e, "cannot create the emergency reserve");
            let _ = std::fs::remove_file(&ballast);
        }
    }
}

/// Runs the appliance until SIGTERM or SIGINT.
///
/// # Errors
/// Startup failures, with what to do about them.
pub fn serve(paths: &RepoPaths, master: MasterKey, opts: &ServeOptions) -> Result<(), ServeError> {
    let cfg = preflight(paths)?;
    let hw = Hardware::detect_for(&paths.root);
    let plan = Plan::new(&hw, usize::from(cfg.shards))?;
    check_memlock(&hw)?;
    let limits = opts.limits.apply(plan.limits);
    tracing::info!(?limits, "resource limits");
    let master = Arc::new(master);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let tier = start_tier(paths, opts)?;
    let shards: Vec<RunningShard> = shard::spawn_all(shard_configs(
        &plan,
        paths,
        &master,
        &cfg,
        opts,
        limits.shard_queue_bytes,
        &metrics,
        tier.as_ref(),
    ))?;
    let catalog = Arc::new(Catalog::open(&paths.catalog(), false)?);
    // Every catalog change is also journaled in the packs (rebuild-catalog), starting with a
    // checkpoint that takes in what offline tools changed.
    catalog.attach_journal(paths, master.clone(), cfg.id)?;
    tier_ready(tier.as_ref(), &catalog)?;
    note_clock_shift(&catalog)?;
    metrics.reset_backups(&catalog.snapshots()?);
    let max_msg = max_message_size(cfg.chunker.max);
    let hello = hello_info(&cfg, &master, max_msg);
    let handles = shards.iter().map(|s| s.handle.clone()).collect();
    let indexes = shards.iter().map(|s| s.handle.index.clone()).collect();
    check_control(&catalog, opts)?;
    let mut auth = Auth::new(catalog.clone(), opts.control.clone())?;
    auth.set_session_chunks(limits.session_chunks, limits.all_session_chunks);
    let auth = Arc::new(auth);
    let fanout = crate::shard::Shards::new(handles);
    let ui_reads = (fanout.clone(), cfg.mode);
    let gate = Arc::new(Gate::default());
    let gc = Arc::new(
        Collector::new(
            fanout.clone(),
            catalog.clone(),
            auth.clone(),
            gate.clone(),
            paths.clone(),
            opts.gc,
        )
        .with_tier(tier.clone()),
    );
    let service = CofferService::new(
        fanout,
        catalog.clone(),
        auth.clone(),
        hello,
        gate,
        limits,
        metrics.clone(),
    );
    let scrape = Arc::new(Scrape {
        metrics: metrics.clone(),
        token: opts.metrics_token.clone(),
        auth: auth.clone(),
        root: paths.root.clone(),
        indexes,
        budgets: service.budgets(),
        mode: cfg.mode,
        samples: std::sync::Mutex::default(),
        tier: tier.clone(),
    });
    let rt = net_runtime(plan.network_threads)?;
    spawn_tier_tasks(&rt, tier.as_ref(), &ui_reads.0, &gc);
    let admin = Admin {
        socket: paths.admin_socket(),
        catalog,
        auth,
        gc,
        metrics,
        scrape: scrape.clone(),
    };

    let net = run_network(
        service,
        admin,
        scrape,
        opts,
        max_msg as usize,
        limits,
        ui_reads,
    );
    let result = rt.block_on(net);
    // The service (and with it every shard handle) is gone: shards finish what is in flight,
    // seal their open packs and stop.
    // A blocking read of stdin (`--shutdown-on-stdin`) may still be pending: do not wait for it.
    rt.shutdown_timeout(Duration::from_secs(2));
    for s in shards {
        drop(s.handle);
        s.join
            .join()
            .map_err(|e| ServeError::Refused(format!("a shard stopped abnormally: {e}")))?;
    }
    if let Some(t) = tier {
        // The shards sealed their packs: upload them, the catalog last, and free the lease.
        t.shutdown(TIER_DRAIN);
    }
    result
}

/// How long a graceful stop waits for staged packs to reach the object store (the rest is
/// uploaded at the next start).
const TIER_DRAIN: Duration = Duration::from_mins(5);

fn net_runtime(threads: usize) -> Result<tokio::runtime::Runtime, ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("net")
        .enable_all()
        .build()
        .map_err(|e| ServeError::io("starting the network threads", e))
}

fn check_memlock(hw: &Hardware) -> Result<(), ServeError> {
    if hw.memlock_bytes < coffer_tuning::MIN_MEMLOCK_BYTES {
        return Err(ServeError::Refused(format!(
            "RLIMIT_MEMLOCK is {} bytes; io_uring needs at least {} (set LimitMEMLOCK=infinity in \
             the systemd unit or raise `ulimit -l`)",
            hw.memlock_bytes,
            coffer_tuning::MIN_MEMLOCK_BYTES
        )));
    }
    Ok(())
}

/// Once the shards recovered (every local pack not opened since is sealed) and the catalog is
/// journaled: uploads start, and with `--ack-after remote` a snapshot, account or rule change
/// is answered once the journal holding it is in the object store.
fn tier_ready(
    tier: Option<&Arc<crate::pack::store::s3::Tier>>,
    catalog: &Catalog,
) -> Result<(), ServeError> {
    let Some(t) = tier else {
        return Ok(());
    };
    t.reconcile()
        .map_err(|e| ServeError::Refused(e.to_string()))?;
    if t.ack_after() == crate::pack::store::s3::AckAfter::Remote {
        let t = t.clone();
        catalog.confirm_with(Arc::new(move || t.mirror_now().map_err(|e| e.to_string())));
    }
    Ok(())
}

/// With an object store, how often the shards' open packs are sealed (and so staged for
/// upload): an idle appliance's last acknowledged writes reach the bucket within this, not
/// only once a pack fills.
const SEAL_EVERY: Duration = Duration::from_mins(1);

async fn seal_periodically(shards: crate::shard::Shards) {
    let mut every = tokio::time::interval(SEAL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        for h in shards.handles() {
            if let Err(e) = h.seal().await {
                tracing::warn!(error = %e, "sealing an open pack for upload");
            }
        }
    }
}

/// With an object store: the periodic seal, and with Object Lock the lock passes. Nothing
/// without one (a collector held by a task would keep the shards from stopping).
fn spawn_tier_tasks(
    rt: &tokio::runtime::Runtime,
    tier: Option<&Arc<crate::pack::store::s3::Tier>>,
    shards: &crate::shard::Shards,
    gc: &Arc<Collector>,
) {
    let Some(t) = tier else {
        return;
    };
    rt.spawn(seal_periodically(shards.clone()));
    if t.object_lock() {
        rt.spawn(apply_locks_periodically(gc.clone()));
    }
}

/// With S3 Object Lock on the bucket, how often snapshot locks are compared with the retention
/// already set (a pass with nothing new reads only the catalog).
const LOCKS_EVERY: Duration = Duration::from_secs(10);

/// Applies snapshot locks to the bucket until the appliance stops (a lock set or extended
/// reaches its packs within [`LOCKS_EVERY`] once they are uploaded). A pass is skipped while a
/// collection runs: the collection makes one.
async fn apply_locks_periodically(gc: Arc<Collector>) {
    let mut every = tokio::time::interval(LOCKS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let gc = gc.clone();
        let rt = tokio::runtime::Handle::current();
        match tokio::task::spawn_blocking(move || gc.try_apply_locks(&rt)).await {
            Ok(Some(Ok(r))) if r.objects > 0 || r.pending > 0 || r.failed > 0 => {
                tracing::info!(
                    snapshots = r.snapshots,
                    objects = r.objects,
                    pending = r.pending,
                    failed = r.failed,
                    "object lock: retention applied"
                );
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "object lock: applying snapshot locks (tried again)");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "object lock task failed"),
        }
    }
}

/// Connects the object store when the repository has one, taking its lease.
fn start_tier(
    paths: &RepoPaths,
    opts: &ServeOptions,
) -> Result<Option<Arc<crate::pack::store::s3::Tier>>, ServeError> {
    use crate::pack::store::s3::{StorageConfig, Tier};
    let Some(cfg) = StorageConfig::load(paths).map_err(|e| ServeError::Refused(e.to_string()))?
    else {
        return Ok(None);
    };
    let tier =
        Tier::start(paths, &cfg, opts.tier).map_err(|e| ServeError::Refused(e.to_string()))?;
    tracing::info!(
        storage = %cfg.url,
        ack_after = ?opts.tier.ack_after,
        staging = opts.tier.staging_bytes,
        cache = opts.tier.cache_bytes,
        "packs are stored in the object store"
    );
    Ok(Some(tier))
}

/// Before serving: the configuration, an index present, warnings about permissions, the
/// emergency space file.
fn preflight(paths: &RepoPaths) -> Result<RepoConfig, ServeError> {
    let cfg = paths.load_config()?;
    check_index_present(paths, &cfg)?;
    for w in check_private(paths) {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
    emergency_space(paths);
    Ok(cfg)
}

/// What `Hello` answers for this repository.
fn hello_info(cfg: &RepoConfig, master: &MasterKey, max_msg: u32) -> HelloInfo {
    HelloInfo {
        mode: cfg.mode,
        repository_id: cfg.id,
        chunker: cfg.chunker.into(),
        dedup_key: master.dedup_key(),
        limits: v1::Limits {
            max_chunk_size: cfg.chunker.max,
            max_message_size: max_msg,
            max_ids_per_batch: 1 << 16,
            max_chunks_per_batch: 4096,
        },
    }
}

/// One shard configuration per planned core.
#[allow(clippy::too_many_arguments)] // each is one part of the shard's configuration
fn shard_configs(
    plan: &Plan,
    paths: &RepoPaths,
    master: &Arc<MasterKey>,
    cfg: &RepoConfig,
    opts: &ServeOptions,
    queue_limit: u64,
    metrics: &Arc<crate::metrics::Metrics>,
    tier: Option<&Arc<crate::pack::store::s3::Tier>>,
) -> Vec<ShardConfig> {
    plan.shards
        .iter()
        .map(|p| ShardConfig {
            shard: ShardId(p.shard),
            metrics: Some(metrics.clone()),
            cpu: Some(p.cpu),
            io_memory: plan.io_memory_per_shard,
            ring_depth: plan.ring_depth,
            paths: paths.clone(),
            master: master.clone(),
            repo_id: cfg.id,
            sealed: cfg.mode == crate::repo::Mode::Sealed,
            max_chunk: cfg.chunker.max,
            pack_target: opts.pack_target.unwrap_or(plan.pack_target_bytes),
            space_reserve: opts.space_reserve,
            cache_bytes: plan.index_cache_bytes,
            queue_limit,
            tier: tier.cloned(),
        })
        .collect()
}

async fn run_network(
    service: CofferService,
    admin: Admin,
    scrape: Arc<Scrape>,
    opts: &ServeOptions,
    max_msg: usize,
    limits: coffer_tuning::Limits,
    ui_reads: (crate::shard::Shards, crate::repo::Mode),
) -> Result<(), ServeError> {
    let admin = Arc::new(admin);
    let admin_listener = admin.bind()?;
    let socket = admin.socket.clone();
    tokio::spawn(admin.clone().serve(admin_listener));
    let reloader = admin.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let auth = reloader.auth.clone();
            let outcome = tokio::task::spawn_blocking(move || auth.reload())
                .await
                .unwrap_or_else(|e| Err(ApplianceError::Internal(format!("reload: {e}"))));
            match outcome {
                Ok(()) => tracing::info!("SIGHUP: accounts and rules reloaded"),
                Err(e) => tracing::error!("SIGHUP: reload failed, previous state kept: {e}"),
            }
        }
    });
    // Idle and expired sessions end even when nobody logs in (their memory is released).
    let sweeper = admin.auth.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_mins(1));
        loop {
            every.tick().await;
            sweeper.sweep();
        }
    });
    if admin.auth.quotas.any() {
        // Quotas need a first count; uploads are checked against what is known meanwhile.
        let a = admin.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = a.usage(&rt, crate::maintenance::usage::By::User) {
                tracing::error!(error = %e, "counting usage for the quotas failed");
            }
        });
    }
    if let Some(at) = opts.maintenance {
        tokio::spawn(maintenance_loop(admin.clone(), at));
    }
    let observe = ObserveLayer(scrape.metrics.clone());
    let sampler = scrape.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(metrics_http::SAMPLE_EVERY);
        loop {
            every.tick().await;
            sampler.sample();
        }
    });
    if let Some(addr) = &opts.metrics_listen {
        let l = metrics_http::bind(addr).await?;
        let name = l
            .local_addr()
            .map_or_else(|_| addr.clone(), |a| a.to_string());
        println!("METRICS ON: http://{name}/metrics");
        tracing::info!(listen = %name, "serving metrics");
        tokio::spawn(metrics_http::serve(l, scrape));
    }
    if let Some(addr) = &opts.ui_listen {
        let l = super::ui::bind(addr).await?;
        let name = l
            .local_addr()
            .map_or_else(|_| addr.clone(), |a| a.to_string());
        let (shards, mode) = ui_reads;
        let cfg = super::ui::UiConfig {
            auth: admin.auth.clone(),
            catalog: admin.catalog.clone(),
            admin: admin.clone(),
            shards,
            mode,
            builtin: opts.ui_password.clone(),
            service: service.clone(),
        };
        super::ui::serve(l, cfg, &opts.tls, &limits)?;
        println!("UI ON: https://{name}/");
        tracing::info!(listen = %name, "serving the web UI");
    }
    let result = serve_grpc(service, opts, max_msg, limits, observe).await;
    let _ = std::fs::remove_file(&socket);
    result
}

async fn serve_grpc(
    service: CofferService,
    opts: &ServeOptions,
    max_msg: usize,
    limits: coffer_tuning::Limits,
    observe: ObserveLayer,
) -> Result<(), ServeError> {
    let (listener, name) = listener(opts)?;
    let tls = tls_acceptor(&opts.tls)?;
    let stop = shutdown_signal(opts.shutdown_on_stdin);
    println!("SERVER CERT SHA256: {}", opts.tls.fingerprint);
    println!("LISTENING ON: {name}");
    std::io::Write::flush(&mut std::io::stdout())
        .map_err(|e| ServeError::io("writing to standard output", e))?;
    tracing::info!(listen = %name, "serving");

    let svc = v1::coffer_server::CofferServer::new(service)
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // A peer that stops answering pings is gone: its connection and calls are dropped.
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(limits.streams_per_connection)
        .layer(observe)
        .layer(CallLayer);
    let router = builder.add_service(svc);
    let deadline = opts.handshake_timeout;
    let conns = Connections::new(limits.connections, Duration::from_secs(limits.idle_secs));
    match listener {
        Listener::Tcp(l) => {
            let incoming = accept_tls(Arc::new(l), tls, deadline, conns);
            router.serve_with_incoming_shutdown(incoming, stop).await?;
        }
        Listener::Unix(l, path) => {
            let incoming = accept_tls(Arc::new(l), tls, deadline, conns);
            let r = router.serve_with_incoming_shutdown(incoming, stop).await;
            if !path.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&path);
            }
            r?;
        }
    }
    tracing::info!("stopped accepting; finishing in-flight work");
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now (before `LISTENING ON` is printed, so that a
/// signal sent as soon as it is read is a graceful stop, not the default kill); the future ends
/// at the first signal, or when standard input closes with `on_stdin`.
fn shutdown_signal(on_stdin: bool) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    async move {
        let stdin_closed = async {
            if !on_stdin {
                return std::future::pending::<()>().await;
            }
            let mut buf = [0u8; 256];
            let mut stdin = tokio::io::stdin();
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            () = stdin_closed => tracing::info!("standard input closed: shutting down"),
        }
    }
}

/// The server control user must not also be an account.
fn check_control(catalog: &Catalog, opts: &ServeOptions) -> Result<(), ServeError> {
    if let Some(c) = &opts.control {
        if catalog.user(&c.identity)?.is_some() {
            return Err(ServeError::Refused(format!(
                "--server-control-username {} is also an account in the catalog; choose another name",
                c.identity
            )));
        }
    }
    Ok(())
}

/// Shifts the clock when `serve` was started with [`crate::clock::OFFSET_ENV`] (tests), and
/// says so in the log and the audit log.
fn note_clock_shift(catalog: &Catalog) -> Result<(), ServeError> {
    let shift = crate::clock::shift_from_env();
    if shift != 0 {
        let why = format!(
            "the appliance's clock is shifted by {shift} s ({}): locks and protections expire \
             by the shifted clock",
            crate::clock::OFFSET_ENV
        );
        tracing::warn!("{why}");
        catalog.audit(
            &crate::catalog::audit::Event::done("appliance", "clock.shifted", shift.to_string())
                .with_detail(why),
        )?;
    }
    Ok(())
}

/// Runs maintenance on `at` (wall clock) until the appliance stops: the same steps as
/// `coffer-appliance maintenance run` (retention, then garbage collection), on the blocking pool.
/// A failed run is logged and tried again at the next time.
async fn maintenance_loop(admin: Arc<Admin>, at: Schedule) {
    loop {
        let now = coffer_proto::now_us();
        let wait = u64::try_from(at.next_after(now) - now).unwrap_or(0);
        tokio::time::sleep(Duration::from_micros(wait)).await;
        let a = admin.clone();
        let rt = tokio::runtime::Handle::current();
        let run = tokio::task::spawn_blocking(move || a.maintain(&rt, false, None)).await;
        match run {
            Ok(Ok(r)) => {
                let gc = r.gc.unwrap_or_default();
                tracing::info!(
                    forgotten = r.forgotten,
                    chunks_removed = gc.condemned,
                    packs_deleted = gc.packs_deleted,
                    bytes_deleted = gc.bytes_deleted,
                    next = %at,
                    "maintenance: retention and garbage collection done"
                );
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "maintenance failed; trying again at the next time");
            }
            Err(e) => tracing::error!(error = %e, "maintenance task failed"),
        }
    }
}
