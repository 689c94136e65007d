//! I/O ports the guest uses to talk to the VMM (docs/architecture.md, "Ports").

/// 16550 UART (COM1): the guest's console.
pub const SERIAL_COM1: u16 = 0x3f8;
/// Number of consecutive ports the UART decodes.
pub const SERIAL_PORT_COUNT: u16 = 8;

/// Exit device with QEMU `isa-debug-exit` semantics: writing `v` ends the
/// VM with status `(v << 1) | 1`.
pub const EXIT_DEVICE: u16 = 0xf4;
/// The value the guest writes to [`EXIT_DEVICE`] for success (status 33).
pub const EXIT_SUCCESS: u8 = 0x10;
/// The value the guest writes to [`EXIT_DEVICE`] for a failure (test
/// failure, unhandled exception, panic).
pub const EXIT_FAILURE: u8 = 0x11;
/// The guest refused word `i` of its command line (a typo, an unknown
/// word, a bad value): it writes `EXIT_BAD_CMDLINE + i` (`i` clamped to
/// [`MAX_CMDLINE_WORD_INDEX`]) and the VMM names the word.
pub const EXIT_BAD_CMDLINE: u8 = 0x20;
/// The largest word index [`EXIT_BAD_CMDLINE`] can carry.
pub const MAX_CMDLINE_WORD_INDEX: u8 = 0x1f;

/// The status the VMM derives from a write of `v` to [`EXIT_DEVICE`].
pub const fn exit_status(v: u8) -> u32 {
    ((v as u32) << 1) | 1
}

/// Hypercall port. The guest executes `out dx, eax` with `dx` = this port
/// and `eax` = the hypercall number; see [`crate::hypercall`].
pub const HYPERCALL: u16 = 0x500;
