//! The org's state: users and connected apps, issued sessions, records per sObject type,
//! injected faults and request statistics. No I/O: the HTTP layer ([`crate::http`]) turns
//! requests into calls here and [`ApiError`]s into Salesforce's error bodies.
//!
//! Every write goes through [`Org::write`], which validates like Salesforce does (unknown
//! and read-only fields, lengths, ids, required fields, validation rules) and then emits a
//! [`ChangeEvent`] on a broadcast channel: the hook a Streaming API (PushTopic) emulation
//! subscribes to. Record types are described by [`ObjectSchema`]s, so adding an object
//! (PushTopic, Account) is adding a schema.

use crate::ids::IdGen;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// One error item in Salesforce's single-record shape (`errorCode`); collections rename it
/// to `statusCode`.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorItem {
    pub code: String,
    pub message: String,
    pub fields: Vec<String>,
}

/// An answer other than success: HTTP status plus the error array.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub errors: Vec<ErrorItem>,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            errors: vec![ErrorItem {
                code: code.into(),
                message: message.into(),
                fields: Vec::new(),
            }],
        }
    }
    pub fn with_fields(mut self, fields: Vec<String>) -> ApiError {
        if let Some(e) = self.errors.first_mut() {
            e.fields = fields;
        }
        self
    }
    pub fn not_found() -> ApiError {
        ApiError::new(404, "NOT_FOUND", "The requested resource does not exist")
    }
    pub fn session() -> ApiError {
        ApiError::new(401, "INVALID_SESSION_ID", "Session expired or invalid")
    }
    /// The single-record body: `[{"message","errorCode","fields"?}]`.
    pub fn body(&self) -> Value {
        Value::Array(
            self.errors
                .iter()
                .map(|e| {
                    let mut o = json!({"message": e.message, "errorCode": e.code});
                    if !e.fields.is_empty() {
                        o["fields"] = json!(e.fields);
                    }
                    o
                })
                .collect(),
        )
    }
}

/// What a field accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Id,
    Text(usize),
    Picklist,
    Reference,
    Boolean,
    DateTime,
    AutoNumber,
    Double,
}

#[derive(Debug, Clone)]
pub struct FieldDef {
    pub name: String,
    pub label: String,
    pub kind: FieldKind,
    pub createable: bool,
    pub updateable: bool,
    pub external_id: bool,
}

impl FieldDef {
    fn new(name: &str, label: &str, kind: FieldKind, writable: bool) -> FieldDef {
        FieldDef {
            name: name.into(),
            label: label.into(),
            kind,
            createable: writable,
            updateable: writable,
            external_id: false,
        }
    }
    fn type_name(&self) -> &'static str {
        match self.kind {
            FieldKind::Id => "id",
            FieldKind::Text(n) if n > 255 => "textarea",
            FieldKind::Text(_) | FieldKind::AutoNumber => "string",
            FieldKind::Picklist => "picklist",
            FieldKind::Reference => "reference",
            FieldKind::Boolean => "boolean",
            FieldKind::DateTime => "datetime",
            FieldKind::Double => "double",
        }
    }
}

/// An sObject type: its key prefix and fields.
#[derive(Debug, Clone)]
pub struct ObjectSchema {
    pub name: String,
    pub key_prefix: String,
    pub fields: Vec<FieldDef>,
}

impl ObjectSchema {
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.name.eq_ignore_ascii_case(name))
    }

    /// The Case object with the standard fields a connector uses, plus `external_ids`
    /// (unique, case-sensitive text external ids) and `custom` text fields.
    pub fn case(external_ids: &[String], custom: &[String]) -> ObjectSchema {
        use FieldKind::*;
        let mut fields = vec![
            FieldDef::new("Id", "Case ID", Id, false),
            FieldDef::new("IsDeleted", "Deleted", Boolean, false),
            FieldDef::new("CaseNumber", "Case Number", AutoNumber, false),
            FieldDef::new("ContactId", "Contact ID", Reference, true),
            FieldDef::new("AccountId", "Account ID", Reference, true),
            FieldDef::new("ParentId", "Parent Case ID", Reference, true),
            FieldDef::new("SuppliedName", "Name", Text(80), true),
            FieldDef::new("SuppliedEmail", "Email Address", Text(80), true),
            FieldDef::new("SuppliedPhone", "Phone", Text(40), true),
            FieldDef::new("SuppliedCompany", "Company", Text(80), true),
            FieldDef::new("Type", "Case Type", Picklist, true),
            FieldDef::new("RecordTypeId", "Record Type ID", Reference, true),
            FieldDef::new("Status", "Status", Picklist, true),
            FieldDef::new("Reason", "Case Reason", Picklist, true),
            FieldDef::new("Origin", "Case Origin", Picklist, true),
            FieldDef::new("Subject", "Subject", Text(255), true),
            FieldDef::new("Priority", "Priority", Picklist, true),
            FieldDef::new("Description", "Description", Text(32000), true),
            FieldDef::new("IsClosed", "Closed", Boolean, false),
            FieldDef::new("ClosedDate", "Closed Date", DateTime, false),
            FieldDef::new("IsEscalated", "Escalated", Boolean, true),
            FieldDef::new("OwnerId", "Owner ID", Reference, true),
            FieldDef::new("CreatedDate", "Created Date", DateTime, false),
            FieldDef::new("CreatedById", "Created By ID", Reference, false),
            FieldDef::new("LastModifiedDate", "Last Modified Date", DateTime, false),
            FieldDef::new("LastModifiedById", "Last Modified By ID", Reference, false),
            FieldDef::new("SystemModstamp", "System Modstamp", DateTime, false),
            FieldDef::new("Comments", "Internal Comments", Text(4000), true),
        ];
        for name in external_ids {
            let mut f = FieldDef::new(name, name.trim_end_matches("__c"), Text(255), true);
            f.external_id = true;
            fields.push(f);
        }
        for name in custom {
            fields.push(FieldDef::new(name, name.trim_end_matches("__c"), Text(255), true));
        }
        ObjectSchema {
            name: "Case".into(),
            key_prefix: "500".into(),
            fields,
        }
    }

    /// `GET /sobjects/{type}/describe`, the parts clients read.
    pub fn describe(&self) -> Value {
        json!({
            "name": self.name,
            "label": self.name,
            "keyPrefix": self.key_prefix,
            "createable": true,
            "updateable": true,
            "queryable": true,
            "fields": self.fields.iter().map(|f| json!({
                "name": f.name,
                "label": f.label,
                "type": f.type_name(),
                "length": match f.kind { FieldKind::Text(n) => n, FieldKind::Id | FieldKind::Reference => 18, _ => 0 },
                "createable": f.createable,
                "updateable": f.updateable,
                "externalId": f.external_id,
                "unique": f.external_id,
                "nillable": !matches!(f.kind, FieldKind::Id | FieldKind::Boolean),
            })).collect::<Vec<_>>(),
        })
    }
}

/// A validation rule on one object: a record whose `field` contains `contains` (case
/// insensitive) is refused with `FIELD_CUSTOM_VALIDATION_EXCEPTION` and `message`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ValidationRule {
    pub object: String,
    pub field: String,
    pub contains: String,
    pub message: String,
}

/// A failure to answer instead of the next REST API call(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 403 `REQUEST_LIMIT_EXCEEDED` "TotalRequests Limit exceeded."
    RateLimit,
    /// 503 with an HTML body, as from Salesforce's edge proxy during maintenance.
    Unavailable,
    /// 500 `UNKNOWN_EXCEPTION` (JSON).
    ServerError,
    /// 400 `UNABLE_TO_LOCK_ROW`: another transaction holds the record.
    LockRow,
    /// 401 `INVALID_SESSION_ID`, and every session really ends (as on a session timeout).
    SessionExpired,
    /// No answer for `stall_ms` (default 60 s): a client must time out.
    Stall,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// How many consecutive REST calls it answers.
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub stall_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

/// A record change, for subscribers of [`Org::subscribe_changes`].
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub object: String,
    pub kind: ChangeKind,
    /// The record after the change (before it, for a delete).
    pub record: Map<String, Value>,
    /// Fields the change wrote (all of them on create).
    pub changed_fields: Vec<String>,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct User {
    pub username: String,
    pub password: String,
    pub security_token: String,
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct App {
    pub client_id: String,
    pub client_secret: String,
    pub jwt_public_key_pem: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub expires: Instant,
    pub client_id: String,
}

/// Settings that tests change while the emulator runs.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Settings {
    /// Added before answering every REST and token request.
    pub latency_ms: u64,
    /// Sessions end this long after login (Salesforce's default session timeout is 2 h).
    pub token_ttl_ms: u64,
    /// REST calls allowed in the rolling day; beyond, 403 `REQUEST_LIMIT_EXCEEDED`.
    pub daily_api_limit: u64,
    /// Fields that must be present (non-empty) on every Case written.
    pub required_case_fields: Vec<String>,
    pub validation_rules: Vec<ValidationRule>,
    /// Records per query batch before `nextRecordsUrl` (Salesforce: 2,000).
    pub query_batch_size: usize,
    /// The username-password flow is allowed (new orgs block it by default).
    pub password_grant: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            latency_ms: 0,
            token_ttl_ms: 2 * 3600 * 1000,
            daily_api_limit: 1_000_000,
            required_case_fields: Vec::new(),
            validation_rules: Vec::new(),
            query_batch_size: 2000,
            password_grant: true,
        }
    }
}

/// One object's rows, in creation order.
type Records = Vec<Map<String, Value>>;

struct Table {
    schema: ObjectSchema,
    records: Vec<Map<String, Value>>,
    by_id: HashMap<String, usize>,
    /// External id field → value → record index (external ids are unique here).
    ext: HashMap<String, HashMap<String, usize>>,
}

/// Counts of what the emulator served, for tests and benchmarks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub rest_requests: u64,
    pub token_requests: u64,
    pub faults_served: u64,
    pub max_concurrent: u64,
    /// The most REST requests that started within any one second.
    pub max_per_second: u64,
}

struct Inner {
    settings: Settings,
    sessions: HashMap<String, Session>,
    tables: HashMap<String, Table>,
    faults: VecDeque<Fault>,
    api_usage: u64,
    stats: Stats,
    concurrent: u64,
    recent: VecDeque<Instant>,
    cursors: HashMap<String, (String, Vec<Value>)>,
    ids: IdGen,
    case_number: u64,
}

/// The emulated org. Shared by the HTTP handlers and the test or demo that started it.
pub struct Org {
    pub org_id: String,
    users: Vec<User>,
    apps: Vec<App>,
    pub audiences: Vec<String>,
    inner: Mutex<Inner>,
    changes: broadcast::Sender<ChangeEvent>,
}

/// What the emulator is started with.
#[derive(Debug, Clone)]
pub struct OrgSetup {
    pub apps: Vec<(String, String, Option<String>)>,
    pub users: Vec<(String, String, String)>,
    pub audiences: Vec<String>,
    pub external_id_fields: Vec<String>,
    pub custom_fields: Vec<String>,
    pub settings: Settings,
}

impl Org {
    pub fn new(setup: OrgSetup) -> Org {
        let mut ids = IdGen::default();
        let org_id = ids.next("00D");
        let users = setup
            .users
            .into_iter()
            .map(|(username, password, security_token)| User {
                username,
                password,
                security_token,
                id: ids.next("005"),
            })
            .collect();
        let apps = setup
            .apps
            .into_iter()
            .map(|(client_id, client_secret, jwt_public_key_pem)| App {
                client_id,
                client_secret,
                jwt_public_key_pem,
            })
            .collect();
        let schema = ObjectSchema::case(&setup.external_id_fields, &setup.custom_fields);
        let mut tables = HashMap::new();
        tables.insert(
            "case".to_string(),
            Table {
                schema,
                records: Vec::new(),
                by_id: HashMap::new(),
                ext: HashMap::new(),
            },
        );
        let (changes, _) = broadcast::channel(4096);
        Org {
            org_id,
            users,
            apps,
            audiences: setup.audiences,
            inner: Mutex::new(Inner {
                settings: setup.settings,
                sessions: HashMap::new(),
                tables,
                faults: VecDeque::new(),
                api_usage: 0,
                stats: Stats::default(),
                concurrent: 0,
                recent: VecDeque::new(),
                cursors: HashMap::new(),
                ids,
                case_number: 1000,
            }),
            changes,
        }
    }

    // A std Mutex, not tokio's: no lock is held across an await, and every critical
    // section is a few map operations.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an object type (for example PushTopic) that the REST API then serves.
    pub fn add_object(&self, schema: ObjectSchema) {
        let mut g = self.lock();
        g.tables.insert(
            schema.name.to_lowercase(),
            Table {
                schema,
                records: Vec::new(),
                by_id: HashMap::new(),
                ext: HashMap::new(),
            },
        );
    }

    pub fn settings(&self) -> Settings {
        self.lock().settings.clone()
    }

    pub fn update_settings(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.lock().settings);
    }

    pub fn users(&self) -> &[User] {
        &self.users
    }

    pub fn app(&self, client_id: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.client_id == client_id)
    }

    pub fn user(&self, username: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username.eq_ignore_ascii_case(username))
    }

    /// Starts a session for `user_id`; returns the access token.
    pub fn open_session(&self, user_id: &str, client_id: &str) -> String {
        let mut g = self.lock();
        g.stats.token_requests += 1;
        let ttl = Duration::from_millis(g.settings.token_ttl_ms);
        let token = format!("{}!{}", &self.org_id[..15], random_token(96));
        g.sessions.insert(
            token.clone(),
            Session {
                user_id: user_id.into(),
                expires: Instant::now() + ttl,
                client_id: client_id.into(),
            },
        );
        token
    }

    /// Counts a refused token request.
    pub fn token_refused(&self) {
        self.lock().stats.token_requests += 1;
    }

    /// The session of `token`, if it is live.
    pub fn session(&self, token: &str) -> Option<Session> {
        let mut g = self.lock();
        match g.sessions.get(token) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                g.sessions.remove(token);
                None
            }
            None => None,
        }
    }

    /// Ends every session, as an administrator revoking them or a timeout would.
    pub fn expire_sessions(&self) {
        self.lock().sessions.clear();
    }

    /// Queues a fault for the next REST calls (after any already queued).
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// Called when a REST request starts: counts it, tracks concurrency and the rate, and
    /// returns the fault to answer with, if one is queued.
    pub fn begin_request(&self) -> Option<Fault> {
        let mut g = self.lock();
        g.stats.rest_requests += 1;
        g.concurrent += 1;
        g.stats.max_concurrent = g.stats.max_concurrent.max(g.concurrent);
        let now = Instant::now();
        g.recent.push_back(now);
        while g
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            g.recent.pop_front();
        }
        g.stats.max_per_second = g.stats.max_per_second.max(g.recent.len() as u64);
        let fault = g.faults.front_mut().map(|f| {
            f.count = f.count.saturating_sub(1);
            f.clone()
        });
        if g.faults.front().is_some_and(|f| f.count == 0) {
            g.faults.pop_front();
        }
        if fault.is_some() {
            g.stats.faults_served += 1;
        }
        fault
    }

    pub fn end_request(&self) {
        let mut g = self.lock();
        g.concurrent = g.concurrent.saturating_sub(1);
    }

    /// Counts one call against the daily allowance; `Err` once it is used up.
    pub fn charge_api_call(&self) -> Result<(u64, u64), ApiError> {
        let mut g = self.lock();
        let limit = g.settings.daily_api_limit;
        if g.api_usage >= limit {
            return Err(ApiError::new(
                403,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            ));
        }
        g.api_usage += 1;
        Ok((g.api_usage, limit))
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<ChangeEvent> {
        self.changes.subscribe()
    }

    pub fn describe(&self, object: &str) -> Result<Value, ApiError> {
        let g = self.lock();
        Ok(table(&g, object)?.schema.describe())
    }

    /// Every record of `object`, in creation order.
    pub fn records(&self, object: &str) -> Vec<Map<String, Value>> {
        let g = self.lock();
        table(&g, object).map(|t| t.records.clone()).unwrap_or_default()
    }

    pub fn get(&self, object: &str, id: &str) -> Result<Map<String, Value>, ApiError> {
        let g = self.lock();
        let t = table(&g, object)?;
        t.by_id
            .get(&normalize_id(id))
            .map(|i| t.records[*i].clone())
            .ok_or_else(ApiError::not_found)
    }

    pub fn get_by_external_id(&self, object: &str, field: &str, value: &str) -> Result<Map<String, Value>, ApiError> {
        let g = self.lock();
        let t = table(&g, object)?;
        let f = external_field(t, field)?;
        let hit = if f == "Id" {
            t.by_id.get(&normalize_id(value))
        } else {
            t.ext.get(&f).and_then(|m| m.get(value))
        };
        match hit {
            Some(&i) => Ok(t.records[i].clone()),
            None => Err(ApiError::not_found()),
        }
    }

    /// How many records of `object` there are.
    pub fn count(&self, object: &str) -> usize {
        let g = self.lock();
        table(&g, object).map_or(0, |t| t.records.len())
    }

    /// Creates a record; returns its id.
    pub fn create(&self, object: &str, body: &Map<String, Value>, user_id: &str) -> Result<String, ApiError> {
        self.write(object, Write::Create, body, user_id).map(|(id, _)| id)
    }

    /// Updates the record `id`.
    pub fn update(&self, object: &str, id: &str, body: &Map<String, Value>, user_id: &str) -> Result<(), ApiError> {
        self.write(object, Write::Update(normalize_id(id)), body, user_id)
            .map(|_| ())
    }

    /// Upserts on an external id; returns the id and whether it was created.
    pub fn upsert(
        &self,
        object: &str,
        field: &str,
        value: &str,
        body: &Map<String, Value>,
        user_id: &str,
    ) -> Result<(String, bool), ApiError> {
        self.write(object, Write::Upsert(field.into(), value.into()), body, user_id)
    }

    pub fn delete(&self, object: &str, id: &str) -> Result<(), ApiError> {
        let event = {
            let mut g = self.lock();
            let t = table_mut(&mut g.tables, object)?;
            let id = normalize_id(id);
            let idx = *t.by_id.get(&id).ok_or_else(ApiError::not_found)?;
            let record = t.records.remove(idx);
            reindex(t);
            ChangeEvent {
                object: t.schema.name.clone(),
                kind: ChangeKind::Deleted,
                record,
                changed_fields: Vec::new(),
                at_ms: now_ms(),
            }
        };
        let _ = self.changes.send(event);
        Ok(())
    }

    fn write(
        &self,
        object: &str,
        how: Write,
        body: &Map<String, Value>,
        user_id: &str,
    ) -> Result<(String, bool), ApiError> {
        let (result, event) = {
            let mut g = self.lock();
            write_locked(&mut g, object, how, body, user_id)?
        };
        // No receiver is fine: nobody subscribed yet.
        let _ = self.changes.send(event);
        Ok(result)
    }

    /// The sObject Collections API: creates (`upsert_on` = None) or upserts on an external
    /// id each record in order. Each record needs `attributes.type`. With `all_or_none`, a
    /// single failure undoes the others, which fail with `ALL_OR_NONE_OPERATION_ROLLED_BACK`.
    pub fn collection(
        &self,
        upsert_on: Option<(&str, &str)>,
        records: &[Value],
        all_or_none: bool,
        user_id: &str,
    ) -> Vec<Result<(String, bool), ApiError>> {
        let mut events = Vec::new();
        let mut results = Vec::new();
        {
            let mut g = self.lock();
            let snapshot: Option<Vec<(String, Records)>> =
                all_or_none.then(|| g.tables.iter().map(|(k, t)| (k.clone(), t.records.clone())).collect());
            for r in records {
                let outcome = (|| {
                    let obj = r
                        .get("attributes")
                        .and_then(|a| a.get("type"))
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::new(400, "INVALID_TYPE", "Must send a concrete entity type."))?;
                    let body = r
                        .as_object()
                        .ok_or_else(|| ApiError::new(400, "JSON_PARSER_ERROR", "Each record must be a JSON object"))?;
                    let how = match upsert_on {
                        None => {
                            if body.contains_key("Id") {
                                return Err(ApiError::new(
                                    400,
                                    "INVALID_FIELD",
                                    "Can't create a record with an Id; use update or upsert",
                                ));
                            }
                            Write::Create
                        }
                        Some((object, field)) => {
                            if !obj.eq_ignore_ascii_case(object) {
                                return Err(ApiError::new(
                                    400,
                                    "INVALID_TYPE",
                                    format!("Record type {obj} does not match {object} in the URL"),
                                ));
                            }
                            let value = crate::soql::field(body, field).as_str().ok_or_else(|| {
                                ApiError::new(400, "MISSING_ARGUMENT", format!("{field} not specified"))
                                    .with_fields(vec![field.to_string()])
                            })?;
                            Write::Upsert(field.to_string(), value.to_string())
                        }
                    };
                    write_locked(&mut g, obj, how, body, user_id)
                })();
                match outcome {
                    Ok((result, event)) => {
                        events.push(event);
                        results.push(Ok(result));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
            if let Some(snapshot) = snapshot
                && results.iter().any(Result::is_err)
            {
                for (k, records) in snapshot {
                    if let Some(t) = g.tables.get_mut(&k) {
                        t.records = records;
                        reindex(t);
                    }
                }
                events.clear();
                for r in results.iter_mut() {
                    if r.is_ok() {
                        *r = Err(ApiError::new(
                            400,
                            "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                            "Record rolled back because not all records were valid and the request was using AllOrNone header",
                        ));
                    }
                }
            }
        }
        for e in events {
            let _ = self.changes.send(e);
        }
        results
    }

    /// Runs a SOQL query; returns the first batch (and keeps the rest for `query_more`).
    pub fn query(&self, soql: &str, version: &str) -> Result<Value, ApiError> {
        let q = crate::soql::parse(soql).map_err(|e| ApiError::new(400, "MALFORMED_QUERY", e))?;
        let mut g = self.lock();
        let batch = g.settings.query_batch_size.max(1);
        let t = g.tables.get(&q.object.to_lowercase()).ok_or_else(|| {
            ApiError::new(
                400,
                "INVALID_TYPE",
                format!("sObject type '{}' is not supported.", q.object),
            )
        })?;
        for f in q.fields() {
            if t.schema.field(&f).is_none() {
                return Err(ApiError::new(
                    400,
                    "INVALID_FIELD",
                    format!("No such column '{f}' on entity '{}'.", t.schema.name),
                ));
            }
        }
        let mut rows: Vec<&Map<String, Value>> = t
            .records
            .iter()
            .filter(|r| q.filter.as_ref().is_none_or(|f| crate::soql::matches(f, r)))
            .collect();
        for (field, desc, nulls_last) in q.order.iter().rev() {
            rows.sort_by(|a, b| {
                let o = crate::soql::order_cmp(soql_field(a, field), soql_field(b, field), *nulls_last);
                if *desc { o.reverse() } else { o }
            });
        }
        let rows: Vec<&Map<String, Value>> = rows
            .into_iter()
            .skip(q.offset)
            .take(q.limit.unwrap_or(usize::MAX))
            .collect();
        let total = rows.len();
        let fields = match &q.selection {
            crate::soql::Selection::Count => {
                return Ok(json!({"totalSize": total, "done": true, "records": []}));
            }
            crate::soql::Selection::Fields(f) => f.clone(),
        };
        let name = t.schema.name.clone();
        let mut out: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut o = Map::new();
                let id = r.get("Id").and_then(Value::as_str).unwrap_or_default();
                o.insert(
                    "attributes".into(),
                    json!({"type": name, "url": format!("/services/data/v{version}/sobjects/{name}/{id}")}),
                );
                for f in &fields {
                    let canonical = t.schema.field(f).map_or(f.clone(), |d| d.name.clone());
                    o.insert(canonical.clone(), soql_field(r, &canonical).clone());
                }
                Value::Object(o)
            })
            .collect();
        if out.len() <= batch {
            return Ok(json!({"totalSize": total, "done": true, "records": out}));
        }
        let rest = out.split_off(batch);
        let locator = g.ids.next("01g");
        let next = format!("/services/data/v{version}/query/{locator}-{batch}");
        g.cursors
            .insert(format!("{locator}-{batch}"), (version.to_string(), rest));
        Ok(json!({"totalSize": total, "done": false, "nextRecordsUrl": next, "records": out}))
    }

    /// The next batch of a query: `locator` is the last path segment of `nextRecordsUrl`.
    pub fn query_more(&self, locator: &str) -> Result<Value, ApiError> {
        let mut g = self.lock();
        let batch = g.settings.query_batch_size.max(1);
        let (version, mut rows) = g
            .cursors
            .remove(locator)
            .ok_or_else(|| ApiError::new(400, "INVALID_QUERY_LOCATOR", "invalid query locator"))?;
        let (base, served) = locator
            .rsplit_once('-')
            .and_then(|(b, n)| Some((b.to_string(), n.parse::<usize>().ok()?)))
            .ok_or_else(|| ApiError::new(400, "INVALID_QUERY_LOCATOR", "invalid query locator"))?;
        let total = served + rows.len();
        if rows.len() <= batch {
            return Ok(json!({"totalSize": total, "done": true, "records": rows}));
        }
        let rest = rows.split_off(batch);
        let key = format!("{base}-{}", served + batch);
        let next = format!("/services/data/v{version}/query/{key}");
        g.cursors.insert(key, (version, rest));
        Ok(json!({"totalSize": total, "done": false, "nextRecordsUrl": next, "records": rows}))
    }
}

enum Write {
    Create,
    Update(String),
    Upsert(String, String),
}

/// Validates and applies one write on the locked state; the caller sends the event.
fn write_locked(
    g: &mut Inner,
    object: &str,
    how: Write,
    body: &Map<String, Value>,
    user_id: &str,
) -> Result<((String, bool), ChangeEvent), ApiError> {
    {
        let settings = g.settings.clone();
        let t = table_mut(&mut g.tables, object)?;
        // Which record, if any, this write updates.
        let (existing, ext) = match &how {
            Write::Create => (None, None),
            Write::Update(id) => (Some(*t.by_id.get(id).ok_or_else(ApiError::not_found)?), None),
            Write::Upsert(field, value) => {
                let f = external_field(t, field)?;
                let hit = if f == "Id" {
                    t.by_id.get(&normalize_id(value)).copied()
                } else {
                    t.ext.get(&f).and_then(|m| m.get(value.as_str())).copied()
                };
                (hit, Some((f, value.clone())))
            }
        };
        let creating = existing.is_none();
        let mut changed = Vec::new();
        let mut record = match existing {
            Some(i) => t.records[i].clone(),
            None => Map::new(),
        };
        for (key, value) in body {
            if key == "attributes" {
                continue;
            }
            let f = t.schema.field(key).ok_or_else(|| {
                ApiError::new(
                    400,
                    "INVALID_FIELD",
                    format!("No such column '{key}' on sobject of type {}", t.schema.name),
                )
            })?;
            let writable = if creating { f.createable } else { f.updateable };
            if !writable {
                return Err(ApiError::new(
                        400,
                        "INVALID_FIELD_FOR_INSERT_UPDATE",
                        format!("Unable to create/update fields: {}. Please check the security settings of this field and verify that it is read/write for your profile or permission set.", f.name),
                    )
                    .with_fields(vec![f.name.clone()]));
            }
            let value = check_value(f, value)?;
            if let Some((ext_field, ext_value)) = &ext
                && f.name == *ext_field
                && value.as_str() != Some(ext_value.as_str())
            {
                return Err(ApiError::new(
                    400,
                    "INVALID_FIELD",
                    format!("The value of {ext_field} in the body does not match the external id in the URL"),
                )
                .with_fields(vec![ext_field.clone()]));
            }
            changed.push(f.name.clone());
            record.insert(f.name.clone(), value);
        }
        if let Some((f, v)) = &ext
            && !record.contains_key(f)
        {
            record.insert(f.clone(), Value::String(v.clone()));
            changed.push(f.clone());
        }
        // Unique external ids: another record with the same value is a duplicate.
        for f in t.schema.fields.iter().filter(|f| f.external_id) {
            if let Some(v) = record.get(&f.name).and_then(Value::as_str)
                && let Some(&other) = t.ext.get(&f.name).and_then(|m| m.get(v))
                && Some(other) != existing
            {
                let other_id = t.records[other].get("Id").and_then(Value::as_str).unwrap_or_default();
                return Err(ApiError::new(
                    400,
                    "DUPLICATE_VALUE",
                    format!(
                        "duplicate value found: {} duplicates value on record with id: {other_id}",
                        f.name
                    ),
                ));
            }
        }
        if t.schema.name == "Case" {
            let missing: Vec<String> = settings
                .required_case_fields
                .iter()
                .filter(|f| match soql_field(&record, f) {
                    Value::Null => true,
                    Value::String(s) => s.trim().is_empty(),
                    _ => false,
                })
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(ApiError::new(
                    400,
                    "REQUIRED_FIELD_MISSING",
                    format!("Required fields are missing: [{}]", missing.join(", ")),
                )
                .with_fields(missing));
            }
        }
        for rule in settings
            .validation_rules
            .iter()
            .filter(|r| r.object.eq_ignore_ascii_case(&t.schema.name))
        {
            if let Value::String(s) = soql_field(&record, &rule.field)
                && s.to_lowercase().contains(&rule.contains.to_lowercase())
            {
                return Err(
                    ApiError::new(400, "FIELD_CUSTOM_VALIDATION_EXCEPTION", rule.message.clone())
                        .with_fields(vec![rule.field.clone()]),
                );
            }
        }
        let now = sf_datetime(now_ms());
        if creating {
            let id = g.ids.next(&t.schema.key_prefix);
            record.insert("Id".into(), Value::String(id.clone()));
            record.insert("IsDeleted".into(), Value::Bool(false));
            record.insert("CreatedDate".into(), Value::String(now.clone()));
            record.insert("CreatedById".into(), Value::String(user_id.into()));
            if t.schema.name == "Case" {
                g.case_number += 1;
                record.insert("CaseNumber".into(), Value::String(format!("{:08}", g.case_number)));
                record.entry("Status").or_insert(Value::String("New".into()));
                record.entry("Priority").or_insert(Value::String("Medium".into()));
                record.entry("OwnerId").or_insert(Value::String(user_id.into()));
                record.entry("IsEscalated").or_insert(Value::Bool(false));
            }
        }
        record.insert("LastModifiedDate".into(), Value::String(now.clone()));
        record.insert("LastModifiedById".into(), Value::String(user_id.into()));
        record.insert("SystemModstamp".into(), Value::String(now.clone()));
        if t.schema.name == "Case" {
            let closed = record.get("Status").and_then(Value::as_str) == Some("Closed");
            let was_closed = record.get("IsClosed").and_then(Value::as_bool) == Some(true);
            record.insert("IsClosed".into(), Value::Bool(closed));
            if closed && !was_closed {
                record.insert("ClosedDate".into(), Value::String(now));
            } else if !closed {
                record.insert("ClosedDate".into(), Value::Null);
            }
        }
        let id = record.get("Id").and_then(Value::as_str).unwrap_or_default().to_string();
        let idx = match existing {
            Some(i) => {
                for f in t.schema.fields.iter().filter(|f| f.external_id) {
                    if let Some(old) = t.records[i].get(&f.name).and_then(Value::as_str)
                        && let Some(m) = t.ext.get_mut(&f.name)
                    {
                        m.remove(old);
                    }
                }
                t.records[i] = record.clone();
                i
            }
            None => {
                t.by_id.insert(id.clone(), t.records.len());
                t.records.push(record.clone());
                t.records.len() - 1
            }
        };
        for f in t.schema.fields.iter().filter(|f| f.external_id) {
            if let Some(v) = record.get(&f.name).and_then(Value::as_str) {
                t.ext.entry(f.name.clone()).or_default().insert(v.to_string(), idx);
            }
        }
        let event = ChangeEvent {
            object: t.schema.name.clone(),
            kind: if creating {
                ChangeKind::Created
            } else {
                ChangeKind::Updated
            },
            record,
            changed_fields: changed,
            at_ms: now_ms(),
        };
        Ok(((id, creating), event))
    }
}

fn table<'a>(g: &'a Inner, object: &str) -> Result<&'a Table, ApiError> {
    g.tables.get(&object.to_lowercase()).ok_or_else(ApiError::not_found)
}

fn table_mut<'a>(tables: &'a mut HashMap<String, Table>, object: &str) -> Result<&'a mut Table, ApiError> {
    tables.get_mut(&object.to_lowercase()).ok_or_else(ApiError::not_found)
}

/// Rebuilds the id and external id indexes after rows moved (delete, rollback).
fn reindex(t: &mut Table) {
    t.by_id = t
        .records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.get("Id").and_then(Value::as_str).map(|id| (id.to_string(), i)))
        .collect();
    t.ext.clear();
    for f in t.schema.fields.iter().filter(|f| f.external_id) {
        let m = t.ext.entry(f.name.clone()).or_default();
        for (i, r) in t.records.iter().enumerate() {
            if let Some(v) = r.get(&f.name).and_then(Value::as_str) {
                m.insert(v.to_string(), i);
            }
        }
    }
}

/// The external id field named `field` (canonical spelling), or 404 as Salesforce answers
/// for a field that is missing or not an external id.
fn external_field(t: &Table, field: &str) -> Result<String, ApiError> {
    match t.schema.field(field) {
        Some(f) if f.external_id || f.name == "Id" => Ok(f.name.clone()),
        _ => Err(ApiError::new(
            404,
            "NOT_FOUND",
            format!("Provided external ID field does not exist or is not accessible: {field}"),
        )),
    }
}

fn soql_field<'a>(r: &'a Map<String, Value>, name: &str) -> &'a Value {
    crate::soql::field(r, name)
}

fn check_value(f: &FieldDef, v: &Value) -> Result<Value, ApiError> {
    let type_err = |what: &str| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!(
                "Cannot deserialize instance of {} from {what} value at [line:1] for field {}",
                f.type_name(),
                f.name
            ),
        )
    };
    match v {
        Value::Object(_) => return Err(type_err("START_OBJECT")),
        Value::Array(_) => return Err(type_err("START_ARRAY")),
        _ => {}
    }
    match f.kind {
        FieldKind::Boolean => match v {
            Value::Bool(_) | Value::Null => Ok(v.clone()),
            _ => Err(type_err("VALUE_STRING")),
        },
        FieldKind::Double => match v {
            Value::Number(_) | Value::Null => Ok(v.clone()),
            Value::String(s) if s.parse::<f64>().is_ok() => Ok(v.clone()),
            _ => Err(type_err("VALUE_STRING")),
        },
        FieldKind::Reference | FieldKind::Id => match v {
            Value::Null => Ok(Value::Null),
            Value::String(s) if s.is_empty() => Ok(Value::Null),
            Value::String(s) if crate::ids::is_valid(s) => Ok(Value::String(crate::ids::to_18(s))),
            other => Err(ApiError::new(
                400,
                "MALFORMED_ID",
                format!("{}: id value of incorrect type: {}", f.label, scalar_text(other)),
            )
            .with_fields(vec![f.name.clone()])),
        },
        FieldKind::Text(max) => {
            let text = match v {
                Value::Null => return Ok(Value::Null),
                Value::String(s) => s.clone(),
                other => scalar_text(other),
            };
            if text.chars().count() > max {
                let shown: String = text.chars().take(40).collect();
                return Err(ApiError::new(
                    400,
                    "STRING_TOO_LONG",
                    format!("{}: data value too large: {shown} (max length={max})", f.label),
                )
                .with_fields(vec![f.name.clone()]));
            }
            Ok(Value::String(text))
        }
        FieldKind::Picklist => match v {
            Value::Null => Ok(Value::Null),
            other => Ok(Value::String(match other {
                Value::String(s) => s.clone(),
                o => scalar_text(o),
            })),
        },
        FieldKind::DateTime | FieldKind::AutoNumber => Ok(v.clone()),
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn normalize_id(id: &str) -> String {
    if crate::ids::is_valid(id) {
        crate::ids::to_18(id)
    } else {
        id.to_string()
    }
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// `2026-11-25T20:10:00.000+0000`, the REST API's date-time format.
pub fn sf_datetime(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+0000");
    t.format(&fmt).unwrap_or_default()
}

fn random_token(len: usize) -> String {
    use rand::{Rng, SeedableRng};
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._";
    let mut rng = rand::rngs::StdRng::from_os_rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org() -> Org {
        Org::new(OrgSetup {
            apps: vec![("cid".into(), "secret".into(), None)],
            users: vec![("u@example.com".into(), "pw".into(), "TOKEN".into())],
            audiences: vec![],
            external_id_fields: vec!["Edge_Event_Id__c".into()],
            custom_fields: vec!["Device__c".into()],
            settings: Settings::default(),
        })
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn upsert_creates_once_then_updates() {
        let o = org();
        let u = o.users()[0].id.clone();
        let (id, created) = o
            .upsert("Case", "Edge_Event_Id__c", "e1", &body(json!({"Subject": "a"})), &u)
            .unwrap();
        assert!(created);
        let (id2, created2) = o
            .upsert("case", "edge_event_id__c", "e1", &body(json!({"Status": "Closed"})), &u)
            .unwrap();
        assert_eq!((id2.as_str(), created2), (id.as_str(), false));
        let r = o.get("Case", &id).unwrap();
        assert_eq!(r["Subject"], "a");
        assert_eq!(r["IsClosed"], true);
        assert_eq!(o.records("Case").len(), 1);
        assert!(id.starts_with("500") && id.len() == 18);
    }

    #[test]
    fn errors_follow_salesforce() {
        let o = org();
        let u = o.users()[0].id.clone();
        let e = o.create("Case", &body(json!({"Foo__c": 1})), &u).unwrap_err();
        assert_eq!((e.status, e.errors[0].code.as_str()), (400, "INVALID_FIELD"));
        assert_eq!(e.errors[0].message, "No such column 'Foo__c' on sobject of type Case");
        let e = o.create("Case", &body(json!({"CaseNumber": "1"})), &u).unwrap_err();
        assert_eq!(e.errors[0].code, "INVALID_FIELD_FOR_INSERT_UPDATE");
        o.update_settings(|s| s.required_case_fields = vec!["Subject".into()]);
        let e = o.create("Case", &body(json!({"Origin": "Web"})), &u).unwrap_err();
        assert_eq!(
            e.body(),
            json!([{"message": "Required fields are missing: [Subject]", "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["Subject"]}])
        );
        let e = o.upsert("Case", "Subject", "x", &body(json!({})), &u).unwrap_err();
        assert_eq!((e.status, e.errors[0].code.as_str()), (404, "NOT_FOUND"));
        let e = o
            .create("Case", &body(json!({"Subject": "s", "AccountId": "nope"})), &u)
            .unwrap_err();
        assert_eq!(e.errors[0].code, "MALFORMED_ID");
        o.create("Case", &body(json!({"Subject": "s", "Edge_Event_Id__c": "d"})), &u)
            .unwrap();
        let e = o
            .create("Case", &body(json!({"Subject": "t", "Edge_Event_Id__c": "d"})), &u)
            .unwrap_err();
        assert_eq!(e.errors[0].code, "DUPLICATE_VALUE");
    }

    #[test]
    fn query_pages_through_results() {
        let o = org();
        let u = o.users()[0].id.clone();
        o.update_settings(|s| s.query_batch_size = 2);
        for i in 0..5 {
            o.create("Case", &body(json!({"Subject": format!("s{i}")})), &u)
                .unwrap();
        }
        let first = o
            .query("SELECT Id, Subject FROM Case ORDER BY Subject DESC", "58.0")
            .unwrap();
        assert_eq!(first["totalSize"], 5);
        assert_eq!(first["done"], false);
        assert_eq!(first["records"][0]["Subject"], "s4");
        let next = first["nextRecordsUrl"].as_str().unwrap();
        let locator = next.rsplit('/').next().unwrap();
        let second = o.query_more(locator).unwrap();
        assert_eq!(second["records"].as_array().unwrap().len(), 2);
        let e = o.query("SELECT Nope FROM Case", "58.0").unwrap_err();
        assert_eq!(e.errors[0].code, "INVALID_FIELD");
        let e = o.query("SELEC Id FROM Case", "58.0").unwrap_err();
        assert_eq!(e.errors[0].code, "MALFORMED_QUERY");
    }

    #[test]
    fn faults_are_served_in_order() {
        let o = org();
        o.inject(Fault {
            kind: FaultKind::Unavailable,
            count: 2,
            stall_ms: None,
        });
        o.inject(Fault {
            kind: FaultKind::RateLimit,
            count: 1,
            stall_ms: None,
        });
        let kinds: Vec<Option<FaultKind>> = (0..4).map(|_| o.begin_request().map(|f| f.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                Some(FaultKind::Unavailable),
                Some(FaultKind::Unavailable),
                Some(FaultKind::RateLimit),
                None
            ]
        );
    }
}
