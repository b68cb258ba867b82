//! The `letro-server` binary: parses the command line and runs a subcommand.

use clap::Parser;

use letro_server::app::{App, open_store};
use letro_server::cli::{Cli, Command};
use letro_server::telemetry::init_logging;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            let config = args.to_config()?;
            let app = App::build(config).await?;
            app.run(shutdown_signal()).await
        }
        Command::Migrate(args) => {
            let store = open_store(&args.to_config()?).await?;
            store.close().await;
            tracing::info!("database is up to date");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM (what container platforms send) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
