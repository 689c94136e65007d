//! Property test: random operation sequences run against the allocator and
//! against a trivially correct model (a bitmap of free frames), with every
//! answer compared and every invariant checked after each step.

use proptest::prelude::*;

use super::*;

/// The span: 256 DMA frames below 16 MiB, then NORMAL with the page-table
/// zone inside it, two maximal (order-10) NORMAL blocks, a reserved hole,
/// and reserved frames at both ends.
const BASE: Pfn = Pfn(DMA_LIMIT.0 - 256);
const FRAMES: u64 = 3328;
const PGTABLES: FrameRange = FrameRange { start: Pfn(DMA_LIMIT.0 + 512), end: Pfn(DMA_LIMIT.0 + 528) };
const ADDED: [FrameRange; 2] = [
    FrameRange { start: Pfn(BASE.0 + 3), end: Pfn(6500) },
    FrameRange { start: Pfn(6510), end: Pfn(BASE.0 + FRAMES - 5) },
];
/// Written into the first word of every frame of an ordinary allocation,
/// and checked when it is freed: the allocator must not touch allocated
/// memory.
const STAMP: u64 = 0x5a5a_0000_0000_0000;

#[derive(Clone, Debug)]
enum Op {
    Alloc { order: u8, pref: ZonePref, zeroed: bool },
    AllocPgtable,
    Free { pick: usize },
    FreePgtable { pick: usize, dirty: bool },
    BadFree { pick: usize, kind: u8 },
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    let order = prop_oneof![4 => 0..=2u8, 1 => 0..=MAX_ORDER + 1];
    let pref = prop_oneof![3 => Just(ZonePref::Normal), 1 => Just(ZonePref::Dma)];
    prop_oneof![
        6 => (order, pref, any::<bool>()).prop_map(|(order, pref, zeroed)| Op::Alloc { order, pref, zeroed }),
        2 => Just(Op::AllocPgtable),
        6 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, dirty)| Op::FreePgtable { pick, dirty }),
        2 => (any::<usize>(), 0..6u8).prop_map(|(pick, kind)| Op::BadFree { pick, kind }),
        1 => Just(Op::Drain),
    ]
}

/// What a correct allocator must look like from the outside.
struct Model {
    /// Per span index: managed and currently free (on a free or hot list).
    free: Vec<bool>,
    /// Per span index: given to the allocator.
    managed: Vec<bool>,
    /// Live ordinary blocks and page-table pages.
    live: Vec<(Pfn, u8)>,
    live_pgtables: Vec<Pfn>,
}

fn zone_of(pfn: Pfn) -> ZoneId {
    if PGTABLES.contains(pfn) {
        ZoneId::PageTables
    } else if pfn < DMA_LIMIT {
        ZoneId::Dma
    } else {
        ZoneId::Normal
    }
}

impl Model {
    fn new() -> Self {
        let mut managed = vec![false; FRAMES as usize];
        for r in ADDED {
            for p in r.start.0..r.end.0 {
                managed[(p - BASE.0) as usize] = true;
            }
        }
        Model { free: managed.clone(), managed, live: Vec::new(), live_pgtables: Vec::new() }
    }

    fn is_free(&self, pfn: Pfn) -> bool {
        self.free[(pfn.0 - BASE.0) as usize]
    }

    fn set(&mut self, pfn: Pfn, order: u8, free: bool) {
        for p in pfn.0..pfn.0 + (1 << order) {
            let i = (p - BASE.0) as usize;
            assert!(self.managed[i], "allocator handed out an unmanaged frame");
            assert_eq!(self.free[i], !free, "frame {p:#x} handed out twice or freed twice");
            self.free[i] = free;
        }
    }

    /// Whether `zone` holds a naturally aligned, entirely free block of
    /// `order`: then (and only then) the allocator must serve it from there.
    fn can_serve(&self, zone: ZoneId, order: u8) -> bool {
        let size = 1u64 << order;
        let first = BASE.0.div_ceil(size) * size;
        (first..BASE.0 + FRAMES)
            .step_by(size as usize)
            .filter(|p| p + size <= BASE.0 + FRAMES)
            .any(|p| (p..p + size).all(|q| zone_of(Pfn(q)) == zone && self.is_free(Pfn(q))))
    }
}

/// Compare the allocator's free frames with the model's, zone by zone.
fn check_against_model<M: PhysMem>(a: &BuddyAllocator<'_, M>, model: &Model) -> Result<(), TestCaseError> {
    check_with_pcp(a, &[], model)
}

/// [`check_against_model`], with `pcp` the frames on per-CPU lists (free
/// for the model, allocated for the zones).
fn check_with_pcp<M: PhysMem>(
    a: &BuddyAllocator<'_, M>,
    pcp: &[(Pfn, ZoneId)],
    model: &Model,
) -> Result<(), TestCaseError> {
    a.check_invariants().map_err(TestCaseError::fail)?;
    let mut free = vec![false; FRAMES as usize];
    let mut mark = |p: Pfn, order: u8| {
        for q in p.0..p.0 + (1 << order) {
            let i = (q - BASE.0) as usize;
            prop_assert!(!free[i], "frame {q:#x} on two lists");
            free[i] = true;
        }
        Ok(())
    };
    let mut res = Ok(());
    a.for_each_free_block(|p, o, _| res = res.clone().and_then(|()| mark(p, o)));
    a.for_each_hot_frame(|p, _| res = res.clone().and_then(|()| mark(p, 0)));
    a.for_each_deferred_section(|p, _| res = res.clone().and_then(|()| mark(p, MAX_ORDER)));
    pcp.iter().for_each(|&(p, _)| res = res.clone().and_then(|()| mark(p, 0)));
    res?;
    prop_assert!(free == model.free, "allocator's free frames differ from the model's");
    prop_assert!(a.deferred_metadata_is_zero(), "metadata of a deferred section written");
    for zone in ZoneId::ALL {
        let s = a.stats(zone);
        let n = (0..FRAMES).filter(|&i| model.free[i as usize] && zone_of(BASE.add(i)) == zone).count();
        let listed = pcp.iter().filter(|f| f.1 == zone).count();
        prop_assert_eq!(s.free_total() + listed as u64, n as u64);
    }
    Ok(())
}

/// The free lists and the deferred sections (as blocks of `MAX_ORDER`), as
/// a sorted list of `(head, order, zone)`.
fn free_and_deferred<M: PhysMem>(a: &BuddyAllocator<'_, M>) -> Vec<(u64, u8, ZoneId)> {
    let mut v = free_blocks(a);
    a.for_each_deferred_section(|p, z| v.push((p.0, MAX_ORDER, z)));
    v.sort_by_key(|b| b.0);
    v
}

/// Run `ops` on an eager allocator (`deferred == false`) or on one with
/// deferred initialisation, whose span then holds one deferred NORMAL
/// section (`[5120, 6144)`) besides sections initialised at creation.
fn run(ops: Vec<Op>, deferred: bool) -> Result<(), TestCaseError> {
    let mut fx = Fixture::new(BASE, FRAMES as usize);
    let mut a = if deferred { fx.empty_deferred(PGTABLES) } else { fx.empty(PGTABLES) };
    for r in ADDED {
        a.add_free_range(r).unwrap();
    }
    let mut sections = 0;
    a.for_each_deferred_section(|_, _| sections += 1);
    prop_assert_eq!(sections, if deferred { 1 } else { 0 });
    let initial = free_and_deferred(&a);
    let mut model = Model::new();
    check_against_model(&a, &model)?;

    for op in ops {
        match op {
            Op::Alloc { order, pref, zeroed } => {
                let expected = if order > MAX_ORDER {
                    None
                } else {
                    pref.zonelist().iter().copied().find(|&z| model.can_serve(z, order))
                };
                let got = if zeroed { a.alloc_zeroed(order, pref) } else { a.alloc(order, pref) };
                prop_assert_eq!(got.map(zone_of), expected, "alloc({}, {:?})", order, pref);
                if let Some(p) = got {
                    prop_assert!(p.is_aligned(order), "misaligned block {:?} of order {}", p, order);
                    model.set(p, order, false);
                    for i in 0..1 << order {
                        if zeroed {
                            prop_assert!(a.mem().frame_is_zero(p.add(i)));
                        }
                        a.mem().write_u64(p.add(i).addr(), STAMP | p.add(i).0);
                    }
                    model.live.push((p, order));
                }
            }
            Op::AllocPgtable => {
                let expected = model.can_serve(ZoneId::PageTables, 0);
                let got = a.alloc_pgtable();
                prop_assert_eq!(got.is_some(), expected);
                if let Some(p) = got {
                    prop_assert!(PGTABLES.contains(p) && a.mem().frame_is_zero(p));
                    model.set(p, 0, false);
                    model.live_pgtables.push(p);
                }
            }
            Op::Free { pick } if !model.live.is_empty() => {
                let (p, order) = model.live.swap_remove(pick % model.live.len());
                for i in 0..1 << order {
                    prop_assert_eq!(a.mem().read_u64(p.add(i).addr()), STAMP | p.add(i).0, "allocated memory changed");
                }
                prop_assert_eq!(a.free(p, order), Ok(()));
                model.set(p, order, true);
            }
            Op::FreePgtable { pick, dirty } if !model.live_pgtables.is_empty() => {
                let i = pick % model.live_pgtables.len();
                let p = model.live_pgtables[i];
                if dirty {
                    let entry = Gpa(p.addr().0 + (pick % FRAME_WORDS) as u64 * 8);
                    a.mem().write_u64(entry, 0x1003);
                    prop_assert_eq!(a.free_pgtable(p), Err(FreeError::NotZeroed));
                    check_against_model(&a, &model)?;
                    a.mem().write_u64(entry, 0);
                }
                prop_assert_eq!(a.free_pgtable(p), Ok(()));
                model.live_pgtables.swap_remove(i);
                model.set(p, 0, true);
            }
            Op::BadFree { pick, kind } => {
                let live = (!model.live.is_empty()).then(|| model.live[pick % model.live.len()]);
                let (pfn, order, ok): (Pfn, u8, fn(FreeError) -> bool) = match (kind, live) {
                    // The wrong order for a live block.
                    (0, Some((p, o))) => {
                        let wrong = if o == 0 { 1 + (pick % 3) as u8 } else { o - 1 };
                        (p, wrong, |e| matches!(e, FreeError::WrongOrder { .. }))
                    }
                    // A frame inside a live block.
                    (1, Some((p, o))) if o > 0 => {
                        (p.add(1 + (pick as u64 % ((1 << o) - 1))), 0, |e| e == FreeError::NotBlockHead)
                    }
                    // A frame the model says is free.
                    (2, _) => {
                        let free: Vec<_> = (0..FRAMES).filter(|&i| model.free[i as usize]).collect();
                        if free.is_empty() {
                            continue;
                        }
                        let p = BASE.add(free[pick % free.len()]);
                        (p, 0, |e| matches!(e, FreeError::DoubleFree | FreeError::NotBlockHead))
                    }
                    // A reserved frame.
                    (3, _) => {
                        let holes: Vec<_> = (0..FRAMES).filter(|&i| !model.managed[i as usize]).collect();
                        (BASE.add(holes[pick % holes.len()]), 0, |e| e == FreeError::NotManaged)
                    }
                    // A foreign address.
                    (4, _) => {
                        let p = if pick.is_multiple_of(2) {
                            Pfn(pick as u64 % BASE.0)
                        } else {
                            BASE.add(FRAMES + pick as u64 % 99)
                        };
                        (p, 0, |e| e == FreeError::OutOfRange)
                    }
                    // A live page-table page freed as ordinary memory.
                    _ if !model.live_pgtables.is_empty() => {
                        (model.live_pgtables[pick % model.live_pgtables.len()], 0, |e| e == FreeError::WrongZone)
                    }
                    _ => continue,
                };
                let r = a.free(pfn, order);
                prop_assert!(matches!(r, Err(e) if ok(e)), "bad free({:?}, {}) answered {:?}", pfn, order, r);
            }
            Op::Drain => a.drain_hot_lists(),
            Op::Free { .. } | Op::FreePgtable { .. } => {}
        }
        check_against_model(&a, &model)?;
    }

    // Free everything: the free lists must be back to the initial maximal
    // blocks, and every allocation matched by a free.
    for (p, order) in core::mem::take(&mut model.live) {
        prop_assert_eq!(a.free(p, order), Ok(()));
        model.set(p, order, true);
    }
    for p in core::mem::take(&mut model.live_pgtables) {
        prop_assert_eq!(a.free_pgtable(p), Ok(()));
        model.set(p, 0, true);
    }
    a.drain_hot_lists();
    check_against_model(&a, &model)?;
    prop_assert_eq!(free_and_deferred(&a), initial, "buddies not fully merged once all is free");
    for zone in ZoneId::ALL {
        let s = a.stats(zone);
        prop_assert_eq!(s.allocs, s.frees);
        prop_assert_eq!(s.free_pages + s.deferred_pages, s.managed_pages);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_alloc_free_sequences_match_the_model(ops in proptest::collection::vec(op(), 1..300)) {
        run(ops, false)?;
    }

    #[test]
    fn random_sequences_match_the_model_with_deferred_sections(ops in proptest::collection::vec(op(), 1..300)) {
        run(ops, true)?;
    }
}

/// A long fixed sequence, so that deep fragmentation is always covered
/// whatever proptest happens to generate.
#[test]
fn a_long_churn_matches_the_model() {
    let mut ops = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pick = (x >> 8) as usize;
        ops.push(match x % 16 {
            0..=6 => Op::Alloc { order: [0, 0, 0, 1, 2, 3, 5, 10][pick % 8], pref: ZonePref::Normal, zeroed: false },
            7 => Op::Alloc { order: (pick % 4) as u8, pref: ZonePref::Dma, zeroed: pick.is_multiple_of(2) },
            8 => Op::AllocPgtable,
            9..=13 => Op::Free { pick },
            14 => Op::FreePgtable { pick, dirty: pick.is_multiple_of(5) },
            _ => Op::BadFree { pick, kind: (pick % 6) as u8 },
        });
    }
    run(ops.clone(), false).unwrap();
    run(ops, true).unwrap();
}

// ---- the per-CPU front end against the same model ----

#[derive(Clone, Debug)]
enum PcpOp {
    Alloc { cpu: usize, order: u8, pref: ZonePref },
    Free { cpu: usize, pick: usize },
    DoubleFree { cpu: usize, pick: usize },
    AllocPgtable,
    FreePgtable { pick: usize },
    DrainCpu { cpu: usize },
}

fn pcp_op() -> impl Strategy<Value = PcpOp> {
    let order = prop_oneof![6 => Just(0u8), 2 => 1..=3u8, 1 => 0..=MAX_ORDER + 1];
    let pref = prop_oneof![3 => Just(ZonePref::Normal), 1 => Just(ZonePref::Dma)];
    let cpu = 0..4usize;
    prop_oneof![
        8 => (cpu.clone(), order, pref).prop_map(|(cpu, order, pref)| PcpOp::Alloc { cpu, order, pref }),
        7 => (cpu.clone(), any::<usize>()).prop_map(|(cpu, pick)| PcpOp::Free { cpu, pick }),
        1 => (cpu.clone(), any::<usize>()).prop_map(|(cpu, pick)| PcpOp::DoubleFree { cpu, pick }),
        1 => Just(PcpOp::AllocPgtable),
        1 => any::<usize>().prop_map(|pick| PcpOp::FreePgtable { pick }),
        1 => cpu.prop_map(|cpu| PcpOp::DrainCpu { cpu }),
    ]
}

/// The frames on per-CPU lists.
fn pcp_frames<M: PhysMem, R: crate::sync::RawLock>(b: &PerCpuBuddy<'_, M, R>) -> Vec<(Pfn, ZoneId)> {
    let mut v = Vec::new();
    b.for_each_pcp_frame(|p, z, _| v.push((p, z)));
    v
}

/// Run `ops` on `cpus` CPUs' lists in front of an allocator over the
/// model's span, one operation at a time: an allocation must succeed
/// exactly when the model has a block for it anywhere (the drain rule: a
/// frame on any CPU's list is as good as one on the free lists), hand out
/// only free frames, and every invariant must hold after every step.
fn run_percpu(ops: Vec<PcpOp>, cpus: usize, deferred: bool) -> Result<(), TestCaseError> {
    let mut fx = super::percpu::SmpFixture::new(BASE, FRAMES as usize);
    let b = fx.buddy(PGTABLES, &ADDED, cpus, deferred);
    let initial = b.with_zone(|a| free_and_deferred(a));
    let mut model = Model::new();
    let cpu = |i: usize| crate::percpu::CpuId::new(i % cpus).unwrap();
    let check = |b: &super::percpu::SmpBuddy<'_>, model: &Model| -> Result<(), TestCaseError> {
        b.check_invariants().map_err(TestCaseError::fail)?;
        let pcp = pcp_frames(b);
        b.with_zone(|a| check_with_pcp(a, &pcp, model))
    };
    check(&b, &model)?;
    for op in ops {
        match op {
            PcpOp::Alloc { cpu: c, order, pref } => {
                let can = order <= MAX_ORDER && pref.zonelist().iter().any(|&z| model.can_serve(z, order));
                let got = b.alloc_on(cpu(c), order, pref);
                prop_assert_eq!(got.is_some(), can, "alloc_on({}, {}, {:?})", c, order, pref);
                if let Some(p) = got {
                    prop_assert!(p.is_aligned(order) && pref.zonelist().contains(&zone_of(p)));
                    model.set(p, order, false);
                    for i in 0..1 << order {
                        b.mem().write_u64(p.add(i).addr(), STAMP | p.add(i).0);
                    }
                    model.live.push((p, order));
                }
            }
            PcpOp::Free { cpu: c, pick } if !model.live.is_empty() => {
                let (p, order) = model.live.swap_remove(pick % model.live.len());
                for i in 0..1 << order {
                    prop_assert_eq!(b.mem().read_u64(p.add(i).addr()), STAMP | p.add(i).0, "allocated memory changed");
                }
                prop_assert_eq!(b.free_on(cpu(c), p, order), Ok(()));
                model.set(p, order, true);
            }
            PcpOp::DoubleFree { cpu: c, pick } => {
                let free: Vec<_> = (0..FRAMES).filter(|&i| model.free[i as usize]).collect();
                if free.is_empty() {
                    continue;
                }
                let p = BASE.add(free[pick % free.len()]);
                let r = b.free_on(cpu(c), p, 0);
                prop_assert!(
                    matches!(r, Err(FreeError::DoubleFree | FreeError::NotBlockHead)),
                    "free_on of free frame {:?} answered {:?}",
                    p,
                    r
                );
            }
            PcpOp::AllocPgtable => {
                let got = b.with_zone(|a| a.alloc_pgtable());
                prop_assert_eq!(got.is_some(), model.can_serve(ZoneId::PageTables, 0));
                if let Some(p) = got {
                    model.set(p, 0, false);
                    model.live_pgtables.push(p);
                }
            }
            PcpOp::FreePgtable { pick } if !model.live_pgtables.is_empty() => {
                let p = model.live_pgtables.swap_remove(pick % model.live_pgtables.len());
                prop_assert_eq!(b.free_on(cpu(pick), p, 0), Err(FreeError::WrongZone));
                prop_assert_eq!(b.with_zone(|a| a.free_pgtable(p)), Ok(()));
                model.set(p, 0, true);
            }
            PcpOp::DrainCpu { cpu: c } => {
                b.drain_cpu(cpu(c));
            }
            PcpOp::Free { .. } | PcpOp::FreePgtable { .. } => {}
        }
        check(&b, &model)?;
    }
    for (i, (p, order)) in core::mem::take(&mut model.live).into_iter().enumerate() {
        prop_assert_eq!(b.free_on(cpu(i), p, order), Ok(()));
        model.set(p, order, true);
    }
    for p in core::mem::take(&mut model.live_pgtables) {
        prop_assert_eq!(b.with_zone(|a| a.free_pgtable(p)), Ok(()));
        model.set(p, 0, true);
    }
    b.drain_all();
    check(&b, &model)?;
    b.with_zone(|a| {
        a.drain_hot_lists();
        prop_assert_eq!(free_and_deferred(a), initial, "buddies not fully merged once all is free and drained");
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn per_cpu_lists_match_the_model(ops in proptest::collection::vec(pcp_op(), 1..300), cpus in 1..=4usize) {
        run_percpu(ops, cpus, false)?;
    }

    #[test]
    fn per_cpu_lists_match_the_model_with_deferred_sections(ops in proptest::collection::vec(pcp_op(), 1..300), cpus in 1..=4usize) {
        run_percpu(ops, cpus, true)?;
    }
}

/// A long fixed churn on four CPUs: deep fragmentation with frames on
/// every CPU's lists, whatever proptest generates.
#[test]
fn a_long_churn_on_four_cpus_matches_the_model() {
    let mut ops = Vec::new();
    let mut x = 0x51_7cc1_b727_220au64;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pick = (x >> 8) as usize;
        let cpu = (x >> 3) as usize % 4;
        ops.push(match x % 16 {
            0..=7 => PcpOp::Alloc { cpu, order: [0, 0, 0, 0, 1, 2, 3, 10][pick % 8], pref: ZonePref::Normal },
            8 => PcpOp::Alloc { cpu, order: (pick % 3) as u8, pref: ZonePref::Dma },
            9..=13 => PcpOp::Free { cpu, pick },
            14 => PcpOp::DoubleFree { cpu, pick },
            _ => PcpOp::DrainCpu { cpu },
        });
    }
    run_percpu(ops.clone(), 4, false).unwrap();
    run_percpu(ops, 4, true).unwrap();
}
