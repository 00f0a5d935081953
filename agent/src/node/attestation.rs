//! Node attestation: the agent's key and CSR, a join token for an agent
//! SVID from whichever server takes it, the SVID, key and bundle stored;
//! and [`AgentError`], why the agent could not start or went on.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use tessera_proto::node as pb;
use tessera_workload_api::{TrustAnchors, TrustDomain};
use tracing::{info, warn};

use crate::identity::{certs_pem, new_key_and_csr, write_private, AgentIdentity, IdentityError};
use crate::node::client::{node_tls_config, NodeClientError, Servers};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No bundle stored and none given.
    #[error("no trust bundle: pass --trust-bundle (the server's `bundle show` output)")]
    NoBundle,
    /// The bundle names no trust domain and none was given.
    #[error("cannot tell the trust domain from the bundle; pass --trust-domain")]
    NoTrustDomain,
    /// No valid stored SVID, and the join token could not be read.
    #[error("no valid agent SVID in {0} to reuse, and {1}")]
    JoinToken(PathBuf, String),
    /// No valid stored SVID and no join token.
    #[error("no valid agent SVID in {0} and no --join-token to attest with")]
    NoJoinToken(PathBuf),
    /// The server refused attestation.
    #[error("attestation refused: {0}")]
    Attestation(String),
    /// Reading or writing the agent's files failed.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The node API could not be reached.
    #[error("{0}")]
    Node(#[from] NodeClientError),
    /// A socket or directory problem.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The Workload API server failed.
    #[error("Workload API: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The Workload API socket is served by a live process.
    #[error("socket {0} is in use by another process (another agent?)")]
    SocketInUse(PathBuf),
    /// The metrics address is taken.
    #[error("metrics address {0} is in use by another process (another agent?)")]
    MetricsInUse(std::net::SocketAddr),
    /// The server refused the agent's identity for good (banned, revoked,
    /// evicted) and it could not attest again: the cause and the fix.
    #[error("{0}")]
    IdentityDead(String),
}

/// Attests with `token`, round the servers; stores the SVID, key and bundle.
pub(crate) async fn attest(
    data_dir: &Path,
    server_addresses: &[String],
    token: &str,
    trust_domain: &TrustDomain,
    anchors: &TrustAnchors,
) -> Result<AgentIdentity, AgentError> {
    let token = token.to_string();
    let (key, csr) = new_key_and_csr()?;
    let tls = node_tls_config(anchors.clone(), trust_domain, None)?;
    // Any server will do; a join token works once on whichever takes it.
    // A server that fails (not one that refuses) passes to the next.
    let servers = Servers::new(server_addresses.to_vec(), &token);
    let mut tries = server_addresses.len().max(1);
    let response = loop {
        let (mut client, server) = servers.connect(&tls).await?;
        let request = pb::AttestRequest { join_token: token.clone(), csr: csr.clone() };
        match client.attest(request).await {
            Ok(response) => break response.into_inner(),
            Err(status) => {
                let failed = format!("{server}: {}", status.message());
                tries -= 1;
                let broken = matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown
                );
                if !broken || tries == 0 {
                    return Err(AgentError::Attestation(failed));
                }
                warn!(error = %failed, "attestation failed on this server; trying the next");
                servers.fail_over();
            }
        }
    };
    let identity = AgentIdentity::new(response.x509_svid, key)?;
    identity.save(data_dir)?;
    let bundle: Vec<CertificateDer<'static>> =
        response.bundle.into_iter().map(Into::into).collect();
    write_private(&data_dir.join("bundle.pem"), certs_pem(&bundle).as_bytes())?;
    anchors.update(bundle);
    info!(agent_id = %identity.spiffe_id, "attested with join token");
    Ok(identity)
}
