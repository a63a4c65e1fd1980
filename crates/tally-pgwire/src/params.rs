//! Statements and their parameters: a simple query split into statements,
//! and an extended query's `$n` bound as SQL literals in the parsed
//! statement (a parameter is a value in the tree, never spliced text).

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{Expr, Value, visit_expressions_mut};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use pgwire::api::Type;
use pgwire::api::portal::Portal;
use pgwire::api::results::FieldFormat;
use pgwire::error::{PgWireError, PgWireResult};

use crate::encode::format_of;
use crate::user_error;

/// The statements of a simple query, each as SQL text. What the Postgres
/// dialect cannot parse goes to the engine whole, which reports the error
/// (or runs what only DataFusion's dialect knows).
pub(crate) fn split(query: &str) -> Vec<String> {
    match Parser::parse_sql(&PostgreSqlDialect {}, query) {
        Ok(stmts) if stmts.len() > 1 => stmts.iter().map(ToString::to_string).collect(),
        _ => vec![query.to_string()],
    }
}

fn bad(n: usize, msg: impl std::fmt::Display) -> PgWireError {
    user_error("22023", format!("parameter ${n}: {msg}"), None)
}

/// Parameter `i` of `portal` as a literal.
fn literal(portal: &Portal<String>, i: usize) -> PgWireResult<Expr> {
    let n = i + 1;
    let ty = portal
        .statement
        .parameter_types
        .get(i)
        .cloned()
        .flatten()
        .unwrap_or(Type::UNKNOWN);
    let Some(raw) = portal.parameters.get(i).cloned().flatten() else {
        return Ok(Expr::value(Value::Null));
    };
    let numeric = [
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::NUMERIC,
        Type::OID,
    ]
    .contains(&ty);
    if format_of(&portal.parameter_format, i) == FieldFormat::Text {
        let text = std::str::from_utf8(&raw).map_err(|_| bad(n, "not UTF-8 text"))?;
        if ty == Type::BOOL {
            let v = match text.trim().to_ascii_lowercase().as_str() {
                "t" | "true" | "1" | "y" | "yes" | "on" => true,
                "f" | "false" | "0" | "n" | "no" | "off" => false,
                other => return Err(bad(n, format!("{other:?} is not a boolean"))),
            };
            return Ok(Expr::value(Value::Boolean(v)));
        }
        if numeric {
            let t = text.trim();
            return match t.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(Expr::value(Value::Number(t.to_string(), false))),
                _ => Err(bad(
                    n,
                    format!("{t:?} is not a finite number of type {}", ty.name()),
                )),
            };
        }
        return Ok(Expr::value(Value::SingleQuotedString(text.to_string())));
    }
    // Binary: decoded by its type, then written as the literal it is.
    macro_rules! binary {
        ($t:ty) => {
            portal.parameter::<$t>(i, &ty).map_err(|e| bad(n, e))?
        };
    }
    let number = |v: String| Value::Number(v, false);
    let finite = |v: f64| {
        if v.is_finite() {
            Ok(number(v.to_string()))
        } else {
            Err(bad(n, format!("{v} is not a finite number")))
        }
    };
    let v = match ty {
        Type::BOOL => binary!(bool).map(Value::Boolean),
        Type::INT2 => binary!(i16).map(|v| number(v.to_string())),
        Type::INT4 => binary!(i32).map(|v| number(v.to_string())),
        Type::INT8 => binary!(i64).map(|v| number(v.to_string())),
        Type::FLOAT4 => binary!(f32).map(|v| finite(f64::from(v))).transpose()?,
        Type::FLOAT8 => binary!(f64).map(finite).transpose()?,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => portal
            .parameter::<String>(i, &Type::TEXT)
            .map_err(|e| bad(n, e))?
            .map(Value::SingleQuotedString),
        Type::TIMESTAMP => binary!(chrono::NaiveDateTime)
            .map(|t| Value::SingleQuotedString(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string())),
        Type::TIMESTAMPTZ => binary!(chrono::DateTime<chrono::FixedOffset>)
            .map(|t| Value::SingleQuotedString(t.to_rfc3339())),
        Type::DATE => binary!(chrono::NaiveDate).map(|d| Value::SingleQuotedString(d.to_string())),
        other => {
            return Err(bad(
                n,
                format!(
                    "binary values of type {} are not taken; send this parameter in text format",
                    other.name()
                ),
            ));
        }
    };
    Ok(Expr::value(v.unwrap_or(Value::Null)))
}

/// The portal's statement with its parameters bound, as SQL text for the
/// engine (unchanged when it has none).
pub(crate) fn bind(portal: &Portal<String>) -> PgWireResult<String> {
    let sql = &portal.statement.statement;
    if portal.parameter_len() == 0 {
        return Ok(sql.clone());
    }
    let values = (0..portal.parameter_len())
        .map(|i| literal(portal, i))
        .collect::<PgWireResult<Vec<Expr>>>()?;
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| {
        user_error(
            "42601",
            format!("the statement does not parse: {e}"),
            Some("parameters are $1, $2, …"),
        )
    })?;
    let r = visit_expressions_mut(&mut stmts, |e| {
        if let Expr::Value(v) = e
            && let Value::Placeholder(p) = &v.value
        {
            let Some(i) = p.strip_prefix('$').and_then(|d| d.parse::<usize>().ok()) else {
                return ControlFlow::Break(format!("{p} is not a parameter; use $1, $2, …"));
            };
            match i.checked_sub(1).and_then(|i| values.get(i)) {
                Some(lit) => *e = lit.clone(),
                None => {
                    return ControlFlow::Break(format!(
                        "{p} has no value: {} parameters were bound",
                        values.len()
                    ));
                }
            }
        }
        ControlFlow::Continue(())
    });
    if let ControlFlow::Break(msg) = r {
        return Err(user_error("08P01", msg, None));
    }
    Ok(stmts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; "))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use pgwire::api::stmt::StoredStatement;

    use super::*;

    fn portal(sql: &str, types: Vec<Option<Type>>, params: Vec<Option<&[u8]>>) -> Portal<String> {
        let stmt = Arc::new(StoredStatement::new("s".into(), sql.to_string(), types));
        let mut p = Portal::new_cursor("p".into(), stmt);
        p.parameters = params
            .into_iter()
            .map(|v| v.map(Bytes::copy_from_slice))
            .collect();
        p
    }

    #[test]
    fn parameters_are_values_never_sql() {
        let p = portal(
            "SELECT count(*) FROM events WHERE user_id = $1 AND n > $2 LIMIT $3",
            vec![None, Some(Type::INT8), Some(Type::INT4)],
            vec![Some(b"x' OR '1'='1"), Some(b"5"), Some(b"10")],
        );
        assert_eq!(
            bind(&p).unwrap(),
            "SELECT count(*) FROM events WHERE user_id = 'x'' OR ''1''=''1' AND n > 5 LIMIT 10"
        );
        let p = portal("SELECT $1", vec![Some(Type::INT8)], vec![Some(b"1; DROP")]);
        assert!(bind(&p).is_err());
        let p = portal("SELECT $2", vec![None], vec![Some(b"a")]);
        assert!(bind(&p).is_err());
        let p = portal("SELECT $1", vec![None], vec![None]);
        assert_eq!(bind(&p).unwrap(), "SELECT NULL");
        // A placeholder inside a string literal is text, not a parameter.
        let p = portal("SELECT '$1', $1", vec![None], vec![Some(b"v")]);
        assert_eq!(bind(&p).unwrap(), "SELECT '$1', 'v'");
    }

    #[test]
    fn a_simple_query_splits_into_statements() {
        assert_eq!(split("SELECT 1; SELECT 2;"), vec!["SELECT 1", "SELECT 2"]);
        assert_eq!(split("SELECT 'a;b'"), vec!["SELECT 'a;b'"]);
        assert_eq!(split("SELEKT 1; 2"), vec!["SELEKT 1; 2"]);
    }
}
