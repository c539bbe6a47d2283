//! One operation of a node, as a line of its log: `R|W L|C key start_ns end_ns ok value`.

use std::fmt;
use std::str::FromStr;

/// A read or an awaited write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `try_get`.
    Read,
    /// `set`, awaited.
    Write,
}

/// When the operation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Under load (faults happen here).
    Load,
    /// After the load stopped: every node reads every key until the end, to measure convergence.
    Converge,
}

/// One operation, timed with the system-wide monotonic clock (nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Read or write.
    pub kind: Kind,
    /// Load or convergence phase.
    pub phase: Phase,
    /// The node that ran it (`usize::MAX` for the coordinator's initial writes).
    pub node: usize,
    /// The key.
    pub key: String,
    /// When it started.
    pub start: u64,
    /// When it returned.
    pub end: u64,
    /// Whether it succeeded (a write: acknowledged).
    pub ok: bool,
    /// The value written, or read (`None`: a miss).
    pub value: Option<String>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {} {}",
            match self.kind {
                Kind::Read => 'R',
                Kind::Write => 'W',
            },
            match self.phase {
                Phase::Load => 'L',
                Phase::Converge => 'C',
            },
            self.key,
            self.start,
            self.end,
            u8::from(self.ok),
            self.value.as_deref().unwrap_or("-")
        )
    }
}

impl Op {
    /// Parses a log line of `node`.
    pub fn parse(line: &str, node: usize) -> Result<Self, String> {
        let bad = || format!("bad log line {line:?}");
        let mut fields = line.split(' ');
        let mut next = || fields.next().ok_or_else(bad);
        let kind = match next()? {
            "R" => Kind::Read,
            "W" => Kind::Write,
            _ => return Err(bad()),
        };
        let phase = match next()? {
            "L" => Phase::Load,
            "C" => Phase::Converge,
            _ => return Err(bad()),
        };
        let key = next()?.to_string();
        let number = |s: &str| u64::from_str(s).map_err(|_| bad());
        let start = number(next()?)?;
        let end = number(next()?)?;
        let ok = next()? == "1";
        let value = match next()? {
            "-" => None,
            v => Some(v.to_string()),
        };
        Ok(Self {
            kind,
            phase,
            node,
            key,
            start,
            end,
            ok,
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_round_trips() {
        let op = Op {
            kind: Kind::Write,
            phase: Phase::Load,
            node: 2,
            key: "k1".into(),
            start: 10,
            end: 25,
            ok: true,
            value: Some("n2-7".into()),
        };
        assert_eq!(Op::parse(&op.to_string(), 2).unwrap(), op);
        let miss = Op::parse("R C k0 1 2 0 -", 0).unwrap();
        assert_eq!(
            (miss.kind, miss.phase, miss.ok, miss.value),
            (Kind::Read, Phase::Converge, false, None)
        );
        assert!(Op::parse("X L k 1 2 1 v", 0).is_err());
        assert!(Op::parse("R L k one 2 1 v", 0).is_err());
        assert!(Op::parse("R L k 1", 0).is_err());
    }
}
