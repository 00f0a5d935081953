//! `request list|show|approve|deny`: token requests the broker's policy
//! held for an operator. A decision binds the exact request: it carries
//! the content hash the operator saw (read from the request when `--hash`
//! is not given), and the server refuses it if the request differs.

use clap::Subcommand;
use serde_json::json;
use tessera_proto::admin as pb;
use tessera_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

use super::args::{connect, json_time, print_json, SocketArg};
use crate::broker::records::{PendingRequest, RequestState};
use crate::cli_support::{format_time, CliError};

#[derive(Debug, Subcommand)]
pub(super) enum RequestCommand {
    /// List held requests: who, which tool, what, the score, where each stands.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show one request: everything, with the policies and its content hash.
    Show {
        /// The request ID.
        #[arg(long)]
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Approve a request: the workload's next poll with the same content
    /// gets its token.
    Approve {
        /// The request ID.
        #[arg(long)]
        id: String,
        /// The content hash approved [default: the one the request has
        /// now, read first and printed].
        #[arg(long)]
        hash: Option<String>,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        /// Print the decided request as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Deny a request.
    Deny {
        /// The request ID.
        #[arg(long)]
        id: String,
        /// Why (required: the workload and the event log are told).
        #[arg(long)]
        reason: String,
        /// The content hash denied [default: the one the request has now].
        #[arg(long)]
        hash: Option<String>,
        /// Print the decided request as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// The request a reply carries.
fn parse_request(json: &str) -> Result<PendingRequest, CliError> {
    serde_json::from_str(json)
        .map_err(|e| CliError(format!("the server sent a request this CLI cannot read: {e}")))
}

fn state(r: &PendingRequest) -> &'static str {
    match r.state {
        RequestState::Pending => "pending",
        RequestState::Approved => "approved",
        RequestState::Denied => "denied",
        RequestState::Issued => "issued",
    }
}

fn request_json(r: &PendingRequest) -> serde_json::Value {
    let content: serde_json::Value =
        serde_json::from_str(&r.content).unwrap_or_else(|_| json!(r.content));
    json!({
        "id": r.id,
        "state": state(r),
        "spiffe_id": r.spiffe_id,
        "agent_id": r.agent_id,
        "task": r.task,
        "tool": r.tool,
        "actions": r.actions,
        "targets": r.targets,
        "blast_radius": r.blast_radius,
        "policies": r.policies,
        "why": r.why,
        "content_hash": r.content_hash,
        "content": content,
        "excluded_uids": r.excluded_uids,
        "created_at": json_time(r.created_at),
        "created_at_unix": r.created_at,
        "expires_at": json_time(r.expires_at),
        "expires_at_unix": r.expires_at,
        "decided_by": r.decided_by,
        "reason": r.reason,
    })
}

/// What the request asks: `transfer, read on TOOL (targets: a, b)`.
fn what(r: &PendingRequest) -> String {
    let mut line = format!("{} on {}", r.actions.join(", "), r.tool);
    if !r.targets.is_empty() {
        line.push_str(&format!(" (targets: {})", r.targets.join(", ")));
    }
    line
}

fn print_request(r: &PendingRequest) {
    crate::outln!("Request       : {}", r.id);
    crate::outln!("State         : {}", state(r));
    crate::outln!("Workload      : {}", r.spiffe_id);
    if !r.agent_id.is_empty() {
        crate::outln!("Agent         : {}", r.agent_id);
    }
    crate::outln!("Task          : {}", r.task);
    crate::outln!("Tool          : {}", r.tool);
    crate::outln!("Actions       : {}", r.actions.join(", "));
    for target in &r.targets {
        crate::outln!("Target        : {target}");
    }
    crate::outln!("Blast radius  : {}", r.blast_radius);
    crate::outln!("Policies      : {}", r.policies.join(", "));
    crate::outln!("Why held      : {}", r.why);
    crate::outln!("Content hash  : {}", r.content_hash);
    crate::outln!("Content       : {}", r.content);
    if !r.excluded_uids.is_empty() {
        let uids: Vec<String> = r.excluded_uids.iter().map(u32::to_string).collect();
        crate::outln!("Not by uid    : {}", uids.join(", "));
    }
    crate::outln!("Created at    : {}", format_time(r.created_at));
    crate::outln!("Expires at    : {}", format_time(r.expires_at));
    if !r.decided_by.is_empty() {
        crate::outln!("Decided by    : {}", r.decided_by);
        crate::outln!("Reason        : {}", r.reason);
    }
}

async fn get(client: &mut AdminClient<Channel>, id: &str) -> Result<PendingRequest, CliError> {
    let reply = client.get_broker_request(pb::GetBrokerRequestRequest { id: id.into() }).await?;
    parse_request(&reply.into_inner().json)
}

/// Approves or denies `id`, bound to `hash` or, without one, to the hash
/// the request has now (read first).
async fn decide(
    socket: &SocketArg,
    id: String,
    hash: Option<String>,
    approve: bool,
    reason: String,
) -> Result<PendingRequest, CliError> {
    let mut client = connect(socket).await?;
    let content_hash = match hash {
        Some(hash) => hash,
        None => get(&mut client, &id).await?.content_hash,
    };
    let request = pb::DecideBrokerRequestRequest { id, content_hash, approve, reason };
    let reply = client.decide_broker_request(request).await?.into_inner();
    parse_request(&reply.json)
}

pub(super) async fn request_command(command: RequestCommand) -> Result<(), CliError> {
    match command {
        RequestCommand::List { json, socket } => {
            let mut client = connect(&socket).await?;
            let reply =
                client.list_broker_requests(pb::ListBrokerRequestsRequest {}).await?.into_inner();
            let held = reply
                .requests
                .iter()
                .map(|r| parse_request(&r.json))
                .collect::<Result<Vec<_>, _>>()?;
            if json {
                print_json(&json!(held.iter().map(request_json).collect::<Vec<_>>()));
                return Ok(());
            }
            crate::outln!("Found {}", super::args::count(held.len() as u64, "request", "requests"));
            for r in &held {
                crate::outln!(
                    "{}  {:<8}  score {:<5}  {}  {}",
                    r.id,
                    state(r),
                    r.blast_radius,
                    r.spiffe_id,
                    what(r)
                );
            }
            Ok(())
        }
        RequestCommand::Show { id, json, socket } => {
            let held = get(&mut connect(&socket).await?, &id).await?;
            if json {
                print_json(&request_json(&held));
            } else {
                print_request(&held);
            }
            Ok(())
        }
        RequestCommand::Approve { id, hash, reason, json, socket } => {
            let decided = decide(&socket, id, hash, true, reason.unwrap_or_default()).await?;
            if json {
                print_json(&request_json(&decided));
            } else {
                crate::outln!(
                    "Approved request {} (content hash {}): {} may {} in task {}",
                    decided.id,
                    decided.content_hash,
                    decided.spiffe_id,
                    what(&decided),
                    decided.task
                );
            }
            Ok(())
        }
        RequestCommand::Deny { id, reason, hash, json, socket } => {
            let decided = decide(&socket, id, hash, false, reason).await?;
            if json {
                print_json(&request_json(&decided));
            } else {
                crate::outln!(
                    "Denied request {} (content hash {}): {} asked {}; reason: {}",
                    decided.id,
                    decided.content_hash,
                    decided.spiffe_id,
                    what(&decided),
                    decided.reason
                );
            }
            Ok(())
        }
    }
}
