//! The checkpoint, late-journal and sessions-journal decoders on any
//! bytes: a state or an error, never a panic, never an allocation sized by
//! a corrupt count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_stream::state::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::checkpoint(data);
    let _ = fuzzing::sessions_journal(data);
    if let Some((&version, rest)) = data.split_first() {
        let _ = fuzzing::late_entry(rest, version % 6);
    }
});
