//! Sending report records to the VMM (the `REPORT` hypercall).
//!
//! One static buffer in the kernel image holds the record being sent: a
//! `ReportHeader` followed by the payload parts, copied in. The VMM reads it
//! during the hypercall and copies it out, so the buffer is free again when
//! [`send`] returns. The buffer is behind an interrupt-safe lock (second in
//! the lock order of [`crate::sync`]): no two sends overlap, on any CPU.

use crate::{boot, hypercall};
use guest_abi::report::{
    BenchRecord, BootRecord, CalibrationRecord, MAX_REPORT_LEN, MatrixChunk, REPORT_MAGIC, ReportHeader, TestRecord,
};

const HEADER: usize = core::mem::size_of::<ReportHeader>();

#[repr(C, align(8))]
struct Buffer([u8; MAX_REPORT_LEN as usize]);

static BUFFER: crate::sync::IrqSpinLock<Buffer> = crate::sync::IrqSpinLock::new(Buffer([0; MAX_REPORT_LEN as usize]));

/// A plain record: `#[repr(C)]`, integer fields only, no padding bytes
/// left uninitialised, so its bytes are its wire format.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Plain: Copy {}

// SAFETY: each is #[repr(C)] with only integer fields and explicit
// reserved fields instead of padding (guest/abi).
unsafe impl Plain for BootRecord {}
// SAFETY: as above.
unsafe impl Plain for CalibrationRecord {}
// SAFETY: as above.
unsafe impl Plain for BenchRecord {}
// SAFETY: as above.
unsafe impl Plain for TestRecord {}
// SAFETY: as above.
unsafe impl Plain for MatrixChunk {}
// SAFETY: an integer.
unsafe impl Plain for u16 {}

/// The bytes of a plain record (or a slice of them).
pub fn bytes_of<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `T: Plain` has no uninitialised bytes and any alignment is
    // fine for u8; the slice borrows `v`.
    unsafe { core::slice::from_raw_parts(v.as_ptr().cast::<u8>(), core::mem::size_of_val(v)) }
}

/// Send one record of `kind` whose payload is `parts` concatenated.
pub fn send(kind: u32, parts: &[&[u8]]) -> Result<(), &'static str> {
    match send_repeatedly(kind, parts, 1) {
        (_, 0) => Ok(()),
        _ => Err("the VMM refused a report record"),
    }
}

/// Build one record and send it `times` times (a flood, for the VMM's
/// bounds); returns how many the VMM accepted and refused. A record too
/// long for the buffer counts as refused every time.
pub fn send_repeatedly(kind: u32, parts: &[&[u8]], times: u64) -> (u64, u64) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if HEADER + len > MAX_REPORT_LEN as usize {
        return (0, times);
    }
    let mut guard = BUFFER.lock();
    let buf = &mut guard.0;
    let header = ReportHeader { magic: REPORT_MAGIC, kind, len: len as u32, reserved: 0 };
    buf[..4].copy_from_slice(&header.magic.to_le_bytes());
    buf[4..8].copy_from_slice(&header.kind.to_le_bytes());
    buf[8..12].copy_from_slice(&header.len.to_le_bytes());
    buf[12..16].copy_from_slice(&header.reserved.to_le_bytes());
    let mut at = HEADER;
    for p in parts {
        buf[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    let gpa = boot::kernel_va_to_gpa(buf.as_ptr() as u64);
    let mut refused = 0;
    for _ in 0..times {
        refused += u64::from(guest_abi::hypercall::is_error(hypercall::report(gpa, at as u64)));
    }
    (times - refused, refused)
}
