//! The `letro-server` binary: parses the command line and runs a subcommand.

use clap::Parser;

use letro_server::app::{App, Opening, open_store};
use letro_server::cli::{Cli, Command};
use letro_server::telemetry::{LogTarget, init_logging};
use letro_server::{admin, demo};

/// Every request allocates a few dozen short-lived buffers (headers, JSON, SQL values) on
/// two threads and frees them on another; glibc's allocator spent a fifth of the server's
/// request-handling time on that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (target, filter) = match cli.command {
        Command::Serve(_) => (LogTarget::Stdout, "info"),
        // The demo's story is on stdout; the server's routine logs would drown it.
        Command::Demo(_) => (LogTarget::Stderr, "warn"),
        _ => (LogTarget::Stderr, "info"),
    };
    let _logs = init_logging(cli.log_format, target, filter);
    match cli.command {
        Command::Serve(args) => {
            let config = args.to_config().unwrap_or_else(|e| invalid(&e));
            #[cfg(unix)]
            letro_server::app::raise_fd_limit(config.max_connections);
            let app = App::build(config).await?;
            app.run(shutdown_signal()).await
        }
        Command::Migrate(args) => {
            let store = open_store(&args.to_config()?, Opening::Migrate).await?;
            store.close().await;
            tracing::info!("database is up to date");
            Ok(())
        }
        Command::CheckConfig(args) => {
            let config = args.to_config().unwrap_or_else(|e| invalid(&e));
            print!("{}", admin::describe(&config));
            Ok(())
        }
        Command::Outbox(command) => {
            print!("{}", admin::outbox(command).await?);
            Ok(())
        }
        Command::Requests(command) => {
            print!("{}", admin::requests(command).await?);
            Ok(())
        }
        Command::Demo(args) => demo::run(args, &mut std::io::stdout()).await,
    }
}

/// A configuration error ends the process with status 2, as a bad flag does (clap): the
/// platform's restart loop and the operator both see a usage error, not a crash.
fn invalid(e: &letro_server::config::ConfigError) -> ! {
    eprintln!("invalid configuration: {e}");
    std::process::exit(2);
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
