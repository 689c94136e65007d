//! Deliberate failures, selected with `crash=MODE` on the command line, so
//! the VMM's handling of each can be tested end to end:
//!
//! | mode | what happens | what the VMM must do |
//! | --- | --- | --- |
//! | `pf` | read of an unmapped address | the guest's handler prints `#PF` with `cr2`, fails |
//! | `ud` | `ud2` | the handler prints `#UD`, fails |
//! | `panic` | `panic!` | the panic handler prints location and message, fails |
//! | `sse` | an SSE instruction | emulating host: internal error with the bytes; else `#UD` |
//! | `triple` | `ud2` with an empty IDT | `KVM_EXIT_SHUTDOWN`: triple fault |
//! | `hang` | an endless loop | `--timeout` ends it |
//! | `hypercall` | nonsense hypercalls | each gets an error result; the guest checks them and succeeds |
//! | `storm` | random hypercalls and random page-table writes | survive (shadow mode: every write traps) |
//! | `hlt` | `cli; hlt` | "halted with interrupts disabled" (exit 4) |
//! | `sti-hlt` | `sti; hlt` | "halted with interrupts enabled", waiting forever (exit 4) |
//! | `report-flood` | [`REPORT_FLOOD`] records of the maximum length | keep a bounded number, refuse the rest, say so once |
//! | `explain-flood` | [`EXPLAIN_FLOOD`] `EXPLAIN` hypercalls | answer all, print a bounded number, say so once |
//! | `chatter` | print lines forever | `--timeout` ends it even when stdout is blocked |
//! | `scribble` | shadow mode: `mov cr3` to tables of our own that map the shadow pool, garbage over the pool, back through `LOAD_CR3`, then probe | repair the pool: the guest succeeds only if the shadow maps exactly what its tables allow |
//! | `sidt-zone` / `sgdt-zone` / `fxsave-zone` | store the IDTR / GDTR / FPU state into the page-table zone (read-only in shadow mode) | the host cannot emulate these: the VMM reports the stop (`fxsave`: an emulation failure; `sidt`/`sgdt`: KVM retries them without exiting, and the VMM's no-progress check names them), exit 4 |
//! | `lgdt-unbacked` | `lgdt` of a descriptor in unbacked guest-physical memory (beyond RAM, identity-mapped by the boot tables) | the host's emulator retries it forever: the VMM sees no progress and ends the run (exit 4) naming the instruction |
//! | `pv-area-zone` / `pv-area-boot-tables` | pv mode: `PV_SETUP` with an area in the page-table zone / over the VMM's boot tables (0xa000) | refuse it with `ERR_OVERLAP` (the VMM's writes to the area would change page tables behind the shadow); the guest succeeds only if refused |
//! | `pv-bad-queue` | pv mode: a write-queue entry outside the page-table zone before each sync point (`LOAD_CR3`, `SHADOW_FAULT`, `FLUSH_TLB`, `PV_FLUSH`) | answer each with the batch error (nothing else done), warn under its own name and budget; the guest succeeds only if all four are reported |
//! | `wp-off-silent` | shadow and pv mode: clear CR0.WP with `mov cr0` (no `FLUSH_TLB`), write a clean read-only page, then (a) set WP again before the next exit, (b) exit with WP still clear | hardware sets D in the guest entry: the VMM must too (from the D bit the write left in the shadow leaf); the guest succeeds only if both entries end dirty |
//! | `ap-triple` | CPU 1 (needs `--vcpus` ≥ 2) loads an empty IDT and executes `ud2` | end the whole VM at once: "vCPU 1: triple fault", every thread joined |
//! | `smp-hang` | every CPU spins in ring 0 for good | `--timeout` ends it, every vCPU thread kicked and joined |
//! | `livelock` | the same `SHADOW_FAULT` twice with nothing changed | shadow mode: a one-line livelock error, exit 4 (ept mode: both refused, the guest fails) |

use crate::{arch, console, hypercall, kprintln};
use guest_abi::hypercall as hc;

/// The crash modes `crash=` accepts, one per arm of [`run`]'s match: the
/// command-line check refuses any other (keep the two together).
pub const MODES: &[&str] = &[
    "pf",
    "ud",
    "panic",
    "sse",
    "triple",
    "hang",
    "hypercall",
    "storm",
    "hlt",
    "sti-hlt",
    "report-flood",
    "explain-flood",
    "chatter",
    "scribble",
    "sidt-zone",
    "sgdt-zone",
    "fxsave-zone",
    "livelock",
    "lgdt-unbacked",
    "pv-area-zone",
    "pv-area-boot-tables",
    "pv-bad-queue",
    "wp-off-silent",
    "ap-triple",
    "smp-hang",
];

/// Run crash mode `mode`; returns only for modes that end in success.
pub fn run(mode: &str) {
    // The modes test the VMM's shadow: have one before they start.
    arch::mmu::start_shadowing();
    match mode {
        "pf" => {
            // An address in the non-canonical-free, unmapped lower half
            // above what the boot tables identity-map.
            let p = 0x0000_7fff_dead_b000 as *const u64;
            // SAFETY: deliberately faults; the #PF handler ends the VM.
            let v = unsafe { core::ptr::read_volatile(p) };
            kprintln!("read {:#x} without a fault", v);
        }
        // SAFETY: `ud2` raises #UD, handled by the IDT.
        "ud" => unsafe { core::arch::asm!("ud2", options(nomem, nostack)) },
        "panic" => panic!("deliberate panic (crash=panic)"),
        // SAFETY: deliberately executes SSE with CR4.OSFXSR clear; the VMM
        // ends the VM (emulation failure) or #UD ends it.
        "sse" => unsafe { deliberate_sse_instruction() },
        "triple" => {
            arch::idt::load_empty();
            // SAFETY: with an empty IDT the #UD cannot be delivered: #GP,
            // then #DF, then a triple fault (shutdown).
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) }
        }
        "hang" => loop {
            core::hint::spin_loop();
        },
        "ap-triple" => {
            // CPU 1 triple-faults while CPU 0 waits for it: the VMM must
            // end the whole VM at once and name vCPU 1.
            if crate::mm_up() < 2 {
                kprintln!("crash=ap-triple needs at least two vCPUs");
                arch::exit(guest_abi::ports::EXIT_FAILURE);
            }
            fn triple_on_cpu1(_: u64) -> u64 {
                if crate::arch::percpu::cpu_id() == 1 {
                    arch::disable_interrupts();
                    crate::arch::idt::load_empty();
                    // SAFETY: deliberately unhandled: a triple fault.
                    unsafe { core::arch::asm!("ud2") };
                }
                0
            }
            crate::smp::run_on_all(triple_on_cpu1, 0);
            kprintln!("CPU 1 came back from a triple fault");
        }
        "smp-hang" => {
            // Every CPU spins in ring 0 for good: --timeout must still end
            // the VM and join every vCPU thread.
            crate::mm_up();
            fn spin(_: u64) -> u64 {
                loop {
                    core::hint::spin_loop();
                }
            }
            crate::smp::run_on_all(spin, 0);
        }
        "hypercall" => {
            check_hypercall_errors();
            return;
        }
        "storm" => {
            storm();
            return;
        }
        // SAFETY: halts with interrupts off; nothing can wake the vCPU.
        "hlt" => unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) },
        // SAFETY: halts with interrupts on; no IDT entry beyond the
        // exceptions is needed because no device raises an interrupt.
        "sti-hlt" => unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) },
        "report-flood" => {
            report_flood();
            return;
        }
        "explain-flood" => {
            explain_flood();
            return;
        }
        "chatter" => loop {
            console::println("chatter: the guest prints until the timeout ends it");
        },
        "scribble" => scribble(),
        "sidt-zone" | "sgdt-zone" | "fxsave-zone" => store_into_zone(mode),
        "lgdt-unbacked" => lgdt_unbacked(),
        "pv-area-zone" | "pv-area-boot-tables" => pv_area_over_tables(mode),
        "pv-bad-queue" => pv_bad_queue(),
        "wp-off-silent" => wp_off_silent(),
        "livelock" => {
            // A fault on a mapped kernel address, reported twice in a row as
            // if the vCPU kept faulting after the VMM fixed it.
            let va = run as *const () as u64;
            for _ in 0..2 {
                let r = hypercall::call(hc::SHADOW_FAULT, va, 0, 0, 0);
                kprintln!("SHADOW_FAULT answered {:#x}", r);
            }
        }
        _ => {
            kprintln!("unknown crash mode \"{}\"", mode);
            arch::exit(guest_abi::ports::EXIT_FAILURE);
        }
    }
    console::println("crash mode did not crash");
    arch::exit(guest_abi::ports::EXIT_FAILURE);
}

/// Records `crash=report-flood` sends: ten times what the VMM keeps (4 MiB of
/// records, vmm/src/limits.rs).
pub const REPORT_FLOOD: u64 = 10 * 1024;

/// `EXPLAIN` calls `crash=explain-flood` makes: ten times what the VMM prints.
pub const EXPLAIN_FLOOD: u64 = 10 * 64;

/// Send [`REPORT_FLOOD`] test records of the maximum length (sent once,
/// then re-sent from the same buffer: no copying in the guest); print how
/// many the VMM accepted and refused.
fn report_flood() {
    use guest_abi::report::{MAX_REPORT_LEN, ReportHeader, TestRecord, kind};
    static FILL: [u8; MAX_REPORT_LEN as usize] = [b'x'; MAX_REPORT_LEN as usize];
    let header = core::mem::size_of::<ReportHeader>();
    let name = b"report-flood";
    let room = MAX_REPORT_LEN as usize - header - core::mem::size_of::<TestRecord>() - name.len();
    let rec = TestRecord { passed: 1, name_len: name.len() as u32, msg_len: room as u32, reserved: 0, cycles: 0 };
    let recs = [rec];
    let parts: [&[u8]; 3] = [crate::report::bytes_of(&recs), name, &FILL[..room]];
    let (accepted, refused) = crate::report::send_repeatedly(kind::TEST, &parts, REPORT_FLOOD);
    kprintln!("report flood: {} sent, {} accepted, {} refused", REPORT_FLOOD, accepted, refused);
}

/// Ask the VMM to explain one kernel address [`EXPLAIN_FLOOD`] times; every
/// answer must be the same GPA.
fn explain_flood() {
    let va = explain_flood as fn() as usize as u64;
    let want = va - guest_abi::KERNEL_VMA;
    let mut wrong = 0u64;
    for _ in 0..EXPLAIN_FLOOD {
        wrong += u64::from(hypercall::call(hc::EXPLAIN, va, 0, 0, 0) != want);
    }
    kprintln!("explain flood: {} calls, {} wrong answers", EXPLAIN_FLOOD, wrong);
    if wrong != 0 {
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
}

// The kernel's only SSE instruction, in a function of its own so that
// tests/no_sse.rs can allow exactly this one and no other.
core::arch::global_asm!(
    ".section .text",
    ".global deliberate_sse_instruction",
    "deliberate_sse_instruction:",
    "    pxor xmm0, xmm0",
    "    ret",
);

unsafe extern "C" {
    fn deliberate_sse_instruction();
}

/// Send hypercalls the VMM must refuse, and check that it does.
fn check_hypercall_errors() {
    let cases: [(&str, u32, u64, u64, u64); 5] = [
        ("unknown number", 0xdead, 0, 0, 0),
        ("report outside RAM", hc::REPORT, 1 << 50, 64, hc::ERR_FAULT),
        ("report wrapping around", hc::REPORT, u64::MAX - 8, 64, hc::ERR_FAULT),
        ("report too long", hc::REPORT, 0x1000, 1 << 20, hc::ERR_INVALID),
        ("report not a record", hc::REPORT, 0x0, 64, hc::ERR_INVALID),
    ];
    let mut failed = false;
    for (name, nr, a0, a1, want) in cases {
        let got = hypercall::call(nr, a0, a1, 0, 0);
        let want = if want == 0 { hc::ERR_UNKNOWN } else { want };
        if got == want {
            kprintln!("hypercall check: {}: refused ok", name);
        } else {
            kprintln!("hypercall check: {}: got {:#x}, want {:#x}", name, got, want);
            failed = true;
        }
    }
    // PV_HARVEST's arguments (pv mode; the other modes do not offer it).
    let zone = crate::boot::info().pt_zone.start;
    let user = crate::ktest::vm_suites::USER_BASE;
    let harvest: [(&str, u64, u64, u64, u64); 6] = [
        ("harvest of no page", user, 0, 0x1000, hc::ERR_INVALID),
        ("harvest too wide", user, guest_abi::pv::HARVEST_PAGES + 1, 0x1000, hc::ERR_INVALID),
        ("harvest unaligned", user + 8, 64, 0x1000, hc::ERR_INVALID),
        ("harvest bitmap outside RAM", user, 64, 1 << 50, hc::ERR_FAULT),
        ("harvest bitmap wrapping around", user, 2048, u64::MAX - 8, hc::ERR_FAULT),
        ("harvest bitmap in the page-table zone", user, 64, zone, hc::ERR_FAULT),
    ];
    for (name, base, pages, bitmap, want) in harvest {
        let got = hypercall::call(hc::PV_HARVEST, base, pages, bitmap, 0);
        let want = if arch::mmu::is_pv() { want } else { hc::ERR_UNAVAILABLE };
        if got == want {
            kprintln!("hypercall check: {}: refused ok", name);
        } else {
            kprintln!("hypercall check: {}: got {:#x}, want {:#x}", name, got, want);
            failed = true;
        }
    }
    let t0 = hypercall::now_ns();
    let t1 = hypercall::now_ns();
    if hc::is_error(t0) || t1 < t0 {
        kprintln!("hypercall check: NOW not monotonic: {} then {}", t0, t1);
        failed = true;
    }
    if failed {
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    console::println("hypercall checks passed");
}

/// A storm of random hypercalls (every number but `LOAD_CR3`, which would
/// move the vCPU onto garbage tables) and random page-table writes: to
/// unlinked page-table pages, and random mappings in a live address space.
/// The VMM must answer or absorb every one of them.
fn storm() {
    use crate::mm;
    use guest_mm::paging::{Page, PhysFrame, PteFlags, Size4KiB};
    use guest_mm::phys::PhysMem;
    mm::init(crate::boot::info());
    let mut x: u64 = 0x853c_49e6_748f_ea9b;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ram = crate::boot::info().ram_size;
    let mut refused = 0u32;
    for _ in 0..300 {
        let nr = (rand() % 12) as u32;
        if nr == hc::LOAD_CR3 || nr == hc::EXPLAIN {
            continue;
        }
        let arg = |r: u64| match r % 4 {
            0 => r % ram,
            1 => r,
            2 => r & 0xffff,
            _ => u64::MAX - (r & 0xff),
        };
        let r = hypercall::call(nr, arg(rand()), arg(rand()), arg(rand()), arg(rand()));
        refused += u32::from(hc::is_error(r));
    }
    // Raw writes into a page-table page that nothing links.
    let wrote = mm::with(|m| {
        let Some(pt) = m.buddy.alloc_pgtable() else { return 0 };
        let mem = *m.buddy.mem();
        let mut n = 0;
        for _ in 0..64 {
            let at = guest_abi::Gpa(pt.addr().0 + (rand() % 512) * 8);
            mem.write_u64(at, rand());
            n += 1;
        }
        for i in 0..512 {
            mem.write_u64(guest_abi::Gpa(pt.addr().0 + i * 8), 0);
        }
        let _ = m.buddy.free_pgtable(pt);
        n
    })
    .unwrap_or(0);
    // Random mappings in a live address space (never touched), then gone.
    let _ = crate::ktest::vm_suites::enter_user(0);
    mm::with(|m| {
        m.ctx(|cx, _, user| {
            let Some(a) = user.as_mut() else { return };
            for i in 0..32u64 {
                let va = crate::ktest::vm_suites::USER_BASE + i * 4096;
                let target = (rand() & 0x000f_ffff_f000) % (4 * ram);
                let flags = PteFlags::from_bits_truncate(rand()) - PteFlags::HUGE - PteFlags::ANON - PteFlags::COW;
                if let (Ok(p), Ok(f)) = (
                    Page::<Size4KiB>::from_start_address(guest_abi::Gva(va)),
                    PhysFrame::<Size4KiB>::from_start_address(guest_abi::Gpa(target)),
                ) {
                    let _ = a.page_table_mut().map(cx.mem, &mut cx.frames, p, f, flags);
                }
            }
        })
    });
    let _ = crate::ktest::vm_suites::leave_user();
    kprintln!("storm survived: {} hypercalls refused, {} raw page-table writes", refused, wrote);
}

/// A page-aligned page table of our own, in `.bss` (reached through the
/// kernel window: GPA = VA - `KERNEL_VMA`). Used only by `crash=scribble`,
/// which runs in shadow mode (one vCPU) before any other CPU could start.
#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut OWN_PML4: Table = Table([0; 512]);
static mut OWN_PDPT: Table = Table([0; 512]);
static mut OWN_PD: Table = Table([0; 512]);

/// Pool pages scribbled over (the MMU allocates from the pool's start).
const SCRIBBLED_PAGES: u64 = 128;
/// PML4 slot of the window onto the pool (nothing of ours lives there).
const WINDOW_SLOT: u64 = 300;
const WINDOW: u64 = 0xffff_0000_0000_0000 | (WINDOW_SLOT << 39);
const GIB: u64 = 1 << 30;
use guest_abi::paging::{A as PTE_A, D as PTE_D, P as PTE_P, PS as PTE_PS, RW as PTE_RW, US as PTE_US};

fn hardware_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects; ring 0.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn kernel_gpa<T>(p: *const T) -> u64 {
    p as u64 - guest_abi::KERNEL_VMA
}

// The read probe: `mov rax, [rdi]` then `ud2`: the access ends in `#UD`
// when it went through and in `#PF` when it did not; the exception handler
// ends the probe either way (see ktest::matrix).
core::arch::global_asm!(
    ".section .text",
    ".global scribble_probe_read",
    "scribble_probe_read:",
    "    mov rax, [rdi]",
    "    ud2",
);

unsafe extern "C" {
    fn scribble_probe_read();
    // The access matrix's probe entry (ktest::matrix, global asm): saves the
    // callee-saved registers, runs `stub` in ring 0 when `user` is 0; the
    // exception handler's `end_probe` resumes at its `probe_return`. Keep
    // this declaration in step with it.
    fn probe_run(target: u64, stub: u64, user: u64);
}

/// Whether a supervisor read of `va` goes through (`None`: the probe ended
/// in something other than `#UD` or `#PF`).
fn readable(va: u64) -> Option<bool> {
    use crate::ktest::matrix::{PROBE_ACTIVE, PROBE_VECTOR};
    use core::sync::atomic::Ordering;
    PROBE_VECTOR.store(0, Ordering::Relaxed);
    PROBE_ACTIVE.store(1, Ordering::Relaxed);
    // SAFETY: the stub reads `va` and raises #UD, or the read raises #PF;
    // the handler resumes at `probe_return`, which restores the registers
    // `probe_run` saved.
    unsafe { probe_run(va, scribble_probe_read as *const () as u64, 0) };
    PROBE_ACTIVE.store(0, Ordering::Relaxed);
    match PROBE_VECTOR.load(Ordering::Relaxed) {
        7 => Some(true),   // 1 + #UD
        15 => Some(false), // 1 + #PF
        _ => None,
    }
}

/// The hostile guest of issue 11, item 9: bypass `LOAD_CR3` with a
/// `mov cr3` to tables of our own that map the shadow pool (its GPA: the
/// hardware CR3 names a page of it), write garbage over the pool, come
/// back through `LOAD_CR3`, and check that the shadow now maps exactly
/// what our own (boot) tables allow: nothing they leave unmapped is
/// readable, and mapped memory reads what it holds.
fn scribble() -> ! {
    use guest_abi::DIRECT_MAP_BASE;
    if !arch::mmu::is_shadow() {
        console::println("crash=scribble needs shadow mode");
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    let ram = crate::boot::info().ram_size;
    let pool = ram.next_multiple_of(GIB) + GIB; // ept::memmap::shadow_pool_base
    let root = hardware_cr3() & !0xfff;
    if !(pool..pool + GIB).contains(&root) {
        kprintln!("scribble: CR3 {:#x} is not in the pool at {:#x}", root, pool);
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    let guest_root = arch::mmu::read_cr3();
    // SAFETY: shadow mode runs one CPU (the VMM refuses more), interrupts
    // off; the tables are ours alone. The guest root is a RAM page the
    // direct map covers.
    unsafe {
        let pml4 = &mut *core::ptr::addr_of_mut!(OWN_PML4);
        let pdpt = &mut *core::ptr::addr_of_mut!(OWN_PDPT);
        let pd = &mut *core::ptr::addr_of_mut!(OWN_PD);
        let theirs = (DIRECT_MAP_BASE + guest_root) as *const u64;
        for i in 0..512 {
            pml4.0[i] = theirs.add(i).read_volatile();
        }
        for (i, e) in pd.0.iter_mut().enumerate() {
            *e = (pool + i as u64 * (2 << 20)) | PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS;
        }
        pdpt.0[0] = kernel_gpa(pd) | PTE_P | PTE_RW | PTE_A;
        pml4.0[WINDOW_SLOT as usize] = kernel_gpa(pdpt) | PTE_P | PTE_RW | PTE_A;
        // The bypass: nothing traps this.
        core::arch::asm!("mov cr3, {}", in(reg) kernel_gpa(pml4), options(nostack, preserves_flags));
        // Garbage: entries pointing into the pool (so a walk wanders into
        // other scribbled pages) and large user-writable leaves over RAM.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for page in 0..SCRIBBLED_PAGES {
            let base = (WINDOW + page * 4096) as *mut u64;
            for i in 0..512u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let e = if x & 1 == 0 {
                    (pool + (x >> 8) % SCRIBBLED_PAGES * 4096) | PTE_P | PTE_RW | PTE_US | PTE_A
                } else {
                    (((x >> 8) % (ram >> 21)) << 21) | PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS
                };
                base.add(i as usize).write_volatile(e);
            }
        }
        kprintln!("scribble: wrote {} pool pages at {:#x} behind the VMM's back", SCRIBBLED_PAGES, pool);
    }
    // Back through the front door.
    // SAFETY: the guest's own root from before the scribble: it maps the
    // kernel (only the shadow pool was written).
    unsafe { arch::mmu::load_cr3_through_vmm(guest_root) };
    arch::idt::set_page_fault_hook(|_, _| false);
    // What the boot tables leave unmapped: the identity map beyond RAM (up
    // to its 1 GiB), the rest of the identity/direct-map PDPT, and other
    // PML4 slots — our pool window among them.
    let boot_mapped = ram.min(GIB);
    let mut unmapped = 0u32;
    let mut readable_count = 0u32;
    let mut check = |va: u64| match readable(va) {
        Some(r) => {
            unmapped += 1;
            readable_count += u32::from(r);
        }
        None => {
            kprintln!("scribble: probe of {:#x} ended in an unexpected exception", va);
            arch::exit(guest_abi::ports::EXIT_FAILURE);
        }
    };
    for va in (boot_mapped..GIB).step_by(2 << 20) {
        check(va);
        check(DIRECT_MAP_BASE + va);
    }
    for g in 1..64u64 {
        check(g * GIB);
    }
    for slot in (1..256u64).chain([WINDOW_SLOT, 256, 400, 510]) {
        let high = if slot >= 256 { 0xffff_0000_0000_0000 } else { 0 };
        check(high | slot << 39);
        check(high | slot << 39 | (SCRIBBLED_PAGES * 4096 - 4096));
    }
    // Mapped memory reads what it holds: our own PD, read through the
    // identity map and the direct map (not through the kernel window it
    // was written through).
    let mut wrong = 0u32;
    // SAFETY: OWN_PD lies in the kernel image, in RAM the boot tables map
    // identically and in the direct map.
    unsafe {
        let gpa = kernel_gpa(core::ptr::addr_of!(OWN_PD));
        let want = &(*core::ptr::addr_of!(OWN_PD)).0;
        for (i, &w) in want.iter().enumerate() {
            for base in [0, DIRECT_MAP_BASE] {
                if ((base + gpa) as *const u64).add(i).read_volatile() != w {
                    wrong += 1;
                }
            }
        }
    }
    kprintln!(
        "scribble: {} of {} unmapped addresses readable, {} of 1024 mapped words wrong",
        readable_count,
        unmapped,
        wrong
    );
    arch::exit(if readable_count == 0 && wrong == 0 {
        guest_abi::ports::EXIT_SUCCESS
    } else {
        guest_abi::ports::EXIT_FAILURE
    })
}

/// Store the IDTR, the GDTR or the FPU state into a page of the page-table
/// zone (reached through the direct map; the kernel has not taken the zone
/// into use yet). In ept mode the zone is ordinary RAM and this succeeds; in
/// shadow mode the zone is a read-only memslot and the host must emulate
/// the store as an MMIO write, which its emulator cannot do for these
/// instructions (docs/host.md, "What a host needs to run mmuvirt").
fn store_into_zone(mode: &str) -> ! {
    let zone = crate::boot::info().pt_zone.start;
    let at = guest_abi::DIRECT_MAP_BASE + zone + 0x800;
    kprintln!("{}: storing into the page-table zone at {:#x}", mode, at);
    // SAFETY: `at` is an unused, 16-byte-aligned spot of the zone, mapped
    // writable by the direct map; the instructions write 10 (sidt/sgdt) or
    // 512 (fxsave) bytes there and nothing else.
    unsafe {
        match mode {
            "sidt-zone" => core::arch::asm!("sidt [{}]", in(reg) at, options(nostack, preserves_flags)),
            "sgdt-zone" => core::arch::asm!("sgdt [{}]", in(reg) at, options(nostack, preserves_flags)),
            _ => core::arch::asm!("fxsave64 [{}]", in(reg) at, options(nostack, preserves_flags)),
        }
    }
    kprintln!("{}: the store completed", mode);
    arch::exit(guest_abi::ports::EXIT_SUCCESS)
}

/// Load the GDTR from a descriptor in guest-physical memory that no RAM
/// backs: the boot tables' identity map gets a 2 MiB leaf for the GPA just
/// past RAM (ept mode: the tables are ordinary RAM; in shadow and pv mode
/// the write traps and the shadow refuses a leaf outside RAM, so the load
/// faults instead). Needs RAM below 1 GiB.
fn lgdt_unbacked() -> ! {
    use guest_abi::DIRECT_MAP_BASE;
    let ram = crate::boot::info().ram_size;
    if ram + (2 << 20) > GIB {
        console::println("crash=lgdt-unbacked needs less than 1 GiB of RAM");
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    let at = ram + 0x1000;
    let addr = |e: u64| e & guest_abi::paging::ADDR_MASK;
    // SAFETY: the walk reads the current (boot) tables through the direct
    // map, which covers them; the one write adds a leaf in the identity
    // map's PD for the 2 MiB past RAM, which nothing else uses.
    unsafe {
        let read = |gpa: u64| ((DIRECT_MAP_BASE + gpa) as *const u64).read_volatile();
        let pdpt = addr(read(arch::mmu::read_cr3() & !0xfff));
        let pd = addr(read(pdpt));
        let pde = (DIRECT_MAP_BASE + pd + (ram >> 21) * 8) as *mut u64;
        pde.write_volatile(ram | PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS);
    }
    arch::mmu::invlpg(at);
    kprintln!("lgdt-unbacked: lgdt [{:#x}] (unbacked GPA, identity-mapped)", at);
    // SAFETY: deliberately loads a GDTR from memory no RAM backs; the VMM
    // is expected to end the run.
    unsafe { core::arch::asm!("lgdt [{}]", in(reg) at, options(nostack, preserves_flags)) };
    kprintln!("lgdt-unbacked: the load completed");
    arch::exit(guest_abi::ports::EXIT_SUCCESS)
}

/// `PV_SETUP` with an area over memory the VMM shadows: the first page of
/// the page-table zone, or the VMM's boot PDPT at 0xa000 (`arch::mmu::init`
/// registers no area of its own in these modes). Succeeds only if the VMM
/// refuses with `ERR_OVERLAP`.
fn pv_area_over_tables(mode: &str) -> ! {
    let at = if mode == "pv-area-zone" { crate::boot::info().pt_zone.start } else { 0xa000 };
    let r = hypercall::call(hc::PV_SETUP, at, 0, 0, 0);
    if r == hc::ERR_OVERLAP {
        kprintln!("{}: PV_SETUP({:#x}) refused: it overlaps page tables the VMM shadows", mode, at);
        arch::exit(guest_abi::ports::EXIT_SUCCESS)
    }
    kprintln!("{}: PV_SETUP({:#x}) answered {:#x}, not ERR_OVERLAP", mode, at, r);
    arch::exit(guest_abi::ports::EXIT_FAILURE)
}

/// Queue an entry outside the page-table zone before each sync point and
/// check that every one reports it with the batch error (`guest_abi::pv`),
/// as `PV_FLUSH` always did.
fn pv_bad_queue() -> ! {
    use guest_abi::pv::{BatchError, decode_batch_error};
    if !arch::mmu::is_pv() {
        console::println("crash=pv-bad-queue needs pv mode");
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    let root = arch::mmu::read_cr3();
    let mapped = run as *const () as u64;
    let calls: [(&str, u32, u64, u64); 4] = [
        ("LOAD_CR3", hc::LOAD_CR3, root, 0),
        ("SHADOW_FAULT", hc::SHADOW_FAULT, mapped, 0),
        ("FLUSH_TLB", hc::FLUSH_TLB, 0, 0),
        ("PV_FLUSH", hc::PV_FLUSH, guest_abi::pv::NO_GVA, 0),
    ];
    let mut reported = 0;
    for (name, nr, a, b) in calls {
        // Outside the zone (the boot area), 8-byte aligned.
        arch::mmu::queue_raw(0x1000);
        let r = hypercall::call(nr, a, b, 0, 0);
        let ok = decode_batch_error(r) == Some((0, Some(BatchError::OutsideZone)));
        kprintln!("pv-bad-queue: {} answered {:#x}{}", name, r, if ok { " (the batch error)" } else { "" });
        reported += u32::from(ok);
    }
    kprintln!("pv-bad-queue: {} of 4 sync points reported the refused entry", reported);
    arch::exit(if reported == 4 { guest_abi::ports::EXIT_SUCCESS } else { guest_abi::ports::EXIT_FAILURE })
}

/// Supervisor writes through clean read-only pages while the guest's own
/// CR0.WP = 0, which the guest does not report (`FLUSH_TLB`): hardware sets
/// D in the guest's entry, so the VMM must. Two 2 MiB identity-map pages
/// of usable RAM (4 and 6 MiB, below anything the kernel uses this early)
/// are made read-only and clean in the boot tables (trapped writes), read
/// once (shadowed read-only), then written with WP clear: (a) WP set again
/// before the next exit (`LOAD_CR3`), (b) WP still clear at the next exit
/// (`NOW`). Succeeds only if both entries end with D.
fn wp_off_silent() -> ! {
    use guest_abi::DIRECT_MAP_BASE;
    if !arch::mmu::is_shadow() {
        console::println("crash=wp-off-silent needs shadow or pv mode");
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    let addr = |e: u64| e & guest_abi::paging::ADDR_MASK;
    let read = |gpa: u64| {
        // SAFETY: boot tables, mapped by the direct map.
        unsafe { ((DIRECT_MAP_BASE + gpa) as *const u64).read_volatile() }
    };
    let pdpt = addr(read(arch::mmu::read_cr3() & !0xfff));
    let pd = addr(read(pdpt));
    let pde_at = |i: u64| (DIRECT_MAP_BASE + pd + i * 8) as *mut u64;
    let cr0: u64;
    // SAFETY: reading CR0.
    unsafe { core::arch::asm!("mov {}, cr0", out(reg) cr0) };
    let wp = guest_abi::paging::CR0_WP;
    for i in [2u64, 3] {
        // SAFETY: a trapped write of the identity map's PDE for [i*2, i*2+2)
        // MiB, usable RAM nothing uses yet: present, accessed, read-only,
        // clean. Then one read, which shadows it read-only.
        unsafe {
            pde_at(i).write_volatile((i << 21) | PTE_P | PTE_A | PTE_PS);
            arch::mmu::invlpg(i << 21);
            let _ = ((i << 21) as *const u64).read_volatile();
        }
    }
    // (a) WP cleared and set again between two exits.
    // SAFETY: WP off for one store into the read-only page, then on again.
    unsafe {
        core::arch::asm!("mov cr0, {}", in(reg) cr0 & !wp);
        ((2u64 << 21) as *mut u64).write_volatile(0x5a);
        core::arch::asm!("mov cr0, {}", in(reg) cr0 | wp);
        arch::mmu::load_cr3_through_vmm(arch::mmu::read_cr3());
    }
    // SAFETY: reading the PDE through the direct map.
    let a = unsafe { pde_at(2).read_volatile() };
    // (b) WP still clear at the next exit.
    // SAFETY: as above; the VMM finds WP clear at the NOW exit.
    unsafe {
        core::arch::asm!("mov cr0, {}", in(reg) cr0 & !wp);
        ((3u64 << 21) as *mut u64).write_volatile(0xa5);
    }
    let _ = hypercall::call(hc::NOW, 0, 0, 0, 0);
    // SAFETY: reading the PDE; then WP back on (and reported).
    let b = unsafe { pde_at(3).read_volatile() };
    // SAFETY: restores the kernel's CR0.
    unsafe { core::arch::asm!("mov cr0, {}", in(reg) cr0 | wp) };
    let _ = hypercall::call(hc::FLUSH_TLB, cr0 | wp, 0, 0, 0);
    let dirty = |e: u64| e & PTE_D != 0;
    kprintln!(
        "wp-off-silent: (a) WP set again before the exit: D {}; (b) WP clear at the exit: D {}",
        dirty(a) as u8,
        dirty(b) as u8
    );
    arch::exit(if dirty(a) && dirty(b) { guest_abi::ports::EXIT_SUCCESS } else { guest_abi::ports::EXIT_FAILURE })
}
