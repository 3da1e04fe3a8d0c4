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
        // A graceful shutdown of the appliance (HTTP/2 GOAWAY) mid-stream reaches tonic as
        // INTERNAL "h2 protocol error"; a reset as UNAVAILABLE or CANCELLED.
        tonic::Code::Cancelled
        | tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Internal
            if [
                "connection",
                "canceled",
                "transport",
                "broken pipe",
                "h2 protocol error",
            ]
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
