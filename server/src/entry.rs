//! Registration entries: the validated domain type, and the rules an entry
//! must follow before it is stored.

use std::collections::{BTreeMap, BTreeSet};

use tessera_proto::types as pb;
use tessera_workload_api::{Selector, SelectorError, SpiffeId, SpiffeIdError, TrustDomain};

/// Why an entry (or one item of a batch) was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryError {
    /// The entry's SPIFFE ID is missing or invalid.
    #[error("invalid SPIFFE ID: {0}")]
    SpiffeId(SpiffeIdError),
    /// No parent ID was given.
    #[error("parent ID is required (the SPIFFE ID of the agent that serves this entry)")]
    MissingParent,
    /// The parent ID is invalid.
    #[error("invalid parent ID: {0}")]
    ParentId(SpiffeIdError),
    /// The SPIFFE or parent ID is in another trust domain.
    #[error("{0} is not in trust domain {1}")]
    ForeignTrustDomain(String, String),
    /// The SPIFFE ID is the trust domain itself or under the reserved `/tessera/` path.
    #[error("SPIFFE ID {0} is reserved for Tessera's own components")]
    Reserved(String),
    /// No selectors were given.
    #[error("at least one selector is required")]
    NoSelectors,
    /// A selector is malformed or of an unknown type.
    #[error("invalid selector: {0}")]
    Selector(SelectorError),
    /// The X509-SVID TTL is zero.
    #[error("X509-SVID TTL must be at least 1 second")]
    TtlZero,
    /// The X509-SVID TTL exceeds the configured maximum.
    #[error("X509-SVID TTL {ttl}s exceeds the maximum of {max}s")]
    TtlTooLarge {
        /// Requested.
        ttl: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The JWT-SVID TTL is zero or above the configured maximum.
    #[error("JWT-SVID TTL {ttl}s is outside 1..={max}s")]
    JwtTtl {
        /// Requested.
        ttl: u32,
        /// Configured maximum.
        max: u32,
    },
    /// A JWT audience is empty, too long, or has spaces or control characters.
    #[error("invalid JWT audience {0:?}: want 1-256 printable characters, no spaces")]
    Audience(String),
    /// Too many JWT audiences.
    #[error("an entry may list at most {MAX_JWT_AUDIENCES} JWT audiences")]
    TooManyAudiences,
    /// A label's key is empty, too long, or has characters outside
    /// `[A-Za-z0-9._/-]`.
    #[error("invalid label key {0:?}: want 1-63 characters of A-Z a-z 0-9 . _ - /")]
    LabelKey(String),
    /// A label's value is too long or has control characters.
    #[error("invalid value for label {0:?}: want at most 256 printable characters")]
    LabelValue(String),
    /// Too many labels.
    #[error("an entry may have at most {MAX_LABELS} labels")]
    TooManyLabels,
    /// A DNS name is not a valid hostname.
    #[error("invalid DNS name {0:?}")]
    DnsName(String),
    /// `expires_at` is in the past.
    #[error("expires_at is in the past")]
    AlreadyExpired,
    /// The hint is too long.
    #[error("hint is longer than 1024 bytes")]
    HintTooLong,
    /// An entry with the same SPIFFE ID, parent ID and selectors exists.
    #[error("an entry with the same SPIFFE ID, parent ID and selectors already exists: {0}")]
    Duplicate(String),
    /// No entry has this ID.
    #[error("entry {0} not found")]
    NotFound(String),
    /// An update did not name the entry.
    #[error("entry ID is required")]
    MissingId,
    /// The entry changed between the policy's decision and the write (an
    /// approval or another operator's change came first); retry.
    #[error("entry {0} changed while this update was being decided; show it and try again")]
    Changed(String),
    /// The entry has a proposal waiting; a second one is refused.
    #[error("{0}")]
    Pending(String),
    /// The SPIFFE ID is an attested agent's: an agent ID is never an entry's.
    #[error("{0} is the SPIFFE ID of an attested agent; an entry cannot have it")]
    AgentIdentity(String),
}

impl EntryError {
    /// The gRPC status code for this refusal.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Duplicate(_) => tonic::Code::AlreadyExists,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::AgentIdentity(_) | Self::Pending(_) => tonic::Code::FailedPrecondition,
            Self::Changed(_) => tonic::Code::Aborted,
            _ => tonic::Code::InvalidArgument,
        }
    }
}

/// Most audiences an entry's JWT policy may list.
pub const MAX_JWT_AUDIENCES: usize = 64;

pub use tessera_workload_api::jwt::valid_audience;

/// Most labels an entry may have.
pub const MAX_LABELS: usize = 32;

/// Whether `key` may name a label: 1-63 characters of `[A-Za-z0-9._/-]`.
pub fn valid_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

/// Whether `value` may be a label's value: at most 256 characters, none of
/// them a control character (empty is allowed).
pub fn valid_label_value(value: &str) -> bool {
    value.chars().count() <= 256 && !value.chars().any(char::is_control)
}

/// Checks an entry's labels: at most [`MAX_LABELS`], each key and value as
/// [`valid_label_key`] and [`valid_label_value`] say.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), EntryError> {
    if labels.len() > MAX_LABELS {
        return Err(EntryError::TooManyLabels);
    }
    for (key, value) in labels {
        if !valid_label_key(key) {
            return Err(EntryError::LabelKey(shorten(key)));
        }
        if !valid_label_value(value) {
            return Err(EntryError::LabelValue(shorten(key)));
        }
    }
    Ok(())
}

/// Whether `id` is reserved for Tessera's own components (the trust domain
/// itself, or under `/tessera/`): no entry ever has it.
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.is_root() || id.path().starts_with("/tessera/")
}

/// A validated registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Server-assigned ID.
    pub id: String,
    /// The identity issued.
    pub spiffe_id: SpiffeId,
    /// The agent (or other parent) that serves it.
    pub parent_id: SpiffeId,
    /// Sorted, without duplicates.
    pub selectors: Vec<Selector>,
    /// Seconds.
    pub x509_svid_ttl: u32,
    /// Extra DNS SANs.
    pub dns_names: Vec<String>,
    /// Unix seconds; 0: never.
    pub expires_at: i64,
    /// Store revision of the last write.
    pub revision: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Optional hint passed to workloads.
    pub hint: String,
    /// JWT-SVID lifetime, seconds; 0 (entries stored before JWT-SVIDs):
    /// the server's default.
    pub jwt_svid_ttl: u32,
    /// Audiences the entry may get JWT-SVIDs for, sorted; empty: any.
    pub jwt_audiences: Vec<String>,
    /// Created with `--require-approval`: it and every update to it need a
    /// second operator.
    pub require_approval: bool,
    /// Policy metadata for the token broker (its policy's principal tags);
    /// no part of any SVID.
    pub labels: BTreeMap<String, String>,
}

/// Limits applied when validating entries.
#[derive(Debug, Clone)]
pub struct EntryRules {
    /// The server's trust domain.
    pub trust_domain: TrustDomain,
    /// TTL for entries that set none.
    pub default_ttl: u32,
    /// Largest TTL allowed.
    pub max_ttl: u32,
    /// JWT-SVID TTL for entries that set none.
    pub default_jwt_ttl: u32,
    /// Largest JWT-SVID TTL allowed.
    pub max_jwt_ttl: u32,
}

impl EntryRules {
    /// The JWT-SVID lifetime for an entry's `jwt_svid_ttl` (0: the server's
    /// default), never past the server's maximum: the one place the
    /// default is applied.
    pub fn jwt_ttl(&self, entry_ttl: u32) -> u32 {
        let ttl = if entry_ttl == 0 { self.default_jwt_ttl } else { entry_ttl };
        ttl.min(self.max_jwt_ttl)
    }

    /// Validates an entry from the admin API. `id`, `revision` and
    /// `created_at` of the input are ignored; the caller sets them.
    pub fn validate(&self, input: &pb::Entry, now: i64) -> Result<Entry, EntryError> {
        let spiffe_id = SpiffeId::parse(&input.spiffe_id).map_err(EntryError::SpiffeId)?;
        if input.parent_id.is_empty() {
            return Err(EntryError::MissingParent);
        }
        let parent_id = SpiffeId::parse(&input.parent_id).map_err(EntryError::ParentId)?;
        for id in [&spiffe_id, &parent_id] {
            if id.trust_domain() != &self.trust_domain {
                return Err(EntryError::ForeignTrustDomain(
                    id.to_string(),
                    self.trust_domain.to_string(),
                ));
            }
        }
        if is_reserved(&spiffe_id) {
            return Err(EntryError::Reserved(spiffe_id.to_string()));
        }
        let selectors = input
            .selectors
            .iter()
            .map(|s| Selector::new(&s.r#type, &s.value).map_err(EntryError::Selector))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        let x509_svid_ttl = match input.x509_svid_ttl {
            None => self.default_ttl,
            Some(0) => return Err(EntryError::TtlZero),
            Some(ttl) if ttl > self.max_ttl => {
                return Err(EntryError::TtlTooLarge { ttl, max: self.max_ttl })
            }
            Some(ttl) => ttl,
        };
        for name in &input.dns_names {
            if !is_dns_name(name) {
                return Err(EntryError::DnsName(name.clone()));
            }
        }
        if tessera_common::rules::entry_expired(input.expires_at, now) {
            return Err(EntryError::AlreadyExpired);
        }
        if input.hint.len() > 1024 {
            return Err(EntryError::HintTooLong);
        }
        // 0: the server's default, resolved when signing (`jwt_ttl`).
        let jwt_svid_ttl = match input.jwt_svid_ttl {
            None => 0,
            Some(ttl) if ttl == 0 || ttl > self.max_jwt_ttl => {
                return Err(EntryError::JwtTtl { ttl, max: self.max_jwt_ttl })
            }
            Some(ttl) => ttl,
        };
        if let Some(bad) = input.jwt_audiences.iter().find(|a| !valid_audience(a)) {
            return Err(EntryError::Audience(bad.clone()));
        }
        let jwt_audiences: BTreeSet<String> = input.jwt_audiences.iter().cloned().collect();
        if jwt_audiences.len() > MAX_JWT_AUDIENCES {
            return Err(EntryError::TooManyAudiences);
        }
        check_labels(&input.labels)?;
        Ok(Entry {
            id: String::new(),
            spiffe_id,
            parent_id,
            selectors: selectors.into_iter().collect(),
            x509_svid_ttl,
            dns_names: input.dns_names.clone(),
            expires_at: input.expires_at.max(0),
            revision: 0,
            created_at: now,
            hint: input.hint.clone(),
            jwt_svid_ttl,
            jwt_audiences: jwt_audiences.into_iter().collect(),
            require_approval: input.require_approval,
            labels: input.labels.clone(),
        })
    }
}

impl Entry {
    /// The wire/storage form.
    pub fn to_proto(&self) -> pb::Entry {
        pb::Entry {
            id: self.id.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            parent_id: self.parent_id.to_string(),
            selectors: self
                .selectors
                .iter()
                .map(|s| pb::Selector {
                    r#type: s.kind().to_string(),
                    value: s.value().to_string(),
                })
                .collect(),
            x509_svid_ttl: Some(self.x509_svid_ttl),
            dns_names: self.dns_names.clone(),
            expires_at: self.expires_at,
            revision: self.revision,
            created_at: self.created_at,
            hint: self.hint.clone(),
            jwt_svid_ttl: Some(self.jwt_svid_ttl).filter(|ttl| *ttl != 0),
            jwt_audiences: self.jwt_audiences.clone(),
            pending: None,
            require_approval: self.require_approval,
            labels: self.labels.clone(),
        }
    }

    /// Reads back a stored entry (already validated when written).
    pub fn from_stored(p: pb::Entry) -> Result<Self, EntryError> {
        let selectors = p
            .selectors
            .iter()
            .map(|s| Selector::new(&s.r#type, &s.value).map_err(EntryError::Selector))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            spiffe_id: SpiffeId::parse(&p.spiffe_id).map_err(EntryError::SpiffeId)?,
            parent_id: SpiffeId::parse(&p.parent_id).map_err(EntryError::ParentId)?,
            selectors,
            x509_svid_ttl: p.x509_svid_ttl.unwrap_or(0),
            dns_names: p.dns_names,
            expires_at: p.expires_at,
            revision: p.revision,
            created_at: p.created_at,
            hint: p.hint,
            jwt_svid_ttl: p.jwt_svid_ttl.unwrap_or(0),
            jwt_audiences: p.jwt_audiences,
            require_approval: p.require_approval,
            labels: p.labels,
            id: p.id,
        })
    }

    /// Whether `other` says the same as this entry: every field but the
    /// store's (revision, creation time). An update to the same content
    /// changes nothing.
    pub fn same_content(&self, other: &Entry) -> bool {
        Entry { revision: self.revision, created_at: self.created_at, ..other.clone() } == *self
    }

    /// The key that makes two entries duplicates: SPIFFE ID, parent ID and
    /// the selector set.
    pub fn identity_key(&self) -> Vec<u8> {
        let mut key = Vec::new();
        for part in [self.spiffe_id.as_str(), self.parent_id.as_str()] {
            key.extend_from_slice(part.as_bytes());
            key.push(0);
        }
        for selector in &self.selectors {
            key.extend_from_slice(selector.to_string().as_bytes());
            key.push(0);
        }
        ring::digest::digest(&ring::digest::SHA256, &key).as_ref().to_vec()
    }

    /// Whether the entry has reached its `expires_at`.
    pub fn is_expired(&self, now: i64) -> bool {
        tessera_common::rules::entry_expired(self.expires_at, now)
    }

    /// What of this entry goes into, or authorizes, an X509-SVID.
    pub fn svid_basis(&self) -> tessera_common::rules::SvidBasis<'_> {
        tessera_common::rules::SvidBasis {
            spiffe_id: self.spiffe_id.as_str(),
            parent_id: self.parent_id.as_str(),
            dns_names: &self.dns_names,
            expires_at: self.expires_at,
            x509_svid_ttl: self.x509_svid_ttl,
        }
    }

    /// Whether this (current) entry still authorizes an SVID that was
    /// signed for `signed_for` and is valid until `svid_expires_at`
    /// ([`tessera_common::rules::SvidBasis::authorizes_svid_of`], the rule
    /// the agent's re-issuing follows too).
    pub fn authorizes_svid_of(&self, signed_for: &Entry, svid_expires_at: i64) -> bool {
        self.svid_basis().authorizes_svid_of(&signed_for.svid_basis(), svid_expires_at)
    }

    /// Whether the entry's audience policy allows a JWT-SVID for `audience`.
    pub fn allows_audience(&self, audience: &str) -> bool {
        tessera_workload_api::jwt::audience_allowed(&self.jwt_audiences, audience)
    }

    /// The X509-SVID lifetime for a signing at `now`: the entry's TTL, cut
    /// so that no credential outlives a task-scoped entry.
    pub fn svid_ttl_at(&self, now: i64) -> u32 {
        self.ttl_at(self.x509_svid_ttl, now)
    }

    /// `ttl` for a credential signed at `now`, cut so that it does not
    /// outlive a task-scoped entry (0 once the entry has expired).
    pub fn ttl_at(&self, ttl: u32, now: i64) -> u32 {
        if self.expires_at == 0 {
            return ttl;
        }
        let left = (self.expires_at - now).clamp(0, i64::from(u32::MAX));
        ttl.min(left as u32)
    }
}

/// `s` cut to 64 characters for an error message.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// Whether `name` is a DNS name an SVID may carry as a SAN.
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> EntryRules {
        EntryRules {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            default_ttl: 3600,
            max_ttl: 7200,
            default_jwt_ttl: 300,
            max_jwt_ttl: 3600,
        }
    }

    fn input() -> pb::Entry {
        pb::Entry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/tessera/agent/join_token/abc".into(),
            selectors: vec![pb::Selector { r#type: "unix".into(), value: "uid:1000".into() }],
            ..Default::default()
        }
    }

    #[test]
    fn valid_entry_gets_default_ttl() {
        let entry = rules().validate(&input(), 100).unwrap();
        assert_eq!(entry.x509_svid_ttl, 3600);
        assert_eq!(entry.created_at, 100);
    }

    #[test]
    fn each_rule_is_enforced() {
        type Case = (Box<dyn Fn(&mut pb::Entry)>, fn(&EntryError) -> bool);
        let cases: Vec<Case> = vec![
            (Box::new(|e| e.spiffe_id = "spiffe://example.org/a/../b".into()), |e| {
                matches!(e, EntryError::SpiffeId(_))
            }),
            (Box::new(|e| e.parent_id.clear()), |e| matches!(e, EntryError::MissingParent)),
            (Box::new(|e| e.parent_id = "http://x".into()), |e| {
                matches!(e, EntryError::ParentId(_))
            }),
            (Box::new(|e| e.spiffe_id = "spiffe://other.org/web".into()), |e| {
                matches!(e, EntryError::ForeignTrustDomain(..))
            }),
            (Box::new(|e| e.spiffe_id = "spiffe://example.org/tessera/server".into()), |e| {
                matches!(e, EntryError::Reserved(_))
            }),
            (Box::new(|e| e.selectors.clear()), |e| matches!(e, EntryError::NoSelectors)),
            (Box::new(|e| e.selectors[0].r#type = "k8s".into()), |e| {
                matches!(e, EntryError::Selector(_))
            }),
            (Box::new(|e| e.x509_svid_ttl = Some(0)), |e| matches!(e, EntryError::TtlZero)),
            (Box::new(|e| e.x509_svid_ttl = Some(7201)), |e| {
                matches!(e, EntryError::TtlTooLarge { .. })
            }),
            (Box::new(|e| e.dns_names.push("bad_name".into())), |e| {
                matches!(e, EntryError::DnsName(_))
            }),
            (Box::new(|e| e.expires_at = 50), |e| matches!(e, EntryError::AlreadyExpired)),
        ];
        for (mutate, expected) in cases {
            let mut e = input();
            mutate(&mut e);
            let err = rules().validate(&e, 100).unwrap_err();
            assert!(expected(&err), "unexpected {err:?}");
        }
        let mut one_second = input();
        one_second.x509_svid_ttl = Some(1);
        assert_eq!(rules().validate(&one_second, 100).unwrap().x509_svid_ttl, 1);
    }

    #[test]
    fn labels_are_checked_and_name_the_bad_label() {
        let with = |pairs: &[(&str, &str)]| {
            let mut e = input();
            e.labels = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            rules().validate(&e, 100)
        };
        let ok = with(&[("team", "finance"), ("app.example/tier-1_x", ""), ("note", "a b=c")]);
        assert_eq!(ok.unwrap().labels.len(), 3);
        let long_key = "k".repeat(63);
        let long_value = "é".repeat(256);
        assert!(with(&[(&long_key, &long_value)]).is_ok(), "limits count characters");
        for bad_key in ["", "has space", "k=v", "ünïcode", &"k".repeat(64)] {
            let err = with(&[(bad_key, "v")]).unwrap_err();
            assert_eq!(err, EntryError::LabelKey(bad_key.to_string()));
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
        }
        for bad_value in ["line\nbreak", "tab\t", "nul\0", &"v".repeat(257)] {
            let err = with(&[("team", bad_value)]).unwrap_err();
            assert_eq!(err, EntryError::LabelValue("team".into()));
            let message = err.to_string();
            assert!(message.contains("\"team\"") && !message.contains('\n'), "{message}");
        }
        let err = with(&[(&"x\n".repeat(100), "v")]).unwrap_err().to_string();
        assert!(!err.contains('\n') && err.len() < 300, "one short line: {err}");
        let many: Vec<(String, String)> =
            (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(with(&many).unwrap_err(), EntryError::TooManyLabels);
        assert!(with(&many[..MAX_LABELS]).is_ok());
    }

    #[test]
    fn labels_round_trip_through_the_stored_form() {
        use prost::Message;
        let mut e = input();
        e.labels.insert("team".into(), "finance".into());
        e.labels.insert("env".into(), "prod".into());
        let mut entry = rules().validate(&e, 100).unwrap();
        entry.id = "e1".into();
        let bytes = entry.to_proto().encode_to_vec();
        let back = Entry::from_stored(pb::Entry::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, entry);
        assert_eq!(back.labels.get("team").map(String::as_str), Some("finance"));
        // Labels are encoded sorted: the same entry always encodes the same.
        let mut reversed = e.clone();
        reversed.labels = e.labels.clone().into_iter().rev().collect();
        let mut again = rules().validate(&reversed, 100).unwrap();
        again.id = "e1".into();
        assert_eq!(again.to_proto().encode_to_vec(), bytes);
        // An entry stored before labels existed reads back with none.
        let mut old = entry.to_proto();
        old.labels.clear();
        assert!(Entry::from_stored(old).unwrap().labels.is_empty());
        // A change of labels alone is a change, but not of what an SVID says.
        let mut relabelled = entry.clone();
        relabelled.labels.insert("team".into(), "sales".into());
        assert!(!entry.same_content(&relabelled));
        assert!(relabelled.authorizes_svid_of(&entry, i64::MAX));
        assert!(relabelled.svid_basis().serves_svid_of(&entry.svid_basis()));
    }

    #[test]
    fn identity_key_ignores_selector_order() {
        let mut a = input();
        a.selectors.push(pb::Selector { r#type: "unix".into(), value: "gid:5".into() });
        let mut b = a.clone();
        b.selectors.reverse();
        let (a, b) = (rules().validate(&a, 1).unwrap(), rules().validate(&b, 1).unwrap());
        assert_eq!(a.identity_key(), b.identity_key());
    }
}
