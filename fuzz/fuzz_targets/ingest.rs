//! The ingest parser on any body, as JSON and as NDJSON, with redaction
//! rules on: it answers (accepted events, rejections) or refuses the body,
//! never panics; what it accepts decodes back from its batches.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tally_ingest::{Format, Parser, Privacy, Tenancy};
use tally_types::BatchReader;

fn privacy() -> Arc<Privacy> {
    static P: OnceLock<Arc<Privacy>> = OnceLock::new();
    P.get_or_init(|| {
        let rules = [
            ("user_id", "hash"),
            ("properties.email", "drop"),
            ("properties.ip", "mask"),
            ("properties.a.b", "mask"),
        ]
        .map(|(f, a)| (f.to_string(), a.to_string()));
        Arc::new(Privacy::new(b"fuzz", [("acme".to_string(), rules)]).expect("valid rules"))
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    for (format, tenancy) in [
        (Format::Json, Tenancy::Open),
        (Format::Ndjson, Tenancy::Keyed("acme")),
    ] {
        let parsed = Parser::new(3)
            .with_privacy(Some(privacy()))
            .with_max_depth(16)
            .parse(data, format, tenancy);
        let Ok(parsed) = parsed else { continue };
        assert!(parsed.rejected.len() <= parsed.rejected_total);
        let mut decoded = 0;
        for (_, w) in parsed.partitions {
            let bytes = w.finish();
            for e in BatchReader::new(&bytes).expect("our own batch") {
                let _ = e.expect("our own event").to_json();
                decoded += 1;
            }
        }
        assert_eq!(decoded, parsed.accepted);
    }
});
