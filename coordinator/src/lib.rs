//! `dsort-coordinator`: the cluster side of dsort (coordinator, targets, REST API; to come) and the
//! command line of the one `dsort` binary.

pub mod buckets;
pub mod cli;
pub mod cluster;
pub mod placement;
