//! The `edgecase` binary: parses the command line and reports errors; the work is in the
//! library.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
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
