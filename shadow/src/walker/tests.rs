use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

/// Guest RAM as a sparse map of words below `ram`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Mem {
    words: HashMap<u64, u64>,
    ram: u64,
}

impl Mem {
    fn new(ram: u64) -> Self {
        Mem { words: HashMap::new(), ram }
    }
    fn set(&mut self, gpa: u64, v: u64) {
        self.words.insert(gpa, v);
    }
}

impl GuestPhys for Mem {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        assert!(gpa + 8 <= self.ram, "walker read outside RAM at {gpa:#x}");
        *self.words.get(&gpa).unwrap_or(&0)
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        assert!(gpa + 8 <= self.ram, "walker wrote outside RAM at {gpa:#x}");
        self.words.insert(gpa, value);
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        gpa.checked_add(len).is_some_and(|e| e <= self.ram)
    }
}

const MIB: u64 = 1 << 20;
const CR3: u64 = 0x1000;

/// PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000, mapping VA 0x5000
/// (PT index 5) to the page at 0x9000 with `leaf` flags; upper levels get
/// `upper` flags.
fn four_k(upper: u64, leaf: u64) -> Mem {
    let mut m = Mem::new(64 * MIB);
    m.set(0x1000, 0x2000 | upper);
    m.set(0x2000, 0x3000 | upper);
    m.set(0x3000, 0x4000 | upper);
    m.set(0x4000 + 5 * 8, 0x9000 | leaf);
    m
}

const VA: u64 = 0x5123;
const R: Access = Access { write: false, user: false, fetch: false };
const W: Access = Access { write: true, user: false, fetch: false };
const UR: Access = Access { write: false, user: true, fetch: false };
const UW: Access = Access { write: true, user: true, fetch: false };
const UX: Access = Access { write: false, user: true, fetch: true };

fn ec(m: &mut Mem, access: Access, mode: &PagingMode) -> u32 {
    walk(m, Gpa(CR3), Gva(VA), access, mode).unwrap_err().error_code
}

#[test]
fn error_codes_measured_on_the_host() {
    // The five cases docs/host.md lists as measured on the development hosts.
    let mode = PagingMode::default();
    assert_eq!(ec(&mut four_k(P | RW | US, P | RW), UW, &mode), 0x7, "user write to a supervisor page");
    assert_eq!(ec(&mut four_k(P | RW | US, P | RW | US | XD), UX, &mode), 0x15, "user fetch from an NX page");
    assert_eq!(ec(&mut four_k(P | RW | US, P | US), UW, &mode), 0x7, "user write to a read-only page");
    assert_eq!(ec(&mut four_k(P | RW | US, 0), UR, &mode), 0x4, "user read of a non-present page");
    assert_eq!(ec(&mut four_k(P | RW | US, P), W, &mode), 0x3, "supervisor write, read-only, CR0.WP=1");
}

#[test]
fn translation_and_permissions() {
    let mut m = four_k(P | RW | US, P | RW | US);
    let t = walk(&mut m, Gpa(CR3), Gva(VA), UR, &PagingMode::default()).unwrap();
    assert_eq!((t.gpa, t.page_size, t.levels), (Gpa(0x9123), 4096, 4));
    assert!(t.writable && t.user && t.executable);
    // Supervisor write to a read-only page is fine with CR0.WP = 0.
    let mut m = four_k(P | RW | US, P);
    let mode = PagingMode { wp: false, ..Default::default() };
    assert!(walk(&mut m, Gpa(CR3), Gva(VA), W, &mode).is_ok());
    // RW clear at an upper level makes the page read-only for users.
    let mut m = four_k(P | US, P | RW | US);
    assert_eq!(ec(&mut m, UW, &PagingMode::default()), 0x7);
}

#[test]
fn a_and_d_bits_like_kvm() {
    let mode = PagingMode::default();
    let mut m = four_k(P | RW | US, P | RW | US);
    walk(&mut m, Gpa(CR3), Gva(VA), UR, &mode).unwrap();
    for gpa in [0x1000, 0x2000, 0x3000, 0x4028] {
        assert!(m.words[&gpa] & A != 0, "A not set at {gpa:#x}");
    }
    assert_eq!(m.words[&0x4028] & D, 0, "a read must not set D");
    let t = walk(&mut m, Gpa(CR3), Gva(VA), UW, &mode).unwrap();
    assert!(t.dirty && m.words[&0x4028] & D != 0);
    assert_eq!(m.words[&0x3000] & D, 0, "D only in the leaf");
    // A faulting access sets nothing.
    let mut m = four_k(P | RW | US, P | US);
    let before = m.clone();
    walk(&mut m, Gpa(CR3), Gva(VA), UW, &mode).unwrap_err();
    assert_eq!(m, before);
}

#[test]
fn reserved_bits() {
    let mode = PagingMode { maxphyaddr: 40, ..Default::default() };
    let rsvd = |m: &mut Mem, mode: &PagingMode| walk(m, Gpa(CR3), Gva(VA), UR, mode).unwrap_err();
    let mut m = four_k(P | RW | US, P | US | (1 << 45));
    assert_eq!(rsvd(&mut m, &mode), PageFault { error_code: pf::P | pf::U | pf::RSVD, level: 1 });
    // XD is reserved without EFER.NXE; fetch then has no I/D bit.
    let mut m = four_k(P | RW | US, P | US | XD);
    let no_nx = PagingMode { nxe: false, ..Default::default() };
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(VA), UX, &no_nx).unwrap_err().error_code, pf::P | pf::U | pf::RSVD);
    // PS in a PML4 entry.
    let mut m = four_k(P | RW | US, P | US);
    m.set(0x1000, 0x2000 | P | RW | US | PS);
    assert_eq!(rsvd(&mut m, &mode).level, 4);
    // A 2 MiB leaf with bit 13 set.
    let mut m = Mem::new(64 * MIB);
    m.set(0x1000, 0x2000 | P | RW | US);
    m.set(0x2000, 0x3000 | P | RW | US);
    m.set(0x3000, 0x20_0000 | (1 << 13) | P | US | PS);
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(0x1234), UR, &mode).unwrap_err().error_code, pf::P | pf::U | pf::RSVD);
    m.set(0x3000, 0x20_0000 | P | US | PS);
    let t = walk(&mut m, Gpa(CR3), Gva(0x1234), UR, &mode).unwrap();
    assert_eq!((t.gpa, t.page_size, t.levels), (Gpa(0x20_1234), 2 * MIB, 3));
}

#[test]
fn nothing_outside_ram_is_ever_translated() {
    let mode = PagingMode::default();
    // A PDPT entry pointing beyond RAM: the walk faults when it would read
    // the PD entry there (level 2), with reserved-bit semantics.
    let mut m = four_k(P | RW | US, P | US);
    m.set(0x2000, 0x10_0000_0000 | P | RW | US);
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(VA), UR, &mode).unwrap_err(), PageFault { error_code: 0xd, level: 2 });
    // A leaf page beyond RAM (the shadow pool, say).
    let mut m = four_k(P | RW | US, P | US);
    m.set(0x4028, 0x8000_0000 | P | US);
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(VA), UR, &mode).unwrap_err().error_code, 0xd);
    // A 1 GiB page that runs past the end of a 64 MiB RAM.
    let mut m = Mem::new(64 * MIB);
    m.set(0x1000, 0x2000 | P | RW | US);
    m.set(0x2000, P | RW | US | PS);
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(0x1000), UR, &mode).unwrap_err().error_code, 0xd);
}

#[test]
fn self_referencing_tables_terminate() {
    let mut m = Mem::new(64 * MIB);
    m.set(0x1000, 0x1000 | P | RW | US);
    let t = walk(&mut m, Gpa(CR3), Gva(0), UR, &PagingMode::default()).unwrap();
    assert_eq!((t.gpa, t.levels), (Gpa(0x1000), 4));
}

#[test]
fn smep_and_smap() {
    let mode = PagingMode { smep: true, smap: true, ..Default::default() };
    let mut m = four_k(P | RW | US, P | RW | US);
    let sx = Access { write: false, user: false, fetch: true };
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(VA), sx, &mode).unwrap_err().error_code, pf::P | pf::ID);
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(VA), R, &mode).unwrap_err().error_code, pf::P);
    let ac = PagingMode { ac: true, ..mode };
    assert!(walk(&mut m, Gpa(CR3), Gva(VA), R, &ac).is_ok());
    // SMEP alone makes a fetch report I/D even without NXE.
    let smep_only = PagingMode { nxe: false, smep: true, ..Default::default() };
    let mut m = four_k(P | RW | US, 0);
    assert_eq!(walk(&mut m, Gpa(CR3), Gva(VA), sx, &smep_only).unwrap_err().error_code, pf::ID);
}

/// Without 1 GiB pages in the guest's CPUID, PS in a PDPTE is a reserved
/// bit (issue 11, item 5: the walker accepted it and shadow mode then
/// answered FIXED forever for a leaf the vCPU could not use).
#[test]
fn ps_in_a_pdpte_is_reserved_without_1g_pages() {
    let mut m = Mem::new(64 * MIB);
    m.set(CR3, 0x2000 | P | RW | US);
    m.set(0x2000, P | RW | US | PS); // a 1 GiB page at GPA 0
    let with = PagingMode::default();
    assert!(with.pdpe1gb);
    // 64 MiB of RAM: the 1 GiB page is not wholly in RAM either way, so
    // put RAM at 2 GiB for the "with" case.
    let mut big = Mem::new(2 << 30);
    big.set(CR3, 0x2000 | P | RW | US);
    big.set(0x2000, P | RW | US | PS);
    assert_eq!(walk(&mut big, Gpa(CR3), Gva(0x1234), R, &with).unwrap().page_size, 1 << 30);
    let without = PagingMode { pdpe1gb: false, ..with };
    let f = walk(&mut big, Gpa(CR3), Gva(0x1234), R, &without).unwrap_err();
    assert_eq!((f.error_code, f.level), (pf::P | pf::RSVD, 3));
    let f = walk(&mut m, Gpa(CR3), Gva(0x1234), R, &without).unwrap_err();
    assert_eq!((f.error_code, f.level), (pf::P | pf::RSVD, 3));
}

/// On an AMD CPU bit 8 of a PML4 entry is reserved (it is ignored on
/// Intel): found by `tests/walker_vs_kvm.rs` on an AMD host, where KVM
/// answered "not mapped" for a PML4E with bit 8 set.
#[test]
fn pml4e_bit_8_is_reserved_on_amd_only() {
    let mut m = four_k(P | RW | US, P | RW | US);
    m.set(0x1000, 0x2000 | P | RW | US | (1 << 8));
    assert!(walk(&mut m, Gpa(CR3), Gva(VA), R, &PagingMode::default()).is_ok());
    let amd = PagingMode { amd: true, ..Default::default() };
    let f = walk(&mut m, Gpa(CR3), Gva(VA), R, &amd).unwrap_err();
    assert_eq!((f.error_code, f.level), (pf::P | pf::RSVD, 4));
    // Bit 8 lower down stays ignored.
    let mut m = four_k(P | RW | US | (1 << 8), P | RW | US);
    m.set(0x1000, 0x2000 | P | RW | US);
    assert!(walk(&mut m, Gpa(CR3), Gva(VA), R, &amd).is_ok());
}

/// Issue 11, item 6, the documented difference: a large page only partly in
/// RAM (a 1 GiB page at 0 in a 64 MiB guest) faults as a whole, with RSVD.
#[test]
fn a_large_page_partly_outside_ram_faults_with_rsvd() {
    let mut m = Mem::new(64 * MIB);
    m.set(CR3, 0x2000 | P | RW | US);
    m.set(0x2000, P | RW | US | PS);
    let f = walk(&mut m, Gpa(CR3), Gva(0x1000), R, &PagingMode::default()).unwrap_err();
    assert_eq!((f.error_code, f.level), (pf::P | pf::RSVD, 3));
}

/// A table in a frame the caller cannot trap is refused like a reserved
/// bit in the entry pointing at it (issue 11, item 7).
#[test]
fn tables_outside_the_trapped_frames_fault_with_rsvd() {
    struct Zoned(Mem);
    impl GuestPhys for Zoned {
        fn read_u64(&self, gpa: Gpa) -> u64 {
            let gpa = gpa.raw();
            self.0.read_u64(Gpa(gpa))
        }
        fn write_u64(&mut self, gpa: Gpa, value: u64) {
            let gpa = gpa.raw();
            self.0.write_u64(Gpa(gpa), value)
        }
        fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
            let gpa = gpa.raw();
            self.0.is_ram(Gpa(gpa), len)
        }
        fn may_hold_tables(&self, gpa: Gpa) -> bool {
            let gpa = gpa.raw();
            gpa != 0x5000
        }
    }
    let mut m = Zoned(four_k(P | RW | US, P | RW | US));
    assert!(walk(&mut m, Gpa(CR3), Gva(VA), R, &PagingMode::default()).is_ok());
    // The root itself outside: the PML4 entry used is "reserved".
    let f = walk(&mut m, Gpa(0x5000), Gva(VA), R, &PagingMode::default()).unwrap_err();
    assert_eq!((f.error_code, f.level), (pf::P | pf::RSVD, 4));
    // A PT outside: the PDE is.
    m.0.set(0x3000, 0x5000 | P | RW | US);
    let f = walk(&mut m, Gpa(CR3), Gva(VA), R, &PagingMode::default()).unwrap_err();
    assert_eq!((f.error_code, f.level), (pf::P | pf::RSVD, 2));
}

// ---- Differential testing against a deliberately naive reference ----

/// What the reference answers: `Ok((gpa, page size))` or `Err(error code)`,
/// and the A/D writes it made as `(gpa, new value)`.
type RefOutcome = (Result<(u64, u64), u32>, Vec<(u64, u64)>);

/// The reference: written from the SDM's tables, one rule per line, with
/// no shared helpers and no early-exit cleverness.
fn reference(mem: &Mem, cr3: u64, va: u64, acc: Access, mode: &PagingMode) -> RefOutcome {
    let id = if acc.fetch && (mode.nxe || mode.smep) { 16 } else { 0 };
    let base_ec = (if acc.write { 2 } else { 0 }) | (if acc.user { 4 } else { 0 }) | id;
    let in_ram = |a: u64, len: u64| a.checked_add(len).is_some_and(|e| e <= mem.ram);
    let mut used = Vec::new();
    let mut table = cr3 & 0x000f_ffff_ffff_f000;
    let shifts = [39u32, 30, 21, 12];
    for (i, shift) in shifts.iter().enumerate() {
        let level = 4 - i;
        let addr = table + ((va >> shift) & 511) * 8;
        if !in_ram(addr, 8) {
            return (Err(base_ec | 1 | 8), vec![]);
        }
        let e = mem.read_u64(Gpa(addr));
        if e & 1 == 0 {
            return (Err(base_ec), vec![]);
        }
        let mut bad = false;
        for bit in (mode.maxphyaddr as u32).clamp(32, 52)..52 {
            bad |= e & (1 << bit) != 0;
        }
        bad |= !mode.nxe && e & (1 << 63) != 0;
        bad |= level == 4 && e & (1 << 7) != 0;
        // AMD APM vol. 2 figure 5-18: PML4E bit 8 is reserved on AMD CPUs.
        bad |= level == 4 && e & (1 << 8) != 0 && mode.amd;
        // SDM vol. 3 §4.5, table 4-15: PS in a PDPTE is reserved without
        // 1 GiB-page support (CPUID 0x80000001 EDX[26]).
        bad |= level == 3 && e & (1 << 7) != 0 && !mode.pdpe1gb;
        if level == 3 && e & (1 << 7) != 0 {
            for bit in 13..30 {
                bad |= e & (1 << bit) != 0;
            }
        }
        if level == 2 && e & (1 << 7) != 0 {
            for bit in 13..21 {
                bad |= e & (1 << bit) != 0;
            }
        }
        if bad {
            return (Err(base_ec | 1 | 8), vec![]);
        }
        used.push((addr, e));
        let is_leaf = level == 1 || (level != 4 && e & (1 << 7) != 0);
        if is_leaf {
            let size = 1u64 << shift;
            let page = e & 0x000f_ffff_ffff_f000 & !(size - 1);
            if !in_ram(page, size) {
                return (Err(base_ec | 1 | 8), vec![]);
            }
            let w = used.iter().all(|(_, e)| e & 2 != 0);
            let u = used.iter().all(|(_, e)| e & 4 != 0);
            let x = !mode.nxe || used.iter().all(|(_, e)| e & (1 << 63) == 0);
            let ok = if acc.user {
                u && (!acc.write || w) && (!acc.fetch || x)
            } else if acc.fetch {
                x && !(mode.smep && u)
            } else {
                let smap_blocks = u && mode.smap && !mode.ac;
                let wp_blocks = acc.write && !w && mode.wp;
                !smap_blocks && !wp_blocks
            };
            if !ok {
                return (Err(base_ec | 1), vec![]);
            }
            let mut writes = Vec::new();
            let n = used.len();
            for (k, (a, e)) in used.iter().enumerate() {
                let mut v = *e | 32;
                if k == n - 1 && acc.write {
                    v |= 64;
                }
                if v != *e {
                    writes.push((*a, v));
                }
            }
            return (Ok((page | (va & (size - 1)), size)), writes);
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    unreachable!()
}

/// Table pages at 0x1000..0x9000; entries point at them, at data pages,
/// at addresses beyond RAM, or carry reserved bits.
fn entry_strategy() -> impl Strategy<Value = u64> {
    let target = prop_oneof![
        (1u64..9).prop_map(|p| p * 0x1000),
        Just(0x20_0000u64),
        Just(0x4000_0000u64),
        Just(0x100_0000_0000u64),
        any::<u64>().prop_map(|a| a & 0x000f_ffff_ffff_f000),
    ];
    let flags = prop_oneof![
        4 => (0u64..0x200).prop_map(|f| f | 1),
        1 => 0u64..0x200,
    ];
    let extra = prop_oneof![
        6 => Just(0u64),
        1 => Just(1u64 << 63),
        1 => (12u32..52).prop_map(|b| 1u64 << b),
    ];
    (target, flags, extra).prop_map(|(t, f, x)| t | f | x)
}

fn mode_strategy() -> impl Strategy<Value = PagingMode> {
    (any::<[bool; 7]>(), prop_oneof![Just(36u8), Just(40), Just(46), Just(52)]).prop_map(|(b, m)| PagingMode {
        wp: b[0],
        nxe: b[1],
        smep: b[2],
        smap: b[3],
        ac: b[4],
        maxphyaddr: m,
        pdpe1gb: b[5],
        amd: b[6],
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn walker_matches_the_reference(
        entries in proptest::collection::vec((1u64..9, 0u64..4, entry_strategy()), 1..40),
        va_parts in (0u64..4, 0u64..4, 0u64..4, 0u64..4, 0u64..0x1000),
        acc in (any::<bool>(), any::<bool>(), any::<bool>()),
        mode in mode_strategy(),
    ) {
        let mut mem = Mem::new(64 * MIB);
        for (page, idx, e) in entries {
            mem.set(page * 0x1000 + idx * 8, e);
        }
        let (a, b, c, d, off) = va_parts;
        let va = (a << 39) | (b << 30) | (c << 21) | (d << 12) | off;
        let access = Access { write: acc.0 && !acc.2, user: acc.1, fetch: acc.2 };
        let (want, writes) = reference(&mem, CR3, va, access, &mode);
        let mut after = mem.clone();
        let got = walk(&mut after, Gpa(CR3), Gva(va), access, &mode);
        match (got, want) {
            (Ok(t), Ok((gpa, size))) => {
                prop_assert_eq!((t.gpa, t.page_size), (Gpa(gpa), size));
                let mut expect = mem.clone();
                for (a, v) in writes {
                    expect.set(a, v);
                }
                prop_assert_eq!(after, expect, "A/D bits differ");
            }
            (Err(f), Err(code)) => {
                prop_assert_eq!(f.error_code, code);
                prop_assert_eq!(after, mem, "a faulting walk changed memory");
            }
            (got, want) => prop_assert!(false, "walker {:?} vs reference {:?}", got, want),
        }
    }
}
