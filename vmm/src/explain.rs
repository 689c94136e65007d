//! `--explain GVA` and the `EXPLAIN` hypercall: the whole translation chain
//! of one guest-virtual address, one block per step.
//!
//! GVA → (guest page-table walk, each level shown) → GPA → (memory map:
//! memslot) → HVA → (`/proc/self/pagemap`) → HPA, with the guest and host
//! page sizes, the two-dimensional walk cost of this address, and
//! `KVM_TRANSLATE`'s answer for the same GVA as a cross-check.

use ept::memmap::SlotSpec;
use ept::pagemap::HostPage;
use ept::walk::{Walk, WalkCost, WalkEnd, flags_string, size_name};
use serde::Serialize;
use std::fmt::Write as _;

/// The chain of one address.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The address explained.
    #[serde(serialize_with = "ept::json::hex")]
    pub gva: u64,
    /// The guest CR3 the walk started from.
    #[serde(serialize_with = "ept::json::hex")]
    pub cr3: u64,
    /// The MMU mode.
    pub mmu: &'static str,
    /// The guest page-table walk.
    pub walk: Walk,
    /// The memslot holding the GPA.
    pub slot: Option<SlotSpec>,
    /// The host-virtual address of the GPA.
    #[serde(serialize_with = "ept::json::hex_opt")]
    pub hva: Option<u64>,
    /// The host page behind the HVA.
    pub host: Option<HostPage>,
    /// Why the host page could not be read, if it could not.
    pub host_error: Option<String>,
    /// The walk-cost model for this address.
    pub cost: Option<WalkCost>,
    /// What `KVM_TRANSLATE` says the GPA is (`None`: not mapped).
    #[serde(serialize_with = "ept::json::hex_opt")]
    pub kvm_translate: Option<u64>,
    /// Shadow mode: the shadow leaf the vCPU really walks (entry, level),
    /// `None` when not shadowed (yet).
    #[serde(serialize_with = "shadow_leaf_json")]
    pub shadow_leaf: Option<(u64, u8)>,
    /// Shadow mode: the shadow root the vCPU's CR3 holds.
    #[serde(serialize_with = "ept::json::hex_opt")]
    pub shadow_root: Option<u64>,
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
    pub fn gpa(&self) -> Option<u64> {
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
        if let Some(slot) = &self.slot {
            let _ = writeln!(
                s,
                "  slot  {} [{:#x}-{:#x}) {}{}",
                slot.slot,
                slot.gpa,
                slot.gpa + slot.len,
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
