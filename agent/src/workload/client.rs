//! A minimal Workload API client over the agent's Unix socket, for the CLI
//! (`api fetch`, `api watch`, `healthcheck`) and the quickstart.

use tessera_proto::workload as pb;
use tessera_workload_api::split_der_chain;
pub use tessera_workload_api::{connect_workload_api, with_header};

/// One X509-SVID as received from the Workload API.
pub struct FetchedSvid {
    /// SPIFFE ID from the leaf's URI SAN.
    pub spiffe_id: String,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER key.
    pub key: Vec<u8>,
    /// Bundle CA certificates, DER.
    pub bundle: Vec<Vec<u8>>,
    /// Leaf serial, hex.
    pub serial: String,
    /// Leaf NotAfter, Unix seconds.
    pub expires_at: i64,
    /// Hint.
    pub hint: String,
}

impl std::fmt::Debug for FetchedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// Decodes one response into SVIDs.
pub fn decode_response(response: pb::X509svidResponse) -> Result<Vec<FetchedSvid>, String> {
    response
        .svids
        .into_iter()
        .map(|svid| {
            let chain: Vec<Vec<u8>> = split_der_chain(&svid.x509_svid)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            let parsed =
                tessera_workload_api::X509Svid::from_der(&svid.x509_svid, &svid.x509_svid_key)
                    .map_err(|e| format!("invalid X509-SVID for {}: {e}", svid.spiffe_id))?;
            let bundle = split_der_chain(&svid.bundle)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            Ok(FetchedSvid {
                spiffe_id: parsed.spiffe_id().to_string(),
                serial: parsed.serial_hex(),
                expires_at: parsed.not_after_unix(),
                chain,
                key: svid.x509_svid_key,
                bundle,
                hint: svid.hint,
            })
        })
        .collect()
}

/// Fetches the caller's current X509-SVIDs (the first message of the stream).
pub async fn fetch_x509(address: &str) -> Result<Vec<FetchedSvid>, String> {
    fetch_x509_with_federated(address).await.map(|(svids, _)| svids)
}

/// Federated bundles by trust domain (`spiffe://td`), each DER certificates.
pub type FederatedBundles = Vec<(String, Vec<Vec<u8>>)>;

/// Fetches the caller's current X509-SVIDs and the federated bundles sent
/// with them, sorted by trust domain.
pub async fn fetch_x509_with_federated(
    address: &str,
) -> Result<(Vec<FetchedSvid>, FederatedBundles), String> {
    let mut client = connect_workload_api(address).await?;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let response = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
        .ok_or_else(|| "the agent closed the stream without an answer".to_string())?;
    let mut federated = response
        .federated_bundles
        .iter()
        .map(|(td, der)| {
            let certs = split_der_chain(der)
                .map_err(|e| format!("federated bundle {td}: {e}"))?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            Ok((td.clone(), certs))
        })
        .collect::<Result<FederatedBundles, String>>()?;
    federated.sort();
    Ok((decode_response(response)?, federated))
}
