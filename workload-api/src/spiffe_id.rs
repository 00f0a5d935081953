//! SPIFFE IDs and trust domains, parsed once per the SPIFFE-ID standard.
//!
//! A [`SpiffeId`] or [`TrustDomain`] that exists is valid: every constructor
//! checks the rules, and a rejection names the rule that was broken.

use std::fmt;
use std::str::FromStr;

/// The only scheme a SPIFFE ID may have, lowercase, with the authority marker.
const SCHEME: &str = "spiffe://";

/// Longest trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Longest whole SPIFFE ID (scheme, trust domain and path), in bytes.
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain.
///
/// Each variant is one rule of the SPIFFE-ID standard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The input string is empty.
    #[error("SPIFFE ID is empty")]
    Empty,

    /// The input does not start with the lowercase scheme `spiffe://`
    /// (another scheme, an uppercase scheme, or no scheme at all).
    #[error("SPIFFE ID must start with the lowercase scheme 'spiffe://'")]
    WrongScheme,

    /// Nothing stands between `spiffe://` and the path (or the end).
    #[error("SPIFFE ID has no trust domain after 'spiffe://'")]
    MissingTrustDomain,

    /// The trust domain contains a character other than `a-z`, `0-9`, `.`,
    /// `-` and `_` (uppercase letters included).
    #[error(
        "SPIFFE ID trust domain contains {0:?} (only lowercase a-z, 0-9, '.', '-' and '_' are allowed)"
    )]
    TrustDomainChar(char),

    /// The trust domain is longer than 255 bytes.
    #[error("SPIFFE ID trust domain is {0} bytes long (at most 255 are allowed)")]
    TrustDomainTooLong(usize),

    /// The authority has a port (`:`), e.g. `spiffe://example.org:443`.
    #[error("SPIFFE ID trust domain has a port (':' is not allowed)")]
    Port,

    /// The authority has user info (`@`), e.g. `spiffe://user@example.org`.
    #[error("SPIFFE ID trust domain has user info ('@' is not allowed)")]
    UserInfo,

    /// The ID has a query part (`?`).
    #[error("SPIFFE ID has a query ('?' is not allowed)")]
    Query,

    /// The ID has a fragment part (`#`).
    #[error("SPIFFE ID has a fragment ('#' is not allowed)")]
    Fragment,

    /// The ID contains `%`: percent-encoding is not allowed anywhere.
    #[error("SPIFFE ID contains '%' (percent-encoding is not allowed)")]
    PercentEncoded,

    /// A path segment contains a character other than `a-z`, `A-Z`, `0-9`,
    /// `.`, `-` and `_`.
    #[error(
        "SPIFFE ID path contains {0:?} (path segments allow only a-z, A-Z, 0-9, '.', '-' and '_')"
    )]
    PathChar(char),

    /// The path has an empty segment (`//`).
    #[error("SPIFFE ID path has an empty segment ('//' is not allowed)")]
    EmptySegment,

    /// A path segment is `.` or `..`.
    #[error("SPIFFE ID path segment is '{0}' (dot segments are not allowed)")]
    DotSegment(String),

    /// The path ends with `/` (this includes `spiffe://example.org/`).
    #[error("SPIFFE ID path has a trailing '/'")]
    TrailingSlash,

    /// The whole ID is longer than 2048 bytes.
    #[error("SPIFFE ID is {0} bytes long (at most 2048 are allowed)")]
    TooLong(usize),

    /// [`SpiffeId::from_parts`] was given a path that does not start with `/`
    /// (an empty path included: use [`SpiffeId::root`] for that).
    #[error("SPIFFE ID path must start with '/'")]
    PathNotAbsolute,

    /// [`TrustDomain::new`] was given something with a path, e.g.
    /// `spiffe://example.org/workload` or `example.org/workload`.
    #[error("trust domain must not have a path (give 'example.org' or 'spiffe://example.org')")]
    TrustDomainWithPath,
}

/// A SPIFFE trust domain name such as `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Parses a trust domain given either as its name (`example.org`) or as
    /// its root SPIFFE ID (`spiffe://example.org`, nothing after).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.starts_with(SCHEME) {
            let id = SpiffeId::parse(s)?;
            if !id.is_root() {
                return Err(SpiffeIdError::TrustDomainWithPath);
            }
            return Ok(id.td);
        }
        if s.contains("://") {
            return Err(SpiffeIdError::WrongScheme);
        }
        check_no_uri_extras(s)?;
        if s.contains('/') {
            return Err(SpiffeIdError::TrustDomainWithPath);
        }
        validate_trust_domain(s)?;
        Ok(Self { name: s.to_owned() })
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The trust domain's root SPIFFE ID as a string, e.g.
    /// `spiffe://example.org` (the key used in Workload API bundle maps).
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.name)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TrustDomain").field(&self.name).finish()
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A valid SPIFFE ID such as `spiffe://example.org/billing/api`.
///
/// Equality and ordering are those of the ID string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    // Field order matters: the derived `Ord` compares `id` first, and the
    // other fields are functions of it.
    id: String,
    td: TrustDomain,
    /// Byte offset of the path in `id` (`id.len()` for a root ID).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, checking every rule of the SPIFFE-ID standard.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        check_no_uri_extras(rest)?;

        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;

        Ok(Self {
            id: s.to_owned(),
            td: TrustDomain { name: td.to_owned() },
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Builds the ID `spiffe://<td><path>`; `path` must start with `/` and
    /// follow the path rules.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        if !path.starts_with('/') {
            return Err(SpiffeIdError::PathNotAbsolute);
        }
        Self::parse(&format!("{SCHEME}{}{path}", td.name))
    }

    /// The root ID of a trust domain, `spiffe://<td>`.
    pub fn root(td: &TrustDomain) -> SpiffeId {
        let id = td.id_string();
        let path_start = id.len();
        Self { id, td: td.clone(), path_start }
    }

    /// The whole ID, e.g. `spiffe://example.org/billing/api`.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, e.g. `/billing/api`; empty for a root ID.
    pub fn path(&self) -> &str {
        self.id.get(self.path_start..).unwrap_or("")
    }

    /// Whether this is a trust domain's root ID (no path).
    pub fn is_root(&self) -> bool {
        self.path_start >= self.id.len()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.id).finish()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Rejects URI features SPIFFE IDs never have, wherever they appear, so the
/// error names them rather than a bad character.
fn check_no_uri_extras(rest: &str) -> Result<(), SpiffeIdError> {
    if rest.contains('#') {
        return Err(SpiffeIdError::Fragment);
    }
    if rest.contains('?') {
        return Err(SpiffeIdError::Query);
    }
    if rest.contains('%') {
        return Err(SpiffeIdError::PercentEncoded);
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if authority.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    Ok(())
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    match td.chars().find(|&c| !is_trust_domain_char(c)) {
        Some(c) => Err(SpiffeIdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

/// Checks a path that is empty (root ID) or starts with `/`.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    let Some(segments) = path.strip_prefix('/') else {
        return Ok(());
    };
    let mut segments = segments.split('/').peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        match segment {
            "" if is_last => return Err(SpiffeIdError::TrailingSlash),
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment(segment.to_owned())),
            _ => {
                if let Some(c) = segment.chars().find(|&c| !is_path_char(c)) {
                    return Err(SpiffeIdError::PathChar(c));
                }
            }
        }
    }
    Ok(())
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(s: &str) -> SpiffeIdError {
        SpiffeId::parse(s).expect_err(s)
    }

    #[test]
    fn parses_a_valid_id() {
        let id = SpiffeId::parse("spiffe://example.org/billing/api-v2_1.x").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/billing/api-v2_1.x");
        assert!(!id.is_root());
        assert_eq!(id.to_string(), "spiffe://example.org/billing/api-v2_1.x");
        assert_eq!(id.as_str(), "spiffe://example.org/billing/api-v2_1.x");
    }

    #[test]
    fn parses_a_root_id() {
        let id: SpiffeId = "spiffe://example.org".parse().unwrap();
        assert!(id.is_root());
        assert_eq!(id.path(), "");
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(SpiffeId::root(&td), id);
    }

    #[test]
    fn path_segments_may_contain_dots_and_uppercase() {
        assert!(SpiffeId::parse("spiffe://example.org/.../A.b/..x").is_ok());
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(err(""), SpiffeIdError::Empty);
    }

    #[test]
    fn rejects_wrong_or_missing_scheme() {
        assert_eq!(err("https://example.org/a"), SpiffeIdError::WrongScheme);
        assert_eq!(err("SPIFFE://example.org/a"), SpiffeIdError::WrongScheme);
        assert_eq!(err("Spiffe://example.org/a"), SpiffeIdError::WrongScheme);
        assert_eq!(err("example.org/a"), SpiffeIdError::WrongScheme);
        assert_eq!(err("spiffe:/example.org/a"), SpiffeIdError::WrongScheme);
    }

    #[test]
    fn rejects_missing_trust_domain() {
        assert_eq!(err("spiffe://"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(err("spiffe:///path"), SpiffeIdError::MissingTrustDomain);
    }

    #[test]
    fn rejects_bad_trust_domain_chars() {
        assert_eq!(err("spiffe://Example.org/a"), SpiffeIdError::TrustDomainChar('E'));
        assert_eq!(err("spiffe://exa mple.org"), SpiffeIdError::TrustDomainChar(' '));
        assert_eq!(err("spiffe://exämple.org"), SpiffeIdError::TrustDomainChar('ä'));
    }

    #[test]
    fn rejects_long_trust_domain() {
        let td = "a".repeat(256);
        assert_eq!(err(&format!("spiffe://{td}/x")), SpiffeIdError::TrustDomainTooLong(256));
        assert!(SpiffeId::parse(&format!("spiffe://{}/x", "a".repeat(255))).is_ok());
    }

    #[test]
    fn rejects_port() {
        assert_eq!(err("spiffe://example.org:8443/a"), SpiffeIdError::Port);
    }

    #[test]
    fn rejects_userinfo() {
        assert_eq!(err("spiffe://user@example.org/a"), SpiffeIdError::UserInfo);
        assert_eq!(err("spiffe://user:pw@example.org/a"), SpiffeIdError::UserInfo);
    }

    #[test]
    fn rejects_query() {
        assert_eq!(err("spiffe://example.org/a?x=1"), SpiffeIdError::Query);
        assert_eq!(err("spiffe://example.org?x=1"), SpiffeIdError::Query);
    }

    #[test]
    fn rejects_fragment() {
        assert_eq!(err("spiffe://example.org/a#frag"), SpiffeIdError::Fragment);
    }

    #[test]
    fn rejects_percent_encoding() {
        assert_eq!(err("spiffe://example.org/a%20b"), SpiffeIdError::PercentEncoded);
        assert_eq!(err("spiffe://ex%41mple.org"), SpiffeIdError::PercentEncoded);
    }

    #[test]
    fn rejects_bad_path_chars() {
        assert_eq!(err("spiffe://example.org/a b"), SpiffeIdError::PathChar(' '));
        assert_eq!(err("spiffe://example.org/a/b*"), SpiffeIdError::PathChar('*'));
        assert_eq!(err("spiffe://example.org/ä"), SpiffeIdError::PathChar('ä'));
    }

    #[test]
    fn rejects_empty_segment() {
        assert_eq!(err("spiffe://example.org//a"), SpiffeIdError::EmptySegment);
        assert_eq!(err("spiffe://example.org/a//b"), SpiffeIdError::EmptySegment);
    }

    #[test]
    fn rejects_dot_segments() {
        assert_eq!(err("spiffe://example.org/a/./b"), SpiffeIdError::DotSegment(".".into()));
        assert_eq!(err("spiffe://example.org/a/.."), SpiffeIdError::DotSegment("..".into()));
        assert_eq!(
            err("spiffe://example.org/a/..").to_string(),
            "SPIFFE ID path segment is '..' (dot segments are not allowed)"
        );
    }

    #[test]
    fn rejects_trailing_slash() {
        assert_eq!(err("spiffe://example.org/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://example.org/a/"), SpiffeIdError::TrailingSlash);
    }

    #[test]
    fn rejects_long_id() {
        let prefix = "spiffe://example.org/";
        let ok = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert!(SpiffeId::parse(&ok).is_ok());
        let long = format!("{ok}b");
        assert_eq!(err(&long), SpiffeIdError::TooLong(MAX_ID_LEN + 1));
    }

    #[test]
    fn from_parts_builds_and_validates() {
        let td = TrustDomain::new("example.org").unwrap();
        let id = SpiffeId::from_parts(&td, "/tessera/server").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/tessera/server");
        assert_eq!(SpiffeId::from_parts(&td, "tessera"), Err(SpiffeIdError::PathNotAbsolute));
        assert_eq!(SpiffeId::from_parts(&td, ""), Err(SpiffeIdError::PathNotAbsolute));
        assert_eq!(
            SpiffeId::from_parts(&td, "/a/../b"),
            Err(SpiffeIdError::DotSegment("..".into()))
        );
        assert_eq!(SpiffeId::from_parts(&td, "/a?b"), Err(SpiffeIdError::Query));
    }

    #[test]
    fn trust_domain_accepts_name_or_root_id() {
        let a = TrustDomain::new("example.org").unwrap();
        let b: TrustDomain = "spiffe://example.org".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "example.org");
        assert_eq!(a.to_string(), "example.org");
        assert_eq!(a.id_string(), "spiffe://example.org");
    }

    #[test]
    fn trust_domain_rejects_bad_input() {
        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::Empty));
        assert_eq!(
            TrustDomain::new("spiffe://example.org/a"),
            Err(SpiffeIdError::TrustDomainWithPath)
        );
        assert_eq!(TrustDomain::new("example.org/a"), Err(SpiffeIdError::TrustDomainWithPath));
        assert_eq!(TrustDomain::new("spiffe://example.org/"), Err(SpiffeIdError::TrailingSlash));
        assert_eq!(TrustDomain::new("https://example.org"), Err(SpiffeIdError::WrongScheme));
        assert_eq!(TrustDomain::new("Example.org"), Err(SpiffeIdError::TrustDomainChar('E')));
        assert_eq!(TrustDomain::new("example.org:1"), Err(SpiffeIdError::Port));
        assert_eq!(TrustDomain::new("a@example.org"), Err(SpiffeIdError::UserInfo));
        assert_eq!(TrustDomain::new(&"a".repeat(256)), Err(SpiffeIdError::TrustDomainTooLong(256)));
    }

    #[test]
    fn errors_name_the_rule() {
        assert!(err("spiffe://example.org/a/").to_string().contains("trailing '/'"));
        assert!(err("spiffe://example.org:1").to_string().contains("port"));
        assert!(err("spiffe://Example.org").to_string().contains("only lowercase"));
    }

    fn trust_domain_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,64}"
    }

    fn segment_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,16}".prop_filter("dot segment", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = SpiffeId::parse(&s);
            let _ = TrustDomain::new(&s);
        }

        #[test]
        fn parse_never_panics_on_near_ids(s in "spiffe://[a-zA-Z0-9./:@?#%_-]{0,40}") {
            let _ = SpiffeId::parse(&s);
            let _ = TrustDomain::new(&s);
        }

        #[test]
        fn valid_ids_round_trip(
            td in trust_domain_strategy(),
            segments in proptest::collection::vec(segment_strategy(), 0..8),
        ) {
            let path: String = segments.iter().map(|s| format!("/{s}")).collect();
            let text = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&text).unwrap();
            prop_assert_eq!(id.to_string(), text.clone());
            prop_assert_eq!(id.trust_domain().as_str(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
            prop_assert_eq!(id.is_root(), segments.is_empty());
            let again: SpiffeId = id.to_string().parse().unwrap();
            prop_assert_eq!(&again, &id);
            let td = TrustDomain::new(&td).unwrap();
            if path.is_empty() {
                prop_assert_eq!(SpiffeId::root(&td), id);
            } else {
                prop_assert_eq!(SpiffeId::from_parts(&td, &path).unwrap(), id);
            }
        }

        #[test]
        fn whatever_parses_redisplays_identically(s in "spiffe://[a-z.]{0,6}(/[a-zA-Z.%?]{0,3}){0,4}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s.clone());
                prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
            }
        }
    }
}
