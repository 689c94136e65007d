//! pv mode: batches against trapped writes, validation, prefetch, the
//! root cache sized from the pool and the published roots.

use super::tests::*;
use super::*;
use crate::walker::pf;
use guest_abi::pv::{BatchError, ENTRY_PAGE};
use proptest::prelude::*;

/// The page-table zone of the test guests: every table lies below 1 MiB.
const ZONE: (Gpa, Gpa) = (Gpa(0), Gpa(0x10_0000));

/// One guest write: an 8-byte entry, or a whole table page zeroed.
#[derive(Debug, Clone)]
enum Write {
    Entry { gpa: u64, value: u64 },
    ZeroPage(u64),
}

impl Write {
    fn apply(&self, g: &mut Mem) {
        match *self {
            Write::Entry { gpa, value } => g.write_u64(Gpa(gpa), value),
            Write::ZeroPage(page) => (0..512).for_each(|i| g.write_u64(Gpa(page + i * 8), 0)),
        }
    }
    fn queued(&self) -> u64 {
        match *self {
            Write::Entry { gpa, .. } => gpa,
            Write::ZeroPage(page) => page | ENTRY_PAGE,
        }
    }
    /// The same write through the trapping path (`pte_written` after each
    /// store; a page zeroed word by word traps 512 times).
    fn trap(&self, mmu: &mut ShadowMmu, cpu: &mut ShadowVcpu, pool: &mut Mem, g: &mut Mem) {
        match *self {
            Write::Entry { gpa, value } => {
                g.write_u64(Gpa(gpa), value);
                mmu.pte_written(cpu, pool, g, Gpa(gpa), 8);
            }
            Write::ZeroPage(page) => {
                for i in 0..512 {
                    g.write_u64(Gpa(page + i * 8), 0);
                    mmu.pte_written(cpu, pool, g, Gpa(page + i * 8), 8);
                }
            }
        }
    }
}

/// Two address spaces (roots 0x1000 and 0x2000) sharing the PT at
/// 0x22000 (slots 0..8), each with a private PT (slots 8..16 at 0x24000,
/// reached from 0x2000 only), and a kernel half: PML4 slot 511 → PDPT
/// 0x30000 → PD 0x31000 → PT 0x32000 (slots 16..24 at VA 0xffff_ff80_0000_0000 + i*4K).
fn two_spaces() -> Mem {
    let mut g = guest_with(0x1000, P | RW | US | A, 8);
    g.write_u64(Gpa(0x2000), 0x20000 | T);
    g.write_u64(Gpa(0x20000 + 8), 0x23000 | T);
    g.write_u64(Gpa(0x23000), 0x24000 | T);
    for root in [0x1000u64, 0x2000] {
        g.write_u64(Gpa(root + 511 * 8), 0x30000 | P | RW | A);
    }
    g.write_u64(Gpa(0x30000), 0x31000 | P | RW | A);
    g.write_u64(Gpa(0x31000), 0x32000 | P | RW | A);
    for i in 0..8 {
        g.write_u64(Gpa(0x32000 + i * 8), (0x20_0000 + i * PAGE) | P | RW | A | D);
    }
    g
}

fn slot_va(s: u8) -> u64 {
    match s {
        0..8 => va(s as u64),
        8..16 => (1u64 << 30) + (s as u64 - 8) * PAGE,
        _ => 0xffff_ff80_0000_0000 + (s as u64 - 16) * PAGE,
    }
}

fn slot_gpa(s: u8) -> u64 {
    match s {
        0..8 => 0x22000 + s as u64 * 8,
        8..16 => 0x24000 + (s as u64 - 8) * 8,
        _ => 0x32000 + (s as u64 - 16) * 8,
    }
}

/// The upper-level entries a batch may rewrite too.
const UPPER: [u64; 6] = [0x20000, 0x21000 + 16, 0x20008, 0x23000, 0x31000, 0x1000];

fn write() -> impl Strategy<Value = Write> {
    let leaf = prop_oneof![
        Just(P | RW | US | A | D),
        Just(P | US | A),
        Just(P | RW | A),
        Just(P | RW),
        Just(0u64),
        0u64..0x200
    ];
    let upper = prop_oneof![Just(T), Just(P | A), Just(P | US | A), Just(0u64)];
    prop_oneof![
        6 => (0u8..24, leaf, 0u64..8).prop_map(|(s, f, frame)| Write::Entry { gpa: slot_gpa(s), value: (0x10_0000 + frame * PAGE) | f }),
        2 => (0usize..UPPER.len(), upper).prop_map(|(i, f)| {
            let gpa = UPPER[i];
            // Keep each upper entry pointing at its own table.
            let table = match gpa { 0x20000 => 0x21000, 0x20008 => 0x23000, 0x23000 => 0x24000, 0x31000 => 0x32000, 0x1000 => 0x20000, _ => 0x22000 };
            Write::Entry { gpa, value: table | f }
        }),
        1 => prop_oneof![Just(0x22000u64), Just(0x24000), Just(0x32000)].prop_map(Write::ZeroPage),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Faults(Vec<(u8, bool, bool)>),
    Batch(Vec<Write>),
    Switch(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => proptest::collection::vec((0u8..24, any::<bool>(), any::<bool>()), 1..6).prop_map(Step::Faults),
        3 => proptest::collection::vec(write(), 1..12).prop_map(Step::Batch),
        1 => (0u8..2).prop_map(Step::Switch),
    ]
}

/// What the vCPU would see through the current root at every slot.
fn translations(mmu: &ShadowMmu, cpu: &ShadowVcpu, pool: &Mem) -> Vec<Option<(u64, u8)>> {
    (0..24).map(|s| mmu.shadow_leaf(cpu, pool, Gva(slot_va(s)))).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A batch applied after the writes gives the same guest memory and the
    /// same shadow translations as trapping each write as it happened.
    #[test]
    fn a_batch_equals_the_same_writes_trapped_one_at_a_time(steps in proptest::collection::vec(step(), 1..30)) {
        let (mut trap, mut trap_pool) = setup(256);
        let mut trap_cpu = trap.new_vcpu();
        let (mut pv, mut pv_pool) = setup(256);
        let mut pv_cpu = pv.new_vcpu();
        let (mut trap_g, mut pv_g) = (two_spaces(), two_spaces());
        let cr3s = [0x1000u64, 0x2000];
        trap.load_cr3(&mut trap_cpu, &mut trap_pool, &mut trap_g, Gpa(cr3s[0])).unwrap();
        pv.load_cr3(&mut pv_cpu, &mut pv_pool, &mut pv_g, Gpa(cr3s[0])).unwrap();
        for step in steps {
            match step {
                Step::Faults(faults) => {
                    for (s, write, user) in faults {
                        let ec = (if write { pf::W } else { 0 }) | (if user { pf::U } else { 0 });
                        let a = trap.handle_fault(&mut trap_cpu, &mut trap_pool, &mut trap_g, Gva(slot_va(s)), ec);
                        let b = pv.handle_fault(&mut pv_cpu, &mut pv_pool, &mut pv_g, Gva(slot_va(s)), ec);
                        prop_assert_eq!(a, b);
                    }
                }
                Step::Batch(writes) => {
                    for w in &writes {
                        w.trap(&mut trap, &mut trap_cpu, &mut trap_pool, &mut trap_g);
                        w.apply(&mut pv_g);
                    }
                    let queue: Vec<u64> = writes.iter().map(Write::queued).collect();
                    let out = pv.apply_batch(&mut pv_cpu, &mut pv_pool, &mut pv_g, &queue, ZONE);
                    prop_assert_eq!(out, BatchOutcome { applied: queue.len(), refused: None });
                }
                Step::Switch(i) => {
                    trap.load_cr3(&mut trap_cpu, &mut trap_pool, &mut trap_g, Gpa(cr3s[i as usize])).unwrap();
                    pv.load_cr3(&mut pv_cpu, &mut pv_pool, &mut pv_g, Gpa(cr3s[i as usize])).unwrap();
                }
            }
            prop_assert_eq!(&trap_g, &pv_g, "guest memory differs");
            prop_assert_eq!(translations(&trap, &trap_cpu, &trap_pool), translations(&pv, &pv_cpu, &pv_pool), "shadow translations differ");
            trap.host_invalidated();
            pv.host_invalidated();
            prop_assert!(pv.check_invariants(&pv_pool, &pv_g).is_ok(), "{:?}", pv.check_invariants(&pv_pool, &pv_g));
        }
    }
}

#[test]
fn a_bad_entry_stops_the_batch_and_says_where() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | US | A | D, 4);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(0)), READ), Ok(FaultOutcome::Fixed));
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(1)), READ), Ok(FaultOutcome::Fixed));
    g.write_u64(Gpa(0x22000), 0);
    g.write_u64(Gpa(0x22008), 0);
    // Entry 1 is outside the zone: entry 0 applied, entry 2 not.
    let out = mmu.apply_batch(&mut cpu, &mut pool, &mut g, &[0x22000, 0x20_0000, 0x22008], ZONE);
    assert_eq!(out, BatchOutcome { applied: 1, refused: Some(BatchError::OutsideZone) });
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(0))), None, "entry 0 was applied");
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(va(1))).is_some(), "entry 2 was not");
    for (bad, why) in [
        (0x22004, BatchError::Unaligned),
        (0x22002, BatchError::Unaligned),
        (0x22008 | ENTRY_PAGE, BatchError::Unaligned),
        (!7, BatchError::OutsideZone),
        (ZONE.1.raw(), BatchError::OutsideZone),
    ] {
        let out = mmu.apply_batch(&mut cpu, &mut pool, &mut g, &[bad, 0x22008], ZONE);
        assert_eq!(out, BatchOutcome { applied: 0, refused: Some(why) }, "{bad:#x}");
    }
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(va(1))).is_some(), "nothing after a bad entry is applied");
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn a_batch_marks_the_host_stale_once_and_refills_once() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | US | A | D, 64);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    for i in 0..64 {
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(i)), WRITE), Ok(FaultOutcome::Fixed));
    }
    mmu.host_invalidated();
    let before = mmu.stats();
    // Tear down 64 mappings in one batch.
    let queue: Vec<u64> = (0..64).map(|i| 0x22000 + i * 8).collect();
    for &q in &queue {
        g.write_u64(Gpa(q), 0);
    }
    mmu.apply_batch(&mut cpu, &mut pool, &mut g, &queue, ZONE);
    assert!(mmu.host_stale());
    mmu.host_invalidated();
    let d = mmu.stats().since(&before);
    assert_eq!((d.batches, d.batch_entries, d.pte_writes, d.zaps, d.host_invalidations), (1, 64, 64, 64, 1));
    assert!((0..64).all(|i| mmu.shadow_leaf(&cpu, &pool, Gva(va(i))).is_none()));
}

#[test]
fn prefetch_shadows_what_the_guest_just_mapped_without_touching_it() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = guest_with(0x1000, P | RW | US | A | D, 2);
    g.write_u64(Gpa(0x22010), 0x10_2000 | P | RW | US | A); // clean: read-only shadow
    g.write_u64(Gpa(0x22018), 0x10_3000 | P | RW | US); // never accessed: not shadowed
    g.write_u64(Gpa(0x22020), 0x10_4000 | P | RW | US | A | D | (1 << 51)); // reserved bit
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    let before = g.clone();
    assert!(mmu.prefetch(&cpu, &mut pool, &mut g, Gva(va(0))));
    assert!(mmu.prefetch(&cpu, &mut pool, &mut g, Gva(va(2))));
    assert!(!mmu.prefetch(&cpu, &mut pool, &mut g, Gva(va(3))));
    assert!(!mmu.prefetch(&cpu, &mut pool, &mut g, Gva(va(4))));
    assert!(!mmu.prefetch(&cpu, &mut pool, &mut g, Gva(va(9))));
    assert_eq!(g, before, "prefetch sets no A/D bit");
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(0))).map(|(e, _)| e & (ADDR | RW)), Some(0x10_0000 | RW));
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(2))).map(|(e, _)| e & (ADDR | RW)), Some(0x10_2000));
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(3))), None);
    assert_eq!(mmu.stats().prefetches, 2);
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn a_flush_after_a_folio_fault_shadows_every_pte_the_batch_wrote() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    // No PT under the PD yet: the fault maps a 64 KiB folio into a fresh one.
    let mut g = guest_with(0x1000, 0, 0);
    g.write_u64(Gpa(0x21000 + 2 * 8), 0);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    let mut batch = vec![0x22000 | ENTRY_PAGE, 0x21000 + 2 * 8];
    g.write_u64(Gpa(0x21000 + 2 * 8), 0x22000 | T);
    for i in 0..16 {
        g.write_u64(Gpa(0x22000 + i * 8), (0x10_0000 + i * PAGE) | P | RW | US | A | D);
        batch.push(0x22000 + i * 8);
    }
    // A PTE the batch did not write (mapped earlier, say): left to a fault.
    g.write_u64(Gpa(0x22000 + 16 * 8), 0x11_0000 | P | RW | US | A | D);
    assert_eq!(mmu.apply_batch(&mut cpu, &mut pool, &mut g, &batch, ZONE).refused, None);
    // Without the prefetch nothing was derived from the new table yet.
    assert_eq!(mmu.prefetch_batch(&cpu, &mut pool, &mut g, None, &batch), 0);
    assert_eq!(mmu.prefetch_batch(&cpu, &mut pool, &mut g, Some(Gva(va(5))), &batch), 15);
    for i in 0..16 {
        let leaf = mmu.shadow_leaf(&cpu, &pool, Gva(va(i))).map(|(e, _)| e & (ADDR | RW));
        assert_eq!(leaf, Some((0x10_0000 + i * PAGE) | RW), "page {i} of the folio");
    }
    assert_eq!(mmu.shadow_leaf(&cpu, &pool, Gva(va(16))), None, "only what the batch wrote");
    assert_eq!((mmu.stats().prefetches, mmu.stats().batch_fills), (1, 15));
    // A second flush of the same entries finds them all present.
    assert_eq!(mmu.prefetch_batch(&cpu, &mut pool, &mut g, Some(Gva(va(5))), &batch), 0);
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn the_root_cache_grows_with_the_pool_and_a_miss_frees_only_the_evicted_root() {
    let (mmu, _) = setup(64);
    assert_eq!(mmu.root_cache_capacity(), ROOT_CACHE);
    let (mut mmu, mut pool) = setup(4096);
    let mut cpu = mmu.new_vcpu();
    assert_eq!(mmu.root_cache_capacity(), 128);
    assert_eq!(setup(1 << 16).0.root_cache_capacity(), MAX_ROOTS);
    // 130 address spaces sharing a kernel half, each with its own user page.
    let mut g = Mem::new(0, RAM);
    g.write_u64(Gpa(0x30000), 0x31000 | P | RW | A);
    g.write_u64(Gpa(0x31000), 0x32000 | P | RW | A);
    g.write_u64(Gpa(0x32000), 0x20_0000 | P | RW | A | D);
    let root = |i: u64| 0x40_0000 + i * 4 * PAGE;
    for i in 0..130 {
        let r = root(i);
        g.write_u64(Gpa(r + 511 * 8), 0x30000 | P | RW | A);
        g.write_u64(Gpa(r), (r + PAGE) | T);
        g.write_u64(Gpa(r + PAGE), (r + 2 * PAGE) | T);
        g.write_u64(Gpa(r + 2 * PAGE), (r + 3 * PAGE) | T);
        g.write_u64(Gpa(r + 3 * PAGE), (0x10_0000 + i * PAGE) | P | RW | US | A | D);
    }
    for i in 0..128 {
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(root(i))).unwrap();
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(0), READ), Ok(FaultOutcome::Fixed));
    }
    assert_eq!(mmu.published_roots().count(), 128);
    assert_eq!(mmu.published_roots().next(), Some((Gpa(root(127)), mmu.current_root(&cpu).unwrap())));
    let before = mmu.stats();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(root(128))).unwrap();
    let d = mmu.stats().since(&before);
    // The evicted root (space 0) loses its own root, PDPT, PD and PT: the
    // one user leaf and the three links below its root, plus its kernel-half
    // link; nothing shared is touched.
    assert_eq!((d.root_misses, d.zaps, d.pool_exhaustions), (1, 5, 0));
    assert!(mmu.published_roots().all(|(g, _)| g != Gpa(root(0))));
    // Every other root is still a hit.
    let before = mmu.stats();
    for i in 1..128 {
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(root(i))).unwrap();
    }
    assert_eq!(mmu.stats().since(&before).root_misses, 0);
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn a_root_whose_kernel_half_was_zapped_is_not_published_until_reloaded() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = two_spaces();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.published_roots().count(), 2);
    // Root 0x2000 (not current) loses its kernel-half entry.
    g.write_u64(Gpa(0x2000 + 511 * 8), 0);
    mmu.apply_batch(&mut cpu, &mut pool, &mut g, &[0x2000 + 511 * 8], ZONE);
    assert_eq!(mmu.published_roots().map(|(g, _)| g).collect::<Vec<_>>(), vec![Gpa(0x1000)]);
    mmu.follow_guest_root(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    assert_eq!(mmu.published_roots().count(), 2);
    // Following the current root again is free.
    let loads = mmu.stats().cr3_loads;
    mmu.follow_guest_root(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    assert_eq!(mmu.stats().cr3_loads, loads);
}

#[test]
fn a_root_rebuilt_across_batches_is_published_only_with_its_kernel_half() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    let mut g = two_spaces();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    // The guest frees the space at 0x2000 and builds a new one in the same
    // frame: the zeroing is synced first (the queue filled up) ...
    (0..512).for_each(|i| g.write_u64(Gpa(0x2000 + i * 8), 0));
    mmu.apply_batch(&mut cpu, &mut pool, &mut g, &[0x2000 | ENTRY_PAGE], ZONE);
    // ... and the empty root becomes current (the guest's CR3 was there).
    assert!(mmu.follow_shadow_root(&mut cpu, &mut pool, &mut g, mmu.published_roots().last().unwrap().1.gpa()).is_ok());
    mmu.follow_guest_root(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    mmu.follow_guest_root(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    // Then its kernel-half entry is written and synced.
    g.write_u64(Gpa(0x2000 + 511 * 8), 0x30000 | P | RW | A);
    mmu.apply_batch(&mut cpu, &mut pool, &mut g, &[0x2000 + 511 * 8], ZONE);
    // It must not be published before it is refilled: a guest loading it
    // could not take a fault.
    assert!(mmu.published_roots().all(|(r, _)| r != Gpa(0x2000)), "published without its kernel half");
    let root = mmu.follow_guest_root(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    assert_ne!(pool.read_u64(Gpa(root.gpa().raw() + 511 * 8)), 0, "refilled at the next load");
    assert!(mmu.published_roots().any(|(r, _)| r == Gpa(0x2000)));
}

#[test]
fn tearing_down_a_space_that_is_not_loaded_defers_the_host_invalidation_to_its_next_load() {
    let (mut mmu, mut pool) = setup(64);
    let mut cpu = mmu.new_vcpu();
    mmu.set_defer_unreachable(true);
    let mut g = two_spaces();
    // A third space, 0x3000, sharing nothing below its root but the kernel
    // half: PDPT 0x25000 -> PD 0x26000 -> PT 0x27000, 8 pages at VA 0.
    g.write_u64(Gpa(0x3000), 0x25000 | T);
    g.write_u64(Gpa(0x3000 + 511 * 8), 0x30000 | P | RW | A);
    g.write_u64(Gpa(0x25000), 0x26000 | T);
    g.write_u64(Gpa(0x26000), 0x27000 | T);
    let pte = |i: u64| 0x27000 + i * 8;
    for i in 0..8 {
        g.write_u64(Gpa(pte(i)), (0x10_0000 + i * PAGE) | P | RW | US | A);
    }
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x3000)).unwrap();
    for i in 0..8 {
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(i * PAGE), READ), Ok(FaultOutcome::Fixed));
    }
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(slot_va(0)), READ), Ok(FaultOutcome::Fixed));
    mmu.host_invalidated();
    // Tear down 0x3000's PT while 0x1000 runs: eight trapped writes, no
    // host invalidation.
    for i in 0..8 {
        g.write_u64(Gpa(pte(i)), 0);
        mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(pte(i)), 8);
        assert!(!mmu.host_stale(), "entry {i}: nothing the loaded root reaches changed");
    }
    assert_eq!(mmu.stats().zaps, 8);
    // Loading 0x3000 again: the host must forget first.
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x3000)).unwrap();
    assert!(mmu.host_stale(), "a root reaching a deferred change is loaded: the host must forget first");
    mmu.host_invalidated();
    // A change the loaded root reaches is never deferred.
    g.write_u64(Gpa(0x25000), 0);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x25000), 8);
    assert!(mmu.host_stale());
    mmu.host_invalidated();
    // Loading a root that reaches none of the deferred changes costs none.
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    g.write_u64(Gpa(0x3000), 0x25000 | T);
    g.write_u64(Gpa(0x25000), 0x26000 | T);
    g.write_u64(Gpa(pte(0)), 0x10_0000 | P | RW | US | A);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x3000)).unwrap();
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(0), READ), Ok(FaultOutcome::Fixed));
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    mmu.host_invalidated();
    g.write_u64(Gpa(pte(0)), 0);
    mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(pte(0)), 8);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    assert!(!mmu.host_stale(), "0x2000 does not reach 0x3000's tables");
    mmu.check_invariants(&pool, &g).unwrap();
}
