//! rustls certificate verifiers that trust a SPIFFE bundle and authorize the
//! peer by the SPIFFE ID in its leaf certificate's URI SAN (never by DNS name).

use std::fmt;
use std::sync::{Arc, OnceLock};

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
///
/// A new CRL is checked whole when it is given (every entry read, nothing
/// copied) and indexed for lookups by the first handshake that needs it:
/// with thousands of serials listed, indexing costs about as much as
/// signing the CRL, and a revocation storm would otherwise pay it in every
/// holder of `TrustAnchors` (the server's node API, each workload's
/// `X509Source`) for every revocation, used or not.
#[derive(Clone, Default)]
pub struct TrustAnchors {
    inner: Arc<ArcSwap<TrustState>>,
}

#[derive(Default)]
struct TrustState {
    authorities: Arc<Vec<CertificateDer<'static>>>,
    crl_der: Arc<Vec<Vec<u8>>>,
    /// `crl_der` indexed, by the first handshake after the CRLs changed.
    crls: Arc<OnceLock<Indexed>>,
}

/// CRLs indexed for lookups, or why they could not be (they were checked
/// when given, so this is a defect; handshakes are refused, never let
/// through unchecked).
type Indexed = Result<Vec<CertRevocationList<'static>>, String>;

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
            crl_der: old.crl_der.clone(),
            crls: old.crls.clone(),
        });
    }

    /// Replaces the CRLs (DER). Certificates they list are refused by the
    /// next handshake. A CRL that does not parse (any of its entries
    /// included) is an error and changes nothing.
    pub fn update_crls(&self, crls: &[Vec<u8>]) -> Result<(), TlsError> {
        if self.inner.load().crl_der.as_slice() == crls {
            return Ok(());
        }
        for der in crls {
            check_crl(der).map_err(|e| TlsError::BadCrl(e.to_string()))?;
        }
        let der = Arc::new(crls.to_vec());
        self.inner.rcu(|old| TrustState {
            authorities: old.authorities.clone(),
            crl_der: der.clone(),
            crls: Arc::default(),
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
        let crls = state.crls.get_or_init(|| index(&state.crl_der));
        let crls = crls
            .as_ref()
            .map_err(|e| rustls::Error::General(format!("CRLs in force cannot be indexed: {e}")))?;
        let crl_refs: Vec<&CertRevocationList<'_>> = crls.iter().collect();
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

/// `der` read as webpki reads a CRL, every revoked entry included (what
/// `OwnedCertRevocationList::from_der` would refuse), without copying it.
fn check_crl(der: &[u8]) -> Result<(), webpki::Error> {
    let crl = webpki::BorrowedCertRevocationList::from_der(der)?;
    for entry in &crl {
        entry?;
    }
    Ok(())
}

/// The CRLs indexed by serial for handshakes.
fn index(crls: &[Vec<u8>]) -> Indexed {
    crls.iter()
        .map(|der| {
            webpki::OwnedCertRevocationList::from_der(der)
                .map(CertRevocationList::from)
                .map_err(|e| e.to_string())
        })
        .collect()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer,
        KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
        PKCS_ECDSA_P256_SHA256,
    };

    struct Pki {
        anchors: TrustAnchors,
        issuer: Issuer<'static, KeyPair>,
        leaf: CertificateDer<'static>,
        serial: [u8; 16],
    }

    fn pki() -> Pki {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca, ca_key);
        let serial = [0x42; 16];
        let mut leaf = CertificateParams::default();
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.serial_number = Some(SerialNumber::from_slice(&serial));
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.subject_alt_names = vec![SanType::URI("spiffe://example.org/w".try_into().unwrap())];
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap().der().clone();
        Pki { anchors: TrustAnchors::new(vec![ca_der]), issuer, leaf, serial }
    }

    /// A CRL of `issuer` listing `serials`, numbered `number`.
    fn crl(issuer: &Issuer<'_, KeyPair>, serials: &[&[u8]], number: u64) -> Vec<u8> {
        let then = rcgen::date_time_ymd(2026, 1, 1);
        let params = CertificateRevocationListParams {
            this_update: then,
            next_update: rcgen::date_time_ymd(2030, 1, 1),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: then,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(issuer).unwrap().der().to_vec()
    }

    fn verify(pki: &Pki) -> Result<SpiffeId, rustls::Error> {
        pki.anchors.verify(&pki.leaf, &[], UnixTime::now(), KeyUsage::client_auth())
    }

    fn revoked(result: Result<SpiffeId, rustls::Error>) -> bool {
        matches!(result, Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)))
    }

    #[test]
    fn a_crl_given_is_in_force_at_the_next_handshake_and_a_bad_one_changes_nothing() {
        let pki = pki();
        assert_eq!(verify(&pki).unwrap().as_str(), "spiffe://example.org/w");
        let other = [0x43; 16];
        // Listed: refused, and the CRLs are those given.
        let listing = crl(&pki.issuer, &[&other, &pki.serial], 1);
        pki.anchors.update_crls(std::slice::from_ref(&listing)).unwrap();
        assert!(revoked(verify(&pki)));
        assert_eq!(pki.anchors.crls().as_slice(), std::slice::from_ref(&listing));
        // Indexed once, the same answer again.
        assert!(revoked(verify(&pki)));
        // A CRL that does not parse, or whose one entry does not, is refused
        // and the CRLs in force stay (the handshake still refused). The
        // entry: the listed serial's revocation date tag made a NULL's.
        let mut bad_entry = crl(&pki.issuer, &[&other, &pki.serial], 2);
        let at = bad_entry.windows(16).position(|w| w == pki.serial).unwrap() + 16;
        assert_eq!(bad_entry[at], 0x17, "a UTCTime follows the serial");
        bad_entry[at] = 0x05;
        let truncated = listing[..listing.len() - 1].to_vec();
        for bad in [bad_entry, truncated, b"not a CRL".to_vec()] {
            let good_then_bad = [crl(&pki.issuer, &[], 3), bad];
            assert!(matches!(pki.anchors.update_crls(&good_then_bad), Err(TlsError::BadCrl(_))));
            assert_eq!(pki.anchors.crls().as_slice(), std::slice::from_ref(&listing));
            assert!(revoked(verify(&pki)));
        }
        // No longer listed: accepted at the next handshake.
        pki.anchors.update_crls(&[crl(&pki.issuer, &[&other], 4)]).unwrap();
        assert!(verify(&pki).is_ok());
        // A new bundle keeps the CRLs in force.
        pki.anchors.update_crls(&[listing]).unwrap();
        pki.anchors.update(pki.anchors.authorities().to_vec());
        assert!(revoked(verify(&pki)));
    }
}
