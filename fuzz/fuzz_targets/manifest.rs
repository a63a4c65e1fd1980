//! The archive manifest's replay on any file: the live files or an error
//! naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(valid) = tally_archive::fuzzing::manifest(data) {
        assert!(valid <= data.len());
    }
});
