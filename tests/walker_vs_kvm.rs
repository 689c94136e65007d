//! The shadow walker against `KVM_TRANSLATE` on a live vCPU: random and
//! hostile four-level tables written into a VM's memory, the vCPU's CR3
//! pointed at them, and every answer compared (GPA, or "not mapped").
//!
//! `KVM_TRANSLATE` is a supervisor read that reports only the GPA, so that
//! is what is compared. One difference is by design and excluded: a leaf
//! pointing outside guest RAM is translated by KVM, refused by the walker
//! (shadow mode never maps non-RAM); the view below therefore lets the
//! walker treat every physical address as RAM and read zeros outside it,
//! which is what the hardware walk does.

mod common;
use common::kvm_available;
use shadow::{Access, Gpa, GuestPhys, Gva, walk};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::vm::{Vm, VmConfig};

struct View<'a> {
    mem: &'a GuestMemoryMmap,
    ram: u64,
    maxphy: u8,
}

impl GuestPhys for View<'_> {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        if gpa + 8 <= self.ram { self.mem.read_obj(GuestAddress(gpa)).unwrap_or(0) } else { 0 }
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        if gpa + 8 <= self.ram {
            self.mem.write_obj(value, GuestAddress(gpa)).unwrap();
        }
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        gpa.checked_add(len).is_some_and(|e| e <= 1u64 << self.maxphy)
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn walker_agrees_with_kvm_translate_on_random_tables() {
    if !kvm_available() {
        return;
    }
    let config = VmConfig::bundled(64 << 20, guest_abi::MmuMode::Ept);
    let mut vm = Vm::new(config, Box::new(std::io::sink())).expect("create a VM");
    let mode = vm.paging_mode().unwrap();
    let ram = 64u64 << 20;
    // Eight table pages at 32 MiB; entries point among them, at data
    // pages, beyond RAM, or carry reserved bits.
    let tables: Vec<u64> = (0..8).map(|i| (32 << 20) + i * 4096).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut compared, mut mapped) = (0, 0);
    for round in 0..40 {
        for &t in &tables {
            for i in 0..512u64 {
                vm.memory().write_obj(0u64, GuestAddress(t + i * 8)).unwrap();
            }
        }
        // A few hundred entries per round, in the low indices the VAs use.
        for _ in 0..200 {
            let t = tables[(rng.next() % 8) as usize];
            let idx = rng.next() % 4;
            let target = match rng.next() % 6 {
                0..=2 => tables[(rng.next() % 8) as usize],
                3 => (rng.next() % (ram >> 21)) << 21,
                4 => (1u64 << 40) + ((rng.next() % 16) << 21),
                _ => rng.next() & 0x000f_ffff_ffff_f000,
            };
            let flags = (rng.next() & 0x1ff) | u64::from(!rng.next().is_multiple_of(5)); // mostly present
            let extra = match rng.next() % 10 {
                0 => 1u64 << 63,
                1 => 1u64 << (12 + rng.next() % 40),
                _ => 0,
            };
            vm.memory().write_obj(target | flags | extra, GuestAddress(t + idx * 8)).unwrap();
        }
        let cr3 = tables[round % 8];
        vm.set_cr3(Gpa(cr3)).unwrap();
        for _ in 0..64 {
            let va = ((rng.next() % 4) << 39)
                | ((rng.next() % 4) << 30)
                | ((rng.next() % 4) << 21)
                | ((rng.next() % 4) << 12)
                | (rng.next() & 0xfff);
            // The walker sets A/D on success; so does KVM's walk: compare on
            // the same memory, walker first on a read access.
            let kvm = vm.kvm_translate(Gva(va)).unwrap();
            let mut view = View { mem: vm.memory(), ram, maxphy: mode.maxphyaddr };
            let ours = walk(&mut view, Gpa(cr3), Gva(va), Access::default(), &mode).ok().map(|t| t.gpa);
            assert_eq!(ours, kvm, "round {round} cr3 {cr3:#x} va {va:#x}: walker {ours:x?} vs KVM_TRANSLATE {kvm:x?}");
            compared += 1;
            mapped += usize::from(kvm.is_some());
        }
    }
    assert!(
        mapped >= 20 && mapped < compared,
        "the random tables should map some addresses and not others: {mapped}/{compared}"
    );
}
