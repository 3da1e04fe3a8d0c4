//! The client's boundary error. Messages say what to do next.

/// Everything that can go wrong talking to an appliance.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {0:?}: expected https://HOST:PORT")]
    Url(String),
    #[error("invalid fingerprint {0:?}: expected 64 hex digits (the SERVER CERT SHA256 line the appliance prints)")]
    Fingerprint(String),
    #[error("cannot connect to {target}: {why}")]
    Connect { target: String, why: String },
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    #[error("the appliance answered something inconsistent: {0}")]
    Protocol(String),
    #[error("chunk {0} came back with bytes that do not hash to its id; nothing was written")]
    Corrupt(String),
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
}
