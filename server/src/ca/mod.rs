//! The trust domain's certificate authority: a self-signed ECDSA P-256 root
//! persisted in `<data_dir>/ca`, rotated by preparing the next CA (published
//! in the bundle, not yet signing) and activating it later. Signs X509-SVIDs
//! that follow the SPIFFE X509-SVID profile.
//!
//! The folder: `mod.rs` (the X.509 CA, its rotation and CRLs), `jwt.rs`
//! (the JWT-SVID signing keys, rotated with the CA), `csr.rs` (agents' and
//! operators' CSRs), `serial.rs` (serial numbers), `signed/` (an X509-SVID's
//! and a CRL's DER from a template per CA), `tests.rs` (the CA's
//! rotation, bundle and signing through `Ca`). It depends on nothing
//! else of the server but `fsutil`; the APIs and the store's CRL signer
//! depend on it.

pub mod csr;
pub mod jwt;
mod serial;
mod signed;

pub use serial::random_serial;
pub use signed::{CrlEntry, CrlError};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use tessera_workload_api::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::info;

use crate::fsutil::{create_private_dir, write_private};
use jwt::{JwtKeyError, JwtKeyType, JwtSigningKey, SignedJwt};
use signed::{CrlFields, DerError, IssuerTemplate, SvidFields};
use tessera_common::clock::Clock;

/// NotBefore of issued certificates is backdated by this many seconds to
/// absorb clock skew between machines.
pub const BACKDATE_SECS: i64 = 10;

/// CA errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// Reading or writing the CA's files failed.
    #[error("CA storage {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored CA file is unreadable or belongs to another trust domain.
    #[error("stored CA {path} is unusable: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Building or signing a certificate failed.
    #[error("certificate signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// Writing an X509-SVID failed (a name that is not ASCII, a key that
    /// is not P-256).
    #[error("X509-SVID: {0}")]
    Svid(#[from] DerError),
    /// Writing a CRL failed (a validity that cannot be encoded, or the
    /// key refused to sign).
    #[error("CRL: {0}")]
    Crl(#[from] CrlError),
    /// The active CA expires before the certificate could start.
    #[error("the CA has expired")]
    Expired,
    /// A JWT signing key could not be loaded, created or used.
    #[error(transparent)]
    Jwt(#[from] JwtKeyError),
}

/// A signed X509-SVID.
#[derive(Debug, Clone)]
pub struct SignedSvid {
    /// The certificate, DER. It is the whole chain: the CA that signed it
    /// is a root, in the bundle.
    pub leaf: Vec<u8>,
    /// Leaf serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Sequence number of the CA that signed it.
    pub ca_seq: u32,
}

/// The CA's lifetime policy.
#[derive(Debug, Clone)]
pub struct CaPolicy {
    /// CA certificate lifetime, seconds.
    pub ttl: u64,
    /// Fraction of lifetime at which the next CA is prepared.
    pub prepare_at: f64,
    /// Fraction of lifetime at which the next CA is activated.
    pub activate_at: f64,
    /// The kind of JWT signing key each new CA generation gets.
    pub jwt_key_type: JwtKeyType,
    /// The `iss` claim of JWT-SVIDs, when they carry one (the broker
    /// publishes an OIDC discovery document for it).
    pub jwt_issuer: Option<String>,
}

/// One CA generation: certificate and key, and the JWT signing key that
/// is prepared, activated and retired with it (its tokens never outlive
/// `not_after`, when it leaves the bundle).
struct CaKey {
    seq: u32,
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// What every X509-SVID and CRL this CA signs shares.
    template: IssuerTemplate,
    jwt: JwtSigningKey,
    not_before: i64,
    not_after: i64,
}

impl CaKey {
    /// The moment `fraction` of the CA's life has passed, counted from its
    /// creation (NotBefore is backdated for clock skew).
    fn point(&self, fraction: f64) -> i64 {
        let created = (self.not_before + BACKDATE_SECS).min(self.not_after);
        // Lifetimes are far below 2^52 seconds, so the f64 round trip is exact enough.
        created + ((self.not_after - created) as f64 * fraction) as i64
    }
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKey")
            .field("seq", &self.seq)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct CaState {
    /// Unexpired CAs, oldest first. The active one signs; later ones are prepared.
    keys: Vec<Arc<CaKey>>,
    active: usize,
    /// The highest sequence number ever used (expired CAs included): a
    /// new CA never reuses a number, so never an old key file.
    last_seq: u32,
}

/// The certificate authority.
pub struct Ca {
    dir: PathBuf,
    /// This server's ID (`<data_dir>/server-id`), in its CAs' subject: CAs
    /// of servers sharing a datastore differ by name, so a verifier finds
    /// the right issuer of a certificate or CRL among them.
    server_id: String,
    trust_domain: TrustDomain,
    policy: CaPolicy,
    clock: Arc<dyn Clock>,
    state: RwLock<CaState>,
    /// Other servers' CAs (a shared datastore), unexpired.
    peers: RwLock<Vec<tessera_proto::types::CaRecord>>,
    bundle: watch::Sender<Arc<Vec<CertificateDer<'static>>>>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CAs stored in `<data_dir>/ca`, or creates the first one.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: TrustDomain,
        policy: CaPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CaError> {
        let dir = data_dir.join("ca");
        create_private_dir(&dir).map_err(|source| CaError::Io { path: dir.clone(), source })?;
        let server_id = crate::fsutil::server_id(data_dir)
            .map_err(|source| CaError::Io { path: data_dir.join("server-id"), source })?;
        let now = clock.now();
        let mut keys = load_keys(&dir, &trust_domain, policy.jwt_key_type)?;
        let last_seq = keys.iter().map(|k| k.seq).max().unwrap_or(0);
        keys.retain(|k| k.not_after > now);
        keys.sort_by_key(|k| k.seq);
        let state = CaState { keys: keys.into_iter().map(Arc::new).collect(), active: 0, last_seq };
        let (bundle, _) = watch::channel(Arc::new(Vec::new()));
        let ca = Self {
            dir,
            server_id,
            trust_domain,
            policy,
            clock,
            state: RwLock::new(state),
            peers: RwLock::default(),
            bundle,
        };
        ca.rotate()?;
        Ok(ca)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Current bundle: every unexpired CA certificate (active, prepared and
    /// retired), oldest first, then other servers' CAs.
    pub fn bundle(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.bundle.borrow().clone()
    }

    /// Follows bundle changes.
    pub fn watch_bundle(&self) -> watch::Receiver<Arc<Vec<CertificateDer<'static>>>> {
        self.bundle.subscribe()
    }

    /// The JWT signing keys in the bundle (active, prepared and retired but
    /// unexpired), oldest first.
    pub fn jwt_authorities(&self) -> Vec<tessera_proto::types::JwtKey> {
        let mut keys: Vec<_> = self
            .read()
            .keys
            .iter()
            .map(|k| tessera_proto::types::JwtKey {
                kid: k.jwt.kid().to_string(),
                public_key: k.jwt.spki_der().to_vec(),
                expires_at: k.not_after,
            })
            .collect();
        keys.extend(self.read_peers().iter().filter_map(|p| p.jwt.clone()));
        keys
    }

    /// This server's CAs as records for the shared datastore (certificates
    /// and JWT public keys only).
    pub fn records(&self, server_id: &str) -> Vec<tessera_proto::types::CaRecord> {
        self.read()
            .keys
            .iter()
            .map(|k| tessera_proto::types::CaRecord {
                server_id: server_id.to_string(),
                seq: k.seq,
                cert_der: k.cert.to_vec(),
                jwt: Some(tessera_proto::types::JwtKey {
                    kid: k.jwt.kid().to_string(),
                    public_key: k.jwt.spki_der().to_vec(),
                    expires_at: k.not_after,
                }),
                not_after: k.not_after,
            })
            .collect()
    }

    /// Sets the other servers' CAs (from every record in the datastore,
    /// this server's own excluded); returns whether the bundle changed.
    pub fn set_peers(&self, server_id: &str, records: Vec<tessera_proto::types::CaRecord>) -> bool {
        let now = self.clock.now();
        let peers: Vec<_> =
            records.into_iter().filter(|r| r.server_id != server_id && r.not_after > now).collect();
        if *self.read_peers() == peers {
            return false;
        }
        let own: Vec<Vec<u8>> =
            self.read().keys.iter().filter_map(|k| subject_of(&k.cert)).collect();
        for peer in &peers {
            if subject_of(&peer.cert_der).is_some_and(|subject| own.contains(&subject)) {
                tracing::warn!(
                    peer = %peer.server_id,
                    seq = peer.seq,
                    "another server's CA has the same subject as one of ours (CAs made before \
                     servers shared a datastore): verifiers cannot tell them apart until \
                     rotation replaces them (new CAs carry the server ID)"
                );
            }
        }
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
        self.publish_bundle(&self.read());
        true
    }

    fn read_peers(&self) -> std::sync::RwLockReadGuard<'_, Vec<tessera_proto::types::CaRecord>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the bundle: own CAs, then other servers'.
    fn publish_bundle(&self, state: &CaState) {
        let mut certs: Vec<CertificateDer<'static>> =
            state.keys.iter().map(|k| k.cert.clone()).collect();
        certs.extend(self.read_peers().iter().map(|p| CertificateDer::from(p.cert_der.clone())));
        self.bundle.send_replace(Arc::new(certs));
    }

    /// A number that grows whenever the bundle changes (a CA prepared adds
    /// to the newest sequence number, a CA retired to the oldest): the
    /// SPIFFE bundle's `spiffe_sequence`.
    pub fn bundle_sequence(&self) -> u64 {
        let state = self.read();
        let first = state.keys.first().map_or(0, |k| u64::from(k.seq));
        let last = state.keys.last().map_or(0, |k| u64::from(k.seq));
        let peers: u64 = self.read_peers().iter().map(|p| u64::from(p.seq)).sum();
        first + last + peers
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience` with the active JWT
    /// key. Its lifetime is `ttl` seconds, cut short at the key's expiry.
    /// Returns the token and the sequence number of the CA generation.
    pub fn sign_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: u32,
    ) -> Result<(SignedJwt, u32), CaError> {
        let key = self.active();
        let now = self.clock.now();
        let expires_at = (now + i64::from(ttl)).min(key.not_after);
        if expires_at <= now {
            return Err(CaError::Expired);
        }
        Ok((
            key.jwt.sign(
                spiffe_id.as_str(),
                audience,
                now,
                expires_at,
                self.policy.jwt_issuer.as_deref(),
            )?,
            key.seq,
        ))
    }

    /// When the active CA expires (Unix seconds).
    pub fn active_not_after(&self) -> i64 {
        let state = self.read();
        state.keys.get(state.active).map_or(0, |k| k.not_after)
    }

    /// Applies the rotation policy at the current time: creates a CA if none
    /// is valid, prepares the next at `prepare_at`, activates it at
    /// `activate_at`, drops expired CAs. Returns whether the bundle changed.
    pub fn rotate(&self) -> Result<bool, CaError> {
        let now = self.clock.now();
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let before = state.keys.iter().map(|k| k.seq).collect::<Vec<_>>();
        state.keys.retain(|k| k.not_after > now);
        if state.keys.is_empty() {
            let key = self.create_key(state.last_seq + 1, now)?;
            state.last_seq = key.seq;
            info!(seq = key.seq, not_after = key.not_after, "created CA");
            state.keys.push(Arc::new(key));
        }
        // Activate: the newest CA whose predecessor has passed its activation point.
        let mut active = 0;
        for i in 1..state.keys.len() {
            if now >= state.keys[i - 1].point(self.policy.activate_at) {
                active = i;
            }
        }
        if active != state.active || before.is_empty() {
            info!(seq = state.keys[active].seq, "CA active");
        }
        state.active = active;
        let newest = state.keys.len() - 1;
        if active == newest && now >= state.keys[active].point(self.policy.prepare_at) {
            let seq = state.keys[newest].seq.max(state.last_seq) + 1;
            state.last_seq = seq;
            let key = self.create_key(seq, now)?;
            info!(seq, not_after = key.not_after, "prepared next CA (in bundle, not yet signing)");
            state.keys.push(Arc::new(key));
        }
        let after = state.keys.iter().map(|k| k.seq).collect::<Vec<_>>();
        let changed = after != before;
        if changed || self.bundle.borrow().is_empty() {
            self.publish_bundle(&state);
        }
        Ok(changed)
    }

    /// Seconds until `rotate` next has something to do.
    pub fn next_rotation_in(&self) -> i64 {
        let now = self.clock.now();
        let state = self.read();
        let mut next = i64::MAX;
        for key in &state.keys {
            let points = [
                key.point(self.policy.prepare_at),
                key.point(self.policy.activate_at),
                key.not_after,
            ];
            for point in points {
                if point > now {
                    next = next.min(point);
                }
            }
        }
        (next - now).clamp(1, 3600)
    }

    /// Signs an X509-SVID for `spiffe_id` binding `public_key`. The lifetime
    /// is `ttl` seconds, cut short at the CA's own expiry.
    pub fn sign_svid(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        ttl: u32,
        dns_names: &[String],
    ) -> Result<SignedSvid, CaError> {
        let key = self.active();
        let now = self.clock.now();
        let not_after = (now + i64::from(ttl)).min(key.not_after);
        if not_after <= now {
            return Err(CaError::Expired);
        }
        if public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(DerError::UnsupportedKey.into());
        }
        let serial = random_serial();
        let fields = SvidFields {
            serial: &serial,
            not_before: now - BACKDATE_SECS,
            not_after,
            public_key: public_key.der_bytes(),
            spiffe_id: spiffe_id.as_str(),
            dns_names,
        };
        let cert = signed::write_svid(&key.template, key.issuer.key(), &fields)?;
        Ok(SignedSvid {
            leaf: cert,
            serial: hex::encode(serial),
            expires_at: not_after,
            ca_seq: key.seq,
        })
    }

    /// Signs one CRL (RFC 5280, DER) per CA in the bundle, each listing the
    /// revoked serials that CA issued. Valid for `validity` seconds.
    pub fn sign_crls(
        &self,
        revoked: &[CrlEntry<'_>],
        crl_number: u64,
        validity: i64,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        let now = self.clock.now();
        let keys = self.read().keys.clone();
        let fields = CrlFields {
            this_update: now - BACKDATE_SECS,
            next_update: now + validity.max(1),
            number: crl_number,
        };
        let mut crls = Vec::with_capacity(keys.len());
        for key in keys {
            let listed = revoked.iter().filter(|r| r.ca_seq == key.seq);
            crls.push(signed::write_crl(&key.template, key.issuer.key(), &fields, listed)?);
        }
        Ok(crls)
    }

    fn active(&self) -> Arc<CaKey> {
        let state = self.read();
        // `rotate` keeps at least one key and `active` in range.
        state.keys[state.active.min(state.keys.len() - 1)].clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CaState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn create_key(&self, seq: u32, now: i64) -> Result<CaKey, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let not_before = now - BACKDATE_SECS;
        let not_after = now + i64::try_from(self.policy.ttl).unwrap_or(i64::MAX / 2);
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.not_before = to_datetime(not_before);
        params.not_after = to_datetime(not_after);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::OrganizationalUnitName, format!("server {}", self.server_id));
        dn.push(DnType::CommonName, format!("Tessera CA {} #{seq}", self.trust_domain));
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::URI(ia5(&self.trust_domain.id_string())?));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let cert_path = self.dir.join(format!("ca-{seq:06}.crt.pem"));
        let key_path = self.dir.join(format!("ca-{seq:06}.key.pem"));
        let template = x509_parser::parse_x509_certificate(cert.der())
            .map_err(|e| e.to_string())
            .and_then(|(_, parsed)| {
                IssuerTemplate::for_ca(&parsed, &key).map_err(|e| e.to_string())
            })
            .map_err(|reason| CaError::Corrupt { path: cert_path.clone(), reason })?;
        // Key first: a certificate without its key would be unusable.
        write_private(&key_path, key.serialize_pem().as_bytes())
            .map_err(|source| CaError::Io { path: key_path, source })?;
        write_private(&cert_path, cert.pem().as_bytes())
            .map_err(|source| CaError::Io { path: cert_path, source })?;
        let jwt = JwtSigningKey::create(&jwt_key_path(&self.dir, seq), self.policy.jwt_key_type)?;
        let der = cert.der().clone();
        let issuer = Issuer::new(params, key);
        Ok(CaKey { seq, cert: der, issuer, template, jwt, not_before, not_after })
    }
}

fn jwt_key_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("jwt-{seq:06}.key.pem"))
}

fn load_keys(
    dir: &Path,
    trust_domain: &TrustDomain,
    jwt_key_type: JwtKeyType,
) -> Result<Vec<CaKey>, CaError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    let mut keys = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io(dir))? {
        let item = item.map_err(io(dir))?;
        let name = item.file_name().to_string_lossy().into_owned();
        let Some(seq) = name.strip_prefix("ca-").and_then(|n| n.strip_suffix(".crt.pem")) else {
            continue;
        };
        let cert_path = item.path();
        let corrupt = |reason: String| CaError::Corrupt { path: cert_path.clone(), reason };
        let seq: u32 = seq.parse().map_err(|_| corrupt("bad sequence number in name".into()))?;
        let key_path = dir.join(format!("ca-{seq:06}.key.pem"));
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let cert = pem::parse(&cert_pem).map_err(|e| corrupt(e.to_string()))?;
        let cert = CertificateDer::from(cert.into_contents());
        let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(format!("key: {e}")))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert).map_err(|e| corrupt(e.to_string()))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(corrupt("key does not match certificate".into()));
        }
        let id =
            tessera_workload_api::validate_ca_cert(&cert).map_err(|e| corrupt(e.to_string()))?;
        if id.as_ref().map(|id| id.trust_domain()) != Some(trust_domain) {
            return Err(corrupt(format!(
                "CA belongs to {}, not to trust domain {trust_domain}",
                id.map_or_else(|| "no trust domain".to_string(), |id| id.to_string())
            )));
        }
        let not_before = parsed.validity().not_before.timestamp();
        let not_after = parsed.validity().not_after.timestamp();
        let template = IssuerTemplate::for_ca(&parsed, &key).map_err(|e| corrupt(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| corrupt(e.to_string()))?;
        // A CA from before JWT-SVIDs gets its JWT key now.
        let jwt = JwtSigningKey::load_or_create(&jwt_key_path(dir, seq), jwt_key_type)?;
        keys.push(CaKey { seq, cert, issuer, template, jwt, not_before, not_after });
    }
    Ok(keys)
}

fn to_datetime(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, CaError> {
    rcgen::string::Ia5String::try_from(s).map_err(CaError::Sign)
}

/// A certificate's subject name, DER.
fn subject_of(der: &[u8]) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(der).ok().map(|(_, cert)| cert.subject().as_raw().to_vec())
}

#[cfg(test)]
mod tests;
