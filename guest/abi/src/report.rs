//! Report records: what the guest sends with the `REPORT` hypercall.
//!
//! A record is a [`ReportHeader`] followed by `header.len` payload bytes,
//! all in guest RAM at the GPA given to `REPORT`. The VMM copies the record
//! out of guest memory (bounded by [`MAX_REPORT_LEN`]) before looking at
//! it, so a guest that changes it concurrently or lies about its length
//! cannot make the VMM read outside guest RAM.

/// Magic value at the start of every record ("MMUR").
pub const REPORT_MAGIC: u32 = 0x5255_4d4d;
/// The largest record the VMM accepts, header included.
pub const MAX_REPORT_LEN: u64 = 4096;

/// Kinds of record.
pub mod kind {
    /// The guest finished booting. Payload: [`super::BootRecord`].
    pub const BOOT: u32 = 1;
    /// One in-guest test result. Payload: [`super::TestRecord`], then the
    /// test name (`name_len` bytes of UTF-8), then the failure message
    /// (`msg_len` bytes, empty when the test passed).
    pub const TEST: u32 = 2;
    /// The measured phase of a workload ends. Payload: [`super::BenchRecord`].
    pub const BENCH: u32 = 3;
    /// The measured phase of a workload begins (the VMM snapshots its
    /// counters). Payload: [`super::BenchRecord`] with `ops` = 0.
    pub const BENCH_BEGIN: u32 = 5;
    /// A chunk of access-matrix results. Payload: [`super::MatrixChunk`]
    /// then `count` little-endian `u16` records.
    pub const MATRIX: u32 = 6;
    /// The calibration loop of `vmm info`. Payload: [`super::CalibrationRecord`].
    pub const CALIBRATION: u32 = 4;
}

/// Header of every report record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportHeader {
    /// [`REPORT_MAGIC`].
    pub magic: u32,
    /// One of [`kind`].
    pub kind: u32,
    /// Length of the payload that follows the header, in bytes.
    pub len: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Payload of a [`kind::BOOT`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootRecord {
    /// `rdtsc` at kernel entry.
    pub tsc_at_entry: u64,
    /// `rdtsc` when the banner was printed.
    pub tsc_at_ready: u64,
    /// Number of memory-map entries the guest accepted.
    pub regions: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Payload of a [`kind::TEST`] record; the name and the message follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestRecord {
    /// 1 if the test passed, 0 if it failed.
    pub passed: u32,
    /// Length of the name that follows, in bytes.
    pub name_len: u32,
    /// Length of the failure message after the name, in bytes.
    pub msg_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Guest cycles (`rdtsc`) the test took.
    pub cycles: u64,
}

/// The most bytes of name plus message a test record carries.
pub const MAX_TEST_TEXT: usize = 512;

/// Payload of a [`kind::CALIBRATION`] record: a loop of `iterations`
/// two-instruction iterations (`dec; jnz`), timed by the host and the TSC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CalibrationRecord {
    /// Loop iterations.
    pub iterations: u64,
    /// Host nanoseconds (`NOW` after minus `NOW` before).
    pub ns: u64,
    /// Guest TSC cycles.
    pub cycles: u64,
}

/// Payload of [`kind::BENCH`] and [`kind::BENCH_BEGIN`] records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchRecord {
    /// Workload name, UTF-8, zero-padded.
    pub name: [u8; 16],
    /// Operations done in the measured phase.
    pub ops: u64,
    /// Guest TSC cycles of the measured phase.
    pub cycles: u64,
    /// 1 if the workload's self-check passed.
    pub ok: u64,
}

/// Header of a [`kind::MATRIX`] payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatrixChunk {
    /// Index of the first case in this chunk.
    pub first: u32,
    /// Number of `u16` records that follow.
    pub count: u32,
}
