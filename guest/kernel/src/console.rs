//! The console: the 16550 UART at COM1, formatted with `ufmt`.
//!
//! Output goes out with `rep outsb`. On a host with hardware virtualisation
//! KVM turns a whole string into one exit; under KVM's instruction emulator
//! (these machines, docs/host.md) each byte is its own exit (about 9 µs), so keep
//! in-guest output short. No line discipline, no locking: the kernel is
//! single-threaded and runs with interrupts off.

use core::convert::Infallible;
use guest_abi::ports::SERIAL_COM1;

/// The console writer; zero-sized, any number may exist.
pub struct Console;

impl ufmt::uWrite for Console {
    type Error = Infallible;

    fn write_str(&mut self, s: &str) -> Result<(), Infallible> {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Write raw bytes to the UART.
pub fn write_bytes(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: `rep outsb` reads `rcx` bytes from `rsi` (a valid slice) and
    // writes them to the UART's data port; it touches no other memory.
    unsafe {
        core::arch::asm!(
            "rep outsb",
            in("dx") SERIAL_COM1,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly)
        );
    }
}

/// Print a line.
pub fn println(s: &str) {
    write_bytes(s.as_bytes());
    write_bytes(b"\n");
}

/// `uwriteln!` to the console, ignoring the (infallible) result.
#[macro_export]
macro_rules! kprintln {
    ($($arg:tt)*) => {{
        let _ = ufmt::uwriteln!($crate::console::Console, $($arg)*);
    }};
}

/// `uwrite!` to the console, ignoring the (infallible) result.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => {{
        let _ = ufmt::uwrite!($crate::console::Console, $($arg)*);
    }};
}
