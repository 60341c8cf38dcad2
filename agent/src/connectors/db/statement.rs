//! Statements with named placeholders (`:device_id`), turned into each driver's positional
//! parameters (pure).
//!
//! Message values are always bound as parameters, never spliced into SQL text: this module
//! rewrites only the placeholders, and it knows enough SQL lexing (quoted strings, quoted
//! identifiers, comments, PostgreSQL's `::` casts and dollar quoting) not to see a
//! placeholder inside a literal. It also writes the upsert a `database.table` setting asks
//! for, quoting the configured names as identifiers.

use std::fmt::Write as _;

/// The SQL spelling a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `$1`, `ON CONFLICT ... DO UPDATE SET c = EXCLUDED.c`, `"ident"`.
    Postgres,
    /// `?`, `ON DUPLICATE KEY UPDATE c = VALUES(c)`, `` `ident` ``, backslash escapes in strings.
    MySql,
    /// `?NNN`, `ON CONFLICT ... DO UPDATE SET c = excluded.c`, `"ident"`.
    Sqlite,
    /// `?` (ODBC); upserts in the syntax of the database behind it, if known.
    Odbc(Option<&'static Dialect>),
}

impl Dialect {
    fn upsert_style(self) -> Option<Dialect> {
        match self {
            Dialect::Odbc(inner) => inner.copied(),
            d => Some(d),
        }
    }
}

/// A statement ready for a driver: its SQL text and, for each positional parameter, the
/// field it binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub sql: String,
    pub params: Vec<String>,
}

/// Rewrites `:name` placeholders (name: letters, digits, `_`, `.`, `@`; a trailing `.` is
/// not part of it) into `dialect`'s parameters.
pub fn compile(sql: &str, dialect: Dialect) -> Result<Compiled, String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len() + 16);
    let mut params: Vec<String> = Vec::new();
    let mut i = 0;
    let n = chars.len();
    let backslash_escapes = dialect == Dialect::MySql;
    while i < n {
        let c = chars[i];
        match c {
            '\'' | '"' | '`' => {
                // A quoted string or identifier: copied as is up to its closing quote.
                let quote = c;
                out.push(c);
                i += 1;
                while i < n {
                    let d = chars[i];
                    out.push(d);
                    i += 1;
                    if d == '\\' && backslash_escapes && quote != '`' && i < n {
                        out.push(chars[i]);
                        i += 1;
                    } else if d == quote {
                        if i < n && chars[i] == quote {
                            out.push(quote);
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            '-' if i + 1 < n && chars[i + 1] == '-' => {
                while i < n && chars[i] != '\n' {
                    out.push(chars[i]);
                    i += 1;
                }
            }
            '#' if dialect == Dialect::MySql => {
                while i < n && chars[i] != '\n' {
                    out.push(chars[i]);
                    i += 1;
                }
            }
            '/' if i + 1 < n && chars[i + 1] == '*' => {
                out.push_str("/*");
                i += 2;
                while i < n && !(chars[i] == '*' && i + 1 < n && chars[i + 1] == '/') {
                    out.push(chars[i]);
                    i += 1;
                }
                if i < n {
                    out.push_str("*/");
                    i += 2;
                }
            }
            '$' if dialect == Dialect::Postgres => {
                // $1 written by hand, or a dollar-quoted string $tag$...$tag$.
                if i + 1 < n && chars[i + 1].is_ascii_digit() {
                    return Err("use :name placeholders, not $1: message values are bound by name".into());
                }
                let mut j = i + 1;
                while j < n && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                if j < n && chars[j] == '$' {
                    let tag: String = chars[i..=j].iter().collect();
                    out.push_str(&tag);
                    let rest: String = chars[j + 1..].iter().collect();
                    match rest.find(&tag) {
                        Some(end) => {
                            out.push_str(&rest[..end]);
                            out.push_str(&tag);
                            i = j + 1 + rest[..end].chars().count() + tag.chars().count();
                        }
                        None => return Err(format!("dollar-quoted string {tag} is not closed")),
                    }
                } else {
                    out.push('$');
                    i += 1;
                }
            }
            '?' if !matches!(dialect, Dialect::Postgres) => {
                return Err("use :name placeholders, not ?: message values are bound by name".into());
            }
            ':' if i + 1 < n && chars[i + 1] == ':' => {
                out.push_str("::");
                i += 2;
            }
            ':' if i + 1 < n && is_name_start(chars[i + 1]) && !(i > 0 && is_word(chars[i - 1])) => {
                let mut j = i + 1;
                while j < n && is_name_char(chars[j]) {
                    j += 1;
                }
                while chars[j - 1] == '.' {
                    j -= 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                match dialect {
                    Dialect::Postgres | Dialect::Sqlite => {
                        let pos = match params.iter().position(|p| *p == name) {
                            Some(p) => p + 1,
                            None => {
                                params.push(name);
                                params.len()
                            }
                        };
                        let sigil = if dialect == Dialect::Postgres { '$' } else { '?' };
                        let _ = write!(out, "{sigil}{pos}");
                    }
                    Dialect::MySql | Dialect::Odbc(_) => {
                        params.push(name);
                        out.push('?');
                    }
                }
                i = j;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(Compiled { sql: out, params })
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '@'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c == '.'
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `name` (or `schema.name`) as a quoted identifier.
pub fn quote_ident(name: &str, dialect: Dialect) -> String {
    let q = match dialect.upsert_style() {
        Some(Dialect::MySql) => '`',
        _ => '"',
    };
    name.split('.')
        .map(|part| format!("{q}{}{q}", part.replace(q, &format!("{q}{q}"))))
        .collect::<Vec<_>>()
        .join(".")
}

/// A column of a `database.table` write and the field that fills it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    pub column: String,
    pub field: String,
}

impl ColumnMap {
    /// `"column"` (filled from the field of the same name) or `"column = field.path"`.
    pub fn parse(s: &str) -> Result<ColumnMap, String> {
        let (column, field) = match s.split_once('=') {
            Some((c, f)) => (c.trim(), f.trim()),
            None => (s.trim(), s.trim()),
        };
        if column.is_empty() || field.is_empty() {
            return Err(format!("{s:?}: want \"column\" or \"column = field\""));
        }
        if !field.chars().all(is_name_char) || !field.starts_with(is_name_start) {
            return Err(format!(
                "{s:?}: field {field:?} may hold only letters, digits, _, . and @"
            ));
        }
        Ok(ColumnMap {
            column: column.to_string(),
            field: field.to_string(),
        })
    }
}

/// The statement a `database.table` write runs for each record: an insert that, with a key
/// column, updates the row of a key already there (so a redelivered message changes
/// nothing). The key is bound from the `_key` field.
pub fn table_upsert(table: &str, key_column: Option<&str>, columns: &[ColumnMap], dialect: Dialect) -> String {
    let q = |n: &str| quote_ident(n, dialect);
    let mut names = Vec::new();
    let mut values = Vec::new();
    if let Some(k) = key_column {
        names.push(q(k));
        values.push(":_key".to_string());
    }
    let others: Vec<&ColumnMap> = columns
        .iter()
        .filter(|c| Some(c.column.as_str()) != key_column)
        .collect();
    for c in &others {
        names.push(q(&c.column));
        values.push(format!(":{}", c.field));
    }
    let mut sql = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        q(table),
        names.join(", "),
        values.join(", ")
    );
    let Some(k) = key_column else { return sql };
    match dialect.upsert_style() {
        Some(Dialect::MySql) => {
            let sets: Vec<String> = if others.is_empty() {
                vec![format!("{} = {}", q(k), q(k))]
            } else {
                others
                    .iter()
                    .map(|c| format!("{0} = VALUES({0})", q(&c.column)))
                    .collect()
            };
            let _ = write!(sql, " ON DUPLICATE KEY UPDATE {}", sets.join(", "));
        }
        Some(_) => {
            if others.is_empty() {
                let _ = write!(sql, " ON CONFLICT ({}) DO NOTHING", q(k));
            } else {
                let sets: Vec<String> = others
                    .iter()
                    .map(|c| format!("{0} = excluded.{0}", q(&c.column)))
                    .collect();
                let _ = write!(sql, " ON CONFLICT ({}) DO UPDATE SET {}", q(k), sets.join(", "));
            }
        }
        // An ODBC database of unknown dialect: a plain insert; a redelivery then fails on
        // the key's unique constraint, which the writer counts as already written.
        None => {}
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_positional_and_repeat_in_postgres() {
        let c = compile(
            "INSERT INTO t (a, b) VALUES (:device_id, :value::numeric) ON CONFLICT (a) DO UPDATE SET b = :value",
            Dialect::Postgres,
        )
        .unwrap();
        assert_eq!(
            c.sql,
            "INSERT INTO t (a, b) VALUES ($1, $2::numeric) ON CONFLICT (a) DO UPDATE SET b = $2"
        );
        assert_eq!(c.params, vec!["device_id", "value"]);
    }

    #[test]
    fn mysql_and_sqlite_spellings() {
        let m = compile("UPDATE t SET a = :x, b = :y WHERE k = :x", Dialect::MySql).unwrap();
        assert_eq!(m.sql, "UPDATE t SET a = ?, b = ? WHERE k = ?");
        assert_eq!(m.params, vec!["x", "y", "x"]);
        let s = compile("UPDATE t SET a = :x, b = :y WHERE k = :x", Dialect::Sqlite).unwrap();
        assert_eq!(s.sql, "UPDATE t SET a = ?1, b = ?2 WHERE k = ?1");
        assert_eq!(s.params, vec!["x", "y"]);
    }

    #[test]
    fn literals_comments_and_casts_are_left_alone() {
        let sql =
            "SELECT ':no', \"col:x\", 'it''s :no', $tag$ :no $tag$, x::text /* :no */ -- :no\n, :loc.site. FROM t";
        let c = compile(sql, Dialect::Postgres).unwrap();
        assert_eq!(
            c.sql,
            "SELECT ':no', \"col:x\", 'it''s :no', $tag$ :no $tag$, x::text /* :no */ -- :no\n, $1. FROM t"
        );
        assert_eq!(c.params, vec!["loc.site"]);
        let m = compile(r"SELECT 'a\' :no', `b:c`, :@id # :no", Dialect::MySql).unwrap();
        assert_eq!(m.sql, r"SELECT 'a\' :no', `b:c`, ? # :no");
        assert_eq!(m.params, vec!["@id"]);
    }

    #[test]
    fn hand_written_positional_parameters_are_refused() {
        assert!(compile("SELECT $1", Dialect::Postgres).is_err());
        assert!(compile("SELECT ?", Dialect::MySql).is_err());
        assert!(compile("SELECT '?'", Dialect::MySql).is_ok());
    }

    #[test]
    fn table_upserts_per_dialect() {
        let cols = vec![
            ColumnMap::parse("device_id").unwrap(),
            ColumnMap::parse("reading = value").unwrap(),
        ];
        assert_eq!(
            table_upsert("public.readings", Some("message_id"), &cols, Dialect::Postgres),
            "INSERT INTO \"public\".\"readings\" (\"message_id\", \"device_id\", \"reading\") VALUES (:_key, :device_id, :value) ON CONFLICT (\"message_id\") DO UPDATE SET \"device_id\" = excluded.\"device_id\", \"reading\" = excluded.\"reading\""
        );
        assert_eq!(
            table_upsert("readings", Some("message_id"), &cols, Dialect::MySql),
            "INSERT INTO `readings` (`message_id`, `device_id`, `reading`) VALUES (:_key, :device_id, :value) ON DUPLICATE KEY UPDATE `device_id` = VALUES(`device_id`), `reading` = VALUES(`reading`)"
        );
        assert_eq!(
            table_upsert("r", None, &cols, Dialect::Sqlite),
            "INSERT INTO \"r\" (\"device_id\", \"reading\") VALUES (:device_id, :value)"
        );
        assert_eq!(quote_ident("we\"ird", Dialect::Postgres), "\"we\"\"ird\"");
        assert!(ColumnMap::parse("a = b; DROP").is_err());
    }
}
