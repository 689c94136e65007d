//! Host coherence (invariant 4) and pool repair (trust model): what the host
//! may still cache of the shadow tables, and when it must forget it —
//! the role KVM's `kvm_flush_remote_tlbs` plays for the vCPUs' TLBs.
//!
//! # Invariants
//!
//! - A change that removes or restricts a mapping in a page a loaded root
//!   reaches sets `stale`; the VMM invalidates the host before the guest runs
//!   again. With deferral on, a change no loaded root reaches is remembered
//!   (at most [`MAX_DEFERRED`] pages, then any root switch invalidates) and
//!   makes the host stale when a root reaching it is loaded.
//! - Quarantined pages return to the free list only at a real invalidation.
//! - "Reaches" errs towards yes: past [`REACH_STEPS`] steps up the parent
//!   sets it answers yes, which only invalidates earlier.
//! - Pool repair compares the pool with the VMM's copy and rewrites it; no
//!   decision depends on what the guest wrote there.

use super::*;

impl ShadowMmu {
    /// Whether the host may hold stale translations of shadow tables.
    pub fn host_stale(&self) -> bool {
        self.stale
    }

    /// The host has forgotten every translation of the pool: quarantined
    /// pages may be reused.
    pub fn host_invalidated(&mut self) {
        if self.stale {
            self.stats.host_invalidations += 1;
            self.deferred.clear();
            self.deferred_overflow = false;
            self.free.append(&mut self.quarantine);
        }
        self.stale = false;
    }

    /// The guest itself will flush its TLB after the change that made the
    /// host stale (pv mode on an EPT/NPT host, where the CPU walks the
    /// shadow tables from memory and the guest's `invlpg` or CR3 load is
    /// the invalidation): the host is no longer stale on the MMU's
    /// account. Freed pages stay in quarantine until a real invalidation
    /// (or are reused only after one: `get_or_create` marks the host stale).
    pub fn host_flush_left_to_guest(&mut self) {
        self.stale = false;
    }

    /// Trapping shadow mode: a change in shadow pages that only roots other
    /// than the current one reach (an address space being torn down, a
    /// root evicted from the cache) does not need the host to forget
    /// anything until such a root is loaded again — the vCPU cannot reach
    /// it before. So it is deferred to that `LOAD_CR3` (or to any earlier
    /// invalidation), and tearing down an address space that is not loaded
    /// costs no host invalidation per entry. A pool page freed meanwhile
    /// stays in quarantine until the host has forgotten it. Off by default;
    /// pv mode leaves it off (a pv guest loads published roots without an
    /// exit, so every change is made coherent before it runs again).
    pub fn set_defer_unreachable(&mut self, on: bool) {
        self.defer = on;
    }

    /// Mark the host stale for a change in `page`, or defer it when no
    /// loaded root reaches the page.
    pub(super) fn mark_stale(&mut self, page: u32) {
        if self.stale {
            return;
        }
        if !self.defer || (0..self.loaded.len()).any(|i| self.reaches(self.loaded[i], page)) {
            self.stale = true;
        } else if self.deferred.len() < MAX_DEFERRED {
            if !self.deferred.contains(&page) {
                self.deferred.push(page);
            }
        } else {
            self.deferred_overflow = true;
        }
    }

    /// Whether root page `root` reaches `page` through the shadow tables:
    /// a bounded walk up the parent sets (past [`REACH_STEPS`] steps it
    /// answers yes, which only invalidates earlier).
    pub(super) fn reaches(&mut self, root: u32, page: u32) -> bool {
        let mut stack = vec![page];
        let mut seen = HashSet::new();
        while let Some(p) = stack.pop() {
            if p == root {
                return true;
            }
            if !seen.insert(p) {
                continue;
            }
            self.work += 1;
            let Some(sp) = self.pages[p as usize].as_ref() else { continue };
            if seen.len() + sp.parents.len() > REACH_STEPS {
                return true;
            }
            stack.extend(sp.parents.iter().map(|&(parent, _)| parent));
        }
        false
    }

    /// A root becomes current: changes deferred in pages it reaches must
    /// be made coherent before it runs.
    pub(super) fn promote_deferred(&mut self, root: u32) {
        if self.stale || (self.deferred.is_empty() && !self.deferred_overflow) {
            return;
        }
        if self.deferred_overflow {
            self.stale = true;
            return;
        }
        let pending = std::mem::take(&mut self.deferred);
        if pending.iter().any(|&p| self.pages[p as usize].is_some() && self.reaches(root, p)) {
            self.stale = true;
        }
        self.deferred = pending;
    }

    /// Before [`ShadowMmu::repair_pool_pages`] on the same dirty `pages`:
    /// the guest's D bits that the hardware recorded in read-only shadow
    /// leaves. Hardware sets D in a leaf only on a write it lets through,
    /// and a read-only leaf lets a write through only while the vCPU's
    /// CR0.WP = 0 — the guest cleared WP with its own `mov cr0` and did
    /// not report it (`FLUSH_TLB`). Hardware would have set D in the
    /// guest's entry: set it there (the entry still maps the leaf's frame),
    /// put the leaf back as the VMM's copy has it, and make the host forget
    /// (it may think the page dirty already). Returns the entries
    /// updated. The pool is not trusted (module doc): a guest that sets D
    /// bits there itself only gets D set in entries of its own tables that
    /// it could have written anyway.
    pub fn harvest_dirty_leaves(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        pages: impl IntoIterator<Item = u64>,
    ) -> u64 {
        let mut harvested = 0;
        for page in pages {
            let Some((gfn, level)) =
                self.pages.get(page as usize).and_then(|p| p.as_ref()).map(|p| (p.role.gfn, p.role.level))
            else {
                continue;
            };
            let base = self.page_gpa(page as u32);
            for idx in 0..512u64 {
                let want = self.entry(page as u32, idx);
                let leaf = want & P != 0 && (level == 1 || want & PS != 0);
                if !leaf || want & (RW | D) != 0 {
                    continue;
                }
                let at = Gpa(base + idx * 8);
                // A harvested leaf (A clear in the copy) may also carry the
                // A bit the CPU set (`harvest.rs`): kept, it is not a write.
                let raw = pool.read_u64(at);
                let cpu_a = if want & A == 0 { raw & A } else { 0 };
                if raw & !cpu_a != want | D {
                    continue;
                }
                let gpa = Gpa((gfn << 12) + idx * 8);
                let gpte = guest.read_u64(gpa);
                let size = 1u64 << (12 + 9 * (u32::from(level) - 1));
                if gpte & P != 0 && gpte & ADDR & !(size - 1) == want & ADDR && gpte & D == 0 {
                    guest.write_u64(gpa, gpte | A | D);
                    harvested += 1;
                }
                pool.write_u64(at, want | cpu_a);
                self.stale = true;
            }
        }
        self.stats.wp_off_dirty += harvested;
        harvested
    }

    /// The pool pages numbered `pages` (0 = the first page of the pool)
    /// may have been written by the guest (the host's dirty log says so):
    /// make each hold exactly the VMM's copy again (zeros for a page not in
    /// use; an A bit the CPU set in a harvested leaf is not a difference,
    /// `harvest.rs`). A page that differed marks the host stale — the host may have
    /// cached the guest's entries — and counts as a repair. Returns the
    /// number of pages repaired. Reading the pool here only *compares*; no
    /// decision depends on what the guest wrote.
    pub fn repair_pool_pages(&mut self, pool: &mut impl GuestPhys, pages: impl IntoIterator<Item = u64>) -> u64 {
        let mut repaired = 0;
        for page in pages {
            // Outside the pool: not ours. A page never taken is repaired
            // to zeros like a free one (the host may have cached what the
            // guest wrote there, if the guest walked it), but costs nothing
            // until the dirty log names it.
            if page >= u64::from(self.capacity) {
                continue;
            }
            self.work += 512;
            let base = self.page_gpa(page as u32);
            let mut differed = false;
            let level = self.pages.get(page as usize).and_then(|p| p.as_ref()).map_or(1, |p| p.role.level);
            for idx in 0..512u64 {
                let want = self.entry(page as u32, idx);
                if !pool_agrees(want, pool.read_u64(Gpa(base + idx * 8)), level) {
                    pool.write_u64(Gpa(base + idx * 8), want);
                    differed = true;
                }
            }
            if differed {
                repaired += 1;
                self.stale = true;
            }
        }
        self.stats.pool_repairs += repaired;
        repaired
    }
}
