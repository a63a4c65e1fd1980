//! JSON Schema: validation (crate `jsonschema`) and compatibility.
//!
//! Compatibility follows the reader/writer view of Avro: a reader schema
//! can read what a writer schema admits when every value the writer
//! admits, the reader admits too. Checked structurally, property by
//! property, over the keywords that decide it in practice: `type`
//! (integer widens to number), `required`, `properties`,
//! `additionalProperties: false`, `enum` and array `items`. A property
//! added as optional is compatible both ways (documents written before it
//! simply lack it).

use serde_json::Value as Json;

use crate::avro::{Break, BreakKind, join, push};

/// The JSON types a schema admits (None: any).
fn types(s: &Json) -> Option<Vec<String>> {
    match s.get("type") {
        Some(Json::String(t)) => Some(vec![t.clone()]),
        Some(Json::Array(a)) => Some(
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
        ),
        _ => None,
    }
}

fn type_label(t: &Option<Vec<String>>) -> String {
    match t {
        None => "any".into(),
        Some(v) if v.len() == 1 => v[0].clone(),
        Some(v) => format!("[{}]", v.join(", ")),
    }
}

fn required(s: &Json) -> Vec<&str> {
    s.get("required")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default()
}

fn closed(s: &Json) -> bool {
    s.get("additionalProperties") == Some(&Json::Bool(false))
}

/// Every reason `reader` does not admit what `writer` admits.
pub(crate) fn breaks(writer: &Json, reader: &Json) -> Vec<Break> {
    let mut out = Vec::new();
    check(writer, reader, "", &mut out);
    out
}

fn check(w: &Json, r: &Json, path: &str, out: &mut Vec<Break>) {
    if r == &Json::Bool(true) || r.as_object().is_some_and(|o| o.is_empty()) {
        return;
    }
    let (wt, rt) = (types(w), types(r));
    if let Some(rt) = &rt {
        let reads = |t: &str| {
            rt.iter()
                .any(|x| x == t || (x == "number" && t == "integer"))
        };
        let fits = match &wt {
            None => false,
            Some(wt) => wt.iter().all(|t| reads(t)),
        };
        if !fits {
            push(
                out,
                path,
                BreakKind::Type {
                    writer: type_label(&wt),
                    reader: type_label(&Some(rt.clone())),
                },
            );
            return;
        }
    }
    if let Some(re) = r.get("enum").and_then(Json::as_array) {
        match w.get("enum").and_then(Json::as_array) {
            Some(we) => {
                for v in we.iter().filter(|v| !re.contains(v)) {
                    push(out, path, BreakKind::Symbol(v.to_string()));
                }
            }
            None => push(
                out,
                path,
                BreakKind::Type {
                    writer: type_label(&wt),
                    reader: "enum".into(),
                },
            ),
        }
    }
    // Objects: property by property.
    let empty = serde_json::Map::new();
    let wp = w
        .get("properties")
        .and_then(Json::as_object)
        .unwrap_or(&empty);
    let rp = r
        .get("properties")
        .and_then(Json::as_object)
        .unwrap_or(&empty);
    let w_required = required(w);
    for name in required(r) {
        if !w_required.contains(&name) {
            push(out, &join(path, name), BreakKind::MissingNoDefault);
        }
    }
    // A property only the reader names: the writer's documents lack it
    // (closed) or may hold anything under it (open; taken as compatible,
    // see the module's note).
    for (name, rs) in rp {
        if let Some(ws) = wp.get(name) {
            check(ws, rs, &join(path, name), out);
        }
    }
    if closed(r) {
        for name in wp.keys().filter(|n| !rp.contains_key(*n)) {
            push(
                out,
                &join(path, name),
                BreakKind::Type {
                    writer: type_label(&types(&wp[name])),
                    reader: "nothing (additionalProperties: false)".into(),
                },
            );
        }
    }
    if let (Some(wi), Some(ri)) = (w.get("items"), r.get("items")) {
        check(wi, ri, &format!("{path}[]"), out);
    }
}

/// What a JSON Schema validator says of `props` (the first few errors).
pub(crate) fn validate(v: &jsonschema::Validator, props: &Json) -> Result<(), String> {
    let errors: Vec<String> = v
        .iter_errors(props)
        .take(3)
        .map(|e| {
            let at = e.instance_path().to_string();
            let at = at.trim_start_matches('/').replace('/', ".");
            if at.is_empty() {
                format!("properties: {e}")
            } else {
                format!("properties.{at}: {e}")
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
