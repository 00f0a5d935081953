//! `agent list|show|count|ban|evict|purge`: attested agents.

use clap::Subcommand;
use serde_json::json;
use tessera_proto::admin as pb;
use tessera_proto::types;

use super::args::{connect, json_time, parse_duration, MatchMode, SocketArg};
use crate::cli_support::{format_time, CliError};

#[derive(Debug, Subcommand)]
pub(super) enum AgentCommand {
    /// List attested agents.
    List {
        /// Only agents whose attested selectors match this one (repeatable),
        /// as --match says; a join-token agent has
        /// `tessera:attestation:join_token`.
        #[arg(long = "selector")]
        selectors: Vec<String>,
        /// How --selector is compared: exact, subset, superset, any.
        #[arg(long = "match", value_enum, default_value = "superset", requires = "selectors")]
        match_mode: MatchMode,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Ban an agent: revoke its SVID and every SVID issued through it,
    /// close its stream, refuse its renewal and re-attestation.
    Ban {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        id: String,
        /// Why (recorded and logged).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Forget an agent: it must attest again with a new join token.
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        id: String,
        /// Also lift a ban (a banned agent stays banned otherwise).
        #[arg(long)]
        unban: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Count the attested agents (banned ones included).
    Count {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Evict the agents whose SVID expired at least --expired-for ago
    /// (SPIRE's `agent purge -expiredFor`); banned agents are kept (their
    /// record is the ban). Each is an `admin.agent.evict` event.
    Purge {
        /// How long ago the SVID must have expired, e.g. 24h, 30m, 7d.
        #[arg(long)]
        expired_for: String,
        /// List what would be purged; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show one agent.
    Show {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub(super) fn agent_json(a: &types::Agent) -> serde_json::Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "selectors": crate::queries::agent_selectors(a),
        "x509_svid_serial": a.x509_svid_serial,
        "x509_svid_expires_at": json_time(a.x509_svid_expires_at),
        "x509_svid_expires_at_unix": a.x509_svid_expires_at,
        "attested_at": json_time(a.attested_at),
        "banned": a.banned,
    })
}

pub(super) fn print_agent(a: &types::Agent) {
    crate::outln!("SPIFFE ID         : {}", a.spiffe_id);
    crate::outln!("Attestation type  : {}", a.attestation_type);
    for selector in crate::queries::agent_selectors(a) {
        crate::outln!("Selector          : {selector}");
    }
    crate::outln!("Expiration time   : {}", format_time(a.x509_svid_expires_at));
    crate::outln!("Serial number     : {}", a.x509_svid_serial);
    crate::outln!("Attested at       : {}", format_time(a.attested_at));
    crate::outln!("Banned            : {}", a.banned);
}

pub(super) async fn agent_command(command: AgentCommand) -> Result<(), CliError> {
    match command {
        AgentCommand::Count { socket } => {
            let mut client = connect(&socket).await?;
            let count = client.count_agents(pb::CountAgentsRequest {}).await?.into_inner().count;
            crate::outln!("{}", super::args::count(count, "attested agent", "attested agents"));
            Ok(())
        }
        AgentCommand::Purge { expired_for, dry_run, json, socket } => {
            let expired_for = parse_duration("--expired-for", &expired_for)?;
            let mut client = connect(&socket).await?;
            let agents = client
                .purge_agents(pb::PurgeAgentsRequest { expired_for, dry_run })
                .await?
                .into_inner()
                .agents;
            if json {
                let value = json!({
                    "dry_run": dry_run,
                    "agents": agents.iter().map(agent_json).collect::<Vec<_>>(),
                });
                crate::outln!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
                return Ok(());
            }
            let verb = if dry_run { "Would purge" } else { "Purged" };
            crate::outln!(
                "{verb} {} whose SVID expired at least {expired_for}s ago",
                super::args::count(agents.len() as u64, "agent", "agents")
            );
            for a in &agents {
                crate::outln!(
                    "{} (SVID expired {})",
                    a.spiffe_id,
                    format_time(a.x509_svid_expires_at)
                );
            }
            Ok(())
        }
        AgentCommand::List { selectors, match_mode, json, socket } => {
            if let Some(bad) =
                selectors.iter().find(|s| s.split(':').filter(|p| !p.is_empty()).count() < 2)
            {
                return Err(CliError(format!(
                    "invalid selector {bad:?}: want type:value, e.g. tessera:attestation:join_token"
                )));
            }
            let mut client = connect(&socket).await?;
            let request = pb::ListAgentsRequest { selectors, selector_match: match_mode.proto() };
            let agents = client.list_agents(request).await?.into_inner().agents;
            if json {
                let list: Vec<_> = agents.iter().map(agent_json).collect();
                crate::outln!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                crate::outln!(
                    "Found {}",
                    super::args::count(agents.len() as u64, "attested agent", "attested agents")
                );
                for a in &agents {
                    crate::outln!();
                    print_agent(a);
                }
            }
            Ok(())
        }
        AgentCommand::Ban { id, reason, socket } => {
            let mut client = connect(&socket).await?;
            let response = client
                .ban_agent(pb::BanAgentRequest {
                    spiffe_id: id.clone(),
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            crate::outln!(
                "Banned {id}; revoked {} X509-SVID(s) and {} JWT-SVID(s)",
                response.revoked_serials.len(),
                response.revoked_jtis.len()
            );
            Ok(())
        }
        AgentCommand::Evict { id, unban, socket } => {
            let mut client = connect(&socket).await?;
            client.evict_agent(pb::EvictAgentRequest { spiffe_id: id.clone(), unban }).await?;
            if unban {
                crate::outln!(
                    "Evicted {id} and lifted its ban; it must attest again with a new join token"
                );
            } else {
                crate::outln!("Evicted {id}; it must attest again with a new join token");
            }
            Ok(())
        }
        AgentCommand::Show { id, json, socket } => {
            let mut client = connect(&socket).await?;
            let agent = client.get_agent(pb::GetAgentRequest { spiffe_id: id }).await?.into_inner();
            if json {
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&agent_json(&agent)).unwrap_or_default()
                );
            } else {
                print_agent(&agent);
            }
            Ok(())
        }
    }
}
