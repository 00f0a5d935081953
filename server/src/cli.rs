//! The `tessera-server` command line: `run`, and operator commands that talk
//! to a running server's admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tessera_proto::admin as pb;
use tessera_proto::types;
use tessera_workload_api::Selector;
use tokio_util::sync::CancellationToken;

pub use crate::cli_support::{format_time, init_logging, wait_for_signal, CliError, LogFormat};
use crate::client::connect_admin;
use crate::clock::SystemClock;
use crate::config::{Config, FileConfig, DEFAULT_DATA_DIR};
use crate::server::Server;
use crate::store::{KvStore, Store};

/// Tessera server: the trust domain's CA and registration authority.
#[derive(Debug, Parser)]
#[command(name = "tessera-server", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Run(RunArgs),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The trust bundle and CRLs.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Issued X509-SVIDs: revocation.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Check that the server is up and serving.
    Healthcheck(SocketArg),
    /// The server's store: integrity check, backup, restore.
    #[command(subcommand)]
    Store(StoreCommand),
    /// The event stream: every decision about a workload identity (or,
    /// with `verify`, a check of its hash chain).
    #[command(args_conflicts_with_subcommands = true)]
    Events {
        #[command(subcommand)]
        command: Option<EventsCommand>,
        #[command(flatten)]
        filter: EventsArgs,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
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
struct EventsArgs {
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

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Read every record and check indexes and watermark: through the
    /// running server, or offline with --data-dir.
    Check {
        /// Check the store in this data dir directly (server stopped).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Write a consistent backup of a running server's store (file mode 0600).
    Backup {
        /// The backup file to create.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Restore a backup into a data dir that holds no store (server stopped).
    Restore {
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The server's data dir [default: ./.tessera/server].
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML config file; flags override its settings.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./.tessera/server].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long)]
    trust_domain: Option<String>,
    /// Node API address [default: 127.0.0.1:8081].
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Admin API socket [default: <data_dir>/admin.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Log filter, e.g. info or debug.
    #[arg(long)]
    log_level: Option<String>,
    /// Log lines as `text` or `json` (one object per line) [default: text].
    #[arg(long)]
    log_format: Option<String>,
    /// Serve Prometheus metrics, /live and /ready on this address (off by default).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Store in PostgreSQL, shared with other servers: postgres://USER[:PASSWORD]@HOST[:PORT]/DB
    /// [default: the embedded store in <data_dir>/store]. Also TESSERA_DATASTORE.
    #[arg(long, env = "TESSERA_DATASTORE", hide_env_values = true)]
    datastore: Option<String>,
}

#[derive(Debug, Args)]
struct SocketArg {
    /// Admin API socket.
    #[arg(long, default_value_os_t = default_socket())]
    socket: PathBuf,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR).join("admin.sock")
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Generate a single-use join token; prints the token.
    Generate {
        /// SPIFFE ID the attesting agent receives [default: spiffe://<td>/tessera/agent/join_token/<token>].
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Lifetime in seconds [default: server's join_token_ttl, 600].
        #[arg(long)]
        ttl: Option<u32>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Args)]
struct EntryFields {
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
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
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

#[derive(Debug, Subcommand)]
enum AgentCommand {
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

#[derive(Debug, Subcommand)]
enum SvidCommand {
    /// Revoke one SVID now. An X509-SVID (--serial): agents drop it at once
    /// and CRLs list it. A JWT-SVID (--jti): every agent's ValidateJWTSVID
    /// refuses it until it expires.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["serial", "jti"])))]
    Revoke {
        /// Serial number, hex (colons allowed).
        #[arg(long)]
        serial: Option<String>,
        /// A JWT-SVID's jti claim.
        #[arg(long)]
        jti: Option<String>,
        /// Why (recorded and logged).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List revoked X509-SVIDs that have not expired yet.
    Revoked {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BundleFormat {
    Pem,
    Der,
    /// The SPIFFE bundle: a JWK Set with the CA certificates (x509-svid)
    /// and the JWT keys (jwt-svid), for federation partners.
    Spiffe,
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Print the trust domain's CA certificates (or, with --crl, its CRLs).
    Show {
        /// Output format.
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        /// Print the CRLs (one per CA) instead of the certificates.
        #[arg(long)]
        crl: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

impl Cli {
    /// Runs the parsed command.
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Run(args) => run_server(args).await,
            Command::Token(TokenCommand::Generate { spiffe_id, ttl, socket }) => {
                if ttl == Some(0) {
                    return Err(CliError("--ttl must be at least 1 second".into()));
                }
                let mut client = connect_admin(&socket.socket).await?;
                let request = pb::CreateJoinTokenRequest {
                    ttl: ttl.unwrap_or(0),
                    spiffe_id: spiffe_id.unwrap_or_default(),
                };
                let token = client.create_join_token(request).await?.into_inner();
                println!("{}", token.token);
                eprintln!("agent SPIFFE ID: {}", token.spiffe_id);
                if let Some(p) = &token.pending {
                    eprintln!(
                        "This token is held for approval ({}): it works once another operator runs `tessera-server entry approve --id {} --hash {}`",
                        p.reasons.join("; "),
                        p.proposal_id,
                        p.content_hash
                    );
                }
                Ok(())
            }
            Command::Entry(command) => entry_command(command).await,
            Command::Agent(command) => agent_command(command).await,
            Command::Bundle(BundleCommand::Show { format, crl, socket }) => {
                let mut client = connect_admin(&socket.socket).await?;
                let bundle = client.get_bundle(pb::GetBundleRequest {}).await?.into_inner();
                if format == BundleFormat::Spiffe {
                    if crl {
                        return Err(CliError("--crl has no SPIFFE format; use pem or der".into()));
                    }
                    println!("{}", spiffe_bundle(&bundle)?);
                    return Ok(());
                }
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let (tag, items) = if crl {
                    ("X509 CRL", &bundle.crls)
                } else {
                    ("CERTIFICATE", &bundle.authorities)
                };
                for cert in items {
                    match format {
                        BundleFormat::Pem => {
                            let block = pem::Pem::new(tag, cert.clone());
                            let _ = write!(out, "{}", pem::encode(&block));
                        }
                        BundleFormat::Der | BundleFormat::Spiffe => {
                            let _ = out.write_all(cert);
                        }
                    }
                }
                Ok(())
            }
            Command::Svid(SvidCommand::Revoke { serial, jti, reason, socket }) => {
                let serial = serial.map(|s| crate::revocation::normalize_serial(&s)).transpose()?;
                let mut client = connect_admin(&socket.socket).await?;
                let revoked = client
                    .revoke_svid(pb::RevokeSvidRequest {
                        serial: serial.unwrap_or_default(),
                        jti: jti.unwrap_or_default(),
                        reason: reason.unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                let what = if revoked.jti.is_empty() {
                    revoked.serial
                } else {
                    format!("JWT-SVID {}", revoked.jti)
                };
                println!(
                    "Revoked {what} ({}) until {}",
                    revoked.spiffe_id,
                    format_time(revoked.expires_at)
                );
                Ok(())
            }
            Command::Svid(SvidCommand::Revoked { json, socket }) => {
                let mut client = connect_admin(&socket.socket).await?;
                let list = client
                    .list_revocations(pb::ListRevocationsRequest {})
                    .await?
                    .into_inner()
                    .revocations;
                if json {
                    let list: Vec<_> = list
                        .iter()
                        .map(|r| {
                            json!({
                                "serial": r.serial, "jti": r.jti, "spiffe_id": r.spiffe_id, "reason": r.reason,
                                "revoked_at": r.revoked_at, "expires_at": r.expires_at,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
                } else {
                    println!(
                        "Found {} revoked SVID{}",
                        list.len(),
                        if list.len() == 1 { "" } else { "s" }
                    );
                    for r in &list {
                        println!();
                        if r.jti.is_empty() {
                            println!("Serial            : {}", r.serial);
                        } else {
                            println!("JWT-SVID jti      : {}", r.jti);
                        }
                        println!("SPIFFE ID         : {}", r.spiffe_id);
                        println!("Reason            : {}", r.reason);
                        println!("Revoked at        : {}", format_time(r.revoked_at));
                        println!("Listed until      : {}", format_time(r.expires_at));
                    }
                }
                Ok(())
            }
            Command::Store(command) => store_command(command).await,
            Command::Events { command: Some(EventsCommand::Verify { json, socket }), .. } => {
                let mut client = connect_admin(&socket.socket).await?;
                let report = client.verify_events(pb::VerifyEventsRequest {}).await?.into_inner();
                if json {
                    let value = json!({
                        "ok": report.ok, "checked": report.checked, "first_seq": report.first_seq,
                        "last_seq": report.last_seq, "head_hash": hex::encode(&report.head_hash),
                        "broken_at": report.broken_at, "problem": report.problem,
                    });
                    println!("{value}");
                } else if report.ok {
                    println!(
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
            Command::Events { command: None, filter } => events_command(filter).await,
            Command::Healthcheck(socket) => {
                let mut client = connect_admin(&socket.socket)
                    .await
                    .map_err(|e| CliError(format!("server is unhealthy: {e}")))?;
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
                println!(
                    "Server is healthy (trust domain {}, {} entries, {} agents, revision {}, {} CAs in the bundle).",
                    health.trust_domain, health.entries, health.agents, health.revision, health.bundle_cas
                );
                println!("Datastore: {}.", health.datastore);
                Ok(())
            }
        }
    }
}

async fn events_command(args: EventsArgs) -> Result<(), CliError> {
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
    let mut client = connect_admin(&args.socket.socket).await?;
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

fn print_report(report: &pb::StoreReport) {
    println!(
        "Store is whole: revision {}, write #{}, {} entries, {} agents, {} issued SVIDs, {} revocations.",
        report.revision,
        report.write_seq,
        report.entries,
        report.agents,
        report.issued_svids,
        report.revocations
    );
}

async fn store_command(command: StoreCommand) -> Result<(), CliError> {
    let fail = |e: &dyn std::fmt::Display| CliError(e.to_string());
    match command {
        StoreCommand::Check { data_dir: Some(dir), .. } => {
            let store = KvStore::open(&dir.join("store")).map_err(|e| fail(&e))?;
            let report = store.check().map_err(|e| fail(&e))?;
            print_report(&crate::admin::report_proto(&report));
            Ok(())
        }
        StoreCommand::Check { data_dir: None, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
            let report = client.check_store(pb::CheckStoreRequest {}).await?.into_inner();
            print_report(&report);
            Ok(())
        }
        StoreCommand::Backup { out, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
            let mut stream = client.backup_store(pb::BackupStoreRequest {}).await?.into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await? {
                bytes.extend_from_slice(&chunk.data);
            }
            crate::fsutil::write_private(&out, &bytes)
                .map_err(|e| CliError(format!("cannot write {}: {e}", out.display())))?;
            println!("Wrote a backup of {} bytes to {}", bytes.len(), out.display());
            Ok(())
        }
        StoreCommand::Restore { input, data_dir } => {
            let mut file = std::fs::File::open(&input)
                .map_err(|e| CliError(format!("cannot read {}: {e}", input.display())))?;
            crate::fsutil::create_private_dir(&data_dir)
                .map_err(|e| CliError(format!("cannot create {}: {e}", data_dir.display())))?;
            let report =
                KvStore::restore(&data_dir.join("store"), &mut file).map_err(|e| fail(&e))?;
            print_report(&crate::admin::report_proto(&report));
            println!("Restored {} into {}", input.display(), data_dir.display());
            Ok(())
        }
    }
}

async fn run_server(args: RunArgs) -> Result<(), CliError> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(|e| CliError(e.to_string()))?,
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        trust_domain: args.trust_domain,
        data_dir: args.data_dir,
        bind: args.bind,
        admin_socket: args.admin_socket,
        log_level: args.log_level,
        log_format: args.log_format,
        metrics_addr: args.metrics_addr,
        datastore: args.datastore,
        ..Default::default()
    };
    let config = Config::resolve(file, flags).map_err(|e| CliError(e.to_string()))?;
    init_logging(&config.log_level, config.log_format);
    let server =
        Server::bind(config, Arc::new(SystemClock)).await.map_err(|e| CliError(e.to_string()))?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    server.run(shutdown).await.map_err(|e| CliError(e.to_string()))
}

fn parse_rfc3339(value: &str) -> Result<i64, CliError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| {
            CliError(format!(
                "invalid --expires-at {value:?}: {e} (want RFC 3339, e.g. 2030-01-01T00:00:00Z)"
            ))
        })
}

/// The SPIFFE bundle document (a JWK Set) of the admin API's bundle.
fn spiffe_bundle(bundle: &pb::Bundle) -> Result<String, CliError> {
    use tessera_workload_api::jwt::{spiffe_bundle_document, JwtBundle, JwtKey};
    let trust_domain = tessera_workload_api::TrustDomain::new(&bundle.trust_domain)
        .map_err(|e| CliError(format!("server sent a bad trust domain: {e}")))?;
    let keys = bundle
        .jwt_authorities
        .iter()
        .map(|k| JwtKey::from_spki_der(&k.kid, &k.public_key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError(format!("server sent a bad JWT key: {e}")))?;
    let document = spiffe_bundle_document(
        &bundle.authorities,
        &JwtBundle::new(trust_domain, keys),
        bundle.sequence,
        bundle.refresh_hint,
    )
    .map_err(|e| CliError(format!("cannot build the SPIFFE bundle: {e}")))?;
    serde_json::to_string_pretty(&document).map_err(|e| CliError(e.to_string()))
}

/// Applies the given fields onto `entry`.
fn apply_fields(entry: &mut types::Entry, fields: EntryFields) -> Result<(), CliError> {
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
    Ok(())
}

fn item_result(result: Option<pb::EntryResult>) -> Result<types::Entry, CliError> {
    let result = result.ok_or_else(|| CliError("server returned no result".into()))?;
    match (result.status, result.entry) {
        (Some(status), Some(entry)) if status.code == 0 => Ok(entry),
        (Some(status), _) => Err(CliError(status.message)),
        _ => Err(CliError("server returned an incomplete result".into())),
    }
}

async fn entry_command(command: EntryCommand) -> Result<(), CliError> {
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
            let mut client = connect_admin(&socket.socket).await?;
            let response = client
                .batch_create_entry(pb::BatchCreateEntryRequest { entries: vec![entry] })
                .await?;
            let entry = item_result(response.into_inner().results.into_iter().next())?;
            println!("{}", entry.id);
            report_pending(&entry);
            Ok(())
        }
        EntryCommand::Update { id, fields, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
            let mut entry = client.get_entry(pb::GetEntryRequest { id }).await?.into_inner();
            apply_fields(&mut entry, fields)?;
            let response = client
                .batch_update_entry(pb::BatchUpdateEntryRequest { entries: vec![entry] })
                .await?;
            let entry = item_result(response.into_inner().results.into_iter().next())?;
            println!("{}", entry.id);
            report_pending(&entry);
            Ok(())
        }
        EntryCommand::Approve { id, hash, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
            let request = pb::ApproveEntryRequest { id, content_hash: hash };
            let entry = client.approve_entry(request).await?.into_inner();
            if entry.parent_id.is_empty() {
                println!("Approved join token for agent {}", entry.spiffe_id);
            } else {
                println!("Approved entry {} ({})", entry.id, entry.spiffe_id);
            }
            Ok(())
        }
        EntryCommand::Reject { id, reason, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
            client
                .reject_entry(pb::RejectEntryRequest {
                    id: id.clone(),
                    reason: reason.unwrap_or_default(),
                })
                .await?;
            println!("Rejected proposal {id}");
            Ok(())
        }
        EntryCommand::Delete { id, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
            let response = client
                .batch_delete_entry(pb::BatchDeleteEntryRequest { ids: vec![id.clone()] })
                .await?;
            let result = response.into_inner().results.into_iter().next();
            match result.and_then(|r| r.status) {
                Some(status) if status.code == 0 => {
                    println!("Deleted entry {id}");
                    Ok(())
                }
                Some(status) => Err(CliError(status.message)),
                None => Err(CliError("server returned no result".into())),
            }
        }
        EntryCommand::Show { id, spiffe_id, parent_id, pending, json, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
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
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                print_entries(&entries);
            }
            Ok(())
        }
    }
}

fn entry_json(e: &types::Entry) -> serde_json::Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "dns_names": e.dns_names,
        "expires_at": e.expires_at,
        "revision": e.revision,
        "created_at": e.created_at,
        "hint": e.hint,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "jwt_audiences": e.jwt_audiences,
        "require_approval": e.require_approval,
        "pending": e.pending.as_ref().map(|p| json!({
            "op": p.op,
            "proposal_id": p.proposal_id,
            "content_hash": p.content_hash,
            "requested_by_uid": p.requested_by_uid,
            "reasons": p.reasons,
            "requested_at": p.requested_at,
            "expires_at": p.expires_at,
        })),
    })
}

/// Tells the operator that an entry was held for approval, and why.
fn report_pending(entry: &types::Entry) {
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

fn print_entries(entries: &[types::Entry]) {
    println!("Found {} entr{}", entries.len(), if entries.len() == 1 { "y" } else { "ies" });
    for e in entries {
        println!();
        println!("Entry ID         : {}", e.id);
        if let Some(p) = &e.pending {
            println!("Status           : pending approval ({})", p.op);
            println!("Proposal ID      : {}", p.proposal_id);
            println!("Content hash     : {}", p.content_hash);
            println!("Requested by uid : {}", p.requested_by_uid);
            for why in &p.reasons {
                println!("Needs approval   : {why}");
            }
            println!("Pending until    : {}", format_time(p.expires_at));
        } else if e.require_approval {
            println!("Status           : approved (changes need approval)");
        }
        println!("SPIFFE ID        : {}", e.spiffe_id);
        println!("Parent ID        : {}", e.parent_id);
        println!("Revision         : {}", e.revision);
        println!("X509-SVID TTL    : {}", e.x509_svid_ttl.unwrap_or(0));
        match e.jwt_svid_ttl {
            Some(ttl) => println!("JWT-SVID TTL     : {ttl}"),
            None => println!("JWT-SVID TTL     : server default"),
        }
        if e.jwt_audiences.is_empty() {
            println!("JWT audiences    : any");
        }
        for audience in &e.jwt_audiences {
            println!("JWT audience     : {audience}");
        }
        if e.expires_at != 0 {
            println!("Expires at       : {}", format_time(e.expires_at));
        }
        for s in &e.selectors {
            println!("Selector         : {}:{}", s.r#type, s.value);
        }
        for d in &e.dns_names {
            println!("DNS name         : {d}");
        }
        if !e.hint.is_empty() {
            println!("Hint             : {}", e.hint);
        }
    }
}

fn agent_json(a: &types::Agent) -> serde_json::Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "x509_svid_serial": a.x509_svid_serial,
        "x509_svid_expires_at": a.x509_svid_expires_at,
        "attested_at": a.attested_at,
        "banned": a.banned,
    })
}

fn print_agent(a: &types::Agent) {
    println!("SPIFFE ID         : {}", a.spiffe_id);
    println!("Attestation type  : {}", a.attestation_type);
    println!("Expiration time   : {}", format_time(a.x509_svid_expires_at));
    println!("Serial number     : {}", a.x509_svid_serial);
    println!("Attested at       : {}", format_time(a.attested_at));
    println!("Banned            : {}", a.banned);
}

async fn agent_command(command: AgentCommand) -> Result<(), CliError> {
    match command {
        AgentCommand::List { json, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
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
            let mut client = connect_admin(&socket.socket).await?;
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
            let mut client = connect_admin(&socket.socket).await?;
            client.evict_agent(pb::EvictAgentRequest { spiffe_id: id.clone(), unban }).await?;
            println!("Evicted {id}; it must attest again with a new join token");
            Ok(())
        }
        AgentCommand::Show { id, json, socket } => {
            let mut client = connect_admin(&socket.socket).await?;
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
