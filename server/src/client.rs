//! A client for the admin API over its Unix socket.

use std::path::Path;

use tessera_proto::admin::admin_client::AdminClient;
use tessera_workload_api::unix_channel;
use tonic::transport::Channel;

/// Connects to the admin API at `socket`.
pub async fn connect_admin(socket: &Path) -> Result<AdminClient<Channel>, String> {
    if !socket.exists() {
        return Err(format!(
            "admin socket {} does not exist (is the server running?)",
            socket.display()
        ));
    }
    let channel = unix_channel(socket, "admin socket").await?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES))
}
