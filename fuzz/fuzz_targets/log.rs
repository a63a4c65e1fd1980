//! The log's recovery and reader on any segment file: the log opens (a
//! torn or corrupt tail cut) or is refused, and reading never panics.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tally_log::{Log, LogConfig, MergedReader};

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        // Memory-backed when there is one: the target writes a file per run.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("tally-fuzz-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    let _ = std::fs::remove_dir_all(dir);
    let p = dir.join("p000");
    std::fs::create_dir_all(&p).expect("temp dir");
    std::fs::write(p.join("00000000000000000000.seg"), data).expect("write segment");
    if let Ok((log, _)) = Log::open(LogConfig::new(dir, 1)) {
        drop(log);
        if let Ok(reader) = MergedReader::open(dir, &[0], &[u64::MAX]) {
            for r in reader {
                let _ = r.payload.len();
            }
        }
    }
});
