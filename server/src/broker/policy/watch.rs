//! Reloading on change: the policy files' and the resources file's
//! modification times and sizes, polled, and SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::load::watched_files;
use super::PolicyEngine;

/// What the watcher compares: each file with its mtime and size (`None`: unreadable).
type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn fingerprint(engine: &PolicyEngine) -> Fingerprint {
    watched_files(&engine.dir, engine.resources.as_deref())
        .into_iter()
        .map(|p| {
            let stamp =
                std::fs::metadata(&p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
            (p, stamp)
        })
        .collect()
}

/// Reloads and logs one line.
fn reload_and_log(engine: &PolicyEngine, why: &str) {
    match engine.reload() {
        Ok(s) => tracing::info!(
            "broker policy reloaded ({why}): {} policies, {} resources",
            s.policies,
            s.resources
        ),
        Err(e) => {
            tracing::error!("broker policy reload refused ({why}), the set in force stays: {e}")
        }
    }
}

/// See [`PolicyEngine::watch`].
impl PolicyEngine {
    /// Reloads the set when a policy file or the resources file
    /// changes — modification times and sizes polled every `every` — or on
    /// SIGHUP, logging one line per reload (its summary or the error);
    /// runs until `shutdown`.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        watch(self, every, shutdown).await;
    }
}

async fn watch(engine: Arc<PolicyEngine>, every: Duration, shutdown: CancellationToken) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("broker policy: no SIGHUP reload ({e}); polling files only");
            None
        }
    };
    let mut seen = fingerprint(&engine);
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await; // the first tick is immediate
    loop {
        let why = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let now = fingerprint(&engine);
                if now == seen {
                    continue;
                }
                seen = now;
                "files changed"
            }
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                seen = fingerprint(&engine);
                "SIGHUP"
            }
        };
        reload_and_log(&engine, why);
    }
}
