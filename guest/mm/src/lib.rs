//! The guest kernel's memory manager (buddy allocator with zones, slab
//! allocator, four-level paging, address spaces, demand paging, aging).
//!
//! Pure logic over a physical-memory access trait, so that everything here
//! runs unchanged on the host under `cargo test`. This crate is filled in by
//! the memory-manager issue; for now it holds the page-size constants both
//! the kernel and its tests use.
#![no_std]
#![deny(unsafe_code)]

/// Size of a base page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large page (PD-level mapping).
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// Size of a huge page (PDPT-level mapping).
pub const HUGE_PAGE_SIZE: u64 = 1 << 30;
