//! pv mode on SMP: the paravirtual remote TLB flush (`PV_FLUSH_REMOTE`,
//! `guest_abi::hypercall`) over one write queue per vCPU
//! (`guest_abi::pv`, layout version 2).
//!
//! # Semantics
//!
//! A guest CPU that changed its page tables and must make other CPUs stop
//! using the old translations (a shootdown) calls `PV_FLUSH_REMOTE` once
//! instead of sending IPIs. [`ShadowMmu::flush_remote`] applies the
//! pending write queue of **every** vCPU — the writes of the caller and of
//! any other CPU that changed tables shared with it — each through
//! [`ShadowMmu::apply_batch`], then makes every named vCPU owe a flush: the
//! VMM stops those in `KVM_RUN` before the call returns and the others
//! flush at their next entry (both by [`ShadowMmu::flush_requests`], which
//! names them). After it returns, no named vCPU runs guest code on a
//! translation the guest's tables no longer hold: the shootdown's
//! guarantee (Intel SDM vol. 3 §4.10.5, "Propagation of paging-structure
//! changes to multiple processors").
//!
//! # Trust
//!
//! Every queue is guest input, checked entry by entry as in
//! `mmu/pv.rs`; a queue refused part-way costs its owner the rest of its
//! batch and nobody else anything. A set naming vCPUs that do not exist
//! names only those that do. Ranges are not the MMU's concern: a flush of
//! everything is a superset of any range flush.

use super::*;

/// What [`ShadowMmu::flush_remote`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFlushOutcome {
    /// Each queue's batch outcome, in the order given (an empty queue is
    /// not a batch: nothing applied, nothing refused).
    pub batches: Vec<BatchOutcome>,
    /// The vCPUs named that exist: each owes a flush before it runs guest
    /// code again (and is in the next [`ShadowMmu::flush_requests`]).
    pub flush: VcpuSet,
}

impl ShadowMmu {
    /// pv mode: the guest may load published roots by itself (`mov cr3`,
    /// no exit), so with more than one vCPU a root evicted from the cache
    /// or zapped may still be some vCPU's CR3 without the MMU knowing: it
    /// waits in limbo — in use, or held — until every vCPU's CR3 has been
    /// reported elsewhere ([`ShadowMmu::follow_shadow_root`], which the VMM
    /// calls with the vCPU's CR3 at every exit it handles for it). An idle
    /// vCPU that never exits keeps at most the roots evicted while it
    /// idles; a kick makes it report.
    pub fn set_guest_loads_roots(&mut self, on: bool) {
        self.guest_loads_roots = on;
    }

    /// Root `page` of guest root `guest_root` leaves the cache (evicted,
    /// or zapped): into limbo if a vCPU may be on it unknown to the MMU.
    pub(super) fn enter_limbo(&mut self, page: u32, guest_root: u64) {
        #[cfg(test)]
        if self.sabotage == super::Sabotage::NoLimbo {
            return;
        }
        if !self.guest_loads_roots || self.tlb.registered().nth(1).is_none() || self.limbo.iter().any(|l| l.0 == page) {
            return;
        }
        // The acting vCPU's CR3 is its loaded root (the VMM follows it at
        // every exit, before the operation): not this one.
        let pending = self.vcpus().minus(self.tlb.acting.map_or(VcpuSet::EMPTY, VcpuSet::single));
        if !pending.is_empty() {
            self.limbo.push((page, guest_root, pending));
        }
    }

    /// vCPU `id`'s CR3 is `hw_page` (`None`: not a pool page, or the vCPU
    /// is gone): it is on no other limbo root, and those every vCPU has
    /// left are released.
    pub(super) fn leave_limbo(&mut self, pool: &mut impl GuestPhys, id: usize, hw_page: Option<u32>) {
        let mut done = Vec::new();
        for (page, _, pending) in self.limbo.iter_mut() {
            if Some(*page) != hw_page {
                *pending = pending.minus(VcpuSet::single(id));
                if pending.is_empty() {
                    done.push(*page);
                }
            }
        }
        self.limbo.retain(|l| !l.2.is_empty());
        for page in done {
            if self.pages[page as usize].is_some() {
                self.release_if_orphan(pool, page);
            } else {
                self.release_held(page);
            }
        }
    }

    /// The guest root of the limbo root at `page`, if it is one.
    pub(super) fn limbo_root(&self, page: u32) -> Option<u64> {
        self.limbo.iter().find(|l| l.0 == page).map(|l| l.1)
    }

    /// `PV_FLUSH_REMOTE(targets, ..)` for `caller` (module doc): apply
    /// `queues` (the pending entries of every vCPU's write queue, the VMM
    /// having read them from the shared area), then make every vCPU of
    /// `targets` owe a flush.
    pub fn flush_remote(
        &mut self,
        caller: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        queues: &[&[u64]],
        zone: (Gpa, Gpa),
        targets: VcpuSet,
    ) -> RemoteFlushOutcome {
        let batches = self.sync_queues(caller, pool, guest, queues, zone);
        self.stats.remote_flushes += 1;
        let flush = targets.and(self.vcpus());
        let now = self.tlb.now;
        for id in flush.iter() {
            if let Some(Some(c)) = self.tlb.cpus.get_mut(id) {
                c.force = c.force.max(now);
            }
        }
        RemoteFlushOutcome { batches, flush }
    }

    /// A sync point on SMP (`PV_FLUSH`, `SHADOW_FAULT`, `LOAD_CR3`,
    /// `FLUSH_TLB` of any vCPU): apply the pending queue of every vCPU, each
    /// through [`ShadowMmu::apply_batch`], so that whatever any CPU wrote
    /// before the sync is in the shadow the caller's next walk uses — a
    /// write is visible once queued (as a store once it leaves the store
    /// buffer), whichever CPU made it. Returns each queue's outcome.
    pub fn sync_queues(
        &mut self,
        caller: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        queues: &[&[u64]],
        zone: (Gpa, Gpa),
    ) -> Vec<BatchOutcome> {
        let none = BatchOutcome { applied: 0, refused: None };
        queues
            .iter()
            .map(|q| if q.is_empty() { none } else { self.apply_batch(caller, pool, guest, q, zone) })
            .collect()
    }
}
