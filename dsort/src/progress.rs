//! How the engine reports progress: a small trait the binary implements (progress bars on a terminal,
//! log lines elsewhere), so the library never draws anything itself.

use std::fmt;

/// The phases of a job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Extract,
    Sort,
    Create,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Extract => "extract",
            Phase::Sort => "sort",
            Phase::Create => "create",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Receives progress from a running job. Calls come from several threads.
pub trait Progress: Send + Sync {
    /// A phase starts; `total` units (shards, records, bytes; `unit` says which) when known.
    fn start(&self, phase: Phase, total: Option<u64>, unit: &'static str);
    fn advance(&self, phase: Phase, n: u64);
    fn finish(&self, phase: Phase);
    /// Something the user should know that does not stop the job (a reaction set to `warn`).
    fn warn(&self, message: &str);
}

/// Progress that goes nowhere (tests, library users that do not care).
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: Phase, _: Option<u64>, _: &'static str) {}
    fn advance(&self, _: Phase, _: u64) {}
    fn finish(&self, _: Phase) {}
    fn warn(&self, _: &str) {}
}
