//! What operators ask about entries and agents beyond IDs (the questions a
//! SPIRE operator asks): selector matching with SPIRE's four modes, the
//! selectors an agent's attestation proved, and which agents a purge
//! takes. Pure rules plus a paged read over the `Store` trait; the admin
//! API calls them. Depends on `entry`, `store`.

use std::collections::BTreeSet;

use tessera_proto::admin::SelectorMatch;
use tessera_proto::types as pb;

use crate::entry::Entry;
use crate::store::{EntryFilter, Store, StoreError};

/// Selectors to match and how; empty matches everything.
#[derive(Debug, Clone)]
pub struct SelectorQuery {
    /// `type:value` strings (e.g. `unix:uid:1000`).
    pub selectors: BTreeSet<String>,
    /// How they are compared.
    pub mode: SelectorMatch,
}

impl SelectorQuery {
    /// Whether a record with selectors `have` matches, as SPIRE compares
    /// them: exact = the same set; subset = `have` ⊆ given; superset =
    /// `have` ⊇ given; any = at least one in common.
    pub fn matches<'a>(&self, have: impl IntoIterator<Item = &'a str>) -> bool {
        if self.selectors.is_empty() {
            return true;
        }
        let have: BTreeSet<&str> = have.into_iter().collect();
        let given: BTreeSet<&str> = self.selectors.iter().map(String::as_str).collect();
        match self.mode {
            SelectorMatch::Exact => have == given,
            SelectorMatch::Subset => have.is_subset(&given),
            SelectorMatch::Superset => have.is_superset(&given),
            SelectorMatch::Any => !have.is_disjoint(&given),
        }
    }

    /// Whether `entry`'s selectors match.
    pub fn matches_entry(&self, entry: &Entry) -> bool {
        let have: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
        self.matches(have.iter().map(String::as_str))
    }

    /// Whether an entry as the API sends it (a proposal) matches.
    pub fn matches_proto(&self, entry: &pb::Entry) -> bool {
        let have: Vec<String> =
            entry.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect();
        self.matches(have.iter().map(String::as_str))
    }

    /// Whether `agent`'s attested selectors match.
    pub fn matches_agent(&self, agent: &pb::Agent) -> bool {
        let have = agent_selectors(agent);
        self.matches(have.iter().map(String::as_str))
    }
}

/// The selectors an agent's node attestation proved. A join token proves
/// only that its bearer had the token, so a join-token agent has the one
/// selector `tessera:attestation:join_token`; node attestors that prove
/// more (TPM, cloud instance identity) would add theirs here.
pub fn agent_selectors(agent: &pb::Agent) -> Vec<String> {
    vec![format!("tessera:attestation:{}", agent.attestation_type)]
}

/// Whether a purge with `expired_for` seconds takes `agent` at `now`: its
/// SVID expired at least that long ago, and it is not banned (a banned
/// agent's record is what keeps it from attesting again).
pub fn purgeable(agent: &pb::Agent, now: i64, expired_for: i64) -> bool {
    !agent.banned && agent.x509_svid_expires_at <= now.saturating_sub(expired_for)
}

/// One page of entries passing `filter` whose selectors match `query`,
/// after the entry ID `after`: reads the store's pages until `limit`
/// entries match or the entries end.
pub fn matching_entries(
    store: &dyn Store,
    filter: &EntryFilter,
    query: &SelectorQuery,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Entry>, StoreError> {
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_string);
    loop {
        let page = store.list_entries(filter, cursor.as_deref(), limit)?;
        let full = page.len() == limit;
        cursor = page.last().map(|e| e.id.clone());
        out.extend(page.into_iter().filter(|e| query.matches_entry(e)));
        if out.len() >= limit {
            out.truncate(limit);
            return Ok(out);
        }
        if !full {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(mode: SelectorMatch, given: &[&str]) -> SelectorQuery {
        SelectorQuery { selectors: given.iter().map(|s| s.to_string()).collect(), mode }
    }

    #[test]
    fn the_four_modes_compare_as_spire_does() {
        let have = ["unix:uid:1000", "unix:gid:50"];
        let cases = [
            (SelectorMatch::Exact, &["unix:uid:1000", "unix:gid:50"][..], true),
            (SelectorMatch::Exact, &["unix:uid:1000"][..], false),
            (SelectorMatch::Superset, &["unix:uid:1000"][..], true),
            (SelectorMatch::Superset, &["unix:uid:1000", "unix:path:/x"][..], false),
            (SelectorMatch::Subset, &["unix:uid:1000", "unix:gid:50", "unix:path:/x"][..], true),
            (SelectorMatch::Subset, &["unix:uid:1000"][..], false),
            (SelectorMatch::Any, &["unix:gid:50", "unix:path:/x"][..], true),
            (SelectorMatch::Any, &["unix:path:/x"][..], false),
        ];
        for (mode, given, want) in cases {
            assert_eq!(query(mode, given).matches(have), want, "{mode:?} {given:?}");
        }
        assert!(query(SelectorMatch::Exact, &[]).matches(have), "no selectors: everything");
    }

    #[test]
    fn a_purge_takes_unbanned_agents_expired_long_enough() {
        let agent = |expires, banned| pb::Agent {
            x509_svid_expires_at: expires,
            banned,
            ..Default::default()
        };
        assert!(purgeable(&agent(1000, false), 5000, 4000));
        assert!(!purgeable(&agent(1001, false), 5000, 4000));
        assert!(!purgeable(&agent(0, true), 5000, 0));
    }
}
