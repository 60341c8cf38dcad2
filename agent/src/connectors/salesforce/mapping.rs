//! A case message (the agent's `CaseEvent` JSON on `edgecase.cases`) → the Case fields to
//! upsert. Pure: no I/O.
//!
//! Order, later wins: the division's `defaults` (on `raise` only, so a follow-up such as a
//! clear never resets fields an agent or a person changed), the message's `case` object,
//! then the division's `mapping` (Case field → path in the message; an empty path removes
//! the field). The external id field is never in the body: it is the upsert URL's key.

use super::config::DivisionConfig;
use serde_json::{Map, Value};

/// A message ready to upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRecord {
    /// The upsert key: the occurrence's stable id.
    pub event_id: String,
    /// The AMQP message id, for logs.
    pub message_id: Option<String>,
    pub fields: Map<String, Value>,
}

/// Why a message cannot become a Case (it is dead-lettered with this text).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BadMessage(pub String);

pub fn case_record(payload: &[u8], division: &DivisionConfig) -> Result<CaseRecord, BadMessage> {
    let msg: Value =
        serde_json::from_slice(payload).map_err(|e| BadMessage(format!("the message is not JSON: {e}")))?;
    let obj = msg
        .as_object()
        .ok_or_else(|| BadMessage("the message is not a JSON object".into()))?;
    let event_id = match obj.get("event_id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err(BadMessage("the message has no event_id (the upsert key)".into())),
    };
    if event_id.contains('/') || event_id.len() > 255 {
        return Err(BadMessage(format!(
            "event_id {event_id:?} cannot be an external id (no '/', at most 255 characters)"
        )));
    }
    let raise = obj.get("action").and_then(Value::as_str).unwrap_or("raise") == "raise";
    let mut fields = Map::new();
    if raise {
        for (k, v) in &division.defaults {
            fields.insert(k.clone(), v.clone());
        }
    }
    match obj.get("case") {
        Some(Value::Object(case)) => {
            for (k, v) in case {
                fields.insert(k.clone(), v.clone());
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => return Err(BadMessage("`case` must be an object of Case fields".into())),
    }
    for (field, path) in &division.mapping {
        if path.is_empty() {
            fields.remove(field);
        } else if let Some(v) = lookup(&msg, path).filter(|v| !v.is_null()) {
            fields.insert(field.clone(), v.clone());
        }
    }
    fields.retain(|k, _| !k.eq_ignore_ascii_case(&division.external_id_field));
    Ok(CaseRecord {
        event_id,
        message_id: obj.get("message_id").and_then(Value::as_str).map(str::to_string),
        fields,
    })
}

/// `a.b.c` in a JSON document.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, part| cur.get(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn division(defaults: Value, mapping: Value) -> DivisionConfig {
        serde_json::from_value(json!({
            "name": "facilities", "username": "u", "defaults": defaults, "mapping": mapping
        }))
        .unwrap()
    }

    fn payload(action: &str) -> Vec<u8> {
        json!({
            "event_id": "ev-1", "message_id": "m-1", "action": action, "division": "facilities",
            "device_id": "boiler-1", "sensor": "temp",
            "case": {"Subject": "boiler-1 hot", "Priority": "High", "Edge_Event_Id__c": "spoof"},
            "reading": {"value": 83.5, "unit": "C"}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn defaults_case_fields_and_mapping_in_that_order() {
        let d = division(
            json!({"Origin": "Edgecase", "Priority": "Low", "Status": "New"}),
            json!({"Device__c": "device_id", "Reading__c": "reading.value", "Status": "", "Nope__c": "missing.path"}),
        );
        let r = case_record(&payload("raise"), &d).unwrap();
        assert_eq!(r.event_id, "ev-1");
        assert_eq!(
            Value::Object(r.fields),
            json!({"Origin": "Edgecase", "Priority": "High", "Subject": "boiler-1 hot",
                   "Device__c": "boiler-1", "Reading__c": 83.5})
        );
    }

    #[test]
    fn a_follow_up_gets_no_defaults() {
        let d = division(json!({"Origin": "Edgecase"}), json!({}));
        let r = case_record(&payload("clear"), &d).unwrap();
        assert!(!r.fields.contains_key("Origin"));
        assert_eq!(r.fields["Subject"], "boiler-1 hot");
    }

    #[test]
    fn bad_messages_say_why() {
        let d = division(json!({}), json!({}));
        assert!(case_record(b"nope", &d).unwrap_err().0.contains("not JSON"));
        assert!(case_record(b"[1]", &d).unwrap_err().0.contains("object"));
        assert!(case_record(br#"{"case":{}}"#, &d).unwrap_err().0.contains("event_id"));
        assert!(
            case_record(br#"{"event_id":"a/b"}"#, &d)
                .unwrap_err()
                .0
                .contains("external id")
        );
    }
}
