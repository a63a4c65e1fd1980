//! The batch codec's reader on any bytes (a log record's payload): events
//! or an error, never a panic or a read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_types::BatchReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(reader) = BatchReader::new(data) {
        let _ = reader.is_backfill();
        for e in reader {
            match e {
                Ok(e) => {
                    let _ = e.to_json();
                }
                Err(_) => break,
            }
        }
    }
});
