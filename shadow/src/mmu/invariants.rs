//! The structural invariant checker (tests, fuzzing) and the diagnostic walk
//! of a vCPU's shadow tables (`--explain`).
//!
//! Both only read. [`ShadowMmu::shadow_leaf`] reads the pool — what the vCPU
//! really walks, which the guest may have scribbled over — and its answer is
//! reported, never used to decide anything; [`ShadowMmu::check_invariants`]
//! checks that the pool holds exactly the VMM's copy (but for A bits the CPU
//! set in harvested leaves) and that the parent
//! links, role index and reverse map agree.

use super::*;

impl ShadowMmu {
    /// Walk the *shadow* tables of `vcpu`'s current root for `va` (for
    /// `--explain` and tests): the shadow leaf entry, if present.
    pub fn shadow_leaf(&self, vcpu: &ShadowVcpu, pool: &impl GuestPhys, va: Gva) -> Option<(u64, u8)> {
        let va = va.raw();
        let mut table = self.current_root(vcpu)?.gpa().raw();
        for level in (1..=4u8).rev() {
            let idx = guest_abi::paging::table_index(va, level) as u64;
            let e = pool.read_u64(Gpa(table + idx * 8));
            if e & P == 0 {
                return None;
            }
            if level == 1 || e & PS != 0 {
                return Some((e, level));
            }
            table = e & ADDR;
            self.page_of(table)?;
        }
        None
    }

    /// Check the structural invariants (tests): the pool holds exactly the
    /// VMM's copy of every page in use, every present non-leaf shadow entry
    /// points at a live page whose parent list has it, and every leaf maps
    /// guest RAM only.
    pub fn check_invariants(&self, pool: &impl GuestPhys, guest: &impl GuestPhys) -> Result<(), String> {
        self.check_pool_accounting()?;
        for (i, sp) in self.pages.iter().enumerate() {
            let Some(sp) = sp else { continue };
            if self.by_role.get(&sp.role) != Some(&(i as u32)) {
                return Err(format!("page {i} missing from the role index"));
            }
            if !self.rmap.get(&sp.role.gfn).is_some_and(|v| v.contains(&(i as u32))) {
                return Err(format!("page {i} missing from the reverse map"));
            }
            for idx in 0..512u64 {
                let e = sp.entries[idx as usize];
                if !pool_agrees(e, pool.read_u64(Gpa(self.page_gpa(i as u32) + idx * 8)), sp.role.level) {
                    return Err(format!("page {i}[{idx}] in the pool differs from the VMM's copy {e:#x}"));
                }
                if e & P == 0 {
                    continue;
                }
                if sp.role.level == 1 || e & PS != 0 {
                    let size = 1u64 << (12 + 9 * (sp.role.level as u32 - 1));
                    if !guest.is_ram(Gpa(e & ADDR & !(size - 1)), size) || self.in_pool_raw(e & ADDR) {
                        return Err(format!("page {i}[{idx}] maps outside guest RAM: {e:#x}"));
                    }
                } else {
                    let Some(c) = self.page_of(e & ADDR) else {
                        return Err(format!("page {i}[{idx}] points outside the pool: {e:#x}"));
                    };
                    match self.pages.get(c as usize).and_then(|p| p.as_ref()) {
                        Some(cp) if cp.parents.contains(&(i as u32, idx as u16)) => {}
                        _ => return Err(format!("page {i}[{idx}] points at {c} which does not list it")),
                    }
                }
            }
        }
        Ok(())
    }

    /// Every pool page is in exactly one of: in use, free, quarantine,
    /// held; a page some vCPU's CR3 holds is in use or held, never free or
    /// quarantined; the quarantine is in generation order; nothing a
    /// registered vCPU may still cache is free (every page freed since a
    /// vCPU's last flush is still quarantined).
    fn check_pool_accounting(&self) -> Result<(), String> {
        let mut seen = vec![0u8; self.pages.len()];
        let lists = [
            ("free", self.free.clone()),
            ("quarantine", self.quarantine.iter().map(|&(p, _)| p).collect()),
            ("held", self.held.clone()),
        ];
        for (name, list) in &lists {
            for &p in list {
                if self.pages.get(p as usize).is_none_or(|sp| sp.is_some()) {
                    return Err(format!("page {p} in {name} is in use or outside the pool"));
                }
                seen[p as usize] += 1;
            }
        }
        for (i, sp) in self.pages.iter().enumerate() {
            let want = u8::from(sp.is_none());
            if seen[i] != want {
                return Err(format!("page {i} is in {} of the free, quarantine and held lists", seen[i]));
            }
        }
        for &p in self.loaded.iter().chain(self.limbo.iter().map(|l| &l.0)) {
            if self.pages[p as usize].is_none() && !self.held.contains(&p) {
                return Err(format!("page {p} is (or may be) some vCPU's root but neither in use nor held"));
            }
        }
        if self.quarantine.iter().zip(self.quarantine.iter().skip(1)).any(|(a, b)| a.1 > b.1) {
            return Err("the quarantine is not in generation order".into());
        }
        Ok(())
    }
}
