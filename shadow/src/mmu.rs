//! The shadow MMU: the page tables the vCPU really walks, derived from the
//! guest's own tables and kept coherent with them by the VMM.
//!
//! # Overview (after KVM's `Documentation/virt/kvm/x86/mmu.rst`)
//!
//! The guest believes its CR3 points at its own PML4. In shadow mode the
//! vCPU's CR3 points instead at a **shadow root** in the **shadow pool**, a
//! range of guest-physical memory the guest's memory map does not contain
//! (and which, see the trust model below, the guest can still reach). Shadow tables translate GVA → GPA directly with the
//! *effective* permissions of the guest walk; KVM's own second stage (or,
//! on a host without EPT/NPT, KVM's own shadowing) does GPA → HPA below.
//!
//! ## Shadow pages and their role
//!
//! Every shadow page is derived from exactly one guest table page and has a
//! **role**: the guest frame it shadows (`gfn`), its level (4 = PML4 … 1 =
//! PT) and the access its parents grant (writable, user, executable: the
//! AND of RW, US and ¬XD above it). Pages are looked up by role, so two
//! guest PML4s that share a kernel PDPT share its shadow as well — the
//! **shared kernel subtrees** come for free. Non-leaf shadow entries are
//! fully permissive (P, RW, US, A; no XD); the leaf carries the effective
//! permissions, as in KVM.
//!
//! ## Invariants
//!
//! 1. A present shadow leaf maps exactly the GPA the guest walk gives for
//!    that GVA, never more permissively than the walk allows for the
//!    accesses that can reach it, and only guest RAM (the walker refuses
//!    anything else). The shadow pool is never mapped: the isolation
//!    property. (The one leaf whose bits alone would grant more — a user
//!    leaf made writable for a supervisor write under CR0.WP = 0 and SMAP —
//!    exists only while user mode cannot run; see "Paging controls".)
//! 2. A shadow leaf exists only for a guest leaf whose A bit is set, and is
//!    writable only when the guest leaf's D bit is set. So the first access
//!    to a page, and the first write to a clean page, fault to the VMM,
//!    which sets A / D in the guest entry exactly as hardware would
//!    (**A/D emulation**).
//! 3. The **reverse map** lists, for every guest table frame, the shadow
//!    pages derived from it. Every guest page-table page is in the
//!    read-only page-table zone, so every guest write to one exits to the
//!    VMM ([`ShadowMmu::pte_written`]), which updates the derived shadow
//!    entry in place when it can (a new leaf with A set) and zaps it
//!    otherwise. A partial or misaligned write zaps the whole shadow page.
//! 4. **Host coherence.** On a host whose KVM itself shadows page tables,
//!    changes the VMM makes to shadow tables are invisible to the vCPU
//!    until the VMM makes the host forget (docs/host.md). Every change that
//!    removes or restricts a mapping sets [`ShadowMmu::host_stale`]; the VMM
//!    invalidates before the guest runs again and then calls
//!    [`ShadowMmu::host_invalidated`]. Freed pool pages wait in quarantine
//!    until then, so no page the host may still cache is reused early.
//!    With [`ShadowMmu::set_defer_unreachable`] (trapping shadow mode) a
//!    change in a page the loaded root does not reach is remembered instead
//!    and makes the host stale when a root that reaches it is loaded (or a
//!    quarantined page is reused): the vCPU cannot use it before.
//!
//! pv mode (`mmu::pv`) applies the guest's queued writes in batches
//! through the same per-entry path, publishes the cached roots, and
//! prefetches the translation a sync names.
//! 5. **Pool exhaustion** zaps everything (all roots included) and
//!    rebuilds the current root: correct, counted, and rare.
//!
//! 6. **Only trapped tables are shadowed.** A guest paging structure must
//!    lie in a frame whose writes trap ([`ShadowMmu::set_table_frames`]:
//!    the page-table zone and the VMM's boot tables); a root outside is
//!    refused ([`ShadowError::RootNotTrapped`]) and an entry pointing at a
//!    table outside is treated like a reserved bit (`#PF` with RSVD), so no
//!    shadow is ever derived from a table the VMM could not keep coherent.
//! 7. **No livelock.** A `SHADOW_FAULT` answered [`FaultOutcome::Fixed`]
//!    promises that the retried access passes. If the very same fault
//!    (address and error code) comes back with nothing changed in between
//!    (no page-table write, CR3 load, flush or rule change), the shadow did
//!    not do what the walk promised: the one known cause, an *implicit*
//!    supervisor access with CR4.SMAP and RFLAGS.AC = 1 (the error code does
//!    not say "implicit"; SDM vol. 3 §4.6.1 says it faults whatever AC is),
//!    becomes the guest's own `#PF` (the first walk, answered "fixed",
//!    already set the entries' A bits, which the model of hardware here —
//!    KVM's walker — leaves alone on a faulting access); anything else is
//!    [`ShadowError::Livelock`], never an endless loop.
//!
//! # Paging controls (SDM vol. 3 §4.6 "Access rights", §4.7 "Page-fault exceptions")
//!
//! The vCPU runs with CR0.WP = 1 and EFER.NXE = 1 whatever the guest set,
//! as KVM's shadow MMU does (`Documentation/virt/kvm/x86/mmu.rst`,
//! "Emulating cr0.wp"): WP = 1 so that read-only shadow leaves trap
//! supervisor writes (D-bit emulation), NXE = 1 so that shadow leaves can
//! carry XD for reasons of their own and every fetch fault's error code
//! has I/D set (with the guest's NXE = 0 and SMEP = 0 a fetch would
//! otherwise look like a read, and with SMAP = 1 a supervisor fetch from a
//! user page would get a spurious fault). The guest's own controls
//! ([`PagingMode`]) govern the walk and the error code the guest sees.
//!
//! - **CR0.WP = 0** is emulated per fault, as KVM does: a supervisor write
//!   to a read-only page gets a writable, supervisor-only leaf (a later
//!   user access refaults and gets the ordinary read-only user leaf back). With CR4.SMEP that leaf also gets XD: the
//!   page is a user page to the guest, and §4.6.1 forbids supervisor
//!   fetches from it (`#PF` 0x11), which the now-supervisor leaf would let
//!   through.
//! - **CR0.WP = 0 with CR4.SMAP**: a supervisor write to a read-only *user*
//!   page passes only with RFLAGS.AC = 1, and AC changes (`stac`, `clac`,
//!   `popf`) do not exit. A supervisor-only leaf (KVM's choice) would let
//!   later AC = 0 and implicit supervisor accesses through, which must
//!   fault. So the leaf stays a *user* leaf, made writable (and XD): SMAP
//!   then checks every later supervisor access exactly, and only user-mode
//!   code could misuse it. User mode cannot run without first fetching an
//!   instruction, so while such a leaf exists every other user-accessible
//!   shadow leaf is zapped and new ones are made XD (or, for a supervisor
//!   fetch, supervisor-only): the first user-mode access faults, and that
//!   fault puts the ordinary read-only leaf back before anything else. It
//!   costs a scan of the pool and refaults of the user working set, for
//!   what is a rare combination of controls.
//!
//! Guest page-table pages are never written by the VMM except for A/D
//! bits, which the walker sets as hardware would.
//!
//! ## Trust model
//!
//! The guest is hostile; ring 0 in the guest is not trusted either.
//!
//! - **The pool is guest-writable.** The vCPU walks the shadow tables, so
//!   the pool must be guest-physical memory, and nothing traps a guest's own
//!   `mov cr3`: a ring-0 guest can load tables of its own that map the pool
//!   (its CR3 even reads back as a pool address) and write anything there.
//!   (A read-only slot would stop the writes, but on Intel hosts with EPT
//!   A/D bits the CPU treats guest page-table reads as writes, SDM vol. 3C
//!   §29.3.5, so the vCPU could not walk it.) What the guest gains is only
//!   what its own tables already give it — access to its RAM and the pool —
//!   so the rule is: **no fact the MMU relies on lives in the pool.** Every
//!   shadow page's entries are kept in VMM memory (`ShadowPage::entries`);
//!   the pool is written from that copy and never read to decide anything
//!   (only [`ShadowMmu::shadow_leaf`], a diagnostic of what the vCPU sees,
//!   and [`ShadowMmu::repair_pool_pages`], which compares, read it). A page
//!   taken from the free list is zeroed again, whatever it holds.
//! - **Repair.** The VMM learns which pool pages the guest wrote from the
//!   host (KVM's dirty log of the pool's slot) at every shadow hypercall and
//!   before the slot is re-registered, and hands them to
//!   [`ShadowMmu::repair_pool_pages`], which rewrites each from the copy and
//!   marks the host stale. So a guest that scribbles over the pool and
//!   comes back through `LOAD_CR3` gets exactly the shadow its own tables
//!   imply; until it comes back it runs on whatever it wrote, which only
//!   hurts itself. No guest input makes the MMU panic, in any build.
//! - **Guest tables are read, never trusted**: the walker checks every
//!   entry (reserved bits, RAM bounds); a shadow leaf maps guest RAM only.
//!
//! ## Bounds
//!
//! Every handler does work proportional to what the guest's change implies
//! (deterministic steps, counted by [`ShadowMmu::work`]):
//!
//! - parent lists are hash sets, so unlinking one of the 400,000 entries a
//!   guest can make point at one shadow page table is O(1), and freeing a
//!   subtree costs O(its entries);
//! - the reverse map holds at most one page per (level, access) role of a
//!   guest frame (≤ 32);
//! - a new root's kernel-half prefill links subtrees already prefilled for
//!   another root without walking them again (`ShadowPage::prefilled`), so
//!   a root costs O(its new shadow pages); its budget is the pool itself,
//!   minus [`PREFILL_RESERVE`] pages for the next fault's path, and what
//!   exception delivery touches ([`ShadowMmu::set_prefill_hints`]) comes
//!   first — the kernel half of a 22 GiB guest is as deliverable as that of
//!   a 64 MiB one;
//! - the VMM's memory for the MMU is bounded by the pool: one 4 KiB copy
//!   and one parent set per shadow page, and at most 512 parent entries
//!   per pool page in all the sets together (each is an entry of one).

use crate::walker::{self, A, Access, D, GuestPhys, P, PS, PagingMode, RW, US, XD};
use guest_abi::{Gpa, Gva};
use std::collections::{HashMap, HashSet, VecDeque};

use guest_abi::paging::{ADDR_MASK as ADDR, PAGE_SIZE as PAGE};
/// Pool pages a kernel-half prefill leaves free: the path of the fault
/// that follows (a PDPT, a PD and a PT).
pub const PREFILL_RESERVE: usize = 3;
/// New shadow pages the user-half prefill of a new root may create.
pub const USER_PREFILL_PAGES: usize = 16;
/// Deferred changed pages remembered ([`ShadowMmu::set_defer_unreachable`]);
/// past that, the next root switch invalidates.
pub const MAX_DEFERRED: usize = 1024;
/// Steps of the walk up the parent sets that decides whether a root reaches
/// a page; past that the answer is yes.
pub const REACH_STEPS: usize = 64;
/// The fewest shadow roots kept for recent guest CR3s (KVM keeps 3
/// `prev_roots`; a handful of address spaces switching round-robin must not
/// rebuild). The cache grows with the pool: one root per
/// [`POOL_PAGES_PER_ROOT`] pool pages, up to [`MAX_ROOTS`].
pub const ROOT_CACHE: usize = 8;
/// Pool pages per cached root: a root, its user-half path (PDPT, PD, PT)
/// and room for the tables its address space touches.
pub const POOL_PAGES_PER_ROOT: usize = 32;
/// The most shadow roots cached (what pv mode can publish:
/// `guest_abi::pv::ROOTS_CAP`).
pub const MAX_ROOTS: usize = guest_abi::pv::ROOTS_CAP;

/// Access granted by the levels above a shadow page: bit 0 writable,
/// bit 1 user, bit 2 executable.
type AccessBits = u8;
const ACC_W: AccessBits = 1;
const ACC_U: AccessBits = 2;
const ACC_X: AccessBits = 4;
const ACC_ALL: AccessBits = 7;

/// A shadow page's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Role {
    gfn: u64,
    level: u8,
    access: AccessBits,
}

#[derive(Debug)]
struct ShadowPage {
    role: Role,
    /// `(parent page, index)` of every shadow entry pointing here: a set,
    /// so unlinking one of 400,000 sharers is O(1), not a scan.
    parents: HashSet<(u32, u16)>,
    /// Pinned as a root.
    root: bool,
    /// A root whose kernel half may have lost entries since it was last
    /// prefilled (set when an entry of a level-4 page is zapped).
    needs_prefill: bool,
    /// Every guest entry of this page that prefill would shadow was
    /// shadowed, and none of this page's entries was zapped since: a
    /// prefill reaching it again need not descend (cleared by a zap).
    prefilled: bool,
    /// The page's 512 entries as the VMM wrote them: the truth. The pool
    /// copy is written from here and never read back (the trust model).
    entries: Box<[u64; 512]>,
}

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

/// What a shadow fault resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadow now maps the address: retry the access (a hidden fault).
    Fixed,
    /// The guest's own tables forbid the access: deliver a `#PF` with this
    /// error code to the guest.
    GuestFault(u32),
}

/// The root of a shadow address space: a page of the VMM's shadow pool,
/// what the vCPU's CR3 holds in shadow mode — never a guest table. Only
/// [`ShadowMmu`] makes one, so a guest root cannot pass for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShadowRoot(Gpa);

impl std::fmt::LowerHex for ShadowRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

impl ShadowRoot {
    /// Its guest-physical address in the pool (the value for the vCPU's
    /// CR3).
    pub const fn gpa(self) -> Gpa {
        self.0
    }
}

/// Why the MMU cannot proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowError {
    /// No guest CR3 has been loaded yet.
    NoRoot,
    /// The pool is too small to hold even one path, or what fault delivery
    /// needs of the kernel half (the hinted slots of
    /// [`ShadowMmu::set_prefill_hints`]) even when empty.
    PoolTooSmall,
    /// The guest root is not in a frame whose writes trap (invariant 6).
    RootNotTrapped(Gpa),
    /// The same fault came back right after it was answered "fixed", with
    /// nothing changed in between (invariant 7).
    Livelock {
        /// The faulting address.
        cr2: Gva,
        /// The error code, as the vCPU reported it.
        error_code: u32,
    },
}

impl std::fmt::Display for ShadowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShadowError::NoRoot => write!(f, "no guest CR3 loaded yet"),
            ShadowError::PoolTooSmall => write!(f, "the shadow pool cannot hold one path"),
            ShadowError::RootNotTrapped(r) => {
                write!(f, "guest root {r:#x} is outside the page-table zone, so its changes would not trap")
            }
            ShadowError::Livelock { cr2, error_code } => write!(
                f,
                "shadow MMU livelock: page fault at {cr2:#x} (error code {error_code:#x}) repeated right after it was fixed, with nothing changed"
            ),
        }
    }
}

impl std::error::Error for ShadowError {}

/// The guest frames that may hold paging structures (invariant 6): up to
/// four GPA ranges, or everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFrames {
    ranges: [(u64, u64); 4],
    n: usize,
    all: bool,
}

impl TableFrames {
    /// Every frame (no trapping restriction: host tests).
    pub const ALL: TableFrames = TableFrames { ranges: [(0, 0); 4], n: 0, all: true };

    /// The frames in `ranges` (`[start, end)` each; at most four are kept).
    pub fn new(ranges: &[(Gpa, Gpa)]) -> TableFrames {
        let mut t = TableFrames { ranges: [(0, 0); 4], n: 0, all: false };
        for &r in ranges.iter().take(4) {
            t.ranges[t.n] = (r.0.raw(), r.1.raw());
            t.n += 1;
        }
        t
    }

    /// Whether the frame holding `gpa` may hold a table.
    pub fn contains(&self, gpa: Gpa) -> bool {
        let gpa = gpa.raw();
        self.all || self.ranges[..self.n].iter().any(|&(s, e)| gpa >= s && gpa < e)
    }
}

/// Guest memory seen through [`TableFrames`]: what the walker reads.
struct Zoned<'a, G: GuestPhys> {
    mem: &'a mut G,
    tables: TableFrames,
}

impl<G: GuestPhys> GuestPhys for Zoned<'_, G> {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        self.mem.read_u64(gpa)
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        self.mem.write_u64(gpa, value)
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        self.mem.is_ram(gpa, len)
    }
    fn may_hold_tables(&self, gpa: Gpa) -> bool {
        self.tables.contains(gpa) && self.mem.may_hold_tables(gpa)
    }
}

/// The shadow MMU of one vCPU.
#[derive(Debug)]
pub struct ShadowMmu {
    pool_base: u64,
    pages: Vec<Option<ShadowPage>>,
    free: Vec<u32>,
    quarantine: Vec<u32>,
    by_role: HashMap<Role, u32>,
    rmap: HashMap<u64, Vec<u32>>,
    roots: VecDeque<(u64, u32)>,
    current: Option<(u64, u32)>,
    mode: PagingMode,
    stale: bool,
    stats: ShadowStats,
    /// PML4 slots to prefill first ([`ShadowMmu::set_prefill_hints`]).
    prefill_hints: Vec<u64>,
    /// Steps taken by the handlers (entries and list elements visited):
    /// the deterministic measure of the VMM's work, see [`ShadowMmu::work`].
    work: u64,
    tables: TableFrames,
    /// The last fault answered `Fixed` (address, error code), until the
    /// guest changes anything (invariant 7).
    last_fixed: Option<(u64, u32)>,
    /// How many roots the cache keeps (sized from the pool).
    root_cap: usize,
    /// New shadow pages a prefill may still create (the user-half prefill
    /// of a new root is bounded; the kernel half's budget is the pool).
    prefill_budget: usize,
    /// Prefill the user half of a new root ([`ShadowMmu::set_prefill_user_half`]).
    prefill_user: bool,
    /// Defer the host invalidation of changes no root but the current one
    /// could reach until a root that reaches them is loaded
    /// ([`ShadowMmu::set_defer_unreachable`]).
    defer: bool,
    /// Pages changed while the host was not made stale for them (deferral):
    /// loading a root that reaches one of them makes the host stale.
    deferred: Vec<u32>,
    /// More deferred pages than [`MAX_DEFERRED`]: any root switch makes the
    /// host stale.
    deferred_overflow: bool,
    /// Writable user leaves made for supervisor writes under CR0.WP = 0 and
    /// SMAP (module doc, "Paging controls"): `(page, index, entry)`. While
    /// any exists, no other user leaf lets user mode run.
    user_write_leaves: Vec<(u32, u64, u64)>,
}

impl ShadowMmu {
    /// A shadow MMU whose pool is `pages` 4 KiB pages at `pool_base`
    /// (zeroed memory).
    pub fn new(pool_base: Gpa, pages: u32, mode: PagingMode) -> ShadowMmu {
        ShadowMmu {
            pool_base: pool_base.raw(),
            pages: (0..pages).map(|_| None).collect(),
            free: (0..pages).rev().collect(),
            quarantine: Vec::new(),
            by_role: HashMap::new(),
            rmap: HashMap::new(),
            roots: VecDeque::new(),
            current: None,
            mode,
            stale: false,
            stats: ShadowStats::default(),
            work: 0,
            prefill_hints: Vec::new(),
            tables: TableFrames::ALL,
            last_fixed: None,
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

    /// Restrict guest paging structures to `tables` (invariant 6): the
    /// frames whose writes trap. Everything derived so far is zapped.
    pub fn set_table_frames(&mut self, pool: &mut impl GuestPhys, tables: TableFrames) {
        self.tables = tables;
        if self.stats.pages_in_use > 0 || self.current.is_some() {
            self.zap_all(pool);
        }
        self.last_fixed = None;
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

    /// The paging controls in force.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

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

    /// Prefill the used part of a new root's user half (see
    /// `prefill_user_half`); off by default.
    pub fn set_prefill_user_half(&mut self, on: bool) {
        self.prefill_user = on;
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
    fn mark_stale(&mut self, page: u32) {
        if self.stale {
            return;
        }
        if !self.defer || self.current.is_some_and(|(_, cur)| self.reaches(cur, page)) {
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
    fn reaches(&mut self, root: u32, page: u32) -> bool {
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
    fn promote_deferred(&mut self, root: u32) {
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

    /// The GPA of the current shadow root (what the vCPU's CR3 holds).
    pub fn current_root(&self) -> Option<ShadowRoot> {
        self.current.map(|(_, p)| ShadowRoot(Gpa(self.page_gpa(p))))
    }

    /// The guest CR3 the current root shadows.
    pub fn guest_cr3(&self) -> Option<Gpa> {
        self.current.map(|(g, _)| Gpa(g))
    }

    fn page_gpa(&self, page: u32) -> u64 {
        self.pool_base + page as u64 * PAGE
    }

    /// The pool page holding `gpa`, if `gpa` lies in the pool.
    fn page_of(&self, gpa: u64) -> Option<u32> {
        self.in_pool_raw(gpa).then(|| ((gpa - self.pool_base) / PAGE) as u32)
    }

    /// The child shadow page a present non-leaf entry `e` of a level-`level`
    /// page points at (`None` for a leaf or anything outside the pool).
    fn child_of(&self, e: u64, level: u8) -> Option<u32> {
        if e & P == 0 || level == 1 || e & PS != 0 {
            return None;
        }
        self.page_of(e & ADDR)
    }

    /// Write leaf `spte` at entry `idx` of `page`: a child it replaces is
    /// unlinked first, and a replaced leaf that granted more marks the host
    /// stale.
    fn set_leaf(&mut self, pool: &mut impl GuestPhys, page: u32, idx: u64, spte: u64) {
        let old = self.entry(page, idx);
        let level = self.pages[page as usize].as_ref().map_or(1, |p| p.role.level);
        if self.child_of(old, level).is_some() {
            self.zap_entry(pool, page, idx);
        } else if old & P != 0 && restricts(old, spte) {
            self.mark_stale(page);
        }
        self.put(pool, page, idx, spte);
    }

    /// Entry `idx` of shadow page `page`, from the VMM's copy (0 for a page
    /// not in use). The pool is never read to decide anything: a guest
    /// can write it (see the module doc, "Trust model").
    fn entry(&self, page: u32, idx: u64) -> u64 {
        self.pages[page as usize].as_ref().map_or(0, |p| p.entries[idx as usize])
    }

    /// Set entry `idx` of `page` in the VMM's copy and in the pool.
    fn put(&mut self, pool: &mut impl GuestPhys, page: u32, idx: u64, value: u64) {
        let at = self.page_gpa(page) + idx * 8;
        if let Some(p) = self.pages[page as usize].as_mut() {
            p.entries[idx as usize] = value;
        }
        pool.write_u64(Gpa(at), value);
    }

    /// Whether `gpa` lies in the pool.
    pub fn in_pool(&self, gpa: Gpa) -> bool {
        self.in_pool_raw(gpa.raw())
    }

    fn in_pool_raw(&self, gpa: u64) -> bool {
        gpa >= self.pool_base && gpa < self.pool_base + self.pages.len() as u64 * PAGE
    }

    /// Change CR0.WP / EFER.NXE / CR4.SMEP/SMAP: every shadow entry was
    /// computed under the old rules, so zap everything and rebuild the
    /// current root — at a new pool page: the caller must point the vCPU's
    /// CR3 at [`ShadowMmu::current_root`] again.
    ///
    /// RFLAGS.AC alone changes nothing in the shadow (the vCPU enforces
    /// SMAP on the shadow leaf's US bit itself), so it never zaps.
    pub fn set_mode(&mut self, pool: &mut impl GuestPhys, guest: &mut impl GuestPhys, mode: PagingMode) {
        let same_rules = PagingMode { ac: self.mode.ac, ..mode } == self.mode;
        if same_rules {
            self.mode.ac = mode.ac;
            return;
        }
        {
            self.mode = mode;
            self.last_fixed = None;
            let current = self.current.map(|(g, _)| g);
            self.zap_all(pool);
            if let Some(cr3) = current {
                let _ = self.load_cr3(pool, guest, Gpa(cr3));
            }
        }
    }

    /// `LOAD_CR3(guest_cr3)`: find or build the shadow root of the guest's
    /// root `guest_cr3`; returns it (what the vCPU's CR3 must hold).
    pub fn load_cr3(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        guest_cr3: Gpa,
    ) -> Result<ShadowRoot, ShadowError> {
        self.stats.cr3_loads += 1;
        self.last_fixed = None;
        let guest_cr3 = guest_cr3.raw();
        let key = guest_cr3 & ADDR;
        if !self.tables.contains(Gpa(key)) {
            return Err(ShadowError::RootNotTrapped(Gpa(key)));
        }
        self.switch_root(pool, guest, guest_cr3)
            .or_else(|e| match e {
                // The pool cannot hold what fault delivery needs next to
                // everything else in it: start over with an empty pool.
                ShadowError::PoolTooSmall => {
                    self.stats.pool_exhaustions += 1;
                    self.zap_all(pool);
                    self.switch_root(pool, guest, guest_cr3)
                }
                e => Err(e),
            })
            .map(|root| ShadowRoot(Gpa(root)))
    }

    /// Find or build the root for `guest_cr3` (a trapped frame) and make it
    /// current; `Err` when the pool cannot hold what its kernel half's
    /// hinted slots need.
    fn switch_root(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        guest_cr3: u64,
    ) -> Result<u64, ShadowError> {
        let key = guest_cr3 & ADDR;
        if let Some(pos) = self.roots.iter().position(|&(g, _)| g == key) {
            let entry = self.roots.remove(pos).expect("position is valid");
            self.roots.push_front(entry);
            self.stats.root_hits += 1;
            self.current = Some(entry);
            self.promote_deferred(entry.1);
            // A guest frame reused as a new PML4 (or kernel-half entries
            // rewritten) zapped entries of this root: everything fault
            // delivery touches must be shadowed again before the guest runs.
            if self.pages[entry.1 as usize].as_ref().is_some_and(|p| p.needs_prefill) {
                self.prefill_kernel_half(pool, guest, entry.1)?;
            }
            return Ok(self.page_gpa(entry.1));
        }
        self.stats.root_misses += 1;
        let page = match self.get_or_create(pool, Role { gfn: key >> 12, level: 4, access: ACC_ALL }) {
            Some(p) => p,
            None => {
                self.stats.pool_exhaustions += 1;
                self.zap_all(pool);
                self.get_or_create(pool, Role { gfn: key >> 12, level: 4, access: ACC_ALL })
                    .ok_or(ShadowError::PoolTooSmall)?
            }
        };
        if let Some(p) = self.pages[page as usize].as_mut() {
            p.root = true;
        }
        self.roots.push_front((key, page));
        while self.roots.len() > self.root_cap {
            let (_, old) = self.roots.pop_back().expect("non-empty");
            if let Some(p) = self.pages[old as usize].as_mut() {
                p.root = false;
            }
            self.release_if_orphan(pool, old);
        }
        self.current = Some((key, page));
        self.promote_deferred(page);
        self.prefill_kernel_half(pool, guest, page)?;
        self.prefill_user_half(pool, guest, page);
        Ok(self.page_gpa(page))
    }

    /// Eagerly shadow the kernel half (PML4 entries 256..512) of a new
    /// root: everything the fault-delivery path touches (IDT, GDT, TSS, IST
    /// stacks, handler code) lives there and must not fault. Only entries
    /// with A set are shadowed (invariant 2); the kernel maps itself with A
    /// (and D where writable) set.
    ///
    /// Order: the PML4 slots named by [`ShadowMmu::set_prefill_hints`] (what
    /// fault delivery touches) first, then slot 511 (the kernel image, by
    /// convention), then the rest. The budget is the pool itself: a prefill
    /// stops when creating one more shadow page would leave fewer than
    /// [`PREFILL_RESERVE`] pages free for the next fault's path; the rest of
    /// the kernel half is then shadowed on demand. Subtrees already
    /// prefilled (shared with another root) are linked, not walked again,
    /// so a new root costs O(its new shadow pages), not O(kernel half).
    ///
    /// `Err` when not even the hinted slots fit in the pool.
    fn prefill_kernel_half(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        root: u32,
    ) -> Result<(), ShadowError> {
        let role = self.pages[root as usize].as_ref().map(|p| p.role).expect("root exists");
        let mut seen = [false; 256];
        let hints = self.prefill_hints.clone();
        let hinted = hints.len();
        let mut result = Ok(());
        for (n, slot) in hints.into_iter().chain([511]).chain(256..511).enumerate() {
            if std::mem::replace(&mut seen[slot as usize - 256], true) {
                continue;
            }
            if !self.prefill(pool, guest, root, role, slot..slot + 1) {
                if n < hinted {
                    result = Err(ShadowError::PoolTooSmall);
                }
                break;
            }
        }
        if let Some(p) = self.pages[root as usize].as_mut() {
            p.needs_prefill = false;
        }
        result
    }

    /// A root built anew (a cache miss: an address space not run for a
    /// while, or never) gets the part of its user half the guest has used
    /// — entries with A set, as the kernel half — up to
    /// [`USER_PREFILL_PAGES`] new shadow pages: the first accesses after
    /// the switch then take no hidden fault (a context switch that misses
    /// the cache costs the `LOAD_CR3` alone). Past the budget the rest is
    /// shadowed on demand. Only when enabled
    /// ([`ShadowMmu::set_prefill_user_half`]: pv mode).
    fn prefill_user_half(&mut self, pool: &mut impl GuestPhys, guest: &mut impl GuestPhys, root: u32) {
        if !self.prefill_user {
            return;
        }
        let Some(role) = self.pages[root as usize].as_ref().map(|p| p.role) else { return };
        self.prefill_budget = USER_PREFILL_PAGES;
        self.prefill(pool, guest, root, role, 0..256);
        self.prefill_budget = usize::MAX;
    }

    /// The PML4 slots fault delivery needs, from guest-virtual addresses
    /// the VMM reads in the vCPU's registers (IDT, GDT and TSS bases, RIP,
    /// RSP): a later prefill shadows them before anything else. Addresses
    /// in the lower half are ignored (only the kernel half is prefilled).
    pub fn set_prefill_hints(&mut self, gvas: &[Gva]) {
        self.prefill_hints.clear();
        for &va in gvas {
            let slot = guest_abi::paging::table_index(va.raw(), 4) as u64;
            if slot >= 256 && !self.prefill_hints.contains(&slot) {
                self.prefill_hints.push(slot);
            }
        }
    }

    /// Free pool pages (quarantined ones included: they are reusable before
    /// the guest runs again).
    fn free_pages(&self) -> usize {
        self.free.len() + self.quarantine.len()
    }

    /// Shadow entries `range` of `page` (role `role`) and, recursively, the
    /// tables below them; `false` if it stopped early to keep
    /// [`PREFILL_RESERVE`] pages free.
    fn prefill(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        page: u32,
        role: Role,
        range: core::ops::Range<u64>,
    ) -> bool {
        for idx in range {
            self.work += 1;
            let gpte_gpa = (role.gfn << 12) + idx * 8;
            if !guest.is_ram(Gpa(gpte_gpa), 8) {
                return true;
            }
            let gpte = guest.read_u64(Gpa(gpte_gpa));
            if gpte & (P | A) != (P | A) || gpte & walker::reserved_mask(&self.mode, role.level, gpte) != 0 {
                continue;
            }
            let leaf = role.level == 1 || (role.level <= 3 && gpte & PS != 0);
            if leaf {
                if let Some(spte) = self.leaf_spte(guest, role, gpte) {
                    self.set_leaf(pool, page, idx, spte);
                }
                continue;
            }
            if !self.tables.contains(Gpa(gpte & ADDR)) {
                continue;
            }
            let child_role = Role {
                gfn: (gpte & ADDR) >> 12,
                level: role.level - 1,
                access: child_access(role.access, gpte, &self.mode),
            };
            if !self.by_role.contains_key(&child_role) {
                if self.free_pages() <= PREFILL_RESERVE || self.prefill_budget == 0 {
                    return false;
                }
                self.prefill_budget -= 1;
            }
            let Some(child) = self.link_child(pool, page, idx, child_role) else { return false };
            if self.pages[child as usize].as_ref().is_some_and(|c| c.prefilled) {
                continue;
            }
            if !self.prefill(pool, guest, child, child_role, 0..512) {
                return false;
            }
            if let Some(c) = self.pages[child as usize].as_mut() {
                c.prefilled = true;
            }
        }
        true
    }

    /// The shadow leaf for guest leaf `gpte` under a page of role `role`,
    /// or `None` when it must not be shadowed (no A bit, outside RAM).
    fn leaf_spte(&self, guest: &impl GuestPhys, role: Role, gpte: u64) -> Option<u64> {
        if gpte & (P | A) != (P | A) || gpte & walker::reserved_mask(&self.mode, role.level, gpte) != 0 {
            return None;
        }
        let size = 1u64 << (12 + 9 * (role.level as u32 - 1));
        let base = gpte & ADDR & !(size - 1);
        if !guest.is_ram(Gpa(base), size) {
            return None;
        }
        let access = child_access(role.access, gpte, &self.mode);
        let mut spte = base | P | A | D;
        if role.level > 1 {
            spte |= PS;
        }
        if access & ACC_U != 0 {
            spte |= US;
        }
        if access & ACC_W != 0 && gpte & D != 0 {
            spte |= RW;
        }
        if self.mode.nxe && access & ACC_X == 0 {
            spte |= XD;
        }
        // No user leaf may be executable while a user-writable leaf for a
        // supervisor write exists: user mode must fault first.
        if !self.user_write_leaves.is_empty() && spte & US != 0 {
            spte |= XD;
        }
        Some(spte)
    }

    /// A user-mode access: the user-writable leaves made for supervisor
    /// writes (module doc, "Paging controls") must not serve it. Zap them;
    /// the access refaults and gets the ordinary leaf.
    fn end_user_write_leaves(&mut self, pool: &mut impl GuestPhys) {
        for (page, idx, spte) in std::mem::take(&mut self.user_write_leaves) {
            if self.pages[page as usize].is_some() && pool.read_u64(Gpa(self.page_gpa(page) + idx * 8)) == spte {
                self.zap_entry(pool, page, idx);
            }
        }
    }

    /// Zap every user-accessible leaf in the pool except `keep`: user mode
    /// must fault before it can use a user-writable leaf made for a
    /// supervisor write. O(pool), for a rare combination of controls.
    fn zap_user_leaves_except(&mut self, pool: &mut impl GuestPhys, keep: (u32, u64)) {
        for page in 0..self.pages.len() as u32 {
            let Some(role) = self.pages[page as usize].as_ref().map(|p| p.role) else { continue };
            // A root holds no leaves, and under a supervisor-only parent no
            // leaf is a user leaf.
            if role.level == 4 || role.access & ACC_U == 0 {
                continue;
            }
            let level = role.level;
            for idx in 0..512u64 {
                if (page, idx) == keep {
                    continue;
                }
                let e = pool.read_u64(Gpa(self.page_gpa(page) + idx * 8));
                let leaf = e & P != 0 && (level == 1 || e & PS != 0);
                if leaf && e & US != 0 {
                    self.zap_entry(pool, page, idx);
                }
            }
        }
    }

    /// `SHADOW_FAULT(cr2, error_code)`.
    pub fn handle_fault(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        cr2: Gva,
        error_code: u32,
    ) -> Result<FaultOutcome, ShadowError> {
        let (guest_cr3, _) = self.current.ok_or(ShadowError::NoRoot)?;
        let guest_cr3 = Gpa(guest_cr3);
        let cr2 = cr2.raw();
        let access = Access::from_error_code(error_code);
        let repeat = self.last_fixed == Some((cr2, error_code));
        self.last_fixed = None;
        if repeat {
            // Invariant 7. The retried access faulted again although the
            // shadow now grants what the walk allowed. An implicit
            // supervisor access (GDT, IDT, TSS, ...) with SMAP faults even
            // with AC = 1 (SDM vol. 3 §4.6.1), and its error code looks like
            // an explicit access: walk it as one with AC = 0.
            if self.mode.smap && self.mode.ac && !access.user && !access.fetch {
                let implicit = PagingMode { ac: false, ..self.mode };
                let mut zoned = Zoned { mem: guest, tables: self.tables };
                if let Err(f) = walker::walk(&mut zoned, guest_cr3, Gva(cr2), access, &implicit) {
                    self.stats.guest_faults += 1;
                    return Ok(FaultOutcome::GuestFault(f.error_code));
                }
            }
            return Err(ShadowError::Livelock { cr2: Gva(cr2), error_code });
        }
        // User mode is running (even if this access faults for the
        // guest): the user-writable leaves made for supervisor writes must
        // go before it can use them (module doc, "Paging controls").
        if access.user && !self.user_write_leaves.is_empty() {
            self.end_user_write_leaves(pool);
        }
        let mut zoned = Zoned { mem: guest, tables: self.tables };
        let t = match walker::walk(&mut zoned, guest_cr3, Gva(cr2), access, &self.mode) {
            Ok(t) => t,
            Err(f) => {
                self.stats.guest_faults += 1;
                return Ok(FaultOutcome::GuestFault(f.error_code));
            }
        };
        // A supervisor fetch from a user page (SMEP off) needs an
        // executable user leaf, which user mode could then run: end them
        // too.
        if access.fetch && t.user && !self.user_write_leaves.is_empty() {
            self.end_user_write_leaves(pool);
        }
        for attempt in 0..2 {
            if self.install(pool, guest, cr2, &t, access)? {
                self.stats.hidden_faults += 1;
                self.last_fixed = Some((cr2, error_code));
                return Ok(FaultOutcome::Fixed);
            }
            if attempt == 0 {
                // Pool exhausted: start over with an empty pool.
                self.stats.pool_exhaustions += 1;
                self.zap_all(pool);
                self.load_cr3(pool, guest, guest_cr3)?;
            }
        }
        Err(ShadowError::PoolTooSmall)
    }

    /// Build the shadow path for a successful walk; `false` if the pool ran
    /// out.
    fn install(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        va: u64,
        t: &walker::Translation,
        access: Access,
    ) -> Result<bool, ShadowError> {
        let (_, mut page) = self.current.expect("checked by the caller");
        let mut role = self.pages[page as usize].as_ref().expect("root exists").role;
        for depth in 0..t.levels as usize {
            self.work += 1;
            let level = 4 - depth as u8;
            let idx = guest_abi::paging::table_index(va, level) as u64;
            let gpte = guest.read_u64(t.entry_gpas[depth]);
            if depth + 1 == t.levels as usize {
                let Some(spte) = self.leaf_spte(guest, role, gpte) else { return Ok(true) };
                let (spte, user_write) = self.wp_off_write_leaf(spte, access);
                self.set_leaf(pool, page, idx, spte);
                if user_write {
                    self.zap_user_leaves_except(pool, (page, idx));
                    self.user_write_leaves.push((page, idx, spte));
                }
                return Ok(true);
            }
            let child_role = Role {
                gfn: (gpte & ADDR) >> 12,
                level: level - 1,
                access: child_access(role.access, gpte, &self.mode),
            };
            match self.link_child(pool, page, idx, child_role) {
                Some(child) => {
                    page = child;
                    role = child_role;
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The leaf for `access` given the ordinary leaf `spte` (module doc,
    /// "Paging controls"; KVM's `FNAME(page_fault)`, paging_tmpl.h), and
    /// whether it is a user-writable leaf for a supervisor write. With
    /// CR0.WP = 0 a supervisor write ignores R/W (SDM vol. 3 §4.6.1): the
    /// leaf becomes writable and supervisor-only, and with CR4.SMEP also XD
    /// if the guest page is a user page (a supervisor fetch from it must
    /// still fault, `#PF` 0x11). Under CR4.SMAP a user page stays a user
    /// leaf (writable, XD) so that SMAP keeps checking supervisor accesses.
    fn wp_off_write_leaf(&self, spte: u64, access: Access) -> (u64, bool) {
        let user_page = spte & US != 0;
        if !access.write || access.user || self.mode.wp || spte & RW != 0 {
            return (spte, false);
        }
        if user_page && self.mode.smap {
            return (spte | RW | XD, true);
        }
        let mut leaf = (spte | RW) & !US;
        if user_page && self.mode.smep {
            leaf |= XD;
        }
        (leaf, false)
    }

    /// Make entry `idx` of `page` point at the shadow page for
    /// `child_role`, creating it if needed; `None` if the pool is empty.
    fn link_child(&mut self, pool: &mut impl GuestPhys, page: u32, idx: u64, child_role: Role) -> Option<u32> {
        let old = self.entry(page, idx);
        if old & P != 0 {
            // A leaf here (the guest turned a large page into a table) or a
            // child of another role is zapped; only the right child is kept.
            let level = self.pages[page as usize].as_ref().map_or(1, |p| p.role.level);
            if let Some(cur) = self.child_of(old, level)
                && self.pages.get(cur as usize).and_then(|p| p.as_ref()).is_some_and(|p| p.role == child_role)
            {
                return Some(cur);
            }
            self.zap_entry(pool, page, idx);
        }
        let child = self.get_or_create(pool, child_role)?;
        self.put(pool, page, idx, self.page_gpa(child) | P | RW | US | A);
        self.work += 1;
        if let Some(c) = self.pages[child as usize].as_mut() {
            c.parents.insert((page, idx as u16));
        }
        Some(child)
    }

    fn get_or_create(&mut self, pool: &mut impl GuestPhys, role: Role) -> Option<u32> {
        if let Some(&p) = self.by_role.get(&role) {
            return Some(p);
        }
        // Quarantined pages may be reused before the guest runs again: the
        // host is invalidated before then anyway (quarantine ⇒ stale).
        let p = match self.free.pop() {
            Some(p) => p,
            None => {
                // The host may still cache translations through a
                // quarantined page (a deferred change): it must forget them
                // before the guest runs again.
                let p = self.quarantine.pop()?;
                self.stale = true;
                p
            }
        };
        // The VMM zeroed this page when it was freed, but the guest may have
        // written it since (see "Trust model"): zero it again, from nothing
        // read back.
        let base = self.page_gpa(p);
        for i in 0..512 {
            pool.write_u64(Gpa(base + i * 8), 0);
        }
        self.work += 512;
        self.pages[p as usize] = Some(ShadowPage {
            role,
            parents: HashSet::new(),
            root: false,
            needs_prefill: true,
            prefilled: false,
            entries: Box::new([0; 512]),
        });
        self.by_role.insert(role, p);
        self.rmap.entry(role.gfn).or_default().push(p);
        self.stats.pages_in_use += 1;
        self.stats.pages_peak = self.stats.pages_peak.max(self.stats.pages_in_use);
        Some(p)
    }

    /// Clear entry `idx` of `page`; unlink (and maybe free) its child.
    fn zap_entry(&mut self, pool: &mut impl GuestPhys, page: u32, idx: u64) {
        self.work += 1;
        let old = self.entry(page, idx);
        if old & P == 0 {
            return;
        }
        self.put(pool, page, idx, 0);
        self.mark_stale(page);
        self.stats.zaps += 1;
        if let Some(p) = self.pages[page as usize].as_mut() {
            p.prefilled = false;
            if p.role.level == 4 {
                p.needs_prefill = true;
            }
        }
        let level = self.pages[page as usize].as_ref().map_or(1, |p| p.role.level);
        if let Some(child) = self.child_of(old, level) {
            if let Some(c) = self.pages[child as usize].as_mut() {
                c.parents.remove(&(page, idx as u16));
            }
            self.release_if_orphan(pool, child);
        }
    }

    /// Free `page` if nothing points at it and it is not a root.
    fn release_if_orphan(&mut self, pool: &mut impl GuestPhys, page: u32) {
        let orphan = self.pages[page as usize].as_ref().is_some_and(|p| p.parents.is_empty() && !p.root);
        if orphan {
            self.free_page(pool, page);
        }
    }

    fn free_page(&mut self, pool: &mut impl GuestPhys, page: u32) {
        self.work += 512;
        for idx in 0..512 {
            self.zap_entry(pool, page, idx);
        }
        let Some(sp) = self.pages[page as usize].take() else { return };
        self.by_role.remove(&sp.role);
        if let Some(v) = self.rmap.get_mut(&sp.role.gfn) {
            // At most one page per (level, access) role of a frame: ≤ 32.
            self.work += v.len() as u64;
            v.retain(|&p| p != page);
            if v.is_empty() {
                self.rmap.remove(&sp.role.gfn);
            }
        }
        self.stats.pages_in_use -= 1;
        // Its parents' entries were cleared by whoever unlinked it; the
        // host may still cache translations through it: quarantine.
        self.quarantine.push(page);
        if !self.defer {
            self.stale = true;
        }
    }

    /// Zap everything: every shadow page, every root.
    pub fn zap_all(&mut self, pool: &mut impl GuestPhys) {
        for (_, r) in self.roots.drain(..) {
            if let Some(p) = self.pages[r as usize].as_mut() {
                p.root = false;
            }
        }
        self.current = None;
        self.user_write_leaves.clear();
        for page in 0..self.pages.len() as u32 {
            if let Some(sp) = self.pages[page as usize].take() {
                // Re-zero what the VMM wrote (its copy says where).
                let base = self.page_gpa(page);
                for (idx, &e) in sp.entries.iter().enumerate() {
                    if e != 0 {
                        pool.write_u64(Gpa(base + idx as u64 * 8), 0);
                    }
                }
                self.work += 512;
                self.by_role.remove(&sp.role);
                self.quarantine.push(page);
                self.stats.page_zaps += 1;
            }
        }
        self.rmap.clear();
        self.stats.pages_in_use = 0;
        self.stale = true;
    }

    /// A guest write of `len` bytes at `gpa` to a page-table page, already
    /// applied to guest memory. Updates or zaps every shadow entry derived
    /// from the written entry.
    pub fn pte_written(&mut self, pool: &mut impl GuestPhys, guest: &mut impl GuestPhys, gpa: Gpa, len: u64) {
        self.sync_written(pool, guest, gpa.raw(), len);
        self.refill_current_root(pool, guest);
    }

    /// [`ShadowMmu::pte_written`] without the refill of the current root's
    /// kernel half (a batch refills once, at its end).
    fn sync_written(&mut self, pool: &mut impl GuestPhys, guest: &mut impl GuestPhys, gpa: u64, len: u64) {
        self.stats.pte_writes += 1;
        self.last_fixed = None;
        let gfn = gpa >> 12;
        let Some(derived) = self.rmap.get(&gfn).cloned() else { return };
        let aligned = len == 8 && gpa.is_multiple_of(8);
        for page in derived {
            self.work += 1;
            let Some(role) = self.pages[page as usize].as_ref().map(|p| p.role) else { continue };
            if !aligned {
                self.stats.page_zaps += 1;
                for idx in 0..512 {
                    self.zap_entry(pool, page, idx);
                }
                continue;
            }
            let idx = (gpa & 0xfff) / 8;
            if role.level == 4
                && idx >= 256
                && let Some(p) = self.pages[page as usize].as_mut()
            {
                // A kernel-half slot of a root changed, present before or
                // not: fault delivery may need it, so the root is refilled
                // before it runs again (and pv mode does not publish it
                // until then).
                p.needs_prefill = true;
            }
            let gpte = guest.read_u64(Gpa(gpa & !7));
            let leaf = role.level == 1 || (role.level <= 3 && gpte & PS != 0);
            let old = self.entry(page, idx);
            let old_leaf = old & P != 0 && (role.level == 1 || old & PS != 0);
            match (leaf, self.leaf_spte(guest, role, gpte)) {
                (true, Some(spte)) if old & P == 0 || old_leaf => {
                    if old & P != 0 && restricts(old, spte) {
                        self.mark_stale(page);
                    }
                    self.put(pool, page, idx, spte);
                    self.stats.pte_updates_in_place += 1;
                }
                _ => self.zap_entry(pool, page, idx),
            }
        }
    }

    /// After a change that zapped entries of the current root's kernel half,
    /// shadow them again at once: the next fault must be deliverable.
    fn refill_current_root(&mut self, pool: &mut impl GuestPhys, guest: &mut impl GuestPhys) {
        if let Some((cr3, root)) = self.current
            && self.pages[root as usize].as_ref().is_some_and(|p| p.needs_prefill)
            && self.prefill_kernel_half(pool, guest, root).is_err()
        {
            // As in load_cr3: start over; if even that fails, the next
            // LOAD_CR3 or SHADOW_FAULT reports it.
            self.stats.pool_exhaustions += 1;
            self.zap_all(pool);
            let _ = self.switch_root(pool, guest, cr3);
        }
    }

    /// The pool pages numbered `pages` (0 = the first page of the pool)
    /// may have been written by the guest (the host's dirty log says so):
    /// make each hold exactly the VMM's copy again (zeros for a page not in
    /// use). A page that differed marks the host stale — the host may have
    /// cached the guest's entries — and counts as a repair. Returns the
    /// number of pages repaired. Reading the pool here only *compares*; no
    /// decision depends on what the guest wrote.
    pub fn repair_pool_pages(&mut self, pool: &mut impl GuestPhys, pages: impl IntoIterator<Item = u64>) -> u64 {
        let mut repaired = 0;
        for page in pages {
            if page >= self.pages.len() as u64 {
                continue;
            }
            self.work += 512;
            let base = self.page_gpa(page as u32);
            let mut differed = false;
            for idx in 0..512u64 {
                let want = self.entry(page as u32, idx);
                if pool.read_u64(Gpa(base + idx * 8)) != want {
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

    /// `FLUSH_TLB`: shadow entries are kept coherent on every write, so a
    /// flush only matters to a host that caches shadow translations.
    pub fn flush(&mut self) {
        self.stats.flushes += 1;
        self.last_fixed = None;
    }

    /// Walk the *shadow* tables of the current root for `va` (for
    /// `--explain` and tests): the shadow leaf entry, if present.
    pub fn shadow_leaf(&self, pool: &impl GuestPhys, va: Gva) -> Option<(u64, u8)> {
        let va = va.raw();
        let mut table = self.current_root()?.gpa().raw();
        for level in (1..=4u8).rev() {
            let idx = guest_abi::paging::table_index(va, level) as u64;
            let e = pool.read_u64(Gpa(table + idx * 8));
            if e & P == 0 {
                return None;
            }
            if level == 1 || e & PS != 0 {
                return Some((e, level));
            }
            table = e & ADDR;
            self.page_of(table)?;
        }
        None
    }

    /// Check the structural invariants (tests): the pool holds exactly the
    /// VMM's copy of every page in use, every present non-leaf shadow entry
    /// points at a live page whose parent list has it, and every leaf maps
    /// guest RAM only.
    pub fn check_invariants(&self, pool: &impl GuestPhys, guest: &impl GuestPhys) -> Result<(), String> {
        for (i, sp) in self.pages.iter().enumerate() {
            let Some(sp) = sp else { continue };
            if self.by_role.get(&sp.role) != Some(&(i as u32)) {
                return Err(format!("page {i} missing from the role index"));
            }
            if !self.rmap.get(&sp.role.gfn).is_some_and(|v| v.contains(&(i as u32))) {
                return Err(format!("page {i} missing from the reverse map"));
            }
            for idx in 0..512u64 {
                let e = sp.entries[idx as usize];
                if pool.read_u64(Gpa(self.page_gpa(i as u32) + idx * 8)) != e {
                    return Err(format!("page {i}[{idx}] in the pool differs from the VMM's copy {e:#x}"));
                }
                if e & P == 0 {
                    continue;
                }
                if sp.role.level == 1 || e & PS != 0 {
                    let size = 1u64 << (12 + 9 * (sp.role.level as u32 - 1));
                    if !guest.is_ram(Gpa(e & ADDR & !(size - 1)), size) || self.in_pool_raw(e & ADDR) {
                        return Err(format!("page {i}[{idx}] maps outside guest RAM: {e:#x}"));
                    }
                } else {
                    let Some(c) = self.page_of(e & ADDR) else {
                        return Err(format!("page {i}[{idx}] points outside the pool: {e:#x}"));
                    };
                    match self.pages.get(c as usize).and_then(|p| p.as_ref()) {
                        Some(cp) if cp.parents.contains(&(i as u32, idx as u16)) => {}
                        _ => return Err(format!("page {i}[{idx}] points at {c} which does not list it")),
                    }
                }
            }
        }
        Ok(())
    }
}

/// The access a child grants given its parent's and the guest entry.
fn child_access(parent: AccessBits, gpte: u64, mode: &PagingMode) -> AccessBits {
    let mut a = parent;
    if gpte & RW == 0 {
        a &= !ACC_W;
    }
    if gpte & US == 0 {
        a &= !ACC_U;
    }
    if mode.nxe && gpte & XD != 0 {
        a &= !ACC_X;
    }
    a
}

/// Whether `new` grants less than `old` (another frame, or a permission
/// bit removed): the host must forget `old`.
fn restricts(old: u64, new: u64) -> bool {
    if new & P == 0 || (old & ADDR) != (new & ADDR) {
        return true;
    }
    (old & RW != 0 && new & RW == 0) || (old & US != 0 && new & US == 0) || (old & XD == 0 && new & XD != 0)
}

mod pv;
pub use pv::BatchOutcome;

#[cfg(test)]
mod test_mem;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod pv_tests;

#[cfg(test)]
mod bounds_tests;
