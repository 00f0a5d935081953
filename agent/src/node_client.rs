//! A client for the server's node API: TLS to the server, which must present
//! `spiffe://<td>/tessera/server` chained to the trust bundle, with the
//! agent's X509-SVID as client certificate once it has one.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tessera_proto::node::node_client::NodeClient;
use tessera_workload_api::{
    error_chain, SpiffeId, SpiffeServerCertVerifier, TrustAnchors, TrustDomain,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// Largest gRPC message the agent accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Why a node API connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeClientError {
    /// The TLS configuration was refused (e.g. the client key is unusable).
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// The server address is not `host:port`.
    #[error("invalid server address {0:?}: want host:port")]
    Address(String),
    /// Connecting failed.
    #[error("cannot connect to server {address}: {message}")]
    Connect {
        /// The server address.
        address: String,
        /// Why.
        message: String,
    },
}

/// The agent's credentials for mTLS.
pub struct ClientIdentity {
    /// Agent X509-SVID chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").field("chain", &self.chain.len()).finish_non_exhaustive()
    }
}

/// Builds the rustls client config for the node API.
pub fn node_tls_config(
    anchors: TrustAnchors,
    trust_domain: &TrustDomain,
    identity: Option<ClientIdentity>,
) -> Result<rustls::ClientConfig, NodeClientError> {
    let server_id = SpiffeId::from_parts(trust_domain, "/tessera/server")
        .map_err(|e| NodeClientError::Tls(rustls::Error::General(e.to_string())))?;
    let verifier =
        SpiffeServerCertVerifier::new(anchors, Arc::new(move |id: &SpiffeId| *id == server_id));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        Some(identity) => builder.with_client_auth_cert(identity.chain, identity.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects to the node API at `address` (`host:port`).
pub async fn connect_node(
    address: &str,
    tls: rustls::ClientConfig,
) -> Result<NodeClient<Channel>, NodeClientError> {
    if !address.contains(':') {
        return Err(NodeClientError::Address(address.to_string()));
    }
    let connector = TlsConnector::from(Arc::new(tls));
    let target = address.to_string();
    // The URI is required by the API but unused: the connector dials `address`
    // and the server is authenticated by SPIFFE ID, not by host name.
    let endpoint = Endpoint::from_static("http://tessera-server.invalid");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let target = target.clone();
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("tessera-server").map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| NodeClientError::Connect {
            address: address.to_string(),
            message: error_chain(&e),
        })?;
    Ok(NodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
