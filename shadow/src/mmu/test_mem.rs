//! Sparse guest memory for the shadow MMU's unit tests (both modules).

use super::*;
use std::collections::HashMap;

/// Sparse memory: guest RAM at 0, or the pool at its base; an access
/// outside `[base, base + size)` panics (the MMU must never make one).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Mem {
    pub(super) words: HashMap<u64, u64>,
    pub(super) base: u64,
    pub(super) size: u64,
}

impl Mem {
    pub(super) fn new(base: u64, size: u64) -> Self {
        Mem { words: HashMap::new(), base, size }
    }
    pub(super) fn get(&self, gpa: u64) -> u64 {
        *self.words.get(&gpa).unwrap_or(&0)
    }
}

impl GuestPhys for Mem {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        assert!(gpa >= self.base && gpa + 8 <= self.base + self.size, "read outside {gpa:#x}");
        self.get(gpa)
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        assert!(gpa >= self.base && gpa + 8 <= self.base + self.size, "write outside {gpa:#x}");
        if value == 0 {
            self.words.remove(&gpa);
        } else {
            self.words.insert(gpa, value);
        }
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        gpa >= self.base && gpa.checked_add(len).is_some_and(|e| e <= self.base + self.size)
    }
}
