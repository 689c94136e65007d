//! Decoding a vCPU exit into what the run loop does about it, with the
//! data copied out of `kvm_run`; the UART's port I/O is done right here.

use crate::devices::serial::GuestSerial;
use guest_abi::ports::{EXIT_DEVICE, HYPERCALL, SERIAL_COM1, SERIAL_PORT_COUNT};
use kvm_ioctls::VcpuExit;

/// What to do about an exit, with the data copied out of `kvm_run` so the
/// vCPU can be borrowed again. Port reads are answered in place (the data
/// slice is KVM's I/O data area), serial writes go to the UART directly.
pub(crate) enum Action {
    SerialOut,
    SerialIn,
    ExitDevice(u8),
    Hypercall(u32),
    OtherIoOut(u16),
    OtherIoIn(u16),
    MmioRead(u64),
    MmioWrite(u64, [u8; 8], usize),
    Hlt,
    Shutdown,
    InternalError,
    FailEntry(u64),
    Other(String),
}

impl Action {
    pub(crate) fn from_exit(exit: VcpuExit<'_>, serial: &mut GuestSerial) -> Action {
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
                Action::MmioRead(addr)
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
