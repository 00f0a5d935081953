//! `entry create|show|update|delete|approve|reject`: registration entries.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use serde_json::json;
use tessera_proto::admin as pb;
use tessera_proto::types;
use tessera_workload_api::Selector;

use super::args::{connect, json_time, MatchMode, SocketArg};
use crate::cli_support::{format_time, CliError};

#[derive(Debug, Args)]
pub(super) struct EntryFields {
    /// SPIFFE ID the workload receives.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// SPIFFE ID of the agent that serves the entry.
    #[arg(long)]
    parent_id: Option<String>,
    /// Selector type:value, e.g. unix:uid:1000 (repeatable; all must match).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X509-SVID lifetime in seconds.
    #[arg(long)]
    x509_svid_ttl: Option<u32>,
    /// DNS SAN to include (repeatable).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// When the entry stops authorizing anything (RFC 3339).
    #[arg(long)]
    expires_at: Option<String>,
    /// Hint passed to workloads to tell identities apart.
    #[arg(long)]
    hint: Option<String>,
    /// JWT-SVID lifetime in seconds.
    #[arg(long)]
    jwt_svid_ttl: Option<u32>,
    /// An audience the entry may get JWT-SVIDs for (repeatable; replaces
    /// the list). Without any, every audience is allowed.
    #[arg(long = "jwt-audience")]
    jwt_audiences: Vec<String>,
    /// Allow JWT-SVIDs for any audience again (clears --jwt-audience).
    #[arg(long, conflicts_with = "jwt_audiences")]
    any_jwt_audience: bool,
    /// Hold the entry (and every later change to it) until an operator
    /// with another uid approves it.
    #[arg(long)]
    require_approval: bool,
    /// A label key=value for the token broker's policy (repeatable; on
    /// update, replaces the entry's labels). Changing labels revokes no SVID.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(super) enum EntryCommand {
    /// Create an entry; prints its ID.
    Create {
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show entries (all, or filtered).
    Show {
        /// Only this entry.
        #[arg(long)]
        id: Option<String>,
        /// Only entries with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only entries with this parent ID.
        #[arg(long)]
        parent_id: Option<String>,
        /// Only proposals waiting for approval (entries, entry updates and
        /// join tokens), each with its proposal ID and the content hash an
        /// approval must name; with --id, the proposal of that entry (or
        /// with that proposal ID).
        #[arg(long)]
        pending: bool,
        /// Only entries whose selectors match this one (repeatable), as
        /// --match says.
        #[arg(long = "selector", conflicts_with = "id")]
        selectors: Vec<String>,
        /// How --selector is compared: exact (same set), subset (the
        /// entry's are among those given), superset (those given are among
        /// the entry's), any (one in common).
        #[arg(long = "match", value_enum, default_value = "superset", requires = "selectors")]
        match_mode: MatchMode,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Count the stored entries (proposals waiting for approval are not
    /// entries yet).
    Count {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Update an entry; fields not given keep their value.
    Update {
        /// The entry to update.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        fields: EntryFields,
        /// Remove every label.
        #[arg(long, conflicts_with = "labels")]
        clear_labels: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Delete an entry (or drop a proposal waiting for approval).
    Delete {
        /// The entry to delete.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Approve a proposal (an entry, an entry update or a join token)
    /// waiting for approval; must come from another operator uid than the
    /// one that proposed it, and name the content hash that `entry show
    /// --pending` shows, so that only what was reviewed is approved.
    Approve {
        /// The entry ID or the proposal ID.
        #[arg(long)]
        id: String,
        /// The proposal's content hash (`entry show --pending`).
        #[arg(long)]
        hash: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Reject a proposal waiting for approval.
    Reject {
        /// The entry ID or the proposal ID.
        #[arg(long)]
        id: String,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub(super) fn parse_rfc3339(value: &str) -> Result<i64, CliError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| {
            CliError(format!(
                "invalid --expires-at {value:?}: {e} (want RFC 3339, e.g. 2030-01-01T00:00:00Z)"
            ))
        })
}

pub(super) fn apply_fields(entry: &mut types::Entry, fields: EntryFields) -> Result<(), CliError> {
    if let Some(id) = fields.spiffe_id {
        entry.spiffe_id = id;
    }
    if let Some(id) = fields.parent_id {
        entry.parent_id = id;
    }
    if !fields.selectors.is_empty() {
        entry.selectors = fields
            .selectors
            .iter()
            .map(|s| {
                Selector::parse(s)
                    .map(|s| types::Selector {
                        r#type: s.kind().to_string(),
                        value: s.value().to_string(),
                    })
                    .map_err(|e| CliError(format!("invalid selector {s:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(ttl) = fields.x509_svid_ttl {
        entry.x509_svid_ttl = Some(ttl);
    }
    if !fields.dns_names.is_empty() {
        entry.dns_names = fields.dns_names;
    }
    if let Some(at) = fields.expires_at {
        entry.expires_at = parse_rfc3339(&at)?;
    }
    if let Some(hint) = fields.hint {
        entry.hint = hint;
    }
    if let Some(ttl) = fields.jwt_svid_ttl {
        entry.jwt_svid_ttl = Some(ttl);
    }
    if !fields.jwt_audiences.is_empty() {
        entry.jwt_audiences = fields.jwt_audiences;
    }
    if fields.any_jwt_audience {
        entry.jwt_audiences.clear();
    }
    if fields.require_approval {
        entry.require_approval = true;
    }
    if !fields.labels.is_empty() {
        entry.labels = parse_labels(&fields.labels)?;
    }
    Ok(())
}

/// `--label key=value` arguments (the server checks keys and values).
fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    let mut out = BTreeMap::new();
    for label in labels {
        let Some((key, value)) = label.split_once('=') else {
            return Err(CliError(format!("invalid --label {label:?}: want key=value")));
        };
        if out.insert(key.to_string(), value.to_string()).is_some() {
            return Err(CliError(format!("--label {key:?} is given twice")));
        }
    }
    Ok(out)
}

pub(super) fn item_result(result: Option<pb::EntryResult>) -> Result<types::Entry, CliError> {
    let result = result.ok_or_else(|| CliError("server returned no result".into()))?;
    match (result.status, result.entry) {
        (Some(status), Some(entry)) if status.code == 0 => Ok(entry),
        (Some(status), _) => Err(CliError(status.message)),
        _ => Err(CliError("server returned an incomplete result".into())),
    }
}

pub(super) async fn entry_command(command: EntryCommand) -> Result<(), CliError> {
    match command {
        EntryCommand::Create { fields, socket } => {
            let mut entry = types::Entry::default();
            if fields.spiffe_id.is_none() {
                return Err(CliError("--spiffe-id is required".into()));
            }
            if fields.parent_id.is_none() {
                return Err(CliError("--parent-id is required".into()));
            }
            if fields.selectors.is_empty() {
                return Err(CliError("at least one --selector is required".into()));
            }
            apply_fields(&mut entry, fields)?;
            let mut client = connect(&socket).await?;
            let response = client
                .batch_create_entry(pb::BatchCreateEntryRequest { entries: vec![entry] })
                .await?;
            let entry = item_result(response.into_inner().results.into_iter().next())?;
            crate::outln!("{}", entry.id);
            report_pending(&entry);
            Ok(())
        }
        EntryCommand::Update { id, fields, clear_labels, socket } => {
            let mut client = connect(&socket).await?;
            let mut entry = client.get_entry(pb::GetEntryRequest { id }).await?.into_inner();
            apply_fields(&mut entry, fields)?;
            if clear_labels {
                entry.labels.clear();
            }
            let response = client
                .batch_update_entry(pb::BatchUpdateEntryRequest { entries: vec![entry] })
                .await?;
            let entry = item_result(response.into_inner().results.into_iter().next())?;
            crate::outln!("{}", entry.id);
            report_pending(&entry);
            Ok(())
        }
        EntryCommand::Approve { id, hash, socket } => {
            let mut client = connect(&socket).await?;
            let request = pb::ApproveEntryRequest { id, content_hash: hash };
            let entry = client.approve_entry(request).await?.into_inner();
            if entry.parent_id.is_empty() {
                crate::outln!("Approved join token for agent {}", entry.spiffe_id);
            } else {
                crate::outln!("Approved entry {} ({})", entry.id, entry.spiffe_id);
            }
            Ok(())
        }
        EntryCommand::Reject { id, reason, socket } => {
            let mut client = connect(&socket).await?;
            client
                .reject_entry(pb::RejectEntryRequest {
                    id: id.clone(),
                    reason: reason.unwrap_or_default(),
                })
                .await?;
            crate::outln!("Rejected proposal {id}");
            Ok(())
        }
        EntryCommand::Delete { id, socket } => {
            let mut client = connect(&socket).await?;
            let response = client
                .batch_delete_entry(pb::BatchDeleteEntryRequest { ids: vec![id.clone()] })
                .await?;
            let result = response.into_inner().results.into_iter().next();
            match result.and_then(|r| r.status) {
                Some(status) if status.code == 0 => {
                    crate::outln!("Deleted entry {id}");
                    Ok(())
                }
                Some(status) => Err(CliError(status.message)),
                None => Err(CliError("server returned no result".into())),
            }
        }
        EntryCommand::Count { socket } => {
            let mut client = connect(&socket).await?;
            let count = client.count_entries(pb::CountEntriesRequest {}).await?.into_inner().count;
            crate::outln!(
                "{}",
                super::args::count(count, "registration entry", "registration entries")
            );
            Ok(())
        }
        EntryCommand::Show {
            id,
            spiffe_id,
            parent_id,
            pending,
            selectors,
            match_mode,
            json,
            socket,
        } => {
            let selectors = selectors
                .iter()
                .map(|s| {
                    Selector::parse(s)
                        .map(|s| s.to_string())
                        .map_err(|e| CliError(format!("invalid selector {s:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut client = connect(&socket).await?;
            let entries = match id.clone() {
                Some(id) if !pending => {
                    vec![client.get_entry(pb::GetEntryRequest { id }).await?.into_inner()]
                }
                _ => {
                    let mut all = Vec::new();
                    let mut page_token = String::new();
                    loop {
                        let page = client
                            .list_entries(pb::ListEntriesRequest {
                                parent_id: parent_id.clone().unwrap_or_default(),
                                spiffe_id: spiffe_id.clone().unwrap_or_default(),
                                page_size: 0,
                                page_token,
                                selectors: selectors.clone(),
                                selector_match: match_mode.proto(),
                            })
                            .await?
                            .into_inner();
                        all.extend(page.entries);
                        all.extend(page.pending);
                        if page.next_page_token.is_empty() {
                            break all;
                        }
                        page_token = page.next_page_token;
                    }
                }
            };
            let entries: Vec<types::Entry> = if pending {
                entries
                    .into_iter()
                    .filter(|e| {
                        e.pending.as_ref().is_some_and(|p| {
                            id.as_ref().is_none_or(|id| *id == e.id || *id == p.proposal_id)
                        })
                    })
                    .collect()
            } else {
                entries
            };
            if json {
                let list: Vec<_> = entries.iter().map(entry_json).collect();
                crate::outln!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                print_entries(&entries);
            }
            Ok(())
        }
    }
}

pub(super) fn entry_json(e: &types::Entry) -> serde_json::Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "dns_names": e.dns_names,
        "expires_at": json_time(e.expires_at),
        "expires_at_unix": e.expires_at,
        "revision": e.revision,
        "created_at": json_time(e.created_at),
        "created_at_unix": e.created_at,
        "hint": e.hint,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "jwt_audiences": e.jwt_audiences,
        "require_approval": e.require_approval,
        "labels": e.labels,
        "pending": e.pending.as_ref().map(|p| json!({
            "op": p.op,
            "proposal_id": p.proposal_id,
            "content_hash": p.content_hash,
            "requested_by_uid": p.requested_by_uid,
            "reasons": p.reasons,
            "requested_at": json_time(p.requested_at),
            "expires_at": json_time(p.expires_at),
            "expires_at_unix": p.expires_at,
        })),
    })
}

/// Tells the operator that an entry was held for approval, and why.
pub(super) fn report_pending(entry: &types::Entry) {
    if let Some(p) = &entry.pending {
        eprintln!(
            "Entry {} is pending approval by another operator ({}); it is not signed or pushed until `entry approve --id {} --hash {}`",
            entry.id,
            p.reasons.join("; "),
            entry.id,
            p.content_hash
        );
    }
}

pub(super) fn print_entries(entries: &[types::Entry]) {
    crate::outln!("Found {}", super::args::count(entries.len() as u64, "entry", "entries"));
    for e in entries {
        crate::outln!();
        crate::outln!("Entry ID         : {}", e.id);
        if let Some(p) = &e.pending {
            crate::outln!("Status           : pending approval ({})", p.op);
            crate::outln!("Proposal ID      : {}", p.proposal_id);
            crate::outln!("Content hash     : {}", p.content_hash);
            crate::outln!("Requested by uid : {}", p.requested_by_uid);
            for why in &p.reasons {
                crate::outln!("Needs approval   : {why}");
            }
            crate::outln!("Pending until    : {}", format_time(p.expires_at));
        } else if e.require_approval {
            crate::outln!("Status           : approved (changes need approval)");
        }
        crate::outln!("SPIFFE ID        : {}", e.spiffe_id);
        crate::outln!("Parent ID        : {}", e.parent_id);
        crate::outln!("Revision         : {}", e.revision);
        crate::outln!("X509-SVID TTL    : {}", e.x509_svid_ttl.unwrap_or(0));
        match e.jwt_svid_ttl {
            Some(ttl) => crate::outln!("JWT-SVID TTL     : {ttl}"),
            None => crate::outln!("JWT-SVID TTL     : server default"),
        }
        if e.jwt_audiences.is_empty() {
            crate::outln!("JWT audiences    : any");
        }
        for audience in &e.jwt_audiences {
            crate::outln!("JWT audience     : {audience}");
        }
        if e.expires_at != 0 {
            crate::outln!("Expires at       : {}", format_time(e.expires_at));
        }
        for s in &e.selectors {
            crate::outln!("Selector         : {}:{}", s.r#type, s.value);
        }
        for d in &e.dns_names {
            crate::outln!("DNS name         : {d}");
        }
        if !e.hint.is_empty() {
            crate::outln!("Hint             : {}", e.hint);
        }
        for (key, value) in &e.labels {
            crate::outln!("Label            : {key}={value}");
        }
    }
}
