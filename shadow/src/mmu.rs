//! The shadow MMU: the page tables the vCPU really walks, derived from the
//! guest's own tables and kept coherent with them by the VMM.
//!
//! # Overview (after KVM's `Documentation/virt/kvm/x86/mmu.rst`)
//!
//! The guest believes its CR3 points at its own PML4. In shadow mode the
//! vCPU's CR3 points instead at a **shadow root** in the **shadow pool**, a
//! range of guest-physical memory the guest's memory map does not contain
//! (and which, see the trust model below, the guest can still reach).
//! Shadow tables translate GVA → GPA directly with the
//! *effective* permissions of the guest walk; KVM's own second stage (or,
//! on a host without EPT/NPT, KVM's own shadowing) does GPA → HPA below.
//!
//! ## Shadow pages and their role
//!
//! Every shadow page is derived from exactly one guest table page and has a
//! **role**: the guest frame it shadows (`gfn`), its level (4 = PML4 … 1 =
//! PT) and the access its parents grant (writable, user, executable: the
//! AND of RW, US and ¬XD above it). Pages are looked up by role, so two
//! guest PML4s that share a kernel PDPT share its shadow as well — the
//! **shared kernel subtrees** come for free. Non-leaf shadow entries are
//! fully permissive (P, RW, US, A; no XD); the leaf carries the effective
//! permissions, as in KVM.
//!
//! ## Per VM and per vCPU
//!
//! As in KVM, the shadow pages belong to the VM and a vCPU only holds a
//! root into them. [`ShadowMmu`] is the VM's part: the shadow pages, their
//! role index and reverse map, the pool with its free list and quarantine,
//! the root cache, the host-coherence state, the paging rules the shadow
//! was computed under, and the counters. [`ShadowVcpu`] is a vCPU's part:
//! its current root (and the guest CR3 behind it), its paging controls and
//! its last fixed fault. An operation done for a vCPU (`LOAD_CR3`,
//! `SHADOW_FAULT`, a trapped PTE write, a flush, a pv sync) is a
//! `ShadowMmu` method that takes the vCPU; one that concerns the VM alone
//! (host invalidation, pool repair, counters) takes none. A zap of
//! everything starts a new *generation* and every vCPU's root becomes
//! obsolete at once, without the MMU reaching into the vCPUs (KVM's
//! `mmu_valid_gen`); each vCPU rebuilds its root at its next `LOAD_CR3`,
//! fault or entry. How several vCPUs share one `ShadowMmu` is "SMP" below.
//!
//! ## Invariants
//!
//! 1. A present shadow leaf maps exactly the GPA the guest walk gives for
//!    that GVA, never more permissively than the walk allows for the
//!    accesses that can reach it, and only guest RAM (the walker refuses
//!    anything else). The shadow pool is never mapped: the isolation
//!    property. (The one leaf whose bits alone would grant more — a user
//!    leaf made writable for a supervisor write under CR0.WP = 0 and SMAP —
//!    exists only while user mode cannot run; see "Paging controls".)
//! 2. A shadow leaf exists only for a guest leaf whose A bit is set, and is
//!    writable only when the guest leaf's D bit is set. So the first access
//!    to a page, and the first write to a clean page, fault to the VMM,
//!    which sets A / D in the guest entry exactly as hardware would
//!    (**A/D emulation**).
//! 3. The **reverse map** lists, for every guest table frame, the shadow
//!    pages derived from it. Every guest page-table page is in the
//!    read-only page-table zone, so every guest write to one exits to the
//!    VMM ([`ShadowMmu::pte_written`]), which updates the derived shadow
//!    entry in place when it can (a new leaf with A set) and zaps it
//!    otherwise. A partial or misaligned write zaps the whole shadow page.
//! 4. **Host coherence.** On a host whose KVM itself shadows page tables,
//!    changes the VMM makes to shadow tables are invisible to the vCPU
//!    until the VMM makes the host forget (docs/host.md); on any host a
//!    vCPU's TLB may cache them. Every change that removes or restricts a
//!    mapping is recorded in the VM's TLB generation, and every vCPU must
//!    flush before it runs guest code again ([`ShadowMmu::host_stale`],
//!    [`ShadowMmu::host_invalidated`] with one vCPU; "SMP" below with
//!    several). Freed pool pages wait in quarantine until every vCPU has
//!    flushed, so no page a vCPU or the host may still cache is reused
//!    early.
//!    With [`ShadowMmu::set_defer_unreachable`] (trapping shadow mode) a
//!    change in a page the loaded root does not reach is remembered instead
//!    and makes the host stale when a root that reaches it is loaded (or a
//!    quarantined page is reused): the vCPU cannot use it before.
//! 5. **Pool exhaustion** zaps everything (all roots included) and
//!    rebuilds the current root: correct, counted, and rare.
//! 6. **Only trapped tables are shadowed.** A guest paging structure must
//!    lie in a frame whose writes trap ([`ShadowMmu::set_table_frames`]:
//!    the page-table zone and the VMM's boot tables); a root outside is
//!    refused ([`ShadowError::RootNotTrapped`]) and an entry pointing at a
//!    table outside is treated like a reserved bit (`#PF` with RSVD), so no
//!    shadow is ever derived from a table the VMM could not keep coherent.
//! 7. **No livelock.** A `SHADOW_FAULT` answered [`FaultOutcome::Fixed`]
//!    promises that the retried access passes. If the very same fault
//!    (address and error code) comes back with nothing changed in between
//!    (no page-table write, CR3 load, flush or rule change), the shadow did
//!    not do what the walk promised: the one known cause, an *implicit*
//!    supervisor access with CR4.SMAP and RFLAGS.AC = 1 (the error code does
//!    not say "implicit"; SDM vol. 3 §4.6.1 says it faults whatever AC is),
//!    becomes the guest's own `#PF` (the first walk, answered "fixed",
//!    already set the entries' A bits, which the model of hardware here —
//!    KVM's walker — leaves alone on a faulting access); anything else is
//!    [`ShadowError::Livelock`], never an endless loop.
//!
//! pv mode (`mmu::pv`) applies the guest's queued writes in batches
//! through the same per-entry path as a trapped write, publishes the
//! cached roots, and prefetches the translation a sync names; its harvest
//! (`mmu::harvest`) installs level-1 leaves with A clear, which the CPU
//! sets in the pool — the one bit in which the pool may differ from the
//! VMM's copy.
//!
//! # SMP (issue 18)
//!
//! ## The MMU lock (KVM's `mmu_lock`)
//!
//! One `ShadowMmu` per VM, behind one lock: the VMM holds it in a
//! `Mutex<ShadowMmu>` (it is `Send`) and every operation — a vCPU's
//! `LOAD_CR3`, `SHADOW_FAULT`, trapped write, flush, pv sync, its entry
//! work, and the VM's own (pool repair, table frames, zap of everything) —
//! runs with the lock held, start to end. Each vCPU's [`ShadowVcpu`] is
//! owned by its vCPU thread, outside the lock (KVM's `vcpu->arch.mmu`),
//! and passed into the operation; what other threads must know of it (its
//! root, its flush state) lives in the `ShadowMmu`. One lock, not finer:
//! every operation may touch the pool, the role index and the reverse map
//! together, and an operation is microseconds against a `KVM_RUN` exit's
//! cost (docs/benchmarks.md): four threads doing nothing but MMU
//! operations (faults, trapped writes, CR3 loads, entry work) held the
//! lock 3–5 µs per operation and waited 5–7 µs for it (release build,
//! 2-core machine at load average 5, 2026-12-08) — saturated by design,
//! where real vCPUs spend most of their time in guest mode. Finer locking
//! has nothing to win until the VMM measures contention; the stress tests'
//! 4 threads share one mutex.
//!
//! Lock order, outermost first: **(per-vCPU state, owned by its thread —
//! no lock) → the MMU lock → the console queue → the statistics.** A
//! thread holding the MMU lock may take the console queue or the stats,
//! never the reverse; nothing under the MMU lock waits for a vCPU thread
//! that could be waiting for the MMU lock: a kicked vCPU leaves guest mode
//! (and says so in its own atomic state) without any lock, so waiting for
//! that under the MMU lock cannot deadlock. A vCPU marks itself in guest
//! mode only with no VM lock held.
//!
//! ## Coherence among vCPUs (`coherence.rs`)
//!
//! 1. **A zapped shadow entry another vCPU may cache**: every change is
//!    recorded in the VM's TLB generation (Linux's `tlb_gen`), and
//!    [`ShadowMmu::flush_requests`] names every vCPU that must flush
//!    before it runs guest code again — after each operation the VMM kicks
//!    those in `KVM_RUN` and the others flush at their next entry
//!    ([`ShadowMmu::prepare_entry`], then [`ShadowMmu::vcpu_flushed`]). A
//!    page freed meanwhile is **quarantined**, tagged with its generation,
//!    and becomes free only when every vCPU has flushed past it — a real
//!    flush, or the vCPU stopped outside `KVM_RUN` with the flush still to
//!    do ([`ShadowMmu::vcpus_stopped`]: KVM's `kvm_flush_remote_tlbs`
//!    waiting for the kicks). The vCPU an operation is done for is out of
//!    `KVM_RUN`, so it may reuse a page every *other* vCPU has flushed,
//!    and then owes a flush. When the pool has nothing else to give, the
//!    MMU calls the VMM's remote flush ([`ShadowMmu::set_remote_flush`]:
//!    kick, wait until out of guest mode) for the vCPUs holding it back.
//! 2. **A trapped PTE write on one vCPU** changes the shared shadow at
//!    once, so a vCPU with nothing cached walks the new translation. One
//!    with the old one cached keeps it until it flushes, which is no later
//!    than the guest's own shootdown reaching it: by default the MMU asks
//!    every vCPU to flush after every change (trapping mode), and the VMM
//!    waits for the kicked ones before the writing vCPU resumes, so no
//!    vCPU outlives the write with it; where the guest's flushes are real
//!    ones (pv mode on an EPT/NPT host, [`ShadowMmu::host_flush_left_to_guest`])
//!    the guest's own `invlpg`, CR3 load or `PV_FLUSH_REMOTE` reaching
//!    each CPU is the flush — exactly the staleness hardware allows (Intel
//!    SDM vol. 3 §4.10.4–4.10.5: a cached translation, or a cached upper
//!    entry combined with the current lower ones, until invalidated).
//!    Never longer, and never a translation the guest's tables never held:
//!    pool pages are not reused under a vCPU that may still walk them.
//! 3. **Roots loaded on several vCPUs are counted** (`loaded`, one entry
//!    per vCPU): the root cache never evicts a root some vCPU runs on (it
//!    grows past its capacity instead), a root left by its last vCPU after
//!    eviction is freed then, and a zap of everything zeroes and *holds*
//!    the roots vCPUs' CR3s point at until each has moved to a new one.
//!    In pv mode a guest loads published roots itself, unseen: with
//!    [`ShadowMmu::set_guest_loads_roots`] a root evicted or zapped waits
//!    in *limbo* (in use, or held) until every vCPU's CR3 has been
//!    reported elsewhere ([`ShadowMmu::follow_shadow_root`] at each exit).
//!
//! Paging controls (CR0.WP, EFER.NXE, CR4.SMEP/SMAP) are per VM, as the
//! shadow pages computed under them: a guest whose CPUs disagree is
//! correct but zaps everything at each switch (a guest keeps them equal on
//! every CPU). The emulation of CR0.WP = 0 under SMAP relies on the
//! flushes above reaching every vCPU before user mode runs, so it is not
//! to be combined with [`ShadowMmu::host_flush_left_to_guest`].
//!
//! pv mode on SMP (`remote.rs`): one write queue per vCPU
//! (`guest_abi::pv`, layout version 2, rings any vCPU's exit may drain);
//! every sync point applies every vCPU's queue ([`ShadowMmu::sync_queues`]),
//! and `PV_FLUSH_REMOTE` ([`ShadowMmu::flush_remote`]) does that and then
//! makes the named vCPUs owe a flush.
//!
//! What the VMM calls, per vCPU thread. `request[v]` and `mode[v]` are
//! the VMM's per-vCPU atomics (SeqCst), outside the MMU lock: KVM's
//! `vcpu->requests` and `vcpu->mode`, whose store-then-load on both sides
//! makes a request either seen by the vCPU before it enters or answered
//! by a kick (`kvm_vcpu_exiting_guest_mode`). The library's own record of
//! who owes a flush is behind the lock; the atomics only make the vCPU
//! come and look. (`mmu::smp_tests` runs this protocol, sequentially.)
//!
//! ```text
//! let mut cpu = mmu.lock().new_vcpu();                 // before the thread starts
//! loop {
//!     request[me].store(false);
//!     { let mut m = mmu.lock();                        // entry work
//!       let work = m.prepare_entry(&mut cpu, ..)?;     // an obsolete root rebuilt?
//!       if let Some(root) = work.root { point CR3 at it }   // (a CR3 change flushes)
//!       if let Some(t) = work.flush { flush this vCPU; m.vcpu_flushed(cpu.id(), t) } }
//!     mode[me].store(IN_GUEST);
//!     if request[me].load() { mode[me].store(OUTSIDE); continue }
//!     KVM_RUN;
//!     mode[me].store(OUTSIDE);
//!     { let mut m = mmu.lock();                        // a shadow exit
//!       (pv: m.follow_shadow_root(&mut cpu, .., CR3 from the sync regs); re-point CR3 if moved)
//!       m.handle_fault(&mut cpu, ..) / m.pte_written(..) / m.load_cr3(..) / ..;
//!       let ask = m.flush_requests().minus(VcpuSet::single(me));
//!       let t = m.flush_ticket();
//!       for v in ask { request[v].store(true); if mode[v].load() == IN_GUEST { kick v; wait for OUTSIDE } }
//!       m.vcpus_stopped(ask, t); }                     // only now may their pages be reused
//! }
//! mmu.lock().remove_vcpu(pool, cpu);                   // when the thread ends
//! ```
//!
//! The remote-flush hook ([`ShadowMmu::set_remote_flush`]) is the same
//! `for v` loop, returning the vCPUs it stopped. Waiting for a kicked vCPU
//! while holding the MMU lock is safe because leaving guest mode takes no
//! lock; a VMM that would rather not wait under the lock may skip
//! `vcpus_stopped` — the pages then wait in quarantine for the vCPUs' own
//! [`ShadowMmu::vcpu_flushed`] — but in trapping mode the writing vCPU
//! must not resume before the kicked ones are out (invariant 2 of "SMP").
//!
//! # Paging controls (SDM vol. 3 §4.6 "Access rights", §4.7 "Page-fault exceptions")
//!
//! The vCPU runs with CR0.WP = 1 and EFER.NXE = 1 whatever the guest set,
//! as KVM's shadow MMU does (`Documentation/virt/kvm/x86/mmu.rst`,
//! "Emulating cr0.wp"): WP = 1 so that read-only shadow leaves trap
//! supervisor writes (D-bit emulation), NXE = 1 so that shadow leaves can
//! carry XD for reasons of their own and every fetch fault's error code
//! has I/D set (with the guest's NXE = 0 and SMEP = 0 a fetch would
//! otherwise look like a read, and with SMAP = 1 a supervisor fetch from a
//! user page would get a spurious fault). The guest's own controls
//! ([`PagingMode`]) govern the walk and the error code the guest sees.
//!
//! - **A WP = 0 the guest does not report**: a guest can clear the vCPU's
//!   WP with its own `mov cr0`, which does not exit; supervisor writes
//!   then pass read-only leaves. Read-only leaves therefore keep D clear
//!   (writable ones have it set), so the hardware records such a write in
//!   the leaf; [`ShadowMmu::harvest_dirty_leaves`] gives that D to the
//!   guest's entry at the next pool check, before the pool is repaired.
//!
//! - **CR0.WP = 0** is emulated per fault, as KVM does: a supervisor write
//!   to a read-only page gets a writable, supervisor-only leaf (a later
//!   user access refaults and gets the ordinary read-only user leaf back). With CR4.SMEP that leaf also gets XD: the
//!   page is a user page to the guest, and §4.6.1 forbids supervisor
//!   fetches from it (`#PF` 0x11), which the now-supervisor leaf would let
//!   through.
//! - **CR0.WP = 0 with CR4.SMAP**: a supervisor write to a read-only *user*
//!   page passes only with RFLAGS.AC = 1, and AC changes (`stac`, `clac`,
//!   `popf`) do not exit. A supervisor-only leaf (KVM's choice) would let
//!   later AC = 0 and implicit supervisor accesses through, which must
//!   fault. So the leaf stays a *user* leaf, made writable (and XD): SMAP
//!   then checks every later supervisor access exactly, and only user-mode
//!   code could misuse it. User mode cannot run without first fetching an
//!   instruction, so while such a leaf exists every other user-accessible
//!   shadow leaf is zapped and new ones are made XD (or, for a supervisor
//!   fetch, supervisor-only): the first user-mode access faults, and that
//!   fault puts the ordinary read-only leaf back before anything else. It
//!   costs a scan of the pool and refaults of the user working set, for
//!   what is a rare combination of controls.
//!
//! Guest page-table pages are never written by the VMM except for A/D
//! bits, which the walker sets as hardware would.
//!
//! ## Trust model
//!
//! The guest is hostile; ring 0 in the guest is not trusted either.
//!
//! - **The pool is guest-writable.** The vCPU walks the shadow tables, so
//!   the pool must be guest-physical memory, and nothing traps a guest's own
//!   `mov cr3`: a ring-0 guest can load tables of its own that map the pool
//!   (its CR3 even reads back as a pool address) and write anything there.
//!   (A read-only slot would stop the writes, but on Intel hosts with EPT
//!   A/D bits the CPU treats guest page-table reads as writes, SDM vol. 3C
//!   §29.3.5, so the vCPU could not walk it.) What the guest gains is only
//!   what its own tables already give it — access to its RAM and the pool —
//!   so the rule is: **no fact the MMU relies on lives in the pool.** Every
//!   shadow page's entries are kept in VMM memory (`ShadowPage::entries`);
//!   the pool is written from that copy and never read to decide anything
//!   (only [`ShadowMmu::shadow_leaf`], a diagnostic of what the vCPU sees,
//!   and [`ShadowMmu::repair_pool_pages`], which compares, read it). A page
//!   taken from the free list is zeroed again, whatever it holds.
//! - **Repair.** The VMM learns which pool pages the guest wrote from the
//!   host (KVM's dirty log of the pool's slot) at every shadow hypercall and
//!   before the slot is re-registered, and hands them to
//!   [`ShadowMmu::repair_pool_pages`], which rewrites each from the copy and
//!   marks the host stale. So a guest that scribbles over the pool and
//!   comes back through `LOAD_CR3` gets exactly the shadow its own tables
//!   imply; until it comes back it runs on whatever it wrote, which only
//!   hurts itself. No guest input makes the MMU panic, in any build.
//! - **Guest tables are read, never trusted**: the walker checks every
//!   entry (reserved bits, RAM bounds); a shadow leaf maps guest RAM only.
//!
//! ## Bounds
//!
//! Every handler does work proportional to what the guest's change implies
//! (deterministic steps, counted by [`ShadowMmu::work`]):
//!
//! - parent lists are hash sets, so unlinking one of the 400,000 entries a
//!   guest can make point at one shadow page table is O(1), and freeing a
//!   subtree costs O(its entries);
//! - the reverse map holds at most one page per (level, access) role of a
//!   guest frame (≤ 32);
//! - a new root's kernel-half prefill links subtrees already prefilled for
//!   another root without walking them again (`ShadowPage::prefilled`), so
//!   a root costs O(its new shadow pages); its budget is the pool itself,
//!   minus [`PREFILL_RESERVE`] pages for the next fault's path, and what
//!   exception delivery touches ([`ShadowMmu::set_prefill_hints`]) comes
//!   first — the kernel half of a 22 GiB guest is as deliverable as that of
//!   a 64 MiB one;
//! - the VMM's memory for the MMU is bounded by the pool: one 4 KiB copy
//!   and one parent set per shadow page, and at most 512 parent entries
//!   per pool page in all the sets together (each is an entry of one).
//!
//! # Files (after KVM's `arch/x86/kvm/mmu/`)
//!
//! | file | what | KVM |
//! | --- | --- | --- |
//! | `vm.rs` | [`ShadowMmu`], the per-VM state | `kvm->arch` (`mmu_page_hash`, `mmu_valid_gen`) |
//! | `vcpu.rs` | [`ShadowVcpu`], the per-vCPU state; current root, generation | `vcpu->arch.mmu` |
//! | `page.rs` | shadow pages, roles, pool addressing | `mmu_internal.h` |
//! | `spte.rs` | the shadow leaf for a guest leaf; CR0.WP = 0, SMEP, SMAP | `spte.c` |
//! | `root.rs` | `LOAD_CR3`, the root cache, kernel/user-half prefill | `mmu.c` (roots) |
//! | `fault.rs` | `SHADOW_FAULT`: guest walk, shadow path, invariant 7 | `paging_tmpl.h` |
//! | `sync.rs` | trapped PTE writes: update in place or zap; `FLUSH_TLB` | `mmu.c` (`kvm_mmu_pte_write`) |
//! | `page_track.rs` | [`TableFrames`]: the frames whose writes trap (invariant 6) | `page_track.c` |
//! | `pool.rs` | allocation, freeing, quarantine, zap of everything | `mmu.c` (`kvm_mmu_commit_zap_page`, `kvm_mmu_zap_all`) |
//! | `coherence.rs` | TLB generations, per-vCPU flush state, quarantine release, deferral, pool repair (invariant 4, SMP, trust) | `kvm_flush_remote_tlbs`, Linux's `tlb_gen` |
//! | `pv.rs` | pv mode: write batches, prefetch, published roots | — |
//! | `harvest.rs` | pv mode: `PV_HARVEST`, the shadow leaves' A bits as a second-level accessed bit | `kvm_age_gfn` |
//! | `remote.rs` | pv on SMP: every vCPU's queue at a sync point, `PV_FLUSH_REMOTE` | `KVM_FEATURE_PV_TLB_FLUSH` |
//! | `invariants.rs` | the structural checker; the diagnostic shadow walk | — |
//! | `stats.rs`, `error.rs` | [`ShadowStats`]; [`ShadowError`] | — |

use crate::walker::{self, A, Access, D, GuestPhys, P, PS, PagingMode, RW, US, XD};
use guest_abi::{Gpa, Gva};
use std::collections::{HashMap, HashSet, VecDeque};

use guest_abi::paging::{ADDR_MASK as ADDR, PAGE_SIZE as PAGE};
/// Pool pages a kernel-half prefill leaves free: the path of the fault
/// that follows (a PDPT, a PD and a PT).
pub const PREFILL_RESERVE: usize = 3;
/// New shadow pages the user-half prefill of a new root may create.
pub const USER_PREFILL_PAGES: usize = 16;
/// A hidden fault on a 4 KiB page also shadows the other entries of its
/// aligned block of this many PTEs that the guest has used (KVM's
/// `FNAME(pte_prefetch)`, `PTE_PREFETCH_NUM` = 8 there): one block is a
/// 64 KiB folio, the largest mTHP the guest maps as PTEs.
pub const PTE_PREFETCH: u64 = 16;
/// Deferred changed pages remembered ([`ShadowMmu::set_defer_unreachable`]);
/// past that, the next root switch invalidates.
pub const MAX_DEFERRED: usize = 1024;
/// Steps of the walk up the parent sets that decides whether a root reaches
/// a page; past that the answer is yes.
pub const REACH_STEPS: usize = 64;
/// The fewest shadow roots kept for recent guest CR3s (KVM keeps 3
/// `prev_roots`; a handful of address spaces switching round-robin must not
/// rebuild). The cache grows with the pool: one root per
/// [`POOL_PAGES_PER_ROOT`] pool pages, up to [`MAX_ROOTS`].
pub const ROOT_CACHE: usize = 8;
/// Pool pages per cached root: a root, its user-half path (PDPT, PD, PT)
/// and room for the tables its address space touches.
pub const POOL_PAGES_PER_ROOT: usize = 32;
/// The most shadow roots cached (what pv mode can publish:
/// `guest_abi::pv::ROOTS_CAP`).
pub const MAX_ROOTS: usize = guest_abi::pv::ROOTS_CAP;

mod coherence;
mod error;
mod fault;
mod harvest;
mod invariants;
mod page;
mod page_track;
mod pool;
mod pv;
mod remote;
mod root;
mod spte;
mod stats;
mod sync;
mod vcpu;
mod vm;

use coherence::{CpuTlb, RemoteFlushHook, TlbState};
pub use coherence::{EntryWork, FlushTicket, MAX_VCPUS, RemoteFlush, VcpuSet};
pub use error::ShadowError;
pub use fault::FaultOutcome;
use harvest::pool_agrees;
use page::*;
pub use page_track::TableFrames;
use page_track::Zoned;
pub use pv::BatchOutcome;
pub use remote::RemoteFlushOutcome;
pub use root::ShadowRoot;
use spte::{maps_page, restricts, shadowable};
pub use stats::ShadowStats;
pub use vcpu::ShadowVcpu;
pub use vm::ShadowMmu;

/// A deliberately broken variant of the MMU (tests only): the SMP stress
/// test must fail on each.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sabotage {
    /// The real thing.
    None,
    /// Freed pool pages go straight to the free list, without quarantine.
    NoQuarantine,
    /// Root-cache eviction frees a root other vCPUs still run on.
    EvictLoadedRoots,
    /// pv: a root the guest may have loaded by itself is freed when
    /// evicted or zapped (no limbo).
    NoLimbo,
}

#[cfg(test)]
mod test_mem;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod pv_tests;

#[cfg(test)]
mod bounds_tests;

#[cfg(test)]
mod smp_tests;
