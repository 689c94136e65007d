//! The MMU platform hooks: the places where ept, shadow and pv mode differ
//! for the guest (docs/architecture.md, "Shadow mode"; `guest_abi::pv` for pv).
//!
//! - **CR3 loads** go through [`load_cr3`]: `mov cr3` in ept mode, the
//!   `LOAD_CR3` hypercall in shadow mode (the VMM points the vCPU at the
//!   shadow root). In pv mode, with an empty write queue, a shadow root the
//!   VMM has published is loaded with `mov cr3` directly (no exit);
//!   otherwise `LOAD_CR3`, which applies the queue first.
//! - **Page faults** first ask the VMM (`SHADOW_FAULT`) in shadow mode:
//!   most are hidden faults the VMM fixes; only true guest faults reach the
//!   kernel's own handling, with the error code the guest's tables give.
//!   In pv mode the kernel walks its own tables first ([`pv_true_fault`]):
//!   a fault they explain is the kernel's at once, with no exit; only a
//!   fault they allow goes to the VMM.
//! - **pv mode: page-table writes** are recorded in the write queue of the
//!   area shared with the VMM (the memory manager's direct map reports
//!   them, [`PV_WRITES`]); `invlpg` and TLB flushes sync the queue with
//!   `PV_FLUSH` when it holds anything — deferred to the end of a lazy-MMU
//!   bracket ([`enter_lazy`], [`leave_lazy`]). A full queue syncs by itself.
//!
//! - **Before the first CR3 load** nothing is shadowed (the VMM builds a
//!   shadow root only at `LOAD_CR3`), so the kernel runs as in ept mode on
//!   the VMM's boot tables: [`init`] records the mode the kernel will run
//!   in, and the first [`load_cr3`] (the memory manager's, once the
//!   kernel's own tables are built, or [`start_shadowing`]) enters it. The
//!   VMM keeps the boot tables and the page-table zone writable until then,
//!   so building the direct map of all RAM costs no trapped write (shadow)
//!   and no queued one (pv): the bring-up no longer grows with RAM size.
//! - **pv mode: accessed bits** of a scan come from one `PV_HARVEST`
//!   ([`harvest_young`]): the shadow leaves' A bits, read by the VMM; the
//!   guest's own entries keep theirs.
//!
//! Nothing else in the kernel knows which mode it runs in.
//!
//! SMP: every mode runs several CPUs (`crate::smp`). The guest's own root
//! in shadow and pv mode is per CPU (`PerCpu::guest_cr3`), as are the pv
//! lazy-MMU depth and the write queue (layout version 2: a ring per CPU);
//! the mode and the published roots are the VM's; a shootdown in pv mode
//! is one `PV_FLUSH_REMOTE` ([`pv_flush_remote`], `crate::tlb`). Every CR3 load records the root in
//! the per-CPU area first (the CPU mask `crate::tlb` shoots down) and
//! counts a full flush after. An application processor in shadow mode
//! enters its first root through `LOAD_CR3` (`crate::smp`'s entry code).

use crate::hypercall;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use guest_abi::hypercall as hc;
use guest_abi::pv::{self, ENTRY_PAGE, NO_GVA, QUEUE_CAP, ROOTS_CAP, ROOTS_FIRST};
use guest_abi::{DIRECT_MAP_BASE, Gpa, KERNEL_VMA, MmuMode};
use guest_mm::phys::{Pfn, TableWrites};

const EPT: u8 = 0;
const SHADOW: u8 = 1;
const PV: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(EPT);
/// The mode [`init`] was given, entered at the first [`load_cr3`] (until
/// then [`MODE`] says ept: the vCPU walks our own tables).
static REQUESTED: AtomicU8 = AtomicU8::new(EPT);
/// In shadow and pv mode the hardware CR3 holds the shadow root; the
/// guest's own root is remembered in the per-CPU area.
fn set_guest_cr3(root: u64) {
    super::percpu::this().guest_cr3.store(root, Ordering::Relaxed);
}

fn hardware_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects; ring 0.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Record the mode; in pv mode, register the shared area. Shadowing itself
/// starts at the first [`load_cr3`] (module doc): until then the vCPU runs
/// on the boot tables, as in ept mode.
pub fn init(mode: Option<MmuMode>) {
    match mode {
        Some(MmuMode::Shadow) => REQUESTED.store(SHADOW, Ordering::Relaxed),
        // The hostile `crash=pv-area-*` modes register an area of their own.
        Some(MmuMode::Pv)
            if crate::cmdline::value(crate::boot::cmdline(), "crash").is_some_and(|m| m.starts_with("pv-area")) => {}
        Some(MmuMode::Pv) => {
            let info = crate::boot::info();
            ZONE.0.store(info.pt_zone.start, Ordering::Relaxed);
            ZONE.1.store(info.pt_zone.end(), Ordering::Relaxed);
            DIRECT_LIMIT.store(info.boot_mapped.min(info.ram_size), Ordering::Relaxed);
            if hypercall::call(hc::PV_SETUP, area_gpa(), pv::LAYOUT_V2, 0, 0) != hc::OK {
                crate::panic::fatal("PV_SETUP refused by the VMM");
            }
            REQUESTED.store(PV, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Enter shadow or pv mode now on the current tables, if [`init`] asked for
/// it and no CR3 load has yet: for code that needs the VMM's shadow before
/// the memory manager is up (the `crash=` modes, the self tests).
pub fn start_shadowing() {
    if MODE.load(Ordering::Relaxed) == EPT && REQUESTED.load(Ordering::Relaxed) != EPT {
        // SAFETY: the tables the CPU runs on now: they map the kernel.
        unsafe { load_cr3(hardware_cr3()) };
    }
}

/// Whether the kernel runs (or will run, from its first CR3 load) in pv
/// mode: the memory manager then reports its page-table writes.
pub fn pv_requested() -> bool {
    REQUESTED.load(Ordering::Relaxed) == PV
}

/// Whether the VMM shadows our page tables (shadow or pv mode).
pub fn is_shadow() -> bool {
    MODE.load(Ordering::Relaxed) != EPT
}

/// Whether we run paravirtualised (pv mode).
pub fn is_pv() -> bool {
    MODE.load(Ordering::Relaxed) == PV
}

/// The guest-physical root of the current address space (as the guest
/// sees it: in shadow and pv mode the VMM remembers the guest's value).
#[allow(dead_code)] // used by the address-space code
pub fn read_cr3() -> u64 {
    if is_shadow() { super::percpu::this().guest_cr3.load(Ordering::Relaxed) } else { hardware_cr3() }
}

/// Switch to the address space rooted at `root` (a GPA).
///
/// # Safety
/// `root` must be the root of a valid four-level address space that maps
/// the running kernel (its code, stacks, IDT/GDT/TSS and data) as the
/// current one does — the kernel half every address space shares — and
/// stays so while it is loaded. Anything else faults the next instruction
/// or silently maps other memory.
pub unsafe fn load_cr3(root: u64) {
    // Interrupts off across the switch: a shootdown IPI taken between the
    // mask update and the load (or, in shadow mode, between `LOAD_CR3` and
    // the per-CPU guest root) would reload the old root in its handler
    // (`tlb::handle_ipi` → `flush_all` reloads `read_cr3()`), leaving the
    // CPU on one root while its bookkeeping names another — seen as an
    // endless spurious fault on a reader at 4 vCPUs in shadow mode.
    let irq = super::interrupts_enabled();
    super::disable_interrupts();
    // Join the new address space's CPU mask before the load (crate::tlb:
    // an initiator that misses us changed the tables before our load).
    let cpu = super::percpu::this();
    cpu.loaded_root.store(root & !0xfff, Ordering::SeqCst);
    // SAFETY: the caller's contract.
    unsafe { load_cr3_raw(root) };
    cpu.full_flushes.fetch_add(1, Ordering::SeqCst);
    if irq {
        super::enable_interrupts();
    }
}

/// [`load_cr3`] without the per-CPU bookkeeping.
///
/// # Safety
/// As for [`load_cr3`].
unsafe fn load_cr3_raw(root: u64) {
    // The first CR3 load enters the requested mode (module doc).
    let requested = REQUESTED.load(Ordering::Relaxed);
    if MODE.load(Ordering::Relaxed) != requested {
        MODE.store(requested, Ordering::Relaxed);
    }
    if is_pv()
        && queue_len() == 0
        && let Some(shadow_root) = published_root(root)
    {
        // SAFETY: a shadow root the VMM published for `root` (kept valid
        // until the VMM republishes, which it does before we run again
        // whenever a root changes); it maps the kernel as `root` does (the
        // caller's contract).
        unsafe { core::arch::asm!("mov cr3, {}", in(reg) shadow_root, options(nostack, preserves_flags)) };
        set_guest_cr3(root);
        return;
    }
    if is_shadow() {
        // pv mode: a refused write queue is answered with the batch error
        // and the root is not loaded.
        let r = hypercall::call(hc::LOAD_CR3, root, 0, 0, 0);
        if hc::is_error(r) || pv::decode_batch_error(r).is_some() {
            crate::panic::fatal("LOAD_CR3 refused by the VMM");
        }
        set_guest_cr3(root);
        return;
    }
    // SAFETY: the caller passes the root of a valid address space that maps
    // the kernel (this function's contract).
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

/// Switch to `root` through the VMM's `LOAD_CR3` even in pv mode, where
/// [`load_cr3`] may load a published shadow root itself: the way back for
/// a guest that wrote the shadow pool behind the VMM's back (the VMM
/// repairs the pool at `LOAD_CR3`; a published root may hold what the
/// guest wrote until then).
///
/// # Safety
/// As for [`load_cr3`].
pub unsafe fn load_cr3_through_vmm(root: u64) {
    if !is_shadow() {
        // SAFETY: the caller's contract.
        return unsafe { load_cr3(root) };
    }
    let r = hypercall::call(hc::LOAD_CR3, root, 0, 0, 0);
    if hc::is_error(r) || pv::decode_batch_error(r).is_some() {
        crate::panic::fatal("LOAD_CR3 refused by the VMM");
    }
    set_guest_cr3(root);
}

/// Flush the TLB entry of `va` after changing its mapping.
#[allow(dead_code)] // used by the paging code
pub fn invlpg(va: u64) {
    if is_pv() {
        let a = super::percpu::this();
        if a.pv_lazy_depth.load(Ordering::Relaxed) > 0 {
            a.pv_lazy_pending.store(true, Ordering::Relaxed);
        } else if queue_len() > 0 {
            pv_flush(va);
        }
    }
    // SAFETY: invalidating a TLB entry has no memory effects. In shadow mode
    // the VMM already updated the shadow on the PTE write (in pv mode at
    // the PV_FLUSH above); invlpg still flushes the hardware TLB, as on
    // bare metal.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// Flush every non-global TLB entry (a CR3 reload; deferred inside a pv
/// lazy-MMU bracket).
pub fn flush_all() {
    if is_pv() {
        let a = super::percpu::this();
        if a.pv_lazy_depth.load(Ordering::Relaxed) > 0 {
            a.pv_lazy_pending.store(true, Ordering::Relaxed);
            return;
        }
        // Sync with the lighter PV_FLUSH; the reload below then finds the
        // root published (no second exit).
        if queue_len() > 0 {
            pv_flush(NO_GVA);
        }
    }
    // SAFETY: reloading the current root.
    unsafe { load_cr3(read_cr3()) };
}

/// Open a lazy-MMU bracket (`MmuPlatform::enter_lazy`): in pv mode
/// invalidations wait for the outermost [`leave_lazy`]. Per CPU.
pub fn enter_lazy() {
    super::percpu::this().pv_lazy_depth.fetch_add(1, Ordering::Relaxed);
}

/// Close a lazy-MMU bracket: the outermost one syncs the write queue once
/// if an invalidation was deferred.
pub fn leave_lazy() {
    let a = super::percpu::this();
    if a.pv_lazy_depth.fetch_sub(1, Ordering::Relaxed) == 1
        && a.pv_lazy_pending.swap(false, Ordering::Relaxed)
        && is_pv()
    {
        if queue_len() > 0 {
            pv_flush(NO_GVA);
        }
        // The deferred invalidations themselves: a full TLB flush (the VMM
        // leaves them to us on an EPT/NPT host).
        // SAFETY: reloading the current (shadow) root; no mapping changes.
        unsafe { core::arch::asm!("mov cr3, {}", in(reg) hardware_cr3(), options(nostack, preserves_flags)) };
    }
}

/// What a page fault turned out to be.
pub enum Fault {
    /// A hidden fault: the VMM fixed its shadow; retry.
    Hidden,
    /// A true guest fault with this error code.
    Guest(u64),
}

/// The first step of `#PF` handling; `rflags` is the interrupted context's
/// (its AC is the one SMAP checked).
pub fn classify_fault(cr2: u64, error_code: u64, rflags: u64) -> Fault {
    if !is_shadow() {
        return Fault::Guest(error_code);
    }
    if is_pv()
        && let Some(ec) = pv_true_fault(cr2, error_code)
    {
        return Fault::Guest(ec);
    }
    let r = hypercall::call(hc::SHADOW_FAULT, cr2, error_code, rflags, 0);
    if r == hc::FAULT_FIXED {
        Fault::Hidden
    } else if r & hc::FAULT_GUEST != 0 && !hc::is_error(r) {
        Fault::Guest(r & 0xffff_ffff)
    } else {
        crate::panic::fatal("SHADOW_FAULT refused by the VMM")
    }
}

/// The kernel's own handler resolved a true page fault at `cr2`: in pv
/// mode, sync the writes it queued and have the VMM shadow `cr2` now
/// (`PV_FLUSH(cr2)`), so the retried access does not fault again — one
/// exit per demand or copy-on-write fault, and no second `#PF`.
pub fn fault_handled(cr2: u64) {
    if is_pv() && queue_len() > 0 && super::percpu::this().pv_lazy_depth.load(Ordering::Relaxed) == 0 {
        pv_flush(cr2);
    }
}

/// `MmuPlatform::harvest_young`: in pv mode one `PV_HARVEST` answers
/// which of the pages `young` names (bit `i`: page `base + i * 4096`) were
/// used since the last harvest that named them, then a full TLB flush (no
/// exit) makes the CPU walk, and set A in the shadow leaves, again.
/// `false` in the other modes, or if the VMM has no harvest.
pub fn harvest_young(base: u64, young: &mut [u64]) -> bool {
    if !is_pv() || !HARVEST.load(Ordering::Relaxed) || young.len() > HARVEST_WORDS {
        return false;
    }
    // One buffer for the VM: a CPU that finds it in use by another takes
    // the caller's fallback (clearing A bits itself), which is exact, only
    // slower.
    if HARVEST_BUSY.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return false;
    }
    let done = harvest_with_buffer(base, young);
    HARVEST_BUSY.store(false, Ordering::Release);
    done
}

/// [`harvest_young`] while this CPU owns [`HARVEST_BUF`] (`HARVEST_BUSY`).
fn harvest_with_buffer(base: u64, young: &mut [u64]) -> bool {
    let buf = HARVEST_BUF.0.get() as *mut u64;
    for (i, &w) in young.iter().enumerate() {
        // SAFETY: `i` < HARVEST_WORDS (checked above); see `HarvestBuf`.
        unsafe { buf.add(i).write_volatile(w) };
    }
    let gpa = HARVEST_BUF.0.get() as u64 - KERNEL_VMA;
    let r = hypercall::call(hc::PV_HARVEST, base, young.len() as u64 * 64, gpa, 0);
    if pv::decode_batch_error(r).is_some() {
        crate::panic::fatal("PV_HARVEST refused the write queue");
    }
    if r != hc::OK {
        return false;
    }
    for (i, w) in young.iter_mut().enumerate() {
        // SAFETY: as above; the VMM wrote the words during the exit.
        *w = unsafe { buf.add(i).read_volatile() };
    }
    // SAFETY: reloading the current (shadow) root; no mapping changes.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) hardware_cr3(), options(nostack, preserves_flags)) };
    true
}

/// Whether [`harvest_young`] asks the VMM (`harvest=off` on the command
/// line: no, the aging code clears A in the entries instead).
static HARVEST: AtomicBool = AtomicBool::new(true);

/// Use `PV_HARVEST` in pv mode (the default) or not.
pub fn set_harvest(on: bool) {
    HARVEST.store(on, Ordering::Relaxed);
}

const HARVEST_WORDS: usize = (pv::HARVEST_PAGES / 64) as usize;

/// `PV_HARVEST`'s bitmap, in the kernel image (so its GPA is known).
#[repr(C, align(64))]
struct HarvestBuf(UnsafeCell<[u64; HARVEST_WORDS]>);

// SAFETY: only the CPU that set `HARVEST_BUSY` touches the buffer (SMP),
// only by volatile accesses through raw pointers, and the VMM writes it
// only while that vCPU is stopped at its `PV_HARVEST` exit.
unsafe impl Sync for HarvestBuf {}

/// Set while a CPU uses [`HARVEST_BUF`].
static HARVEST_BUSY: AtomicBool = AtomicBool::new(false);

static HARVEST_BUF: HarvestBuf = HarvestBuf(UnsafeCell::new([0; HARVEST_WORDS]));

// ---- pv mode ----

/// The guest's own CR0.WP (pv mode's fault walk needs it: the vCPU runs
/// with WP = 1 whatever the guest set, so reading CR0 would not tell).
static GUEST_WP: AtomicBool = AtomicBool::new(true);
/// The page-table zone, `[start, end)`.
static ZONE: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));
/// RAM the direct map covers (the boot map's, then all of RAM).
static DIRECT_LIMIT: AtomicU64 = AtomicU64::new(0);

/// The guest's own EFER.NXE (as with WP, the vCPU's EFER may say
/// otherwise: the VMM keeps NXE set).
static GUEST_NXE: AtomicBool = AtomicBool::new(true);

/// The guest changed CR0 (and tells the VMM with `FLUSH_TLB(cr0, ..)`).
pub fn note_guest_cr0(cr0: u64) {
    GUEST_WP.store(cr0 & (1 << 16) != 0, Ordering::Relaxed);
}

/// The guest wrote EFER (every `wrmsr` of EFER in the kernel says so).
pub fn note_guest_efer(efer: u64) {
    GUEST_NXE.store(efer & (1 << 11) != 0, Ordering::Relaxed);
}

/// The direct map now covers RAM up to `limit` (the kernel's own tables).
pub fn set_direct_limit(limit: u64) {
    DIRECT_LIMIT.store(limit, Ordering::Relaxed);
}

/// The area shared with the VMM (layout version 2, `guest_abi::pv`): CPU
/// 0's write queue, the published roots, then one queue per other CPU,
/// for as many CPUs as the kernel runs.
#[repr(C, align(4096))]
struct Area(UnsafeCell<[u64; 512 * AREA_PAGES]>);

const AREA_PAGES: usize = pv::area_pages_v2(super::percpu::MAX_CPUS as u32) as usize;

// SAFETY: the words are only accessed with volatile reads and writes
// through raw pointers. A queue page has one producer, the CPU that owns
// it (interrupts off or not, a CPU's own queue is touched by that CPU
// only), and one consumer, the VMM, which reads entries only below the
// tail the guest published (`Release`) and writes only the head; the root
// table is written by the VMM only while it holds its MMU lock, and read
// by any CPU (a stale read finds an older root, which the VMM keeps valid
// until every CPU has left it: its limbo).
unsafe impl Sync for Area {}

static AREA: Area = Area(UnsafeCell::new([0; 512 * AREA_PAGES]));

/// The area's guest-physical address: the kernel image is loaded at
/// `GVA - KERNEL_VMA`.
fn area_gpa() -> u64 {
    AREA.0.get() as u64 - KERNEL_VMA
}

fn word(i: usize) -> *mut u64 {
    (AREA.0.get() as *mut u64).wrapping_add(i)
}

fn read_word(i: usize) -> u64 {
    // SAFETY: `i` < the area's length (callers' bounds); see `Area`.
    unsafe { word(i).read_volatile() }
}

fn write_word(i: usize, v: u64) {
    // SAFETY: as in `read_word`.
    unsafe { word(i).write_volatile(v) }
}

/// The first word of this CPU's queue page.
fn queue_base() -> usize {
    512 * pv::queue_page(super::percpu::cpu_id()) as usize
}

/// Entries queued by this CPU and not yet applied by the VMM (its ring:
/// tail - head).
fn queue_len() -> usize {
    let base = queue_base();
    read_word(base + pv::RING_TAIL).wrapping_sub(read_word(base + pv::RING_HEAD)) as usize
}

/// Queue one entry; a full queue is synced first.
fn record(entry: u64) {
    if queue_len() >= QUEUE_CAP {
        pv_flush(NO_GVA);
        if queue_len() != 0 {
            crate::panic::fatal("PV_FLUSH left the write queue full");
        }
    }
    let base = queue_base();
    let n = read_word(base + pv::RING_TAIL);
    write_word(base + pv::ring_word(n), entry);
    // The entry before the tail that publishes it.
    core::sync::atomic::fence(Ordering::Release);
    write_word(base + pv::RING_TAIL, n.wrapping_add(1));
}

/// Queue a raw entry, whatever it says (pv mode; the hostile
/// `crash=pv-bad-queue` mode sends entries the VMM must refuse).
pub fn queue_raw(entry: u64) {
    if is_pv() {
        record(entry);
    }
}

/// pv mode on SMP: the remote TLB flush (`PV_FLUSH_REMOTE`) that replaces
/// a shootdown's IPIs: the VMM applies every CPU's queue, then every CPU
/// in `cpus` flushes before it runs again (`crate::tlb`).
pub fn pv_flush_remote(cpus: u64) {
    let r = hypercall::call(hc::PV_FLUSH_REMOTE, cpus, 0, 0, 0);
    if r != hc::OK {
        crate::panic::fatal("PV_FLUSH_REMOTE refused by the VMM");
    }
}

/// Sync the write queue (and prefetch `va` unless it is `NO_GVA`).
fn pv_flush(va: u64) {
    let r = hypercall::call(hc::PV_FLUSH, va, 0, 0, 0);
    if r != hc::OK {
        crate::panic::fatal("PV_FLUSH refused by the VMM");
    }
}

/// The shadow root the VMM published for guest root `root`, if any: an
/// open-addressed table indexed by `root`'s frame number modulo
/// `ROOTS_CAP`, probed linearly up to an empty slot.
fn published_root(root: u64) -> Option<u64> {
    let start = ((root >> 12) % ROOTS_CAP as u64) as usize;
    for k in 0..ROOTS_CAP {
        let slot = (start + k) % ROOTS_CAP;
        let guest = read_word(512 + ROOTS_FIRST + 2 * slot);
        if guest == 0 {
            return None;
        }
        if guest == root {
            return Some(read_word(512 + ROOTS_FIRST + 2 * slot + 1));
        }
    }
    None
}

/// pv mode's page-table writes recorder: the memory manager's direct map
/// reports every write into the page-table zone here.
pub struct PvWrites;

impl TableWrites for PvWrites {
    // Before the first CR3 load nothing is shadowed: nothing to report.
    fn entry_written(&self, addr: Gpa) {
        if is_pv() {
            record(addr.0);
        }
    }
    fn frame_rewritten(&self, frame: Pfn) {
        if is_pv() {
            record(frame.addr().0 | ENTRY_PAGE);
        }
    }
}

/// The recorder the memory manager's direct map reports to in pv mode.
pub static PV_WRITES: PvWrites = PvWrites;

/// Walk our own tables for a fault at `cr2` with the vCPU's `error_code`:
/// `Some(guest error code)` when they forbid the access — a true fault the
/// kernel handles without asking the VMM — and `None` when they allow it
/// or the walk meets anything this quick check does not model exactly
/// (fetches, large pages, reserved or ignored high bits, tables outside
/// the zone, CR4.SMEP/SMAP, supervisor writes with CR0.WP = 0): those go
/// to the VMM's full walker (`SHADOW_FAULT`). What it answers is what the
/// Intel SDM vol. 3 §4.7 gives for a 4 KiB walk: a not-present entry →
/// P = 0; a present path whose RW or US forbids the access → P = 1; W and
/// U from the access. Like the VMM's walker (and KVM's), a faulting walk
/// sets no A bit, so nothing is written.
fn pv_true_fault(cr2: u64, error_code: u64) -> Option<u64> {
    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const PS: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    // Bits 52..62 (protection keys, ignored bits) and 40..51 (beyond any
    // RAM a guest here has): leave them to the full walker; so is XD
    // (bit 63) when the guest's EFER.NXE = 0, where it is reserved.
    const XD: u64 = 1 << 63;
    const HIGH: u64 = 0x7fff_ff00_0000_0000;
    let high = if GUEST_NXE.load(Ordering::Relaxed) { HIGH } else { HIGH | XD };
    if error_code & !(pf_bits::W | pf_bits::U | pf_bits::P) != 0 {
        return None;
    }
    let cr4: u64;
    // SAFETY: reading CR4 has no side effects; ring 0.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags)) };
    if cr4 & (3 << 20) != 0 {
        return None;
    }
    let (write, user) = (error_code & pf_bits::W != 0, error_code & pf_bits::U != 0);
    let access = error_code & (pf_bits::W | pf_bits::U);
    let (zone_lo, zone_hi) = (ZONE.0.load(Ordering::Relaxed), ZONE.1.load(Ordering::Relaxed));
    let limit = DIRECT_LIMIT.load(Ordering::Relaxed);
    let mut table = read_cr3() & ADDR;
    let (mut rw, mut us) = (true, true);
    for level in (1..=4u32).rev() {
        if table < zone_lo || table >= zone_hi || table >= limit {
            return None;
        }
        let idx = (cr2 >> (12 + 9 * (level - 1))) & 0x1ff;
        // SAFETY: `table` is a page-table page in RAM the direct map covers
        // (checked above); reading it has no side effects.
        let e = unsafe { ((DIRECT_MAP_BASE + table + idx * 8) as *const u64).read_volatile() };
        if e & P == 0 {
            return Some(access);
        }
        if e & high != 0 || (level > 1 && e & PS != 0) {
            return None;
        }
        rw &= e & RW != 0;
        us &= e & US != 0;
        table = e & ADDR;
    }
    if user && !us {
        return Some(P | access);
    }
    if write && !rw {
        if !user && !GUEST_WP.load(Ordering::Relaxed) {
            return None;
        }
        return Some(P | access);
    }
    None
}

/// `#PF` error-code bits (SDM vol. 3 §4.7).
mod pf_bits {
    pub const P: u64 = 1;
    pub const W: u64 = 2;
    pub const U: u64 = 4;
}
