//! `vmm`: the command-line entry point. The command line, the commands and
//! their reports are the binary-only module tree [`cli`]; the VMM itself is
//! the library (`vmm::`).

mod cli;

use clap::Parser;
use cli::{Cli, Command, commands};
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let process_start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => commands::run(args, process_start),
        Command::Info(args) => commands::info(args, process_start),
        Command::Test(args) => commands::test(args, process_start),
        Command::Bench(args) => commands::bench(args, process_start),
        Command::Compare(args) => commands::compare(args),
    };
    ExitCode::from(code as u8)
}
