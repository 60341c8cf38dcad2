//! The offsets API on the source's admin port, after Confluent's (the seed's) shapes:
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /connectors/{name}/offsets` | 200 `{"id","name","offsets":[{"partition":{},"offset":{"replayId":N}}],"metadata":{"observed_at"}}` |
//! | `POST /connectors/{name}/offsets/request` `{"type":"PATCH","offsets":[{"partition":{},"offset":{"replayId":N}}]}` or `{"type":"DELETE"}` | 202 with the request; 409 while another is pending; 400 for a bad body |
//! | `GET /connectors/{name}/offsets/request/status` | 200 `{"request","status":{"phase","message"},"previous_offsets","applied_at"}`; 404 before any request |
//! | `GET /connectors/{name}/status` | 200 counts (events published, handshakes, re-logins, ...) |
//! | `GET /healthz` | 200 |

use super::offsets::{Refused, offsets_json, parse_request, request_json, status_json};
use super::source::Shared;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/connectors/{name}/offsets", get(get_offsets))
        .route("/connectors/{name}/offsets/request", post(post_request))
        .route("/connectors/{name}/offsets/request/status", get(get_status))
        .route("/connectors/{name}/status", get(get_stats))
        .with_state(shared)
}

fn reply(status: StatusCode, v: Value) -> Response {
    (status, [("content-type", "application/json")], v.to_string()).into_response()
}

fn unknown(name: &str) -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({"error_code": 404, "message": format!("no connector named {name:?} here")}),
    )
}

async fn get_offsets(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if name != s.config.name {
        return unknown(&name);
    }
    let stored = s.store.get();
    reply(
        StatusCode::OK,
        json!({"id": s.config.name, "name": s.config.name, "offsets": offsets_json(stored.replay_id),
            "metadata": {"observed_at": crate::reading::format_ms(crate::reading::now_ms()), "stored_at": stored.updated_at}}),
    )
}

async fn post_request(State(s): State<Arc<Shared>>, Path(name): Path<String>, body: Bytes) -> Response {
    if name != s.config.name {
        return unknown(&name);
    }
    let parsed = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("not JSON: {e}"))
        .and_then(|v| parse_request(&v));
    let change = match parsed {
        Ok(c) => c,
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error_code": 400, "message": e})),
    };
    match s.requests.submit(change) {
        Ok(r) => reply(StatusCode::ACCEPTED, request_json(&s.config.name, &r)),
        Err(e @ Refused::Pending(_)) => reply(
            StatusCode::CONFLICT,
            json!({"error_code": 409, "message": e.to_string()}),
        ),
        Err(e @ Refused::Unstored(_)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error_code": 500, "message": e.to_string()}),
        ),
    }
}

async fn get_status(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if name != s.config.name {
        return unknown(&name);
    }
    match s.requests.last() {
        Some(r) => reply(StatusCode::OK, status_json(&s.config.name, &r)),
        None => reply(
            StatusCode::NOT_FOUND,
            json!({"error_code": 404, "message": "no offset request has been made"}),
        ),
    }
}

async fn get_stats(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if name != s.config.name {
        return unknown(&name);
    }
    reply(StatusCode::OK, s.stats.json())
}
