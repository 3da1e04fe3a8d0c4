//! The appliance's TLS identity: a self-generated certificate (rcgen) or operator-provided PEM
//! files, and the SHA-256 fingerprint clients pin.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// PEM certificate chain and key.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the leaf certificate's DER, lower-case hex without colons.
    pub fingerprint: String,
}

/// Why a TLS identity could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{} already exists; refusing to overwrite it (drop --tls-generate-cert to use the existing files)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}{hint}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io(path: &Path, hint: &'static str) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Io { path, source, hint }
}

fn write_new(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_path_buf())
            } else {
                io(path, "")(e)
            }
        })?;
    f.write_all(data.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(path, ""))
}

/// Generates a self-signed certificate for `names` and writes it; existing files are never
/// overwritten.
///
/// # Errors
/// When a file exists or cannot be written.
pub fn generate(cert: &Path, key: &Path, names: Vec<String>) -> Result<TlsIdentity, TlsError> {
    for p in [cert, key] {
        if p.exists() {
            return Err(TlsError::Exists(p.to_path_buf()));
        }
    }
    let ck = rcgen::generate_simple_self_signed(names)?;
    let cert_pem = ck.cert.pem();
    let key_pem = ck.key_pair.serialize_pem();
    write_new(key, &key_pem, 0o600)?;
    write_new(cert, &cert_pem, 0o644)?;
    load(cert, key)
}

/// Loads PEM files and computes the fingerprint.
///
/// # Errors
/// When the files are missing or hold no certificate.
pub fn load(cert: &Path, key: &Path) -> Result<TlsIdentity, TlsError> {
    let cert_pem = std::fs::read_to_string(cert).map_err(io(
        cert,
        " (use --tls-generate-cert to create a certificate)",
    ))?;
    let key_pem = std::fs::read_to_string(key).map_err(io(key, ""))?;
    let der = rustls_pem_first_cert(&cert_pem)
        .ok_or_else(|| TlsError::NoCertificate(cert.to_path_buf()))?;
    let fingerprint = hex::encode(Sha256::digest(&der));
    Ok(TlsIdentity {
        cert_pem,
        key_pem,
        fingerprint,
    })
}

fn rustls_pem_first_cert(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_refuses_overwrite_and_fingerprint_is_stable() {
        let d = tempfile::tempdir().unwrap();
        let (c, k) = (d.path().join("c.pem"), d.path().join("k.pem"));
        let a = generate(&c, &k, vec!["localhost".into()]).unwrap();
        assert_eq!(a.fingerprint.len(), 64);
        assert!(generate(&c, &k, vec!["localhost".into()])
            .unwrap_err()
            .to_string()
            .contains("refusing"));
        assert_eq!(load(&c, &k).unwrap().fingerprint, a.fingerprint);
    }
}
