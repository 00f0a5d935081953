//! `agent list|show|ban|evict`: attested agents.

use clap::Subcommand;
use serde_json::json;
use tessera_proto::admin as pb;
use tessera_proto::types;

use super::{connect, format_time, json_time, CliError, SocketArg};

#[derive(Debug, Subcommand)]
pub(super) enum AgentCommand {
    /// List attested agents.
    List {
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
        "x509_svid_serial": a.x509_svid_serial,
        "x509_svid_expires_at": json_time(a.x509_svid_expires_at),
        "x509_svid_expires_at_unix": a.x509_svid_expires_at,
        "attested_at": json_time(a.attested_at),
        "banned": a.banned,
    })
}

pub(super) fn print_agent(a: &types::Agent) {
    println!("SPIFFE ID         : {}", a.spiffe_id);
    println!("Attestation type  : {}", a.attestation_type);
    println!("Expiration time   : {}", format_time(a.x509_svid_expires_at));
    println!("Serial number     : {}", a.x509_svid_serial);
    println!("Attested at       : {}", format_time(a.attested_at));
    println!("Banned            : {}", a.banned);
}

pub(super) async fn agent_command(command: AgentCommand) -> Result<(), CliError> {
    match command {
        AgentCommand::List { json, socket } => {
            let mut client = connect(&socket).await?;
            let agents = client.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents;
            if json {
                let list: Vec<_> = agents.iter().map(agent_json).collect();
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                println!(
                    "Found {} attested agent{}",
                    agents.len(),
                    if agents.len() == 1 { "" } else { "s" }
                );
                for a in &agents {
                    println!();
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
            println!(
                "Banned {id}; revoked {} X509-SVID(s) and {} JWT-SVID(s)",
                response.revoked_serials.len(),
                response.revoked_jtis.len()
            );
            Ok(())
        }
        AgentCommand::Evict { id, unban, socket } => {
            let mut client = connect(&socket).await?;
            client.evict_agent(pb::EvictAgentRequest { spiffe_id: id.clone(), unban }).await?;
            println!("Evicted {id}; it must attest again with a new join token");
            Ok(())
        }
        AgentCommand::Show { id, json, socket } => {
            let mut client = connect(&socket).await?;
            let agent = client.get_agent(pb::GetAgentRequest { spiffe_id: id }).await?.into_inner();
            if json {
                println!(
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
