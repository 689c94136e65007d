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
//!   a page below `pages.len()` not in use is in `free` or `quarantine`,
//!   never both. Pages from `pages.len()` to `capacity` were never taken:
//!   they are in no list and cost nothing (the bookkeeping grows with the
//!   pages in use, not with the pool's size — issue 22, item 7), and are
//!   taken, in order, only when `free` is empty.
//! - `loaded` lists the root page of every vCPU whose current root is of
//!   this `generation` (one entry per vCPU, so a root two vCPUs run on is
//!   there twice). A zap of everything starts a new generation: every
//!   vCPU's root is then obsolete and the vCPU has no current root until
//!   its next `LOAD_CR3` (KVM's `mmu_valid_gen`).
//! - `rules` are the paging controls every shadow entry was computed under;
//!   a vCPU loading other controls zaps everything first
//!   ([`ShadowMmu::set_mode`]).
//!
//! Today one `ShadowVcpu` is in use per `ShadowMmu` (the VMM runs one
//! vCPU); nothing here locks.

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
    /// Freed pool pages the host may still cache (until invalidated).
    pub(super) quarantine: Vec<u32>,
    /// The shadow page of each role.
    pub(super) by_role: HashMap<Role, u32>,
    /// The reverse map: guest frame → the shadow pages derived from it.
    pub(super) rmap: HashMap<u64, Vec<u32>>,
    /// The root cache, most recently loaded first: (guest root, page).
    pub(super) roots: VecDeque<(u64, u32)>,
    /// The root page of every vCPU's current root (module doc).
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
    /// The host may hold stale translations of shadow tables.
    pub(super) stale: bool,
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
            quarantine: Vec::new(),
            by_role: HashMap::new(),
            rmap: HashMap::new(),
            roots: VecDeque::new(),
            loaded: Vec::new(),
            generation: 0,
            rules: mode,
            epoch: 0,
            stale: false,
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
