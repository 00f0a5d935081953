//! Selectors: `type:value` facts about a workload (e.g. `unix:uid:1000`) that
//! registration entries require and workload attestors produce.

use std::fmt;
use std::str::FromStr;

/// Longest selector (`type:value`), in bytes.
const MAX_SELECTOR_LEN: usize = 1024;

/// The selector type of the Unix workload attestor, the one Tessera ships.
const UNIX: &str = "unix";

/// Why a string is not a valid selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// The selector is the empty string.
    #[error("selector is empty (expected 'type:value', e.g. 'unix:uid:1000')")]
    Empty,

    /// The selector is longer than 1024 bytes.
    #[error("selector is {0} bytes long (at most 1024 are allowed)")]
    TooLong(usize),

    /// The selector contains whitespace or a control character.
    #[error("selector contains {0:?} (whitespace and control characters are not allowed)")]
    InvalidChar(char),

    /// There is no `:` between the type and the value.
    #[error(
        "selector has no ':' between type and value (expected 'type:value', e.g. 'unix:uid:1000')"
    )]
    MissingSeparator,

    /// The type (before the first `:`) is empty.
    #[error("selector type is empty (expected 'type:value', e.g. 'unix:uid:1000')")]
    EmptyType,

    /// The value (after the first `:`) is empty.
    #[error("selector value is empty (expected 'type:value', e.g. 'unix:uid:1000')")]
    EmptyValue,

    /// The type is not one a Tessera attestor produces (only `unix` is).
    #[error("unknown selector type '{0}' (the only known type is 'unix')")]
    UnknownType(String),

    /// The `unix` value starts with a key the Unix attestor does not produce.
    #[error(
        "unknown unix selector key '{0}' (known: uid, gid, user, group, supplementary_gid, path, sha256)"
    )]
    UnknownKey(String),

    /// The value of a known key is malformed (not a canonical number, not an
    /// absolute path, not 64 lowercase hex digits, empty, or missing).
    #[error("invalid value for unix selector key '{key}': {reason}")]
    InvalidValue {
        /// The `unix` key whose value is wrong, e.g. `uid`.
        key: String,
        /// What the value must look like.
        reason: String,
    },
}

/// What a selector narrows a workload down to: the one rule that says what a
/// set of selectors *matches*, used by the server's approval policy for
/// every selector kind (so `unix:user:root` and `unix:uid:0` are judged
/// alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SelectorScope {
    /// A user or group (`uid`, `gid`, `user`, `group`, `supplementary_gid`):
    /// every process that user or group runs matches. `root` is set when it
    /// names uid or gid 0 (by number, or by the name `root`).
    Principal {
        /// Names uid 0 or gid 0.
        root: bool,
    },
    /// The program (`path`, `sha256`): only processes running that
    /// executable match (what that proves: the README, "What process
    /// attestation proves").
    Program,
}

/// A validated selector: a type (`unix`) and a value (`uid:1000`).
///
/// Displays as `type:value`; equality is exact string equality, the way
/// entries are matched against what an attestor found.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Parses `type:value`; the value may itself contain `:`
    /// (`unix:uid:1000` is type `unix`, value `uid:1000`).
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.is_empty() {
            return Err(SelectorError::Empty);
        }
        check_text(s)?;
        let (kind, value) = s.split_once(':').ok_or(SelectorError::MissingSeparator)?;
        Self::validated(kind, value)
    }

    /// Builds a selector from its type and value, with the same checks as
    /// [`Selector::parse`].
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Result<Self, SelectorError> {
        let (kind, value) = (kind.into(), value.into());
        let len = kind.len() + 1 + value.len();
        if len > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong(len));
        }
        check_text(&kind)?;
        check_text(&value)?;
        if kind.contains(':') {
            return Err(SelectorError::UnknownType(kind));
        }
        Self::validated(&kind, &value)
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The selector value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// What this selector narrows a workload down to.
    pub fn scope(&self) -> SelectorScope {
        let (key, v) = self.value.split_once(':').unwrap_or((self.value.as_str(), ""));
        match key {
            "path" | "sha256" => SelectorScope::Program,
            "uid" | "gid" | "supplementary_gid" => SelectorScope::Principal { root: v == "0" },
            "user" | "group" => SelectorScope::Principal { root: v == "root" },
            // Unknown keys never pass validation; judged as the widest
            // scope should one ever get here.
            _ => SelectorScope::Principal { root: false },
        }
    }

    /// Whether every selector in `required` is also in `have`: an entry
    /// requiring `required` matches a workload attested with `have`.
    pub fn all_present(required: &[Selector], have: &[Selector]) -> bool {
        required.iter().all(|r| have.contains(r))
    }

    /// Checks type and value of already-length/char-checked text.
    fn validated(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty() {
            return Err(SelectorError::EmptyType);
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if kind != UNIX {
            return Err(SelectorError::UnknownType(kind.to_owned()));
        }
        validate_unix(value)?;
        Ok(Self { kind: kind.to_owned(), value: value.to_owned() })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Length and character rules shared by every selector.
fn check_text(s: &str) -> Result<(), SelectorError> {
    if s.len() > MAX_SELECTOR_LEN {
        return Err(SelectorError::TooLong(s.len()));
    }
    match s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        Some(c) => Err(SelectorError::InvalidChar(c)),
        None => Ok(()),
    }
}

/// Checks a `unix` selector value, `key:value`.
fn validate_unix(value: &str) -> Result<(), SelectorError> {
    let (key, v) = match value.split_once(':') {
        Some(kv) => kv,
        None => (value, ""),
    };
    let invalid = |reason: &str| SelectorError::InvalidValue {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    match key {
        "uid" | "gid" | "supplementary_gid" => {
            if !is_canonical_u32(v) {
                return Err(invalid(
                    "must be a decimal number from 0 to 4294967295 without sign or leading zeros",
                ));
            }
        }
        "user" | "group" => {
            if v.is_empty() {
                return Err(invalid("must be a non-empty name"));
            }
        }
        "path" => {
            if !v.starts_with('/') {
                return Err(invalid("must be an absolute path starting with '/'"));
            }
        }
        "sha256" => {
            let is_hex = v.len() == 64
                && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !is_hex {
                return Err(invalid("must be exactly 64 lowercase hex digits"));
            }
        }
        _ => return Err(SelectorError::UnknownKey(key.to_owned())),
    }
    Ok(())
}

/// Whether `s` is the one decimal spelling of a `u32`, so that equal numbers
/// are equal selectors (`uid:7`, never `uid:007` or `uid:+7`).
fn is_canonical_u32(s: &str) -> bool {
    let digits_only = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let no_leading_zero = s == "0" || !s.starts_with('0');
    digits_only && no_leading_zero && s.parse::<u32>().is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    fn err(s: &str) -> SelectorError {
        Selector::parse(s).expect_err(s)
    }

    fn invalid_key(s: &str) -> String {
        match err(s) {
            SelectorError::InvalidValue { key, .. } => key,
            other => panic!("{s}: expected InvalidValue, got {other:?}"),
        }
    }

    #[test]
    fn parses_type_and_value_with_colons() {
        let s = sel("unix:uid:1000");
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
        let t: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!(s, t);
    }

    #[test]
    fn new_matches_parse() {
        assert_eq!(Selector::new("unix", "gid:0").unwrap(), sel("unix:gid:0"));
        assert_eq!(
            Selector::new("unix", "uid:x"),
            Err(SelectorError::InvalidValue {
                key: "uid".into(),
                reason:
                    "must be a decimal number from 0 to 4294967295 without sign or leading zeros"
                        .into()
            })
        );
        assert_eq!(Selector::new("", "uid:1"), Err(SelectorError::EmptyType));
        assert_eq!(Selector::new("unix", ""), Err(SelectorError::EmptyValue));
        assert!(matches!(Selector::new("unix:uid", "1"), Err(SelectorError::UnknownType(_))));
        assert_eq!(Selector::new("unix", "a".repeat(1020)), Err(SelectorError::TooLong(1025)));
    }

    #[test]
    fn accepts_every_unix_key() {
        for s in [
            "unix:uid:0",
            "unix:uid:4294967295",
            "unix:gid:1000",
            "unix:user:alice",
            "unix:group:wheel",
            "unix:supplementary_gid:27",
            "unix:path:/usr/bin/curl",
            "unix:sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert_eq!(sel(s).to_string(), s);
        }
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(err(""), SelectorError::Empty);
    }

    #[test]
    fn rejects_empty_type_and_value() {
        assert_eq!(err(":uid:1"), SelectorError::EmptyType);
        assert_eq!(err("unix:"), SelectorError::EmptyValue);
    }

    #[test]
    fn rejects_missing_separator() {
        assert_eq!(err("unix"), SelectorError::MissingSeparator);
    }

    #[test]
    fn rejects_whitespace_and_control_chars() {
        assert_eq!(err("unix:uid: 1"), SelectorError::InvalidChar(' '));
        assert_eq!(err("unix:user:a\tb"), SelectorError::InvalidChar('\t'));
        assert_eq!(err("unix:user:a\u{0}"), SelectorError::InvalidChar('\u{0}'));
        assert_eq!(err("unix:user:a\n"), SelectorError::InvalidChar('\n'));
    }

    #[test]
    fn rejects_too_long() {
        let s = format!("unix:user:{}", "a".repeat(1015));
        assert_eq!(err(&s), SelectorError::TooLong(1025));
        let ok = format!("unix:user:{}", "a".repeat(1014));
        assert!(Selector::parse(&ok).is_ok());
    }

    #[test]
    fn rejects_unknown_type() {
        assert_eq!(err("k8s:ns:default"), SelectorError::UnknownType("k8s".into()));
        assert_eq!(err("UNIX:uid:1"), SelectorError::UnknownType("UNIX".into()));
    }

    #[test]
    fn rejects_unknown_unix_key() {
        assert_eq!(err("unix:pid:1"), SelectorError::UnknownKey("pid".into()));
        assert_eq!(err("unix:foo"), SelectorError::UnknownKey("foo".into()));
    }

    #[test]
    fn rejects_bad_ids() {
        for s in [
            "unix:uid:",
            "unix:uid",
            "unix:uid:-1",
            "unix:uid:+1",
            "unix:uid:01",
            "unix:uid:4294967296",
            "unix:uid:abc",
        ] {
            assert_eq!(invalid_key(s), "uid", "{s}");
        }
        assert_eq!(invalid_key("unix:gid:x"), "gid");
        assert_eq!(invalid_key("unix:supplementary_gid:1.5"), "supplementary_gid");
    }

    #[test]
    fn rejects_empty_names() {
        assert_eq!(invalid_key("unix:user:"), "user");
        assert_eq!(invalid_key("unix:group"), "group");
    }

    #[test]
    fn rejects_relative_path() {
        assert_eq!(invalid_key("unix:path:bin/sh"), "path");
        assert_eq!(invalid_key("unix:path:"), "path");
    }

    #[test]
    fn rejects_bad_sha256() {
        let good = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(invalid_key(&format!("unix:sha256:{}", &good[1..])), "sha256");
        assert_eq!(invalid_key(&format!("unix:sha256:{good}0")), "sha256");
        assert_eq!(invalid_key(&format!("unix:sha256:{}", good.to_uppercase())), "sha256");
        assert_eq!(invalid_key(&format!("unix:sha256:{}g", &good[1..])), "sha256");
    }

    #[test]
    fn errors_name_the_rule() {
        assert!(err("unix:uid:01").to_string().contains("leading zeros"));
        assert!(err("k8s:x").to_string().contains("unknown selector type"));
        assert!(err("unix").to_string().contains("no ':'"));
    }

    #[test]
    fn all_present_is_subset() {
        let have = [sel("unix:uid:1000"), sel("unix:gid:1000"), sel("unix:user:a")];
        assert!(Selector::all_present(&[], &have));
        assert!(Selector::all_present(&[sel("unix:uid:1000")], &have));
        assert!(Selector::all_present(&[sel("unix:user:a"), sel("unix:uid:1000")], &have));
        assert!(!Selector::all_present(&[sel("unix:uid:1000"), sel("unix:gid:0")], &have));
        assert!(!Selector::all_present(&[sel("unix:uid:1000")], &[]));
    }

    #[test]
    fn scope_judges_every_spelling_of_a_user_or_group_alike() {
        for root in [
            "unix:uid:0",
            "unix:gid:0",
            "unix:supplementary_gid:0",
            "unix:user:root",
            "unix:group:root",
        ] {
            let s = Selector::parse(root).unwrap();
            assert_eq!(s.scope(), SelectorScope::Principal { root: true }, "{root}");
        }
        for user in ["unix:uid:65534", "unix:user:nobody", "unix:group:staff", "unix:gid:5"] {
            let s = Selector::parse(user).unwrap();
            assert_eq!(s.scope(), SelectorScope::Principal { root: false }, "{user}");
        }
        let hash = format!("unix:sha256:{}", "a".repeat(64));
        for program in ["unix:path:/usr/bin/true", hash.as_str()] {
            assert_eq!(Selector::parse(program).unwrap().scope(), SelectorScope::Program);
        }
    }
}
