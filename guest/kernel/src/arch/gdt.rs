//! The kernel's GDT and TSS.
//!
//! Layout (selectors): 0x08 kernel code (64-bit), 0x10 kernel data,
//! 0x1b user data, 0x23 user code (the order `sysret` expects), 0x28 the
//! 16-byte TSS descriptor. The TSS carries the IST stacks every exception
//! handler runs on (see [`Ist`]) and `RSP0` for returns from ring 3.
//!
//! Each CPU has its own GDT and TSS (in its per-CPU area,
//! [`super::percpu`]) and its own IST and ring-0 stacks: the boot CPU's are
//! static, an application processor's come from the page allocator. A CPU
//! writes only its own; loading a null selector into `gs` here is followed
//! by setting the GS base MSR (the per-CPU pointer), never the reverse.

use core::ptr::addr_of;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (RPL 3).
#[allow(dead_code)] // used once ring 3 exists (access matrix, shadow issue)
pub const USER_DS: u16 = 0x18 | 3;
/// User code selector (RPL 3).
#[allow(dead_code)]
pub const USER_CS: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;

/// Interrupt stack table slots (1-based as in the IDT gate's IST field).
#[derive(Clone, Copy)]
#[repr(u8)]
pub enum Ist {
    /// `#DF`: a fresh stack even when the kernel stack is gone.
    DoubleFault = 1,
    /// `#PF`: its own stack so a page fault in another handler does not
    /// overwrite that handler's frame.
    PageFault = 2,
    /// `NMI` and `#MC`.
    Nmi = 3,
    /// All other exceptions.
    Other = 4,
    /// Interrupts (IPIs): an interrupt taken at a wait point inside an
    /// exception handler must not reuse that handler's stack.
    Irq = 5,
}

/// Size of one IST stack (and of the ring-0 stack).
pub const IST_STACK_SIZE: usize = 16 * 1024;
/// Number of IST stacks per CPU.
pub const IST_COUNT: usize = 5;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_COUNT]);

/// The boot CPU's IST stacks (application processors get theirs from the
/// page allocator, `crate::smp`). Only their addresses are taken.
static mut BSP_IST_STACKS: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_COUNT]);

/// The boot CPU's ring-0 stack for interrupts taken in ring 3.
static mut BSP_RING0_STACK: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_COUNT]);

/// The 64-bit TSS (Intel SDM vol. 3 §8.7). One per CPU, in its per-CPU
/// area.
#[repr(C, packed(4))]
pub struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

impl Tss {
    /// An empty TSS with no I/O bitmap.
    pub const fn new() -> Self {
        Tss {
            reserved0: 0,
            rsp: [0; 3],
            reserved1: 0,
            ist: [0; 7],
            reserved2: 0,
            reserved3: 0,
            iomap_base: core::mem::size_of::<Tss>() as u16,
        }
    }
}

/// The GDT every CPU starts from (its own copy gets its own TSS
/// descriptor).
pub const GDT_TEMPLATE: [u64; 7] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code: P, DPL0, code, L
    0x00cf_9300_0000_ffff, // 0x10 kernel data
    0x00cf_f300_0000_ffff, // 0x18 user data (DPL3)
    0x00af_fb00_0000_ffff, // 0x20 user code (DPL3, L)
    0,                     // 0x28 TSS low (filled at run time)
    0,                     // 0x30 TSS high
];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Load the boot CPU's GDT and TSS, on its static stacks.
pub fn init_bsp() {
    let ist = addr_of!(BSP_IST_STACKS) as u64;
    let ring0 = addr_of!(BSP_RING0_STACK) as u64;
    // SAFETY: the boot CPU's area, before any other CPU runs; the stacks
    // are static, this CPU's alone, and as large as `load` assumes.
    unsafe { load(super::percpu::area(0), ist, ring0 + (IST_COUNT * IST_STACK_SIZE) as u64) };
}

/// Build `cpu`'s TSS (IST stack `i` is `[ist_base + i * IST_STACK_SIZE,
/// + IST_STACK_SIZE)`, `rsp0` the ring-0 stack top) and its GDT in its
/// per-CPU area, load them, reload the segment registers and `tr`.
///
/// # Safety
/// Called once per CPU, by that CPU, before its area is shared; the stacks
/// are mapped, writable and used by nothing else.
pub unsafe fn load(cpu: &super::percpu::PerCpu, ist_base: u64, rsp0: u64) {
    // SAFETY: the caller's contract: this CPU alone touches its GDT and
    // TSS, and the descriptor values are the SDM's.
    unsafe {
        let tss = &mut *cpu.tss.get();
        for i in 0..IST_COUNT {
            tss.ist[i] = ist_base + ((i + 1) * IST_STACK_SIZE) as u64;
        }
        tss.rsp[0] = rsp0;

        let base = cpu.tss.get() as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, 64-bit available TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let gdt = &mut *cpu.gdt.get();
        *gdt = GDT_TEMPLATE;
        gdt[5] = low;
        gdt[6] = base >> 32;

        let ptr = DescriptorPointer { limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16, base: gdt.as_ptr() as u64 };
        core::arch::asm!(
            "lgdt [{ptr}]",
            // Reload CS with a far return.
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            cs = const KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u64,
            tss = in(reg) TSS_SEL,
            tmp = out(reg) _,
        );
    }
}
