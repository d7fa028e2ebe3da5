use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    handover::install_crypto_provider();
    let cli = handover::cli::Cli::parse();
    handover::cli::init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("handover: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("handover: {error:#}");
            ExitCode::FAILURE
        }
    }
}
