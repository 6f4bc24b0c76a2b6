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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every option and positional argument of every subcommand says what it does in
    /// `--help` (an undocumented flag shows as a bare name).
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    let name = arg
                        .get_long()
                        .map_or_else(|| format!("<{}>", arg.get_id()), |long| format!("--{long}"));
                    missing.push(format!("{path} {name}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "protloc", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }
}
