//! `lbs`: thin entry point; everything lives in the `lbs_agent` library.

fn main() -> std::process::ExitCode {
    lbs_agent::cli::main()
}
