//! What ingest costs per event, and what the form it keeps the properties
//! in costs the raw store downstream.
//!
//! `cargo run --release -p tally-ingest --example parse_cost -- [compact|spaced] [rounds]`
//!
//! Parses a 2000-event JSON array `rounds` times (the body a client SDK
//! sends; `spaced` as Python's `json.dumps` writes it, `", "` and `": "`),
//! then reads the batches back as the raw store does (properties as JSON
//! text: copied when kept as text, rendered when kept value by value).

use std::time::Instant;

use tally_ingest::{Format, Parser, Tenancy};
use tally_types::codec::BatchReader;

const EVENTS: usize = 2000;
const PAGES: &[&str] = &["/", "/pricing", "/docs", "/blog/launch", "/signup"];
const TYPES: &[&str] = &["page_view", "click", "scroll", "purchase", "signup"];

fn main() {
    let mut args = std::env::args().skip(1);
    let spaced = args.next().is_some_and(|a| a == "spaced");
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let (sep, colon) = if spaced { (", ", ": ") } else { (",", ":") };
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut events = Vec::with_capacity(EVENTS);
    for n in 0..EVENTS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let fields = [
            format!("\"event_id\"{colon}\"ev-1000-{n}\""),
            format!(
                "\"event_type\"{colon}\"{}\"",
                TYPES[x as usize % TYPES.len()]
            ),
            format!("\"timestamp\"{colon}{}", 1_793_534_400_000u64 + n as u64),
            format!("\"user_id\"{colon}\"u_{}\"", (x >> 8) % 100_000),
            format!(
                "\"properties\"{colon}{{\"page\"{colon}\"{}\"{sep}\"duration_ms\"{colon}{}{sep}\"country\"{colon}\"DE\"{sep}\"device\"{colon}\"mobile\"}}",
                PAGES[(x >> 24) as usize % PAGES.len()],
                (x >> 32) % 3000
            ),
        ];
        events.push(format!("{{{}}}", fields.join(sep)));
    }
    let body = format!("[{}]", events.join(sep));

    let mut parser = Parser::new(4);
    let mut records = Vec::new();
    let started = Instant::now();
    for _ in 0..rounds {
        let parsed = parser
            .parse(body.as_bytes(), Format::Json, Tenancy::Open)
            .expect("body parses");
        assert_eq!(parsed.accepted, EVENTS);
        records = parsed
            .partitions
            .into_iter()
            .map(|(_, w)| w.finish())
            .collect();
    }
    let parse = started.elapsed();

    let mut json = Vec::new();
    let mut props = Vec::with_capacity(1 << 20);
    let mut texts = 0usize;
    let started = Instant::now();
    for _ in 0..rounds {
        props.clear();
        texts = 0;
        for rec in &records {
            let mut r = BatchReader::new(rec).expect("batch");
            while let Some(ev) = r.next_raw_rendered(&mut json) {
                let ev = ev.expect("event");
                texts += usize::from(ev.props_text().is_some());
                props.extend_from_slice(ev.props_text().unwrap_or(&json));
            }
        }
    }
    let read = started.elapsed();
    let per = |d: std::time::Duration| d.as_nanos() as f64 / (rounds * EVENTS) as f64;
    println!(
        "{} body, {} bytes/event, properties kept as text: {texts}/{EVENTS}",
        if spaced { "spaced" } else { "compact" },
        body.len() / EVENTS
    );
    println!("parse         {:8.1} ns/event", per(parse));
    println!("raw read      {:8.1} ns/event", per(read));
}
