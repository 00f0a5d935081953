//! The server's `/metrics` and `/ready`: the gauges read from the state
//! at scrape time, and ready when it serves with a current (unexpired) CA
//! and its datastore answers.

use std::sync::{Arc, OnceLock};

use crate::metrics::ScrapeGauges;
use crate::state::State;
use crate::telemetry;

/// `/metrics` and `/ready` for the server.
#[derive(Debug)]
pub struct ServerHealth {
    /// The state, set once the server runs.
    pub state: OnceLock<Arc<State>>,
}

/// The gauges read at scrape time.
fn gauges(state: &State) -> ScrapeGauges {
    let now = state.clock().now();
    ScrapeGauges {
        ca_expires_in: state.ca().active_not_after() - now,
        jwt_key_expires_in: state.ca().active_not_after() - now,
        entries: state.store().entry_count(),
        pending: state.governance().pending_count(),
        agents: state.store().agents().ok().map(|a| a.len()),
        revision: state.store().revision().ok(),
    }
}

impl telemetry::Health for ServerHealth {
    fn metrics(&self) -> String {
        match self.state.get() {
            Some(state) => state.metrics().render(&gauges(state)),
            None => String::new(),
        }
    }

    fn ready(&self) -> Result<(), String> {
        let state = self.state.get().ok_or("server is starting")?;
        if state.shutdown().is_cancelled() {
            return Err("server is shutting down".into());
        }
        if state.ca().active_not_after() <= state.clock().now() {
            return Err("the CA has expired".into());
        }
        if let Some(error) = state.feed().store_error() {
            return Err(format!("the datastore fails: {error}"));
        }
        Ok(())
    }
}
