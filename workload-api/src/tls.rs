//! rustls certificate verifiers that trust a SPIFFE bundle and authorize the
//! peer by the SPIFFE ID in its leaf certificate's URI SAN (never by DNS name).

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::spiffe_id::SpiffeId;
use crate::x509::validate_leaf_cert;

/// Errors from building TLS material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A bundle certificate could not be used as a trust anchor.
    #[error("bundle certificate is not a usable trust anchor: {0}")]
    BadTrustAnchor(String),
}

/// Decides whether a peer's SPIFFE ID may connect.
pub type Authorizer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// The trust anchors (CA certificates of a trust domain's bundle) a verifier
/// checks chains against. Cheap to clone; `update` swaps the set for every
/// verifier sharing it, so a rotated bundle is used by the next handshake.
#[derive(Clone, Default)]
pub struct TrustAnchors {
    inner: Arc<RwLock<Arc<Vec<CertificateDer<'static>>>>>,
}

impl TrustAnchors {
    /// Trust anchors from DER CA certificates.
    pub fn new(authorities: Vec<CertificateDer<'static>>) -> Self {
        Self { inner: Arc::new(RwLock::new(Arc::new(authorities))) }
    }

    /// Replaces the trusted CA certificates.
    pub fn update(&self, authorities: Vec<CertificateDer<'static>>) {
        // A poisoned lock only means a writer panicked mid-swap of an Arc,
        // which cannot leave the value half-written: keep using it.
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(authorities);
    }

    /// The current CA certificates.
    pub fn authorities(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let authorities = self.authorities();
        let anchors = authorities
            .iter()
            .filter_map(|ca| webpki::anchor_from_trusted_cert(ca).ok())
            .collect::<Vec<_>>();
        if anchors.is_empty() {
            return Err(rustls::Error::General("no trust anchors in bundle".into()));
        }
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer certificate chain: {e}")))?;
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
            Err(rustls::Error::General(format!("server SPIFFE ID {id} is not authorized")))
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
            Err(rustls::Error::General(format!("client SPIFFE ID {id} is not authorized")))
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
