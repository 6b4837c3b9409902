//! The `switchyard` binary: the reference app's routes on the standard command line, plus
//! `bench`.

use std::process::ExitCode;

use clap::Subcommand;
use switchyard::run::App;
use switchyard_workers::{app, bench};

/// mimalloc: more echoes per CPU-second than glibc malloc, and idle sockets cost less (no
/// per-thread arena fragmentation).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The reference app's own commands.
#[derive(Debug, Subcommand)]
enum Tools {
    /// Generate load against a running server and report latency, throughput and loss.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    App::new(app::routes)
        .name("switchyard")
        .version(env!("CARGO_PKG_VERSION"))
        .dev_page("/chat/lobby/")
        .exit_codes(bench::exit_code_for)
        .main_with(|tools: Tools| async move {
            match tools {
                Tools::Bench(args) => bench::run(args).await,
            }
        })
}
