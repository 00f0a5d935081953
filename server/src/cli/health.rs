//! `healthcheck`.

use tessera_proto::admin as pb;

use super::args::{connect, SocketArg};
use crate::cli_support::CliError;

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
        "Server is healthy (trust domain {}, {}, {}, revision {}, {} in the bundle).",
        health.trust_domain,
        super::args::count(health.entries, "entry", "entries"),
        super::args::count(health.agents, "agent", "agents"),
        health.revision,
        super::args::count(health.bundle_cas, "CA", "CAs"),
    );
    crate::outln!("Datastore: {}.", health.datastore);
    Ok(())
}
