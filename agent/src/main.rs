//! The `edgecase` binary: parses the command line and reports errors; the work is in the
//! library.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    memory_setup();
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

/// The agent's Rust allocations go to mimalloc. Under burst load glibc's malloc took about a
/// fifth of the agent's CPU in a profile: its threads allocate on one thread and free on
/// another all the time (runtime workers, the buffer writer, the AMQP client's I/O thread).
/// With mimalloc the bursts took a median of 28 µs of CPU per reading against 31.5 µs,
/// and end to end came closer to its goal (README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Memory settings that must be made before any other thread exists.
///
/// - Freed memory goes back to the OS at once (mimalloc's `purge_delay` 0; its default
///   keeps it for a second): peak RSS after three 20,000-reading bursts was 37-48 MB with
///   the default and 33-38 MB with 0.
/// - On glibc targets, see [`glibc_setup`].
fn memory_setup() {
    // SAFETY: sets one of mimalloc's options; options may be set at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
    glibc_setup();
}

/// mimalloc's `mi_option_purge_delay`: its option numbers are a stable ABI (renamed options
/// keep their number), and the Rust bindings leave this one out.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Settings for Linux with glibc, which the gateway builds are:
///
/// - No transparent huge pages for this process: mimalloc reserves its memory in large,
///   aligned regions, and a kernel that backs them with 2 MiB pages (THP `always`, or
///   `madvise` with mimalloc's own advice, which the `no_thp` feature leaves out) turns a
///   few touched bytes into 2 MiB of RSS. With THP, the idle agent took 26-30 MB instead
///   of 14-15 MB.
/// - glibc's malloc still serves SQLite's allocations. It gives each thread that contends
///   for it an arena of its own (up to eight per core), each keeping the memory freed into
///   it; four arenas cap that (with glibc for everything, peak RSS was 30-36 MB with four
///   against 33-42 MB with glibc's default).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_setup() {
    // SAFETY: each call only sets a flag or parameter of this process, before any other
    // thread exists.
    unsafe {
        // Fails only where the flag is unknown (kernels before 3.15, qemu's user mode):
        // there only THP `always` applies, as mimalloc asks for no huge pages.
        let _ = libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_setup() {}
