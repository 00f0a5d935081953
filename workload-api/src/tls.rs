//! rustls certificate verifiers that trust a SPIFFE bundle and authorize the
//! peer by the SPIFFE ID in its leaf certificate's URI SAN (never by DNS name).

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::{CertRevocationList, EndEntityCert, KeyUsage};

use crate::spiffe_id::SpiffeId;
use crate::x509::validate_leaf_cert;

/// Errors from building TLS material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A bundle certificate could not be used as a trust anchor.
    #[error("bundle certificate is not a usable trust anchor: {0}")]
    BadTrustAnchor(String),
    /// A CRL could not be parsed.
    #[error("invalid CRL: {0}")]
    BadCrl(String),
}

/// Decides whether a peer's SPIFFE ID may connect.
pub type Authorizer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// What a verifier trusts: the CA certificates of a trust domain's bundle
/// and the CRLs in force. Cheap to clone; `update` and `update_crls` swap
/// the material for every verifier sharing it (lock-free reads), so a
/// rotated bundle or a new CRL is used by the next handshake.
#[derive(Clone, Default)]
pub struct TrustAnchors {
    inner: Arc<ArcSwap<TrustState>>,
}

#[derive(Default)]
struct TrustState {
    authorities: Arc<Vec<CertificateDer<'static>>>,
    crls: Arc<Vec<CertRevocationList<'static>>>,
    crl_der: Arc<Vec<Vec<u8>>>,
}

impl TrustAnchors {
    /// Trust anchors from DER CA certificates.
    pub fn new(authorities: Vec<CertificateDer<'static>>) -> Self {
        let state = TrustState { authorities: Arc::new(authorities), ..TrustState::default() };
        Self { inner: Arc::new(ArcSwap::from_pointee(state)) }
    }

    /// Replaces the trusted CA certificates.
    pub fn update(&self, authorities: Vec<CertificateDer<'static>>) {
        self.inner.rcu(|old| TrustState {
            authorities: Arc::new(authorities.clone()),
            crls: old.crls.clone(),
            crl_der: old.crl_der.clone(),
        });
    }

    /// Replaces the CRLs (DER). Certificates they list are refused by the
    /// next handshake. A CRL that does not parse is an error and changes nothing.
    pub fn update_crls(&self, crls: &[Vec<u8>]) -> Result<(), TlsError> {
        if self.inner.load().crl_der.as_slice() == crls {
            return Ok(());
        }
        let parsed = crls
            .iter()
            .map(|der| {
                webpki::OwnedCertRevocationList::from_der(der)
                    .map(CertRevocationList::from)
                    .map_err(|e| TlsError::BadCrl(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let parsed = Arc::new(parsed);
        let der = Arc::new(crls.to_vec());
        self.inner.rcu(|old| TrustState {
            authorities: old.authorities.clone(),
            crls: parsed.clone(),
            crl_der: der.clone(),
        });
        Ok(())
    }

    /// The current CA certificates.
    pub fn authorities(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.inner.load().authorities.clone()
    }

    /// The current CRLs, DER.
    pub fn crls(&self) -> Arc<Vec<Vec<u8>>> {
        self.inner.load().crl_der.clone()
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let state = self.inner.load();
        let anchors = state
            .authorities
            .iter()
            .filter_map(|ca| webpki::anchor_from_trusted_cert(ca).ok())
            .collect::<Vec<_>>();
        if anchors.is_empty() {
            return Err(rustls::Error::General("no trust anchors in bundle".into()));
        }
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        let crl_refs: Vec<&CertRevocationList<'_>> = state.crls.iter().collect();
        // Certificates from a CA without a CRL are not revoked; CRL
        // freshness is the agent's job (it pushes each new CRL).
        let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs).ok().map(|builder| {
            builder
                .with_depth(webpki::RevocationCheckDepth::EndEntity)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                .build()
        });
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertRevoked => {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            }
            e => rustls::Error::General(format!("peer certificate chain: {e}")),
        })?;
        spiffe_id_of_cert(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer X509-SVID: {e}")))
    }
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchors").field("authorities", &self.authorities().len()).finish()
    }
}

/// The SPIFFE ID of an X509-SVID leaf certificate, checked against the
/// X509-SVID profile.
pub fn spiffe_id_of_cert(der: &CertificateDer<'_>) -> Result<SpiffeId, crate::X509Error> {
    validate_leaf_cert(der.as_ref())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Verifies a TLS server's X509-SVID: the chain must lead to the bundle and
/// the SPIFFE ID must be accepted by the authorizer.
pub struct SpiffeServerCertVerifier {
    anchors: TrustAnchors,
    authorize: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerCertVerifier {
    /// A verifier trusting `anchors` and accepting servers `authorize` allows.
    pub fn new(anchors: TrustAnchors, authorize: Authorizer) -> Self {
        Self { anchors, authorize, algorithms: algorithms() }
    }
}

impl fmt::Debug for SpiffeServerCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerCertVerifier").field("anchors", &self.anchors).finish()
    }
}

impl ServerCertVerifier for SpiffeServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.anchors.verify(end_entity, intermediates, now, KeyUsage::server_auth())?;
        if (self.authorize)(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            {
                tracing::warn!(peer = %id, "TLS peer refused: server SPIFFE ID is not authorized");
                Err(rustls::Error::General(format!("server SPIFFE ID {id} is not authorized")))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a TLS client's X509-SVID for a server: the chain must lead to the
/// bundle and the SPIFFE ID must be accepted by the authorizer.
pub struct SpiffeClientCertVerifier {
    anchors: TrustAnchors,
    authorize: Authorizer,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientCertVerifier {
    /// A verifier trusting `anchors` and accepting clients `authorize`
    /// allows. With `mandatory` false, clients without a certificate may
    /// connect (the application then decides what they may do).
    pub fn new(anchors: TrustAnchors, authorize: Authorizer, mandatory: bool) -> Self {
        Self { anchors, authorize, mandatory, algorithms: algorithms() }
    }
}

impl fmt::Debug for SpiffeClientCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientCertVerifier")
            .field("anchors", &self.anchors)
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = self.anchors.verify(end_entity, intermediates, now, KeyUsage::client_auth())?;
        if (self.authorize)(&id) {
            Ok(ClientCertVerified::assertion())
        } else {
            {
                tracing::warn!(peer = %id, "TLS peer refused: client SPIFFE ID is not authorized");
                Err(rustls::Error::General(format!("client SPIFFE ID {id} is not authorized")))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
