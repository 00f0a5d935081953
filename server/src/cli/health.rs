//! `healthcheck`.

use tessera_proto::admin as pb;

use super::{connect, CliError, SocketArg};

pub(super) async fn healthcheck(socket: SocketArg) -> Result<(), CliError> {
    let mut client =
        connect(&socket).await.map_err(|e| CliError(format!("server is unhealthy: {e}")))?;
    let health = client
        .health(pb::HealthRequest {})
        .await
        .map_err(|e| CliError(format!("server is unhealthy: {}", e.message())))?
        .into_inner();
    if !health.datastore_error.is_empty() {
        return Err(CliError(format!(
            "server is up but its datastore {} fails: {}",
            health.datastore, health.datastore_error
        )));
    }
    crate::outln!(
            "Server is healthy (trust domain {}, {} entries, {} agents, revision {}, {} CAs in the bundle).",
            health.trust_domain, health.entries, health.agents, health.revision, health.bundle_cas
        );
    crate::outln!("Datastore: {}.", health.datastore);
    Ok(())
}
