use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    handover::install_crypto_provider();
    let cli = handover::cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("handover: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli.run());
    // Whatever is still running is not waited for (a second stop signal means now).
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("handover: {error:#}");
            ExitCode::FAILURE
        }
    }
}
