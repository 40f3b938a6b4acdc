//! `idem`: the idempotency gateway, its tools and its demo. See `idem --help` and
//! `docs/operating.md`.

use std::process::ExitCode;

use clap::Parser;
use idem_server::cli::{Cli, Command};
use idem_server::commands::{self, Failure};
use idem_server::telemetry;

fn main() -> ExitCode {
    // Command line: usage errors exit 64, --help and --version 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };

    // Telemetry: the demo prints a report, so its logs stay quiet unless asked for.
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    telemetry::init(cli.log_format, default_filter);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("idem: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };

    // Configuration, store, bind, serve and drain happen inside each command.
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => commands::serve(args).await,
            Command::Migrate(args) => commands::migrate(args).await,
            Command::Keys { command } => commands::keys(command).await,
            Command::Demo(args) => commands::demo(args).await,
        }
    });
    // Requests still running after the grace period end with the process.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("idem: {failure}");
            exit_code(&failure)
        }
    }
}

fn exit_code(failure: &Failure) -> ExitCode {
    ExitCode::from(failure.exit_code())
}
