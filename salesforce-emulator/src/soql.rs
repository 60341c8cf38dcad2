//! The SOQL subset the emulator answers, parsed into a [`Query`] and evaluated over records.
//!
//! Supported, case-insensitive keywords:
//!
//! ```text
//! SELECT field, field, ... | COUNT()
//! FROM Object
//! [WHERE cond { AND | OR cond }]         -- AND binds tighter than OR; NOT and parentheses work
//! [ORDER BY field [ASC|DESC] [NULLS FIRST|LAST], ...]
//! [LIMIT n] [OFFSET n]
//! cond := field { = | != | <> | < | <= | > | >= } literal
//!       | field [NOT] LIKE 'pattern'          -- % and _ wildcards, case-insensitive
//!       | field [NOT] IN (literal, ...)
//! literal := 'text' (backslash escapes) | number | true | false | null
//! ```
//!
//! Not supported (answered with `MALFORMED_QUERY`): relationship fields (`Owner.Name`),
//! subqueries, aggregate functions other than `COUNT()`, `GROUP BY`, date literals such as
//! `TODAY`, bind variables. String comparisons are case-insensitive, as in Salesforce.

use serde_json::Value;
use std::cmp::Ordering;

#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    Fields(Vec<String>),
    Count,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub selection: Selection,
    pub object: String,
    pub filter: Option<Expr>,
    pub order: Vec<(String, bool, bool)>, // field, descending, nulls_last
    pub limit: Option<usize>,
    pub offset: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(String, Op, Value),
    Like(String, String, bool),
    In(String, Vec<Value>, bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Num(f64),
    Sym(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut text = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string literal".into()),
                    Some('\\') => {
                        let e = chars.get(i + 1).ok_or("unterminated escape")?;
                        text.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => *other,
                        });
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        text.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(text));
        } else if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Tok::Num(text.parse().map_err(|_| format!("bad number {text}"))?));
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Word(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let sym = match two.as_str() {
                "!=" => Some("!="),
                "<>" => Some("!="),
                "<=" => Some("<="),
                ">=" => Some(">="),
                _ => None,
            };
            if let Some(s) = sym {
                out.push(Tok::Sym(s));
                i += 2;
                continue;
            }
            let sym = match c {
                '(' => "(",
                ')' => ")",
                ',' => ",",
                '=' => "=",
                '<' => "<",
                '>' => ">",
                other => return Err(format!("unexpected character '{other}'")),
            };
            out.push(Tok::Sym(sym));
            i += 1;
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_kw(&mut self, kw: &str) -> Result<(), String> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(format!("expecting {kw}, found {}", self.found()))
        }
    }
    fn eat_sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn found(&self) -> String {
        match self.peek() {
            None => "end of query".into(),
            Some(Tok::Word(w)) => format!("'{w}'"),
            Some(Tok::Str(s)) => format!("'{s}'"),
            Some(Tok::Num(n)) => n.to_string(),
            Some(Tok::Sym(s)) => format!("'{s}'"),
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Word(w)) if !is_reserved(&w) => {
                if w.contains('.') {
                    Err(format!("relationship field {w} is not supported by the emulator"))
                } else {
                    Ok(w)
                }
            }
            _ => {
                self.pos -= 1;
                Err(format!("expecting a field name, found {}", self.found()))
            }
        }
    }
    fn literal(&mut self) -> Result<Value, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Value::String(s)),
            Some(Tok::Num(n)) => Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => Ok(Value::Bool(true)),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => Ok(Value::Bool(false)),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => Ok(Value::Null),
            _ => {
                self.pos -= 1;
                Err(format!("expecting a literal value, found {}", self.found()))
            }
        }
    }

    fn or_expr(&mut self) -> Result<Expr, String> {
        let mut left = self.and_expr()?;
        while self.eat_kw("OR") {
            let right = self.and_expr()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn and_expr(&mut self) -> Result<Expr, String> {
        let mut left = self.term()?;
        while self.eat_kw("AND") {
            let right = self.term()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn term(&mut self) -> Result<Expr, String> {
        if self.eat_kw("NOT") {
            return Ok(Expr::Not(Box::new(self.term()?)));
        }
        if self.eat_sym("(") {
            let e = self.or_expr()?;
            if !self.eat_sym(")") {
                return Err(format!("expecting ')', found {}", self.found()));
            }
            return Ok(e);
        }
        let field = self.ident()?;
        let negated = self.eat_kw("NOT");
        if self.eat_kw("LIKE") {
            return match self.next() {
                Some(Tok::Str(p)) => Ok(Expr::Like(field, p, negated)),
                _ => Err("LIKE needs a string pattern".into()),
            };
        }
        if self.eat_kw("IN") {
            if !self.eat_sym("(") {
                return Err(format!("expecting '(' after IN, found {}", self.found()));
            }
            let mut values = vec![self.literal()?];
            while self.eat_sym(",") {
                values.push(self.literal()?);
            }
            if !self.eat_sym(")") {
                return Err(format!("expecting ')', found {}", self.found()));
            }
            return Ok(Expr::In(field, values, negated));
        }
        if negated {
            return Err("NOT must be followed by LIKE or IN here".into());
        }
        let op = match self.next() {
            Some(Tok::Sym("=")) => Op::Eq,
            Some(Tok::Sym("!=")) => Op::Ne,
            Some(Tok::Sym("<")) => Op::Lt,
            Some(Tok::Sym("<=")) => Op::Le,
            Some(Tok::Sym(">")) => Op::Gt,
            Some(Tok::Sym(">=")) => Op::Ge,
            _ => {
                self.pos -= 1;
                return Err(format!("expecting an operator, found {}", self.found()));
            }
        };
        Ok(Expr::Cmp(field, op, self.literal()?))
    }
}

fn is_reserved(w: &str) -> bool {
    [
        "SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "LIKE", "IN", "ORDER", "BY", "LIMIT", "OFFSET", "ASC", "DESC",
        "NULLS",
    ]
    .iter()
    .any(|k| k.eq_ignore_ascii_case(w))
}

/// Parses a query; the error text becomes the `MALFORMED_QUERY` message.
pub fn parse(q: &str) -> Result<Query, String> {
    let mut p = Parser {
        toks: tokenize(q)?,
        pos: 0,
    };
    p.expect_kw("SELECT")?;
    let selection = if matches!(p.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case("COUNT"))
        && p.toks.get(p.pos + 1) == Some(&Tok::Sym("("))
    {
        p.pos += 2;
        if !p.eat_sym(")") {
            return Err("only COUNT() without a field is supported".into());
        }
        Selection::Count
    } else {
        let mut fields = vec![p.ident()?];
        while p.eat_sym(",") {
            fields.push(p.ident()?);
        }
        Selection::Fields(fields)
    };
    p.expect_kw("FROM")?;
    let object = p.ident()?;
    let filter = if p.eat_kw("WHERE") { Some(p.or_expr()?) } else { None };
    let mut order = Vec::new();
    if p.eat_kw("ORDER") {
        p.expect_kw("BY")?;
        loop {
            let field = p.ident()?;
            let desc = if p.eat_kw("DESC") {
                true
            } else {
                p.eat_kw("ASC");
                false
            };
            // SOQL: NULLS FIRST by default in ascending order, NULLS LAST in descending.
            let mut nulls_last = desc;
            if p.eat_kw("NULLS") {
                if p.eat_kw("LAST") {
                    nulls_last = true;
                } else {
                    p.expect_kw("FIRST")?;
                    nulls_last = false;
                }
            }
            order.push((field, desc, nulls_last));
            if !p.eat_sym(",") {
                break;
            }
        }
    }
    let mut limit = None;
    let mut offset = 0;
    if p.eat_kw("LIMIT") {
        match p.next() {
            Some(Tok::Num(n)) if n >= 0.0 => limit = Some(n as usize),
            _ => return Err("LIMIT needs a non-negative number".into()),
        }
    }
    if p.eat_kw("OFFSET") {
        match p.next() {
            Some(Tok::Num(n)) if n >= 0.0 => offset = n as usize,
            _ => return Err("OFFSET needs a non-negative number".into()),
        }
    }
    if p.peek().is_some() {
        return Err(format!("unexpected token: {}", p.found()));
    }
    Ok(Query {
        selection,
        object,
        filter,
        order,
        limit,
        offset,
    })
}

impl Query {
    /// Every field the query names (selection, filter, order), as written.
    pub fn fields(&self) -> Vec<String> {
        let mut out = match &self.selection {
            Selection::Fields(f) => f.clone(),
            Selection::Count => Vec::new(),
        };
        fn walk(e: &Expr, out: &mut Vec<String>) {
            match e {
                Expr::And(a, b) | Expr::Or(a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Expr::Not(a) => walk(a, out),
                Expr::Cmp(f, _, _) | Expr::Like(f, _, _) | Expr::In(f, _, _) => out.push(f.clone()),
            }
        }
        if let Some(f) = &self.filter {
            walk(f, &mut out);
        }
        out.extend(self.order.iter().map(|(f, _, _)| f.clone()));
        out
    }
}

/// The value of `field` in `record`, field names compared case-insensitively.
pub fn field<'a>(record: &'a serde_json::Map<String, Value>, name: &str) -> &'a Value {
    record
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or(&Value::Null, |(_, v)| v)
}

pub fn matches(e: &Expr, r: &serde_json::Map<String, Value>) -> bool {
    match e {
        Expr::And(a, b) => matches(a, r) && matches(b, r),
        Expr::Or(a, b) => matches(a, r) || matches(b, r),
        Expr::Not(a) => !matches(a, r),
        Expr::Cmp(f, op, lit) => {
            let v = field(r, f);
            match op {
                Op::Eq => compare(v, lit) == Some(Ordering::Equal),
                Op::Ne => compare(v, lit) != Some(Ordering::Equal),
                Op::Lt => compare(v, lit) == Some(Ordering::Less),
                Op::Le => matches!(compare(v, lit), Some(Ordering::Less | Ordering::Equal)),
                Op::Gt => compare(v, lit) == Some(Ordering::Greater),
                Op::Ge => matches!(compare(v, lit), Some(Ordering::Greater | Ordering::Equal)),
            }
        }
        Expr::Like(f, pattern, negated) => {
            let hit = match field(r, f) {
                Value::String(s) => like(&s.to_lowercase(), &pattern.to_lowercase()),
                _ => false,
            };
            hit != *negated
        }
        Expr::In(f, values, negated) => {
            let v = field(r, f);
            let hit = values.iter().any(|lit| compare(v, lit) == Some(Ordering::Equal));
            hit != *negated
        }
    }
}

/// Orders two values the way SOQL compares them; `None` when they cannot be compared.
pub fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        (Value::Null, _) | (_, Value::Null) => None,
        (Value::String(x), Value::String(y)) => Some(x.to_lowercase().cmp(&y.to_lowercase())),
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::Number(y)) => x.parse::<f64>().ok()?.partial_cmp(&y.as_f64()?),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Ordering for ORDER BY: nulls placed by `nulls_last`.
pub fn order_cmp(a: &Value, b: &Value, nulls_last: bool) -> Ordering {
    match (a.is_null(), b.is_null()) {
        (true, true) => Ordering::Equal,
        (true, false) => {
            if nulls_last {
                Ordering::Greater
            } else {
                Ordering::Less
            }
        }
        (false, true) => {
            if nulls_last {
                Ordering::Less
            } else {
                Ordering::Greater
            }
        }
        _ => compare(a, b).unwrap_or(Ordering::Equal),
    }
}

fn like(s: &str, p: &str) -> bool {
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = p.chars().collect();
    // Classic wildcard match with backtracking on the last %.
    let (mut i, mut j, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while i < s.len() {
        if j < p.len() && (p[j] == '_' || p[j] == s[i]) {
            i += 1;
            j += 1;
        } else if j < p.len() && p[j] == '%' {
            star = Some(j);
            mark = i;
            j += 1;
        } else if let Some(st) = star {
            j = st + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while j < p.len() && p[j] == '%' {
        j += 1;
    }
    j == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn parses_and_evaluates_a_filter() {
        let q = parse(
            "select Id, Subject from Case where (Status = 'new' or Priority != 'Low') and Subject like 'boil%' order by CreatedDate desc limit 5",
        )
        .unwrap();
        assert_eq!(q.object, "Case");
        assert_eq!(q.limit, Some(5));
        let f = q.filter.unwrap();
        assert!(matches(&f, &rec(json!({"Status": "New", "Subject": "Boiler hot"}))));
        assert!(!matches(
            &f,
            &rec(json!({"Status": "Closed", "Priority": "Low", "Subject": "Boiler"}))
        ));
        assert!(!matches(&f, &rec(json!({"Status": "New", "Subject": "pump"}))));
    }

    #[test]
    fn in_null_and_count() {
        let q = parse("SELECT COUNT() FROM Case WHERE Ext__c IN ('a','b') AND OwnerId = null").unwrap();
        assert_eq!(q.selection, Selection::Count);
        let f = q.filter.unwrap();
        assert!(matches(&f, &rec(json!({"Ext__c": "b"}))));
        assert!(!matches(&f, &rec(json!({"Ext__c": "c"}))));
        assert!(!matches(&f, &rec(json!({"Ext__c": "a", "OwnerId": "005"}))));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(parse("SELECT FROM Case").unwrap_err().contains("field name"));
        assert!(parse("SELECT Id FROM Case WHERE").unwrap_err().contains("field name"));
        assert!(
            parse("SELECT Owner.Name FROM Case")
                .unwrap_err()
                .contains("relationship")
        );
        assert!(parse("SELECT Id FROM Case LIMIT x").is_err());
        assert!(
            parse("SELECT Id FROM Case WHERE Subject = 'x")
                .unwrap_err()
                .contains("unterminated")
        );
    }

    #[test]
    fn like_wildcards() {
        assert!(like("boiler-1", "boil%"));
        assert!(like("boiler-1", "%-_"));
        assert!(!like("boiler-1", "%-__"));
        assert!(like("", "%"));
    }
}
