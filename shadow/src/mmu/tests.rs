use super::*;
use crate::walker::pf;
use proptest::prelude::*;

pub(super) use super::test_mem::Mem;

pub(super) const MIB: u64 = 1 << 20;
pub(super) const RAM: u64 = 64 * MIB;
pub(super) const POOL: u64 = 2 << 30;
pub(super) const T: u64 = P | RW | US | A; // an upper-level guest entry the guest has used

/// Guest with PML4 at `cr3`, PDPT 0x20000, PD 0x21000, PT 0x22000 mapping
/// VA 0x40_0000 + i*4K (PD index 2, PT index i) to 0x100000 + i*4K.
pub(super) fn guest_with(cr3: u64, leaf: u64, n: u64) -> Mem {
    let mut g = Mem::new(0, RAM);
    g.write_u64(Gpa(cr3), 0x20000 | T);
    g.write_u64(Gpa(0x20000), 0x21000 | T);
    g.write_u64(Gpa(0x21000 + 2 * 8), 0x22000 | T);
    for i in 0..n {
        g.write_u64(Gpa(0x22000 + i * 8), (0x10_0000 + i * PAGE) | leaf);
    }
    g
}

pub(super) fn va(i: u64) -> u64 {
    0x40_0000 + i * PAGE
}

pub(super) fn setup(pages: u32) -> (ShadowMmu, Mem) {
    (ShadowMmu::new(Gpa(POOL), pages, PagingMode::default()), Mem::new(POOL, pages as u64 * PAGE))
}

pub(super) const READ: u32 = 0;
pub(super) const WRITE: u32 = pf::W;

#[test]
fn demand_fault_costs_one_hidden_fault_and_emulates_a_and_d() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW, 4);
    let root = mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert!(mmu.in_pool(root.gpa()));
    // A read of a never-touched page: hidden fault; the guest's A is set,
    // D is not, and the shadow maps it read-only (clean page).
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(1) + 8), READ), Ok(FaultOutcome::Fixed));
    let gpte = g.get(0x22008);
    assert!(gpte & A != 0 && gpte & D == 0);
    let (spte, level) = mmu.shadow_leaf(&cpu, &pool, Gva(va(1))).unwrap();
    assert_eq!((spte & ADDR, level), (0x10_1000, 1));
    assert_eq!(spte & RW, 0, "a clean page is shadowed read-only");
    // The first write: another hidden fault; now D is set and RW granted.
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(1)), WRITE), Ok(FaultOutcome::Fixed));
    assert!(g.get(0x22008) & D != 0);
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(va(1))).unwrap().0 & RW != 0);
    assert_eq!(mmu.stats().hidden_faults, 2);
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn a_hidden_fault_shadows_the_used_ptes_of_its_aligned_block_beside_it() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    // A 64 KiB folio (PTEs 16..32, A and D set) mapped before any shadow
    // page existed, a never-used PTE in it, and a used one past the block.
    let mut g = guest_with(0x1000, 0, 0);
    for i in 16..33 {
        g.write_u64(Gpa(0x22000 + i * 8), (0x10_0000 + i * PAGE) | P | RW | US | A | D);
    }
    g.write_u64(Gpa(0x22000 + 20 * 8), 0x10_0000 | P | RW | US);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    let before = g.clone();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(17)), WRITE), Ok(FaultOutcome::Fixed));
    assert_eq!(g, before, "A and D were set already: nothing written");
    for i in (16..32).filter(|&i| i != 20) {
        let leaf = mmu.shadow_leaf(&cpu, &pool, Gva(va(i))).map(|(e, _)| e & (ADDR | RW));
        assert_eq!(leaf, Some((0x10_0000 + i * PAGE) | RW), "PTE {i}");
    }
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(20))), None, "never used: no A, not shadowed");
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(32))), None, "outside the block");
    assert_eq!((mmu.stats().hidden_faults, mmu.stats().pte_prefetches), (1, 14));
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn a_true_guest_fault_is_passed_on_with_the_guest_error_code() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P, 2); // supervisor, read-only
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    let before = g.clone();
    assert_eq!(
        mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(0)), WRITE | pf::U),
        Ok(FaultOutcome::GuestFault(0x7))
    );
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(9)), pf::U), Ok(FaultOutcome::GuestFault(0x4)));
    assert_eq!(g, before, "a guest fault changes no guest A/D bit");
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(0))), None);
    assert_eq!(mmu.stats().guest_faults, 2);
}

#[test]
fn the_shadow_pool_and_memory_beyond_ram_are_never_mapped() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | A | D, 1);
    g.write_u64(Gpa(0x22000), POOL | P | RW | A | D); // the guest points at the pool
    g.write_u64(Gpa(0x22008), (RAM + PAGE) | P | RW | A | D); // and past RAM
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    for i in 0..2 {
        let r = mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(i)), READ);
        assert_eq!(r, Ok(FaultOutcome::GuestFault(pf::P | pf::RSVD)), "entry {i}");
        assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(i))), None);
    }
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn root_cache_switches_without_rebuilding() {
    let (mut mmu, mut pool) = setup(128);
    let mut cpu = mmu.new_vcpu();
    let mut g = Mem::new(0, RAM);
    let roots = [0x1000u64, 0x2000, 0x3000, 0x4000];
    for &r in &roots {
        g.write_u64(Gpa(r), 0x20000 | T);
    }
    for round in 0..3 {
        for &r in &roots {
            mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(r)).unwrap();
        }
        assert_eq!(mmu.stats().root_misses, 4, "round {round} rebuilt a root");
    }
    assert_eq!(mmu.stats().root_hits, 8);
    assert_eq!(mmu.stats().cr3_loads, 12);
}

#[test]
fn kernel_half_is_prefilled_and_shared_between_roots() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = Mem::new(0, RAM);
    // Two PML4s sharing one kernel PDPT (index 511) with a 2 MiB mapping.
    for r in [0x1000u64, 0x2000] {
        g.write_u64(Gpa(r + 511 * 8), 0x30000 | T);
    }
    g.write_u64(Gpa(0x30000 + 510 * 8), 0x31000 | T);
    g.write_u64(Gpa(0x31000 + 8), 0x20_0000 | P | RW | A | D | PS);
    let kva = 0xffff_ffff_8020_0000u64;
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(kva)).map(|(e, l)| (e & ADDR, l)), Some((0x20_0000, 2)), "prefilled");
    let used = mmu.stats().pages_in_use;
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    assert_eq!(mmu.stats().pages_in_use, used + 1, "the second root shares the kernel subtree");
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(kva)).is_some());
    assert_eq!(mmu.stats().hidden_faults, 0);
}

#[test]
fn pte_writes_update_in_place_or_zap_and_mark_the_host_stale() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW, 4);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(0)), WRITE).unwrap();
    mmu.host_invalidated();
    // A new mapping written with A set (demand paging): updated in place,
    // no fault needed, nothing stale.
    g.write_u64(Gpa(0x22000 + 3 * 8), 0x30_0000 | P | RW | A);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000 + 3 * 8), 8);
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(3))).map(|(e, _)| e & ADDR), Some(0x30_0000));
    assert!(!mmu.host_stale());
    assert_eq!(mmu.stats().pte_updates_in_place, 1);
    // Unmapping zaps and needs the host to forget.
    g.write_u64(Gpa(0x22000), 0);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000), 8);
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(0))), None);
    assert!(mmu.host_stale());
    mmu.host_invalidated();
    // Write-protecting a writable, dirty page (copy-on-write) restricts:
    // stale again.
    mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(3)), WRITE).unwrap();
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(va(3))).unwrap().0 & RW != 0);
    mmu.host_invalidated();
    g.write_u64(Gpa(0x22000 + 3 * 8), 0x30_0000 | P | A | D);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000 + 3 * 8), 8);
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(3))).unwrap().0 & RW, 0);
    assert!(mmu.host_stale());
    // Clearing A (aging) zaps the shadow leaf, so the next access faults
    // and sets A again, exactly.
    mmu.host_invalidated();
    g.write_u64(Gpa(0x22000 + 3 * 8), 0x30_0000 | P);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000 + 3 * 8), 8);
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(3))), None);
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(3)), READ), Ok(FaultOutcome::Fixed));
    assert!(g.get(0x22018) & A != 0);
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn partial_writes_zap_the_whole_shadow_page() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | A | D, 4);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    for i in 0..4 {
        mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(i)), READ).unwrap();
    }
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22004), 4);
    for i in 0..4 {
        assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(i))), None, "entry {i} survived a partial write");
    }
    mmu.check_invariants(&pool, &g).unwrap();
}

/// One PML4 at 0x1000 over 8 PDPT entries, each with its own PD and PT
/// mapping one page: 8 paths of 3 shadow pages each, far more than a tiny
/// pool holds.
fn eight_paths() -> Mem {
    let mut g = Mem::new(0, RAM);
    g.write_u64(Gpa(0x1000), 0x20000 | T);
    for i in 0..8u64 {
        g.write_u64(Gpa(0x20000 + i * 8), (0x30000 + i * 0x2000) | T);
        g.write_u64(Gpa(0x30000 + i * 0x2000), (0x31000 + i * 0x2000) | T);
        g.write_u64(Gpa(0x31000 + i * 0x2000), (0x80_0000 + i * PAGE) | P | RW | A | D);
    }
    g
}

#[test]
fn pool_exhaustion_zaps_everything_and_stays_correct() {
    let (mut mmu, mut pool) = setup(6);
    let mut cpu = mmu.new_vcpu();
    let mut g = eight_paths();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    for i in 0..8u64 {
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(i << 30), READ), Ok(FaultOutcome::Fixed));
        assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(i << 30)).map(|(e, _)| e & ADDR), Some(0x80_0000 + i * PAGE));
        mmu.host_invalidated();
    }
    assert!(mmu.stats().pool_exhaustions > 0);
    mmu.check_invariants(&pool, &g).unwrap();
}

// ---- Property: the shadow is never more permissive than the guest ----

#[derive(Debug, Clone)]
enum Op {
    Fault { slot: u8, write: bool, user: bool },
    WritePte { slot: u8, value: u64 },
    Switch(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let flags = prop_oneof![Just(P | RW | US | A | D), Just(P | US | A), Just(P | RW), Just(0u64), 0u64..0x200];
    prop_oneof![
        4 => (0u8..16, any::<bool>(), any::<bool>()).prop_map(|(slot, write, user)| Op::Fault { slot, write, user }),
        3 => (0u8..16, flags, 0u64..8).prop_map(|(slot, f, frame)| Op::WritePte { slot, value: (0x10_0000 + frame * PAGE) | f }),
        1 => (0u8..2).prop_map(Op::Switch),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn shadow_never_grants_more_than_the_guest(ops in proptest::collection::vec(op(), 1..80), pool_pages in 4u32..16) {
        let (mut mmu, mut pool) = (ShadowMmu::new(Gpa(POOL), pool_pages, PagingMode::default()), Mem::new(POOL, pool_pages as u64 * PAGE));
        let mut cpu = mmu.new_vcpu();
        // Two address spaces sharing the PT at 0x22000 (slots 0..8) and
        // each with a private PT (slots 8..16).
        let mut g = guest_with(0x1000, P | RW | US, 8);
        g.write_u64(Gpa(0x2000), 0x20000 | T);
        g.write_u64(Gpa(0x20000 + 8), 0x23000 | T);
        g.write_u64(Gpa(0x23000), 0x24000 | T);
        let slot_va = |s: u8| if s < 8 { va(s as u64) } else { (1u64 << 30) + (s as u64 - 8) * PAGE };
        let slot_gpa = |s: u8| if s < 8 { 0x22000 + s as u64 * 8 } else { 0x24000 + (s as u64 - 8) * 8 };
        let cr3s = [0x1000u64, 0x2000];
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(cr3s[0])).unwrap();
        for op in ops {
            match op {
                Op::Fault { slot, write, user } => {
                    let ec = (if write { pf::W } else { 0 }) | (if user { pf::U } else { 0 });
                    // The same fault twice with nothing changed cannot come
                    // from a vCPU: the MMU calls it a livelock (invariant 7).
                    let r = mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(slot_va(slot)), ec);
                    prop_assert!(matches!(r, Ok(_) | Err(ShadowError::Livelock { .. })), "{:?}", r);
                }
                Op::WritePte { slot, value } => {
                    g.write_u64(Gpa(slot_gpa(slot)), value);
                    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(slot_gpa(slot)), 8);
                }
                Op::Switch(i) => { mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(cr3s[i as usize])).unwrap(); }
            }
            mmu.host_invalidated();
            prop_assert!(mmu.check_invariants(&pool, &g).is_ok(), "{:?}", mmu.check_invariants(&pool, &g));
            // Every shadow leaf of the current root must be allowed by a
            // side-effect-free guest walk, to the same GPA.
            let cr3 = mmu.guest_cr3(&cpu).unwrap();
            for s in 0..16u8 {
                let Some((spte, _)) = mmu.shadow_leaf(&cpu, &pool, Gva(slot_va(s))) else { continue };
                let mut probe = g.clone();
                let access = Access { write: spte & RW != 0, user: spte & US != 0, fetch: false };
                let t = walker::walk(&mut probe, cr3, Gva(slot_va(s)), access, &PagingMode::default());
                prop_assert!(t.is_ok(), "shadow grants {:#x} at slot {} but the guest says {:?}", spte, s, t);
                let t = t.unwrap();
                prop_assert_eq!(t.gpa.raw() & ADDR, spte & ADDR);
                prop_assert_eq!(probe, g.clone(), "shadowed page lacks A (or D when writable) in the guest");
            }
        }
    }
}

#[test]
fn a_reused_root_frame_gets_its_kernel_half_back_on_the_next_load() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = Mem::new(0, RAM);
    g.write_u64(Gpa(0x1000 + 511 * 8), 0x30000 | T);
    g.write_u64(Gpa(0x30000 + 510 * 8), 0x31000 | T);
    g.write_u64(Gpa(0x31000), 0x20_0000 | P | RW | A | D | PS);
    let kva = 0xffff_ffff_8000_0000u64;
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    // The guest tears the first PML4 down (its kernel entry zeroed)...
    g.write_u64(Gpa(0x1000 + 511 * 8), 0);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x1000 + 511 * 8), 8);
    // ...and reuses the frame for a new address space.
    g.write_u64(Gpa(0x1000 + 511 * 8), 0x30000 | T);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x1000 + 511 * 8), 8);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.stats().root_hits, 1);
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(kva)).is_some(), "kernel half missing after a root-cache hit");
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn a_large_page_turned_into_a_table_behind_the_mmus_back_is_handled() {
    // Nothing forces the guest to keep its tables in the trapped zone: a
    // PD entry can change from a 2 MiB leaf to a table pointer without a
    // pte_written call. The next fault must relink, not trip over the leaf.
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = Mem::new(0, RAM);
    g.write_u64(Gpa(0x1000), 0x20000 | T);
    g.write_u64(Gpa(0x20000), 0x21000 | T);
    g.write_u64(Gpa(0x21000), 0x20_0000 | P | RW | US | A | PS); // clean 2 MiB page
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(0x1000), READ), Ok(FaultOutcome::Fixed));
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(0x1000)).map(|(_, l)| l), Some(2));
    // Untrapped rewrite: PD[0] now points at a page table.
    g.write_u64(Gpa(0x21000), 0x22000 | T);
    g.write_u64(Gpa(0x22000 + 8), 0x30_0000 | P | RW | US | A | D);
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(0x1000), WRITE), Ok(FaultOutcome::Fixed));
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(0x1000)).map(|(e, l)| (e & ADDR, l)), Some((0x30_0000, 1)));
    assert!(mmu.host_stale(), "the old 2 MiB translation must be forgotten");
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn pool_exhaustion_moves_the_root_and_says_where() {
    // After a full zap the root is rebuilt, possibly in another pool page:
    // current_root() must always name a page that really is the root, so
    // the VMM can point the vCPU's CR3 at it (vm.rs does after every fault).
    let (mut mmu, mut pool) = setup(6);
    let mut cpu = mmu.new_vcpu();
    let mut g = eight_paths();
    let mut roots = vec![mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap()];
    for i in 0..8u64 {
        mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(i << 30), READ).unwrap();
        let root = mmu.current_root(&cpu).unwrap();
        // The reported root is the live one: it holds the new path.
        assert!(pool.get(root.gpa().raw()) & P != 0, "fault {i}: the reported root is empty");
        assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(i << 30)).map(|(e, _)| e & ADDR), Some(0x80_0000 + i * PAGE));
        if roots.last() != Some(&root) {
            roots.push(root);
        }
    }
    assert!(mmu.stats().pool_exhaustions > 0);
    assert!(roots.len() > 1, "this scenario moves the root; the VMM must follow it: {roots:x?}");
}

/// Per VM and per vCPU: a zap of everything, done by the VM alone, leaves
/// the vCPU with no current root (its root is of an old generation), until
/// its next `LOAD_CR3`, fault or entry rebuilds the root of the guest CR3
/// it last loaded; its old root page is held meanwhile (its CR3 points
/// there), never reused.
#[test]
fn a_zap_of_everything_makes_the_vcpus_root_obsolete() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | A, 4);
    let root = mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.current_root(&cpu), Some(root));
    mmu.zap_all(&mut pool);
    assert_eq!((mmu.current_root(&cpu), mmu.guest_cr3(&cpu)), (None, None));
    assert!(!mmu.prefetch(&cpu, &mut pool, &mut g, Gva(va(0))), "no root: nothing to prefetch into");
    let old = mmu.page_of(root.gpa().raw()).unwrap();
    assert!(mmu.held.contains(&old) && !mmu.free.contains(&old), "the old root is held, not reusable");
    // The fault rebuilds the root of the guest CR3 the vCPU last loaded.
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(0)), READ), Ok(FaultOutcome::Fixed));
    assert_eq!(mmu.guest_cr3(&cpu), Some(Gpa(0x1000)));
    assert_ne!(mmu.current_root(&cpu), Some(root));
    assert!(!mmu.held.contains(&old), "left by its only vCPU: quarantined");
    // A vCPU with no root at all still gets NoRoot.
    let mut fresh = mmu.new_vcpu();
    assert_eq!(mmu.handle_fault(&mut fresh, &mut pool, &mut g, Gva(va(0)), READ), Err(ShadowError::NoRoot));
    mmu.check_invariants(&pool, &g).unwrap();
}

/// Issue 22, item 7: the per-pool-page bookkeeping costs what the pages in
/// use cost, not what the pool's size does (a 64 GiB pool cost 1.4 GB of
/// VMM memory before the guest ran an instruction).
#[test]
fn a_huge_pool_costs_only_the_pages_in_use() {
    let pages = 1u32 << 22; // a 16 GiB pool
    let mut mmu = ShadowMmu::new(Gpa(POOL), pages, PagingMode::default());
    assert_eq!(mmu.free_pages(), pages as usize);
    assert!(mmu.pages.capacity() < 64 && mmu.free.capacity() < 64, "bookkeeping allocated up front");
    // Only the pages the guest's tables need are ever touched.
    let mut pool = Mem::new(POOL, 64 * PAGE);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | A, 4);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(1)), READ), Ok(FaultOutcome::Fixed));
    let in_use = mmu.stats().pages_in_use as usize;
    assert!(in_use > 0 && mmu.pages.len() == in_use, "{in_use} in use, {} tracked", mmu.pages.len());
    assert_eq!(mmu.free_pages() + in_use, pages as usize);
    assert!(mmu.in_pool(Gpa(POOL + (u64::from(pages) - 1) * PAGE)), "the whole pool is still the pool");
    // Freed pages are reused before untouched ones.
    mmu.zap_all(&mut pool);
    mmu.host_invalidated();
    let root = mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert!(root.gpa().raw() < POOL + 64 * PAGE && mmu.pages.len() == in_use);
    mmu.check_invariants(&pool, &g).unwrap();
}

/// Issue 22, item 5 (found by the SMEP/SMAP rows on the nested host whose
/// KVM shadows page tables): a supervisor leaf that becomes a user leaf
/// loses rights under SMAP and SMEP, so the host must forget the old one.
#[test]
fn a_leaf_gaining_the_user_bit_marks_the_host_stale() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | A | D, 4);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(2)), READ).unwrap();
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(2))).unwrap().0 & US, 0);
    mmu.host_invalidated();
    g.write_u64(Gpa(0x22000 + 2 * 8), (0x10_0000 + 2 * PAGE) | P | RW | US | A | D);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000 + 2 * 8), 8);
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(va(2))).unwrap().0 & US != 0, "updated in place");
    assert!(mmu.host_stale(), "US set takes supervisor rights away under SMAP/SMEP");
    mmu.check_invariants(&pool, &g).unwrap();
}
