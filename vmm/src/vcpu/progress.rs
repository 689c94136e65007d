//! The no-progress detector (issue 22, item 4): a vCPU that can never get
//! past an instruction ends the run at once, with exit code 4 and the
//! instruction named, instead of holding it until `--timeout`.
//!
//! Two shapes of "stuck" are seen (measured on the development hosts,
//! 2026-12-08):
//!
//! - **The same exit, over and over.** An instruction whose memory operand
//!   lies in unbacked guest-physical memory that the host's emulator
//!   retries rather than completes (`lgdt` of a descriptor beyond RAM in
//!   ept mode: 373,369 identical MMIO-read exits in 3 s, `crash=lgdt-unbacked`).
//!   [`ProgressWatch::mmio_exit`] counts unbacked-MMIO exits that repeat
//!   exactly — same kind, address and data, same general registers, RIP
//!   and RFLAGS — and reports after [`MMIO_REPEAT_LIMIT`] in a row. A guest
//!   that changes anything in its registers between two such accesses
//!   (a loop counter, a pointer) restarts the count; one that does not can
//!   only read all ones or write into nothing forever.
//! - **No exit at all.** A store the host cannot emulate into a read-only
//!   memslot (`sgdt`/`sidt` into the page-table zone in shadow mode): KVM
//!   retries it inside `KVM_RUN` and never returns. The vCPU thread's
//!   supervisor kicks it out every [`TICK`] (`vcpu::supervise`); at each
//!   kick [`ProgressWatch::tick`] compares the registers with the last
//!   kick's. When nothing exited and nothing changed for [`STALLED_TICKS`]
//!   kicks in a row, the instruction at RIP is decoded: if one of its memory
//!   operands is written into a read-only slot or lies where no memory is
//!   (an access that must exit to complete, and did not), the vCPU is stuck.
//!   A guest spinning on purpose (`jmp $`, `pause` loops, `crash=hang`) has
//!   no such operand and is left to `--timeout`.
//!
//! Trust: the instruction bytes and register values are guest data; they
//! are only decoded (iced-x86) and compared, and the decoded text is
//! bounded (one instruction).

use iced_x86::{Decoder, DecoderOptions, Formatter, InstructionInfoFactory, IntelFormatter, OpAccess, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use std::time::Duration;

/// Identical unbacked-MMIO exits in a row that mean no progress (about
/// 30 ms of the `lgdt` case here; a guest polling memory that reads all
/// ones with unchanging registers can never see anything else).
pub const MMIO_REPEAT_LIMIT: u32 = 10_000;

/// How often the supervisor kicks a running vCPU to sample it.
pub const TICK: Duration = Duration::from_millis(250);

/// Kicks in a row with no exit and no register change before the
/// instruction at RIP is examined.
pub const STALLED_TICKS: u32 = 2;

/// The general registers, RIP and RFLAGS: the state compared.
type RegState = [u64; 18];

fn reg_state(r: &kvm_regs) -> RegState {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ]
}

/// One unbacked-MMIO exit: write?, GPA, data, length.
type MmioExit = (bool, u64, [u8; 8], usize);

/// Per-vCPU progress bookkeeping (lives in `Vcpu`).
#[derive(Debug, Default)]
pub struct ProgressWatch {
    /// Exits seen (any reason but a kick).
    exits: u64,
    /// `exits` and the registers at the last kick.
    last_tick: Option<(u64, RegState)>,
    /// Kicks in a row with nothing changed.
    stalled: u32,
    /// The last unbacked-MMIO exit, its registers, and how many times in a
    /// row it came.
    last_mmio: Option<(MmioExit, RegState, u32)>,
}

/// Why the vCPU is stuck: the text after "the guest makes no progress".
pub type Stuck = String;

impl ProgressWatch {
    /// An exit other than a kick or an unbacked MMIO access.
    pub fn exit(&mut self) {
        self.exits += 1;
        self.last_mmio = None;
    }

    /// An exit for an access to guest-physical memory that nothing backs;
    /// `Some(why)` once it has repeated [`MMIO_REPEAT_LIMIT`] times.
    pub fn mmio_exit(&mut self, write: bool, gpa: u64, data: &[u8], regs: &kvm_regs) -> Option<Stuck> {
        self.exits += 1;
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let this = (write, gpa, bytes, len);
        let state = reg_state(regs);
        let count = match &self.last_mmio {
            Some((e, s, n)) if *e == this && *s == state => n + 1,
            _ => 1,
        };
        self.last_mmio = Some((this, state, count));
        (count >= MMIO_REPEAT_LIMIT).then(|| {
            format!(
                "exited {count} times in a row as the same MMIO {} of unbacked GPA {gpa:#x}, with the same registers",
                if write { "write" } else { "read" }
            )
        })
    }

    /// A kick: `Some(why)` when nothing has exited or changed for
    /// [`STALLED_TICKS`] kicks and the instruction at RIP (`bytes`)
    /// accesses memory that must exit to complete; `gpa_of` translates a
    /// guest-virtual address and says whether the GPA is in a read-only
    /// slot (`Some(true)`), in writable memory (`Some(false)`) or unbacked
    /// (`None` for the slot).
    pub fn tick(
        &mut self,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
        bytes: &[u8],
        gpa_of: impl Fn(u64) -> Option<(u64, Option<bool>)>,
    ) -> Option<Stuck> {
        let state = reg_state(regs);
        let same = self.last_tick.is_some_and(|(e, s)| e == self.exits && s == state);
        self.stalled = if same { self.stalled + 1 } else { 0 };
        self.last_tick = Some((self.exits, state));
        if self.stalled < STALLED_TICKS {
            return None;
        }
        let (_, instr) = decode(bytes, regs.rip)?;
        let info = InstructionInfoFactory::new().info(&instr).clone();
        for mem in info.used_memory() {
            let va = mem.virtual_address(0, |reg, _, _| Some(reg_value(reg, regs, sregs)))?;
            let writes = matches!(mem.access(), OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite);
            let Some((gpa, slot)) = gpa_of(va) else { continue };
            let why = match slot {
                Some(true) if writes => format!("stores into GPA {gpa:#x}, in a read-only memslot"),
                None => format!("accesses GPA {gpa:#x}, which no memory backs"),
                _ => continue,
            };
            return Some(format!(
                "{why}, and the host retries it without an exit (no exit and no register change for {} ms)",
                TICK.as_millis() * u128::from(self.stalled)
            ));
        }
        None
    }
}

/// The instruction at `rip` in Intel syntax, and the decoded instruction
/// (`None` when `bytes` do not decode).
pub fn decode(bytes: &[u8], rip: u64) -> Option<(String, iced_x86::Instruction)> {
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return None;
    }
    let mut text = String::new();
    IntelFormatter::new().format(&instr, &mut text);
    Some((text, instr))
}

/// The value of `reg` (a general register of any width, RIP, or a segment
/// register as a base) for an address computation.
fn reg_value(reg: Register, r: &kvm_regs, s: &kvm_sregs) -> u64 {
    let full = match reg {
        Register::FS => return s.fs.base,
        Register::GS => return s.gs.base,
        Register::ES | Register::CS | Register::SS | Register::DS => return 0,
        other => other.full_register(),
    };
    let v = match full {
        Register::RAX => r.rax,
        Register::RBX => r.rbx,
        Register::RCX => r.rcx,
        Register::RDX => r.rdx,
        Register::RSI => r.rsi,
        Register::RDI => r.rdi,
        Register::RSP => r.rsp,
        Register::RBP => r.rbp,
        Register::R8 => r.r8,
        Register::R9 => r.r9,
        Register::R10 => r.r10,
        Register::R11 => r.r11,
        Register::R12 => r.r12,
        Register::R13 => r.r13,
        Register::R14 => r.r14,
        Register::R15 => r.r15,
        Register::RIP => r.rip,
        _ => 0,
    };
    match reg.size() {
        4 => v & 0xffff_ffff,
        2 => v & 0xffff,
        1 => v & 0xff,
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rip: u64, rax: u64) -> kvm_regs {
        kvm_regs { rip, rax, rflags: 2, ..Default::default() }
    }

    #[test]
    fn the_same_mmio_exit_over_and_over_is_no_progress() {
        let mut w = ProgressWatch::default();
        let r = regs(0x1000, 0x4001000);
        for _ in 1..MMIO_REPEAT_LIMIT {
            assert_eq!(w.mmio_exit(false, 0x4001000, &[0xff; 8], &r), None);
        }
        let why = w.mmio_exit(false, 0x4001000, &[0xff; 8], &r).unwrap();
        assert!(
            why.starts_with("exited 10000 times in a row as the same MMIO read of unbacked GPA 0x4001000"),
            "{why}"
        );
    }

    #[test]
    fn a_changing_register_or_another_exit_restarts_the_count() {
        let mut w = ProgressWatch::default();
        for i in 0..3 * MMIO_REPEAT_LIMIT as u64 {
            // A loop counter: progress, however slow.
            assert_eq!(w.mmio_exit(false, 0x4001000, &[0xff; 8], &regs(0x1000, i)), None);
        }
        for _ in 0..3 {
            for _ in 1..MMIO_REPEAT_LIMIT {
                assert_eq!(w.mmio_exit(true, 0x5000_0000, &[1], &regs(0x1000, 0)), None);
            }
            w.exit(); // e.g. a serial write in between
        }
    }

    /// `sgdt [rax]` (0f 01 00) with rax pointing at a read-only slot.
    const SGDT_RAX: [u8; 3] = [0x0f, 0x01, 0x00];

    #[test]
    fn a_store_into_a_read_only_slot_that_never_exits_is_no_progress() {
        let mut w = ProgressWatch::default();
        let r = regs(0xffff_ffff_8020_0000, 0xffff_8880_0100_0800);
        let s = kvm_sregs::default();
        let gpa_of = |va: u64| Some((va - 0xffff_8880_0000_0000, Some(true)));
        assert_eq!(w.tick(&r, &s, &SGDT_RAX, gpa_of), None, "first sample");
        assert_eq!(w.tick(&r, &s, &SGDT_RAX, gpa_of), None, "one stalled tick");
        let why = w.tick(&r, &s, &SGDT_RAX, gpa_of).unwrap();
        assert_eq!(
            why,
            "stores into GPA 0x1000800, in a read-only memslot, and the host retries it without an exit (no exit and no register change for 500 ms)"
        );
        assert_eq!(decode(&SGDT_RAX, r.rip).unwrap().0, "sgdt [rax]");
    }

    #[test]
    fn a_guest_spinning_on_purpose_is_left_to_the_timeout() {
        let mut w = ProgressWatch::default();
        let s = kvm_sregs::default();
        // `jmp $` (eb fe) and `pause` (f3 90): no memory operand.
        for bytes in [&[0xeb, 0xfe][..], &[0xf3, 0x90][..]] {
            for _ in 0..10 {
                assert_eq!(w.tick(&regs(0x1000, 0), &s, bytes, |va| Some((va, None))), None);
            }
        }
        // A store into ordinary RAM that did not exit: not stuck (KVM
        // completes such stores natively; a sample can land on one).
        let r = regs(0x1000, 0x2000);
        for _ in 0..10 {
            assert_eq!(w.tick(&r, &s, &SGDT_RAX, |va| Some((va, Some(false)))), None);
        }
        // Anything exiting in between resets the stall.
        let r = regs(0x1000, 0x2000);
        for _ in 0..10 {
            w.exit();
            assert_eq!(w.tick(&r, &s, &SGDT_RAX, |va| Some((va, Some(true)))), None);
        }
    }
}
