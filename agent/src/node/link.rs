//! The agent's link to the server's node API: one connection at a time,
//! made with the agent's current SVID and shared by every node client (the
//! Sync stream, the signers, the renewal, the event pusher); and the one
//! rule all of them follow after a failed call ([`NodeLink::after_failure`]):
//!
//! - a refusal that ends the identity (see `standing`) marks it dead: the
//!   recovery task takes over;
//! - a call that presented an SVID the agent has replaced since is made
//!   again at once: the link only hands out connections made with the
//!   current SVID;
//! - a call refused because the server already holds another SVID as the
//!   agent's current one (`superseded`, `agent-svid-changed`) waits for the
//!   renewal under way to answer (or asks for one, when none is: its answer
//!   was lost), then is made again at once with the new SVID;
//! - anything else is the caller's to back off from.
//!
//! While a renewal is under way the link hands out no connection (for a
//! few seconds at most): a call made with the SVID being replaced would
//! only be refused.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_proto::node::node_client::NodeClient;
use tessera_proto::Refusal;
use tessera_workload_api::{TrustAnchors, TrustDomain};
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::identity::{certs_pem, write_private, AgentIdentity};
use crate::node::client::{node_tls_config, NodeClientError, Servers};
use crate::node::standing::{self, Call, Death, Standing};

/// How long a call waits for a renewal under way to answer.
pub const RENEWAL_WAIT: Duration = Duration::from_secs(5);

/// How many times in a row [`NodeLink::call`] calls again at once.
const AGAIN_AT_ONCE: usize = 3;

/// A connection to the node API and the agent SVID it presents.
#[derive(Debug, Clone)]
pub struct NodeConn {
    /// The client.
    pub client: NodeClient<Channel>,
    /// Serial of the agent SVID the connection presents.
    pub serial: String,
}

/// A node API call that failed.
#[derive(Debug)]
pub struct CallFailure {
    /// Serial of the agent SVID the call presented (or would have).
    pub used: String,
    /// The server's answer, when it gave one.
    pub status: Option<tonic::Status>,
    /// Why, for the log.
    pub message: String,
}

impl CallFailure {
    /// The server answered `status` to a call that presented `used`.
    pub fn status(used: String, status: tonic::Status) -> Self {
        let message = format!("{:?}: {}", status.code(), status.message());
        Self { used, status: Some(status), message }
    }

    /// No call was made (no connection, or a local failure).
    pub fn local(used: String, why: impl std::fmt::Display) -> Self {
        Self { used, status: None, message: why.to_string() }
    }
}

/// What a node client does after a failed call: the verdict of
/// [`NodeLink::after_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Call again at once: the link now hands out a connection with the
    /// agent's current SVID.
    Now,
    /// Back off before calling again.
    BackOff,
    /// The identity is dead: the recovery task says why and attests again.
    Dead,
}

/// The agent's identity and its SVID's serial.
#[derive(Debug)]
struct Current {
    identity: AgentIdentity,
    serial: String,
}

impl Current {
    fn new(identity: AgentIdentity) -> Self {
        let serial = identity
            .chain
            .first()
            .and_then(|leaf| tessera_workload_api::certificate_serial_hex(leaf).ok())
            .unwrap_or_default();
        Self { identity, serial }
    }
}

/// The connection to the server's node API, with the agent's current SVID.
#[derive(Debug)]
pub struct NodeLink {
    servers: Servers,
    pub(crate) trust_domain: TrustDomain,
    /// Trust anchors for the server's certificate (updated from pushed bundles).
    pub anchors: TrustAnchors,
    current: RwLock<Current>,
    conn: Mutex<Option<NodeConn>>,
    data_dir: PathBuf,
    /// Counts identity changes (renewal, attesting again).
    generation: watch::Sender<u64>,
    /// Whether a renewal of the agent's SVID is under way.
    renewing: watch::Sender<bool>,
    /// Whether the identity is dead, and since when no server answered.
    pub standing: Standing,
    /// The time, for every decision of the agent's loops.
    pub clock: Arc<dyn Clock>,
}

/// A renewal under way ([`NodeLink::renewing`]); over when dropped.
#[derive(Debug)]
pub struct RenewalUnderWay<'a>(&'a NodeLink);

impl Drop for RenewalUnderWay<'_> {
    fn drop(&mut self) {
        self.0.renewing.send_replace(false);
    }
}

impl NodeLink {
    /// A link to the servers at `addresses` authenticated as `identity`.
    pub fn new(
        addresses: Vec<String>,
        trust_domain: TrustDomain,
        anchors: TrustAnchors,
        identity: AgentIdentity,
        data_dir: PathBuf,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            servers: Servers::new(addresses, identity.spiffe_id.as_str()),
            trust_domain,
            anchors,
            current: RwLock::new(Current::new(identity)),
            conn: Mutex::new(None),
            data_dir,
            generation: watch::Sender::new(0),
            renewing: watch::Sender::new(false),
            standing: Standing::default(),
            clock,
        }
    }

    /// The serial of the agent's current SVID.
    pub fn serial(&self) -> String {
        self.current.read().unwrap_or_else(|e| e.into_inner()).serial.clone()
    }

    /// A connection made with the agent's current SVID: the shared one, or
    /// a new one. Waits (at most [`RENEWAL_WAIT`]) for a renewal under way.
    /// A connection whose SVID was replaced while it was being made is not
    /// kept: another is made with the new SVID.
    pub async fn connect(&self) -> Result<NodeConn, NodeClientError> {
        let mut renewing = self.renewing.subscribe();
        let _ = tokio::time::timeout(RENEWAL_WAIT, renewing.wait_for(|under_way| !under_way)).await;
        loop {
            let serial = self.serial();
            let shared = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(conn) = shared.filter(|conn| conn.serial == serial) {
                return Ok(conn);
            }
            let (identity, serial) = {
                let current = self.current.read().unwrap_or_else(|e| e.into_inner());
                (current.identity.client_identity(), current.serial.clone())
            };
            let tls = node_tls_config(self.anchors.clone(), &self.trust_domain, Some(identity))?;
            let (client, _) = self.servers.connect_watched(&tls, &self.standing.alerts).await?;
            let conn = NodeConn { client, serial };
            // Checked under the lock `set_identity` resets the connection
            // under, after it replaced the identity: a connection made with
            // an SVID replaced meanwhile is never shared.
            let mut shared = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            if self.serial() == conn.serial {
                *shared = Some(conn.clone());
                return Ok(conn);
            }
            debug!("agent SVID replaced while connecting; connecting again with the new one");
        }
    }

    /// Calls the node API with `f` on a connection made with the current
    /// SVID, following the rule (see the module doc): a call that presented
    /// an SVID being replaced is made again at once with the new one. The
    /// answer, and the serial of the SVID presented; or the last failure and
    /// what to do about it ([`Next::BackOff`] or [`Next::Dead`]).
    pub async fn call<T, F, Fut>(
        &self,
        call: Call,
        mut f: F,
    ) -> Result<(T, String), (CallFailure, Next)>
    where
        F: FnMut(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut again = 0;
        loop {
            let failure = match self.connect().await {
                Ok(conn) => match f(conn.client).await {
                    Ok(response) => return Ok((response.into_inner(), conn.serial)),
                    Err(status) => CallFailure::status(conn.serial, status),
                },
                Err(e) => CallFailure::local(self.serial(), e),
            };
            match self.after_failure(call, &failure).await {
                Next::Now if again < AGAIN_AT_ONCE => {
                    again += 1;
                    debug!(?call, error = %failure.message, "call made with the agent SVID being replaced; again at once with the new one");
                }
                Next::Now => return Err((failure, Next::BackOff)),
                next => return Err((failure, next)),
            }
        }
    }

    /// The rule every node client follows after a failed `call` (see the
    /// module doc): the typed refusal comes from the server's status, else
    /// from a TLS alert seen since.
    pub async fn after_failure(&self, call: Call, failure: &CallFailure) -> Next {
        let alert = self.standing.alerts.take();
        let refusal = failure.status.as_ref().and_then(Refusal::of).or(alert);
        self.after_refusal(call, &failure.used, refusal).await
    }

    /// [`Self::after_failure`] for a refusal known already (a signing
    /// item's), of a call that presented the SVID with serial `used`.
    pub async fn after_refusal(&self, call: Call, used: &str, refusal: Option<Refusal>) -> Next {
        let current = self.serial();
        if let Some(refusal) = refusal {
            if standing::ends_identity(refusal, call, used, &current) {
                let agent_id = self.identity().spiffe_id.to_string();
                self.standing.die(Death { refusal, agent_id });
            }
        }
        if self.standing.death().is_some() {
            return Next::Dead;
        }
        if used != current {
            // Whatever the server said, it said it to an SVID the agent
            // has replaced since.
            self.forget(used);
            return Next::Now;
        }
        if !matches!(refusal, Some(Refusal::Superseded | Refusal::AgentSvidChanged)) {
            return Next::BackOff;
        }
        // The server holds another SVID as this agent's current one: that
        // of a renewal under way, whose answer is on its way (asking for
        // another would supersede this one again); or of one whose answer
        // was lost, so a renewal is due (`RenewAgent` decides).
        self.forget(used);
        if self.replaced_within(used, RENEWAL_WAIT).await {
            Next::Now
        } else if self.standing.death().is_some() {
            Next::Dead
        } else {
            Next::BackOff
        }
    }

    /// Waits until the SVID with serial `used` is replaced (at most
    /// `limit`), asking for a renewal when none is under way.
    async fn replaced_within(&self, used: &str, limit: Duration) -> bool {
        let mut changes = self.generation.subscribe();
        let mut renewing = self.renewing.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        let mut asked = false;
        loop {
            if self.serial() != used {
                return true;
            }
            if self.standing.death().is_some() {
                return false;
            }
            if !*renewing.borrow_and_update() && !asked {
                self.standing.renew_now.notify_one();
                asked = true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return self.serial() != used,
                changed = changes.changed() => if changed.is_err() { return false },
                changed = renewing.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// Waits `delay`, or less: until the SVID with serial `used` (which the
    /// failed call presented) is replaced, when a call can go again at once.
    pub async fn pause(&self, used: &str, delay: Duration) {
        let mut changes = self.generation.subscribe();
        if self.serial() != used {
            return;
        }
        tokio::select! {
            _ = self.clock.sleep(delay) => {}
            _ = changes.changed() => {}
        }
    }

    /// Marks a renewal of the agent's SVID under way until the result is
    /// dropped: meanwhile [`Self::connect`] waits, and a refusal of the SVID
    /// being replaced waits for the renewal's answer.
    pub fn renewing(&self) -> RenewalUnderWay<'_> {
        self.renewing.send_replace(true);
        RenewalUnderWay(self)
    }

    /// Drops the shared connection if it presents the SVID with serial `used`.
    fn forget(&self, used: &str) {
        let mut shared = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if shared.as_ref().is_some_and(|conn| conn.serial == used) {
            *shared = None;
        }
    }

    /// A receiver that sees every change of the agent's identity.
    pub fn identity_changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The agent's identity.
    pub fn identity(&self) -> AgentIdentity {
        self.current.read().unwrap_or_else(|e| e.into_inner()).identity.clone()
    }

    /// The server the agent is (or was last) connected to.
    pub fn server(&self) -> Option<String> {
        self.servers.current()
    }

    /// Drops the connection; the next `connect` reconnects to the same server.
    pub fn reset(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Drops the connection after the server failed a call; the next
    /// `connect` tries the next server first (with one server, the same).
    pub fn fail_over(&self) {
        self.reset();
        self.servers.fail_over();
    }

    /// Replaces the agent's identity (renewed, or attested again): the
    /// next connection is made with it, and every receiver of
    /// [`Self::identity_changes`] (the Sync stream) hears of it.
    pub fn set_identity(&self, identity: AgentIdentity) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current::new(identity);
        self.reset();
        self.generation.send_modify(|g| *g += 1);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::test_identity as identity;

    fn link() -> Arc<NodeLink> {
        Arc::new(NodeLink::new(
            vec!["127.0.0.1:1".into()],
            TrustDomain::new("example.org").unwrap(),
            TrustAnchors::new(Vec::new()),
            identity(1),
            std::env::temp_dir(),
            Arc::new(crate::clock::SystemClock),
        ))
    }

    /// Whether the link asked the renewal loop for a renewal.
    async fn asked_for_renewal(link: &NodeLink) -> bool {
        tokio::time::timeout(Duration::from_millis(50), link.standing.renew_now.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_call_that_presented_an_svid_replaced_since_is_made_again_at_once() {
        let link = link();
        let used = link.serial();
        link.set_identity(identity(2));
        assert_ne!(link.serial(), used);
        for refusal in [Some(Refusal::Superseded), Some(Refusal::AgentSvidChanged), None] {
            assert_eq!(link.after_refusal(Call::Push, &used, refusal).await, Next::Now);
        }
        assert!(!asked_for_renewal(&link).await, "a renewal happened already");
        assert!(link.standing.death().is_none());
    }

    #[tokio::test]
    async fn a_refusal_during_a_renewal_waits_for_its_answer_and_asks_for_no_other() {
        let link = link();
        let used = link.serial();
        let under_way = link.renewing();
        let renewer = link.clone();
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            renewer.set_identity(identity(2));
        });
        for call in [Call::Sync, Call::Push, Call::Sign] {
            let next = link.after_refusal(call, &used, Some(Refusal::Superseded)).await;
            assert_eq!(next, Next::Now, "{call:?}");
        }
        answer.await.unwrap();
        drop(under_way);
        assert!(!asked_for_renewal(&link).await, "one renewal, not two");
    }

    #[tokio::test]
    async fn a_refusal_with_no_renewal_under_way_asks_for_one_then_goes_again() {
        let link = link();
        let used = link.serial();
        let renewer = link.clone();
        let renewal = tokio::spawn(async move {
            renewer.standing.renew_now.notified().await;
            let _under_way = renewer.renewing();
            renewer.set_identity(identity(2));
        });
        let next = link.after_refusal(Call::Sign, &used, Some(Refusal::AgentSvidChanged)).await;
        assert_eq!(next, Next::Now);
        renewal.await.unwrap();
    }

    #[tokio::test]
    async fn other_failures_back_off_and_a_dead_identity_stops() {
        let link = link();
        let used = link.serial();
        for refusal in [None, Some(Refusal::RateLimited)] {
            assert_eq!(link.after_refusal(Call::Push, &used, refusal).await, Next::BackOff);
        }
        assert!(!asked_for_renewal(&link).await);
        // `superseded` of the SVID held, said by RenewAgent itself, ends it.
        let next = link.after_refusal(Call::Renew, &used, Some(Refusal::Superseded)).await;
        assert_eq!(next, Next::Dead);
        assert_eq!(link.standing.death().unwrap().refusal, Refusal::Superseded);
        assert_eq!(link.after_refusal(Call::Push, &used, None).await, Next::Dead);
    }

    #[tokio::test]
    async fn a_banned_push_ends_the_identity_like_any_other_call() {
        let link = link();
        let used = link.serial();
        assert_eq!(link.after_refusal(Call::Push, &used, Some(Refusal::Banned)).await, Next::Dead);
        assert_eq!(link.standing.death().unwrap().refusal, Refusal::Banned);
    }
}
