//! What a commit tells the event log: the [`Audit`] a mutating store
//! method takes (who acts, the events of the outcome), and the
//! [`EventSink`] that chains them into the log inside the commit.

use std::fmt;

use tessera_proto::types as pb;

use super::error::StoreError;
use super::kv::Txn;

/// Builds a commit's events from its outcome.
type Describe<'a, T> = Box<dyn Fn(&T) -> Vec<pb::Event> + Send + 'a>;

/// Who a commit acts for, and the events that describe its outcome: they
/// are chained into the event log inside the same commit as the change
/// (with an event per revocation the commit makes), so that no committed
/// change exists without its event, whatever happens after the commit.
pub struct Audit<'a, T> {
    /// The operator the change is made for (`None`: the server or an agent).
    pub operator: Option<pb::Operator>,
    /// The events describing the commit's outcome (not its revocations).
    describe: Describe<'a, T>,
}

impl<'a, X, Y> Audit<'a, Result<X, Y>> {
    /// These events if the commit does what was asked (none if it refuses).
    pub fn if_ok(operator: Option<pb::Operator>, events: Vec<pb::Event>) -> Self {
        Self::new(
            operator,
            move |r: &Result<X, Y>| if r.is_ok() { events.clone() } else { Vec::new() },
        )
    }
}

impl<'a> Audit<'a, bool> {
    /// These events if the commit did it (true).
    pub fn if_done(operator: Option<pb::Operator>, events: Vec<pb::Event>) -> Self {
        Self::new(operator, move |done: &bool| if *done { events.clone() } else { Vec::new() })
    }
}

impl<T> fmt::Debug for Audit<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit").field("operator", &self.operator).finish_non_exhaustive()
    }
}

impl<'a, T> Audit<'a, T> {
    /// Events `describe` builds from the commit's outcome, made for `operator`.
    pub fn new(
        operator: Option<pb::Operator>,
        describe: impl Fn(&T) -> Vec<pb::Event> + Send + 'a,
    ) -> Self {
        Self { operator, describe: Box::new(describe) }
    }

    /// These events, whatever the outcome (a change that cannot be refused).
    pub fn events(operator: Option<pb::Operator>, events: Vec<pb::Event>) -> Self {
        Self::new(operator, move |_| events.clone())
    }

    /// A commit with no event of its own (its revocations still get theirs).
    pub fn quiet() -> Self {
        Self::new(None, |_| Vec::new())
    }

    /// The events of the commit's outcome.
    pub(super) fn describe(&self, outcome: &T) -> Vec<pb::Event> {
        (self.describe)(outcome)
    }
}

/// Where commits chain their events: the event log, written inside the
/// commit's transaction (which holds the event lock too).
pub trait EventSink: Send + Sync + fmt::Debug {
    /// Chains `events` (and what they reveal) into the log in `tx`; returns
    /// them as stored (none when the log is off).
    fn chain_in(&self, tx: &Txn<'_>, events: Vec<pb::Event>) -> Result<Vec<pb::Event>, StoreError>;
    /// Called once the commit that chained `stored` is durable.
    fn committed(&self, stored: &[pb::Event]);
}
