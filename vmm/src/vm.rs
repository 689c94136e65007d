//! One VM: creation from a [`VmConfig`], the vCPU loop, the end of the run.
//!
//! Lifecycle (the rust-vmm `vmm-reference` shape): [`Vm::new`] opens KVM,
//! builds the memory map and its memslots, loads the kernel and the boot
//! structures, and sets up the single vCPU (and, in shadow mode, the shadow
//! MMU); [`Vm::run`] moves the VM's state onto a vCPU thread and runs it
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
use crate::shadow_mode::{Coherence, GuestCpu, MemWindow, ShadowState, fault_path_gvas, paging_mode};
use crate::stats::RunStats;
use ept::memmap::{MemoryMap, MemoryMapConfig};
use ept::{Backing, GuestRam};
use guest_abi::MmuMode;
use guest_abi::ports::{EXIT_DEVICE, HYPERCALL, SERIAL_COM1, SERIAL_PORT_COUNT, exit_status};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use shadow::{PagingMode, TableFrames};
use std::collections::BTreeMap;
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

/// How long after the timeout the vCPU thread may take to stop before the
/// run ends without it.
pub const VCPU_STOP_GRACE: Duration = Duration::from_secs(1);

/// How a supervised thread ended.
#[derive(Debug)]
pub enum Supervised<T> {
    /// It returned this.
    Done(T),
    /// It panicked with this message.
    Panicked(String),
    /// It was still running [`VCPU_STOP_GRACE`] (or the given grace) after
    /// the timeout; it was left running.
    Stuck,
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// Run `work` on a thread named `name` and wait for it at most `timeout`.
/// A panic is reported as soon as it happens, with its message. At the
/// timeout, `on_timeout` runs once (it tells the work to stop) and the
/// thread is kicked with the vCPU kick signal every 20 ms (out of
/// `KVM_RUN`); if it has still not returned after `grace`, it is left
/// running and `Stuck` is returned: the caller's deadline holds whatever
/// the thread is doing.
pub fn supervise<T: Send + 'static>(
    name: &str,
    timeout: Duration,
    grace: Duration,
    on_timeout: impl FnOnce(),
    work: impl FnOnce() -> T + Send + 'static,
) -> Supervised<T> {
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc::RecvTimeoutError;
    install_kick_handler();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        // `tx` moves in: a panic drops it, which wakes the waiter at once.
        let _ = tx.send(work());
    });
    let handle = match spawned {
        Ok(h) => h,
        Err(e) => return Supervised::Panicked(format!("cannot start the {name} thread: {e}")),
    };
    let finished = |handle: std::thread::JoinHandle<()>, got: Option<T>| match (handle.join(), got) {
        (_, Some(v)) => Supervised::Done(v),
        (Err(payload), None) => Supervised::Panicked(panic_message(&*payload)),
        (Ok(()), None) => Supervised::Panicked("the thread ended without a result".into()),
    };
    match rx.recv_timeout(timeout) {
        Ok(v) => return finished(handle, Some(v)),
        Err(RecvTimeoutError::Disconnected) => return finished(handle, None),
        Err(RecvTimeoutError::Timeout) => {}
    }
    on_timeout();
    let expired_at = Instant::now();
    loop {
        // SAFETY: the handle is neither joined nor detached, so its
        // pthread_t is valid (even if the thread has just ended); the kick
        // handler is installed, so the signal only interrupts a blocking
        // call such as KVM_RUN.
        unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(v) => return finished(handle, Some(v)),
            Err(RecvTimeoutError::Disconnected) => return finished(handle, None),
            Err(RecvTimeoutError::Timeout) if expired_at.elapsed() >= grace => {
                // Dropping the handle detaches the thread.
                return Supervised::Stuck;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
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
        self.core.as_deref().expect("the VM was abandoned after a timeout").ram.memory()
    }

    /// `KVM_TRANSLATE` of `gva` with the vCPU's current CR3: the GPA, or
    /// `None` when KVM says it is not mapped.
    pub fn kvm_translate(&self, gva: u64) -> Result<Option<u64>> {
        self.core()?.kvm_translate(gva)
    }

    /// Point the vCPU's CR3 at `cr3` (for tools and tests that walk their
    /// own tables; the guest is not running).
    pub fn set_cr3(&mut self, cr3: u64) -> Result<()> {
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
        &self.core.as_deref().expect("the VM was abandoned after a timeout").map
    }

    /// The translation chain of `gva` in the guest's current address space.
    /// Explaining changes nothing: no accessed or dirty bit is set.
    pub fn explain(&self, gva: u64) -> Result<Explanation> {
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
    vm: VmFd,
    vcpu: VcpuFd,
    shadow: Option<ShadowState>,
    map: MemoryMap,
    ram: GuestRam,
    serial: GuestSerial,
    config: VmConfig,
    epoch: Instant,
    /// Counters at the last `BENCH_BEGIN`.
    bench_start: Option<BenchSnapshot>,
    /// What the guest's CPUID says: MAXPHYADDR, NX, 1 GiB pages, vendor.
    cpu: GuestCpu,
    /// Where the vCPU thread's own output to stderr goes (a writer thread).
    diag: ConsoleSink,
    /// `EXPLAIN` chains printed by the hypercall (bounded).
    explain_prints: Limited,
    /// Warnings about refused guest requests (bounded).
    warnings: Limited,
}

type BenchSnapshot = (Instant, BTreeMap<&'static str, u64>, Option<(shadow::ShadowStats, Duration)>);

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The smallest shadow pool for `memory` bytes of RAM: 10 pages for the
/// roots, the kernel window and a few user paths, plus one page directory
/// per GiB of direct map (the kernel half is shadowed eagerly, and fault
/// delivery depends on it).
pub fn min_shadow_pool(memory: u64) -> u64 {
    (10 + memory.div_ceil(layout::GIB)) * layout::PAGE_SIZE
}

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
        if config.mmu == MmuMode::Shadow && config.shadow_pool < min_shadow_pool(config.memory) {
            return Err(Error::ShadowPoolTooSmall(config.shadow_pool, config.memory, min_shadow_pool(config.memory)));
        }
        let (name, image): (String, std::borrow::Cow<'static, [u8]>) = match &config.kernel {
            KernelSource::Bundled => ("(bundled)".into(), BUNDLED_KERNEL.into()),
            KernelSource::File(p) => {
                let bytes = std::fs::read(p).map_err(|source| Error::KernelRead { path: p.clone(), source })?;
                (p.display().to_string(), bytes.into())
            }
        };
        let pt_zone = (PT_ZONE_START, PT_ZONE_START + layout::pt_zone_size(config.memory));
        let kernel = loader::inspect(&name, &image, config.memory, pt_zone)?;

        let kvm = crate::kvm::open()?;
        let map = MemoryMap::new(&MemoryMapConfig {
            ram_size: config.memory,
            pt_zone,
            boot_tables: layout::BOOT_TABLES,
            shadow_pool: if config.mmu == MmuMode::Shadow { config.shadow_pool } else { 0 },
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
        if config.mmu == MmuMode::Shadow {
            crate::shadow_mode::preset_accessed(mem, layout::BOOT_TABLES);
        }
        bootinfo::write(
            mem,
            &bootinfo::BootInfoParams {
                ram: config.memory,
                boot_mapped,
                kernel: kernel.phys_range(),
                pt_zone,
                mmu: config.mmu,
                cmdline: &config.cmdline,
            },
        )?;

        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let nx = cpuid.as_slice().iter().any(|e| e.function == 0x8000_0001 && e.edx & (1 << 20) != 0);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&regs::long_mode_sregs(sregs, nx)).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&regs::reset_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
        vcpu.set_regs(&regs::entry_regs(kernel.entry)).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sync_valid_reg(SyncReg::Register);
        // Shadow mode reads the paging controls at every SHADOW_FAULT: have
        // KVM copy the system registers out at each exit instead of paying
        // a KVM_GET_SREGS ioctl per fault.
        if config.mmu == MmuMode::Shadow {
            vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        }

        let cpu = GuestCpu::from_cpuid(cpuid.as_slice().iter().map(|e| (e.function, e.eax, e.ebx, e.ecx, e.edx)));
        let shadow = match map.shadow_pool() {
            Some(pool) => {
                let slot = *map.slot_of(pool.start).expect("the pool has a slot");
                let hva = ram.hva(&map, pool.start).expect("the pool is mapped");
                let coherence = if ept::probe::second_stage().host_shadows_page_tables() {
                    Coherence::ReregisterPoolSlot
                } else {
                    Coherence::ReloadCr3
                };
                // Guest paging structures may live where writes trap: the
                // page-table zone and the VMM's boot tables.
                let tables = TableFrames::new(&[pt_zone, layout::BOOT_TABLES]);
                Some(ShadowState::new(slot, hva, coherence, cpu, tables))
            }
            None => None,
        };
        Ok(VmCore {
            _kvm: kvm,
            vm,
            vcpu,
            shadow,
            map,
            ram,
            serial: new_serial(console),
            diag: ConsoleSink::new(Box::new(std::io::stderr())),
            config,
            epoch,
            bench_start: None,
            cpu,
            explain_prints: Limited::new("EXPLAIN outputs", crate::limits::MAX_EXPLAIN_PRINTS),
            warnings: Limited::new("warnings about refused shadow-MMU requests", crate::limits::MAX_WARNINGS),
        })
    }

    /// `KVM_TRANSLATE` of `gva` with the vCPU's current CR3: the GPA, or
    /// `None` when KVM says it is not mapped.
    pub fn kvm_translate(&self, gva: u64) -> Result<Option<u64>> {
        let t = self.vcpu.translate_gva(gva).map_err(kvm_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    /// Point the vCPU's CR3 at `cr3` (for tools and tests that walk their
    /// own tables; the guest is not running).
    pub fn set_cr3(&mut self, cr3: u64) -> Result<()> {
        let mut sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs.cr3 = cr3;
        self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
    }

    /// The vCPU's paging controls as the shadow walker takes them.
    pub fn paging_mode(&self) -> Result<shadow::PagingMode> {
        let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let rflags = self.vcpu.sync_regs().regs.rflags;
        Ok(match &self.shadow {
            Some(sh) => sh.guest_mode(&sregs, rflags),
            None => PagingMode {
                pdpe1gb: self.cpu.pdpe1gb,
                amd: self.cpu.amd,
                ..paging_mode(&sregs, rflags, self.cpu.maxphyaddr)
            },
        })
    }

    /// The translation chain of `gva` in the guest's current address space.
    pub fn explain(&self, gva: u64) -> Result<Explanation> {
        let hw_cr3 = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?.cr3;
        // In shadow mode the vCPU's CR3 is the shadow root; the guest's own
        // root is the one the shadow MMU shadows.
        let cr3 = self.shadow.as_ref().and_then(|s| s.mmu.guest_cr3()).unwrap_or(hw_cr3);
        let mem = self.ram.memory();
        let walk = ept::walk::walk(cr3, gva, |gpa| mem.read_obj::<u64>(GuestAddress(gpa)).ok());
        let mut e = Explanation {
            gva,
            cr3,
            mmu: self.config.mmu.name(),
            walk,
            slot: None,
            hva: None,
            host: None,
            host_error: None,
            cost: None,
            kvm_translate: None,
            shadow_leaf: None,
            shadow_root: None,
        };
        if let (Some(sh), Some(pool_mem)) = (self.shadow.as_ref(), self.ram.pool()) {
            let pool = sh.pool(pool_mem);
            e.shadow_root = sh.mmu.current_root();
            e.shadow_leaf = sh.mmu.shadow_leaf(&pool, gva);
        }
        if let ept::walk::WalkEnd::Mapped { gpa, page_size } = e.walk.end {
            e.slot = self.map.slot_of(gpa).copied();
            e.hva = self.ram.hva(&self.map, gpa);
            let hugetlb = match self.config.backing {
                Backing::Hugetlb(s) => Some(s.bytes()),
                _ => None,
            };
            let mut host_page = hugetlb.unwrap_or(4096);
            if let Some(hva) = e.hva {
                match ept::pagemap::host_page(hva, hugetlb) {
                    Ok(h) => {
                        if let ept::pagemap::HostPage::Present { page_size, .. } = h {
                            host_page = page_size;
                        }
                        e.host = Some(h);
                    }
                    Err(err) => e.host_error = Some(err.to_string()),
                }
            }
            e.cost = Some(ept::walk::walk_cost(page_size, host_page));
        }
        e.kvm_translate = self.translate_without_side_effects(hw_cr3, cr3, gva);
        Ok(e)
    }

    /// Read a page-table entry at `gpa` in guest RAM or the shadow pool.
    fn read_table_entry(&self, gpa: u64) -> Option<u64> {
        let mem = self.ram.memory();
        mem.read_obj::<u64>(GuestAddress(gpa))
            .ok()
            .or_else(|| self.ram.pool().and_then(|p| p.read_obj::<u64>(GuestAddress(gpa)).ok()))
    }

    /// `KVM_TRANSLATE` of `gva`, leaving the page tables as they were.
    ///
    /// KVM's software walker sets the accessed bit in every entry it walks
    /// through (Intel SDM Vol. 3A §4.8: a walk sets A), so a bare
    /// `KVM_TRANSLATE` would change what `--explain` explains — and what
    /// the guest's page aging sees. The entries on both walk paths (the
    /// guest's tables from `guest_cr3`, and the tables the vCPU really
    /// walks from `hw_cr3`: the shadow tables in shadow mode) are saved
    /// first and any that changed are written back. The guest is not
    /// running (this runs between exits or after the run), and
    /// `KVM_TRANSLATE` installs no translation, so nothing can have used
    /// the bit it set.
    fn translate_without_side_effects(&self, hw_cr3: u64, guest_cr3: u64, gva: u64) -> Option<u64> {
        let mut saved = Vec::new();
        for root in [guest_cr3, hw_cr3] {
            let w = ept::walk::walk(root, gva, |gpa| self.read_table_entry(gpa));
            for st in &w.steps {
                let at = st.table_gpa.wrapping_add(st.index * 8);
                saved.push((at, st.entry));
            }
        }
        let t = match self.vcpu.translate_gva(gva) {
            Ok(t) if t.valid != 0 => Some(t.physical_address),
            _ => None,
        };
        for (at, old) in saved {
            if self.read_table_entry(at).is_some_and(|now| now != old) {
                let mem = self.ram.memory();
                let wrote = mem.write_obj(old, GuestAddress(at)).is_ok()
                    || self.ram.pool().is_some_and(|p| p.write_obj(old, GuestAddress(at)).is_ok());
                if !wrote {
                    log::debug!("cannot restore the page-table entry at {at:#x} after KVM_TRANSLATE");
                }
            }
        }
        t
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
        stats.warnings_suppressed =
            self.warnings.suppressed() + self.shadow.as_ref().map_or(0, |s| s.warnings.suppressed());
        stats.run_time = started.elapsed();
        self.serial.writer_mut().drain();
        stats.huge_backed = self.ram.huge_backed_bytes().ok();
        stats.shadow = self.shadow.as_ref().map(|s| s.report());
        stats.guest_boot_cycles = reports.iter().find_map(|r| match r {
            Report::Boot { boot_cycles, .. } => Some(*boot_cycles),
            _ => None,
        });
        RunOutcome { end, stats, reports }
    }

    /// Snapshot the counters at a workload's `BENCH_BEGIN`; turn the
    /// difference into a [`BenchPhase`] at its `BENCH`.
    fn bench_marker(&mut self, stats: &mut RunStats, report: Option<&Report>) {
        let shadow_now = self.shadow.as_ref().map(|s| (s.mmu.stats(), s.times.total()));
        match report {
            Some(Report::BenchBegin { .. }) => {
                self.bench_start = Some((Instant::now(), stats.exits.clone(), shadow_now));
            }
            Some(Report::Bench { name, ops, cycles, ok }) => {
                let Some((t0, exits0, shadow0)) = self.bench_start.take() else { return };
                let mut exits = BTreeMap::new();
                for (reason, n) in &stats.exits {
                    let d = n - exits0.get(reason).copied().unwrap_or(0);
                    if d > 0 {
                        exits.insert(*reason, d);
                    }
                }
                // The closing REPORT is the measurement's own exit.
                if let Some(h) = exits.get_mut("io-out:hypercall") {
                    *h -= 1;
                    if *h == 0 {
                        exits.remove("io-out:hypercall");
                    }
                }
                let (shadow, shadow_handler_time) = match (shadow0, shadow_now) {
                    (Some((s0, t0)), Some((s1, t1))) => (Some(s1.since(&s0)), Some(t1.saturating_sub(t0))),
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

    /// Whether an MMIO write at `gpa` is a trapped guest page-table write.
    fn is_pt_zone_write(&self, gpa: u64) -> bool {
        self.shadow.is_some()
            && self.map.slot_of(gpa).is_some_and(|s| s.readonly && s.kind == ept::RegionKind::PageTables)
    }

    fn page_table_write(&mut self, gpa: u64, data: &[u8]) {
        let Some(sh) = self.shadow.as_mut() else { return };
        let mem = self.ram.memory();
        let pool_mem = self.ram.pool().expect("shadow mode has a pool");
        let mut ram = MemWindow::ram(mem, self.config.memory);
        let mut pool = sh.pool(pool_mem);
        sh.pte_write(&mut ram, &mut pool, gpa, data);
    }

    /// The shadow-mode hypercalls; `None` when `nr` is not one, or in ept
    /// mode (the generic handler then answers `ERR_UNAVAILABLE`).
    fn shadow_hypercall(&mut self, nr: u32, r: &kvm_bindings::kvm_regs) -> Result<Option<u64>> {
        use guest_abi::hypercall as hc;
        let Some(sh) = self.shadow.as_mut() else { return Ok(None) };
        let mem = self.ram.memory();
        let pool_mem = self.ram.pool().expect("shadow mode has a pool");
        if matches!(nr, hc::SHADOW_FAULT | hc::LOAD_CR3 | hc::FLUSH_TLB) {
            // The guest may have written the pool through tables of its own.
            sh.check_pool(&self.vm, pool_mem).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            sh.mmu.set_prefill_hints(&fault_path_gvas(&self.vcpu.sync_regs().sregs, r));
        }
        let pool_exhausted = |cr3: u64| Error::ShadowPoolExhausted { pool: self.config.shadow_pool, cr3 };
        let mut ram = MemWindow::ram(mem, self.config.memory);
        let mut pool = sh.pool(pool_mem);
        match nr {
            hc::SHADOW_FAULT => {
                let root_before = sh.mmu.current_root();
                let vcpu_sregs = self.vcpu.sync_regs().sregs;
                if sh.note_vcpu_efer(vcpu_sregs.efer) {
                    // The guest cleared EFER.NXE since the last exit: this
                    // error code cannot tell a fetch from a read. Give the
                    // vCPU its NXE back and let the access retry.
                    let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                    let mode = sh.guest_mode(&sregs, r.rflags);
                    sh.mmu.set_mode(&mut pool, &mut ram, mode);
                    let mut sregs = sh.vcpu_sregs(sregs);
                    if let Some(root) = sh.mmu.current_root() {
                        sregs.cr3 = root;
                    }
                    self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                    return Ok(Some(hc::FAULT_FIXED));
                }
                // SMAP checks the faulting context's RFLAGS.AC (passed in
                // rcx), not the handler's.
                let mode = sh.guest_mode(&vcpu_sregs, crate::shadow_mode::fault_rflags(r.rcx, r.rflags));
                let result = sh.fault(&mut ram, &mut pool, r.rdi, r.rsi, mode).map_err(|e| match e {
                    shadow::ShadowError::PoolTooSmall => pool_exhausted(sh.mmu.guest_cr3().unwrap_or(0)),
                    e => Error::ShadowMmu(e, r.rip),
                })?;
                // Pool exhaustion zaps everything and may rebuild the root in
                // another pool page: the vCPU must follow it.
                if let Some(root) = sh.mmu.current_root()
                    && Some(root) != root_before
                {
                    let mut sregs = sh.vcpu_sregs(self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?);
                    sregs.cr3 = root;
                    self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                }
                Ok(Some(result))
            }
            hc::LOAD_CR3 => {
                let t = Instant::now();
                let root_gpa = r.rdi;
                if !ram.is_ram_page(root_gpa) {
                    return Ok(Some(hc::ERR_FAULT));
                }
                let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                sh.note_vcpu_efer(sregs.efer);
                sh.mmu.set_mode(&mut pool, &mut ram, sh.guest_mode(&sregs, r.rflags));
                let root = match sh.mmu.load_cr3(&mut pool, &mut ram, root_gpa) {
                    Ok(root) => root,
                    Err(shadow::ShadowError::PoolTooSmall) => return Err(pool_exhausted(root_gpa)),
                    Err(e) => {
                        // A root outside the page-table zone (its changes
                        // would not trap: shadow::mmu invariant 6) is the
                        // guest's mistake; anything else is logged (bounded).
                        // Either way the guest stays on its old root, which a
                        // rule change above may have rebuilt elsewhere.
                        let answer = if let shadow::ShadowError::RootNotTrapped(_) = e {
                            hc::ERR_FAULT
                        } else {
                            if self.warnings.allow() {
                                log::warn!("LOAD_CR3({root_gpa:#x}) failed: {e}");
                            }
                            hc::ERR_UNAVAILABLE
                        };
                        if let Some(root) = sh.mmu.current_root() {
                            let mut sregs = sh.vcpu_sregs(sregs);
                            sregs.cr3 = root;
                            self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                        }
                        return Ok(Some(answer));
                    }
                };
                let mut sregs = sh.vcpu_sregs(sregs);
                sregs.cr3 = root;
                self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                sh.times.load_cr3 += t.elapsed();
                Ok(Some(hc::OK))
            }
            hc::FLUSH_TLB => {
                // The guest may have changed CR0.WP, EFER.NXE or CR4: a new
                // rule set rebuilds the shadow (at a new root), and a CR3
                // reload is the TLB flush anyway.
                let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                // FLUSH_TLB(cr0, efer): the guest's CR0 and EFER after it
                // changed paging controls (0: unchanged). Its WP and NXE are
                // the guest's own; the vCPU keeps WP = 1 and NXE = 1 (see
                // ShadowState::guest_wp, guest_nxe).
                sh.note_vcpu_efer(sregs.efer);
                sh.note_guest_controls(r.rdi, r.rsi);
                sh.mmu.set_mode(&mut pool, &mut ram, sh.guest_mode(&sregs, r.rflags));
                sh.mmu.flush();
                let mut sregs = sh.vcpu_sregs(sregs);
                if let Some(root) = sh.mmu.current_root() {
                    sregs.cr3 = root;
                }
                self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                Ok(Some(hc::OK))
            }
            _ => Ok(None),
        }
    }

    /// Before the guest runs again: if a shadow mapping was removed or
    /// restricted, make the host forget its copy (see `shadow_mode`).
    fn restore_host_coherence(&mut self) -> Result<()> {
        let Some(sh) = self.shadow.as_mut() else { return Ok(()) };
        if !sh.mmu.host_stale() {
            return Ok(());
        }
        let t = Instant::now();
        match sh.coherence {
            Coherence::ReregisterPoolSlot => {
                // Deleting the slot drops its dirty log: collect it first.
                let pool_mem = self.ram.pool().expect("shadow mode has a pool");
                sh.check_pool(&self.vm, pool_mem).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                let mut region = kvm_bindings::kvm_userspace_memory_region {
                    slot: sh.pool_slot.slot,
                    flags: sh.pool_slot.kvm_flags(),
                    guest_phys_addr: sh.pool_slot.gpa,
                    memory_size: 0,
                    userspace_addr: sh.pool_hva,
                };
                // SAFETY: deleting the pool slot, then adding it back over
                // the same host mapping, which the GuestRam keeps alive.
                unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
                region.memory_size = sh.pool_slot.len;
                // SAFETY: as above.
                unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            }
            Coherence::ReloadCr3 => {
                // KVM flushes the guest TLB on KVM_SET_SREGS only when a
                // paging control really changes: toggle CR4.PGE and back
                // (a PGE change flushes everything, global entries too).
                let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                let toggled = kvm_bindings::kvm_sregs { cr4: sregs.cr4 ^ (1 << 7), ..sregs };
                self.vcpu.set_sregs(&toggled).map_err(kvm_err("KVM_SET_SREGS"))?;
                self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            }
        }
        sh.mmu.host_invalidated();
        sh.times.invalidate += t.elapsed();
        Ok(())
    }

    /// `EXPLAIN(gva)`: print the chain to stderr now (the first
    /// [`crate::limits::MAX_EXPLAIN_PRINTS`] of a run; the rest are only
    /// counted); answer the GPA, or `ERR_FAULT` when the address is not
    /// mapped.
    fn explain_hypercall(&mut self, gva: u64) -> u64 {
        match self.explain(gva) {
            Ok(e) => {
                if self.explain_prints.allow() {
                    // Through the diagnostics queue: a blocked stderr must
                    // not block the vCPU thread.
                    let _ = self.diag.write_all(e.render().as_bytes());
                    self.diag.drain();
                }
                e.gpa().unwrap_or(guest_abi::hypercall::ERR_FAULT)
            }
            Err(err) => {
                if self.warnings.allow() {
                    log::warn!("EXPLAIN({gva:#x}) failed: {err}");
                }
                guest_abi::hypercall::ERR_FAULT
            }
        }
    }

    fn rip(&self) -> u64 {
        self.vcpu.sync_regs().regs.rip
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
            self.restore_host_coherence()?;
            let action = match self.vcpu.run() {
                Ok(exit) => Action::from_exit(exit, &mut self.serial),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    stats.exit("interrupted");
                    continue;
                }
                Err(e) => return Err(Error::Kvm { what: "KVM_RUN", source: e }),
            };
            match action {
                Action::SerialOut => {
                    stats.exit("io-out:serial");
                    self.serial.writer_mut().drain();
                }
                Action::SerialIn => stats.exit("io-in:serial"),
                Action::ExitDevice(value) => {
                    stats.exit("io-out:exit");
                    return Ok(GuestExit { value, status: exit_status(value) });
                }
                Action::Hypercall(nr) => {
                    stats.exit("io-out:hypercall");
                    stats.hypercall(guest_abi::hypercall::name(nr));
                    let r = self.vcpu.sync_regs().regs;
                    let result = if nr == guest_abi::hypercall::EXPLAIN {
                        self.explain_hypercall(r.rdi)
                    } else if let Some(res) = self.shadow_hypercall(nr, &r)? {
                        res
                    } else {
                        let mut ctx = HypercallContext {
                            mem: self.ram.memory(),
                            ram: self.config.memory,
                            epoch: self.epoch,
                            reports,
                            budget,
                        };
                        hypercall::handle(&mut ctx, nr, [r.rdi, r.rsi, r.rcx, r.r8])
                    };
                    self.vcpu.sync_regs_mut().regs.rax = result;
                    self.vcpu.set_sync_dirty_reg(SyncReg::Register);
                    if nr == guest_abi::hypercall::REPORT && result == guest_abi::hypercall::OK {
                        self.bench_marker(stats, reports.last());
                    }
                }
                Action::OtherIoOut(port) => {
                    stats.exit("io-out:unclaimed");
                    log::debug!("guest wrote to unclaimed port {port:#x}; ignored");
                }
                Action::OtherIoIn(port) => {
                    stats.exit("io-in:unclaimed");
                    log::debug!("guest read unclaimed port {port:#x}; reads as all ones");
                }
                Action::MmioWrite(addr, data, len) if self.is_pt_zone_write(addr) => {
                    stats.exit("mmio-write:page-table");
                    self.page_table_write(addr, &data[..len]);
                }
                Action::MmioWrite(addr, _, _) => {
                    stats.exit("mmio-write");
                    log::debug!("guest wrote unbacked GPA {addr:#x}");
                }
                Action::Mmio(addr, write) => {
                    // No device lives outside RAM: reads see all ones, writes vanish.
                    stats.exit(if write { "mmio-write" } else { "mmio-read" });
                    log::debug!("guest {} unbacked GPA {addr:#x}", if write { "wrote" } else { "read" });
                }
                Action::Hlt => {
                    stats.exit("hlt");
                    // No device of this VM ever raises an interrupt, so a
                    // halt never ends either way; but say which halt it was
                    // (RFLAGS.IF, bit 9: `sti; hlt` waits for an interrupt).
                    let regs = self.vcpu.sync_regs().regs;
                    if regs.rflags & (1 << 9) != 0 {
                        return Err(Error::GuestIdle { rip: regs.rip });
                    }
                    return Err(Error::GuestHalted { rip: regs.rip });
                }
                Action::Shutdown => {
                    stats.exit("shutdown");
                    return Err(Error::TripleFault { rip: self.rip() });
                }
                Action::InternalError => {
                    stats.exit("internal-error");
                    return Err(self.internal_error());
                }
                Action::FailEntry(reason) => {
                    stats.exit("fail-entry");
                    return Err(Error::FailEntry(reason));
                }
                Action::Other(what) => {
                    stats.exit("unexpected");
                    return Err(Error::UnexpectedExit { what, rip: self.rip() });
                }
            }
        }
    }

    /// Describe a `KVM_EXIT_INTERNAL_ERROR`; for an emulation failure,
    /// include the instruction bytes at `rip`.
    fn internal_error(&mut self) -> Error {
        let rip = self.rip();
        let run = self.vcpu.get_kvm_run();
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
            let Ok(t) = self.vcpu.translate_gva(va) else { break };
            if t.valid == 0 {
                break;
            }
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let n = in_page.min(15 - out.len());
            let mut buf = vec![0u8; n];
            if self.ram.memory().read_slice(&mut buf, GuestAddress(t.physical_address)).is_err() {
                break;
            }
            out.extend_from_slice(&buf);
        }
        out
    }
}

/// What to do about an exit, with the data copied out of `kvm_run` so the
/// vCPU can be borrowed again. Port reads are answered in place (the data
/// slice is KVM's I/O data area), serial writes go to the UART directly.
enum Action {
    SerialOut,
    SerialIn,
    ExitDevice(u8),
    Hypercall(u32),
    OtherIoOut(u16),
    OtherIoIn(u16),
    Mmio(u64, bool),
    MmioWrite(u64, [u8; 8], usize),
    Hlt,
    Shutdown,
    InternalError,
    FailEntry(u64),
    Other(String),
}

impl Action {
    fn from_exit(exit: VcpuExit<'_>, serial: &mut GuestSerial) -> Action {
        let uart = SERIAL_COM1..SERIAL_COM1 + SERIAL_PORT_COUNT;
        match exit {
            VcpuExit::IoOut(port, data) if uart.contains(&port) => {
                // `rep outsb` delivers a whole string in one exit.
                for b in data {
                    // The sink never fails and NoInterrupt cannot either.
                    let _ = serial.write((port - SERIAL_COM1) as u8, *b);
                }
                Action::SerialOut
            }
            VcpuExit::IoOut(EXIT_DEVICE, data) => Action::ExitDevice(data.first().copied().unwrap_or(0)),
            VcpuExit::IoOut(HYPERCALL, data) => {
                let mut nr = [0u8; 4];
                for (d, s) in nr.iter_mut().zip(data) {
                    *d = *s;
                }
                Action::Hypercall(u32::from_le_bytes(nr))
            }
            VcpuExit::IoOut(port, _) => Action::OtherIoOut(port),
            VcpuExit::IoIn(port, data) if uart.contains(&port) => {
                for d in data.iter_mut() {
                    *d = serial.read((port - SERIAL_COM1) as u8);
                }
                Action::SerialIn
            }
            VcpuExit::IoIn(port, data) => {
                data.fill(0xff);
                Action::OtherIoIn(port)
            }
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0xff);
                Action::Mmio(addr, false)
            }
            VcpuExit::MmioWrite(addr, data) => {
                let mut bytes = [0u8; 8];
                let len = data.len().min(8);
                bytes[..len].copy_from_slice(&data[..len]);
                Action::MmioWrite(addr, bytes, len)
            }
            VcpuExit::Hlt => Action::Hlt,
            VcpuExit::Shutdown => Action::Shutdown,
            VcpuExit::InternalError => Action::InternalError,
            VcpuExit::FailEntry(reason, _cpu) => Action::FailEntry(reason),
            other => Action::Other(format!("{other:?}")),
        }
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) handler of the signal that kicks the vCPU out of
/// `KVM_RUN`; without it the signal would kill the process.
fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            log::warn!("cannot install the vCPU kick handler: {e}; --timeout may not interrupt a busy guest");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // These check what ends a run, not how fast: the bounds are far from
    // the expected times and only catch a wait for the full timeout.

    #[test]
    fn a_panic_on_the_vcpu_thread_is_reported_at_once_with_its_message() {
        let start = Instant::now();
        let r = supervise(
            "vcpu-test",
            Duration::from_secs(120),
            VCPU_STOP_GRACE,
            || {},
            || -> u32 { panic!("shadow walk hit an impossible entry") },
        );
        match r {
            Supervised::Panicked(msg) => assert_eq!(msg, "shadow walk hit an impossible entry"),
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(60), "reported at the timeout, not at once");
    }

    #[test]
    fn a_thread_that_ignores_the_timeout_is_left_behind() {
        let start = Instant::now();
        let told = Arc::new(AtomicBool::new(false));
        let t = told.clone();
        // A handler that runs far past the deadline and never looks at it.
        let r = supervise(
            "vcpu-test",
            Duration::from_millis(200),
            Duration::from_millis(200),
            move || t.store(true, Ordering::SeqCst),
            || std::thread::sleep(Duration::from_secs(600)),
        );
        assert!(matches!(r, Supervised::Stuck), "{r:?}");
        assert!(told.load(Ordering::SeqCst), "on_timeout ran");
        assert!(start.elapsed() < Duration::from_secs(300), "waited for the handler");
    }

    #[test]
    fn a_thread_that_stops_when_told_is_done() {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let r = supervise(
            "vcpu-test",
            Duration::from_millis(100),
            Duration::from_secs(60),
            move || s.store(true, Ordering::SeqCst),
            move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                7
            },
        );
        assert!(matches!(r, Supervised::Done(7)), "{r:?}");
    }

    #[test]
    fn the_refused_command_line_word_is_named() {
        let exit = |value| GuestExit { value, status: exit_status(value) };
        let base = guest_abi::ports::EXIT_BAD_CMDLINE;
        assert_eq!(exit(base + 1).refused_cmdline_word("test= worklaod=fault"), Some("worklaod=fault".into()));
        assert_eq!(exit(guest_abi::ports::EXIT_FAILURE).refused_cmdline_word("x"), None);
        assert_eq!(exit(guest_abi::ports::EXIT_SUCCESS).refused_cmdline_word("x"), None);
    }
}
