//! The hypercall port: decoding the guest's requests and answering them.
//!
//! The guest is not trusted. Every argument that names guest memory is
//! checked against guest RAM before use, records are copied out of guest
//! memory (at most `MAX_REPORT_LEN` bytes) before they are parsed, and any
//! unknown number or malformed request gets an error result in `rax` —
//! never a VMM panic. What the VMM keeps of the records is bounded
//! ([`crate::limits::MAX_KEPT_REPORT_BYTES`]); past that, `REPORT` answers
//! `ERR_UNAVAILABLE` and the record is only counted.

use guest_abi::hypercall as hc;
use guest_abi::report::{
    BenchRecord, BootRecord, CalibrationRecord, MAX_REPORT_LEN, REPORT_MAGIC, ReportHeader, TestRecord, kind,
};
use serde::Serialize;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A record the guest sent with `REPORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    /// The guest finished booting.
    Boot {
        /// Guest cycles from kernel entry to the banner.
        boot_cycles: u64,
        /// Memory-map entries the guest accepted.
        regions: u32,
    },
    /// One in-guest test result.
    Test {
        /// Test name.
        name: String,
        /// Whether it passed.
        passed: bool,
        /// Guest cycles it took.
        cycles: u64,
        /// Why it failed (empty when it passed).
        message: String,
    },
    /// The calibration loop's timing (`vmm info`).
    Calibration {
        /// Loop iterations (two instructions each).
        iterations: u64,
        /// Host nanoseconds the loop took (`NOW` before and after).
        ns: u64,
        /// Guest TSC cycles the loop took.
        cycles: u64,
    },
    /// A workload's measured phase begins.
    BenchBegin {
        /// Workload name.
        name: String,
    },
    /// A workload's measured phase ended.
    Bench {
        /// Workload name.
        name: String,
        /// Operations done.
        ops: u64,
        /// Guest TSC cycles.
        cycles: u64,
        /// The workload's self-check passed.
        ok: bool,
    },
    /// A chunk of access-matrix records.
    Matrix {
        /// Index of the first case.
        first: u32,
        /// One record per case (see `guest/kernel/src/ktest/matrix.rs`).
        records: Vec<u16>,
    },
    /// A record of a kind this VMM does not interpret.
    Other {
        /// The record kind.
        kind: u32,
        /// Its payload length.
        len: u32,
    },
}

/// What a hypercall may touch.
pub struct HypercallContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// Guest RAM size: `[0, ram)` is valid.
    pub ram: u64,
    /// When the VM was created (the epoch of `NOW`).
    pub epoch: Instant,
    /// Where accepted reports go.
    pub reports: &'a mut Vec<Report>,
    /// How much of [`crate::limits::MAX_KEPT_REPORT_BYTES`] they used.
    pub budget: &'a mut crate::limits::ReportBudget,
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Parse a report record (header and payload) copied out of guest memory.
pub fn parse_report(bytes: &[u8]) -> Option<Report> {
    let hsize = std::mem::size_of::<ReportHeader>();
    if bytes.len() < hsize || le_u32(bytes, 0) != REPORT_MAGIC {
        return None;
    }
    let (rkind, len) = (le_u32(bytes, 4), le_u32(bytes, 8));
    let payload = bytes.get(hsize..hsize.checked_add(len as usize)?)?;
    match rkind {
        kind::BOOT if payload.len() >= std::mem::size_of::<BootRecord>() => {
            let (entry, ready) = (le_u64(payload, 0), le_u64(payload, 8));
            Some(Report::Boot { boot_cycles: ready.wrapping_sub(entry), regions: le_u32(payload, 16) })
        }
        kind::TEST if payload.len() >= std::mem::size_of::<TestRecord>() => {
            let (passed, name_len, msg_len) =
                (le_u32(payload, 0), le_u32(payload, 4) as usize, le_u32(payload, 8) as usize);
            let cycles = le_u64(payload, 16);
            let name_end = 24usize.checked_add(name_len)?;
            let name = payload.get(24..name_end)?;
            let msg = payload.get(name_end..name_end.checked_add(msg_len)?)?;
            Some(Report::Test {
                name: String::from_utf8_lossy(name).into_owned(),
                passed: passed == 1,
                cycles,
                message: String::from_utf8_lossy(msg).into_owned(),
            })
        }
        kind::CALIBRATION if payload.len() >= std::mem::size_of::<CalibrationRecord>() => Some(Report::Calibration {
            iterations: le_u64(payload, 0),
            ns: le_u64(payload, 8),
            cycles: le_u64(payload, 16),
        }),
        kind::BENCH | kind::BENCH_BEGIN if payload.len() >= std::mem::size_of::<BenchRecord>() => {
            let raw = &payload[..16];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(16);
            let name = String::from_utf8_lossy(&raw[..end]).into_owned();
            if rkind == kind::BENCH_BEGIN {
                Some(Report::BenchBegin { name })
            } else {
                Some(Report::Bench {
                    name,
                    ops: le_u64(payload, 16),
                    cycles: le_u64(payload, 24),
                    ok: le_u64(payload, 32) == 1,
                })
            }
        }
        kind::MATRIX if payload.len() >= 8 => {
            let (first, count) = (le_u32(payload, 0), le_u32(payload, 4) as usize);
            let body = payload.get(8..8usize.checked_add(count.checked_mul(2)?)?)?;
            Some(Report::Matrix { first, records: body.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect() })
        }
        kind::BOOT | kind::TEST | kind::CALIBRATION | kind::BENCH | kind::BENCH_BEGIN | kind::MATRIX => None,
        other => Some(Report::Other { kind: other, len }),
    }
}

fn report(ctx: &mut HypercallContext<'_>, gpa: u64, len: u64) -> u64 {
    if len < std::mem::size_of::<ReportHeader>() as u64 || len > MAX_REPORT_LEN {
        return hc::ERR_INVALID;
    }
    match gpa.checked_add(len) {
        Some(end) if end <= ctx.ram => {}
        _ => return hc::ERR_FAULT,
    }
    let mut bytes = vec![0u8; len as usize];
    if ctx.mem.read_slice(&mut bytes, GuestAddress(gpa)).is_err() {
        return hc::ERR_FAULT;
    }
    match parse_report(&bytes) {
        // A record the budget cannot hold is refused (and counted): the
        // VMM keeps at most MAX_KEPT_REPORT_BYTES of them per run.
        Some(_) if !ctx.budget.take(len + std::mem::size_of::<Report>() as u64) => hc::ERR_UNAVAILABLE,
        Some(r) => {
            log::debug!("guest report: {r:?}");
            ctx.reports.push(r);
            hc::OK
        }
        None => hc::ERR_INVALID,
    }
}

/// Handle hypercall `nr` with arguments `args`; returns the value for `rax`.
pub fn handle(ctx: &mut HypercallContext<'_>, nr: u32, args: [u64; 4]) -> u64 {
    match nr {
        hc::REPORT => report(ctx, args[0], args[1]),
        hc::NOW => ctx.epoch.elapsed().as_nanos().min(u128::from(hc::ERR_BASE - 1)) as u64,
        // Known, but they belong to shadow mode, which is not built yet.
        hc::LOAD_CR3 | hc::SHADOW_FAULT | hc::FLUSH_TLB | hc::PV_SETUP | hc::PV_FLUSH | hc::PV_HARVEST => {
            hc::ERR_UNAVAILABLE
        }
        // EXPLAIN needs the vCPU and the memory map: the VM answers it
        // before it gets here (`vm::run`); this is only reached without a VM.
        hc::EXPLAIN => hc::ERR_UNAVAILABLE,
        _ => {
            log::debug!("guest made unknown hypercall {nr:#x}");
            hc::ERR_UNKNOWN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&REPORT_MAGIC.to_le_bytes());
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn with_ctx<R>(f: impl FnOnce(&mut HypercallContext<'_>) -> R) -> (R, Vec<Report>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut reports = Vec::new();
        let mut budget = crate::limits::ReportBudget::default();
        let mut ctx = HypercallContext {
            mem: &mem,
            ram: 0x10000,
            epoch: Instant::now(),
            reports: &mut reports,
            budget: &mut budget,
        };
        let r = f(&mut ctx);
        (r, reports)
    }

    #[test]
    fn a_report_flood_is_bounded() {
        // Ten times the budget in records of the maximum length.
        let mut payload = vec![0u8; MAX_REPORT_LEN as usize - 16];
        payload[4..8].copy_from_slice(&4u32.to_le_bytes());
        let msg_len = payload.len() as u32 - 28;
        payload[8..12].copy_from_slice(&msg_len.to_le_bytes());
        let rec = record(kind::TEST, &payload);
        assert_eq!(rec.len() as u64, MAX_REPORT_LEN);
        let per = MAX_REPORT_LEN + std::mem::size_of::<Report>() as u64;
        let n = 10 * crate::limits::MAX_KEPT_REPORT_BYTES / per;
        let mut budget = crate::limits::ReportBudget::default();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&rec, GuestAddress(0x2000)).unwrap();
        let mut reports = Vec::new();
        let mut results = Vec::new();
        for _ in 0..n {
            let mut ctx = HypercallContext {
                mem: &mem,
                ram: 0x10000,
                epoch: Instant::now(),
                reports: &mut reports,
                budget: &mut budget,
            };
            results.push(handle(&mut ctx, hc::REPORT, [0x2000, rec.len() as u64, 0, 0]));
        }
        let kept = crate::limits::MAX_KEPT_REPORT_BYTES / per;
        assert_eq!(reports.len() as u64, kept);
        assert_eq!(budget.dropped, n - kept);
        assert!(results[..kept as usize].iter().all(|&r| r == hc::OK));
        assert!(results[kept as usize..].iter().all(|&r| r == hc::ERR_UNAVAILABLE));
    }

    #[test]
    fn boot_report_is_accepted() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&100u64.to_le_bytes());
        payload.extend_from_slice(&350u64.to_le_bytes());
        payload.extend_from_slice(&6u32.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        let rec = record(kind::BOOT, &payload);
        let (res, reports) = with_ctx(|ctx| {
            ctx.mem.write_slice(&rec, GuestAddress(0x2000)).unwrap();
            handle(ctx, hc::REPORT, [0x2000, rec.len() as u64, 0, 0])
        });
        assert_eq!(res, hc::OK);
        assert_eq!(reports, vec![Report::Boot { boot_cycles: 250, regions: 6 }]);
    }

    #[test]
    fn test_report_carries_its_name() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&5u32.to_le_bytes());
        payload.extend_from_slice(&4u32.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&42u64.to_le_bytes());
        payload.extend_from_slice(b"buddyoops");
        let r = parse_report(&record(kind::TEST, &payload)).unwrap();
        assert_eq!(r, Report::Test { name: "buddy".into(), passed: false, cycles: 42, message: "oops".into() });
    }

    #[test]
    fn hostile_reports_get_errors() {
        let (results, reports) = with_ctx(|ctx| {
            [
                handle(ctx, hc::REPORT, [0x10000 - 8, 16, 0, 0]), // crosses the end of RAM
                handle(ctx, hc::REPORT, [u64::MAX - 4, 16, 0, 0]), // wraps around
                handle(ctx, hc::REPORT, [0, MAX_REPORT_LEN + 1, 0, 0]), // too long
                handle(ctx, hc::REPORT, [0, 4, 0, 0]),            // shorter than a header
                handle(ctx, hc::REPORT, [0, 64, 0, 0]),           // zeros: no magic
            ]
        });
        assert_eq!(results, [hc::ERR_FAULT, hc::ERR_FAULT, hc::ERR_INVALID, hc::ERR_INVALID, hc::ERR_INVALID]);
        assert!(reports.is_empty());
        // A header whose length runs past the copied bytes is refused too.
        let mut rec = record(kind::TEST, &[0; 16]);
        rec[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(parse_report(&rec), None);
        // A test record whose name runs past the payload.
        let mut p = vec![0u8; 24];
        p[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_report(&record(kind::TEST, &p)), None);
    }

    #[test]
    fn unknown_and_unavailable_calls() {
        let (r, _) = with_ctx(|ctx| {
            [handle(ctx, 0xdead, [0; 4]), handle(ctx, hc::LOAD_CR3, [0x1000, 0, 0, 0]), handle(ctx, hc::NOW, [0; 4])]
        });
        assert_eq!(r[0], hc::ERR_UNKNOWN);
        assert_eq!(r[1], hc::ERR_UNAVAILABLE);
        assert!(!hc::is_error(r[2]));
    }
}
