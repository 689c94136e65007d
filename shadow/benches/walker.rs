//! A full four-level walk by the shadow walker (target: ≤ 30 ns median).

use criterion::{Criterion, criterion_group, criterion_main};
use shadow::walker::{A, D, P, RW, US};
use shadow::{Access, Gpa, GuestPhys, Gva, PagingMode, walk};
use std::hint::black_box;

/// 16 MiB of guest RAM as a flat word array.
struct Flat(Vec<u64>);

impl GuestPhys for Flat {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        self.0[(gpa / 8) as usize]
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        self.0[(gpa / 8) as usize] = value;
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        gpa.checked_add(len).is_some_and(|e| e <= self.0.len() as u64 * 8)
    }
}

fn bench(c: &mut Criterion) {
    let mut m = Flat(vec![0; (16 << 20) / 8]);
    let f = P | RW | US | A | D;
    m.0[0x1000 / 8] = 0x2000 | f;
    m.0[0x2000 / 8] = 0x3000 | f;
    m.0[0x3000 / 8] = 0x4000 | f;
    m.0[(0x4000 + 5 * 8) / 8] = 0x9000 | f;
    let mode = PagingMode::default();
    let acc = Access { write: true, user: true, fetch: false };
    c.bench_function("walk 4-level 4KiB, A/D already set", |b| {
        b.iter(|| walk(&mut m, Gpa(black_box(0x1000)), Gva(black_box(0x5123)), acc, &mode).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
