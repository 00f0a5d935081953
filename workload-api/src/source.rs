//! `X509Source`: the workload's live view of its X509-SVIDs, bundle and CRLs,
//! fed by a Workload API stream that reconnects with backoff. Reads are
//! lock-free (`arc-swap`); changes are announced on a `watch` channel.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tessera_proto::workload as pb;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::client::{connect_workload_api, with_header, ENDPOINT_ENV};
use crate::spiffe_id::SpiffeId;
use crate::tls::TrustAnchors;
use crate::x509::{split_der_chain, X509Svid};

/// How long `X509Source::connect` waits for the first SVID.
pub const FIRST_SVID_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// `SPIFFE_ENDPOINT_SOCKET` is not set.
    #[error("{ENDPOINT_ENV} is not set")]
    NoEndpoint,
    /// No SVID arrived in time; the last problem seen.
    #[error("no X509-SVID from the Workload API within {timeout:?}: {last_error}")]
    Timeout {
        /// How long it waited.
        timeout: Duration,
        /// The last error seen.
        last_error: String,
    },
}

/// One Workload API response, parsed.
pub struct X509Context {
    /// The workload's SVIDs; the first is the default (the one presented in
    /// TLS handshakes).
    pub svids: Vec<X509Svid>,
    /// The trust domain's CA certificates.
    pub bundle: Vec<CertificateDer<'static>>,
    /// CRLs in force, DER.
    pub crls: Vec<Vec<u8>>,
    certified_key: Arc<CertifiedKey>,
}

impl fmt::Debug for X509Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Context")
            .field("svids", &self.svids)
            .field("bundle", &self.bundle.len())
            .field("crls", &self.crls.len())
            .finish()
    }
}

impl X509Context {
    fn from_response(
        response: pb::X509svidResponse,
        pick: Option<&SpiffeId>,
    ) -> Result<Self, String> {
        let first = response.svids.first().ok_or("response has no SVIDs")?;
        let bundle = split_der_chain(&first.bundle).map_err(|e| format!("bundle: {e}"))?;
        let mut svids = response
            .svids
            .iter()
            .map(|s| {
                X509Svid::from_der(&s.x509_svid, &s.x509_svid_key)
                    .map_err(|e| format!("SVID {}: {e}", s.spiffe_id))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(id) = pick {
            let index = svids
                .iter()
                .position(|s| s.spiffe_id() == id)
                .ok_or_else(|| format!("the workload has no SVID for {id}"))?;
            svids.swap(0, index);
        }
        let default = &svids[0];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(default.key_pkcs8().to_vec()));
        let signing =
            rustls::crypto::ring::sign::any_ecdsa_type(&key).map_err(|e| format!("key: {e}"))?;
        let certified_key = Arc::new(CertifiedKey::new(default.chain().to_vec(), signing));
        Ok(Self { svids, bundle, crls: response.crl, certified_key })
    }

    /// The default SVID's certificate and key, for rustls.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified_key.clone()
    }
}

struct Shared {
    current: ArcSwapOption<X509Context>,
    trust: TrustAnchors,
    changes: watch::Sender<u64>,
}

/// A live source of the workload's X509-SVIDs, bundle and CRLs.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tessera_workload_api::{client_config, Authorize, SpiffeId, X509Source};
///
/// let source = X509Source::from_env().await?; // SPIFFE_ENDPOINT_SOCKET
/// let server: SpiffeId = "spiffe://example.org/db".parse()?;
/// let tls = client_config(&source, Authorize::exact(server))?;
/// # Ok(()) }
/// ```
pub struct X509Source {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for X509Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Source")
            .field("current", &self.shared.current.load().as_deref())
            .finish()
    }
}

impl Drop for X509Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl X509Source {
    /// Connects to the Workload API named by `SPIFFE_ENDPOINT_SOCKET`.
    pub async fn from_env() -> Result<Self, SourceError> {
        Self::from_env_as(None).await
    }

    /// Like [`from_env`](Self::from_env), presenting the SVID for
    /// `spiffe_id` when the workload is entitled to several.
    pub async fn from_env_as(spiffe_id: Option<SpiffeId>) -> Result<Self, SourceError> {
        let endpoint = std::env::var(ENDPOINT_ENV).map_err(|_| SourceError::NoEndpoint)?;
        Self::connect_as(&endpoint, spiffe_id).await
    }

    /// Connects to the Workload API at `endpoint` (`unix:///path`) and waits
    /// for the first SVID.
    pub async fn connect(endpoint: &str) -> Result<Self, SourceError> {
        Self::connect_as(endpoint, None).await
    }

    /// Like [`connect`](Self::connect), presenting the SVID for `spiffe_id`
    /// when the workload is entitled to several (`None`: the first).
    pub async fn connect_as(
        endpoint: &str,
        spiffe_id: Option<SpiffeId>,
    ) -> Result<Self, SourceError> {
        let (changes, mut updates) = watch::channel(0);
        let (errors_tx, errors) = watch::channel(String::from("not connected yet"));
        let shared = Arc::new(Shared {
            current: ArcSwapOption::empty(),
            trust: TrustAnchors::default(),
            changes,
        });
        let task = tokio::spawn(follow(endpoint.to_string(), spiffe_id, shared.clone(), errors_tx));
        let source = Self { shared, task };
        let first = tokio::time::timeout(FIRST_SVID_TIMEOUT, async {
            while source.context().is_none() {
                if updates.changed().await.is_err() {
                    return;
                }
            }
        });
        if first.await.is_err() {
            return Err(SourceError::Timeout {
                timeout: FIRST_SVID_TIMEOUT,
                last_error: errors.borrow().clone(),
            });
        }
        Ok(source)
    }

    /// The current material, if the workload has an identity.
    pub fn context(&self) -> Option<Arc<X509Context>> {
        self.shared.current.load_full()
    }

    /// The default SVID.
    pub fn svid(&self) -> Option<X509Svid> {
        self.context().and_then(|c| c.svids.first().cloned())
    }

    /// The bundle and CRLs as a verifier uses them (kept current).
    pub fn trust(&self) -> TrustAnchors {
        self.shared.trust.clone()
    }

    /// Changes: the value increases at every update (new SVID, bundle, CRL,
    /// or the identity withdrawn).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    pub(crate) fn resolver(&self) -> SourceResolver {
        SourceResolver { shared: self.shared.clone() }
    }
}

/// Serves the source's current SVID to rustls handshakes.
pub(crate) struct SourceResolver {
    shared: Arc<Shared>,
}

impl fmt::Debug for SourceResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SourceResolver")
    }
}

impl SourceResolver {
    pub(crate) fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.shared.current.load().as_ref().map(|c| c.certified_key())
    }
}

async fn follow(
    endpoint: String,
    pick: Option<SpiffeId>,
    shared: Arc<Shared>,
    errors: watch::Sender<String>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match stream_once(&endpoint, pick.as_ref(), &shared, &mut delay).await {
            Ok(()) => debug!("Workload API stream ended; reconnecting"),
            Err(e) => {
                warn!(endpoint = %endpoint, error = %e, "Workload API stream failed; reconnecting");
                errors.send_replace(e);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn stream_once(
    endpoint: &str,
    pick: Option<&SpiffeId>,
    shared: &Shared,
    delay: &mut Duration,
) -> Result<(), String> {
    let mut client = connect_workload_api(endpoint).await?;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .map_err(|s| withdraw_on_denied(shared, s))?
        .into_inner();
    loop {
        let Some(response) = stream.message().await.map_err(|s| withdraw_on_denied(shared, s))?
        else {
            return Ok(());
        };
        // Trust material first: it applies even if our identity is gone.
        if let Some(first) = response.svids.first() {
            match split_der_chain(&first.bundle) {
                Ok(bundle) => shared.trust.update(bundle),
                Err(e) => warn!(error = %e, "ignoring a bundle that does not parse"),
            }
        }
        if let Err(e) = shared.trust.update_crls(&response.crl) {
            warn!(error = %e, "ignoring CRLs that do not parse");
        }
        match X509Context::from_response(response, pick) {
            Ok(context) => {
                debug!(svids = context.svids.len(), "X509 material updated");
                shared.current.store(Some(Arc::new(context)));
            }
            Err(e) => {
                // The chosen identity is no longer issued (or the response is
                // unusable): withdraw it rather than keep presenting a stale one.
                warn!(error = %e, "X509-SVID withdrawn");
                shared.current.store(None);
            }
        }
        shared.changes.send_modify(|n| *n += 1);
        *delay = Duration::from_millis(100);
    }
}

/// PermissionDenied withdraws the identity until a good response arrives.
fn withdraw_on_denied(shared: &Shared, status: tonic::Status) -> String {
    if status.code() == tonic::Code::PermissionDenied && shared.current.load().is_some() {
        shared.current.store(None);
        shared.changes.send_modify(|n| *n += 1);
    }
    format!("{:?}: {}", status.code(), status.message())
}
