//! Defect rules through the whole pipeline: readings over MQTT raise cases on the cases
//! exchange, once per occurrence, across a `kill -9` of the agent.

use crate::harness::*;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// (device, action) → distinct event ids seen on the cases exchange.
fn cases_by_device(c: &Collector) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in c.all() {
        let key = (
            r.device().to_string(),
            r.body["action"].as_str().unwrap_or("?").to_string(),
        );
        out.entry(key)
            .or_default()
            .insert(r.body["event_id"].as_str().unwrap_or("").to_string());
    }
    out
}

fn count(c: &Collector, device: &str, action: &str) -> usize {
    cases_by_device(c)
        .get(&(device.to_string(), action.to_string()))
        .map_or(0, BTreeSet::len)
}

async fn wait_cases(agent: &Agent, c: &Collector, want: &[(&str, &str, usize)]) {
    let ok = wait_for(Duration::from_secs(20), || async {
        want.iter().all(|(d, a, n)| count(c, d, a) >= *n).then_some(())
    })
    .await;
    if ok.is_none() {
        agent.fail(format!("cases expected {want:?}, seen {:#?}", cases_by_device(c)));
    }
}

pub(crate) async fn bind_cases_queue(names: &Names) {
    const T: Duration = Duration::from_secs(10);
    let conn = amqp_connect(T).await.expect("RabbitMQ");
    let ch = bounded("AMQP channel", T, conn.create_channel())
        .await
        .expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    bounded(
        "queue.declare",
        T,
        ch.queue_declare(names.queue.as_str().into(), durable, FieldTable::default()),
    )
    .await
    .expect("declare cases queue");
    let bind = ch.queue_bind(
        names.queue.as_str().into(),
        names.cases_exchange.as_str().into(),
        "case.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    bounded("queue.bind", T, bind).await.expect("bind cases queue");
    let _ = tokio::time::timeout(T, conn.close(200, "bound".into())).await;
}

async fn delete_queue(name: &str) {
    if let Ok(conn) = amqp_connect(Duration::from_secs(5)).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(name.into(), QueueDeleteOptions::default()).await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_are_raised_once_per_occurrence_across_kill_dash_nine() {
    let _rabbitmq = RABBITMQ.read().await;
    let mut bed = TestBed::new("cases");
    bed.config["rules"] = json!([
        {
            "name": "hot", "sensors": "temp", "kind": "above", "threshold": 50.0, "clear_level": 40.0,
            "clear_readings": 3, "division": "facilities",
            "case": { "Subject": "{device_id} {sensor} at {value}", "Priority": "High" },
            "on_clear": { "Status": "Closed" }
        },
        {
            "name": "quiet", "devices": "silent-*", "kind": "silent", "silent_for": "2s", "division": "field",
            "case": { "Subject": "{device_id} silent since {first_seen}" }
        }
    ]);
    let mut agent = bed.start_agent();
    agent.wait_connected(true).await;
    // The test's queue takes the cases; readings go to the unrouted queue.
    let mut cases_names = bed.names.clone();
    cases_names.queue = format!("{}-cases", bed.names.base);
    bind_cases_queue(&cases_names).await;
    let collector = Collector::start(&cases_names).await;
    let mut mqtt = Publisher::connect(&bed.names).await;
    wait_subscribed(&agent, &mut mqtt, &bed.names).await;

    let mut seq = 0u64;
    let mut send = async |mqtt: &mut Publisher, device: &str, values: &[f64]| {
        for v in values {
            seq += 1;
            mqtt.publish(
                &bed.names.topic(device, "temp"),
                json!({ "value": v, "seq": seq }).to_string(),
            )
            .await;
        }
    };
    // Phase 1: stuck high, flapping (never 3 clear readings in a row), high then cleared,
    // and a device that sends once and then goes quiet.
    send(&mut mqtt, "stuck", &[60.0, 61.0, 62.0, 63.0, 64.0]).await;
    send(&mut mqtt, "flap", &[60.0, 30.0, 60.0, 30.0, 60.0, 30.0, 60.0]).await;
    send(&mut mqtt, "again", &[60.0, 30.0, 30.0, 30.0]).await;
    send(&mut mqtt, "silent-1", &[1.0]).await;
    mqtt.wait_acked(Duration::from_secs(10))
        .await
        .expect("broker took phase 1");
    wait_cases(
        &agent,
        &collector,
        &[
            ("stuck", "raise", 1),
            ("flap", "raise", 1),
            ("again", "raise", 1),
            ("again", "clear", 1),
        ],
    )
    .await;
    // Everything of phase 1 is committed and published: kill the agent hard, restart it.
    agent
        .wait_metrics("phase 1 published", Duration::from_secs(20), |m| {
            m.value("edgecase_buffer_pending_readings") == 0.0
        })
        .await;
    agent.kill9();
    agent.restart();
    agent.wait_connected(true).await;

    // Phase 2: the open cases stay open (no second case), a new occurrence after the clear
    // raises a second case, and the quiet device raises its case on time.
    send(&mut mqtt, "stuck", &[65.0, 66.0, 67.0]).await;
    send(&mut mqtt, "flap", &[30.0, 60.0, 30.0]).await;
    send(&mut mqtt, "again", &[70.0]).await;
    mqtt.wait_acked(Duration::from_secs(10))
        .await
        .expect("broker took phase 2");
    wait_cases(&agent, &collector, &[("again", "raise", 2), ("silent-1", "raise", 1)]).await;
    // Give a wrong extra case the time to show up before counting.
    agent
        .wait_metrics("phase 2 published", Duration::from_secs(20), |m| {
            m.value("edgecase_buffer_pending_readings") == 0.0
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let seen = cases_by_device(&collector);
    let counts: BTreeMap<(String, String), usize> = seen.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    let want: BTreeMap<(String, String), usize> = [
        ("again", "clear", 1),
        ("again", "raise", 2),
        ("flap", "raise", 1),
        ("silent-1", "raise", 1),
        ("stuck", "raise", 1),
    ]
    .into_iter()
    .map(|(d, a, n)| ((d.to_string(), a.to_string()), n))
    .collect();
    assert_eq!(counts, want, "distinct cases by (device, action)");
    // The follow-up names the first occurrence of "again"; the second occurrence is new.
    let again_raises = &seen[&("again".to_string(), "raise".to_string())];
    let again_clear = &seen[&("again".to_string(), "clear".to_string())];
    assert_eq!(again_raises.intersection(again_clear).count(), 1);
    let stuck = collector
        .all()
        .into_iter()
        .find(|r| r.device() == "stuck")
        .expect("stuck case");
    assert_eq!(stuck.routing_key, "case.facilities");
    assert_eq!(stuck.body["case"]["Subject"], "stuck temp at 60");
    assert_eq!(stuck.message_id.as_deref(), stuck.body["event_id"].as_str());
    let duplicates = collector.all().len() - seen.values().map(BTreeSet::len).sum::<usize>();
    eprintln!("cases: {counts:?}; {duplicates} duplicate deliveries (allowed, same event_id)");

    collector.close().await;
    mqtt.disconnect().await;
    drop(agent);
    delete_queue(&cases_names.queue).await;
}
