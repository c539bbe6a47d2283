//! Merging the nodes' logs into the checker's figures.
//!
//! Every value written is unique, so a read names the write it observed. With the system-wide monotonic
//! clock of every operation:
//!
//! - a read is **stale** when it returns the value of write `w` although another write `x` on the key was
//!   acknowledged before the read began and started after `w` was acknowledged (so `x` is newer than `w` in
//!   every possible order). Its staleness is the read's start minus the earliest such acknowledgement.
//!   Overlapping writes may be seen in either order. A write that failed counts from when it returned: a
//!   write started after that carries a newer timestamp and supersedes it whenever it lands;
//! - an acknowledged write is **lost** when the final value of its key (read from L2 once everything has
//!   stopped) is that of a write acknowledged before it started;
//! - the nodes have **converged** once every node reads every key's final value, and keeps reading it
//!   until the end of the convergence phase;
//! - the fleet has **recovered** within 1 s of the fault's end when no read that began later was stale by
//!   more than 50 ms.

use std::collections::HashMap;

use crate::record::{Kind, Op, Phase};

/// A staleness that propagation alone does not explain (the no-fault maximum this project targets), ns.
pub const LATE_STALENESS: u64 = 50_000_000;

/// What one scenario measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Reads under load.
    pub reads: usize,
    /// Reads under load that failed (no value could be served).
    pub read_errors: usize,
    /// Stale reads' staleness, sorted (ns).
    pub staleness: Vec<u64>,
    /// Reads stale by more than [`LATE_STALENESS`] that began more than 1 s after the fault ended: the fleet
    /// had not recovered within 1 s.
    pub stale_after_recovery: usize,
    /// Writes acknowledged under load.
    pub writes_acked: usize,
    /// Writes that returned an error.
    pub writes_failed: usize,
    /// Acknowledged writes whose value was overwritten by an older one.
    pub lost: usize,
    /// Reads of a value nobody wrote (would be corruption).
    pub unknown_values: usize,
    /// When every node read every final value for good, after the load stopped (ns); `None`: never.
    pub converged_after: Option<u64>,
}

impl Report {
    /// Stale reads.
    pub fn stale(&self) -> usize {
        self.staleness.len()
    }

    /// The share of stale reads among the successful ones.
    pub fn stale_share(&self) -> f64 {
        let served = self.reads - self.read_errors;
        if served == 0 {
            0.0
        } else {
            self.stale() as f64 / served as f64
        }
    }

    /// The staleness at quantile `q` (0..=1) of the stale reads, nearest rank (ns); 0 without any.
    pub fn staleness_quantile(&self, q: f64) -> u64 {
        if self.staleness.is_empty() {
            return 0;
        }
        let rank = (q * self.staleness.len() as f64).ceil() as usize;
        self.staleness[rank.clamp(1, self.staleness.len()) - 1]
    }

    /// The staleness at quantile `q` of every served read (a fresh read counts 0), nearest rank (ns).
    pub fn served_quantile(&self, q: f64) -> u64 {
        let served = self.reads - self.read_errors;
        let fresh = served - self.stale();
        let rank = ((q * served as f64).ceil() as usize).clamp(1, served.max(1));
        if rank <= fresh {
            0
        } else {
            self.staleness[(rank - fresh - 1).min(self.stale().saturating_sub(1))]
        }
    }

    /// Stale reads staler than `ns`.
    pub fn stale_over(&self, ns: u64) -> usize {
        self.staleness.len() - self.staleness.partition_point(|s| *s <= ns)
    }
}

/// The writes of one key.
struct KeyWrites<'a> {
    by_value: HashMap<&'a str, &'a Op>,
    /// Acknowledged writes, by start: (start, acknowledged at).
    acked: Vec<(u64, u64)>,
    /// `suffix_min[i]`: the earliest acknowledgement among `acked[i..]`.
    suffix_min: Vec<u64>,
}

impl<'a> KeyWrites<'a> {
    fn new(writes: Vec<&'a Op>) -> Self {
        let by_value = writes
            .iter()
            .filter_map(|w| w.value.as_deref().map(|v| (v, *w)))
            .collect();
        let mut acked: Vec<(u64, u64)> = writes
            .iter()
            .filter(|w| w.ok)
            .map(|w| (w.start, w.end))
            .collect();
        acked.sort_unstable();
        let mut suffix_min = vec![u64::MAX; acked.len()];
        let mut min = u64::MAX;
        for (i, (_, end)) in acked.iter().enumerate().rev() {
            min = min.min(*end);
            suffix_min[i] = min;
        }
        Self {
            by_value,
            acked,
            suffix_min,
        }
    }

    /// The earliest acknowledgement of a write that started after `t` (every write for `None`).
    fn first_ack_after(&self, t: Option<u64>) -> Option<u64> {
        let i = t.map_or(0, |t| self.acked.partition_point(|(s, _)| *s <= t));
        self.suffix_min.get(i).copied()
    }

    /// When the write of `value` returned (`None` for a miss: nothing written), `Err` for a value nobody
    /// wrote. A failed write counts as well: a write that started after it returned has a newer
    /// timestamp, so it supersedes it whenever (and if ever) the failed one lands.
    fn returned_at(&self, value: Option<&str>) -> Result<Option<u64>, ()> {
        match value {
            None => Ok(None),
            Some(v) => self.by_value.get(v).map(|w| Some(w.end)).ok_or(()),
        }
    }

    /// Acknowledged writes that started after `t`.
    fn acked_after(&self, t: Option<u64>) -> usize {
        t.map_or(self.acked.len(), |t| {
            self.acked.len() - self.acked.partition_point(|(s, _)| *s <= t)
        })
    }
}

/// Computes the figures of a run from every operation (the coordinator's initial writes included), the
/// final value of each key, when the load stopped and when the fault (if any) ended.
pub fn analyze(
    ops: &[Op],
    finals: &HashMap<String, Option<String>>,
    load_end: u64,
    fault_end: Option<u64>,
) -> Report {
    let mut writes: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in ops.iter().filter(|o| o.kind == Kind::Write) {
        writes.entry(&op.key).or_default().push(op);
    }
    let keys: HashMap<&str, KeyWrites<'_>> = writes
        .into_iter()
        .map(|(k, w)| (k, KeyWrites::new(w)))
        .collect();
    let none = KeyWrites::new(Vec::new());
    let writes_of = |key: &str| keys.get(key).unwrap_or(&none);

    let mut report = Report::default();
    for op in ops.iter().filter(|o| o.phase == Phase::Load) {
        match op.kind {
            Kind::Write if op.node != usize::MAX => {
                if op.ok {
                    report.writes_acked += 1;
                } else {
                    report.writes_failed += 1;
                }
            }
            Kind::Write => {}
            Kind::Read => {
                report.reads += 1;
                if !op.ok {
                    report.read_errors += 1;
                    continue;
                }
                let w = writes_of(&op.key);
                let Ok(seen) = w.returned_at(op.value.as_deref()) else {
                    report.unknown_values += 1;
                    continue;
                };
                if let Some(newer) = w.first_ack_after(seen).filter(|t| *t < op.start) {
                    let staleness = op.start - newer;
                    report.staleness.push(staleness);
                    if staleness > LATE_STALENESS
                        && fault_end.is_some_and(|end| op.start > end + 1_000_000_000)
                    {
                        report.stale_after_recovery += 1;
                    }
                }
            }
        }
    }
    report.staleness.sort_unstable();

    for (key, w) in &keys {
        let final_value = finals.get(*key).cloned().flatten();
        match w.returned_at(final_value.as_deref()) {
            Ok(at) => report.lost += w.acked_after(at),
            Err(()) => report.unknown_values += 1,
        }
    }

    report.converged_after = converged_after(ops, finals, load_end);
    report
}

/// When every node's reads of every key settled on the final value, after `load_end`.
fn converged_after(
    ops: &[Op],
    finals: &HashMap<String, Option<String>>,
    load_end: u64,
) -> Option<u64> {
    let mut reads: HashMap<(usize, &str), Vec<&Op>> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.phase == Phase::Converge && o.kind == Kind::Read)
    {
        reads.entry((op.node, &op.key)).or_default().push(op);
    }
    if reads.is_empty() {
        return None;
    }
    let mut settled = load_end;
    for ((_, key), mut rs) in reads {
        rs.sort_unstable_by_key(|r| r.start);
        let want = finals.get(key).cloned().flatten();
        let good = |r: &Op| r.ok && r.value == want;
        if !rs.last().is_some_and(|r| good(r)) {
            return None;
        }
        let from = match rs.iter().rposition(|r| !good(r)) {
            Some(i) => rs[i + 1].start,
            None => rs[0].start,
        };
        settled = settled.max(from);
    }
    Some(settled - load_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, node: usize, start: u64, end: u64, ok: bool, value: Option<&str>) -> Op {
        Op {
            kind,
            phase: Phase::Load,
            node,
            key: "k".into(),
            start,
            end,
            ok,
            value: value.map(str::to_string),
        }
    }
    fn w(start: u64, end: u64, v: &str) -> Op {
        op(Kind::Write, 0, start, end, true, Some(v))
    }
    fn r(start: u64, v: Option<&str>) -> Op {
        op(Kind::Read, 1, start, start + 1, true, v)
    }
    fn finals(v: Option<&str>) -> HashMap<String, Option<String>> {
        HashMap::from([("k".to_string(), v.map(str::to_string))])
    }

    #[test]
    fn a_read_older_than_an_acknowledged_write_is_stale_by_the_time_since_that_ack() {
        let ops = vec![
            w(0, 10, "a"),
            w(20, 30, "b"),
            r(25, Some("a")), // b not acknowledged yet: fine
            r(40, Some("a")), // stale by 10
            r(40, Some("b")),
            r(5, None),  // before any ack: fine
            r(50, None), // a miss after acks: stale by 40
        ];
        let report = analyze(&ops, &finals(Some("b")), 100, None);
        assert_eq!(report.reads, 5);
        assert_eq!(report.staleness, vec![10, 40]);
        assert_eq!(report.writes_acked, 2);
        assert_eq!(report.lost, 0);
        assert_eq!(report.staleness_quantile(0.5), 10);
        assert_eq!(report.staleness_quantile(1.0), 40);
        assert_eq!(report.stale_over(10), 1);
        assert_eq!(report.served_quantile(0.5), 0, "3 of 5 reads are fresh");
        assert_eq!(report.served_quantile(0.7), 10);
        assert_eq!(report.served_quantile(1.0), 40);
        assert!((report.stale_share() - 0.4).abs() < 1e-9);
    }

    #[test]
    fn overlapping_writes_may_be_seen_in_either_order() {
        let ops = vec![
            w(0, 10, "a"),
            w(5, 15, "b"),
            r(20, Some("a")),
            r(21, Some("b")),
        ];
        let report = analyze(&ops, &finals(Some("a")), 100, None);
        assert_eq!(report.stale(), 0);
        assert_eq!(report.lost, 0, "a is as new as b");
    }

    #[test]
    fn an_older_final_value_loses_the_writes_acknowledged_after_it() {
        let ops = vec![w(0, 10, "a"), w(20, 30, "b"), w(40, 50, "c")];
        assert_eq!(analyze(&ops, &finals(Some("a")), 100, None).lost, 2);
        assert_eq!(analyze(&ops, &finals(Some("c")), 100, None).lost, 0);
        assert_eq!(analyze(&ops, &finals(None), 100, None).lost, 3);
        // A failed write that landed last loses what was acknowledged after it returned.
        let mut ops = ops;
        ops.push(op(Kind::Write, 2, 15, 35, false, Some("x")));
        let report = analyze(&ops, &finals(Some("x")), 100, None);
        assert_eq!((report.lost, report.writes_failed), (1, 1));
    }

    #[test]
    fn failed_reads_failed_writes_and_unknown_values_are_counted_apart() {
        let ops = vec![
            w(0, 10, "a"),
            op(Kind::Write, 0, 20, 30, false, Some("b")),
            op(Kind::Read, 1, 40, 41, false, None),
            r(42, Some("b")), // a failed write's value, nothing newer: fresh
            r(43, Some("zz")),
            w(50, 60, "c"),
            r(70, Some("b")), // c started after b returned: stale
        ];
        let report = analyze(&ops, &finals(Some("c")), 100, None);
        assert_eq!(
            (
                report.reads,
                report.read_errors,
                report.staleness.clone(),
                report.unknown_values
            ),
            (4, 1, vec![10], 1)
        );
    }

    #[test]
    fn staleness_long_after_the_fault_is_counted() {
        let s = 1_000_000_000;
        let ops = vec![
            w(0, 10, "a"),
            w(20, 30, "b"),
            r(s / 2, Some("a")), // during the fault
            r(3 * s, Some("a")), // long after it: late
            w(4 * s, 4 * s + 10, "c"),
            r(4 * s + 20, Some("b")), // stale by 10 ns only: propagation, not late
        ];
        let report = analyze(&ops, &finals(Some("c")), 10 * s, Some(s));
        assert_eq!((report.stale(), report.stale_after_recovery), (3, 1));
    }

    #[test]
    fn convergence_is_when_every_node_settled_on_the_final_value() {
        let conv = |node: usize, start: u64, v: &str| Op {
            phase: Phase::Converge,
            ..op(Kind::Read, node, start, start + 1, true, Some(v))
        };
        let mut ops = vec![w(0, 10, "a"), w(20, 30, "b")];
        ops.extend([conv(0, 100, "a"), conv(0, 110, "b"), conv(0, 120, "b")]);
        ops.extend([conv(1, 100, "b"), conv(1, 105, "a"), conv(1, 130, "b")]);
        assert_eq!(
            analyze(&ops, &finals(Some("b")), 100, None).converged_after,
            Some(30)
        );
        ops.push(conv(2, 140, "a"));
        assert_eq!(
            analyze(&ops, &finals(Some("b")), 100, None).converged_after,
            None
        );
    }
}
