//! What the raw store costs per event: appending decoded log records to the
//! hot Arrow batches, then sealing them into Parquet.
//!
//! `cargo run --release -p tally-archive --example seal_cost -- [rows] [tenants] [records per flush] [disorder ms] [text|binary]`
//!
//! Records hold 500 events (a 2000-event request over 4 partitions); the
//! raw thread publishes whenever it has caught up, which under a steady
//! load is after almost every record (the default, 1).
//!
//! Prints ns per event for each phase; compare them with the per-event CPU
//! budget of ingest (1 s / events per second per core).

use std::time::Instant;

use tally_archive::{Archive, ArchiveTarget, RawConfig, RawWriter};
use tally_types::BatchWriter;
use tally_types::codec::PropValue;

const PAGES: &[&str] = &[
    "/",
    "/pricing",
    "/docs",
    "/blog/launch",
    "/signup",
    "/checkout",
];
const COUNTRIES: &[&str] = &["US", "DE", "FR", "IN", "BR", "JP", "GB"];
const DEVICES: &[&str] = &["desktop", "mobile", "tablet"];
const TYPES: &[&str] = &["page_view", "click", "scroll", "purchase", "signup"];
const PER_RECORD: usize = 500;

fn main() {
    let mut args = std::env::args().skip(1);
    let rows: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let tenants: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let per_flush: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    // Event times up to this far behind arrival order (0: in order).
    let disorder: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    // How the log holds the properties: "text" (the client's compact JSON,
    // as ingest keeps it) or "binary" (value by value, as for JSON with
    // whitespace or escapes).
    let text_form = args.next().is_none_or(|a| a != "binary");
    let t0: i64 = 1_793_534_400_000; // 2026-11-01T12:00:00Z
    // A cheap deterministic mix (xorshift), so runs are comparable.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut records = Vec::new();
    let mut n = 0usize;
    while n < rows {
        let mut w = BatchWriter::new();
        for _ in 0..PER_RECORD.min(rows - n) {
            let r = rnd();
            let tenant = format!("tenant{}", r as usize % tenants);
            let id = format!("ev-1000-{n}");
            let ts = t0 + (n as i64) / 200 - (r % (disorder + 1)) as i64;
            let user = format!("u_{}", (r >> 8) % 100_000);
            let session = format!("s_{}_{}", (r >> 8) % 100_000, ts / 1_800_000);
            let ty = TYPES[(r >> 20) as usize % TYPES.len()];
            let at = w.begin_event(&tenant, &id, ty, ts, Some(&user), Some(&session));
            let page = PAGES[(r >> 24) as usize % PAGES.len()];
            let duration = ((r >> 32) % 3000) as i64;
            let country = COUNTRIES[(r >> 40) as usize % COUNTRIES.len()];
            let device = DEVICES[(r >> 48) as usize % DEVICES.len()];
            if text_form {
                // What ingest keeps for a client that sends compact JSON.
                let text = format!(
                    r#"{{"page":"{page}","duration_ms":{duration},"country":"{country}","device":"{device}"}}"#
                );
                w.finish_event_json(at, 4, &text);
            } else {
                w.prop("page", PropValue::Str(page));
                w.prop("duration_ms", PropValue::Int(duration));
                w.prop("country", PropValue::Str(country));
                w.prop("device", PropValue::Str(device));
                w.finish_event(at, 4);
            }
            n += 1;
        }
        records.push(w.finish());
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let archive =
        Archive::open(&ArchiveTarget::Local(dir.path().join("archive"))).expect("archive");
    let mut cfg = RawConfig::new(dir.path().join("raw/manifest"), 1);
    cfg.seal_rows = usize::MAX / 2;
    cfg.max_hot_rows = usize::MAX / 2;
    cfg.seal_interval_ms = u64::MAX / 2;
    let (mut w, shared) = RawWriter::open(archive, cfg, (0, &[0])).expect("raw writer");

    let started = Instant::now();
    let mut offset = 0u64;
    for (lsn, rec) in records.iter().enumerate() {
        offset += rec.len() as u64;
        w.append(0, offset, lsn as u64, t0, rec, &[])
            .expect("append");
        if (lsn + 1) % per_flush == 0 {
            w.flush().expect("flush");
        }
    }
    w.flush().expect("flush");
    let append = started.elapsed();
    let hot_bytes = shared.hot.read().bytes;

    let started = Instant::now();
    let report = w.seal_now().expect("seal");
    let seal = started.elapsed();
    let per = |d: std::time::Duration| d.as_nanos() as f64 / rows as f64;
    println!(
        "rows {rows}, tenants {tenants}, hot {:.0} MiB",
        hot_bytes as f64 / 1048576.0
    );
    println!("append+flush  {:8.1} ns/event", per(append));
    println!(
        "seal          {:8.1} ns/event  ({} files, {:.1} MiB, {:.1} bytes/event)",
        per(seal),
        report.files,
        report.bytes as f64 / 1048576.0,
        report.bytes as f64 / rows as f64
    );
    println!("total         {:8.1} ns/event", per(append + seal));
    if std::env::var_os("KEEP").is_some() {
        println!("archive kept in {}", dir.keep().display());
    }
}
