//! The one `dsort` binary: parse, dispatch to the library, print the error chain, exit 1 on failure.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = coordinator::cli::Cli::parse();
    match coordinator::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsort: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
