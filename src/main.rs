fn main() -> std::process::ExitCode {
    protloc::cli::main()
}
