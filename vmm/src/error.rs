//! The VMM's errors: one variant per failure, each message saying what
//! failed and with what, and each mapped to a documented exit code.

use std::path::PathBuf;

/// `map_err` for a KVM ioctl: the error names the ioctl.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Exit codes of the `vmm` binary (also listed in `--help` and the README).
pub mod exit_code {
    /// The guest ended with the success status.
    pub const SUCCESS: i32 = 0;
    /// The guest ended with a failure status (a failed test, a panic, an
    /// unhandled exception).
    pub const GUEST_FAILURE: i32 = 1;
    /// Bad command-line usage (clap's convention).
    pub const USAGE: i32 = 2;
    /// The VM could not be set up: KVM, the kernel image, memory.
    pub const SETUP: i32 = 3;
    /// The guest crashed the vCPU: triple fault, an instruction the host
    /// cannot emulate, an unexpected exit.
    pub const GUEST_CRASH: i32 = 4;
    /// `--timeout` expired.
    pub const TIMEOUT: i32 = 5;
}

/// Everything that can go wrong in the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd, or run on a host that has it)")]
    KvmMissing,
    #[error("no permission to open /dev/kvm: run as root or add your user to the 'kvm' group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a capability the VMM needs: {0}")]
    KvmCapability(&'static str),
    #[error("KVM ioctl {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },

    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {} is {kind}, not a regular file", path.display())]
    KernelNotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "kernel {} is {}, larger than the {} limit (the guest RAM size, at most 1 GiB)",
        path.display(),
        crate::size::format_size(*size),
        crate::size::format_size(*limit)
    )]
    KernelTooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("kernel {0} is not an ELF file")]
    KernelNotElf(String),
    #[error("kernel {name} is not an x86-64 ELF executable: {why}")]
    KernelForeign { name: String, why: String },
    #[error("kernel {name}: segment {index} [{start:#x}-{end:#x}) lies outside guest RAM (0-{ram:#x})")]
    SegmentOutsideRam { name: String, index: usize, start: u64, end: u64, ram: u64 },
    #[error(
        "memory size {} is too small for kernel {name}: segment {index} ends at {end:#x}; use --memory {}M or more",
        crate::size::format_size(*ram),
        needed >> 20
    )]
    MemoryTooSmallForKernel { name: String, index: usize, end: u64, ram: u64, needed: u64 },
    #[error("kernel {name}: segment {index} [{start:#x}-{end:#x}) overlaps the {what} [{what_start:#x}-{what_end:#x})")]
    SegmentOverlap {
        name: String,
        index: usize,
        start: u64,
        end: u64,
        what: &'static str,
        what_start: u64,
        what_end: u64,
    },
    #[error(
        "kernel {name}: its segments span [{start:#x}-{end:#x}), which encloses the {what} [{what_start:#x}-{what_end:#x}); the image must lie in one piece on one side of it"
    )]
    KernelSpanOverlap { name: String, start: u64, end: u64, what: &'static str, what_start: u64, what_end: u64 },
    #[error("kernel {name}: {source}")]
    KernelLoad {
        name: String,
        #[source]
        source: linux_loader::loader::Error,
    },

    #[error("memory size {} is too small: the minimum is {}", crate::size::format_size(*.0), crate::size::format_size(*.1))]
    MemoryTooSmall(u64, u64),
    #[error("memory size {} is too large: the maximum is {}", crate::size::format_size(*.0), crate::size::format_size(*.1))]
    MemoryTooLarge(u64, u64),
    #[error("memory size {} is not a multiple of 2 MiB", crate::size::format_size(*.0))]
    MemoryUnaligned(u64),
    #[error("--vcpus {0}: a VM has 1 to {max} vCPUs", max = guest_abi::MAX_CPUS)]
    BadVcpuCount(u32),
    #[error(
        "--mmu {mode} runs one vCPU (--vcpus {vcpus} was given): pv paging on several vCPUs is not built yet; use --mmu ept or shadow"
    )]
    SmpUnsupported { mode: &'static str, vcpus: u32 },
    #[error(
        "memory size {} is not a multiple of the {} page size of --backing {backing}: use --memory {} (or a multiple of it)",
        crate::size::format_size(*memory),
        crate::size::format_size(*page),
        crate::size::format_size(memory.next_multiple_of(*page)).replace(' ', "").replace("iB", "")
    )]
    MemoryNotPageAligned { memory: u64, page: u64, backing: String },
    #[error("memory map: {0}")]
    MemoryMap(#[from] ept::memmap::MemoryMapError),
    #[error("{0}")]
    Backing(#[from] ept::backing::BackingError),
    #[error(
        "shadow pool of {} is too small: {} guest RAM needs at least {} (the kernel half of every root is shadowed eagerly)",
        crate::size::format_size(*.0),
        crate::size::format_size(*.1),
        crate::size::format_size(*.2)
    )]
    ShadowPoolTooSmall(u64, u64, u64),
    #[error(
        "shadow pool of {} is too large: the maximum is {} (--shadow-pool)",
        crate::size::format_size(*.0),
        crate::size::format_size(*.1)
    )]
    ShadowPoolTooLarge(u64, u64),
    #[error(
        "the shadow pool of {} cannot hold what exception delivery needs of the kernel half of guest CR3 {cr3:#x}, even when emptied: give a larger --shadow-pool",
        crate::size::format_size(*.pool)
    )]
    ShadowPoolExhausted { pool: u64, cr3: u64 },
    #[error("command line is {0} bytes; the maximum is {1}")]
    CmdlineTooLong(usize, usize),
    #[error("guest memory access at {0:#x} failed: {1}")]
    GuestMemory(u64, String),

    #[error("guest triple fault (KVM_EXIT_SHUTDOWN) at rip={rip:#x}")]
    TripleFault { rip: u64 },
    #[error(
        "the host could not emulate the guest instruction at rip={rip:#x} (bytes: {bytes}); KVM internal error, suberror {suberror}"
    )]
    EmulationFailure { rip: u64, bytes: String, suberror: u32 },
    #[error("the guest makes no progress at rip={rip:#x}: `{instruction}` (bytes: {bytes}) {why}")]
    NoProgress { rip: u64, instruction: String, bytes: String, why: String },
    #[error("KVM internal error, suberror {suberror}, at rip={rip:#x}")]
    InternalError { rip: u64, suberror: u32 },
    #[error("KVM could not enter the guest (hardware entry failure reason {0:#x})")]
    FailEntry(u64),
    #[error("unexpected VM exit {what} at rip={rip:#x}")]
    UnexpectedExit { what: String, rip: u64 },
    #[error("the guest halted with interrupts disabled at rip={rip:#x} (it can never resume)")]
    GuestHalted { rip: u64 },
    #[error(
        "the guest halted with interrupts enabled at rip={rip:#x}, waiting for an interrupt, but no device of this VM raises interrupts: it would wait forever"
    )]
    GuestIdle { rip: u64 },
    #[error("timeout: the guest was still running after {}", crate::size::format_duration(*.0))]
    Timeout(std::time::Duration),
    #[error("vCPU {index}: {source}")]
    OnVcpu { index: u32, source: Box<Error> },
    #[error("the vCPU was stopped because another vCPU ended the VM")]
    Stopped,
    #[error(
        "timeout: the guest was still running after {}, and the VMM was still busy handling its last exit; the VM was abandoned",
        crate::size::format_duration(*.0)
    )]
    VcpuStuck(std::time::Duration),
    #[error(
        "timeout: the guest's console output ({unwritten} bytes) could not be written within {}: is the reader of stdout stopped?",
        crate::size::format_duration(*timeout)
    )]
    ConsoleBlocked { timeout: std::time::Duration, unwritten: u64 },
    #[error("the VMM's vCPU thread panicked (a VMM bug; please report it): {0}")]
    VcpuPanicked(String),
    #[error("the guest kernel refused the command-line word '{0}' (its console output above says why)")]
    GuestCmdline(String),
    #[error("the VM is no longer usable: its vCPU thread did not stop after the timeout")]
    VmAbandoned,
    #[error("{0} (rip={1:#x})")]
    ShadowMmu(shadow::ShadowError, u64),
    #[error("the memory map is inconsistent (a VMM bug; please report it): {0}")]
    MemoryMapInconsistent(&'static str),

    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        use Error::*;
        match self {
            OnVcpu { source, .. } => source.exit_code(),
            Stopped => exit_code::GUEST_CRASH,
            TripleFault { .. }
            | EmulationFailure { .. }
            | InternalError { .. }
            | NoProgress { .. }
            | FailEntry(_)
            | UnexpectedExit { .. }
            | GuestHalted { .. }
            | GuestIdle { .. }
            | VcpuPanicked(_)
            | ShadowMmu(..) => exit_code::GUEST_CRASH,
            GuestCmdline(_) | BadVcpuCount(_) | SmpUnsupported { .. } => exit_code::USAGE,
            Timeout(_) | VcpuStuck(_) | ConsoleBlocked { .. } | VmAbandoned => exit_code::TIMEOUT,
            _ => exit_code::SETUP,
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_exhausted_at_run_time_names_the_option_and_is_a_setup_error() {
        let e = Error::ShadowPoolExhausted { pool: 48 << 10, cr3: 0x9000 };
        assert_eq!(
            e.to_string(),
            "the shadow pool of 48 KiB cannot hold what exception delivery needs of the kernel half of guest CR3 0x9000, even when emptied: give a larger --shadow-pool"
        );
        assert_eq!(e.exit_code(), exit_code::SETUP);
    }
}
