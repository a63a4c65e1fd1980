//! The `json_get_*` scanner on any text and path: a value or none, never
//! a panic or a slice outside the text; a value it finds in valid JSON is
//! the one serde_json finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_types::json::{Found, lookup};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The path: up to three keys taken from the text's first line.
    let (head, body) = text.split_once('\n').unwrap_or(("a", &text));
    let keys: Vec<&str> = head.split('/').take(3).collect();
    let found = lookup(body, &keys);
    if let (Some(Found::Str(s)), Ok(v)) = (&found, serde_json::from_str::<serde_json::Value>(body))
    {
        let mut cur = &v;
        let mut ok = true;
        for k in &keys {
            match cur.get(k) {
                Some(x) => cur = x,
                None => ok = false,
            }
        }
        // serde_json keeps the last of repeated keys, the scanner the
        // first; keys may be spelled with escapes: compare only when every
        // key appears once, as written.
        let plain = !body.contains('\\')
            && keys
                .iter()
                .all(|k| body.matches(&format!("\"{k}\"")).count() == 1);
        if ok
            && plain
            && let Some(t) = cur.as_str()
        {
            assert_eq!(t, s.as_ref());
        }
    }
});
