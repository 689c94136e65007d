//! The 16550 UART at COM1 (`vm-superio`), writing to a console sink.
//!
//! `vm-superio` writes its output one byte at a time; the sink here
//! buffers instead and the vCPU loop calls [`ConsoleSink::drain`] after
//! each exit that wrote, so a `rep outsb` string is handed on at once.
//! The guest runs without interrupts, so the UART's interrupt line goes
//! nowhere ([`NoInterrupt`]).
//!
//! **The vCPU thread never blocks on the console's output.** A writer
//! thread owns the output (stdout, usually) and takes bytes from a queue of
//! at most [`CONSOLE_QUEUE_BYTES`]. When the queue is full (the reader of a
//! pipe is slow or stopped), [`ConsoleSink::drain`] waits for room, but
//! only until the queue is [aborted](ConsoleQueue::abort) — which the VM
//! does when its timeout expires — after which bytes that do not fit are
//! counted and dropped. So `--timeout` holds even when stdout is blocked.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vm_superio::{Serial, Trigger};

/// Most bytes of guest console output waiting for the writer thread.
pub const CONSOLE_QUEUE_BYTES: usize = 1 << 20;

/// The UART's interrupt line: not connected (the guest polls nothing and
/// runs with interrupts off).
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct QueueState {
    buf: VecDeque<u8>,
    /// Bytes the writer thread took and is writing now.
    in_flight: usize,
    /// No more bytes will come: the writer thread ends once empty.
    closed: bool,
    /// Stop waiting for room: the run is over (timeout).
    aborted: bool,
    /// Bytes dropped because the queue was full after the abort.
    dropped: u64,
}

/// The queue between the vCPU thread and the console's writer thread.
#[derive(Default)]
pub struct ConsoleQueue {
    state: Mutex<QueueState>,
    /// Signalled when bytes arrive or the queue closes.
    data: Condvar,
    /// Signalled when the writer made room or went idle, or on abort.
    room: Condvar,
}

impl ConsoleQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `data`, waiting for room unless the queue was aborted; past
    /// the abort, what does not fit is dropped (and counted).
    fn push(&self, mut data: &[u8]) {
        let mut st = self.lock();
        while !data.is_empty() {
            let room = CONSOLE_QUEUE_BYTES.saturating_sub(st.buf.len());
            if room == 0 {
                if st.aborted {
                    st.dropped += data.len() as u64;
                    return;
                }
                st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let n = room.min(data.len());
            st.buf.extend(&data[..n]);
            data = &data[n..];
            self.data.notify_one();
        }
    }

    /// Stop anyone waiting for room: from now on a full queue drops bytes.
    pub fn abort(&self) {
        self.lock().aborted = true;
        self.room.notify_all();
    }

    /// Wait until the writer thread has written everything, or until
    /// `deadline`. Returns the bytes that were not written (still queued,
    /// being written, or dropped).
    pub fn finish(&self, deadline: Instant) -> u64 {
        let mut st = self.lock();
        while !st.buf.is_empty() || st.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self.room.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        (st.buf.len() + st.in_flight) as u64 + st.dropped
    }

    /// The writer thread: write what arrives until the queue is closed and
    /// empty. Output errors (a closed pipe) are ignored: the guest's
    /// console is best effort and must not stop the VM.
    fn writer(&self, mut out: Box<dyn Write + Send>) {
        loop {
            let chunk: Vec<u8> = {
                let mut st = self.lock();
                while st.buf.is_empty() && !st.closed {
                    st = self.data.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.buf.is_empty() {
                    return;
                }
                let chunk: Vec<u8> = st.buf.drain(..).collect();
                st.in_flight = chunk.len();
                chunk
            };
            let _ = out.write_all(&chunk);
            let _ = out.flush();
            self.lock().in_flight = 0;
            self.room.notify_all();
        }
    }
}

/// Buffers what the UART transmits and passes it on in [`Self::drain`].
pub struct ConsoleSink {
    buf: Vec<u8>,
    queue: Arc<ConsoleQueue>,
}

impl ConsoleSink {
    /// A sink that forwards to `out` through a writer thread.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        let queue = Arc::new(ConsoleQueue::default());
        let q = queue.clone();
        // If the thread cannot start, the output is lost but the VM runs:
        // the queue fills, and the timeout's abort lets the vCPU go on.
        if let Err(e) = std::thread::Builder::new().name("console".into()).spawn(move || q.writer(out)) {
            log::warn!("cannot start the console writer thread: {e}; guest output is lost");
        }
        ConsoleSink { buf: Vec::with_capacity(4096), queue }
    }

    /// Hand what was buffered to the writer thread.
    pub fn drain(&mut self) {
        if !self.buf.is_empty() {
            self.queue.push(&self.buf);
            self.buf.clear();
        }
    }

    /// The queue, for the VM to abort and finish.
    pub fn queue(&self) -> Arc<ConsoleQueue> {
        self.queue.clone()
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        // Let the writer thread end once it has written what is queued.
        self.queue.lock().closed = true;
        self.queue.data.notify_all();
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

/// How long [`ConsoleQueue::finish`] may wait past the run's own deadline.
pub const CONSOLE_GRACE: Duration = Duration::from_secs(1);

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
        let q = serial.writer().queue();
        assert_eq!(q.finish(Instant::now() + Duration::from_secs(60)), 0);
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
    }

    /// An output that blocks until released.
    struct Blocked(Arc<(Mutex<bool>, Condvar)>);
    impl Write for Blocked {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            let (m, c) = &*self.0;
            let mut open = m.lock().unwrap();
            while !*open {
                open = c.wait(open).unwrap();
            }
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_never_blocks_the_vcpu_after_the_abort() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let mut sink = ConsoleSink::new(Box::new(Blocked(gate.clone())));
        let q = sink.queue();
        // The VM's timeout: the abort releases whatever waits for room.
        let aborter = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                q.abort();
            })
        };
        // Twice the queue (the writer holds the first chunk, blocked),
        // then more: the drains wait for room until the abort.
        sink.write_all(&vec![b'x'; CONSOLE_QUEUE_BYTES]).unwrap();
        sink.drain();
        sink.write_all(&vec![b'y'; CONSOLE_QUEUE_BYTES]).unwrap();
        sink.drain();
        sink.write_all(&[b'z'; 10]).unwrap();
        sink.drain();
        aborter.join().unwrap();
        // Nothing was written: everything is still queued, in flight or dropped.
        assert_eq!(q.finish(Instant::now()), 2 * CONSOLE_QUEUE_BYTES as u64 + 10);
        // Release the writer so its thread ends.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    #[test]
    fn line_status_says_the_transmitter_is_empty() {
        let mut serial = new_serial(Box::new(io::sink()));
        // LSR (offset 5): THR empty (bit 5) and transmitter empty (bit 6).
        assert_eq!(serial.read(5) & 0x60, 0x60);
    }
}
