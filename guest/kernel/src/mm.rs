//! The kernel's memory manager instance: the buddy allocator over the RAM
//! the VMM's memory map calls usable (plus the page-table zone) with
//! per-CPU page lists in front ([`Pages`]), the kmalloc slab caches with
//! per-CPU slabs as the kernel's `#[global_allocator]`, and the
//! address-space side (kernel tables, user address space, gather) behind
//! the MM lock.
//!
//! Invariants:
//! - The allocators manage all usable RAM and the page-table zone, in every
//!   zone. They reach memory through the direct map, so until the kernel
//!   runs on its own tables (which map all RAM) only RAM the boot direct
//!   map covers (`BootInfo::boot_mapped`) is given to them; the rest is
//!   added right after the switch, before anything else can allocate.
//! - Per-frame initialisation is deferred (`BuddyAllocator::new_deferred`,
//!   Linux's `DEFERRED_STRUCT_PAGE_INIT`): at boot only the ragged ends of
//!   the usable regions get their metadata written; every whole 4 MiB
//!   section is initialised when its zone's free lists first run dry. So
//!   bring-up costs the same at 64 MiB and at 64 GiB.
//! - The per-frame metadata array, the reference counts, the section
//!   states and the per-CPU lists' frame flags are carved out of the start of the largest usable region below
//!   `boot_mapped` and never handed to the allocator. They are all zeroes
//!   (the VMM hands over zeroed RAM): the trust assumption of
//!   `new_deferred`.
//! - The address-space side lives behind one interrupt-safe ticket lock
//!   (`MM`, first in the lock order of [`crate::sync`]); every CPU reaches
//!   it through [`with`]. A re-entrant use on one CPU (a fault inside
//!   `with`) is a bug and panics ("lock re-entered") instead of
//!   deadlocking or corrupting state.
//! - The allocators are not behind `MM`: they live in statics (`BUDDY`,
//!   `PCP`, `KMALLOC`, written once by [`init`] before any other CPU
//!   starts) and take their own locks ([`crate::sync::AllocLock`]: kmalloc
//!   cache lock, then per-CPU page lock, then zone lock). Every call into
//!   them runs with interrupts off on the calling CPU ([`on_this_cpu`]),
//!   so the CPU's `ThisCpu` token is unique (nothing else on the CPU can
//!   enter the allocators meanwhile: interrupt handlers never allocate,
//!   and the allocators never call back into the heap). Fast paths: a
//!   kmalloc of a cached size takes no lock; an order-0 page takes only the
//!   CPU's own pcp lock. Page-table pages and larger blocks go through the
//!   zone lock. Frames handed out by the per-CPU path go back through
//!   `free_on` ([`Pages::free`] and the paging frame source do so).
//! - With other CPUs online, frames and table pages that page-table
//!   operations free are gathered ([`Gather`], Linux's `mmu_gather`) and
//!   given back to the buddy allocator only when every CPU that could
//!   cache a translation to them has flushed (`crate::tlb`); TLB flushes
//!   go to every CPU in the address space's mask. With one CPU both are
//!   the plain local operations they always were.
//! - `GlobalAlloc::alloc` returns null when memory is exhausted (the
//!   contract), never panics.
//! - Once up, the kernel runs on its own page tables, built by the paging
//!   manager from page-table-zone pages: a direct map of all RAM (2 MiB
//!   pages) and the kernel image window (2 MiB pages), all with A (and
//!   D) set so shadow mode can prefill them. CR3 loads and TLB flushes go
//!   through [`KernelMmu`], the platform hook that knows ept from shadow.
//! - Every user address space is made by [`new_address_space`], which
//!   gives it the anonymous folio size of the `anon=` command-line word
//!   (`4k` unless given; the same in every MMU mode).

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use guest_abi::{BootInfo, DIRECT_MAP_BASE, Gpa, MemRegionKind};
use guest_mm::aspace::{AddressSpace, AspaceError, FrameRefs, MmCtx};
use guest_mm::buddy::{
    BuddyAllocator, FrameMeta, FreeError, PcpFlag, PcpLists, PerCpuBuddy, ZoneId, ZonePref, ZoneStats, meta_bytes,
    pcp_flag_bytes, section_bytes,
};
use guest_mm::folio::FolioSize;
use guest_mm::paging::{
    FrameSource, MmuPlatform, Page, PageSize, PageTable, PageTableSource, PhysFrame, PteFlags, Size1GiB, Size2MiB,
};
use guest_mm::percpu::{CachePadded, CpuId, ThisCpu};
use guest_mm::phys::{DirectMap, FrameRange, Pfn};
use guest_mm::slab::{PerCpuKmalloc, SlabError};

use crate::arch::{self, percpu};
use crate::panic::fatal;
use crate::sync::{AllocLock, InitOnce, IrqSpinLock};

/// The buddy allocator with per-CPU lists in front, as the kernel keeps it.
pub type Buddy = PerCpuBuddy<'static, DirectMap, AllocLock>;

/// Every CPU's order-0 page lists (`const`-built here, not on the boot
/// stack).
static PCP: PcpLists<AllocLock> = PcpLists::new();
/// The page allocator, set once by [`init`].
static BUDDY: InitOnce<Buddy> = InitOnce::new();
/// The kmalloc caches with per-CPU slabs (one slot per possible CPU).
static KMALLOC: PerCpuKmalloc<AllocLock> = PerCpuKmalloc::new(ZonePref::Normal, percpu::MAX_CPUS);

/// Run `f` with this CPU's `ThisCpu` token, interrupts off (restored
/// after). Not re-entrant: `f` must not call back into it (the allocators
/// do not).
#[inline]
pub fn on_this_cpu<R>(f: impl FnOnce(&mut ThisCpu) -> R) -> R {
    let irq = arch::interrupts_enabled();
    arch::disable_interrupts();
    let id = CpuId::new(percpu::cpu_id() as usize).unwrap_or(CpuId::BOOT);
    // SAFETY: interrupts are off until the token is dropped, interrupt
    // handlers never allocate, the allocators never call `on_this_cpu`,
    // and `f` is an allocator call: no other token of this CPU is in use
    // meanwhile (`ThisCpu::new`'s contract).
    let mut me = unsafe { ThisCpu::new(id) };
    let r = f(&mut me);
    if irq {
        arch::enable_interrupts();
    }
    r
}

/// Fast and slow allocator calls of one CPU (see [`PathCounts`]).
#[derive(Default)]
struct CpuPaths {
    heap_fast: AtomicU64,
    heap_slow: AtomicU64,
    page_fast: AtomicU64,
    page_slow: AtomicU64,
}

static PATHS: [CachePadded<CpuPaths>; percpu::MAX_CPUS] = [const {
    CachePadded(CpuPaths {
        heap_fast: AtomicU64::new(0),
        heap_slow: AtomicU64::new(0),
        page_fast: AtomicU64::new(0),
        page_slow: AtomicU64::new(0),
    })
}; percpu::MAX_CPUS];

/// How many heap and order-0 page allocator calls took their fast path
/// (heap: no lock at all; page: only the CPU's own pcp lock) and how many
/// a slow one (more locks), summed over CPUs.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct PathCounts {
    /// kmalloc/kfree calls that took no lock.
    pub heap_fast: u64,
    /// kmalloc/kfree calls that took a cache or zone lock.
    pub heap_slow: u64,
    /// Order-0 page allocs/frees that took only the CPU's pcp lock.
    pub page_fast: u64,
    /// Order-0 page allocs/frees that also took the zone lock (refill,
    /// drain, pressure).
    pub page_slow: u64,
}

impl PathCounts {
    /// No call counted.
    pub const ZERO: PathCounts = PathCounts { heap_fast: 0, heap_slow: 0, page_fast: 0, page_slow: 0 };
}

/// The counters of [`PathCounts`], summed over every CPU.
pub fn path_counts() -> PathCounts {
    let mut p = PathCounts::default();
    for c in PATHS.iter() {
        p.heap_fast += c.heap_fast.load(Ordering::Relaxed);
        p.heap_slow += c.heap_slow.load(Ordering::Relaxed);
        p.page_fast += c.page_fast.load(Ordering::Relaxed);
        p.page_slow += c.page_slow.load(Ordering::Relaxed);
    }
    p
}

/// Count one call that took `locks` allocator locks: fast if at most
/// `fast_locks`. Interrupts are off: only this CPU writes its slot.
#[inline]
fn count_path(locks: u64, fast_locks: u64, heap: bool) {
    let c = &PATHS[percpu::cpu_id() as usize % percpu::MAX_CPUS];
    let slot = match (heap, locks <= fast_locks) {
        (true, true) => &c.heap_fast,
        (true, false) => &c.heap_slow,
        (false, true) => &c.page_fast,
        (false, false) => &c.page_slow,
    };
    slot.store(slot.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// `f`, counted as a fast or slow path by the allocator locks it took.
#[inline]
fn counted<R>(heap: bool, fast_locks: u64, f: impl FnOnce() -> R) -> R {
    let before = crate::sync::alloc_locks_taken_here();
    let r = f();
    count_path(crate::sync::alloc_locks_taken_here() - before, fast_locks, heap);
    r
}

/// The page allocator, as the rest of the kernel calls it: order-0 blocks
/// through the calling CPU's lists, everything else under the zone lock.
#[derive(Clone, Copy)]
pub struct Pages(&'static Buddy);

impl Pages {
    /// The page allocator, once [`init`] has run.
    pub fn get() -> Option<Pages> {
        BUDDY.get().map(Pages)
    }

    /// The direct map the allocator reaches frames through.
    pub fn mem(&self) -> &'static DirectMap {
        self.0.mem()
    }

    /// A block of `2^order` frames (order 0 from this CPU's lists).
    pub fn alloc(self, order: u8, pref: ZonePref) -> Option<Pfn> {
        on_this_cpu(|me| {
            if order == 0 {
                counted(false, 1, || self.0.alloc_on(me.id(), 0, pref))
            } else {
                self.0.alloc_on(me.id(), order, pref)
            }
        })
    }

    /// Free a block from [`alloc`](Self::alloc) or
    /// [`alloc_zeroed`](Self::alloc_zeroed); a bad free is refused.
    pub fn free(self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        on_this_cpu(|me| {
            if order == 0 {
                counted(false, 1, || self.0.free_on(me.id(), pfn, 0))
            } else {
                self.0.free_on(me.id(), pfn, order)
            }
        })
    }

    /// A zeroed block of `2^order` frames, from the zones.
    pub fn alloc_zeroed(self, order: u8, pref: ZonePref) -> Option<Pfn> {
        on_this_cpu(|_| self.0.with_zone(|b| b.alloc_zeroed(order, pref)))
    }

    /// A zeroed page-table page.
    pub fn alloc_pgtable(self) -> Option<Pfn> {
        on_this_cpu(|_| self.0.with_zone(|b| b.alloc_pgtable()))
    }

    /// Free a page-table page.
    pub fn free_pgtable(self, pfn: Pfn) -> Result<(), FreeError> {
        on_this_cpu(|_| self.0.with_zone(|b| b.free_pgtable(pfn)))
    }

    /// The zone's counters; `hot_pages` includes the per-CPU lists.
    pub fn stats(self, zone: ZoneId) -> ZoneStats {
        on_this_cpu(|_| self.0.stats(zone))
    }

    /// The zone `pfn` belongs to.
    pub fn zone_of(self, pfn: Pfn) -> Option<ZoneId> {
        on_this_cpu(|_| self.0.with_zone(|b| b.zone_of(pfn)))
    }

    /// The buddy allocator's and the per-CPU lists' invariants.
    pub fn check_invariants(self) -> Result<(), &'static str> {
        on_this_cpu(|_| self.0.check_invariants())
    }
}

/// The page allocator, or `None` before [`init`].
pub fn pages() -> Option<Pages> {
    Pages::get()
}

/// `size` bytes aligned to `align` from the kernel heap (per-CPU kmalloc);
/// `None` when out of memory or before [`init`].
pub fn kmalloc(size: usize, align: usize) -> Option<Gpa> {
    let b = BUDDY.get()?;
    on_this_cpu(|me| counted(true, 0, || KMALLOC.alloc(me, b, size, align)))
}

/// Free a [`kmalloc`] block of the same size and alignment.
pub fn kfree(gpa: Gpa, size: usize, align: usize) -> Result<(), SlabError> {
    let b = BUDDY.get().ok_or(SlabError::Foreign)?;
    on_this_cpu(|me| counted(true, 0, || KMALLOC.free(me, b, gpa, size, align)))
}

/// Run `f` with the token of every possible CPU and the page allocator,
/// interrupts off: for the allocators' whole-system checks and shrinking.
/// `None` before [`init`].
///
/// # Safety
///
/// No other CPU is inside an allocator call or enters one until this
/// returns (the caller holds them at a barrier, or they are not running):
/// the tokens of the other CPUs are made here (`ThisCpu::new`'s contract).
pub unsafe fn with_all_cpus<R>(
    f: impl FnOnce(&mut [ThisCpu], &'static Buddy, &PerCpuKmalloc<AllocLock>) -> R,
) -> Option<R> {
    let b = BUDDY.get()?;
    let irq = arch::interrupts_enabled();
    arch::disable_interrupts();
    // SAFETY: the caller keeps every other CPU out of the allocators, and
    // this CPU has interrupts off and makes no other token meanwhile.
    let mut tokens: [ThisCpu; percpu::MAX_CPUS] =
        core::array::from_fn(|i| unsafe { ThisCpu::new(CpuId::new(i).unwrap_or(CpuId::BOOT)) });
    let r = f(&mut tokens, b, &KMALLOC);
    if irq {
        arch::enable_interrupts();
    }
    Some(r)
}

/// Check kmalloc's invariants (every CPU's slabs and remote-free lists).
///
/// # Safety
///
/// As [`with_all_cpus`]: every other CPU is held outside the allocators.
pub unsafe fn check_heap() -> Result<(), &'static str> {
    // SAFETY: the caller's contract.
    let r = unsafe { with_all_cpus(|cpus, b, k| k.check_invariants_with(cpus, b)) };
    r.ok_or("memory manager not initialised")?
}

/// With `check`, first check kmalloc's and the page allocator's
/// invariants as they stand (per-CPU slabs frozen, pages on per-CPU
/// lists; the page check is `O(frames)`). Then give every CPU's cached
/// memory back (each CPU's slabs flushed and empty slabs freed, every
/// per-CPU page list drained) and return the free frames, exact.
///
/// # Safety
///
/// As [`with_all_cpus`]: every other CPU is held outside the allocators.
pub unsafe fn quiesce(check: bool) -> Result<u64, &'static str> {
    // SAFETY: the caller's contract.
    let r = unsafe {
        with_all_cpus(|cpus, b, k| {
            if check {
                k.check_invariants_with(cpus, b)?;
                b.check_invariants()?;
            }
            // CPUs beyond the VM's count never run: nothing to flush.
            for t in cpus.iter_mut().take(b.nr_cpus()) {
                k.shrink(t, b);
            }
            b.drain_all();
            if b.pcp_pages() != 0 {
                return Err("a page stayed on a per-CPU list after draining");
            }
            Ok(ZoneId::ALL.iter().map(|&z| b.stats(z).free_total()).sum())
        })
    };
    r.ok_or("memory manager not initialised")?
}

/// The memory manager's address-space side.
pub struct MemoryManager {
    /// The page allocator (not behind the MM lock: a handle on the static).
    pub buddy: Pages,
    /// The kernel's page tables (the template of every address space).
    pub kernel_pt: PageTable,
    /// Reference counts of anonymous frames, indexed by pfn.
    pub refs: &'static mut [u16],
    /// The user address space the page-fault hook serves, if any.
    pub user: Option<AddressSpace>,
    /// Frames freed by page-table operations, not yet flushed everywhere.
    pub gather: Gather,
}

/// Frames and table pages freed while other CPUs may still cache a
/// translation to them (Linux's `mmu_gather`): given back once every CPU
/// whose TLB could hold one has done a full flush since (module doc).
pub struct Gather {
    /// Pfns; bit 63 set for a page-table page.
    frames: [u64; Gather::CAPACITY],
    n: usize,
    freed_tables: bool,
    /// Each CPU's `full_flushes` when the first frame was gathered.
    snapshot: [u64; percpu::MAX_CPUS],
}

impl Gather {
    /// Frames gathered before a flush is forced.
    pub const CAPACITY: usize = 128;
    const TABLE: u64 = 1 << 63;

    const fn new() -> Self {
        Gather { frames: [0; Self::CAPACITY], n: 0, freed_tables: false, snapshot: [0; percpu::MAX_CPUS] }
    }

    /// Free `pfn` now if no other CPU is online, else gather it.
    fn defer(&mut self, buddy: &'static Buddy, cpu: CpuId, pfn: Pfn, table: bool) {
        if crate::smp::online_count() <= 1 && self.n == 0 {
            return free_now(buddy, cpu, pfn.0 | if table { Self::TABLE } else { 0 });
        }
        if self.n == 0 {
            for cpu in crate::smp::online_cpus() {
                self.snapshot[cpu as usize] = percpu::area(cpu).full_flushes.load(Ordering::SeqCst);
            }
        }
        self.frames[self.n] = pfn.0 | if table { Self::TABLE } else { 0 };
        self.n += 1;
        self.freed_tables |= table;
        if self.n == Self::CAPACITY {
            self.finish(buddy, cpu);
        }
    }

    /// Flush every CPU that could still cache a gathered frame, then free
    /// the frames.
    pub fn finish(&mut self, buddy: &'static Buddy, cpu: CpuId) {
        if self.n == 0 {
            return;
        }
        let me = percpu::cpu_id();
        let kernel = crate::tlb::kernel_root();
        let mut targets = 0u64;
        for cpu in crate::smp::online_cpus() {
            let a = percpu::area(cpu);
            if a.full_flushes.load(Ordering::SeqCst) == self.snapshot[cpu as usize]
                && a.loaded_root.load(Ordering::SeqCst) != kernel
            {
                targets |= 1 << cpu;
            }
        }
        if targets & (1 << me) != 0 {
            crate::arch::mmu::flush_all();
        }
        crate::tlb::shootdown(targets, None, &crate::tlb::Flush::all(), self.freed_tables);
        for i in 0..self.n {
            free_now(buddy, cpu, self.frames[i]);
        }
        self.n = 0;
        self.freed_tables = false;
    }
}

/// Free a gathered frame (bit 63: a page-table page) on CPU `cpu`: data
/// frames through `free_on` (back onto the CPU's list if the per-CPU path
/// handed them out), table pages to their zone.
fn free_now(buddy: &'static Buddy, cpu: CpuId, raw: u64) {
    let pfn = Pfn(raw & !Gather::TABLE);
    if raw & Gather::TABLE != 0 {
        PageTableSource::free_table(&mut buddy.on(cpu), pfn);
    } else {
        FrameSource::free_frame(&mut buddy.on(cpu), pfn);
    }
}

/// The frame source page-table operations get: data frames from the
/// calling CPU's lists (order 0) or the zones (folios), table pages from
/// the page-table zone; frees through the [`Gather`]. Made only under the
/// MM lock (interrupts off), so `cpu` stays the running CPU.
pub struct Frames<'a> {
    buddy: &'static Buddy,
    cpu: CpuId,
    gather: &'a mut Gather,
}

impl PageTableSource for Frames<'_> {
    fn alloc_table(&mut self) -> Option<Pfn> {
        self.buddy.on(self.cpu).alloc_table()
    }
    fn free_table(&mut self, table: Pfn) {
        self.gather.defer(self.buddy, self.cpu, table, true);
    }
}

impl FrameSource for Frames<'_> {
    fn alloc_frame(&mut self) -> Option<Pfn> {
        counted(false, 1, || self.buddy.on(self.cpu).alloc_frame())
    }
    fn free_frame(&mut self, frame: Pfn) {
        self.gather.defer(self.buddy, self.cpu, frame, false);
    }
    // Forwarded, not left to the trait's order-0-only default: without it
    // every `anon=` size silently fell back to 4 KiB pages. Order 0 takes
    // the per-CPU path; larger folios come from the zones and are split
    // (their frames come back one by one through `free_on`, which sends
    // frames it did not hand out to the zone).
    fn alloc_folio(&mut self, order: u8) -> Option<Pfn> {
        if order == 0 { self.alloc_frame() } else { self.buddy.with_zone(|b| FrameSource::alloc_folio(b, order)) }
    }
}

/// The MMU platform: CR3 loads, TLB flushes and lazy-MMU brackets through
/// `arch::mmu`, which takes the shadow path in shadow mode and the
/// paravirtual one in pv mode.
pub struct KernelMmu;

impl MmuPlatform for KernelMmu {
    fn load_cr3(&self, root: Pfn) {
        // SAFETY: guest_mm calls this with the root of an address space it
        // built, whose upper half is the kernel's (paging.rs: every root
        // shares the kernel half).
        unsafe { crate::tlb::use_root(root.addr().0) };
    }
    fn invlpg(&self, va: guest_abi::Gva) {
        if crate::smp::online_count() > 1 {
            crate::tlb::invlpg(va.0);
        } else {
            crate::arch::mmu::invlpg(va.0);
        }
    }
    fn flush_all(&self) {
        if crate::smp::online_count() > 1 {
            crate::tlb::flush_all();
        } else {
            crate::arch::mmu::flush_all();
        }
    }
    fn enter_lazy(&self) {
        crate::tlb::enter_batch();
        crate::arch::mmu::enter_lazy();
    }
    fn leave_lazy(&self) {
        crate::arch::mmu::leave_lazy();
        crate::tlb::leave_batch();
    }
    fn harvest_young(&self, base: guest_abi::Gva, young: &mut [u64]) -> bool {
        crate::arch::mmu::harvest_young(base.0, young)
    }
}

/// The folio size of `anon=`, as an index into `FolioSize::ALL`.
static ANON: AtomicU8 = AtomicU8::new(0);

/// The anonymous folio size the command line asked for (`anon=`).
pub fn anon_folio() -> FolioSize {
    FolioSize::ALL.get(ANON.load(Ordering::Relaxed) as usize).copied().unwrap_or_default()
}

/// A new user address space sharing the kernel half of `kpt`, with the
/// folio size of `anon=`.
pub fn new_address_space(cx: &mut Ctx<'_>, kpt: &PageTable) -> Result<AddressSpace, AspaceError> {
    let mut a = AddressSpace::new(cx, kpt)?;
    a.set_anon_folio(anon_folio());
    Ok(a)
}

/// The context the paging and address-space code needs.
pub type Ctx<'a> = MmCtx<'a, DirectMap, Frames<'a>, KernelMmu>;

impl MemoryManager {
    /// Run `f` with an [`MmCtx`] over this manager, the kernel tables and
    /// the user address space slot.
    /// Frames it frees are gathered and freed at the end, after every CPU
    /// that could cache them has flushed.
    pub fn ctx<R>(&mut self, f: impl FnOnce(&mut Ctx<'_>, &PageTable, &mut Option<AddressSpace>) -> R) -> R {
        let mem = *self.buddy.mem();
        let buddy = self.buddy.0;
        // Under the MM lock: interrupts are off, the CPU cannot change.
        let cpu = CpuId::new(percpu::cpu_id() as usize).unwrap_or(CpuId::BOOT);
        crate::tlb::set_operand_root(self.user.as_ref().map_or(0, |a| a.root().addr().0));
        let r = {
            let frames = Frames { buddy, cpu, gather: &mut self.gather };
            let mut cx = MmCtx { mem: &mem, frames, refs: FrameRefs::attach(Pfn(0), self.refs), mmu: &KernelMmu };
            f(&mut cx, &self.kernel_pt, &mut self.user)
        };
        self.gather.finish(buddy, cpu);
        r
    }
}

/// Destroy address space `a` (not loaded on this CPU): first every CPU
/// that still has it loaded lazily moves to the kernel's root
/// ([`crate::tlb::evict`]), because the teardown clears its kernel half
/// and frees its tables.
pub fn destroy(cx: &mut Ctx<'_>, a: AddressSpace) {
    crate::tlb::evict(a.root().addr().0);
    a.destroy(cx);
}

/// The memory manager's address-space side, first in the lock order
/// (`crate::sync`).
static MM: IrqSpinLock<Option<MemoryManager>> = IrqSpinLock::new(None);

/// Run `f` with the memory manager, or return `None` before [`init`].
/// Panics if this CPU is already inside `with`.
pub fn with<R>(f: impl FnOnce(&mut MemoryManager) -> R) -> Option<R> {
    MM.lock().as_mut().map(f)
}

/// Whether [`init`] has run.
pub fn is_ready() -> bool {
    with(|_| ()).is_some()
}

/// Build the allocators from the VMM's memory map. Idempotent.
pub fn init(info: &BootInfo) {
    if is_ready() {
        return;
    }
    // The command line was checked before (cmdline::check): a value here
    // is one of FolioSize::NAMES.
    if let Some(size) = crate::cmdline::value(crate::boot::cmdline(), "anon").and_then(FolioSize::parse) {
        ANON.store(size as u8, Ordering::Relaxed);
    }
    let limit = info.boot_mapped.min(info.ram_size);
    let frames = info.ram_size / guest_mm::PAGE_SIZE;
    let meta_len = meta_bytes(frames).next_multiple_of(8);
    let refs_len = (frames * 2).next_multiple_of(8);
    let sections_len = section_bytes(frames);
    let flags_len = pcp_flag_bytes(frames);
    let need = (meta_len + refs_len + sections_len + flags_len).next_multiple_of(guest_mm::PAGE_SIZE);
    let clamp = |start: u64, len: u64, lo: u64, hi: u64| (start.clamp(lo, hi), start.saturating_add(len).clamp(lo, hi));
    let home = info
        .regions()
        .iter()
        .filter(|r| r.kind == MemRegionKind::Usable as u32)
        .map(|r| clamp(r.start, r.len, 0, limit))
        .filter(|(s, e)| e - s >= need)
        .max_by_key(|(s, e)| e - s)
        .unwrap_or_else(|| fatal("no usable region can hold the frame metadata"));
    let carve = DIRECT_MAP_BASE + home.0;
    // SAFETY: `home` is usable RAM inside the boot direct map that nothing
    // else uses; it becomes the metadata array for the kernel's lifetime and
    // is never given to the allocator. FrameMeta is plain integers, so any
    // bytes are a valid value, and the VMM hands over zeroed RAM, which is
    // what `new_deferred` assumes.
    let meta: &'static mut [FrameMeta] =
        unsafe { core::slice::from_raw_parts_mut(carve as *mut FrameMeta, frames as usize) };
    // SAFETY: the reference counts follow the metadata in the same carved,
    // zeroed, never-allocated region; u16 has no invalid values.
    let refs: &'static mut [u16] =
        unsafe { core::slice::from_raw_parts_mut((carve + meta_len) as *mut u16, frames as usize) };
    // SAFETY: the section states follow the reference counts, in the same
    // carved, zeroed region; u8 has no invalid values.
    let sections: &'static mut [u8] =
        unsafe { core::slice::from_raw_parts_mut((carve + meta_len + refs_len) as *mut u8, sections_len as usize) };
    // SAFETY: the per-CPU lists' frame flags follow the section states, in
    // the same carved, zeroed region; `PcpFlag` is an `AtomicU8`, for which
    // zero bytes are valid (and the initial value `PerCpuBuddy` asks for).
    let flags: &'static [PcpFlag] = unsafe {
        core::slice::from_raw_parts((carve + meta_len + refs_len + sections_len) as *const PcpFlag, flags_len as usize)
    };
    let zone = info.pt_zone;
    let pgtables = FrameRange::from_bytes(Gpa(zone.start), zone.len);
    // SAFETY: all RAM below `limit` is mapped read-write at DIRECT_MAP_BASE
    // by the boot page tables (and all of RAM by the kernel's tables once
    // loaded, before any frame above `limit` is given to the allocator);
    // the allocator only touches frames it is given, which no Rust
    // reference aliases.
    let mem = unsafe { DirectMap::new(DIRECT_MAP_BASE) };
    // pv mode: every write into the page-table zone is queued for the VMM.
    let mem = if crate::arch::mmu::pv_requested() { mem.watching(pgtables, &crate::arch::mmu::PV_WRITES) } else { mem };
    let mut buddy = match BuddyAllocator::new_deferred(mem, meta, sections, Pfn(0), pgtables) {
        Ok(b) => b,
        Err(e) => fatal(e.as_str()),
    };
    // Usable RAM and the page-table zone between `lo` and `hi`, without
    // the carved-out metadata.
    let add = |buddy: &mut BuddyAllocator<'static, DirectMap>, lo: u64, hi: u64| {
        for r in info.regions() {
            let kind = MemRegionKind::from_raw(r.kind);
            if kind != Some(MemRegionKind::Usable) && kind != Some(MemRegionKind::PageTables) {
                continue;
            }
            let (mut start, end) = clamp(r.start, r.len, lo, hi);
            if start == home.0 {
                start += need;
            }
            if start < end {
                let range = FrameRange::from_bytes(Gpa(start), end - start);
                if let Err(e) = buddy.add_free_range(range) {
                    fatal(e.as_str());
                }
            }
        }
    };
    add(&mut buddy, 0, limit);
    let kernel_pt = build_kernel_tables(info, &mut buddy);
    KernelMmu.load_cr3(kernel_pt.root());
    crate::tlb::set_kernel_root(kernel_pt.root().addr().0);
    crate::arch::mmu::set_direct_limit(info.ram_size);
    // The kernel's tables map all of RAM: the rest can be managed now.
    add(&mut buddy, limit, info.ram_size);
    let nr_cpus = info.cpu_count() as usize;
    let buddy = PerCpuBuddy::new(buddy, &PCP, nr_cpus, flags)
        .unwrap_or_else(|| fatal("per-CPU page lists refused (flags, lists or CPU count)"));
    let buddy = match BUDDY.set(buddy) {
        Ok(b) => Pages(b),
        Err(_) => fatal("page allocator set up twice"),
    };
    let mm = MemoryManager { buddy, kernel_pt, refs, user: None, gather: Gather::new() };
    *MM.lock() = Some(mm);
}

/// Build the kernel's own tables: the direct map of all RAM and the kernel
/// window, every table page from the page-table zone.
fn build_kernel_tables(info: &BootInfo, buddy: &mut BuddyAllocator<'static, DirectMap>) -> PageTable {
    // Only the PML4 entries the kernel uses (direct map, kernel window) are
    // created, not all 256 upper-half PDPTs: every address space copies the
    // present upper entries when created and clears them when destroyed,
    // and in shadow mode each of those writes is a trap. The kernel maps
    // everything it needs here, before any address space exists.
    let mut pt = PageTable::new_pinned_upper(buddy).unwrap_or_else(|| fatal("no page-table page for the kernel"));
    let two_mib = guest_mm::LARGE_PAGE_SIZE;
    let data = PteFlags::WRITABLE | PteFlags::ACCESSED | PteFlags::DIRTY;
    // The direct map: 1 GiB pages where the CPU has them and a whole GiB of
    // RAM is there, 2 MiB pages for the rest, so that it costs a handful of
    // entries whatever the RAM size (in shadow mode each entry written is a
    // trap). Not NX: the access-matrix test runs with EFER.NXE clear, when
    // bit 63 is a reserved bit and an NX direct map would fault.
    let gib = guest_mm::HUGE_PAGE_SIZE;
    let whole_gibs = if crate::arch::has_1g_pages() { info.ram_size / gib } else { 0 };
    map_kernel::<Size1GiB>(&mut pt, buddy, DIRECT_MAP_BASE, 0, whole_gibs, data);
    let rest = whole_gibs * gib;
    map_kernel::<Size2MiB>(&mut pt, buddy, DIRECT_MAP_BASE + rest, rest, (info.ram_size - rest) / two_mib, data);
    let kernel_end =
        info.regions().iter().filter(|r| r.kind == MemRegionKind::Kernel as u32).map(|r| r.end()).max().unwrap_or(0);
    map_kernel::<Size2MiB>(&mut pt, buddy, guest_abi::KERNEL_VMA, 0, kernel_end.div_ceil(two_mib), data);
    pt
}

/// Map `pages` kernel pages of size `S` from `va` to `pa` on, or stop the
/// kernel.
fn map_kernel<S: PageSize>(
    pt: &mut PageTable,
    buddy: &mut BuddyAllocator<'static, DirectMap>,
    va: u64,
    pa: u64,
    pages: u64,
    flags: PteFlags,
) {
    // Before the first CR3 load nothing is shadowed (see `arch::mmu`): pv
    // mode has nothing to report, so the writes skip its recorder (a check
    // and a call per entry: 4,096 entries for 8 GiB of RAM, all emulated).
    let mem = if crate::arch::mmu::is_shadow() {
        *buddy.mem()
    } else {
        // SAFETY: the buddy's own direct map without the recorder: the
        // frames it was given so far lie below the boot map's limit, which
        // the boot tables map read-write at DIRECT_MAP_BASE, and the
        // page-table pages it hands out are referenced by nothing else.
        unsafe { DirectMap::new(DIRECT_MAP_BASE) }
    };
    let page = Page::<S>::from_start_address(guest_abi::Gva(va)).unwrap_or_else(|_| fatal("bad kernel page"));
    let frame = PhysFrame::<S>::from_start_address(Gpa(pa)).unwrap_or_else(|_| fatal("bad kernel frame"));
    if let Err(e) = pt.map_range(&mem, buddy, page, frame, pages, flags) {
        fatal(e.as_str());
    }
}

/// The kernel heap: kmalloc over the buddy allocator.
pub struct KernelHeap;

// SAFETY: alloc returns either null or a block of at least `layout.size()`
// bytes aligned to `layout.align()` that the allocator will not hand out
// again until it is freed (the slab and buddy invariants, tested on the
// host); dealloc gives back exactly such a block.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        kmalloc(layout.size(), layout.align()).map_or(core::ptr::null_mut(), |gpa| (DIRECT_MAP_BASE + gpa.0) as *mut u8)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let gpa = Gpa(ptr as u64 - DIRECT_MAP_BASE);
        if let Err(e) = kfree(gpa, layout.size(), layout.align()) {
            fatal(e.as_str());
        }
    }
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap;
