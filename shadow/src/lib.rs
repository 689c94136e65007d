//! Software shadow paging: the x86-64 guest page-table walker and the
//! shadow MMU kept by the VMM (DESIGN.md, "Shadow mode").
//!
//! This crate has no KVM dependency so that all of its logic is testable on
//! any host. It is filled in by the shadow-mode issue.
#![deny(unsafe_code)]
