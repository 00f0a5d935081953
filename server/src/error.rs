//! Why the server could not start, or stopped.

use std::path::PathBuf;

use crate::ca::CaError;
use crate::store::StoreError;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A file or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path or address.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Another server already serves this admin socket.
    #[error("admin socket {0} is in use by a running server")]
    AdminSocketInUse(PathBuf),
    /// The store could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The CA could not be loaded or created.
    #[error("{0}")]
    Ca(#[from] CaError),
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// The CRLs could not be built.
    #[error("CRL: {0}")]
    Crl(String),
    /// The token broker could not start (its policy, keys, TLS or address).
    #[error("token broker: {0}")]
    Broker(String),
    /// A gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}
