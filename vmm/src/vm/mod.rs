//! One VM: its lifecycle, its per-VM state, and the run.
//!
//! Files: [`config`] (what a VM is made from), `builder` (creation from a
//! [`VmConfig`]), this file (the [`Vm`] handle and its lifecycle), `run`
//! (the run loop of one vCPU), [`kvm`] (opening `/dev/kvm`).
//!
//! **Per-VM vs per-vCPU state.** `VmState` is per-VM: KVM, the VM's
//! [`VmContext`] (VM file descriptor, guest RAM, memory map, memory size,
//! guest CPU facts, warnings), the devices (UART, diagnostics queue,
//! `EXPLAIN` budget), the MMU backend (the mode's VM-wide state), the
//! configuration. `vcpu::Vcpu` is per-vCPU (its file descriptor and index,
//! its exit counts and statistics). A VM has 1 to 64 vCPUs (`--vcpus`);
//! with more than one, `smp` runs one thread per vCPU.
//!
//! Lifecycle (the rust-vmm `vmm-reference` shape): [`Vm::new`] builds the
//! VM (`builder`); [`Vm::run`] moves the VM's state onto a vCPU thread
//! and runs it until the guest writes to the exit device, the vCPU dies,
//! or the timeout expires (the main thread then kicks the vCPU out of
//! `KVM_RUN` with a signal). Until then the main thread kicks every
//! running vCPU every `vcpu::progress::TICK`: each samples its own
//! progress (`vcpu::progress`), and a vCPU stuck on an instruction that
//! can never complete ends the run at once. The VM stays inspectable
//! afterwards (`--explain`).
//!
//! The timeout is a deadline for the whole run, whatever the vCPU thread is
//! doing: the guest's console is written by a thread of its own through a
//! bounded queue (`devices::serial`), a vCPU thread that is still in a VMM
//! handler [`VCPU_STOP_GRACE`] after the timeout is abandoned, and a panic
//! of the vCPU thread ends the run at once with its message. What a guest
//! can make the VMM keep or print is bounded (`limits`).
//!
//! Invariants: guest RAM is one host mapping at GPA `0..memory`, registered
//! as the slots of one `ept::MemoryMap` (plus, in shadow and pv mode, the
//! VMM-private shadow pool, which no guest-visible mapping ever reaches),
//! so the guest cannot reach host memory beyond them (`builder`).

mod builder;
pub mod config;
pub mod kvm;
mod run;
mod smp;

pub use crate::vcpu::supervise::{Supervised, VCPU_STOP_GRACE, supervise};
pub use builder::create_backend;
pub use config::{BUNDLED_KERNEL, KernelSource, VmConfig, check_memory_size, smp_supported};

use crate::devices::hypercall::Report;
use crate::devices::serial::{ConsoleSink, GuestSerial};
use crate::error::{Error, Result, kvm_err};
use crate::limits::Limited;
use crate::mmu::explain::Explanation;
use crate::mmu::{MmuBackend, VmContext};
use crate::stats::RunStats;
use crate::vcpu::Vcpu;
use ept::memmap::MemoryMap;
use guest_abi::{Gpa, Gva, MmuMode};
use kvm_ioctls::Kvm;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;

/// How the guest ended, when it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    /// The byte the guest wrote to the exit device.
    pub value: u8,
    /// The QEMU `isa-debug-exit` status, `(value << 1) | 1`.
    pub status: u32,
}

impl GuestExit {
    /// Whether the guest reported success.
    pub fn success(&self) -> bool {
        self.value == guest_abi::ports::EXIT_SUCCESS
    }

    /// The word of `cmdline` the guest refused, when it ended with
    /// `EXIT_BAD_CMDLINE + index` (the bundled kernel checks its command
    /// line before anything else).
    pub fn refused_cmdline_word(&self, cmdline: &str) -> Option<String> {
        use guest_abi::ports::{EXIT_BAD_CMDLINE, MAX_CMDLINE_WORD_INDEX};
        let index = self.value.checked_sub(EXIT_BAD_CMDLINE).filter(|&i| i <= MAX_CMDLINE_WORD_INDEX)?;
        Some(match cmdline.split_ascii_whitespace().nth(index as usize) {
            Some(w) if index < MAX_CMDLINE_WORD_INDEX => w.to_string(),
            _ => format!("#{index} or a later one"),
        })
    }
}

/// The result of a run that got as far as starting the guest.
#[derive(Debug)]
pub struct RunOutcome {
    /// How the guest ended, or why the VMM had to end it.
    pub end: Result<GuestExit>,
    /// Statistics of the run.
    pub stats: RunStats,
    /// Records the guest sent with `REPORT`.
    pub reports: Vec<Report>,
}

/// A VM ready to run.
///
/// Its state lives in a `VmCore` that [`Vm::run`] moves onto the vCPU
/// thread and gets back when the thread returns. If the thread does not
/// return within [`VCPU_STOP_GRACE`] of the timeout (a VMM handler that
/// runs long), the run ends anyway and the VM is abandoned: the thread is
/// left to finish in the background and the VM can no longer be inspected.
pub struct Vm {
    core: Option<Box<VmCore>>,
    timeout: Duration,
    memory: u64,
    mmu: MmuMode,
    console: Arc<crate::devices::serial::ConsoleQueue>,
    /// What the vCPU thread prints to stderr (`EXPLAIN` chains).
    diag: Arc<crate::devices::serial::ConsoleQueue>,
}

impl Vm {
    /// Create the VM: KVM, memory, kernel, boot structures, vCPU. The guest
    /// console goes to `console` (through a writer thread: the vCPU never
    /// blocks on it).
    pub fn new(config: VmConfig, console: Box<dyn Write + Send>) -> Result<Vm> {
        let (timeout, memory, mmu) = (config.timeout, config.memory, config.mmu);
        let core = VmCore::new(config, console)?;
        let console = core.vm.serial.writer().queue();
        let diag = core.vm.diag.queue();
        Ok(Vm { core: Some(Box::new(core)), timeout, memory, mmu, console, diag })
    }

    fn core(&self) -> Result<&VmCore> {
        self.core.as_deref().ok_or(Error::VmAbandoned)
    }

    /// Guest memory (for tests and tools that inspect the guest).
    ///
    /// # Panics
    /// If a run had to abandon the VM (its vCPU thread did not stop after
    /// the timeout); check the run's outcome first.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.core.as_deref().expect("the VM was abandoned after a timeout").vm.ctx.ram().memory()
    }

    /// `KVM_TRANSLATE` of `gva` with the vCPU's current CR3: the GPA, or
    /// `None` when KVM says it is not mapped.
    pub fn kvm_translate(&self, gva: Gva) -> Result<Option<Gpa>> {
        self.core()?.kvm_translate(gva)
    }

    /// Point the vCPU's CR3 at `cr3` (for tools and tests that walk their
    /// own tables; the guest is not running).
    pub fn set_cr3(&mut self, cr3: Gpa) -> Result<()> {
        self.core.as_deref_mut().ok_or(Error::VmAbandoned)?.set_cr3(cr3)
    }

    /// The vCPU's paging controls as the shadow walker takes them.
    pub fn paging_mode(&self) -> Result<shadow::PagingMode> {
        self.core()?.paging_mode()
    }

    /// The guest-physical memory map.
    ///
    /// # Panics
    /// As [`Vm::memory`].
    pub fn memory_map(&self) -> &MemoryMap {
        self.core.as_deref().expect("the VM was abandoned after a timeout").vm.ctx.map()
    }

    /// The translation chain of `gva` in the guest's current address space.
    /// Explaining changes nothing: no accessed or dirty bit is set.
    pub fn explain(&self, gva: Gva) -> Result<Explanation> {
        self.core()?.explain(gva)
    }

    /// Run until the guest ends, the vCPU dies, or the timeout expires.
    /// The timeout holds whatever the vCPU thread is doing: the console is
    /// written by its own thread, and a vCPU thread that does not stop
    /// within [`VCPU_STOP_GRACE`] is abandoned. A panic of the vCPU thread
    /// ends the run at once, with its message. The VM stays inspectable
    /// afterwards ([`Vm::explain`]) unless it was abandoned.
    pub fn run(&mut self) -> RunOutcome {
        let Some(mut core) = self.core.take() else {
            return RunOutcome { end: Err(Error::VmAbandoned), stats: RunStats::default(), reports: Vec::new() };
        };
        let started = Instant::now();
        let expired = Arc::new(AtomicBool::new(false));
        let stop = expired.clone();
        let console = self.console.clone();
        let diag = self.diag.clone();
        // The periodic progress kick (`vcpu::progress`): `supervise` kicks
        // vCPU 0's thread, this every AP that `CPU_ON` started (one that
        // waits for it runs no guest code and is not sampled).
        let smp = core.vm.smp.clone();
        let supervised = supervise(
            "vcpu0",
            self.timeout,
            VCPU_STOP_GRACE,
            Some(crate::vcpu::progress::TICK),
            || {
                if let Some(smp) = &smp {
                    smp.kick_started_aps();
                }
            },
            || {
                stop.store(true, Ordering::SeqCst);
                console.abort();
                diag.abort();
            },
            move || {
                let VmCore { vm, vcpu, aps } = &mut *core;
                let out = vm.run_vcpus(vcpu, aps, &expired);
                (core, out)
            },
        );
        let empty_stats = || RunStats {
            memory: self.memory,
            mmu: self.mmu.name(),
            run_time: started.elapsed(),
            ..Default::default()
        };
        let mut outcome = match supervised {
            Supervised::Done((core, outcome)) => {
                self.core = Some(core);
                outcome
            }
            Supervised::Panicked(message) => {
                self.console.abort();
                self.diag.abort();
                RunOutcome { end: Err(Error::VcpuPanicked(message)), stats: empty_stats(), reports: Vec::new() }
            }
            Supervised::Stuck => {
                RunOutcome { end: Err(Error::VcpuStuck(self.timeout)), stats: empty_stats(), reports: Vec::new() }
            }
        };
        // Give the console until the run's deadline (and a little more
        // for a run that used all of it) to write what the guest printed.
        let deadline = (started + self.timeout).max(Instant::now()) + crate::devices::serial::CONSOLE_GRACE;
        // The EXPLAIN chains the guest asked for: best effort, never an error.
        self.diag.finish(deadline);
        let unwritten = self.console.finish(deadline);
        outcome.stats.console_unwritten = unwritten;
        if unwritten > 0 {
            log::warn!("{unwritten} bytes of guest console output were not written: the output was blocked");
            if outcome.end.is_ok() {
                outcome.end = Err(Error::ConsoleBlocked { timeout: self.timeout, unwritten });
            }
        }
        outcome
    }
}

/// Per-VM state: everything of the VM the vCPU threads share (behind
/// `run::Shared`'s mutex during a run).
pub(crate) struct VmState {
    // Kept alive for the lifetime of the VM: the vCPU and memslots belong to it.
    _kvm: Kvm,
    /// The VM and its memory: what the MMU backend may touch of the VM.
    ctx: VmContext,
    /// The MMU mode's half of every exit (`mmu`).
    mmu: Box<dyn MmuBackend>,
    serial: GuestSerial,
    config: VmConfig,
    epoch: Instant,
    /// Where the vCPU thread's own output to stderr goes (a writer thread).
    diag: ConsoleSink,
    /// `EXPLAIN` chains printed by the hypercall (bounded).
    explain_prints: Limited,
    /// With more than one vCPU: their handles, the boot registers of the
    /// application processors, the end of the run (`smp`).
    smp: Option<std::sync::Arc<smp::Smp>>,
}

/// What moves onto the vCPU thread for a run and back afterwards: the VM's
/// state, its boot vCPU, and its application processors (which run on
/// threads of their own, started by the boot vCPU's thread).
struct VmCore {
    vm: VmState,
    vcpu: Vcpu,
    aps: Vec<Vcpu>,
}

impl VmCore {
    /// `KVM_TRANSLATE` of `gva` with the vCPU's current CR3: the GPA, or
    /// `None` when KVM says it is not mapped.
    pub fn kvm_translate(&self, gva: Gva) -> Result<Option<Gpa>> {
        let t = self.vcpu.ctx.fd().translate_gva(gva.raw()).map_err(kvm_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(Gpa(t.physical_address)))
    }

    /// Point the vCPU's CR3 at `cr3` (for tools and tests that walk their
    /// own tables; the guest is not running).
    pub fn set_cr3(&mut self, cr3: Gpa) -> Result<()> {
        let mut sregs = self.vcpu.ctx.sregs()?;
        sregs.cr3 = cr3.raw();
        self.vcpu.ctx.set_sregs(&sregs)
    }

    /// The vCPU's paging controls as the shadow walker takes them.
    pub fn paging_mode(&self) -> Result<shadow::PagingMode> {
        let sregs = self.vcpu.ctx.sregs()?;
        Ok(self.vm.mmu.guest_paging_mode(&sregs, self.vcpu.ctx.regs().rflags))
    }

    /// The translation chain of `gva` in the guest's current address space.
    pub fn explain(&self, gva: Gva) -> Result<Explanation> {
        self.vm.explain(&self.vcpu.ctx, gva)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::ports::exit_status;

    #[test]
    fn the_refused_command_line_word_is_named() {
        let exit = |value| GuestExit { value, status: exit_status(value) };
        let base = guest_abi::ports::EXIT_BAD_CMDLINE;
        assert_eq!(exit(base + 1).refused_cmdline_word("test= worklaod=fault"), Some("worklaod=fault".into()));
        assert_eq!(exit(guest_abi::ports::EXIT_FAILURE).refused_cmdline_word("x"), None);
        assert_eq!(exit(guest_abi::ports::EXIT_SUCCESS).refused_cmdline_word("x"), None);
    }
}
