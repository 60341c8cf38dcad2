//! `output.data.format = AVRO`: each message body is an Avro object container (the format
//! of `.avro` files) holding the event's record, with the writer's schema in its header.
//! Any Avro library reads it without a registry (Python `fastavro.reader`, Java
//! `DataFileReader`). In the seed the schema lives in Confluent's Schema Registry and the
//! message only names it by id; there is no registry on the AMQP side, so it travels in each
//! message, as `JSON_SR` carries its JSON schema.
//!
//! The record is `io.edgecase.salesforce.<Object>`: the PushTopic's fields (`Id` a string,
//! the others nullable with a `null` default: boolean, double, int, long or string after
//! the field's Salesforce type), then `_ObjectType`, `_EventType`, `_ReplayId` (long) and
//! `_EventCreatedDate`.

use super::bayeux::Event;
use super::format::connect_type;
use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use serde_json::{Value, json};

/// The Avro type of a field: the Connect type of its Salesforce type, in Avro's names.
fn avro_type(sf_type: &str) -> &'static str {
    match connect_type(sf_type) {
        "boolean" => "boolean",
        "double" => "double",
        "int32" => "int",
        "int64" => "long",
        _ => "string",
    }
}

/// The record schema of one PushTopic's events; `fields` are (name, Salesforce type).
#[derive(Debug, Clone)]
pub struct AvroSchema {
    schema: Schema,
    /// (name, Avro type, nullable) in the schema's order.
    fields: Vec<(String, &'static str, bool)>,
}

impl AvroSchema {
    pub fn new(object: &str, fields: &[(String, String)]) -> Result<AvroSchema, String> {
        let mut layout: Vec<(String, &'static str, bool)> = fields
            .iter()
            .map(|(name, t)| (name.clone(), avro_type(t), name != "Id"))
            .collect();
        layout.push(("_ObjectType".into(), "string", false));
        layout.push(("_EventType".into(), "string", false));
        layout.push(("_ReplayId".into(), "long", false));
        layout.push(("_EventCreatedDate".into(), "string", true));
        let json_fields: Vec<Value> = layout
            .iter()
            .map(|(name, ty, nullable)| match nullable {
                true => json!({"name": name, "type": ["null", ty], "default": null}),
                false => json!({"name": name, "type": ty}),
            })
            .collect();
        let text = json!({
            "type": "record",
            "name": object,
            "namespace": "io.edgecase.salesforce",
            "fields": json_fields,
        });
        let schema = Schema::parse(&text).map_err(|e| format!("the Avro schema of {object}: {e}"))?;
        Ok(AvroSchema { schema, fields: layout })
    }

    /// The message body: an object container with the schema and one record.
    pub fn body(&self, object: &str, e: &Event) -> Result<Vec<u8>, String> {
        let record = self
            .fields
            .iter()
            .map(|(name, ty, nullable)| {
                let v = match name.as_str() {
                    "_ObjectType" => Avro::String(object.to_string()),
                    "_EventType" => Avro::String(e.kind.clone()),
                    "_ReplayId" => Avro::Long(e.replay_id),
                    "_EventCreatedDate" => Avro::String(e.created_date.clone()),
                    field => match convert(ty, e.sobject.get(field)) {
                        Some(v) => v,
                        None if *nullable => Avro::Null,
                        None => Avro::String(String::new()),
                    },
                };
                let v = match (nullable, v) {
                    (false, v) => v,
                    (true, Avro::Null) => Avro::Union(0, Box::new(Avro::Null)),
                    (true, v) => Avro::Union(1, Box::new(v)),
                };
                (name.clone(), v)
            })
            .collect();
        let mut writer = apache_avro::Writer::new(&self.schema, Vec::new());
        writer
            .append(Avro::Record(record))
            .map_err(|err| format!("Avro encoding of event {}: {err}", e.replay_id))?;
        writer
            .into_inner()
            .map_err(|err| format!("Avro encoding of event {}: {err}", e.replay_id))
    }
}

/// A JSON value as the field's Avro type; `None` (null) when it is absent or does not fit.
/// A string field takes any JSON value (objects such as addresses as their JSON text).
fn convert(ty: &str, v: Option<&Value>) -> Option<Avro> {
    let v = v.filter(|v| !v.is_null())?;
    match ty {
        "boolean" => v.as_bool().map(Avro::Boolean),
        "double" => v.as_f64().map(Avro::Double),
        "int" => whole(v).and_then(|n| i32::try_from(n).ok()).map(Avro::Int),
        "long" => whole(v).map(Avro::Long),
        _ => Some(Avro::String(match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })),
    }
}

/// An integer, also when Salesforce sends it as `3.0`.
fn whole(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            replay_id: 42,
            kind: "updated".into(),
            created_date: "2026-11-25T12:00:00.000Z".into(),
            sobject: json!({"Id": "500A", "IsEscalated": true, "Subject": null, "Count__c": 3.0, "Amount": 1.5, "Address": {"city": "Lyon"}})
                .as_object()
                .cloned()
                .unwrap(),
        }
    }

    #[test]
    fn the_container_carries_its_schema_and_the_record() {
        let fields: Vec<(String, String)> = [
            ("Id", "id"),
            ("IsEscalated", "boolean"),
            ("Subject", "string"),
            ("Count__c", "int"),
            ("Amount", "currency"),
            ("Address", "address"),
            ("Missing__c", "double"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let s = AvroSchema::new("Case", &fields).unwrap();
        let body = s.body("Case", &event()).unwrap();
        assert_eq!(&body[..4], b"Obj\x01", "an object container");
        // Read back with no schema given: the container's own header supplies it.
        let reader = apache_avro::Reader::new(&body[..]).unwrap();
        assert!(
            reader
                .writer_schema()
                .canonical_form()
                .contains("io.edgecase.salesforce.Case")
        );
        let records: Vec<Avro> = reader.map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), 1);
        let Avro::Record(fields) = &records[0] else {
            panic!("{records:?}")
        };
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("Id"), Avro::String("500A".into()));
        assert_eq!(get("IsEscalated"), Avro::Union(1, Box::new(Avro::Boolean(true))));
        assert_eq!(get("Subject"), Avro::Union(0, Box::new(Avro::Null)));
        assert_eq!(get("Count__c"), Avro::Union(1, Box::new(Avro::Int(3))));
        assert_eq!(get("Amount"), Avro::Union(1, Box::new(Avro::Double(1.5))));
        assert_eq!(
            get("Address"),
            Avro::Union(1, Box::new(Avro::String(r#"{"city":"Lyon"}"#.into())))
        );
        assert_eq!(get("Missing__c"), Avro::Union(0, Box::new(Avro::Null)));
        assert_eq!(get("_ReplayId"), Avro::Long(42));
        assert_eq!(get("_EventType"), Avro::String("updated".into()));
    }
}
