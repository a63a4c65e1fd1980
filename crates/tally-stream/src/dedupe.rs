//! One clock's dedupe entries: event key → the minute of its window.
//!
//! A hash table grows by doubling, and the doubling copies every entry
//! while the processor holds the rollup store's write lock: at a few
//! million entries that was a 130 ms stall of every metrics read and of
//! freshness. Past [`SPLIT_AT`] entries the table is split into
//! [`SHARDS`] tables by the key's top bits, so each doubling copies a
//! sixty-fourth as much. Small clocks (most tenants) keep one table and
//! pay nothing for the shards.

use hashbrown::hash_map::Entry;
use tally_store::sketch::IdentityHasher;
use tally_types::time::Millis;

type Table = hashbrown::HashMap<u128, Millis, std::hash::BuildHasherDefault<IdentityHasher>>;

/// Tables of a split map.
pub(crate) const SHARDS: usize = 64;

/// Entries at which one table becomes [`SHARDS`].
pub(crate) const SPLIT_AT: usize = 1 << 16;

#[derive(Debug, Clone)]
pub(crate) enum DedupeMap {
    One(Table),
    Split(Box<[Table]>),
}

impl Default for DedupeMap {
    fn default() -> Self {
        DedupeMap::One(Table::default())
    }
}

/// The shard of `key`: its top bits (the tables hash by the low ones).
#[inline]
fn shard(key: u128) -> usize {
    (key >> 122) as usize % SHARDS
}

impl DedupeMap {
    #[inline]
    pub(crate) fn get(&self, key: &u128) -> Option<&Millis> {
        match self {
            DedupeMap::One(t) => t.get(key),
            DedupeMap::Split(s) => s[shard(*key)].get(key),
        }
    }

    #[inline]
    pub(crate) fn insert(&mut self, key: u128, value: Millis) -> Option<Millis> {
        self.table_for(key).insert(key, value)
    }

    #[inline]
    pub(crate) fn entry(
        &mut self,
        key: u128,
    ) -> Entry<'_, u128, Millis, std::hash::BuildHasherDefault<IdentityHasher>> {
        self.table_for(key).entry(key)
    }

    pub(crate) fn remove(&mut self, key: &u128) -> Option<Millis> {
        match self {
            DedupeMap::One(t) => t.remove(key),
            DedupeMap::Split(s) => s[shard(*key)].remove(key),
        }
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&u128, &mut Millis) -> bool) {
        match self {
            DedupeMap::One(t) => t.retain(keep),
            DedupeMap::Split(s) => s.iter_mut().for_each(|t| t.retain(&mut keep)),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u128, &Millis)> {
        let (one, split) = match self {
            DedupeMap::One(t) => (Some(t), None),
            DedupeMap::Split(s) => (None, Some(s.iter().flat_map(|t| t.iter()))),
        };
        one.into_iter()
            .flat_map(|t| t.iter())
            .chain(split.into_iter().flatten())
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            DedupeMap::One(t) => t.len(),
            DedupeMap::Split(s) => s.iter().map(Table::len).sum(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table `key` goes in, splitting one grown past [`SPLIT_AT`].
    #[inline]
    fn table_for(&mut self, key: u128) -> &mut Table {
        if let DedupeMap::One(t) = self
            && t.len() >= SPLIT_AT
            && !t.contains_key(&key)
        {
            let mut shards: Vec<Table> = (0..SHARDS)
                .map(|_| Table::with_capacity_and_hasher(2 * SPLIT_AT / SHARDS, Default::default()))
                .collect();
            for (k, v) in t.drain() {
                shards[shard(k)].insert(k, v);
            }
            *self = DedupeMap::Split(shards.into_boxed_slice());
        }
        match self {
            DedupeMap::One(t) => t,
            DedupeMap::Split(s) => &mut s[shard(key)],
        }
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

    /// Against one plain table as the reference, across the split.
    #[test]
    fn behaves_as_one_table_across_the_split() {
        let mut rng = Keys(58);
        let mut m = DedupeMap::default();
        let mut reference = Table::default();
        for i in 0..(3 * SPLIT_AT) {
            let k = rng.random();
            let v = (i as Millis) * 60_000;
            assert_eq!(m.insert(k, v), reference.insert(k, v));
            if i % 7 == 0 {
                assert_eq!(m.insert(k, v + 1), reference.insert(k, v + 1));
            }
            if i % 11 == 0 {
                let gone = *reference.keys().next().unwrap();
                assert_eq!(m.remove(&gone), reference.remove(&gone));
            }
            if i % 13 == 0 {
                let k2 = rng.random();
                assert_eq!(*m.entry(k2).or_insert(5), *reference.entry(k2).or_insert(5));
            }
        }
        assert!(matches!(m, DedupeMap::Split(_)));
        assert_eq!(m.len(), reference.len());
        for (k, v) in &reference {
            assert_eq!(m.get(k), Some(v));
        }
        assert_eq!(m.get(&rng.random()), None);
        let cut = 2 * SPLIT_AT as Millis * 30_000;
        m.retain(|_, v| *v < cut);
        reference.retain(|_, v| *v < cut);
        let mut a: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
        let mut b: Vec<_> = reference.iter().map(|(k, v)| (*k, *v)).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert_eq!(m.is_empty(), b.is_empty());
    }
}
