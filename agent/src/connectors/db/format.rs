//! Rows to messages and messages to records, in delimited text, JSON and XML (pure).
//!
//! The mapping, documented for users in `docs/db-connector.md`:
//!
//! - **Out** (select-and-send): one message per row. Delimited: the row's values in column
//!   order on one line (`format.header` adds a line of column names before it); JSON: one
//!   object, keys in column order; XML: `<row><col>value</col>...</row>`. NULL is an empty
//!   field (delimited, or `format.null`), `null` (JSON), `<col null="true"/>` (XML).
//! - **In** (get-and-write, subscribe-and-write): a message becomes one or more records, each
//!   a flat map from a field path to a value, which statements name as `:path`.
//!   Delimited: each line is a record; fields are named by `format.columns`, by the header
//!   line (`format.header`), and always by position `1`, `2`, ... JSON: an object is one
//!   record and an array is one record per element; nested objects give dotted paths
//!   (`location.site`), array elements indexed paths (`tags.0`), and a nested object or
//!   array is also available whole, as JSON text. XML: the root element is the record;
//!   attributes are `@name`, child elements `name`, nested ones `outer.inner`, attributes of
//!   children `name.@attr`; a repeated element is `name` (the first) and `name.0`,
//!   `name.1`, .... With `format.records = "path"` the elements (XML) or array items (JSON)
//!   at that path are the records, and the rest of the document (the envelope) is
//!   available to each of them.
//!
//! Everything here is a pure function of bytes and settings, so it is tested without
//! databases or brokers.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A value taken from a message, bound to a statement parameter. Delimited text and XML
/// give only text (the database converts it to the column's type); JSON keeps its types.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Value {
    /// The value as text, as PostgreSQL's text input format and the ODBC binding take it.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Text(s) => Some(s.clone()),
        }
    }
}

/// One record: field path → value.
pub type Record = BTreeMap<String, Value>;

/// A value read from a database row, typed as the database reported it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// An exact decimal (NUMERIC/DECIMAL), as its text; a JSON number when sent as JSON.
    Decimal(String),
    Text(String),
    /// A JSON column's document, as JSON text; embedded as JSON when sent as JSON.
    Json(String),
    Bytes(Vec<u8>),
}

impl Cell {
    /// The cell as text: what delimited text and XML carry. Bytes are lowercase hex.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Cell::Null => None,
            Cell::Bool(b) => Some(b.to_string()),
            Cell::Int(i) => Some(i.to_string()),
            Cell::Float(f) => Some(f.to_string()),
            Cell::Decimal(s) | Cell::Text(s) | Cell::Json(s) => Some(s.clone()),
            Cell::Bytes(b) => Some(hex(b)),
        }
    }

    /// The cell as a JSON value (for the tracking state file and JSON messages).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Cell::Null => J::Null,
            Cell::Bool(b) => J::Bool(*b),
            Cell::Int(i) => J::from(*i),
            Cell::Float(f) => serde_json::Number::from_f64(*f).map_or_else(|| J::String(f.to_string()), J::Number),
            Cell::Decimal(s) => s
                .parse::<serde_json::Number>()
                .map_or_else(|_| J::String(s.clone()), J::Number),
            Cell::Text(s) => J::String(s.clone()),
            Cell::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| J::String(s.clone())),
            Cell::Bytes(b) => J::String(hex(b)),
        }
    }

    /// The cell as a statement parameter (the tracking column's last value).
    pub fn to_value(&self) -> Value {
        match self {
            Cell::Null => Value::Null,
            Cell::Bool(b) => Value::Bool(*b),
            Cell::Int(i) => Value::Int(*i),
            Cell::Float(f) => Value::Float(*f),
            other => Value::Text(other.to_text().unwrap_or_default()),
        }
    }
}

/// Rows of a query: column names and values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

/// Which text a message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatKind {
    /// Delimited text (CSV and its kin): any single-character delimiter, quoting.
    Delimited,
    #[default]
    Json,
    Xml,
}

/// What a statement gets for a field the message does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingField {
    /// Bind NULL (the column's constraints decide).
    #[default]
    Null,
    /// Dead-letter the message, naming the field.
    Reject,
}

/// The `format` section: how rows and messages map onto each other.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FormatConfig {
    /// `delimited`, `json` or `xml`.
    #[serde(rename = "type", alias = "kind")]
    pub kind: FormatKind,
    /// Delimited text: the delimiter, one character (`,`, `|`, `;`, `\t` ...).
    pub delimiter: String,
    /// Delimited text: the quote character; a quote inside a quoted field is doubled.
    pub quote: String,
    /// Delimited text: a first line of column names (written out; read in, it names the fields).
    pub header: bool,
    /// Delimited text read in: the names of the fields, in order (beside `1`, `2`, ...).
    pub columns: Vec<String>,
    /// Delimited text: the field text that means NULL, both ways.
    pub null: String,
    /// XML written out: the name of each row's element.
    pub root: String,
    /// JSON and XML read in: the dotted path of the records inside each message (an array
    /// in JSON, repeated elements below the root in XML). Unset: the message is one record
    /// (or, for a JSON array, one per element).
    pub records: Option<String>,
    /// A field a statement names but the message lacks: `null` or `reject`.
    pub missing: MissingField,
}

impl Default for FormatConfig {
    fn default() -> Self {
        FormatConfig {
            kind: FormatKind::Json,
            delimiter: ",".into(),
            quote: "\"".into(),
            header: false,
            columns: Vec::new(),
            null: String::new(),
            root: "row".into(),
            records: None,
            missing: MissingField::Null,
        }
    }
}

impl FormatConfig {
    /// Every problem, each naming its key under `prefix` (e.g. `connector.db.format`).
    pub fn validate(&self, prefix: &str, p: &mut Vec<String>) {
        if self.kind == FormatKind::Delimited {
            for (key, v) in [("delimiter", &self.delimiter), ("quote", &self.quote)] {
                if single_byte(v).is_none() {
                    p.push(format!(
                        "{prefix}.{key}: {v:?} must be exactly one ASCII character (\\t for a tab)"
                    ));
                }
            }
            if self.delimiter == self.quote {
                p.push(format!("{prefix}.quote: must differ from the delimiter"));
            }
        }
        if self.kind == FormatKind::Xml && !is_xml_name(&self.root) {
            p.push(format!("{prefix}.root: {:?} is not an XML element name", self.root));
        }
        if let Some(r) = &self.records {
            if self.kind == FormatKind::Delimited {
                p.push(format!(
                    "{prefix}.records: applies to json and xml only (each delimited line is a record)"
                ));
            } else if r.split('.').any(str::is_empty) {
                p.push(format!(
                    "{prefix}.records: {r:?} is not a dotted path such as `items.item`"
                ));
            }
        }
    }

    fn delimiter_byte(&self) -> u8 {
        single_byte(&self.delimiter).unwrap_or(b',')
    }

    fn quote_byte(&self) -> u8 {
        single_byte(&self.quote).unwrap_or(b'"')
    }

    /// The MIME type of the messages this format makes.
    pub fn content_type(&self) -> &'static str {
        match self.kind {
            FormatKind::Delimited => "text/plain; charset=utf-8",
            FormatKind::Json => "application/json",
            FormatKind::Xml => "application/xml",
        }
    }
}

/// `","` → `b','`; `"\t"` (a real tab, or the two characters) → `b'\t'`.
fn single_byte(s: &str) -> Option<u8> {
    match s {
        "\\t" | "tab" => Some(b'\t'),
        _ if s.len() == 1 && s.is_ascii() => Some(s.as_bytes()[0]),
        _ => None,
    }
}

/// Why a message cannot be read: dead-letter it with this reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

fn err(msg: impl Into<String>) -> FormatError {
    FormatError(msg.into())
}

/// One row as a message body.
pub fn encode_row(cfg: &FormatConfig, columns: &[String], row: &[Cell]) -> Result<Vec<u8>, FormatError> {
    match cfg.kind {
        FormatKind::Delimited => {
            let mut w = csv::WriterBuilder::new()
                .delimiter(cfg.delimiter_byte())
                .quote(cfg.quote_byte())
                .terminator(csv::Terminator::Any(b'\n'))
                .from_writer(Vec::new());
            if cfg.header {
                w.write_record(columns).map_err(|e| err(e.to_string()))?;
            }
            let fields: Vec<String> = row
                .iter()
                .map(|c| c.to_text().unwrap_or_else(|| cfg.null.clone()))
                .collect();
            w.write_record(&fields).map_err(|e| err(e.to_string()))?;
            let mut out = w.into_inner().map_err(|e| err(e.to_string()))?;
            if out.last() == Some(&b'\n') {
                out.pop();
            }
            Ok(out)
        }
        FormatKind::Json => {
            // Written by hand to keep the column order (serde_json's map sorts keys).
            let mut s = String::from("{");
            for (i, (name, cell)) in columns.iter().zip(row).enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(&serde_json::Value::String(name.clone()).to_string());
                s.push(':');
                match cell {
                    // Exactly as the database gave it: 12.50 stays 12.50, not a float.
                    Cell::Decimal(d) if d.parse::<serde_json::Number>().is_ok() => s.push_str(d),
                    _ => s.push_str(&cell.to_json().to_string()),
                }
            }
            s.push('}');
            Ok(s.into_bytes())
        }
        FormatKind::Xml => {
            let root = xml_name(&cfg.root);
            let mut s = format!("<{root}>");
            for (name, cell) in columns.iter().zip(row) {
                let name = xml_name(name);
                match cell.to_text() {
                    None => {
                        let _ = write!(s, "<{name} null=\"true\"/>");
                    }
                    Some(text) => {
                        let _ = write!(s, "<{name}>{}</{name}>", quick_xml::escape::escape(text.as_str()));
                    }
                }
            }
            let _ = write!(s, "</{root}>");
            Ok(s.into_bytes())
        }
    }
}

/// A message body as records. An empty result is an error: the message holds nothing.
pub fn decode_message(cfg: &FormatConfig, body: &[u8]) -> Result<Vec<Record>, FormatError> {
    let text = std::str::from_utf8(body).map_err(|e| err(format!("message is not valid UTF-8 text ({e})")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let records = match cfg.kind {
        FormatKind::Delimited => decode_delimited(cfg, text)?,
        FormatKind::Json => decode_json(cfg, text)?,
        FormatKind::Xml => decode_xml(cfg, text)?,
    };
    if records.is_empty() {
        return Err(err("message holds no record"));
    }
    Ok(records)
}

fn decode_delimited(cfg: &FormatConfig, text: &str) -> Result<Vec<Record>, FormatError> {
    let mut r = csv::ReaderBuilder::new()
        .delimiter(cfg.delimiter_byte())
        .quote(cfg.quote_byte())
        .has_headers(cfg.header)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = if cfg.header {
        r.headers()
            .map_err(|e| err(format!("header line: {e}")))?
            .iter()
            .map(str::to_string)
            .collect()
    } else {
        cfg.columns.clone()
    };
    let mut out = Vec::new();
    for (n, line) in r.records().enumerate() {
        let line = line.map_err(|e| err(format!("delimited text, record {}: {e}", n + 1)))?;
        if !header.is_empty() && line.len() != header.len() {
            return Err(err(format!(
                "delimited text, record {}: {} fields, want {} ({})",
                n + 1,
                line.len(),
                header.len(),
                header.join(&cfg.delimiter)
            )));
        }
        let mut rec = Record::new();
        for (i, field) in line.iter().enumerate() {
            let v = if field == cfg.null {
                Value::Null
            } else {
                Value::Text(field.to_string())
            };
            if let Some(name) = header.get(i) {
                rec.insert(name.clone(), v.clone());
            }
            rec.insert((i + 1).to_string(), v);
        }
        out.push(rec);
    }
    Ok(out)
}

fn decode_json(cfg: &FormatConfig, text: &str) -> Result<Vec<Record>, FormatError> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let Some(path) = &cfg.records else {
        return match doc {
            serde_json::Value::Object(_) => {
                let mut rec = Record::new();
                flatten_json("", &doc, &mut rec);
                Ok(vec![rec])
            }
            serde_json::Value::Array(items) => items.iter().map(|item| json_record(&Record::new(), item)).collect(),
            other => Err(err(format!(
                "JSON message is {}, want an object (one record) or an array of objects",
                crate::reading::json_type(&other)
            ))),
        };
    };
    let segments: Vec<&str> = path.split('.').collect();
    let mut at = &doc;
    for seg in &segments {
        at = match at {
            serde_json::Value::Object(m) => m.get(*seg),
            serde_json::Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| err(format!("JSON message has no `{path}` (format.records)")))?;
    }
    let serde_json::Value::Array(items) = at else {
        return Err(err(format!(
            "`{path}` is {}, want an array of records",
            crate::reading::json_type(at)
        )));
    };
    // The envelope: everything but the records' top-level branch.
    let mut envelope = Record::new();
    if let serde_json::Value::Object(m) = &doc {
        for (k, v) in m {
            if k != segments[0] {
                flatten_json(k, v, &mut envelope);
            }
        }
    }
    items.iter().map(|item| json_record(&envelope, item)).collect()
}

fn json_record(envelope: &Record, item: &serde_json::Value) -> Result<Record, FormatError> {
    let mut rec = envelope.clone();
    match item {
        serde_json::Value::Object(_) => flatten_json("", item, &mut rec),
        serde_json::Value::Array(_) => return Err(err("a record is an array; want an object")),
        scalar => flatten_json("_item", scalar, &mut rec),
    }
    Ok(rec)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn flatten_json(path: &str, v: &serde_json::Value, rec: &mut Record) {
    use serde_json::Value as J;
    match v {
        J::Null => {
            rec.insert(path.to_string(), Value::Null);
        }
        J::Bool(b) => {
            rec.insert(path.to_string(), Value::Bool(*b));
        }
        J::Number(n) => {
            let value = if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if n.is_u64() {
                Value::Text(n.to_string())
            } else {
                n.as_f64().map_or_else(|| Value::Text(n.to_string()), Value::Float)
            };
            rec.insert(path.to_string(), value);
        }
        J::String(s) => {
            rec.insert(path.to_string(), Value::Text(s.clone()));
        }
        J::Object(m) => {
            if !path.is_empty() {
                rec.insert(path.to_string(), Value::Text(v.to_string()));
            }
            for (k, child) in m {
                flatten_json(&join(path, k), child, rec);
            }
        }
        J::Array(a) => {
            if !path.is_empty() {
                rec.insert(path.to_string(), Value::Text(v.to_string()));
            }
            for (i, child) in a.iter().enumerate() {
                flatten_json(&join(path, &i.to_string()), child, rec);
            }
        }
    }
}

/// A parsed XML element: just what the mapping needs.
#[derive(Debug, Default)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
}

fn parse_xml(text: &str) -> Result<Element, FormatError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let bad = |e: &dyn std::fmt::Display, pos: u64| err(format!("invalid XML at byte {pos}: {e}"));
    loop {
        let pos = reader.buffer_position();
        let event = reader.read_event().map_err(|e| bad(&e, pos))?;
        match event {
            Event::Start(s) | Event::Empty(s) if root.is_some() => {
                let _ = s;
                return Err(err("invalid XML: more than one root element"));
            }
            Event::Start(s) => stack.push(element(&s, pos)?),
            Event::Empty(s) => {
                let el = element(&s, pos)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let Some(el) = stack.pop() else {
                    return Err(err("invalid XML: unbalanced end tag"));
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&t.xml10_content());
                } else if !t.trim().is_empty() {
                    return Err(err("invalid XML: text outside the root element"));
                }
            }
            Event::CData(c) => {
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&c.into_inner());
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => quick_xml::escape::resolve_predefined_entity(&r)
                        .ok_or_else(|| err(format!("invalid XML: unknown entity &{};", &*r)))?
                        .to_string(),
                    Err(e) => return Err(bad(&e, pos)),
                };
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&resolved);
                }
            }
            Event::DocType(_) => return Err(err("XML with a DOCTYPE is not accepted (entity expansion)")),
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(err(format!(
            "invalid XML: element <{}> is not closed",
            stack[stack.len() - 1].name
        )));
    }
    root.ok_or_else(|| err("invalid XML: no root element"))
}

fn element(s: &quick_xml::events::BytesStart<'_>, pos: u64) -> Result<Element, FormatError> {
    let mut attrs = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(|e| err(format!("invalid XML attribute at byte {pos}: {e}")))?;
        let key = a.key.local_name().as_ref().to_string();
        if a.key.as_ref().starts_with("xmlns") {
            continue;
        }
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| err(format!("invalid XML attribute {key} at byte {pos}: {e}")))?;
        attrs.push((key, value.into_owned()));
    }
    Ok(Element {
        name: s.local_name().as_ref().to_string(),
        attrs,
        children: Vec::new(),
        text: String::new(),
    })
}

/// Adds `el`'s fields under `path` (its own text at `path`, unless `path` is empty).
fn flatten_xml(path: &str, el: &Element, skip_child: Option<&str>, rec: &mut Record) {
    let null = el.attrs.iter().any(|(k, v)| k == "null" && v == "true");
    if !path.is_empty() {
        let value = if null {
            Value::Null
        } else if el.children.is_empty() {
            Value::Text(el.text.clone())
        } else {
            let t = el.text.trim();
            if t.is_empty() {
                Value::Null
            } else {
                Value::Text(t.to_string())
            }
        };
        rec.insert(path.to_string(), value);
    } else if el.children.is_empty() && !el.text.trim().is_empty() {
        rec.insert("_text".into(), Value::Text(el.text.clone()));
    }
    for (k, v) in &el.attrs {
        rec.insert(join(path, &format!("@{k}")), Value::Text(v.clone()));
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for child in &el.children {
        if Some(child.name.as_str()) == skip_child {
            continue;
        }
        let n = seen.entry(child.name.as_str()).or_insert(0);
        let index = *n;
        *n += 1;
        let repeated = el.children.iter().filter(|c| c.name == child.name).count() > 1;
        let base = join(path, &child.name);
        if index == 0 {
            flatten_xml(&base, child, None, rec);
        }
        if repeated {
            flatten_xml(&join(&base, &index.to_string()), child, None, rec);
        }
    }
}

fn decode_xml(cfg: &FormatConfig, text: &str) -> Result<Vec<Record>, FormatError> {
    let root = parse_xml(text)?;
    let Some(path) = &cfg.records else {
        let mut rec = Record::new();
        flatten_xml("", &root, None, &mut rec);
        return Ok(vec![rec]);
    };
    let segments: Vec<&str> = path.split('.').collect();
    let mut envelope = Record::new();
    flatten_xml("", &root, Some(segments[0]), &mut envelope);
    let mut level: Vec<&Element> = vec![&root];
    for seg in &segments {
        level = level
            .iter()
            .flat_map(|e| e.children.iter().filter(|c| c.name == *seg))
            .collect();
    }
    Ok(level
        .into_iter()
        .map(|el| {
            let mut rec = envelope.clone();
            flatten_xml("", el, None, &mut rec);
            rec
        })
        .collect())
}

/// Whether `s` can be an XML element name as it is.
fn is_xml_name(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.')) && !s.to_ascii_lowercase().starts_with("xml")
}

/// A column name as an element name: characters XML does not allow become `_`.
fn xml_name(s: &str) -> String {
    if is_xml_name(s) {
        return s.to_string();
    }
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_alphabetic() || c == '_') || out.to_ascii_lowercase().starts_with("xml") {
        out.insert(0, '_');
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: FormatKind) -> FormatConfig {
        FormatConfig {
            kind,
            ..FormatConfig::default()
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn delimited_with_pipe_and_quotes_round_trips() {
        let mut c = cfg(FormatKind::Delimited);
        c.delimiter = "|".into();
        c.columns = cols(&["id", "name", "note"]);
        let row = vec![Cell::Int(7), Cell::Text("Zoë | \"the\" boss".into()), Cell::Null];
        let body = encode_row(&c, &c.columns, &row).unwrap();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            "7|\"Zoë | \"\"the\"\" boss\"|"
        );
        let recs = decode_message(&c, &body).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["id"], text("7"));
        assert_eq!(recs[0]["name"], text("Zoë | \"the\" boss"));
        assert_eq!(recs[0]["note"], Value::Null);
        assert_eq!(recs[0]["2"], text("Zoë | \"the\" boss"));
    }

    #[test]
    fn delimited_tab_header_and_several_lines() {
        let mut c = cfg(FormatKind::Delimited);
        c.delimiter = "\\t".into();
        c.header = true;
        let recs = decode_message(&c, "device\tvalue\nb-1\t1.5\nb-2\t\"2,5\"\n".as_bytes()).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1]["device"], text("b-2"));
        assert_eq!(recs[1]["value"], text("2,5"));
        let out = encode_row(&c, &cols(&["a", "b"]), &[Cell::Int(1), Cell::Text("x y".into())]).unwrap();
        assert_eq!(out, b"a\tb\n1\tx y");
    }

    #[test]
    fn delimited_field_count_must_match_the_header() {
        let mut c = cfg(FormatKind::Delimited);
        c.columns = cols(&["a", "b"]);
        let e = decode_message(&c, b"1,2,3").unwrap_err();
        assert!(e.0.contains("3 fields, want 2"), "{e}");
    }

    #[test]
    fn json_row_keeps_column_order_and_types() {
        let c = cfg(FormatKind::Json);
        let row = vec![
            Cell::Int(2),
            Cell::Decimal("12.50".into()),
            Cell::Text("añ \"q\"".into()),
            Cell::Null,
            Cell::Json("{\"a\":[1,2]}".into()),
            Cell::Bool(true),
        ];
        let body = encode_row(&c, &cols(&["z", "price", "name", "n", "doc", "ok"]), &row).unwrap();
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"z":2,"price":12.50,"name":"añ \"q\"","n":null,"doc":{"a":[1,2]},"ok":true}"#
        );
    }

    #[test]
    fn json_nested_and_arrays_flatten_to_paths() {
        let c = cfg(FormatKind::Json);
        let recs = decode_message(
            &c,
            r#"{"id": 1, "v": 2.5, "big": 18446744073709551615, "loc": {"site": "Plant Å"}, "tags": ["a", "b"], "n": null}"#
                .as_bytes(),
        )
        .unwrap();
        let r = &recs[0];
        assert_eq!(r["id"], Value::Int(1));
        assert_eq!(r["v"], Value::Float(2.5));
        assert_eq!(r["big"], text("18446744073709551615"));
        assert_eq!(r["loc.site"], text("Plant Å"));
        assert_eq!(r["loc"], text(r#"{"site":"Plant Å"}"#));
        assert_eq!(r["tags.1"], text("b"));
        assert_eq!(r["n"], Value::Null);
    }

    #[test]
    fn json_array_and_records_path_give_several_records() {
        let c = cfg(FormatKind::Json);
        assert_eq!(decode_message(&c, br#"[{"a":1},{"a":2}]"#).unwrap().len(), 2);
        let mut c = cfg(FormatKind::Json);
        c.records = Some("order.lines".into());
        let recs = decode_message(
            &c,
            br#"{"order": {"lines": [{"sku": "x", "qty": 1}, {"sku": "y", "qty": 2}]}, "customer": "ACME"}"#,
        )
        .unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1]["sku"], text("y"));
        assert_eq!(recs[1]["customer"], text("ACME"));
        let e = decode_message(&c, br#"{"order": {}}"#).unwrap_err();
        assert!(e.0.contains("no `order.lines`"), "{e}");
    }

    #[test]
    fn bad_json_is_reported() {
        let c = cfg(FormatKind::Json);
        assert!(
            decode_message(&c, b"{\"a\":")
                .unwrap_err()
                .0
                .starts_with("invalid JSON")
        );
        assert!(decode_message(&c, b"42").unwrap_err().0.contains("a number"));
        assert!(decode_message(&c, b"[]").unwrap_err().0.contains("no record"));
        assert!(decode_message(&c, &[0xff, 0xfe]).unwrap_err().0.contains("UTF-8"));
    }

    #[test]
    fn xml_attributes_nested_elements_and_entities() {
        let c = cfg(FormatKind::Xml);
        let body = r#"<?xml version="1.0"?>
            <reading id="7" xmlns:x="urn:x">
              <device>boiler &amp; co &#x263A;</device>
              <value unit="°C">81.5</value>
              <location><site>Plant Ä</site><x:floor>2</x:floor></location>
              <tag>a</tag><tag>b</tag>
              <empty/>
              <gone null="true"/>
              <note><![CDATA[<raw> & stuff]]></note>
            </reading>"#;
        let r = &decode_message(&c, body.as_bytes()).unwrap()[0];
        assert_eq!(r["@id"], text("7"));
        assert_eq!(r["device"], text("boiler & co ☺"));
        assert_eq!(r["value"], text("81.5"));
        assert_eq!(r["value.@unit"], text("°C"));
        assert_eq!(r["location.site"], text("Plant Ä"));
        assert_eq!(r["location.floor"], text("2"));
        assert_eq!(r["tag"], text("a"));
        assert_eq!(r["tag.1"], text("b"));
        assert_eq!(r["empty"], text(""));
        assert_eq!(r["gone"], Value::Null);
        assert_eq!(r["note"], text("<raw> & stuff"));
    }

    #[test]
    fn xml_records_path_with_envelope() {
        let mut c = cfg(FormatKind::Xml);
        c.records = Some("items.item".into());
        let body = br#"<order no="A-1"><customer>ACME</customer><items><item sku="x"><qty>1</qty></item><item sku="y"><qty>2</qty></item></items></order>"#;
        let recs = decode_message(&c, body).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1]["@sku"], text("y"));
        assert_eq!(recs[1]["qty"], text("2"));
        assert_eq!(recs[1]["@no"], text("A-1"));
        assert_eq!(recs[1]["customer"], text("ACME"));
        assert!(!recs[1].contains_key("items"));
    }

    #[test]
    fn bad_xml_is_reported() {
        let c = cfg(FormatKind::Xml);
        for bad in [
            "<a><b></a>",
            "<a>",
            "<a/><b/>",
            "<a>&foo;</a>",
            "<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
            "",
        ] {
            assert!(decode_message(&c, bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn xml_row_escapes_and_marks_null() {
        let mut c = cfg(FormatKind::Xml);
        c.root = "reading".into();
        let body = encode_row(
            &c,
            &cols(&["id", "note", "count(*)", "n"]),
            &[Cell::Int(1), Cell::Text("a<b & \"ü\"".into()), Cell::Int(3), Cell::Null],
        )
        .unwrap();
        let s = String::from_utf8(body.clone()).unwrap();
        assert_eq!(
            s,
            "<reading><id>1</id><note>a&lt;b &amp; &quot;ü&quot;</note><count___>3</count___><n null=\"true\"/></reading>"
        );
        let r = &decode_message(&c, &body).unwrap()[0];
        assert_eq!(r["note"], text("a<b & \"ü\""));
        assert_eq!(r["n"], Value::Null);
    }

    #[test]
    fn validation_names_keys() {
        let mut c = cfg(FormatKind::Delimited);
        c.delimiter = "||".into();
        let mut p = Vec::new();
        c.validate("connector.db.format", &mut p);
        assert!(p[0].starts_with("connector.db.format.delimiter"), "{p:?}");
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            for kind in [FormatKind::Delimited, FormatKind::Json, FormatKind::Xml] {
                let _ = decode_message(&cfg(kind), &bytes);
            }
        }

        #[test]
        fn delimited_text_round_trips(fields in proptest::collection::vec("[a-zA-Z0-9 ,;|\"'é☺\\n]{1,12}", 1..6)) {
            let mut c = cfg(FormatKind::Delimited);
            c.delimiter = ";".into();
            let columns: Vec<String> = (0..fields.len()).map(|i| format!("c{i}")).collect();
            c.columns = columns.clone();
            let row: Vec<Cell> = fields.iter().map(|f| Cell::Text(f.clone())).collect();
            let body = encode_row(&c, &columns, &row).unwrap();
            let recs = decode_message(&c, &body).unwrap();
            proptest::prop_assert_eq!(recs.len(), 1);
            for (i, f) in fields.iter().enumerate() {
                proptest::prop_assert_eq!(&recs[0][&columns[i]], &Value::Text(f.clone()));
            }
        }
    }
}
