//! Defect rules: readings in, case events out. Pure: no I/O, no clock of its own.
//!
//! A rule watches the readings of the devices and sensors its globs match and raises a case
//! when its condition holds (above/below a threshold, outside a range, changing too fast,
//! stuck, or a device gone silent). Two guarantees matter to the people who receive the
//! cases:
//! - **One case per occurrence.** Each (rule, device, sensor) is a small state machine:
//!   `Normal → Pending` (debounce: N consecutive violating readings and/or a duration) `→
//!   Open` (the case is raised once) `→ Clearing` (hysteresis: a separate clear level, N
//!   readings and/or a duration) `→ Normal` (an optional follow-up is sent). A flapping
//!   sensor stays `Open`; only a real clear lets a new occurrence raise a new case.
//! - **Deterministic ids.** A case's `event_id` is derived from the rule, the device, the
//!   sensor and the `message_id` of the reading that started the occurrence, so evaluating the
//!   same readings again (a replay, a restart) yields the same id, and downstream upserts
//!   never make a second case.
//!
//! The state ([`RuleStates`]) is serializable; the buffer stores it in the same transaction
//! as the reading that changed it, so a restart neither forgets an open case nor raises it
//! again.

use crate::reading::{Reading, format_ms};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Namespace for case event ids (UUID v5).
const EVENT_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6564_6765_6361_7365_8000_0000_0000_0002);

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "rule",
    "device_id",
    "sensor",
    "value",
    "unit",
    "threshold",
    "low",
    "high",
    "first_seen",
    "ts",
    "count",
    "division",
    "gateway_id",
    "event_id",
];

/// One rule as written in the config (`[[rules]]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name; part of the event id, so renaming a rule starts new occurrences.
    pub name: String,
    /// Glob over device ids (`*`, `boiler-?`, `site1-*`).
    #[serde(default = "star")]
    pub devices: String,
    /// Glob over sensor names.
    #[serde(default = "star")]
    pub sensors: String,
    /// `above`, `below`, `outside`, `rate`, `stuck` or `silent`.
    pub kind: RuleKind,
    /// `above` / `below`: the level that raises.
    pub threshold: Option<f64>,
    /// `above` / `below`: the level that clears (hysteresis); default the threshold.
    pub clear_level: Option<f64>,
    /// `outside`: the allowed range.
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// `rate`: largest allowed change per second, either direction.
    pub max_change_per_second: Option<f64>,
    /// `stuck`: this many identical readings in a row...
    pub stuck_readings: Option<u32>,
    /// ...or an unchanged value for this long.
    #[serde(default, with = "humantime_serde")]
    pub stuck_for: Option<Duration>,
    /// `silent`: no reading from the device for this long.
    #[serde(default, with = "humantime_serde")]
    pub silent_for: Option<Duration>,
    /// Consecutive violating readings before a case is raised (default 1).
    #[serde(default = "one")]
    pub debounce_readings: u32,
    /// And the condition must have held this long (default 0).
    #[serde(default, with = "humantime_serde")]
    pub debounce_for: Option<Duration>,
    /// Consecutive clear readings before the occurrence ends (default 1).
    #[serde(default = "one")]
    pub clear_readings: u32,
    /// And clear for this long (default 0).
    #[serde(default, with = "humantime_serde")]
    pub clear_for: Option<Duration>,
    /// Routes the case: routing key `case.{division}`.
    pub division: String,
    /// Case fields (`Subject`, `Description`, `Priority`, `Origin`, `Status`, `X__c`), each a
    /// template over the placeholders in [`PLACEHOLDERS`].
    pub case: BTreeMap<String, String>,
    /// Optional follow-up when the condition clears (e.g. `Status = "Closed"`), same templates.
    pub on_clear: Option<BTreeMap<String, String>>,
}

fn star() -> String {
    "*".into()
}
fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RuleKind {
    Above,
    Below,
    Outside,
    Rate,
    Stuck,
    Silent,
}

/// A compiled template: literal text and placeholders.
#[derive(Debug, Clone, PartialEq)]
struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Var(&'static str),
}

impl Template {
    /// `{name}` is a placeholder, `{{` and `}}` are literal braces.
    fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let var = PLACEHOLDERS
                        .iter()
                        .find(|p| **p == name)
                        .ok_or_else(|| format!("unknown placeholder {{{name}}}; known: {}", PLACEHOLDERS.join(", ")))?;
                    if !lit.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Var(var));
                }
                '}' => return Err("a lone } (write }} for a literal brace)".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Text(lit));
        }
        Ok(Template(pieces))
    }

    fn render(&self, vars: &HashMap<&'static str, String>) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Var(v) => vars.get(v).map(String::as_str).unwrap_or(""),
            })
            .collect()
    }
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub config: RuleConfig,
    devices: glob::Pattern,
    sensors: glob::Pattern,
    case: Vec<(String, Template)>,
    on_clear: Option<Vec<(String, Template)>>,
}

/// All rules, validated.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// Validates every rule; each problem names the rule (`rules[i] "name"`) and the key.
    pub fn new(configs: &[RuleConfig]) -> Result<RuleSet, Vec<String>> {
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let at = format!("rules[{i}] {:?}", c.name);
            let mut p = |key: &str, msg: String| problems.push(format!("{at}: {key}: {msg}"));
            if c.name.trim().is_empty() {
                p("name", "must not be empty".into());
            }
            if configs[..i].iter().any(|o| o.name == c.name) {
                p("name", "is used by an earlier rule; names must be unique".into());
            }
            let devices = glob::Pattern::new(&c.devices)
                .map_err(|e| p("devices", e.to_string()))
                .ok();
            let sensors = glob::Pattern::new(&c.sensors)
                .map_err(|e| p("sensors", e.to_string()))
                .ok();
            let need = |v: Option<f64>| v.is_some_and(f64::is_finite);
            match c.kind {
                RuleKind::Above | RuleKind::Below if !need(c.threshold) => {
                    p("threshold", "is required for this kind".into())
                }
                RuleKind::Above if c.clear_level.zip(c.threshold).is_some_and(|(l, t)| l > t) => p(
                    "clear_level",
                    "must not be above the threshold of an `above` rule".into(),
                ),
                RuleKind::Below if c.clear_level.zip(c.threshold).is_some_and(|(l, t)| l < t) => p(
                    "clear_level",
                    "must not be below the threshold of a `below` rule".into(),
                ),
                RuleKind::Outside if !(need(c.low) && need(c.high)) => p("low", "low and high are required".into()),
                RuleKind::Outside if c.low >= c.high => p("low", "must be less than high".into()),
                RuleKind::Rate if !c.max_change_per_second.is_some_and(|r| r.is_finite() && r > 0.0) => {
                    p("max_change_per_second", "is required and must be positive".into())
                }
                RuleKind::Stuck if c.stuck_readings.unwrap_or(0) < 2 && c.stuck_for.is_none_or(|d| d.is_zero()) => {
                    p("stuck_readings", "set stuck_readings (2 or more) or stuck_for".into())
                }
                RuleKind::Silent if c.silent_for.is_none_or(|d| d.is_zero()) => {
                    p("silent_for", "is required for a silent rule".into())
                }
                _ => {}
            }
            if c.debounce_readings == 0 {
                p("debounce_readings", "must be at least 1".into());
            }
            if c.clear_readings == 0 {
                p("clear_readings", "must be at least 1".into());
            }
            if c.division.trim().is_empty() || c.division.contains(['.', '*', '#']) {
                p("division", "must be a non-empty word without . * #".into());
            }
            if c.case.is_empty() {
                p("case", "needs at least one field, e.g. Subject".into());
            }
            let mut compile = |key: &str, fields: &BTreeMap<String, String>| -> Vec<(String, Template)> {
                fields
                    .iter()
                    .filter_map(|(field, text)| match Template::parse(text) {
                        Ok(t) => Some((field.clone(), t)),
                        Err(e) => {
                            problems.push(format!("{at}: {key}.{field}: {e}"));
                            None
                        }
                    })
                    .collect()
            };
            let case = compile("case", &c.case);
            let on_clear = c.on_clear.as_ref().map(|f| compile("on_clear", f));
            if let (Some(devices), Some(sensors)) = (devices, sensors) {
                rules.push(Rule {
                    config: c.clone(),
                    devices,
                    sensors,
                    case,
                    on_clear,
                });
            }
        }
        if problems.is_empty() {
            Ok(RuleSet { rules })
        } else {
            Err(problems)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// Where one (rule, device, sensor) stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub phase: Phase,
    /// Last value and time seen (for rate and stuck).
    pub last_value: Option<f64>,
    pub last_ts_ms: Option<i64>,
    /// Identical readings in a row, and since when (for stuck).
    pub same_count: u32,
    pub same_since_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Normal,
    /// Violating, not yet for long enough.
    Pending {
        since_ms: i64,
        count: u32,
        first_message_id: String,
    },
    /// The case is raised.
    Open {
        event_id: String,
        since_ms: i64,
        count: u32,
    },
    /// Clear, not yet for long enough; the case stays open.
    Clearing {
        event_id: String,
        since_ms: i64,
        count: u32,
        clear_since_ms: i64,
        clear_count: u32,
    },
}

/// The state of every (rule, device, sensor), keyed `rule\0device\0sensor`.
pub type RuleStates = HashMap<String, RuleState>;

/// A case to publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseEvent {
    /// Stable id of the occurrence (the same for its raise and its follow-up).
    pub event_id: String,
    /// The AMQP message id: the event id for a raise, derived from it for a follow-up.
    pub message_id: String,
    /// `raise` or `clear`.
    pub action: CaseAction,
    pub rule: String,
    pub division: String,
    pub device_id: String,
    pub sensor: String,
    /// The Case fields after templating.
    pub case: BTreeMap<String, String>,
    pub first_seen: String,
    pub count: u32,
    pub gateway_id: String,
    /// The reading that raised or cleared it (absent for a silent device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reading: Option<Reading>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseAction {
    Raise,
    Clear,
}

impl CaseEvent {
    /// Routing key on the cases exchange.
    pub fn routing_key(&self) -> String {
        format!("case.{}", self.division)
    }
}

fn key(rule: &str, device: &str, sensor: &str) -> String {
    format!("{rule}\0{device}\0{sensor}")
}

/// Silent rules track the device, not a sensor.
const ANY_SENSOR: &str = "*";

fn event_id(rule: &str, device: &str, sensor: &str, origin: &str) -> String {
    let k = format!("{rule}\0{device}\0{sensor}\0{origin}");
    uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, k.as_bytes()).to_string()
}

/// The rule engine: the rule set plus the state of every (rule, device, sensor).
#[derive(Debug, Clone, Default)]
pub struct Engine {
    rules: RuleSet,
    states: RuleStates,
    gateway_id: String,
}

impl Engine {
    pub fn new(rules: RuleSet, states: RuleStates, gateway_id: &str) -> Engine {
        Engine {
            rules,
            states,
            gateway_id: gateway_id.to_string(),
        }
    }

    pub fn states(&self) -> &RuleStates {
        &self.states
    }

    /// Replaces the state (after a failed commit, with what the database holds).
    pub fn set_states(&mut self, states: RuleStates) {
        self.states = states;
    }

    /// Evaluates one reading against every matching rule. Value rules measure time with the
    /// reading's own `ts`; silent rules with `now_ms`, the clock [`Engine::on_tick`] uses.
    /// Returns the case events and the keys of the states it changed (to persist).
    pub fn on_reading(&mut self, reading: &Reading, now_ms: i64) -> (Vec<CaseEvent>, Vec<String>) {
        let ts_ms = reading.ts_ms;
        let mut events = Vec::new();
        let mut changed = Vec::new();
        for rule in &self.rules.rules {
            if !rule.devices.matches(&reading.device_id) {
                continue;
            }
            let c = &rule.config;
            if c.kind == RuleKind::Silent {
                // Any reading from the device proves it is alive.
                let k = key(&c.name, &reading.device_id, ANY_SENSOR);
                let state = self.states.entry(k.clone()).or_default();
                let before = state.clone();
                state.last_ts_ms = Some(now_ms);
                if let Phase::Open {
                    event_id,
                    since_ms,
                    count,
                }
                | Phase::Clearing {
                    event_id,
                    since_ms,
                    count,
                    ..
                } = state.phase.clone()
                {
                    state.phase = Phase::Normal;
                    if let Some(e) = (Occurrence {
                        rule,
                        gateway_id: &self.gateway_id,
                        device: &reading.device_id,
                        sensor: ANY_SENSOR,
                        event_id: &event_id,
                        since_ms,
                        count,
                        reading: Some(reading),
                    })
                    .follow_up()
                    {
                        events.push(e);
                    }
                }
                if *state != before {
                    changed.push(k);
                }
                continue;
            }
            if !rule.sensors.matches(&reading.sensor) {
                continue;
            }
            let k = key(&c.name, &reading.device_id, &reading.sensor);
            let state = self.states.entry(k.clone()).or_default();
            let before = state.clone();
            if let Some(e) = step(rule, state, reading, ts_ms, &self.gateway_id) {
                events.push(e);
            }
            if *state != before {
                changed.push(k);
            }
        }
        (events, changed)
    }

    /// Raises cases for devices silent for longer than their rule allows. Call on a timer.
    pub fn on_tick(&mut self, now_ms: i64) -> (Vec<CaseEvent>, Vec<String>) {
        let mut events = Vec::new();
        let mut changed = Vec::new();
        for rule in &self.rules.rules {
            let c = &rule.config;
            let (RuleKind::Silent, Some(after)) = (c.kind, c.silent_for) else {
                continue;
            };
            let prefix = format!("{}\0", c.name);
            for (k, state) in self.states.iter_mut().filter(|(k, _)| k.starts_with(&prefix)) {
                let (Phase::Normal, Some(last)) = (&state.phase, state.last_ts_ms) else {
                    continue;
                };
                if now_ms - last < after.as_millis() as i64 {
                    continue;
                }
                let device = k.split('\0').nth(1).unwrap_or_default().to_string();
                let id = event_id(&c.name, &device, ANY_SENSOR, &last.to_string());
                state.phase = Phase::Open {
                    event_id: id.clone(),
                    since_ms: last,
                    count: 1,
                };
                changed.push(k.clone());
                events.push(
                    Occurrence {
                        rule,
                        gateway_id: &self.gateway_id,
                        device: &device,
                        sensor: ANY_SENSOR,
                        event_id: &id,
                        since_ms: last,
                        count: 1,
                        reading: None,
                    }
                    .raise(),
                );
            }
        }
        (events, changed)
    }
}

/// Is this reading a violation, and is it clear (past the hysteresis level)?
fn judge(rule: &Rule, state: &mut RuleState, value: f64, ts_ms: i64) -> (bool, bool) {
    let c = &rule.config;
    let prev = state.last_value.zip(state.last_ts_ms);
    // Track runs of identical values for stuck rules.
    if state.last_value == Some(value) {
        state.same_count += 1;
    } else {
        state.same_count = 1;
        state.same_since_ms = Some(ts_ms);
    }
    state.last_value = Some(value);
    state.last_ts_ms = Some(ts_ms);
    match c.kind {
        RuleKind::Above => {
            let t = c.threshold.unwrap_or(f64::INFINITY);
            (value > t, value <= c.clear_level.unwrap_or(t))
        }
        RuleKind::Below => {
            let t = c.threshold.unwrap_or(f64::NEG_INFINITY);
            (value < t, value >= c.clear_level.unwrap_or(t))
        }
        RuleKind::Outside => {
            let (lo, hi) = (c.low.unwrap_or(f64::NEG_INFINITY), c.high.unwrap_or(f64::INFINITY));
            let out = value < lo || value > hi;
            (out, !out)
        }
        RuleKind::Rate => match prev {
            Some((pv, pt)) if ts_ms > pt => {
                let per_s = (value - pv).abs() / ((ts_ms - pt) as f64 / 1000.0);
                let bad = per_s > c.max_change_per_second.unwrap_or(f64::INFINITY);
                (bad, !bad)
            }
            _ => (false, true),
        },
        RuleKind::Stuck => {
            let by_count = c.stuck_readings.is_some_and(|n| n >= 2 && state.same_count >= n);
            let by_time = c
                .stuck_for
                .zip(state.same_since_ms)
                .is_some_and(|(d, since)| state.same_count >= 2 && ts_ms - since >= d.as_millis() as i64);
            let stuck = by_count || by_time;
            (stuck, state.same_count == 1)
        }
        RuleKind::Silent => (false, true),
    }
}

fn held(count: u32, since_ms: i64, now_ms: i64, readings: u32, duration: Option<Duration>) -> bool {
    count >= readings && duration.is_none_or(|d| now_ms - since_ms >= d.as_millis() as i64)
}

/// Advances one state machine by one reading; returns a case event if one is due.
fn step(rule: &Rule, state: &mut RuleState, reading: &Reading, ts_ms: i64, gateway_id: &str) -> Option<CaseEvent> {
    let c = &rule.config;
    let (violating, clear) = judge(rule, state, reading.value, ts_ms);
    let (device, sensor) = (reading.device_id.as_str(), reading.sensor.as_str());
    let opened = |first_message_id: &str, since_ms: i64, count: u32| {
        let id = event_id(&c.name, device, sensor, first_message_id);
        (
            Phase::Open {
                event_id: id.clone(),
                since_ms,
                count,
            },
            id,
        )
    };
    let (next, event) = match std::mem::take(&mut state.phase) {
        Phase::Normal if violating => {
            if held(1, ts_ms, ts_ms, c.debounce_readings, c.debounce_for) {
                let (phase, id) = opened(&reading.message_id, ts_ms, 1);
                (
                    phase,
                    Some(
                        Occurrence {
                            rule,
                            gateway_id,
                            device,
                            sensor,
                            event_id: &id,
                            since_ms: ts_ms,
                            count: 1,
                            reading: Some(reading),
                        }
                        .raise(),
                    ),
                )
            } else {
                (
                    Phase::Pending {
                        since_ms: ts_ms,
                        count: 1,
                        first_message_id: reading.message_id.clone(),
                    },
                    None,
                )
            }
        }
        Phase::Normal => (Phase::Normal, None),
        Phase::Pending {
            since_ms,
            count,
            first_message_id,
        } if violating => {
            let count = count + 1;
            if held(count, since_ms, ts_ms, c.debounce_readings, c.debounce_for) {
                let (phase, id) = opened(&first_message_id, since_ms, count);
                (
                    phase,
                    Some(
                        Occurrence {
                            rule,
                            gateway_id,
                            device,
                            sensor,
                            event_id: &id,
                            since_ms,
                            count,
                            reading: Some(reading),
                        }
                        .raise(),
                    ),
                )
            } else {
                (
                    Phase::Pending {
                        since_ms,
                        count,
                        first_message_id,
                    },
                    None,
                )
            }
        }
        Phase::Pending { .. } => (Phase::Normal, None),
        Phase::Open {
            event_id,
            since_ms,
            count,
        }
        | Phase::Clearing {
            event_id,
            since_ms,
            count,
            ..
        } if !clear => {
            let count = count + u32::from(violating);
            (
                Phase::Open {
                    event_id,
                    since_ms,
                    count,
                },
                None,
            )
        }
        Phase::Open {
            event_id,
            since_ms,
            count,
        } => step_clearing(
            rule,
            (event_id, since_ms, count),
            (ts_ms, 1),
            reading,
            ts_ms,
            gateway_id,
        ),
        Phase::Clearing {
            event_id,
            since_ms,
            count,
            clear_since_ms,
            clear_count,
        } => step_clearing(
            rule,
            (event_id, since_ms, count),
            (clear_since_ms, clear_count + 1),
            reading,
            ts_ms,
            gateway_id,
        ),
    };
    state.phase = next;
    event
}

/// One clear reading while a case is open: close the occurrence once clear for long enough.
fn step_clearing(
    rule: &Rule,
    (event_id, since_ms, count): (String, i64, u32),
    (clear_since_ms, clear_count): (i64, u32),
    reading: &Reading,
    ts_ms: i64,
    gateway_id: &str,
) -> (Phase, Option<CaseEvent>) {
    let c = &rule.config;
    if held(clear_count, clear_since_ms, ts_ms, c.clear_readings, c.clear_for) {
        let e = Occurrence {
            rule,
            gateway_id,
            device: &reading.device_id,
            sensor: &reading.sensor,
            event_id: &event_id,
            since_ms,
            count,
            reading: Some(reading),
        }
        .follow_up();
        (Phase::Normal, e)
    } else {
        (
            Phase::Clearing {
                event_id,
                since_ms,
                count,
                clear_since_ms,
                clear_count,
            },
            None,
        )
    }
}

/// One occurrence of a rule's condition on one device and sensor: what a case is about.
struct Occurrence<'a> {
    rule: &'a Rule,
    gateway_id: &'a str,
    device: &'a str,
    sensor: &'a str,
    event_id: &'a str,
    /// When the condition started, and how many readings it has lasted.
    since_ms: i64,
    count: u32,
    /// The reading at hand (none for a silent device).
    reading: Option<&'a Reading>,
}

impl Occurrence<'_> {
    fn raise(&self) -> CaseEvent {
        self.event(CaseAction::Raise, self.event_id.to_string(), &self.rule.case)
    }

    /// The follow-up when the condition clears, if the rule has one. Its message id is
    /// derived from the event id, so it is as deterministic as the case.
    fn follow_up(&self) -> Option<CaseEvent> {
        let fields = self.rule.on_clear.as_ref()?;
        let key = format!("{}\0clear", self.event_id);
        let message_id = uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, key.as_bytes()).to_string();
        Some(self.event(CaseAction::Clear, message_id, fields))
    }

    fn event(&self, action: CaseAction, message_id: String, fields: &[(String, Template)]) -> CaseEvent {
        CaseEvent {
            event_id: self.event_id.to_string(),
            message_id,
            action,
            rule: self.rule.config.name.clone(),
            division: self.rule.config.division.clone(),
            device_id: self.device.to_string(),
            sensor: self.sensor.to_string(),
            case: self.render(fields),
            first_seen: format_ms(self.since_ms),
            count: self.count,
            gateway_id: self.gateway_id.to_string(),
            reading: self.reading.cloned(),
        }
    }

    fn render(&self, fields: &[(String, Template)]) -> BTreeMap<String, String> {
        let c = &self.rule.config;
        let num = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let reading = self.reading;
        let vars: HashMap<&'static str, String> = HashMap::from([
            ("rule", c.name.clone()),
            ("device_id", self.device.to_string()),
            ("sensor", self.sensor.to_string()),
            ("value", reading.map(|r| r.value.to_string()).unwrap_or_default()),
            ("unit", reading.and_then(|r| r.unit.clone()).unwrap_or_default()),
            ("threshold", num(c.threshold.or(c.max_change_per_second))),
            ("low", num(c.low)),
            ("high", num(c.high)),
            ("first_seen", format_ms(self.since_ms)),
            ("ts", reading.map_or_else(|| format_ms(self.since_ms), |r| r.ts.clone())),
            ("count", self.count.to_string()),
            ("division", c.division.clone()),
            ("gateway_id", self.gateway_id.to_string()),
            ("event_id", self.event_id.to_string()),
        ]);
        fields.iter().map(|(k, t)| (k.clone(), t.render(&vars))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Origin;

    fn rule(toml_text: &str) -> RuleConfig {
        toml::from_str(toml_text).expect("rule parses")
    }

    fn above() -> RuleConfig {
        rule(
            r#"
            name = "temp-high"
            sensors = "temp*"
            kind = "above"
            threshold = 80.0
            clear_level = 75.0
            division = "facilities"
            [case]
            Subject = "{device_id}: {sensor} {value}{unit} above {threshold}"
            Priority = "High"
            [on_clear]
            Status = "Closed"
            "#,
        )
    }

    fn engine(rules: Vec<RuleConfig>) -> Engine {
        Engine::new(RuleSet::new(&rules).expect("valid rules"), RuleStates::new(), "gw")
    }

    fn reading(device: &str, sensor: &str, value: f64, seq: u64) -> Reading {
        let payload = format!(r#"{{"value": {value}, "seq": {seq}, "unit": "C"}}"#);
        let origin = Origin {
            device_id: Some(device),
            sensor: Some(sensor),
            source: "test",
            gateway_id: "gw",
            received_ms: 0,
        };
        Reading::parse(payload.as_bytes(), &origin, 1024).expect("valid reading")
    }

    fn at(mut r: Reading, ts_ms: i64) -> Reading {
        r.ts_ms = ts_ms;
        r
    }

    /// Feeds values one second apart; returns the events.
    fn feed(e: &mut Engine, values: &[f64]) -> Vec<CaseEvent> {
        values
            .iter()
            .enumerate()
            .flat_map(|(i, v)| {
                e.on_reading(&at(reading("d1", "temp", *v, i as u64), i as i64 * 1000), 0)
                    .0
            })
            .collect()
    }

    #[test]
    fn a_stuck_high_sensor_raises_exactly_one_case() {
        let mut e = engine(vec![above()]);
        let events = feed(&mut e, &[70.0, 85.0, 86.0, 90.0, 88.0, 95.0]);
        assert_eq!(events.len(), 1, "{events:#?}");
        let c = &events[0];
        assert_eq!(c.action, CaseAction::Raise);
        assert_eq!(c.case["Subject"], "d1: temp 85C above 80");
        assert_eq!(c.routing_key(), "case.facilities");
    }

    #[test]
    fn a_flapping_sensor_raises_at_most_one_case() {
        let mut c = above();
        c.clear_readings = 3;
        let mut e = engine(vec![c]);
        let flapping: Vec<f64> = (0..40).map(|i| if i % 2 == 0 { 81.0 } else { 74.0 }).collect();
        let events = feed(&mut e, &flapping);
        assert_eq!(
            events.iter().filter(|e| e.action == CaseAction::Raise).count(),
            1,
            "{events:#?}"
        );
    }

    #[test]
    fn hysteresis_keeps_the_case_open_between_clear_level_and_threshold() {
        let mut e = engine(vec![above()]);
        let events = feed(&mut e, &[85.0, 78.0, 79.0, 85.0, 77.0]);
        assert_eq!(events.len(), 1, "78 and 79 are not below the clear level 75");
    }

    #[test]
    fn a_cleared_condition_then_a_new_occurrence_raises_a_second_case() {
        let mut e = engine(vec![above()]);
        let events = feed(&mut e, &[85.0, 70.0, 71.0, 90.0]);
        let kinds: Vec<CaseAction> = events.iter().map(|e| e.action).collect();
        assert_eq!(kinds, [CaseAction::Raise, CaseAction::Clear, CaseAction::Raise]);
        assert_eq!(events[1].event_id, events[0].event_id, "the follow-up names its case");
        assert_ne!(events[1].message_id, events[0].message_id);
        assert_eq!(events[1].case["Status"], "Closed");
        assert_ne!(events[2].event_id, events[0].event_id, "a new occurrence is a new case");
    }

    #[test]
    fn debounce_needs_consecutive_readings() {
        let mut c = above();
        c.debounce_readings = 3;
        let mut e = engine(vec![c]);
        assert!(feed(&mut e, &[85.0, 85.0, 70.0, 85.0, 85.0]).is_empty());
        let events = feed(&mut e, &[85.0, 85.0, 85.0]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].count, 3);
    }

    #[test]
    fn event_ids_are_deterministic_and_restarts_do_not_raise_again() {
        let values = [70.0, 85.0, 86.0];
        let first = feed(&mut engine(vec![above()]), &values);
        let mut e = engine(vec![above()]);
        let second = feed(&mut e, &values);
        assert_eq!(first[0].event_id, second[0].event_id);
        // Restart: the states go through JSON (as in the buffer) into a new engine.
        let saved = serde_json::to_string(e.states()).expect("serialize");
        let states: RuleStates = serde_json::from_str(&saved).expect("deserialize");
        let mut restarted = Engine::new(RuleSet::new(&[above()]).expect("valid"), states, "gw");
        let after = restarted.on_reading(&at(reading("d1", "temp", 99.0, 10), 10_000), 0).0;
        assert!(after.is_empty(), "{after:#?}");
    }

    #[test]
    fn out_of_range_rate_and_stuck_rules() {
        let range = rule(
            r#"name = "hum" 
            kind = "outside"
            low = 20.0
            high = 60.0
            division = "d"
            case = { Subject = "{sensor} outside {low}..{high}" }"#,
        );
        let rate = rule(
            r#"name = "jump"
            kind = "rate"
            max_change_per_second = 5.0
            division = "d"
            case = { Subject = "jump" }"#,
        );
        let stuck = rule(
            r#"name = "stuck"
            kind = "stuck"
            stuck_readings = 4
            division = "d"
            case = { Subject = "stuck at {value}" }"#,
        );
        let mut e = engine(vec![range, rate, stuck]);
        let events = feed(&mut e, &[30.0, 31.0, 70.0, 70.0, 70.0, 70.0]);
        let names: Vec<&str> = events.iter().map(|e| e.rule.as_str()).collect();
        assert_eq!(names, ["hum", "jump", "stuck"], "{events:#?}");
        assert_eq!(events[0].case["Subject"], "temp outside 20..60");
        assert_eq!(events[2].case["Subject"], "stuck at 70");
    }

    #[test]
    fn a_silent_device_raises_on_time_once_and_clears_when_heard() {
        let silent = rule(
            r#"name = "silent"
            devices = "d*"
            kind = "silent"
            silent_for = "60s"
            division = "ops"
            case = { Subject = "{device_id} silent since {first_seen}" }
            on_clear = { Status = "Closed" }"#,
        );
        let mut e = engine(vec![silent]);
        e.on_reading(&reading("d1", "temp", 1.0, 0), 0);
        assert!(e.on_tick(59_000).0.is_empty());
        let raised = e.on_tick(60_000).0;
        assert_eq!(raised.len(), 1);
        assert_eq!(raised[0].case["Subject"], "d1 silent since 1970-01-01T00:00:00.000Z");
        assert!(e.on_tick(120_000).0.is_empty(), "raised once");
        let cleared = e.on_reading(&reading("d1", "temp", 1.0, 1), 130_000).0;
        assert_eq!(cleared.len(), 1);
        assert_eq!(cleared[0].action, CaseAction::Clear);
    }

    #[test]
    fn every_placeholder_renders() {
        let mut c = above();
        c.case = PLACEHOLDERS
            .iter()
            .map(|p| (p.to_string(), format!("{{{p}}}")))
            .collect();
        let mut e = engine(vec![c]);
        let ev = e.on_reading(&at(reading("d1", "temp", 81.5, 1), 5_000), 0).0.remove(0);
        let want = [
            ("rule", "temp-high"),
            ("device_id", "d1"),
            ("sensor", "temp"),
            ("value", "81.5"),
            ("unit", "C"),
            ("threshold", "80"),
            ("low", ""),
            ("high", ""),
            ("first_seen", "1970-01-01T00:00:05.000Z"),
            ("count", "1"),
            ("division", "facilities"),
            ("gateway_id", "gw"),
        ];
        for (k, v) in want {
            assert_eq!(ev.case[k], v, "{k}");
        }
        assert_eq!(ev.case["event_id"], ev.event_id);
        assert!(!ev.case["ts"].is_empty());
    }

    #[test]
    fn bad_rules_name_the_rule_and_the_key() {
        let mut c = above();
        c.case.insert("Subject".into(), "{device}".into());
        let mut d = above();
        d.name = "no-threshold".into();
        d.threshold = None;
        let errs = RuleSet::new(&[c, d]).unwrap_err();
        assert!(
            errs[0].contains(r#"rules[0] "temp-high": case.Subject: unknown placeholder {device}"#),
            "{errs:?}"
        );
        assert!(errs[1].contains(r#"rules[1] "no-threshold": threshold"#), "{errs:?}");
    }
}
