//! `--explain GVA` and the `EXPLAIN` hypercall: the whole translation chain
//! of one guest-virtual address, one block per step.
//!
//! GVA → (guest page-table walk, each level shown) → GPA → (memory map:
//! memslot) → HVA → (`/proc/self/pagemap`) → HPA, with the guest and host
//! page sizes, the two-dimensional walk cost of this address, and
//! `KVM_TRANSLATE`'s answer for the same GVA as a cross-check.

use super::window::MemWindow;
use super::{MmuBackend, VcpuContext, VmContext};
use ept::memmap::SlotSpec;
use ept::pagemap::HostPage;
use ept::walk::{Walk, WalkCost, WalkEnd, flags_string, size_name};
use guest_abi::{Gpa, Gva, Hva};
use serde::Serialize;
use std::fmt::Write as _;

/// The chain of one address.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The address explained.
    #[serde(serialize_with = "ept::json::hex")]
    pub gva: Gva,
    /// The guest's root (its CR3) the walk started from.
    #[serde(serialize_with = "ept::json::hex")]
    pub cr3: Gpa,
    /// The MMU mode.
    pub mmu: &'static str,
    /// The guest page-table walk.
    pub walk: Walk,
    /// The memslot holding the GPA.
    pub slot: Option<SlotSpec>,
    /// The host-virtual address of the GPA.
    #[serde(serialize_with = "ept::json::hex_opt")]
    pub hva: Option<Hva>,
    /// The host page behind the HVA.
    pub host: Option<HostPage>,
    /// Why the host page could not be read, if it could not.
    pub host_error: Option<String>,
    /// The walk-cost model for this address.
    pub cost: Option<WalkCost>,
    /// What `KVM_TRANSLATE` says the GPA is (`None`: not mapped).
    #[serde(serialize_with = "ept::json::hex_opt")]
    pub kvm_translate: Option<Gpa>,
    /// Shadow mode: the shadow leaf the vCPU really walks (entry, level),
    /// `None` when not shadowed (yet).
    #[serde(serialize_with = "shadow_leaf_json")]
    pub shadow_leaf: Option<(u64, u8)>,
    /// Shadow mode: the shadow root the vCPU's CR3 holds.
    #[serde(serialize_with = "ept::json::hex_opt")]
    pub shadow_root: Option<shadow::ShadowRoot>,
    /// The walk reaches a page, but the architectural rules (the shadow
    /// walker's: reserved bits by level, MAXPHYADDR and vendor, the
    /// paging controls, RAM bounds) refuse a supervisor read of it: the
    /// `#PF` it would take. `None` when they allow it, or when nothing is
    /// mapped.
    pub refused: Option<Refused>,
}

/// A `#PF` the architectural walk gives where the display walk found a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// The error code.
    #[serde(serialize_with = "hex32")]
    pub error_code: u32,
    /// The level whose entry caused it (0: a permission fault at the leaf).
    pub level: u8,
}

fn hex32<S: serde::Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// Guest RAM, read-only, for the architectural walk of `--explain`: the
/// walker's A/D updates are dropped, so explaining changes nothing.
struct ReadOnly<'a>(MemWindow<'a>);

impl shadow::GuestPhys for ReadOnly<'_> {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        self.0.read_u64(gpa)
    }
    fn write_u64(&mut self, _gpa: Gpa, _value: u64) {}
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        self.0.is_ram(gpa, len)
    }
}

/// The shadow leaf as `{"entry": "0x…", "level": N}`.
fn shadow_leaf_json<S: serde::Serializer>(v: &Option<(u64, u8)>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Leaf {
        #[serde(serialize_with = "ept::json::hex")]
        entry: u64,
        level: u8,
    }
    match v {
        Some((entry, level)) => s.serialize_some(&Leaf { entry: *entry, level: *level }),
        None => s.serialize_none(),
    }
}

impl Explanation {
    /// The GPA the guest's tables give, if mapped.
    pub fn gpa(&self) -> Option<Gpa> {
        match self.walk.end {
            WalkEnd::Mapped { gpa, .. } => Some(gpa),
            _ => None,
        }
    }

    /// The human-readable block.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "explain GVA {:#x} (guest CR3 {:#x}, mmu={})", self.gva, self.cr3, self.mmu);
        for st in &self.walk.steps {
            let _ = writeln!(
                s,
                "  {:<5} table {:#010x} [{:>3}] = {:#018x}  {}",
                st.table,
                st.table_gpa,
                st.index,
                st.entry,
                flags_string(st.entry)
            );
        }
        match self.walk.end {
            WalkEnd::Mapped { gpa, page_size } => {
                let _ = writeln!(s, "  GPA   {gpa:#x} (guest page {})", size_name(page_size));
            }
            WalkEnd::NotPresent => {
                let _ = writeln!(s, "  GPA   none: not mapped (the last entry shown is not present)");
            }
            WalkEnd::NonCanonical => {
                let _ = writeln!(s, "  GPA   none: the address is not canonical");
            }
            WalkEnd::TableOutsideMemory { gpa } => {
                let _ = writeln!(s, "  GPA   none: a table pointer leads outside guest memory ({gpa:#x})");
            }
        }
        if let Some(r) = &self.refused {
            let _ = writeln!(
                s,
                "  rules a supervisor read faults here all the same: #PF error code {:#x} ({})",
                r.error_code,
                if r.level == 0 { "permissions".to_string() } else { format!("the level-{} entry", r.level) }
            );
        }
        if let Some(slot) = &self.slot {
            let _ = writeln!(
                s,
                "  slot  {} [{:#x}-{:#x}) {}{}",
                slot.slot,
                slot.gpa,
                slot.gpa.raw() + slot.len,
                slot.kind.name(),
                if slot.readonly { ", read-only" } else { "" }
            );
        } else if self.gpa().is_some() {
            let _ = writeln!(s, "  slot  none: the GPA is outside every memslot");
        }
        if let Some(hva) = self.hva {
            let _ = writeln!(s, "  HVA   {hva:#x}");
        }
        if let Some(h) = &self.host {
            let _ = writeln!(s, "  {}", h.describe());
        } else if let Some(e) = &self.host_error {
            let _ = writeln!(s, "  HPA   unreadable: {e}");
        }
        if let Some(c) = &self.cost {
            let _ = writeln!(
                s,
                "  walk  {} references native, {} nested (2D), {} through shadow tables",
                c.native, c.nested, c.shadow
            );
        }
        if let Some(root) = self.shadow_root {
            match self.shadow_leaf {
                Some((e, level)) => {
                    let _ = writeln!(
                        s,
                        "  shadow root {root:#x}: level-{level} leaf {e:#018x}  {}  (what the vCPU walks)",
                        flags_string(e)
                    );
                }
                None => {
                    let _ =
                        writeln!(s, "  shadow root {root:#x}: not shadowed yet (the next access takes a hidden fault)");
                }
            }
        }
        match (self.kvm_translate, self.gpa()) {
            (Some(k), Some(g)) if k == g => {
                let _ = writeln!(s, "  KVM_TRANSLATE agrees: GPA {k:#x}");
            }
            (None, None) => {
                let _ = writeln!(s, "  KVM_TRANSLATE agrees: not mapped");
            }
            (None, Some(_)) if self.shadow_root.is_some() && self.shadow_leaf.is_none() => {
                let _ = writeln!(s, "  KVM_TRANSLATE: not mapped through the shadow yet");
            }
            (k, _) => {
                let _ = writeln!(s, "  KVM_TRANSLATE DISAGREES: {k:x?}");
            }
        }
        s
    }
}

/// The translation chain of `gva` in the guest's current address space,
/// as mode `backend` sees it. Explaining changes nothing: no accessed or
/// dirty bit is set.
pub fn explain(
    vm: &VmContext,
    vcpu: &VcpuContext,
    backend: &dyn MmuBackend,
    mmu: &'static str,
    gva: Gva,
) -> crate::Result<Explanation> {
    use vm_memory::{Bytes, GuestAddress};
    let hw_cr3 = vcpu.sregs()?.cr3;
    let cr3 = backend.guest_root(hw_cr3);
    let mem = vm.ram.memory();
    let walk = ept::walk::walk(cr3, gva, |gpa| mem.read_obj::<u64>(GuestAddress(gpa.raw())).ok());
    let mut e = Explanation {
        gva,
        cr3,
        mmu,
        walk,
        slot: None,
        hva: None,
        host: None,
        host_error: None,
        cost: None,
        kvm_translate: None,
        shadow_leaf: None,
        shadow_root: None,
        refused: None,
    };
    backend.explain(vm, &mut e);
    if matches!(e.walk.end, WalkEnd::Mapped { .. }) {
        let mode = backend.guest_paging_mode(&vcpu.sregs()?, vcpu.regs().rflags);
        let mut ram = ReadOnly(MemWindow::ram(mem, vm.memory));
        let read = shadow::walker::Access { write: false, user: false, fetch: false };
        if let Err(pf) = shadow::walker::walk(&mut ram, cr3, gva, read, &mode) {
            e.refused = Some(Refused { error_code: pf.error_code, level: pf.level });
        }
    }
    if let WalkEnd::Mapped { gpa, page_size } = e.walk.end {
        e.slot = vm.map.slot_of(gpa).copied();
        e.hva = vm.ram.hva(&vm.map, gpa);
        let hugetlb = match vm.ram.backing() {
            ept::Backing::Hugetlb(s) => Some(s.bytes()),
            _ => None,
        };
        let mut host_page = hugetlb.unwrap_or(4096);
        if let Some(hva) = e.hva {
            match ept::pagemap::host_page(hva, hugetlb) {
                Ok(h) => {
                    if let HostPage::Present { page_size, .. } = h {
                        host_page = page_size;
                    }
                    e.host = Some(h);
                }
                Err(err) => e.host_error = Some(err.to_string()),
            }
        }
        e.cost = Some(ept::walk::walk_cost(page_size, host_page));
    }
    e.kvm_translate = translate_without_side_effects(vm, vcpu, hw_cr3, cr3, gva);
    Ok(e)
}

/// Read a page-table entry at `gpa` in guest RAM or the VMM-private
/// regions (the shadow pool).
fn read_table_entry(vm: &VmContext, gpa: Gpa) -> Option<u64> {
    use vm_memory::{Bytes, GuestAddress};
    let gpa = gpa.raw();
    let mem = vm.ram.memory();
    mem.read_obj::<u64>(GuestAddress(gpa))
        .ok()
        .or_else(|| vm.ram.pool().and_then(|p| p.read_obj::<u64>(GuestAddress(gpa)).ok()))
}

/// `KVM_TRANSLATE` of `gva`, leaving the page tables as they were.
///
/// KVM's software walker sets the accessed bit in every entry it walks
/// through (Intel SDM Vol. 3A §4.8: a walk sets A), so a bare
/// `KVM_TRANSLATE` would change what `--explain` explains — and what the
/// guest's page aging sees. The entries on both walk paths (the guest's
/// tables from `guest_cr3`, and the tables the vCPU really walks from
/// `hw_cr3`: the shadow tables in shadow mode) are saved first and any
/// that changed are written back. The guest is not running (this runs
/// between exits or after the run), and `KVM_TRANSLATE` installs no
/// translation, so nothing can have used the bit it set.
fn translate_without_side_effects(
    vm: &VmContext,
    vcpu: &VcpuContext,
    hw_cr3: u64,
    guest_cr3: Gpa,
    gva: Gva,
) -> Option<Gpa> {
    use vm_memory::{Bytes, GuestAddress};
    let mut saved = Vec::new();
    // The vCPU's CR3: in shadow mode a shadow root, walked here only to
    // save and restore its entries.
    for root in [guest_cr3, Gpa(hw_cr3)] {
        let w = ept::walk::walk(root, gva, |gpa| read_table_entry(vm, gpa));
        for st in &w.steps {
            let at = Gpa(st.table_gpa.raw().wrapping_add(st.index * 8));
            saved.push((at, st.entry));
        }
    }
    let t = match vcpu.fd.translate_gva(gva.raw()) {
        Ok(t) if t.valid != 0 => Some(Gpa(t.physical_address)),
        _ => None,
    };
    for (at, old) in saved {
        let at_raw = at.raw();
        if read_table_entry(vm, at).is_some_and(|now| now != old) {
            let mem = vm.ram.memory();
            let wrote = mem.write_obj(old, GuestAddress(at_raw)).is_ok()
                || vm.ram.pool().is_some_and(|p| p.write_obj(old, GuestAddress(at_raw)).is_ok());
            if !wrote {
                log::debug!("cannot restore the page-table entry at {at:#x} after KVM_TRANSLATE");
            }
        }
    }
    t
}
