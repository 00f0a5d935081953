//! The agent's health: what a workload would get now. One rule,
//! [`decide`], answers `/ready`, the standard gRPC health service
//! (`grpc.health.v1.Health/Check`) served on the Workload API socket, and
//! so `tessera-agent healthcheck`:
//!
//! - unhealthy: the identity is dead (banned, revoked, evicted), the
//!   agent's SVID expired, not synced yet, or no server for longer than
//!   the SVIDs held last;
//! - degraded (still serving): no server for N s, the cached SVIDs served,
//!   valid for M s more;
//! - healthy.
//!
//! The state travels in the response's metadata as a typed value
//! ([`HEALTH_METADATA`]: `healthy`, `degraded`, `unhealthy`) with the
//! reason ([`REASON_METADATA`]). Depends on `svid::cache` and
//! `node::link`.

use tessera_proto::health::v1::{self as pb, health_check_response::ServingStatus, health_server};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::node::link::NodeLink;
use crate::svid::cache::Cache;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Metadata key of the agent's health state (`healthy`, `degraded`,
/// `unhealthy`) in a health check's response.
pub const HEALTH_METADATA: &str = "tessera-health";
/// Metadata key of the reason, one line of text.
pub const REASON_METADATA: &str = "tessera-health-reason";

/// What a workload would get now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Synced with a server, serving current SVIDs.
    Healthy,
    /// No server for `unreachable_for` seconds; the cached SVIDs are
    /// served, the first of them expiring in `svids_valid_for` seconds.
    Degraded {
        /// Seconds since no server answered.
        unreachable_for: i64,
        /// Seconds until the first served SVID (or the agent's own) expires.
        svids_valid_for: i64,
    },
    /// Workloads get no (good) identity; why.
    Unhealthy(String),
}

impl Health {
    /// The typed state.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded { .. } => "degraded",
            Self::Unhealthy(_) => "unhealthy",
        }
    }

    /// One line saying why.
    pub fn reason(&self) -> String {
        match self {
            Self::Healthy => "synced with the server, serving current SVIDs".into(),
            Self::Degraded { unreachable_for, svids_valid_for } => format!(
                "serving cached SVIDs, server unreachable for {unreachable_for} s; SVIDs valid for {svids_valid_for} s more"
            ),
            Self::Unhealthy(why) => why.clone(),
        }
    }
}

/// What [`decide`] looks at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Unix seconds now.
    pub now: i64,
    /// Why the identity is dead (cause and what the agent does), if it is.
    pub dead: Option<String>,
    /// The agent SVID's NotAfter.
    pub agent_not_after: i64,
    /// Whether the agent has had a complete sync.
    pub synced: bool,
    /// Since when no server answered.
    pub unreachable_since: Option<i64>,
    /// Entries the agent serves.
    pub entries: usize,
    /// NotAfter of each SVID held for them.
    pub svid_expiries: Vec<i64>,
}

/// The one rule for the agent's health.
pub fn decide(facts: &Facts) -> Health {
    let now = facts.now;
    if let Some(dead) = &facts.dead {
        return Health::Unhealthy(dead.clone());
    }
    if facts.agent_not_after <= now {
        return Health::Unhealthy(
            "the agent's own SVID has expired: it must attest again with a join token".into(),
        );
    }
    let unreachable_for = facts.unreachable_since.map(|since| (now - since).max(0));
    if !facts.synced {
        return Health::Unhealthy(match unreachable_for {
            Some(n) => format!("not synced with the server yet: no server reachable for {n} s"),
            None => "not synced with the server yet".into(),
        });
    }
    let Some(unreachable_for) = unreachable_for else { return Health::Healthy };
    if facts.entries > 0 && facts.svid_expiries.is_empty() {
        return Health::Unhealthy(format!(
            "server unreachable for {unreachable_for} s and every cached SVID has expired"
        ));
    }
    let first_expiry = facts.svid_expiries.iter().copied().min().unwrap_or(facts.agent_not_after);
    let svids_valid_for = first_expiry.min(facts.agent_not_after) - now;
    if svids_valid_for <= 0 {
        return Health::Unhealthy(format!(
            "server unreachable for {unreachable_for} s, longer than the SVIDs lasted"
        ));
    }
    Health::Degraded { unreachable_for, svids_valid_for }
}

/// Reads the agent's state for [`decide`]; serves the gRPC health service.
#[derive(Debug, Clone)]
pub struct HealthProbe {
    /// The SVID cache.
    pub cache: Cache,
    /// The link to the servers.
    pub link: Arc<NodeLink>,
}

impl HealthProbe {
    /// The agent's health now.
    pub fn assess(&self) -> Health {
        let state = self.cache.state();
        let dead = self.link.standing.death().map(|d| {
            format!(
                "{}: the agent drops it and attests again with its join token, or stops",
                d.cause()
            )
        });
        decide(&Facts {
            now: self.link.clock.now(),
            dead,
            agent_not_after: self.link.identity().not_after,
            synced: state.ready,
            unreachable_since: self.link.standing.unreachable_since(),
            entries: state.entries.len(),
            svid_expiries: state.svids.values().map(|s| s.expires_at).collect(),
        })
    }
}

#[tonic::async_trait]
impl health_server::Health for HealthProbe {
    async fn check(
        &self,
        _request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let health = self.assess();
        let status = match health {
            Health::Unhealthy(_) => ServingStatus::NotServing,
            _ => ServingStatus::Serving,
        };
        let mut response = Response::new(pb::HealthCheckResponse { status: status as i32 });
        let metadata = response.metadata_mut();
        metadata.insert(HEALTH_METADATA, MetadataValue::from_static(health.code()));
        let reason: String =
            health.reason().chars().map(|c| if c.is_ascii_graphic() { c } else { ' ' }).collect();
        if let Ok(value) = MetadataValue::try_from(reason) {
            metadata.insert(REASON_METADATA, value);
        }
        Ok(response)
    }

    type WatchStream = tokio_stream::Empty<Result<pb::HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("only Check is served"))
    }
}

/// Where an agent that stopped because its identity is dead leaves why,
/// next to its socket (`api.sock.stopped`), for `healthcheck`; removed when
/// an agent binds the socket again.
pub fn stopped_note(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".stopped");
    PathBuf::from(name)
}

/// Writes the note: never through a symbolic link someone planted in the
/// socket's directory (`O_NOFOLLOW`), mode 0644 (it names no secret).
pub fn write_stopped_note(note: &Path, why: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(note)?;
    file.write_all(format!("{why}\n").as_bytes())
}

/// Asks the agent at `address` (`unix:///path`) for its health: the
/// state code and the reason.
pub async fn check(address: &str) -> Result<(String, String), String> {
    let path = tessera_workload_api::socket_path(address)?;
    // Refuses bad addresses and missing sockets with their own messages,
    // or says why the agent stopped, if it left a note.
    if let Err(e) = tessera_workload_api::connect_workload_api(address).await {
        return match std::fs::read_to_string(stopped_note(&path)) {
            Ok(why) => Ok(("unhealthy".into(), format!("the agent stopped: {}", why.trim()))),
            Err(_) => Err(e.to_string()),
        };
    }
    let channel = tessera_workload_api::unix_channel(&path, "Workload API socket").await?;
    let response = pb::health_client::HealthClient::new(channel)
        .check(pb::HealthCheckRequest { service: String::new() })
        .await
        .map_err(|s| format!("health check failed: {}", s.message()))?;
    let text = |key| {
        response.metadata().get(key).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    };
    let (mut code, reason) = (text(HEALTH_METADATA), text(REASON_METADATA));
    if code.is_empty() {
        code = match response.get_ref().status() {
            ServingStatus::Serving => "healthy",
            _ => "unhealthy",
        }
        .into();
    }
    Ok((code, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> Facts {
        Facts {
            now: 1_000,
            agent_not_after: 4_000,
            synced: true,
            entries: 2,
            svid_expiries: vec![2_000, 3_000],
            ..Facts::default()
        }
    }

    #[test]
    fn the_stopped_note_is_never_written_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        let note = stopped_note(&dir.path().join("api.sock"));
        std::os::unix::fs::symlink(&target, &note).unwrap();
        assert!(write_stopped_note(&note, "banned").is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        std::fs::remove_file(&note).unwrap();
        write_stopped_note(&note, "banned").unwrap();
        assert_eq!(std::fs::read_to_string(&note).unwrap(), "banned\n");
    }

    #[test]
    fn health_says_what_a_workload_would_get() {
        assert_eq!(decide(&synced()), Health::Healthy);
        let dead = Facts { dead: Some("this agent is banned".into()), ..synced() };
        assert_eq!(decide(&dead), Health::Unhealthy("this agent is banned".into()));
        let away = Facts { unreachable_since: Some(970), ..synced() };
        assert_eq!(decide(&away), Health::Degraded { unreachable_for: 30, svids_valid_for: 1_000 });
        assert!(decide(&away).reason().contains("server unreachable for 30 s"));
        let lapsed = Facts { svid_expiries: vec![], ..away.clone() };
        assert!(matches!(decide(&lapsed), Health::Unhealthy(why) if why.contains("expired")));
        let no_entries = Facts { entries: 0, svid_expiries: vec![], ..away };
        assert_eq!(
            decide(&no_entries),
            Health::Degraded { unreachable_for: 30, svids_valid_for: 3_000 }
        );
        let expired = Facts { agent_not_after: 1_000, ..synced() };
        assert!(matches!(decide(&expired), Health::Unhealthy(_)));
        let starting = Facts { synced: false, ..synced() };
        assert!(matches!(decide(&starting), Health::Unhealthy(why) if why.contains("not synced")));
    }
}
