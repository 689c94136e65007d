//! The local APIC in x2APIC mode: enable, send IPIs, end interrupts
//! (Intel SDM vol. 3 §11.12; docs/architecture.md "SMP" for the ABI).
//!
//! Invariants:
//! - Touched only when the VMM created more than one vCPU (it then creates
//!   the in-kernel irqchip, so the x2APIC MSRs exist and cause no exit).
//!   With one vCPU there may be no APIC model at all, and nothing here runs.
//! - APIC id `i` is CPU `i` (the VMM sets CPUID per vCPU), so an IPI's
//!   destination is the CPU id.
//! - Only fixed, physical-destination IPIs are sent; every vector used has
//!   an IDT gate (`idt.rs`), the spurious vector included.

use core::sync::atomic::{AtomicBool, Ordering};

const IA32_APIC_BASE: u32 = 0x1b;
const X2APIC_ID: u32 = 0x802;
const X2APIC_TPR: u32 = 0x808;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_ICR: u32 = 0x830;

/// IPI vector: "look at your mailbox" (TLB shootdown requests, work).
pub const VECTOR_CALL: u8 = 0xf0;
/// IPI vector: wake-up only (the handler just ends the interrupt).
pub const VECTOR_WAKE: u8 = 0xf1;
/// The spurious-interrupt vector (SVR[7:0]); never acknowledged with EOI
/// (SDM §11.9).
pub const VECTOR_SPURIOUS: u8 = 0xff;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Enable this CPU's local APIC in x2APIC mode: `IA32_APIC_BASE` bits 11
/// (enable) and 10 (x2APIC), task priority 0, software-enabled with the
/// spurious vector.
pub fn enable() {
    // SAFETY: the MSRs exist when the VMM created the irqchip (module
    // invariants: only called with more than one vCPU); enabling x2APIC
    // from xAPIC-enabled or disabled is a legal transition (SDM §11.12.5).
    unsafe {
        let base = super::rdmsr(IA32_APIC_BASE);
        super::wrmsr(IA32_APIC_BASE, base | (1 << 11) | (1 << 10));
        super::wrmsr(X2APIC_TPR, 0);
        super::wrmsr(X2APIC_SVR, 0x100 | VECTOR_SPURIOUS as u64);
    }
    ENABLED.store(true, Ordering::Release);
}

/// Whether any CPU enabled its APIC (so IPIs can be sent).
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// This CPU's APIC id.
#[allow(dead_code)] // checked by the SMP suites
pub fn id() -> u32 {
    // SAFETY: reading the x2APIC id register has no side effect; only
    // called once the APIC is enabled.
    unsafe { super::rdmsr(X2APIC_ID) as u32 }
}

/// Send a fixed IPI with `vector` to CPU `cpu` (physical destination,
/// ICR bits 7:0 vector, 10:8 = 000 fixed, 11 = 0 physical, 14 = 1 assert,
/// 63:32 destination; SDM §11.12.9).
pub fn send_ipi(cpu: u32, vector: u8) {
    // SAFETY: a write to the x2APIC ICR with a vector that has a gate on
    // every CPU; the APIC is enabled (callers check `is_enabled`).
    unsafe { super::wrmsr(X2APIC_ICR, ((cpu as u64) << 32) | (1 << 14) | vector as u64) };
}

/// End the interrupt being handled.
pub fn eoi() {
    // SAFETY: writing 0 to the EOI register acknowledges the in-service
    // interrupt; only called from the handler of a non-spurious vector.
    unsafe { super::wrmsr(X2APIC_EOI, 0) };
}
