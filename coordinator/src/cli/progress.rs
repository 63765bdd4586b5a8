//! Progress for long verbs: one bar per phase on a terminal, plain periodic log lines otherwise.

use dsort::progress::{Phase, Progress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Reports to stderr: bars on a terminal, a log line every few seconds elsewhere.
pub struct CliProgress {
    bars: Option<MultiProgress>,
    state: Mutex<HashMap<Phase, PhaseState>>,
    quiet: bool,
}

struct PhaseState {
    bar: Option<ProgressBar>,
    total: Option<u64>,
    unit: &'static str,
    done: AtomicU64,
    started: Instant,
    last_log: Instant,
}

impl CliProgress {
    /// `quiet` suppresses everything but warnings (used with `--json`).
    pub fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal() && !quiet;
        let bars = tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        CliProgress { bars, state: Mutex::new(HashMap::new()), quiet }
    }

    fn log(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }
}

fn human(unit: &str, n: u64) -> String {
    if unit == "bytes" { dsort::format_size(n) } else { format!("{n} {unit}") }
}

impl Progress for CliProgress {
    fn start(&self, phase: Phase, total: Option<u64>, unit: &'static str) {
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            });
            let template = if unit == "bytes" {
                "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(phase.name());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        if bar.is_none() {
            self.log(&format!(
                "dsort: {phase}: started{}",
                total.map(|t| format!(" ({})", human(unit, t))).unwrap_or_default()
            ));
        }
        let now = Instant::now();
        let st = PhaseState { bar, total, unit, done: AtomicU64::new(0), started: now, last_log: now };
        self.state.lock().unwrap_or_else(|p| p.into_inner()).insert(phase, st);
    }

    fn advance(&self, phase: Phase, n: u64) {
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = map.get_mut(&phase) else { return };
        let done = st.done.fetch_add(n, Ordering::Relaxed) + n;
        match &st.bar {
            Some(bar) => bar.inc(n),
            None if st.last_log.elapsed() >= Duration::from_secs(5) => {
                st.last_log = Instant::now();
                let of = st.total.map(|t| format!(" of {}", human(st.unit, t))).unwrap_or_default();
                let line = format!("dsort: {phase}: {}{of}", human(st.unit, done));
                drop(map);
                self.log(&line);
            }
            None => {}
        }
    }

    fn finish(&self, phase: Phase) {
        let map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = map.get(&phase) else { return };
        match &st.bar {
            Some(bar) => bar.finish(),
            None => self.log(&format!("dsort: {phase}: done in {:.2}s", st.started.elapsed().as_secs_f64())),
        }
    }

    fn warn(&self, message: &str) {
        match &self.bars {
            Some(m) => {
                let _ = m.println(format!("warning: {message}"));
            }
            None => eprintln!("warning: {message}"),
        }
    }
}
