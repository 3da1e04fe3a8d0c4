//! Listening sockets (TCP, unix, or passed by systemd) and the TLS accept loop.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};

use super::limits::{Connections, Tracked};
use super::server::ServeOptions;
use super::ServeError;

/// TLS handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 512;

/// Where the appliance accepts connections.
pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// The listening socket: one passed by systemd (`LISTEN_FDS`/`LISTEN_PID`, fd 3; `--listen` is
/// then ignored, as systemd users expect), else `--listen` (`HOST:PORT` or `unix:/path`).
pub(super) fn listener(opts: &ServeOptions) -> Result<(Listener, String), ServeError> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        if fds.len() > 1 {
            tracing::warn!(
                count = fds.len(),
                "systemd passed several sockets; using the first"
            );
        }
        if let Ok(Some(l)) = fds.take_tcp_listener(0) {
            let io = |e| ServeError::io("the TCP socket passed by systemd (fd 3)", e);
            l.set_nonblocking(true).map_err(io)?;
            let l = TcpListener::from_std(l).map_err(io)?;
            let name = l.local_addr().map_err(io)?.to_string();
            tracing::info!("using the TCP socket passed by systemd; --listen ignored");
            return Ok((Listener::Tcp(l), name));
        }
        let l = fds
            .take_unix_listener(0)
            .map_err(|e| ServeError::io("the socket passed by systemd (fd 3)", e))?
            .ok_or_else(|| {
                ServeError::Refused("LISTEN_FDS is set but fd 3 is not a socket".into())
            })?;
        let io = |e| ServeError::io("the unix socket passed by systemd (fd 3)", e);
        l.set_nonblocking(true).map_err(io)?;
        let path = l
            .local_addr()
            .map_err(io)?
            .as_pathname()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        tracing::info!("using the unix socket passed by systemd; --listen ignored");
        // systemd owns the socket file: never removed here.
        return Ok((
            Listener::Unix(UnixListener::from_std(l).map_err(io)?, PathBuf::new()),
            format!("unix:{}", path.display()),
        ));
    }
    if let Some(path) = opts.listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(ServeError::Refused(format!(
                    "{} is in use by a running server",
                    path.display()
                )));
            }
            // A socket file left by a crash.
            std::fs::remove_file(&path).map_err(|e| {
                ServeError::io(format!("removing stale socket {}", path.display()), e)
            })?;
        }
        let l = UnixListener::bind(&path)
            .map_err(|e| ServeError::io(format!("cannot listen on {}", path.display()), e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(opts.listen_mode))
            .map_err(|e| ServeError::io(format!("setting the mode of {}", path.display()), e))?;
        let name = format!("unix:{}", path.display());
        return Ok((Listener::Unix(l, path), name));
    }
    let addr: SocketAddr = opts.listen.parse().map_err(|e| {
        ServeError::Refused(format!(
            "--listen {}: {e} (expected HOST:PORT or unix:/path)",
            opts.listen
        ))
    })?;
    let io = |e| ServeError::io(format!("cannot listen on {addr}"), e);
    let l = std::net::TcpListener::bind(addr).map_err(io)?;
    l.set_nonblocking(true).map_err(io)?;
    let l = TcpListener::from_std(l).map_err(io)?;
    let name = l.local_addr().map_err(io)?.to_string();
    Ok((Listener::Tcp(l), name))
}

/// rustls server configuration for the appliance's identity (HTTP/2 only).
pub(super) fn tls_acceptor(
    id: &crate::net::tls::TlsIdentity,
) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    let certs = rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Tls(format!("the certificate file: {e}")))?;
    let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
        .map_err(|e| ServeError::Tls(format!("the key file: {e}")))?
        .ok_or_else(|| ServeError::Tls("the key file holds no private key".into()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServeError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ServeError::Tls(format!("the certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// A listening socket the accept loop can take connections from.
pub(super) trait Accept: Send + Sync + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// A connection and its peer's address (none for a unix socket).
    fn accept(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, Option<SocketAddr>)>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<SocketAddr>)> {
        let (s, peer) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, Some(peer)))
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<SocketAddr>)> {
        Ok((UnixListener::accept(self).await?.0, None))
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

/// A connection as the gRPC server takes it: TLS over the socket, tracked by the connection
/// limits.
pub(super) type Conn<Io> = Tracked<tokio_rustls::server::TlsStream<Io>>;

/// The accept loop: each connection's TLS handshake runs in its own task under `deadline`
/// (a connection that never completes it is closed), at most [`MAX_HANDSHAKES`] at once; then
/// it is admitted by `conns` (see `net::limits`). When the process runs out of file descriptors
/// the loop backs off instead of spinning, and logs it at most every 10 s.
pub(super) fn accept_tls<L: Accept>(
    listener: Arc<L>,
    tls: tokio_rustls::TlsAcceptor,
    deadline: Duration,
    conns: Arc<Connections>,
) -> impl tokio_stream::Stream<Item = Result<Conn<L::Io>, std::io::Error>> {
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
            let (io, peer) = match conn {
                Ok(c) => c,
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
            let (tls, tx, conns) = (tls.clone(), tx.clone(), conns.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(deadline, tls.accept(io)).await {
                    Ok(Ok(s)) => {
                        if let Some(c) = conns.admit(s, peer) {
                            let _ = tx.send(Ok(c)).await;
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out; connection closed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
