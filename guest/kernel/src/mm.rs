//! The kernel's memory manager instance: the buddy allocator over the RAM
//! the VMM's memory map calls usable (plus the page-table zone), and the
//! kmalloc slab caches as the kernel's `#[global_allocator]`.
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
//! - The per-frame metadata array, the reference counts and the section
//!   states are carved out of the start of the largest usable region below
//!   `boot_mapped` and never handed to the allocator. They are all zeroes
//!   (the VMM hands over zeroed RAM): the trust assumption of
//!   `new_deferred`.
//! - The manager lives behind one interrupt-safe ticket lock (`MM`, first
//!   in the lock order of [`crate::sync`]); every CPU reaches it through
//!   [`with`]. A re-entrant use on one CPU (an allocation from inside the
//!   allocator, a fault inside `with`) is a bug and panics ("lock
//!   re-entered") instead of deadlocking or corrupting state. The per-CPU
//!   fast paths of the allocators will sit in front of this lock.
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
use core::sync::atomic::{AtomicU8, Ordering};
use guest_abi::{BootInfo, DIRECT_MAP_BASE, Gpa, MemRegionKind};
use guest_mm::aspace::{AddressSpace, AspaceError, FrameRefs, MmCtx};
use guest_mm::buddy::{BuddyAllocator, FrameMeta, ZonePref, meta_bytes, section_bytes};
use guest_mm::folio::FolioSize;
use guest_mm::paging::{
    FrameSource, MmuPlatform, Page, PageSize, PageTable, PageTableSource, PhysFrame, PteFlags, Size1GiB, Size2MiB,
};
use guest_mm::phys::{DirectMap, FrameRange, Pfn};
use guest_mm::slab::Kmalloc;

use crate::arch::percpu;
use crate::panic::fatal;
use crate::sync::IrqSpinLock;

/// The memory manager.
pub struct MemoryManager {
    /// The page allocator.
    pub buddy: BuddyAllocator<'static, DirectMap>,
    /// The kmalloc caches.
    pub kmalloc: Kmalloc,
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
    fn defer(&mut self, buddy: &mut BuddyAllocator<'static, DirectMap>, pfn: Pfn, table: bool) {
        if crate::smp::online_count() <= 1 && self.n == 0 {
            return free_now(buddy, pfn.0 | if table { Self::TABLE } else { 0 });
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
            self.finish(buddy);
        }
    }

    /// Flush every CPU that could still cache a gathered frame, then free
    /// the frames.
    pub fn finish(&mut self, buddy: &mut BuddyAllocator<'static, DirectMap>) {
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
            free_now(buddy, self.frames[i]);
        }
        self.n = 0;
        self.freed_tables = false;
    }
}

fn free_now(buddy: &mut BuddyAllocator<'static, DirectMap>, raw: u64) {
    let pfn = Pfn(raw & !Gather::TABLE);
    if raw & Gather::TABLE != 0 {
        PageTableSource::free_table(buddy, pfn);
    } else {
        FrameSource::free_frame(buddy, pfn);
    }
}

/// The frame source page-table operations get: allocations straight from
/// the buddy allocator, frees through the [`Gather`].
pub struct Frames<'a> {
    buddy: &'a mut BuddyAllocator<'static, DirectMap>,
    gather: &'a mut Gather,
}

impl PageTableSource for Frames<'_> {
    fn alloc_table(&mut self) -> Option<Pfn> {
        self.buddy.alloc_table()
    }
    fn free_table(&mut self, table: Pfn) {
        self.gather.defer(self.buddy, table, true);
    }
}

impl FrameSource for Frames<'_> {
    fn alloc_frame(&mut self) -> Option<Pfn> {
        self.buddy.alloc_frame()
    }
    fn free_frame(&mut self, frame: Pfn) {
        self.gather.defer(self.buddy, frame, false);
    }
    // Large folios come from the buddy allocator too (without this the
    // trait's default refuses every order above 0, and every `anon=` size
    // silently falls back to 4 KiB: tests/shadow.rs counts the exits).
    fn alloc_folio(&mut self, order: u8) -> Option<Pfn> {
        self.buddy.alloc_folio(order)
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
        crate::tlb::set_operand_root(self.user.as_ref().map_or(0, |a| a.root().addr().0));
        let r = {
            let frames = Frames { buddy: &mut self.buddy, gather: &mut self.gather };
            let mut cx = MmCtx { mem: &mem, frames, refs: FrameRefs::attach(Pfn(0), self.refs), mmu: &KernelMmu };
            f(&mut cx, &self.kernel_pt, &mut self.user)
        };
        self.gather.finish(&mut self.buddy);
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

/// The memory manager, first in the lock order (`crate::sync`).
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
    let need = (meta_len + refs_len + section_bytes(frames)).next_multiple_of(guest_mm::PAGE_SIZE);
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
    let sections: &'static mut [u8] = unsafe {
        core::slice::from_raw_parts_mut((carve + meta_len + refs_len) as *mut u8, section_bytes(frames) as usize)
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
    let mm = MemoryManager {
        buddy,
        kmalloc: Kmalloc::new(ZonePref::Normal),
        kernel_pt,
        refs,
        user: None,
        gather: Gather::new(),
    };
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
        with(|mm| mm.kmalloc.alloc(&mut mm.buddy, layout.size(), layout.align()))
            .flatten()
            .map_or(core::ptr::null_mut(), |gpa| (DIRECT_MAP_BASE + gpa.0) as *mut u8)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let gpa = Gpa(ptr as u64 - DIRECT_MAP_BASE);
        let r = with(|mm| mm.kmalloc.free(&mut mm.buddy, gpa, layout.size(), layout.align()));
        if let Some(Err(e)) = r {
            fatal(e.as_str());
        }
    }
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap;
