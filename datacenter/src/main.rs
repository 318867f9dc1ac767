//! `lbs-datacenter`: thin entry point; everything lives in the library.

fn main() -> std::process::ExitCode {
    lbs_datacenter::cli::main()
}
