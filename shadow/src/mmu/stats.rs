//! Shadow-MMU counters, per VM. Every count only grows (so
//! [`ShadowStats::since`] subtracts); `pages_in_use` and `pages_peak` are
//! gauges. They count deterministic events, so tests may assert them.

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
    /// Host invalidations requested (VM-wide, or one vCPU's flush it
    /// needed).
    pub host_invalidations: u64,
    /// TLB flushes requested by the guest.
    pub flushes: u64,
    /// Shadow pages in use now.
    pub pages_in_use: u64,
    /// Most shadow pages ever in use.
    pub pages_peak: u64,
    /// Pool pages found written by the guest and rewritten from the VMM's
    /// copy ([`ShadowMmu::repair_pool_pages`](super::ShadowMmu::repair_pool_pages)).
    pub pool_repairs: u64,
    /// Guest entries given the D bit the hardware set in a read-only shadow
    /// leaf: a supervisor write under a CR0.WP = 0 the guest did not report
    /// ([`ShadowMmu::harvest_dirty_leaves`](super::ShadowMmu::harvest_dirty_leaves)).
    pub wp_off_dirty: u64,
    /// pv mode: write-queue batches applied ([`ShadowMmu::apply_batch`](super::ShadowMmu::apply_batch)).
    pub batches: u64,
    /// pv mode: queue entries applied (each also counts in `pte_writes`).
    pub batch_entries: u64,
    /// pv mode: translations made current without a fault
    /// ([`ShadowMmu::prefetch`](super::ShadowMmu::prefetch)).
    pub prefetches: u64,
    /// pv mode: leaves a batch wrote into a guest table that had no shadow
    /// page when the batch was applied, shadowed once the sync's prefetch
    /// made one ([`ShadowMmu::prefetch_batch`](super::ShadowMmu::prefetch_batch)):
    /// the other pages of a large folio.
    pub batch_fills: u64,
    /// Leaves shadowed beside a hidden fault's, in its aligned block of
    /// [`PTE_PREFETCH`](super::PTE_PREFETCH) (KVM's `pte_prefetch`).
    pub pte_prefetches: u64,
    /// pv mode: accessed-bit harvests ([`ShadowMmu::harvest`](super::ShadowMmu::harvest)).
    pub harvests: u64,
    /// pv mode: pages the harvests named.
    pub harvest_pages: u64,
    /// pv mode on SMP: remote TLB flushes requested by the guest
    /// ([`ShadowMmu::flush_remote`](super::ShadowMmu::flush_remote)).
    pub remote_flushes: u64,
}

/// `ShadowStats` with every count `$count` taken as `$now - $then` and
/// every gauge `$gauge` as `$now`'s: a struct literal, so a field left out
/// of both lists does not compile.
macro_rules! counts_since {
    ($now:expr, $then:expr; counts: $($count:ident),*; gauges: $($gauge:ident),*) => {
        ShadowStats { $($count: $now.$count - $then.$count,)* $($gauge: $now.$gauge,)* }
    };
}

impl ShadowStats {
    /// The counts accumulated since `earlier` (gauges keep their current value).
    pub fn since(&self, earlier: &ShadowStats) -> ShadowStats {
        counts_since!(self, earlier;
            counts: hidden_faults, guest_faults, pte_writes, pte_updates_in_place, cr3_loads, root_hits,
                root_misses, zaps, page_zaps, pool_exhaustions, host_invalidations, flushes, pool_repairs,
                wp_off_dirty, batches, batch_entries, prefetches, batch_fills, pte_prefetches, harvests,
                harvest_pages, remote_flushes;
            gauges: pages_in_use, pages_peak)
    }
}
