//! Opening KVM, with the errors a user can act on.

use crate::error::{Error, Result};
use kvm_ioctls::{Cap, Kvm};
use std::ffi::CString;

/// Environment variable naming another KVM device node (for tests of the
/// error paths; normally unset).
pub const KVM_DEVICE_ENV: &str = "VMM_KVM_DEVICE";

/// The KVM API version this VMM speaks.
pub const KVM_API_VERSION: i32 = 12;

/// Map the errno of a failed `open("/dev/kvm")` to the error to report.
pub fn open_error(err: kvm_ioctls::Error) -> Error {
    match err.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(err),
    }
}

/// Open `/dev/kvm` (or `$VMM_KVM_DEVICE`) and check the API version and
/// the capabilities the VMM relies on.
pub fn open() -> Result<Kvm> {
    let kvm = match std::env::var(KVM_DEVICE_ENV) {
        Ok(path) => {
            let c = CString::new(path).map_err(|_| Error::KvmMissing)?;
            Kvm::new_with_path(&c)
        }
        Err(_) => Kvm::new(),
    }
    .map_err(open_error)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::KvmApiVersion(version));
    }
    if !kvm.check_extension(Cap::UserMemory) {
        return Err(Error::KvmCapability("KVM_CAP_USER_MEMORY"));
    }
    if !kvm.check_extension(Cap::SyncRegs) {
        return Err(Error::KvmCapability("KVM_CAP_SYNC_REGS"));
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_an_actionable_error() {
        let e = |n| open_error(kvm_ioctls::Error::new(n));
        assert!(matches!(e(libc::ENOENT), Error::KvmMissing));
        assert!(matches!(e(libc::EACCES), Error::KvmPermission));
        assert!(matches!(e(libc::EPERM), Error::KvmPermission));
        assert!(matches!(e(libc::EMFILE), Error::KvmOpen(_)));
        assert!(e(libc::EACCES).to_string().contains("kvm' group"));
    }
}
