//! Third-party Salesforce clients against the emulator: if a real client misreads an
//! answer, the emulator is wrong. `scripts/services.sh` installs the clients (Python's
//! simple-salesforce, npm's jsforce).

use salesforce_emulator::{Emulator, EmulatorConfig};
use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_salesforce_logs_in_creates_upserts_and_queries() {
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("start the emulator");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = dir.join("tests/simple_salesforce_client.py");
    let key = dir.join("testdata/jwt-test-key.pem");
    let url = emulator.url().to_string();
    let out = tokio::task::spawn_blocking(move || Command::new("python3").arg(&script).arg(&url).arg(&key).output())
        .await
        .expect("join")
        .expect("run python3 (scripts/services.sh installs it with simple-salesforce)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "simple-salesforce against the emulator failed ({}); run scripts/services.sh if the module is missing\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    // The client's writes are in the org.
    let cases = emulator.cases();
    assert!(
        cases
            .iter()
            .any(|c| c.get("Subject").and_then(|s| s.as_str()) == Some("from simple-salesforce"))
    );
    assert_eq!(
        cases
            .iter()
            .filter(|c| c.get("Edge_Event_Id__c").and_then(|s| s.as_str()) == Some("py-event-1"))
            .count(),
        1,
        "one Case per external id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsforce_logs_in_creates_upserts_and_queries() {
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("start the emulator");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jsforce");
    assert!(
        dir.join("node_modules/jsforce/package.json").is_file(),
        "jsforce is not installed in {}; run scripts/services.sh",
        dir.display()
    );
    let url = emulator.url().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("client.js")
            .arg(&url)
            .current_dir(&dir)
            .output()
    })
    .await
    .expect("join")
    .expect("run node (scripts/services.sh installs it with jsforce)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "jsforce against the emulator failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    let cases = emulator.cases();
    assert_eq!(
        cases
            .iter()
            .filter(|c| c.get("Edge_Event_Id__c").and_then(|s| s.as_str()) == Some("js-event-1"))
            .count(),
        1,
        "one Case per external id"
    );
}
