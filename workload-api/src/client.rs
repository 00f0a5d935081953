//! A minimal SPIFFE Workload API client over a Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The environment variable SPIFFE clients read the agent's address from.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Socket path from `unix:///path`, `unix:/path` or a plain absolute path.
pub fn socket_path(address: &str) -> Result<PathBuf, String> {
    let path = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .unwrap_or(address);
    if !path.starts_with('/') {
        return Err(format!(
            "invalid Workload API address {address:?}: want unix:///absolute/path"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Connects to the Workload API at `address` (`unix:///path`).
pub async fn connect_workload_api(
    address: &str,
) -> Result<SpiffeWorkloadApiClient<Channel>, String> {
    let path = socket_path(address)?;
    // `Path::exists` says "no" for a socket behind a directory the caller
    // may not search: tell that case apart.
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(permission_denied(&path));
        }
        Err(_) => {
            return Err(format!(
                "Workload API socket {} does not exist (is the agent running?)",
                path.display()
            ));
        }
        Ok(_) => {}
    }
    let channel = unix_channel(&path, "Workload API socket").await.map_err(|e| {
        if e.contains("Permission denied") || e.contains("permission denied") {
            permission_denied(&path)
        } else {
            e
        }
    })?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

fn permission_denied(path: &Path) -> String {
    format!(
        "permission denied connecting to the Workload API socket {} (this user may not reach \
         the socket or a directory above it)",
        path.display()
    )
}

/// A gRPC channel over the Unix socket at `path`; `what` names the socket
/// in the error.
pub async fn unix_channel(path: &Path, what: &str) -> Result<Channel, String> {
    let dial = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://unix-socket.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = dial.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| format!("cannot connect to {what} {}: {}", path.display(), error_chain(&e)))
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
