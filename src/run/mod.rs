//! The whole command line for any app's routes (feature `cli`): `dev`, `serve`, `worker`,
//! `send`, `flush`, `stats` and `jobs`, with their flags, signals, metrics and exit codes.
//!
//! An app's binary is its routes and one call:
//!
//! ```no_run
//! use switchyard::layer::Layer;
//! use switchyard::routing::{Router, RouteError};
//!
//! fn routes(_layer: Layer) -> Result<Router, RouteError> {
//!     Router::new([])
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     switchyard::run::App::new(routes).main()
//! }
//! ```
//!
//! The routes function gets the process's layer so consumers can keep state in it; it is called
//! once per worker (and by `dev`). An app adds subcommands of its own with [`App::main_with`].
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration, 3 channel layer
//! unreachable, 4 the channel was full.

pub mod cli;
pub mod edge;
pub mod jobs_cmd;
pub mod roles;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::layer::Layer;
use crate::routing::{RouteError, Router};

pub use cli::{EXIT_FULL, EXIT_UNAVAILABLE, EXIT_USAGE, UsageError, exit_code_for};
pub use roles::stop_on_signals;

/// Builds an app's router on the process's channel layer.
pub type RoutesFn = Arc<dyn Fn(Layer) -> Result<Router, RouteError> + Send + Sync>;

/// Maps an app command's error to its exit code (`None`: the standard mapping).
pub type ExitCodes = fn(&anyhow::Error) -> Option<ExitCode>;

/// An app's command line: its routes plus how `dev` presents it.
#[derive(Clone)]
pub struct App {
    routes: RoutesFn,
    name: Option<String>,
    version: Option<String>,
    dev_page: String,
    exit_codes: Option<ExitCodes>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("dev_page", &self.dev_page)
            .finish_non_exhaustive()
    }
}

impl App {
    /// An app serving `routes`.
    pub fn new<F>(routes: F) -> Self
    where
        F: Fn(Layer) -> Result<Router, RouteError> + Send + Sync + 'static,
    {
        Self {
            routes: Arc::new(routes),
            name: None,
            version: None,
            dev_page: "/".to_owned(),
            exit_codes: None,
        }
    }

    /// The program name in `--help` (default: the executable's file name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The version `--version` prints (e.g. `env!("CARGO_PKG_VERSION")`).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The path `dev` prints and opens in a browser (default `/`).
    pub fn dev_page(mut self, path: impl Into<String>) -> Self {
        self.dev_page = path.into();
        self
    }

    /// Exit codes for the errors of the app's own commands (see [`App::main_with`]).
    pub fn exit_codes(mut self, map: ExitCodes) -> Self {
        self.exit_codes = Some(map);
        self
    }

    /// The app's router on `layer`.
    pub fn routes(&self, layer: Layer) -> Result<Router, RouteError> {
        (self.routes)(layer)
    }

    pub(crate) fn dev_page_path(&self) -> &str {
        &self.dev_page
    }

    /// Parses the process's arguments, runs the chosen command and returns its exit code.
    pub fn main(self) -> ExitCode {
        self.main_with(|never: NoCommands| async move { match never {} })
    }

    /// As [`App::main`], with the app's own subcommands `E` beside the standard ones; `run`
    /// runs them (on the same runtime, after logging is set up).
    pub fn main_with<E, F, Fut>(self, run: F) -> ExitCode
    where
        E: Subcommand,
        F: FnOnce(E) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let mut command = Cli::<E>::command();
        let name = self.name.clone().or_else(executable_name);
        if let Some(name) = name {
            command = command.name(name);
        }
        if let Some(version) = self.version.clone() {
            command = command.version(version);
        }
        let cli = match command
            .try_get_matches()
            .and_then(|m| Cli::<E>::from_arg_matches(&m))
        {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        };
        cli.log.init();
        let threads = cli.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            roles::default_threads(cli.command.role(), cpus)
        });
        let runtime = match runtime(threads) {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("switchyard: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let exit_codes = self.exit_codes;
        let result = runtime.block_on(async move {
            match cli.command {
                Command::Dev(args) => roles::dev(&self, args).await,
                Command::Serve(args) => roles::serve(args).await,
                Command::Worker(args) => roles::worker(&self, args).await,
                Command::Send(args) => cli::send(args).await,
                Command::Flush(args) => cli::flush(args).await,
                Command::Stats(args) => cli::stats(args).await,
                Command::Jobs(args) => jobs_cmd::run(args).await,
                Command::App(command) => run(command).await,
            }
        });
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard: {e:#}");
                exit_codes
                    .and_then(|map| map(&e))
                    .unwrap_or_else(|| exit_code_for(&e))
            }
        }
    }
}

fn executable_name() -> Option<String> {
    let arg0 = std::env::args_os().next()?;
    let name = std::path::Path::new(&arg0).file_name()?;
    Some(name.to_string_lossy().into_owned())
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    builder.enable_all().build()
}

/// A channel-layer realtime server: interface server, channel layer, workers.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "A channel-layer realtime server (interface server, Redis channel layer, workers)",
    long_about = None
)]
struct Cli<E: Subcommand> {
    #[command(flatten)]
    log: cli::LogArgs,
    /// Runtime threads: 0 = one per CPU; 1 = everything on one thread (no cross-thread
    /// wake-ups). Default: 1 for `worker` (scale workers by processes, as runworker), and for
    /// `serve` and `dev` one per CPU on machines with more than 2 CPUs, else 1.
    #[arg(long, global = true, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command<E>,
}

#[derive(Debug, Subcommand)]
enum Command<E: Subcommand> {
    /// Run everything in one process on the in-memory layer and serve the app.
    Dev(roles::DevCommand),
    /// Run the interface server: HTTP and WebSocket in, channel-layer messages out.
    Serve(roles::ServeCommand),
    /// Run the app's consumers on the channels its routes listen on.
    Worker(roles::WorkerCommand),
    /// Send one message (JSON) to a channel or a group.
    Send(cli::SendArgs),
    /// Delete every channel and group under the prefix.
    Flush(cli::FlushArgs),
    /// Show channel depths, process inbox depths and group sizes.
    Stats(cli::StatsArgs),
    /// Durable channels: per-channel figures, dead letters (list, retry, purge).
    Jobs(jobs_cmd::JobsArgs),
    #[command(flatten)]
    App(E),
}

impl<E: Subcommand> Command<E> {
    /// Which long-running role the command is, for its default runtime threads.
    fn role(&self) -> roles::Role {
        match self {
            Command::Serve(_) => roles::Role::Serve,
            Command::Dev(_) => roles::Role::Dev,
            Command::Worker(_) => roles::Role::Worker,
            Command::Send(_)
            | Command::Flush(_)
            | Command::Stats(_)
            | Command::Jobs(_)
            | Command::App(_) => roles::Role::Tool,
        }
    }
}

/// No subcommands of the app's own ([`App::main`]).
#[derive(Debug, Clone, Copy)]
pub enum NoCommands {}

impl FromArgMatches for NoCommands {
    fn from_arg_matches(_: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Err(clap::Error::new(clap::error::ErrorKind::MissingSubcommand))
    }

    fn update_from_arg_matches(&mut self, _: &clap::ArgMatches) -> Result<(), clap::Error> {
        match *self {}
    }
}

impl Subcommand for NoCommands {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        cmd
    }

    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        cmd
    }

    fn has_subcommand(_: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Subcommand)]
    enum Extra {
        /// An app's own command.
        Hello { name: String },
    }

    fn parse<E: Subcommand>(args: &[&str]) -> Result<Cli<E>, clap::Error> {
        Cli::<E>::command()
            .try_get_matches_from(args)
            .and_then(|m| Cli::<E>::from_arg_matches(&m))
    }

    #[test]
    fn the_standard_commands_parse_without_app_commands() {
        let cli = parse::<NoCommands>(&["app", "stats", "--layer", "memory://"]).unwrap();
        assert!(matches!(cli.command, Command::Stats(_)));
        assert!(parse::<NoCommands>(&["app", "hello", "x"]).is_err());
        Cli::<NoCommands>::command().debug_assert();
    }

    #[test]
    fn app_commands_sit_beside_the_standard_ones() {
        let cli = parse::<Extra>(&["app", "hello", "x"]).unwrap();
        match cli.command {
            Command::App(Extra::Hello { name }) => assert_eq!(name, "x"),
            other => panic!("parsed as {other:?}"),
        }
        let cli = parse::<Extra>(&["app", "--threads", "1", "worker"]).unwrap();
        assert_eq!(cli.threads, Some(1));
        assert_eq!(cli.command.role(), roles::Role::Worker);
        Cli::<Extra>::command().debug_assert();
    }
}
