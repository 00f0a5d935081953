//! A client for the admin API over its Unix socket.

use std::io::ErrorKind;
use std::path::Path;

use tessera_proto::admin::admin_client::AdminClient;
use tessera_workload_api::unix_channel;
use tonic::transport::Channel;

/// Connects to the admin API at `socket`. A socket that is missing, one a
/// directory on its path hides from the caller, and one the caller may not
/// write are told apart: only the first means the server is not running.
pub async fn connect_admin(socket: &Path) -> Result<AdminClient<Channel>, String> {
    if let Err(e) = std::fs::metadata(socket) {
        return Err(unreachable(socket, e.kind())
            .unwrap_or_else(|| format!("cannot reach admin socket {}: {e}", socket.display())));
    }
    let channel = match unix_channel(socket, "admin socket").await {
        Ok(channel) => channel,
        // The transport's error hides the cause: ask the kernel once more.
        Err(message) => {
            let kind = std::os::unix::net::UnixStream::connect(socket).err().map(|e| e.kind());
            return Err(kind
                .and_then(|kind| unreachable(socket, kind))
                .unwrap_or(message.to_string()));
        }
    };
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES))
}

/// The one-line reason an admin socket cannot be used, for the errors that
/// say something to an operator.
fn unreachable(socket: &Path, kind: ErrorKind) -> Option<String> {
    let uid = rustix::process::geteuid().as_raw();
    match kind {
        ErrorKind::NotFound => Some(format!(
            "admin socket {} does not exist (is the server running?)",
            socket.display()
        )),
        ErrorKind::PermissionDenied => Some(format!(
            "admin socket {}: permission denied for uid {uid} (the socket, or a directory on its path, is closed to this user: put admin_socket in a directory operators can reach, e.g. /run/tessera-server/admin.sock, and list the uid in admin_uids)",
            socket.display()
        )),
        ErrorKind::ConnectionRefused => Some(format!(
            "admin socket {}: nothing is listening (is the server running?)",
            socket.display()
        )),
        _ => None,
    }
}
