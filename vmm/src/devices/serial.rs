//! The 16550 UART at COM1 (`vm-superio`), writing to a console sink.
//!
//! `vm-superio` writes and flushes its output one byte at a time; the sink
//! here buffers instead and the vCPU loop calls [`ConsoleSink::drain`] after
//! each exit that wrote, so a `rep outsb` string costs one host `write`.
//! The guest runs without interrupts, so the UART's interrupt line goes
//! nowhere ([`NoInterrupt`]).

use std::io::{self, Write};
use vm_superio::{Serial, Trigger};

/// The UART's interrupt line: not connected (the guest polls nothing and
/// runs with interrupts off).
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Buffers what the UART transmits and passes it on in [`Self::drain`].
pub struct ConsoleSink {
    buf: Vec<u8>,
    out: Box<dyn Write + Send>,
}

impl ConsoleSink {
    /// A sink that forwards to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleSink { buf: Vec::with_capacity(4096), out }
    }

    /// Write what was buffered to the output and flush it. Output errors
    /// (a closed pipe) are ignored: the guest's console is best effort and
    /// must not stop the VM.
    pub fn drain(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.out.write_all(&self.buf);
            let _ = self.out.flush();
            self.buf.clear();
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's UART.
pub type GuestSerial = Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleSink>;

/// A UART whose output goes to `out`.
pub fn new_serial(out: Box<dyn Write + Send>) -> GuestSerial {
    Serial::new(NoInterrupt, ConsoleSink::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output_on_drain() {
        let out = Shared::default();
        let mut serial = new_serial(Box::new(out.clone()));
        for b in b"hello\n" {
            serial.write(0, *b).unwrap();
        }
        assert!(out.0.lock().unwrap().is_empty(), "buffered until drained");
        serial.writer_mut().drain();
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
    }

    #[test]
    fn line_status_says_the_transmitter_is_empty() {
        let mut serial = new_serial(Box::new(io::sink()));
        // LSR (offset 5): THR empty (bit 5) and transmitter empty (bit 6).
        assert_eq!(serial.read(5) & 0x60, 0x60);
    }
}
