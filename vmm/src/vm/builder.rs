//! Building a VM from a [`VmConfig`] (the rust-vmm `vmm-reference` shape):
//! check the configuration, open KVM, build the memory map and register
//! its memslots, load the kernel and write the boot structures, create the
//! vCPU in long mode, and create the MMU mode's backend
//! ([`create_backend`]: the one place that names every backend).
//!
//! Invariant: guest RAM is one host mapping at GPA `0..memory`, registered
//! as the slots of one `ept::MemoryMap` (plus, in shadow and pv mode, the
//! VMM-private shadow pool), so the guest cannot reach host memory beyond
//! them. The kernel image is untrusted input (`boot::loader` checks it).

use super::config::{BUNDLED_KERNEL, KernelSource, VmConfig, check_memory_size};
use super::{VmCore, VmState};
use crate::boot::layout::{self, PT_ZONE_START};
use crate::boot::{bootinfo, gdt, loader, paging, regs};
use crate::devices::serial::{ConsoleSink, new_serial};
use crate::error::{Error, Result, kvm_err};
use crate::limits::Limited;
use crate::mmu::ept::EptBackend;
use crate::mmu::pv::PvBackend;
use crate::mmu::shadow::ShadowBackend;
use crate::mmu::{GuestCpu, MmuBackend, VcpuContext, VmContext, check_config, shadow_pool_size};
use crate::vcpu::Vcpu;
use ept::GuestRam;
use ept::memmap::{GpaRange, MemoryMap, MemoryMapConfig};
use guest_abi::{Gpa, MmuMode};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::SyncReg;
use std::io::Write;
use std::time::Instant;

impl VmCore {
    /// Build the VM of `config`: check it, open KVM, lay out and register
    /// memory, load the kernel and the boot structures, create vCPU 0 in
    /// long mode and the MMU mode's backend.
    pub(super) fn new(config: VmConfig, console: Box<dyn Write + Send>) -> Result<VmCore> {
        check_memory_size(config.memory)?;
        let page = config.backing.alignment();
        if page > 0 && !config.memory.is_multiple_of(page) {
            return Err(Error::MemoryNotPageAligned {
                memory: config.memory,
                page,
                backing: config.backing.to_string(),
            });
        }
        check_config(config.mmu, config.memory, config.shadow_pool)?;
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

        let kvm = super::kvm::open()?;
        let map = MemoryMap::new(&MemoryMapConfig {
            ram_size: config.memory,
            pt_zone,
            boot_tables: layout::BOOT_TABLES,
            shadow_pool: shadow_pool_size(config.mmu, config.shadow_pool),
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
        let mut vcpu = VcpuContext::new(vcpu, 0);
        vcpu.fd_mut().set_sync_valid_reg(SyncReg::Register);
        let ctx = VmContext::new(vm, ram, map, config.memory, cpu);
        let mmu = create_backend(config.mmu, &ctx, &mut vcpu, pt_zone)?;
        let vm = VmState {
            _kvm: kvm,
            ctx,
            mmu,
            serial: new_serial(console),
            diag: ConsoleSink::new(Box::new(std::io::stderr())),
            config,
            epoch,
            explain_prints: Limited::new("EXPLAIN outputs", crate::limits::MAX_EXPLAIN_PRINTS),
        };
        Ok(VmCore { vm, vcpu: Vcpu::new(vcpu) })
    }
}

/// The backend of mode `mmu` for the VM `vm` whose vCPU, RAM and boot
/// tables are set up; `pt_zone` is the page-table zone `[start, end)`.
pub fn create_backend(
    mmu: MmuMode,
    vm: &VmContext,
    vcpu: &mut VcpuContext,
    pt_zone: GpaRange,
) -> Result<Box<dyn MmuBackend>> {
    Ok(match mmu {
        MmuMode::Ept => Box::new(EptBackend::new(vm.cpu())),
        MmuMode::Shadow => Box::new(ShadowBackend::create(vm, vcpu, pt_zone)?),
        MmuMode::Pv => Box::new(PvBackend::create(vm, vcpu, pt_zone)?),
    })
}
