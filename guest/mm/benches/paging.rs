//! Map + unmap of a 4 KiB page in existing tables (target: ≤ 40 ns median).
//! A neighbouring page stays mapped, so the tables exist throughout and the
//! unmap never frees one (that would measure table allocation instead).

use criterion::{Criterion, criterion_group, criterion_main};
use guest_abi::{Gpa, Gva};
use guest_mm::buddy::{BuddyAllocator, DMA_LIMIT, FrameMeta};
use guest_mm::paging::{Page, PageTable, PhysFrame, PteFlags, Size4KiB};
use guest_mm::phys::{ArenaMem, FRAME_WORDS, FrameRange};
use std::hint::black_box;

const FRAMES: usize = 4096;

fn bench(c: &mut Criterion) {
    let mut backing = vec![0u64; FRAMES * FRAME_WORDS];
    let mut meta = vec![FrameMeta::default(); FRAMES];
    let mem = ArenaMem::new(DMA_LIMIT.addr(), &mut backing);
    // The first 512 frames are the page-table zone.
    let pgtables = FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(512));
    let mut buddy = BuddyAllocator::new(&mem, &mut meta, DMA_LIMIT, pgtables).unwrap();
    buddy.set_verify_pgtables(false);
    buddy.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(FRAMES as u64))).unwrap();
    let mut pt = PageTable::new(&mut buddy).unwrap();
    let flags = PteFlags::WRITABLE | PteFlags::USER | PteFlags::ACCESSED;
    let frame = PhysFrame::<Size4KiB>::from_start_address(Gpa(DMA_LIMIT.addr().0 + 1024 * 4096)).unwrap();
    let neighbour = Page::<Size4KiB>::from_start_address(Gva(0x4000_0000)).unwrap();
    pt.map(&mem, &mut buddy, neighbour, frame, flags).unwrap();
    let page = Page::<Size4KiB>::from_start_address(Gva(0x4000_1000)).unwrap();
    c.bench_function("paging map+unmap 4KiB in existing tables", |b| {
        b.iter(|| {
            pt.map(&mem, &mut buddy, black_box(page), frame, flags).unwrap();
            let (_, _, flush) = pt.unmap(&mem, &mut buddy, black_box(page)).unwrap();
            flush.ignore();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
