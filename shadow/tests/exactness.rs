//! The shadow MMU against the SDM under every paging control, with a model
//! of the vCPU walking the shadow tables.
//!
//! The host these tests were written on cannot run a guest with CR4.SMEP or
//! CR4.SMAP (its KVM does not offer them in `KVM_GET_SUPPORTED_CPUID`), so
//! the in-guest access matrix (guest/kernel/src/ktest/matrix.rs) covers
//! CR0.WP × EFER.NXE only; the SMEP/SMAP cases are carried here.
//!
//! The model: the vCPU runs with CR0.WP = 1 and EFER.NXE = 1 (what the VMM
//! forces in shadow mode) and the guest's CR4.SMEP/SMAP and RFLAGS.AC; it
//! walks the *shadow* tables with the SDM rules ([`shadow::walk`], itself
//! checked against a naive SDM reference in `walker/tests.rs`). Each `#PF`
//! it takes goes to [`ShadowMmu::handle_fault`] as the guest's handler would
//! send it (`SHADOW_FAULT`): "fixed" retries the access, a guest fault ends
//! it. The reference: the same walker over the guest's own tables with the
//! guest's controls (AC = 0 for an implicit supervisor access, SDM vol. 3
//! §4.6.1). Every sequence of two accesses, every leaf, every control.

use shadow::walker::{A, D, P, PS, RW, US, XD, pf};
use shadow::{Access, FaultOutcome, Gpa, GuestPhys, Gva, PagingMode, ShadowError, ShadowMmu, ShadowVcpu, walk};
use std::collections::HashMap;

const PAGE: u64 = 4096;
const RAM: u64 = 64 << 20;
const POOL: u64 = 2 << 30;
const POOL_PAGES: u32 = 32;
const CR3: u64 = 0x1000;
const VA: u64 = 0x40_0123; // PD index 2, PT index 0
const FRAME: u64 = 0x10_0000;
/// A user code page beside it (PT index 1): what user mode fetches first
/// after a return from the kernel.
const CODE_VA: u64 = 0x40_1000;
const USER_FETCH: Acc = Acc { write: false, fetch: true, user: true, ac: false, implicit: false };

#[derive(Clone, Debug, Default, PartialEq)]
struct Mem {
    words: HashMap<u64, u64>,
    base: u64,
    size: u64,
}

impl Mem {
    fn new(base: u64, size: u64) -> Self {
        Mem { words: HashMap::new(), base, size }
    }
}

impl GuestPhys for Mem {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        assert!(self.is_ram(Gpa(gpa), 8), "read outside {gpa:#x}");
        *self.words.get(&gpa).unwrap_or(&0)
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        assert!(self.is_ram(Gpa(gpa), 8), "write outside {gpa:#x}");
        self.words.insert(gpa, value);
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        gpa >= self.base && gpa.checked_add(len).is_some_and(|e| e <= self.base + self.size)
    }
}

/// What the vCPU sees: the shadow pool, and guest RAM as the frames leaves
/// point at (the model reads only pool entries).
struct VcpuView<'a> {
    pool: &'a mut Mem,
}

impl GuestPhys for VcpuView<'_> {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        self.pool.read_u64(Gpa(gpa))
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        self.pool.write_u64(Gpa(gpa), value)
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        self.pool.is_ram(Gpa(gpa), len) || gpa.checked_add(len).is_some_and(|e| e <= RAM)
    }
}

/// One access as the test performs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Acc {
    write: bool,
    fetch: bool,
    user: bool,
    /// RFLAGS.AC at the time (supervisor data accesses only).
    ac: bool,
    /// An implicit supervisor access (GDT/IDT/TSS): SMAP ignores AC.
    implicit: bool,
}

impl Acc {
    fn access(&self) -> Access {
        Access { write: self.write, user: self.user, fetch: self.fetch }
    }
}

fn accesses() -> Vec<Acc> {
    let mut v = Vec::new();
    let none = Acc { write: false, fetch: false, user: false, ac: false, implicit: false };
    for user in [false, true] {
        v.push(Acc { user, ..none });
        v.push(Acc { user, write: true, ..none });
        v.push(Acc { user, fetch: true, ..none });
    }
    for write in [false, true] {
        v.push(Acc { write, ac: true, ..none });
        v.push(Acc { write, ac: true, implicit: true, ..none });
    }
    v
}

/// What one access ended in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done(u64),
    Fault(u32),
}

fn guest(leaf: u64, large: bool) -> Mem {
    let mut g = Mem::new(0, RAM);
    let t = P | RW | US | A;
    g.write_u64(Gpa(CR3), 0x20000 | t);
    g.write_u64(Gpa(0x20000), 0x21000 | t);
    if large {
        g.write_u64(Gpa(0x21000 + 2 * 8), 0x20_0000 | PS | P | leaf);
    } else {
        g.write_u64(Gpa(0x21000 + 2 * 8), 0x22000 | t);
        g.write_u64(Gpa(0x22000), FRAME | P | leaf);
    }
    // The user code page (PD index 3 for the 2 MiB case).
    g.write_u64(Gpa(0x21000 + 3 * 8), 0x23000 | t);
    g.write_u64(Gpa(0x23000 + 8), (FRAME + 0x1000) | P | US | A | D);
    g.write_u64(Gpa(0x22000 + 8), (FRAME + 0x1000) | P | US | A | D);
    g
}

fn code_va(large: bool) -> u64 {
    if large { 0x60_1000 } else { CODE_VA }
}

/// The guest's controls for `acc` (the reference walk).
fn guest_mode(base: PagingMode, acc: &Acc) -> PagingMode {
    PagingMode { ac: acc.ac && !acc.implicit, ..base }
}

/// Run `acc` on the modelled vCPU over the shadow, with hidden faults
/// resolved by the MMU. `force_nx`: the vCPU's EFER.NXE is 1 (what the VMM
/// does) rather than the guest's.
fn run(
    mmu: &mut ShadowMmu,
    cpu: &mut ShadowVcpu,
    pool: &mut Mem,
    g: &mut Mem,
    base: PagingMode,
    acc: &Acc,
    force_nx: bool,
) -> Result<Outcome, ShadowError> {
    run_at((mmu, cpu), pool, g, base, acc, force_nx, VA)
}

/// [`run`] at `va`.
fn run_at(
    (mmu, cpu): (&mut ShadowMmu, &mut ShadowVcpu),
    pool: &mut Mem,
    g: &mut Mem,
    base: PagingMode,
    acc: &Acc,
    force_nx: bool,
    va: u64,
) -> Result<Outcome, ShadowError> {
    let vcpu = PagingMode { wp: true, nxe: force_nx || base.nxe, ..guest_mode(base, acc) };
    // The guest's controls as the VMM reads them at SHADOW_FAULT: AC is the
    // register's (an implicit access does not clear it).
    let seen = PagingMode { ac: acc.ac, ..base };
    for _ in 0..6 {
        let root = mmu.current_root(cpu).expect("a root is loaded");
        match walk(&mut VcpuView { pool }, root.gpa(), Gva(va), acc.access(), &vcpu) {
            Ok(t) => return Ok(Outcome::Done(t.gpa.raw())),
            Err(f) => {
                mmu.set_mode(cpu, pool, g, seen);
                match mmu.handle_fault(cpu, pool, g, Gva(va), f.error_code)? {
                    FaultOutcome::Fixed => continue,
                    FaultOutcome::GuestFault(ec) => return Ok(Outcome::Fault(ec)),
                }
            }
        }
    }
    panic!("{acc:?}: the vCPU kept faulting without the MMU noticing")
}

fn reference(g: &mut Mem, base: PagingMode, acc: &Acc) -> Outcome {
    reference_at(g, base, acc, VA)
}

fn reference_at(g: &mut Mem, base: PagingMode, acc: &Acc, va: u64) -> Outcome {
    match walk(g, Gpa(CR3), Gva(va), acc.access(), &guest_mode(base, acc)) {
        Ok(t) => Outcome::Done(t.gpa.raw()),
        Err(f) => Outcome::Fault(f.error_code),
    }
}

fn modes() -> Vec<PagingMode> {
    let mut v = Vec::new();
    for bits in 0..16u32 {
        v.push(PagingMode {
            wp: bits & 1 != 0,
            nxe: bits & 2 != 0,
            smep: bits & 4 != 0,
            smap: bits & 8 != 0,
            ..PagingMode::default()
        });
    }
    v
}

/// Every leaf (RW, US, XD, A, D; 4 KiB and 2 MiB) × every control
/// (CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP) × every pair of accesses (read,
/// write, fetch × supervisor/user, supervisor data with AC = 1, implicit
/// supervisor): the shadow gives the reference's outcome for both. A user
/// access follows a user instruction fetch from another page, as it does
/// after any return from the kernel.
#[test]
fn every_access_pair_under_every_control_matches_the_sdm() {
    // Two threads, half the controls each (about 10 s unoptimised).
    let modes = modes();
    let checked: u64 = std::thread::scope(|s| {
        let halves: Vec<_> = modes.chunks(modes.len() / 2).map(|h| s.spawn(move || check_modes(h))).collect();
        halves.into_iter().map(|h| h.join().expect("no panic")).sum()
    });
    assert!(checked > 100_000, "{checked}");
}

/// The pair check for `modes`: the accesses checked.
fn check_modes(modes: &[PagingMode]) -> u64 {
    let accs = accesses();
    let mut checked = 0u64;
    for &base in modes {
        for large in [false, true] {
            for combo in 0..32u64 {
                // A large leaf takes the same A/D paths as a small one: only
                // its accessed-and-dirty combinations are run.
                if large && combo & 24 != 24 {
                    continue;
                }
                let leaf = P
                    | if combo & 1 != 0 { RW } else { 0 }
                    | if combo & 2 != 0 { US } else { 0 }
                    | if combo & 4 != 0 { XD } else { 0 }
                    | if combo & 8 != 0 { A } else { 0 }
                    | if combo & 16 != 0 { D } else { 0 };
                for first in &accs {
                    for second in &accs {
                        let mut g = guest(leaf, large);
                        let mut want = g.clone();
                        let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
                        let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, PagingMode { ac: first.ac, ..base });
                        let mut cpu = mmu.new_vcpu();
                        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
                        for (i, acc) in [first, second].into_iter().enumerate() {
                            let what = || format!("{base:?} large={large} leaf={leaf:#x} access {i} {acc:?}");
                            // User mode runs only after a return from the
                            // kernel, and fetches an instruction first.
                            if acc.user {
                                let code = code_va(large);
                                let expect = reference_at(&mut want, base, &USER_FETCH, code);
                                let got =
                                    run_at((&mut mmu, &mut cpu), &mut pool, &mut g, base, &USER_FETCH, true, code);
                                assert_eq!(got, Ok(expect), "user code fetch before {}", what());
                            }
                            let expect = reference(&mut want, base, acc);
                            let got = run(&mut mmu, &mut cpu, &mut pool, &mut g, base, acc, true);
                            match got {
                                Err(e) => panic!("{}: {e}", what()),
                                Ok(o) => assert_eq!(o, expect, "{}", what()),
                            }
                            // The guest's A/D bits as hardware leaves them,
                            // except after an implicit SMAP fault (the MMU
                            // could not know it was implicit until the
                            // retry: A may be set there).
                            if !(acc.implicit && matches!(expect, Outcome::Fault(_))) {
                                assert_eq!(g, want, "A/D bits: {}", what());
                            } else {
                                want = g.clone();
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    checked
}

/// Issue 11, item 1: CR0.WP = 0 + SMEP. A supervisor write to a read-only
/// user page makes the leaf supervisor-writable; a supervisor fetch from
/// the page afterwards must still fault with 0x11, as on hardware.
#[test]
fn wp_off_smep_supervisor_fetch_after_a_write_faults() {
    let base = PagingMode { wp: false, smep: true, ..PagingMode::default() };
    let mut g = guest(US | A | D, false);
    let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
    let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, base);
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    let w = Acc { write: true, fetch: false, user: false, ac: false, implicit: false };
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &w, true), Ok(Outcome::Done(FRAME | 0x123)));
    let x = Acc { write: false, fetch: true, ..w };
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &x, true), Ok(Outcome::Fault(pf::P | pf::ID)));
    // And a user read gets the page back as a user page.
    let ur = Acc { user: true, write: false, ..w };
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &ur, true), Ok(Outcome::Done(FRAME | 0x123)));
}

/// Issue 11, item 2: CR0.WP = 0 + SMAP. A supervisor write with AC = 1 to a
/// read-only user page passes (as on hardware), and leaves no leaf that a
/// later AC = 0 or implicit supervisor access, or a user write, could pass
/// through.
#[test]
fn wp_off_smap_write_with_ac_leaves_smap_and_user_protection_intact() {
    let base = PagingMode { wp: false, smap: true, ..PagingMode::default() };
    let mut g = guest(US | A | D, false);
    let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
    let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, base);
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    let done = Ok(Outcome::Done(FRAME | 0x123));
    // The user code page was in use before the kernel ran.
    assert_eq!(
        run_at((&mut mmu, &mut cpu), &mut pool, &mut g, base, &USER_FETCH, true, CODE_VA),
        Ok(Outcome::Done(FRAME + 0x1000))
    );
    let w = Acc { write: true, fetch: false, user: false, ac: true, implicit: false };
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &w, true), done);
    let r = Acc { write: false, ac: false, ..w };
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &r, true), Ok(Outcome::Fault(pf::P)), "AC = 0 read");
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &w, true), done, "AC = 1 write again");
    let imp = Acc { implicit: true, write: false, ..w };
    assert_eq!(
        run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &imp, true),
        Ok(Outcome::Fault(pf::P)),
        "implicit read"
    );
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &w, true), done);
    // Back to user mode: its first fetch faults in the shadow and ends the
    // writable user leaf, so the user write faults as on hardware.
    assert_eq!(
        run_at((&mut mmu, &mut cpu), &mut pool, &mut g, base, &USER_FETCH, true, CODE_VA),
        Ok(Outcome::Done(FRAME + 0x1000))
    );
    let uw = Acc { user: true, ac: false, ..w };
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &uw, true), Ok(Outcome::Fault(pf::P | pf::W | pf::U)));
    let ur = Acc { write: false, ..uw };
    assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &ur, true), done);
}

/// Issue 11, item 3: with EFER.NXE = 0 and SMEP = 0 a fetch's error code
/// has no I/D bit unless the vCPU runs with NXE = 1; with SMAP a supervisor
/// fetch from a user page (allowed) would then be taken for a read (not
/// allowed). The VMM forces NXE = 1; this shows why.
#[test]
fn fetches_are_told_from_reads_only_with_nx_forced() {
    let base = PagingMode { nxe: false, smap: true, ..PagingMode::default() };
    let x = Acc { write: false, fetch: true, user: false, ac: false, implicit: false };
    for (force_nx, want) in [(true, Outcome::Done(FRAME | 0x123)), (false, Outcome::Fault(pf::P))] {
        let mut g = guest(US | A | D, false);
        let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
        let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, base);
        let mut cpu = mmu.new_vcpu();
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
        assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &x, force_nx), Ok(want), "force_nx={force_nx}");
    }
}

/// Issue 11, item 4: an implicit supervisor access (a descriptor table in a
/// user page) with SMAP and AC = 1 faults on hardware; the MMU answered
/// "fixed" forever. Now the repeat is recognised and becomes the guest's
/// `#PF` with the error code hardware gives.
#[test]
fn implicit_supervisor_access_with_smap_and_ac_faults_instead_of_looping() {
    let base = PagingMode { smap: true, ..PagingMode::default() };
    let mut g = guest(RW | US | A | D, false);
    let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
    let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, PagingMode { ac: true, ..base });
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    for write in [false, true] {
        let imp = Acc { write, fetch: false, user: false, ac: true, implicit: true };
        let ec = pf::P | if write { pf::W } else { 0 };
        assert_eq!(run(&mut mmu, &mut cpu, &mut pool, &mut g, base, &imp, true), Ok(Outcome::Fault(ec)));
    }
    assert_eq!(mmu.stats().guest_faults, 2);
}

/// Issue 11, item 8: the same fault answered "fixed" twice in a row with
/// nothing changed is a livelock, reported as an error — not an endless
/// loop. (Here: a leaf the vCPU cannot use although the walk allows it.)
#[test]
fn a_fault_that_repeats_after_being_fixed_is_a_livelock_error() {
    let mode = PagingMode::default();
    let mut g = guest(RW | US | A | D, false);
    let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
    let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, mode);
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(VA), pf::P | pf::W), Ok(FaultOutcome::Fixed));
    assert_eq!(
        mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(VA), pf::P | pf::W),
        Err(ShadowError::Livelock { cr2: Gva(VA), error_code: pf::P | pf::W })
    );
    // Anything the guest changes in between makes a repeat legitimate.
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(VA), pf::P | pf::W), Ok(FaultOutcome::Fixed));
    mmu.flush(&mut cpu);
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(VA), pf::P | pf::W), Ok(FaultOutcome::Fixed));
    g.write_u64(Gpa(0x22000), FRAME | P | RW | US | A | D);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000), 8);
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(VA), pf::P | pf::W), Ok(FaultOutcome::Fixed));
}

/// Issue 11, item 5: a guest whose CPUID has no 1 GiB pages gets a RSVD
/// fault for a PS = 1 PDPTE, not a shadow leaf the vCPU would fault on
/// forever.
#[test]
fn a_1g_page_without_cpuid_support_is_a_reserved_bit_fault() {
    let mode = PagingMode { pdpe1gb: false, ..PagingMode::default() };
    let mut g = Mem::new(0, 2 << 30); // 2 GiB of RAM: the page lies wholly in it
    g.write_u64(Gpa(CR3), 0x20000 | P | RW | US | A);
    g.write_u64(Gpa(0x20000), PS | P | RW | US | A | D); // 1 GiB at 0
    let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
    let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, mode);
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    assert_eq!(
        mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(0x1000), 0),
        Ok(FaultOutcome::GuestFault(pf::P | pf::RSVD))
    );
    // With them (the default), the same page is mapped.
    let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, PagingMode::default());
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(0x1000), 0), Ok(FaultOutcome::Fixed));
}

/// Issue 11, item 7: tables outside the trapped frames are never shadowed:
/// such a root is refused, and an entry pointing at such a table is a
/// reserved-bit fault.
#[test]
fn tables_outside_the_trapped_frames_are_refused() {
    use shadow::mmu::TableFrames;
    let mode = PagingMode::default();
    let mut g = guest(RW | US | A | D, false); // tables at 0x1000, 0x20000, 0x21000, 0x22000
    let mut pool = Mem::new(POOL, POOL_PAGES as u64 * PAGE);
    let mut mmu = ShadowMmu::new(Gpa(POOL), POOL_PAGES, mode);
    let mut cpu = mmu.new_vcpu();
    mmu.set_table_frames(&mut pool, TableFrames::new(&[(Gpa(0x20000), Gpa(0x22000))]));
    assert_eq!(mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)), Err(ShadowError::RootNotTrapped(Gpa(CR3))));
    mmu.set_table_frames(&mut pool, TableFrames::new(&[(Gpa(0x1000), Gpa(0x2000)), (Gpa(0x20000), Gpa(0x22000))]));
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    // The PT at 0x22000 is outside: the PDE pointing at it is "reserved".
    assert_eq!(
        mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(VA), 0),
        Ok(FaultOutcome::GuestFault(pf::P | pf::RSVD))
    );
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(VA)), None);
    mmu.set_table_frames(&mut pool, TableFrames::new(&[(Gpa(0x1000), Gpa(0x2000)), (Gpa(0x20000), Gpa(0x23000))]));
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(CR3)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(VA), 0), Ok(FaultOutcome::Fixed));
}
