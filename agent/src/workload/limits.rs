//! What one caller of the Workload API may hold: its connections and
//! streams per uid, and the HTTP/2 sizes that bound what a connection can
//! make the agent buffer before any handler runs.

use std::collections::HashMap;
use std::sync::Arc;

use crate::workload::executable::HashLimits;

/// Largest request message the Workload API decodes (its requests are a
/// few hundred bytes: audiences, a token to validate). Larger ones are
/// refused from the gRPC length prefix, before they are buffered.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest HTTP/2 header list a request may carry (SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// HTTP/2 flow-control windows the agent grants: what one stream, and one
/// connection, can make it buffer before the handler reads.
pub const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// See [`STREAM_WINDOW_BYTES`].
pub const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;

/// Per-caller limits of the Workload API.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadLimits {
    /// Open connections per caller uid; connections past it are closed at
    /// accept, before anything is read from them.
    pub connections_per_uid: usize,
    /// Open calls (streams) per caller uid, all connections together.
    pub streams_per_uid: usize,
    /// Concurrent streams per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub streams_per_connection: u32,
    /// Executable hashing: size limit and concurrency.
    pub hashing: HashLimits,
    /// JWT-SVIDs per second each caller uid may have the server sign (cache
    /// misses: new identities or audiences), after a burst of
    /// `jwt_signing_burst`; past it, `ResourceExhausted`. One workload
    /// asking for endless new audiences cannot use up the agent's signing
    /// budget at the server.
    pub jwt_signings_per_uid: u32,
    /// See `jwt_signings_per_uid`.
    pub jwt_signing_burst: u32,
}

impl Default for WorkloadLimits {
    fn default() -> Self {
        Self {
            connections_per_uid: 64,
            streams_per_uid: 256,
            streams_per_connection: 32,
            hashing: HashLimits::default(),
            jwt_signings_per_uid: 50,
            jwt_signing_burst: 500,
        }
    }
}

/// Counts what each uid holds open; a [`UidSlot`] gives its unit back on drop.
#[derive(Debug, Clone, Default)]
pub(crate) struct PerUid(Arc<std::sync::Mutex<HashMap<u32, usize>>>);

#[derive(Debug)]
pub(crate) struct UidSlot {
    counts: PerUid,
    uid: u32,
}

impl PerUid {
    pub(crate) fn try_take(&self, uid: u32, limit: usize) -> Option<UidSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(uid).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UidSlot { counts: self.clone(), uid })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}
