//! Trust and bounds (issue 11, items 9–11): a guest that scribbles over the
//! pool, a guest that makes one shadow page table the child of 400,000
//! entries, and a kernel half larger than any fixed budget.

use super::*;
use crate::walker::pf;
use std::collections::HashMap;

/// Sparse memory: guest RAM at 0, or the pool at its base.
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
    fn get(&self, gpa: u64) -> u64 {
        *self.words.get(&gpa).unwrap_or(&0)
    }
}

impl GuestPhys for Mem {
    fn read_u64(&self, gpa: u64) -> u64 {
        assert!(gpa >= self.base && gpa + 8 <= self.base + self.size, "read outside {gpa:#x}");
        self.get(gpa)
    }
    fn write_u64(&mut self, gpa: u64, value: u64) {
        assert!(gpa >= self.base && gpa + 8 <= self.base + self.size, "write outside {gpa:#x}");
        if value == 0 {
            self.words.remove(&gpa);
        } else {
            self.words.insert(gpa, value);
        }
    }
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.base && gpa.checked_add(len).is_some_and(|e| e <= self.base + self.size)
    }
}

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
    g.write_u64(0x1000, 0x2000 | T);
    g.write_u64(0x1008, 0x3000 | T);
    g.write_u64(0x4000, 0x5000 | P | RW | A | D);
    let mut vas = Vec::new();
    for k in 0..pds {
        let pd = 0x10_0000 + k * PAGE;
        let (pml4i, pdpti) = (k / 512, k % 512);
        g.write_u64(0x2000 + pml4i * PAGE + pdpti * 8, pd | T);
        for i in 0..512 {
            g.write_u64(pd + i * 8, 0x4000 | T);
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
    let mut mmu = ShadowMmu::new(1 << 40, pool_pages, PagingMode::default());
    mmu.load_cr3(&mut pool, &mut g, 0x1000).unwrap();
    let w0 = mmu.work();
    for &va in &vas {
        assert_eq!(mmu.handle_fault(&mut pool, &mut g, va, pf::W), Ok(FaultOutcome::Fixed));
    }
    let per_fault = (mmu.work() - w0) as f64 / vas.len() as f64;
    assert_eq!(mmu.stats().pool_exhaustions, 0);
    let mut per_parent = [0.0; 2];
    for (i, slot) in per_parent.iter_mut().enumerate() {
        let parents = if i == 0 { pds.min(512) } else { pds.saturating_sub(512) } * 512;
        let w = mmu.work();
        g.write_u64(0x1000 + i as u64 * 8, 0);
        mmu.pte_written(&mut pool, &mut g, 0x1000 + i as u64 * 8, 8);
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
