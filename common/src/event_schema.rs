//! The event schema's helpers shared by `tessera-server` and `tessera-agent`
//! (compiled into both crates): building events, the hash chain, the JSON
//! form (`events --json`, the file sink) and the audit log line, which
//! carries the same fields as the event.

use tessera_proto::types::{Attr, Event, Operator, Workload};

/// Event kinds. The README's "Event stream" section documents each.
pub mod kind {
    /// A node attestation (join token).
    pub const NODE_ATTEST: &str = "node.attest";
    /// An agent SVID renewal.
    pub const NODE_RENEW: &str = "node.renew";
    /// A node API request refused before it was served (authentication, limits).
    pub const NODE_REFUSED: &str = "node.refused";
    /// An X509-SVID signed (or refused) for an entry.
    pub const X509_ISSUE: &str = "svid.x509.issue";
    /// A JWT-SVID signed (or refused) for an entry.
    pub const JWT_ISSUE: &str = "svid.jwt.issue";
    /// An SVID revoked (by an operator, or with its entry or agent).
    pub const REVOKE: &str = "svid.revoke";
    /// FetchX509SVID answered (or refused, or an identity withdrawn).
    pub const WORKLOAD_X509: &str = "workload.x509";
    /// FetchJWTSVID answered or refused.
    pub const WORKLOAD_JWT: &str = "workload.jwt";
    /// FetchX509Bundles or FetchJWTBundles answered or refused.
    pub const WORKLOAD_BUNDLE: &str = "workload.bundle";
    /// ValidateJWTSVID: the token was valid (allow) or not (deny).
    pub const WORKLOAD_VALIDATE: &str = "workload.jwt_validate";
    /// A Workload API call refused before any identity was looked at
    /// (header, connection or stream limits, attestation failure).
    pub const WORKLOAD_REFUSED: &str = "workload.refused";
    /// An admin call refused (caller not an operator, or bad input).
    pub const ADMIN_REFUSED: &str = "admin.refused";
    /// An entry created.
    pub const ENTRY_CREATE: &str = "admin.entry.create";
    /// An entry updated.
    pub const ENTRY_UPDATE: &str = "admin.entry.update";
    /// An entry deleted.
    pub const ENTRY_DELETE: &str = "admin.entry.delete";
    /// An entry (or update) held for a second operator's approval.
    pub const ENTRY_PENDING: &str = "admin.entry.pending";
    /// A pending entry approved (or the approval refused).
    pub const ENTRY_APPROVE: &str = "admin.entry.approve";
    /// A pending entry rejected, by an operator or by expiry.
    pub const ENTRY_REJECT: &str = "admin.entry.reject";
    /// An entry reached its `expires_at`.
    pub const ENTRY_EXPIRE: &str = "entry.expire";
    /// A join token created.
    pub const JOIN_TOKEN: &str = "admin.join_token.create";
    /// A join token was spent by an attestation (in the commit that
    /// removed it, whether or not the attestation then succeeds).
    pub const JOIN_TOKEN_SPEND: &str = "node.join_token.spend";
    /// An agent banned.
    pub const AGENT_BAN: &str = "admin.agent.ban";
    /// An agent evicted.
    pub const AGENT_EVICT: &str = "admin.agent.evict";
    /// A store backup taken.
    pub const BACKUP: &str = "admin.backup";
    /// The CA (and its JWT key) rotated: a CA prepared, activated or retired.
    pub const CA_ROTATE: &str = "ca.rotate";
    /// Events an agent could not spool (its spool was full): how many, which kinds.
    pub const SPOOL_OVERFLOW: &str = "agent.spool_overflow";
    /// Anomaly: an identity served to an executable never seen for its entry.
    pub const ANOMALY_NEW_EXECUTABLE: &str = "anomaly.new_executable";
    /// Anomaly: refusals from one uid or one agent above the configured rate.
    pub const ANOMALY_REFUSAL_BURST: &str = "anomaly.refusal_burst";
    /// Anomaly: a JWT-SVID for an audience outside the entry's usual set.
    pub const ANOMALY_UNUSUAL_AUDIENCE: &str = "anomaly.unusual_audience";

    /// A token broker decision on a token request (allow or deny).
    pub const BROKER_TOKEN: &str = "broker.token";
    /// An access token revoked by an operator.
    pub const BROKER_TOKEN_REVOKE: &str = "broker.token.revoke";
    /// A token request held for an operator's approval.
    pub const BROKER_PENDING: &str = "broker.request.pending";
    /// A held token request approved by an operator.
    pub const BROKER_APPROVE: &str = "broker.request.approve";
    /// A held token request denied by an operator.
    pub const BROKER_DENY: &str = "broker.request.deny";
    /// A held token request (or an unused approval) lapsed.
    pub const BROKER_REQUEST_EXPIRE: &str = "broker.request.expire";
    /// A task started (by an operator, or a workload for a sub-task).
    pub const BROKER_TASK_START: &str = "broker.task.start";
    /// A task ended by an operator: every token issued under it is revoked.
    pub const BROKER_TASK_END: &str = "broker.task.end";
    /// A task reached its expiry: every token issued under it is revoked.
    pub const BROKER_TASK_EXPIRE: &str = "broker.task.expire";
    /// Anomaly: a workload's first token request for a tool.
    pub const ANOMALY_BROKER_FIRST_TOOL: &str = "anomaly.broker_first_tool";
    /// Anomaly: a burst of broker denials for one workload.
    pub const ANOMALY_BROKER_DENIAL_BURST: &str = "anomaly.broker_denial_burst";
    /// Anomaly: a blast radius far above the workload's usual.
    pub const ANOMALY_BROKER_BLAST_RADIUS: &str = "anomaly.broker_blast_radius";

    /// Every kind above: what a metric label may hold.
    pub const ALL: &[&str] = &[
        NODE_ATTEST,
        NODE_RENEW,
        NODE_REFUSED,
        X509_ISSUE,
        JWT_ISSUE,
        REVOKE,
        WORKLOAD_X509,
        WORKLOAD_JWT,
        WORKLOAD_BUNDLE,
        WORKLOAD_VALIDATE,
        WORKLOAD_REFUSED,
        ADMIN_REFUSED,
        ENTRY_CREATE,
        ENTRY_UPDATE,
        ENTRY_DELETE,
        ENTRY_PENDING,
        ENTRY_APPROVE,
        ENTRY_REJECT,
        ENTRY_EXPIRE,
        JOIN_TOKEN,
        JOIN_TOKEN_SPEND,
        AGENT_BAN,
        AGENT_EVICT,
        BACKUP,
        CA_ROTATE,
        SPOOL_OVERFLOW,
        ANOMALY_NEW_EXECUTABLE,
        ANOMALY_REFUSAL_BURST,
        ANOMALY_UNUSUAL_AUDIENCE,
        BROKER_TOKEN,
        BROKER_TOKEN_REVOKE,
        BROKER_PENDING,
        BROKER_APPROVE,
        BROKER_DENY,
        BROKER_REQUEST_EXPIRE,
        BROKER_TASK_START,
        BROKER_TASK_END,
        BROKER_TASK_EXPIRE,
        ANOMALY_BROKER_FIRST_TOOL,
        ANOMALY_BROKER_DENIAL_BURST,
        ANOMALY_BROKER_BLAST_RADIUS,
    ];

    /// `kind` when it is one of [`ALL`], else `other`: a label's values stay few.
    pub fn bounded(kind: &str) -> &str {
        if ALL.contains(&kind) {
            kind
        } else {
            "other"
        }
    }
}

/// `decision` of an allowed request.
pub const ALLOW: &str = "allow";
/// `decision` of a refused request.
pub const DENY: &str = "deny";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An event of `kind` with `decision` ("allow", "deny" or ""), stamped now.
pub fn event(kind: &str, decision: &str) -> Event {
    Event {
        kind: kind.to_string(),
        decision: decision.to_string(),
        time_ms: now_ms(),
        ..Default::default()
    }
}

/// A denial of `kind` for `reason`.
pub fn denied(kind: &str, reason: impl Into<String>) -> Event {
    let mut e = event(kind, DENY);
    e.reason = reason.into();
    e
}

/// The code of an operator's own decision (a revocation, a ban).
pub const OPERATOR: &str = "operator";

/// The codes of the Workload API's own refusals (the agent's
/// `connection_limit`, `stream_limit`, `agent_unavailable`, and its
/// attestor's `AttestError::code`), and of an operator's decision.
pub const LOCAL_CODES: [&str; 11] = [
    OPERATOR,
    "agent_unavailable",
    "connection_limit",
    "stream_limit",
    "no_pid",
    "pin_failed",
    "process_exited",
    "proc_unreadable",
    "no_peer_credentials",
    "credentials_mismatch",
    "executable_changed",
];

/// A code fit for a metric label: one of a fixed vocabulary (the typed
/// refusals, the gRPC codes in kebab case, [`LOCAL_CODES`]); anything else
/// is `other`. An agent pushes its events' codes as it likes, so a code
/// merely shaped like one would let it add label values without bound.
pub fn bounded_code(code: &str) -> &str {
    let known = tessera_proto::Refusal::ALL.iter().any(|r| r.as_str() == code)
        || LOCAL_CODES.contains(&code)
        || (0..=16).any(|n| grpc_code(tonic::Code::from_i32(n)) == code);
    if known {
        code
    } else {
        "other"
    }
}

/// A gRPC status code in kebab case: `permission-denied`, `invalid-argument`.
pub fn grpc_code(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid-argument",
        DeadlineExceeded => "deadline-exceeded",
        NotFound => "not-found",
        AlreadyExists => "already-exists",
        PermissionDenied => "permission-denied",
        ResourceExhausted => "resource-exhausted",
        FailedPrecondition => "failed-precondition",
        Aborted => "aborted",
        OutOfRange => "out-of-range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data-loss",
        Unauthenticated => "unauthenticated",
    }
}

/// A denial of `kind` for a refused call: the status's message is the
/// reason; its code is the typed refusal the status carries
/// (`tessera-refusal`), else its gRPC code.
pub fn refused(kind: &str, status: &tonic::Status) -> Event {
    let typed = status
        .metadata()
        .get(tessera_proto::REFUSAL_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let code = typed.unwrap_or_else(|| grpc_code(status.code()).to_string());
    denied(kind, status.message()).code(&code)
}

/// Builder-style setters for the fields most events carry.
pub trait EventExt: Sized {
    /// Sets the code of the decision (see [`bounded_code`]).
    fn code(self, code: &str) -> Self;
    /// Sets the agent.
    fn agent(self, agent_id: impl Into<String>) -> Self;
    /// Adds a SPIFFE ID.
    fn spiffe_id(self, id: impl Into<String>) -> Self;
    /// Adds an entry ID.
    fn entry(self, id: impl Into<String>) -> Self;
    /// Adds a detail.
    fn attr(self, key: &str, value: impl ToString) -> Self;
    /// Sets the admin caller.
    fn operator(self, operator: Option<Operator>) -> Self;
    /// Sets the Workload API caller.
    fn workload(self, workload: Workload) -> Self;
}

impl EventExt for Event {
    fn code(mut self, code: &str) -> Self {
        self.code = bounded_code(code).to_string();
        self
    }
    fn agent(mut self, agent_id: impl Into<String>) -> Self {
        self.agent_id = agent_id.into();
        self
    }
    fn spiffe_id(mut self, id: impl Into<String>) -> Self {
        self.spiffe_ids.push(id.into());
        self
    }
    fn entry(mut self, id: impl Into<String>) -> Self {
        self.entry_ids.push(id.into());
        self
    }
    fn attr(mut self, key: &str, value: impl ToString) -> Self {
        self.attrs.push(Attr { key: key.to_string(), value: value.to_string() });
        self
    }
    fn operator(mut self, operator: Option<Operator>) -> Self {
        self.operator = operator;
        self
    }
    fn workload(mut self, workload: Workload) -> Self {
        self.workload = Some(workload);
        self
    }
}

/// The chain hash of `event` after `prev`: SHA-256 over the previous hash
/// and the event's protobuf encoding with `hash` empty (prost encodes a
/// message's fields in field order, and `Event` has no maps, so the
/// encoding is deterministic).
pub fn chain_hash(prev: &[u8], event: &Event) -> Vec<u8> {
    use prost::Message;
    // An event being chained has no hash yet: no copy of it is needed.
    if event.hash.is_empty() {
        return digest(prev, &event.encode_to_vec());
    }
    let mut unhashed = event.clone();
    unhashed.hash.clear();
    digest(prev, &unhashed.encode_to_vec())
}

/// Field number of `Event.hash`, and of `Event.code`, the only field
/// encoded after it.
const HASH_FIELD: u32 = 21;
const CODE_FIELD: u32 = 22;
/// `code`'s key as encoded: its field number and wire type 2
/// (length-delimited), a varint of two bytes.
const CODE_KEY: [u8; 2] = {
    let key = (CODE_FIELD << 3) | 2;
    [(key & 0x7f) as u8 | 0x80, (key >> 7) as u8]
};

/// Chains `event` after its `prev_hash`: sets `hash` as [`chain_hash`]
/// does and returns the event's encoding with it, from one encoding of
/// the event (the unhashed one the hash is over, with the hash's field
/// put in its place, before `code`), as the server stores each event.
pub fn seal(event: &mut Event) -> Vec<u8> {
    use prost::Message;
    event.hash.clear();
    // Room for the hash's field too (a 2-byte key, its length, 32 bytes).
    let mut bytes = Vec::with_capacity(event.encoded_len() + 3 + 32);
    event.encode_raw(&mut bytes);
    event.hash = digest(&event.prev_hash, &bytes);
    let after = if event.code.is_empty() {
        0
    } else {
        prost::encoding::string::encoded_len(CODE_FIELD, &event.code)
    };
    let at = bytes.len() - after;
    // What follows the hash is `code`, or nothing: anything else is a field
    // added after `hash` without this knowing, encoded again whole.
    if after > 0 && !bytes[at..].starts_with(&CODE_KEY) {
        debug_assert!(false, "a field was added after `hash`: {event:?}");
        return event.encode_to_vec();
    }
    // The hash's field goes at the end, then the tail turns so that it
    // comes before `code`: no second buffer.
    let end = bytes.len();
    prost::encoding::bytes::encode(HASH_FIELD, &event.hash, &mut bytes);
    let field = bytes.len() - end;
    bytes[at..].rotate_right(field);
    debug_assert_eq!(bytes, event.encode_to_vec(), "a field was added after `hash`");
    bytes
}

fn digest(prev: &[u8], unhashed: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev);
    ctx.update(unhashed);
    ctx.finish().as_ref().to_vec()
}

/// RFC 3339 with milliseconds, UTC.
pub fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// The event as one JSON object (`events --json`, the file sink). Empty
/// fields are left out; the field names are the schema's.
pub fn to_json(e: &Event) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let mut o = Map::new();
    let mut put = |k: &str, v: Value| {
        let empty = matches!(&v, Value::String(s) if s.is_empty())
            || matches!(&v, Value::Array(a) if a.is_empty())
            || v.is_null();
        if !empty {
            o.insert(k.to_string(), v);
        }
    };
    if e.seq != 0 {
        put("seq", json!(e.seq));
    }
    put("time", json!(format_ms(e.time_ms)));
    put("kind", json!(e.kind));
    put("decision", json!(e.decision));
    put("code", json!(e.code));
    put("reason", json!(e.reason));
    put("source", json!(e.source));
    put("agent_id", json!(e.agent_id));
    put("spiffe_ids", json!(e.spiffe_ids));
    put("entry_ids", json!(e.entry_ids));
    if let Some(w) = &e.workload {
        put(
            "workload",
            json!({"pid": w.pid, "uid": w.uid, "gid": w.gid, "path": w.path, "sha256": w.sha256, "selectors": w.selectors}),
        );
    }
    if let Some(op) = &e.operator {
        put("operator", json!({"uid": op.uid, "gid": op.gid, "pid": op.pid}));
    }
    put("serial", json!(e.serial));
    put("jti", json!(e.jti));
    put("audience", json!(e.audience));
    for (key, text) in [("before", &e.before), ("after", &e.after)] {
        if !text.is_empty() {
            put(key, serde_json::from_str(text).unwrap_or_else(|_| json!(text)));
        }
    }
    if !e.attrs.is_empty() {
        let attrs: Map<String, Value> =
            e.attrs.iter().map(|a| (a.key.clone(), json!(a.value))).collect();
        put("attrs", Value::Object(attrs));
    }
    if e.agent_seq != 0 {
        put("agent_seq", json!(e.agent_seq));
    }
    if e.stored_ms != 0 {
        put("stored", json!(format_ms(e.stored_ms)));
    }
    if !e.hash.is_empty() {
        put("prev_hash", json!(hex::encode(&e.prev_hash)));
        put("hash", json!(hex::encode(&e.hash)));
    }
    Value::Object(o)
}

/// One line for people: time, kind, decision, who, what, why.
pub fn to_text(e: &Event) -> String {
    let mut line = format!("{} #{} {}", format_ms(e.time_ms), e.seq, e.kind);
    if !e.decision.is_empty() {
        line.push_str(&format!(" {}", e.decision));
    }
    if !e.agent_id.is_empty() {
        line.push_str(&format!(" agent={}", e.agent_id));
    }
    if !e.spiffe_ids.is_empty() {
        line.push_str(&format!(" spiffe_id={}", e.spiffe_ids.join(",")));
    }
    if let Some(w) = &e.workload {
        line.push_str(&format!(" pid={} uid={} gid={}", w.pid, w.uid, w.gid));
        if !w.path.is_empty() {
            line.push_str(&format!(" path={}", w.path));
        }
    }
    if let Some(op) = &e.operator {
        line.push_str(&format!(" operator_uid={}", op.uid));
    }
    if !e.serial.is_empty() {
        line.push_str(&format!(" serial={}", e.serial));
    }
    if !e.jti.is_empty() {
        line.push_str(&format!(" jti={}", e.jti));
    }
    if !e.audience.is_empty() {
        line.push_str(&format!(" audience={}", e.audience.join(",")));
    }
    for a in &e.attrs {
        line.push_str(&format!(" {}={}", a.key, a.value));
    }
    if !e.code.is_empty() {
        line.push_str(&format!(" code={}", e.code));
    }
    if !e.reason.is_empty() {
        line.push_str(&format!(" reason={:?}", e.reason));
    }
    line
}

/// Writes the event's audit log line on the `tessera::audit` target, with
/// the event's fields (a denial at warn level, the rest at info).
pub fn log(e: &Event) {
    // Nothing is formatted for a line no subscriber takes.
    let wanted = if e.decision == DENY {
        tracing::enabled!(target: "tessera::audit", tracing::Level::WARN)
    } else {
        tracing::enabled!(target: "tessera::audit", tracing::Level::INFO)
    };
    if !wanted {
        return;
    }
    let w = e.workload.as_ref();
    let operator_uid = e.operator.as_ref().map(|o| o.uid);
    let attrs: Vec<String> = e.attrs.iter().map(|a| format!("{}={}", a.key, a.value)).collect();
    let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let list = |l: &[String]| (!l.is_empty()).then(|| l.join(","));
    macro_rules! emit {
        ($level:ident) => {
            tracing::$level!(
                target: "tessera::audit",
                kind = %e.kind,
                decision = text(&e.decision),
                code = text(&e.code),
                reason = text(&e.reason),
                agent_id = text(&e.agent_id),
                spiffe_ids = list(&e.spiffe_ids),
                entry_ids = list(&e.entry_ids),
                pid = w.map(|w| w.pid),
                uid = w.map(|w| w.uid),
                gid = w.map(|w| w.gid),
                path = w.and_then(|w| text(&w.path)),
                sha256 = w.and_then(|w| text(&w.sha256)),
                selectors = w.and_then(|w| list(&w.selectors)),
                operator_uid,
                serial = text(&e.serial),
                jti = text(&e.jti),
                audience = list(&e.audience),
                attrs = list(&attrs),
                "{}", e.kind
            )
        };
    }
    if e.decision == DENY {
        emit!(warn);
    } else {
        emit!(info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_chain_hash_ignores_its_own_hash() {
        let mut e = event(kind::JWT_ISSUE, ALLOW).agent("spiffe://example.org/a").attr("n", 1);
        e.prev_hash = vec![7; 32];
        let unhashed = chain_hash(&e.prev_hash, &e);
        e.hash = unhashed.clone();
        // As a verifier sees the stored event: the same hash.
        assert_eq!(chain_hash(&e.prev_hash, &e), unhashed);
        e.agent_id.push('x');
        assert_ne!(chain_hash(&e.prev_hash, &e), unhashed, "every other field counts");
    }

    #[test]
    fn a_sealed_event_is_encoded_as_prost_encodes_it_with_its_hash() {
        use prost::Message;
        let mut full = event(kind::JWT_ISSUE, DENY).agent("spiffe://example.org/a").attr("n", 1);
        full.prev_hash = vec![7; 32];
        full.code = "rate_limited".into();
        full.hash = vec![1; 32]; // replaced, not kept
        let mut key = Vec::new();
        prost::encoding::encode_key(
            CODE_FIELD,
            prost::encoding::WireType::LengthDelimited,
            &mut key,
        );
        assert_eq!(key, CODE_KEY);
        for mut e in [full.clone(), Event { code: String::new(), ..full.clone() }, Event::default()]
        {
            let bytes = seal(&mut e);
            assert_eq!(e.hash, chain_hash(&e.prev_hash, &e), "{e:?}");
            assert_eq!(bytes, e.encode_to_vec(), "{e:?}");
            assert_eq!(Event::decode(bytes.as_slice()).unwrap(), e);
        }
    }
}
