//! Tessera's workload-side library: SPIFFE identity types, X509-SVID and
//! bundle parsing with validation of the SPIFFE X509-SVID profile, a live
//! [`X509Source`] fed by the SPIFFE Workload API, and rustls configs for
//! mutual TLS that authorize peers by SPIFFE ID and refuse revoked ones;
//! JWT-SVID validation and JWT bundles live in [`jwt`].
//!
//! ```
//! use tessera_workload_api::SpiffeId;
//!
//! let id: SpiffeId = "spiffe://example.org/billing/api".parse().unwrap();
//! assert_eq!(id.trust_domain().as_str(), "example.org");
//! assert_eq!(id.path(), "/billing/api");
//! ```
#![forbid(unsafe_code)]

mod client;
pub mod jwt;
mod mtls;
mod selector;
mod source;
mod spiffe_id;
mod tls;
mod x509;

pub use client::{
    connect_workload_api, error_chain, socket_path, unix_channel, with_header, ClientError,
    ENDPOINT_ENV,
};
pub use jwt::{JwtBundle, JwtError, JwtKey, UnverifiedJwt, ValidatedJwt};
pub use mtls::{client_config, peer_spiffe_id, server_config, Authorize};
pub use selector::{Selector, SelectorError, SelectorScope};
pub use source::{SourceError, X509Context, X509Source, FIRST_SVID_TIMEOUT};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::{
    spiffe_id_of_cert, Authorizer, SpiffeClientCertVerifier, SpiffeServerCertVerifier, TlsError,
    TrustAnchors,
};
pub use x509::{
    certificate_serial_hex, split_der_chain, validate_ca_cert, validate_leaf_cert, X509Bundle,
    X509Error, X509Svid,
};
