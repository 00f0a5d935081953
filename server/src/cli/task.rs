//! `task start|end|list|show`: the token broker's tasks. Every access
//! token is issued under a task and never outlives it: ending one makes
//! every token issued under it (and under its sub-tasks) inactive at once.

use std::collections::HashMap;

use clap::Subcommand;
use serde_json::json;
use tessera_proto::admin as pb;

use super::args::{connect, json_time, parse_duration, print_json, SocketArg};
use crate::broker::records::Task;
use crate::cli_support::{format_time, CliError};

#[derive(Debug, Subcommand)]
pub(super) enum TaskCommand {
    /// Start a task for a workload; prints its ID.
    Start {
        /// The workload's SPIFFE ID (of the server's trust domain).
        #[arg(long)]
        spiffe_id: String,
        /// How long it lasts: seconds, or 30m, 2h, 1d [default: 1h; at most 1d].
        #[arg(long)]
        ttl: Option<String>,
        /// A label policy sees, key=value (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// End a task: every token issued under it, and under its sub-tasks,
    /// is inactive at once.
    End {
        /// The task ID.
        #[arg(long, required_unless_present = "task")]
        id: Option<String>,
        /// The task ID (instead of --id).
        #[arg(value_name = "ID", conflicts_with = "id")]
        task: Option<String>,
        /// Why (recorded in the task and its event).
        #[arg(long)]
        reason: Option<String>,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Revoke one access token the broker issued (by its jti):
    /// introspection answers `active: false` for it at once.
    RevokeToken {
        /// The token's `jti`.
        #[arg(long)]
        jti: String,
        /// Why (recorded in its event).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List the tasks on record (ended ones for a day after).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show one task.
    Show {
        /// The task ID.
        #[arg(long)]
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// The task a reply carries.
fn parse_task(json: &str) -> Result<Task, CliError> {
    serde_json::from_str(json)
        .map_err(|e| CliError(format!("the server sent a task this CLI cannot read: {e}")))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `live`, `ended` or `expired`.
fn state(task: &Task, now: i64) -> &'static str {
    if task.ended_at != 0 {
        "ended"
    } else if task.is_live(now) {
        "live"
    } else {
        "expired"
    }
}

fn task_json(task: &Task, now: i64) -> serde_json::Value {
    json!({
        "id": task.id,
        "spiffe_id": task.spiffe_id,
        "state": state(task, now),
        "labels": task.labels,
        "parent": task.parent,
        "started_by": task.started_by,
        "created_at": json_time(task.created_at),
        "created_at_unix": task.created_at,
        "expires_at": json_time(task.expires_at),
        "expires_at_unix": task.expires_at,
        "ended_at": json_time(task.ended_at),
        "ended_at_unix": task.ended_at,
        "ended_by": task.ended_by,
        "tokens_issued": task.tokens_issued,
        "done": task.done,
    })
}

fn print_task(task: &Task, now: i64) {
    crate::outln!("Task          : {}", task.id);
    crate::outln!("SPIFFE ID     : {}", task.spiffe_id);
    crate::outln!("State         : {}", state(task, now));
    for (key, value) in &task.labels {
        crate::outln!("Label         : {key}={value}");
    }
    if !task.parent.is_empty() {
        crate::outln!("Parent task   : {}", task.parent);
    }
    crate::outln!("Started by    : {}", task.started_by);
    crate::outln!("Created at    : {}", format_time(task.created_at));
    crate::outln!("Expires at    : {}", format_time(task.expires_at));
    if task.ended_at != 0 {
        crate::outln!("Ended at      : {}", format_time(task.ended_at));
        crate::outln!("Ended by      : {}", task.ended_by);
    }
    crate::outln!("Tokens issued : {}", task.tokens_issued);
    for pair in &task.done {
        crate::outln!("Done          : {pair}");
    }
}

/// `key=value` labels.
fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>, CliError> {
    let mut out = HashMap::new();
    for label in labels {
        let Some((key, value)) = label.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(CliError(format!("invalid --label {label:?}: want key=value")));
        };
        if out.insert(key.to_string(), value.to_string()).is_some() {
            return Err(CliError(format!("--label {key} is given twice")));
        }
    }
    Ok(out)
}

pub(super) async fn task_command(command: TaskCommand) -> Result<(), CliError> {
    match command {
        TaskCommand::Start { spiffe_id, ttl, labels, json, socket } => {
            let ttl = ttl.map(|t| parse_duration("--ttl", &t)).transpose()?.unwrap_or(0);
            let labels = parse_labels(&labels)?;
            let mut client = connect(&socket).await?;
            let reply = client
                .start_task(pb::StartTaskRequest { spiffe_id, ttl, labels })
                .await?
                .into_inner();
            let task = parse_task(&reply.json)?;
            if json {
                print_json(&task_json(&task, now()));
            } else {
                crate::outln!("{}", task.id);
            }
            Ok(())
        }
        TaskCommand::End { id, task, reason, json, socket } => {
            let id = id.or(task).unwrap_or_default();
            let mut client = connect(&socket).await?;
            let reply = client
                .end_task(pb::EndTaskRequest { id, reason: reason.unwrap_or_default() })
                .await?
                .into_inner();
            let task = parse_task(&reply.json)?;
            if json {
                print_json(&task_json(&task, now()));
            } else {
                crate::outln!(
                    "Ended task {} of {}: the {} token(s) issued under it (and its sub-tasks') are inactive",
                    task.id,
                    task.spiffe_id,
                    task.tokens_issued
                );
            }
            Ok(())
        }
        TaskCommand::RevokeToken { jti, reason, socket } => {
            let mut client = connect(&socket).await?;
            let reply = client
                .revoke_access_token(pb::RevokeAccessTokenRequest {
                    jti,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let token: serde_json::Value = serde_json::from_str(&reply.json).map_err(|e| {
                CliError(format!("the server sent an unreadable token record: {e}"))
            })?;
            crate::outln!(
                "Revoked access token {} of {} for {} (task {})",
                token["jti"].as_str().unwrap_or_default(),
                token["sub"].as_str().unwrap_or_default(),
                token["aud"].as_str().unwrap_or_default(),
                token["task"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        TaskCommand::List { json, socket } => {
            let mut client = connect(&socket).await?;
            let reply = client.list_tasks(pb::ListTasksRequest {}).await?.into_inner();
            let tasks =
                reply.tasks.iter().map(|t| parse_task(&t.json)).collect::<Result<Vec<_>, _>>()?;
            let now = now();
            if json {
                print_json(&json!(tasks.iter().map(|t| task_json(t, now)).collect::<Vec<_>>()));
                return Ok(());
            }
            crate::outln!("Found {}", super::args::count(tasks.len() as u64, "task", "tasks"));
            for task in &tasks {
                crate::outln!();
                print_task(task, now);
            }
            Ok(())
        }
        TaskCommand::Show { id, json, socket } => {
            let mut client = connect(&socket).await?;
            let reply = client.get_task(pb::GetTaskRequest { id }).await?.into_inner();
            let task = parse_task(&reply.json)?;
            if json {
                print_json(&task_json(&task, now()));
            } else {
                print_task(&task, now());
            }
            Ok(())
        }
    }
}
