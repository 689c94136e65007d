//! Building a VM from a [`VmConfig`] (the rust-vmm `vmm-reference` shape):
//! check the configuration, open KVM, build the memory map and register
//! its memslots, load the kernel and write the boot structures, create the
//! vCPUs (with more than one: the in-kernel irqchip first, and each vCPU's
//! own APIC id in its CPUID; vCPU 0 in long mode, the others waiting for
//! the guest's `CPU_ON`), and create the MMU mode's backend
//! ([`create_backend`]: the one place that names every backend).
//!
//! Invariant: guest RAM is one host mapping at GPA `0..memory`, registered
//! as the slots of one `ept::MemoryMap` (plus, in shadow and pv mode, the
//! VMM-private shadow pool), so the guest cannot reach host memory beyond
//! them. The kernel image is untrusted input (`boot::loader` checks it).

use super::config::{BUNDLED_KERNEL, KernelSource, VmConfig, check_memory_size, check_vcpus};
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
    /// long mode, the application processors, and the MMU mode's backend.
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
        check_vcpus(config.vcpus, config.mmu)?;
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
                cpus: config.vcpus,
            },
        )?;

        // Several vCPUs: the in-kernel irqchip (x2APIC, so the guest sends
        // IPIs itself), created before the vCPUs (docs/host.md). One vCPU
        // keeps no irqchip: its `hlt` exits to the VMM as it always has.
        if config.vcpus > 1 {
            vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        }
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpu = GuestCpu::from_cpuid(cpuid.as_slice().iter().map(|e| (e.function, e.eax, e.ebx, e.ecx, e.edx)));
        let fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&vcpu_cpuid(&cpuid, 0, config.vcpus)).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let boot_sregs = regs::long_mode_sregs(sregs, cpu.nx);
        fd.set_sregs(&boot_sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        fd.set_fpu(&regs::reset_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
        fd.set_regs(&regs::entry_regs(kernel.entry)).map_err(kvm_err("KVM_SET_REGS"))?;
        let mut vcpu = VcpuContext::new(fd, 0);
        vcpu.fd_mut().set_sync_valid_reg(SyncReg::Register);
        // The application processors: created now, started by the guest
        // (`CPU_ON`, vm::smp).
        let mut aps = Vec::new();
        for index in 1..config.vcpus {
            let fd = vm.create_vcpu(index as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&vcpu_cpuid(&cpuid, index, config.vcpus)).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let mut ap = VcpuContext::new(fd, index);
            ap.fd_mut().set_sync_valid_reg(SyncReg::Register);
            aps.push(Vcpu::new(ap));
        }
        let smp = (config.vcpus > 1).then(|| std::sync::Arc::new(super::smp::Smp::new(config.vcpus, boot_sregs)));
        let ctx = VmContext::new(vm, ram, map, config.memory, cpu);
        let mut mmu = create_backend(config.mmu, &ctx, &mut vcpu, pt_zone)?;
        if let Some(smp) = &smp {
            let mut ap_ctxs: Vec<&mut VcpuContext> = aps.iter_mut().map(|ap| &mut ap.ctx).collect();
            mmu.add_vcpus(&ctx, &mut ap_ctxs, smp.handles())?;
        }
        let vm = VmState {
            _kvm: kvm,
            ctx,
            mmu,
            serial: new_serial(console),
            diag: ConsoleSink::new(Box::new(std::io::stderr())),
            config,
            epoch,
            explain_prints: Limited::new("EXPLAIN outputs", crate::limits::MAX_EXPLAIN_PRINTS),
            smp,
        };
        Ok(VmCore { vm, vcpu: Vcpu::new(vcpu), aps })
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

/// The CPUID of vCPU `index` of `cpus`: with more than one vCPU, its APIC
/// id in leaf 1 EBX[31:24] and in leaves 0xB and 0x1F EDX (x2APIC id), and
/// the x2APIC feature (leaf 1 ECX[21]) set (Intel SDM vol. 2A, CPUID). One
/// vCPU keeps KVM's supported CPUID as it is.
fn vcpu_cpuid(supported: &kvm_bindings::CpuId, index: u32, cpus: u32) -> kvm_bindings::CpuId {
    let mut cpuid = supported.clone();
    if cpus > 1 {
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
                    e.ecx |= 1 << 21;
                }
                0xb | 0x1f => e.edx = index,
                _ => {}
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vcpu_gets_its_apic_id_and_x2apic() {
        let mut c = kvm_bindings::CpuId::new(3).unwrap();
        c.as_mut_slice()[0].function = 1;
        c.as_mut_slice()[0].ebx = 0xff00_0800;
        c.as_mut_slice()[1].function = 0xb;
        c.as_mut_slice()[2].function = 0x1f;
        let v = vcpu_cpuid(&c, 3, 4);
        assert_eq!(v.as_slice()[0].ebx, 0x0300_0800);
        assert_ne!(v.as_slice()[0].ecx & (1 << 21), 0);
        assert_eq!(v.as_slice()[1].edx, 3);
        assert_eq!(v.as_slice()[2].edx, 3);
        assert_eq!(vcpu_cpuid(&c, 0, 1).as_slice(), c.as_slice(), "one vCPU: unchanged");
    }
}
