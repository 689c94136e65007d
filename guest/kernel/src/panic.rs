//! The panic handler: print the location and the static message, then end
//! the VM with the failure status. Formatted messages are not printed
//! (that would need `core::fmt`, which executes SSE instructions here).

use crate::{arch, console, kprint, kprintln};
use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    arch::disable_interrupts();
    console::write_bytes(b"\nPANIC");
    if crate::smp::online_count() > 1 {
        kprint!(" on CPU {}", arch::percpu::cpu_id());
    }
    if let Some(loc) = info.location() {
        kprintln!(" at {}:{}:{}", loc.file(), loc.line(), loc.column());
    } else {
        console::write_bytes(b"\n");
    }
    match info.message().as_str() {
        Some(msg) => kprintln!("  {}", msg),
        None => console::println("  (formatted message not printed: no core::fmt in the guest)"),
    }
    arch::exit(guest_abi::ports::EXIT_FAILURE)
}

/// End the VM with a failure after printing `msg`: for errors whose text
/// is only known at run time (a `panic!` with a non-literal message would
/// need `core::fmt`, which the guest cannot run).
#[track_caller]
pub fn fatal(msg: &str) -> ! {
    arch::disable_interrupts();
    let loc = core::panic::Location::caller();
    if crate::smp::online_count() > 1 {
        kprint!("\nFATAL on CPU {}", arch::percpu::cpu_id());
    } else {
        kprint!("\nFATAL");
    }
    kprintln!(" at {}:{}: {}", loc.file(), loc.line(), msg);
    arch::exit(guest_abi::ports::EXIT_FAILURE)
}
