//! pv mode's accessed-bit harvest (`PV_HARVEST`): page reclaim's "was this
//! page used since I last looked?" answered from the shadow leaves, in one
//! request for a whole range — what a host does with EPT/NPT accessed bits
//! (KVM's `kvm_age_gfn`), for the guest's own reclaim.
//!
//! # Semantics
//!
//! The guest's own accessed bits stay exactly what hardware would make
//! them (Intel SDM vol. 3A §4.8): the harvest never writes a guest entry.
//! It keeps a *second-level* accessed bit per page instead — bit A of the
//! shadow leaves derived from the page's guest entry, which the CPU sets
//! when it walks to the leaf, as it sets A in any paging-structure entry it
//! uses. [`ShadowMmu::harvest`] answers, for each page named:
//!
//! - **not young** when the guest entry is not present or its A bit is
//!   clear (every access through the shadow would have faulted and set it:
//!   invariant 2 of the mmu module);
//! - **young** when a derived shadow leaf has A set — installed by a fault,
//!   a prefetch or a write sync since the last harvest (each stands for an
//!   access or a new mapping) or set by the CPU since;
//! - **young** as well when the page is not tracked: no derived leaf is
//!   present (a zap may have dropped a leaf the CPU had set A in), or the
//!   page is mapped by a large page. The answer errs towards young, which
//!   reclaim can afford: a page is never reported idle after an access.
//!
//! and then clears A in every derived leaf (installing a leaf with A clear
//! in each derived shadow table that lacks one, KVM's `pte_prefetch` for the
//! next question), so the next harvest sees only the walks after this one.
//! A leaf whose A was cleared marks the host stale: a host that shadows the
//! pool must forget its translation for the CPU to walk (and set A) again.
//! The guest flushes its own TLB after the call for the same reason (a
//! translation it still caches is used without a walk); with several
//! vCPUs the cleared bits are a recorded change like any other, so every
//! vCPU that may cache one flushes before it runs again
//! ([`ShadowMmu::flush_requests`]), as KVM's `kvm_age_gfn` flushes remote
//! TLBs.
//!
//! # Invariants and trust
//!
//! - Only level-1 leaves are ever installed with A clear; the CPU may set A
//!   in them in the pool, so the pool may differ from the VMM's copy in that
//!   bit alone ([`pool_agrees`]; the checker and pool repair allow it).
//! - Reading the pool's A bit is the one place the pool is read to answer
//!   the guest: a guest that writes the pool through tables of its own can
//!   make its pages look young or idle to itself, which it could equally do
//!   by lying to its own reclaim. Nothing the VMM decides depends on it.
//! - The work is bounded by the request: at most
//!   [`guest_abi::pv::HARVEST_PAGES`] pages, each a guest entry plus its
//!   derived pages (≤ 32), and one guest walk per 2 MiB of range.

use super::*;

/// Where a page's 4 KiB guest entry lives, if it has one.
enum GuestPt {
    /// The level-1 guest table's frame (its GPA).
    Table(u64),
    /// A large page maps the address (not tracked: always young).
    Large,
    /// Nothing maps the address.
    Unmapped,
}

/// Whether `seen` (read from the pool) may stand for the VMM's copy `copy`
/// of an entry of a level-`level` shadow page: equal, or a level-1 leaf the
/// harvest installed with A clear in which the CPU has since set A.
pub(super) fn pool_agrees(copy: u64, seen: u64, level: u8) -> bool {
    seen == copy || (level == 1 && copy & P != 0 && copy & A == 0 && seen == copy | A)
}

impl ShadowMmu {
    /// `PV_HARVEST` for `vcpu`'s current address space (module doc): bit
    /// `i` of `bits` names page `base + i * 4096` and is left set only if
    /// that page is young; every named page's derived leaves get A clear.
    /// Returns the number of young pages. The caller bounds `bits.len()`
    /// (at most `HARVEST_PAGES / 64` words).
    pub fn harvest(
        &mut self,
        vcpu: &ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &impl GuestPhys,
        base: Gva,
        bits: &mut [u64],
    ) -> u64 {
        self.stats.harvests += 1;
        let Some((cr3, _)) = self.loaded_root(vcpu) else {
            // No current root: nothing is shadowed, nothing can be told.
            return bits.iter().map(|w| w.count_ones() as u64).sum();
        };
        let mut young = 0;
        let mut region: Option<u64> = None; // va >> 21 of `table`
        let mut table = GuestPt::Unmapped;
        for (w, word) in bits.iter_mut().enumerate() {
            let mut named = *word;
            let mut out = 0u64;
            while named != 0 {
                let bit = named.trailing_zeros() as u64;
                named &= named - 1;
                self.stats.harvest_pages += 1;
                // A range past the top of the address space maps nothing there.
                let Some(va) = base.raw().checked_add((w as u64 * 64 + bit) * PAGE) else { continue };
                if region != Some(va >> 21) {
                    table = self.guest_pt(guest, cr3, va);
                    region = Some(va >> 21);
                }
                let is_young = match table {
                    GuestPt::Table(pt) => self.harvest_entry(pool, guest, pt, (va >> 12) & 511),
                    GuestPt::Large => true,
                    GuestPt::Unmapped => false,
                };
                if is_young {
                    out |= 1 << bit;
                    young += 1;
                }
            }
            *word = out;
        }
        young
    }

    /// The level-1 guest table that maps `va` under guest root `cr3`, read
    /// (never written) from the guest's tables.
    fn guest_pt(&mut self, guest: &impl GuestPhys, cr3: u64, va: u64) -> GuestPt {
        // Canonical: bits 63..47 all equal (SDM vol. 3 §4.5); anything else
        // maps nothing.
        if ((va as i64) << 16 >> 16) as u64 != va {
            return GuestPt::Unmapped;
        }
        let mut table = cr3 & ADDR;
        for level in (2..=4u8).rev() {
            self.work += 1;
            if !self.tables.contains(Gpa(table)) || !guest.is_ram(Gpa(table), PAGE) {
                return GuestPt::Unmapped;
            }
            let idx = guest_abi::paging::table_index(va, level) as u64;
            let e = guest.read_u64(Gpa(table + idx * 8));
            if e & P == 0 {
                return GuestPt::Unmapped;
            }
            if level <= 3 && e & PS != 0 {
                return GuestPt::Large;
            }
            table = e & ADDR;
        }
        if !self.tables.contains(Gpa(table)) || !guest.is_ram(Gpa(table), PAGE) {
            return GuestPt::Unmapped;
        }
        GuestPt::Table(table)
    }

    /// Test and clear the second-level accessed bit of entry `idx` of the
    /// guest table at `pt` (module doc).
    fn harvest_entry(&mut self, pool: &mut impl GuestPhys, guest: &impl GuestPhys, pt: u64, idx: u64) -> bool {
        self.work += 1;
        let gpte = guest.read_u64(Gpa(pt + idx * 8));
        if gpte & (P | A) != (P | A) {
            return false;
        }
        let Some(derived) = self.rmap.get(&(pt >> 12)).cloned() else { return true };
        let mut young = false;
        let mut tracked = false;
        for page in derived {
            self.work += 1;
            let Some(role) = self.pages[page as usize].as_ref().map(|p| p.role) else { continue };
            if role.level != 1 {
                continue;
            }
            let e = self.entry(page, idx);
            if e & P == 0 {
                // Untracked: the answer is young; from now on it is tracked.
                if let Some(spte) = self.leaf_spte(guest, role, gpte) {
                    self.put(pool, page, idx, spte & !A);
                }
                continue;
            }
            tracked = true;
            let seen = pool.read_u64(Gpa(self.page_gpa(page) + idx * 8));
            if e & A != 0 || seen & A != 0 {
                young = true;
                self.put(pool, page, idx, e & !A);
                self.mark_stale(page);
            }
        }
        young || !tracked
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use proptest::prelude::*;

    /// The pool address of `va`'s shadow leaf in `cpu`'s current root (the
    /// path must be present).
    fn leaf_gpa(mmu: &ShadowMmu, cpu: &ShadowVcpu, pool: &Mem, va: u64) -> u64 {
        let mut table = mmu.current_root(cpu).unwrap().gpa().raw();
        for level in (2..=4u8).rev() {
            table = pool.read_u64(Gpa(table + guest_abi::paging::table_index(va, level) as u64 * 8)) & ADDR;
        }
        table + guest_abi::paging::table_index(va, 1) as u64 * 8
    }

    /// The CPU walks to `va`'s shadow leaf: it sets A there (SDM vol. 3A §4.8).
    fn cpu_walks(mmu: &ShadowMmu, cpu: &ShadowVcpu, pool: &mut Mem, va: u64) {
        let at = leaf_gpa(mmu, cpu, pool, va);
        let e = pool.read_u64(Gpa(at));
        assert!(e & P != 0, "no shadow leaf for {va:#x}");
        pool.write_u64(Gpa(at), e | A);
    }

    fn harvest(mmu: &mut ShadowMmu, cpu: &ShadowVcpu, pool: &mut Mem, g: &Mem, named: u64) -> u64 {
        let mut bits = [named];
        mmu.harvest(cpu, pool, g, Gva(va(0)), &mut bits);
        bits[0]
    }

    #[test]
    fn a_harvest_reports_the_walks_since_the_last_one_and_never_writes_a_guest_entry() {
        let (mut mmu, mut pool) = setup(64);
        let mut cpu = mmu.new_vcpu();
        let mut g = guest_with(0x1000, P | RW | US, 8);
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
        for i in 0..4 {
            let access = if i % 2 == 0 { WRITE } else { READ };
            assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(i)), access), Ok(FaultOutcome::Fixed));
        }
        let guest_before = g.clone();
        mmu.host_invalidated();
        // Pages 0..4 were faulted in (their leaves carry A); 4..8 were never
        // accessed (guest A clear). Page 9 is not even mapped.
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0x2ff), 0x0f);
        assert!(mmu.host_stale(), "a cleared A bit needs the host to forget its translation");
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0xff), 0, "nothing walked since");
        // The CPU walks to pages 1 and 2: the pool differs from the copy in
        // that bit only, which is neither an invariant violation nor a repair.
        cpu_walks(&mmu, &cpu, &mut pool, va(1));
        cpu_walks(&mmu, &cpu, &mut pool, va(2));
        mmu.check_invariants(&pool, &g).unwrap();
        assert_eq!(mmu.repair_pool_pages(&mut pool, 0..64), 0);
        // Asking about page 2 alone leaves page 1's bit for the next question.
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0b100), 0b100);
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0xff), 0b010);
        assert_eq!(g, guest_before, "the guest's own A and D bits are never touched");
        // A write (and then a read) of a harvested page needs no fault: the
        // leaf is still there, D as before.
        assert_eq!(mmu.stats().hidden_faults, 4);
        assert!(mmu.shadow_leaf(&cpu, &pool, Gva(va(0))).unwrap().0 & RW != 0);
        assert_eq!(mmu.stats().harvests, 4);
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn an_untracked_page_is_young_once_then_tracked() {
        let (mut mmu, mut pool) = setup(64);
        let mut cpu = mmu.new_vcpu();
        let mut g = guest_with(0x1000, P | RW | US, 4);
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(0)), READ), Ok(FaultOutcome::Fixed));
        // Page 1's guest entry says accessed but no shadow leaf exists (a
        // zap dropped it, or the guest set A itself): it may have been used.
        g.write_u64(Gpa(0x22008), g.get(0x22008) | A);
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0b11), 0b11);
        // Now tracked: a leaf with A clear, set by the CPU's next walk.
        let (leaf, _) = mmu.shadow_leaf(&cpu, &pool, Gva(va(1))).unwrap();
        assert_eq!((leaf & ADDR, leaf & A), (0x10_1000, 0));
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0b11), 0);
        cpu_walks(&mmu, &cpu, &mut pool, va(1));
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0b11), 0b10);
        // A guest write that remaps page 0 is a new mapping: young.
        g.write_u64(Gpa(0x22000), 0x10_8000 | P | RW | US | A);
        mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000), 8);
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0b11), 0b01);
        // Clearing A in the guest entry (the classic way) zaps the leaf: not
        // young until the next access faults A back in.
        g.write_u64(Gpa(0x22000), 0x10_8000 | P | RW | US);
        mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x22000), 8);
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 0b01), 0);
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn a_harvest_of_unmapped_non_canonical_or_rootless_ranges_is_bounded_and_safe() {
        let (mut mmu, mut pool) = setup(64);
        let mut cpu = mmu.new_vcpu();
        let mut g = guest_with(0x1000, P | RW | US | A, 4);
        // No root yet: nothing can be told, every named page is young.
        let mut bits = [u64::MAX; 32];
        assert_eq!(mmu.harvest(&cpu, &mut pool, &g, Gva(0), &mut bits), 2048);
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
        let work = mmu.work();
        for base in [0x7fff_ffff_f000u64, 0x8000_0000_0000, !0xfff, 0x100_0000_0000] {
            let mut bits = [u64::MAX; 32];
            assert_eq!(mmu.harvest(&cpu, &mut pool, &g, Gva(base), &mut bits), 0, "{base:#x}");
            assert!(bits.iter().all(|&w| w == 0));
        }
        assert!(mmu.work() - work < 4 * 2048 * 4, "work bounded by the pages named");
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn a_write_through_a_harvested_read_only_leaf_keeps_its_d_and_its_a() {
        let (mut mmu, mut pool) = setup(64);
        let mut cpu = mmu.new_vcpu();
        let mut g = guest_with(0x1000, P | RW | US, 1);
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
        assert_eq!(mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(0)), READ), Ok(FaultOutcome::Fixed));
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 1), 1);
        // A silent CR0.WP = 0 lets a write through the read-only leaf: the
        // CPU sets A and D in it (`harvest_dirty_leaves`, coherence.rs).
        let at = leaf_gpa(&mmu, &cpu, &pool, va(0));
        pool.write_u64(Gpa(at), pool.read_u64(Gpa(at)) | A | D);
        let page = (at - POOL) / PAGE;
        assert_eq!(mmu.harvest_dirty_leaves(&mut pool, &mut g, [page]), 1);
        assert!(g.get(0x22000) & D != 0, "the guest's entry gets the D the hardware recorded");
        assert_eq!(mmu.repair_pool_pages(&mut pool, [page]), 0);
        assert_eq!(harvest(&mut mmu, &cpu, &mut pool, &g, 1), 1, "and the page is still young");
        mmu.check_invariants(&pool, &g).unwrap();
    }

    /// One step of the property test.
    #[derive(Debug, Clone)]
    enum Step {
        /// The CPU reads (false) or writes (true) page `i`.
        Access(u64, bool),
        /// The guest clears A in page `i`'s entry itself (the classic way).
        ClearA(u64),
        /// `PV_HARVEST` naming the pages of the mask.
        Harvest(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..8u64, any::<bool>()).prop_map(|(i, w)| Step::Access(i, w)),
            1 => (0..8u64).prop_map(Step::ClearA),
            2 => any::<u8>().prop_map(Step::Harvest),
        ]
    }

    /// The CPU's access to page `i`: through the shadow leaf if it allows
    /// it (setting A there), else a fault the VMM fixes, then the access.
    fn access(mmu: &mut ShadowMmu, cpu: &mut ShadowVcpu, pool: &mut Mem, g: &mut Mem, i: u64, write: bool) {
        let allowed = |mmu: &ShadowMmu, cpu: &ShadowVcpu, pool: &Mem| {
            mmu.shadow_leaf(cpu, pool, Gva(va(i))).is_some_and(|(e, _)| !write || e & RW != 0)
        };
        if !allowed(mmu, cpu, pool) {
            let code = if write { WRITE } else { READ };
            assert_eq!(mmu.handle_fault(cpu, pool, g, Gva(va(i)), code), Ok(FaultOutcome::Fixed));
            assert!(allowed(mmu, cpu, pool), "the fixed fault left no leaf for the access");
        }
        cpu_walks(mmu, cpu, pool, va(i));
    }

    proptest! {
        /// Against a twin that never harvests, running the same accesses and
        /// clears: the guest's memory (its A and D bits) is identical after
        /// every step — the harvest changes nothing hardware would not —
        /// and no page accessed since a harvest last named it (or the guest
        /// cleared its A bit) is reported idle.
        #[test]
        fn a_harvest_writes_no_guest_bit_and_never_misses_an_access(steps in proptest::collection::vec(step(), 1..60)) {
            let (mut mmu, mut pool) = setup(64);
            let mut cpu = mmu.new_vcpu();
            let mut g = guest_with(0x1000, P | RW | US, 8);
            mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
            let (mut twin, mut twin_pool) = setup(64);
            let mut twin_cpu = twin.new_vcpu();
            let mut twin_g = g.clone();
            twin.load_cr3(&mut twin_cpu, &mut twin_pool, &mut twin_g, Gpa(0x1000)).unwrap();
            let mut used = [false; 8];
            for s in steps {
                match s {
                    Step::Access(i, w) => {
                        access(&mut mmu, &mut cpu, &mut pool, &mut g, i, w);
                        access(&mut twin, &mut twin_cpu, &mut twin_pool, &mut twin_g, i, w);
                        used[i as usize] = true;
                    }
                    Step::ClearA(i) => {
                        for (m, c, p, g) in [(&mut mmu, &mut cpu, &mut pool, &mut g), (&mut twin, &mut twin_cpu, &mut twin_pool, &mut twin_g)] {
                            let at = 0x22000 + i * 8;
                            g.write_u64(Gpa(at), g.get(at) & !A);
                            m.pte_written(c, p, g, Gpa(at), 8);
                        }
                        // The guest took the information itself.
                        used[i as usize] = false;
                    }
                    Step::Harvest(mask) => {
                        let young = harvest(&mut mmu, &cpu, &mut pool, &g, mask as u64);
                        prop_assert_eq!(young & !(mask as u64), 0);
                        for (i, used) in used.iter_mut().enumerate() {
                            if mask >> i & 1 != 0 {
                                prop_assert!(!*used || young >> i & 1 != 0, "page {} used but reported idle", i);
                                *used = false;
                            }
                        }
                    }
                }
                prop_assert_eq!(&g, &twin_g);
                mmu.check_invariants(&pool, &g).map_err(TestCaseError::fail)?;
            }
        }
    }
}
