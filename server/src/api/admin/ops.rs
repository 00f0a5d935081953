//! Admin RPCs a SPIRE operator reaches for: counts, agents by selector,
//! purge of long-expired agents, and mint. gRPC glue only (the caller was
//! authorized by `admin::authorize`): read the request, call the domain
//! (`queries`, `mint`, the store), record the event, map refusals to a
//! status. `admin.rs` delegates these methods here.

use tessera_proto::admin as pb;
use tessera_proto::types::{self as types, Operator};
use tonic::{Request, Response, Status};

use crate::api::admin::peer::operator_of;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::mint::{self, MintError, Minted};
use crate::queries::{self, SelectorQuery};
use crate::state::State;
use crate::store::{Audit, EntryFilter};

/// Largest page of a listing.
pub const MAX_PAGE: usize = 10_000;

/// The selector query of a listing request: each selector checked as
/// `type:value`.
pub fn selector_query(selectors: &[String], mode: i32) -> Result<SelectorQuery, Status> {
    let mode = pb::SelectorMatch::try_from(mode)
        .map_err(|_| Status::invalid_argument(format!("unknown selector match mode {mode}")))?;
    for s in selectors {
        let mut parts = s.splitn(2, ':');
        let (kind, value) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if kind.is_empty() || value.is_empty() {
            return Err(Status::invalid_argument(format!(
                "invalid selector {s:?}: want type:value, e.g. unix:uid:1000"
            )));
        }
    }
    Ok(SelectorQuery { selectors: selectors.iter().cloned().collect(), mode })
}

/// `CountEntries`.
pub async fn count_entries(state: &State) -> Result<Response<pb::CountResponse>, Status> {
    let count = state.store_op(|store| Ok(store.entry_count())).await?;
    Ok(Response::new(pb::CountResponse { count: count as u64 }))
}

/// `CountAgents`.
pub async fn count_agents(state: &State) -> Result<Response<pb::CountResponse>, Status> {
    let count = state.store_op(|store| Ok(store.agents()?.len())).await?;
    Ok(Response::new(pb::CountResponse { count: count as u64 }))
}

/// `ListAgents`, with its selector filter.
pub async fn list_agents(
    state: &State,
    request: Request<pb::ListAgentsRequest>,
) -> Result<Response<pb::ListAgentsResponse>, Status> {
    let req = request.into_inner();
    let query = selector_query(&req.selectors, req.selector_match)?;
    let agents = state.store_op(|store| store.agents()).await?;
    let agents = agents.into_iter().filter(|a| query.matches_agent(a)).collect();
    Ok(Response::new(pb::ListAgentsResponse { agents }))
}

/// The entries of a `ListEntries` page when it filters by selectors.
pub async fn matching_entries(
    state: &State,
    filter: EntryFilter,
    query: SelectorQuery,
    after: Option<String>,
    limit: usize,
) -> Result<Vec<crate::entry::Entry>, Status> {
    state
        .store_op(move |store| {
            queries::matching_entries(store, &filter, &query, after.as_deref(), limit)
        })
        .await
}

/// Longest `--expired-for` a purge takes: ten years.
pub const MAX_PURGE_EXPIRED_FOR: i64 = 3650 * 86_400;

/// `PurgeAgents`: each agent whose SVID expired at least `expired_for`
/// seconds ago is evicted in a commit of its own that checks it again
/// (a renewal meanwhile keeps it), with an `admin.agent.evict` event.
pub async fn purge_agents(
    state: &State,
    request: Request<pb::PurgeAgentsRequest>,
) -> Result<Response<pb::PurgeAgentsResponse>, Status> {
    let operator = operator_of(&request);
    let req = request.into_inner();
    // 0 would purge an agent the moment its SVID expires; more than ten
    // years is a typo (no SVID lives that long).
    if req.expired_for == 0 {
        return Err(Status::invalid_argument(
            "--expired-for must be at least 1s (e.g. 7d): 0 purges agents the moment their SVID expires",
        ));
    }
    let expired_for =
        i64::try_from(req.expired_for)
            .ok()
            .filter(|&s| s <= MAX_PURGE_EXPIRED_FOR)
            .ok_or_else(|| Status::invalid_argument("--expired-for is too large: at most 3650d"))?;
    let now = state.clock().now();
    let agents = state.store_op(|store| store.agents()).await?;
    let candidates: Vec<types::Agent> =
        agents.into_iter().filter(|a| queries::purgeable(a, now, expired_for)).collect();
    if req.dry_run {
        return Ok(Response::new(pb::PurgeAgentsResponse { agents: candidates }));
    }
    let expired_before = now.saturating_sub(expired_for);
    let mut purged = Vec::new();
    for agent in candidates {
        let id = agent.spiffe_id.clone();
        let mut e = schema::event(kind::AGENT_EVICT, schema::ALLOW)
            .operator(operator)
            .agent(agent.spiffe_id.clone())
            .attr("purge", true)
            .attr("expired_for", expired_for)
            .attr("svid_expired_at", crate::cli_support::format_time(agent.x509_svid_expires_at));
        e.reason = format!("SVID expired at least {expired_for}s ago");
        // The eviction's event only if the commit evicts.
        let audit = Audit::new(operator, move |purged: &Option<Vec<types::Revocation>>| {
            purged.iter().map(|_| e.clone()).collect()
        });
        let Some(revoked) = state
            .store_op(move |store| store.purge_agent(&id, expired_before, now, &audit))
            .await?
        else {
            continue;
        };
        crate::revocation::revoked(state, &revoked).await?;
        purged.push(agent);
    }
    Ok(Response::new(pb::PurgeAgentsResponse { agents: purged }))
}

/// A refused mint: its event and status.
fn refuse_mint(
    state: &State,
    event_kind: &str,
    operator: Option<Operator>,
    spiffe_id: &str,
    e: &MintError,
) -> Status {
    let event = schema::denied(event_kind, e.to_string())
        .code(schema::grpc_code(e.code()))
        .operator(operator)
        .spiffe_id(spiffe_id.to_string())
        .attr("minted", true);
    state.events().record(vec![event]);
    Status::new(e.code(), e.to_string())
}

/// The identity of a mint and whether one operator may mint it: refused
/// for an agent's ID and for what the approval policy protects.
async fn mint_identity(
    state: &State,
    spiffe_id: &str,
    what: Minted<'_>,
) -> Result<Result<tessera_workload_api::SpiffeId, MintError>, Status> {
    let id = match mint::identity(state.config(), spiffe_id) {
        Ok(id) => id,
        Err(e) => return Ok(Err(e)),
    };
    let lookup = id.clone();
    let (agent, entries) = state
        .store_op(move |store| {
            let filter = EntryFilter { parent_id: None, spiffe_id: Some(lookup.clone()) };
            // Every entry with the ID, page by page: one the policy matches
            // must not hide behind a page of others.
            let mut entries = Vec::new();
            loop {
                let after = entries.last().map(|e: &crate::entry::Entry| e.id.clone());
                let page = store.list_entries(&filter, after.as_deref(), MAX_PAGE)?;
                let done = page.len() < MAX_PAGE;
                entries.extend(page);
                if done {
                    break;
                }
            }
            Ok((store.agent(lookup.as_str())?, entries))
        })
        .await?;
    if agent.is_some() {
        return Ok(Err(MintError::AgentIdentity(id.to_string())));
    }
    let mut reasons = mint::approval_reasons(&state.governance().policy, &id, what, &entries);
    // A proposal (an entry or a join token waiting for a second operator)
    // for this ID: minting it now would skip that approval.
    let proposals =
        state.governance().pending.list().map_err(|e| Status::internal(e.to_string()))?;
    if let Some(p) = proposals.iter().find(|p| p.spiffe_id == id.as_str()) {
        let proposal = p.pending.as_ref().map_or(p.id.as_str(), |a| a.proposal_id.as_str());
        reasons.push(format!("proposal {proposal} for this SPIFFE ID awaits approval"));
    }
    if !reasons.is_empty() {
        return Ok(Err(MintError::NeedsApproval { id: id.to_string(), reasons }));
    }
    Ok(Ok(id))
}

/// `MintX509Svid`: signs the caller's CSR, records the SVID (durable
/// before the answer) and the `svid.x509.issue` event naming the operator.
pub async fn mint_x509(
    state: &State,
    request: Request<pb::MintX509SvidRequest>,
) -> Result<Response<pb::MintX509SvidResponse>, Status> {
    let operator = operator_of(&request);
    let req = request.into_inner();
    let refuse = |e: MintError| refuse_mint(state, kind::X509_ISSUE, operator, &req.spiffe_id, &e);
    let ttl = mint::x509_ttl(state.config(), req.ttl).map_err(refuse)?;
    let id = mint_identity(state, &req.spiffe_id, Minted::X509 { ttl }).await?.map_err(refuse)?;
    let (svid, record) =
        mint::mint_x509(state.ca(), &id, &req.csr, ttl, &req.dns_names).map_err(refuse)?;
    let mut e = schema::event(kind::X509_ISSUE, schema::ALLOW)
        .operator(operator)
        .spiffe_id(id.to_string())
        .attr("minted", true)
        .attr("ttl", ttl);
    e.serial = svid.serial.clone();
    let audit = Audit::events(operator, vec![e]);
    state.store_op(move |store| store.record_minted(&record, &audit)).await?;
    Ok(Response::new(pb::MintX509SvidResponse {
        x509_svid: vec![svid.leaf],
        bundle: state.ca().bundle().iter().map(|c| c.to_vec()).collect(),
        serial: svid.serial,
        expires_at: svid.expires_at,
    }))
}

/// `MintJwtSvid`: signs a token, records it by `jti` (durable before the
/// answer) and the `svid.jwt.issue` event naming the operator.
pub async fn mint_jwt(
    state: &State,
    request: Request<pb::MintJwtSvidRequest>,
) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
    let operator = operator_of(&request);
    let req = request.into_inner();
    let refuse = |e: MintError| refuse_mint(state, kind::JWT_ISSUE, operator, &req.spiffe_id, &e);
    let ttl = mint::jwt_ttl(state.config(), req.ttl).map_err(refuse)?;
    mint::check_audience(&req.audience).map_err(refuse)?;
    let id = mint_identity(state, &req.spiffe_id, Minted::Jwt { audience: &req.audience })
        .await?
        .map_err(refuse)?;
    let (jwt, record) = mint::mint_jwt(state.ca(), &id, &req.audience, ttl).map_err(refuse)?;
    let mut e = schema::event(kind::JWT_ISSUE, schema::ALLOW)
        .operator(operator)
        .spiffe_id(id.to_string())
        .attr("minted", true)
        .attr("ttl", ttl);
    e.jti = jwt.jti.clone();
    e.audience = req.audience.clone();
    let audit = Audit::events(operator, vec![e]);
    state.store_op(move |store| store.record_minted(&record, &audit)).await?;
    Ok(Response::new(pb::MintJwtSvidResponse {
        token: jwt.token,
        jti: jwt.jti,
        expires_at: jwt.expires_at,
    }))
}
