//! A corrupt length field must cost what the file holds, not what it claims.
//! Found by the `log` fuzz target: a 225-byte segment whose last header says
//! 256 MiB made recovery and the reader allocate 256 MiB each.

// A test-only allocator wrapper needs `unsafe impl GlobalAlloc`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tally_log::{HEADER_LEN, Log, LogConfig, MAX_PAYLOAD, MergedReader};

/// Records the largest single allocation since it was last reset.
struct Largest;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

#[test]
fn a_huge_length_in_a_short_segment_allocates_little() {
    let dir = tempfile::tempdir().unwrap();
    // Write two good records through the log itself.
    {
        let (mut log, _) = Log::open(LogConfig::new(dir.path(), 1)).unwrap();
        log.append(0, 0, 1, b"first").unwrap();
        log.append(0, 1, 2, b"second").unwrap();
        log.sync().unwrap();
    }
    let seg = dir.path().join("p000").join(format!("{:020}.seg", 0));
    let good = std::fs::read(&seg).unwrap();
    // A sealed segment ending in a header that claims the largest payload
    // allowed, followed by a few bytes: a torn write, or a hostile file.
    let mut bad = good.clone();
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
    bad.extend_from_slice(&h);
    bad.extend_from_slice(b"tail bytes");
    // An older segment keeps its corrupt record (the reader reports it) and
    // the active one is cut on open: exercise both.
    let older = dir.path().join("p000").join(format!("{:020}.seg", 0));
    std::fs::write(&older, &bad).unwrap();
    let newer = dir
        .path()
        .join("p000")
        .join(format!("{:020}.seg", bad.len()));
    std::fs::write(&newer, &bad).unwrap();

    LARGEST.store(0, Ordering::Relaxed);
    let (log, report) = Log::open(LogConfig::new(dir.path(), 1)).unwrap();
    drop(log);
    assert_eq!(
        report.truncated.len(),
        1,
        "the active segment's tail is cut"
    );
    let mut ok = 0;
    let mut corrupt = 0;
    for r in MergedReader::open(dir.path(), &[0], &[u64::MAX]).unwrap() {
        assert!(!r.payload.is_empty());
        ok += 1;
    }
    // MergedReader skips corrupt records; count them with the partition reader.
    let mut pr = tally_log::PartitionReader::open(dir.path(), 0, 0, u64::MAX).unwrap();
    while let Some(r) = pr.next_record() {
        if r.is_err() {
            corrupt += 1;
        }
    }
    assert_eq!(ok, 4, "both segments' good records are read");
    assert_eq!(
        corrupt, 1,
        "the older segment's corrupt tail is reported once"
    );
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 8 << 20,
        "largest allocation {largest} bytes for {} bytes on disk",
        2 * bad.len()
    );
}
