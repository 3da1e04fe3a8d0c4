//! `serve`: opens the repository, starts one pinned shard per planned core, then the network
//! island (tokio + tonic + rustls) on the listening socket.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coffer_proto::v1;
use coffer_tuning::{Hardware, Plan};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UnixListener};

use crate::access::admin;
use crate::access::auth::{Auth, ControlUser};
use crate::catalog::Catalog;
use crate::crypto::keys::MasterKey;
use crate::error::RepoError;
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
}

/// TLS handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 512;

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
    for s in 0..cfg.shards {
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
pub fn serve(paths: &RepoPaths, master: MasterKey, opts: &ServeOptions) -> anyhow::Result<()> {
    let cfg = paths.load_config()?;
    check_index_present(paths, &cfg)?;
    for w in check_private(paths) {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
    emergency_space(paths);
    let hw = Hardware::detect_for(&paths.root);
    let plan = Plan::new(&hw, usize::from(cfg.shards))?;
    if hw.memlock_bytes < coffer_tuning::MIN_MEMLOCK_BYTES {
        anyhow::bail!(
            "RLIMIT_MEMLOCK is {} bytes; io_uring needs at least {} (set LimitMEMLOCK=infinity in \
             the systemd unit or raise `ulimit -l`)",
            hw.memlock_bytes,
            coffer_tuning::MIN_MEMLOCK_BYTES
        );
    }
    let master = Arc::new(master);
    let mut shards: Vec<RunningShard> = Vec::new();
    for p in &plan.shards {
        let s = shard::spawn(ShardConfig {
            shard: p.shard,
            cpu: Some(p.cpu),
            io_memory: plan.io_memory_per_shard,
            paths: paths.clone(),
            master: master.clone(),
            repo_id: cfg.id,
            max_chunk: cfg.chunker.max,
            pack_target: opts.pack_target.unwrap_or(plan.pack_target_bytes),
            space_reserve: opts.space_reserve,
            cache_bytes: plan.index_cache_bytes,
            queue_limit: 256 << 20,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        shards.push(s);
    }
    let catalog = Arc::new(Catalog::open(&paths.catalog(), false)?);
    let max_msg = max_message_size(cfg.chunker.max);
    let hello = HelloInfo {
        repository_id: cfg.id,
        chunker: cfg.chunker.into(),
        dedup_key: *master.dedup_key(),
        limits: v1::Limits {
            max_chunk_size: cfg.chunker.max,
            max_message_size: max_msg,
            max_ids_per_batch: 1 << 16,
            max_chunks_per_batch: 4096,
        },
    };
    let handles = shards.iter().map(|s| s.handle.clone()).collect();
    if let Some(c) = &opts.control {
        if catalog.user(&c.identity)?.is_some() {
            anyhow::bail!(
                "--server-control-username {} is also an account in the catalog; choose another name",
                c.identity
            );
        }
    }
    let auth = Arc::new(Auth::new(catalog.clone(), opts.control.clone())?);
    let service = CofferService::new(
        crate::shard::Shards::new(handles),
        catalog.clone(),
        auth.clone(),
        hello,
    );
    let admin = Admin {
        socket: paths.admin_socket(),
        catalog,
        auth,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.network_threads)
        .thread_name("net")
        .enable_all()
        .build()?;
    let result = rt.block_on(run_network(service, admin, opts, max_msg as usize));
    // The service (and with it every shard handle) is gone: shards finish what is in flight,
    // seal their open packs and stop.
    // A blocking read of stdin (`--shutdown-on-stdin`) may still be pending: do not wait for it.
    rt.shutdown_timeout(Duration::from_secs(2));
    for s in shards {
        drop(s.handle);
        s.join
            .join()
            .map_err(|e| anyhow::anyhow!("shard stopped abnormally: {e}"))?;
    }
    result
}

/// What the admin socket and SIGHUP act on.
struct Admin {
    socket: PathBuf,
    catalog: Arc<Catalog>,
    auth: Arc<Auth>,
}

impl Admin {
    /// Binds the admin socket (mode 0600), replacing a stale one left by a crash.
    fn bind(&self) -> anyhow::Result<UnixListener> {
        if self.socket.exists() {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                anyhow::bail!(
                    "another appliance is serving this repository (its admin socket {} answers)",
                    self.socket.display()
                );
            }
            std::fs::remove_file(&self.socket)?;
        }
        let l = UnixListener::bind(&self.socket)
            .map_err(|e| anyhow::anyhow!("admin socket {}: {e}", self.socket.display()))?;
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    }

    async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(self.clone().answer(stream));
        }
    }

    /// One request line in, one reply line out.
    async fn answer(self: Arc<Self>, stream: tokio::net::UnixStream) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (r, mut w) = stream.into_split();
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(r.take(1 << 20));
        if r.read_line(&mut line).await.is_err() {
            return;
        }
        let me = self.clone();
        let reply = tokio::task::spawn_blocking(move || -> Result<admin::Reply, String> {
            let req: admin::Request =
                serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))?;
            let reply = admin::apply(&me.catalog, &req).map_err(|e| e.to_string())?;
            me.auth.reload().map_err(|e| e.to_string())?;
            tracing::info!(request = ?std::mem::discriminant(&req), "admin change applied");
            Ok(reply)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
        .unwrap_or_else(|error| admin::Reply {
            ok: false,
            error,
            ..admin::Reply::default()
        });
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        let _ = w.write_all(&out).await;
    }
}

async fn run_network(
    service: CofferService,
    admin: Admin,
    opts: &ServeOptions,
    max_msg: usize,
) -> anyhow::Result<()> {
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
            match reloader.auth.reload() {
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
    let result = serve_grpc(service, opts, max_msg).await;
    let _ = std::fs::remove_file(&socket);
    result
}

/// Where the appliance accepts connections.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// The listening socket: one passed by systemd (`LISTEN_FDS`/`LISTEN_PID`, fd 3; `--listen` is
/// then ignored, as systemd users expect), else `--listen` (`HOST:PORT` or `unix:/path`).
fn listener(opts: &ServeOptions) -> anyhow::Result<(Listener, String)> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        if fds.len() > 1 {
            tracing::warn!(
                count = fds.len(),
                "systemd passed several sockets; using the first"
            );
        }
        if let Ok(Some(l)) = fds.take_tcp_listener(0) {
            l.set_nonblocking(true)?;
            let l = TcpListener::from_std(l)?;
            let name = l.local_addr()?.to_string();
            tracing::info!("using the TCP socket passed by systemd; --listen ignored");
            return Ok((Listener::Tcp(l), name));
        }
        let l = fds
            .take_unix_listener(0)
            .map_err(|e| anyhow::anyhow!("the socket passed by systemd (fd 3): {e}"))?
            .ok_or_else(|| anyhow::anyhow!("LISTEN_FDS is set but fd 3 is not a socket"))?;
        l.set_nonblocking(true)?;
        let path = l
            .local_addr()?
            .as_pathname()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        tracing::info!("using the unix socket passed by systemd; --listen ignored");
        // systemd owns the socket file: never removed here.
        return Ok((
            Listener::Unix(UnixListener::from_std(l)?, PathBuf::new()),
            format!("unix:{}", path.display()),
        ));
    }
    if let Some(path) = opts.listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                anyhow::bail!("{} is in use by a running server", path.display());
            }
            // A socket file left by a crash.
            std::fs::remove_file(&path)
                .map_err(|e| anyhow::anyhow!("removing stale socket {}: {e}", path.display()))?;
        }
        let l = UnixListener::bind(&path)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(opts.listen_mode))?;
        let name = format!("unix:{}", path.display());
        return Ok((Listener::Unix(l, path), name));
    }
    let addr: SocketAddr = opts.listen.parse().map_err(|e| {
        anyhow::anyhow!(
            "--listen {}: {e} (expected HOST:PORT or unix:/path)",
            opts.listen
        )
    })?;
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    l.set_nonblocking(true)?;
    let l = TcpListener::from_std(l)?;
    let name = l.local_addr()?.to_string();
    Ok((Listener::Tcp(l), name))
}

async fn serve_grpc(
    service: CofferService,
    opts: &ServeOptions,
    max_msg: usize,
) -> anyhow::Result<()> {
    let (listener, name) = listener(opts)?;
    let tls = tls_acceptor(&opts.tls)?;
    println!("SERVER CERT SHA256: {}", opts.tls.fingerprint);
    println!("LISTENING ON: {name}");
    std::io::Write::flush(&mut std::io::stdout())?;
    tracing::info!(listen = %name, "serving");

    let svc = v1::coffer_server::CofferServer::new(service)
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    let router = builder.add_service(svc);
    let stop = shutdown_signal(opts.shutdown_on_stdin);
    let deadline = opts.handshake_timeout;
    match listener {
        Listener::Tcp(l) => {
            let incoming = accept_tls(Arc::new(l), tls, deadline);
            router.serve_with_incoming_shutdown(incoming, stop).await?;
        }
        Listener::Unix(l, path) => {
            let incoming = accept_tls(Arc::new(l), tls, deadline);
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

/// rustls server configuration for the appliance's identity (HTTP/2 only).
fn tls_acceptor(id: &crate::net::tls::TlsIdentity) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("TLS certificate: {e}"))?;
    let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("TLS key: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("TLS key file holds no private key"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| anyhow::anyhow!("TLS certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// A listening socket the accept loop can take connections from.
trait Accept: Send + Sync + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (s, _) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(UnixListener::accept(self).await?.0)
    }
}

/// Whether an accept error means the process or system is out of a resource (file descriptors,
/// buffers): retrying at once would spin.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The accept loop: each connection's TLS handshake runs in its own task under `deadline`
/// (a connection that never completes it is closed), at most [`MAX_HANDSHAKES`] at once. When
/// the process runs out of file descriptors the loop backs off instead of spinning, and logs
/// it at most every 10 s.
fn accept_tls<L: Accept>(
    listener: Arc<L>,
    tls: tokio_rustls::TlsAcceptor,
    deadline: Duration,
) -> impl tokio_stream::Stream<Item = Result<tokio_rustls::server::TlsStream<L::Io>, std::io::Error>>
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        let mut last_warning: Option<tokio::time::Instant> = None;
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let conn = tokio::select! {
                () = tx.closed() => return,
                c = listener.accept() => c,
            };
            let io = match conn {
                Ok(io) => io,
                Err(e) => {
                    if out_of_resources(&e) {
                        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(
                                error = %e,
                                "cannot accept connections: out of file descriptors or memory \
                                 (raise LimitNOFILE / ulimit -n); backing off"
                            );
                            last_warning = Some(tokio::time::Instant::now());
                        }
                        // Back off: the condition lasts until a connection closes.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    } else {
                        tracing::debug!(error = %e, "accept failed");
                    }
                    continue;
                }
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(deadline, tls.accept(io)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out; connection closed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn shutdown_signal(on_stdin: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
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
