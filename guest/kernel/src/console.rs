//! The console: the 16550 UART at COM1, formatted with `ufmt`.
//!
//! Output goes out with `rep outsb`. On a host with hardware virtualisation
//! KVM turns a whole string into one exit; under KVM's instruction emulator
//! (these machines, docs/host.md) each byte is its own exit (about 9 µs), so keep
//! in-guest output short. No line discipline. Output is serialised across
//! CPUs by `LOCK` (last in the lock order of [`crate::sync`]): one
//! `kprintln!` is one unbroken line. The lock is re-entrant on the CPU that
//! holds it ([`locked`]), so a panic or fault while printing still prints.

use core::convert::Infallible;
use guest_abi::ports::SERIAL_COM1;

static LOCK: crate::sync::IrqSpinLock<()> = crate::sync::IrqSpinLock::new(());

/// Run `f` holding the console lock (at once if this CPU holds it).
pub fn locked<R>(f: impl FnOnce() -> R) -> R {
    if LOCK.held_here() {
        return f();
    }
    let _guard = LOCK.lock();
    f()
}

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
    locked(|| write_raw(bytes));
}

fn write_raw(bytes: &[u8]) {
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
    locked(|| {
        write_bytes(s.as_bytes());
        write_bytes(b"\n");
    });
}

/// `uwriteln!` to the console, ignoring the (infallible) result.
#[macro_export]
macro_rules! kprintln {
    ($($arg:tt)*) => {{
        $crate::console::locked(|| {
            let _ = ufmt::uwriteln!($crate::console::Console, $($arg)*);
        });
    }};
}

/// `uwrite!` to the console, ignoring the (infallible) result.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => {{
        $crate::console::locked(|| {
            let _ = ufmt::uwrite!($crate::console::Console, $($arg)*);
        });
    }};
}
