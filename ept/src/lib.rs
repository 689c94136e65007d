//! The second stage of the translation chain: the guest-physical memory
//! map (vm-memory regions and KVM memslots), GPA→HVA→HPA, the backing page
//! size, and the host probe (DESIGN.md, "Crates").
//!
//! Filled in by the ept issue; today the VMM registers its single RAM slot
//! itself (`vmm/src/vm.rs`).
#![deny(unsafe_code)]
