//! The client library's one boundary error, and its policy.
//!
//! * Every public function of the library returns [`ClientError`]; `anyhow` is used only by the
//!   `coffer` binary's top level (`main.rs`, `cli/`), never here, and nothing returns
//!   `Result<_, String>`.
//! * A message says what failed, on which object (a path, a snapshot, a chunk or tree id) and,
//!   where there is one, what to do next. It never quotes bytes read from stored data.
//! * Module errors with their own vocabulary (a tree that does not decode: [`TreeError`]) are
//!   wrapped, not flattened, so callers can still match on them.
//! * [`ClientError::is_retryable`] is the one place that says whether trying again may help.

use std::path::PathBuf;

pub use crate::snapshot::TreeError;

/// Everything that can go wrong in the client: talking to an appliance, reading the tree to back
/// up, decoding what comes back, writing a restore.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {0:?}: expected https://HOST:PORT or unix:/path/to/socket")]
    Url(String),
    #[error("invalid fingerprint {0:?}: expected 64 hex digits (the SERVER CERT SHA256 line the appliance prints)")]
    Fingerprint(String),
    #[error("cannot connect to {target}: {why}")]
    Connect { target: String, why: String },
    #[error("{}", rpc_message(.0))]
    Rpc(#[from] tonic::Status),
    #[error("the appliance answered something inconsistent: {0}")]
    Protocol(String),
    #[error("chunk {0} came back with bytes that do not hash to its id; nothing was written")]
    Corrupt(String),
    /// A local file or directory could not be read or written.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        /// What was being done, as a verb: "read", "create", "write to disk".
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// The path given to back up is not a directory.
    #[error("{} is not a directory; back up the directory that holds it instead", .0.display())]
    NotADirectory(PathBuf),
    /// No client configuration file (not connected yet).
    #[error("no client configuration at {} ({error}); run `coffer connect server ...` first", path.display())]
    NoConfig {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A client configuration file that cannot be used.
    #[error("{}: {error}; fix the file or run `coffer connect server ...` again", path.display())]
    BadConfig { path: PathBuf, error: String },
    /// A tree object read back from the appliance or the local cache is malformed.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A snapshot entry that cannot be restored as recorded (nothing outside the target is
    /// touched; a partly written file is removed).
    #[error("cannot restore {}: {why}", path.display())]
    Restore { path: PathBuf, why: String },
    /// A worker task of the client died (a bug): the operation stopped where it was (a backup
    /// commits nothing; a restore may have written some files, which a new run overwrites).
    #[error("a client worker task failed ({0}); the operation stopped (a backup commits nothing, a restore may be partial): run the command again, and report this if it repeats")]
    Task(String),
    /// A keyring that cannot do what was asked: a wrong passphrase, a role without the key, a
    /// snapshot whose sealed header does not verify.
    #[error("{0}")]
    Keyring(String),
    /// `coffer mount` cannot mount or unmount: FUSE missing, a bad mount point.
    #[error("{0}")]
    Mount(String),
}

impl ClientError {
    /// Whether retrying later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rpc(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted
            ),
            Self::Connect { .. } => true,
            _ => false,
        }
    }

    /// An I/O error on `path` while doing `action`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        error: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            error,
        }
    }
}

impl From<tokio::task::JoinError> for ClientError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Task(e.to_string())
    }
}

/// Whether `s` says the connection to the appliance was lost (rather than that the appliance
/// refused something). A graceful shutdown of the appliance (HTTP/2 GOAWAY) mid-stream reaches
/// tonic as INTERNAL "h2 protocol error"; a reset as UNAVAILABLE or CANCELLED.
pub(crate) fn connection_lost(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Cancelled
            | tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
    ) && [
        "connection",
        "canceled",
        "transport",
        "broken pipe",
        "h2 protocol error",
    ]
    .iter()
    .any(|w| s.message().to_ascii_lowercase().contains(w))
}

/// The appliance's message; for a lost connection, what happened and what to do.
fn rpc_message(s: &tonic::Status) -> String {
    if connection_lost(s) {
        "the connection to the appliance was lost (it may be shutting down or restarting); \
         the operation was interrupted and nothing was committed; run it again (data already \
         acknowledged is kept)"
            .to_string()
    } else {
        s.message().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cut connection reads as one, whichever way the transport reports it (a reset, or the
    /// appliance's graceful GOAWAY while a stream was open); other errors keep their message.
    #[test]
    fn lost_connections_are_named_plainly() {
        for s in [
            tonic::Status::unavailable("transport error: connection reset"),
            tonic::Status::cancelled("operation was canceled"),
            tonic::Status::internal("h2 protocol error: http2 error"),
        ] {
            let m = ClientError::Rpc(s).to_string();
            assert!(m.contains("connection to the appliance was lost"), "{m}");
        }
        let m = ClientError::Rpc(tonic::Status::internal("chunk store failed")).to_string();
        assert_eq!(m, "chunk store failed");
    }
}
