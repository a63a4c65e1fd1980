//! One clock's dedupe entries: event key → the minute of its window.
//!
//! A hash table grows by doubling, and the doubling copies every entry
//! while the processor holds the rollup store's write lock: at a few
//! million entries that was a 130 ms stall of every metrics read and of
//! freshness. Past [`SPLIT_AT`] entries the table is split into
//! [`SHARDS`] tables by the key's top bits, so each doubling copies a
//! sixty-fourth as much. Small clocks (most tenants) keep one table and
//! pay nothing for the shards.
//!
//! An entry is 20 bytes: the key as four 32-bit words and the minute as
//! minutes since the epoch (a `(u128, i64)` entry is 32, since `u128`
//! aligns to 16). With the tables' spare room that is about 30 bytes per
//! open key instead of 50: at 600k events/s and five minutes of allowed
//! lateness a clock holds some 200 million. The few values that are not a
//! whole minute (events sent to the late DLQ, marked) sit in a table of
//! their own.

use tally_store::sketch::IdentityHasher;
use tally_types::time::{MINUTE_MS, Millis};

/// An entry's key: the 128-bit event key as four words, so an entry is
/// 20 bytes aligned to 4 (a `(u128, i64)` entry is 32: `u128` aligns to
/// 16). Hashed by its low 64 bits, which are already a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key([u32; 4]);

impl Key {
    #[inline]
    fn of(k: u128) -> Key {
        Key([
            k as u32,
            (k >> 32) as u32,
            (k >> 64) as u32,
            (k >> 96) as u32,
        ])
    }

    #[inline]
    fn get(self) -> u128 {
        let [a, b, c, d] = self.0;
        u128::from(a) | u128::from(b) << 32 | u128::from(c) << 64 | u128::from(d) << 96
    }
}

impl std::hash::Hash for Key {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(u64::from(self.0[0]) | u64::from(self.0[1]) << 32);
    }
}

/// Entries of counted events: the minute of the event's window, in
/// minutes since the epoch (event times are 0 to year 9999, which is
/// under `u32::MAX` minutes).
type Table = hashbrown::HashMap<Key, u32, std::hash::BuildHasherDefault<IdentityHasher>>;

/// Entries whose value is not a whole minute of the epoch's first
/// 2^32 (the late DLQ's marked ones, see `LATE_MARK`): few, kept apart
/// with their full value.
type Odd = hashbrown::HashMap<u128, Millis, std::hash::BuildHasherDefault<IdentityHasher>>;

/// Tables of a split map.
pub(crate) const SHARDS: usize = 64;

/// Entries at which one table becomes [`SHARDS`].
pub(crate) const SPLIT_AT: usize = 1 << 16;

/// One clock's dedupe entries, key → value (the window minute in
/// milliseconds, or a marked one).
#[derive(Debug, Clone, Default)]
pub(crate) struct DedupeMap {
    minutes: Tables,
    odd: Odd,
}

#[derive(Debug, Clone)]
enum Tables {
    One(Table),
    Split(Box<[Table]>),
}

impl Default for Tables {
    fn default() -> Self {
        Tables::One(Table::default())
    }
}

/// The shard of `key`: its top bits (the tables hash by the low ones).
#[inline]
fn shard(key: u128) -> usize {
    (key >> 122) as usize % SHARDS
}

/// `v` as a table value, when it is a whole minute the table holds.
#[inline]
fn as_minute(v: Millis) -> Option<u32> {
    if v % MINUTE_MS != 0 {
        return None;
    }
    u32::try_from(v / MINUTE_MS).ok()
}

impl DedupeMap {
    #[inline]
    pub(crate) fn get(&self, key: &u128) -> Option<Millis> {
        if let Some(&m) = self.table(*key).get(&Key::of(*key)) {
            return Some(Millis::from(m) * MINUTE_MS);
        }
        if self.odd.is_empty() {
            return None;
        }
        self.odd.get(key).copied()
    }

    /// Sets `key`'s value; answers the one it had.
    #[inline]
    pub(crate) fn insert(&mut self, key: u128, value: Millis) -> Option<Millis> {
        let old_odd = if self.odd.is_empty() {
            None
        } else {
            self.odd.remove(&key)
        };
        let old = match as_minute(value) {
            Some(m) => self.table_for(key).insert(Key::of(key), m),
            None => {
                self.odd.insert(key, value);
                self.table_mut(key).remove(&Key::of(key))
            }
        };
        old.map(|m| Millis::from(m) * MINUTE_MS).or(old_odd)
    }

    /// Sets `key`'s value unless it has one; answers the value it has
    /// after.
    #[inline]
    pub(crate) fn insert_if_absent(&mut self, key: u128, value: Millis) -> Millis {
        if let Some(&v) = self.odd.get(&key) {
            return v;
        }
        match as_minute(value) {
            // One lookup of the table: an entry there, or the new one.
            Some(m) => {
                let m = *self.table_for(key).entry(Key::of(key)).or_insert(m);
                Millis::from(m) * MINUTE_MS
            }
            None => match self.get(&key) {
                Some(v) => v,
                None => {
                    self.insert(key, value);
                    value
                }
            },
        }
    }

    pub(crate) fn remove(&mut self, key: &u128) -> Option<Millis> {
        let odd = if self.odd.is_empty() {
            None
        } else {
            self.odd.remove(key)
        };
        self.table_mut(*key)
            .remove(&Key::of(*key))
            .map(|m| Millis::from(m) * MINUTE_MS)
            .or(odd)
    }

    /// Keeps the entries `keep` says yes to.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u128, Millis) -> bool) {
        let mut keep_min = |k: &Key, m: &mut u32| keep(k.get(), Millis::from(*m) * MINUTE_MS);
        match &mut self.minutes {
            Tables::One(t) => t.retain(&mut keep_min),
            Tables::Split(s) => s.iter_mut().for_each(|t| t.retain(&mut keep_min)),
        }
        self.odd.retain(|&k, &mut v| keep(k, v));
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u128, Millis)> + '_ {
        let (one, split) = match &self.minutes {
            Tables::One(t) => (Some(t), None),
            Tables::Split(s) => (None, Some(s.iter().flat_map(|t| t.iter()))),
        };
        one.into_iter()
            .flat_map(|t| t.iter())
            .chain(split.into_iter().flatten())
            .map(|(k, &m)| (k.get(), Millis::from(m) * MINUTE_MS))
            .chain(self.odd.iter().map(|(&k, &v)| (k, v)))
    }

    pub(crate) fn len(&self) -> usize {
        let minutes = match &self.minutes {
            Tables::One(t) => t.len(),
            Tables::Split(s) => s.iter().map(Table::len).sum(),
        };
        minutes + self.odd.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn table(&self, key: u128) -> &Table {
        match &self.minutes {
            Tables::One(t) => t,
            Tables::Split(s) => &s[shard(key)],
        }
    }

    #[inline]
    fn table_mut(&mut self, key: u128) -> &mut Table {
        match &mut self.minutes {
            Tables::One(t) => t,
            Tables::Split(s) => &mut s[shard(key)],
        }
    }

    /// The table `key` goes in, splitting one grown past [`SPLIT_AT`].
    #[inline]
    fn table_for(&mut self, key: u128) -> &mut Table {
        if let Tables::One(t) = &mut self.minutes
            && t.len() >= SPLIT_AT
            && !t.contains_key(&Key::of(key))
        {
            let mut shards: Vec<Table> = (0..SHARDS)
                .map(|_| Table::with_capacity_and_hasher(2 * SPLIT_AT / SHARDS, Default::default()))
                .collect();
            for (k, v) in t.drain() {
                shards[shard(k.get())].insert(k, v);
            }
            self.minutes = Tables::Split(shards.into_boxed_slice());
        }
        self.table_mut(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: keys spread over all 128 bits.
    struct Keys(u64);
    impl Keys {
        fn next64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn random(&mut self) -> u128 {
            (u128::from(self.next64()) << 64) | u128::from(self.next64())
        }
    }

    /// Against one plain table as the reference, across the split, with
    /// whole minutes, marked values (odd) and minutes past 2^32.
    #[test]
    fn behaves_as_one_table_across_the_split() {
        let mut rng = Keys(58);
        let mut m = DedupeMap::default();
        let mut reference: hashbrown::HashMap<u128, Millis> = Default::default();
        let value = |i: usize| -> Millis {
            let minute = (i as Millis) * MINUTE_MS;
            match i % 17 {
                0 => minute | 1,
                1 => (1 << 40) * MINUTE_MS,
                2 => minute + 7,
                _ => minute,
            }
        };
        for i in 0..(3 * SPLIT_AT) {
            let k = rng.random();
            let v = value(i);
            assert_eq!(m.insert(k, v), reference.insert(k, v));
            if i % 7 == 0 {
                // The same key again, with another kind of value.
                let v2 = value(i + 1);
                assert_eq!(m.insert(k, v2), reference.insert(k, v2));
            }
            if i % 11 == 0 {
                let gone = *reference.keys().next().unwrap();
                assert_eq!(m.remove(&gone), reference.remove(&gone));
            }
            if i % 13 == 0 {
                let k2 = rng.random();
                let v2 = value(i + 3);
                assert_eq!(
                    m.insert_if_absent(k2, v2),
                    *reference.entry(k2).or_insert(v2)
                );
                assert_eq!(m.insert_if_absent(k2, 5), *reference.entry(k2).or_insert(5));
            }
        }
        assert!(matches!(m.minutes, Tables::Split(_)));
        assert!(!m.odd.is_empty());
        assert_eq!(m.len(), reference.len());
        for (k, v) in &reference {
            assert_eq!(m.get(k), Some(*v));
        }
        assert_eq!(m.get(&rng.random()), None);
        let cut = 2 * SPLIT_AT as Millis * 30_000;
        m.retain(|_, v| v < cut);
        reference.retain(|_, v| *v < cut);
        let mut a: Vec<_> = m.iter().collect();
        let mut b: Vec<_> = reference.iter().map(|(k, v)| (*k, *v)).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert_eq!(m.is_empty(), b.is_empty());
    }

    #[test]
    fn an_entry_takes_twenty_bytes() {
        assert_eq!(std::mem::size_of::<(Key, u32)>(), 20);
        assert_eq!(Key::of(u128::MAX - 5).get(), u128::MAX - 5);
    }
}
