//! The one `dsort` binary: parse, dispatch to the library, print the error chain; exit 1 on failure and
//! 130 when the job was interrupted (Ctrl-C / SIGTERM), as shells expect.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = coordinator::cli::Cli::parse();
    // Any number of input shards and connections: the soft open-file limit up to the hard one.
    dsort::files::raise_open_files_limit();
    match coordinator::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsort: error: {e:#}");
            let cancelled = e.chain().any(|c| matches!(c.downcast_ref(), Some(dsort::job::JobError::Cancelled)));
            std::process::ExitCode::from(if cancelled { 130 } else { 1 })
        }
    }
}
