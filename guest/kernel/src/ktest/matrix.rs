//! The access matrix (after kvm-unit-tests `x86/access.c`): for every
//! combination of PTE flags (P, RW, US, A, D, NX, a reserved bit) × PDE
//! flags (RW, US) × access (read, write, fetch) × privilege (supervisor,
//! user via a ring-3 trampoline) × CR0.WP × EFER.NXE, perform the access
//! and record whether it faulted, the error code, and the A/D bits left in
//! the PTE and the PDE. The records go to the VMM (`REPORT` kind
//! `MATRIX`); the test compares shadow mode's with ept mode's, where the
//! host's MMU is the reference.
//!
//! Then the **pairs**: for each (WP, NXE), 8 leaves (RW, US, NX with P and
//! A set, D clear) × 6 first accesses × 6 second accesses, with no PTE
//! write between the two, so the second access meets the shadow leaf the
//! first one left (CR0.WP = 0 turns a read-only user page into a writable
//! supervisor-only shadow leaf on a supervisor write: a user access or a
//! fetch afterwards must see the guest's own permissions). CR4.SMEP/SMAP
//! cases are not here: the development hosts' KVM does not offer them to
//! guests; `shadow/tests/exactness.rs` carries them against an SDM model.
//!
//! Record (u16): bit 0 faulted, bits 1..=5 the error code's P, W/R, U/S,
//! RSVD, I/D bits, bit 6 PTE.A, bit 7 PTE.D, bit 8 PDE.A after the access;
//! for a pair, bit 9: the first access faulted.
//! The PTE is rewritten for every case, the PDE once per PTE combination.
//! For the 2 MiB cases (PDE with PS = 1, its own flags under test, bit 13 as
//! the reserved bit) bits 6 and 7 are the PDE's A and D, bit 8 is 0.
//!
//! The probe: a stub page (user, executable) holds `mov rax,[rdi]; ud2`,
//! `mov [rdi+8],rax; ud2` and `jmp rdi`; the target page starts with
//! `ud2`, so every
//! access ends in an exception — `#UD` when the access went through,
//! `#PF` when it did not. The exception handler records it and resumes at
//! `probe_return` in ring 0 on the saved kernel stack.

use super::vm_suites::{USER_BASE, enter_user, leave_user};
use crate::arch::mmu;
use crate::{hypercall, kprintln, mm};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_abi::report::{MatrixChunk, kind};
use guest_abi::{Gpa, Gva};
use guest_mm::paging::{FrameSource, Page, PhysFrame, PteFlags, Size4KiB};
use guest_mm::phys::PhysMem;

const STUB: u64 = USER_BASE; // PD entry 0
const TARGET: u64 = USER_BASE + (2 << 20); // PD entry 1: its PDE is under test
const RSVD_BIT: u64 = 1 << 51;

/// Cases per (WP, NXE) block: 4 KiB pages (7 PTE bits × 2 PDE bits ×
/// 3 accesses × 2 privileges), then 2 MiB pages (7 bits of the PS=1 PDE,
/// with reserved bit 13, × 3 × 2).
pub const BLOCK: usize = 128 * 4 * 6 + 128 * 6;
/// Access pairs per (WP, NXE) block: 8 leaves (RW, US, NX; P and A set,
/// D clear) × 6 first accesses × 6 second accesses.
pub const PAIR_BLOCK: usize = 8 * 6 * 6;
/// All cases: four blocks (NXE on/off × WP on/off), then four pair blocks.
pub const CASES: usize = BLOCK * 4 + PAIR_BLOCK * 4;
/// Bit 13: reserved in a 2 MiB PDE leaf (its address bits 20:13 must be 0).
const RSVD_2M: u64 = 1 << 13;

static mut RECORDS: [u16; CASES] = [0; CASES];

/// Set by the exception handler: 1 + vector of the probe's exception.
pub static PROBE_VECTOR: AtomicU64 = AtomicU64::new(0);
/// The error code of a probe `#PF`.
pub static PROBE_EC: AtomicU64 = AtomicU64::new(0);
/// Non-zero while a probe runs.
pub static PROBE_ACTIVE: AtomicU64 = AtomicU64::new(0);

#[unsafe(no_mangle)]
static mut PROBE_RSP: u64 = 0;

core::arch::global_asm!(
    ".section .text",
    ".global probe_run",
    // rdi = target, rsi = stub entry, rdx = 1 for ring 3
    "probe_run:",
    "    push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "    mov [rip + PROBE_RSP], rsp",
    "    test rdx, rdx",
    "    jnz 2f",
    "    jmp rsi",
    "2:  push 0x1b", // ss: user data
    "    push 0",    // rsp: the stub uses no stack
    "    push 0x2",  // rflags: IF off
    "    push 0x23", // cs: user code
    "    push rsi",
    "    iretq",
    ".global probe_return",
    "probe_return:",
    "    mov rsp, [rip + PROBE_RSP]",
    "    pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "    ret",
);

unsafe extern "C" {
    fn probe_run(target: u64, stub: u64, user: u64);
    fn probe_return();
}

/// The address the exception handler resumes a finished probe at.
pub fn probe_return_addr() -> u64 {
    probe_return as *const () as u64
}

// The stub page: read at +0, write at +8 (to the target's second word, so
// the `ud2` at its start survives), fetch at +16 jumps to the target.
const STUB_CODE: [u8; 18] = [
    0x48, 0x8b, 0x07, 0x0f, 0x0b, 0x90, 0x90, 0x90, // mov rax,[rdi]; ud2
    0x48, 0x89, 0x47, 0x08, 0x0f, 0x0b, 0x90, 0x90, // mov [rdi+8],rax; ud2
    0xff, 0xe7, // jmp rdi
];

fn write_bytes(mem: &impl PhysMem, frame: Gpa, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        mem.write_u64(Gpa(frame.0 + i as u64 * 8), u64::from_le_bytes(w));
    }
}

/// Set CR0.WP; returns the new CR0.
fn set_wp(on: bool) -> u64 {
    // SAFETY: toggles CR0.WP only; ring 0.
    unsafe {
        let mut cr0: u64;
        core::arch::asm!("mov {}, cr0", out(reg) cr0);
        if on {
            cr0 |= guest_abi::paging::CR0_WP
        } else {
            cr0 &= !guest_abi::paging::CR0_WP
        }
        core::arch::asm!("mov cr0, {}", in(reg) cr0);
        cr0
    }
}

/// Set EFER.NXE; returns the new EFER.
fn set_nxe(on: bool) -> u64 {
    // SAFETY: toggles EFER.NXE only (MSR 0xC0000080); no live mapping of
    // the kernel uses XD while it is clear (see mm.rs).
    unsafe {
        let (lo, hi): (u32, u32);
        core::arch::asm!("rdmsr", in("ecx") 0xc000_0080u32, out("eax") lo, out("edx") hi);
        let mut v = (hi as u64) << 32 | lo as u64;
        if on {
            v |= guest_abi::paging::EFER_NXE
        } else {
            v &= !guest_abi::paging::EFER_NXE
        }
        core::arch::asm!("wrmsr", in("ecx") 0xc000_0080u32, in("eax") v as u32, in("edx") (v >> 32) as u32);
        mmu::note_guest_efer(v);
        v
    }
}

/// Tell the VMM the paging controls changed (shadow mode re-reads them,
/// with our CR0 and EFER: the vCPU's own CR0.WP and EFER.NXE stay set in
/// shadow mode, so reading them back would not tell).
fn controls_changed(cr0: u64, efer: u64) {
    mmu::note_guest_cr0(cr0);
    if mmu::is_shadow() {
        hypercall::call(guest_abi::hypercall::FLUSH_TLB, cr0, efer, 0, 0);
    }
    // SAFETY: reloading the current root (a TLB flush).
    unsafe { mmu::load_cr3(mmu::read_cr3()) };
}

/// Run one probe of the target page: `access` 0 read, 1 write, 2 fetch;
/// returns whether it faulted and the (guest) error code.
fn probe(access: u64, user: bool) -> Result<(bool, u64), &'static str> {
    mmu::invlpg(TARGET);
    let stub = match access {
        0 => STUB,
        1 => STUB + 8,
        _ => STUB + 16,
    };
    PROBE_VECTOR.store(0, Ordering::Relaxed);
    PROBE_ACTIVE.store(1, Ordering::Relaxed);
    // SAFETY: the probe ends in an exception the handler turns into a
    // return to probe_return, which restores the callee-saved registers.
    unsafe { probe_run(TARGET, stub, user as u64) };
    PROBE_ACTIVE.store(0, Ordering::Relaxed);
    let vec = PROBE_VECTOR.load(Ordering::Relaxed);
    if vec != 1 + 14 && vec != 1 + 6 {
        return Err("a probe ended in an unexpected exception");
    }
    let faulted = vec == 1 + 14;
    Ok((faulted, if faulted { PROBE_EC.load(Ordering::Relaxed) & 0x1f } else { 0 }))
}

/// Run the matrix, report it, and return the number of cases.
pub fn run() -> Result<usize, &'static str> {
    enter_user(0)?;
    // Stub page and target frame; the target's PDE/PTE are rewritten per case.
    let (stub_frame, target_frame, pde_at, pte_at) = mm::with(|m| {
        m.ctx(|cx, _, user| -> Result<(Gpa, Gpa, Gpa, Gpa), &'static str> {
            let a = user.as_mut().ok_or("no user space")?;
            let sf = cx.frames.alloc_frame().ok_or("out of memory")?.addr();
            let tf = cx.frames.alloc_frame().ok_or("out of memory")?.addr();
            cx.mem.zero_frame(guest_mm::phys::Pfn::containing(sf));
            cx.mem.zero_frame(guest_mm::phys::Pfn::containing(tf));
            write_bytes(cx.mem, sf, &STUB_CODE);
            write_bytes(cx.mem, tf, &[0x0f, 0x0b]); // ud2
            let code = PteFlags::USER | PteFlags::ACCESSED | PteFlags::DIRTY;
            let sp = Page::<Size4KiB>::from_start_address(Gva(STUB)).map_err(|_| "page")?;
            let tp = Page::<Size4KiB>::from_start_address(Gva(TARGET)).map_err(|_| "page")?;
            let sfr = PhysFrame::<Size4KiB>::from_start_address(sf).map_err(|_| "frame")?;
            let tfr = PhysFrame::<Size4KiB>::from_start_address(tf).map_err(|_| "frame")?;
            a.page_table_mut().map(cx.mem, &mut cx.frames, sp, sfr, code).map_err(|e| e.as_str())?;
            a.page_table_mut().map(cx.mem, &mut cx.frames, tp, tfr, code).map_err(|e| e.as_str())?;
            // Find the target's PDE and PTE by walking the tables.
            let root = a.page_table().root().addr().0;
            let idx = |lvl: u32| (TARGET >> (12 + 9 * (lvl - 1))) & 0x1ff;
            let pdpt = cx.mem.read_u64(Gpa(root + idx(4) * 8)) & guest_abi::paging::ADDR_MASK;
            let pd = cx.mem.read_u64(Gpa(pdpt + idx(3) * 8)) & guest_abi::paging::ADDR_MASK;
            let pde_at = Gpa(pd + idx(2) * 8);
            let pt = cx.mem.read_u64(pde_at) & guest_abi::paging::ADDR_MASK;
            Ok((sf, tf, pde_at, Gpa(pt + idx(1) * 8)))
        })
    })
    .ok_or("memory manager not initialised")??;
    let mem = mm::with(|m| *m.buddy.mem()).ok_or("memory manager not initialised")?;
    let pde_base = mem.read_u64(pde_at) & guest_abi::paging::ADDR_MASK;
    // A 2 MiB-aligned block for the PS = 1 cases, starting with ud2.
    let big = mm::with(|m| m.buddy.alloc(9, guest_mm::buddy::ZonePref::Normal))
        .flatten()
        .ok_or("no 2 MiB block for the large-page cases")?;
    write_bytes(&mem, big.addr(), &[0x0f, 0x0b]);
    let flag_word = |combo: u64, rsvd: u64| {
        let bits = [1u64, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 63, rsvd];
        bits.iter().enumerate().filter(|(b, _)| combo & (1 << b) != 0).fold(0, |acc, (_, bit)| acc | bit)
    };
    let mut case = 0usize;
    let mut record = |rec: u16| {
        // SAFETY: single-threaded; `case` < CASES by construction.
        unsafe { (*core::ptr::addr_of_mut!(RECORDS))[case] = rec };
        case += 1;
    };
    for nxe in [true, false] {
        let efer = set_nxe(nxe);
        for wp in [true, false] {
            let cr0 = set_wp(wp);
            controls_changed(cr0, efer);
            for pde_combo in 0..4u64 {
                let pde = pde_base | 1 | ((pde_combo & 1) << 1) | ((pde_combo >> 1) << 2);
                for pte_combo in 0..128u64 {
                    let pte = target_frame.0 | flag_word(pte_combo, RSVD_BIT);
                    for access in 0..3u64 {
                        for user in [false, true] {
                            // The PDE is rewritten once per PTE combination
                            // (its A bit then records the first access); the
                            // PTE every time, so in shadow mode most cases go
                            // through the in-place update of a live shadow PT.
                            if access == 0 && !user {
                                mem.write_u64(pde_at, pde);
                            }
                            mem.write_u64(pte_at, pte);
                            let (faulted, ec) = probe(access, user)?;
                            let (pte_after, pde_after) = (mem.read_u64(pte_at), mem.read_u64(pde_at));
                            record(
                                u16::from(faulted)
                                    | (ec as u16) << 1
                                    | (((pte_after >> 5) & 1) as u16) << 6
                                    | (((pte_after >> 6) & 1) as u16) << 7
                                    | (((pde_after >> 5) & 1) as u16) << 8,
                            );
                        }
                    }
                }
            }
            // 2 MiB pages: the PDE itself is the leaf under test.
            for leaf_combo in 0..128u64 {
                let pde = big.addr().0 | guest_abi::paging::PS | flag_word(leaf_combo, RSVD_2M);
                for access in 0..3u64 {
                    for user in [false, true] {
                        mem.write_u64(pde_at, pde);
                        let (faulted, ec) = probe(access, user)?;
                        let after = mem.read_u64(pde_at);
                        record(
                            u16::from(faulted)
                                | (ec as u16) << 1
                                | (((after >> 5) & 1) as u16) << 6
                                | (((after >> 6) & 1) as u16) << 7,
                        );
                    }
                }
            }
        }
    }
    // Pairs: two accesses to one leaf with nothing written in between, so
    // the second meets whatever shadow leaf the first left behind (with
    // CR0.WP = 0 a supervisor write makes a writable supervisor-only leaf
    // of a read-only user page, which a user access or a fetch must not
    // inherit). Record as above for the second access, plus bit 9: the
    // first access faulted.
    for nxe in [true, false] {
        let efer = set_nxe(nxe);
        for wp in [true, false] {
            let cr0 = set_wp(wp);
            controls_changed(cr0, efer);
            mem.write_u64(pde_at, pde_base | 0x27); // P RW US A: the PT again
            for leaf_combo in 0..8u64 {
                let mut pte = target_frame.0 | 1 | (1 << 5); // P A
                pte |= (leaf_combo & 1) << 1 | (leaf_combo >> 1 & 1) << 2 | (leaf_combo >> 2 & 1) << 63;
                for first in 0..6u64 {
                    for second in 0..6u64 {
                        mem.write_u64(pte_at, pte);
                        let (f1, _) = probe(first / 2, first % 2 == 1)?;
                        let (faulted, ec) = probe(second / 2, second % 2 == 1)?;
                        let (pte_after, pde_after) = (mem.read_u64(pte_at), mem.read_u64(pde_at));
                        record(
                            u16::from(faulted)
                                | (ec as u16) << 1
                                | (((pte_after >> 5) & 1) as u16) << 6
                                | (((pte_after >> 6) & 1) as u16) << 7
                                | (((pde_after >> 5) & 1) as u16) << 8
                                | u16::from(f1) << 9,
                        );
                    }
                }
            }
        }
    }
    let efer = set_nxe(true);
    let cr0 = set_wp(true);
    controls_changed(cr0, efer);
    // Restore a sane target mapping so the address space tears down cleanly.
    mem.write_u64(pde_at, pde_base | 0x27);
    mem.write_u64(pte_at, 0);
    mmu::invlpg(TARGET);
    let _ = stub_frame;
    mm::with(|m| m.buddy.free(big, 9)).transpose().map_err(|e| e.as_str())?;
    leave_user()?;
    report(case)?;
    kprintln!("access matrix: {} cases", case);
    Ok(case)
}

/// Records per `REPORT` (header + chunk header + records ≤ 4 KiB).
const CHUNK: usize = 2000;

fn report(cases: usize) -> Result<(), &'static str> {
    // SAFETY: single-threaded; the probes are done, nothing writes RECORDS.
    let all = unsafe { &*core::ptr::addr_of!(RECORDS) };
    report_records(&all[..cases])
}

/// Send `records` as `MATRIX` reports, numbered from 0.
fn report_records(all: &[u16]) -> Result<(), &'static str> {
    let mut first = 0;
    while first < all.len() {
        let n = (all.len() - first).min(CHUNK);
        let chunk = MatrixChunk { first: first as u32, count: n as u32 };
        let records = crate::report::bytes_of(&all[first..first + n]);
        crate::report::send(kind::MATRIX, &[crate::report::bytes_of(&[chunk]), records])?;
        first += n;
    }
    Ok(())
}

// ---- SMEP, SMAP, RFLAGS.AC and implicit accesses (issue 22, item 5) ----
//
// These rows need CR4.SMEP / CR4.SMAP, which only some hosts offer the
// guest (the nested hosts' QEMU EPYC model does; the development hosts'
// KVM does not). They run as the in-guest test `matrix::smep_smap_rows`,
// send their records as `MATRIX` reports, and `vmm test` with several MMU
// modes compares every mode's records with the first mode's (ept: the
// host's MMU, the reference). Where CPUID lacks both features the test
// passes saying it skipped; with one of them, only its rows run.
//
// Per (SMEP, SMAP, CR0.WP, RFLAGS.AC) block, EFER.NXE = 1: 8 leaves (RW,
// US, NX; P, A and D set) × 3 accesses × 2 privileges, then the implicit
// rows: a supervisor-mode load of a data-segment descriptor from a GDT
// whose second page is the target page (US clear, then set) — an implicit
// supervisor access, which SMAP checks whatever RFLAGS.AC says (Intel SDM
// vol. 3 §4.6.1). Supervisor probes run from a kernel stub (a supervisor
// fetch from the user stub page would itself fault under SMEP); AC is set
// for the supervisor probes of an AC = 1 block only (user code runs with
// AC = 0: with CR0.AM it would enable alignment checks).
// Record bits as above, bit 8 always 0. Block order: SMEP, SMAP each off
// then on (only the values CPUID allows), WP on then off, AC off then on
// (on only with SMAP available).

/// Records per (SMEP, SMAP, WP, AC) block: 8 leaves × 6 probes + 2 implicit.
pub const SMEP_BLOCK: usize = 8 * 6 + 2;
/// The most SMEP/SMAP records: 4 CR4 combinations × 2 WP × 2 AC.
const SMEP_CASES: usize = 16 * SMEP_BLOCK;
/// Index of the data-segment descriptor the implicit probe loads: it lies
/// 16 bytes into the target page (after the `ud2` and the write probe's
/// scratch word), the GDT's second page.
const IMPLICIT_INDEX: u64 = 512 + 2;
/// A flat, present, writable ring-0 data segment, accessed bit set (so
/// the CPU never writes the descriptor back).
const FLAT_DATA: u64 = 0x00cf_9300_0000_ffff;

static mut SMEP_RECORDS: [u16; SMEP_CASES] = [0; SMEP_CASES];

core::arch::global_asm!(
    ".section .text",
    ".balign 8",
    // The supervisor twin of the user stub page: read at +0, write at +8,
    // fetch at +16 (same bytes as STUB_CODE).
    ".global smep_kstub",
    "smep_kstub:",
    ".byte 0x48, 0x8b, 0x07, 0x0f, 0x0b, 0x90, 0x90, 0x90",
    ".byte 0x48, 0x89, 0x47, 0x08, 0x0f, 0x0b, 0x90, 0x90",
    ".byte 0xff, 0xe7",
    // Load DS from selector rdi (an implicit read of its descriptor).
    ".global implicit_kstub",
    "implicit_kstub:",
    "    mov ds, di",
    "    ud2",
);

unsafe extern "C" {
    fn smep_kstub();
    fn implicit_kstub();
}

/// Whether the CPU offers SMEP and SMAP: CPUID.(EAX=7,ECX=0):EBX bits 7
/// and 20 (Intel SDM vol. 2A, CPUID).
pub fn smep_smap_supported() -> (bool, bool) {
    // Leaf 0 gives the highest basic leaf, checked before leaf 7 is trusted.
    let max = core::arch::x86_64::__cpuid(0).eax;
    if max < 7 {
        return (false, false);
    }
    let ebx = core::arch::x86_64::__cpuid_count(7, 0).ebx;
    (ebx & (1 << 7) != 0, ebx & (1 << 20) != 0)
}

/// Set CR4.SMEP and CR4.SMAP (bits 20, 21); returns nothing: the VMM reads
/// CR4 from the vCPU when told the controls changed.
fn set_smep_smap(smep: bool, smap: bool) {
    // SAFETY: toggles CR4.SMEP/SMAP only, each only when CPUID offers it
    // (callers); no kernel code or data lives in user pages, and the
    // kernel touches user memory only in these probes.
    unsafe {
        let mut cr4: u64;
        core::arch::asm!("mov {}, cr4", out(reg) cr4);
        cr4 &= !(3 << 20);
        cr4 |= u64::from(smep) << 20 | u64::from(smap) << 21;
        core::arch::asm!("mov cr4, {}", in(reg) cr4);
    }
}

/// One probe of the target page from `stub` (ring 3 when `user`), with
/// RFLAGS.AC = `ac` for a supervisor probe; the exception handler clears
/// AC on the way back (`end_probe`).
fn probe_at(stub: u64, arg: u64, user: bool, ac: bool) -> Result<(bool, u64), &'static str> {
    mmu::invlpg(TARGET);
    mmu::invlpg(TARGET - 4096);
    PROBE_VECTOR.store(0, Ordering::Relaxed);
    PROBE_ACTIVE.store(1, Ordering::Relaxed);
    if ac && !user {
        // SAFETY: sets RFLAGS.AC (bit 18) only; nothing between here and
        // the probe's exception relies on it being clear.
        unsafe { core::arch::asm!("pushfq", "or qword ptr [rsp], 0x40000", "popfq") };
    }
    // SAFETY: as in `probe`.
    unsafe { probe_run(arg, stub, user as u64) };
    PROBE_ACTIVE.store(0, Ordering::Relaxed);
    let vec = PROBE_VECTOR.load(Ordering::Relaxed);
    if vec != 1 + 14 && vec != 1 + 6 {
        return Err("an SMEP/SMAP probe ended in an unexpected exception");
    }
    let faulted = vec == 1 + 14;
    Ok((faulted, if faulted { PROBE_EC.load(Ordering::Relaxed) & 0x1f } else { 0 }))
}

/// The saved GDTR: limit, then base.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Gdtr {
    limit: u16,
    base: u64,
}

fn sgdt() -> Gdtr {
    let mut g = Gdtr::default();
    // SAFETY: stores the 10-byte GDTR into `g`.
    unsafe { core::arch::asm!("sgdt [{}]", in(reg) core::ptr::addr_of_mut!(g), options(nostack)) };
    g
}

/// # Safety
/// `g` must describe a GDT whose kernel code, data and TSS descriptors are
/// those of the running kernel.
unsafe fn lgdt(g: &Gdtr) {
    // SAFETY: the caller's contract.
    unsafe { core::arch::asm!("lgdt [{}]", in(reg) g as *const Gdtr, options(nostack)) };
}

/// Run the SMEP/SMAP rows and report them; the number of records, or
/// `None` when CPUID has neither feature.
pub fn run_smep_smap() -> Result<Option<usize>, &'static str> {
    let (has_smep, has_smap) = smep_smap_supported();
    if !has_smep && !has_smap {
        return Ok(None);
    }
    enter_user(0)?;
    // The target page (PTE rewritten per case) and, just below it, a
    // supervisor page holding a copy of the GDT: the two pages form a GDT
    // whose descriptor IMPLICIT_INDEX lies in the target page.
    let gdt_va = TARGET - 4096;
    let (target_frame, pde_at, pte_at) = mm::with(|m| {
        m.ctx(|cx, _, user| -> Result<(Gpa, Gpa, Gpa), &'static str> {
            let a = user.as_mut().ok_or("no user space")?;
            let sf = cx.frames.alloc_frame().ok_or("out of memory")?.addr();
            let tf = cx.frames.alloc_frame().ok_or("out of memory")?.addr();
            let gf = cx.frames.alloc_frame().ok_or("out of memory")?.addr();
            for f in [sf, tf, gf] {
                cx.mem.zero_frame(guest_mm::phys::Pfn::containing(f));
            }
            write_bytes(cx.mem, sf, &STUB_CODE);
            write_bytes(cx.mem, tf, &[0x0f, 0x0b]); // ud2
            cx.mem.write_u64(Gpa(tf.0 + 8 * (IMPLICIT_INDEX - 512)), FLAT_DATA);
            let g = sgdt();
            let (base, len) = (g.base, u64::from(g.limit) + 1);
            if len > 4096 {
                return Err("the kernel's GDT does not fit one page");
            }
            for off in (0..len).step_by(8) {
                // SAFETY: the live GDT, `len` bytes at `base`, mapped by the kernel.
                let w = unsafe { ((base + off) as *const u64).read_volatile() };
                cx.mem.write_u64(Gpa(gf.0 + off), w);
            }
            let code = PteFlags::USER | PteFlags::ACCESSED | PteFlags::DIRTY;
            let sup = PteFlags::WRITABLE | PteFlags::ACCESSED | PteFlags::DIRTY;
            let page = |va: u64| Page::<Size4KiB>::from_start_address(Gva(va)).map_err(|_| "page");
            let frame = |pa: Gpa| PhysFrame::<Size4KiB>::from_start_address(pa).map_err(|_| "frame");
            let pt = a.page_table_mut();
            pt.map(cx.mem, &mut cx.frames, page(STUB)?, frame(sf)?, code).map_err(|e| e.as_str())?;
            pt.map(cx.mem, &mut cx.frames, page(TARGET)?, frame(tf)?, code).map_err(|e| e.as_str())?;
            pt.map(cx.mem, &mut cx.frames, page(gdt_va)?, frame(gf)?, sup).map_err(|e| e.as_str())?;
            let root = a.page_table().root().addr().0;
            let idx = |lvl: u32| (TARGET >> (12 + 9 * (lvl - 1))) & 0x1ff;
            let pdpt = cx.mem.read_u64(Gpa(root + idx(4) * 8)) & guest_abi::paging::ADDR_MASK;
            let pd = cx.mem.read_u64(Gpa(pdpt + idx(3) * 8)) & guest_abi::paging::ADDR_MASK;
            let pde_at = Gpa(pd + idx(2) * 8);
            let pt = cx.mem.read_u64(pde_at) & guest_abi::paging::ADDR_MASK;
            Ok((tf, pde_at, Gpa(pt + idx(1) * 8)))
        })
    })
    .ok_or("memory manager not initialised")??;
    let mem = mm::with(|m| *m.buddy.mem()).ok_or("memory manager not initialised")?;
    let pde_base = mem.read_u64(pde_at) & guest_abi::paging::ADDR_MASK;
    mem.write_u64(pde_at, pde_base | 0x27); // P RW US A
    let kernel_gdt = sgdt();
    let probe_gdt = Gdtr { limit: (4096 + 8 * (IMPLICIT_INDEX - 512) + 7) as u16, base: gdt_va };
    let kstub = smep_kstub as *const () as u64;
    let efer = set_nxe(true);
    let mut n = 0usize;
    let mut record = |rec: u16| {
        // SAFETY: single-threaded; n < SMEP_CASES: at most 16 blocks.
        unsafe { (*core::ptr::addr_of_mut!(SMEP_RECORDS))[n] = rec };
        n += 1;
    };
    let bits = |faulted: bool, ec: u64, after: u64| {
        u16::from(faulted) | (ec as u16) << 1 | (((after >> 5) & 1) as u16) << 6 | (((after >> 6) & 1) as u16) << 7
    };
    for smep in [false, true].into_iter().filter(|&s| !s || has_smep) {
        for smap in [false, true].into_iter().filter(|&s| !s || has_smap) {
            set_smep_smap(smep, smap);
            for wp in [true, false] {
                let cr0 = set_wp(wp);
                controls_changed(cr0, efer);
                for ac in [false, true].into_iter().filter(|&a| !a || has_smap) {
                    for leaf in 0..8u64 {
                        let pte = target_frame.0
                            | 1
                            | 1 << 5
                            | 1 << 6
                            | (leaf & 1) << 1
                            | (leaf >> 1 & 1) << 2
                            | (leaf >> 2 & 1) << 63;
                        for access in 0..3u64 {
                            for user in [false, true] {
                                mem.write_u64(pte_at, pte);
                                let stub = if user { STUB } else { kstub } + 8 * access;
                                let (faulted, ec) = probe_at(stub, TARGET, user, ac)?;
                                record(bits(faulted, ec, mem.read_u64(pte_at)));
                            }
                        }
                    }
                    // Implicit: the descriptor load reads the target page
                    // as a supervisor-mode access, whatever AC says.
                    for us in [false, true] {
                        let pte = target_frame.0 | 1 | 1 << 1 | 1 << 5 | 1 << 6 | u64::from(us) << 2;
                        mem.write_u64(pte_at, pte);
                        let ds: u16;
                        // SAFETY: reads DS only.
                        unsafe { core::arch::asm!("mov {0:x}, ds", out(reg) ds) };
                        // Touch the probe GDT's first page (a supervisor
                        // page) first: in shadow and pv mode its shadow
                        // entry is filled on a fault, and a fault during
                        // exception delivery, which reads the code-segment
                        // descriptor there, could not be (a double fault).
                        // SAFETY: `gdt_va` is mapped readable (above).
                        let _ = unsafe { (gdt_va as *const u64).read_volatile() };
                        // SAFETY: the probe GDT's first page is a copy of
                        // the kernel's GDT (same code, data and TSS
                        // descriptors), mapped supervisor and writable.
                        unsafe { lgdt(&probe_gdt) };
                        let r = probe_at(implicit_kstub as *const () as u64, IMPLICIT_INDEX * 8, false, ac);
                        // SAFETY: back to the kernel's own GDT and DS.
                        unsafe {
                            lgdt(&kernel_gdt);
                            core::arch::asm!("mov ds, {0:x}", in(reg) ds);
                        }
                        let (faulted, ec) = r?;
                        record(bits(faulted, ec, mem.read_u64(pte_at)));
                    }
                }
            }
        }
    }
    set_smep_smap(false, false);
    let cr0 = set_wp(true);
    controls_changed(cr0, efer);
    mem.write_u64(pte_at, 0);
    mmu::invlpg(TARGET);
    leave_user()?;
    // SAFETY: single-threaded; the probes are done.
    let all = unsafe { &*core::ptr::addr_of!(SMEP_RECORDS) };
    report_records(&all[..n])?;
    Ok(Some(n))
}

/// The in-guest test `matrix::smep_smap_rows`: run the rows CPUID allows
/// and report them (`vmm test` compares the modes' records); say so when
/// CPUID has neither feature.
pub fn smep_smap_rows() -> super::TestResult {
    let (smep, smap) = smep_smap_supported();
    if crate::cmdline::value(crate::boot::cmdline(), "hostmmu") == Some("kvm-pvm") && (smep || smap) {
        // The reference would be wrong (cli::guest_tests says how).
        super::note(
            "skipped: kvm_pvm's emulator faults supervisor fetches from user pages under SMAP (not a reference)",
        );
        return Ok(());
    }
    match run_smep_smap()? {
        None => super::note("skipped: CPUID lacks SMEP and SMAP"),
        Some(n) => {
            kprintln!("SMEP/SMAP rows: {} cases", n);
            if !smep {
                super::note("SMAP rows only: CPUID lacks SMEP");
            } else if !smap {
                super::note("SMEP rows only: CPUID lacks SMAP");
            }
        }
    }
    Ok(())
}
