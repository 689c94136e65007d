//! Coherence: what the vCPUs' TLBs (and, on a host whose KVM itself
//! shadows page tables, the host's copy of the shadow tables) may still
//! cache of shadow entries the MMU changed, and when they must forget it —
//! the role KVM's `kvm_flush_remote_tlbs` and Linux's `tlb_gen` play
//! (invariant 4 and "SMP coherence" in the module doc of `mmu.rs`). Also
//! pool repair (trust model).
//!
//! # State
//!
//! - `tlb.now`, the VM's **TLB generation**: every change that removes or
//!   restricts a shadow mapping, frees a pool page or rewrites one is
//!   recorded at the current generation (`last_change`); taking a
//!   [`FlushTicket`] returns the current generation and starts the next, so
//!   a flush done after the ticket covers every change recorded before it.
//! - Per registered vCPU (`tlb.cpus[id]`): `flushed`, the ticket its
//!   TLB is known clean up to (a flush done after a ticket of it, or the vCPU
//!   stopped outside `KVM_RUN` with a flush it will do before it runs guest
//!   code again: `owed`); `requested`, up to which generation the VMM was
//!   told it must flush; `force`, a generation it must flush past for a
//!   reason of its own (it reused a quarantined page early, or the guest's
//!   remote flush names it).
//! - `tlb.excused`: changes up to this generation need no flush by the VMM
//!   — the guest's own flushes are real ones (pv mode on an EPT/NPT host,
//!   [`ShadowMmu::host_flush_left_to_guest`]). Freed pages are never
//!   excused: the quarantine waits for real flushes.
//!
//! # Invariants
//!
//! - A vCPU needs a flush before it runs guest code again exactly when it
//!   owes one, or a change was recorded after its last flush and was not
//!   left to the guest ([`ShadowMmu::needs_flush`]).
//! - A freed pool page waits in quarantine, tagged with the generation it
//!   was freed in, until every registered vCPU has flushed that generation;
//!   only then is it free. The one exception: the vCPU an operation is done
//!   for (out of `KVM_RUN` by definition) may take a quarantined page every
//!   *other* vCPU has flushed, and then owes a flush itself (`force`). With
//!   one vCPU that is any quarantined page, as before SMP.
//! - A root page some vCPU's CR3 still holds is never free or quarantined
//!   (`loaded`, `held`; `vcpu.rs`).
//! - With deferral on and at most one vCPU, a change no loaded root reaches
//!   is remembered (at most [`MAX_DEFERRED`] pages, then any root switch
//!   invalidates) and recorded when a root reaching it is loaded; with more
//!   vCPUs nothing is deferred (a deferral would have to be tracked per
//!   vCPU). "Reaches" errs towards yes: past [`REACH_STEPS`] steps up the
//!   parent sets it answers yes, which only invalidates earlier.
//! - Pool repair compares the pool with the VMM's copy and rewrites it; no
//!   decision depends on what the guest wrote there.

use super::*;

/// The most vCPUs one MMU serves (a [`VcpuSet`] is a 64-bit mask; the VMM's
/// `--vcpus` limit).
pub const MAX_VCPUS: usize = 64;

/// A set of vCPUs by id (bit `i` = vCPU `i`, [`ShadowVcpu::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct VcpuSet(pub u64);

impl VcpuSet {
    /// No vCPU.
    pub const EMPTY: VcpuSet = VcpuSet(0);

    /// The set holding vCPU `id` alone (empty for an id past [`MAX_VCPUS`]).
    pub fn single(id: usize) -> VcpuSet {
        VcpuSet(if id < MAX_VCPUS { 1 << id } else { 0 })
    }
    /// Whether vCPU `id` is in the set.
    pub fn contains(self, id: usize) -> bool {
        id < MAX_VCPUS && self.0 & (1 << id) != 0
    }
    /// Add vCPU `id` (ignored past [`MAX_VCPUS`]).
    pub fn insert(&mut self, id: usize) {
        self.0 |= VcpuSet::single(id).0;
    }
    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The vCPUs in both sets.
    pub fn and(self, other: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 & other.0)
    }
    /// The vCPUs in `self` but not in `other`.
    pub fn minus(self, other: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 & !other.0)
    }
    /// The ids in the set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_VCPUS).filter(move |&i| self.contains(i))
    }
}

/// A point in the VM's TLB generations ([`ShadowMmu::flush_ticket`]): a
/// flush done after taking it makes the vCPU clean of every change recorded
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlushTicket(pub(super) u64);

/// What a vCPU must do before it enters `KVM_RUN` again
/// ([`ShadowMmu::prepare_entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryWork {
    /// Its root was made obsolete by a zap of everything and was rebuilt:
    /// point its CR3 here.
    pub root: Option<ShadowRoot>,
    /// Flush its TLB (the host invalidation of `docs/shadow.md`), then
    /// report [`ShadowMmu::vcpu_flushed`] with this ticket.
    pub flush: Option<FlushTicket>,
}

/// One registered vCPU's TLB state, VM-side (module doc, "State").
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuTlb {
    pub(super) flushed: u64,
    pub(super) requested: u64,
    pub(super) force: u64,
    pub(super) owed: bool,
}

/// The VM's TLB generations and its vCPUs' flush state (module doc).
#[derive(Debug, Default)]
pub(super) struct TlbState {
    pub(super) now: u64,
    /// The generation of the latest change (0: none yet; generations start at 1).
    pub(super) last_change: u64,
    pub(super) excused: u64,
    /// The ticket of the last VM-wide invalidation (what a VM without vCPUs compares).
    pub(super) floor: u64,
    pub(super) cpus: Vec<Option<CpuTlb>>,
    /// The vCPU the current operation is done for (out of `KVM_RUN`).
    pub(super) acting: Option<usize>,
}

impl TlbState {
    pub(super) fn registered(&self) -> impl Iterator<Item = (usize, &CpuTlb)> {
        self.cpus.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
    }
    pub(super) fn needs(&self, c: &CpuTlb) -> bool {
        c.owed || c.flushed < c.force || c.flushed.max(self.excused) < self.last_change
    }
    /// The newest reason `c` has to flush (a generation).
    fn reason(&self, c: &CpuTlb) -> u64 {
        c.force.max(if self.last_change > self.excused { self.last_change } else { 0 })
    }
    /// The oldest generation some vCPU other than `except` has not flushed
    /// (`u64::MAX` when there is none).
    pub(super) fn min_flushed_except(&self, except: Option<usize>) -> u64 {
        self.registered().filter(|&(i, _)| Some(i) != except).map(|(_, c)| c.flushed).min().unwrap_or(u64::MAX)
    }
}

/// A remote flush the VMM performs for the MMU ([`ShadowMmu::set_remote_flush`]):
/// given vCPUs, stop each (kick, wait until out of guest mode) with a
/// flush request, and return those it stopped with their CR3 (from the
/// sync regs of their last exit; `None` if unknown).
pub type RemoteFlush = Box<dyn FnMut(VcpuSet) -> Vec<(usize, Option<Gpa>)> + Send>;

/// The hook, with a `Debug` that says whether one is set.
#[derive(Default)]
pub(super) struct RemoteFlushHook(pub(super) Option<RemoteFlush>);

impl std::fmt::Debug for RemoteFlushHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "RemoteFlush(set)" } else { "RemoteFlush(none)" })
    }
}

impl ShadowMmu {
    /// Record a change every vCPU's TLB may cache the old state of.
    pub(super) fn changed(&mut self) {
        self.tlb.last_change = self.tlb.now;
    }

    /// Whether the change at hand is already recorded (nothing to add).
    fn change_recorded(&self) -> bool {
        self.tlb.last_change == self.tlb.now
    }

    /// A ticket: the current generation; the next change is recorded in a
    /// later one.
    fn ticket(&mut self) -> u64 {
        let t = self.tlb.now;
        self.tlb.now += 1;
        t
    }

    /// Whether some vCPU may hold stale translations of shadow tables: with
    /// one vCPU, the host must be invalidated before the guest runs again
    /// (then [`ShadowMmu::host_invalidated`]). With several, see
    /// [`ShadowMmu::flush_requests`] and [`ShadowMmu::needs_flush`].
    pub fn host_stale(&self) -> bool {
        if self.tlb.cpus.iter().all(Option::is_none) {
            return self.tlb.floor.max(self.tlb.excused) < self.tlb.last_change;
        }
        self.tlb.registered().any(|(_, c)| self.tlb.needs(c))
    }

    /// The host has forgotten every translation of the pool, for every
    /// vCPU (a VM-wide invalidation: the pool slot re-registered — KVM
    /// flushes every vCPU's TLB when a slot goes — or the one vCPU's TLB
    /// flushed): quarantined pages may be reused. A flush of one vCPU of
    /// several (its CR3 reloaded) is [`ShadowMmu::vcpu_flushed`].
    pub fn host_invalidated(&mut self) {
        if self.host_stale() {
            self.stats.host_invalidations += 1;
            self.deferred.clear();
            self.deferred_overflow = false;
            self.free.extend(self.quarantine.drain(..).map(|(p, _)| p));
        }
        let t = self.ticket();
        self.tlb.floor = t;
        for c in self.tlb.cpus.iter_mut().flatten() {
            *c = CpuTlb { flushed: t, requested: t, force: 0, owed: false };
        }
    }

    /// The guest itself will flush its TLB after the changes recorded so
    /// far (pv mode on an EPT/NPT host, where the CPU walks the shadow
    /// tables from memory and the guest's `invlpg`, CR3 load or remote
    /// flush is the invalidation): they need no flush by the VMM. Freed
    /// pages stay in quarantine until real flushes. Call it only when
    /// [`ShadowMmu::host_stale`] was false before those changes (so nothing
    /// older is excused with them).
    pub fn host_flush_left_to_guest(&mut self) {
        self.tlb.excused = self.tlb.now;
        self.ticket();
    }

    /// Whether `vcpu` must flush its TLB before it runs guest code again.
    pub fn needs_flush(&self, vcpu: &ShadowVcpu) -> bool {
        self.tlb.cpus.get(vcpu.id).and_then(Option::as_ref).is_some_and(|c| self.tlb.needs(c))
    }

    /// The vCPUs that must flush before they run guest code again and that
    /// the VMM has not been told about since the change that requires it
    /// (the answer is taken: a vCPU is named once per new reason). The VMM
    /// kicks those of them in `KVM_RUN` (and, where the guest's own flush
    /// does not reach the host, waits until they are out), and the others
    /// flush at their next entry ([`ShadowMmu::prepare_entry`]). Call it
    /// after every operation, under the MMU lock.
    pub fn flush_requests(&mut self) -> VcpuSet {
        let mut set = VcpuSet::EMPTY;
        for i in 0..self.tlb.cpus.len() {
            let Some(c) = self.tlb.cpus[i] else { continue };
            if self.tlb.needs(&c) && !c.owed && c.requested < self.tlb.reason(&c).max(1) {
                set.insert(i);
                if let Some(c) = self.tlb.cpus[i].as_mut() {
                    c.requested = self.tlb.now;
                }
            }
        }
        set
    }

    /// A ticket for a flush about to be done: a flush done after taking it
    /// covers every change recorded before.
    pub fn flush_ticket(&mut self) -> FlushTicket {
        FlushTicket(self.ticket())
    }

    /// vCPU `id` flushed its TLB after taking `ticket`: quarantined pages
    /// every vCPU has now flushed become free. Counted as a host
    /// invalidation when the vCPU needed it.
    pub fn vcpu_flushed(&mut self, id: usize, ticket: FlushTicket) {
        if self.tlb.cpus.get(id).and_then(Option::as_ref).is_some_and(|c| self.tlb.needs(c)) {
            self.stats.host_invalidations += 1;
        }
        if let Some(Some(c)) = self.tlb.cpus.get_mut(id) {
            c.flushed = c.flushed.max(ticket.0);
            c.requested = c.requested.max(ticket.0);
            c.owed = false;
        }
        self.release_quarantine();
    }

    /// The vCPUs in `set` are outside `KVM_RUN` with a flush request they
    /// honour before running guest code again (KVM's
    /// `kvm_make_all_cpus_request` with `KVM_REQUEST_WAIT`): for the
    /// quarantine they count as flushed at `ticket` (taken before they were
    /// stopped), and each still owes the flush ([`ShadowMmu::needs_flush`]
    /// says so until [`ShadowMmu::vcpu_flushed`]).
    pub fn vcpus_stopped(&mut self, set: VcpuSet, ticket: FlushTicket) {
        for id in set.iter() {
            if let Some(Some(c)) = self.tlb.cpus.get_mut(id) {
                c.flushed = c.flushed.max(ticket.0);
                c.requested = c.requested.max(ticket.0);
                c.owed = true;
            }
        }
        self.release_quarantine();
    }

    /// The VMM's remote flush: given vCPUs the MMU is waiting for (to
    /// reuse pool pages they may still cache, or roots in limbo they may
    /// be on), stop each outside `KVM_RUN` with a flush request (kick and
    /// wait — leaving guest mode takes no lock), and return those it
    /// stopped with their CR3. Called under the MMU lock, only when the
    /// pool has no other page to give. Without one, such pages wait for
    /// the vCPUs' own flushes and exits.
    pub fn set_remote_flush(&mut self, hook: RemoteFlush) {
        self.remote_flush.0 = Some(hook);
    }

    /// Before `vcpu` enters `KVM_RUN`: rebuild its root if a zap of
    /// everything made it obsolete (point CR3 at `root`), and say whether
    /// it must flush (then flush, then [`ShadowMmu::vcpu_flushed`]).
    pub fn prepare_entry(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
    ) -> Result<EntryWork, ShadowError> {
        self.act(vcpu);
        let root = self.reload_obsolete(vcpu, pool, guest)?;
        let flush = self.needs_flush(vcpu).then(|| self.flush_ticket());
        Ok(EntryWork { root, flush })
    }

    /// Quarantined pages every registered vCPU has flushed become free.
    pub(super) fn release_quarantine(&mut self) {
        if self.tlb.cpus.iter().all(Option::is_none) {
            return;
        }
        let min = self.tlb.min_flushed_except(None);
        while let Some(&(p, tag)) = self.quarantine.front() {
            if tag > min {
                break;
            }
            self.quarantine.pop_front();
            self.free.push(p);
        }
    }

    /// A quarantined page the acting vCPU may take now (module doc,
    /// "Invariants"). If there is none, the VMM's remote flush is asked to
    /// stop the vCPUs holding pages back — those that have not flushed the
    /// quarantine, and those a root in limbo waits for — and the pages they
    /// release are taken.
    pub(super) fn take_quarantined(&mut self, pool: &mut impl GuestPhys) -> Option<u32> {
        if let Some(p) = self.take_flushed() {
            return Some(p);
        }
        let acting = self.tlb.acting;
        let oldest = self.quarantine.front().map(|q| q.1);
        let mut ask = VcpuSet::EMPTY;
        for (i, c) in self.tlb.registered() {
            if Some(i) != acting && oldest.is_some_and(|o| c.flushed < o) {
                ask.insert(i);
            }
        }
        for (_, _, pending) in &self.limbo {
            ask = VcpuSet(ask.0 | pending.0);
        }
        if let Some(a) = acting {
            ask = ask.minus(VcpuSet::single(a));
        }
        if ask.is_empty() {
            return None;
        }
        let stopped = self.remote_flush.0.as_mut().map(|hook| hook(ask))?;
        let mut set = VcpuSet::EMPTY;
        for &(id, cr3) in &stopped {
            set.insert(id);
            let page = cr3.and_then(|c| self.page_of(c.raw() & ADDR));
            self.leave_limbo(pool, id, page);
        }
        // Stopped with a flush to do: clean of everything recorded so far,
        // the pages limbo just released included.
        let t = self.ticket();
        self.vcpus_stopped(set, FlushTicket(t));
        self.free.pop().or_else(|| self.take_flushed())
    }

    /// A quarantined page every vCPU but the acting one has flushed; the
    /// acting vCPU then owes a flush.
    fn take_flushed(&mut self) -> Option<u32> {
        let acting = self.tlb.acting;
        let others = self.tlb.min_flushed_except(acting);
        let (oldest, newest) = (self.quarantine.front()?.1, self.quarantine.back()?.1);
        let p = if newest <= others {
            self.quarantine.pop_back()?.0
        } else if oldest <= others {
            self.quarantine.pop_front()?.0
        } else {
            return None;
        };
        match acting.and_then(|a| self.tlb.cpus.get_mut(a)).and_then(Option::as_mut) {
            // It may still cache the page: it flushes before it runs again.
            Some(c) => c.force = c.force.max(self.tlb.now),
            None => self.changed(),
        }
        Some(p)
    }

    /// Trapping shadow mode: a change in shadow pages that only roots other
    /// than the loaded ones reach (an address space being torn down, a
    /// root evicted from the cache) does not need the host to forget
    /// anything until such a root is loaded again — no vCPU can reach it
    /// before. So it is deferred to that `LOAD_CR3` (or to any earlier
    /// invalidation), and tearing down an address space that is not loaded
    /// costs no host invalidation per entry. A pool page freed meanwhile
    /// stays in quarantine until the host has forgotten it. Off by default;
    /// pv mode leaves it off (a pv guest loads published roots without an
    /// exit, so every change is made coherent before it runs again). Only
    /// in force while at most one vCPU is registered (module doc).
    pub fn set_defer_unreachable(&mut self, on: bool) {
        self.defer = on;
    }

    /// Whether deferral is in force: asked for, and one vCPU at most.
    pub(super) fn deferring(&self) -> bool {
        self.defer && self.tlb.registered().nth(1).is_none()
    }

    /// Record a change in `page`, or defer it when no loaded root reaches
    /// the page.
    pub(super) fn mark_stale(&mut self, page: u32) {
        if self.change_recorded() {
            return;
        }
        if !self.deferring() || (0..self.loaded.len()).any(|i| self.reaches(self.loaded[i], page)) {
            self.changed();
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
        if self.change_recorded() || (self.deferred.is_empty() && !self.deferred_overflow) {
            return;
        }
        if self.deferred_overflow {
            self.changed();
            return;
        }
        let pending = std::mem::take(&mut self.deferred);
        if pending.iter().any(|&p| self.pages[p as usize].is_some() && self.reaches(root, p)) {
            self.changed();
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
                self.changed();
            }
        }
        self.stats.wp_off_dirty += harvested;
        harvested
    }

    /// The pool pages numbered `pages` (0 = the first page of the pool)
    /// may have been written by the guest (the host's dirty log says so):
    /// make each hold exactly the VMM's copy again (zeros for a page not in
    /// use; an A bit the CPU set in a harvested leaf is not a difference,
    /// `harvest.rs`). A page that differed records a change — a vCPU or the
    /// host may have cached the guest's entries — and counts as a repair.
    /// Returns the number of pages repaired. Reading the pool here only
    /// *compares*; no decision depends on what the guest wrote.
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
                self.changed();
            }
        }
        self.stats.pool_repairs += repaired;
        repaired
    }
}
