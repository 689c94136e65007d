//! Hypercalls: the guest's requests to the VMM.
//!
//! Calling convention: the guest loads the number into `eax`, the arguments
//! into `rdi`, `rsi`, `rcx`, `r8` (in that order), and executes
//! `out dx, eax` with `dx` = [`crate::ports::HYPERCALL`]. The VMM answers in
//! `rax`. (An early design named `rdx` as the third argument register, but
//! `out` needs `dx` for a port number above 255, so `rcx` and `r8` carry
//! the third and fourth arguments instead.)
//!
//! Every result is a `u64`; values at or above [`ERR_BASE`] are errors.
//! An unknown number or an argument that points outside guest RAM gets an
//! error result; the VMM never trusts a hypercall's arguments.

/// Send a report record: `REPORT(gpa, len)`. See [`crate::report`].
pub const REPORT: u32 = 1;
/// Host monotonic time in nanoseconds since the VM was created: `NOW()`.
pub const NOW: u32 = 2;
/// Shadow mode: load a guest CR3: `LOAD_CR3(root, flags)`.
pub const LOAD_CR3: u32 = 3;
/// Shadow mode: a `#PF` reached the guest: `SHADOW_FAULT(cr2, error_code,
/// rflags)`, `rflags` being the interrupted context's (from the exception
/// frame; 0: the vCPU's current RFLAGS). Its AC is the one SMAP checked at
/// the faulting access: a handler that clears AC on entry, as Linux's does,
/// would otherwise turn every fault taken with AC = 1 into an SMAP fault.
pub const SHADOW_FAULT: u32 = 4;
/// Shadow mode: flush the guest's TLB: `FLUSH_TLB(cr0, efer)`. After
/// changing CR0.WP, EFER.NXE or CR4 the guest passes its new CR0 and EFER
/// (0: unchanged): the VMM rebuilds the shadow for the new rules, and keeps
/// the vCPU's own CR0.WP and EFER.NXE set (it emulates the guest's WP = 0
/// and NXE = 0 in the shadow; a guest reading EFER back sees NXE = 1).
pub const FLUSH_TLB: u32 = 5;
/// Print the GVA→GPA→HVA→HPA chain of an address: `EXPLAIN(gva)`.
pub const EXPLAIN: u32 = 6;
/// pv mode: register the shared area: `PV_SETUP(gpa, layout)`, the GPA of
/// [`crate::pv::AREA_PAGES`] page-aligned pages of guest RAM (the write
/// queue, then the published roots) for `layout` 0 or
/// [`crate::pv::LAYOUT_V1`], or [`crate::pv::area_pages_v2`]`(cpus)` pages
/// for [`crate::pv::LAYOUT_V2`] (one write queue per vCPU). Once per boot;
/// `ERR_FAULT` outside RAM or unaligned, `ERR_INVALID` when already set up
/// or for an unknown layout, [`ERR_OVERLAP`] when any of it lies in memory
/// the VMM shadows (the page-table zone or the VMM's boot page tables): the
/// VMM writes the area, and its writes there would change guest page
/// tables behind the shadow's back.
pub const PV_SETUP: u32 = 7;
/// pv mode: apply the write queue, then make `gva`'s translation current:
/// `PV_FLUSH(gva)` (`gva` = [`crate::pv::NO_GVA`]: none). Answers [`OK`] or
/// a batch error ([`crate::pv::batch_error`]).
pub const PV_FLUSH: u32 = 8;
/// Start an application processor (SMP, like PSCI `CPU_ON`):
/// `CPU_ON(cpu, entry, stack, arg)`. The vCPU starts in long mode with the
/// boot CPU's boot sregs, `rip = entry`, `rsp = stack`, `rdi = arg`,
/// `rsi = cpu`, `rflags = 0x2`. [`ERR_INVALID`] unless
/// `1 <= cpu < BootInfo::cpus` and not yet started; [`ERR_FAULT`] for a
/// non-canonical `entry` or `stack`. Answers [`OK`] at once; the vCPU runs
/// soon after.
pub const CPU_ON: u32 = 9;
/// pv mode on SMP (shared-area layout [`crate::pv::LAYOUT_V2`]): the
/// paravirtual remote TLB flush that replaces a shootdown's IPIs (KVM's
/// `KVM_FEATURE_PV_TLB_FLUSH`, Hyper-V's `HvFlushVirtualAddressList`, Xen's
/// `MMUEXT_TLB_FLUSH_MULTI`): `PV_FLUSH_REMOTE(cpus, ranges, count)`. The
/// VMM applies the write queue of *every* vCPU, then every vCPU in `cpus`
/// (bit `i` = vCPU `i`; [`crate::pv::ALL_CPUS`]: all) flushes before it
/// runs guest code again: a vCPU in guest mode is stopped before the call
/// returns, the others flush at their next entry. `ranges` is the GPA of
/// `count` ≤ [`crate::pv::FLUSH_RANGES_CAP`] range entries
/// ([`crate::pv::range_entry`]); `count` = 0 flushes everything (a range
/// list may be flushed as everything: a superset is always allowed).
/// Answers [`OK`], a batch error for the caller's own queue
/// ([`crate::pv::batch_error`]), [`ERR_INVALID`] (`count` too large),
/// [`ERR_FAULT`] (the range list outside RAM) or [`ERR_UNAVAILABLE`] (not
/// pv mode, or a [`crate::pv::LAYOUT_V1`] area). Reserved: the VMM answers
/// it once its SMP pv mode lands (issue 18).
pub const PV_FLUSH_REMOTE: u32 = 10;
/// pv mode: harvest the accessed state of pages of the current address
/// space: `PV_HARVEST(gva, pages, bitmap)`. `gva` is page-aligned; bit `i`
/// of the `pages.div_ceil(64)` little-endian words at GPA `bitmap` names
/// page `gva + i * 4096` on the way in, and on the way out says whether
/// that page was accessed since the last harvest that named it, or since
/// the guest last cleared A in its entry (a second-level accessed bit, like
/// EPT's; the guest's own entries are not changed). It errs towards
/// "accessed", never the other way. A sync point. At most [`crate::pv::HARVEST_PAGES`] pages;
/// `ERR_INVALID` for more or an unaligned `gva`, `ERR_FAULT` for a bitmap
/// outside RAM. The guest flushes its TLB after it (docs/pv.md).
pub const PV_HARVEST: u32 = 11;

/// Success.
pub const OK: u64 = 0;
/// `SHADOW_FAULT` answer: the VMM fixed the shadow; retry the access.
pub const FAULT_FIXED: u64 = 0;
/// `SHADOW_FAULT` answer flag: a true guest page fault; the low 32 bits
/// are the error code the guest's own tables give.
pub const FAULT_GUEST: u64 = 1 << 32;
/// Results at or above this value are errors.
pub const ERR_BASE: u64 = u64::MAX - 0xff;
/// The hypercall number is unknown.
pub const ERR_UNKNOWN: u64 = u64::MAX;
/// An argument is invalid (a length too large, a bad flag).
pub const ERR_INVALID: u64 = u64::MAX - 1;
/// An argument points outside guest RAM.
pub const ERR_FAULT: u64 = u64::MAX - 2;
/// The hypercall exists but is not available in this configuration (for
/// example a shadow-mode call in ept mode).
pub const ERR_UNAVAILABLE: u64 = u64::MAX - 3;
/// `PV_SETUP`: the area overlaps guest memory the VMM shadows (the
/// page-table zone or the boot page tables), which only the guest's own,
/// tracked writes may change.
pub const ERR_OVERLAP: u64 = u64::MAX - 4;

/// Whether a hypercall result is an error.
pub const fn is_error(result: u64) -> bool {
    result >= ERR_BASE
}

/// A short name for a hypercall number, for logs and statistics.
pub const fn name(nr: u32) -> &'static str {
    match nr {
        REPORT => "report",
        NOW => "now",
        LOAD_CR3 => "load_cr3",
        SHADOW_FAULT => "shadow_fault",
        FLUSH_TLB => "flush_tlb",
        EXPLAIN => "explain",
        PV_SETUP => "pv_setup",
        PV_FLUSH => "pv_flush",
        CPU_ON => "cpu_on",
        PV_FLUSH_REMOTE => "pv_flush_remote",
        PV_HARVEST => "pv_harvest",
        _ => "unknown",
    }
}
