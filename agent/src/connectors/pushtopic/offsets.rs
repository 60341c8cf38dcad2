//! The source's offset: the replay id of the last event RabbitMQ confirmed, kept in
//! `{data.dir}/offset.json` and replaced atomically (write, fsync, rename, fsync the
//! directory), so after a crash the file holds either the old or the new id, never half.
//! Written only after the confirm: a crash between the two republishes (duplicates), never
//! skips.
//!
//! Offset requests follow Confluent's offsets API: one PATCH (new replay id) or DELETE
//! (back to `salesforce.initial.start`) at a time, applied asynchronously by the running
//! source between two polls; the status of the last request is pending, applied or failed,
//! with the offset it replaced. The last request is kept in `{data.dir}/offset-request.json`
//! (replaced the same way): a request accepted before a crash or a stop is applied when the
//! source starts again, and its status survives restarts.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// `None`: nothing published yet, or reset by a DELETE.
    #[serde(rename = "replayId")]
    pub replay_id: Option<i64>,
    pub updated_at: String,
}

#[derive(Debug, thiserror::Error)]
#[error("offset file {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: std::io::Error,
}

pub struct Store {
    path: PathBuf,
    current: Mutex<Stored>,
}

impl Store {
    /// Opens (creating the directory) and reads the stored offset.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("offset.json");
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let current = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| err(std::io::Error::other(format!("not an offset file: {e}"))))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(err(e)),
        };
        Ok(Store {
            path,
            current: Mutex::new(current),
        })
    }

    pub fn get(&self) -> Stored {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the stored offset durably.
    pub fn set(&self, replay_id: Option<i64>) -> Result<(), StoreError> {
        let stored = Stored {
            replay_id,
            updated_at: crate::reading::format_ms(crate::reading::now_ms()),
        };
        let err = |source| StoreError {
            path: self.path.clone(),
            source,
        };
        replace_file(&self.path, json!(stored).to_string().as_bytes()).map_err(err)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = stored;
        Ok(())
    }
}

/// Replaces `path` with `bytes` durably: a crash leaves the old or the new content.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        d.sync_all()?;
    }
    Ok(())
}

/// A requested change of the offset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    Patch(i64),
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Phase {
    Pending,
    Applied,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub change: Change,
    pub requested_at: String,
    pub phase: Phase,
    pub message: String,
    /// The offset the change replaced, recorded when the source starts applying it.
    pub previous: Option<Stored>,
    pub applied_at: Option<String>,
}

/// Why a request was not accepted.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    /// Another request is pending.
    #[error("{0}")]
    Pending(String),
    /// The request could not be kept on disk.
    #[error("{0}")]
    Unstored(String),
}

/// The requests: at most one pending. Shared by the admin API and the source.
pub struct Requests {
    path: PathBuf,
    last: Mutex<Option<Request>>,
    wake: tokio::sync::Notify,
}

impl Requests {
    /// Reads the last request kept in `dir` (the directory exists: [`Store::open`]).
    pub fn open(dir: &Path) -> Result<Requests, StoreError> {
        let path = dir.join("offset-request.json");
        let last = match std::fs::read(&path) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| StoreError {
                path: path.clone(),
                source: std::io::Error::other(format!("not an offset request file: {e}")),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError { path, source: e }),
        };
        Ok(Requests {
            path,
            last: Mutex::new(last),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Request>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `r` on disk (the caller holds the lock, so writes happen in order).
    fn keep(&self, r: &Request) -> Result<(), String> {
        let bytes = serde_json::to_vec(r).map_err(|e| e.to_string())?;
        replace_file(&self.path, &bytes)
            .map_err(|e| format!("cannot store the request in {}: {e}", self.path.display()))
    }

    /// Queues a change; refused while another is pending.
    pub fn submit(&self, change: Change) -> Result<Request, Refused> {
        let mut g = self.lock();
        if let Some(r) = g.as_ref()
            && r.phase == Phase::Pending
        {
            return Err(Refused::Pending(format!(
                "an offset request ({}) is still pending: one change at a time",
                kind(&r.change)
            )));
        }
        let r = Request {
            change,
            requested_at: crate::reading::format_ms(crate::reading::now_ms()),
            phase: Phase::Pending,
            message: "waiting for the source to apply it".into(),
            previous: None,
            applied_at: None,
        };
        self.keep(&r).map_err(Refused::Unstored)?;
        *g = Some(r.clone());
        drop(g);
        self.wake.notify_one();
        Ok(r)
    }

    /// The pending change, if any.
    pub fn pending(&self) -> Option<Change> {
        self.lock()
            .as_ref()
            .filter(|r| r.phase == Phase::Pending)
            .map(|r| r.change.clone())
    }

    /// Resolves when a change may be pending.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Records that the source starts applying the pending request over `current`; returns
    /// the offset the request replaces: `current`, or the one recorded before a restart
    /// that interrupted the request (when `current` may already be the requested one).
    pub fn begin(&self, current: Stored) -> Stored {
        let mut g = self.lock();
        let Some(r) = g.as_mut().filter(|r| r.phase == Phase::Pending) else {
            return current;
        };
        if let Some(p) = &r.previous {
            return p.clone();
        }
        r.previous = Some(current.clone());
        if let Err(e) = self.keep(r) {
            tracing::warn!(error = %e, "the offset request's status is kept in memory only");
        }
        current
    }

    /// Records the outcome of the pending request.
    pub fn finish(&self, phase: Phase, message: String, previous: Stored) {
        let mut g = self.lock();
        if let Some(r) = g.as_mut().filter(|r| r.phase == Phase::Pending) {
            r.phase = phase;
            r.message = message;
            r.previous = Some(previous);
            r.applied_at = Some(crate::reading::format_ms(crate::reading::now_ms()));
            // The offset itself is stored; only the status could be lost here.
            if let Err(e) = self.keep(r) {
                tracing::warn!(error = %e, "the offset request's status is kept in memory only");
            }
        }
    }

    pub fn last(&self) -> Option<Request> {
        self.lock().clone()
    }
}

fn kind(c: &Change) -> &'static str {
    match c {
        Change::Patch(_) => "PATCH",
        Change::Delete => "DELETE",
    }
}

/// `{"partition": {}, "offset": {"replayId": N}}` lists, as in the seed.
pub fn offsets_json(replay_id: Option<i64>) -> Value {
    match replay_id {
        Some(n) => json!([{"partition": {}, "offset": {"replayId": n}}]),
        None => json!([]),
    }
}

/// The request as the seed's API shows it.
pub fn request_json(name: &str, r: &Request) -> Value {
    let offsets = match r.change {
        Change::Patch(n) => offsets_json(Some(n)),
        Change::Delete => json!([]),
    };
    json!({"id": name, "name": name, "offsets": offsets, "requested_at": r.requested_at, "type": kind(&r.change)})
}

pub fn status_json(name: &str, r: &Request) -> Value {
    json!({
        "request": request_json(name, r),
        "status": {"phase": r.phase, "message": r.message},
        "previous_offsets": r.previous.as_ref().map(|p| offsets_json(p.replay_id)).unwrap_or(json!([])),
        "applied_at": r.applied_at,
    })
}

/// Parses a POST `.../offsets/request` body: `{"type":"PATCH","offsets":[{"partition":{},
/// "offset":{"replayId":N}}]}` or `{"type":"DELETE"}`.
pub fn parse_request(body: &Value) -> Result<Change, String> {
    match body["type"].as_str().map(str::to_ascii_uppercase).as_deref() {
        Some("DELETE") => Ok(Change::Delete),
        Some("PATCH") => {
            let id = body["offsets"][0]["offset"]["replayId"]
                .as_i64()
                .ok_or("a PATCH needs offsets[0].offset.replayId (an integer)")?;
            if id < 0 {
                return Err("replayId must be a replay id Salesforce gave (>= 0); use DELETE to go back to salesforce.initial.start".into());
            }
            Ok(Change::Patch(id))
        }
        _ => Err("type must be PATCH or DELETE".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get().replay_id, None);
        s.set(Some(42)).unwrap();
        assert_eq!(Store::open(dir.path()).unwrap().get().replay_id, Some(42));
        s.set(None).unwrap();
        assert_eq!(Store::open(dir.path()).unwrap().get().replay_id, None);
    }

    #[test]
    fn one_request_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let r = Requests::open(dir.path()).unwrap();
        r.submit(Change::Patch(5)).unwrap();
        assert!(r.submit(Change::Delete).unwrap_err().to_string().contains("pending"));
        assert_eq!(r.pending(), Some(Change::Patch(5)));
        r.finish(Phase::Applied, "ok".into(), Stored::default());
        assert_eq!(r.pending(), None);
        r.submit(Change::Delete).unwrap();
        assert_eq!(
            parse_request(&json!({"type":"PATCH","offsets":[{"partition":{},"offset":{"replayId":3823}}]})),
            Ok(Change::Patch(3823))
        );
        assert_eq!(parse_request(&json!({"type":"DELETE"})), Ok(Change::Delete));
        assert!(parse_request(&json!({"type":"PATCH"})).is_err());
    }

    #[test]
    fn a_request_and_its_status_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let r = Requests::open(dir.path()).unwrap();
        r.submit(Change::Patch(7)).unwrap();
        let before = Stored {
            replay_id: Some(3),
            updated_at: "t".into(),
        };
        assert_eq!(r.begin(before.clone()), before);
        // A crash after the offset was set to 7: the request is still pending after the
        // restart, and the offset it replaced is still 3.
        let r = Requests::open(dir.path()).unwrap();
        assert_eq!(r.pending(), Some(Change::Patch(7)));
        let now = Stored {
            replay_id: Some(7),
            updated_at: "u".into(),
        };
        assert_eq!(r.begin(now), before);
        r.finish(Phase::Applied, "subscribed".into(), before.clone());
        let r = Requests::open(dir.path()).unwrap();
        let last = r.last().unwrap();
        assert_eq!((last.phase, last.previous), (Phase::Applied, Some(before)));
        assert_eq!(r.pending(), None);
    }
}
