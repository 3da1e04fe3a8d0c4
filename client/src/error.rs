//! The client's boundary error. Messages say what to do next.

/// Everything that can go wrong talking to an appliance.
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

/// The appliance's message; for a lost connection, what happened and what to do.
fn rpc_message(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
            if ["connection", "canceled", "transport", "broken pipe"]
                .iter()
                .any(|w| s.message().to_ascii_lowercase().contains(w)) =>
        {
            "the connection to the appliance was lost (it may be shutting down or restarting); \
             the operation was interrupted and nothing was committed; run it again (data already \
             acknowledged is kept)"
                .to_string()
        }
        _ => s.message().to_string(),
    }
}
