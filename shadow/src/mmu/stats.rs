//! Shadow-MMU counters.

/// Shadow-MMU counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShadowStats {
    /// Faults fixed by the VMM without the guest seeing them.
    pub hidden_faults: u64,
    /// Faults passed on to the guest (true guest page faults).
    pub guest_faults: u64,
    /// Guest page-table writes trapped.
    pub pte_writes: u64,
    /// ... of which updated the shadow entry in place.
    pub pte_updates_in_place: u64,
    /// CR3 loads.
    pub cr3_loads: u64,
    /// Root-cache hits.
    pub root_hits: u64,
    /// Root-cache misses (a root built).
    pub root_misses: u64,
    /// Shadow entries zapped.
    pub zaps: u64,
    /// Whole shadow pages zapped (partial writes, pool exhaustion).
    pub page_zaps: u64,
    /// Pool exhaustions (full zaps).
    pub pool_exhaustions: u64,
    /// Host invalidations requested.
    pub host_invalidations: u64,
    /// TLB flushes requested by the guest.
    pub flushes: u64,
    /// Shadow pages in use now.
    pub pages_in_use: u64,
    /// Most shadow pages ever in use.
    pub pages_peak: u64,
    /// Pool pages found written by the guest and rewritten from the VMM's
    /// copy ([`ShadowMmu::repair_pool_pages`]).
    pub pool_repairs: u64,
    /// pv mode: write-queue batches applied ([`ShadowMmu::apply_batch`]).
    pub batches: u64,
    /// pv mode: queue entries applied (each also counts in `pte_writes`).
    pub batch_entries: u64,
    /// pv mode: translations made current without a fault
    /// ([`ShadowMmu::prefetch`]).
    pub prefetches: u64,
}

impl ShadowStats {
    /// The counts accumulated since `earlier` (gauges keep their current value).
    pub fn since(&self, earlier: &ShadowStats) -> ShadowStats {
        ShadowStats {
            hidden_faults: self.hidden_faults - earlier.hidden_faults,
            guest_faults: self.guest_faults - earlier.guest_faults,
            pte_writes: self.pte_writes - earlier.pte_writes,
            pte_updates_in_place: self.pte_updates_in_place - earlier.pte_updates_in_place,
            cr3_loads: self.cr3_loads - earlier.cr3_loads,
            root_hits: self.root_hits - earlier.root_hits,
            root_misses: self.root_misses - earlier.root_misses,
            zaps: self.zaps - earlier.zaps,
            page_zaps: self.page_zaps - earlier.page_zaps,
            pool_exhaustions: self.pool_exhaustions - earlier.pool_exhaustions,
            host_invalidations: self.host_invalidations - earlier.host_invalidations,
            flushes: self.flushes - earlier.flushes,
            pages_in_use: self.pages_in_use,
            pages_peak: self.pages_peak,
            pool_repairs: self.pool_repairs - earlier.pool_repairs,
            batches: self.batches - earlier.batches,
            batch_entries: self.batch_entries - earlier.batch_entries,
            prefetches: self.prefetches - earlier.prefetches,
        }
    }
}
