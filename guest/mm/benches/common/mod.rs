//! Shared by the benches: fixtures for our allocators over an `ArenaMem`,
//! a page arena for `slabmalloc`, and the operation sequences that every
//! allocator runs identically.
#![allow(dead_code)]

use guest_mm::buddy::{BuddyAllocator, DMA_LIMIT, FrameMeta};
use guest_mm::phys::{ArenaMem, FRAME_WORDS, FrameRange};

/// Frames given to every frame allocator under test (64 MiB).
pub const FRAMES: usize = 16 * 1024;

/// Backing words and metadata for one of our buddy allocators, NORMAL zone
/// only (the span starts at 16 MiB).
pub struct Fixture {
    backing: Vec<u64>,
    meta: Vec<FrameMeta>,
}

impl Fixture {
    pub fn new(frames: usize) -> Self {
        Self { backing: vec![0; frames * FRAME_WORDS], meta: vec![FrameMeta::default(); frames] }
    }

    /// A release-configured allocator with every frame free.
    pub fn buddy(&mut self) -> BuddyAllocator<'_, ArenaMem<'_>> {
        let n = self.meta.len() as u64;
        let mem = ArenaMem::new(DMA_LIMIT.addr(), &mut self.backing);
        let mut b = BuddyAllocator::new(mem, &mut self.meta, DMA_LIMIT, FrameRange::default()).unwrap();
        b.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(n))).unwrap();
        b
    }
}

/// A 4 KiB-aligned page of the host arena handed to `slabmalloc`.
#[repr(C, align(4096))]
pub struct HostPage([u8; 4096]);

/// A Vec-backed arena of 4 KiB pages, leaked so that `slabmalloc` may hold
/// `&'static mut` pages; handed out one at a time.
pub struct PageArena {
    pages: &'static mut [HostPage],
    next: usize,
}

impl PageArena {
    pub fn new(pages: usize) -> Self {
        let v: Vec<HostPage> = (0..pages).map(|_| HostPage([0; 4096])).collect();
        Self { pages: Vec::leak(v), next: 0 }
    }

    /// A fresh page for `slabmalloc`, or `None` when the arena is used up.
    pub fn object_page(&mut self) -> Option<&'static mut slabmalloc::ObjectPage<'static>> {
        let page: *mut HostPage = self.pages.get_mut(self.next)?;
        self.next += 1;
        // SAFETY: `HostPage` is 4096 bytes, 4096-aligned, zero-initialised
        // and leaked (lives for 'static); each page is handed out once, so
        // the reference is unique. `ObjectPage` is a `repr(C)` 4096-byte
        // struct of plain integers and raw links, valid when zeroed (its
        // own `Default` is `zeroed()`), with alignment below 4096.
        Some(unsafe { &mut *page.cast::<slabmalloc::ObjectPage<'static>>() })
    }

    /// The arena as one byte range (for `buddy_system_allocator::Heap`).
    pub fn range(&mut self) -> (usize, usize) {
        let start = self.pages.as_mut_ptr() as usize;
        (start, start + self.pages.len() * 4096)
    }
}

/// xorshift64*: a small deterministic generator, so that every allocator
/// sees the very same sequence.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One step of a mixed workload: allocate `class` into `slot` (empty), or
/// free the object in `slot` (live).
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Alloc { slot: u16, class: u16 },
    Free { slot: u16 },
}

/// A realistic mix: `steps` interleaved allocations and frees over a
/// working set of at most `slots` live objects (kept around half full, so
/// objects live for a while), with classes drawn from `weights`
/// (`(class, weight)`), frees in random order, and every remaining object
/// freed at the end in shuffled order, so the sequence can repeat.
pub fn mix(seed: u64, steps: usize, slots: usize, weights: &[(u16, u32)]) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let total: u32 = weights.iter().map(|w| w.1).sum();
    let mut live: Vec<u16> = Vec::new();
    let mut empty: Vec<u16> = (0..slots as u16).collect();
    let mut ops = Vec::with_capacity(steps + slots);
    for _ in 0..steps {
        // Alloc more likely while under half full, free more likely above.
        let p_alloc = if live.is_empty() {
            100
        } else if empty.is_empty() {
            0
        } else if live.len() < slots / 2 {
            65
        } else {
            35
        };
        if rng.below(100) < p_alloc {
            let slot = empty.swap_remove(rng.below(empty.len() as u64) as usize);
            let mut w = rng.below(total as u64) as u32;
            let class = weights
                .iter()
                .find(|&&(_, wt)| {
                    if w < wt {
                        true
                    } else {
                        w -= wt;
                        false
                    }
                })
                .unwrap()
                .0;
            live.push(slot);
            ops.push(Op::Alloc { slot, class });
        } else {
            let slot = live.swap_remove(rng.below(live.len() as u64) as usize);
            empty.push(slot);
            ops.push(Op::Free { slot });
        }
    }
    while !live.is_empty() {
        let slot = live.swap_remove(rng.below(live.len() as u64) as usize);
        ops.push(Op::Free { slot });
    }
    ops
}

/// Number of allocations in a sequence (each is matched by one free).
pub fn allocs(ops: &[Op]) -> usize {
    ops.iter().filter(|o| matches!(o, Op::Alloc { .. })).count()
}

// ---- the clock ----

use criterion::Throughput;
use criterion::measurement::{Measurement, ValueFormatter};

/// Whether the benches measure this thread's CPU time rather than wall
/// time: `GUEST_MM_BENCH_CLOCK=cpu`. On a machine whose cores are shared,
/// wall time includes the time the bench thread waited for a core; CPU
/// time does not (it still includes the cache damage of being switched
/// out, so it too is noisy, only less).
pub fn cpu_clock() -> bool {
    std::env::var("GUEST_MM_BENCH_CLOCK").is_ok_and(|v| v == "cpu")
}

/// A benchmark group name, marked when the CPU-time clock is in use so that
/// criterion keeps the two kinds of figures apart.
pub fn group_name(name: &str) -> String {
    if cpu_clock() { format!("{name}@cpu") } else { name.to_string() }
}

/// The calling thread's CPU time, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Criterion measurement: the bench thread's CPU time.
pub struct CpuTime;

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NanosFormatter
    }
}

/// Nanoseconds shown as criterion shows durations.
struct NanosFormatter;

impl ValueFormatter for NanosFormatter {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (div, unit) = match ns {
            x if x < 1e3 => (1.0, "ns"),
            x if x < 1e6 => (1e3, "µs"),
            x if x < 1e9 => (1e6, "ms"),
            _ => (1e9, "s"),
        };
        values.iter_mut().for_each(|v| *v /= div);
        unit
    }
    fn scale_throughputs(&self, ns: f64, throughput: &Throughput, values: &mut [f64]) -> &'static str {
        let n = match *throughput {
            Throughput::Elements(n) => n as f64,
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => n as f64,
            Throughput::Bits(n) => n as f64,
        };
        let per_s = n * 1e9 / ns;
        let (div, unit) = if per_s < 1e3 {
            (1.0, "elem/s")
        } else if per_s < 1e6 {
            (1e3, "Kelem/s")
        } else if per_s < 1e9 {
            (1e6, "Melem/s")
        } else {
            (1e9, "Gelem/s")
        };
        values.iter_mut().for_each(|v| *v = n * 1e9 / *v / div);
        unit
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

/// `main` for a bench file: runs the given generic bench functions under
/// the wall clock, or under [`CpuTime`] when [`cpu_clock`] says so.
macro_rules! bench_main {
    ($($f:ident),* $(,)?) => {
        fn main() {
            if common::cpu_clock() {
                let mut c = criterion::Criterion::default().with_measurement(common::CpuTime).configure_from_args();
                $($f(&mut c);)*
                c.final_summary();
            } else {
                let mut c = criterion::Criterion::default().configure_from_args();
                $($f(&mut c);)*
                c.final_summary();
            }
        }
    };
}
pub(crate) use bench_main;
