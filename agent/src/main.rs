//! The `edgecase` binary: parses the command line and reports errors; the work is in the
//! library.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = cli::Cli::parse();
    if cli.only_prints() {
        restore_sigpipe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgecase: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.execute()) {
        Ok(()) => ExitCode::SUCCESS,
        // The command has already said why.
        Err(e) if e.downcast_ref::<cli::Exit>().is_some() => {
            ExitCode::from(e.downcast_ref::<cli::Exit>().map_or(1, |x| x.0))
        }
        Err(e) => {
            // {:#} prints the whole chain: "cannot start the agent: data directory ... in use".
            eprintln!("edgecase: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so printing to a closed pipe is an error, and `println!` panics on
/// it. Commands that only print get the default action back: `edgecase check | head` ends
/// quietly, as Unix tools do. The agent and the connectors keep it ignored, so a peer that
/// closes a socket is an error they handle, not a signal that kills them.
fn restore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_DFL installs no handler code; nothing else has touched SIGPIPE yet.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("edgecase: cannot restore SIGPIPE ({e}); output to a closed pipe may fail loudly");
    }
}

/// glibc's malloc gives each thread that contends for it an arena of its own (up to eight
/// per core), and each arena keeps the memory freed into it. The agent's threads (runtime
/// workers, the buffer writer, the AMQP client's I/O thread, blocking sections) allocate on
/// one thread and free on another all the time, so under load every arena grows, and RSS
/// with them. Measured with `scripts/bench.sh` (peak RSS after three 20,000-reading bursts):
/// 30-36 MB with four arenas against 33-42 MB with glibc's default; two gave 28-31 MB but
/// cost a third more CPU per reading in malloc's locks.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets a malloc parameter; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
