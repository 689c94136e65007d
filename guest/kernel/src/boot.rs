//! Reading the VMM's boot record, the boot banner, and the boot report.

use crate::{console, kprint, kprintln};
use guest_abi::report::{BootRecord, kind};
use guest_abi::{BootInfo, DIRECT_MAP_BASE, KERNEL_VMA, MemRegionKind, MmuMode};

/// The validated boot record's address (0 before validation); written
/// once by the boot CPU, before any other CPU starts.
static INFO: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The boot record, once [`BootParams::from_gpa`] has validated it.
pub fn info() -> &'static BootInfo {
    let p = INFO.load(core::sync::atomic::Ordering::Acquire);
    if p == 0 {
        panic!("boot info read before validation");
    }
    // SAFETY: only `from_gpa` stores a non-zero value: the address of a
    // validated record the kernel never changes.
    unsafe { &*(p as *const BootInfo) }
}

/// The validated boot record.
pub struct BootParams {
    info: &'static BootInfo,
}

impl BootParams {
    /// Map the record at `gpa` through the boot direct map and check it.
    /// A bad record ends the VM: without it the kernel knows nothing.
    pub fn from_gpa(gpa: u64) -> Self {
        // SAFETY: the VMM passes the GPA of a BootInfo inside the memory
        // its boot tables map at DIRECT_MAP_BASE; it stays untouched for the
        // kernel's lifetime. Magic and version are checked before use.
        let info = unsafe { &*((DIRECT_MAP_BASE + gpa) as *const BootInfo) };
        if !info.is_valid() {
            panic!("boot info: bad magic or version");
        }
        INFO.store(info as *const BootInfo as u64, core::sync::atomic::Ordering::Release);
        BootParams { info }
    }

    /// The MMU mode the VMM runs us in.
    pub fn mmu_mode(&self) -> Option<MmuMode> {
        MmuMode::from_raw(self.info.mmu_mode)
    }

    /// The command line; empty if it is not valid UTF-8 or not mapped.
    pub fn cmdline(&self) -> &'static str {
        cmdline_of(self.info)
    }
}

fn cmdline_of(info: &'static BootInfo) -> &'static str {
    let len = info.cmdline_len as usize;
    let gpa = info.cmdline_gpa;
    if len == 0 || gpa.saturating_add(len as u64) > info.boot_mapped {
        return "";
    }
    // SAFETY: the range was checked against the mapped part of RAM; the
    // VMM wrote the command line there and nothing changes it.
    let bytes = unsafe { core::slice::from_raw_parts((DIRECT_MAP_BASE + gpa) as *const u8, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The kernel command line (after boot validation).
pub fn cmdline() -> &'static str {
    cmdline_of(info())
}

/// Print `n` bytes as a human-readable size.
fn print_size(n: u64) {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        kprint!("{} GiB", n >> 30);
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        kprint!("{} MiB", n >> 20);
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        kprint!("{} KiB", n >> 10);
    } else {
        kprint!("{} B", n);
    }
}

/// Print the banner and the memory map.
pub fn print_banner(p: &BootParams) {
    let info = p.info;
    let mode = p.mmu_mode().map(MmuMode::name).unwrap_or("unknown");
    kprint!("mmuvirt guest kernel {} (mmu={}, RAM ", env!("CARGO_PKG_VERSION"), mode);
    print_size(info.ram_size);
    kprintln!(")");
    kprintln!("memory map ({} regions):", info.regions().len());
    for r in info.regions() {
        let kind = MemRegionKind::from_raw(r.kind).map(MemRegionKind::name).unwrap_or("?");
        kprint!("  [{:#012x}-{:#012x}] {} ", r.start, r.end().saturating_sub(1), kind);
        print_size(r.len);
        console::write_bytes(b"\n");
    }
    kprint!("page-table zone: {:#x}, ", info.pt_zone.start);
    print_size(info.pt_zone.len);
    console::write_bytes(b"\n");
    kprintln!("cmdline: \"{}\"", p.cmdline());
}

/// The guest-physical address of a kernel-image virtual address.
pub fn kernel_va_to_gpa(va: u64) -> u64 {
    va - KERNEL_VMA
}

/// Tell the VMM the kernel is up (a `REPORT` of kind `BOOT`).
pub fn report_boot(p: &BootParams, tsc_at_entry: u64) {
    let rec = BootRecord {
        tsc_at_entry,
        tsc_at_ready: crate::arch::rdtsc(),
        regions: p.info.regions().len() as u32,
        reserved: 0,
    };
    if let Err(why) = crate::report::send(kind::BOOT, &[crate::report::bytes_of(&[rec])]) {
        crate::panic::fatal(why);
    }
}
