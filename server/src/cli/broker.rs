//! `broker policy check` and `broker decide`: the token broker's Cedar
//! policies, offline (they read the files; no server is needed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use tessera_workload_api::SpiffeId;

use crate::broker::policy::{
    check_dir, AccessRequest, BlastWeights, PolicyEngine, Principal, RequestContext, TaskContext,
};
use crate::cli_support::CliError;

#[derive(Debug, Subcommand)]
pub(super) enum BrokerCommand {
    /// The broker's policy directory.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// What policy would decide for a token request: the decision, the
    /// blast radius, the deciding policies and the reason (offline).
    Decide(Box<DecideArgs>),
}

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Validate a policy directory (its *.cedar files against its one
    /// *.cedarschema) and a resources file; prints a summary or the first
    /// error, with its file and line.
    Check {
        /// The policy directory.
        dir: PathBuf,
        /// The resources file (TOML, [[resource]] tables).
        #[arg(long)]
        resources: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub(super) struct DecideArgs {
    /// The policy directory.
    #[arg(long)]
    policy_dir: PathBuf,
    /// The resources file.
    #[arg(long)]
    resources: Option<PathBuf>,
    /// The server's config file, for its [broker.blast_radius] weights [default: the built-in weights].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The workload asking.
    #[arg(long)]
    spiffe_id: String,
    /// A requested action (repeat for several; every one must be allowed).
    #[arg(long = "action", required = true)]
    actions: Vec<String>,
    /// The tool (the token's audience).
    #[arg(long)]
    tool: String,
    /// A target inside the tool (repeatable).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// The amount in the request's authorization details.
    #[arg(long)]
    amount: Option<i64>,
    /// A selector of the workload's entry, type:value (repeatable).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// A label of the workload's entry, k=v (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The task's id [default: "task-cli" when another --task-* flag is given, else no task].
    #[arg(long)]
    task: Option<String>,
    /// The task's age in seconds.
    #[arg(long)]
    task_age: Option<i64>,
    /// An "action resource" pair the task has already done (repeatable).
    #[arg(long = "task-done")]
    task_done: Vec<String>,
    /// A label of the task, k=v (repeatable).
    #[arg(long = "task-label", value_parser = parse_label)]
    task_labels: Vec<(String, String)>,
    /// A recent anomaly signal of the caller (repeatable).
    #[arg(long = "anomaly")]
    anomalies: Vec<String>,
    /// A datatype in the authorization details (repeatable).
    #[arg(long = "datatype")]
    datatypes: Vec<String>,
    /// A requested scope (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The workload's agent (SPIFFE ID).
    #[arg(long)]
    agent: Option<String>,
    /// The workload acted for (actor_token's subject).
    #[arg(long)]
    actor: Option<String>,
    /// The time of the request, Unix seconds [default: now].
    #[arg(long)]
    at: Option<i64>,
    /// Print the decision as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not k=v")),
    }
}

pub(super) async fn broker_command(command: BrokerCommand) -> Result<(), CliError> {
    match command {
        BrokerCommand::Policy(PolicyCommand::Check { dir, resources, json }) => {
            let summary = check_dir(&dir, resources.as_deref()).map_err(error)?;
            if json {
                crate::outln!("{}", to_json(&summary)?);
            } else {
                crate::outln!("ok: {summary}");
            }
            Ok(())
        }
        BrokerCommand::Decide(args) => decide(*args),
    }
}

fn error(e: impl std::fmt::Display) -> CliError {
    CliError(e.to_string())
}

fn to_json(value: &impl serde::Serialize) -> Result<String, CliError> {
    serde_json::to_string_pretty(value).map_err(error)
}

/// `[broker.blast_radius]` of the server's config file (the defaults when absent).
fn weights(config: Option<&Path>) -> Result<BlastWeights, CliError> {
    let Some(path) = config else { return Ok(BlastWeights::default()) };
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
    let file: toml::Table = toml::from_str(&text)
        .map_err(|e| CliError(format!("{}: {}", path.display(), e.message())))?;
    match file.get("broker").and_then(|b| b.get("blast_radius")) {
        None => Ok(BlastWeights::default()),
        Some(table) => table.clone().try_into().map_err(|e: toml::de::Error| {
            CliError(format!("{}: [broker.blast_radius]: {}", path.display(), e.message()))
        }),
    }
}

fn decide(args: DecideArgs) -> Result<(), CliError> {
    let id = SpiffeId::parse(&args.spiffe_id)
        .map_err(|e| CliError(format!("--spiffe-id {}: {e}", args.spiffe_id)))?;
    let weights = weights(args.config.as_deref())?;
    let engine =
        PolicyEngine::load(&args.policy_dir, args.resources.as_deref(), weights).map_err(error)?;
    let has_task = args.task.is_some()
        || args.task_age.is_some()
        || !args.task_done.is_empty()
        || !args.task_labels.is_empty();
    let task = has_task.then(|| TaskContext {
        id: args.task.unwrap_or_else(|| "task-cli".into()),
        age_secs: args.task_age.unwrap_or(0),
        tokens_issued: 0,
        done: args.task_done,
        labels: args.task_labels.into_iter().collect(),
    });
    let now = args.at.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    });
    let req = AccessRequest {
        principal: Principal {
            spiffe_id: id.as_str().to_string(),
            trust_domain: id.trust_domain().to_string(),
            path: id.path().to_string(),
            agent: args.agent.unwrap_or_default(),
            selectors: args.selectors,
            labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        },
        actions: args.actions,
        tool: args.tool,
        targets: args.targets,
        context: RequestContext {
            task,
            datatypes: args.datatypes,
            detail_types: Vec::new(),
            scope: args.scopes,
            amount: args.amount,
            now,
            anomalies: args.anomalies,
            actor: args.actor,
        },
    };
    let decision = engine.decide(&req);
    if args.json {
        crate::outln!("{}", to_json(&decision)?);
        return Ok(());
    }
    crate::outln!("decision:     {}", decision.outcome);
    crate::outln!("blast radius: {}", decision.blast_radius);
    let policies =
        if decision.policies.is_empty() { "(none)".into() } else { decision.policies.join(", ") };
    crate::outln!("policies:     {policies}");
    if let Some(why) = &decision.approval {
        crate::outln!("approval:     {why}");
    }
    crate::outln!("reason:       {}", decision.reason);
    Ok(())
}
