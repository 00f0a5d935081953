//! The X.509 signer: keeps an SVID for every entry the agent serves (new
//! entries at once, renewal at half-life ± 10 % jitter), drops SVIDs that
//! expire while the server is away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_proto::node as pb;
use tessera_proto::Refusal;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::identity::new_key_and_csr;
use crate::node::link::{Next, NodeLink};
use crate::node::standing::Call;
use crate::schedule::{renew_point, Backoff};
use crate::svid::cache::{AgentEntry, Cache, CachedSvid};
use crate::svid::{ItemOutcome, SIGN_BATCH};

/// Wait before retrying an entry whose signing failed.
const SIGN_RETRY_SECS: i64 = 5;

/// Keeps an SVID for every entry: signs new entries at once and renews at
/// half-life; drops SVIDs that expire (e.g. while the server is down).
pub async fn signer_loop(
    link: Arc<NodeLink>,
    cache: Cache,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut retry_at: HashMap<String, i64> = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let now = link.clock.now();
        cache.update(|s| {
            let before = s.svids.len();
            s.svids.retain(|_, svid| svid.expires_at > now);
            before != s.svids.len()
        });
        let state = cache.state();
        retry_at.retain(|id, at| *at > now && state.entries.contains_key(id));
        let due: Vec<Arc<AgentEntry>> = if state.ready {
            state
                .entries
                .values()
                .filter(|e| e.expires_at == 0 || e.expires_at > now)
                // Renew at the renewal point, unless the SVID already runs to
                // the entry's expiry: a new one could not last longer.
                .filter(|e| {
                    state.svids.get(&e.id).is_none_or(|s| {
                        s.renew_at <= now && (e.expires_at == 0 || s.expires_at < e.expires_at)
                    })
                })
                .filter(|e| !retry_at.contains_key(&e.id))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let mut wait = Duration::from_secs(3600);
        if !due.is_empty() {
            match sign(&link, &cache, &due, &mut retry_at).await {
                Ok(Again::Later) => backoff.reset(),
                Ok(Again::Now) => {
                    // Items refused for the agent SVID being replaced:
                    // signed again at once with the new one.
                    backoff.reset();
                    continue;
                }
                Err((e, next)) => {
                    if next != Next::Dead {
                        warn!(error = %e, entries = due.len(), "SVID signing failed; will retry");
                    }
                    link.fail_over();
                    wait = backoff.next_delay();
                }
            }
        }
        let state = cache.state();
        let now = link.clock.now();
        let next = state
            .svids
            .values()
            .flat_map(|s| {
                let capped = state.entries.get(&s.entry_id).is_some_and(|e| {
                    tessera_common::rules::entry_expired(e.expires_at, s.expires_at)
                });
                [if capped { s.expires_at } else { s.renew_at }, s.expires_at]
            })
            .chain(retry_at.values().copied())
            .min();
        if let Some(next) = next {
            wait = wait.min(Duration::from_secs((next - now).max(0) as u64));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = link.clock.sleep(wait) => {}
        }
    }
}

/// Whether [`sign`] left entries to sign again at once.
enum Again {
    Now,
    Later,
}

async fn sign(
    link: &NodeLink,
    cache: &Cache,
    due: &[Arc<AgentEntry>],
    retry_at: &mut HashMap<String, i64>,
) -> Result<Again, (String, Next)> {
    let mut again = Again::Later;
    for chunk in due.chunks(SIGN_BATCH) {
        let entries = chunk.to_vec();
        let prepared = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .map(|e| new_key_and_csr().map(|(key, csr)| (e, key, csr)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| (e.to_string(), Next::BackOff))?
        .map_err(|e| (e.to_string(), Next::BackOff))?;
        let items: Vec<pb::SignX509Item> = prepared
            .iter()
            .map(|(e, _, csr)| pb::SignX509Item { entry_id: e.id.clone(), csr: csr.clone() })
            .collect();
        let (response, used) = link
            .call(Call::Sign, |mut client| {
                let items = items.clone();
                async move { client.sign_x509(pb::SignX509Request { items }).await }
            })
            .await
            .map_err(|(failure, next)| (failure.message, next))?;
        // Renewed while the server signed: the link's rule says whether to
        // sign these again at once (with the new SVID) or in a second.
        let changed = response
            .results
            .iter()
            .any(|r| ItemOutcome::of(r.status.as_ref()) == ItemOutcome::SignAgain);
        let next = if changed {
            link.after_refusal(Call::Sign, &used, Some(Refusal::AgentSvidChanged)).await
        } else {
            Next::BackOff
        };
        let now = link.clock.now();
        let mut fresh = Vec::new();
        for ((entry, key, _), result) in prepared.into_iter().zip(response.results) {
            let outcome = ItemOutcome::of(result.status.as_ref());
            let status = result.status.unwrap_or_default();
            if outcome != ItemOutcome::Signed {
                if outcome == ItemOutcome::SignAgain {
                    debug!(entry_id = %entry.id, "agent SVID renewed while signing; signing again");
                    if next == Next::Now {
                        again = Again::Now;
                    } else {
                        retry_at.insert(entry.id.clone(), now + 1);
                    }
                    continue;
                }
                warn!(entry_id = %entry.id, code = status.code, reason = %status.message, "server refused to sign SVID");
                retry_at.insert(entry.id.clone(), now + SIGN_RETRY_SECS);
                continue;
            }
            let chain: Vec<CertificateDer<'static>> =
                result.x509_svid.into_iter().map(Into::into).collect();
            let svid = CachedSvid {
                entry_id: entry.id.clone(),
                spiffe_id: entry.spiffe_id.clone(),
                chain,
                key_pkcs8: Arc::new(key),
                serial: result.serial,
                expires_at: result.expires_at,
                renew_at: renew_point(now, result.expires_at),
                hint: entry.hint.clone(),
            };
            debug!(entry_id = %entry.id, serial = %svid.serial, expires_at = svid.expires_at, "SVID cached");
            fresh.push((svid, entry));
        }
        cache.update(|s| {
            let mut changed = false;
            for (svid, signed_for) in fresh {
                // The entry may have changed or gone while we were signing:
                // the SVID is kept only if it is still right for the entry.
                let current = s.entries.get(&svid.entry_id);
                if current.is_some_and(|e| e.same_certificate_content(&signed_for)) {
                    s.svids.insert(svid.entry_id.clone(), Arc::new(svid));
                    changed = true;
                }
            }
            changed
        });
    }
    Ok(again)
}

#[cfg(test)]
mod tests {
    use tessera_workload_api::{TrustAnchors, TrustDomain};

    use super::*;
    use crate::clock::ManualClock;
    use crate::identity::test_identity;

    /// An SVID held for an entry expires at the clock's time while no
    /// server answers: the signer drops it then, not before.
    #[tokio::test]
    async fn svids_expire_by_the_clock_while_the_server_is_away() {
        let clock = Arc::new(ManualClock::at_ms(1_000_000_000));
        let link = Arc::new(NodeLink::new(
            vec!["127.0.0.1:1".into()], // nothing listens: every signing fails
            TrustDomain::new("example.org").unwrap(),
            TrustAnchors::new(Vec::new()),
            test_identity(1),
            std::env::temp_dir(),
            clock.clone(),
        ));
        let entry = AgentEntry {
            id: "e".into(),
            spiffe_id: "spiffe://example.org/w".parse().unwrap(),
            selectors: vec!["unix:uid:1".parse().unwrap()],
            x509_svid_ttl: 60,
            dns_names: vec![],
            expires_at: 0,
            revision: 1,
            hint: String::new(),
            jwt_audiences: vec![],
        };
        let svid = CachedSvid {
            entry_id: "e".into(),
            spiffe_id: entry.spiffe_id.clone(),
            chain: Vec::new(),
            key_pkcs8: Arc::new(Vec::new()),
            serial: "01".into(),
            expires_at: 1_000_060,
            // Renewed only when it expires, so the server is not asked before.
            renew_at: 1_000_060,
            hint: String::new(),
        };
        let cache = Cache::new();
        cache.update(|s| {
            s.insert_entry(Arc::new(entry));
            s.svids.insert("e".into(), Arc::new(svid));
            s.ready = true;
            true
        });
        let shutdown = CancellationToken::new();
        let signer = tokio::spawn(signer_loop(
            link,
            cache.clone(),
            Arc::new(Notify::new()),
            shutdown.clone(),
        ));
        let held = || cache.state().svids.contains_key("e");
        tokio::time::sleep(Duration::from_millis(100)).await;
        clock.advance(59);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(held(), "valid for another second");
        clock.advance(2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while held() {
            assert!(tokio::time::Instant::now() < deadline, "the expired SVID is still served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        signer.await.unwrap();
    }
}
