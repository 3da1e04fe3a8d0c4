//! A gRPC channel over TLS 1.3 whose server certificate is pinned by the SHA-256 of its DER.
//!
//! The pin is checked inside the handshake, so nothing — no credential, no request — is sent to
//! a server whose certificate does not match (S5).

use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::ClientError;

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Connect to this unix socket instead of `host:port` (TLS all the same).
    pub unix: Option<std::path::PathBuf>,
    /// Expected SHA-256 of the server certificate (DER).
    pub fingerprint: [u8; 32],
}

/// A connected byte stream (TCP or unix), for the TLS layer.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Target {
    /// Parses `https://HOST:PORT` or `unix:/path/to/socket`, and a 64-hex-digit fingerprint
    /// (colons allowed).
    ///
    /// # Errors
    /// [`ClientError::Url`] or [`ClientError::Fingerprint`].
    pub fn parse(url: &str, fingerprint: &str) -> Result<Self, ClientError> {
        let fp = parse_fingerprint(fingerprint)?;
        if let Some(path) = url.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(ClientError::Url(url.into()));
            }
            return Ok(Self {
                host: "localhost".into(),
                port: 0,
                unix: Some(path.into()),
                fingerprint: fp,
            });
        }
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| ClientError::Url(url.into()))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| ClientError::Url(url.into()))?;
        let port: u16 = port.parse().map_err(|_| ClientError::Url(url.into()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(ClientError::Url(url.into()));
        }
        Ok(Self {
            host,
            port,
            unix: None,
            fingerprint: fp,
        })
    }
}

fn parse_fingerprint(fingerprint: &str) -> Result<[u8; 32], ClientError> {
    let clean: String = fingerprint.chars().filter(|c| *c != ':').collect();
    let mut fp = [0u8; 32];
    hex::decode_to_slice(clean.to_ascii_lowercase(), &mut fp)
        .map_err(|_| ClientError::Fingerprint(fingerprint.into()))?;
    Ok(fp)
}

/// Accepts exactly one certificate, by fingerprint; handshake signatures are still verified.
#[derive(Debug)]
pub struct PinnedVerifier {
    expected: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The fingerprint actually presented, when it did not match (for the error message).
    pub mismatch: Mutex<Option<String>>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        // Not secret, but compare in constant time anyway.
        let diff = got
            .iter()
            .zip(&self.expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(ServerCertVerified::assertion())
        } else {
            *self
                .mismatch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hex::encode(got));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Longest wait for a connection and its TLS handshake.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// HTTP/2 pings on an open connection, and how long one may go unanswered before the connection
/// (and every call on it) fails.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_mins(1);

/// Opens a channel to `target`. The TCP and TLS connection is made here, so a wrong fingerprint
/// fails this call.
///
/// # Errors
/// [`ClientError::Connect`], naming the mismatching fingerprint when that is the cause.
pub async fn channel(target: &Target) -> Result<Channel, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedVerifier {
        expected: target.fingerprint,
        provider: provider.clone(),
        mismatch: Mutex::new(None),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Connect {
            target: target.host.clone(),
            why: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let addr = match &target.unix {
        Some(p) => format!("unix:{}", p.display()),
        None => format!("{}:{}", target.host, target.port),
    };
    let server_name =
        ServerName::try_from(target.host.clone()).map_err(|e| ClientError::Connect {
            target: addr.clone(),
            why: e.to_string(),
        })?;
    let endpoint = Endpoint::from_shared(format!("http://{}:{}", target.host, target.port.max(1)))
        .map_err(|e| ClientError::Connect {
            target: addr.clone(),
            why: e.to_string(),
        })?
        .tcp_nodelay(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        // A dead or silent appliance is noticed, even in the middle of a long stream: calls
        // fail instead of hanging.
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let tcp_addr = format!("{}:{}", target.host, target.port);
    let unix = target.unix.clone();
    let res = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let (tcp_addr, unix) = (tcp_addr.clone(), unix.clone());
            async move {
                let io: Box<dyn Io> = if let Some(p) = unix {
                    Box::new(tokio::net::UnixStream::connect(p).await?)
                } else {
                    let tcp = tokio::net::TcpStream::connect(&tcp_addr).await?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                };
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, io))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the TLS handshake did not complete in time",
                        )
                    })??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await;
    res.map_err(|e| {
        let why = match verifier.mismatch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            Some(got) => format!(
                "the server certificate's SHA-256 fingerprint is {got}, not the pinned {}; refusing \
                 to send anything",
                hex::encode(target.fingerprint)
            ),
            None => error_chain(&e),
        };
        ClientError::Connect { target: addr, why }
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_targets() {
        let fp = "ab".repeat(32);
        let t = Target::parse("https://127.0.0.1:5151", &fp).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 5151));
        assert!(Target::parse("http://x:1", &fp).is_err());
        assert!(Target::parse("https://x", &fp).is_err());
        assert!(Target::parse("https://x:1", "abc").is_err());
        let u = Target::parse("unix:/run/coffer.sock", &fp).unwrap();
        assert_eq!(
            u.unix.as_deref(),
            Some(std::path::Path::new("/run/coffer.sock"))
        );
        assert!(Target::parse("unix:relative.sock", &fp).is_err());
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(
            Target::parse("https://x:1", &colons.join(":"))
                .unwrap()
                .fingerprint,
            [0xab; 32]
        );
    }
}
