//! HVA→HPA, the last step of the chain, through `/proc/self/pagemap`
//! (Documentation/admin-guide/mm/pagemap.rst), and the host page size
//! through `/proc/kpageflags`.
//!
//! A pagemap entry is 64 bits per 4 KiB virtual page: bit 63 present, bit
//! 62 swapped, bits 0–54 the page frame number. Without `CAP_SYS_ADMIN`
//! the kernel reports the PFN as zero; that is reported as "HPA
//! unavailable", never as physical address 0.

use guest_abi::{Hpa, Hva};
use serde::Serialize;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PAGE_SHIFT: u64 = 12;
const PFN_MASK: u64 = (1 << 55) - 1;
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// `/proc/kpageflags` bits (include/uapi/linux/kernel-page-flags.h).
const KPF_HUGE: u64 = 1 << 17;
const KPF_THP: u64 = 1 << 22;

/// What the host says about the page behind an HVA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum HostPage {
    /// Resident: host-physical address and the host page size backing it.
    Present {
        /// Host-physical address of the byte at the HVA.
        #[serde(serialize_with = "crate::json::hex")]
        hpa: Hpa,
        /// Host page size in bytes (4 KiB, or 2 MiB / 1 GiB when huge).
        page_size: u64,
    },
    /// Not touched yet (or reclaimed): no frame behind it.
    NotPresent,
    /// Swapped out.
    Swapped,
    /// The PFN is hidden: reading it needs `CAP_SYS_ADMIN`.
    Unavailable,
}

impl HostPage {
    /// One line for `--explain`.
    pub fn describe(&self) -> String {
        match self {
            HostPage::Present { hpa, page_size } => {
                format!("HPA   {hpa:#x} (host page {})", crate::walk::size_name(*page_size))
            }
            HostPage::NotPresent => "HPA   none: the host has not backed this page yet (never touched)".into(),
            HostPage::Swapped => "HPA   none: the host page is swapped out".into(),
            HostPage::Unavailable => "HPA unavailable: needs CAP_SYS_ADMIN".into(),
        }
    }
}

fn read_u64_at(path: &str, index: u64) -> io::Result<u64> {
    let f = File::open(path)?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, index * 8)?;
    Ok(u64::from_le_bytes(b))
}

/// Decode a pagemap entry for `hva`; `huge` gives the huge page size of
/// the frame (from kpageflags or the backing), if any.
pub fn decode(entry: u64, hva: Hva, huge: impl FnOnce(u64) -> Option<u64>) -> HostPage {
    let hva = hva.raw();
    if entry & PRESENT == 0 {
        return if entry & SWAPPED != 0 { HostPage::Swapped } else { HostPage::NotPresent };
    }
    let pfn = entry & PFN_MASK;
    if pfn == 0 {
        return HostPage::Unavailable;
    }
    let page_size = huge(pfn).unwrap_or(1 << PAGE_SHIFT);
    HostPage::Present { hpa: Hpa((pfn << PAGE_SHIFT) | (hva & ((1 << PAGE_SHIFT) - 1))), page_size }
}

/// Look up the host page behind `hva` in this process. `hugetlb_size` is
/// the page size when the mapping is hugetlb-backed (kpageflags cannot
/// tell 2 MiB from 1 GiB); otherwise THP is detected from kpageflags.
pub fn host_page(hva: Hva, hugetlb_size: Option<u64>) -> io::Result<HostPage> {
    let entry = read_u64_at("/proc/self/pagemap", hva.raw() >> PAGE_SHIFT)?;
    Ok(decode(entry, hva, |pfn| {
        if hugetlb_size.is_some() {
            return hugetlb_size;
        }
        let flags = read_u64_at("/proc/kpageflags", pfn).ok()?;
        if flags & KPF_THP != 0 || flags & KPF_HUGE != 0 { Some(2 << 20) } else { None }
    }))
}

/// Bytes of `[start, start + len)` backed by huge pages according to
/// `/proc/self/smaps` (`AnonHugePages`, `Private_Hugetlb`, `Shared_Hugetlb`).
pub fn huge_backed_bytes(start: Hva, len: u64) -> io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(huge_backed_in(&smaps, start, Hva(start.raw() + len)))
}

/// The parsing half of [`huge_backed_bytes`].
pub fn huge_backed_in(smaps: &str, start: Hva, end: Hva) -> u64 {
    let (start, end) = (start.raw(), end.raw());
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            inside = a < end && start < b;
            continue;
        }
        if !inside {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else { continue };
        if matches!(key, "AnonHugePages:" | "Private_Hugetlb:" | "Shared_Hugetlb:") {
            total += value.parse::<u64>().unwrap_or(0) << 10;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_entries() {
        assert_eq!(decode(0, Hva(0x1234), |_| None), HostPage::NotPresent);
        assert_eq!(decode(SWAPPED | 5, Hva(0x1234), |_| None), HostPage::Swapped);
        assert_eq!(decode(PRESENT, Hva(0x1234), |_| None), HostPage::Unavailable);
        assert_eq!(
            decode(PRESENT | 0xabcde, Hva(0x7f00_0000_1234), |_| None),
            HostPage::Present { hpa: Hpa(0xabcde234), page_size: 4096 }
        );
        assert_eq!(
            decode(PRESENT | 0x200, Hva(0x10), |_| Some(2 << 20)),
            HostPage::Present { hpa: Hpa(0x200010), page_size: 2 << 20 }
        );
    }

    #[test]
    fn smaps_sums_huge_pages_of_overlapping_mappings_only() {
        let smaps = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
AnonHugePages:      2048 kB
Private_Hugetlb:       0 kB
7f0000400000-7f0000800000 rw-p 00000000 00:00 0
AnonHugePages:      4096 kB
";
        assert_eq!(huge_backed_in(smaps, Hva(0x7f00_0000_0000), Hva(0x7f00_0040_0000)), 2 << 20);
        assert_eq!(huge_backed_in(smaps, Hva(0x7f00_0000_0000), Hva(0x7f00_0080_0000)), 6 << 20);
        assert_eq!(huge_backed_in(smaps, Hva(0x1000), Hva(0x2000)), 0);
    }

    #[test]
    fn a_touched_page_of_this_process_is_resident() {
        let v = Box::new(0x5au8);
        let hva = &*v as *const u8 as u64;
        match host_page(Hva(hva), None).unwrap() {
            HostPage::Present { hpa, page_size } => {
                assert_eq!(hpa.raw() & 0xfff, hva & 0xfff, "the page offset carries over");
                assert!(page_size >= 4096);
            }
            // Not root: the PFN is hidden, and must say so.
            HostPage::Unavailable => assert!(HostPage::Unavailable.describe().contains("CAP_SYS_ADMIN")),
            other => panic!("a touched heap page should be resident: {other:?}"),
        }
    }
}
