//! MQTT output: JSON readings published to a broker, on a topic template.

use crate::inject::{BadInputKind, Injector};
use crate::model::Fleet;
use crate::report::Report;
use crate::run::{Plan, Schedule};
use crate::{Stop, now_ms};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct MqttTarget {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// `{device}` and `{sensor}` are replaced, e.g. `sensors/{device}/{sensor}`.
    pub topic: String,
    pub qos: u8,
    /// Leave `device_id` and `sensor` out of the payload (the topic carries them).
    pub bare: bool,
}

impl MqttTarget {
    /// From `mqtt://host:port`.
    pub fn from_url(url: &str, topic: &str, qos: u8) -> Result<MqttTarget, String> {
        let parsed = url::Url::parse(url)
            .ok()
            .filter(|u| u.scheme() == "mqtt" && u.host_str().is_some())
            .ok_or_else(|| format!("--url {url}: not an MQTT URL such as mqtt://127.0.0.1:1883"))?;
        Ok(MqttTarget {
            host: parsed.host_str().unwrap_or("127.0.0.1").to_string(),
            port: parsed.port().unwrap_or(1883),
            client_id: format!("edgecase-sim-{}", std::process::id()),
            topic: topic.to_string(),
            qos,
            bare: false,
        })
    }

    pub fn topic_for(&self, device: &str, sensor: &str) -> String {
        self.topic.replace("{device}", device).replace("{sensor}", sensor)
    }
}

/// Publishes the fleet's readings until the plan is done or `stop` is set, then waits (up
/// to 30 s) for the broker to acknowledge every QoS 1 message.
pub async fn run(
    target: &MqttTarget,
    mut fleet: Fleet,
    plan: &Plan,
    mut injector: Injector,
    report: &Report,
    stop: &Stop,
) -> Result<(), String> {
    let paced = plan.apply(&mut fleet);
    let mut opts = MqttOptions::new(target.client_id.clone(), target.host.clone(), target.port);
    opts.set_keep_alive(Duration::from_secs(30)).set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let qos = if target.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let published = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let (a, p) = (acked.clone(), published.clone());
    let events: tokio::task::JoinHandle<Result<(), String>> = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    if p.load(Ordering::Relaxed) > 0 || a.load(Ordering::Relaxed) > 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    } else {
                        return Err(format!("MQTT connection failed: {e}"));
                    }
                }
            }
        }
    });
    let start = Instant::now();
    let mut schedule = Schedule::new(&fleet, paced, start);
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let mut held: Option<(String, String)> = None;
    let publish = |topic: String, payload: String| {
        let client = client.clone();
        let published = published.clone();
        async move {
            published.fetch_add(1, Ordering::Relaxed);
            client.publish(topic, qos, false, payload).await
        }
    };
    while !stop.load(Ordering::Relaxed) && !plan.done(report.readings_sent(), start.elapsed()) {
        if events.is_finished() {
            break;
        }
        let Some(i) = schedule.pop_due(Instant::now()) else {
            if let Some(due) = schedule.next_due() {
                tokio::time::sleep_until(due.min(Instant::now() + Duration::from_millis(100)).into()).await;
            }
            continue;
        };
        let tick = fleet.tick(i);
        report.silent(tick.dropped.len() as u64);
        let ts_ms = now_ms();
        let room = plan.room(report.readings_sent());
        for r in tick.readings.into_iter().take(room) {
            let seq = {
                let s = seqs.entry(r.device.clone()).or_default();
                *s += 1;
                *s - 1
            };
            let topic = target.topic_for(&r.device, &r.sensor);
            let body = |value: serde_json::Value| {
                let mut o = serde_json::json!({"value": value, "seq": seq, "ts": ts_ms});
                if let Some(m) = o.as_object_mut() {
                    if let Some(u) = &r.unit {
                        m.insert("unit".into(), u.clone().into());
                    }
                    if !target.bare {
                        m.insert("device_id".into(), r.device.clone().into());
                        m.insert("sensor".into(), r.sensor.clone().into());
                    }
                }
                o.to_string()
            };
            let payload = body(r.value.into());
            let mut hold = false;
            let mut dup = false;
            for kind in injector.decide(&r.device, tick.t) {
                let bad = match kind {
                    BadInputKind::MalformedJson | BadInputKind::Truncated => {
                        Some(payload[..payload.len() / 2].to_string())
                    }
                    BadInputKind::WrongType => Some(body("hot".into())),
                    BadInputKind::Garbage => Some(String::from_utf8_lossy(&injector.garbage(16)).into_owned()),
                    BadInputKind::Duplicate => {
                        dup = true;
                        None
                    }
                    BadInputKind::OutOfOrder => {
                        hold = true;
                        None
                    }
                    BadInputKind::Crc => continue,
                };
                report.injected(kind, &r.device, Some(seq));
                if let Some(bad) = bad {
                    publish(topic.clone(), bad).await.map_err(|e| e.to_string())?;
                }
            }
            report.reading(&r, seq, ts_ms);
            report.message();
            if hold && held.is_none() {
                held = Some((topic, payload));
                continue;
            }
            publish(topic.clone(), payload.clone())
                .await
                .map_err(|e| e.to_string())?;
            if dup {
                publish(topic, payload).await.map_err(|e| e.to_string())?;
            }
            if let Some((t, p)) = held.take() {
                publish(t, p).await.map_err(|e| e.to_string())?;
            }
        }
    }
    if let Some((t, p)) = held.take() {
        publish(t, p).await.map_err(|e| e.to_string())?;
    }
    let want = published.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < want && Instant::now() < deadline && !events.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = acked.load(Ordering::Relaxed);
    report.acked(0, got);
    if events.is_finished() {
        if let Ok(Err(e)) = events.await {
            return Err(e);
        }
    } else {
        let _ = client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        events.abort();
    }
    if got < want {
        return Err(format!("the broker acknowledged {got} of {want} messages within 30 s"));
    }
    Ok(())
}
