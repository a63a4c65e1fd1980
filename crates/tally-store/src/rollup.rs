//! Minute rollups per (tenant, event_type) and the metrics query over them.
//!
//! The store holds one [`Agg`] per tenant, UTC minute and event type; coarser
//! granularities (5m, 1h, 1d) are answered by merging minutes, so every
//! granularity sees the same events. Open windows are included as they are.
//!
//! # Downsampling
//!
//! Minutes older than the minute retention are folded into hour buckets
//! ([`RollupStore::downsample`]). One horizon splits the two tiers: every
//! minute held is at or after [`RollupStore::downsampled_to`], every hour
//! held is before it, so no event is counted in both. Queries at 1h and 1d
//! read both tiers; 1m and 5m queries read minutes only (an hour cannot be
//! split). Hours before [`RollupStore::hours_from`] have been dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tally_types::bin::{Dec, DecodeError, Enc};
use tally_types::time::{DAY_MS, HOUR_MS, MINUTE_MS, Millis, align_down};
use tally_types::{EventView, stable_hash};

use crate::dims::{self, Dimensions, MAX_DIMS, OTHER};

/// Numeric properties of one event taken in one pass (more: the slower
/// path that reads them again per aggregate).
const MAX_NUMS: usize = 16;
use crate::sketch::{DdSketch, ExactSum, Hll};

/// Aggregates of one numeric property.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NumAgg {
    pub count: u64,
    pub sum: ExactSum,
    pub min: f64,
    pub max: f64,
    pub sketch: DdSketch,
}

impl NumAgg {
    #[inline]
    pub fn add(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum.add(v);
        self.sketch.insert(v);
    }

    pub fn merge(&mut self, o: &NumAgg) {
        self.merge_exact(o);
        self.sketch.merge(&o.sketch);
    }

    /// Merges count, sum, min and max only (queries that need no quantile).
    pub fn merge_exact(&mut self, o: &NumAgg) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            self.min = o.min;
            self.max = o.max;
        } else {
            self.min = self.min.min(o.min);
            self.max = self.max.max(o.max);
        }
        self.count += o.count;
        self.sum.merge(&o.sum);
    }
}

/// Numeric properties aggregated per (tenant, minute, event type): a
/// client inventing property names cannot grow an aggregate, nor the
/// search of its properties, without end. Values of properties past it
/// are not aggregated (counted by [`RollupStore::properties_dropped`]);
/// the raw events keep them.
pub const MAX_PROPERTIES: usize = 128;

/// True when `within` (if given) holds property `k`.
#[inline]
fn taken(within: Option<&[(Box<str>, NumAgg)]>, k: &str) -> bool {
    within.is_none_or(|w| w.iter().any(|(n, _)| &**n == k))
}

/// Aggregates per combination of dimension values (see [`crate::dims`]).
pub type DimAggs = hashbrown::HashMap<Box<str>, Agg>;

/// Everything kept for one (tenant, minute, event type).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub users: Hll,
    pub sessions: Hll,
    /// Numeric properties, in first-seen order (few per event type).
    pub props: Vec<(Box<str>, NumAgg)>,
    /// The same aggregates split by the tenant's dimensions: one per
    /// combination of values that occurred (empty when the tenant declares
    /// none). Their counts add up to `count`; the aggregates inside have
    /// no `by` of their own.
    pub by: DimAggs,
}

impl Agg {
    /// Adds one event; answers how many of its numeric values were not
    /// aggregated (their property would be past [`MAX_PROPERTIES`]).
    #[inline]
    pub fn add(&mut self, e: &EventView<'_>) -> u64 {
        let uh = e.user_id.map(|u| stable_hash(&[u.as_bytes()]));
        let sh = e.session_id.map(|s| stable_hash(&[s.as_bytes()]));
        self.add_hashed(e, uh, sh)
    }

    /// One event given by its user and session hashes and its numeric
    /// properties (answer as [`Agg::add`]).
    #[inline]
    pub fn add_nums(&mut self, uh: Option<u64>, sh: Option<u64>, nums: &[(&str, f64)]) -> u64 {
        self.add_nums_within(uh, sh, nums, None)
    }

    /// [`Agg::add_nums`] taking only the properties `within` holds, if
    /// given (a combination takes what its total took).
    #[inline]
    pub fn add_nums_within(
        &mut self,
        uh: Option<u64>,
        sh: Option<u64>,
        nums: &[(&str, f64)],
        within: Option<&[(Box<str>, NumAgg)]>,
    ) -> u64 {
        self.add_ids(uh, sh);
        let mut dropped = 0;
        for &(k, x) in nums {
            if taken(within, k) && !self.add_num(k, x) {
                dropped += 1;
            }
        }
        dropped
    }

    #[inline]
    fn add_ids(&mut self, uh: Option<u64>, sh: Option<u64>) {
        self.count += 1;
        if let Some(u) = uh {
            self.users.insert(u);
        }
        if let Some(s) = sh {
            self.sessions.insert(s);
        }
    }

    /// Adds one value of numeric property `k`; false when the aggregate
    /// holds [`MAX_PROPERTIES`] others already.
    #[inline]
    fn add_num(&mut self, k: &str, x: f64) -> bool {
        let full = self.props.len() >= MAX_PROPERTIES;
        match self.props.iter_mut().find(|(name, _)| &**name == k) {
            Some((_, n)) => n.add(x),
            None if full => return false,
            None => {
                let mut n = NumAgg::default();
                n.add(x);
                self.props.push((k.into(), n));
            }
        }
        true
    }

    /// [`Agg::add`] with the user and session hashes already computed.
    #[inline]
    pub fn add_hashed(&mut self, e: &EventView<'_>, uh: Option<u64>, sh: Option<u64>) -> u64 {
        self.add_hashed_within(e, uh, sh, None)
    }

    /// [`Agg::add_hashed`] taking only the properties `within` holds, if
    /// given.
    #[inline]
    pub fn add_hashed_within(
        &mut self,
        e: &EventView<'_>,
        uh: Option<u64>,
        sh: Option<u64>,
        within: Option<&[(Box<str>, NumAgg)]>,
    ) -> u64 {
        self.add_ids(uh, sh);
        let mut dropped = 0;
        for (k, v) in e.props() {
            if let Some(x) = v.as_f64()
                && taken(within, k)
                && !self.add_num(k, x)
            {
                dropped += 1;
            }
        }
        dropped
    }

    pub fn merge(&mut self, o: &Agg) {
        self.merge_flat(o);
        for (k, a) in &o.by {
            match self.by.get_mut(k) {
                Some(m) => m.merge(a),
                None => {
                    self.by.insert(k.clone(), a.clone());
                }
            }
        }
    }

    /// [`Agg::merge`] without the combinations (a caller that keeps its
    /// own breakdown).
    pub fn merge_flat(&mut self, o: &Agg) {
        self.count += o.count;
        self.users.merge(&o.users);
        self.sessions.merge(&o.sessions);
        for (k, n) in &o.props {
            let full = self.props.len() >= MAX_PROPERTIES;
            match self.props.iter_mut().find(|(name, _)| name == k) {
                Some((_, m)) => m.merge(n),
                None if full => {}
                None => self.props.push((k.clone(), n.clone())),
            }
        }
    }

    pub fn prop(&self, name: &str) -> Option<&NumAgg> {
        self.props
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, n)| n)
    }

    pub fn heap_bytes(&self) -> usize {
        self.users.heap_bytes()
            + self.sessions.heap_bytes()
            + self
                .props
                .iter()
                .map(|(k, n)| k.len() + 64 + n.sketch.heap_bytes())
                .sum::<usize>()
            + self
                .by
                .iter()
                .map(|(k, a)| k.len() + 48 + std::mem::size_of::<Agg>() + a.heap_bytes())
                .sum::<usize>()
    }
}

/// The aggregates of one minute, per event type.
#[derive(Clone, Debug, Default)]
pub struct MinuteBucket {
    pub types: Vec<(Box<str>, Agg)>,
    /// The values of each dimension the bucket holds (what the cap counts),
    /// read from `types` when first needed and kept in step by
    /// [`RollupStore::add`]; anything else that changes `types` drops it.
    seen: Option<Box<Seen>>,
    /// Totals per combination of one or two dimensions, derived from the
    /// full combinations when a query first names those dimensions
    /// ([`MinuteBucket::marginal`]); dropped whenever `types` changes.
    margs: std::sync::OnceLock<Margs>,
}

/// A bucket's totals per combination of a few of its tenant's dimensions
/// `dims`: per subset (each dimension alone, then each pair; see
/// [`subset_index`]), a table made when a query first asks for it, of
/// one [`Marginal`] per row (an event type, same order as `types`, or all
/// of them) and [`Part`], each built when first asked.
#[derive(Clone, Debug)]
struct Margs {
    dims: Box<[Box<str>]>,
    per: Box<[std::sync::OnceLock<Table>]>,
}

/// One subset's totals: per row and [`Part`], built when first asked.
type Table = Box<[std::sync::OnceLock<Marginal>]>;

/// Dimensions whose combinations a bucket keeps totals for (more walk
/// the full combinations).
pub const MARGINAL_DIMS: usize = 2;

/// The index of a subset of one or two dimension positions among `n`:
/// each alone (`0..n`), then each pair `(i, j)`, `i < j`.
fn subset_index(positions: &[usize], n: usize) -> Option<usize> {
    match *positions {
        [i] if i < n => Some(i),
        [i, j] if i < j && j < n => Some(n + i * (2 * n - i - 1) / 2 + (j - i - 1)),
        _ => None,
    }
}

/// The totals of one (bucket, row) per combination of values of a subset
/// of dimensions, keyed like the full combinations but with only those
/// dimensions (`""`: events with none of them), in no particular order.
/// The aggregates have no `by`; their counts add up to the row's.
///
/// Laid out for the query that reads a day of them: the keys' texts sit
/// back to back in one string, each entry carries its key's hash.
#[derive(Clone, Debug, Default)]
pub struct Marginal {
    text: String,
    entries: Vec<MarginalEntry>,
}

#[derive(Clone, Debug)]
struct MarginalEntry {
    /// [`Marginal::hash`] of the key.
    hash: u64,
    /// The key is `text[start..start + len]`.
    start: u32,
    len: u32,
    agg: Agg,
}

impl Marginal {
    /// The hash an entry carries for its key.
    #[inline]
    pub fn hash(key: &str) -> u64 {
        stable_hash(&[key.as_bytes()])
    }

    /// (key hash, key, totals) per combination.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &str, &Agg)> {
        self.entries.iter().map(|e| {
            let k = self
                .text
                .get(e.start as usize..(e.start + e.len) as usize)
                .unwrap_or_default();
            (e.hash, k, &e.agg)
        })
    }

    fn push(&mut self, key: &str, agg: Agg) {
        let start = self.text.len() as u32;
        self.text.push_str(key);
        self.entries.push(MarginalEntry {
            hash: Marginal::hash(key),
            start,
            len: key.len() as u32,
            agg,
        });
    }
}

/// Per dimension name, the distinct values held (never [`OTHER`]).
type Seen = Vec<(Box<str>, hashbrown::HashSet<Box<str>>)>;

/// Buckets are equal when their aggregates are (`seen` is derived).
impl PartialEq for MinuteBucket {
    fn eq(&self, o: &Self) -> bool {
        self.types == o.types
    }
}

impl MinuteBucket {
    #[inline]
    pub fn agg_mut(&mut self, event_type: &str) -> &mut Agg {
        self.seen = None;
        self.agg_entry(event_type)
    }

    /// The event type an event of `event_type` is counted under: itself
    /// while the bucket holds it or fewer than `max` types, else
    /// [`dims::OTHER_TYPE`].
    #[inline]
    pub fn type_for<'a>(&self, event_type: &'a str, max: usize) -> &'a str {
        if self.types.len() < max || self.types.iter().any(|(t, _)| &**t == event_type) {
            event_type
        } else {
            dims::OTHER_TYPE
        }
    }

    /// The combinations held, over every event type.
    pub fn combinations(&self) -> usize {
        self.types.iter().map(|(_, a)| a.by.len()).sum()
    }

    /// Merges `agg` into event type `ty`, keeping at most
    /// `dims.max_combinations` combinations: past that, a combination not
    /// held yet is merged into its all-[`OTHER`] one (see [`crate::dims`]).
    pub fn merge_capped(&mut self, ty: &str, agg: &Agg, dims: &Dimensions) {
        let mut held = self.combinations();
        let dst = self.agg_mut(ty);
        dst.merge_flat(agg);
        let mut other = String::new();
        for (k, a) in &agg.by {
            if let Some(m) = dst.by.get_mut(k) {
                m.merge(a);
                continue;
            }
            if held < dims.max_combinations {
                dst.by.insert(k.clone(), a.clone());
                held += 1;
                continue;
            }
            dims.note_folded(dims::fold_all(k, &mut other));
            dims.note_combination_folded();
            match dst.by.get_mut(other.as_str()) {
                Some(m) => m.merge(a),
                None => {
                    dst.by.insert(other.as_str().into(), a.clone());
                    held += 1;
                }
            }
        }
    }

    /// The totals of event type `types[ty]` (or, with `None`, of all
    /// event types together) per combination of values of `dims` (one or
    /// two dimensions), built from the full combinations on first use and
    /// kept until the bucket changes. `names` are the dimensions the
    /// tenant declares; `None` when `dims` are not one or two of them.
    /// Only the `part` of each total that `part`'s metrics read is kept.
    pub fn marginal(
        &self,
        ty: Option<usize>,
        dims: &[&str],
        names: &[Box<str>],
        part: Part,
    ) -> Option<&Marginal> {
        let row = match ty {
            Some(t) if t < self.types.len() => t,
            Some(_) => return None,
            None => self.types.len(),
        };
        let margs = self.margs.get_or_init(|| Margs {
            dims: names.into(),
            // Each dimension alone, then each pair.
            per: (0..names.len() + names.len() * names.len().saturating_sub(1) / 2)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        });
        // The subset in declared order, so (device, country) and
        // (country, device) share their totals.
        if dims.is_empty() || dims.len() > MARGINAL_DIMS {
            return None;
        }
        let mut positions = [0; MARGINAL_DIMS];
        for (p, d) in positions.iter_mut().zip(dims) {
            *p = margs.dims.iter().position(|n| &**n == *d)?;
        }
        let positions = &mut positions[..dims.len()];
        positions.sort_unstable();
        let subset = subset_index(positions, margs.dims.len())?;
        let table = margs.per.get(subset)?.get_or_init(|| {
            (0..(self.types.len() + 1) * Part::COUNT)
                .map(|_| std::sync::OnceLock::new())
                .collect()
        });
        let slot = table.get(row * Part::COUNT + part as usize)?;
        Some(slot.get_or_init(|| {
            let names: Vec<&str> = positions.iter().map(|&i| &*margs.dims[i]).collect();
            match ty {
                Some(t) => marginal_of(std::iter::once(&self.types[t].1), &names, part),
                None => marginal_of(self.types.iter().map(|(_, a)| a), &names, part),
            }
        }))
    }

    #[inline]
    fn agg_entry(&mut self, event_type: &str) -> &mut Agg {
        self.margs.take();
        let i = match self.types.iter().position(|(t, _)| &**t == event_type) {
            Some(i) => i,
            None => {
                self.types.push((event_type.into(), Agg::default()));
                self.types.len() - 1
            }
        };
        &mut self.types[i].1
    }

    /// Builds the key of a combination of `names` into `key` from the
    /// event's values, folding values past the cap into [`OTHER`];
    /// answers how many were folded.
    fn combination(
        &mut self,
        vals: &[Option<std::borrow::Cow<'_, str>>],
        names: &[Box<str>],
        dims: &Dimensions,
        key: &mut String,
    ) -> u64 {
        key.clear();
        let seen = self.seen(names);
        let mut folded = 0;
        for (i, v) in vals.iter().enumerate().take(names.len()) {
            let Some(v) = v else { continue };
            let set = &mut seen[i].1;
            let v: &str = if v.len() > dims.max_value_bytes {
                folded += 1;
                OTHER
            } else if v == OTHER || set.contains(&**v) {
                v
            } else if set.len() < dims.max_values {
                set.insert((**v).into());
                v
            } else {
                folded += 1;
                OTHER
            };
            dims::push_pair(key, &names[i], v);
        }
        folded
    }

    /// The values held per dimension of `names`, read from the
    /// combinations if not known yet.
    fn seen(&mut self, names: &[Box<str>]) -> &mut Seen {
        let fresh = self
            .seen
            .as_ref()
            .is_none_or(|s| s.len() != names.len() || s.iter().zip(names).any(|(a, b)| a.0 != *b));
        if fresh {
            let mut seen: Seen = names
                .iter()
                .map(|n| (n.clone(), hashbrown::HashSet::new()))
                .collect();
            for (_, agg) in &self.types {
                for key in agg.by.keys() {
                    for (n, v) in dims::pairs(key) {
                        if v == OTHER {
                            continue;
                        }
                        if let Some((_, set)) = seen.iter_mut().find(|(d, _)| &**d == n)
                            && !set.contains(v)
                        {
                            set.insert(v.into());
                        }
                    }
                }
            }
            self.seen = Some(Box::new(seen));
        }
        match self.seen.as_mut() {
            Some(s) => s,
            None => unreachable!("set above"),
        }
    }
}

impl NumAgg {
    pub fn encode(&self, e: &mut Enc) {
        e.u64(self.count);
        self.sum.encode(e);
        e.f64(self.min);
        e.f64(self.max);
        self.sketch.encode(e);
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<NumAgg, DecodeError> {
        Ok(NumAgg {
            count: d.u64()?,
            sum: ExactSum::decode(d)?,
            min: d.f64()?,
            max: d.f64()?,
            sketch: DdSketch::decode(d)?,
        })
    }
}

/// Bit of an aggregate's property count saying a dimension section follows
/// its properties (aggregates without one encode as they always did).
const BY_FLAG: u32 = 1 << 31;

impl Agg {
    /// ```text
    /// agg   := count:u64 users:hll sessions:hll nprops:u32 prop* by?
    /// prop  := name:str num
    /// by    := n:u32 (key:str agg)*    present when bit 31 of nprops is
    ///                                  set; keys sorted; inner aggs have none
    /// ```
    pub fn encode(&self, e: &mut Enc) {
        e.u64(self.count);
        self.users.encode(e);
        self.sessions.encode(e);
        let flag = if self.by.is_empty() { 0 } else { BY_FLAG };
        e.u32(self.props.len() as u32 | flag);
        for (k, n) in &self.props {
            e.str(k);
            n.encode(e);
        }
        if !self.by.is_empty() {
            let mut keys: Vec<(&Box<str>, &Agg)> = self.by.iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
            e.u32(keys.len() as u32);
            for (k, a) in keys {
                e.str(k);
                a.encode(e);
            }
        }
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<Agg, DecodeError> {
        Agg::decode_in(d, true)
    }

    /// The aggregate in parts whose encodings take at most about `limit`
    /// bytes each. The pieces — the users sketch, the sessions sketch,
    /// each numeric property, each combination (in key order) — are
    /// packed in that order; the first part also holds the count, every
    /// other part a count of 0 and empty sketches besides its pieces.
    /// Merging the parts ([`Agg::merge`]) gives the aggregate back. A
    /// piece larger than `limit` (a combination holding wide sketches) is
    /// a part of its own; an aggregate that fits is one part (a caller
    /// that has the encoding checks its size first: splitting measures
    /// every piece).
    pub fn split(&self, limit: usize) -> Vec<Agg> {
        let mut scratch = Enc::new();
        enum Piece<'a> {
            Users,
            Sessions,
            Prop(&'a str, &'a NumAgg),
            Combo(&'a str, &'a Agg),
        }
        let mut combos: Vec<(&Box<str>, &Agg)> = self.by.iter().collect();
        combos.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let pieces = [Piece::Users, Piece::Sessions]
            .into_iter()
            .chain(self.props.iter().map(|(k, n)| Piece::Prop(k, n)))
            .chain(combos.into_iter().map(|(k, a)| Piece::Combo(k, a)));
        let empty = Agg::default();
        let mut len = |f: &dyn Fn(&mut Enc)| {
            scratch.buf.clear();
            f(&mut scratch);
            scratch.buf.len()
        };
        let empty_hll = len(&|e| empty.users.encode(e));
        // An empty part with combinations: its totals and their count.
        let base = len(&|e| empty.encode(e)) + 4;
        let mut parts = Vec::new();
        let mut part = Agg {
            count: self.count,
            ..Agg::default()
        };
        let (mut size, mut held) = (base, false);
        for piece in pieces {
            let n = match &piece {
                Piece::Users => len(&|e| self.users.encode(e)) - empty_hll,
                Piece::Sessions => len(&|e| self.sessions.encode(e)) - empty_hll,
                Piece::Prop(k, a) => len(&|e| {
                    e.str(k);
                    a.encode(e)
                }),
                Piece::Combo(k, a) => len(&|e| {
                    e.str(k);
                    a.encode(e)
                }),
            };
            if held && size + n > limit {
                parts.push(std::mem::take(&mut part));
                size = base;
            }
            match piece {
                Piece::Users => part.users = self.users.clone(),
                Piece::Sessions => part.sessions = self.sessions.clone(),
                Piece::Prop(k, a) => part.props.push((k.into(), a.clone())),
                Piece::Combo(k, a) => {
                    part.by.insert(k.into(), a.clone());
                }
            }
            size += n;
            held = true;
        }
        parts.push(part);
        parts
    }

    fn decode_in(d: &mut Dec<'_>, outer: bool) -> Result<Agg, DecodeError> {
        let count = d.u64()?;
        let users = Hll::decode(d)?;
        let sessions = Hll::decode(d)?;
        let raw = d.u32()?;
        let n = (raw & !BY_FLAG) as usize;
        if n.saturating_mul(4) > d.remaining() {
            return d.err("count larger than the data");
        }
        let mut props = Vec::with_capacity(n);
        for _ in 0..n {
            let k: Box<str> = d.str()?.into();
            props.push((k, NumAgg::decode(d)?));
        }
        let mut by = DimAggs::default();
        if raw & BY_FLAG != 0 {
            if !outer {
                return d.err("dimension aggregates inside dimension aggregates");
            }
            let n = d.count(16)?;
            by.reserve(n);
            for _ in 0..n {
                let k: Box<str> = d.str()?.into();
                by.insert(k, Agg::decode_in(d, false)?);
            }
        }
        Ok(Agg {
            count,
            users,
            sessions,
            props,
            by,
        })
    }
}

impl MinuteBucket {
    pub fn encode(&self, e: &mut Enc) {
        e.u32(self.types.len() as u32);
        for (t, a) in &self.types {
            e.str(t);
            a.encode(e);
        }
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<MinuteBucket, DecodeError> {
        let n = d.count(4)?;
        let mut types = Vec::with_capacity(n);
        for _ in 0..n {
            let t: Box<str> = d.str()?.into();
            types.push((t, Agg::decode(d)?));
        }
        Ok(MinuteBucket {
            types,
            seen: None,
            margs: Default::default(),
        })
    }
}

/// Which part of an aggregate a metric reads: totals per value keep only
/// that (a dashboard of counts does not pay for copies of sketches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Count, and per property count, sum, min and max.
    Exact = 0,
    /// Count and the users sketch.
    Users = 1,
    /// Count and the sessions sketch.
    Sessions = 2,
    /// Count and the properties with their quantile sketches.
    Quantiles = 3,
}

impl Part {
    /// How many parts there are.
    const COUNT: usize = 4;

    /// The part `metric` reads.
    pub fn of(metric: &Metric) -> Part {
        match metric {
            Metric::Count | Metric::Sum(_) | Metric::Avg(_) | Metric::Min(_) | Metric::Max(_) => {
                Part::Exact
            }
            Metric::UniqueUsers => Part::Users,
            Metric::UniqueSessions => Part::Sessions,
            Metric::Quantile(..) => Part::Quantiles,
        }
    }

    /// Merges `part` of `o` into `into`.
    fn merge(self, into: &mut Agg, o: &Agg) {
        into.count += o.count;
        match self {
            Part::Users => into.users.merge(&o.users),
            Part::Sessions => into.sessions.merge(&o.sessions),
            Part::Exact | Part::Quantiles => {
                for (k, n) in &o.props {
                    let i = match into.props.iter().position(|(name, _)| name == k) {
                        Some(i) => i,
                        None if into.props.len() >= MAX_PROPERTIES => continue,
                        None => {
                            into.props.push((k.clone(), NumAgg::default()));
                            into.props.len() - 1
                        }
                    };
                    if self == Part::Quantiles {
                        into.props[i].1.merge(n);
                    } else {
                        into.props[i].1.merge_exact(n);
                    }
                }
            }
        }
    }
}

/// The totals of `aggs` together per combination of values of `dims`
/// (see [`Marginal`]), `part` of them.
fn marginal_of<'a>(aggs: impl Iterator<Item = &'a Agg>, dims: &[&str], part: Part) -> Marginal {
    let flat = |a: &Agg| {
        let mut m = Agg::default();
        part.merge(&mut m, a);
        m
    };
    let mut out = Marginal::default();
    let mut index: hashbrown::HashMap<String, usize> = hashbrown::HashMap::new();
    let mut key = String::new();
    for agg in aggs {
        // Written before any dimension was declared: every event lacks them.
        let whole = (agg.by.is_empty() && agg.count > 0).then_some(("", agg));
        let combos = agg.by.iter().map(|(k, a)| (&**k, a)).chain(whole);
        for (full, a) in combos {
            key.clear();
            for d in dims {
                if let Some(v) = dims::value_of(full, d) {
                    dims::push_pair(&mut key, d, v);
                }
            }
            match index.get(key.as_str()) {
                Some(&i) => part.merge(&mut out.entries[i].agg, a),
                None => {
                    index.insert(key.clone(), out.entries.len());
                    out.push(&key, flat(a));
                }
            }
        }
    }
    out.text.shrink_to_fit();
    out.entries.shrink_to_fit();
    out
}

/// Rollups of one tenant: minutes, and the hours older minutes were folded into.
#[derive(Clone, Debug, Default)]
struct TenantRollups {
    minutes: BTreeMap<Millis, MinuteBucket>,
    hours: BTreeMap<Millis, MinuteBucket>,
    changes: Changes,
}

impl TenantRollups {
    /// The bucket an event of `minute` lands in, made if missing: its
    /// minute, or its hour once minutes before `downsampled_to` are folded.
    fn bucket_mut(&mut self, minute: Millis, downsampled_to: Millis) -> &mut MinuteBucket {
        if minute < downsampled_to {
            self.hours.entry(align_down(minute, HOUR_MS)).or_default()
        } else {
            self.minutes.entry(minute).or_default()
        }
    }
}

/// Which buckets of a tenant changed at which store version (for caches).
#[derive(Clone, Debug)]
struct Changes {
    /// Earliest minute touched since the last [`RollupStore::commit`]
    /// (`Millis::MAX`: none).
    pending: Millis,
    /// `(version, earliest minute touched)` per commit, oldest first.
    log: VecDeque<(u64, Millis)>,
    /// Versions before this fell out of `log`: nothing is known of them.
    floor: u64,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            pending: Millis::MAX,
            log: VecDeque::new(),
            floor: 0,
        }
    }
}

impl Changes {
    /// Notes a change from `minute` on; true if it is the tenant's first
    /// since the last commit (the tenant then joins the dirty list).
    fn touch(&mut self, minute: Millis) -> bool {
        let first = self.pending == Millis::MAX;
        self.pending = self.pending.min(minute);
        first
    }
}

/// Commits remembered per tenant for [`RollupStore::changed_since`].
pub(crate) const CHANGE_LOG: usize = 512;

/// Minute (and downsampled hour) rollups for every tenant.
#[derive(Clone, Debug)]
pub struct RollupStore {
    tenants: HashMap<Box<str>, TenantRollups>,
    /// Minutes before this (an hour boundary) live in hour buckets.
    downsampled_to: Millis,
    /// Hours before this were dropped by retention.
    hours_from: Millis,
    /// Bumped by every [`RollupStore::commit`] that follows a change.
    version: u64,
    /// Tenants touched since the last commit.
    dirty: Vec<Box<str>>,
    /// With [`RollupStore::track_deltas`]: what the events added since
    /// the last [`RollupStore::take_deltas`] added, per bucket.
    deltas: Option<Deltas>,
    /// The declared dimensions events are split by.
    dims: Dimensions,
    /// Closed buckets changed since the last commit, with their value
    /// before and when (see [`RollupStore::note_correction`]).
    corrected: hashbrown::HashMap<BucketKey, (Summary, Millis)>,
    /// Changes of closed buckets, oldest first, at most [`CHANGES_KEPT`].
    change_log: VecDeque<Change>,
    /// Versions at or before this fell out of `change_log`.
    change_floor: u64,
    /// Events applied behind a watermark, for session corrections.
    touches: crate::sessions::Touches,
    /// Sessions built as events are applied (off unless enabled).
    sessions: crate::SessionIndex,
    /// Session changes logged, ever (this process).
    session_changes_told: u64,
    /// Scratch space for combination keys.
    key: String,
    key2: String,
}

/// The aggregate of the events added since the deltas were last taken,
/// per bucket: merged into the bucket's value before them, it gives the
/// value after them (what a processor in Kafka mode publishes).
#[derive(Clone, Debug, Default)]
struct Deltas {
    map: hashbrown::HashMap<BucketKey, Agg>,
}

impl Deltas {
    #[inline]
    fn agg(&mut self, tenant: &str, minute: Millis, event_type: &str) -> &mut Agg {
        self.map
            .entry_ref(&KeyRef(tenant, minute, event_type))
            .or_default()
    }
}

/// Two stores are equal when they hold the same buckets and horizons
/// (change tracking for caches is not content).
impl PartialEq for RollupStore {
    fn eq(&self, o: &Self) -> bool {
        self.downsampled_to == o.downsampled_to
            && self.hours_from == o.hours_from
            && self.tenants.len() == o.tenants.len()
            && self.tenants.iter().all(|(k, t)| {
                o.tenants
                    .get(k)
                    .is_some_and(|u| t.minutes == u.minutes && t.hours == u.hours)
            })
    }
}

impl Default for RollupStore {
    fn default() -> Self {
        RollupStore {
            tenants: HashMap::new(),
            downsampled_to: Millis::MIN,
            hours_from: Millis::MIN,
            version: 0,
            dirty: Vec::new(),
            deltas: None,
            dims: Dimensions::default(),
            corrected: hashbrown::HashMap::new(),
            change_log: VecDeque::new(),
            change_floor: 0,
            touches: Default::default(),
            sessions: Default::default(),
            session_changes_told: 0,
            key: String::new(),
            key2: String::new(),
        }
    }
}

/// (tenant, minute, event type).
type BucketKey = (Box<str>, Millis, Box<str>);

/// A [`BucketKey`] without allocating: hashes and compares as one.
struct KeyRef<'a>(&'a str, Millis, &'a str);

impl std::hash::Hash for KeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // As the tuple `(Box<str>, Millis, Box<str>)` hashes.
        self.0.hash(h);
        self.1.hash(h);
        self.2.hash(h);
    }
}

impl hashbrown::Equivalent<BucketKey> for KeyRef<'_> {
    fn equivalent(&self, k: &BucketKey) -> bool {
        self.1 == k.1 && self.0 == &*k.0 && self.2 == &*k.2
    }
}

impl From<&KeyRef<'_>> for BucketKey {
    fn from(r: &KeyRef<'_>) -> BucketKey {
        (r.0.into(), r.1, r.2.into())
    }
}

/// Changes of closed buckets remembered for `GET /api/v1/changes`.
pub const CHANGES_KEPT: usize = 10_000;

/// The headline values of one bucket, as a change reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub unique_users: u64,
    pub unique_sessions: u64,
}

impl Summary {
    fn of(a: Option<&Agg>) -> Summary {
        a.map_or_else(Summary::default, |a| Summary {
            count: a.count,
            unique_users: a.users.estimate(),
            unique_sessions: a.sessions.estimate(),
        })
    }
}

/// Something published that changed afterwards, in the store's change
/// log (`GET /api/v1/changes`).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The store version the change became visible at.
    pub version: u64,
    pub tenant: Box<str>,
    /// When the change was appended (wall clock).
    pub at: Millis,
    pub what: Changed,
}

/// What changed.
#[derive(Clone, Debug, PartialEq)]
pub enum Changed {
    /// A closed (minute, event type) bucket: late events within the
    /// allowed lateness, a replay of late events, a backfill.
    Bucket {
        minute: Millis,
        event_type: Box<str>,
        old: Summary,
        new: Summary,
    },
    /// A closed session (worked out from the raw events afterwards).
    Session(Box<crate::SessionCorrection>),
}

/// What one [`RollupStore::downsample`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Downsampled {
    /// Minute buckets (tenant, minute) folded into hours.
    pub minutes_folded: usize,
    /// Hour buckets written (created or grown) by the fold.
    pub hours: Vec<(Box<str>, Millis)>,
}

/// A metric of the metrics API.
#[derive(Clone, Debug, PartialEq)]
pub enum Metric {
    Count,
    UniqueUsers,
    UniqueSessions,
    Sum(String),
    Avg(String),
    Min(String),
    Max(String),
    /// Quantile in (0, 1) of a property.
    Quantile(f64, String),
}

impl Metric {
    pub fn parse(s: &str) -> Result<Metric, QueryError> {
        let bad = || QueryError::BadParam {
            param: "metric",
            message: format!(
                "unknown metric {s:?}: use count, unique_users, unique_sessions, \
                 sum:<property>, avg:<property>, min:<property>, max:<property>, \
                 or a percentile p1:<property> … p99.9:<property> (p50, p90, p95, p99, …) \
                 (the metrics API also answers sessions, avg_session_duration, median_session_duration and bounce_rate)"
            ),
        };
        Ok(match s {
            "count" => Metric::Count,
            "unique_users" => Metric::UniqueUsers,
            "unique_sessions" => Metric::UniqueSessions,
            _ => {
                let Some((f, prop)) = s.split_once(':') else {
                    // `p95` or `sum` alone: a property is missing.
                    if matches!(s, "sum" | "avg" | "min" | "max") || percentile(s).is_some() {
                        return Err(QueryError::BadParam {
                            param: "metric",
                            message: format!(
                                "{s:?} needs a numeric property: write it as {s}:<property>, e.g. {s}:duration_ms"
                            ),
                        });
                    }
                    return Err(bad());
                };
                if prop.is_empty() {
                    return Err(QueryError::BadParam {
                        param: "metric",
                        message: format!("{s:?} names no property: write it as {f}:<property>"),
                    });
                }
                let prop = prop.to_string();
                match f {
                    "sum" => Metric::Sum(prop),
                    "avg" => Metric::Avg(prop),
                    "min" => Metric::Min(prop),
                    "max" => Metric::Max(prop),
                    _ => match percentile(f) {
                        Some(q) => Metric::Quantile(q, prop),
                        None => return Err(bad()),
                    },
                }
            }
        })
    }
}

/// `p<N>` with `0 < N < 100` (one decimal at most: p99.9) as a quantile.
fn percentile(f: &str) -> Option<f64> {
    let n = f.strip_prefix('p')?;
    if n.is_empty() || n.len() > 4 || !n.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return None;
    }
    if n.split_once('.').is_some_and(|(_, d)| d.len() != 1) {
        return None;
    }
    let v: f64 = n.parse().ok()?;
    (v > 0.0 && v < 100.0).then_some(v / 100.0)
}

/// Bucket width of a metrics query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    M1,
    M5,
    H1,
    D1,
}

impl Granularity {
    pub fn parse(s: &str) -> Result<Granularity, QueryError> {
        Ok(match s {
            "1m" => Granularity::M1,
            "5m" => Granularity::M5,
            "1h" => Granularity::H1,
            "1d" => Granularity::D1,
            _ => {
                return Err(QueryError::BadParam {
                    param: "granularity",
                    message: format!("unknown granularity {s:?}: use 1m, 5m, 1h or 1d"),
                });
            }
        })
    }

    pub fn ms(self) -> Millis {
        match self {
            Granularity::M1 => MINUTE_MS,
            Granularity::M5 => 5 * MINUTE_MS,
            Granularity::H1 => HOUR_MS,
            Granularity::D1 => DAY_MS,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::M1 => "1m",
            Granularity::M5 => "5m",
            Granularity::H1 => "1h",
            Granularity::D1 => "1d",
        }
    }
}

#[derive(Clone, Debug)]
pub struct MetricQuery {
    pub tenant: String,
    pub metric: Metric,
    pub start: Millis,
    pub end: Millis,
    pub granularity: Granularity,
    /// Empty: all event types.
    pub event_types: Vec<String>,
    /// Keys each series is split by, in order: `event_type` and declared
    /// dimensions (empty: one series).
    pub group_by: Vec<String>,
    /// Filters on declared dimensions other than the event type: each
    /// (dimension, values) admits events with one of the values; all
    /// filters must admit an event.
    pub filters: Vec<(String, Vec<String>)>,
    /// Sliding window: each point aggregates this much time ending at its
    /// bucket's end (a multiple of the granularity); None: its bucket.
    pub window: Option<Millis>,
    /// A ratio: each point divided by this metric for the same labels and
    /// bucket without the `event_types` and `filters` (see [`ratio`]).
    pub over: Option<Metric>,
}

impl MetricQuery {
    /// Adds a `where=<dimension>:<value>` filter (event types join
    /// `event_types`; values of one dimension are any-of).
    pub fn add_filter(&mut self, dim: &str, value: &str) {
        if dim == "event_type" {
            self.event_types.push(value.to_string());
        } else if let Some((_, vals)) = self.filters.iter_mut().find(|(d, _)| d == dim) {
            vals.push(value.to_string());
        } else {
            self.filters
                .push((dim.to_string(), vec![value.to_string()]));
        }
    }

    /// True when the query reads the per-combination aggregates.
    fn splits(&self) -> bool {
        !self.filters.is_empty() || self.group_by.iter().any(|g| g != "event_type")
    }

    /// The dimensions (besides the event type) the query groups or
    /// filters by, each once.
    fn named_dimensions(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let named = self
            .group_by
            .iter()
            .filter(|g| *g != "event_type")
            .chain(self.filters.iter().map(|(d, _)| d));
        for d in named {
            if !out.contains(&d.as_str()) {
                out.push(d);
            }
        }
        out
    }
}

/// A filter `<dimension>:<value>` (`where=` of the metrics API and of
/// alert rules), split into its dimension and value; whether the dimension
/// is declared is checked by the query.
pub fn parse_where(w: &str) -> Result<(String, String), String> {
    match w.split_once(':') {
        Some((d, v)) if !d.trim().is_empty() && !v.trim().is_empty() => {
            Ok((d.trim().to_string(), v.trim().to_string()))
        }
        _ => Err(format!(
            "{w:?} is not <dimension>:<value>, e.g. event_type:error or country:DE"
        )),
    }
}

/// A comma-separated `group_by` list, trimmed, without empty entries or
/// repeats.
pub fn parse_group_by(g: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for x in g.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        if !out.iter().any(|y| y == x) {
            out.push(x.to_string());
        }
    }
    out
}

/// A point value: integers stay integers on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The value of each grouped key, in `group_by` order (`None`: the
    /// events have no value for that dimension).
    pub labels: Vec<(String, Option<String>)>,
    pub points: Vec<(Millis, Value)>,
}

impl Series {
    /// The value of one label, if grouped by it and present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(i) => i as f64,
            Value::Float(f) => f,
        }
    }
}

/// Each point of `num` divided by the point of `den` with the same labels
/// and bucket (`over=`): no point where the denominator has none or is 0.
/// Where the numerator has no point but the denominator has, the ratio is
/// 0 for a metric that counts (`count`, distinct counts, `sum`: an empty
/// bucket is 0 of them), and no point otherwise.
fn ratio(num: Vec<Series>, den: &[Series], metric: &Metric) -> Vec<Series> {
    let counts = matches!(
        metric,
        Metric::Count | Metric::UniqueUsers | Metric::UniqueSessions | Metric::Sum(_)
    );
    let mut out: Vec<Series> = num
        .into_iter()
        .map(|s| {
            let n: BTreeMap<Millis, f64> = s.points.iter().map(|&(b, v)| (b, v.as_f64())).collect();
            let d = den.iter().find(|x| x.labels == s.labels);
            Series {
                points: divide(&n, d, counts),
                labels: s.labels,
            }
        })
        .collect();
    out.retain(|s| !s.points.is_empty() || s.labels.is_empty());
    out
}

fn divide(n: &BTreeMap<Millis, f64>, d: Option<&Series>, counts: bool) -> Vec<(Millis, Value)> {
    let Some(d) = d else {
        return Vec::new();
    };
    d.points
        .iter()
        .filter_map(|&(b, dv)| {
            let dv = dv.as_f64();
            if dv == 0.0 {
                return None;
            }
            let nv = match n.get(&b) {
                Some(&x) => x,
                None if counts => 0.0,
                None => return None,
            };
            Some((b, Value::Float(nv / dv)))
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("{param}: {message}")]
    BadParam {
        param: &'static str,
        message: String,
    },
}

/// Most buckets one query may return per series.
pub const MAX_BUCKETS: i64 = 100_000;

/// Accumulates one bucket of one series. A sketch is borrowed from the
/// store until a second aggregate joins it (most points of a breakdown
/// at its own granularity hold one).
#[derive(Clone)]
enum Acc<'a> {
    Count(u64),
    Distinct {
        events: u64,
        hll: Shared<'a, Hll>,
    },
    Num {
        events: u64,
        agg: Shared<'a, NumAgg>,
    },
}

/// A sketch borrowed from the store, or a boxed copy once merged into
/// (points stay a few words wide whatever the metric).
#[derive(Clone)]
enum Shared<'a, T> {
    Ref(&'a T),
    Own(Box<T>),
}

impl<T> std::ops::Deref for Shared<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Shared::Ref(r) => r,
            Shared::Own(b) => b,
        }
    }
}

impl<T: Clone> Shared<'_, T> {
    /// The value to merge into: a copy made by `copy` if still borrowed.
    fn own_with(&mut self, copy: impl FnOnce(&T) -> T) -> &mut T {
        if let Shared::Ref(r) = *self {
            *self = Shared::Own(Box::new(copy(r)));
        }
        match self {
            Shared::Own(b) => b,
            Shared::Ref(_) => unreachable!("made owned above"),
        }
    }

    fn own(&mut self) -> &mut T {
        self.own_with(T::clone)
    }
}

/// The count, sum, min and max of `n` without its sketch.
fn exact_copy(n: &NumAgg) -> NumAgg {
    let mut c = NumAgg::default();
    c.merge_exact(n);
    c
}

impl Acc<'_> {
    /// Adds another bucket's accumulator of the same metric (sketches
    /// merge: a window's distinct count or percentile is of its events,
    /// not an average of its buckets').
    fn merge(&mut self, o: &Acc<'_>, quantile: bool) {
        match (self, o) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::Distinct { events, hll }, Acc::Distinct { events: e, hll: h }) => {
                *events += e;
                hll.own().merge(h);
            }
            (Acc::Num { events, agg }, Acc::Num { events: e, agg: a }) => {
                *events += e;
                if quantile {
                    agg.own().merge(a);
                } else {
                    agg.own_with(exact_copy).merge_exact(a);
                }
            }
            _ => {}
        }
    }
}

impl RollupStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Splits events by these dimensions from now on.
    pub fn set_dimensions(&mut self, dims: Dimensions) {
        self.dims = dims;
    }

    pub fn dimensions(&self) -> &Dimensions {
        &self.dims
    }

    /// Dimension values folded into `__other__` by the cap so far (by
    /// every store sharing this store's declaration).
    pub fn values_folded(&self) -> u64 {
        self.dims.values_folded()
    }

    /// Events of new combinations counted under the all-`__other__` one
    /// (the combination cap).
    pub fn combinations_folded(&self) -> u64 {
        self.dims.combinations_folded()
    }

    /// A tenant's rollups, created if needed, marked as changed from
    /// `minute` on (until the next [`commit`](RollupStore::commit)).
    fn tenant_mut(&mut self, tenant: &str, minute: Millis) -> &mut TenantRollups {
        tenant_entry(&mut self.tenants, &mut self.dirty, tenant, minute)
    }

    /// Closes a batch of changes (the processor calls it after each record):
    /// the touched tenants get a new version, remembered with the earliest
    /// minute touched.
    pub fn commit(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        self.version += 1;
        let mut corrected: Vec<_> = self.corrected.drain().collect();
        corrected.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for ((tenant, minute, ty), (old, at)) in corrected {
            let new = Summary::of(self.agg(&tenant, minute, &ty));
            if new == old {
                continue;
            }
            self.log_change(Change {
                version: self.version,
                tenant,
                at,
                what: Changed::Bucket {
                    minute,
                    event_type: ty,
                    old,
                    new,
                },
            });
        }
        for name in std::mem::take(&mut self.dirty) {
            if let Some(t) = self.tenants.get_mut(&name) {
                let c = &mut t.changes;
                c.log.push_back((self.version, c.pending));
                c.pending = Millis::MAX;
                if c.log.len() > CHANGE_LOG
                    && let Some((v, _)) = c.log.pop_front()
                {
                    c.floor = v;
                }
            }
        }
    }

    /// Notes that an event is about to change `(tenant, minute, event
    /// type)`, a bucket its tenant's watermark already closed: the next
    /// [`commit`](RollupStore::commit) records the change with the value
    /// the bucket had before (taken once per commit) and the new one.
    pub fn note_correction(&mut self, tenant: &str, minute: Millis, event_type: &str, at: Millis) {
        if self
            .corrected
            .contains_key(&KeyRef(tenant, minute, event_type))
        {
            return;
        }
        let old = Summary::of(self.agg(tenant, minute, event_type));
        self.corrected
            .insert((tenant.into(), minute, event_type.into()), (old, at));
    }

    /// A tenant's changes (closed buckets and sessions) after version
    /// `since`, oldest first, at most `limit`; `complete` is false when
    /// changes after `since` fell out of the bounded log.
    pub fn changes_since(&self, tenant: &str, since: u64, limit: usize) -> (Vec<&Change>, bool) {
        let complete = since >= self.change_floor;
        let from = self.change_log.partition_point(|c| c.version <= since);
        let out = self
            .change_log
            .range(from..)
            .filter(|c| &*c.tenant == tenant)
            .take(limit)
            .collect();
        (out, complete)
    }

    /// Whether [`RollupStore::note_session_touch`] keeps touches (off by
    /// default: only a node that looks for session corrections takes them).
    pub fn track_session_touches(&mut self, on: bool) {
        self.touches.tracking = on;
        if !on {
            self.touches.list = Vec::new();
        }
    }

    /// Session changes logged by [`RollupStore::push_session_changes`],
    /// ever (this process).
    pub fn session_changes_told(&self) -> u64 {
        self.session_changes_told
    }

    /// The sessions built in the stream.
    pub fn sessions(&self) -> &crate::SessionIndex {
        &self.sessions
    }

    pub fn sessions_mut(&mut self) -> &mut crate::SessionIndex {
        &mut self.sessions
    }

    /// Whether touches are kept (see [`RollupStore::track_session_touches`]).
    pub fn tracks_session_touches(&self) -> bool {
        self.touches.tracking
    }

    /// Notes an event applied behind its tenant's watermark, for the
    /// session corrections task ([`RollupStore::take_session_touches`]).
    pub fn note_session_touch(&mut self, touch: crate::SessionTouch) {
        let t = &mut self.touches;
        if !t.tracking {
            return;
        }
        if t.list.len() >= crate::TOUCHES_KEPT {
            t.dropped += 1;
            return;
        }
        t.list.push(touch);
    }

    /// The touches noted since the last call, and how many were dropped
    /// meanwhile (more than [`crate::TOUCHES_KEPT`] waiting).
    pub fn take_session_touches(&mut self) -> (Vec<crate::SessionTouch>, u64) {
        let t = &mut self.touches;
        (std::mem::take(&mut t.list), std::mem::take(&mut t.dropped))
    }

    /// Appends a tenant's session corrections, under one new store version,
    /// a session changed several times among them told once.
    pub fn push_session_changes(
        &mut self,
        tenant: &str,
        at: Millis,
        corrections: Vec<crate::SessionCorrection>,
    ) {
        if corrections.is_empty() {
            return;
        }
        let corrections = crate::sessions::coalesce(corrections);
        self.version += 1;
        self.session_changes_told += corrections.len() as u64;
        for c in corrections {
            self.log_change(Change {
                version: self.version,
                tenant: tenant.into(),
                at,
                what: Changed::Session(Box::new(c)),
            });
        }
    }

    /// Appends to the bounded change log.
    fn log_change(&mut self, c: Change) {
        self.change_log.push_back(c);
        if self.change_log.len() > CHANGES_KEPT
            && let Some(c) = self.change_log.pop_front()
        {
            self.change_floor = c.version;
        }
    }

    /// Every tenant's changes after version `since`, oldest first, at most
    /// `limit` (alert rules judge the buckets among them again).
    pub fn all_changes_since(&self, since: u64, limit: usize) -> Vec<&Change> {
        let from = self.change_log.partition_point(|c| c.version <= since);
        self.change_log.range(from..).take(limit).collect()
    }

    /// The store's version: what a cache entry computed now is stamped with.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The earliest minute of `tenant` changed after version `v` (`None`:
    /// nothing changed; `Some(Millis::MIN)`: unknown, assume everything).
    /// A cached answer for `[start, end)` is still exact when this is
    /// `None` or at or after `end`.
    pub fn changed_since(&self, tenant: &str, v: u64) -> Option<Millis> {
        let c = &self.tenants.get(tenant)?.changes;
        if v < c.floor {
            return Some(Millis::MIN);
        }
        let mut min = (c.pending != Millis::MAX).then_some(c.pending);
        for &(ver, m) in c.log.iter().rev() {
            if ver <= v {
                break;
            }
            min = Some(min.map_or(m, |x| x.min(m)));
        }
        min
    }

    /// The aggregates of the event's (tenant, minute, type), created if
    /// needed; a minute already downsampled lands in its hour.
    #[inline]
    pub fn agg_mut(&mut self, tenant: &str, minute: Millis, event_type: &str) -> &mut Agg {
        let downsampled_to = self.downsampled_to;
        self.tenant_mut(tenant, minute)
            .bucket_mut(minute, downsampled_to)
            .agg_mut(event_type)
    }

    /// The event type [`RollupStore::add`] would count an event of
    /// `event_type` in `minute` under (see [`MinuteBucket::type_for`]).
    pub fn rollup_type<'a>(&self, tenant: &str, minute: Millis, event_type: &'a str) -> &'a str {
        self.bucket(tenant, minute).map_or(event_type, |b| {
            b.type_for(event_type, self.dims.max_event_types)
        })
    }

    /// The bucket an event of `minute` lands in: its minute, or its hour
    /// once downsampled.
    fn bucket(&self, tenant: &str, minute: Millis) -> Option<&MinuteBucket> {
        let t = self.tenants.get(tenant)?;
        if minute < self.downsampled_to {
            t.hours.get(&align_down(minute, HOUR_MS))
        } else {
            t.minutes.get(&minute)
        }
    }

    /// What the cardinality guards folded or left out so far.
    pub fn folds(&self) -> dims::Folds {
        self.dims.folds()
    }

    /// Numeric values not aggregated because their aggregate held
    /// [`MAX_PROPERTIES`] other properties.
    pub fn properties_dropped(&self) -> u64 {
        self.dims.properties_dropped()
    }

    /// Events of new event types counted under `__other__` (the event
    /// type cap).
    pub fn event_types_folded(&self) -> u64 {
        self.dims.event_types_folded()
    }

    /// Adds one event to its minute (or, once downsampled, its hour), and
    /// to its combination of the tenant's dimensions.
    #[inline]
    pub fn add(&mut self, e: &EventView<'_>) {
        let minute = align_down(e.ts, MINUTE_MS);
        let names = self.dims.of(e.tenant);
        if names.is_empty() {
            let ty = self.rollup_type(e.tenant, minute, e.event_type);
            if ty != e.event_type {
                self.dims.note_event_types_folded(1);
            }
            let uh = e.user_id.map(|u| stable_hash(&[u.as_bytes()]));
            let sh = e.session_id.map(|s| stable_hash(&[s.as_bytes()]));
            let agg = tenant_entry(&mut self.tenants, &mut self.dirty, e.tenant, minute)
                .bucket_mut(minute, self.downsampled_to)
                .agg_entry(ty);
            let dropped = agg.add_hashed(e, uh, sh);
            self.dims.note_properties_dropped(dropped);
            if let Some(d) = self.deltas.as_mut() {
                // The delta takes what the total took.
                let within = (dropped > 0).then_some(agg.props.as_slice());
                d.agg(e.tenant, minute, ty)
                    .add_hashed_within(e, uh, sh, within);
            }
            return;
        }
        // One pass over the properties: the dimension values, and the
        // numeric values both aggregates take.
        let mut vals: [Option<std::borrow::Cow<'_, str>>; MAX_DIMS] = Default::default();
        let mut nums: [(&str, f64); MAX_NUMS] = [("", 0.0); MAX_NUMS];
        let mut n_nums = 0;
        let mut all_nums = true;
        for (k, v) in e.props() {
            if let Some(x) = v.as_f64() {
                if n_nums < MAX_NUMS {
                    nums[n_nums] = (k, x);
                    n_nums += 1;
                } else {
                    all_nums = false;
                }
            }
            if let Some(i) = names.iter().position(|n| &**n == k)
                && vals[i].is_none()
            {
                vals[i] = dims::value_text(&v);
            }
        }
        let nums = &nums[..n_nums];
        // The key as the values are; a combination already held needs no
        // look at the cap (its values were admitted when it was made).
        let key = &mut self.key;
        key.clear();
        for (i, v) in vals.iter().enumerate().take(names.len()) {
            if let Some(v) = v {
                let v = if v.len() > self.dims.max_value_bytes {
                    OTHER
                } else {
                    v
                };
                dims::push_pair(key, &names[i], v);
            }
        }
        let bucket = tenant_entry(&mut self.tenants, &mut self.dirty, e.tenant, minute)
            .bucket_mut(minute, self.downsampled_to);
        let ty = bucket.type_for(e.event_type, self.dims.max_event_types);
        if ty != e.event_type {
            self.dims.note_event_types_folded(1);
        }
        let uh = e.user_id.map(|u| stable_hash(&[u.as_bytes()]));
        let sh = e.session_id.map(|s| stable_hash(&[s.as_bytes()]));
        let add = |agg: &mut Agg, within: Option<&[(Box<str>, NumAgg)]>| {
            if all_nums {
                agg.add_nums_within(uh, sh, nums, within)
            } else {
                agg.add_hashed_within(e, uh, sh, within)
            }
        };
        let agg = bucket.agg_entry(ty);
        let dropped = add(agg, None);
        self.dims.note_properties_dropped(dropped);
        // A combination takes the properties its total took (all of them
        // unless the total is full).
        let Agg { props, by, .. } = agg;
        if let Some(c) = by.get_mut(key.as_str()) {
            let within = (dropped > 0).then_some(props.as_slice());
            add(c, within);
            if let Some(d) = self.deltas.as_mut() {
                add_delta(d, e.tenant, minute, ty, key, within, add);
            }
            return;
        }
        let mut folded = bucket.combination(&vals, names, &self.dims, key);
        let held = bucket
            .types
            .iter()
            .any(|(t, a)| &**t == ty && a.by.contains_key(key.as_str()));
        if !held && bucket.combinations() >= self.dims.max_combinations {
            // A new combination past the cap: counted under the same
            // dimensions with every value folded.
            folded += dims::fold_all(key, &mut self.key2);
            std::mem::swap(key, &mut self.key2);
            self.dims.note_combination_folded();
        }
        self.dims.note_folded(folded);
        let Agg { props, by, .. } = bucket.agg_entry(ty);
        let within = (dropped > 0).then_some(props.as_slice());
        add(by.entry_ref(key.as_str()).or_default(), within);
        if let Some(d) = self.deltas.as_mut() {
            add_delta(d, e.tenant, minute, ty, key, within, add);
        }
    }

    /// Starts keeping what events add to each bucket (a processor that
    /// publishes its changes as deltas, as in Kafka mode). Buckets set or
    /// loaded whole ([`RollupStore::set_agg`]) are not deltas.
    pub fn track_deltas(&mut self) {
        self.deltas.get_or_insert_with(Deltas::default);
    }

    /// What the events added since the last call, per (tenant, minute,
    /// event type), sorted: merged into a bucket's value as it was at the
    /// last call, each gives the bucket's value now.
    pub fn take_deltas(&mut self) -> Vec<(BucketKey, Agg)> {
        let Some(d) = self.deltas.as_mut() else {
            return Vec::new();
        };
        let mut out: Vec<(BucketKey, Agg)> = d.map.drain().collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// One aggregate, if the bucket exists.
    pub fn agg(&self, tenant: &str, minute: Millis, event_type: &str) -> Option<&Agg> {
        self.bucket(tenant, minute)?
            .types
            .iter()
            .find(|(ty, _)| &**ty == event_type)
            .map(|(_, a)| a)
    }

    /// Replaces one aggregate (a materialized view of aggregates computed
    /// elsewhere); the change is visible after the next commit.
    pub fn set_agg(&mut self, tenant: &str, minute: Millis, event_type: &str, agg: Agg) {
        *self.agg_mut(tenant, minute, event_type) = agg;
    }

    /// Forgets a tenant's minutes before `cutoff` (a processor that no
    /// longer needs final minutes it has published). Answers how many.
    pub fn drop_minutes_before(&mut self, tenant: &str, cutoff: Millis) -> usize {
        self.take_minutes_before(tenant, cutoff).len()
    }

    /// Forgets every tenant's minutes before `cutoff`; answers how many.
    pub fn drop_all_minutes_before(&mut self, cutoff: Millis) -> usize {
        let mut gone = 0;
        for (name, t) in &mut self.tenants {
            if t.minutes
                .first_key_value()
                .is_none_or(|(&m, _)| m >= cutoff)
            {
                continue;
            }
            let keep = t.minutes.split_off(&cutoff);
            gone += std::mem::replace(&mut t.minutes, keep).len();
            if t.changes.touch(Millis::MIN) {
                self.dirty.push(name.clone());
            }
        }
        gone
    }

    /// As [`RollupStore::drop_minutes_before`], handing the minutes over.
    pub fn take_minutes_before(
        &mut self,
        tenant: &str,
        cutoff: Millis,
    ) -> BTreeMap<Millis, MinuteBucket> {
        let Some(t) = self.tenants.get_mut(tenant) else {
            return BTreeMap::new();
        };
        let keep = t.minutes.split_off(&cutoff);
        let gone = std::mem::replace(&mut t.minutes, keep);
        if !gone.is_empty() && t.changes.touch(Millis::MIN) {
            self.dirty.push(tenant.into());
        }
        gone
    }

    pub fn minute(&self, tenant: &str, minute: Millis) -> Option<&MinuteBucket> {
        self.tenants.get(tenant)?.minutes.get(&minute)
    }

    /// One downsampled hour of a tenant.
    pub fn hour(&self, tenant: &str, hour: Millis) -> Option<&MinuteBucket> {
        self.tenants.get(tenant)?.hours.get(&hour)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(|k| &**k)
    }

    /// Replaces (or inserts) one minute of a tenant (recovery, sealed rollups).
    pub fn set_minute(&mut self, tenant: &str, minute: Millis, bucket: MinuteBucket) {
        self.tenant_mut(tenant, minute)
            .minutes
            .insert(minute, bucket);
    }

    /// Replaces (or inserts) one downsampled hour of a tenant (recovery).
    pub fn set_hour(&mut self, tenant: &str, hour: Millis, bucket: MinuteBucket) {
        self.tenant_mut(tenant, hour).hours.insert(hour, bucket);
    }

    /// Minutes before this boundary have been folded into hours.
    pub fn downsampled_to(&self) -> Millis {
        self.downsampled_to
    }

    /// Hours before this boundary have been dropped.
    pub fn hours_from(&self) -> Millis {
        self.hours_from
    }

    /// Sets both horizons (recovery: the checkpoint names them).
    pub fn set_horizons(&mut self, downsampled_to: Millis, hours_from: Millis) {
        self.downsampled_to = downsampled_to;
        self.hours_from = hours_from;
    }

    /// Folds every minute before `cutoff` (rounded down to an hour) into
    /// its hour bucket. A cutoff at or before the current horizon does
    /// nothing.
    pub fn downsample(&mut self, cutoff: Millis) -> Downsampled {
        let cutoff = align_down(cutoff, HOUR_MS);
        let mut out = Downsampled::default();
        if cutoff <= self.downsampled_to {
            return out;
        }
        self.downsampled_to = cutoff;
        for (name, t) in &mut self.tenants {
            if t.minutes
                .first_key_value()
                .is_none_or(|(&m, _)| m >= cutoff)
            {
                continue;
            }
            if t.changes.touch(Millis::MIN) {
                self.dirty.push(name.clone());
            }
            let keep = t.minutes.split_off(&cutoff);
            let old = std::mem::replace(&mut t.minutes, keep);
            let mut last = None;
            for (m, bucket) in old {
                out.minutes_folded += 1;
                let h = align_down(m, HOUR_MS);
                let hb = t.hours.entry(h).or_default();
                for (ty, agg) in &bucket.types {
                    let into = hb.type_for(ty, self.dims.max_event_types);
                    if into != &**ty {
                        self.dims.note_event_types_folded(agg.count);
                    }
                    hb.merge_capped(into, agg, &self.dims);
                }
                if last != Some(h) {
                    last = Some(h);
                    out.hours.push((name.clone(), h));
                }
            }
        }
        out
    }

    /// Drops hour buckets (and any minute) before `cutoff`, rounded down to
    /// an hour; answers how many buckets went.
    pub fn drop_hours_before(&mut self, cutoff: Millis) -> usize {
        let cutoff = align_down(cutoff, HOUR_MS);
        if cutoff <= self.hours_from {
            return 0;
        }
        self.hours_from = cutoff;
        let mut dropped = 0;
        for (name, t) in &mut self.tenants {
            let keep = t.hours.split_off(&cutoff);
            let n = t.hours.len();
            t.hours = keep;
            let keep = t.minutes.split_off(&cutoff);
            let n = n + t.minutes.len();
            t.minutes = keep;
            if n > 0 {
                dropped += n;
                if t.changes.touch(Millis::MIN) {
                    self.dirty.push(name.clone());
                }
            }
        }
        self.downsampled_to = self.downsampled_to.max(cutoff);
        dropped
    }

    /// Every (tenant, hour, bucket) of the downsampled tier.
    pub fn hours_in(
        &self,
        from: Millis,
        to: Millis,
    ) -> impl Iterator<Item = (&str, Millis, &MinuteBucket)> {
        self.tenants
            .iter()
            .flat_map(move |(t, r)| span(&r.hours, from, to).map(move |(&h, b)| (&**t, h, b)))
    }

    /// One tenant's buckets in `[from, to)` merged per `step` (a multiple of
    /// a minute that divides or is divided by an hour): minutes, plus the
    /// downsampled hours when `step` is an hour or more.
    pub fn tenant_buckets(
        &self,
        tenant: &str,
        from: Millis,
        to: Millis,
        step: Millis,
    ) -> impl Iterator<Item = (Millis, &MinuteBucket)> {
        let hours = if step >= HOUR_MS {
            Some(self.tenants.get(tenant).into_iter().flat_map(move |r| {
                span(&r.hours, align_down(from, HOUR_MS), to).map(|(&h, b)| (h, b))
            }))
        } else {
            None
        };
        hours
            .into_iter()
            .flatten()
            .chain(self.tenant_minutes(tenant, from, to))
    }

    /// Every (tenant, minute, bucket) with `from <= minute < to`.
    pub fn minutes_in(
        &self,
        from: Millis,
        to: Millis,
    ) -> impl Iterator<Item = (&str, Millis, &MinuteBucket)> {
        self.tenants.iter().flat_map(move |(t, r)| {
            span(&r.minutes, from, to).map(move |(&minute, b)| (&**t, minute, b))
        })
    }

    /// One tenant's minutes in `[from, to)`.
    pub fn tenant_minutes(
        &self,
        tenant: &str,
        from: Millis,
        to: Millis,
    ) -> impl Iterator<Item = (Millis, &MinuteBucket)> {
        self.tenants
            .get(tenant)
            .into_iter()
            .flat_map(move |r| span(&r.minutes, from, to).map(|(&minute, b)| (minute, b)))
    }

    /// The first and last minute a tenant has minute data in.
    pub fn span(&self, tenant: &str) -> Option<(Millis, Millis)> {
        let m = &self.tenants.get(tenant)?.minutes;
        Some((*m.keys().next()?, *m.keys().next_back()?))
    }

    /// Number of (tenant, minute) and (tenant, hour) buckets held.
    pub fn bucket_count(&self) -> usize {
        self.tenants
            .values()
            .map(|t| t.minutes.len() + t.hours.len())
            .sum()
    }

    /// The metrics query: `q.metric` per bucket (or sliding window), or,
    /// with `q.over`, its ratio to that metric without the filters.
    pub fn query(&self, q: &MetricQuery) -> Result<Vec<Series>, QueryError> {
        let series = self.series(q)?;
        let Some(over) = &q.over else {
            return Ok(series);
        };
        let den = self.series(&MetricQuery {
            metric: over.clone(),
            event_types: Vec::new(),
            filters: Vec::new(),
            over: None,
            ..q.clone()
        })?;
        Ok(ratio(series, &den, &q.metric))
    }

    fn series(&self, q: &MetricQuery) -> Result<Vec<Series>, QueryError> {
        if q.end <= q.start {
            return Err(QueryError::BadParam {
                param: "end",
                message: "must be after start".into(),
            });
        }
        let g = q.granularity.ms();
        let first = align_down(q.start, g);
        let window = match q.window {
            None => g,
            Some(w) if w >= g && w % g == 0 => w,
            Some(w) => {
                return Err(QueryError::BadParam {
                    param: "window",
                    message: format!(
                        "{}: a window must be a whole number of buckets of the granularity ({}), e.g. granularity=1m&window=5m",
                        tally_types::time::human_ms(w),
                        q.granularity.as_str()
                    ),
                });
            }
        };
        // A point's window reaches back `window - g` before its bucket.
        let from = first - (window - g);
        let buckets = (q.end - from + g - 1) / g;
        if buckets > MAX_BUCKETS {
            return Err(QueryError::BadParam {
                param: "granularity",
                message: format!(
                    "the range holds {buckets} buckets of {} (at most {MAX_BUCKETS}); use a coarser granularity or a shorter range",
                    q.granularity.as_str()
                ),
            });
        }
        let dims = &self.dims;
        for g in &q.group_by {
            if !dims.declares(&q.tenant, g) {
                return Err(QueryError::BadParam {
                    param: "group_by",
                    message: format!(
                        "{g:?} is not a declared dimension; the declared dimensions are: {} (declare more under [dimensions] in the config)",
                        dims.describe(&q.tenant)
                    ),
                });
            }
        }
        for (d, _) in &q.filters {
            if !dims.declares(&q.tenant, d) {
                return Err(QueryError::BadParam {
                    param: "where",
                    message: format!(
                        "{d:?} is not a declared dimension; the declared dimensions are: {} (declare more under [dimensions] in the config)",
                        dims.describe(&q.tenant)
                    ),
                });
            }
        }
        let split = q.splits();
        let mut series: BTreeMap<Vec<Option<&str>>, Points<'_>> = BTreeMap::new();
        let mut key: Vec<Option<&str>> = Vec::with_capacity(q.group_by.len());
        // A query that splits or filters by one or two dimensions reads
        // the buckets' totals per combination of those, not every full
        // combination.
        let named = q.named_dimensions();
        let few = (!named.is_empty() && named.len() <= MARGINAL_DIMS).then_some(&named[..]);
        let part = Part::of(&q.metric);
        let names = dims.of(&q.tenant);
        let mut slots = Slots::default();
        // Neither split nor filtered by event type: the totals over all
        // event types serve, one per value and bucket.
        let across = q.event_types.is_empty() && !q.group_by.iter().any(|g| g == "event_type");
        for (minute, bucket) in self.tenant_buckets(&q.tenant, from, q.end, g) {
            let b = align_down(minute, g);
            if split
                && across
                && let Some(few) = few
                && let Some(m) = bucket.marginal(None, few, names, part)
            {
                slots.add_totals(q, "", 0, m, b);
                continue;
            }
            for (ti, (ty, agg)) in bucket.types.iter().enumerate() {
                if !q.event_types.is_empty() && !q.event_types.iter().any(|t| t == &**ty) {
                    continue;
                }
                if !split {
                    key.clear();
                    key.extend(q.group_by.iter().map(|_| Some(&**ty)));
                    accumulate(&mut series, &key, b, agg, &q.metric);
                    continue;
                }
                if let Some(few) = few
                    && let Some(m) = bucket.marginal(Some(ti), few, names, part)
                {
                    let th = stable_hash(&[ty.as_bytes()]).rotate_left(17);
                    slots.add_totals(q, ty, th, m, b);
                    continue;
                }
                // Data written before any dimension was declared is one
                // combination where every dimension is missing.
                let whole = agg.by.is_empty().then_some(("", agg));
                for (combo, sub) in agg.by.iter().map(|(k, a)| (&**k, a)).chain(whole) {
                    slots.add_combination(q, ty, combo, sub, b);
                }
            }
        }
        for (k, points) in slots.keys.into_iter().zip(slots.points) {
            series.insert(k, points);
        }
        if window > g {
            let quantile = matches!(q.metric, Metric::Quantile(..));
            for buckets in series.values_mut() {
                let mut points = Vec::new();
                let mut b = first;
                while b < q.end {
                    let lo = buckets.partition_point(|(m, _)| *m < b - (window - g));
                    let hi = buckets.partition_point(|(m, _)| *m <= b);
                    let mut acc: Option<Acc<'_>> = None;
                    for (_, x) in buckets.get(lo..hi).unwrap_or_default() {
                        match &mut acc {
                            Some(a) => a.merge(x, quantile),
                            None => acc = Some(x.clone()),
                        }
                    }
                    if let Some(a) = acc {
                        points.push((b, a));
                    }
                    b += g;
                }
                *buckets = points;
            }
        }
        Ok(finish(q, series))
    }
}

/// The series of a split query as they are found: each label combination
/// gets a slot, its points kept in bucket order. A split query meets the
/// same few combinations in every bucket, so where each (event type,
/// combination) goes (filtered out, or its slot) is worked out once.
#[derive(Default)]
struct Slots<'a> {
    points: Vec<Points<'a>>,
    keys: Vec<Vec<Option<&'a str>>>,
    slot_of: hashbrown::HashMap<Vec<Option<&'a str>>, usize>,
    /// Per (event type, full combination key).
    by_combination: hashbrown::HashMap<(&'a str, &'a str), Option<usize>>,
    /// Per (event type, key of a total) under the hash the total carries
    /// mixed with the type's: no key is hashed again.
    by_total: hashbrown::HashTable<(u64, &'a str, &'a str, Option<usize>)>,
}

impl<'a> Slots<'a> {
    /// Adds the aggregate of one full combination of event type `ty` in
    /// bucket `b` to its series.
    fn add_combination(
        &mut self,
        q: &MetricQuery,
        ty: &'a str,
        combo: &'a str,
        agg: &'a Agg,
        b: Millis,
    ) {
        let slot = match self.by_combination.get(&(ty, combo)) {
            Some(&s) => s,
            None => {
                let s = self.resolve(q, ty, |n| dims::value_of(combo, n));
                self.by_combination.insert((ty, combo), s);
                s
            }
        };
        if let Some(i) = slot {
            self.add(i, b, agg, &q.metric);
        }
    }

    /// Adds a bucket's totals of event type `ty` (`""`: of all types) to
    /// their series; `th` is the type's hash (0 for all types).
    fn add_totals(
        &mut self,
        q: &MetricQuery,
        ty: &'a str,
        th: u64,
        totals: &'a Marginal,
        b: Millis,
    ) {
        for (kh, k, agg) in totals.iter() {
            let h = kh ^ th;
            let found = self
                .by_total
                .find(h, |e| e.0 == h && same_str(e.1, ty) && e.2 == k)
                .map(|e| e.3);
            let slot = match found {
                Some(s) => s,
                None => {
                    let s = self.resolve(q, ty, |n| dims::value_of(k, n));
                    self.by_total.insert_unique(h, (h, ty, k, s), |e| e.0);
                    s
                }
            };
            if let Some(i) = slot {
                self.add(i, b, agg, &q.metric);
            }
        }
    }

    /// The slot of events of type `ty` whose dimension values `value`
    /// gives, or `None` when the query's filters leave them out.
    fn resolve(
        &mut self,
        q: &MetricQuery,
        ty: &'a str,
        value: impl Fn(&str) -> Option<&'a str>,
    ) -> Option<usize> {
        let admitted = q
            .filters
            .iter()
            .all(|(d, vals)| value(d).is_some_and(|v| vals.iter().any(|x| x == v)));
        if !admitted {
            return None;
        }
        let k: Vec<Option<&'a str>> = q
            .group_by
            .iter()
            .map(|g| {
                if g == "event_type" {
                    Some(ty)
                } else {
                    value(g)
                }
            })
            .collect();
        if let Some(&i) = self.slot_of.get(&k) {
            return Some(i);
        }
        self.points.push(Vec::new());
        self.keys.push(k.clone());
        self.slot_of.insert(k, self.points.len() - 1);
        Some(self.points.len() - 1)
    }

    /// Adds one aggregate to bucket `b` of slot `i`. Buckets arrive in
    /// order, so this is mostly the last point or a new one.
    #[inline]
    fn add(&mut self, i: usize, b: Millis, agg: &'a Agg, metric: &Metric) {
        add_point(&mut self.points[i], b, agg, metric);
    }
}

/// `a == b`, without reading the bytes when both are the same slice (an
/// event type's name compared with itself, the `""` of all types).
#[inline]
fn same_str(a: &str, b: &str) -> bool {
    a.len() == b.len() && (std::ptr::eq(a.as_ptr(), b.as_ptr()) || a == b)
}

/// A series' points in bucket order.
type Points<'a> = Vec<(Millis, Acc<'a>)>;

/// Adds one aggregate to bucket `b` of a series. Buckets arrive in order,
/// so this is mostly the last point or a new one.
#[inline]
fn add_point<'a>(points: &mut Points<'a>, b: Millis, agg: &'a Agg, metric: &Metric) {
    let at = match points.last() {
        Some((last, _)) if *last == b => points.len() - 1,
        Some((last, _)) if *last > b => match points.binary_search_by_key(&b, |(m, _)| *m) {
            Ok(at) => at,
            Err(at) => {
                points.insert(at, (b, acc_of(agg, metric)));
                return;
            }
        },
        _ => {
            // A new point starts from its first aggregate, borrowed (no
            // merge into an empty sketch that grows).
            points.push((b, acc_of(agg, metric)));
            return;
        }
    };
    add_to(&mut points[at].1, agg, metric);
}

/// The buckets of `m` in `[from, to)` (none when the range is empty).
fn span(
    m: &BTreeMap<Millis, MinuteBucket>,
    from: Millis,
    to: Millis,
) -> std::collections::btree_map::Range<'_, Millis, MinuteBucket> {
    if from < to {
        m.range(from..to)
    } else {
        m.range(0..0)
    }
}

/// Adds one aggregate to bucket `b` of the series `key`.
fn accumulate<'a>(
    series: &mut BTreeMap<Vec<Option<&'a str>>, Points<'a>>,
    key: &[Option<&'a str>],
    b: Millis,
    agg: &'a Agg,
    metric: &Metric,
) {
    let points = match series.get_mut(key) {
        Some(s) => s,
        None => series.entry(key.to_vec()).or_default(),
    };
    add_point(points, b, agg, metric);
}

/// An accumulator of `metric` holding one aggregate, borrowed.
fn acc_of<'a>(agg: &'a Agg, metric: &Metric) -> Acc<'a> {
    match metric {
        Metric::Count => Acc::Count(agg.count),
        Metric::UniqueUsers => Acc::Distinct {
            events: agg.count,
            hll: Shared::Ref(&agg.users),
        },
        Metric::UniqueSessions => Acc::Distinct {
            events: agg.count,
            hll: Shared::Ref(&agg.sessions),
        },
        Metric::Quantile(_, p)
        | Metric::Sum(p)
        | Metric::Avg(p)
        | Metric::Min(p)
        | Metric::Max(p) => Acc::Num {
            events: agg.count,
            agg: agg
                .prop(p)
                .map_or_else(|| Shared::Own(Box::default()), Shared::Ref),
        },
    }
}

/// Adds one aggregate to an accumulator of `metric`.
#[inline]
fn add_to(acc: &mut Acc<'_>, agg: &Agg, metric: &Metric) {
    match (acc, metric) {
        (Acc::Count(c), _) => *c += agg.count,
        (Acc::Distinct { events, hll }, Metric::UniqueUsers) => {
            *events += agg.count;
            hll.own().merge(&agg.users);
        }
        (Acc::Distinct { events, hll }, _) => {
            *events += agg.count;
            hll.own().merge(&agg.sessions);
        }
        (
            Acc::Num { events, agg: n },
            Metric::Sum(p)
            | Metric::Avg(p)
            | Metric::Min(p)
            | Metric::Max(p)
            | Metric::Quantile(_, p),
        ) => {
            *events += agg.count;
            if let Some(x) = agg.prop(p) {
                if matches!(metric, Metric::Quantile(..)) {
                    n.own().merge(x);
                } else {
                    // Only exact statistics are needed: skip the sketch.
                    n.own_with(exact_copy).merge_exact(x);
                }
            }
        }
        (Acc::Num { .. }, _) => {}
    }
}

fn finish(q: &MetricQuery, series: BTreeMap<Vec<Option<&str>>, Points<'_>>) -> Vec<Series> {
    let mut out: Vec<Series> = series
        .into_iter()
        .map(|(key, buckets)| Series {
            labels: q
                .group_by
                .iter()
                .zip(key)
                .map(|(g, v)| (g.clone(), v.map(str::to_string)))
                .collect(),
            points: buckets
                .into_iter()
                .filter_map(|(b, acc)| Some((b, value(&q.metric, acc)?)))
                .collect(),
        })
        .filter(|s| !s.points.is_empty() || s.labels.is_empty())
        .collect();
    if out.is_empty() && q.group_by.is_empty() {
        out.push(Series {
            labels: Vec::new(),
            points: Vec::new(),
        });
    }
    out
}

fn value(metric: &Metric, acc: Acc<'_>) -> Option<Value> {
    match acc {
        Acc::Count(0) => None,
        Acc::Count(c) => Some(Value::Int(c)),
        Acc::Distinct { events: 0, .. } => None,
        Acc::Distinct { hll, .. } => Some(Value::Int(hll.estimate())),
        Acc::Num { events: 0, .. } => None,
        Acc::Num { agg, .. } => match metric {
            Metric::Sum(_) => Some(Value::Float(agg.sum.value())),
            _ if agg.count == 0 => None,
            Metric::Avg(_) => Some(Value::Float(agg.sum.value() / agg.count as f64)),
            Metric::Min(_) => Some(Value::Float(agg.min)),
            Metric::Max(_) => Some(Value::Float(agg.max)),
            Metric::Quantile(q, _) => agg.sketch.quantile(*q).map(Value::Float),
            _ => None,
        },
    }
}

/// A tenant's rollups, created if needed, marked as changed from `minute`
/// on (a free function so callers can borrow other fields of the store).
fn tenant_entry<'a>(
    tenants: &'a mut HashMap<Box<str>, TenantRollups>,
    dirty: &mut Vec<Box<str>>,
    tenant: &str,
    minute: Millis,
) -> &'a mut TenantRollups {
    if !tenants.contains_key(tenant) {
        tenants.insert(tenant.into(), TenantRollups::default());
    }
    let Some(t) = tenants.get_mut(tenant) else {
        unreachable!("inserted above")
    };
    if t.changes.touch(minute) {
        dirty.push(tenant.into());
    }
    t
}

/// Adds an event to its delta: the total, then the combination `key`
/// (both taking the properties `within` holds, as the value did).
#[inline]
fn add_delta(
    d: &mut Deltas,
    tenant: &str,
    minute: Millis,
    ty: &str,
    key: &str,
    within: Option<&[(Box<str>, NumAgg)]>,
    add: impl Fn(&mut Agg, Option<&[(Box<str>, NumAgg)]>) -> u64,
) {
    let agg = d.agg(tenant, minute, ty);
    add(agg, within);
    add(agg.by.entry_ref(key).or_default(), within);
}

#[cfg(test)]
mod metric_names {
    use super::*;

    #[test]
    fn percentiles_from_p1_to_p99_9_and_missing_properties_named() {
        for (s, q) in [
            ("p1", 0.01),
            ("p50", 0.5),
            ("p75", 0.75),
            ("p99.9", 0.999),
            ("p99", 0.99),
        ] {
            match Metric::parse(&format!("{s}:ms")).unwrap() {
                Metric::Quantile(got, p) => {
                    assert!((got - q).abs() < 1e-12, "{s}");
                    assert_eq!(p, "ms");
                }
                other => panic!("{s}: {other:?}"),
            }
        }
        for bad in [
            "p0:ms",
            "p100:ms",
            "p99.99:ms",
            "p:ms",
            "pp:ms",
            "p-1:ms",
            "p1e2:ms",
            "q50:ms",
        ] {
            assert!(Metric::parse(bad).is_err(), "{bad}");
        }
        for alone in ["p95", "sum", "avg", "p99.9"] {
            let e = Metric::parse(alone).unwrap_err().to_string();
            assert!(e.contains(&format!("{alone}:<property>")), "{alone}: {e}");
        }
        assert!(
            Metric::parse("nope")
                .unwrap_err()
                .to_string()
                .contains("count")
        );
    }
}

#[cfg(test)]
mod split {
    use super::*;

    /// An aggregate with `n` combinations, each with its own users and a
    /// numeric property.
    fn wide(n: u64) -> Agg {
        let mut total = Agg::default();
        for i in 0..n {
            let mut c = Agg::default();
            for u in 0..20 {
                let (uh, sh) = (Some(i * 1000 + u), Some(i * 7777 + u));
                let nums = [("duration_ms", (i + u) as f64)];
                total.add_nums(uh, sh, &nums);
                c.add_nums(uh, sh, &nums);
            }
            total
                .by
                .insert(format!("country=c{i}\x1fpage=/p{i}").into(), c);
        }
        total
    }

    fn encoded_len(a: &Agg) -> usize {
        let mut e = Enc::new();
        a.encode(&mut e);
        e.buf.len()
    }

    #[test]
    fn parts_fit_the_limit_and_merge_back_to_the_aggregate() {
        let agg = wide(2000);
        let whole = encoded_len(&agg);
        let limit = 64 * 1024;
        assert!(whole > 4 * limit, "the test aggregate is {whole} bytes");
        let parts = agg.split(limit);
        assert!(parts.len() >= whole / limit, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert!(
                encoded_len(p) <= limit,
                "part {i}: {} bytes",
                encoded_len(p)
            );
            if i > 0 {
                assert_eq!(p.count, 0, "part {i} repeats the count");
            }
        }
        // The totals' sketches (dense: 32 KB each) fill the first part.
        assert!(parts[0].by.is_empty() && parts[0].props.is_empty());
        // Each part decodes on its own, and the parts merge back.
        let mut merged = Agg::default();
        for p in &parts {
            let mut e = Enc::new();
            p.encode(&mut e);
            merged.merge(&Agg::decode(&mut Dec::new(&e.buf)).unwrap());
        }
        assert_eq!(merged, agg);
    }

    #[test]
    fn an_aggregate_that_fits_is_one_part() {
        let agg = wide(3);
        assert_eq!(agg.split(1 << 20), vec![agg.clone()]);
        // Pieces past the limit cannot be split further: each its own part.
        let one = wide(1);
        let parts = one.split(16);
        assert_eq!(parts.len(), 4, "users, sessions, a property, a combination");
        assert_eq!(parts[3].by.len(), 1);
        let mut merged = Agg::default();
        for p in &parts {
            merged.merge(p);
        }
        assert_eq!(merged, one);
    }
}
