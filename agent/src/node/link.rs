//! The agent's link to the server's node API: one connection at a time,
//! made with the agent's current SVID, shared by every node client (Sync,
//! signers, renewal, event pusher); the identity it presents, and the
//! judgement of a refused call (see `standing`).

use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use rustls_pki_types::CertificateDer;
use tessera_proto::node::node_client::NodeClient;
use tessera_proto::Refusal;
use tessera_workload_api::{TrustAnchors, TrustDomain};
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use tracing::warn;

use crate::identity::{certs_pem, write_private, AgentIdentity};
use crate::node::client::{node_tls_config, NodeClientError, Servers};
use crate::node::standing::{self, Call, Death, Standing};

/// The connection to the server's node API, with the agent's current SVID.
#[derive(Debug)]
pub struct NodeLink {
    servers: Servers,
    pub(crate) trust_domain: TrustDomain,
    /// Trust anchors for the server's certificate (updated from pushed bundles).
    pub anchors: TrustAnchors,
    identity: RwLock<AgentIdentity>,
    client: Mutex<Option<NodeClient<Channel>>>,
    data_dir: PathBuf,
    /// Notified when the agent's SVID changed: the Sync stream reopens with
    /// the new one at once (the server closes streams of superseded SVIDs).
    pub(crate) resync: Notify,
    /// Counts identity changes (renewal, attesting again).
    generation: watch::Sender<u64>,
    /// Whether the identity is dead, and since when no server answered.
    pub standing: Standing,
}

impl NodeLink {
    /// A link to the servers at `addresses` authenticated as `identity`.
    pub fn new(
        addresses: Vec<String>,
        trust_domain: TrustDomain,
        anchors: TrustAnchors,
        identity: AgentIdentity,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            servers: Servers::new(addresses, identity.spiffe_id.as_str()),
            trust_domain,
            anchors,
            identity: RwLock::new(identity),
            client: Mutex::new(None),
            data_dir,
            resync: Notify::new(),
            generation: watch::Sender::new(0),
            standing: Standing::default(),
        }
    }

    /// The serial of the agent's current SVID.
    pub fn serial(&self) -> String {
        let identity = self.identity.read().unwrap_or_else(|e| e.into_inner());
        identity
            .chain
            .first()
            .and_then(|leaf| tessera_workload_api::certificate_serial_hex(leaf).ok())
            .unwrap_or_default()
    }

    /// Judges a failed `call` that presented the SVID with serial `used`:
    /// with a typed refusal (from the status, else from a TLS alert seen
    /// since), records the identity dead when the refusal ends it (see
    /// [`standing::ends_identity`]), and asks for a renewal when the SVID
    /// was called superseded. Answers whether the identity is dead.
    pub fn judge(&self, status: Option<&tonic::Status>, call: Call, used: &str) -> bool {
        let alert = self.standing.alerts.take();
        let Some(refusal) = status.and_then(Refusal::of).or(alert) else {
            return self.standing.death().is_some();
        };
        let current = self.serial();
        if standing::ends_identity(refusal, call, used, &current) {
            let agent_id = self.identity().spiffe_id.to_string();
            self.standing.die(Death { refusal, agent_id });
        } else if refusal == Refusal::Superseded && used == current {
            // The server holds another SVID as this agent's current one
            // (a renewal whose answer was lost): renew now. A refusal of
            // an SVID the agent has renewed since means nothing more than
            // that the call raced the renewal: it reconnects with the new
            // one (renewing again would supersede the retry too).
            self.standing.renew_now.notify_one();
        }
        self.standing.death().is_some()
    }

    /// A receiver that sees every change of the agent's identity.
    pub fn identity_changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The agent's identity.
    pub fn identity(&self) -> AgentIdentity {
        self.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A client on the current connection (connecting if needed).
    pub async fn client(&self) -> Result<NodeClient<Channel>, NodeClientError> {
        if let Some(client) = self.client.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(client);
        }
        let tls = node_tls_config(
            self.anchors.clone(),
            &self.trust_domain,
            Some(self.identity().client_identity()),
        )?;
        let (client, _) = self.servers.connect_watched(&tls, &self.standing.alerts).await?;
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// The server the agent is (or was last) connected to.
    pub fn server(&self) -> Option<String> {
        self.servers.current()
    }

    /// Drops the connection; the next `client` reconnects to the same server.
    pub fn reset(&self) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Drops the connection after the server failed a call; the next
    /// `client` tries the next server first (with one server, the same).
    pub fn fail_over(&self) {
        self.reset();
        self.servers.fail_over();
    }

    /// Replaces the agent's identity (renewed, or attested again): the
    /// connection and the Sync stream reopen with it.
    pub fn set_identity(&self, identity: AgentIdentity) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = identity;
        self.reset();
        self.generation.send_modify(|g| *g += 1);
        self.resync.notify_one();
    }

    /// Records a bundle pushed by the server: trust anchors and `bundle.pem`.
    pub fn set_bundle(&self, certs: &[CertificateDer<'static>]) {
        self.anchors.update(certs.to_vec());
        if let Err(e) =
            write_private(&self.data_dir.join("bundle.pem"), certs_pem(certs).as_bytes())
        {
            warn!(error = %e, "cannot store trust bundle");
        }
    }
}
