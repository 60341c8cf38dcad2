//! `edgecase demo`: the whole path with no external service, and with `--amqp` through the
//! real RabbitMQ.

use crate::harness::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

fn line_value(out: &str, label: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} line in the demo's output:\n{out}"))
}

#[tokio::test]
async fn demo_runs_a_minute_without_services_and_raises_cases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("demo.sqlite");
    let out = run_cli(
        &[
            "demo",
            "--duration",
            "65s",
            "--report-every",
            "10",
            "--db",
            db.to_str().expect("path"),
        ],
        Duration::from_secs(120),
    )
    .await
    .expect("edgecase demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("embedded MQTT broker on 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("publishing to an in-process queue"), "{stdout}");
    assert!(
        stdout.matches("] readings in").count() >= 5,
        "live counts while it runs:\n{stdout}"
    );
    let readings = line_value(&stdout, "readings in");
    let published = line_value(&stdout, "published");
    let raised = line_value(&stdout, "cases raised");
    let dead = line_value(&stdout, "dead letters");
    // Five devices over MQTT and one over the virtual serial line, about 9 readings a second.
    assert!(readings > 400, "{stdout}");
    assert!(
        published >= readings,
        "every reading and case handed to the queue:\n{stdout}"
    );
    // Overheating boiler, stuck pressure, humidity out of range and a stuck boiler
    // temperature within the first minute (the silent meter's case comes a minute after its
    // last reading, at the very end of this run or just after).
    assert!(raised >= 4, "{stdout}");
    for subject in ["boiler-1: temp at", "pump-3: pressure stuck", "hvac-2: humidity"] {
        assert!(
            stdout.contains(&format!("case: {subject}")),
            "missing {subject:?}:\n{stdout}"
        );
    }
    assert!(dead >= 2, "the garbage inputs are dead-lettered:\n{stdout}");
    assert_eq!(line_value(&stdout, "left in buffer"), 0, "{stdout}");
    // The DB connector stored every reading once and every case event in the database the
    // demo names.
    assert!(
        stdout.contains(&format!("database         {}", db.display())),
        "{stdout}"
    );
    let conn = rusqlite::Connection::open(&db).expect("the demo's database");
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).expect(sql) as u64;
    // Every message the queue took (readings and case events) is one row; "readings in"
    // can be higher by the repeats the buffer recognised (a binary frame retransmitted).
    assert_eq!(
        count("SELECT COUNT(*) FROM readings") + count("SELECT COUNT(*) FROM cases"),
        published,
        "{stdout}"
    );
    assert!(count("SELECT COUNT(*) FROM readings") <= readings, "{stdout}");
    assert!(
        count("SELECT COUNT(*) FROM cases WHERE action = 'raise'") >= raised,
        "{stdout}"
    );
    // Every case raised became one Case in the Salesforce emulator; the boiler's clear
    // closed its Case.
    assert_eq!(line_value(&stdout, "cases in Salesforce"), raised, "{stdout}");
    assert!(
        stdout.contains("SALESFORCE Case 00001001 created (device boiler-1)"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("salesforce: 00001001 Closed boiler-1: temp at")),
        "{stdout}"
    );
    // The loop closes: each Case change came back through the PushTopic source onto the
    // queue, the boiler's Case as created and then as closed.
    let back = line_value(&stdout, "case events back");
    assert!(back > raised, "{stdout}");
    assert!(
        stdout.contains(&format!("for {back} Case changes in Salesforce")),
        "one event per Case change:\n{stdout}"
    );
    for event in [
        "Case 00001001 created (device boiler-1)",
        "Case 00001001 updated (device boiler-1) Status=\"Closed\"",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains("PUSHTOPIC /topic/EdgecaseDemoCases") && l.contains(event)),
            "no PushTopic event {event:?}:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn demo_with_amqp_delivers_to_rabbitmq() {
    let _rabbitmq = RABBITMQ.read().await;
    const T: Duration = Duration::from_secs(10);
    let conn = amqp_connect(T).await.expect("RabbitMQ");
    let ch = bounded("channel", T, conn.create_channel()).await.expect("channel");
    // The demo uses the default names; declare them as the agent does so the test's queue
    // can be bound before the demo starts.
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let fanout = bounded(
        "declare unrouted",
        T,
        ch.exchange_declare(
            "edgecase.unrouted".into(),
            lapin::ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        ),
    );
    fanout.await.expect("declare edgecase.unrouted");
    let mut ae = FieldTable::default();
    ae.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString("edgecase.unrouted".into()),
    );
    let queue = format!("t-demo-amqp-{}", std::process::id());
    let opts = QueueDeclareOptions {
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    bounded(
        "declare queue",
        T,
        ch.queue_declare(queue.as_str().into(), opts, FieldTable::default()),
    )
    .await
    .expect("queue");
    for (exchange, key) in [("edgecase.cases", "case.#"), ("edgecase.readings", "reading.#")] {
        let declare = ch.exchange_declare(exchange.into(), lapin::ExchangeKind::Topic, durable, ae.clone());
        bounded("declare exchange", T, declare).await.expect("exchange");
        let bind = ch.queue_bind(
            queue.as_str().into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        bounded("bind", T, bind).await.expect("bind");
    }
    let consume = ch.basic_consume(
        queue.as_str().into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    );
    let mut consumer = bounded("consume", T, consume).await.expect("consume");
    let url = format!("--amqp={AMQP_URL}");
    let demo =
        tokio::spawn(async move { run_cli(&["demo", &url, "--duration", "25s"], Duration::from_secs(60)).await });
    let (mut readings, mut cases) = (0u64, 0u64);
    let collect = async {
        while let Some(Ok(d)) = consumer.next().await {
            if d.routing_key.as_str().starts_with("case.") {
                cases += 1;
            } else {
                readings += 1;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), collect).await;
    let out = demo.await.expect("demo task").expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("publishing to amqp://guest:***@127.0.0.1:5672"),
        "{stdout}"
    );
    let published = line_value(&stdout, "published");
    assert!(
        readings > 100,
        "readings delivered through RabbitMQ: {readings}\n{stdout}"
    );
    assert!(cases >= 2, "cases delivered through RabbitMQ: {cases}\n{stdout}");
    // The Salesforce connector consumed its own queues and created the Cases.
    assert!(
        line_value(&stdout, "cases in Salesforce") >= 2,
        "Cases created through RabbitMQ and the connector:\n{stdout}"
    );
    assert_eq!(
        readings + cases,
        published,
        "the queue got what the demo says it published\n{stdout}"
    );
    // The Cases' PushTopic events came back through RabbitMQ (read back by the demo).
    let back = line_value(&stdout, "case events back");
    assert!(back >= 2, "{stdout}");
    assert!(
        stdout.contains(&format!("for {back} Case changes in Salesforce")),
        "one event per Case change:\n{stdout}"
    );
    assert!(
        stdout.contains("PUSHTOPIC /topic/EdgecaseDemoCases replay 1 -> edgecase.salesforce pushtopic.EdgecaseDemoCases: Case 00001001 created"),
        "{stdout}"
    );
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}
