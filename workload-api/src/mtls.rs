//! rustls configurations for mutual TLS between workloads, fed by an
//! [`X509Source`]: each handshake presents the current SVID and verifies the
//! peer against the current bundle and CRLs, authorizing it by SPIFFE ID.
//! A rotated SVID, bundle or CRL is used by the next handshake, with no
//! restart and no lock on the handshake path.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, ServerConfig, SignatureScheme};

use crate::source::{SourceResolver, X509Source};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::tls::{
    spiffe_id_of_cert, Authorizer, SpiffeClientCertVerifier, SpiffeServerCertVerifier, TlsError,
};

/// Which peers may connect, by SPIFFE ID.
#[derive(Clone)]
pub enum Authorize {
    /// Any SPIFFE ID the bundle vouches for.
    Any,
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in this trust domain.
    TrustDomain(TrustDomain),
    /// Any ID in this set.
    OneOf(BTreeSet<SpiffeId>),
    /// Whatever the predicate accepts.
    Predicate(Authorizer),
}

impl fmt::Debug for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("Any"),
            Self::Exact(id) => write!(f, "Exact({id})"),
            Self::TrustDomain(td) => write!(f, "TrustDomain({td})"),
            Self::OneOf(ids) => f.debug_tuple("OneOf").field(ids).finish(),
            Self::Predicate(_) => f.write_str("Predicate(..)"),
        }
    }
}

impl Authorize {
    /// Only `id`.
    pub fn exact(id: SpiffeId) -> Self {
        Self::Exact(id)
    }

    /// Any ID in `trust_domain`.
    pub fn trust_domain(trust_domain: TrustDomain) -> Self {
        Self::TrustDomain(trust_domain)
    }

    /// Any of `ids`.
    pub fn one_of(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self::OneOf(ids.into_iter().collect())
    }

    /// Whatever `predicate` accepts.
    pub fn predicate(predicate: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static) -> Self {
        Self::Predicate(Arc::new(predicate))
    }

    /// Whether `id` is allowed.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(expected) => expected == id,
            Self::TrustDomain(td) => id.trust_domain() == td,
            Self::OneOf(ids) => ids.contains(id),
            Self::Predicate(predicate) => predicate(id),
        }
    }

    fn into_authorizer(self) -> Authorizer {
        Arc::new(move |id: &SpiffeId| self.allows(id))
    }
}

/// A TLS client config presenting the source's SVID and accepting servers
/// that `authorize` allows.
pub fn client_config(source: &X509Source, authorize: Authorize) -> Result<ClientConfig, TlsError> {
    let verifier = SpiffeServerCertVerifier::new(source.trust(), authorize.into_authorizer());
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(source.resolver()));
    // No session resumption: a resumed session skips certificate checks, so
    // a revoked or rotated SVID would keep working on it.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A TLS server config presenting the source's SVID and requiring client
/// certificates that `authorize` allows.
pub fn server_config(source: &X509Source, authorize: Authorize) -> Result<ServerConfig, TlsError> {
    let verifier = SpiffeClientCertVerifier::new(source.trust(), authorize.into_authorizer(), true);
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(source.resolver()));
    // Every handshake verifies the peer's current certificate against the
    // current bundle and CRLs: no resumption (tickets or session IDs).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The SPIFFE ID of the peer of an established TLS session (client or
/// server side), from its verified leaf certificate.
pub fn peer_spiffe_id(connection: &CommonState) -> Option<SpiffeId> {
    let leaf = connection.peer_certificates()?.first()?;
    spiffe_id_of_cert(leaf).ok()
}

impl ResolvesServerCert for SourceResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SourceResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}
