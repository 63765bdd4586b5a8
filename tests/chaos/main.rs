//! `chaos`: run N chaos trials against fresh clusters of real processes and report (issue #11).
//!
//! ```sh
//! cargo run --release -p dsort-tests --bin chaos -- --trials 50 [--seed S] [--targets 3] \
//!     [--fault kill-target|stop-target|kill-coordinator|cut-link] [--logs DIR] [--replay TRIAL_SEED]
//! ```
//!
//! Each trial is described in `dsort_tests::chaos`. One line per trial, then a summary table; the exit status
//! is 1 when any trial is not clean (2 on bad arguments). The logs of unclean trials are kept under `--logs`
//! (default `target/chaos-logs`). The cut-link fault runs only as root with `ip`; otherwise it is left out,
//! with a note.

use dsort_tests::chaos::{Fault, TrialOptions, TrialPlan, netns_available, run_trial, summary};
use std::path::PathBuf;

struct Args {
    trials: usize,
    seed: u64,
    targets: usize,
    fault: Option<Fault>,
    logs: PathBuf,
    replay: Option<u64>,
}

const USAGE: &str = "usage: chaos [--trials N] [--seed S] [--targets N] [--fault KIND] [--logs DIR]
  --trials N   number of trials (default 50)
  --seed S     seed of the run (default: from the clock, printed); trial i uses a seed derived from it
  --targets N  targets per cluster (default 3, at least 2)
  --fault KIND only this fault: kill-target, stop-target, kill-coordinator, cut-link (default: random)
  --logs DIR   where the logs of unclean trials go (default target/chaos-logs)
  --replay S   run the one trial of seed S (as printed on a trial's line), with the same draw";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        trials: 50,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        targets: 3,
        fault: None,
        logs: PathBuf::from("target/chaos-logs"),
        replay: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> Result<u64, String> {
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.map_err(|e| format!("{flag} {v}: {e}"))
        };
        match flag.as_str() {
            "--trials" => a.trials = num(&value)? as usize,
            "--seed" => a.seed = num(&value)?,
            "--targets" => a.targets = num(&value)? as usize,
            "--fault" => {
                a.fault = Some(
                    Fault::ALL
                        .into_iter()
                        .find(|f| f.name() == value)
                        .ok_or_else(|| format!("unknown fault {value}"))?,
                )
            }
            "--logs" => a.logs = PathBuf::from(value),
            "--replay" => a.replay = Some(num(&value)?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.targets < 2 {
        return Err("--targets must be at least 2".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let mut faults = vec![Fault::KillTarget, Fault::StopTarget, Fault::KillCoordinator];
    match netns_available() {
        Ok(()) => faults.push(Fault::CutLink),
        Err(why) => {
            println!("note: the cut-link fault is skipped ({why}): it needs root and `ip` (network namespaces)");
            if args.fault == Some(Fault::CutLink) {
                eprintln!("chaos: --fault cut-link cannot run here");
                std::process::exit(2);
            }
        }
    }
    println!(
        "chaos: {} trials, seed {:#x}, {} targets, faults: {}",
        args.trials,
        args.seed,
        args.targets,
        args.fault.map_or_else(|| faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "), |f| f.name().into())
    );
    let opts = TrialOptions { save_logs: Some(args.logs.clone()) };
    let mut seeds = dsort_tests::chaos::Rng::new(args.seed);
    let mut reports = Vec::new();
    let trials = if args.replay.is_some() { 1 } else { args.trials };
    for i in 0..trials {
        let seed = args.replay.unwrap_or_else(|| seeds.next_u64());
        let plan = TrialPlan::draw(seed, args.targets, &faults, args.fault);
        let report = run_trial(i, &plan, &opts);
        println!("{}", report.line(i));
        reports.push(report);
    }
    println!("\n{}", summary(&reports));
    let unclean: Vec<String> = reports
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.clean())
        .map(|(i, r)| format!("{i} (seed {:#x})", r.plan.seed))
        .collect();
    if unclean.is_empty() {
        println!("{} of {} trials clean", reports.len(), reports.len());
    } else {
        println!("NOT CLEAN: trials {}", unclean.join(", "));
        std::process::exit(1);
    }
}
