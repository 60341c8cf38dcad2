//! The HTTP face of the emulator: Salesforce's URLs, status codes, headers and bodies.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /services/data/` | API versions (no auth) |
//! | `POST /services/oauth2/token` | password and JWT bearer grants (form-encoded) |
//! | `GET /services/data/vXX.X/` | the version's resources |
//! | `GET /services/data/vXX.X/limits` | `DailyApiRequests` |
//! | `GET/POST /services/data/vXX.X/sobjects/{Type}/` | describe-lite, create (201) |
//! | `GET /services/data/vXX.X/sobjects/{Type}/describe` | fields |
//! | `GET/PATCH/DELETE /services/data/vXX.X/sobjects/{Type}/{Id}` | read, update (204), delete (204) |
//! | `GET/PATCH /services/data/vXX.X/sobjects/{Type}/{ExtField}/{Value}` | read by external id, upsert (201 / 200, 204 before v46) |
//! | `GET /services/data/vXX.X/query?q=SOQL`, `/query/{locator}` | SOQL subset, paging |
//! | `POST /services/data/vXX.X/composite/sobjects` | collection create (≤ 200) |
//! | `PATCH /services/data/vXX.X/composite/sobjects/{Type}/{ExtField}` | collection upsert (≤ 200) |
//! | `GET /__emulator/records/{Type}` | state inspection (not Salesforce) |
//! | `POST /__emulator/faults`, `POST /__emulator/expire-sessions`, `GET/PATCH /__emulator/settings`, `GET /__emulator/stats` | test control (not Salesforce) |
//!
//! Every REST answer carries `Sforce-Limit-Info: api-usage=N/M`, except the version list.

use crate::org::{ApiError, FaultKind, Org};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Oldest and newest API versions served.
pub const MIN_VERSION: f64 = 20.0;
pub const MAX_VERSION: f64 = 62.0;

pub struct AppState {
    pub org: Arc<Org>,
    /// `http://127.0.0.1:PORT`: the login host, the instance URL and the audience.
    pub base_url: String,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/services/data", get(versions))
        .route("/services/data/", get(versions))
        .route("/services/oauth2/token", post(token))
        .route("/services/data/{version}", any(rest_root))
        .route("/services/data/{version}/", any(rest_root))
        .route("/services/data/{version}/{*rest}", any(rest))
        .route("/__emulator/records/{object}", get(inspect_records))
        .route("/__emulator/faults", post(inject_fault).delete(clear_faults))
        .route("/__emulator/expire-sessions", post(expire_sessions))
        .route("/__emulator/settings", get(get_settings).patch(patch_settings))
        .route("/__emulator/stats", get(stats))
        .with_state(state)
}

fn json_response(status: u16, body: &Value) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    r
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.status, &e.body())
}

async fn versions(State(s): State<Arc<AppState>>) -> Response {
    let list: Vec<Value> = (MIN_VERSION as u32..=MAX_VERSION as u32)
        .map(|v| {
            json!({
                "label": format!("API {v}.0"),
                "url": format!("/services/data/v{v}.0"),
                "version": format!("{v}.0"),
            })
        })
        .collect();
    latency(&s.org).await;
    json_response(200, &Value::Array(list))
}

async fn latency(org: &Org) {
    let ms = org.settings().latency_ms;
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn oauth_error(org: &Org, error: &str, description: &str) -> Response {
    org.token_refused();
    json_response(400, &json!({"error": error, "error_description": description}))
}

async fn token(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    latency(&s.org).await;
    let org = &s.org;
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return oauth_error(org, "invalid_request", "must use application/x-www-form-urlencoded");
    }
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    match get("grant_type") {
        "password" => {
            if !org.settings().password_grant {
                return oauth_error(org, "invalid_grant", "authentication failure");
            }
            let Some(app) = org.app(get("client_id")) else {
                return oauth_error(org, "invalid_client_id", "client identifier invalid");
            };
            if app.client_secret != get("client_secret") {
                return oauth_error(org, "invalid_client", "invalid client credentials");
            }
            let user = match org.user(get("username")) {
                Some(u) if format!("{}{}", u.password, u.security_token) == get("password") => u.clone(),
                _ => return oauth_error(org, "invalid_grant", "authentication failure"),
            };
            let access_token = org.open_session(&user.id, &app.client_id);
            let id = format!("{}/id/{}/{}", s.base_url, org.org_id, user.id);
            let issued_at = crate::org::now_ms().to_string();
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app.client_secret.as_bytes());
            let tag = ring::hmac::sign(&key, format!("{id}{issued_at}").as_bytes());
            use base64::Engine;
            let signature = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
            json_response(
                200,
                &json!({
                    "access_token": access_token,
                    "instance_url": s.base_url,
                    "id": id,
                    "token_type": "Bearer",
                    "issued_at": issued_at,
                    "signature": signature,
                }),
            )
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => match check_assertion(&s, get("assertion")) {
            Ok((user_id, client_id)) => {
                let access_token = org.open_session(&user_id, &client_id);
                json_response(
                    200,
                    &json!({
                        "access_token": access_token,
                        "scope": "id api",
                        "instance_url": s.base_url,
                        "id": format!("{}/id/{}/{}", s.base_url, org.org_id, user_id),
                        "token_type": "Bearer",
                    }),
                )
            }
            Err((error, description)) => oauth_error(org, error, &description),
        },
        "" => oauth_error(org, "unsupported_grant_type", "grant type not supported"),
        _ => oauth_error(org, "unsupported_grant_type", "grant type not supported"),
    }
}

/// Checks a JWT bearer assertion as Salesforce does: RS256 signature by the connected
/// app's certificate, `iss` a known consumer key, `aud` a login host, `sub` a known user,
/// `exp` in the future and at most 3 minutes away (plus a minute of clock skew).
fn check_assertion(s: &AppState, assertion: &str) -> Result<(String, String), (&'static str, String)> {
    use base64::Engine;
    let bad = |d: &str| ("invalid_grant", d.to_string());
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| bad("invalid assertion"))?;
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err(bad("invalid assertion"));
    }
    // Read the issuer before verifying, to know whose key to verify with.
    let payload = assertion.split('.').nth(1).ok_or_else(|| bad("invalid assertion"))?;
    let claims: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("invalid assertion"))?;
    let iss = claims["iss"].as_str().unwrap_or_default();
    let app = s
        .org
        .app(iss)
        .ok_or(("invalid_client_id", "client identifier invalid".to_string()))?;
    let pem = app
        .jwt_public_key_pem
        .as_deref()
        .ok_or_else(|| bad("invalid assertion"))?;
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| bad("invalid assertion"))?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims = Default::default();
    jsonwebtoken::decode::<Value>(assertion, &key, &validation).map_err(|_| bad("invalid assertion"))?;
    let aud_ok = match &claims["aud"] {
        Value::String(a) => s.org.audiences.iter().any(|x| x == a),
        Value::Array(list) => list
            .iter()
            .any(|a| a.as_str().is_some_and(|a| s.org.audiences.iter().any(|x| x == a))),
        _ => false,
    };
    if !aud_ok {
        return Err(bad("audience is invalid"));
    }
    // simple-salesforce sends exp as a string of digits.
    let exp = match &claims["exp"] {
        Value::Number(n) => n.as_f64(),
        Value::String(t) => t.parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| bad("expired authorization code"))?;
    let now = crate::org::now_ms() as f64 / 1000.0;
    if exp <= now - 60.0 {
        return Err(bad("expired authorization code"));
    }
    if exp > now + 180.0 + 60.0 {
        return Err(bad("invalid assertion: exp is more than 3 minutes away"));
    }
    let sub = claims["sub"].as_str().unwrap_or_default();
    let user = s
        .org
        .user(sub)
        .ok_or_else(|| bad("user hasn't approved this consumer"))?;
    Ok((user.id.clone(), app.client_id.clone()))
}

/// Ends the request's bookkeeping however the handler returns.
struct InFlight<'a>(&'a Org);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

fn parse_version(v: &str) -> Option<(String, f64)> {
    let num = v.strip_prefix('v')?;
    let n: f64 = num.parse().ok()?;
    (num.contains('.') && (MIN_VERSION..=MAX_VERSION).contains(&n)).then(|| (num.to_string(), n))
}

async fn rest_root(
    State(s): State<Arc<AppState>>,
    method: Method,
    Path(version): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(s, method, version, String::new(), uri, headers, body).await
}

async fn rest(
    State(s): State<Arc<AppState>>,
    method: Method,
    Path((version, rest)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(s, method, version, rest, uri, headers, body).await
}

async fn handle(
    s: Arc<AppState>,
    method: Method,
    version: String,
    rest: String,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let org = s.org.clone();
    latency(&org).await;
    let Some((version, vnum)) = parse_version(&version) else {
        return error_response(&ApiError::not_found());
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("OAuth ")))
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let fault = org.begin_request();
    let _in_flight = InFlight(&org);
    if let Some(f) = fault {
        return match f.kind {
            FaultKind::RateLimit => error_response(&ApiError::new(
                403,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            )),
            FaultKind::Unavailable => {
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "<html><head><title>Service Unavailable</title></head><body><h1>Service Unavailable</h1><p>The server is temporarily unable to service your request. Please try again later.</p></body></html>",
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
                r
            }
            FaultKind::ServerError => error_response(&ApiError::new(
                500,
                "UNKNOWN_EXCEPTION",
                "An unexpected error occurred. Please include this ErrorId if you contact support: 1234567890-12345 (-1234567890)",
            )),
            FaultKind::LockRow => error_response(&ApiError::new(
                400,
                "UNABLE_TO_LOCK_ROW",
                "unable to obtain exclusive access to this record or 1 records: 500Ed000000000001AAA",
            )),
            FaultKind::SessionExpired => {
                org.expire_sessions();
                error_response(&ApiError::session())
            }
            FaultKind::Stall => {
                tokio::time::sleep(Duration::from_millis(f.stall_ms.unwrap_or(60_000))).await;
                error_response(&ApiError::new(503, "SERVER_UNAVAILABLE", "stalled request"))
            }
        };
    }
    let Some(session) = org.session(&token) else {
        return error_response(&ApiError::session());
    };
    let (used, max) = match org.charge_api_call() {
        Ok(u) => u,
        Err(e) => return error_response(&e),
    };
    let mut response = route(&s, &method, &version, vnum, &rest, &uri, &body, &session.user_id);
    if let Ok(v) = HeaderValue::from_str(&format!("api-usage={used}/{max}")) {
        response.headers_mut().insert("Sforce-Limit-Info", v);
    }
    response
}

fn parse_body(body: &Bytes, what: &str) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            "The HTTP entity body is required, but this request has no entity body.",
        ));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "JSON_PARSER_ERROR", format!("Unexpected character in {what}: {e}")))?;
    Ok(v)
}

fn parse_object(body: &Bytes, what: &str) -> Result<Map<String, Value>, ApiError> {
    match parse_body(body, what)? {
        Value::Object(o) => Ok(o),
        Value::Array(_) => Err(ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("Cannot deserialize instance of {what} from START_ARRAY value at [line:1, column:1]"),
        )),
        _ => Err(ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("Cannot deserialize instance of {what} from VALUE_STRING value at [line:1, column:1]"),
        )),
    }
}

fn query_param(uri: &Uri, key: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

#[allow(clippy::too_many_arguments)]
fn route(
    s: &AppState,
    method: &Method,
    version: &str,
    vnum: f64,
    rest: &str,
    uri: &Uri,
    body: &Bytes,
    user_id: &str,
) -> Response {
    let org = &s.org;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let result: Result<Response, ApiError> = (|| match (method.clone(), parts.as_slice()) {
        (Method::GET, []) => Ok(json_response(
            200,
            &json!({
                "sobjects": format!("/services/data/v{version}/sobjects"),
                "query": format!("/services/data/v{version}/query"),
                "composite": format!("/services/data/v{version}/composite"),
                "limits": format!("/services/data/v{version}/limits"),
            }),
        )),
        (Method::GET, ["limits"]) => {
            let settings = org.settings();
            let stats = org.stats();
            Ok(json_response(
                200,
                &json!({"DailyApiRequests": {"Max": settings.daily_api_limit,
                    "Remaining": settings.daily_api_limit.saturating_sub(stats.rest_requests)}}),
            ))
        }
        (Method::GET, ["query"]) => {
            let q = query_param(uri, "q")
                .ok_or_else(|| ApiError::new(400, "MALFORMED_QUERY", "A query string has to be specified"))?;
            Ok(json_response(200, &org.query(&q, version)?))
        }
        (Method::GET, ["query", locator]) => Ok(json_response(200, &org.query_more(locator)?)),
        (Method::POST, ["composite", "sobjects"]) => collection(s, None, body, user_id),
        (Method::PATCH, ["composite", "sobjects", object, field]) => {
            collection(s, Some((object, field)), body, user_id)
        }
        (Method::GET, ["sobjects", object]) => {
            let d = org.describe(object)?;
            Ok(json_response(
                200,
                &json!({"objectDescribe": {"name": d["name"], "keyPrefix": d["keyPrefix"]}, "recentItems": []}),
            ))
        }
        (Method::POST, ["sobjects", object]) => {
            let fields = parse_object(body, object)?;
            let id = org.create(object, &fields, user_id)?;
            Ok(json_response(201, &json!({"id": id, "success": true, "errors": []})))
        }
        (Method::GET, ["sobjects", object, "describe"]) => Ok(json_response(200, &org.describe(object)?)),
        (Method::GET, ["sobjects", object, id]) => {
            let record = org.get(object, id)?;
            Ok(json_response(200, &with_attributes(object, version, record, uri)))
        }
        (Method::PATCH, ["sobjects", object, id]) => {
            let fields = parse_object(body, object)?;
            org.update(object, id, &fields, user_id)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Method::DELETE, ["sobjects", object, id]) => {
            org.delete(object, id)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Method::GET, ["sobjects", object, field, value]) => {
            let record = org.get_by_external_id(object, field, value)?;
            Ok(json_response(200, &with_attributes(object, version, record, uri)))
        }
        (Method::PATCH, ["sobjects", object, field, value]) => {
            let fields = parse_object(body, object)?;
            let (id, created) = org.upsert(object, field, value, &fields, user_id)?;
            if created {
                let mut b = json!({"id": id, "success": true, "errors": []});
                if vnum >= 46.0 {
                    b["created"] = json!(true);
                }
                Ok(json_response(201, &b))
            } else if vnum >= 46.0 {
                Ok(json_response(
                    200,
                    &json!({"id": id, "success": true, "errors": [], "created": false}),
                ))
            } else {
                Ok(StatusCode::NO_CONTENT.into_response())
            }
        }
        _ => Err(ApiError::not_found()),
    })();
    result.unwrap_or_else(|e| error_response(&e))
}

fn with_attributes(object: &str, version: &str, record: Map<String, Value>, uri: &Uri) -> Value {
    let id = record.get("Id").and_then(Value::as_str).unwrap_or_default().to_string();
    let only: Option<Vec<String>> =
        query_param(uri, "fields").map(|f| f.split(',').map(|x| x.trim().to_lowercase()).collect());
    let mut out = Map::new();
    let name = match object.to_lowercase().as_str() {
        "case" => "Case".to_string(),
        _ => object.to_string(),
    };
    out.insert(
        "attributes".into(),
        json!({"type": name, "url": format!("/services/data/v{version}/sobjects/{name}/{id}")}),
    );
    for (k, v) in record {
        if only.as_ref().is_none_or(|o| o.contains(&k.to_lowercase()) || k == "Id") {
            out.insert(k, v);
        }
    }
    Value::Object(out)
}

fn collection(
    s: &AppState,
    upsert_on: Option<(&str, &str)>,
    body: &Bytes,
    user_id: &str,
) -> Result<Response, ApiError> {
    let req = parse_object(body, "SObjectCollectionRequest")?;
    let records = req
        .get("records")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::new(400, "JSON_PARSER_ERROR", "records is required"))?;
    if records.len() > 200 {
        return Err(ApiError::new(
            400,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        ));
    }
    let all_or_none = req.get("allOrNone").and_then(Value::as_bool).unwrap_or(false);
    let results = s.org.collection(upsert_on, records, all_or_none, user_id);
    let out: Vec<Value> = results
        .into_iter()
        .map(|r| match r {
            Ok((id, created)) => {
                let mut o = json!({"id": id, "success": true, "errors": []});
                if upsert_on.is_some() {
                    o["created"] = json!(created);
                }
                o
            }
            // Inside collections the error key is statusCode, not errorCode.
            Err(e) => json!({
                "success": false,
                "errors": e.errors.iter().map(|x| json!({"statusCode": x.code, "message": x.message, "fields": x.fields})).collect::<Vec<_>>(),
            }),
        })
        .collect();
    Ok(json_response(200, &Value::Array(out)))
}

async fn inspect_records(State(s): State<Arc<AppState>>, Path(object): Path<String>) -> Response {
    json_response(
        200,
        &Value::Array(s.org.records(&object).into_iter().map(Value::Object).collect()),
    )
}

async fn inject_fault(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match serde_json::from_slice::<crate::org::Fault>(&body) {
        Ok(f) => {
            s.org.inject(f);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => json_response(400, &json!({"error": e.to_string()})),
    }
}

async fn clear_faults(State(s): State<Arc<AppState>>) -> Response {
    s.org.clear_faults();
    StatusCode::NO_CONTENT.into_response()
}

async fn expire_sessions(State(s): State<Arc<AppState>>) -> Response {
    s.org.expire_sessions();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_settings(State(s): State<Arc<AppState>>) -> Response {
    json_response(200, &serde_json::to_value(s.org.settings()).unwrap_or_default())
}

/// Merges the JSON object given into the settings (only the keys it names change).
async fn patch_settings(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let current = serde_json::to_value(s.org.settings()).unwrap_or_default();
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return json_response(400, &json!({"error": e.to_string()})),
    };
    let mut merged = current;
    if let (Some(m), Some(p)) = (merged.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            m.insert(k.clone(), v.clone());
        }
    }
    match serde_json::from_value::<crate::org::Settings>(merged) {
        Ok(new) => {
            s.org.update_settings(|cur| *cur = new.clone());
            json_response(200, &serde_json::to_value(new).unwrap_or_default())
        }
        Err(e) => json_response(400, &json!({"error": e.to_string()})),
    }
}

async fn stats(State(s): State<Arc<AppState>>) -> Response {
    json_response(200, &serde_json::to_value(s.org.stats()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::org::{OrgSetup, Settings};

    fn state() -> AppState {
        AppState {
            org: Arc::new(Org::new(OrgSetup {
                apps: vec![("cid".into(), "secret".into(), Some(crate::TEST_JWT_PUBLIC_KEY.into()))],
                users: vec![("u@example.com".into(), "pw".into(), "T".into())],
                audiences: vec!["https://login.salesforce.com".into()],
                external_id_fields: vec![],
                custom_fields: vec![],
                settings: Settings::default(),
            })),
            base_url: "http://127.0.0.1:1".into(),
        }
    }

    fn assertion(claims: Value, pem: &str) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).expect("key");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .expect("sign")
    }

    fn now() -> i64 {
        crate::org::now_ms() / 1000
    }

    #[test]
    fn jwt_bearer_checks_signature_issuer_audience_subject_and_expiry() {
        let s = state();
        let good =
            json!({"iss": "cid", "sub": "u@example.com", "aud": "https://login.salesforce.com", "exp": now() + 120});
        let key = crate::TEST_JWT_PRIVATE_KEY;
        assert!(check_assertion(&s, &assertion(good.clone(), key)).is_ok());
        // simple-salesforce sends exp as a string.
        let mut as_string = good.clone();
        as_string["exp"] = json!((now() + 120).to_string());
        assert!(check_assertion(&s, &assertion(as_string, key)).is_ok());
        let refused = |claims: Value| check_assertion(&s, &assertion(claims, key)).unwrap_err();
        let mut c = good.clone();
        c["aud"] = json!("https://evil.example.com");
        assert_eq!(refused(c), ("invalid_grant", "audience is invalid".to_string()));
        let mut c = good.clone();
        c["exp"] = json!(now() - 600);
        assert_eq!(refused(c).1, "expired authorization code");
        let mut c = good.clone();
        c["exp"] = json!(now() + 3600);
        assert!(refused(c).1.contains("more than 3 minutes"));
        let mut c = good.clone();
        c["sub"] = json!("nobody@example.com");
        assert_eq!(refused(c).1, "user hasn't approved this consumer");
        let mut c = good.clone();
        c["iss"] = json!("unknown-app");
        assert_eq!(refused(c).0, "invalid_client_id");
        // A token signed by another key, or tampered with, fails the signature check.
        let mut parts: Vec<String> = assertion(good.clone(), key).split('.').map(String::from).collect();
        use base64::Engine;
        let forged =
            json!({"iss": "cid", "sub": "u@example.com", "aud": "https://login.salesforce.com", "exp": now() + 170});
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string());
        assert_eq!(
            check_assertion(&s, &parts.join(".")).unwrap_err(),
            ("invalid_grant", "invalid assertion".to_string())
        );
        assert!(check_assertion(&s, "not.a.jwt").is_err());
    }

    #[test]
    fn api_versions_in_the_path() {
        assert_eq!(parse_version("v58.0").map(|v| v.1), Some(58.0));
        assert!(parse_version("58.0").is_none());
        assert!(parse_version("v19.0").is_none());
        assert!(parse_version("v99.0").is_none());
    }
}
