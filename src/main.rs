//! The `tally` binary: `serve` (the default) and `check-config`; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use tally::clock::SystemClock;
use tally::config::Config;

#[derive(Parser)]
#[command(name = "tally", version, about = "a real-time metrics node")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (for `serve` when no sub-command is given).
    #[arg(long, global = true, default_value = "config/default.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Start the node (the default).
    Serve {
        /// Also generate synthetic traffic for the demo tenant (see /wall#token=demo-key).
        #[arg(long)]
        demo: bool,
    },
    /// Validate a config file and print every problem with its key path.
    CheckConfig,
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path, std::env::vars()).map_err(|issues| {
        eprintln!("tally: {} has {} problem(s):", path.display(), issues.len());
        for issue in &issues {
            eprintln!("  {issue}");
        }
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { demo: false }) {
        Command::CheckConfig => match load(&cli.config) {
            Ok(_) => {
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve { demo } => {
            let mut config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            if demo {
                // the demo's alert rules, checked with the rest at start
                config.alerts.extend(tally::demo::alert_rules());
            }
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            serve(config, demo)
        }
    }
}

/// Raises the soft limit of open files to the hard one: connections and live
/// sessions are files, and a soft limit of 1024 (a common default) would
/// refuse them at accept long before `server.connections_max`.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is "unlimited": nothing to raise to, or nothing to raise
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum) {
        if current >= maximum {
            return;
        }
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            eprintln!("tally: the open files limit stays at {current}: {error}");
        }
    }
}

fn serve(config: Config, demo: bool) -> ExitCode {
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tally: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match tally::app::start(config, Arc::new(SystemClock)).await {
            Ok(running) => running,
            Err(error) => {
                eprintln!("tally: {error}");
                return ExitCode::FAILURE;
            }
        };
        let demo_traffic = demo.then(|| {
            tracing::info!("--demo: synthetic traffic for the demo tenant");
            tokio::spawn(tally::demo::run(std::sync::Arc::clone(&running.node)))
        });
        let mut fatal = running.fatal();
        let storage_failed = tokio::select! {
            _ = wait_for_signal() => None,
            changed = fatal.wait_for(Option::is_some) => Some(match changed {
                Ok(reason) => reason.clone().unwrap_or_default(),
                Err(_) => "the node's fatal channel closed".into(),
            }),
        };
        if let Some(task) = demo_traffic {
            task.abort();
        }
        let code = match storage_failed {
            None => {
                tracing::info!("shutting down");
                running.shutdown().await;
                0
            }
            Some(reason) => {
                // a failed flush is never retried, and a tenant that stopped serving
                // lacks durable events in memory: exit so that a restart recovers
                tracing::error!(%reason, "exiting for a clean restart");
                running.shutdown().await;
                3
            }
        };
        // Everything acknowledged was flushed by the committer, and shutdown
        // waited for what it could within its grace period. Exit here, not in
        // destructors: dropping the store flushes it, and on a full disk that
        // flush never returns, which would keep the process (and the store's
        // lock) alive with nothing serving.
        tracing::info!(code, "tally exits");
        std::process::exit(code)
    })
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the node");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
