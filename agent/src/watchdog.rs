//! systemd integration: readiness, status, and a watchdog fed only while the pipeline makes
//! progress.
//!
//! A keep-alive sent from a timer proves only that the timer runs. Here each `WATCHDOG=1`
//! follows a check of the data path, and is withheld when the check fails:
//!
//! 1. **Every stage loop is alive.** Each long-running loop (MQTT ingest, each serial port,
//!    the publisher) holds a [`Heartbeat`] and beats every time round. A wait on the outside
//!    world (a broker, a port, a backoff sleep, room in a full buffer, which only the broker
//!    can make) is wrapped in [`Heartbeat::idle`], which keeps beating while it waits, so an
//!    idle agent, or one riding out an outage with a full buffer, stays healthy. A wait on another stage (the
//!    buffer writer, the MQTT acknowledger) is not wrapped: if it never ends, the beats stop.
//!    So do the beats of a loop that ended (a task that returned or panicked). A stage
//!    silent for `watchdog.stage_timeout` fails the check.
//! 2. **The backlog drains when it can.** While the buffer holds messages and the publisher
//!    is connected, messages must keep leaving the buffer: `watchdog.stall_timeout` of
//!    connected time with a backlog and nothing released fails the check. Time disconnected
//!    is not counted (a broker outage: restarting would not bring the broker back, and the
//!    agent buffers meanwhile), but it does not reset the count either, so a session that
//!    reconnects again and again without ever getting a confirm still adds up.
//!
//! On a failed check the reason is logged and put in the unit's status, `WATCHDOG=trigger`
//! asks systemd to act at once (`WatchdogSignal=`, then the `Restart=` policy), and no
//! keep-alive is sent again. Nothing is lost by that restart: the buffer is crash-safe and
//! unacknowledged input is redelivered. Without a watchdog in the unit (no `WATCHDOG_USEC`)
//! the checks still run, and a failure is logged once.
//!
//! [`Check`] is the pure part: observations in, verdict out, no clock or I/O of its own.

use crate::config::WatchdogConfig;
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a loop waiting in [`Heartbeat::idle`] beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(2);

/// One stage loop's liveness: when it last went round (or was idle on the outside world).
#[derive(Clone, Debug)]
pub struct Heartbeat {
    name: Arc<str>,
    epoch: Instant,
    /// Milliseconds from `epoch` to the last beat.
    last_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    fn new(name: &str, epoch: Instant) -> Heartbeat {
        let hb = Heartbeat {
            name: name.into(),
            epoch,
            last_ms: Arc::new(AtomicU64::new(0)),
        };
        hb.beat();
        hb
    }

    /// The loop went round.
    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Awaits `fut`, beating every [`BEAT_EVERY`] meanwhile. Only for waits on the world
    /// outside the agent, which may last as long as it stays quiet; `fut` is polled to the
    /// end, never dropped, so any future may be wrapped.
    pub async fn idle<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        // Most waits on a busy path are already over: no timer for those.
        if let Some(out) = futures_util::FutureExt::now_or_never(&mut fut) {
            self.beat();
            return out;
        }
        let mut every = tokio::time::interval(BEAT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => {
                    self.beat();
                    return out;
                }
                _ = every.tick() => self.beat(),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The heartbeats of every stage that started. A heartbeat stays here when its loop ends:
/// a loop that died must fail the check, not vanish from it.
#[derive(Debug)]
pub struct Stages {
    epoch: Instant,
    list: Mutex<Vec<Heartbeat>>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            epoch: Instant::now(),
            list: Mutex::new(Vec::new()),
        }
    }
}

impl Stages {
    /// Registers a stage loop, alive as of now.
    pub fn register(&self, name: &str) -> Heartbeat {
        let hb = Heartbeat::new(name, self.epoch);
        self.list.lock().unwrap().push(hb.clone());
        hb
    }

    fn snapshot(&self) -> Vec<(Arc<str>, Instant)> {
        let list = self.list.lock().unwrap();
        list.iter().map(|h| (h.name.clone(), h.last())).collect()
    }
}

/// What the check looks at, taken at one instant.
#[derive(Debug, Clone)]
pub struct Observation {
    pub now: Instant,
    /// Each stage and its last beat.
    pub stages: Vec<(Arc<str>, Instant)>,
    /// Messages in the buffer.
    pub pending: u64,
    /// Messages ever released from the buffer after a confirm (a counter).
    pub released: u64,
    /// Whether the publisher has a session with the broker.
    pub output_connected: bool,
}

impl Observation {
    pub fn from_metrics(metrics: &Metrics, now: Instant) -> Observation {
        Observation {
            now,
            stages: metrics.stages.snapshot(),
            pending: metrics.buffer_pending_readings.get().max(0) as u64,
            released: metrics.buffer_released.get(),
            output_connected: metrics.amqp_connected.get() == 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Why the agent must be restarted.
    Stuck(String),
}

/// The progress check, fed one observation at a time.
#[derive(Debug)]
pub struct Check {
    cfg: WatchdogConfig,
    last: Option<Instant>,
    released: u64,
    /// Connected time with a backlog since something last left the buffer.
    stalled: Duration,
}

impl Check {
    pub fn new(cfg: WatchdogConfig) -> Check {
        Check {
            cfg,
            last: None,
            released: 0,
            stalled: Duration::ZERO,
        }
    }

    pub fn observe(&mut self, o: &Observation) -> Verdict {
        let since_last = self.last.map_or(Duration::ZERO, |t| o.now.saturating_duration_since(t));
        self.last = Some(o.now);
        if o.released != self.released || o.pending == 0 {
            self.stalled = Duration::ZERO;
        } else if o.output_connected {
            self.stalled += since_last;
        }
        self.released = o.released;

        let mut problems = Vec::new();
        for (name, last) in &o.stages {
            let silent = o.now.saturating_duration_since(*last);
            if silent > self.cfg.stage_timeout {
                problems.push(format!("{name} has not gone round its loop for {}s", silent.as_secs()));
            }
        }
        if self.stalled > self.cfg.stall_timeout {
            problems.push(format!(
                "the publisher is connected but nothing has left the buffer ({} pending) for {}s",
                o.pending,
                self.stalled.as_secs()
            ));
        }
        if problems.is_empty() {
            Verdict::Healthy
        } else {
            Verdict::Stuck(problems.join("; "))
        }
    }
}

/// A message for the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Stopping,
    KeepAlive,
    Trigger,
    Status(String),
}

type SendFn = Arc<dyn Fn(&[Notice]) + std::marker::Send + Sync>;

/// Where notices go: systemd's socket ([`Notifier::systemd`]), or a test's list.
#[derive(Clone)]
pub struct Notifier {
    send: SendFn,
    /// systemd's `WatchdogSec=`, when the unit has one.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// `NOTIFY_SOCKET` and `WATCHDOG_USEC` from the environment; sends nothing without them.
    pub fn systemd() -> Notifier {
        Notifier {
            send: Arc::new(|notices: &[Notice]| {
                use sd_notify::NotifyState;
                let states: Vec<NotifyState<'_>> = notices
                    .iter()
                    .map(|n| match n {
                        Notice::Ready => NotifyState::Ready,
                        Notice::Stopping => NotifyState::Stopping,
                        Notice::KeepAlive => NotifyState::Watchdog,
                        Notice::Trigger => NotifyState::WatchdogTrigger,
                        Notice::Status(s) => NotifyState::Status(s),
                    })
                    .collect();
                if let Err(e) = sd_notify::notify(&states) {
                    tracing::debug!(error = %e, "cannot notify systemd");
                }
            }),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// Sends to `f` instead; `watchdog` stands for `WATCHDOG_USEC`.
    pub fn custom(watchdog: Option<Duration>, f: impl Fn(&[Notice]) + Send + Sync + 'static) -> Notifier {
        Notifier {
            send: Arc::new(f),
            watchdog,
        }
    }

    pub fn send(&self, notices: &[Notice]) {
        (self.send)(notices)
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("watchdog", &self.watchdog).finish()
    }
}

/// Checks the pipeline every third of `WatchdogSec=` (every 5 s without one) and sends a
/// keep-alive after each healthy check, until `cancel`. Returns after a failed check.
pub async fn run(metrics: Arc<Metrics>, cfg: WatchdogConfig, notifier: Notifier, cancel: CancellationToken) {
    let every = notifier
        .watchdog
        .map_or(Duration::from_secs(5), |w| (w / 3).max(Duration::from_millis(100)));
    if let Some(w) = notifier.watchdog {
        tracing::info!(watchdog_sec = w.as_secs_f64(), check_every = ?every, "systemd watchdog on: keep-alive only while the pipeline makes progress");
        notifier.send(&[Notice::KeepAlive]);
    }
    let mut check = Check::new(cfg);
    let mut status = String::new();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let o = Observation::from_metrics(&metrics, Instant::now());
        match check.observe(&o) {
            Verdict::Healthy => {
                let now = status_line(&metrics, &o);
                let mut notices = vec![];
                if now != status {
                    notices.push(Notice::Status(now.clone()));
                    status = now;
                }
                if notifier.watchdog.is_some() {
                    notices.push(Notice::KeepAlive);
                }
                if !notices.is_empty() {
                    notifier.send(&notices);
                }
            }
            Verdict::Stuck(reason) => {
                let restart = notifier.watchdog.is_some();
                tracing::error!(%reason, restart, "watchdog: the pipeline is stuck");
                let mut notices = vec![Notice::Status(format!("stuck: {reason}"))];
                if restart {
                    notices.push(Notice::Trigger);
                }
                notifier.send(&notices);
                return;
            }
        }
    }
}

fn status_line(m: &Metrics, o: &Observation) -> String {
    let up = |b: bool| if b { "up" } else { "down" };
    format!(
        "pending {}, published {}, mqtt {}, amqp {}",
        o.pending,
        m.publish_confirmed.get(),
        up(m.mqtt_connected.get() == 1),
        up(o.output_connected)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WatchdogConfig {
        WatchdogConfig {
            stage_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(120),
        }
    }

    /// A scripted agent: stages that beat or not, a buffer and a publisher.
    struct World {
        start: Instant,
        now: Instant,
        beats: Vec<(Arc<str>, Instant)>,
        pending: u64,
        released: u64,
        connected: bool,
    }

    impl World {
        fn new(stages: &[&str]) -> World {
            let start = Instant::now();
            World {
                start,
                now: start,
                beats: stages.iter().map(|s| (Arc::from(*s), start)).collect(),
                pending: 0,
                released: 0,
                connected: true,
            }
        }
        fn observation(&self) -> Observation {
            Observation {
                now: self.now,
                stages: self.beats.clone(),
                pending: self.pending,
                released: self.released,
                output_connected: self.connected,
            }
        }
        /// Moves time by `secs` in 10 s checks; `alive` stages beat at each, and the
        /// publisher releases `drain` per check.
        fn run(&mut self, check: &mut Check, secs: u64, alive: &[&str], drain: u64) -> Verdict {
            let mut verdict = check.observe(&self.observation());
            for _ in 0..secs / 10 {
                self.now += Duration::from_secs(10);
                for (name, last) in &mut self.beats {
                    if alive.contains(&&**name) {
                        *last = self.now;
                    }
                }
                let d = drain.min(self.pending);
                self.pending -= d;
                self.released += d;
                verdict = check.observe(&self.observation());
                if verdict != Verdict::Healthy {
                    return verdict;
                }
            }
            verdict
        }
        fn elapsed(&self) -> Duration {
            self.now - self.start
        }
    }

    const ALL: &[&str] = &["mqtt ingest", "publisher"];

    #[test]
    fn an_idle_agent_stays_healthy() {
        let mut w = World::new(ALL);
        let mut check = Check::new(cfg());
        assert_eq!(w.run(&mut check, 3600, ALL, 0), Verdict::Healthy);
    }

    #[test]
    fn a_draining_backlog_is_healthy() {
        let mut w = World::new(ALL);
        w.pending = 100_000;
        let mut check = Check::new(cfg());
        assert_eq!(w.run(&mut check, 3600, ALL, 50), Verdict::Healthy);
    }

    #[test]
    fn a_dead_ingest_loop_is_stuck_after_the_stage_timeout() {
        let mut w = World::new(ALL);
        let mut check = Check::new(cfg());
        let v = w.run(&mut check, 3600, &["publisher"], 0);
        let Verdict::Stuck(reason) = v else { panic!("{v:?}") };
        assert!(reason.contains("mqtt ingest"), "{reason}");
        assert!(!reason.contains("publisher"), "{reason}");
        assert_eq!(w.elapsed(), Duration::from_secs(70));
    }

    #[test]
    fn a_connected_publisher_that_releases_nothing_is_stuck() {
        let mut w = World::new(ALL);
        w.pending = 10;
        let mut check = Check::new(cfg());
        let v = w.run(&mut check, 3600, ALL, 0);
        let Verdict::Stuck(reason) = v else { panic!("{v:?}") };
        assert!(reason.contains("nothing has left the buffer (10 pending)"), "{reason}");
        assert_eq!(w.elapsed(), Duration::from_secs(130));
    }

    #[test]
    fn a_broker_outage_with_a_backlog_is_not_a_stall() {
        let mut w = World::new(ALL);
        w.pending = 5000;
        w.connected = false;
        let mut check = Check::new(cfg());
        assert_eq!(w.run(&mut check, 3 * 3600, ALL, 0), Verdict::Healthy);
        // Back: draining again.
        w.connected = true;
        assert_eq!(w.run(&mut check, 600, ALL, 100), Verdict::Healthy);
    }

    #[test]
    fn reconnecting_sessions_that_never_confirm_add_up() {
        let mut w = World::new(ALL);
        w.pending = 10;
        let mut check = Check::new(cfg());
        // 60 s connected, 60 s down, repeatedly: 120 s of connected time is reached after
        // the third connected spell.
        let mut verdict = Verdict::Healthy;
        for _ in 0..3 {
            w.connected = true;
            verdict = w.run(&mut check, 60, ALL, 0);
            if verdict != Verdict::Healthy {
                break;
            }
            w.connected = false;
            verdict = w.run(&mut check, 60, ALL, 0);
        }
        assert!(matches!(verdict, Verdict::Stuck(_)), "{verdict:?}");
    }

    #[test]
    fn an_empty_buffer_resets_the_stall_clock() {
        let mut w = World::new(ALL);
        w.pending = 1;
        let mut check = Check::new(cfg());
        assert_eq!(w.run(&mut check, 100, ALL, 0), Verdict::Healthy);
        // Dropped by the overflow policy rather than released: still not a stall.
        w.pending = 0;
        assert_eq!(w.run(&mut check, 10, ALL, 0), Verdict::Healthy);
        w.pending = 1;
        assert_eq!(w.run(&mut check, 100, ALL, 0), Verdict::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_beats_while_waiting_and_a_blocked_await_does_not() {
        let stages = Stages::default();
        let waiting = stages.register("waiting on a broker");
        let blocked = stages.register("blocked on a stage");
        let (w, b) = (waiting.clone(), blocked.clone());
        tokio::spawn(async move { w.idle(std::future::pending::<()>()).await });
        tokio::spawn(async move {
            b.beat();
            std::future::pending::<()>().await
        });
        tokio::time::sleep(Duration::from_secs(300)).await;
        let now = Instant::now();
        let snap = stages.snapshot();
        let silent = |name: &str| {
            let (_, last) = snap.iter().find(|(n, _)| &**n == name).unwrap();
            now - *last
        };
        assert!(
            silent("waiting on a broker") <= BEAT_EVERY,
            "{:?}",
            silent("waiting on a broker")
        );
        assert_eq!(silent("blocked on a stage"), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alives_stop_and_systemd_is_triggered_when_a_stage_dies() {
        let metrics = Arc::new(Metrics::new());
        let sent = Arc::new(Mutex::new(Vec::<(Instant, Notice)>::new()));
        let log = sent.clone();
        let notifier = Notifier::custom(Some(Duration::from_secs(30)), move |ns| {
            let mut log = log.lock().unwrap();
            log.extend(ns.iter().map(|n| (Instant::now(), n.clone())));
        });
        let ingest = metrics.stages.register("mqtt ingest");
        let alive = CancellationToken::new();
        let stop = alive.clone();
        // The ingest loop beats every second until it "dies" at 100 s.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => ingest.beat(),
                }
            }
        });
        let start = Instant::now();
        let task = tokio::spawn(run(metrics.clone(), cfg(), notifier, CancellationToken::new()));
        tokio::time::sleep(Duration::from_secs(100)).await;
        alive.cancel();
        tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("the watchdog gives up on a dead stage")
            .unwrap();
        let sent = sent.lock().unwrap();
        let keep_alives: Vec<Duration> = sent
            .iter()
            .filter(|(_, n)| *n == Notice::KeepAlive)
            .map(|(t, _)| *t - start)
            .collect();
        // One at start, then every 10 s (a third of WatchdogSec) while the stage lived.
        assert!(keep_alives.len() >= 10, "{keep_alives:?}");
        let last_keep_alive = *keep_alives.last().unwrap();
        assert!(last_keep_alive <= Duration::from_secs(170), "{last_keep_alive:?}");
        let (t, last) = sent.last().unwrap();
        assert_eq!(*last, Notice::Trigger);
        // Dead at 100 s, stage timeout 60 s, checks every 10 s.
        assert!(*t - start <= Duration::from_secs(180), "{:?}", *t - start);
        assert!(
            sent.iter()
                .any(|(_, n)| matches!(n, Notice::Status(s) if s.contains("mqtt ingest")))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_watchdog_nothing_is_kept_alive() {
        let metrics = Arc::new(Metrics::new());
        let sent = Arc::new(Mutex::new(Vec::<Notice>::new()));
        let log = sent.clone();
        let notifier = Notifier::custom(None, move |ns| log.lock().unwrap().extend_from_slice(ns));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(metrics, cfg(), notifier, cancel.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        cancel.cancel();
        task.await.unwrap();
        let sent = sent.lock().unwrap();
        assert!(!sent.contains(&Notice::KeepAlive), "{sent:?}");
        assert!(
            matches!(sent.first(), Some(Notice::Status(s)) if s.starts_with("pending 0")),
            "{sent:?}"
        );
    }
}
