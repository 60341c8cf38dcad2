//! `edgecase rules test`: the example rules replayed over the example readings raise the
//! cases a site engineer would expect, once each.

use crate::harness::*;
use serde_json::Value;
use std::time::Duration;

#[tokio::test]
async fn rules_test_replays_the_example_readings() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let config = format!("{root}/gateway.toml");
    let input = format!("{root}/readings.jsonl");
    let out = run_cli(
        &["rules", "test", "--config", &config, "--input", &input, "--json"],
        Duration::from_secs(20),
    )
    .await
    .expect("edgecase rules test runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a case event"))
        .collect();
    let seen: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or("").into(),
                e["rule"].as_str().unwrap_or("").into(),
                e["device_id"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let want = [
        ("raise", "device-silent", "pump-7"),
        ("raise", "temperature-high", "boiler-1"),
        ("raise", "humidity-out-of-range", "boiler-1"),
        ("clear", "temperature-high", "boiler-1"),
        ("raise", "sensor-stuck", "boiler-1"),
        ("clear", "device-silent", "pump-7"),
    ]
    .map(|(a, r, d)| (a.to_string(), r.to_string(), d.to_string()));
    assert_eq!(seen, want, "{events:#?}");
    let temp = &events[1];
    assert_eq!(temp["case"]["Subject"], "boiler-1: temp at 83C, above 80");
    assert_eq!(temp["case"]["Priority"], "High");
    assert_eq!(temp["division"], "facilities");
    assert_eq!(
        events[3]["event_id"], temp["event_id"],
        "the follow-up names the case it closes"
    );
    assert!(
        stderr.contains("66 readings, 4 case(s) raised, 2 follow-up(s), 0 line(s) skipped"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_rule_with_an_unknown_placeholder_fails_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad-rule.toml");
    std::fs::write(
        &path,
        "[[rules]]\nname = \"hot\"\nkind = \"above\"\nthreshold = 1.0\ndivision = \"x\"\n[rules.case]\nSubject = \"{device} hot\"\n",
    )
    .expect("write config");
    let path = path.to_string_lossy().to_string();
    for args in [
        vec!["check", "--config", &path],
        vec!["run", "--config", &path, "--data-dir", "/nonexistent/never"],
    ] {
        let out = run_cli(&args, Duration::from_secs(20)).await.expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(r#"rules[0] "hot": case.Subject: unknown placeholder {device}"#),
            "{stderr}"
        );
        assert!(stderr.contains("bad-rule.toml"), "{stderr}");
    }
}
