//! Trust and bounds (issue 11, items 9–11): a guest that scribbles over the
//! pool, a guest that makes one shadow page table the child of 400,000
//! entries, and a kernel half larger than any fixed budget.

use super::*;
use crate::walker::pf;

use super::test_mem::Mem;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const T: u64 = P | RW | US | A;

// ---- Item 10: no guest-chosen quadratic work ----

/// PML4 0x1000 → two PDPTs (0x2000, 0x3000) → `pds` page directories at
/// 0x10_0000.., every one of whose 512 entries points at the same page
/// table 0x4000, whose entry 0 maps 0x5000. `pds × 512` virtual addresses
/// reach one guest PT, so its one shadow page gets `pds × 512` parents.
fn shared_pt_guest(pds: u64) -> (Mem, Vec<u64>) {
    let mut g = Mem::new(0, 64 * MIB);
    g.write_u64(Gpa(0x1000), 0x2000 | T);
    g.write_u64(Gpa(0x1008), 0x3000 | T);
    g.write_u64(Gpa(0x4000), 0x5000 | P | RW | A | D);
    let mut vas = Vec::new();
    for k in 0..pds {
        let pd = 0x10_0000 + k * PAGE;
        let (pml4i, pdpti) = (k / 512, k % 512);
        g.write_u64(Gpa(0x2000 + pml4i * PAGE + pdpti * 8), pd | T);
        for i in 0..512 {
            g.write_u64(Gpa(pd + i * 8), 0x4000 | T);
            vas.push((pml4i << 39) | (pdpti << 30) | (i << 21));
        }
    }
    (g, vas)
}

/// Fault every address in, then clear both PML4 entries; returns the work
/// per fault and per parent entry removed by each clear.
fn shared_pt_work(pds: u64) -> (f64, f64, f64) {
    let (mut g, vas) = shared_pt_guest(pds);
    let pool_pages = 16 + pds as u32;
    let mut pool = Mem::new(1 << 40, pool_pages as u64 * PAGE);
    let mut mmu = ShadowMmu::new(Gpa(1 << 40), pool_pages, PagingMode::default());
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    let w0 = mmu.work();
    for &va in &vas {
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va), pf::W), Ok(FaultOutcome::Fixed));
    }
    let per_fault = (mmu.work() - w0) as f64 / vas.len() as f64;
    assert_eq!(mmu.stats().pool_exhaustions, 0);
    let mut per_parent = [0.0; 2];
    for (i, slot) in per_parent.iter_mut().enumerate() {
        let parents = if i == 0 { pds.min(512) } else { pds.saturating_sub(512) } * 512;
        let w = mmu.work();
        g.write_u64(Gpa(0x1000 + i as u64 * 8), 0);
        mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x1000 + i as u64 * 8), 8);
        *slot = (mmu.work() - w) as f64 / parents.max(1) as f64;
    }
    mmu.check_invariants(&pool, &g).unwrap();
    (per_fault, per_parent[0], per_parent[1])
}

#[test]
fn one_page_table_under_400k_entries_costs_flat_work_per_operation() {
    // The case: 782 PDs (400,384 entries) share one PT, then two
    // PML4-entry clears. Work per fault and per removed entry must not grow
    // with the number of sharers.
    let small = shared_pt_work(16);
    let large = shared_pt_work(782);
    eprintln!("work per op: 16 PDs {small:?}, 782 PDs {large:?}");
    assert!(large.0 <= small.0 + 1.0, "work per fault grows: {small:?} -> {large:?}");
    for (s, l) in [(small.1, large.1), (small.1, large.2)] {
        assert!(l <= 4.0, "a PML4-entry clear costs {l} steps per removed entry");
        assert!(l <= s + 1.0, "work per removed entry grows: {s} -> {l}");
    }
}

// ---- Item 9: the pool is guest-writable; nothing read back is trusted ----

const POOL: u64 = 1 << 40;

/// What a hostile guest writes over a pool page: entries that point into
/// the pool (so the vCPU would walk into other scribbled pages) and large
/// leaves over RAM and over the pool itself.
fn scribble(pool: &mut Mem, pages: u64, seed: u64) {
    for page in 0..pages {
        for idx in 0..512u64 {
            let r = (page * 512 + idx).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
            let e = match r % 4 {
                0 => (POOL + (r >> 8) % pages * PAGE) | P | RW | US | A,
                1 => ((r >> 8) % 64 * 2 * MIB) | P | RW | US | A | D | PS,
                2 => POOL | P | RW | US | A | D | PS,
                _ => r,
            };
            pool.write_u64(Gpa(POOL + page * PAGE + idx * 8), e);
        }
    }
}

/// A guest with a kernel half (2 MiB leaves) and eight user paths, each
/// mapping one page; PML4s at 0x1000 and 0x2000 share everything.
fn guest() -> Mem {
    let mut g = Mem::new(0, 64 * MIB);
    for root in [0x1000u64, 0x2000] {
        g.write_u64(Gpa(root), 0x20000 | T);
        g.write_u64(Gpa(root + 511 * 8), 0x60000 | T);
    }
    g.write_u64(Gpa(0x60000 + 510 * 8), 0x61000 | T);
    for i in 0..4u64 {
        g.write_u64(Gpa(0x61000 + i * 8), (0x20_0000 + i * 2 * MIB) | P | RW | A | D | PS);
    }
    for i in 0..8u64 {
        g.write_u64(Gpa(0x20000 + i * 8), (0x30000 + i * 0x2000) | T);
        g.write_u64(Gpa(0x30000 + i * 0x2000), (0x31000 + i * 0x2000) | T);
        g.write_u64(Gpa(0x31000 + i * 0x2000), (0x80_0000 + i * PAGE) | P | RW | US | A);
    }
    g
}

/// Every address of interest: the eight user pages, the kernel window, and
/// addresses the guest never mapped.
fn probe_vas() -> Vec<u64> {
    let mut v: Vec<u64> = (0..8u64).map(|i| i << 30).collect();
    v.extend((0..6u64).map(|i| 0xffff_ffff_8000_0000 + i * 2 * MIB));
    v.extend((1..40u64).map(|i| (i << 39) | (i << 21)));
    v.extend((8..40u64).map(|i| i << 30));
    v
}

/// The shadow of the current root maps `va` only as a side-effect-free
/// guest walk allows: present only if the walk succeeds for the access the
/// shadow grants, to the same frame.
fn shadow_is_exact(mmu: &ShadowMmu, cpu: &ShadowVcpu, pool: &Mem, g: &Mem) -> Result<(), String> {
    let cr3 = mmu.guest_cr3(cpu).unwrap();
    for va in probe_vas() {
        let Some((spte, _)) = mmu.shadow_leaf(cpu, pool, Gva(va)) else { continue };
        let mut probe = g.clone();
        let access = Access { write: spte & RW != 0, user: spte & US != 0, fetch: false };
        match walker::walk(&mut probe, cr3, Gva(va), access, &PagingMode::default()) {
            Ok(t) if t.gpa.raw() & ADDR == spte & ADDR => {}
            other => return Err(format!("shadow maps {va:#x} as {spte:#x}; the guest walk says {other:?}")),
        }
    }
    Ok(())
}

#[test]
fn a_guest_scribbling_over_the_pool_changes_no_decision_and_is_repaired() {
    // Two MMUs in lockstep over the same guest: one pool is scribbled over
    // before every operation, the other never. A small pool forces reuse
    // of freed (scribbled) pages and exhaustion. Every answer must be the
    // same — the MMU decides from its own copy only — and no build panics.
    let pages = 12u32;
    let (mut clean_mmu, mut clean_pool) =
        (ShadowMmu::new(Gpa(POOL), pages, PagingMode::default()), Mem::new(POOL, pages as u64 * PAGE));
    let (mut mmu, mut pool) =
        (ShadowMmu::new(Gpa(POOL), pages, PagingMode::default()), Mem::new(POOL, pages as u64 * PAGE));
    let (mut g1, mut g2) = (guest(), guest());
    let (mut clean_mmu_cpu, mut cpu) = (clean_mmu.new_vcpu(), mmu.new_vcpu());
    clean_mmu.load_cr3(&mut clean_mmu_cpu, &mut clean_pool, &mut g1, Gpa(0x1000)).unwrap();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g2, Gpa(0x1000)).unwrap();
    for step in 0..64u64 {
        scribble(&mut pool, pages as u64, step);
        let i = step % 8;
        let (a, b) = match step % 5 {
            0 | 1 => (
                clean_mmu.handle_fault(&mut clean_mmu_cpu, &mut clean_pool, &mut g1, Gva(i << 30), pf::U | pf::W),
                mmu.handle_fault(&mut cpu, &mut pool, &mut g2, Gva(i << 30), pf::U | pf::W),
            ),
            2 => {
                for g in [&mut g1, &mut g2] {
                    g.write_u64(
                        Gpa(0x31000 + i * 0x2000),
                        (0x90_0000 + step * PAGE) | P | RW | US | A | ((step & 1) * D),
                    );
                }
                clean_mmu.pte_written(&mut clean_mmu_cpu, &mut clean_pool, &mut g1, Gpa(0x31000 + i * 0x2000), 8);
                mmu.pte_written(&mut cpu, &mut pool, &mut g2, Gpa(0x31000 + i * 0x2000), 8);
                (Ok(FaultOutcome::Fixed), Ok(FaultOutcome::Fixed))
            }
            3 => {
                let cr3 = if step % 2 == 0 { 0x1000 } else { 0x2000 };
                (
                    clean_mmu
                        .load_cr3(&mut clean_mmu_cpu, &mut clean_pool, &mut g1, Gpa(cr3))
                        .map(|_| FaultOutcome::Fixed),
                    mmu.load_cr3(&mut cpu, &mut pool, &mut g2, Gpa(cr3)).map(|_| FaultOutcome::Fixed),
                )
            }
            _ => {
                // Unmap a whole path (frees shadow pages).
                for g in [&mut g1, &mut g2] {
                    g.write_u64(Gpa(0x20000 + i * 8), 0);
                }
                clean_mmu.pte_written(&mut clean_mmu_cpu, &mut clean_pool, &mut g1, Gpa(0x20000 + i * 8), 8);
                mmu.pte_written(&mut cpu, &mut pool, &mut g2, Gpa(0x20000 + i * 8), 8);
                for g in [&mut g1, &mut g2] {
                    g.write_u64(Gpa(0x20000 + i * 8), (0x30000 + i * 0x2000) | T);
                }
                clean_mmu.pte_written(&mut clean_mmu_cpu, &mut clean_pool, &mut g1, Gpa(0x20000 + i * 8), 8);
                mmu.pte_written(&mut cpu, &mut pool, &mut g2, Gpa(0x20000 + i * 8), 8);
                (Ok(FaultOutcome::Fixed), Ok(FaultOutcome::Fixed))
            }
        };
        assert_eq!(a, b, "step {step}: the scribbled MMU decided differently");
        assert_eq!(g1, g2, "step {step}: guest A/D bits differ");
        assert_eq!(clean_mmu.current_root(&clean_mmu_cpu), mmu.current_root(&cpu), "step {step}");
        // The dirty log names every page the guest wrote: repair them all.
        mmu.repair_pool_pages(&mut pool, 0..pages as u64);
        assert_eq!(pool, clean_pool, "step {step}: the repaired pool differs from the clean one");
        mmu.check_invariants(&pool, &g2).unwrap();
        shadow_is_exact(&mmu, &cpu, &pool, &g2).unwrap();
        mmu.host_invalidated();
        clean_mmu.host_invalidated();
    }
    let (s, c) = (mmu.stats(), clean_mmu.stats());
    // The same work, counted the same (repairs add host invalidations).
    assert_eq!(ShadowStats { pool_repairs: 0, host_invalidations: 0, ..s }, ShadowStats { host_invalidations: 0, ..c });
    assert!(s.pool_repairs >= 64, "every scribble was repaired: {}", s.pool_repairs);
    assert!(c.pool_exhaustions > 0, "the scenario reuses freed pool pages");
}

#[test]
fn a_new_shadow_page_is_zeroed_even_if_the_guest_wrote_it_while_free() {
    // No repair in between: the page the MMU takes from the free list was
    // scribbled over; it must still come up clean (the old code asserted
    // this in debug builds and trusted it in release builds).
    let (mut mmu, mut pool) = (ShadowMmu::new(Gpa(POOL), 16, PagingMode::default()), Mem::new(POOL, 16 * PAGE));
    let mut cpu = mmu.new_vcpu();
    let mut g = guest();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    scribble(&mut pool, 16, 7);
    let used = mmu.stats().pages_in_use;
    // Repair only the pages in use so far; the free ones stay scribbled.
    mmu.repair_pool_pages(&mut pool, 0..used);
    for i in 0..3u64 {
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(i << 30), pf::U), Ok(FaultOutcome::Fixed));
    }
    assert!(mmu.stats().pages_in_use > used);
    mmu.check_invariants(&pool, &g).unwrap();
    shadow_is_exact(&mmu, &cpu, &pool, &g).unwrap();
}

// ---- Item 11: the kernel half of a large guest ----

/// A guest with `gib` GiB of RAM direct-mapped with 2 MiB pages at PML4
/// slot 273 (as the bundled kernel does) and the kernel image at slot 511,
/// from PML4s at 0x1000 and 0x2000.
fn big_kernel_half(gib: u64) -> Mem {
    let mut g = Mem::new(0, gib * GIB);
    for root in [0x1000u64, 0x2000] {
        g.write_u64(Gpa(root + 273 * 8), 0x10000 | T);
        g.write_u64(Gpa(root + 511 * 8), 0x11000 | T);
    }
    g.write_u64(Gpa(0x11000 + 510 * 8), 0x12000 | T);
    g.write_u64(Gpa(0x12000 + 8), 0x20_0000 | P | RW | A | D | PS);
    for d in 0..gib {
        g.write_u64(Gpa(0x10000 + d * 8), (0x100000 + d * PAGE) | T);
        for i in 0..512 {
            g.write_u64(Gpa(0x100000 + d * PAGE + i * 8), (d * GIB + i * 2 * MIB) | P | RW | A | D | PS);
        }
    }
    g
}

const KERNEL_IMAGE: u64 = 0xffff_ffff_8020_0000;
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;

#[test]
fn the_kernel_image_is_shadowed_whatever_the_size_of_the_direct_map() {
    // 16 GiB of direct map is 8,192 entries: the old fixed budget of 4,096
    // ran out before slot 511 and the first exception triple-faulted.
    let mut g = big_kernel_half(16);
    let (mut mmu, mut pool) = (ShadowMmu::new(Gpa(POOL), 64, PagingMode::default()), Mem::new(POOL, 64 * PAGE));
    let mut cpu = mmu.new_vcpu();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(KERNEL_IMAGE)).is_some(), "the kernel image is not shadowed");
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(DIRECT_MAP + 15 * GIB + 511 * 2 * MIB)).is_some(), "the direct map's end");
    // A second root shares the prefilled subtrees: it costs zeroing its
    // page and its own 256 slots, not another walk of 8,192 entries.
    let w = mmu.work();
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x2000)).unwrap();
    assert!(mmu.work() - w < 1024, "a second root cost {} steps", mmu.work() - w);
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(KERNEL_IMAGE)).is_some());
    mmu.check_invariants(&pool, &g).unwrap();
}

#[test]
fn a_pool_too_small_for_the_kernel_half_shadows_fault_delivery_first() {
    // 16 GiB of direct map needs 16 PDs; an 8-page pool holds a few. The
    // slots the VMM names (IDT, stacks, code: here the kernel image) come
    // first, pages are left for the next fault, and the rest faults in.
    let mut g = big_kernel_half(16);
    g.write_u64(Gpa(0x1000 + 8), 0x13000 | T); // a user path at 1 << 39
    g.write_u64(Gpa(0x13000), 0x14000 | T);
    g.write_u64(Gpa(0x14000), 0x15000 | T);
    g.write_u64(Gpa(0x15000), 0x40_0000 | P | RW | US | A | D);
    let (mut mmu, mut pool) = (ShadowMmu::new(Gpa(POOL), 8, PagingMode::default()), Mem::new(POOL, 8 * PAGE));
    let mut cpu = mmu.new_vcpu();
    mmu.set_prefill_hints(&[Gva(KERNEL_IMAGE), Gva(0x1234)]);
    mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(KERNEL_IMAGE)).is_some());
    assert_eq!(mmu.stats().pool_exhaustions, 0);
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(1 << 39), pf::U), Ok(FaultOutcome::Fixed));
    assert_eq!(mmu.stats().pool_exhaustions, 0, "the reserve holds a user path");
    let far = DIRECT_MAP + 15 * GIB;
    assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(far), 0), Ok(FaultOutcome::Fixed));
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(far)).is_some());
    assert!(mmu.shadow_leaf(&cpu, &pool, Gva(KERNEL_IMAGE)).is_some(), "still there after an exhaustion");
    mmu.check_invariants(&pool, &g).unwrap();
    // A pool that cannot hold even the hinted slots says so.
    let (mut tiny, mut tiny_pool) = (ShadowMmu::new(Gpa(POOL), 4, PagingMode::default()), Mem::new(POOL, 4 * PAGE));
    let mut tiny_cpu = tiny.new_vcpu();
    tiny.set_prefill_hints(&[Gva(DIRECT_MAP)]);
    assert_eq!(tiny.load_cr3(&mut tiny_cpu, &mut tiny_pool, &mut g, Gpa(0x1000)), Err(ShadowError::PoolTooSmall));
}
