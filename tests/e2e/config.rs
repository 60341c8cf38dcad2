//! A broken config stops `check` and `run` at once, with a message naming the key and the
//! file; `check` never prints the AMQP password.

use crate::harness::*;
use serde_json::{Value, json};
use std::time::Duration;

/// Each case: a name (used in the file name), how it breaks a valid config, and what the
/// error must mention besides the file name.
type Breakage = (&'static str, fn(&mut Value), &'static [&'static str]);

const BROKEN: &[Breakage] = &[
    (
        "unknown-key",
        |c| c["mqtt"]["urll"] = json!("mqtt://127.0.0.1:1883"),
        &["mqtt", "urll"],
    ),
    (
        "wrong-type",
        |c| c["buffer"] = json!({ "max_readings": "lots" }),
        &["buffer.max_readings"],
    ),
    (
        "amqp-scheme",
        |c| c["amqp"]["url"] = json!("http://x"),
        &["amqp.url", "http"],
    ),
    (
        "topic-filter",
        |c| c["mqtt"]["topics"] = json!(["a/b#"]),
        &["mqtt.topics[0]", "a/b#"],
    ),
    (
        "admin-listen",
        |c| c["admin"]["listen"] = json!("nope"),
        &["admin.listen", "nope"],
    ),
    (
        "serial-no-path",
        |c| c["serial"] = json!([{ "baud_rate": 115200, "device_id": "d" }]),
        &["serial", "path"],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_names_the_key() {
    // Nothing here reaches RabbitMQ: every config is refused before the agent starts.
    let bed = TestBed::new("bad-config");
    let data_dir = bed.data_dir();
    let mut failures = Vec::new();
    for (name, breaks, mentions) in BROKEN {
        let mut config = bed.config.clone();
        breaks(&mut config);
        let file_name = format!("broken-{name}.toml");
        let path = bed.dir.path().join(&file_name);
        write_toml(&path, &config);
        let path = path.to_str().expect("utf-8 path");
        for args in [
            vec!["check", "--config", path],
            vec!["run", "--config", path, "--data-dir", data_dir.to_str().unwrap()],
        ] {
            let out = match run_cli(&args, Duration::from_secs(10)).await {
                Ok(out) => out,
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                failures.push(format!("{name}: `edgecase {}` succeeded with a broken config", args[0]));
            }
            for want in mentions.iter().chain([&file_name.as_str()]) {
                if !stderr.contains(want) {
                    failures.push(format!(
                        "{name}: `edgecase {}` stderr does not mention {want:?}: {stderr}",
                        args[0]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        !data_dir.exists(),
        "`run` with a broken config created the data directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_redacts_the_amqp_password() {
    let bed = TestBed::new("check-redacts");
    let path = bed.write_config();
    let out = run_cli(&["check", "--config", path.to_str().unwrap()], Duration::from_secs(10))
        .await
        .expect("check runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check refused a valid config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("amqp://guest:***@127.0.0.1:5672/%2f"), "{stdout}");
    assert!(!stdout.contains("guest:guest"), "password shown: {stdout}");
    assert!(
        stdout.contains(&bed.names.readings_exchange),
        "resolved settings shown: {stdout}"
    );
}
