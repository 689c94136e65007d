//! SMP: several vCPUs on one shadow MMU, driven in a random interleaving
//! (deterministic seed) against a model of what each may translate.
//!
//! Each simulated vCPU has the caches hardware has (Intel SDM vol. 3
//! §4.10): a TLB of final translations and paging-structure caches of
//! PML4, PDPT and PD entries, filled by walking the *shadow* tables in the
//! pool from its hardware CR3, flushed by a CR3 change, a flush, or (for
//! the faulting address) a page fault (§4.10.4.1). It runs on while a kick
//! to it is in flight (the VMM's kick lands a few of its steps later, or
//! at once when the VMM waits), so another vCPU's change reaches it late,
//! as on real hardware — and a pool page reused before it flushed shows up
//! as a translation through a table of another role.
//!
//! The model: the guest's tables now, and per vCPU the translations they
//! held since that vCPU's last guest-visible flush (its own flush or CR3
//! load, or the shootdown that reaches it). Every translation a simulated
//! vCPU uses must be one of those (Intel SDM vol. 3 §4.10.4.2, "Recommended
//! Invalidation": what a TLB may hold until invalidated); every fault the
//! MMU passes on must be one the guest's tables give now; every fault it
//! fixes must not come back; the structural checker holds throughout.

use super::tests::{MIB, Mem, RAM};
use super::*;
use crate::walker::pf;
use std::sync::{Arc, Mutex};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const POOL_BASE: u64 = 4 * MIB * 1024;
const N_ROOTS: u64 = 12;
const N_PDPT: u64 = 3;
const N_PD: u64 = 4;
const N_PT: u64 = 6;
const N_DATA: u64 = 48;
const ROOT0: u64 = 0x1000;
const PDPT0: u64 = 0x10_0000;
const PD0: u64 = 0x20_0000;
const PT0: u64 = 0x30_0000;
const DATA0: u64 = 0x100_0000;
const ZONE: (Gpa, Gpa) = (Gpa(0), Gpa(DATA0));
const T: u64 = P | RW | US | A;

fn frame(base: u64, i: u64) -> u64 {
    base + i * PAGE
}

/// The virtual addresses the test touches: PML4 slots 0 and 256 (the kernel
/// half, prefilled with every new root), PDPT and PD indexes 0..2, PT
/// indexes 0..4.
fn universe() -> Vec<u64> {
    let mut v = Vec::new();
    for slot in [0u64, 256] {
        for i3 in 0..2 {
            for i2 in 0..2 {
                for i1 in 0..4 {
                    let va = (slot << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12);
                    v.push(if slot >= 256 { va | 0xffff_0000_0000_0000 } else { va });
                }
            }
        }
    }
    v
}

fn index(va: u64, level: u8) -> u64 {
    (va >> (12 + 9 * (level as u64 - 1))) & 511
}

/// The guest: every root maps both slots, tables shared between roots.
fn initial_guest(rng: &mut Rng) -> Mem {
    let mut g = Mem::new(0, RAM);
    for r in 0..N_ROOTS {
        g.write_u64(Gpa(frame(ROOT0, r)), frame(PDPT0, r % 2) | T);
        g.write_u64(Gpa(frame(ROOT0, r) + 256 * 8), frame(PDPT0, 2) | T);
    }
    for i in 0..N_PDPT {
        g.write_u64(Gpa(frame(PDPT0, i)), frame(PD0, i) | T);
        g.write_u64(Gpa(frame(PDPT0, i) + 8), frame(PD0, (i + 1) % N_PD) | T);
    }
    for j in 0..N_PD {
        g.write_u64(Gpa(frame(PD0, j)), frame(PT0, j) | T);
        g.write_u64(Gpa(frame(PD0, j) + 8), frame(PT0, (j + 2) % N_PT) | T);
    }
    for k in 0..N_PT {
        for i in 0..4 {
            g.write_u64(Gpa(frame(PT0, k) + i * 8), frame(DATA0, rng.below(N_DATA)) | T | D);
        }
    }
    g
}

/// A translation: (frame, writable, user).
type Tr = (u64, bool, bool);

/// The guest's own walk (no large pages, no reserved bits in this guest).
fn model_walk(g: &Mem, root: u64, va: u64) -> Option<Tr> {
    let (mut table, mut w, mut u) = (root, true, true);
    for level in (1..=4u8).rev() {
        let e = g.get(table + index(va, level) * 8);
        if e & P == 0 {
            return None;
        }
        w &= e & RW != 0;
        u &= e & US != 0;
        if level == 1 {
            return Some((e & ADDR, w, u));
        }
        table = e & ADDR;
    }
    None
}

/// The guest's walk level by level: for the entries of levels 4, 3 and 2
/// the table they point at with the access granted so far, then the
/// translation; `None` from the first non-present entry on.
fn model_path(g: &Mem, root: u64, va: u64) -> [Option<Tr>; 4] {
    let mut path = [None; 4];
    let (mut table, mut w, mut u) = (root, true, true);
    for (n, level) in (1..=4u8).rev().enumerate() {
        let e = g.get(table + index(va, level) * 8);
        if e & P == 0 {
            break;
        }
        w &= e & RW != 0;
        u &= e & US != 0;
        path[n] = Some((e & ADDR, w, u));
        table = e & ADDR;
    }
    path
}

/// The VA bits that select a level-`level` entry (the key of a
/// paging-structure cache entry).
fn prefix(va: u64, level: u8) -> u64 {
    (va & 0xffff_ffff_ffff) >> (12 + 9 * (level as u64 - 1))
}

/// A random guest page-table write: `(gpa, new value)`.
fn random_write(rng: &mut Rng) -> (u64, u64) {
    let flags = |rng: &mut Rng| {
        let mut f = P;
        if rng.chance(95) {
            f |= RW;
        }
        if rng.chance(95) {
            f |= US;
        }
        if rng.chance(85) {
            f |= A;
        }
        f
    };
    match rng.below(20) {
        0..2 => {
            let slot = if rng.chance(50) { 0 } else { 256 };
            let v = if rng.chance(15) { 0 } else { frame(PDPT0, rng.below(N_PDPT)) | flags(rng) };
            (frame(ROOT0, rng.below(N_ROOTS)) + slot * 8, v)
        }
        2..5 => {
            let v = if rng.chance(15) { 0 } else { frame(PD0, rng.below(N_PD)) | flags(rng) };
            (frame(PDPT0, rng.below(N_PDPT)) + rng.below(2) * 8, v)
        }
        5..9 => {
            let v = if rng.chance(15) { 0 } else { frame(PT0, rng.below(N_PT)) | flags(rng) };
            (frame(PD0, rng.below(N_PD)) + rng.below(2) * 8, v)
        }
        _ => {
            let mut v = frame(DATA0, rng.below(N_DATA)) | flags(rng);
            if rng.chance(50) {
                v |= D;
            }
            if rng.chance(20) {
                v = 0;
            }
            (frame(PT0, rng.below(N_PT)) + rng.below(4) * 8, v)
        }
    }
}

/// Entries of a simulated vCPU's TLB.
const TLB_ENTRIES: usize = 4;

/// A simulated vCPU: its hardware state and what the model allows it.
#[derive(Default)]
struct SimCpu {
    /// What its CR3 holds: a shadow root's GPA, and that page's role
    /// when loaded.
    cr3: Option<u64>,
    cr3_role: Option<Role>,
    guest_root: u64,
    /// A small TLB (FIFO, [`TLB_ENTRIES`]), so walks through the
    /// paging-structure caches are frequent.
    tlb: Vec<(u64, Tr)>,
    /// Paging-structure caches: (level of the entry, VA bits above it) →
    /// the table it points at, and that page's role when cached.
    psc: HashMap<(u8, u64), (u64, Option<Role>)>,
    /// What the guest's tables held since its last guest-visible flush
    /// and no longer hold: per (level, VA prefix), the entries of levels 4,
    /// 3 and 2 (table, access so far) a paging-structure cache may still
    /// hold, and per (0, VA) the translations a TLB may (Intel SDM vol. 3
    /// §4.10.3: a cached upper entry is combined with the current lower
    /// entries from memory).
    stale: HashMap<(u8, u64), Vec<Tr>>,
    /// Out of `KVM_RUN` with a flush it does before any guest step.
    stopped: bool,
    /// A kick in flight: lands after this many more of its own steps.
    kick_in: Option<u64>,
    /// A guest IPI asking it to flush (trapping mode's shootdown).
    ipi: bool,
    /// Walks that started from a paging-structure cache entry pointing at
    /// a pool page no longer in use.
    stale_walks: u64,
}

impl SimCpu {
    fn hw_flush(&mut self) {
        self.tlb.clear();
        self.psc.clear();
    }
    fn forget(&mut self, va: u64) {
        self.tlb.retain(|&(v, _)| v != va);
        for level in [4u8, 3, 2] {
            self.psc.remove(&(level, prefix(va, level)));
        }
    }

    /// The access as the CPU does it: TLB, paging-structure caches, then
    /// the shadow tables in the pool. `Err` is the `#PF` error code.
    fn translate(
        &mut self,
        mmu: &ShadowMmu,
        pool: &Mem,
        va: u64,
        write: bool,
        user: bool,
    ) -> Result<Result<Tr, u32>, String> {
        let ec = if write { pf::W } else { 0 } | if user { pf::U } else { 0 };
        let allows = |t: Tr| (!write || t.1) && (!user || t.2);
        if let Some(&(_, t)) = self.tlb.iter().find(|&&(v, _)| v == va) {
            if allows(t) {
                return Ok(Ok(t));
            }
            self.forget(va);
            return Ok(Err(ec | pf::P));
        }
        let key = |level: u8| (level, prefix(va, level));
        let (mut table, mut level) =
            match [2u8, 3, 4].iter().find_map(|&l| self.psc.get(&key(l)).map(|&(t, _)| (t, l - 1))) {
                Some(hit) => {
                    // A walk through a table the MMU has let go of: what the
                    // quarantine is for.
                    if mmu.page_of(hit.0).is_some_and(|p| mmu.pages[p as usize].is_none()) {
                        self.stale_walks += 1;
                    }
                    hit
                }
                None => match self.cr3 {
                    Some(cr3) => (cr3, 4),
                    None => return Ok(Err(ec)),
                },
            };
        let (mut w, mut u) = (true, true);
        loop {
            if !pool.is_ram(Gpa(table), PAGE) {
                return Err(format!("walk of {va:#x} reached {table:#x}, outside the pool"));
            }
            let e = pool.get(table + index(va, level) * 8);
            if e & P == 0 {
                self.forget(va);
                return Ok(Err(ec));
            }
            w &= e & RW != 0;
            u &= e & US != 0;
            if level == 1 || e & PS != 0 {
                let t = (e & ADDR, w, u);
                if !allows(t) {
                    self.forget(va);
                    return Ok(Err(ec | pf::P));
                }
                if self.tlb.len() == TLB_ENTRIES {
                    self.tlb.remove(0);
                }
                self.tlb.push((va, t));
                return Ok(Ok(t));
            }
            let role = mmu.page_of(e & ADDR).and_then(|p| mmu.pages[p as usize].as_ref()).map(|sp| sp.role);
            self.psc.insert(key(level), (e & ADDR, role));
            table = e & ADDR;
            level -= 1;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Trapping shadow mode: every guest table write is `pte_written`.
    Shadow,
    /// pv mode: writes queued per vCPU, applied at sync points.
    Pv,
}

/// The world: the MMU, the memories, the vCPUs, the model.
struct World {
    mode: Mode,
    rng: Rng,
    mmu: ShadowMmu,
    pool: Mem,
    g: Mem,
    vcpus: Vec<ShadowVcpu>,
    sims: Vec<SimCpu>,
    queues: Vec<Vec<u64>>,
    /// pv mode: per (guest root, level, VA prefix — or 0 and the VA), what
    /// the guest's tables held before writes still in some queue: allowed
    /// on every vCPU on that root until a sync point applies them (a write
    /// is visible once synced; Linux changes a present entry only with a
    /// shootdown after it, which syncs), even one that loads the root by
    /// itself meanwhile.
    unsynced: HashMap<(u64, u8, u64), Vec<Tr>>,
    /// vCPUs the MMU's remote-flush hook stopped during the last operation.
    hooked: Arc<Mutex<VcpuSet>>,
    /// Every vCPU's CR3, as the VMM reads it from a stopped vCPU.
    cr3s: Arc<Mutex<Vec<Option<u64>>>>,
    universe: Vec<u64>,
    /// Deterministic event counts, for the report and assertions.
    kicks: u64,
    hook_calls: u64,
    accesses: u64,
    /// Steps after which some root was in limbo.
    limbo_steps: u64,
}

impl World {
    fn new(mode: Mode, seed: u64, cpus: usize, pool_pages: u32, sabotage: Sabotage) -> World {
        let mut rng = Rng(seed | 1);
        let g = initial_guest(&mut rng);
        let mut mmu = ShadowMmu::new(Gpa(POOL_BASE), pool_pages, PagingMode::default());
        mmu.sabotage = sabotage;
        if mode == Mode::Pv {
            mmu.set_prefill_user_half(true);
            mmu.set_guest_loads_roots(true);
        }
        let hooked = Arc::new(Mutex::new(VcpuSet::EMPTY));
        let cr3s = Arc::new(Mutex::new(vec![None; cpus]));
        let (h, c) = (hooked.clone(), cr3s.clone());
        mmu.set_remote_flush(Box::new(move |set| {
            let mut stopped = h.lock().expect("not poisoned");
            stopped.0 |= set.0;
            let cr3s = c.lock().expect("not poisoned");
            set.iter().map(|i| (i, cr3s[i].map(Gpa))).collect()
        }));
        let vcpus = (0..cpus).map(|_| mmu.new_vcpu()).collect();
        World {
            mode,
            rng,
            mmu,
            pool: Mem::new(POOL_BASE, pool_pages as u64 * PAGE),
            g,
            vcpus,
            sims: (0..cpus).map(|_| SimCpu::default()).collect(),
            queues: vec![Vec::new(); cpus],
            unsynced: HashMap::new(),
            hooked,
            cr3s,
            universe: universe(),
            kicks: 0,
            hook_calls: 0,
            accesses: 0,
            limbo_steps: 0,
        }
    }

    /// After an operation: the vCPUs the remote-flush hook stopped stay
    /// stopped; the others the MMU names are kicked — the VMM either waits
    /// for them (`vcpus_stopped`) or lets the kick land later. `acting`
    /// then enters again (`prepare_entry`).
    fn after_op(&mut self, acting: Option<usize>) -> Result<(), String> {
        // The entry itself may change things (an obsolete root rebuilt):
        // until nothing new is asked.
        for _ in 0..8 {
            let hooked = std::mem::take(&mut *self.hooked.lock().expect("not poisoned"));
            if !hooked.is_empty() {
                self.hook_calls += 1;
            }
            for id in hooked.iter() {
                self.sims[id].stopped = true;
            }
            let requests = self.mmu.flush_requests();
            for id in requests.iter() {
                if Some(id) == acting || self.sims[id].stopped {
                    continue;
                }
                self.kicks += 1;
                if self.rng.chance(30) {
                    let t = self.mmu.flush_ticket();
                    self.sims[id].stopped = true;
                    self.mmu.vcpus_stopped(VcpuSet::single(id), t);
                } else if self.sims[id].kick_in.is_none() {
                    self.sims[id].kick_in = Some(self.rng.below(8));
                }
            }
            if let Some(id) = acting {
                self.entry(id)?;
            }
            let hooked_since = !self.hooked.lock().expect("not poisoned").is_empty();
            if hooked.is_empty() && requests.is_empty() && !hooked_since {
                return Ok(());
            }
        }
        Err("flush requests keep coming".into())
    }

    /// vCPU `id` enters `KVM_RUN`: rebuild an obsolete root, follow its
    /// root (a CR3 change flushes), flush if it must.
    fn entry(&mut self, id: usize) -> Result<(), String> {
        let work = self
            .mmu
            .prepare_entry(&mut self.vcpus[id], &mut self.pool, &mut self.g)
            .map_err(|e| format!("vCPU {id}: entry: {e}"))?;
        let root = self.mmu.current_root(&self.vcpus[id]).map(|r| r.gpa().raw());
        self.point(id, root);
        let sim = &mut self.sims[id];
        if let Some(t) = work.flush {
            sim.hw_flush();
            self.mmu.vcpu_flushed(id, t);
        }
        sim.stopped = false;
        sim.kick_in = None;
        Ok(())
    }

    /// The VMM points vCPU `id` at `root` (a CR3 change flushes).
    fn point(&mut self, id: usize, root: Option<u64>) {
        let role =
            root.and_then(|r| self.mmu.page_of(r)).and_then(|p| self.mmu.pages[p as usize].as_ref()).map(|sp| sp.role);
        let sim = &mut self.sims[id];
        if root.is_some() && root != sim.cr3 {
            sim.cr3 = root;
            sim.cr3_role = role;
            sim.hw_flush();
            self.cr3s.lock().expect("not poisoned")[id] = root;
        }
    }

    /// pv mode: at every exit the VMM first follows the root the guest may
    /// have loaded itself (its CR3), and points the vCPU at the MMU's root
    /// for it when they differ.
    fn exit(&mut self, id: usize) -> Result<(), String> {
        let Some(cr3) = self.sims[id].cr3.filter(|_| self.mode == Mode::Pv) else { return Ok(()) };
        self.mmu
            .follow_shadow_root(&mut self.vcpus[id], &mut self.pool, &mut self.g, Gpa(cr3))
            .map_err(|e| format!("vCPU {id}: following CR3 {cr3:#x}: {e}"))?;
        let root = self.mmu.current_root(&self.vcpus[id]).map(|r| r.gpa().raw());
        self.point(id, root);
        Ok(())
    }

    /// pv mode: the guest loads a published root itself (`mov cr3`, no
    /// exit), with its own queue empty as the contract says.
    fn load_published_root(&mut self, id: usize) -> Result<(), String> {
        let published: Vec<(Gpa, ShadowRoot)> = self.mmu.published_roots().collect();
        if !self.queues[id].is_empty() || published.is_empty() {
            return self.load_cr3(id);
        }
        let (g, root) = published[self.rng.below(published.len() as u64) as usize];
        self.point(id, Some(root.gpa().raw()));
        let sim = &mut self.sims[id];
        sim.guest_root = g.raw();
        sim.hw_flush();
        sim.stale.clear();
        Ok(())
    }

    /// The walks of every VA for every root some vCPU is on.
    fn snapshot(&self) -> HashMap<(u64, u64), [Option<Tr>; 4]> {
        let mut m = HashMap::new();
        for s in &self.sims {
            for &va in &self.universe {
                m.entry((s.guest_root, va)).or_insert_with(|| model_path(&self.g, s.guest_root, va));
            }
        }
        m
    }

    /// Every pending write queue, applied for `id` (a sync point applies
    /// them all).
    fn sync_queues(&mut self, id: usize, targets: VcpuSet) -> Result<(), String> {
        self.exit(id)?;
        let queues = std::mem::replace(&mut self.queues, vec![Vec::new(); self.vcpus.len()]);
        let slices: Vec<&[u64]> = queues.iter().map(|q| q.as_slice()).collect();
        let out = if targets.is_empty() {
            let batches = self.mmu.sync_queues(&mut self.vcpus[id], &mut self.pool, &mut self.g, &slices, ZONE);
            RemoteFlushOutcome { batches, flush: VcpuSet::EMPTY }
        } else {
            self.mmu.flush_remote(&mut self.vcpus[id], &mut self.pool, &mut self.g, &slices, ZONE, targets)
        };
        if let Some(b) = out.batches.iter().find(|b| b.refused.is_some()) {
            return Err(format!("vCPU {id}: a valid queue was refused: {b:?}"));
        }
        // Every queue applied: what they held is now ordinary staleness
        // for the vCPUs on those roots, and nothing for the others (a
        // vCPU loading a root now gets the synced shadow).
        for (&(root, level, p), old) in &self.unsynced {
            for s in self.sims.iter_mut().filter(|s| s.guest_root == root) {
                let v = s.stale.entry((level, p)).or_default();
                v.extend(old.iter().filter(|o| !v.contains(o)).copied().collect::<Vec<_>>());
            }
        }
        self.unsynced.clear();
        for t in out.flush.iter() {
            // PV_FLUSH_REMOTE returns only when every named vCPU is out of
            // guest mode with its flush to do: the VMM waits.
            if t != id {
                let ticket = self.mmu.flush_ticket();
                self.sims[t].stopped = true;
                self.mmu.vcpus_stopped(VcpuSet::single(t), ticket);
                self.sims[t].stale.clear();
            }
        }
        Ok(())
    }

    /// A flush the guest sees on vCPU `id` (its own flush, or a shootdown
    /// reaching it).
    fn guest_flush(&mut self, id: usize) -> Result<(), String> {
        match self.mode {
            Mode::Shadow => self.mmu.flush(&mut self.vcpus[id]),
            Mode::Pv => self.sync_queues(id, VcpuSet::EMPTY)?,
        }
        self.after_op(Some(id))?;
        self.sims[id].hw_flush();
        self.sims[id].stale.clear();
        Ok(())
    }

    fn access(&mut self, id: usize) -> Result<(), String> {
        self.accesses += 1;
        let va = self.universe[self.rng.below(self.universe.len() as u64) as usize];
        let (write, user) = (self.rng.chance(30), self.rng.chance(10));
        for attempt in 0..3 {
            match self.sims[id].translate(&self.mmu, &self.pool, va, write, user)? {
                Ok(t) => return self.check_allowed(id, va, t),
                Err(ec) => {
                    // pv: SHADOW_FAULT is a sync point (of every queue).
                    if self.mode == Mode::Pv {
                        self.sync_queues(id, VcpuSet::EMPTY)?;
                    }
                    let r = self.mmu.handle_fault(&mut self.vcpus[id], &mut self.pool, &mut self.g, Gva(va), ec);
                    self.after_op(Some(id))?;
                    match r {
                        Ok(FaultOutcome::Fixed) => continue,
                        Ok(FaultOutcome::GuestFault(code)) => {
                            let now = model_walk(&self.g, self.sims[id].guest_root, va);
                            if now.is_some_and(|t| (!write || t.1) && (!user || t.2)) {
                                return Err(format!(
                                    "vCPU {id}: #PF {code:#x} passed on for {va:#x} although the guest maps it: {now:x?}"
                                ));
                            }
                            return Ok(());
                        }
                        Err(e) => return Err(format!("vCPU {id}: fault at {va:#x} (attempt {attempt}): {e}")),
                    }
                }
            }
        }
        Err(format!("vCPU {id}: {va:#x} faults again after being fixed twice"))
    }

    /// A translation vCPU `id` used must be one hardware could give: the
    /// guest's walk now, where each upper entry may instead be one the
    /// guest's tables held at that place since the vCPU's last flush
    /// (combined with the current entries below it), or a whole
    /// translation they held since.
    fn check_allowed(&self, id: usize, va: u64, t: Tr) -> Result<(), String> {
        let sim = &self.sims[id];
        let unsynced = |key: (u8, u64)| self.unsynced.get(&(sim.guest_root, key.0, key.1)).into_iter().flatten();
        let stale = |key: (u8, u64)| sim.stale.get(&key).into_iter().flatten().chain(unsynced(key)).copied();
        // The tables the vCPU may walk at each level, with the access granted above.
        let mut tables = vec![(sim.guest_root, true, true)];
        for level in (2..=4u8).rev() {
            let mut next: Vec<Tr> = stale((level, prefix(va, level))).collect();
            for &(table, w, u) in &tables {
                let e = self.g.get(table + index(va, level) * 8);
                if e & P != 0 {
                    next.push((e & ADDR, w && e & RW != 0, u && e & US != 0));
                }
            }
            next.sort_unstable();
            next.dedup();
            tables = next;
        }
        let mut leaves: Vec<Tr> = stale((0, va)).collect();
        for &(table, w, u) in &tables {
            let e = self.g.get(table + index(va, 1) * 8);
            if e & P != 0 {
                leaves.push((e & ADDR, w && e & RW != 0, u && e & US != 0));
            }
        }
        let fits = |x: &Tr| x.0 == t.0 && (!t.1 || x.1) && (!t.2 || x.2);
        if leaves.iter().any(fits) {
            return Ok(());
        }
        Err(format!(
            "vCPU {id} (guest root {:#x}) translated {va:#x} to {t:x?}: the guest's tables give {:x?}, and since its last flush could give {leaves:x?}",
            sim.guest_root,
            model_walk(&self.g, sim.guest_root, va),
        ))
    }

    fn pte_write(&mut self, id: usize) -> Result<(), String> {
        let (gpa, value) = random_write(&mut self.rng);
        let before = self.snapshot();
        let all_before: Vec<(u64, u64, [Option<Tr>; 4])> = if self.mode == Mode::Pv {
            (0..N_ROOTS)
                .flat_map(|r| self.universe.iter().map(move |&va| (frame(ROOT0, r), va)))
                .map(|(r, va)| (r, va, model_path(&self.g, r, va)))
                .collect()
        } else {
            Vec::new()
        };
        self.g.write_u64(Gpa(gpa), value);
        for (root, va, old) in all_before {
            let new = model_path(&self.g, root, va);
            for (n, level) in [4u8, 3, 2, 0].into_iter().enumerate() {
                if let Some(o) = old[n]
                    && new[n] != Some(o)
                {
                    let p = if level == 0 { va } else { prefix(va, level) };
                    let v = self.unsynced.entry((root, level, p)).or_default();
                    if !v.contains(&o) {
                        v.push(o);
                    }
                }
            }
        }
        for s in self.sims.iter_mut() {
            for &va in &self.universe {
                let old = before[&(s.guest_root, va)];
                let new = model_path(&self.g, s.guest_root, va);
                for (n, level) in [4u8, 3, 2, 0].into_iter().enumerate() {
                    if let Some(o) = old[n]
                        && new[n] != Some(o)
                    {
                        let key = if level == 0 { (0, va) } else { (level, prefix(va, level)) };
                        let v = s.stale.entry(key).or_default();
                        if !v.contains(&o) {
                            v.push(o);
                        }
                    }
                }
            }
        }
        match self.mode {
            Mode::Shadow => {
                // Now and then a partial write: the whole derived page is zapped.
                let len = if self.rng.chance(3) { 4 } else { 8 };
                self.mmu.pte_written(&mut self.vcpus[id], &mut self.pool, &mut self.g, Gpa(gpa), len);
                self.after_op(Some(id))
            }
            Mode::Pv => {
                self.queues[id].push(gpa);
                if self.queues[id].len() >= guest_abi::pv::QUEUE_CAP {
                    self.sync_queues(id, VcpuSet::EMPTY)?;
                    self.after_op(Some(id))?;
                }
                Ok(())
            }
        }
    }

    fn load_cr3(&mut self, id: usize) -> Result<(), String> {
        let root = frame(ROOT0, self.rng.below(N_ROOTS));
        if self.mode == Mode::Pv {
            self.sync_queues(id, VcpuSet::EMPTY)?;
        }
        let r = self.mmu.load_cr3(&mut self.vcpus[id], &mut self.pool, &mut self.g, Gpa(root));
        r.map_err(|e| format!("vCPU {id}: LOAD_CR3 {root:#x}: {e}"))?;
        // The guest's `mov cr3` flushes whatever the VMM makes of it.
        let sim = &mut self.sims[id];
        sim.guest_root = root;
        sim.hw_flush();
        sim.stale.clear();
        self.after_op(Some(id))
    }

    fn shootdown(&mut self, id: usize) -> Result<(), String> {
        let mut targets = VcpuSet::single(id);
        for t in 0..self.vcpus.len() {
            if self.rng.chance(60) {
                targets.insert(t);
            }
        }
        match self.mode {
            Mode::Shadow => {
                for t in targets.iter().filter(|&t| t != id) {
                    self.sims[t].ipi = true;
                }
                self.guest_flush(id)
            }
            Mode::Pv => {
                self.sync_queues(id, targets)?;
                self.after_op(Some(id))?;
                self.sims[id].hw_flush();
                self.sims[id].stale.clear();
                Ok(())
            }
        }
    }

    /// One step of vCPU `id`: what the VMM owes it first, then a random
    /// guest action.
    fn step(&mut self, id: usize) -> Result<(), String> {
        if self.sims[id].stopped || self.sims[id].kick_in == Some(0) {
            // Out of guest mode: the exit, then the entry (and whatever
            // it asks of the others).
            self.exit(id)?;
            self.after_op(Some(id))?;
        } else if let Some(k) = self.sims[id].kick_in.as_mut() {
            *k -= 1;
        }
        if std::mem::take(&mut self.sims[id].ipi) {
            return self.guest_flush(id);
        }
        match self.rng.below(100) {
            0..45 => self.access(id),
            45..75 => self.pte_write(id),
            75..83 => self.guest_flush(id),
            83..90 => self.shootdown(id),
            90..94 if self.mode == Mode::Pv => self.load_published_root(id),
            90..98 => self.load_cr3(id),
            98 if self.mode == Mode::Pv => {
                let va = self.universe[self.rng.below(self.universe.len() as u64) as usize];
                self.sync_queues(id, VcpuSet::EMPTY)?;
                self.mmu.prefetch(&self.vcpus[id], &mut self.pool, &mut self.g, Gva(va));
                self.after_op(Some(id))
            }
            _ if self.rng.chance(10) => {
                // A zap of everything on the VM's own account (new table
                // frames, a repair): every vCPU is running.
                self.mmu.zap_all(&mut self.pool);
                self.after_op(None)
            }
            _ => self.access(id),
        }
    }

    /// Every vCPU's CR3 names a page the MMU counts as its root, and no
    /// vCPU that may run guest code caches a pointer to a pool page reused
    /// (for another role) since it cached it.
    fn check_roots(&self) -> Result<(), String> {
        for (id, s) in self.sims.iter().enumerate() {
            for (&(level, prefix), &(table, role)) in &s.psc {
                let now = self.mmu.page_of(table).and_then(|p| self.mmu.pages[p as usize].as_ref()).map(|sp| sp.role);
                if !s.stopped && role.is_some() && now.is_some() && now != role {
                    return Err(format!(
                        "vCPU {id} caches a level-{level} entry (VA bits {prefix:#x}) pointing at pool page {table:#x}, reused for {now:?} (was {role:?}) before it flushed (its flush state {:?}, kick {:?}; VM at {}, quarantine {:?})",
                        self.mmu.tlb.cpus[id], s.kick_in, self.mmu.tlb.now, self.mmu.quarantine
                    ));
                }
            }
            let Some(cr3) = s.cr3 else { continue };
            let page = self.mmu.page_of(cr3).ok_or(format!("vCPU {id}: CR3 {cr3:#x} outside the pool"))?;
            let now = self.mmu.pages[page as usize].as_ref().map(|sp| sp.role);
            if !s.stopped && now.is_some() && now != s.cr3_role {
                return Err(format!("vCPU {id} runs on pool page {page}, reused for {now:?} (was {:?})", s.cr3_role));
            }
            // pv: a root the guest loaded itself is counted once followed;
            // until then it is cached, or in limbo.
            let known = self.mmu.loaded.contains(&page)
                || (self.mode == Mode::Pv
                    && (self.mmu.roots.iter().any(|&(_, p)| p == page) || self.mmu.limbo.iter().any(|l| l.0 == page)));
            if !known || (self.mmu.pages[page as usize].is_none() && !self.mmu.held.contains(&page)) {
                return Err(format!("vCPU {id} runs on pool page {page}, which no longer counts it as a root"));
            }
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Debug)]
struct Report {
    accesses: u64,
    kicks: u64,
    hook_calls: u64,
    stale_walks: u64,
    limbo_steps: u64,
    stats: ShadowStats,
}

/// `steps` steps of `cpus` vCPUs in a random interleaving; the first
/// violation, or what happened.
fn stress(
    mode: Mode,
    seed: u64,
    steps: u64,
    cpus: usize,
    pool_pages: u32,
    sabotage: Sabotage,
) -> Result<Report, String> {
    let mut w = World::new(mode, seed, cpus, pool_pages, sabotage);
    for id in 0..cpus {
        w.load_cr3(id)?;
    }
    for n in 0..steps {
        let id = w.rng.below(cpus as u64) as usize;
        w.step(id).map_err(|e| format!("step {n}: {e}"))?;
        w.check_roots().map_err(|e| format!("step {n}: {e}"))?;
        w.limbo_steps += u64::from(!w.mmu.limbo.is_empty());
        if n % 512 == 0 {
            w.mmu.check_invariants(&w.pool, &w.g).map_err(|e| format!("step {n}: {e}"))?;
        }
    }
    w.mmu.check_invariants(&w.pool, &w.g)?;
    let stale_walks = w.sims.iter().map(|s| s.stale_walks).sum();
    Ok(Report {
        accesses: w.accesses,
        kicks: w.kicks,
        hook_calls: w.hook_calls,
        stale_walks,
        limbo_steps: w.limbo_steps,
        stats: w.mmu.stats(),
    })
}

/// Steps for the stress runs: `SHADOW_SMP_STEPS` (the long run of
/// docs/testing.md sets 1000000), 100,000 by default.
fn steps() -> u64 {
    std::env::var("SHADOW_SMP_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000)
}

/// The seed of a stress run: `seed`, unless `SHADOW_SMP_SEED` says
/// otherwise (the failing step is reported with it, and the run is
/// deterministic, so a failure replays exactly).
fn seed(seed: u64) -> u64 {
    std::env::var("SHADOW_SMP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(seed)
}

#[test]
fn four_vcpus_in_trapping_shadow_mode_only_ever_translate_what_the_guest_allows() {
    let r = stress(Mode::Shadow, seed(0x5eed_0001), steps(), 4, 24, Sabotage::None).unwrap();
    // The run exercised what it is about: remote flushes, exhaustion,
    // quarantine reuse through the VMM's remote flush, and vCPUs walking
    // through cached pointers at pages the MMU had let go of (which the
    // quarantine kept from reuse).
    assert!(r.kicks > 1000 && r.stats.pool_exhaustions > 0 && r.hook_calls > 0 && r.stale_walks > 0, "{r:?}");
    assert!(r.stats.zaps > 1000 && r.stats.hidden_faults > 1000 && r.accesses > 10_000, "{r:?}");
}

#[test]
fn four_vcpus_in_pv_mode_with_remote_flushes_only_ever_translate_what_the_guest_allows() {
    let r = stress(Mode::Pv, seed(0x5eed_0002), steps(), 4, 24, Sabotage::None).unwrap();
    assert!(r.stats.remote_flushes > 1000 && r.stats.batch_entries > 10_000, "{r:?}");
    assert!(r.kicks > 1000 && r.stats.pool_exhaustions > 0, "{r:?}");
    // Guests loaded published roots by themselves, and some of those were
    // evicted or zapped while a vCPU could be on them.
    assert!(r.limbo_steps > 100, "{r:?}");
}

#[test]
fn freeing_a_root_the_guest_may_have_loaded_itself_is_caught() {
    let e = stress(Mode::Pv, 0x5eed_0002, steps(), 4, 24, Sabotage::NoLimbo).unwrap_err();
    eprintln!("caught: {e}");
    assert!(e.contains("reused") || e.contains("no longer counts it") || e.contains("translated"), "{e}");
}

#[test]
fn freeing_without_quarantine_is_caught() {
    let e = stress(Mode::Shadow, 0x5eed_0001, steps(), 4, 24, Sabotage::NoQuarantine).unwrap_err();
    eprintln!("caught: {e}");
    assert!(e.contains("reused") || e.contains("translated") || e.contains("outside"), "{e}");
}

#[test]
fn evicting_a_root_another_vcpu_runs_on_is_caught() {
    let e = stress(Mode::Shadow, 0x5eed_0003, steps(), 4, 200, Sabotage::EvictLoadedRoots).unwrap_err();
    eprintln!("caught: {e}");
    assert!(e.contains("no longer counts it") || e.contains("translated"), "{e}");
}

/// The same MMU behind a `Mutex`, one thread per vCPU, as the VMM will
/// share it: no deadlock, no panic, the checker holds, and every shadow
/// leaf a vCPU's root has is the guest's translation (trapping mode keeps
/// the shadow itself exact; only TLBs may lag, and there are none here).
#[test]
fn four_threads_sharing_one_mmu_behind_a_mutex() {
    struct Shared {
        mmu: ShadowMmu,
        pool: Mem,
        g: Mem,
    }
    let mut rng = Rng(0x7437);
    let g = initial_guest(&mut rng);
    let mut mmu = ShadowMmu::new(Gpa(POOL_BASE), 48, PagingMode::default());
    // The VMM's remote flush: the other threads are never in guest mode
    // here, so every vCPU asked for counts as stopped with a flush to do.
    mmu.set_remote_flush(Box::new(|set| set.iter().map(|i| (i, None)).collect()));
    let vcpus: Vec<ShadowVcpu> = (0..4).map(|_| mmu.new_vcpu()).collect();
    let shared = Arc::new(Mutex::new(Shared { mmu, pool: Mem::new(POOL_BASE, 48 * PAGE), g }));
    let threads: Vec<_> = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, mut cpu)| {
            let shared = shared.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let mut rng = Rng(0x1000 + i as u64);
                let vas = universe();
                let mut root = frame(ROOT0, i as u64);
                let mut checked = 0;
                {
                    let mut s = shared.lock().map_err(|_| "poisoned")?;
                    let Shared { mmu, pool, g } = &mut *s;
                    mmu.load_cr3(&mut cpu, pool, g, Gpa(root)).map_err(|e| e.to_string())?;
                }
                for n in 0..5_000 {
                    let mut s = shared.lock().map_err(|_| "poisoned")?;
                    let Shared { mmu, pool, g } = &mut *s;
                    if let Some(t) = mmu.prepare_entry(&mut cpu, pool, g).map_err(|e| e.to_string())?.flush {
                        mmu.vcpu_flushed(cpu.id(), t);
                    }
                    match rng.below(10) {
                        0..4 => {
                            // Only what would fault: the shadow lacks it.
                            let va = vas[rng.below(vas.len() as u64) as usize];
                            let write = rng.chance(40);
                            let leaf = mmu.shadow_leaf(&cpu, pool, Gva(va));
                            if leaf.is_none_or(|(e, _)| write && e & RW == 0) {
                                let ec = if write { pf::W } else { 0 } | if leaf.is_some() { pf::P } else { 0 };
                                mmu.handle_fault(&mut cpu, pool, g, Gva(va), ec).map_err(|e| format!("{n}: {e}"))?;
                            }
                        }
                        4..8 => {
                            let (gpa, value) = random_write(&mut rng);
                            g.write_u64(Gpa(gpa), value);
                            mmu.pte_written(&mut cpu, pool, g, Gpa(gpa), 8);
                        }
                        _ => {
                            root = frame(ROOT0, rng.below(N_ROOTS));
                            mmu.load_cr3(&mut cpu, pool, g, Gpa(root)).map_err(|e| e.to_string())?;
                        }
                    }
                    let _ = mmu.flush_requests();
                    for &va in &vas {
                        if let Some((e, _)) = mmu.shadow_leaf(&cpu, pool, Gva(va)) {
                            let want = model_walk(g, root, va);
                            if want.map(|t| t.0) != Some(e & ADDR) {
                                return Err(format!(
                                    "vCPU {i} step {n}: shadow maps {va:#x} to {e:#x}, guest {want:x?}"
                                ));
                            }
                            checked += 1;
                        }
                    }
                }
                let mut s = shared.lock().map_err(|_| "poisoned")?;
                let Shared { mmu, pool, .. } = &mut *s;
                mmu.remove_vcpu(pool, cpu);
                Ok(checked)
            })
        })
        .collect();
    let checked: u64 = threads.into_iter().map(|t| t.join().expect("no panic").unwrap()).sum();
    assert!(checked > 10_000, "the shadow held translations to check: {checked}");
    let s = shared.lock().unwrap();
    s.mmu.check_invariants(&s.pool, &s.g).unwrap();
    assert!(s.mmu.loaded.is_empty() && s.mmu.held.is_empty(), "every vCPU left: no root held");
}

#[test]
fn the_mmu_can_be_shared_between_threads() {
    fn send<T: Send>() {}
    send::<ShadowMmu>();
    send::<std::sync::Mutex<ShadowMmu>>();
    send::<ShadowVcpu>();
}

/// The protocol step by step, on the small guest of `tests.rs`: what the
/// VMM's vCPU threads do (module doc of `mmu.rs`, "SMP").
mod protocol {
    use super::super::tests::{T, guest_with, setup, va};
    use super::*;

    /// Two vCPUs on the guest root 0x1000, both with `va(0)` shadowed.
    fn two_on_one_root() -> (ShadowMmu, Mem, Mem, ShadowVcpu, ShadowVcpu) {
        let (mut mmu, mut pool) = setup(64);
        let mut g = guest_with(0x1000, P | RW | A | D, 4);
        let (mut a, mut b) = (mmu.new_vcpu(), mmu.new_vcpu());
        for cpu in [&mut a, &mut b] {
            mmu.load_cr3(cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
        }
        assert_eq!(mmu.current_root(&a), mmu.current_root(&b), "one root, counted twice");
        assert_eq!(mmu.handle_fault(&mut b, &mut pool, &mut g, Gva(va(0)), 0), Ok(FaultOutcome::Fixed));
        // Both have flushed everything so far.
        for cpu in [&a, &b] {
            let t = mmu.flush_ticket();
            mmu.vcpu_flushed(cpu.id(), t);
        }
        assert!(mmu.flush_requests().is_empty() && !mmu.host_stale());
        (mmu, pool, g, a, b)
    }

    #[test]
    fn a_page_freed_while_another_vcpu_may_cache_it_waits_for_that_vcpus_flush() {
        let (mut mmu, mut pool, mut g, mut a, b) = two_on_one_root();
        let pt = mmu.by_role.iter().find(|(r, _)| r.level == 1).map(|(_, &p)| p).unwrap();
        // vCPU a unmaps the page table: the shadow PT is freed.
        g.write_u64(Gpa(0x21000 + 2 * 8), 0);
        mmu.pte_written(&mut a, &mut pool, &mut g, Gpa(0x21000 + 2 * 8), 8);
        assert!(mmu.pages[pt as usize].is_none() && mmu.quarantine.iter().any(|&(p, _)| p == pt));
        // Both must flush; each is named once.
        let ask = mmu.flush_requests();
        assert_eq!(ask, VcpuSet(0b11));
        assert!(mmu.flush_requests().is_empty(), "named once per change");
        assert!(mmu.needs_flush(&a) && mmu.needs_flush(&b));
        // The acting vCPU cannot have the page while b may still walk it...
        assert!(!mmu.free.contains(&pt));
        mmu.tlb.acting = Some(a.id());
        let without_pt = mmu.free_pages();
        // ...until b is stopped with its flush to do (the VMM waited for it).
        let t = mmu.flush_ticket();
        mmu.vcpus_stopped(VcpuSet::single(b.id()), t);
        assert!(mmu.needs_flush(&b), "b still owes the flush");
        assert_eq!(mmu.free_pages(), without_pt + 1, "a may reuse it now, and would owe a flush");
        assert!(!mmu.free.contains(&pt), "not free for everyone: a has not flushed");
        let t = mmu.flush_ticket();
        mmu.vcpu_flushed(a.id(), t);
        assert!(mmu.free.contains(&pt), "every vCPU has flushed: free");
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn the_root_cache_never_evicts_a_root_another_vcpu_runs_on() {
        let (mut mmu, mut pool) = setup(64);
        let mut g = Mem::new(0, RAM);
        let roots: Vec<u64> = (1..=12).map(|i| i * 0x1000).collect();
        for &r in &roots {
            g.write_u64(Gpa(r), 0x20000 | T);
        }
        let (mut a, mut b) = (mmu.new_vcpu(), mmu.new_vcpu());
        let held = mmu.load_cr3(&mut b, &mut pool, &mut g, Gpa(roots[0])).unwrap();
        for &r in &roots[1..] {
            mmu.load_cr3(&mut a, &mut pool, &mut g, Gpa(r)).unwrap();
        }
        let cap = mmu.root_cache_capacity();
        assert!(roots.len() > cap + 1, "the scenario evicts");
        assert_eq!(mmu.current_root(&b), Some(held), "b's root is still its root");
        assert!(mmu.roots.iter().any(|&(g, _)| g == roots[0]), "and still cached");
        assert_eq!(mmu.roots.len(), cap);
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn a_zap_of_everything_holds_the_roots_vcpus_run_on_until_they_leave() {
        let (mut mmu, mut pool, mut g, mut a, mut b) = two_on_one_root();
        let root = mmu.page_of(mmu.current_root(&b).unwrap().gpa().raw()).unwrap();
        mmu.zap_all(&mut pool);
        assert_eq!(mmu.held, vec![root], "held once, for both vCPUs");
        assert_eq!(mmu.flush_requests(), VcpuSet(0b11));
        // b's entry rebuilds its root; a's CR3 still holds the old page.
        let work = mmu.prepare_entry(&mut b, &mut pool, &mut g).unwrap();
        let new = work.root.expect("a new root to point CR3 at");
        assert_ne!(mmu.page_of(new.gpa().raw()), Some(root));
        assert!(work.flush.is_some());
        assert_eq!(mmu.held, vec![root], "a still runs on it");
        // a faults on its (zeroed) old root: the fault moves it too.
        assert_eq!(mmu.handle_fault(&mut a, &mut pool, &mut g, Gva(va(1)), 0), Ok(FaultOutcome::Fixed));
        assert_eq!(mmu.current_root(&a), Some(new));
        assert!(mmu.held.is_empty() && mmu.quarantine.iter().any(|&(p, _)| p == root));
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn a_remote_flush_applies_every_queue_then_names_its_targets() {
        let (mut mmu, mut pool, mut g, mut a, b) = two_on_one_root();
        let c = mmu.new_vcpu();
        // b unmapped va(0) (queued in b's queue); a asks b and c to flush.
        g.write_u64(Gpa(0x22000), 0);
        let queues: [&[u64]; 3] = [&[], &[0x22000], &[]];
        let out =
            mmu.flush_remote(&mut a, &mut pool, &mut g, &queues, (Gpa(0), Gpa(0x10_0000)), VcpuSet(0b110 | 1 << 40));
        assert_eq!(out.flush, VcpuSet(0b110), "vCPU 40 does not exist");
        assert_eq!(out.batches[1].applied, 1);
        assert_eq!(mmu.shadow_leaf(&b, &pool, Gva(va(0))), None, "b's write is in the shadow");
        assert!(mmu.needs_flush(&b) && mmu.needs_flush(&c));
        assert!(mmu.flush_requests().contains(c.id()), "c owes a flush although nothing it walked changed");
        assert_eq!(mmu.stats().remote_flushes, 1);
        mmu.remove_vcpu(&mut pool, c);
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn a_published_root_a_guest_may_be_on_waits_in_limbo_until_every_vcpu_is_seen_elsewhere() {
        let (mut mmu, mut pool) = setup(64);
        mmu.set_guest_loads_roots(true);
        let mut g = Mem::new(0, RAM);
        let roots: Vec<u64> = (1..=12).map(|i| i * 0x1000).collect();
        for &r in &roots {
            g.write_u64(Gpa(r), 0x20000 | T);
        }
        let (mut a, mut b) = (mmu.new_vcpu(), mmu.new_vcpu());
        // b's guest loads the published root of roots[0] by itself: the
        // MMU does not know.
        let first = mmu.load_cr3(&mut a, &mut pool, &mut g, Gpa(roots[0])).unwrap();
        mmu.load_cr3(&mut b, &mut pool, &mut g, Gpa(roots[1])).unwrap();
        assert!(mmu.published_roots().any(|(_, s)| s == first));
        // a moves on through every other root: roots[0] is evicted.
        for &r in &roots[2..] {
            mmu.load_cr3(&mut a, &mut pool, &mut g, Gpa(r)).unwrap();
        }
        let page = mmu.page_of(first.gpa().raw()).unwrap();
        assert!(!mmu.roots.iter().any(|&(_, p)| p == page), "evicted");
        assert!(mmu.pages[page as usize].is_some(), "but not freed: b may be on it");
        assert_eq!(mmu.limbo_root(page), Some(roots[0]));
        // At b's next exit the VMM reports b's CR3: b is on it, and is
        // moved to a root of its own for roots[0].
        assert_eq!(mmu.follow_shadow_root(&mut b, &mut pool, &mut g, first.gpa()), Ok(true));
        assert_eq!(mmu.guest_cr3(&b), Some(Gpa(roots[0])));
        assert_eq!(mmu.limbo_root(page), None, "b has left it; a was never pending (it evicted it)");
        assert!(mmu.limbo.iter().all(|l| l.2 == VcpuSet::single(a.id())), "b's own eviction waits for a alone");
        mmu.check_invariants(&pool, &g).unwrap();
    }

    #[test]
    fn one_vcpu_behaves_as_before_smp() {
        // A freed page may be reused before the one vCPU runs again, and
        // one invalidation releases the whole quarantine.
        let (mut mmu, mut pool) = setup(64);
        let mut g = guest_with(0x1000, P | RW | A | D, 4);
        let mut cpu = mmu.new_vcpu();
        mmu.load_cr3(&mut cpu, &mut pool, &mut g, Gpa(0x1000)).unwrap();
        mmu.handle_fault(&mut cpu, &mut pool, &mut g, Gva(va(0)), 0).unwrap();
        mmu.host_invalidated();
        let free = mmu.free_pages();
        g.write_u64(Gpa(0x21000 + 2 * 8), 0);
        mmu.pte_written(&mut cpu, &mut pool, &mut g, Gpa(0x21000 + 2 * 8), 8);
        assert!(mmu.host_stale() && !mmu.quarantine.is_empty());
        assert_eq!(mmu.free_pages(), free + 1, "the quarantined page counts as reusable");
        mmu.host_invalidated();
        assert!(mmu.quarantine.is_empty() && !mmu.host_stale());
        assert_eq!(mmu.stats().host_invalidations, 1);
    }
}
