//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.
//!
//! - `cargo xtask test`: installs the system packages the tests need, then fmt, clippy, the
//!   fuzz target's build and every test; root-only tests that skipped are counted and, as
//!   root, fail the run.
//! - `cargo xtask demo`: builds everything and shows the product working, step by step.

mod demo;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lbs project automation", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install test prerequisites (Debian, as root) and run every check and test.
    Test(test::TestArgs),
    /// Build lbs and run the demonstration, printing a timeline.
    Demo(demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => demo::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
