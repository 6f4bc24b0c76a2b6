//! The `protloc` command line: argument parsing and dispatch. Each subcommand is a thin
//! layer over the library.

mod commands;
mod demo;
mod device;
mod interop;

use std::process::ExitCode;

use clap::Parser;

pub use commands::Cli;

/// Parses arguments, runs the command, prints errors (with their causes) and maps them to
/// a non-zero exit code.
pub fn main() -> ExitCode {
    crate::runtime::tune_for_tensors();
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROTLOC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
