//! The figures with a target, in one table: each with the target the
//! issues set and a regression bound (a little past what the code measured
//! when the bound was set). After the scenarios, every measured figure in
//! the table is printed against its target, and a figure past its bound
//! prints a `WARNING` line: a change that costs one of these ratios shows up
//! in the next run instead of in a later profile. (`soak` checks its own
//! bound, growth after warm-up, as it reports.) Uses `stats`.

use serde_json::Value;

use crate::stats::Results;

/// Which side of a limit is good.
#[derive(Debug, Clone, Copy)]
enum Good {
    /// At least the limit.
    AtLeast(f64),
    /// At most the limit.
    AtMost(f64),
}

impl Good {
    fn holds(self, value: f64) -> bool {
        match self {
            Good::AtLeast(limit) => value >= limit,
            Good::AtMost(limit) => value <= limit,
        }
    }

    fn show(self) -> String {
        match self {
            Good::AtLeast(limit) => format!(">= {limit}"),
            Good::AtMost(limit) => format!("<= {limit}"),
        }
    }
}

/// A JSON key, what it measures, its target and its regression bound.
struct Bound {
    key: &'static str,
    what: &'static str,
    target: Good,
    bound: Good,
}

const BOUNDS: &[Bound] = &[
    Bound {
        key: "issue_limit_ratio",
        what: "X509-SVID issuance / raw sign+verify limit",
        target: Good::AtLeast(0.8),
        bound: Good::AtLeast(0.6),
    },
    Bound {
        key: "jwt_issue_ratio",
        what: "JWT-SVID issuance / raw ES256 signing limit",
        target: Good::AtLeast(0.8),
        bound: Good::AtLeast(0.36),
    },
    Bound {
        key: "jwt_validate_ratio",
        what: "ValidateJWTSVID / raw ES256 verify limit",
        target: Good::AtLeast(0.5),
        bound: Good::AtLeast(0.3),
    },
    Bound {
        key: "streams_p99_ratio",
        what: "1,000 streams p99, agent / no-attestation server",
        target: Good::AtMost(2.0),
        bound: Good::AtMost(3.0),
    },
    Bound {
        key: "events_issue_ratio",
        what: "X509-SVID issuance, events on / off",
        target: Good::AtLeast(0.9),
        bound: Good::AtLeast(0.85),
    },
    Bound {
        key: "events_fetch_p99_ratio",
        what: "FetchX509SVID p99, events on / off",
        target: Good::AtMost(1.1),
        bound: Good::AtMost(2.0),
    },
    Bound {
        key: "fetch_p99_ms",
        what: "FetchX509SVID first response p99 (ms), warm agent",
        target: Good::AtMost(0.5),
        bound: Good::AtMost(1.5),
    },
    Bound {
        key: "handshake_ratio",
        what: "mTLS handshakes, X509Source / static config",
        target: Good::AtLeast(0.9),
        bound: Good::AtLeast(0.85),
    },
    Bound {
        key: "broker_exchange_ratio",
        what: "broker token exchanges / raw ES256 signing limit",
        target: Good::AtLeast(0.5),
        bound: Good::AtLeast(0.025),
    },
    Bound {
        key: "broker_events_rate_ratio",
        what: "broker exchanges, events on / off",
        target: Good::AtLeast(0.9),
        bound: Good::AtLeast(0.8),
    },
    Bound {
        key: "scale10k_1_fanout_p99_ms",
        what: "scale10k, one server: entry per agent -> all (p99 ms)",
        target: Good::AtMost(1000.0),
        bound: Good::AtMost(3000.0),
    },
    Bound {
        key: "scale10k_1_server_rss_loaded_mb",
        what: "scale10k, one server, all entries: server RSS (MB)",
        target: Good::AtMost(1024.0),
        bound: Good::AtMost(1024.0),
    },
    Bound {
        key: "scale10k_2_fanout_p99_ms",
        what: "scale10k, two servers: entry per agent -> all (p99 ms)",
        target: Good::AtMost(1000.0),
        bound: Good::AtMost(3000.0),
    },
];

/// Prints each measured figure that has a target (met or not), then a
/// `WARNING` line for each figure past its regression bound.
pub fn report(results: &Results) {
    let measured: Vec<(&Bound, f64)> = BOUNDS
        .iter()
        .filter_map(|b| results.get(b.key).and_then(Value::as_f64).map(|v| (b, v)))
        .collect();
    if measured.is_empty() {
        return;
    }
    println!("{:<60} {:>10} {:>10} {:>6}", "targets", "measured", "target", "met");
    for (b, value) in &measured {
        let met = if b.target.holds(*value) { "yes" } else { "NO" };
        println!("{:<60} {:>10.3} {:>10} {:>6}", b.what, value, b.target.show(), met);
    }
    for (b, value) in &measured {
        if !b.bound.holds(*value) {
            println!(
                "WARNING: {} ({}) is {value:.3}, past its regression bound {}",
                b.what,
                b.key,
                b.bound.show()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bound warns of a regression; it is never stricter than the target.
    #[test]
    fn every_bound_points_the_way_of_its_target_and_is_no_stricter() {
        for b in BOUNDS {
            let ok = match (b.target, b.bound) {
                (Good::AtLeast(target), Good::AtLeast(bound)) => bound <= target,
                (Good::AtMost(target), Good::AtMost(bound)) => bound >= target,
                _ => false,
            };
            assert!(ok, "{}: bound {} against target {}", b.key, b.bound.show(), b.target.show());
        }
    }

    #[test]
    fn a_ratio_past_its_bound_fails_it_and_one_within_passes() {
        assert!(!Good::AtLeast(0.45).holds(0.44));
        assert!(Good::AtLeast(0.45).holds(0.45));
        assert!(!Good::AtMost(6.0).holds(6.5));
        assert!(Good::AtMost(6.0).holds(5.0));
    }
}
