//! A client for the admin API over its Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tessera_proto::admin::admin_client::AdminClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the admin API at `socket`.
pub async fn connect_admin(socket: &Path) -> Result<AdminClient<Channel>, String> {
    let path: PathBuf = socket.to_owned();
    if !path.exists() {
        return Err(format!(
            "admin socket {} does not exist (is the server running?)",
            path.display()
        ));
    }
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://tessera-admin.invalid");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| {
            format!("cannot connect to admin socket {}: {}", socket.display(), source_chain(&e))
        })?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}
