//! A smoke run of the chaos trials (`tests/src/chaos.rs`, run in full by the `chaos` binary): one trial per
//! fault kind that needs no root (kill -9 of a target, SIGSTOP of a target, kill -9 of the coordinator), each
//! on a fresh cluster of real processes, each with every check of a full run.

use dsort_tests::chaos::{Fault, TrialOptions, TrialPlan, run_trial};

#[test]
fn one_trial_per_fault_kind_is_clean() {
    let faults = [Fault::KillTarget, Fault::StopTarget, Fault::KillCoordinator];
    let mut unclean = Vec::new();
    for (i, fault) in faults.into_iter().enumerate() {
        // Fixed seeds: the same trials every run (the seed also picks the phase, the target and the order).
        let plan = TrialPlan::draw(0x5eed_0000 + i as u64, 3, &faults, Some(fault));
        let report = run_trial(i, &plan, &TrialOptions::default());
        println!("{}", report.line(i));
        assert_eq!(report.plan.fault, fault);
        assert!(report.ended.is_some(), "trial {i} started its job: {}", report.line(i));
        if !report.clean() {
            unclean.push(report.line(i));
        }
    }
    assert!(unclean.is_empty(), "unclean trials:\n{}", unclean.join("\n"));
}
