//! The `switchyard` binary: parses the command line and runs the chosen role.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard_workers::bench;
use switchyard_workers::cli::{self, FlushArgs, LogArgs, SendArgs, StatsArgs};
use switchyard_workers::roles::{self, DevArgs, ServeArgs, WorkerCommandArgs};

/// mimalloc: ~10 % more echoes per CPU-second than glibc malloc here, and idle sockets cost less
/// (no per-thread arena fragmentation; BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchyard: a channel-layer realtime server (interface server, Redis channel layer, workers).
#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Switchyard: a channel-layer realtime server (interface server, Redis channel layer, workers)",
    long_about = None
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    /// Runtime threads: 0 = one per CPU; 1 = everything on one thread (no cross-thread
    /// wake-ups). Default: 1 for `worker` (scale workers by processes, as runworker), and for
    /// `serve` and `dev` one per CPU on machines with more than 2 CPUs, else 1 (BENCHMARKS.md).
    #[arg(long, global = true, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process on the in-memory layer and serve the chat page.
    Dev(DevArgs),
    /// Run the interface server: HTTP and WebSocket in, channel-layer messages out.
    Serve(ServeArgs),
    /// Run the app's consumers on the channels its routes listen on.
    Worker(WorkerCommandArgs),
    /// Send one message (JSON) to a channel or a group.
    Send(SendArgs),
    /// Delete every channel and group under the prefix.
    Flush(FlushArgs),
    /// Show channel depths, process inbox depths and group sizes.
    Stats(StatsArgs),
    /// Durable channels: per-channel figures, dead letters (list, retry, purge).
    Jobs(switchyard_workers::jobs_cmd::JobsArgs),
    /// Generate load against a running server and report latency, throughput and loss.
    Bench(switchyard_workers::bench::BenchArgs),
}

impl Command {
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
            | Command::Bench(_) => roles::Role::Tool,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    let threads = cli.threads.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        roles::default_threads(cli.command.role(), cpus)
    });
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => roles::dev(args).await,
            Command::Serve(args) => roles::serve(args).await,
            Command::Worker(args) => roles::worker(args).await,
            Command::Send(args) => cli::send(args).await,
            Command::Flush(args) => cli::flush(args).await,
            Command::Stats(args) => cli::stats(args).await,
            Command::Jobs(args) => switchyard_workers::jobs_cmd::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            bench::exit_code_for(&e).unwrap_or_else(|| cli::exit_code_for(&e))
        }
    }
}
