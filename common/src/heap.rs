//! The allocator of Tessera's programs (`tessera-server`, `tessera-agent`,
//! `tessera-quickstart`, `tessera-bench`), decided once: jemalloc, with
//! its background thread returning freed pages to the kernel, and what it
//! reports (its live heap, what it holds resident, its own metadata),
//! which the server and the agent export as metrics (the first two) and
//! the soak prints.
//!
//! Why jemalloc: the server's RSS under the hour-long soak kept rising on
//! mimalloc (2 and 3, with every collect and purge option) and on glibc
//! while its live heap stayed flat (heaptrack, rounds six and twelve): the
//! allocator kept more and more of what the program had freed. Side by
//! side in one 30-minute soak, jemalloc held 95–101 MB from minute 10 to
//! the end while mimalloc rose 104 → 115 MB (README, "The server's soak
//! growth, fourteenth round").

/// The global allocator type; each binary's `main.rs` declares
/// `#[global_allocator] static ALLOCATOR: Allocator = Allocator;`.
pub use tikv_jemallocator::Jemalloc as Allocator;

/// What the allocator reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes the program holds (allocated and not yet freed).
    pub allocated: u64,
    /// Bytes of the allocator's pages resident in memory, at most (the
    /// heap's share of the RSS: what it holds, fragmentation and metadata
    /// included; jemalloc counts it as an upper bound).
    pub resident: u64,
    /// Bytes of the allocator's own bookkeeping (part of `resident`).
    pub metadata: u64,
}

/// The allocator's figures now, or `None` when jemalloc cannot say. In a
/// process whose global allocator is not jemalloc (unit tests) they count
/// only jemalloc's own few allocations. Advancing the epoch merges the
/// arenas' counters under short locks: a scrape's worth of work, less than
/// encoding the registry it goes into.
pub fn stats() -> Option<HeapStats> {
    // jemalloc's statistics are a snapshot taken when the epoch advances.
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some(HeapStats {
        allocated: tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64,
        resident: tikv_jemalloc_ctl::stats::resident::read().ok()? as u64,
        metadata: tikv_jemalloc_ctl::stats::metadata::read().ok()? as u64,
    })
}

/// Writes jemalloc's heap profile to `path`, for `jeprof` (a build with
/// the `heap-profiling` feature, run with `_RJEM_MALLOC_CONF=prof:true`;
/// without it, jemalloc refuses and this says so).
#[cfg(feature = "heap-profiling")]
pub fn dump_profile(path: &std::path::Path) -> Result<(), String> {
    let mut name = path.to_str().ok_or("the profile's path is not UTF-8")?.as_bytes().to_vec();
    name.push(0);
    // The binding asks for a 'static name (jemalloc keeps no reference):
    // each dump leaks its path, tens of bytes.
    tikv_jemalloc_ctl::raw::write_str(b"prof.dump\0", Box::leak(name.into_boxed_slice()))
        .map_err(|e| format!("jemalloc wrote no profile to {}: {e}", path.display()))
}

/// The two gauges, registered in a process's metrics and set at scrape time.
#[derive(Debug, Clone, Default)]
pub struct HeapGauges {
    allocated: prometheus_client::metrics::gauge::Gauge,
    resident: prometheus_client::metrics::gauge::Gauge,
}

impl HeapGauges {
    /// Registers `heap_allocated_bytes` and `heap_resident_bytes`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "heap_allocated_bytes",
            "Bytes the process holds in its heap (jemalloc's stats.allocated; near zero in a process not on jemalloc)",
            self.allocated.clone(),
        );
        registry.register(
            "heap_resident_bytes",
            "At most this many bytes of heap pages resident, fragmentation and metadata included (jemalloc's stats.resident, an upper bound)",
            self.resident.clone(),
        );
    }

    /// Sets them from the allocator (left as they were if it cannot say).
    pub fn refresh(&self) {
        if let Some(s) = stats() {
            self.allocated.set(i64::try_from(s.allocated).unwrap_or(i64::MAX));
            self.resident.set(i64::try_from(s.resident).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // This test binary runs on jemalloc so that the figures are its own.
    #[global_allocator]
    static ALLOCATOR: Allocator = Allocator;

    #[test]
    fn the_figures_follow_what_is_held() {
        let before = stats().expect("jemalloc reports");
        let held: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1 << 20]).collect();
        let during = stats().expect("jemalloc reports");
        assert!(
            during.allocated >= before.allocated + 60 * (1 << 20),
            "64 MiB held: {before:?} -> {during:?}"
        );
        // Written pages are resident: the 64 MiB are in `resident` too,
        // and the bookkeeping is part of what is resident.
        assert!(during.resident >= before.resident + 60 * (1 << 20), "{before:?} -> {during:?}");
        assert!(during.metadata > 0 && during.metadata < during.resident, "{during:?}");
        drop(held);
        let after = stats().expect("jemalloc reports");
        assert!(after.allocated + 60 * (1 << 20) <= during.allocated, "{during:?} -> {after:?}");

        let gauges = HeapGauges::default();
        let mut registry = prometheus_client::registry::Registry::with_prefix("t");
        gauges.register(&mut registry);
        gauges.refresh();
        let text = crate::telemetry::encode(&registry);
        let allocated: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("t_heap_allocated_bytes "))
            .expect("the gauge is exported")
            .parse()
            .unwrap();
        assert!(allocated > 0.0, "{text}");
    }
}
