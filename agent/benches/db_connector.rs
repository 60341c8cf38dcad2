//! DB connector benchmark: `cargo bench -p edgecase --bench db_connector`
//! (`scripts/bench.sh db` starts the services first).
//!
//! subscribe-and-write into PostgreSQL, rows per second, batched (`broker.batch_size` 500:
//! the messages already waiting go into one transaction) versus one transaction per message
//! (`batch_size` 1), measured in the same run on the same machine, through the library call
//! [`DbConnector::subscribe_and_write`] exactly as the command runs it. The source queue is
//! filled first, so both runs face a full queue: the rate is the connector's, not the
//! publisher's. A row counts once it is committed (the consumer acknowledges after that).
//! Goal: batched at least 10 times the unbatched rate.
//!
//! For reference it also measures the ceiling: the same rows inserted with plain
//! tokio-postgres, pipelined, 500 a transaction, no broker.

use edgecase::config::Secret;
use edgecase::connectors::db::{DbConnector, DbConnectorConfig, Outcome};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BATCHED_N: u64 = 30_000;
const UNBATCHED_N: u64 = 3_000;
const BATCH: usize = 500;

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("db_connector bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("db_connector bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Figure {
    name: String,
    rows: u64,
    secs: f64,
}

impl Figure {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }
}

async fn run() -> Result<(), String> {
    edgecase::tls::install_crypto_provider();
    let tag = format!("bench_db_{}", std::process::id());
    let pg = pg().await?;
    let ceiling = pg_ceiling(&pg, &format!("{tag}_ceiling"), BATCHED_N).await?;
    eprintln!("ceiling: {:.0} rows/s", ceiling.rate());
    let batched = connector_rate(&pg, &format!("{tag}_batched"), BATCHED_N, BATCH).await?;
    eprintln!("batched: {:.0} rows/s", batched.rate());
    let unbatched = connector_rate(&pg, &format!("{tag}_single"), UNBATCHED_N, 1).await?;
    eprintln!("unbatched: {:.0} rows/s", unbatched.rate());
    let ratio = batched.rate() / unbatched.rate();
    println!();
    println!("{:<64} {:>12} {:>10} {:>10}", "Figure", "rows/s", "rows", "seconds");
    println!("{}", "-".repeat(100));
    for f in [&ceiling, &batched, &unbatched] {
        println!("{:<64} {:>12.0} {:>10} {:>10.2}", f.name, f.rate(), f.rows, f.secs);
    }
    println!("{}", "-".repeat(100));
    println!(
        "batched / unbatched: {ratio:.1}x (goal >= 10x: {}); batched / ceiling: {:.2}",
        if ratio >= 10.0 { "PASS" } else { "MISS" },
        batched.rate() / ceiling.rate()
    );
    Ok(())
}

async fn pg() -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("PostgreSQL at {PG_URL}: {e} (scripts/services.sh starts it)"))?;
    tokio::spawn(conn);
    Ok(client)
}

fn create(table: &str) -> String {
    format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (message_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, sensor TEXT NOT NULL, value DOUBLE PRECISION, ts TIMESTAMPTZ)"
    )
}

fn reading(i: u64) -> String {
    format!(
        r#"{{"message_id":"m-{i}","device_id":"dev-{}","sensor":"temp","value":{}.5,"ts":"2026-11-25T17:52:29.425Z","gateway_id":"bench"}}"#,
        i % 50,
        i % 100
    )
}

/// Plain tokio-postgres: the same rows, pipelined, `BATCH` a transaction.
async fn pg_ceiling(pg: &tokio_postgres::Client, table: &str, n: u64) -> Result<Figure, String> {
    pg.batch_execute(&create(table)).await.map_err(|e| e.to_string())?;
    let stmt = pg
        .prepare(&format!(
            "INSERT INTO {table} (message_id, device_id, sensor, value, ts) VALUES ($1, $2, $3, $4, $5::text::timestamptz) ON CONFLICT (message_id) DO UPDATE SET value = excluded.value"
        ))
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        pg.batch_execute("BEGIN").await.map_err(|e| e.to_string())?;
        let end = (i + BATCH as u64).min(n);
        let futs: Vec<_> = (i..end)
            .map(|k| {
                let (id, dev, ts) = (format!("m-{k}"), format!("dev-{}", k % 50), "2026-11-25T17:52:29.425Z");
                let value = (k % 100) as f64 + 0.5;
                let stmt = &stmt;
                async move { pg.execute(stmt, &[&id, &dev, &"temp", &value, &ts]).await }
            })
            .collect();
        for r in futures_util::future::join_all(futs).await {
            r.map_err(|e| e.to_string())?;
        }
        pg.batch_execute("COMMIT").await.map_err(|e| e.to_string())?;
        i = end;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = pg.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await;
    Ok(Figure {
        name: format!("ceiling: tokio-postgres pipelined, {BATCH} rows a transaction"),
        rows: n,
        secs,
    })
}

/// Fills a queue with `n` readings, then runs subscribe-and-write until all are committed.
async fn connector_rate(pg: &tokio_postgres::Client, table: &str, n: u64, batch: usize) -> Result<Figure, String> {
    pg.batch_execute(&create(table)).await.map_err(|e| e.to_string())?;
    let queue = table.replace('_', "-");
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .map_err(|e| format!("RabbitMQ at {AMQP_URL}: {e}"))?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut confirms = Vec::new();
    for i in 0..n {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("m-{i}").into())
            .with_content_type("application/json".into());
        let c = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                reading(i).as_bytes(),
                props,
            )
            .await
            .map_err(|e| e.to_string())?;
        confirms.push(c);
        if confirms.len() >= 2000 {
            for c in confirms.drain(..) {
                c.await.map_err(|e| e.to_string())?;
            }
        }
    }
    for c in confirms {
        c.await.map_err(|e| e.to_string())?;
    }
    let settings: DbConnectorConfig = serde_json::from_value(serde_json::json!({
        "database": {
            "url": PG_URL,
            "table": table,
            "columns": ["device_id", "sensor", "value", "ts"],
        },
        "broker": {
            "source": { "queue": queue, "prefetch": 1000 },
            "dead_letter": { "queue": format!("{queue}-dead") },
            "batch_size": batch,
        },
        "format": { "type": "json" },
    }))
    .map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir();
    let connector = DbConnector::new(settings, &Secret::new(AMQP_URL), dir);
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move { connector.subscribe_and_write(stop).await });
    let count_sql = format!("SELECT COUNT(*) FROM {table}");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let rows: i64 = pg.query_one(&count_sql, &[]).await.map_err(|e| e.to_string())?.get(0);
        if rows as u64 >= n {
            break;
        }
        if Instant::now() > deadline {
            cancel.cancel();
            return Err(format!("{table}: {rows} of {n} rows after 300 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    cancel.cancel();
    match task.await {
        Ok(Outcome::Success(_)) => {}
        Ok(other) => return Err(format!("subscribe-and-write ended with {other}")),
        Err(e) => return Err(format!("subscribe-and-write task: {e}")),
    }
    for q in [queue.clone(), format!("{queue}-dead")] {
        let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
    let _ = pg.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await;
    let name = if batch == 1 {
        "subscribe-and-write, one transaction per message".to_string()
    } else {
        format!("subscribe-and-write, batched (up to {batch} messages a transaction)")
    };
    Ok(Figure { name, rows: n, secs })
}
