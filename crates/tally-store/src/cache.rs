//! A result cache for the metrics API that is never stale.
//!
//! Each entry is stamped with the store version it was computed at and the
//! end of its time range. On lookup the store answers which minute of the
//! tenant changed first since that version ([`RollupStore::changed_since`]);
//! the entry is served only if nothing changed before its end. So a panel
//! over yesterday keeps hitting while today's traffic flows, and a panel
//! that includes the open minute is recomputed as soon as that minute moves.

use std::collections::HashMap;

use tally_types::time::Millis;

use crate::RollupStore;

struct Entry<V> {
    tenant: Box<str>,
    end: Millis,
    version: u64,
    used: u64,
    value: V,
}

/// A bounded cache of query answers (least recently used goes first).
pub struct MetricsCache<V> {
    capacity: usize,
    map: HashMap<String, Entry<V>>,
    tick: u64,
}

impl<V: Clone> MetricsCache<V> {
    /// A cache of at most `capacity` answers (0: caching is off).
    pub fn new(capacity: usize) -> Self {
        MetricsCache {
            capacity,
            map: HashMap::new(),
            tick: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The cached answer for `key`, if the data under it has not changed.
    pub fn get(&mut self, key: &str, store: &RollupStore) -> Option<V> {
        if self.capacity == 0 {
            return None;
        }
        self.tick += 1;
        let fresh = match self.map.get_mut(key) {
            Some(e) => match store.changed_since(&e.tenant, e.version) {
                Some(first) if first < e.end => false,
                _ => {
                    e.used = self.tick;
                    return Some(e.value.clone());
                }
            },
            None => true,
        };
        if !fresh {
            self.map.remove(key);
        }
        None
    }

    /// Keeps the answer for `key` over `[.., end)` of `tenant`, computed at
    /// store version `version`.
    pub fn put(&mut self, key: String, tenant: &str, end: Millis, version: u64, value: V) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity
            && !self.map.contains_key(&key)
            && let Some(old) = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
        {
            self.map.remove(&old);
        }
        self.tick += 1;
        self.map.insert(
            key,
            Entry {
                tenant: tenant.into(),
                end,
                version,
                used: self.tick,
                value,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::CHANGE_LOG;
    use tally_types::time::{HOUR_MS, MINUTE_MS};
    use tally_types::{BatchReader, BatchWriter};

    const T0: Millis = 1_793_534_400_000; // 2026-11-01T12:00:00Z

    fn add(store: &mut RollupStore, tenant: &str, id: &str, ts: Millis) {
        let mut w = BatchWriter::new();
        let at = w.begin_event(tenant, id, "click", ts, Some("u"), None);
        w.finish_event(at, 0);
        let bytes = w.finish();
        for ev in BatchReader::new(&bytes).unwrap() {
            store.add(&ev.unwrap());
        }
        store.commit();
    }

    #[test]
    fn an_entry_is_served_until_data_before_its_end_changes() {
        let mut store = RollupStore::new();
        add(&mut store, "acme", "a", T0);
        let mut cache = MetricsCache::new(8);
        let end = T0 + 10 * MINUTE_MS;
        cache.put("q".into(), "acme", end, store.version(), 1);
        assert_eq!(cache.get("q", &store), Some(1));
        // After the entry's range, and another tenant: still exact.
        add(&mut store, "acme", "b", end);
        add(&mut store, "globex", "c", T0);
        assert_eq!(cache.get("q", &store), Some(1));
        // Inside the range (here the last minute): stale, so gone.
        add(&mut store, "acme", "d", end - 1);
        assert_eq!(cache.get("q", &store), None);
        assert!(cache.is_empty());
        // Downsampling changes what is under every older range.
        cache.put("q".into(), "acme", end, store.version(), 2);
        assert_eq!(cache.get("q", &store), Some(2));
        store.downsample(T0 + HOUR_MS);
        store.commit();
        assert_eq!(cache.get("q", &store), None);
    }

    #[test]
    fn a_version_older_than_the_change_log_is_a_miss() {
        let mut store = RollupStore::new();
        add(&mut store, "acme", "a", T0);
        let v = store.version();
        for i in 0..CHANGE_LOG + 1 {
            add(&mut store, "acme", &format!("x{i}"), T0 + 2 * HOUR_MS);
        }
        // Every change was after T0 + 1h, but the oldest fell out of the log.
        assert_eq!(store.changed_since("acme", v), Some(Millis::MIN));
        assert_eq!(
            store.changed_since("acme", store.version() - 1),
            Some(T0 + 2 * HOUR_MS)
        );
        assert_eq!(store.changed_since("acme", store.version()), None);
        assert_eq!(store.changed_since("nobody", 0), None);
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let store = RollupStore::new();
        let mut cache = MetricsCache::new(2);
        cache.put("a".into(), "t", T0, 0, 1);
        cache.put("b".into(), "t", T0, 0, 2);
        assert_eq!(cache.get("a", &store), Some(1));
        cache.put("c".into(), "t", T0, 0, 3);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("b", &store), None);
        assert_eq!(cache.get("a", &store), Some(1));
        assert_eq!(cache.get("c", &store), Some(3));
        let mut off = MetricsCache::new(0);
        off.put("a".into(), "t", T0, 0, 1);
        assert_eq!(off.get("a", &store), None);
    }
}
