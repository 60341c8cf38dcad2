//! The store-and-forward buffer: a SQLite database in the data directory.
//!
//! # Guarantees
//! - **Commit, then acknowledge.** [`Buffer::append`] resolves only after the transaction
//!   holding the entries has committed with `journal_mode=WAL` and `synchronous=FULL`: the
//!   WAL is fsynced on every commit, so a power cut after `append` returns loses nothing.
//!   Ingest acknowledges upstream (MQTT PUBACK, serial ACK) only after that.
//! - **Confirm, then delete.** Rows leave the `outbox` only through [`Buffer::release`],
//!   which the publisher calls after the broker confirmed them. A crash in between
//!   republishes them: at least once, never lost. `message_id` lets consumers drop repeats.
//! - **Group commit.** One thread owns the writing connection. It takes every command that
//!   is waiting (up to `max_batch` entries) and applies them in one transaction, so many
//!   concurrent appends share one fsync. Under load batches grow by themselves; idle, a
//!   single reading commits at once (no timer adds latency).
//! - **Bounded.** Caps on pending messages and bytes. `refuse` answers [`Error::Full`] so
//!   ingest holds its input (back-pressure); `drop-oldest` deletes the oldest rows and
//!   counts them. Dead letters are kept up to their own cap, oldest deleted first.
//! - **Fails closed.** A failed commit fails every append in it; nothing is acknowledged.
//! - **Read back only when needed.** The writer hands the rows it committed to the
//!   publisher in memory (bounded; see [`handover`]); the database answers for the rest.
//! - **Redeliveries recognised.** The writer remembers the ids of the last
//!   [`RECENT_IDS`] messages it committed (and, at start, of the newest pending rows); an
//!   append with one of them is counted as a duplicate and not stored. A UNIQUE index on
//!   `message_id` would do it for all pending rows, but random UUID keys made inserts four
//!   times slower, and a redelivery (an MQTT message committed but not yet acknowledged
//!   when the agent died) is always among the newest.
//!
//! # Layout
//! `outbox(id, message_id, exchange, routing_key, device_id, payload, created_ms)`: `id`
//! is never reused, so the publisher's cursor (`id > last`) never skips a row. The writer
//! assigns it from the one-row `outbox_sequence(next_id)`, which it reads once per
//! transaction and advances a block of ids at a time ([`ID_RESERVATION`]), rather than by
//! `AUTOINCREMENT`, which rewrites `sqlite_sequence` in every commit that inserts. At a
//! steady 1,000 readings/s that page was about 30 % of the bytes the agent wrote to
//! storage (README, Performance): flash wear on a gateway. An older buffer is upgraded
//! when it is opened. `edgecase buffer replay` takes its ids from `outbox_sequence` too, and
//! the publisher finds its rows (see [`Buffer::load_after`]).
//! `dead_letters(id, received_ms, source, origin, device_id, sensor, reason, raw)` keeps
//! rejected input for inspection and `edgecase buffer replay`.

use crate::config::{BufferConfig, OverflowPolicy};
use crate::metrics::Metrics;
use crate::reading::Reading;
use crate::rules::{CaseEvent, Engine, RuleSet, RuleStates};
use rusqlite::{Connection, params};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, oneshot};

mod handover;
use handover::Handover;

/// The database file inside the data directory.
pub const DB_FILE: &str = "buffer.db";
const LOCK_FILE: &str = "edgecase.lock";
/// How many recent message ids the writer remembers to recognise redeliveries.
pub const RECENT_IDS: usize = 16_384;
/// Raw bytes kept per dead letter; longer inputs are cut (the reason says so).
pub const DEAD_LETTER_RAW_MAX: usize = 1024 * 1024;
/// Longest a group commit waits for the callers of the previous one to come back (see
/// `WriterState::run`): a small fraction of a durable commit's own cost.
const GROUP_LINGER: std::time::Duration = std::time::Duration::from_micros(250);
/// Outbox ids the writer takes from `outbox_sequence` at a time: it writes that table once
/// per this many rows, not in every commit (one page less to write per small commit; at a
/// steady rate most commits hold a reading or two). A restart skips what was left of the
/// block: ids only need to rise, not to be dense.
pub const ID_RESERVATION: i64 = 65_536;
/// How often, at most, an idle reader looks in the database for rows that
/// `edgecase buffer replay` added while the agent runs.
pub const ELSEWHERE_CHECK_MS: i64 = 1000;
/// Longest a release that starts a transaction waits for another command to share its
/// commit (see `WriterState::run`).
const RELEASE_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Back-pressure under the `refuse` policy: hold the input and retry after
    /// [`Buffer::wait_for_space`].
    #[error(
        "buffer full: {pending} messages / {bytes} bytes pending (caps buffer.max_readings {max_readings}, buffer.max_bytes {max_bytes}); input is held until the publisher catches up"
    )]
    Full {
        pending: u64,
        bytes: u64,
        max_readings: u64,
        max_bytes: u64,
    },
    /// The database failed (disk full, I/O error, corruption). Nothing in the failed batch
    /// was committed: hold the input and retry; an operator must act if it persists.
    #[error("buffer database {path}: {message}")]
    Storage { path: PathBuf, message: String },
    /// Stop: another process owns this data directory.
    #[error(
        "data directory {0} is in use by another edgecase process (lock held on {0}/edgecase.lock); stop it or pass another --data-dir"
    )]
    Locked(PathBuf),
    /// Stop: the buffer is shutting down.
    #[error("buffer is closed")]
    Closed,
}

/// A message to buffer and later publish.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub message_id: String,
    pub exchange: String,
    pub routing_key: String,
    pub device_id: String,
    pub payload: Vec<u8>,
}

/// Rejected input, kept with why and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    /// `mqtt` or `serial`.
    pub source: String,
    /// The MQTT topic or the serial port.
    pub origin: String,
    /// Identity the transport gave (used again on replay).
    pub device_id: Option<String>,
    pub sensor: Option<String>,
    pub reason: String,
    pub raw: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Record(NewRecord),
    /// A reading's record, with the reading itself for the defect rules, which evaluate it
    /// in the transaction that stores it.
    Reading(NewRecord, Box<Reading>),
    DeadLetter(NewDeadLetter),
}

impl Entry {
    /// Whether this is a message to publish (not a dead letter).
    pub fn is_record(&self) -> bool {
        !matches!(self, Entry::DeadLetter(_))
    }
}

/// The defect rules, run by the writer on every reading it stores and on a timer.
#[derive(Debug, Clone)]
pub struct RulesSetup {
    pub rules: RuleSet,
    /// Exchange for the cases they raise (`case.{division}` routing keys).
    pub cases_exchange: String,
    pub gateway_id: String,
}

struct RulesStage {
    engine: Engine,
    cases_exchange: String,
}

/// A buffered message as the publisher sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub id: i64,
    pub message_id: String,
    pub exchange: String,
    pub routing_key: String,
    pub device_id: String,
    pub payload: Vec<u8>,
    pub created_ms: i64,
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub received_ms: i64,
    pub source: String,
    pub origin: String,
    pub device_id: Option<String>,
    pub sensor: Option<String>,
    pub reason: String,
    pub raw: Vec<u8>,
}

/// What one append did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AppendReport {
    pub inserted: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
}

/// Counts for `edgecase buffer stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_created_ms: Option<i64>,
    pub dead_letters: u64,
    pub file_bytes: u64,
}

enum Command {
    Append {
        entries: Vec<Entry>,
        reply: oneshot::Sender<Result<AppendReport, Error>>,
    },
    Release {
        ids: Vec<i64>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    DeleteDeadLetters {
        ids: Vec<i64>,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Time passed: the rules look for silent devices.
    Tick { now_ms: i64 },
}

impl Command {
    fn weight(&self) -> usize {
        match self {
            Command::Append { entries, .. } => entries.len().max(1),
            Command::Release { ids, .. } | Command::DeleteDeadLetters { ids, .. } => ids.len().div_ceil(8).max(1),
            Command::Tick { .. } => 1,
        }
    }
}

/// State shared between the writer thread and the handles.
struct Shared {
    pending: AtomicU64,
    pending_bytes: AtomicU64,
    dead_letters: AtomicU64,
    last_id: AtomicI64,
    /// `outbox_sequence` as this writer last left it: ids below it are taken (see
    /// [`ID_RESERVATION`]); a higher value there means someone else inserted rows.
    reserved_to: AtomicI64,
    /// When the reader last looked for rows added by someone else (ms since the epoch).
    elsewhere_checked_ms: AtomicI64,
    new_data: Notify,
    space_freed: Notify,
    /// Rows just committed, for the publisher (see [`handover`]).
    handover: Mutex<Handover>,
    metrics: Arc<Metrics>,
}

/// Handle to the buffer; cheap to clone. The writer thread stops when every handle is gone.
#[derive(Clone)]
pub struct Buffer {
    tx: flume::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    shared: Arc<Shared>,
    path: PathBuf,
    _lock: Arc<File>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("path", &self.path).finish()
    }
}

/// An append waiting for its commit; see [`Buffer::queue`].
#[derive(Debug)]
pub struct Queued(oneshot::Receiver<Result<AppendReport, Error>>);

impl Queued {
    /// Resolves after the commit that holds the append.
    pub async fn committed(self) -> Result<AppendReport, Error> {
        self.0.await.map_err(|_| Error::Closed)?
    }
}

/// Joins the writer thread at shutdown, after every [`Buffer`] handle is dropped.
#[derive(Debug)]
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    /// Blocks until the writer has committed what it had and closed the database.
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("buffer writer thread panicked");
        }
    }
}

impl Buffer {
    /// Opens (creating if needed) the buffer in `data_dir`, taking the directory's lock.
    pub fn open(data_dir: &Path, cfg: &BufferConfig, metrics: Arc<Metrics>) -> Result<(Buffer, WriterThread), Error> {
        Self::open_with_rules(data_dir, cfg, metrics, None)
    }

    /// As [`Buffer::open`], with defect rules evaluated on every stored reading; their state
    /// is loaded from the buffer and saved with each commit.
    pub fn open_with_rules(
        data_dir: &Path,
        cfg: &BufferConfig,
        metrics: Arc<Metrics>,
        rules: Option<RulesSetup>,
    ) -> Result<(Buffer, WriterThread), Error> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| storage(data_dir, format!("cannot create data directory: {e}")))?;
        let lock = lock_data_dir(data_dir)?;
        let path = data_dir.join(DB_FILE);
        let writer = open_connection(&path)?;
        let reader = open_connection(&path)?;
        let (pending, pending_bytes, dead_letters, last_id) = count(&writer).map_err(|e| storage(&path, e))?;
        let shared = Arc::new(Shared {
            pending: AtomicU64::new(pending),
            pending_bytes: AtomicU64::new(pending_bytes),
            dead_letters: AtomicU64::new(dead_letters),
            last_id: AtomicI64::new(last_id),
            reserved_to: AtomicI64::new(last_id + 1),
            elsewhere_checked_ms: AtomicI64::new(0),
            new_data: Notify::new(),
            space_freed: Notify::new(),
            handover: Mutex::new(Handover::new(last_id, handover::MAX_ROWS, handover::MAX_BYTES)),
            metrics,
        });
        shared.publish_gauges();
        // Bounded: a full command queue blocks appenders, which is back-pressure too.
        let (tx, rx) = flume::bounded(cfg.max_batch.max(64));
        let recent = RecentIds::load(&writer).map_err(|e| storage(&path, e))?;
        let rules = match rules {
            Some(setup) if !setup.rules.is_empty() => {
                let states = load_rule_states(&writer).map_err(|e| storage(&path, e))?;
                let open = states
                    .values()
                    .filter(|s| !matches!(s.phase, crate::rules::Phase::Normal))
                    .count();
                tracing::info!(
                    rules = setup.rules.rules().len(),
                    open_or_pending = open,
                    "defect rules loaded"
                );
                Some(RulesStage {
                    engine: Engine::new(setup.rules, states, &setup.gateway_id),
                    cases_exchange: setup.cases_exchange,
                })
            }
            _ => None,
        };
        let state = WriterState {
            conn: writer,
            spare: Spare::default(),
            recent,
            rules,
            path: path.clone(),
            cfg: cfg.clone(),
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| storage(&path, format!("cannot start writer thread: {e}")))?;
        if pending > 0 {
            tracing::info!(pending, pending_bytes, "resuming: buffered messages will be published");
        }
        Ok((
            Buffer {
                tx,
                reader: Arc::new(Mutex::new(reader)),
                shared,
                path,
                _lock: Arc::new(lock),
            },
            WriterThread(thread),
        ))
    }

    /// Commits `entries` in the next group commit. Returns after the commit.
    pub async fn append(&self, entries: Vec<Entry>) -> Result<AppendReport, Error> {
        self.queue(entries).await?.committed().await
    }

    /// Queues `entries` for the next group commit and returns without waiting for it.
    /// Appends queued one after another by one caller are applied in that order (the
    /// defect rules see a sensor's readings in the order they arrived).
    pub async fn queue(&self, entries: Vec<Entry>) -> Result<Queued, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Append { entries, reply })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(Queued(rx))
    }

    /// Lets the rules notice silent devices; call about once a second.
    pub async fn tick(&self, now_ms: i64) -> Result<(), Error> {
        self.tx
            .send_async(Command::Tick { now_ms })
            .await
            .map_err(|_| Error::Closed)
    }

    /// Deletes published rows. Call only after the broker confirmed them.
    pub async fn release(&self, ids: Vec<i64>) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Release { ids, reply })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Deletes dead letters (after a successful replay).
    pub async fn delete_dead_letters(&self, ids: Vec<i64>) -> Result<u64, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::DeleteDeadLetters { ids, reply })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Up to `limit` pending rows with `id > after`, oldest first: the rows just committed
    /// from memory when it holds them (see [`handover`]), else from the database.
    ///
    /// Rows that `edgecase buffer replay` adds while the agent runs are only in the
    /// database: when the hand-over has nothing, the database is asked whether there are
    /// such rows, at most every [`ELSEWHERE_CHECK_MS`].
    pub async fn load_after(&self, after: i64, limit: usize) -> Result<Vec<StoredRecord>, Error> {
        let taken = self.shared.handover().take(after, limit);
        if let Some(rows) = taken {
            if !rows.is_empty() || !self.elsewhere_check_due() {
                return Ok(rows);
            }
            let next_id = self.with_reader(next_outbox_id).await?;
            if next_id <= self.shared.reserved_to.load(Ordering::Acquire) {
                return Ok(rows);
            }
            self.shared.handover().rows_added_elsewhere(next_id - 1);
        }
        let rows = self.with_reader(move |conn| load_after(conn, after, limit)).await?;
        if let Some(last) = rows.last() {
            self.shared.handover().served_from_database(last.id);
        }
        Ok(rows)
    }

    /// Whether [`ELSEWHERE_CHECK_MS`] passed since the last look for rows added elsewhere.
    fn elsewhere_check_due(&self) -> bool {
        let now = crate::reading::now_ms();
        let last = self.shared.elsewhere_checked_ms.load(Ordering::Acquire);
        now.saturating_sub(last) >= ELSEWHERE_CHECK_MS
            && self
                .shared
                .elsewhere_checked_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Runs `f` on the reading connection.
    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, Error> {
        let (reader, path) = (self.reader.clone(), self.path.clone());
        // A std mutex: the connection is only used inside this blocking section.
        let read = move || {
            let conn = reader.lock().map_err(|_| storage(&path, "reader lock poisoned"))?;
            f(&conn).map_err(|e| storage(&path, e))
        };
        // A read of a few hundred rows takes well under a millisecond: on the multi-thread
        // runtime run it in place rather than pay a hand-over to the blocking pool (a
        // thread wake-up per batch, which showed in profiles). block_in_place is not
        // available on the current-thread runtime.
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            tokio::task::block_in_place(read)
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .map_err(|e| storage(&self.path, format!("reader task failed: {e}")))?
        }
    }

    /// Messages waiting for a confirm.
    pub fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Acquire)
    }

    /// Highest id committed so far.
    pub fn last_id(&self) -> i64 {
        self.shared.last_id.load(Ordering::Acquire)
    }

    /// Resolves after the next commit that added rows (or at once if one happened since the
    /// last call).
    pub async fn wait_for_data(&self) {
        self.shared.new_data.notified().await;
    }

    /// Resolves when rows were released or dropped.
    pub async fn wait_for_space(&self) {
        self.shared.space_freed.notified().await;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn storage(path: &Path, e: impl ToString) -> Error {
    Error::Storage {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// One agent per data directory: two writers would each think they own the buffer's counts
/// and cursor. The OS releases the lock when the process dies, even on `kill -9`.
fn lock_data_dir(dir: &Path) -> Result<File, Error> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| storage(dir, format!("cannot open lock file {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(storage(dir, format!("cannot lock {}: {e}", path.display()))),
    }
}

/// The outbox's columns. `id` is assigned by the writer from `outbox_sequence` (see
/// [`next_outbox_id`]), not by `AUTOINCREMENT`: that keeps ids from being reused just the
/// same, without SQLite updating `sqlite_sequence` for every row (see the module doc).
const OUTBOX_COLUMNS: &str = "(
             id INTEGER PRIMARY KEY,
             message_id TEXT NOT NULL,
             exchange TEXT NOT NULL,
             routing_key TEXT NOT NULL,
             device_id TEXT NOT NULL,
             payload BLOB NOT NULL,
             created_ms INTEGER NOT NULL)";

/// Opens the database with the durability settings the guarantees depend on, creating or
/// upgrading its tables.
fn open_connection(path: &Path) -> Result<Connection, Error> {
    let mut conn = Connection::open(path).map_err(|e| storage(path, e))?;
    // SQLite's default 4 KiB pages: 16 KiB ones made bursts faster but wrote 2.5 times the
    // bytes at a steady rate, where most commits hold a reading or two (README, Performance).
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| storage(path, e))?;
    // WAL: readers (the publisher, operator commands) never block the writer.
    // synchronous=FULL: the WAL is fsynced at every commit; under NORMAL a commit can be
    // lost on power failure, and acknowledged data must not be.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| storage(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(storage(
            path,
            format!("cannot enable WAL (journal_mode is {mode}); is the file system local?"),
        ));
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous=FULL;
         PRAGMA temp_store=MEMORY;
         PRAGMA cache_size=-2048;
         CREATE TABLE IF NOT EXISTS outbox {OUTBOX_COLUMNS};
         CREATE TABLE IF NOT EXISTS outbox_sequence (next_id INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS dead_letters (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             received_ms INTEGER NOT NULL,
             source TEXT NOT NULL,
             origin TEXT NOT NULL,
             device_id TEXT,
             sensor TEXT,
             reason TEXT NOT NULL,
             raw BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS rule_state (
             key TEXT PRIMARY KEY,
             state TEXT NOT NULL);"
    ))
    .map_err(|e| storage(path, e))?;
    upgrade_outbox(&mut conn).map_err(|e| storage(path, format!("cannot upgrade the outbox table: {e}")))?;
    Ok(conn)
}

/// Brings a buffer written by an earlier version to the current layout, in one transaction:
/// an `outbox` whose `id` was `AUTOINCREMENT` is copied into the current table (and a
/// UNIQUE index on `message_id`, from before the recent-ids window, goes with the old
/// table), and `outbox_sequence` is started above every id ever used. Does nothing on a
/// current buffer.
fn upgrade_outbox(conn: &mut Connection) -> rusqlite::Result<()> {
    /// Whether `outbox.id` is AUTOINCREMENT, and whether `outbox_sequence` has its row.
    fn layout(conn: &Connection) -> rusqlite::Result<(bool, bool)> {
        let sql: String = conn.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outbox'",
            [],
            |r| r.get(0),
        )?;
        let sequenced: i64 = conn.query_row("SELECT count(*) FROM outbox_sequence", [], |r| r.get(0))?;
        Ok((sql.to_ascii_uppercase().contains("AUTOINCREMENT"), sequenced == 1))
    }
    if layout(conn)? == (false, true) {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Another process may have done it meanwhile.
    let (autoincrement, sequenced) = layout(&tx)?;
    if !autoincrement && sequenced {
        return Ok(());
    }
    // `sqlite_sequence` exists: `dead_letters` is AUTOINCREMENT.
    let next_id: i64 = tx.query_row(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),
                    coalesce((SELECT max(id) FROM outbox), 0),
                    coalesce((SELECT max(next_id) - 1 FROM outbox_sequence), 0)) + 1",
        [],
        |r| r.get(0),
    )?;
    if autoincrement {
        let rows: i64 = tx.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?;
        tx.execute_batch(&format!(
            "CREATE TABLE outbox_upgrade {OUTBOX_COLUMNS};
             INSERT INTO outbox_upgrade (id, message_id, exchange, routing_key, device_id, payload, created_ms)
                 SELECT id, message_id, exchange, routing_key, device_id, payload, created_ms FROM outbox ORDER BY id;
             DROP TABLE outbox;
             ALTER TABLE outbox_upgrade RENAME TO outbox;
             DELETE FROM sqlite_sequence WHERE name = 'outbox';"
        ))?;
        tracing::info!(
            pending = rows,
            next_id,
            "buffer upgraded: outbox ids now come from outbox_sequence"
        );
    }
    tx.execute("DELETE FROM outbox_sequence", [])?;
    tx.execute("INSERT INTO outbox_sequence (next_id) VALUES (?1)", [next_id])?;
    tx.commit()
}

/// `outbox_sequence`: no outbox row ever had an id at or above it, so the publisher's cursor
/// (`id > last`) never skips a row. Read inside the writing transaction; whoever takes ids
/// advances it in the same transaction (the writer a block at a time, see
/// [`ID_RESERVATION`]).
fn next_outbox_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT next_id FROM outbox_sequence", [], |r| r.get(0))
}

/// Advances `outbox_sequence` to `next_id`, inside the transaction that takes the ids.
fn set_next_outbox_id(conn: &Connection, next_id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE outbox_sequence SET next_id = ?1")?
        .execute([next_id])
        .map(drop)
}

fn count(conn: &Connection) -> rusqlite::Result<(u64, u64, u64, i64)> {
    let (pending, bytes): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let dead: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
    let next_id = next_outbox_id(conn)?;
    Ok((pending as u64, bytes as u64, dead as u64, next_id - 1))
}

fn load_after(conn: &Connection, after: i64, limit: usize) -> rusqlite::Result<Vec<StoredRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, message_id, exchange, routing_key, device_id, payload, created_ms
         FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        Ok(StoredRecord {
            id: r.get(0)?,
            message_id: r.get(1)?,
            exchange: r.get(2)?,
            routing_key: r.get(3)?,
            device_id: r.get(4)?,
            payload: r.get(5)?,
            created_ms: r.get(6)?,
        })
    })?;
    rows.collect()
}

impl Shared {
    fn handover(&self) -> std::sync::MutexGuard<'_, Handover> {
        // Its methods do not panic (and release builds abort on a panic), so a poisoned
        // lock cannot hide a half-done change.
        self.handover.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.buffer_pending_readings
            .set(self.pending.load(Ordering::Acquire) as i64);
        m.buffer_pending_bytes
            .set(self.pending_bytes.load(Ordering::Acquire) as i64);
        m.buffer_dead_letters
            .set(self.dead_letters.load(Ordering::Acquire) as i64);
    }
}

/// Hashes of recently committed message ids, oldest forgotten first.
struct RecentIds {
    set: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<u64>,
}

impl RecentIds {
    fn hash(message_id: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        // DefaultHasher::new() has fixed keys: the same id always hashes the same.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        message_id.hash(&mut h);
        h.finish()
    }

    fn load(conn: &Connection) -> rusqlite::Result<RecentIds> {
        let mut stmt = conn.prepare("SELECT message_id FROM outbox ORDER BY id DESC LIMIT ?1")?;
        let mut ids: Vec<u64> = stmt
            .query_map([RECENT_IDS as i64], |r| r.get::<_, String>(0))?
            .map(|id| id.map(|id| Self::hash(&id)))
            .collect::<rusqlite::Result<_>>()?;
        ids.reverse();
        let mut recent = RecentIds {
            set: Default::default(),
            order: Default::default(),
        };
        recent.remember(ids);
        Ok(recent)
    }

    fn contains(&self, h: u64) -> bool {
        self.set.contains(&h)
    }

    /// Call only after the commit that stored these ids succeeded.
    fn remember(&mut self, hashes: impl IntoIterator<Item = u64>) {
        for h in hashes {
            if self.set.insert(h) {
                self.order.push_back(h);
            }
            while self.order.len() > RECENT_IDS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// Counts as they will be once the open transaction commits.
#[derive(Clone, Copy, Default)]
struct Tally {
    pending: u64,
    bytes: u64,
    dead_letters: u64,
    committed: u64,
    duplicates: u64,
    dropped: u64,
    refused: u64,
    released: u64,
    last_id: i64,
    reserved_to: i64,
}

struct WriterState {
    conn: Connection,
    spare: Spare,
    recent: RecentIds,
    rules: Option<RulesStage>,
    path: PathBuf,
    cfg: BufferConfig,
    shared: Arc<Shared>,
}

/// The collections one transaction fills, kept empty between transactions with their
/// capacity. Grown afresh for every group commit, they were a seventh of the writer
/// thread's samples in a profile of the benchmark's buffer (glibc's malloc consolidates
/// its free lists before each allocation of 1 KiB or more; the agent itself runs on
/// mimalloc). Kept, the 64 × 64 shape committed about a seventh more against plain SQLite
/// in the same runs (README, Performance). What they keep is bounded by
/// `buffer.max_batch` (one transaction's entries): under 1 MB at its default of 4,096.
#[derive(Default)]
struct Spare {
    waiting: Vec<Waiting>,
    outcomes: Vec<Outcome>,
    new_ids: std::collections::HashSet<u64>,
    handed: Vec<StoredRecord>,
}

enum Work {
    Tick(i64),
    Append(Vec<Entry>),
    Release(Vec<i64>),
    DeleteDeadLetters(Vec<i64>),
}

enum Waiting {
    Nobody,
    Append(oneshot::Sender<Result<AppendReport, Error>>),
    Release(oneshot::Sender<Result<(), Error>>),
    Deleted(oneshot::Sender<Result<u64, Error>>),
}

/// A command's work, and who waits for its outcome.
fn split(cmd: Command) -> (Work, Waiting) {
    match cmd {
        Command::Append { entries, reply } => (Work::Append(entries), Waiting::Append(reply)),
        Command::Release { ids, reply } => (Work::Release(ids), Waiting::Release(reply)),
        Command::DeleteDeadLetters { ids, reply } => (Work::DeleteDeadLetters(ids), Waiting::Deleted(reply)),
        Command::Tick { now_ms } => (Work::Tick(now_ms), Waiting::Nobody),
    }
}

enum Outcome {
    Append(Result<AppendReport, Error>),
    Deleted(u64),
    Done,
}

/// What the last transaction held: the next one's waits depend on it.
#[derive(Debug, Clone, Copy)]
struct LastGroup {
    commands: usize,
    had_append: bool,
}

impl WriterState {
    fn run(mut self, rx: flume::Receiver<Command>) {
        // How many commands the last transaction held: their callers are likely to come
        // back together, so the next transaction waits a moment (at most GROUP_LINGER) for
        // that many. Without it, the first caller to come back gets a transaction of its
        // own and the rest trail in small ones. It never waits for more than the last
        // transaction held, so a lone caller is never delayed, and it shrinks to what
        // arrives when the load drops.
        //
        // Each command is applied inside the open transaction as soon as it arrives, so the
        // inserts of the first callers overlap the wait for the last ones.
        //
        // While readings come in, a release that comes alone waits for company, up to
        // RELEASE_LINGER. Nothing waits on it: its rows are confirmed, and a crash before its
        // commit only publishes them again. At a steady rate the next reading's append comes
        // within a millisecond or two, so one durable commit (one fsync) serves both. At
        // 1,000 readings/s this took the agent from 1.1-1.2 commits per reading to 0.8 and
        // its CPU down by a tenth (README, Performance); before, a release met an append
        // only by chance. Once a transaction holds no append (ingest has gone quiet), the
        // next release does not wait: a publisher draining a backlog is not slowed down.
        let mut last = LastGroup {
            commands: 1,
            had_append: false,
        };
        while let Ok(first) = rx.recv() {
            last = self.commit_group(first, &rx, last);
        }
        // Every handle is gone: checkpoint so the WAL does not have to be replayed at start.
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "buffer checkpoint at shutdown failed (harmless; replayed at next start)");
        }
    }

    /// One transaction: `first`, then the commands that arrive (see [`WriterState::run`]);
    /// returns what it held.
    fn commit_group(&mut self, first: Command, rx: &flume::Receiver<Command>, last: LastGroup) -> LastGroup {
        let expected = last.commands;
        let lone_release_waits = last.had_append && matches!(first, Command::Release { .. });
        let mut had_append = false;
        let start = Tally {
            pending: self.shared.pending.load(Ordering::Acquire),
            bytes: self.shared.pending_bytes.load(Ordering::Acquire),
            dead_letters: self.shared.dead_letters.load(Ordering::Acquire),
            last_id: self.shared.last_id.load(Ordering::Acquire),
            reserved_to: self.shared.reserved_to.load(Ordering::Acquire),
            ..Tally::default()
        };
        let mut tally = start;
        // The reply channels are kept apart from the work, so that a failed transaction can
        // still answer every caller it took with the cause.
        let mut waiting = std::mem::take(&mut self.spare.waiting);
        let mut outcomes = std::mem::take(&mut self.spare.outcomes);
        // Ids stored by this transaction; remembered only once it commits.
        let mut new_ids = std::mem::take(&mut self.spare.new_ids);
        let mut cases = Vec::new();
        // Rows stored by this transaction, handed to the publisher once it commits.
        let mut handed = std::mem::take(&mut self.spare.handed);
        let now = crate::reading::now_ms();
        let opened = std::time::Instant::now();
        let deadline = opened + GROUP_LINGER;
        let lone_release_deadline = opened + RELEASE_LINGER;
        let max_batch = self.cfg.max_batch;
        // Set when rows were added to the outbox by someone else (`edgecase buffer replay`)
        // since this writer's last insert: the highest id they may have taken.
        let mut inserted_elsewhere = None;
        let result = (|| -> rusqlite::Result<()> {
            // Immediate: the writer reads `outbox_sequence` before it inserts, and a
            // deferred transaction whose snapshot went stale could not then write.
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut batch = Batch {
                tx: &tx,
                cfg: &self.cfg,
                tally: &mut tally,
                recent: &self.recent,
                new_ids: &mut new_ids,
                cases: &mut cases,
                handed: &mut handed,
                insert: None,
                next_id: None,
                inserted_elsewhere: &mut inserted_elsewhere,
                now,
            };
            let mut weight = 0;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                weight += cmd.weight();
                let (w, reply) = split(cmd);
                waiting.push(reply);
                outcomes.push(match w {
                    Work::Append(entries) => {
                        had_append = true;
                        Outcome::Append(batch.append(entries, self.rules.as_mut())?)
                    }
                    Work::Tick(now_ms) => {
                        if let Some(rules) = self.rules.as_mut() {
                            let (events, changed) = rules.engine.on_tick(now_ms);
                            batch.store_cases(rules, events, &changed)?;
                        }
                        Outcome::Done
                    }
                    Work::Release(ids) => {
                        apply_release(&tx, batch.tally, &ids)?;
                        Outcome::Done
                    }
                    Work::DeleteDeadLetters(ids) => {
                        let mut stmt = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
                        let mut n = 0;
                        for id in ids {
                            n += stmt.execute([id])? as u64;
                        }
                        batch.tally.dead_letters = batch.tally.dead_letters.saturating_sub(n);
                        Outcome::Deleted(n)
                    }
                });
                if weight < max_batch {
                    next = match rx.try_recv() {
                        Ok(cmd) => Some(cmd),
                        Err(flume::TryRecvError::Empty) if lone_release_waits && waiting.len() == 1 => {
                            rx.recv_deadline(lone_release_deadline).ok()
                        }
                        Err(flume::TryRecvError::Empty) if waiting.len() < expected => rx.recv_deadline(deadline).ok(),
                        Err(_) => None,
                    };
                }
            }
            prune_dead_letters(&tx, self.cfg.max_dead_letters, batch.tally)?;
            // Its prepared statement goes back to the cache before the commit.
            drop(batch);
            let committing = std::time::Instant::now();
            tx.commit()?;
            self.shared
                .metrics
                .buffer_commit_seconds
                .observe(committing.elapsed().as_secs_f64());
            Ok(())
        })();
        let held = waiting.len();
        // A dropped receiver means the caller gave up (shutdown); the commit stands.
        match result {
            Ok(()) => {
                self.recent.remember(new_ids.iter().copied());
                for (rule, action) in cases {
                    self.shared.metrics.case_event(&rule, action);
                }
                // Before the publisher is woken (in `publish`), so that it finds them.
                let mut handover = self.shared.handover();
                if let Some(up_to) = inserted_elsewhere {
                    handover.rows_added_elsewhere(up_to);
                }
                handover.committed(handed.drain(..), tally.dropped > 0);
                drop(handover);
                self.publish(start, tally);
                for (w, o) in waiting.drain(..).zip(outcomes.drain(..)) {
                    match (w, o) {
                        (Waiting::Append(tx), Outcome::Append(r)) => drop(tx.send(r)),
                        (Waiting::Release(tx), _) => drop(tx.send(Ok(()))),
                        (Waiting::Deleted(tx), Outcome::Deleted(n)) => drop(tx.send(Ok(n))),
                        (Waiting::Append(tx), _) => drop(tx.send(Err(Error::Closed))),
                        (Waiting::Deleted(tx), _) => drop(tx.send(Err(Error::Closed))),
                        (Waiting::Nobody, _) => {}
                    }
                }
            }
            Err(e) => {
                // Rolled back: counts stay as they were, nothing was acknowledged, and every
                // caller holds its input and retries.
                tracing::error!(path = %self.path.display(), error = %e, "buffer commit failed; input is held and retried");
                let err = storage(&self.path, e);
                // The rules' state advanced in memory with the rolled-back readings: take it
                // back from the database, where it matches what was committed.
                if let Some(rules) = self.rules.as_mut() {
                    match load_rule_states(&self.conn) {
                        Ok(states) => rules.engine.set_states(states),
                        Err(e) => tracing::error!(error = %e, "cannot reload rule state after a failed commit"),
                    }
                }
                for w in waiting.drain(..) {
                    match w {
                        Waiting::Append(tx) => drop(tx.send(Err(err.clone()))),
                        Waiting::Release(tx) => drop(tx.send(Err(err.clone()))),
                        Waiting::Deleted(tx) => drop(tx.send(Err(err.clone()))),
                        Waiting::Nobody => {}
                    }
                }
            }
        }
        outcomes.clear();
        new_ids.clear();
        handed.clear();
        self.spare = Spare {
            waiting,
            outcomes,
            new_ids,
            handed,
        };
        LastGroup {
            commands: held,
            had_append,
        }
    }

    fn publish(&self, start: Tally, t: Tally) {
        let s = &self.shared;
        s.pending.store(t.pending, Ordering::Release);
        s.pending_bytes.store(t.bytes, Ordering::Release);
        s.dead_letters.store(t.dead_letters, Ordering::Release);
        s.last_id.store(t.last_id, Ordering::Release);
        s.reserved_to.store(t.reserved_to, Ordering::Release);
        s.publish_gauges();
        let m = &s.metrics;
        m.buffer_commits.inc();
        m.buffer_committed.inc_by(t.committed);
        m.buffer_duplicates.inc_by(t.duplicates);
        m.buffer_dropped.inc_by(t.dropped);
        m.buffer_refused.inc_by(t.refused);
        m.buffer_released.inc_by(t.released);
        if t.last_id > start.last_id {
            s.new_data.notify_one();
        }
        if t.released > 0 || t.dropped > 0 {
            s.space_freed.notify_waiters();
        }
    }
}

/// The open transaction of one group commit, and what it has done so far.
struct Batch<'t, 'c> {
    tx: &'t rusqlite::Transaction<'c>,
    cfg: &'t BufferConfig,
    tally: &'t mut Tally,
    recent: &'t RecentIds,
    new_ids: &'t mut std::collections::HashSet<u64>,
    /// (rule, action) of every case event stored, counted after the commit.
    cases: &'t mut Vec<(String, crate::rules::CaseAction)>,
    /// Rows stored, in id order.
    handed: &'t mut Vec<StoredRecord>,
    /// The outbox INSERT, prepared once for the transaction: taken from the statement
    /// cache for each row, it cost two hashes of its SQL text per reading.
    insert: Option<rusqlite::CachedStatement<'t>>,
    /// The next outbox id, once the first insert of the transaction looked at
    /// `outbox_sequence`.
    next_id: Option<i64>,
    inserted_elsewhere: &'t mut Option<i64>,
    now: i64,
}

impl Batch<'_, '_> {
    /// One append command: admitted whole or refused whole (overflow policy).
    fn append(
        &mut self,
        entries: Vec<Entry>,
        mut rules: Option<&mut RulesStage>,
    ) -> rusqlite::Result<Result<AppendReport, Error>> {
        let cfg = self.cfg;
        let (n, bytes) = entries.iter().fold((0u64, 0u64), |(n, b), e| match e {
            Entry::Record(r) | Entry::Reading(r, _) => (n + 1, b + r.payload.len() as u64),
            Entry::DeadLetter(_) => (n, b),
        });
        if n > 0 && (self.tally.pending + n > cfg.max_readings || self.tally.bytes + bytes > cfg.max_bytes) {
            match cfg.overflow {
                OverflowPolicy::Refuse => {
                    self.tally.refused += 1;
                    return Ok(Err(Error::Full {
                        pending: self.tally.pending,
                        bytes: self.tally.bytes,
                        max_readings: cfg.max_readings,
                        max_bytes: cfg.max_bytes,
                    }));
                }
                OverflowPolicy::DropOldest => drop_oldest(self.tx, cfg, self.tally, n, bytes)?,
            }
        }
        let mut report = AppendReport::default();
        for entry in entries {
            match entry {
                Entry::Record(r) => {
                    self.insert_record(r, &mut report)?;
                }
                Entry::Reading(r, reading) => {
                    // Only a reading stored now is new to the rules: a redelivery was seen.
                    if self.insert_record(r, &mut report)?
                        && let Some(rules) = rules.as_deref_mut()
                    {
                        let (events, changed) = rules.engine.on_reading(&reading, self.now);
                        self.store_cases(rules, events, &changed)?;
                    }
                }
                Entry::DeadLetter(d) => {
                    self.insert_dead_letter(d)?;
                    report.dead_letters += 1;
                }
            }
        }
        Ok(Ok(report))
    }

    /// Stores a record unless its id was seen recently; true if stored.
    fn insert_record(&mut self, r: NewRecord, report: &mut AppendReport) -> rusqlite::Result<bool> {
        let h = RecentIds::hash(&r.message_id);
        if self.recent.contains(h) || !self.new_ids.insert(h) {
            self.tally.duplicates += 1;
            report.duplicates += 1;
            return Ok(false);
        }
        let id = match self.next_id {
            Some(id) => id,
            None => {
                let stored = next_outbox_id(self.tx)?;
                if stored > self.tally.reserved_to {
                    // `edgecase buffer replay` took ids from the sequence since: its rows
                    // count as pending, and the dead letters it moved are gone.
                    *self.inserted_elsewhere = Some(stored - 1);
                    self.tally.reserved_to = stored;
                    let (pending, bytes, dead_letters, _) = count(self.tx)?;
                    self.tally.pending = pending;
                    self.tally.bytes = bytes;
                    self.tally.dead_letters = dead_letters;
                    stored
                } else {
                    self.tally.last_id + 1
                }
            }
        };
        if id >= self.tally.reserved_to {
            self.tally.reserved_to = id + ID_RESERVATION;
            set_next_outbox_id(self.tx, self.tally.reserved_to)?;
        }
        let insert = match &mut self.insert {
            Some(insert) => insert,
            None => self.insert.insert(self.tx.prepare_cached(
                "INSERT INTO outbox (id, message_id, exchange, routing_key, device_id, payload, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?),
        };
        insert.execute(params![
            id,
            r.message_id,
            r.exchange,
            r.routing_key,
            r.device_id,
            r.payload,
            self.now
        ])?;
        self.next_id = Some(id + 1);
        self.tally.pending += 1;
        self.tally.bytes += r.payload.len() as u64;
        self.tally.committed += 1;
        self.tally.last_id = id;
        report.inserted += 1;
        self.handed.push(StoredRecord {
            id,
            message_id: r.message_id,
            exchange: r.exchange,
            routing_key: r.routing_key,
            device_id: r.device_id,
            payload: r.payload,
            created_ms: self.now,
        });
        Ok(true)
    }

    fn insert_dead_letter(&mut self, d: NewDeadLetter) -> rusqlite::Result<()> {
        let (raw, reason) = if d.raw.len() > DEAD_LETTER_RAW_MAX {
            let reason = format!(
                "{} (raw cut to {DEAD_LETTER_RAW_MAX} of {} bytes)",
                d.reason,
                d.raw.len()
            );
            (&d.raw[..DEAD_LETTER_RAW_MAX], reason)
        } else {
            (&d.raw[..], d.reason)
        };
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO dead_letters (received_ms, source, origin, device_id, sensor, reason, raw)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        insert.execute(params![
            self.now,
            d.source,
            d.origin,
            d.device_id,
            d.sensor,
            reason,
            raw
        ])?;
        self.tally.dead_letters += 1;
        Ok(())
    }

    /// Queues case events for publishing and saves the rule states they changed, in this
    /// transaction: a case is raised exactly when its state says so, crash or not.
    fn store_cases(&mut self, rules: &RulesStage, events: Vec<CaseEvent>, changed: &[String]) -> rusqlite::Result<()> {
        for event in events {
            let record = NewRecord {
                message_id: event.message_id.clone(),
                exchange: rules.cases_exchange.clone(),
                routing_key: event.routing_key(),
                device_id: event.device_id.clone(),
                payload: serde_json::to_vec(&event).unwrap_or_default(),
            };
            tracing::info!(
                rule = %event.rule,
                device_id = %event.device_id,
                sensor = %event.sensor,
                action = ?event.action,
                event_id = %event.event_id,
                "case event"
            );
            if self.insert_record(record, &mut AppendReport::default())? {
                self.cases.push((event.rule, event.action));
            }
        }
        let mut save = self
            .tx
            .prepare_cached("INSERT OR REPLACE INTO rule_state (key, state) VALUES (?1, ?2)")?;
        for key in changed {
            if let Some(state) = rules.engine.states().get(key) {
                save.execute(params![key, serde_json::to_string(state).unwrap_or_default()])?;
            }
        }
        Ok(())
    }
}

fn load_rule_states(conn: &Connection) -> rusqlite::Result<RuleStates> {
    let mut stmt = conn.prepare("SELECT key, state FROM rule_state")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut states = RuleStates::new();
    for row in rows {
        let (key, json) = row?;
        match serde_json::from_str(&json) {
            Ok(state) => {
                states.insert(key, state);
            }
            // A state from an incompatible version starts over rather than stop the agent.
            Err(e) => {
                tracing::warn!(key = %key.replace('\0', "/"), error = %e, "rule state unreadable; starting it afresh")
            }
        }
    }
    Ok(states)
}

fn drop_oldest(
    tx: &rusqlite::Transaction<'_>,
    cfg: &BufferConfig,
    tally: &mut Tally,
    n: u64,
    bytes: u64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?1) RETURNING length(payload)",
    )?;
    while tally.pending > 0 && (tally.pending + n > cfg.max_readings || tally.bytes + bytes > cfg.max_bytes) {
        let excess = (tally.pending + n).saturating_sub(cfg.max_readings).clamp(1, 1024);
        let sizes: Vec<i64> = stmt
            .query_map([excess as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if sizes.is_empty() {
            break;
        }
        tally.pending = tally.pending.saturating_sub(sizes.len() as u64);
        tally.bytes = tally.bytes.saturating_sub(sizes.iter().sum::<i64>() as u64);
        tally.dropped += sizes.len() as u64;
    }
    if tally.dropped > 0 {
        tracing::warn!(
            dropped = tally.dropped,
            "buffer full: oldest messages dropped (buffer.overflow = drop-oldest)"
        );
    }
    Ok(())
}

fn apply_release(tx: &rusqlite::Transaction<'_>, tally: &mut Tally, ids: &[i64]) -> rusqlite::Result<()> {
    // Confirms come back in publish order, so the ids are mostly consecutive: delete runs of
    // consecutive ids with one statement each. Every id inside a run is in `ids`.
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2 RETURNING length(payload)")?;
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        // Rows may already be gone (dropped by overflow, or released twice after a
        // reconnect); that is not an error.
        let sizes = stmt.query_map([ids[i], ids[j]], |r| r.get::<_, i64>(0))?;
        for len in sizes {
            tally.pending = tally.pending.saturating_sub(1);
            tally.bytes = tally.bytes.saturating_sub(len? as u64);
            tally.released += 1;
        }
        i = j + 1;
    }
    Ok(())
}

fn prune_dead_letters(tx: &rusqlite::Transaction<'_>, max: u64, tally: &mut Tally) -> rusqlite::Result<()> {
    if tally.dead_letters > max {
        let excess = tally.dead_letters - max;
        let n = tx.execute(
            "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters ORDER BY id LIMIT ?1)",
            [excess as i64],
        )?;
        tally.dead_letters -= n as u64;
    }
    Ok(())
}

/// Read-only access for operator commands (`edgecase buffer ...`), safe while the agent
/// runs: WAL lets a reader in beside the writer.
pub struct Inspector {
    conn: Connection,
    path: PathBuf,
}

impl Inspector {
    pub fn open(data_dir: &Path) -> Result<Inspector, Error> {
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            return Err(storage(
                &path,
                "no buffer here (the agent has not run with this --data-dir)",
            ));
        }
        Ok(Inspector {
            conn: open_connection(&path)?,
            path,
        })
    }

    pub fn stats(&self) -> Result<Stats, Error> {
        let (pending, pending_bytes, dead_letters, _) = count(&self.conn).map_err(|e| storage(&self.path, e))?;
        let oldest_created_ms = self
            .conn
            .query_row("SELECT min(created_ms) FROM outbox", [], |r| r.get::<_, Option<i64>>(0))
            .map_err(|e| storage(&self.path, e))?;
        let file_bytes = ["", "-wal", "-shm"]
            .iter()
            .filter_map(|s| std::fs::metadata(format!("{}{s}", self.path.display())).ok())
            .map(|m| m.len())
            .sum();
        Ok(Stats {
            pending,
            pending_bytes,
            oldest_created_ms,
            dead_letters,
            file_bytes,
        })
    }

    /// Dead letters, oldest first, optionally only the given ids.
    pub fn dead_letters(&self, ids: &[i64], limit: usize) -> Result<Vec<StoredDeadLetter>, Error> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, received_ms, source, origin, device_id, sensor, reason, raw FROM dead_letters ORDER BY id",
            )
            .map_err(|e| storage(&self.path, e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StoredDeadLetter {
                    id: r.get(0)?,
                    received_ms: r.get(1)?,
                    source: r.get(2)?,
                    origin: r.get(3)?,
                    device_id: r.get(4)?,
                    sensor: r.get(5)?,
                    reason: r.get(6)?,
                    raw: r.get(7)?,
                })
            })
            .map_err(|e| storage(&self.path, e))?;
        let mut out = Vec::new();
        for row in rows {
            let row = row.map_err(|e| storage(&self.path, e))?;
            if ids.is_empty() || ids.contains(&row.id) {
                out.push(row);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// What `edgecase buffer replay` did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub queued: u64,
    pub still_failing: Vec<(i64, String)>,
}

impl Inspector {
    /// Re-parses dead letters with `parse`; each that now yields a record is moved to the
    /// outbox in one transaction (inserted and deleted from `dead_letters` together). The
    /// running agent's publisher finds the new rows on its next poll.
    pub fn replay(
        &mut self,
        letters: &[StoredDeadLetter],
        parse: impl Fn(&StoredDeadLetter) -> Result<NewRecord, String>,
    ) -> Result<ReplayReport, Error> {
        let path = self.path.clone();
        let mut report = ReplayReport::default();
        // Immediate: it reads `outbox_sequence` before it inserts, beside a running agent.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| storage(&path, e))?;
        {
            let mut next_id = next_outbox_id(&tx).map_err(|e| storage(&path, e))?;
            let mut insert = tx
                .prepare(
                    "INSERT INTO outbox (id, message_id, exchange, routing_key, device_id, payload, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(|e| storage(&path, e))?;
            let mut delete = tx
                .prepare("DELETE FROM dead_letters WHERE id = ?1")
                .map_err(|e| storage(&path, e))?;
            let now = crate::reading::now_ms();
            for d in letters {
                match parse(d) {
                    Ok(r) => {
                        insert
                            .execute(params![
                                next_id,
                                r.message_id,
                                r.exchange,
                                r.routing_key,
                                r.device_id,
                                r.payload,
                                now
                            ])
                            .map_err(|e| storage(&path, e))?;
                        next_id += 1;
                        report.queued += 1;
                        delete.execute([d.id]).map_err(|e| storage(&path, e))?;
                    }
                    Err(why) => report.still_failing.push((d.id, why)),
                }
            }
            set_next_outbox_id(&tx, next_id).map_err(|e| storage(&path, e))?;
        }
        tx.commit().map_err(|e| storage(&path, e))?;
        Ok(report)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn cfg() -> BufferConfig {
        BufferConfig {
            max_readings: 100,
            max_bytes: 1 << 20,
            ..BufferConfig::default()
        }
    }

    /// A record with message id `m{i}` (shared with the ingest tests).
    pub(crate) fn record(i: u64) -> Entry {
        Entry::Record(NewRecord {
            message_id: format!("m{i}"),
            exchange: "x".into(),
            routing_key: "reading.d.s".into(),
            device_id: "d".into(),
            payload: format!("{{\"value\":{i}}}").into_bytes(),
        })
    }

    /// At a steady rate the publisher's release of one reading and the next reading's
    /// append come about a millisecond apart: they share one durable commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_that_comes_alone_shares_the_next_appends_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Arc::new(Metrics::new());
        let (buf, _writer) = Buffer::open(dir.path(), &cfg(), m.clone()).expect("open");
        buf.append((0..2).map(record).collect()).await.expect("append");
        let rows = buf.load_after(0, 2).await.expect("load");
        let commits_before = m.buffer_commits.get();
        let (released, appended) = tokio::join!(buf.release(rows.iter().map(|r| r.id).collect()), async {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            buf.append(vec![record(2)]).await
        });
        released.expect("release");
        assert_eq!(appended.expect("append").inserted, 1);
        assert_eq!(m.buffer_commits.get() - commits_before, 1, "one commit for both");
        assert_eq!(buf.pending(), 1);
    }

    #[tokio::test]
    async fn committed_rows_survive_reopen_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Arc::new(Metrics::new());
        {
            let (buf, writer) = Buffer::open(dir.path(), &cfg(), m.clone()).expect("open");
            let report = buf.append((0..10).map(record).collect()).await.expect("append");
            assert_eq!(report.inserted, 10);
            let rows = buf.load_after(0, 4).await.expect("load");
            assert_eq!(rows.len(), 4);
            buf.release(rows.iter().map(|r| r.id).collect()).await.expect("release");
            assert_eq!(buf.pending(), 6);
            drop(buf);
            writer.join();
        }
        let (buf, _writer) = Buffer::open(dir.path(), &cfg(), m).expect("reopen");
        assert_eq!(buf.pending(), 6);
        let rows = buf.load_after(0, 100).await.expect("load");
        assert_eq!(rows.first().map(|r| r.message_id.as_str()), Some("m4"));
    }

    #[tokio::test]
    async fn release_deletes_exactly_the_given_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buf, _w) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
        buf.append((0..10).map(record).collect()).await.expect("append");
        let ids: Vec<i64> = buf
            .load_after(0, 10)
            .await
            .expect("load")
            .iter()
            .map(|r| r.id)
            .collect();
        // Two runs and a single, out of order, with a repeat.
        buf.release(vec![ids[5], ids[0], ids[1], ids[2], ids[7], ids[8], ids[1]])
            .await
            .expect("release");
        let left: Vec<String> = buf
            .load_after(0, 10)
            .await
            .expect("load")
            .into_iter()
            .map(|r| r.message_id)
            .collect();
        assert_eq!(left, ["m3", "m4", "m6", "m9"]);
        assert_eq!(buf.pending(), 4);
    }

    /// Reads like the publisher: chunks of `limit` after a cursor, appending `per_read` new
    /// rows before each read (from `next`) until `total`; stops after `reads` reads or when
    /// nothing is left. Returns the message ids read, in order.
    async fn read_like_the_publisher(buf: &Buffer, next: &mut u64, total: u64, reads: usize) -> Vec<String> {
        let (mut cursor, mut got) = (0i64, Vec::new());
        for _ in 0..reads {
            if *next < total {
                let n = 700.min(total - *next);
                buf.append((*next..*next + n).map(record).collect())
                    .await
                    .expect("append");
                *next += n;
            }
            let rows = buf.load_after(cursor, 256).await.expect("load");
            let Some(last) = rows.last() else { break };
            assert!(last.id > cursor, "rows come after the cursor");
            cursor = last.id;
            got.extend(rows.into_iter().map(|r| r.message_id));
        }
        got
    }

    #[tokio::test]
    async fn the_publisher_gets_every_row_once_in_order_from_memory_or_the_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = BufferConfig {
            max_readings: 1_000_000,
            max_bytes: 1 << 30,
            ..BufferConfig::default()
        };
        let (buf, _w) = Buffer::open(dir.path(), &cfg, Arc::new(Metrics::new())).expect("open");
        // Appends outrun the reads, so the hand-over fills and the database answers too.
        let total = (handover::MAX_ROWS * 3) as u64;
        let mut next = 0;
        let first = read_like_the_publisher(&buf, &mut next, total, 40).await;
        assert!(first.len() > handover::MAX_ROWS, "read {}", first.len());
        let expected: Vec<String> = (0..first.len() as u64).map(|i| format!("m{i}")).collect();
        assert_eq!(first, expected, "the first session reads every row once, in order");
        // The broker confirmed all but the last 100 read; then the session ends and a new
        // one starts from the oldest pending row.
        let read_ids: Vec<i64> = {
            let n = first.len();
            let pending = buf.with_reader(move |c| load_after(c, 0, n)).await.expect("read");
            pending.iter().map(|r| r.id).collect()
        };
        buf.release(read_ids[..first.len() - 100].to_vec())
            .await
            .expect("release");
        let second = read_like_the_publisher(&buf, &mut next, total, 1_000).await;
        let expected: Vec<String> = (first.len() as u64 - 100..total).map(|i| format!("m{i}")).collect();
        assert_eq!(second.len(), expected.len());
        assert_eq!(
            second, expected,
            "the new session reads the unconfirmed rows and the rest, once"
        );
    }

    /// The publisher's cursor is `id > last`: an id handed out once is never handed out
    /// again, even after every row was released and across a restart.
    #[tokio::test]
    async fn ids_are_never_reused_after_the_outbox_empties() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut cursor, mut seen) = (0i64, Vec::new());
        for round in 0..2u64 {
            let (buf, writer) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
            for i in 0..3 {
                buf.append(vec![record(round * 10 + i)]).await.expect("append");
                let rows = buf.load_after(cursor, 10).await.expect("load");
                assert_eq!(
                    rows.len(),
                    1,
                    "round {round}, reading {i}: the new row is after the cursor"
                );
                cursor = rows[0].id;
                seen.push(cursor);
                buf.release(vec![cursor]).await.expect("release");
                assert_eq!(buf.pending(), 0);
            }
            drop(buf);
            writer.join();
            let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
            let stored = next_outbox_id(&conn).expect("sequence");
            assert_eq!(
                stored,
                seen[round as usize * 3] + ID_RESERVATION,
                "one block reserved per run, not a write per commit"
            );
            // A new session of the publisher starts from 0 again, but ids go on rising.
            cursor = 0;
        }
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, seen, "ids rise and never repeat: {seen:?}");
    }

    /// Buffers written before `outbox_sequence` had `id ... AUTOINCREMENT` and, earlier
    /// still, a UNIQUE index on `message_id`: their pending rows keep their ids, and new
    /// rows come after every id that table ever used.
    #[tokio::test]
    async fn an_autoincrement_buffer_is_upgraded_with_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).expect("create");
            conn.execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE outbox (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     message_id TEXT NOT NULL UNIQUE,
                     exchange TEXT NOT NULL,
                     routing_key TEXT NOT NULL,
                     device_id TEXT NOT NULL,
                     payload BLOB NOT NULL,
                     created_ms INTEGER NOT NULL);
                 INSERT INTO outbox VALUES (1, 'old1', 'x', 'r', 'd', X'31', 5);
                 INSERT INTO outbox VALUES (7, 'old7', 'x', 'r', 'd', X'37', 6);
                 INSERT INTO outbox VALUES (9, 'old9', 'x', 'r', 'd', X'39', 7);
                 DELETE FROM outbox WHERE id = 9;",
            )
            .expect("old layout");
        }
        let (buf, _w) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
        assert_eq!(buf.pending(), 2);
        assert_eq!(buf.last_id(), 9, "the highest id the old table used");
        buf.append(vec![record(1), record(2)]).await.expect("append");
        let rows = buf.load_after(0, 10).await.expect("load");
        let got: Vec<(i64, &str)> = rows.iter().map(|r| (r.id, r.message_id.as_str())).collect();
        assert_eq!(got, [(1, "old1"), (7, "old7"), (10, "m1"), (11, "m2")]);
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
        let sql: String = conn
            .query_row("SELECT sql FROM sqlite_master WHERE name = 'outbox'", [], |r| r.get(0))
            .expect("schema");
        assert!(!sql.contains("AUTOINCREMENT"), "{sql}");
        let indexes: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'",
                [],
                |r| r.get(0),
            )
            .expect("indexes");
        assert_eq!(indexes, 0, "the old UNIQUE index went with the old table");
    }

    /// A dead letter from MQTT with these raw bytes.
    fn dead_letter(raw: &[u8]) -> NewDeadLetter {
        NewDeadLetter {
            source: "mqtt".into(),
            origin: "sensors/a/b".into(),
            device_id: Some("a".into()),
            sensor: Some("b".into()),
            reason: "payload is not valid JSON".into(),
            raw: raw.to_vec(),
        }
    }

    /// Replays every dead letter (as `edgecase buffer replay` would, from its own
    /// connection) as a record with message id `message_id`.
    fn replay_all(inspector: &mut Inspector, message_id: &str) -> ReplayReport {
        let letters = inspector.dead_letters(&[], 10).expect("list");
        inspector
            .replay(&letters, |d| {
                Ok(NewRecord {
                    message_id: message_id.into(),
                    exchange: "x".into(),
                    routing_key: "reading.a.b".into(),
                    device_id: "a".into(),
                    payload: d.raw.clone(),
                })
            })
            .expect("replay")
    }

    /// Reads like the publisher from `cursor` until `got` holds `n` message ids, or for at
    /// most three of the reader's looks at the database.
    async fn read_until(buf: &Buffer, cursor: &mut i64, got: &mut Vec<String>, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(3 * ELSEWHERE_CHECK_MS as u64);
        while got.len() < n && std::time::Instant::now() < deadline {
            for r in buf.load_after(*cursor, 10).await.expect("load") {
                *cursor = r.id;
                got.push(r.message_id);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// `edgecase buffer replay` beside a running agent: the rows it adds are only in the
    /// database, and the publisher finds them without a restart.
    #[tokio::test]
    async fn rows_replayed_beside_the_running_agent_are_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buf, _w) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
        buf.append(vec![record(1), Entry::DeadLetter(dead_letter(b"{\"value\":1"))])
            .await
            .expect("append");
        let rows = buf.load_after(0, 10).await.expect("load");
        let mut cursor = rows[0].id;
        assert!(buf.load_after(cursor, 10).await.expect("load").is_empty());
        let mut inspector = Inspector::open(dir.path()).expect("inspect");
        assert_eq!(replay_all(&mut inspector, "replayed").queued, 1);
        // A reading stored after the replay comes after it.
        buf.append(vec![record(2)]).await.expect("append");
        let mut got = Vec::new();
        read_until(&buf, &mut cursor, &mut got, 2).await;
        assert_eq!(got, ["replayed", "m2"]);
        assert_eq!(buf.pending(), 3);
        // And when the agent is idle, without a new reading behind it.
        buf.append(vec![Entry::DeadLetter(dead_letter(b"{\"value\":2"))])
            .await
            .expect("append");
        assert_eq!(replay_all(&mut inspector, "replayed-idle").queued, 1);
        read_until(&buf, &mut cursor, &mut got, 3).await;
        assert_eq!(got, ["replayed", "m2", "replayed-idle"]);
    }

    #[tokio::test]
    async fn a_second_agent_cannot_take_the_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_buf, _w) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
        let err = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).unwrap_err();
        assert!(matches!(err, Error::Locked(_)), "{err}");
    }

    #[tokio::test]
    async fn duplicates_are_counted_not_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buf, _w) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
        buf.append(vec![record(1), record(2)]).await.expect("append");
        let r = buf.append(vec![record(2), record(3)]).await.expect("append");
        assert_eq!((r.inserted, r.duplicates), (1, 1));
        assert_eq!(buf.pending(), 3);
    }

    #[tokio::test]
    async fn a_redelivery_is_recognised_after_release_and_after_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (buf, writer) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
            buf.append(vec![record(1), record(2)]).await.expect("append");
            let first = buf.load_after(0, 1).await.expect("load");
            buf.release(vec![first[0].id]).await.expect("release");
            let r = buf.append(vec![record(1)]).await.expect("append");
            assert_eq!((r.inserted, r.duplicates), (0, 1), "released, but still remembered");
            drop(buf);
            writer.join();
        }
        let (buf, _w) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("reopen");
        let r = buf.append(vec![record(2), record(3)]).await.expect("append");
        assert_eq!(
            (r.inserted, r.duplicates),
            (1, 1),
            "pending rows are remembered across a restart"
        );
    }

    #[tokio::test]
    async fn refuse_policy_holds_input_when_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BufferConfig {
            max_readings: 5,
            ..cfg()
        };
        let (buf, _w) = Buffer::open(dir.path(), &c, Arc::new(Metrics::new())).expect("open");
        buf.append((0..5).map(record).collect()).await.expect("append");
        let err = buf.append(vec![record(9)]).await.unwrap_err();
        assert!(matches!(err, Error::Full { pending: 5, .. }), "{err}");
        let first = buf.load_after(0, 1).await.expect("load");
        buf.release(vec![first[0].id]).await.expect("release");
        buf.append(vec![record(9)]).await.expect("room again");
    }

    #[tokio::test]
    async fn drop_oldest_policy_makes_room_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BufferConfig {
            max_readings: 5,
            overflow: OverflowPolicy::DropOldest,
            ..cfg()
        };
        let m = Arc::new(Metrics::new());
        let (buf, _w) = Buffer::open(dir.path(), &c, m.clone()).expect("open");
        buf.append((0..5).map(record).collect()).await.expect("append");
        buf.append(vec![record(5), record(6)]).await.expect("append");
        let ids: Vec<String> = buf
            .load_after(0, 10)
            .await
            .expect("load")
            .into_iter()
            .map(|r| r.message_id)
            .collect();
        assert_eq!(ids, ["m2", "m3", "m4", "m5", "m6"]);
        assert_eq!(m.buffer_dropped.get(), 2);
    }

    #[tokio::test]
    async fn dead_letters_keep_reason_and_raw_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buf, _w) = Buffer::open(dir.path(), &cfg(), Arc::new(Metrics::new())).expect("open");
        let dl = dead_letter(&[0xff, 0x00, 0x7b]);
        buf.append(vec![Entry::DeadLetter(dl.clone())]).await.expect("append");
        let inspector = Inspector::open(dir.path()).expect("inspect");
        let got = inspector.dead_letters(&[], 10).expect("list");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].raw.clone(), got[0].reason.clone()), (dl.raw, dl.reason));
        assert_eq!(inspector.stats().expect("stats").dead_letters, 1);
    }
}
