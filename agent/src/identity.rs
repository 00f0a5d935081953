//! The agent's own identity: its key (generated here, never sent anywhere),
//! its agent X509-SVID and the trust bundle, kept in the data dir and reused
//! across restarts while valid.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tessera_workload_api::{SpiffeId, X509Svid};

use crate::node::client::ClientIdentity;

/// Identity storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored or received credential is unusable.
    #[error("{0}")]
    Invalid(String),
    /// Key or CSR generation failed.
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
}

/// The agent's SVID and key.
#[derive(Clone)]
pub struct AgentIdentity {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A new key and a CSR for it.
pub fn new_key_and_csr() -> Result<(Vec<u8>, Vec<u8>), IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?.der().to_vec();
    Ok((key.serialize_der(), csr))
}

impl AgentIdentity {
    /// Builds an identity from a signed chain and the key it was requested for.
    pub fn new(chain: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Result<Self, IdentityError> {
        let svid = X509Svid::from_der(&chain.concat(), &key_pkcs8)
            .map_err(|e| IdentityError::Invalid(format!("agent SVID: {e}")))?;
        let not_before = x509_parser::parse_x509_certificate(svid.leaf())
            .map(|(_, c)| c.validity().not_before.timestamp())
            .map_err(|e| IdentityError::Invalid(format!("agent SVID: {e}")))?;
        Ok(Self {
            spiffe_id: svid.spiffe_id().clone(),
            not_after: svid.not_after_unix(),
            not_before,
            chain: svid.chain().to_vec(),
            key_pkcs8,
        })
    }

    /// The credentials for mTLS to the server.
    pub fn client_identity(&self) -> ClientIdentity {
        ClientIdentity {
            chain: self.chain.clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone())),
        }
    }

    /// Loads the stored identity, if any.
    pub fn load(dir: &Path) -> Result<Option<Self>, IdentityError> {
        let (svid_path, key_path) = (dir.join("agent_svid.pem"), dir.join("agent_key.pem"));
        if !svid_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        let chain = read_pem(&svid_path, "CERTIFICATE")?;
        let key = read_pem(&key_path, "PRIVATE KEY")?.into_iter().next().unwrap_or_default();
        Self::new(chain, key).map(Some)
    }

    /// Stores the identity: key file 0600, written before the certificate.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", self.key_pkcs8.clone()));
        write_private(&dir.join("agent_key.pem"), key.as_bytes())?;
        write_private(&dir.join("agent_svid.pem"), certs_pem(&self.chain).as_bytes())
    }
}

/// PEM for certificates.
pub fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec()))).collect()
}

/// Reads the PEM blocks with `tag` from a file.
pub fn read_pem(path: &Path, tag: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let text = std::fs::read(path)
        .map_err(|source| IdentityError::Io { path: path.to_owned(), source })?;
    let blocks = pem::parse_many(&text)
        .map_err(|e| IdentityError::Invalid(format!("{}: not PEM: {e}", path.display())))?;
    let found: Vec<Vec<u8>> =
        blocks.into_iter().filter(|b| b.tag() == tag).map(|b| b.into_contents()).collect();
    if found.is_empty() {
        return Err(IdentityError::Invalid(format!("{}: no {tag} block", path.display())));
    }
    Ok(found)
}

/// Writes a 0600 file atomically.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// An agent identity (`spiffe://example.org/agent`) whose SVID has serial
/// `serial`; self-signed, since nothing in the agent checks its chain.
#[cfg(test)]
pub(crate) fn test_identity(serial: u8) -> AgentIdentity {
    use rcgen::{IsCa, KeyUsagePurpose, SanType, SerialNumber};
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(SerialNumber::from(vec![serial]));
    params.subject_alt_names = vec![SanType::URI("spiffe://example.org/agent".try_into().unwrap())];
    let cert = params.self_signed(&key).unwrap();
    AgentIdentity::new(vec![cert.der().to_vec()], key.serialize_der()).unwrap()
}
