//! One VM: creation from a [`VmConfig`], the vCPU loop, the end of the run.
//!
//! Lifecycle (the rust-vmm `vmm-reference` shape): [`Vm::new`] opens KVM,
//! builds the memory map and its memslots, loads the kernel and the boot
//! structures, and sets up the single vCPU and the MMU mode's backend
//! (`mmu`: the run loop calls it for every mode-specific event, and holds
//! no mode-specific code itself); [`Vm::run`] moves the VM's state onto a vCPU thread and runs it
//! until the guest writes to the exit device, the vCPU dies, or the timeout
//! expires (the main thread then kicks the vCPU out of `KVM_RUN` with a
//! signal). The VM stays inspectable afterwards (`--explain`).
//!
//! The timeout is a deadline for the whole run, whatever the vCPU thread is
//! doing: the guest's console is written by a thread of its own through a
//! bounded queue (`devices::serial`), a vCPU thread that is still in a VMM
//! handler [`VCPU_STOP_GRACE`] after the timeout is abandoned, and a panic
//! of the vCPU thread ends the run at once with its message. What a guest
//! can make the VMM keep or print is bounded (`limits`).
//!
//! Invariants:
//! - Guest RAM is one host mapping at GPA `0..memory`, registered as the
//!   slots of one `ept::MemoryMap` (plus, in shadow mode, the VMM-private
//!   shadow pool, which no guest-visible mapping ever reaches), so the
//!   guest cannot reach host memory beyond them.
//! - Registers are read through the sync-regs area of `kvm_run`
//!   (`KVM_SYNC_X86_REGS`), so a hypercall costs one exit and no extra
//!   ioctl; the result goes back the same way.

use crate::boot::{bootinfo, gdt, loader, paging, regs};
use crate::devices::hypercall::{self, HypercallContext, Report};
use crate::devices::serial::{ConsoleSink, GuestSerial, new_serial};
use crate::error::{Error, Result};
use crate::explain::Explanation;
use crate::layout::{self, MAX_MEMORY, MIN_MEMORY, PT_ZONE_START};
use crate::limits::{Limited, ReportBudget};
use crate::mmu::{GuestCpu, Machine, MmuBackend, MmuCounters, kvm_err};
use crate::stats::{ExitCounts, ExitReason, RunStats};
pub use crate::supervise::{Supervised, VCPU_STOP_GRACE, supervise};
use crate::vcpu_exit::Action;
use ept::memmap::{GpaRange, MemoryMap, MemoryMapConfig};
use ept::{Backing, GuestRam};
use guest_abi::hypercall as hc;
use guest_abi::ports::exit_status;
use guest_abi::{Gpa, Gva, MmuMode};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, SyncReg};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The kernel bundled into this binary by `build.rs`.
pub static BUNDLED_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_ELF"));

/// Where the guest kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// The kernel built from `guest/kernel` and embedded in the binary.
    Bundled,
    /// An ELF file.
    File(PathBuf),
}

/// Everything needed to create and run a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The guest kernel.
    pub kernel: KernelSource,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// MMU virtualisation mode.
    pub mmu: MmuMode,
    /// What backs guest RAM.
    pub backing: Backing,
    /// Size of the shadow pool (shadow mode only).
    pub shadow_pool: u64,
    /// Guest command line.
    pub cmdline: String,
    /// Wall-clock limit for the run.
    pub timeout: Duration,
    /// When the process started (for the setup-time statistic).
    pub process_start: Instant,
}

impl VmConfig {
    /// The bundled kernel on `memory` bytes of 4 KiB-backed RAM in `mmu`
    /// mode, with the CLI's defaults for everything else (16 MiB shadow
    /// pool, no command line, a 60 s timeout); change fields as needed.
    pub fn bundled(memory: u64, mmu: MmuMode) -> VmConfig {
        VmConfig {
            kernel: KernelSource::Bundled,
            memory,
            mmu,
            backing: Backing::Anon4k,
            shadow_pool: 16 << 20,
            cmdline: String::new(),
            timeout: Duration::from_secs(60),
            process_start: Instant::now(),
        }
    }
}

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
        let console = core.serial.writer().queue();
        let diag = core.diag.queue();
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
        self.core.as_deref().expect("the VM was abandoned after a timeout").m.ram.memory()
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
        &self.core.as_deref().expect("the VM was abandoned after a timeout").m.map
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
        let supervised = supervise(
            "vcpu0",
            self.timeout,
            VCPU_STOP_GRACE,
            || {
                stop.store(true, Ordering::SeqCst);
                console.abort();
                diag.abort();
            },
            move || {
                let out = core.vcpu_loop(&expired);
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

/// The VM's state: everything the vCPU thread needs, moved onto that thread
/// for a run and back afterwards.
struct VmCore {
    // Kept alive for the lifetime of the VM: the vCPU and memslots belong to it.
    _kvm: Kvm,
    /// The VM, its vCPU and memory: what the MMU backend may touch.
    m: Machine,
    /// The MMU mode's half of every exit (`mmu`).
    mmu: Box<dyn MmuBackend>,
    serial: GuestSerial,
    config: VmConfig,
    epoch: Instant,
    /// Counters at the last `BENCH_BEGIN`.
    bench_start: Option<BenchSnapshot>,
    /// Where the vCPU thread's own output to stderr goes (a writer thread).
    diag: ConsoleSink,
    /// `EXPLAIN` chains printed by the hypercall (bounded).
    explain_prints: Limited,
}

type BenchSnapshot = (Instant, ExitCounts, Option<MmuCounters>);

/// Check the memory size against the layout.
pub fn check_memory_size(memory: u64) -> Result<()> {
    if memory < MIN_MEMORY {
        return Err(Error::MemoryTooSmall(memory, MIN_MEMORY));
    }
    if memory > MAX_MEMORY {
        return Err(Error::MemoryTooLarge(memory, MAX_MEMORY));
    }
    if !memory.is_multiple_of(layout::LARGE_PAGE_SIZE) {
        return Err(Error::MemoryUnaligned(memory));
    }
    Ok(())
}

impl VmCore {
    fn new(config: VmConfig, console: Box<dyn Write + Send>) -> Result<VmCore> {
        check_memory_size(config.memory)?;
        let page = config.backing.alignment();
        if page > 0 && !config.memory.is_multiple_of(page) {
            return Err(Error::MemoryNotPageAligned {
                memory: config.memory,
                page,
                backing: config.backing.to_string(),
            });
        }
        crate::mmu::check_config(config.mmu, config.memory, config.shadow_pool)?;
        let (name, image): (String, std::borrow::Cow<'static, [u8]>) = match &config.kernel {
            KernelSource::Bundled => ("(bundled)".into(), BUNDLED_KERNEL.into()),
            KernelSource::File(p) => {
                let bytes = loader::read_kernel(p, config.memory)?;
                (p.display().to_string(), bytes.into())
            }
        };
        let pt_zone = GpaRange::new(Gpa(PT_ZONE_START), Gpa(PT_ZONE_START + layout::pt_zone_size(config.memory)));
        // The loader and the boot record describe the zone to the guest in
        // the ABI's raw terms.
        let pt_zone_raw = (pt_zone.start.raw(), pt_zone.end.raw());
        let kernel = loader::inspect(&name, &image, config.memory, pt_zone_raw)?;

        let kvm = crate::kvm::open()?;
        let map = MemoryMap::new(&MemoryMapConfig {
            ram_size: config.memory,
            pt_zone,
            boot_tables: layout::BOOT_TABLES,
            shadow_pool: crate::mmu::shadow_pool_size(config.mmu, config.shadow_pool),
            mmu: config.mmu,
            alignment: config.backing.alignment(),
            max_slots: kvm.get_nr_memslots(),
        })?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let epoch = Instant::now();
        let ram = GuestRam::new(&map, config.backing)?;
        ram.register(&map, &vm).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mem = ram.memory();

        loader::load(&name, &image, mem)?;
        gdt::write_gdt_and_idt(mem)?;
        let boot_mapped = paging::setup_page_tables(mem, config.memory)?;
        bootinfo::write(
            mem,
            &bootinfo::BootInfoParams {
                ram: config.memory,
                boot_mapped,
                kernel: kernel.phys_range(),
                pt_zone: pt_zone_raw,
                mmu: config.mmu,
                cmdline: &config.cmdline,
            },
        )?;

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpu = GuestCpu::from_cpuid(cpuid.as_slice().iter().map(|e| (e.function, e.eax, e.ebx, e.ecx, e.edx)));
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&regs::long_mode_sregs(sregs, cpu.nx)).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&regs::reset_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
        vcpu.set_regs(&regs::entry_regs(kernel.entry)).map_err(kvm_err("KVM_SET_REGS"))?;
        let mut m = Machine {
            vm,
            vcpu,
            ram,
            map,
            memory: config.memory,
            cpu,
            warnings: Limited::new("warnings about refused shadow-MMU requests", crate::limits::MAX_WARNINGS),
        };
        m.vcpu.set_sync_valid_reg(SyncReg::Register);
        let mmu = crate::mmu::create(config.mmu, &mut m, pt_zone)?;
        Ok(VmCore {
            _kvm: kvm,
            m,
            mmu,
            serial: new_serial(console),
            diag: ConsoleSink::new(Box::new(std::io::stderr())),
            config,
            epoch,
            bench_start: None,
            explain_prints: Limited::new("EXPLAIN outputs", crate::limits::MAX_EXPLAIN_PRINTS),
        })
    }

    /// `KVM_TRANSLATE` of `gva` with the vCPU's current CR3: the GPA, or
    /// `None` when KVM says it is not mapped.
    pub fn kvm_translate(&self, gva: Gva) -> Result<Option<Gpa>> {
        let t = self.m.vcpu.translate_gva(gva.raw()).map_err(kvm_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(Gpa(t.physical_address)))
    }

    /// Point the vCPU's CR3 at `cr3` (for tools and tests that walk their
    /// own tables; the guest is not running).
    pub fn set_cr3(&mut self, cr3: Gpa) -> Result<()> {
        let mut sregs = self.m.sregs()?;
        sregs.cr3 = cr3.raw();
        self.m.set_sregs(&sregs)
    }

    /// The vCPU's paging controls as the shadow walker takes them.
    pub fn paging_mode(&self) -> Result<shadow::PagingMode> {
        let sregs = self.m.sregs()?;
        Ok(self.mmu.guest_paging_mode(&sregs, self.m.regs().rflags))
    }

    /// The translation chain of `gva` in the guest's current address space.
    pub fn explain(&self, gva: Gva) -> Result<Explanation> {
        crate::explain::explain(&self.m, self.mmu.as_ref(), self.config.mmu.name(), gva)
    }

    fn vcpu_loop(&mut self, expired: &AtomicBool) -> RunOutcome {
        let mut stats = RunStats {
            memory: self.config.memory,
            backing: self.config.backing.to_string(),
            mmu: self.config.mmu.name(),
            ..Default::default()
        };
        let mut reports = Vec::new();
        let mut budget = ReportBudget::default();
        let started = Instant::now();
        stats.setup_time = started.duration_since(self.config.process_start);
        let end = self.run_until_end(expired, &mut stats, &mut reports, &mut budget);
        stats.reports_dropped = budget.dropped;
        stats.explain_suppressed = self.explain_prints.suppressed();
        stats.warnings_suppressed = self.m.warnings.suppressed() + self.mmu.warnings_suppressed();
        stats.run_time = started.elapsed();
        self.serial.writer_mut().drain();
        stats.huge_backed = self.m.ram.huge_backed_bytes().ok();
        stats.shadow = self.mmu.report();
        stats.guest_boot_cycles = reports.iter().find_map(|r| match r {
            Report::Boot { boot_cycles, .. } => Some(*boot_cycles),
            _ => None,
        });
        RunOutcome { end, stats, reports }
    }

    /// Snapshot the counters at a workload's `BENCH_BEGIN`; turn the
    /// difference into a [`BenchPhase`] at its `BENCH`.
    fn bench_marker(&mut self, stats: &mut RunStats, report: Option<&Report>) {
        let mmu_now = self.mmu.counters();
        match report {
            Some(Report::BenchBegin { .. }) => {
                self.bench_start = Some((Instant::now(), stats.exits, mmu_now));
            }
            Some(Report::Bench { name, ops, cycles, ok }) => {
                let Some((t0, exits0, mmu0)) = self.bench_start.take() else { return };
                let mut exits = stats.exits.since(&exits0);
                // The closing REPORT is the measurement's own exit.
                exits.uncount(ExitReason::Hypercall);
                let (shadow, shadow_handler_time) = match (mmu0, mmu_now) {
                    (Some(c0), Some(c1)) => {
                        (Some(c1.shadow.since(&c0.shadow)), Some(c1.handler_time.saturating_sub(c0.handler_time)))
                    }
                    _ => (None, None),
                };
                stats.bench.push(crate::stats::BenchPhase {
                    name: name.clone(),
                    ops: *ops,
                    cycles: *cycles,
                    ok: *ok,
                    wall: t0.elapsed(),
                    exits,
                    shadow,
                    shadow_handler_time,
                });
            }
            _ => {}
        }
    }

    /// `EXPLAIN(gva)`: print the chain to stderr now (the first
    /// [`crate::limits::MAX_EXPLAIN_PRINTS`] of a run; the rest are only
    /// counted); answer the GPA, or `ERR_FAULT` when the address is not
    /// mapped.
    fn explain_hypercall(&mut self, gva: Gva) -> u64 {
        match self.explain(gva) {
            Ok(e) => {
                if self.explain_prints.allow() {
                    // Through the diagnostics queue: a blocked stderr must
                    // not block the vCPU thread.
                    let _ = self.diag.write_all(e.render().as_bytes());
                    self.diag.drain();
                }
                e.gpa().map_or(hc::ERR_FAULT, Gpa::raw)
            }
            Err(err) => {
                if self.m.warnings.allow() {
                    log::warn!("EXPLAIN({gva:#x}) failed: {err}");
                }
                hc::ERR_FAULT
            }
        }
    }

    /// Hypercall `nr`, from one table: the MMU backend has first refusal
    /// (a mode's own hypercalls), then the MMU events every mode answers
    /// (`LOAD_CR3`, `SHADOW_FAULT`, `FLUSH_TLB`; ept mode answers
    /// `ERR_UNAVAILABLE`), `EXPLAIN`, and the device's own (`REPORT`,
    /// `NOW`, unknown numbers).
    fn hypercall(&mut self, nr: u32, reports: &mut Vec<Report>, budget: &mut ReportBudget) -> Result<u64> {
        let r = self.m.regs();
        if let Some(result) = self.mmu.hypercall(&mut self.m, nr, &r)? {
            return Ok(result);
        }
        Ok(match nr {
            hc::LOAD_CR3 => self.mmu.load_cr3(&mut self.m, Gpa(r.rdi), &r)?,
            hc::SHADOW_FAULT => self.mmu.fault(&mut self.m, Gva(r.rdi), r.rsi, &r)?,
            hc::FLUSH_TLB => self.mmu.flush(&mut self.m, r.rdi, r.rsi, &r)?,
            hc::EXPLAIN => self.explain_hypercall(Gva(r.rdi)),
            _ => {
                let mut ctx = HypercallContext {
                    mem: self.m.ram.memory(),
                    ram: self.config.memory,
                    epoch: self.epoch,
                    reports,
                    budget,
                };
                hypercall::handle(&mut ctx, nr, [r.rdi, r.rsi, r.rcx, r.r8])
            }
        })
    }

    fn rip(&self) -> u64 {
        self.m.regs().rip
    }

    fn run_until_end(
        &mut self,
        expired: &AtomicBool,
        stats: &mut RunStats,
        reports: &mut Vec<Report>,
        budget: &mut ReportBudget,
    ) -> Result<GuestExit> {
        loop {
            if expired.load(Ordering::SeqCst) {
                return Err(Error::Timeout(self.config.timeout));
            }
            self.mmu.before_entry(&mut self.m)?;
            let action = match self.m.vcpu.run() {
                Ok(exit) => Action::from_exit(exit, &mut self.serial),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    stats.exit(ExitReason::Interrupted);
                    continue;
                }
                Err(e) => return Err(Error::Kvm { what: "KVM_RUN", source: e }),
            };
            match action {
                Action::SerialOut => {
                    stats.exit(ExitReason::SerialOut);
                    self.serial.writer_mut().drain();
                }
                Action::SerialIn => stats.exit(ExitReason::SerialIn),
                Action::ExitDevice(value) => {
                    stats.exit(ExitReason::ExitDevice);
                    return Ok(GuestExit { value, status: exit_status(value) });
                }
                Action::Hypercall(nr) => {
                    stats.exit(ExitReason::Hypercall);
                    stats.hypercall(hc::name(nr));
                    let result = self.hypercall(nr, reports, budget)?;
                    self.m.vcpu.sync_regs_mut().regs.rax = result;
                    self.m.vcpu.set_sync_dirty_reg(SyncReg::Register);
                    if nr == hc::REPORT && result == hc::OK {
                        self.bench_marker(stats, reports.last());
                    }
                }
                Action::OtherIoOut(port) => {
                    stats.exit(ExitReason::UnclaimedOut);
                    log::debug!("guest wrote to unclaimed port {port:#x}; ignored");
                }
                Action::OtherIoIn(port) => {
                    stats.exit(ExitReason::UnclaimedIn);
                    log::debug!("guest read unclaimed port {port:#x}; reads as all ones");
                }
                Action::MmioWrite(addr, data, len) => match self.mmu.mmio_write(&mut self.m, Gpa(addr), &data[..len]) {
                    Some(reason) => stats.exit(reason),
                    None => {
                        stats.exit(ExitReason::MmioWrite);
                        log::debug!("guest wrote unbacked GPA {addr:#x}");
                    }
                },
                Action::MmioRead(addr) => {
                    // No device lives outside RAM: reads see all ones.
                    stats.exit(ExitReason::MmioRead);
                    log::debug!("guest read unbacked GPA {addr:#x}");
                }
                Action::Hlt => {
                    stats.exit(ExitReason::Hlt);
                    // No device of this VM ever raises an interrupt, so a
                    // halt never ends either way; but say which halt it was
                    // (RFLAGS.IF: `sti; hlt` waits for an interrupt).
                    let regs = self.m.regs();
                    if regs.rflags & guest_abi::paging::RFLAGS_IF != 0 {
                        return Err(Error::GuestIdle { rip: regs.rip });
                    }
                    return Err(Error::GuestHalted { rip: regs.rip });
                }
                Action::Shutdown => {
                    stats.exit(ExitReason::Shutdown);
                    return Err(Error::TripleFault { rip: self.rip() });
                }
                Action::InternalError => {
                    stats.exit(ExitReason::InternalError);
                    return Err(self.internal_error());
                }
                Action::FailEntry(reason) => {
                    stats.exit(ExitReason::FailEntry);
                    return Err(Error::FailEntry(reason));
                }
                Action::Other(what) => {
                    stats.exit(ExitReason::Unexpected);
                    return Err(Error::UnexpectedExit { what, rip: self.rip() });
                }
            }
        }
    }

    /// Describe a `KVM_EXIT_INTERNAL_ERROR`; for an emulation failure,
    /// include the instruction bytes at `rip`.
    fn internal_error(&mut self) -> Error {
        let rip = self.rip();
        let run = self.m.vcpu.get_kvm_run();
        // SAFETY: this is a KVM_EXIT_INTERNAL_ERROR exit, so the `internal`
        // member of the exit union is the valid one.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            let bytes = self.instruction_bytes(rip);
            let hex = if bytes.is_empty() {
                "unreadable".to_string()
            } else {
                bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
            };
            return Error::EmulationFailure { rip, bytes: hex, suberror };
        }
        Error::InternalError { rip, suberror }
    }

    /// Up to 15 bytes (the longest x86 instruction) at guest-virtual `rip`,
    /// translated page by page with `KVM_TRANSLATE`; stops at the first
    /// unmapped page.
    fn instruction_bytes(&self, rip: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < 15 {
            let va = rip.wrapping_add(out.len() as u64);
            let Ok(t) = self.m.vcpu.translate_gva(va) else { break };
            if t.valid == 0 {
                break;
            }
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let n = in_page.min(15 - out.len());
            let mut buf = vec![0u8; n];
            if self.m.ram.memory().read_slice(&mut buf, GuestAddress(t.physical_address)).is_err() {
                break;
            }
            out.extend_from_slice(&buf);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_command_line_word_is_named() {
        let exit = |value| GuestExit { value, status: exit_status(value) };
        let base = guest_abi::ports::EXIT_BAD_CMDLINE;
        assert_eq!(exit(base + 1).refused_cmdline_word("test= worklaod=fault"), Some("worklaod=fault".into()));
        assert_eq!(exit(guest_abi::ports::EXIT_FAILURE).refused_cmdline_word("x"), None);
        assert_eq!(exit(guest_abi::ports::EXIT_SUCCESS).refused_cmdline_word("x"), None);
    }
}
