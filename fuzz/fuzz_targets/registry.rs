//! The schema registry's readers of untrusted bytes: Confluent-framed Avro
//! records (any bytes after the id of a registered schema, and any bytes
//! at all) and the registry's log file. Neither may panic or allocate
//! without bound; each answers a value or an error. The direct Avro
//! decoder must give what the `apache_avro` path gives whenever it
//! decodes a frame (differential).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tally_registry::{Level, Registry, SchemaType};

const SCHEMAS: [&str; 3] = [
    r#"{"type":"record","name":"E","fields":[{"name":"event_id","type":"string"},{"name":"event_type","type":"string"},{"name":"timestamp","type":{"type":"long","logicalType":"timestamp-millis"}},{"name":"properties","type":{"type":"record","name":"P","fields":[{"name":"n","type":["null","double"],"default":null},{"name":"tags","type":{"type":"array","items":"string"}},{"name":"m","type":{"type":"map","values":"long"}}]}}]}"#,
    r#"{"type":"record","name":"R","fields":[{"name":"e","type":{"type":"enum","name":"En","symbols":["A","B"]}},{"name":"f","type":{"type":"fixed","name":"F","size":4}},{"name":"b","type":"bytes"}]}"#,
    r#"{"type":"record","name":"N","fields":[{"name":"a","type":{"type":"array","items":{"type":"map","values":["null","string","double"]}}},{"name":"v","type":"int"}]}"#,
];

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let r = Registry::in_memory(Level::None);
        for (i, s) in SCHEMAS.iter().enumerate() {
            r.register("t", &format!("s{i}"), SchemaType::Avro, s)
                .expect("the fuzz schemas register");
        }
        r
    })
}

fuzz_target!(|data: &[u8]| {
    let r = registry();
    let _ = r.decode_frame("t", data);
    if let Some((&pick, rest)) = data.split_first() {
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(u32::from(pick % 3) + 1).to_be_bytes());
        frame.extend_from_slice(rest);
        let _ = r.decode_frame("t", &frame);
        assert!(
            tally_registry::avro_text_agrees(r, "t", &frame),
            "the direct decoder and apache_avro differ on {frame:?}"
        );
    }
    let _ = tally_registry::parse_log_bytes(data);
});
