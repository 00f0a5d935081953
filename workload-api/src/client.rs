//! A minimal SPIFFE Workload API client over a Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The environment variable SPIFFE clients read the agent's address from.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Why the Workload API (or another local gRPC socket) cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address is not a Unix socket path.
    #[error("invalid Workload API address {0:?}: want unix:///absolute/path")]
    InvalidAddress(String),
    /// Nothing at the socket's path.
    #[error("Workload API socket {} does not exist (is the agent running?)", .0.display())]
    NoSocket(PathBuf),
    /// The caller may not reach the socket or a directory above it.
    #[error(
        "permission denied connecting to the Workload API socket {} (this user may not reach \
         the socket or a directory above it)",
        .0.display()
    )]
    PermissionDenied(PathBuf),
    /// The connection failed (`what` names the socket).
    #[error("cannot connect to {what} {}: {reason}", path.display())]
    Connect {
        /// What the socket is, for the message.
        what: String,
        /// The socket.
        path: PathBuf,
        /// The transport error and its causes.
        reason: String,
    },
}

impl From<ClientError> for String {
    fn from(e: ClientError) -> Self {
        e.to_string()
    }
}

/// Socket path from `unix:///path`, `unix:/path` or a plain absolute path.
pub fn socket_path(address: &str) -> Result<PathBuf, ClientError> {
    let path = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .unwrap_or(address);
    if !path.starts_with('/') {
        return Err(ClientError::InvalidAddress(address.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Connects to the Workload API at `address` (`unix:///path`).
pub async fn connect_workload_api(
    address: &str,
) -> Result<SpiffeWorkloadApiClient<Channel>, ClientError> {
    let path = socket_path(address)?;
    // `Path::exists` says "no" for a socket behind a directory the caller
    // may not search: tell that case apart.
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ClientError::PermissionDenied(path));
        }
        Err(_) => return Err(ClientError::NoSocket(path)),
        Ok(_) => {}
    }
    let channel = unix_channel(&path, "Workload API socket").await.map_err(|e| match e {
        ClientError::Connect { ref reason, .. }
            if reason.to_ascii_lowercase().contains("permission denied") =>
        {
            ClientError::PermissionDenied(path.clone())
        }
        e => e,
    })?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

/// A gRPC channel over the Unix socket at `path`; `what` names the socket
/// in the error.
pub async fn unix_channel(path: &Path, what: &str) -> Result<Channel, ClientError> {
    let dial = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://unix-socket.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = dial.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            what: what.to_string(),
            path: path.to_owned(),
            reason: error_chain(&e),
        })
}

/// An error and its sources, `outer: inner: ...` on one line (transport
/// errors say little without their sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Errors that print their source already are not repeated.
        let text = s.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = s.source();
    }
    message
}

/// A request carrying the Workload API's security header.
pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(socket_path("unix:///run/a.sock").unwrap(), PathBuf::from("/run/a.sock"));
        assert_eq!(socket_path("unix:/run/a.sock").unwrap(), PathBuf::from("/run/a.sock"));
        assert_eq!(socket_path("/run/a.sock").unwrap(), PathBuf::from("/run/a.sock"));
        assert!(socket_path("unix://relative").is_err());
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "transport error: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = error_chain(&Outer(refused));
        assert_eq!(text.matches("connection refused").count(), 1, "{text}");
    }
}
