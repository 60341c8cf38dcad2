//! The Streaming API (PushTopics over Bayeux) against a third-party client: faye, the
//! Bayeux client jsforce uses for Salesforce streaming. `scripts/services.sh` installs it
//! (through `scripts/streaming-clients.sh`).

use salesforce_emulator::{Emulator, EmulatorConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

fn node_path() -> PathBuf {
    match std::env::var_os("EDGECASE_NODE_DIR") {
        Some(d) => PathBuf::from(d).join("node_modules"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/edgecase-node/node_modules"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faye_subscribes_with_replay_and_receives_case_events_in_order() {
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("start the emulator");
    // Short long-polls, so the client goes through several connect cycles.
    emulator.streaming.update_settings(|s| s.connect_timeout_ms = 1500);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faye_streaming_client.js");
    let url = emulator.url().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .arg(&url)
            .env("NODE_PATH", node_path())
            .output()
    })
    .await
    .expect("join")
    .expect("run node (scripts/services.sh installs it with faye)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "faye against the emulator failed ({}); run scripts/services.sh if faye is missing\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    let stats = emulator.streaming.stats();
    assert!(stats.handshakes >= 4, "{stats:?}");
    assert_eq!(stats.invalid_replay, 1, "{stats:?}");
    // Three matching creates and one matching update: four events, whatever the clients.
    assert_eq!(stats.events_emitted, 4, "{stats:?}");
}
