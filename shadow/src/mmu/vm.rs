//! The per-VM half of the shadow MMU: everything every vCPU shares.
//!
//! [`ShadowMmu`] holds the shadow pages, their role index and reverse map,
//! the pool's free list and quarantine, the root cache, the host-coherence
//! state and the counters — KVM's `kvm->arch` MMU fields. What a single
//! vCPU has in hand (its current root, its paging controls, its last fixed
//! fault) is a [`ShadowVcpu`] (`vcpu.rs`); an operation on behalf of a vCPU
//! is a `ShadowMmu` method that takes it.
//!
//! # Invariants
//!
//! - `pages[i]` is `Some` exactly when pool page `i` is in use; a page in
//!   use is in `by_role` under its role and in `rmap` under its guest frame;
//!   a page below `pages.len()` not in use is in exactly one of `free`,
//!   `quarantine` and `held`. Pages from `pages.len()` to `capacity` were
//!   never taken: they are in no list and cost nothing (the bookkeeping
//!   grows with the pages in use, not with the pool's size — issue 22,
//!   item 7), and are taken, in order, only when `free` is empty.
//! - A page in `limbo` (a root some vCPU may have loaded by itself) is
//!   neither freed nor reused: in use, or `held`.
//! - `loaded` lists the root page every registered vCPU's CR3 holds (one
//!   entry per vCPU, so a root two vCPUs run on is there twice: KVM's
//!   `root_count`). A page in `loaded` is never freed: eviction from the
//!   root cache unpins it, and it is freed when the last vCPU leaves it. A
//!   zap of everything starts a new generation: every vCPU's root is then
//!   obsolete (KVM's `mmu_valid_gen`), its page zeroed and `held` until the
//!   vCPU's next `LOAD_CR3`, fault or entry rebuilds its root.
//! - `rules` are the paging controls every shadow entry was computed under;
//!   a vCPU loading other controls zaps everything first
//!   ([`ShadowMmu::set_mode`]).
//!
//! Nothing here locks: the VMM keeps the `ShadowMmu` behind its MMU lock
//! (the module doc of `mmu.rs`, "SMP: the MMU lock"). `ShadowMmu` is
//! `Send`, so a `Mutex<ShadowMmu>` is shared by the vCPU threads.

use super::*;

/// The shadow MMU of one VM: shadow pages, reverse map, pool, root cache,
/// coherence state and counters, shared by its vCPUs ([`ShadowVcpu`]).
#[derive(Debug)]
pub struct ShadowMmu {
    /// The pool's first GPA.
    pub(super) pool_base: u64,
    /// Pool page `i`'s shadow page, if in use.
    pub(super) pages: Vec<Option<ShadowPage>>,
    /// Pool pages free to take (taken and freed before).
    pub(super) free: Vec<u32>,
    /// The pool's size in pages; `pages.len()` of them were ever taken.
    pub(super) capacity: u32,
    /// Freed pool pages a vCPU or the host may still cache, oldest first,
    /// each with the TLB generation it was freed in (`coherence.rs`).
    pub(super) quarantine: VecDeque<(u32, u64)>,
    /// Root pages a zap of everything took while a vCPU's CR3 still held
    /// them: neither in use nor free until the last such vCPU leaves
    /// (KVM's invalid roots with a root count).
    pub(super) held: Vec<u32>,
    /// Roots a vCPU may be running on without the MMU knowing (pv mode
    /// on SMP: a published root loaded by the guest's own `mov cr3`),
    /// evicted or zapped since: (page, guest root, the vCPUs whose CR3
    /// has not been seen elsewhere since). Neither freed nor reused until
    /// that set is empty (`remote.rs`).
    pub(super) limbo: Vec<(u32, u64, VcpuSet)>,
    /// The guest may load published roots itself ([`ShadowMmu::set_guest_loads_roots`]).
    pub(super) guest_loads_roots: bool,
    /// The shadow page of each role.
    pub(super) by_role: HashMap<Role, u32>,
    /// The reverse map: guest frame → the shadow pages derived from it.
    pub(super) rmap: HashMap<u64, Vec<u32>>,
    /// The root cache, most recently loaded first: (guest root, page).
    pub(super) roots: VecDeque<(u64, u32)>,
    /// The root page every vCPU's CR3 holds, current or obsolete (module
    /// doc): KVM's root counts.
    pub(super) loaded: Vec<u32>,
    /// Bumped by every zap of everything: a vCPU root of an older
    /// generation is obsolete.
    pub(super) generation: u64,
    /// The paging controls every shadow entry was computed under.
    pub(super) rules: PagingMode,
    /// Bumped by every change after which a fault answered `Fixed` may
    /// rightly come back (a page-table write, new rules or table frames):
    /// invariant 7 compares it.
    pub(super) epoch: u64,
    /// The TLB generations and every vCPU's flush state (`coherence.rs`).
    pub(super) tlb: TlbState,
    /// The VMM's remote flush ([`ShadowMmu::set_remote_flush`]).
    pub(super) remote_flush: RemoteFlushHook,
    /// The counters.
    pub(super) stats: ShadowStats,
    /// PML4 slots to prefill first ([`ShadowMmu::set_prefill_hints`]).
    pub(super) prefill_hints: Vec<u64>,
    /// Steps taken by the handlers (entries and list elements visited):
    /// the deterministic measure of the VMM's work, see [`ShadowMmu::work`].
    pub(super) work: u64,
    /// The frames that may hold guest tables (invariant 6).
    pub(super) tables: TableFrames,
    /// How many roots the cache keeps (sized from the pool).
    pub(super) root_cap: usize,
    /// New shadow pages a prefill may still create (the user-half prefill
    /// of a new root is bounded; the kernel half's budget is the pool).
    pub(super) prefill_budget: usize,
    /// Prefill the user half of a new root ([`ShadowMmu::set_prefill_user_half`]).
    pub(super) prefill_user: bool,
    /// Defer the host invalidation of changes no root but the current one
    /// could reach until a root that reaches them is loaded
    /// ([`ShadowMmu::set_defer_unreachable`]).
    pub(super) defer: bool,
    /// Pages changed while the host was not made stale for them (deferral):
    /// loading a root that reaches one of them makes the host stale.
    pub(super) deferred: Vec<u32>,
    /// More deferred pages than [`MAX_DEFERRED`]: any root switch makes the
    /// host stale.
    pub(super) deferred_overflow: bool,
    /// Writable user leaves made for supervisor writes under CR0.WP = 0 and
    /// SMAP (module doc, "Paging controls"): `(page, index, entry)`. While
    /// any exists, no other user leaf lets user mode run.
    pub(super) user_write_leaves: Vec<(u32, u64, u64)>,
    /// A deliberately broken variant, to show the SMP tests catch it.
    #[cfg(test)]
    pub(super) sabotage: Sabotage,
}

impl ShadowMmu {
    /// A shadow MMU whose pool is `pages` 4 KiB pages at `pool_base`
    /// (zeroed memory), for vCPUs starting with the paging controls `mode`
    /// ([`ShadowMmu::new_vcpu`]).
    pub fn new(pool_base: Gpa, pages: u32, mode: PagingMode) -> ShadowMmu {
        ShadowMmu {
            pool_base: pool_base.raw(),
            pages: Vec::new(),
            free: Vec::new(),
            capacity: pages,
            quarantine: VecDeque::new(),
            held: Vec::new(),
            limbo: Vec::new(),
            guest_loads_roots: false,
            by_role: HashMap::new(),
            rmap: HashMap::new(),
            roots: VecDeque::new(),
            loaded: Vec::new(),
            generation: 0,
            rules: mode,
            epoch: 0,
            tlb: TlbState { now: 1, ..TlbState::default() },
            remote_flush: RemoteFlushHook::default(),
            stats: ShadowStats::default(),
            work: 0,
            prefill_hints: Vec::new(),
            tables: TableFrames::ALL,
            root_cap: (pages as usize / POOL_PAGES_PER_ROOT).clamp(ROOT_CACHE, MAX_ROOTS),
            prefill_budget: usize::MAX,
            prefill_user: false,
            defer: false,
            deferred: Vec::new(),
            deferred_overflow: false,
            user_write_leaves: Vec::new(),
            #[cfg(test)]
            sabotage: Sabotage::None,
        }
    }

    /// How many shadow roots the cache keeps: one per
    /// [`POOL_PAGES_PER_ROOT`] pool pages, at least [`ROOT_CACHE`], at most
    /// [`MAX_ROOTS`].
    pub fn root_cache_capacity(&self) -> usize {
        self.root_cap
    }

    /// The counters.
    pub fn stats(&self) -> ShadowStats {
        self.stats
    }

    /// Steps the handlers have taken so far: one per shadow or guest entry
    /// visited and per parent-list or reverse-map element touched. A
    /// deterministic stand-in for the VMM's time, for tests that bound it.
    pub fn work(&self) -> u64 {
        self.work
    }
}
