//! `events [verify]`: the event stream and its hash chain.

use clap::{Args, Subcommand};
use serde_json::json;
use tessera_proto::admin as pb;

use super::args::{connect, SocketArg};
use crate::cli_support::CliError;

#[derive(Debug, Subcommand)]
pub(super) enum EventsCommand {
    /// Recompute the hash chain; says where it breaks (exit 1 if it does).
    Verify {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Args)]
pub(super) struct EventsArgs {
    /// Keep printing new events as they are stored.
    #[arg(long)]
    follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Only events at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Only events naming this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Only events of this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only allow or deny decisions.
    #[arg(long, value_parser = ["allow", "deny"])]
    decision: Option<String>,
    /// Only this kind (or kind prefix, e.g. `workload` or `anomaly`).
    #[arg(long)]
    kind: Option<String>,
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many stored events.
    #[arg(long)]
    limit: Option<u64>,
    #[command(flatten)]
    socket: SocketArg,
}

pub(super) async fn events_command(args: EventsArgs) -> Result<(), CliError> {
    let since_ms = match &args.since {
        Some(at) => time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|e| {
                CliError(format!(
                    "invalid --since {at:?}: {e} (want RFC 3339, e.g. 2030-01-01T00:00:00Z)"
                ))
            })?,
        None => 0,
    };
    let mut client = connect(&args.socket).await?;
    let mut stream = client
        .list_events(pb::ListEventsRequest {
            after_seq: args.after,
            since_ms,
            spiffe_id: args.spiffe_id.unwrap_or_default(),
            agent_id: args.agent.unwrap_or_default(),
            decision: args.decision.unwrap_or_default(),
            kind: args.kind.unwrap_or_default(),
            follow: args.follow,
            limit: args.limit.unwrap_or(0),
        })
        .await?
        .into_inner();
    use std::io::Write;
    while let Some(event) = stream.message().await? {
        let line = if args.json {
            crate::event_schema::to_json(&event).to_string()
        } else {
            crate::event_schema::to_text(&event)
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(()); // stdout closed (e.g. piped into head)
        }
    }
    Ok(())
}

pub(super) async fn verify_command(json: bool, socket: SocketArg) -> Result<(), CliError> {
    let mut client = connect(&socket).await?;
    let report = client.verify_events(pb::VerifyEventsRequest {}).await?.into_inner();
    if json {
        let value = json!({
            "ok": report.ok, "checked": report.checked, "first_seq": report.first_seq,
            "last_seq": report.last_seq, "head_hash": hex::encode(&report.head_hash),
            "broken_at": report.broken_at, "problem": report.problem,
        });
        crate::outln!("{value}");
    } else if report.ok {
        crate::outln!(
            "Event chain is intact: {} events (#{}..#{}), head hash {}",
            report.checked,
            report.first_seq,
            report.last_seq,
            hex::encode(&report.head_hash)
        );
    }
    if report.ok {
        Ok(())
    } else {
        Err(CliError(format!(
            "event chain broken at event {}: {}",
            report.broken_at, report.problem
        )))
    }
}
