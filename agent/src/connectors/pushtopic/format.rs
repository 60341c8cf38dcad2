//! Message bodies. `JSON`: the record's fields plus `_ObjectType`, `_EventType`,
//! `_ReplayId` and `_EventCreatedDate`. `JSON_SR`: the same payload inside Kafka Connect's
//! JSON envelope `{"schema": {...}, "payload": {...}}`, the schema built from the object's
//! describe (Salesforce types mapped to Connect types), so a consumer needs no registry.
//! `AVRO` (cargo feature `avro`): see [`super::avro`].

use super::bayeux::Event;
use super::config::OutputFormat;
use serde_json::{Map, Value, json};

/// The Connect type of a Salesforce field type.
pub fn connect_type(sf_type: &str) -> &'static str {
    match sf_type {
        "boolean" => "boolean",
        "double" | "currency" | "percent" => "double",
        "int" => "int32",
        "long" => "int64",
        _ => "string",
    }
}

/// The schema of one PushTopic's events: `fields` are (name, Salesforce type).
pub fn schema(object: &str, fields: &[(String, String)]) -> Value {
    let mut out: Vec<Value> = fields
        .iter()
        .map(|(name, t)| json!({"field": name, "type": connect_type(t), "optional": name != "Id"}))
        .collect();
    out.push(json!({"field": "_ObjectType", "type": "string", "optional": false}));
    out.push(json!({"field": "_EventType", "type": "string", "optional": false}));
    out.push(json!({"field": "_ReplayId", "type": "int64", "optional": false}));
    out.push(json!({"field": "_EventCreatedDate", "type": "string", "optional": true}));
    json!({"type": "struct", "name": format!("io.edgecase.salesforce.{object}"), "optional": false, "fields": out})
}

/// Builds the bodies of one PushTopic's events in the configured format; made once per
/// start, from the PushTopic's fields.
pub struct Encoder {
    format: OutputFormat,
    object: String,
    schema: Value,
    #[cfg(feature = "avro")]
    avro: Option<super::avro::AvroSchema>,
}

impl Encoder {
    pub fn new(format: OutputFormat, object: &str, fields: &[(String, String)]) -> Result<Encoder, String> {
        #[cfg(feature = "avro")]
        let avro = match format {
            OutputFormat::Avro => Some(super::avro::AvroSchema::new(object, fields)?),
            _ => None,
        };
        #[cfg(not(feature = "avro"))]
        if format == OutputFormat::Avro {
            return Err("output.data.format AVRO: this build has no Avro support (cargo feature `avro`)".into());
        }
        Ok(Encoder {
            format,
            object: object.to_string(),
            schema: schema(object, fields),
            #[cfg(feature = "avro")]
            avro,
        })
    }

    /// The AMQP `content_type` of the bodies.
    pub fn content_type(&self) -> &'static str {
        match self.format {
            OutputFormat::Json | OutputFormat::JsonSr => "application/json",
            OutputFormat::Avro => "avro/binary",
        }
    }

    /// The body of one event.
    pub fn body(&self, e: &Event) -> Result<Vec<u8>, String> {
        match self.format {
            OutputFormat::Json | OutputFormat::JsonSr => Ok(body(self.format, &self.object, &self.schema, e)),
            #[cfg(feature = "avro")]
            OutputFormat::Avro => match &self.avro {
                Some(a) => a.body(&self.object, e),
                None => Err("no Avro schema".into()),
            },
            #[cfg(not(feature = "avro"))]
            OutputFormat::Avro => Err("this build has no Avro support".into()),
        }
    }
}

/// The JSON message body of one event.
pub fn body(format: OutputFormat, object: &str, schema: &Value, e: &Event) -> Vec<u8> {
    let mut payload: Map<String, Value> = e
        .sobject
        .iter()
        .filter(|(k, _)| k.as_str() != "attributes")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    payload.insert("_ObjectType".into(), json!(object));
    payload.insert("_EventType".into(), json!(e.kind));
    payload.insert("_ReplayId".into(), json!(e.replay_id));
    payload.insert("_EventCreatedDate".into(), json!(e.created_date));
    let v = match format {
        OutputFormat::JsonSr => json!({"schema": schema, "payload": payload}),
        OutputFormat::Json | OutputFormat::Avro => Value::Object(payload),
    };
    v.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_json_with_schema() {
        let e = Event {
            replay_id: 9,
            kind: "updated".into(),
            created_date: "2024-01-01T00:00:00.000Z".into(),
            sobject: json!({"Id": "500A", "IsEscalated": true}).as_object().cloned().unwrap(),
        };
        let fields = vec![
            ("Id".to_string(), "id".to_string()),
            ("IsEscalated".into(), "boolean".into()),
        ];
        let s = schema("Case", &fields);
        let plain: Value = serde_json::from_slice(&body(OutputFormat::Json, "Case", &s, &e)).unwrap();
        assert_eq!(plain["_ReplayId"], 9);
        assert_eq!(plain["_EventType"], "updated");
        assert_eq!(plain["IsEscalated"], true);
        let sr: Value = serde_json::from_slice(&body(OutputFormat::JsonSr, "Case", &s, &e)).unwrap();
        assert_eq!(sr["payload"], plain);
        assert_eq!(sr["schema"]["fields"][1]["type"], "boolean");
        assert_eq!(sr["schema"]["fields"][0]["optional"], false);
    }
}
