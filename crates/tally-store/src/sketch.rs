//! Mergeable sketches: distinct counts (HyperLogLog) and relative-error
//! quantiles (DDSketch), plus an exactly-rounded running sum.
//!
//! Error bounds (documented in the API): `unique_*` ≤ 2 % relative error —
//! exact up to [`SPARSE_MAX`] distinct values, then HyperLogLog with 2^15
//! registers (standard error 0.57 %, so 2 % is ≈ 3.5 σ) and Ertl's improved
//! estimator, which needs no bias tables across the whole range.
//! Percentiles ≤ 1 % relative error on the value (DDSketch, α = 1 %), with
//! linear interpolation between neighbouring ranks like `numpy.percentile`.

use std::hash::{BuildHasherDefault, Hasher};

use tally_types::bin::{Dec, DecodeError, Enc};

/// A hasher for keys that are already uniformly distributed 64-bit hashes.
#[derive(Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = i as u64;
    }
}

pub type HashSet64 = hashbrown::HashSet<u64, BuildHasherDefault<IdentityHasher>>;
pub type HashSet128 = hashbrown::HashSet<u128, BuildHasherDefault<IdentityHasher>>;

const P: u32 = 15;
const M: usize = 1 << P;
const Q: u32 = 64 - P;
/// Distinct values kept exactly before switching to registers.
pub const SPARSE_MAX: usize = 4096;

/// HyperLogLog over 64-bit hashes, exact while small.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hll {
    Sparse(HashSet64),
    Dense(Box<[u8]>),
}

impl Default for Hll {
    fn default() -> Self {
        Hll::Sparse(HashSet64::default())
    }
}

impl Hll {
    #[inline]
    pub fn insert(&mut self, h: u64) {
        match self {
            Hll::Sparse(s) => {
                s.insert(h);
                if s.len() > SPARSE_MAX {
                    self.densify();
                }
            }
            Hll::Dense(r) => dense_insert(r, h),
        }
    }

    fn densify(&mut self) {
        if let Hll::Sparse(s) = self {
            let mut r = vec![0u8; M].into_boxed_slice();
            for &h in s.iter() {
                dense_insert(&mut r, h);
            }
            *self = Hll::Dense(r);
        }
    }

    pub fn merge(&mut self, other: &Hll) {
        match (&mut *self, other) {
            (Hll::Sparse(a), Hll::Sparse(b)) => {
                a.extend(b.iter().copied());
                if a.len() > SPARSE_MAX {
                    self.densify();
                }
            }
            (Hll::Dense(a), Hll::Sparse(b)) => {
                for &h in b.iter() {
                    dense_insert(a, h);
                }
            }
            (Hll::Sparse(_), Hll::Dense(_)) => {
                self.densify();
                self.merge(other);
            }
            (Hll::Dense(a), Hll::Dense(b)) => {
                for (x, y) in a.iter_mut().zip(b.iter()) {
                    *x = (*x).max(*y);
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Hll::Sparse(s) => s.is_empty(),
            Hll::Dense(_) => false,
        }
    }

    /// Estimated number of distinct values (exact in sparse mode).
    pub fn estimate(&self) -> u64 {
        match self {
            Hll::Sparse(s) => s.len() as u64,
            Hll::Dense(r) => ertl_estimate(r).round() as u64,
        }
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Hll::Sparse(s) => s.capacity() * 9,
            Hll::Dense(r) => r.len(),
        }
    }
}

#[inline]
fn dense_insert(r: &mut [u8], h: u64) {
    let idx = (h >> Q) as usize;
    let w = h << P;
    let rank = if w == 0 {
        Q + 1
    } else {
        (w.leading_zeros() + 1).min(Q + 1)
    } as u8;
    if r[idx] < rank {
        r[idx] = rank;
    }
}

fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let z_old = z;
        z += x * y;
        y += y;
        if z == z_old {
            return z;
        }
    }
}

fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let z_old = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if z == z_old {
            return z / 3.0;
        }
    }
}

/// Ertl, "New cardinality estimation algorithms for HyperLogLog sketches" (2017).
fn ertl_estimate(r: &[u8]) -> f64 {
    let mut c = [0u32; (Q + 2) as usize];
    for &v in r {
        c[v as usize] += 1;
    }
    let m = M as f64;
    let mut z = m * tau(1.0 - c[(Q + 1) as usize] as f64 / m);
    for k in (1..=Q as usize).rev() {
        z = 0.5 * (z + c[k] as f64);
    }
    z += m * sigma(c[0] as f64 / m);
    let alpha_inf = 0.5 / std::f64::consts::LN_2;
    alpha_inf * m * m / z
}

/// Relative accuracy of [`DdSketch`].
pub const DD_ALPHA: f64 = 0.01;
const DD_MAX_BINS: usize = 4096;

/// Dense bins over a contiguous range of keys.
#[derive(Clone, Debug, Default, PartialEq)]
struct Bins {
    offset: i32,
    counts: Vec<u64>,
}

impl Bins {
    #[inline]
    fn add(&mut self, key: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = key;
            self.counts.push(n);
            return;
        }
        if key < self.offset {
            let grow = (self.offset - key) as usize;
            if self.counts.len() + grow > DD_MAX_BINS {
                // Collapse the lowest keys into the lowest kept bin (bounded memory;
                // only the extreme low quantiles lose accuracy).
                self.counts[0] += n;
                return;
            }
            let mut v = vec![0u64; grow];
            v.extend_from_slice(&self.counts);
            self.counts = v;
            self.offset = key;
        }
        let i = (key - self.offset) as usize;
        if i >= self.counts.len() {
            if i >= DD_MAX_BINS {
                let last = self.counts.len() - 1;
                self.counts[last] += n;
                return;
            }
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += n;
    }

    fn merge(&mut self, other: &Bins) {
        for (i, &c) in other.counts.iter().enumerate() {
            if c > 0 {
                self.add(other.offset + i as i32, c);
            }
        }
    }
}

/// DDSketch with relative accuracy [`DD_ALPHA`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DdSketch {
    pos: Bins,
    neg: Bins,
    zeros: u64,
    count: u64,
    min: f64,
    max: f64,
}

fn gamma_ln() -> f64 {
    ((1.0 + DD_ALPHA) / (1.0 - DD_ALPHA)).ln()
}

/// Values closer to zero than this are counted as zero.
const DD_MIN_VALUE: f64 = 1e-9;

impl DdSketch {
    #[inline]
    fn key(v: f64) -> i32 {
        (v.ln() / gamma_ln()).ceil() as i32
    }

    fn value(key: i32) -> f64 {
        let g = gamma_ln().exp();
        2.0 * (key as f64 * gamma_ln()).exp() / (g + 1.0)
    }

    #[inline]
    pub fn insert(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        if v > DD_MIN_VALUE {
            self.pos.add(Self::key(v), 1);
        } else if v < -DD_MIN_VALUE {
            self.neg.add(Self::key(-v), 1);
        } else {
            self.zeros += 1;
        }
    }

    pub fn merge(&mut self, o: &DdSketch) {
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
        self.zeros += o.zeros;
        self.pos.merge(&o.pos);
        self.neg.merge(&o.neg);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at 0-based rank `rank` (0 = min, count-1 = max).
    fn at_rank(&self, rank: u64) -> f64 {
        if rank == 0 {
            return self.min;
        }
        if rank + 1 >= self.count {
            return self.max;
        }
        let mut seen = 0u64;
        // Negative values: largest magnitude (most negative) first.
        for (i, &c) in self.neg.counts.iter().enumerate().rev() {
            seen += c;
            if seen > rank {
                return (-Self::value(self.neg.offset + i as i32)).clamp(self.min, self.max);
            }
        }
        seen += self.zeros;
        if seen > rank {
            return 0.0;
        }
        for (i, &c) in self.pos.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Self::value(self.pos.offset + i as i32).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// The `q`-quantile (0 ≤ q ≤ 1), interpolated linearly between ranks.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let pos = q.clamp(0.0, 1.0) * (self.count - 1) as f64;
        let lo = pos.floor() as u64;
        let frac = pos - lo as f64;
        let a = self.at_rank(lo);
        if frac == 0.0 {
            return Some(a);
        }
        let b = self.at_rank(lo + 1);
        Some(a + (b - a) * frac)
    }

    pub fn heap_bytes(&self) -> usize {
        (self.pos.counts.capacity() + self.neg.counts.capacity()) * 8
    }
}

/// An exact sum of floats: Shewchuk's non-overlapping partials (as Python's
/// `math.fsum`). The partials always add up to the exact real sum of every
/// value added, so [`ExactSum::value`] is that sum correctly rounded —
/// whatever the order values arrive in or how sums are merged
/// (`[1e16, 1.0, 1e-16]` gives `1.0000000000000002e16`, not `1e16`). A
/// sum past the f64 range is ±infinity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExactSum {
    /// Non-overlapping, increasing in magnitude.
    partials: Vec<f64>,
}

impl ExactSum {
    #[inline]
    pub fn add(&mut self, v: f64) {
        let mut x = v;
        let mut i = 0;
        for j in 0..self.partials.len() {
            let mut y = self.partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                self.partials[i] = lo;
                i += 1;
            }
            x = hi;
        }
        if !x.is_finite() {
            // Overflow: the partials can no longer hold the sum.
            self.partials.clear();
            self.partials.push(x);
            return;
        }
        self.partials.truncate(i);
        self.partials.push(x);
    }

    pub fn merge(&mut self, o: &ExactSum) {
        for &p in &o.partials {
            self.add(p);
        }
    }

    /// The exact sum, correctly rounded (round half to even).
    pub fn value(&self) -> f64 {
        let p = &self.partials;
        let Some(&top) = p.last() else { return 0.0 };
        let mut n = p.len() - 1;
        let mut hi = top;
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            let y = p[n - 1];
            n -= 1;
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        // Halfway cases: the rest of the partials decide the rounding.
        if n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        hi
    }
}

// Persisted form (checkpoints, sealed rollups). Every field is written
// exactly, so a decoded sketch behaves bit for bit like the original.

impl Hll {
    pub fn encode(&self, e: &mut Enc) {
        match self {
            Hll::Sparse(s) => {
                e.u8(0);
                e.u32(s.len() as u32);
                for &h in s.iter() {
                    e.u64(h);
                }
            }
            Hll::Dense(r) => {
                e.u8(1);
                e.bytes(r);
            }
        }
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<Hll, DecodeError> {
        match d.u8()? {
            0 => {
                let n = d.count(8)?;
                if n > SPARSE_MAX {
                    return d.err("sparse HLL larger than its limit");
                }
                let mut s = HashSet64::with_capacity_and_hasher(n, Default::default());
                for _ in 0..n {
                    s.insert(d.u64()?);
                }
                Ok(Hll::Sparse(s))
            }
            1 => {
                let r = d.bytes()?;
                if r.len() != M {
                    return d.err("HLL register count");
                }
                Ok(Hll::Dense(r.into()))
            }
            _ => d.err("HLL tag"),
        }
    }
}

impl Bins {
    fn encode(&self, e: &mut Enc) {
        e.i64(self.offset as i64);
        e.u32(self.counts.len() as u32);
        for &c in &self.counts {
            e.u64(c);
        }
    }

    fn decode(d: &mut Dec<'_>) -> Result<Bins, DecodeError> {
        let offset = d.i64()?;
        let n = d.count(8)?;
        if n > DD_MAX_BINS || i32::try_from(offset).is_err() {
            return d.err("DDSketch bins out of range");
        }
        let mut counts = Vec::with_capacity(n);
        for _ in 0..n {
            counts.push(d.u64()?);
        }
        Ok(Bins {
            offset: offset as i32,
            counts,
        })
    }
}

impl DdSketch {
    pub fn encode(&self, e: &mut Enc) {
        self.pos.encode(e);
        self.neg.encode(e);
        e.u64(self.zeros);
        e.u64(self.count);
        e.f64(self.min);
        e.f64(self.max);
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<DdSketch, DecodeError> {
        Ok(DdSketch {
            pos: Bins::decode(d)?,
            neg: Bins::decode(d)?,
            zeros: d.u64()?,
            count: d.u64()?,
            min: d.f64()?,
            max: d.f64()?,
        })
    }
}

/// Marks the partials form of an [`ExactSum`]: a signalling NaN no
/// arithmetic produces, so it never starts the older `(sum, compensation)`
/// form, which is still read.
const PARTIALS_TAG: u64 = 0x7ff4_7a11_e5a5_0001;

impl ExactSum {
    pub fn encode(&self, e: &mut Enc) {
        e.f64(f64::from_bits(PARTIALS_TAG));
        e.u32(self.partials.len() as u32);
        for &p in &self.partials {
            e.f64(p);
        }
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<ExactSum, DecodeError> {
        let first = d.f64()?;
        if first.to_bits() == PARTIALS_TAG {
            let n = d.count(8)?;
            let mut partials = Vec::with_capacity(n);
            for _ in 0..n {
                partials.push(d.f64()?);
            }
            return Ok(ExactSum { partials });
        }
        // The Neumaier form of format versions up to 3: (sum, compensation).
        let comp = d.f64()?;
        let mut s = ExactSum::default();
        s.add(first);
        s.add(comp);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn hll_is_exact_when_small_and_within_2_percent_when_large() {
        let mut rng = StdRng::seed_from_u64(7);
        for &n in &[
            0usize, 1, 100, 4096, 4097, 10_000, 30_000, 100_000, 1_000_000,
        ] {
            let mut h = Hll::default();
            for _ in 0..n {
                h.insert(rng.random());
            }
            let est = h.estimate() as f64;
            if n <= SPARSE_MAX {
                assert_eq!(est as usize, n);
            } else {
                let err = (est - n as f64).abs() / n as f64;
                assert!(err < 0.02, "n={n} est={est} err={err}");
            }
        }
    }

    #[test]
    fn hll_merge_equals_union() {
        let mut rng = StdRng::seed_from_u64(9);
        let vals: Vec<u64> = (0..50_000).map(|_| rng.random()).collect();
        let mut whole = Hll::default();
        let mut parts = vec![Hll::default(); 10];
        for (i, &v) in vals.iter().enumerate() {
            whole.insert(v);
            parts[i % 10].insert(v);
            parts[(i + 3) % 10].insert(v); // overlap: duplicates across parts
        }
        let mut merged = Hll::default();
        for p in &parts {
            merged.merge(p);
        }
        assert_eq!(merged.estimate(), whole.estimate());
    }

    fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
        let pos = q * (sorted.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let frac = pos - lo as f64;
        if lo + 1 < sorted.len() {
            sorted[lo] + (sorted[lo + 1] - sorted[lo]) * frac
        } else {
            sorted[lo]
        }
    }

    #[test]
    fn ddsketch_within_one_percent() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in [1usize, 2, 3, 10, 101, 5000] {
            let mut vals: Vec<f64> = (0..n)
                .map(|_| rng.random_range(-50.0f64..100_000.0).abs() + 1.0)
                .collect();
            let mut s = DdSketch::default();
            for &v in &vals {
                s.insert(v);
            }
            vals.sort_by(f64::total_cmp);
            for q in [0.0, 0.5, 0.9, 0.95, 0.99, 1.0] {
                let want = exact_quantile(&vals, q);
                let got = s.quantile(q).unwrap();
                assert!(
                    (got - want).abs() <= want.abs() * DD_ALPHA + 1e-9,
                    "n={n} q={q} got={got} want={want}"
                );
            }
        }
    }

    #[test]
    fn ddsketch_handles_negatives_and_zero() {
        let mut s = DdSketch::default();
        for v in [-10.0, -1.0, 0.0, 0.0, 5.0] {
            s.insert(v);
        }
        assert_eq!(s.quantile(0.0), Some(-10.0));
        assert_eq!(s.quantile(1.0), Some(5.0));
        assert_eq!(s.quantile(0.5), Some(0.0));
        let q25 = s.quantile(0.25).unwrap();
        assert!((q25 + 1.0).abs() < 0.011, "{q25}");
    }

    #[test]
    fn exact_sum_is_exact() {
        let sum = |vals: &[f64]| {
            let mut s = ExactSum::default();
            for &v in vals {
                s.add(v);
            }
            s.value()
        };
        // Reference values from Python's math.fsum.
        assert_eq!(sum(&[1e16, 1.0, 1e-16]), 1.0000000000000002e16);
        assert_eq!(sum(&[0.1; 10]), 1.0);
        assert_eq!(sum(&[1e100, 1.0, -1e100, 1e-100]), 1.0);
        assert_eq!(sum(&[]), 0.0);
        assert_eq!(sum(&[1e308, 1e308]), f64::INFINITY);
        // Merged in any split, the same.
        let vals = [1e16, 1.0, 1e-16, -3.5, 0.1, 7e-300, 2.0];
        for cut in 0..vals.len() {
            let (mut a, mut b) = (ExactSum::default(), ExactSum::default());
            vals[..cut].iter().for_each(|&v| a.add(v));
            vals[cut..].iter().for_each(|&v| b.add(v));
            b.merge(&a);
            assert_eq!(b.value(), sum(&vals), "cut {cut}");
        }
    }

    #[test]
    fn exact_sum_reads_the_older_encoding() {
        let mut e = Enc::new();
        e.f64(1e16);
        e.f64(2.0);
        let s = ExactSum::decode(&mut Dec::new(&e.buf)).unwrap();
        assert_eq!(s.value(), 1e16 + 2.0);
        let mut e = Enc::new();
        s.encode(&mut e);
        assert_eq!(ExactSum::decode(&mut Dec::new(&e.buf)).unwrap(), s);
    }

    proptest::proptest! {
        /// Against exact rational arithmetic (i128 over a common scale):
        /// integers times 2^-20, so every partial sum is representable.
        #[test]
        fn exact_sum_matches_exact_arithmetic(vals in proptest::collection::vec(-(1i64 << 50)..(1i64 << 50), 0..60)) {
            let scale = (1u64 << 20) as f64;
            let mut s = ExactSum::default();
            let mut r = ExactSum::default();
            for &v in &vals {
                s.add(v as f64 / scale);
            }
            for &v in vals.iter().rev() {
                r.add(v as f64 / scale);
            }
            let exact: i128 = vals.iter().map(|&v| v as i128).sum();
            proptest::prop_assert_eq!(s.value(), exact as f64 / scale);
            proptest::prop_assert_eq!(r.value(), s.value());
        }
    }

    #[test]
    fn exact_sum_is_order_independent() {
        let vals = [0.1, 0.2, 0.3, 1e16, -1e16, 19.99, 0.01];
        let mut a = ExactSum::default();
        let mut b = ExactSum::default();
        for v in vals {
            a.add(v);
        }
        for v in vals.iter().rev() {
            b.add(*v);
        }
        assert_eq!(a.value(), b.value());
    }
}
