//! The end-of-run report of the shadow-based modes (`--stats`,
//! `--stats-json`'s `shadow` object): the MMU's counters, the time in each
//! handler, and the host-coherence strategy. Neutral types of the seam:
//! the run statistics (`stats`) hold a [`ShadowReport`] without knowing
//! any backend. The JSON keys are part of the CLI's contract.

use serde::Serialize;
use shadow::ShadowStats;
use std::time::Duration;

/// How the host is made to forget stale shadow translations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Coherence {
    /// Delete and re-add the pool's memslot (hosts whose KVM shadows page
    /// tables: PVM, or KVM with ept=0/npt=0).
    ReregisterPoolSlot,
    /// Reload CR3 (EPT/NPT hosts: the hardware re-walks the tables).
    ReloadCr3,
}

impl std::fmt::Display for Coherence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Coherence::ReregisterPoolSlot => "re-register the pool memslot",
            Coherence::ReloadCr3 => "reload CR3",
        })
    }
}

/// Time spent in each handler, and how often.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HandlerTimes {
    /// `SHADOW_FAULT` handling.
    #[serde(rename = "fault_ns", serialize_with = "ept::json::ns")]
    pub fault: Duration,
    /// Page-table write traps.
    #[serde(rename = "pte_write_ns", serialize_with = "ept::json::ns")]
    pub pte_write: Duration,
    /// `LOAD_CR3` handling (including `KVM_SET_SREGS`).
    #[serde(rename = "load_cr3_ns", serialize_with = "ept::json::ns")]
    pub load_cr3: Duration,
    /// Host invalidations.
    #[serde(rename = "invalidate_ns", serialize_with = "ept::json::ns")]
    pub invalidate: Duration,
    /// Reading the pool's dirty log and repairing guest-written pool pages.
    pub pool_check: Duration,
    /// pv mode: applying write-queue batches.
    #[serde(rename = "batch_ns", serialize_with = "ept::json::ns")]
    pub batch: Duration,
    /// How many times the dirty log was read.
    pub pool_checks: u64,
}

impl HandlerTimes {
    /// Time in all handlers.
    pub fn total(&self) -> Duration {
        self.fault + self.pte_write + self.load_cr3 + self.invalidate + self.pool_check + self.batch
    }
}

/// The shadow-mode report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowReport {
    /// The MMU's counters.
    pub stats: ShadowStats,
    /// Time in each handler.
    pub times: HandlerTimes,
    /// The coherence strategy.
    pub coherence: Coherence,
    /// Pool size in pages.
    pub pool_pages: u32,
    /// pv mode.
    pub pv: bool,
    /// pv mode: batches refused (a bad entry or queue length).
    pub pv_refused: u64,
    /// Times the vCPU was found with CR0.WP clear: the guest cleared it
    /// with its own `mov cr0` and did not report it (`FLUSH_TLB`).
    pub wp_cleared_silently: u64,
}
