//! Bounds on what a guest can make the VMM keep or print.
//!
//! The guest is hostile (DESIGN rule: it must never make the VMM grow
//! without bound). Everything a guest can trigger repeatedly and that costs
//! the VMM memory or output is capped here: `REPORT` records kept for the
//! run, `EXPLAIN` chains printed, warnings about refused requests. Past a
//! cap the VMM keeps counting, says so once, and keeps or prints nothing
//! more; the counts appear in `--stats` and `--stats-json`.

use serde::Serialize;

/// Most bytes of `REPORT` records kept for one run: each record costs its
/// wire length plus the size of its parsed form. 4 MiB holds a thousand
/// records of the maximum length, far more than `vmm test` or `vmm bench`
/// sends (about a hundred records, the access matrix included).
pub const MAX_KEPT_REPORT_BYTES: u64 = 4 << 20;

/// Most `EXPLAIN` chains printed in one run (about 500 bytes each).
pub const MAX_EXPLAIN_PRINTS: u64 = 64;

/// Most warnings of one kind printed in one run.
pub const MAX_WARNINGS: u64 = 16;

/// A counter that allows the first `limit` events and counts the rest,
/// logging one warning the first time the limit is passed.
#[derive(Debug, Clone, Serialize)]
pub struct Limited {
    /// What is counted, for the warning ("EXPLAIN output").
    #[serde(skip)]
    what: &'static str,
    /// How many events are allowed.
    pub limit: u64,
    /// Events seen.
    pub seen: u64,
}

impl Limited {
    /// A counter that allows `limit` events of `what`.
    pub const fn new(what: &'static str, limit: u64) -> Limited {
        Limited { what, limit, seen: 0 }
    }

    /// Count one event; `true` if it is within the limit. The first event
    /// past the limit logs one warning.
    pub fn allow(&mut self) -> bool {
        self.seen = self.seen.saturating_add(1);
        if self.seen == self.limit + 1 {
            log::warn!(
                "the guest caused more than {} {}; the rest are counted, not shown (see --stats)",
                self.limit,
                self.what
            );
        }
        self.seen <= self.limit
    }

    /// Events past the limit.
    pub fn suppressed(&self) -> u64 {
        self.seen.saturating_sub(self.limit)
    }
}

/// The `REPORT` records of one run, within [`MAX_KEPT_REPORT_BYTES`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReportBudget {
    /// Bytes accounted to the records kept.
    pub kept_bytes: u64,
    /// Records accepted but not kept because the budget was spent.
    pub dropped: u64,
}

impl ReportBudget {
    /// Account for a record of `cost` bytes; `false` (and counted as
    /// dropped, with one warning the first time) if it does not fit.
    pub fn take(&mut self, cost: u64) -> bool {
        if self.kept_bytes.saturating_add(cost) <= MAX_KEPT_REPORT_BYTES {
            self.kept_bytes += cost;
            return true;
        }
        if self.dropped == 0 {
            log::warn!(
                "the guest sent more than {} of REPORT records; the rest are refused and counted, not kept (see --stats)",
                crate::size::format_size(MAX_KEPT_REPORT_BYTES)
            );
        }
        self.dropped += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_allows_the_first_events_and_counts_the_rest() {
        let mut l = Limited::new("test events", 5);
        let allowed = (0..50).filter(|_| l.allow()).count();
        assert_eq!(allowed, 5);
        assert_eq!(l.seen, 50);
        assert_eq!(l.suppressed(), 45);
    }

    #[test]
    fn report_budget_is_bytes() {
        let mut b = ReportBudget::default();
        let cost = 4096;
        let n = 10 * MAX_KEPT_REPORT_BYTES / cost;
        let kept = (0..n).filter(|_| b.take(cost)).count() as u64;
        assert_eq!(kept, MAX_KEPT_REPORT_BYTES / cost);
        assert_eq!(b.dropped, n - kept);
        assert!(b.kept_bytes <= MAX_KEPT_REPORT_BYTES);
    }
}
